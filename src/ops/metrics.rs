//! The Prometheus registry and every internal event that changes a metric.
//!
//! Each event is one method: it updates the metric and writes the log line,
//! so a counter and its log never disagree. Labels come from fixed sets
//! (record type names, reject reasons, flush triggers), never raw error text.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::records::{RecordType, Reject, RejectReason};

/// Why a batch was flushed: the `trigger` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushTrigger {
    Size,
    Interval,
    Shutdown,
}

impl FlushTrigger {
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
    pub fn as_str(self) -> &'static str {
        match self {
            DbFailureKind::Timeout => "timeout",
            DbFailureKind::ConnectionRefused => "connection_refused",
            DbFailureKind::Authentication => "authentication",
            DbFailureKind::Other => "other",
        }
    }
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
    consumer_pending: IntGauge,
}

impl IntakeMetrics {
    pub fn message_received(&self) {
        self.received.inc();
    }

    pub fn queue_depth(&self, rows: usize) {
        self.queue_depth.set(rows as i64);
    }

    /// JetStream messages the consumer has not delivered yet, as of the last delivery.
    pub fn consumer_pending(&self, pending: u64) {
        self.consumer_pending.set(pending as i64);
    }
}

/// One type's totals as they are now, read by the periodic summary
/// (`ops/summary.rs`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TypeTotals {
    pub rows_written: u64,
    pub consumer_pending: i64,
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
    flushes: IntCounterVec,
    flush_duration: HistogramVec,
    flush_errors: IntCounterVec,
    db_pool_connections: IntGaugeVec,
    db_pool_max: IntGauge,
    db_up: IntGauge,
    db_health_failures: IntCounterVec,
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
                "Rejected input that could not be published to the dead-letter subject",
                &["type"],
            ),
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
            db_up: register(
                &registry,
                IntGauge::new(
                    "tickvault_db_up",
                    "1 when the last database health check passed",
                )
                .expect("valid metric"),
            ),
            db_health_failures: counter(
                "tickvault_db_health_check_failures_total",
                "Failed database health checks",
                &["kind"],
            ),
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
            registry,
        };
        for reason in ShedReason::ALL {
            metrics.history_shed.with_label_values(&[reason.as_str()]);
        }
        // Every series exists from the start, so dashboards show 0, not "no data".
        for t in RecordType::ALL {
            let name = t.name();
            metrics.queue_depth.with_label_values(&[name]);
            metrics.messages_received.with_label_values(&[name]);
            metrics.rows_written.with_label_values(&[name]);
            metrics.flush_errors.with_label_values(&[name]);
            metrics.consumer_pending.with_label_values(&[name]);
            for reason in RejectReason::ALL {
                metrics.rejected.with_label_values(&[name, reason.as_str()]);
            }
            for trigger in [
                FlushTrigger::Size,
                FlushTrigger::Interval,
                FlushTrigger::Shutdown,
            ] {
                metrics.flushes.with_label_values(&[name, trigger.as_str()]);
            }
            metrics
                .history_requests
                .with_label_values(&[t.spec().history_kind, "200"]);
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
            consumer_pending: self.consumer_pending.with_label_values(&name),
        }
    }

    /// The rejected input of one message: counted per reason, logged once.
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
            "rejected input, sending it to the dead-letter subject"
        );
    }

    pub fn dead_letters_failed(&self, record_type: RecordType, failed: usize, error: &str) {
        tracing::error!(
            r#type = record_type.name(),
            failed,
            error,
            "could not publish dead letters"
        );
        self.dead_letters_failed
            .with_label_values(&[record_type.name()])
            .inc_by(failed as u64);
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

    pub fn flush_failed(
        &self,
        record_type: RecordType,
        rows: usize,
        retry_in: Duration,
        error: &dyn std::error::Error,
    ) {
        tracing::warn!(
            r#type = record_type.name(),
            rows,
            retry_in_ms = retry_in.as_millis() as u64,
            error = %error,
            "batch write failed, keeping the batch and retrying"
        );
        self.flush_errors
            .with_label_values(&[record_type.name()])
            .inc();
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

    /// Records a health check's result; logs only when the state changes.
    pub fn db_checked(&self, result: Result<(), (DbFailureKind, &dyn std::error::Error)>) {
        let was_up = self.db_up.get() == 1;
        match result {
            Ok(()) => {
                if !was_up {
                    tracing::info!("database is up");
                }
                self.db_up.set(1);
            }
            Err((kind, error)) => {
                self.db_health_failures
                    .with_label_values(&[kind.as_str()])
                    .inc();
                if was_up
                    || self
                        .db_health_failures
                        .with_label_values(&[kind.as_str()])
                        .get()
                        == 1
                {
                    if kind == DbFailureKind::Authentication {
                        tracing::error!(kind = kind.as_str(), error = %error,
                            "the database refuses tickvault's login or TLS; fix the setting named in the error (checked again at the longest retry interval)");
                    } else {
                        tracing::warn!(kind = kind.as_str(), error = %error, "database is down; retrying with backoff");
                    }
                }
                self.db_up.set(0);
            }
        }
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

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
