//! The Prometheus registry and every internal event that changes a metric.
//!
//! Each event is one method: it updates the metric and writes the log line,
//! so a counter and its log never disagree. Labels come from fixed sets
//! (record type names, reject reasons, flush triggers), never raw error text.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::db::{DbRole, Failure};
use crate::ops::lag::{Held, HeldMessages};
use crate::records::{RecordType, Reject, RejectReason};

/// The version and the git revision this binary was built from
/// (`tickvault_build_info`; the revision is set by build.rs).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const REVISION: &str = env!("GIT_REVISION");

/// The `kind` of a history request that names no valid kind.
pub const UNKNOWN_HISTORY_KIND: &str = "unknown";
/// Every `code` a history reply has: 200 and the error codes of the contract.
pub const HISTORY_CODES: [u16; 4] = [200, 400, 500, 503];

/// At most one log line per `period` for an event that can happen
/// thousands of times a second; the lines in between are counted and
/// reported with the next one.
struct LogLimiter {
    period: Duration,
    /// Milliseconds since `start` of the last line, plus one (0 = never).
    last: AtomicU64,
    suppressed: AtomicU64,
    start: Instant,
}

impl LogLimiter {
    fn new(period: Duration) -> Self {
        LogLimiter {
            period,
            last: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
            start: Instant::now(),
        }
    }

    /// `Some(lines suppressed since the last one)` when a line may be written now.
    fn allow(&self) -> Option<u64> {
        let now = self.start.elapsed().as_millis() as u64 + 1;
        let last = self.last.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= self.period.as_millis() as u64;
        if due
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// How often a repeated warning (core-mode drops, slow consumers) is logged.
const REPEATED_WARNING_EVERY: Duration = Duration::from_secs(10);
/// How often a consumer state that cannot be read is logged, per type.
const LAG_WARNING_EVERY: Duration = Duration::from_secs(60);

/// Why a batch was flushed: the `trigger` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushTrigger {
    Size,
    Interval,
    Shutdown,
}

impl FlushTrigger {
    pub const ALL: [FlushTrigger; 3] = [
        FlushTrigger::Size,
        FlushTrigger::Interval,
        FlushTrigger::Shutdown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FlushTrigger::Size => "size",
            FlushTrigger::Interval => "interval",
            FlushTrigger::Shutdown => "shutdown",
        }
    }
}

/// How a database health check failed: the `kind` label of
/// `tickvault_db_health_check_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbFailureKind {
    Timeout,
    ConnectionRefused,
    Authentication,
    Other,
}

impl DbFailureKind {
    pub const ALL: [DbFailureKind; 4] = [
        DbFailureKind::Timeout,
        DbFailureKind::ConnectionRefused,
        DbFailureKind::Authentication,
        DbFailureKind::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DbFailureKind::Timeout => "timeout",
            DbFailureKind::ConnectionRefused => "connection_refused",
            DbFailureKind::Authentication => "authentication",
            DbFailureKind::Other => "other",
        }
    }
}

/// One database's health series.
struct DbHealth {
    up: IntGauge,
    failures: IntCounterVec,
    /// How logs name it.
    name: &'static str,
}

/// Why the history service refused a request without running it: the
/// `reason` label of `tickvault_history_shed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShedReason {
    /// The body is over `history.max_request_bytes` (answered 400).
    TooLarge,
    /// The wait queue is at `history.max_queued_requests` or `max_queued_bytes` (503).
    QueueFull,
    /// The database is known to be down (503).
    DatabaseDown,
}

impl ShedReason {
    pub const ALL: [ShedReason; 3] = [
        ShedReason::TooLarge,
        ShedReason::QueueFull,
        ShedReason::DatabaseDown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ShedReason::TooLarge => "too_large",
            ShedReason::QueueFull => "queue_full",
            ShedReason::DatabaseDown => "database_down",
        }
    }
}

