//! The `tickvault-history` NATS micro service: one range endpoint per record
//! type plus `latest` and `symbols`, requests answered concurrently
//! (bounded), replies cut to (range) or refused beyond (latest, symbols) the
//! server's max payload, errors as a JSON body plus the micro-service error
//! headers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::service::{ServiceExt as _, NATS_SERVICE_ERROR, NATS_SERVICE_ERROR_CODE};
use async_nats::HeaderMap;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::stream::{self, StreamExt as _, TryStreamExt as _};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::query::{self, RowKey};
use super::request::{self, LatestQuery, Query, SymbolsQuery};
use super::HistoryError;
use crate::config::HistoryConfig;
use crate::db::{Database, DbRole};
use crate::ops::health::Status;
use crate::ops::metrics::Metrics;
use crate::records::{format_timestamp, RecordType};
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
/// The metrics' `kind` of a `latest` or `symbols` request naming no valid kind.
const UNKNOWN_KIND: &str = "unknown";

/// What an endpoint answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// `<prefix>.<kind>`: rows of one symbol in a time range.
    Range(RecordType),
    /// `<prefix>.latest`: the newest row per symbol.
    Latest,
    /// `<prefix>.symbols`: every symbol with its first and last timestamps.
    Symbols,
}

impl Route {
    fn all() -> impl Iterator<Item = Route> {
        RecordType::ALL
            .into_iter()
            .map(Route::Range)
            .chain([Route::Latest, Route::Symbols])
    }

