//! The `tickvault-history` NATS micro service: one endpoint per record type,
//! requests answered concurrently (bounded), replies cut to the server's
//! max payload, errors as a JSON body plus the micro-service error headers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::service::{ServiceExt as _, NATS_SERVICE_ERROR, NATS_SERVICE_ERROR_CODE};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::stream::{self, StreamExt as _, TryStreamExt as _};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::query::{self, RowKey};
use super::request::{self, Query};
use super::HistoryError;
use crate::config::HistoryConfig;
use crate::db::{Database, DbRole};
use crate::ops::health::Status;
use crate::ops::metrics::Metrics;
use crate::records::RecordType;
use crate::retry::Backoff;

pub const SERVICE_NAME: &str = "tickvault-history";
pub const QUEUE_GROUP: &str = "tickvault-history";
/// The reply size when the server does not say its max payload.
const FALLBACK_MAX_PAYLOAD: usize = 1024 * 1024;
/// Room kept for the reply envelope (`{"rows":[` ... `],"next_cursor":"..."}`).
const ENVELOPE_MARGIN: usize = 1024;
/// Added to the pool's acquire timeout and the server-side statement timeout
/// for the client-side bound, so PostgreSQL cancels a slow query (and the
/// connection returns clean) before the client would give up on it.
const CLIENT_TIMEOUT_MARGIN: Duration = Duration::from_secs(5);
/// How long shutdown waits for requests being answered.
const DRAIN_BOUND: Duration = Duration::from_secs(5);

/// Shared by every request task.
struct Context {
    client: async_nats::Client,
    /// The database history reads: the ingest database's pool, or its own.
    db: Database,
    metrics: Arc<Metrics>,
    status: Arc<Status>,
}

pub async fn serve(
    client: async_nats::Client,
    db: Database,
    config: HistoryConfig,
    metrics: Arc<Metrics>,
    status: Arc<Status>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    let (service, endpoints) = loop {
        let started = tokio::select! {
            _ = shutdown.cancelled() => return,
            started = start(&client, &config) => started,
        };
        match started {
            Ok(started) => break started,
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64,
                    "cannot start the history service; is NATS reachable?");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    };
    status.set_history_ready(true);
    tracing::info!(prefix = %config.subject_prefix, "history service started");

    let context = Arc::new(Context {
        client,
        db,
        metrics,
        status: status.clone(),
    });
    let mut requests = stream::select_all(
        endpoints
            .into_iter()
            .map(|(record_type, endpoint)| endpoint.map(move |request| (record_type, request))),
    );
    let permits = Arc::new(Semaphore::new(max_in_flight(&context.db)));
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            next = requests.next() => {
                let Some((record_type, request)) = next else { break };
                let permit = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    permit = permits.clone().acquire_owned() => permit,
                };
                let Ok(permit) = permit else { break };
                let context = context.clone();
                tasks.spawn(async move {
                    handle(&context, record_type, request).await;
                    drop(permit);
                });
            }
        }
    }
    status.set_history_ready(false);
    drop(requests);
    if let Err(e) = service.stop().await {
        tracing::warn!(error = %e, "could not stop the history service cleanly");
    }
    let drained = tokio::time::timeout(DRAIN_BOUND, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("history requests still running at shutdown were abandoned");
        tasks.abort_all();
    }
    tracing::info!("history service stopped");
}

/// Requests answered at the same time (more wait in the subscription): on
/// the ingest database's pool half of it, so history never takes every
/// connection the ingest flushes need; on its own pool all but the one its
/// health check needs.
pub fn max_in_flight(db: &Database) -> usize {
    let pool_max = db.pool_max() as usize;
    let share = match db.role() {
        DbRole::Primary => pool_max / 2,
        DbRole::History => pool_max.saturating_sub(1),
    };
    share.max(1)
}

type Started = (
    async_nats::service::Service,
    Vec<(RecordType, async_nats::service::endpoint::Endpoint)>,
);

async fn start(
    client: &async_nats::Client,
    config: &HistoryConfig,
) -> Result<Started, async_nats::Error> {
    let service = client
        .service_builder()
        .description("tickvault market-data history: ticks, candles, foreign, index, derivatives")
        .queue_group(QUEUE_GROUP)
        .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
        .await?;
    let mut endpoints = Vec::with_capacity(RecordType::ALL.len());
    for record_type in RecordType::ALL {
        let kind = record_type.spec().history_kind;
        let endpoint = service
            .endpoint_builder()
            .name(kind)
            .add(format!("{}.{kind}", config.subject_prefix))
            .await;
        match endpoint {
            Ok(endpoint) => endpoints.push((record_type, endpoint)),
            Err(e) => {
                let _ = service.stop().await;
                return Err(e);
            }
        }
    }
    Ok((service, endpoints))
}