/// A history request being run: counted in `tickvault_history_in_flight`
/// until dropped.
pub struct InFlight(IntGauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Refusals are logged at warn at most this often (each one at debug):
/// under an overload they come by the thousand.
const REFUSAL_WARN_EVERY: Duration = Duration::from_secs(10);

/// The series one type's intake updates for every message.
#[derive(Clone)]
pub struct IntakeMetrics {
    received: IntCounter,
    queue_depth: IntGauge,
    held: Arc<HeldMessages>,
}

impl IntakeMetrics {
    /// A message was taken: counted, and held for the lag until its
    /// [`Held`] token (kept by its delivery) is dropped.
    pub fn message_received(&self) -> Held {
        self.received.inc();
        self.held.hold()
    }

    pub fn queue_depth(&self, rows: usize) {
        self.queue_depth.set(rows as i64);
    }
}

/// One reading of a type's lag (`ops/lag.rs`); `None`: the consumer's
/// counts could not be read, the gauges keep their last values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LagReading {
    pub pending: Option<u64>,
    pub ack_pending: Option<u64>,
    pub lag: Duration,
}

/// One type's totals as they are now, read by the periodic summary
/// (`ops/summary.rs`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TypeTotals {
    pub rows_written: u64,
    pub consumer_pending: i64,
    /// `tickvault_ingest_lag_seconds`, in milliseconds.
    pub lag_ms: u64,
    /// Rejected input (dead-lettered), every reason.
    pub rejected: u64,
}

pub struct Metrics {
    registry: Registry,
    queue_depth: IntGaugeVec,
    queue_capacity: IntGaugeVec,
    messages_received: IntCounterVec,
    rows_written: IntCounterVec,
    rejected: IntCounterVec,
    dead_letters_failed: IntCounterVec,
    dropped: IntCounterVec,
    /// One per record type: core-mode drops logged at a bounded rate.
    drop_logs: [LogLimiter; RecordType::ALL.len()],
    slow_consumer_log: LogLimiter,
    flushes: IntCounterVec,
    flush_duration: HistogramVec,
    flush_errors: IntCounterVec,
    db_pool_connections: IntGaugeVec,
    db_pool_max: IntGauge,
    db_health: DbHealth,
    /// History's own database (`history.database_url`).
    history_db_health: DbHealth,
    nats_connected: IntGauge,
    history_requests: IntCounterVec,
    history_duration: HistogramVec,
    history_shed: IntCounterVec,
    history_expired: IntCounter,
    history_queue_wait: Histogram,
    history_in_flight: IntGauge,
    history_queue_depth: IntGauge,
    /// When a history refusal was last logged at warn.
    refusal_warned: Mutex<Option<Instant>>,
    consumer_pending: IntGaugeVec,
    consumer_ack_pending: IntGaugeVec,
    ingest_lag: GaugeVec,
    /// One per record type: the arrival times of the messages it holds.
    held: [Arc<HeldMessages>; RecordType::ALL.len()],
    /// One per record type: consumer states that could not be read.
    lag_logs: [LogLimiter; RecordType::ALL.len()],
}

