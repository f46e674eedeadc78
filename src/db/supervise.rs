//! The database supervisor: health checks and migration until shutdown.
//! One runs per database: the ingest database's, and history's own
//! (`history.database_url`) when it is set.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Database, DbRole};
use crate::ops::health::Status;
use crate::ops::metrics::{DbFailureKind, Metrics};
use crate::retry::Backoff;

const HEALTHY_CHECK_EVERY: Duration = Duration::from_secs(2);

/// Watches the database until shutdown: health checks (every 2 s while up,
/// with capped exponential backoff while down), and, for the ingest
/// database, once it is up the migrations (or, with `migrate` off, the
/// storage check alone) until they pass: the schema is ready only then.
/// History's own database is only checked: it is a replica of the ingest
/// database, which brings it its schema, and while it is down history
/// answers 503 at once, so it is checked again sooner (at most 5 s apart).
/// A refused login or TLS failure is not transient: it is shown on
/// `/health` as `auth_failed` and checked again only at the longest interval.
pub async fn supervise(
    db: Database,
    migrate: bool,
    status: Arc<Status>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let role = db.role();
    let longest = match role {
        DbRole::Primary => Duration::from_secs(15),
        DbRole::History => Duration::from_secs(5),
    };
    let mut backoff = Backoff::new(Duration::from_millis(250), longest);
    // Only the ingest database has a schema to prepare.
    let mut schema_ready = role == DbRole::History;
    if role == DbRole::Primary {
        status.set_schema_ready(false);
    }
    loop {
        // A check waits up to its timeout for an unreachable database: shutdown does not.
        let check = tokio::select! {
            _ = shutdown.cancelled() => return,
            check = db.health_check() => check,
        };
        let auth_failed = matches!(&check, Err(e) if e.kind() == DbFailureKind::Authentication);
        status.set_db_auth_failed(role, auth_failed);
        if auth_failed {
            backoff.jump_to_max();
        }
        let up = match &check {
            Ok(()) => true,
            Err(e) => {
                metrics.db_checked(role, Err((e.kind(), e)));
                false
            }
        };
        if up {
            metrics.db_checked(role, Ok(()));
            if !schema_ready {
                let result = if migrate {
                    db.migrate().await
                } else {
                    db.verify_storage().await
                };
                match result {
                    Ok(storage) => {
                        tracing::info!(%storage, "database schema is up to date");
                        status.set_storage(storage);
                        schema_ready = true;
                        status.set_schema_ready(true);
                    }
                    Err(e) => {
                        if let Some(storage) = e.storage() {
                            status.set_storage(storage);
                        }
                        tracing::error!(error = %e, "the database is not ready for tickvault; retrying")
                    }
                }
            }
        }
        status.set_db_up(role, up);
        let pause = if up && schema_ready {
            backoff.reset();
            HEALTHY_CHECK_EVERY
        } else {
            backoff.next_delay()
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}