async fn handle(context: &Context, record_type: RecordType, request: async_nats::service::Request) {
    let started = Instant::now();
    let kind = record_type.spec().history_kind;
    let max_payload = match context.client.server_info().max_payload {
        0 => FALLBACK_MAX_PAYLOAD,
        n => n,
    };
    let result = match request::parse(record_type, &request.message.payload) {
        Ok(_) if context.status.history_db_down() => Err(HistoryError::DatabaseDown),
        Ok(query) => answer(&context.db, &query, max_payload).await,
        Err(e) => Err(e),
    };
    let code = match result {
        Ok(body) => {
            if let Err(e) = request.respond(Ok(body)).await {
                tracing::warn!(kind, error = %e, "could not send a history reply");
            }
            200
        }
        Err(error) => {
            let code = error.code();
            if code >= 500 {
                tracing::warn!(kind, code, error = %error, cause = ?std::error::Error::source(&error).map(|s| s.to_string()),
                    "history request failed");
            }
            let mut headers = HeaderMap::new();
            headers.insert(NATS_SERVICE_ERROR, error.to_string().as_str());
            headers.insert(NATS_SERVICE_ERROR_CODE, code.to_string().as_str());
            if let Err(e) = request
                .respond_with_headers(Ok(error.reply_body()), headers)
                .await
            {
                tracing::warn!(kind, error = %e, "could not send a history error reply");
            }
            code
        }
    };
    context
        .metrics
        .history_answered(kind, code, started.elapsed());
}

/// Runs the query and writes the reply: as many rows as fit in `max_payload`
/// (and `limit`), and a cursor when more rows match. The query is bounded on
/// the server by `database.statement_timeout_ms` (answered 503); the
/// client-side bound is only a last resort for an unresponsive server.
pub async fn answer(
    db: &Database,
    query: &Query,
    max_payload: usize,
) -> Result<Bytes, HistoryError> {
    let bound = client_timeout(db);
    match tokio::time::timeout(bound, write_reply(db, query, max_payload)).await {
        Ok(result) => result,
        Err(_) => Err(HistoryError::Timeout(bound)),
    }
}

fn client_timeout(db: &Database) -> Duration {
    db.config.acquire_timeout() + db.config.statement_timeout() + CLIENT_TIMEOUT_MARGIN
}

async fn write_reply(
    db: &Database,
    query: &Query,
    max_payload: usize,
) -> Result<Bytes, HistoryError> {
    let spec = query.spec;
    let budget = max_payload.saturating_sub(ENVELOPE_MARGIN);
    // No more rows can fit than this, whatever `limit` says.
    let fit = (budget / query::min_row_bytes(spec)).max(1);
    let page = (query.limit as usize).min(fit);
    let (sql, args) = query::build(query, page as i64 + 1)?;
    let mut tx = db.begin_read().await?;
    let mut rows = sqlx::query_with(&sql, args).fetch(&mut *tx);

    let mut out = Vec::with_capacity(budget.min(64 * 1024));
    out.extend_from_slice(b"{\"rows\":[");
    let mut row_json = Vec::with_capacity(256);
    let mut returned = 0usize;
    let mut last: Option<RowKey> = None;
    let mut more = false;
    while let Some(row) = rows.try_next().await? {
        if returned == page {
            more = true;
            break;
        }
        row_json.clear();
        let key = query::write_row(spec, &row, &mut row_json)?;
        let separator = usize::from(returned > 0);
        if out.len() + separator + row_json.len() > budget {
            if returned == 0 {
                return Err(HistoryError::RowTooLarge);
            }
            more = true;
            break;
        }
        if separator == 1 {
            out.push(b',');
        }
        out.extend_from_slice(&row_json);
        returned += 1;
        last = Some(key);
    }
    drop(rows);
    tx.commit().await?;
    out.extend_from_slice(b"],\"next_cursor\":");
    match last.filter(|_| more) {
        Some(key) => {
            out.push(b'"');
            out.extend_from_slice(
                query
                    .cursor_after(key.timestamp, key.seq)
                    .encode()
                    .as_bytes(),
            );
            out.push(b'"');
        }
        None => out.extend_from_slice(b"null"),
    }
    out.push(b'}');
    if out.len() > max_payload {
        return Err(HistoryError::RowTooLarge);
    }
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::max_in_flight;
    use crate::config::DatabaseConfig;
    use crate::db::{Database, DbRole};

    fn pool(role: DbRole, pool_max: u32) -> Database {
        let config = DatabaseConfig {
            pool_max,
            ..DatabaseConfig::default()
        };
        Database::connect_lazy_as(role, &config).unwrap()
    }

    #[tokio::test]
    async fn history_takes_half_the_ingest_pool_and_all_but_one_of_its_own() {
        assert_eq!(max_in_flight(&pool(DbRole::Primary, 10)), 5);
        assert_eq!(max_in_flight(&pool(DbRole::Primary, 5)), 2);
        assert_eq!(max_in_flight(&pool(DbRole::Primary, 1)), 1);
        assert_eq!(max_in_flight(&pool(DbRole::History, 6)), 5);
        assert_eq!(max_in_flight(&pool(DbRole::History, 2)), 1);
    }
}