fn register<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are unique");
    metric
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            register(
                &registry,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            register(
                &registry,
                IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let histogram = |name: &str, help: &str, label: &str, buckets: Vec<f64>| {
            register(
                &registry,
                HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), &[label])
                    .expect("valid metric"),
            )
        };
        let latency_buckets = vec![
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ];
        let metrics = Metrics {
            queue_depth: gauge(
                "tickvault_queue_depth",
                "Rows waiting in a type's queue",
                &["type"],
            ),
            queue_capacity: gauge(
                "tickvault_queue_capacity",
                "Rows a type's queue holds at most",
                &["type"],
            ),
            messages_received: counter(
                "tickvault_messages_received_total",
                "NATS messages taken",
                &["type"],
            ),
            rows_written: counter(
                "tickvault_rows_written_total",
                "Rows committed to PostgreSQL (duplicates of stored rows included)",
                &["type"],
            ),
            rejected: counter(
                "tickvault_rejected_total",
                "Records or messages not written because of bad input",
                &["type", "reason"],
            ),
            dead_letters_failed: counter(
                "tickvault_dead_letter_failures_total",
                "Rejected records whose dead letter could not be stored within the bound (their message was terminated)",
                &["type"],
            ),
            dropped: counter(
                "tickvault_dropped_total",
                "Core-mode messages dropped because the type's queue was full",
                &["type"],
            ),
            drop_logs: std::array::from_fn(|_| LogLimiter::new(REPEATED_WARNING_EVERY)),
            slow_consumer_log: LogLimiter::new(REPEATED_WARNING_EVERY),
            flushes: counter(
                "tickvault_flushes_total",
                "Batches committed",
                &["type", "trigger"],
            ),
            flush_duration: histogram(
                "tickvault_flush_duration_seconds",
                "Time to commit one batch",
                "type",
                latency_buckets.clone(),
            ),
            flush_errors: counter(
                "tickvault_flush_errors_total",
                "Batch writes that failed and will be retried",
                &["type"],
            ),
            db_pool_connections: gauge(
                "tickvault_db_pool_connections",
                "Database pool connections",
                &["state"],
            ),
            db_pool_max: register(
                &registry,
                IntGauge::new("tickvault_db_pool_max", "Most connections the pool opens")
                    .expect("valid metric"),
            ),
            db_health: DbHealth {
                up: register(
                    &registry,
                    IntGauge::new(
                        "tickvault_db_up",
                        "1 when the last database health check passed",
                    )
                    .expect("valid metric"),
                ),
                failures: counter(
                    "tickvault_db_health_check_failures_total",
                    "Failed database health checks",
                    &["kind"],
                ),
                name: "database",
            },
            history_db_health: DbHealth {
                up: register(
                    &registry,
                    IntGauge::new(
                        "tickvault_history_db_up",
                        "1 when the database history reads is up (history.database_url when set, else the ingest database)",
                    )
                    .expect("valid metric"),
                ),
                failures: counter(
                    "tickvault_history_db_health_check_failures_total",
                    "Failed health checks of history.database_url",
                    &["kind"],
                ),
                name: "history database (history.database_url)",
            },
            nats_connected: register(
                &registry,
                IntGauge::new("tickvault_nats_connected", "1 while connected to NATS")
                    .expect("valid metric"),
            ),
            history_requests: counter(
                "tickvault_history_requests_total",
                "History requests answered",
                &["kind", "code"],
            ),
            history_duration: histogram(
                "tickvault_history_duration_seconds",
                "Time to answer one history request",
                "kind",
                latency_buckets.clone(),
            ),
            history_shed: counter(
                "tickvault_history_shed_total",
                "History requests refused on arrival without running them",
                &["reason"],
            ),
            history_expired: register(
                &registry,
                IntCounter::new(
                    "tickvault_history_expired_total",
                    "History requests that waited past history.queue_deadline_ms and were not run",
                )
                .expect("valid metric"),
            ),
            history_queue_wait: register(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "tickvault_history_queue_wait_seconds",
                        "Time a history request waited for a free slot before it ran (its count: requests run)",
                    )
                    .buckets(latency_buckets.clone()),
                )
                .expect("valid metric"),
            ),
            history_in_flight: register(
                &registry,
                IntGauge::new(
                    "tickvault_history_in_flight",
                    "History requests running now",
                )
                .expect("valid metric"),
            ),
            history_queue_depth: register(
                &registry,
                IntGauge::new(
                    "tickvault_history_queue_depth",
                    "History requests waiting for a free slot",
                )
                .expect("valid metric"),
            ),
            refusal_warned: Mutex::new(None),
            consumer_pending: gauge(
                "tickvault_consumer_pending",
                "JetStream messages not yet delivered to tickvault",
                &["type"],
            ),
            consumer_ack_pending: gauge(
                "tickvault_consumer_ack_pending",
                "JetStream messages delivered to tickvault and not yet acknowledged",
                &["type"],
            ),
            ingest_lag: register(
                &registry,
                GaugeVec::new(
                    Opts::new(
                        "tickvault_ingest_lag_seconds",
                        "Age of the oldest message received or pending but not yet committed (0 when none)",
                    ),
                    &["type"],
                )
                .expect("valid metric"),
            ),
            held: std::array::from_fn(|_| Arc::default()),
            lag_logs: std::array::from_fn(|_| LogLimiter::new(LAG_WARNING_EVERY)),
            registry,
        };
        let build_info = register(
            &metrics.registry,
            IntGaugeVec::new(
                Opts::new(
                    "tickvault_build_info",
                    "Always 1; the labels say which tickvault runs",
                ),
                &["version", "revision"],
            )
            .expect("valid metric"),
        );
        build_info.with_label_values(&[VERSION, REVISION]).set(1);
        // process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, ...
        #[cfg(target_os = "linux")]
        metrics
            .registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("metric names are unique");
        // Every series exists from the start, so dashboards show 0, not "no
        // data", and rate() sees the first error.
        for reason in ShedReason::ALL {
            metrics.history_shed.with_label_values(&[reason.as_str()]);
        }
        for kind in DbFailureKind::ALL {
            metrics
                .history_db_health
                .failures
                .with_label_values(&[kind.as_str()]);
        }
        for t in RecordType::ALL {
            let name = t.name();
            metrics.queue_depth.with_label_values(&[name]);
            metrics.queue_capacity.with_label_values(&[name]);
            metrics.messages_received.with_label_values(&[name]);
            metrics.rows_written.with_label_values(&[name]);
            metrics.flush_errors.with_label_values(&[name]);
            metrics.flush_duration.with_label_values(&[name]);
            metrics.consumer_pending.with_label_values(&[name]);
            metrics.consumer_ack_pending.with_label_values(&[name]);
            metrics.ingest_lag.with_label_values(&[name]);
            metrics.dead_letters_failed.with_label_values(&[name]);
            metrics.dropped.with_label_values(&[name]);
            for reason in RejectReason::ALL {
                metrics.rejected.with_label_values(&[name, reason.as_str()]);
            }
            for trigger in FlushTrigger::ALL {
                metrics.flushes.with_label_values(&[name, trigger.as_str()]);
            }
            let kind = t.spec().history_kind;
            metrics.history_duration.with_label_values(&[kind]);
            for code in HISTORY_CODES {
                metrics
                    .history_requests
                    .with_label_values(&[kind, &code.to_string()]);
            }
        }
        // A request naming no valid kind: a bad request, or one refused
        // before it was parsed (too large, the queue full, the database down).
        for code in [400, 503] {
            metrics
                .history_requests
                .with_label_values(&[UNKNOWN_HISTORY_KIND, &code.to_string()]);
        }
        metrics
            .history_duration
            .with_label_values(&[UNKNOWN_HISTORY_KIND]);
        for kind in DbFailureKind::ALL {
            metrics
                .db_health
                .failures
                .with_label_values(&[kind.as_str()]);
        }
        for state in ["idle", "in_use"] {
            metrics.db_pool_connections.with_label_values(&[state]);
        }
        metrics
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("text encoding never fails");
        String::from_utf8(buffer).expect("the text format is UTF-8")
    }

    pub fn queue_sized(&self, record_type: RecordType, capacity: usize) {
        self.queue_capacity
            .with_label_values(&[record_type.name()])
            .set(capacity as i64);
    }

    /// One type's per-message series, resolved once so the hot path does no label lookup.
    pub fn intake(&self, record_type: RecordType) -> IntakeMetrics {
        let name = [record_type.name()];
        IntakeMetrics {
            received: self.messages_received.with_label_values(&name),
            queue_depth: self.queue_depth.with_label_values(&name),
            held: self.held[slot(record_type)].clone(),
        }
    }

    /// The messages a type holds, for its lag.
    pub fn held(&self, record_type: RecordType) -> &HeldMessages {
        &self.held[slot(record_type)]
    }

    /// A reading of a type's consumer state and lag (`ops/lag.rs`), every
    /// `ingest.lag_interval_ms`.
    pub fn lag_read(&self, record_type: RecordType, reading: LagReading) {
        let name = [record_type.name()];
        tracing::debug!(
            r#type = record_type.name(),
            pending = reading.pending,
            ack_pending = reading.ack_pending,
            lag_s = reading.lag.as_secs_f64(),
            "consumer state read"
        );
        if let Some(pending) = reading.pending {
            self.consumer_pending
                .with_label_values(&name)
                .set(pending as i64);
        }
        if let Some(ack_pending) = reading.ack_pending {
            self.consumer_ack_pending
                .with_label_values(&name)
                .set(ack_pending as i64);
        }
        self.ingest_lag
            .with_label_values(&name)
            .set(reading.lag.as_secs_f64());
    }

    /// A type's consumer state could not be read: the lag keeps counting
    /// from what was last known and from the messages held here.
    pub fn lag_unreadable(&self, record_type: RecordType, error: &str) {
        if let Some(suppressed) = self.lag_logs[slot(record_type)].allow() {
            tracing::warn!(
                r#type = record_type.name(),
                error,
                also_since_last_line = suppressed,
                "could not read the JetStream consumer's state for the lag metrics; tickvault_consumer_pending keeps its last value (on a permissions error: the worker needs $JS.API.CONSUMER.INFO and $JS.API.STREAM.MSG.GET on the stream)"
            );
        }
    }

    /// The rejected input of one message, once its story ends: counted per
    /// reason, logged once.
    pub fn rejected<'a>(
        &self,
        record_type: RecordType,
        subject: &str,
        rejects: impl IntoIterator<Item = &'a Reject>,
    ) {
        let mut by_reason: Vec<(RejectReason, usize)> = Vec::new();
        let mut first_detail = None;
        for reject in rejects {
            first_detail.get_or_insert(reject.detail.as_str());
            match by_reason.iter_mut().find(|(r, _)| *r == reject.reason) {
                Some((_, n)) => *n += 1,
                None => by_reason.push((reject.reason, 1)),
            }
        }
        let Some(detail) = first_detail else { return };
        let mut reasons = String::new();
        for (reason, n) in &by_reason {
            self.rejected
                .with_label_values(&[record_type.name(), reason.as_str()])
                .inc_by(*n as u64);
            if !reasons.is_empty() {
                reasons.push_str(", ");
            }
            reasons.push_str(&format!("{}={n}", reason.as_str()));
        }
        tracing::warn!(
            r#type = record_type.name(),
            subject,
            reasons,
            detail,
            "rejected input, not written"
        );
    }

    /// A message whose dead letters could not be stored within the bound
    /// was terminated: its `failed` rejected records are not in the
    /// dead-letter stream.
    pub fn dead_letters_abandoned(&self, record_type: RecordType, subject: &str, failed: usize) {
        tracing::error!(
            r#type = record_type.name(),
            subject,
            failed,
            "could not store dead letters after repeated deliveries; the message is terminated and its rejected records are lost (its valid rows are written)"
        );
        self.dead_letters_failed
            .with_label_values(&[record_type.name()])
            .inc_by(failed as u64);
    }

    /// Core mode: a message found its type's queue full and was dropped.
    pub fn dropped(&self, record_type: RecordType, subject: &str) {
        self.dropped.with_label_values(&[record_type.name()]).inc();
        if let Some(suppressed) = self.drop_logs[slot(record_type)].allow() {
            tracing::warn!(
                r#type = record_type.name(),
                subject,
                also_dropped_since_last_line = suppressed,
                "core mode: the queue is full, dropping messages (see tickvault_dropped_total)"
            );
        }
    }

    pub fn flushed(
        &self,
        record_type: RecordType,
        trigger: FlushTrigger,
        rows: usize,
        messages: usize,
        elapsed: Duration,
    ) {
        tracing::debug!(
            r#type = record_type.name(),
            trigger = trigger.as_str(),
            rows,
            messages,
            elapsed_ms = elapsed.as_millis() as u64,
            "batch committed"
        );
        let name = record_type.name();
        self.flushes
            .with_label_values(&[name, trigger.as_str()])
            .inc();
        self.rows_written
            .with_label_values(&[name])
            .inc_by(rows as u64);
        self.flush_duration
            .with_label_values(&[name])
            .observe(elapsed.as_secs_f64());
    }

    /// A batch write failed and will be retried after `retry_in`. An
    /// unavailable database is logged at every attempt (the backoff bounds
    /// the rate); credentials or schema problems when they start, with what
    /// to do.
    pub fn flush_failed(
        &self,
        record_type: RecordType,
        rows: usize,
        retry_in: Duration,
        failure: Failure,
        starts: bool,
        error: &dyn std::error::Error,
    ) {
        let name = record_type.name();
        let retry_in_ms = retry_in.as_millis() as u64;
        match failure {
            Failure::Auth if starts => tracing::error!(
                r#type = name, rows, retry_in_ms, error = %error,
                "the database refuses tickvault's credentials or connection settings: fix database.url (user, password, sslmode); the batch is kept and retried"
            ),
            Failure::Schema if starts => tracing::error!(
                r#type = name, rows, retry_in_ms, error = %error,
                "the database schema or privileges are not what tickvault expects: run `tickvault migrate` or grant the privileges; the batch is kept and retried"
            ),
            Failure::Auth | Failure::Schema => {}
            Failure::Unavailable | Failure::Refused => tracing::warn!(
                r#type = name, rows, retry_in_ms, error = %error,
                "batch write failed, keeping the batch and retrying"
            ),
        }
        self.flush_errors.with_label_values(&[name]).inc();
    }

    /// Writes succeed again after failing.
    pub fn writes_recovered(&self, record_type: RecordType) {
        tracing::info!(r#type = record_type.name(), "batch writes succeed again");
    }

    /// Shutdown could wait no longer for the database: the messages are
    /// handed back to JetStream for another worker.
    pub fn writes_abandoned(&self, record_type: RecordType, messages: usize, rows: usize) {
        tracing::warn!(
            r#type = record_type.name(),
            messages,
            rows,
            "shutting down with the database stuck or unavailable: handing the messages back to JetStream for another worker"
        );
    }

    pub fn db_pool(&self, idle: usize, size: u32, max: u32) {
        let in_use = (size as usize).saturating_sub(idle);
        self.db_pool_connections
            .with_label_values(&["idle"])
            .set(idle as i64);
        self.db_pool_connections
            .with_label_values(&["in_use"])
            .set(in_use as i64);
        self.db_pool_max.set(max as i64);
    }

    /// Records a health check's result of the database of `role`; logs only
    /// when the state changes.
    pub fn db_checked(
        &self,
        role: DbRole,
        result: Result<(), (DbFailureKind, &dyn std::error::Error)>,
    ) {
        let health = match role {
            DbRole::Primary => &self.db_health,
            DbRole::History => &self.history_db_health,
        };
        let database = health.name;
        let was_up = health.up.get() == 1;
        match result {
            Ok(()) => {
                if !was_up {
                    tracing::info!(database, "{database} is up");
                }
                health.up.set(1);
            }
            Err((kind, error)) => {
                let failures = health.failures.with_label_values(&[kind.as_str()]);
                failures.inc();
                if was_up || failures.get() == 1 {
                    if kind == DbFailureKind::Authentication {
                        tracing::error!(database, kind = kind.as_str(), error = %error,
                            "the {database} refuses tickvault's login or TLS; fix the setting named in the error (checked again at the longest retry interval)");
                    } else if role == DbRole::History {
                        tracing::warn!(database, kind = kind.as_str(), error = %error,
                            "{database} is down: history answers 503 until it is back, ingest goes on; retrying with backoff");
                    } else {
                        tracing::warn!(database, kind = kind.as_str(), error = %error, "{database} is down; retrying with backoff");
                    }
                }
                health.up.set(0);
            }
        }
    }

    /// `tickvault_history_db_up` when history reads the ingest database: the
    /// same as `tickvault_db_up`, read at scrape time.
    pub fn history_db_shares_primary(&self) {
        self.history_db_health.up.set(self.db_health.up.get());
    }

    pub fn nats_connection(&self, connected: bool) {
        let was = self.nats_connected.get() == 1;
        if was != connected {
            if connected {
                tracing::info!("connected to NATS");
            } else {
                tracing::warn!("disconnected from NATS; the client reconnects by itself");
            }
        }
        self.nats_connected.set(connected as i64);
    }

    /// A NATS client event: connection changes update the gauge, the rest is logged.
    pub fn nats_event(&self, event: &async_nats::Event) {
        match event {
            async_nats::Event::Connected => self.nats_connection(true),
            async_nats::Event::Disconnected => self.nats_connection(false),
            async_nats::Event::SlowConsumer(_) => {
                if let Some(suppressed) = self.slow_consumer_log.allow() {
                    tracing::warn!(
                        also_since_last_line = suppressed,
                        "a NATS subscription's buffer is full: the client drops its messages"
                    );
                }
            }
            other => tracing::warn!(event = %other, "NATS client event"),
        }
    }

    pub fn history_answered(&self, kind: &str, code: u16, elapsed: Duration) {
        tracing::debug!(
            kind,
            code,
            elapsed_ms = elapsed.as_millis() as u64,
            "history request answered"
        );
        self.history_requests
            .with_label_values(&[kind, &code.to_string()])
            .inc();
        self.history_duration
            .with_label_values(&[kind])
            .observe(elapsed.as_secs_f64());
    }

    /// A history request refused on arrival, without running it.
    pub fn history_shed(&self, reason: ShedReason, kind: &str) {
        let total = self.history_shed.with_label_values(&[reason.as_str()]);
        total.inc();
        let why = match reason {
            ShedReason::TooLarge => "its body is over history.max_request_bytes",
            ShedReason::QueueFull => "the wait queue is full",
            ShedReason::DatabaseDown => "the database is down",
        };
        if self.refusal_due() {
            tracing::warn!(
                reason = reason.as_str(),
                kind,
                total = total.get(),
                "history request refused: {why} (logged at most every 10 s)"
            );
        } else {
            tracing::debug!(reason = reason.as_str(), kind, "history request refused");
        }
    }

    /// A history request that waited past the queue deadline: answered 503, not run.
    pub fn history_expired(&self, kind: &str, waited: Duration) {
        self.history_expired.inc();
        let waited_ms = waited.as_millis() as u64;
        if self.refusal_due() {
            tracing::warn!(
                kind,
                waited_ms,
                total = self.history_expired.get(),
                "history request expired in the queue without running: the service is overloaded (logged at most every 10 s)"
            );
        } else {
            tracing::debug!(kind, waited_ms, "history request expired in the queue");
        }
    }

    /// A history request leaves the queue to run; it counts as in flight
    /// until the returned guard is dropped.
    pub fn history_started(&self, waited: Duration) -> InFlight {
        tracing::trace!(
            waited_ms = waited.as_millis() as u64,
            "history request started"
        );
        self.history_queue_wait.observe(waited.as_secs_f64());
        self.history_in_flight.inc();
        InFlight(self.history_in_flight.clone())
    }

    /// The history wait queue's length changed.
    pub fn history_queued(&self, waiting: usize) {
        self.history_queue_depth.set(waiting as i64);
    }

    /// Whether a refusal should be logged at warn now (at most every 10 s).
    fn refusal_due(&self) -> bool {
        let mut last = self
            .refusal_warned
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let due = last.is_none_or(|at| at.elapsed() >= REFUSAL_WARN_EVERY);
        if due {
            *last = Some(Instant::now());
        }
        due
    }

    /// A type's totals, for the periodic summary.
    pub fn type_totals(&self, record_type: RecordType) -> TypeTotals {
        let name = record_type.name();
        TypeTotals {
            rows_written: self.rows_written.with_label_values(&[name]).get(),
            consumer_pending: self.consumer_pending.with_label_values(&[name]).get(),
            lag_ms: (self.ingest_lag.with_label_values(&[name]).get() * 1000.0).round() as u64,
            rejected: RejectReason::ALL
                .iter()
                .map(|r| self.rejected.with_label_values(&[name, r.as_str()]).get())
                .sum(),
        }
    }

    /// For tests and the benchmark: a counter's current value.
    pub fn rows_written(&self, record_type: RecordType) -> u64 {
        self.rows_written
            .with_label_values(&[record_type.name()])
            .get()
    }
}

/// A type's place in the arrays sized by [`RecordType::ALL`].
fn slot(record_type: RecordType) -> usize {
    RecordType::ALL
        .iter()
        .position(|t| *t == record_type)
        .expect("every type is in ALL")
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_warning_is_logged_at_a_bounded_rate() {
        let limiter = LogLimiter::new(Duration::from_secs(3600));
        assert_eq!(limiter.allow(), Some(0), "the first line is written");
        assert_eq!(limiter.allow(), None);
        assert_eq!(limiter.allow(), None);
        assert_eq!(limiter.suppressed.load(Ordering::Relaxed), 2);
        let every_time = LogLimiter::new(Duration::ZERO);
        assert_eq!(every_time.allow(), Some(0));
        assert_eq!(every_time.allow(), Some(0));
    }
}