    /// The endpoint's name and last subject token.
    fn name(self) -> &'static str {
        match self {
            Route::Range(record_type) => record_type.spec().history_kind,
            Route::Latest => "latest",
            Route::Symbols => "symbols",
        }
    }
}

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
            .map(|(route, endpoint)| endpoint.map(move |request| (route, request))),
    );
    let permits = Arc::new(Semaphore::new(max_in_flight(&context.db)));
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            next = requests.next() => {
                let Some((route, request)) = next else { break };
                let permit = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    permit = permits.clone().acquire_owned() => permit,
                };
                let Ok(permit) = permit else { break };
                let context = context.clone();
                tasks.spawn(async move {
                    handle(&context, route, request).await;
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
    Vec<(Route, async_nats::service::endpoint::Endpoint)>,
);

async fn start(
    client: &async_nats::Client,
    config: &HistoryConfig,
) -> Result<Started, async_nats::Error> {
    let service = client
        .service_builder()
        .description(
            "tickvault market-data history: ticks, candles, foreign, index, derivatives, latest, symbols",
        )
        .queue_group(QUEUE_GROUP)
        .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
        .await?;
    let mut endpoints = Vec::with_capacity(RecordType::ALL.len() + 2);
    for route in Route::all() {
        let name = route.name();
        let endpoint = service
            .endpoint_builder()
            .name(name)
            .add(format!("{}.{name}", config.subject_prefix))
            .await;
        match endpoint {
            Ok(endpoint) => endpoints.push((route, endpoint)),
            Err(e) => {
                let _ = service.stop().await;
                return Err(e);
            }
        }
    }
    Ok((service, endpoints))
}

/// Answers one request. Metrics are labelled with the data kind asked for,
/// whichever endpoint was asked (the contract's `kind` label set).
async fn handle(context: &Context, route: Route, request: async_nats::service::Request) {
    let started = Instant::now();
    let max_payload = match context.client.server_info().max_payload {
        0 => FALLBACK_MAX_PAYLOAD,
        n => n,
    };
    let (kind, result) = reply_for(context, route, &request.message.payload, max_payload).await;
    let endpoint = route.name();
    let code = match result {
        Ok(body) => {
            if let Err(e) = request.respond(Ok(body)).await {
                tracing::warn!(endpoint, kind, error = %e, "could not send a history reply");
            }
            200
        }
        Err(error) => {
            let code = error.code();
            if code >= 500 {
                tracing::warn!(endpoint, kind, code, error = %error, cause = ?std::error::Error::source(&error).map(|s| s.to_string()),
                    "history request failed");
            }
            let mut headers = HeaderMap::new();
            headers.insert(NATS_SERVICE_ERROR, error.to_string().as_str());
            headers.insert(NATS_SERVICE_ERROR_CODE, code.to_string().as_str());
            if let Err(e) = request
                .respond_with_headers(Ok(error.reply_body()), headers)
                .await
            {
                tracing::warn!(endpoint, kind, error = %e, "could not send a history error reply");
            }
            code
        }
    };
    context
        .metrics
        .history_answered(kind, code, started.elapsed());
}

/// The reply body of a request to `route` and the metrics' `kind` label.
async fn reply_for(
    context: &Context,
    route: Route,
    body: &[u8],
    max_payload: usize,
) -> (&'static str, Result<Bytes, HistoryError>) {
    let db = &context.db;
    let label = |record_type: RecordType| record_type.spec().history_kind;
    match route {
        Route::Range(record_type) => {
            let result = match request::parse(record_type, body) {
                Ok(query) => answer(context, &query, max_payload).await,
                Err(e) => Err(e),
            };
            (label(record_type), result)
        }
        Route::Latest => match request::parse_latest(body) {
            Ok(query) => (
                label(query.spec.record_type),
                bounded(context, answer_latest(db, &query, max_payload)).await,
            ),
            Err(e) => (
                request::requested_kind(body).map_or(UNKNOWN_KIND, label),
                Err(e),
            ),
        },
        Route::Symbols => match request::parse_symbols(body) {
            Ok(query) => (
                label(query.spec.record_type),
                bounded(context, answer_symbols(db, &query, max_payload)).await,
            ),
            Err(e) => (
                request::requested_kind(body).map_or(UNKNOWN_KIND, label),
                Err(e),
            ),
        },
    }
}

/// Every database read of a request passes here. While history's own
/// database is known down, a 503 at once, without waiting for a connection.
/// Otherwise the client-side last resort for an unresponsive server (the
/// server itself cancels a query after `database.statement_timeout_ms`): a 503.
async fn bounded(
    context: &Context,
    reply: impl std::future::Future<Output = Result<Bytes, HistoryError>>,
) -> Result<Bytes, HistoryError> {
    if context.status.history_db_down() {
        return Err(HistoryError::DatabaseDown);
    }
    let bound = client_timeout(&context.db);
    match tokio::time::timeout(bound, reply).await {
        Ok(result) => result,
        Err(_) => Err(HistoryError::Timeout(bound)),
    }
}

/// Runs the query and writes the reply: as many rows as fit in `max_payload`
/// (and `limit`), and a cursor when more rows match. The query is bounded on
/// the server by `database.statement_timeout_ms` (answered 503); the
/// client-side bound is only a last resort for an unresponsive server.
async fn answer(
    context: &Context,
    query: &Query,
    max_payload: usize,
) -> Result<Bytes, HistoryError> {
    bounded(context, write_reply(&context.db, query, max_payload)).await
}

/// Room for a `latest` or `symbols` reply: all of it or a 400 naming `symbols`.
struct WholeReply {
    out: Vec<u8>,
    max_payload: usize,
    items: usize,
}

impl WholeReply {
    fn new(opening: &[u8], max_payload: usize) -> WholeReply {
        let mut out = Vec::with_capacity(max_payload.min(64 * 1024));
        out.extend_from_slice(opening);
        WholeReply {
            out,
            max_payload,
            items: 0,
        }
    }

    /// Appends one JSON item; refuses once the reply cannot fit.
    fn push(&mut self, item: &[u8]) -> Result<(), HistoryError> {
        // `]}` closes the reply.
        if self.out.len() + 1 + item.len() + 2 > self.max_payload {
            return Err(HistoryError::BadRequest(format!(
                "the reply for these `symbols` exceeds the NATS server's max payload ({} bytes): ask for fewer symbols",
                self.max_payload
            )));
        }
        if self.items > 0 {
            self.out.push(b',');
        }
        self.out.extend_from_slice(item);
        self.items += 1;
        Ok(())
    }

    fn finish(mut self) -> Bytes {
        self.out.extend_from_slice(b"]}");
        Bytes::from(self.out)
    }
}

/// `{"rows": [...]}`: each identifier's newest row.
async fn answer_latest(
    db: &Database,
    query: &LatestQuery,
    max_payload: usize,
) -> Result<Bytes, HistoryError> {
    let mut reply = WholeReply::new(b"{\"rows\":[", max_payload);
    if query.symbols.as_ref().is_some_and(Vec::is_empty) {
        return Ok(reply.finish());
    }
    let (sql, args) = query::build_latest(query)?;
    let mut tx = db.begin_read().await?;
    let mut rows = sqlx::query_with(&sql, args).fetch(&mut *tx);
    let mut row_json = Vec::with_capacity(256);
    while let Some(row) = rows.try_next().await? {
        row_json.clear();
        query::write_row(query.spec, &row, &mut row_json)?;
        reply.push(&row_json)?;
    }
    Ok(reply.finish())
}

/// `{"symbols": [{"symbol": .., "first": .., "last": ..}]}`.
async fn answer_symbols(
    db: &Database,
    query: &SymbolsQuery,
    max_payload: usize,
) -> Result<Bytes, HistoryError> {
    use sqlx::Row as _;
    let mut reply = WholeReply::new(b"{\"symbols\":[", max_payload);
    let sql = query::build_symbols(query);
    let mut tx = db.begin_read().await?;
    let mut rows = sqlx::query(&sql).fetch(&mut *tx);
    while let Some(row) = rows.try_next().await? {
        let symbol: String = row.try_get("id")?;
        let first: Option<DateTime<Utc>> = row.try_get("first")?;
        let last: Option<DateTime<Utc>> = row.try_get("last")?;
        // Both are None only when the symbol's rows were deleted meanwhile.
        let (Some(first), Some(last)) = (first, last) else {
            continue;
        };
        let item = serde_json::json!({
            "symbol": symbol,
            "first": format_timestamp(&first),
            "last": format_timestamp(&last),
        });
        reply.push(item.to_string().as_bytes())?;
    }
    Ok(reply.finish())
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
