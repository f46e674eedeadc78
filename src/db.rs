//! The PostgreSQL side: the pool, the health check, migrations and the
//! TimescaleDB policies. The pool is lazy so the worker starts while the
//! database is down; [`supervise`] watches it and migrates once it is up.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::config::DatabaseConfig;
use crate::ops::health::Status;
use crate::ops::metrics::{DbFailureKind, Metrics};
use crate::retry::Backoff;

/// The embedded migrations of `migrations/`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

const HEALTH_CHECK_TIMEOUT: Duration = Duration::from_secs(5);
const HEALTHY_CHECK_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database.url {url} is not a usable PostgreSQL URL: {source}")]
    BadUrl { url: String, source: sqlx::Error },
    #[error("health check timed out after {0:?}: is the database overloaded or unreachable?")]
    Timeout(Duration),
    #[error("database check failed: {0}")]
    Query(#[source] sqlx::Error),
    #[error(
        "migrations failed: {0}; check the database's log and that the user may create tables"
    )]
    Migrate(#[source] sqlx::migrate::MigrateError),
}

impl DbError {
    /// The failure's label, telling apart what an operator fixes differently.
    pub fn kind(&self) -> DbFailureKind {
        match self {
            DbError::Timeout(_) => DbFailureKind::Timeout,
            DbError::Query(e) => classify(e),
            _ => DbFailureKind::Other,
        }
    }
}

pub fn classify(error: &sqlx::Error) -> DbFailureKind {
    match error {
        sqlx::Error::PoolTimedOut => DbFailureKind::Timeout,
        sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            DbFailureKind::ConnectionRefused
        }
        sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => DbFailureKind::Timeout,
        sqlx::Error::Database(db) if db.code().is_some_and(|c| c.starts_with("28")) => {
            DbFailureKind::Authentication
        }
        _ => DbFailureKind::Other,
    }
}

/// Errors after which the same write can succeed later: connection loss,
/// timeouts, the server shutting down or refusing connections for now.
pub fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08: connection exception, 53: insufficient resources,
            // 57P: operator intervention (shutdown), 40: serialization/deadlock, 28: auth.
            ["08", "53", "57P", "40", "28"]
                .iter()
                .any(|class| code.starts_with(class))
        }),
        _ => false,
    }
}

#[derive(Clone)]
pub struct Database {
    pub pool: PgPool,
    options: PgConnectOptions,
    config: DatabaseConfig,
}

impl Database {
    /// Builds the pool without connecting: the first use connects.
    pub fn connect_lazy(config: &DatabaseConfig) -> Result<Database, DbError> {
        let options = PgConnectOptions::from_str(config.url.expose())
            .map_err(|source| DbError::BadUrl {
                url: config.url.redacted(),
                source,
            })?
            .application_name("tickvault")
            .log_statements(tracing::log::LevelFilter::Debug)
            .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(2));
        let pool = PgPoolOptions::new()
            .min_connections(config.pool_min)
            .max_connections(config.pool_max)
            .acquire_timeout(Duration::from_millis(config.acquire_timeout_ms))
            .connect_lazy_with(options.clone());
        Ok(Database {
            pool,
            options,
            config: config.clone(),
        })
    }

    /// `SELECT 1` within 5 s. When the pool only says it timed out, one
    /// direct connection tells why (refused, authentication, ...).
    pub async fn health_check(&self) -> Result<(), DbError> {
        let result = tokio::time::timeout(
            HEALTH_CHECK_TIMEOUT,
            sqlx::query("SELECT 1").execute(&self.pool),
        )
        .await;
        match result {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(sqlx::Error::PoolTimedOut)) => {
                match tokio::time::timeout(HEALTH_CHECK_TIMEOUT, self.options.connect()).await {
                    // The database answers; the pool is only busy.
                    Ok(Ok(conn)) => {
                        let _ = conn.close().await;
                        Ok(())
                    }
                    Ok(Err(e)) => Err(DbError::Query(e)),
                    Err(_) => Err(DbError::Timeout(HEALTH_CHECK_TIMEOUT)),
                }
            }
            Ok(Err(e)) => Err(DbError::Query(e)),
            Err(_) => Err(DbError::Timeout(HEALTH_CHECK_TIMEOUT)),
        }
    }

    /// Applies the embedded migrations (a no-op when they are all applied),
    /// then the TimescaleDB policies where TimescaleDB is installed.
    pub async fn migrate(&self) -> Result<(), DbError> {
        MIGRATOR.run(&self.pool).await.map_err(DbError::Migrate)?;
        self.apply_timescale_policies()
            .await
            .map_err(|e| DbError::Migrate(e.into()))?;
        Ok(())
    }

    async fn apply_timescale_policies(&self) -> Result<(), sqlx::Error> {
        let installed: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')",
        )
        .fetch_one(&self.pool)
        .await?;
        if !installed {
            return Ok(());
        }
        for t in crate::records::RecordType::ALL {
            let table = t.spec().table;
            for (interval, add, remove) in [
                (
                    &self.config.compress_after,
                    "add_compression_policy",
                    "remove_compression_policy",
                ),
                (
                    &self.config.retention,
                    "add_retention_policy",
                    "remove_retention_policy",
                ),
            ] {
                // Remove then add, so a changed interval takes effect.
                sqlx::query(&format!("SELECT {remove}($1::regclass, if_exists => true)"))
                    .bind(table)
                    .execute(&self.pool)
                    .await?;
                if !interval.trim().is_empty() {
                    sqlx::query(&format!("SELECT {add}($1::regclass, $2::interval)"))
                        .bind(table)
                        .bind(interval.trim())
                        .execute(&self.pool)
                        .await?;
                }
            }
        }
        tracing::info!("TimescaleDB compression and retention policies applied");
        Ok(())
    }

    pub fn pool_max(&self) -> u32 {
        self.config.pool_max
    }
}

/// Watches the database until shutdown: health checks (every 2 s while up,
/// with capped exponential backoff while down), migrations once it is up.
pub async fn supervise(
    db: Database,
    migrate: bool,
    status: Arc<Status>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(15));
    let mut schema_ready = !migrate;
    status.set_schema_ready(schema_ready);
    loop {
        let check = db.health_check().await;
        let up = match &check {
            Ok(()) => true,
            Err(e) => {
                metrics.db_checked(Err((e.kind(), e)));
                false
            }
        };
        if up {
            metrics.db_checked(Ok(()));
            if !schema_ready {
                match db.migrate().await {
                    Ok(()) => {
                        tracing::info!("database schema is up to date");
                        schema_ready = true;
                        status.set_schema_ready(true);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "could not migrate the database; retrying")
                    }
                }
            }
        }
        status.set_db_up(up);
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
