//! The `tickvault-history` NATS micro service: one range endpoint per record
//! type plus `latest` and `symbols`; admission control (see [`serve`]) in
//! front of a bounded number of slots; replies cut to (range) or refused
//! beyond (latest, symbols) the server's max payload; errors as a JSON body
//! plus the micro-service error headers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::service::{ServiceExt as _, NATS_SERVICE_ERROR, NATS_SERVICE_ERROR_CODE};
use async_nats::HeaderMap;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::stream::{self, StreamExt as _, TryStreamExt as _};
use sqlx::postgres::PgArguments;
use sqlx::PgConnection;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::admission::{Budget, Ticket, WaitQueue};
use super::query::{self, RowKey};
use super::request::{self, LatestQuery, Query, SymbolsQuery};
use super::HistoryError;
use crate::config::HistoryConfig;
use crate::db::{Database, DbRole};
use crate::ops::health::Status;
use crate::ops::metrics::{Metrics, ShedReason, UNKNOWN_HISTORY_KIND};
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

/// What a checked request asks for: all that is kept of it while it waits.
enum Work {
    Range(Query),
    Latest(LatestQuery),
    Symbols(SymbolsQuery),
}

/// A request as received: what its reply needs.
struct Asked {
    route: Route,
    /// Its body is dropped once parsed.
    request: async_nats::service::Request,
    /// The metrics' `kind` label.
    kind: &'static str,
    arrived: Instant,
}

/// A request admitted by the intake, on its way to be checked.
struct Arrival {
    asked: Asked,
    ticket: Ticket,
}

/// A checked request waiting for a slot.
struct Job {
    asked: Asked,
    work: Work,
    /// Its share of the waiting budget, given back when it starts or leaves.
    ticket: Ticket,
}

/// Shared by the intake, the dispatcher and every request task.
struct Context {
    client: async_nats::Client,
    db: Database,
    metrics: Arc<Metrics>,
    status: Arc<Status>,
    max_request_bytes: usize,
}

impl Context {
    /// Whether the database history reads from is up, as its supervisor
    /// last saw it: when it is not, requests are refused at once instead
    /// of waiting for a connection that cannot come.
    /// Whether the database history reads is up: its own read replica when
    /// `history.database_url` is set, else the ingest database.
    fn database_up(&self) -> bool {
        if self.status.has_history_database() {
            !self.status.history_db_down()
        } else {
            self.status.db_up()
        }
    }
}

/// Serves history until `shutdown`, in two tasks so that a request never
/// waits in the NATS subscription:
/// - the intake takes each request as it arrives: a body over
///   `history.max_request_bytes` is a 400, and one that does not fit the
///   waiting budget (`history.max_queued_requests` / `max_queued_bytes`) a
///   503, both without parsing;
/// - the dispatcher parses the rest (a malformed request is a 400, the
///   database known down a 503) into the wait queue, starts the oldest
///   waiting request whenever one of the slots is free, and answers 503,
///   without running it, a request that waited past `history.queue_deadline_ms`.
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
        max_request_bytes: config.max_request_bytes,
    });
    let requests = stream::select_all(
        endpoints
            .into_iter()
            .map(|(route, endpoint)| endpoint.map(move |request| (route, request))),
    );
    let (arrivals, mut arrived) = mpsc::unbounded_channel();
    let intake = tokio::spawn(intake(
        context.clone(),
        requests,
        Budget::new(&config),
        arrivals,
        shutdown.clone(),
    ));
    let slots = Arc::new(Semaphore::new(max_in_flight(&context.db)));
    let mut queue: WaitQueue<Job> = WaitQueue::new(config.queue_deadline());
    let mut tasks = JoinSet::new();
    loop {
        let expiry = queue.next_deadline();
        // Biased: expired requests leave the queue before a slot could start
        // them, and a free slot is used before more requests are checked.
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            _ = sleep_until(expiry), if expiry.is_some() => {
                let now = Instant::now();
                while let Some((job, waited)) = queue.pop_expired(now) {
                    context.metrics.history_expired(job.asked.kind, waited);
                    context.reply(&job.asked, Err(HistoryError::Expired(waited))).await;
                }
                context.metrics.history_queued(queue.len());
            }
            slot = slots.clone().acquire_owned(), if !queue.is_empty() => {
                let Ok(slot) = slot else { break };
                // None: the oldest expired meanwhile; the branch above answers it.
                let Some((job, waited)) = queue.pop(Instant::now()) else { continue };
                context.metrics.history_queued(queue.len());
                let Job { asked, work, ticket } = job;
                drop(ticket);
                if !context.database_up() {
                    context.metrics.history_shed(ShedReason::DatabaseDown, asked.kind);
                    context.reply(&asked, Err(HistoryError::DatabaseDown)).await;
                    continue;
                }
                let in_flight = context.metrics.history_started(waited);
                let context = context.clone();
                tasks.spawn(async move {
                    context.run(&asked, &work).await;
                    drop(in_flight);
                    drop(slot);
                });
            }
            arrival = arrived.recv() => {
                let Some(arrival) = arrival else { break };
                if let Some(job) = context.check(arrival).await {
                    let arrived = job.asked.arrived;
                    queue.push(job, arrived);
                    context.metrics.history_queued(queue.len());
                }
            }
        }
    }
    status.set_history_ready(false);
    let _ = intake.await;
    arrived.close();
    while let Some(arrival) = arrived.recv().await {
        context
            .reply(&arrival.asked, Err(HistoryError::Stopping))
            .await;
    }
    for job in queue.drain() {
        context.reply(&job.asked, Err(HistoryError::Stopping)).await;
    }
    context.metrics.history_queued(0);
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

