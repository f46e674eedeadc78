//! The worker's periodic summary: one info line every
//! `log.summary_interval_secs` with the rows written per second per type,
//! each consumer's pending messages, each type's lag and the dead letters
//! since the last line (and in total). It only reads the metrics; adding a value to the summary
//! is adding a field to [`TypeTotals`] and a column here.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::ops::metrics::{Metrics, TypeTotals};
use crate::records::RecordType;

/// Every type's totals at one instant, in [`RecordType::ALL`] order.
type Snapshot = [TypeTotals; RecordType::ALL.len()];

fn snapshot(metrics: &Metrics) -> Snapshot {
    RecordType::ALL.map(|t| metrics.type_totals(t))
}

/// The text fields of one summary line.
#[derive(Debug, PartialEq, Eq)]
pub struct SummaryLine {
    /// `tick=120.5 candle=3.0 ...`: rows written per second since the last line.
    pub rows_per_s: String,
    /// `tick=0 candle=12 ...`: JetStream messages not yet delivered.
    pub pending: String,
    /// `tick=0.4 candle=12.0 ...`: `tickvault_ingest_lag_seconds` now.
    pub lag_s: String,
    /// `tick=1 ...`: rejected input since the last line.
    pub dead_letters: String,
    /// Rejected input since start-up, all types.
    pub dead_letters_total: u64,
}

/// The line for the interval from `before` to `now`, `elapsed` long.
pub fn line(before: &Snapshot, now: &Snapshot, elapsed: Duration) -> SummaryLine {
    let seconds = elapsed.as_secs_f64().max(1e-3);
    let mut line = SummaryLine {
        rows_per_s: String::new(),
        pending: String::new(),
        lag_s: String::new(),
        dead_letters: String::new(),
        dead_letters_total: now.iter().map(|t| t.rejected).sum(),
    };
    for (i, record_type) in RecordType::ALL.iter().enumerate() {
        let separator = if i == 0 { "" } else { " " };
        let name = record_type.name();
        let rows = now[i].rows_written.saturating_sub(before[i].rows_written);
        let _ = write!(
            line.rows_per_s,
            "{separator}{name}={:.1}",
            rows as f64 / seconds
        );
        let _ = write!(
            line.pending,
            "{separator}{name}={}",
            now[i].consumer_pending
        );
        let _ = write!(
            line.lag_s,
            "{separator}{name}={:.1}",
            now[i].lag_ms as f64 / 1000.0
        );
        let rejected = now[i].rejected.saturating_sub(before[i].rejected);
        let _ = write!(line.dead_letters, "{separator}{name}={rejected}");
    }
    line
}

/// Logs a summary every `every` until `shutdown`; `every` zero: never.
pub async fn run(metrics: Arc<Metrics>, every: Duration, shutdown: CancellationToken) {
    if every.is_zero() {
        return;
    }
    let mut before = snapshot(&metrics);
    let mut since = Instant::now();
    let mut ticks = tokio::time::interval_at(since + every, every);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let now = snapshot(&metrics);
        let summary = line(&before, &now, since.elapsed());
        tracing::info!(
            rows_per_s = %summary.rows_per_s,
            consumer_pending = %summary.pending,
            lag_s = %summary.lag_s,
            dead_letters = %summary.dead_letters,
            dead_letters_total = summary.dead_letters_total,
            "ingest summary"
        );
        before = now;
        since = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(rows: u64, pending: i64, rejected: u64) -> TypeTotals {
        TypeTotals {
            rows_written: rows,
            consumer_pending: pending,
            lag_ms: pending as u64 * 100,
            rejected,
        }
    }

    #[test]
    fn a_line_has_rates_pending_lag_and_dead_letters_per_type() {
        let before = [totals(100, 0, 1); RecordType::ALL.len()];
        let mut now = before;
        now[0] = totals(1_300, 40, 4);
        now[1] = totals(160, 0, 1);
        let summary = line(&before, &now, Duration::from_secs(60));
        assert_eq!(
            summary.rows_per_s,
            "tick=20.0 candle=1.0 foreign=0.0 index=0.0 deriv=0.0"
        );
        assert_eq!(
            summary.pending,
            "tick=40 candle=0 foreign=0 index=0 deriv=0"
        );
        assert_eq!(
            summary.lag_s,
            "tick=4.0 candle=0.0 foreign=0.0 index=0.0 deriv=0.0"
        );
        assert_eq!(
            summary.dead_letters,
            "tick=3 candle=0 foreign=0 index=0 deriv=0"
        );
        assert_eq!(summary.dead_letters_total, 8);
    }

    #[test]
    fn metrics_feed_the_summary() {
        let metrics = Metrics::new();
        let before = snapshot(&metrics);
        metrics.flushed(
            RecordType::Candle,
            crate::ops::metrics::FlushTrigger::Size,
            30,
            3,
            Duration::from_millis(5),
        );
        metrics.lag_read(
            RecordType::Tick,
            crate::ops::metrics::LagReading {
                pending: Some(7),
                ack_pending: Some(3),
                lag: Duration::from_millis(2_500),
            },
        );
        let reject = crate::records::Reject::new(crate::records::RejectReason::InvalidJson, "x");
        metrics.rejected(RecordType::Deriv, "md.deriv.X", [&reject]);
        let summary = line(&before, &snapshot(&metrics), Duration::from_secs(10));
        assert!(summary.rows_per_s.contains("candle=3.0"), "{summary:?}");
        assert!(summary.pending.starts_with("tick=7 "), "{summary:?}");
        assert!(summary.lag_s.starts_with("tick=2.5 "), "{summary:?}");
        assert!(summary.dead_letters.ends_with("deriv=1"), "{summary:?}");
        assert_eq!(summary.dead_letters_total, 1);
    }
}