/// Takes every request as soon as it arrives, until `shutdown` or the end
/// of the endpoints: refuses what is too large or over the waiting budget,
/// hands the rest to the dispatcher.
async fn intake(
    context: Arc<Context>,
    mut requests: impl futures::Stream<Item = (Route, async_nats::service::Request)> + Unpin,
    budget: Arc<Budget>,
    arrivals: mpsc::UnboundedSender<Arrival>,
    shutdown: CancellationToken,
) {
    loop {
        let (route, request) = tokio::select! {
            _ = shutdown.cancelled() => return,
            next = requests.next() => match next {
                Some(next) => next,
                None => return,
            },
        };
        let bytes = request.message.payload.len();
        let asked = Asked {
            route,
            request,
            // Not parsed yet: a range endpoint names its kind, `latest` and `symbols` do not.
            kind: match route {
                Route::Range(record_type) => record_type.spec().history_kind,
                Route::Latest | Route::Symbols => UNKNOWN_HISTORY_KIND,
            },
            arrived: Instant::now(),
        };
        let (reason, refusal) = if bytes > context.max_request_bytes {
            let max = context.max_request_bytes;
            (ShedReason::TooLarge, HistoryError::TooLarge { bytes, max })
        } else {
            match budget.admit(bytes) {
                Some(ticket) => {
                    if let Err(returned) = arrivals.send(Arrival { asked, ticket }) {
                        // The dispatcher stopped: shutdown.
                        let asked = returned.0.asked;
                        context.reply(&asked, Err(HistoryError::Stopping)).await;
                        return;
                    }
                    continue;
                }
                None => (ShedReason::QueueFull, HistoryError::QueueFull),
            }
        };
        context.metrics.history_shed(reason, asked.kind);
        context.reply(&asked, Err(refusal)).await;
    }
}

/// Sleeps until `deadline` (forever when there is none).
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => futures::future::pending().await,
    }
}

/// Requests answered at the same time (more wait in the queue): on the
/// ingest database's pool half of it, so history never takes every
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

/// A request's body parsed and checked, and the metrics' `kind` label: the
/// data kind asked for, whichever endpoint was asked (the contract's `kind`
/// label set).
fn parse(route: Route, body: &[u8]) -> (&'static str, Result<Work, HistoryError>) {
    let label = |record_type: RecordType| record_type.spec().history_kind;
    let requested = || request::requested_kind(body).map_or(UNKNOWN_HISTORY_KIND, label);
    match route {
        Route::Range(record_type) => (
            label(record_type),
            request::parse(record_type, body).map(Work::Range),
        ),
        Route::Latest => match request::parse_latest(body) {
            Ok(query) => (label(query.spec.record_type), Ok(Work::Latest(query))),
            Err(e) => (requested(), Err(e)),
        },
        Route::Symbols => match request::parse_symbols(body) {
            Ok(query) => (label(query.spec.record_type), Ok(Work::Symbols(query))),
            Err(e) => (requested(), Err(e)),
        },
    }
}

impl Context {
    /// Parses an admitted request into a job for the wait queue, or answers
    /// it at once: 400 when malformed, 503 when the database is down.
    async fn check(&self, arrival: Arrival) -> Option<Job> {
        let Arrival { mut asked, ticket } = arrival;
        let (kind, parsed) = parse(asked.route, &asked.request.message.payload);
        asked.kind = kind;
        // The parsed query is all that waits.
        asked.request.message.payload = Bytes::new();
        let refusal = match parsed {
            Ok(work) if self.database_up() => {
                return Some(Job {
                    asked,
                    work,
                    ticket,
                })
            }
            Ok(_) => {
                self.metrics.history_shed(ShedReason::DatabaseDown, kind);
                HistoryError::DatabaseDown
            }
            Err(error) => error,
        };
        drop(ticket);
        self.reply(&asked, Err(refusal)).await;
        None
    }

    /// Runs a request that holds a slot, within the client-side last resort.
    async fn run(&self, asked: &Asked, work: &Work) {
        let max_payload = match self.client.server_info().max_payload {
            0 => FALLBACK_MAX_PAYLOAD,
            n => n,
        };
        let db = &self.db;
        let result = match work {
            Work::Range(query) => bounded(db, write_reply(db, query, max_payload)).await,
            Work::Latest(query) => bounded(db, answer_latest(db, query, max_payload)).await,
            Work::Symbols(query) => bounded(db, answer_symbols(db, query, max_payload)).await,
        };
        self.reply(asked, result).await;
    }

    /// Sends the reply (or the error body with the micro-service error
    /// headers) and counts it.
    async fn reply(&self, asked: &Asked, result: Result<Bytes, HistoryError>) {
        let endpoint = asked.route.name();
        let kind = asked.kind;
        let request = &asked.request;
        let code = match result {
            Ok(body) => {
                if let Err(e) = request.respond(Ok(body)).await {
                    tracing::warn!(endpoint, kind, error = %e, "could not send a history reply");
                }
                200
            }
            Err(error) => {
                let code = error.code();
                if code >= 500 && !error.is_refusal() {
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
        self.metrics
            .history_answered(kind, code, asked.arrived.elapsed());
    }
}

/// The client-side last resort for an unresponsive server (the server
/// itself cancels a query after `database.statement_timeout_ms`): a 503.
/// A reply abandoned here closes its connection (see `db::ReadTransaction`).
async fn bounded(
    db: &Database,
    reply: impl std::future::Future<Output = Result<Bytes, HistoryError>>,
) -> Result<Bytes, HistoryError> {
    let bound = client_timeout(db);
    match tokio::time::timeout(bound, reply).await {
        Ok(result) => result,
        Err(_) => Err(HistoryError::Timeout(bound)),
    }
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
    let read = read_latest(&mut tx, query, &sql, args, &mut reply).await;
    tx.end(read).await?;
    Ok(reply.finish())
}

async fn read_latest(
    conn: &mut PgConnection,
    query: &LatestQuery,
    sql: &str,
    args: PgArguments,
    reply: &mut WholeReply,
) -> Result<(), HistoryError> {
    let mut rows = sqlx::query_with(sql, args).fetch(conn);
    let mut row_json = Vec::with_capacity(256);
    while let Some(row) = rows.try_next().await? {
        row_json.clear();
        query::write_row(query.spec, &row, &mut row_json)?;
        reply.push(&row_json)?;
    }
    Ok(())
}

/// `{"symbols": [{"symbol": .., "first": .., "last": ..}]}`.
async fn answer_symbols(
    db: &Database,
    query: &SymbolsQuery,
    max_payload: usize,
) -> Result<Bytes, HistoryError> {
    let mut reply = WholeReply::new(b"{\"symbols\":[", max_payload);
    let sql = query::build_symbols(query);
    let mut tx = db.begin_read().await?;
    let read = read_symbols(&mut tx, &sql, &mut reply).await;
    tx.end(read).await?;
    Ok(reply.finish())
}

async fn read_symbols(
    conn: &mut PgConnection,
    sql: &str,
    reply: &mut WholeReply,
) -> Result<(), HistoryError> {
    use sqlx::Row as _;
    let mut rows = sqlx::query(sql).fetch(conn);
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
    Ok(())
}

fn client_timeout(db: &Database) -> Duration {
    db.config.acquire_timeout() + db.config.statement_timeout() + CLIENT_TIMEOUT_MARGIN
}

/// One page of a range: as many rows as fit in `max_payload` (and `limit`),
/// and a cursor when more rows match. The query is bounded on the server by
/// `database.statement_timeout_ms` (answered 503).
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
    let mut out = Vec::with_capacity(budget.min(64 * 1024));
    out.extend_from_slice(b"{\"rows\":[");
    let mut tx = db.begin_read().await?;
    let read = read_page(&mut tx, query, &sql, args, page, budget, &mut out).await;
    // The key to resume after, when more rows match.
    let resume = tx.end(read).await?;
    out.extend_from_slice(b"],\"next_cursor\":");
    match resume {
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

/// Appends up to `page` rows to `out` within `budget` bytes; returns the
/// key of the last one when more rows match.
async fn read_page(
    conn: &mut PgConnection,
    query: &Query,
    sql: &str,
    args: PgArguments,
    page: usize,
    budget: usize,
    out: &mut Vec<u8>,
) -> Result<Option<RowKey>, HistoryError> {
    let mut rows = sqlx::query_with(sql, args).fetch(conn);
    let mut row_json = Vec::with_capacity(256);
    let mut returned = 0usize;
    let mut last: Option<RowKey> = None;
    while let Some(row) = rows.try_next().await? {
        if returned == page {
            return Ok(last);
        }
        if let Some(out_of_range) = query::out_of_range(query, &row)? {
            return Err(HistoryError::OutOfRange(
                out_of_range,
                query.interval.as_str(),
            ));
        }
        row_json.clear();
        let key = query::write_row(query.spec, &row, &mut row_json)?;
        let separator = usize::from(returned > 0);
        if out.len() + separator + row_json.len() > budget {
            if returned == 0 {
                return Err(HistoryError::RowTooLarge);
            }
            return Ok(last);
        }
        if separator == 1 {
            out.push(b',');
        }
        out.extend_from_slice(&row_json);
        returned += 1;
        last = Some(key);
    }
    // Every matching row was returned.
    Ok(None)
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
