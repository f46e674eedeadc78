//! The COPY sink: writes one batch of one type in one transaction, then
//! acknowledges its messages.
//!
//! The common case — no stored row has any of the batch's keys — is a direct
//! `COPY` into the table. When that hits a unique violation (a redelivery, a
//! replica, a re-published candle), the same rows go through a temporary
//! staging table and `INSERT ... ON CONFLICT` with the type's conflict rule.
//! Duplicate keys within the batch are resolved in memory first.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::AckKind;
use sqlx::{Acquire, PgConnection};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::db::{failure, Database, Failure};
use crate::ingest::batcher::Delivery;
use crate::ingest::dead_letter::DeadLetters;
use crate::ingest::decode::Rejected;
use crate::ops::metrics::{FlushTrigger, Metrics};
use crate::records::{
    write_copy_row, Conflict, RecordSpec, RecordType, Reject, RejectReason, Value,
};
use crate::retry::Backoff;

/// One row ready for COPY, with the sequence that orders its versions.
struct StagedRow<'a> {
    values: &'a [Value],
    stream_seq: Option<u64>,
}

/// SQL built once per type from its spec.
struct Statements {
    copy_direct: String,
    create_staging: String,
    copy_staging: String,
    merge: String,
}

impl Statements {
    fn new(spec: &RecordSpec) -> Self {
        let mut columns: Vec<String> = spec.column_names().map(|c| format!("\"{c}\"")).collect();
        if spec.conflict == Conflict::NewestWins {
            columns.push("stream_seq".into());
        }
        let column_list = columns.join(", ");
        let table = spec.table;
        let staging = format!("tickvault_staging_{table}");
        let key = spec
            .key
            .iter()
            .map(|c| format!("\"{c}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let on_conflict = match spec.conflict {
            Conflict::KeepFirst => "DO NOTHING".to_string(),
            Conflict::NewestWins => {
                let updates = columns
                    .iter()
                    .filter(|c| !spec.key.iter().any(|k| format!("\"{k}\"") == **c))
                    .map(|c| format!("{c} = EXCLUDED.{c}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                // A lower stream sequence never overwrites a higher one; core
                // mode has no sequence (NULL), so there the last write wins.
                format!(
                    "DO UPDATE SET {updates} WHERE {table}.stream_seq IS NULL \
                     OR EXCLUDED.stream_seq IS NULL OR {table}.stream_seq <= EXCLUDED.stream_seq"
                )
            }
        };
        Statements {
            copy_direct: format!("COPY {table} ({column_list}) FROM STDIN"),
            create_staging: format!(
                "CREATE TEMP TABLE IF NOT EXISTS {staging} (LIKE {table}) ON COMMIT DELETE ROWS"
            ),
            copy_staging: format!("COPY {staging} ({column_list}) FROM STDIN"),
            merge: format!(
                // Ordered by key so replicas merging the same keys lock rows in
                // the same order and cannot deadlock each other.
                "INSERT INTO {table} ({column_list}) SELECT {column_list} FROM {staging} \
                 ORDER BY {key} ON CONFLICT ({key}) {on_conflict}"
            ),
        }
    }
}

/// How writing some rows ended, after every retry.
enum WriteOutcome {
    Written,
    /// PostgreSQL refused the data itself: retrying the same rows cannot help.
    Refused,
    /// Shutdown's grace period ended first: nothing is acknowledged, so
    /// JetStream delivers the messages again later.
    GaveUp,
}

/// Why one write attempt failed.
#[derive(Debug, thiserror::Error)]
enum WriteError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("the write took longer than {0:?}; is the database overloaded or unreachable?")]
    TimedOut(Duration),
}

/// A write that takes longer than this is abandoned and retried: a database
/// that stops answering must not hold a type's queue for the TCP timeout.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// After a direct COPY hit a key conflict, this many batches go straight to
/// the staging merge before the direct path is tried again (re-published
/// candles conflict on nearly every batch).
const MERGE_STREAK: u32 = 16;

pub struct Sink {
    spec: &'static RecordSpec,
    statements: Statements,
    db: Database,
    metrics: Arc<Metrics>,
    dead_letters: DeadLetters,
    ack_wait: Duration,
    /// Fired when shutdown can wait no longer for the database.
    give_up: CancellationToken,
    /// Batches left to send straight to the staging merge.
    merges_ahead: AtomicU32,
}

impl Sink {
    pub fn new(
        record_type: RecordType,
        db: Database,
        metrics: Arc<Metrics>,
        dead_letters: DeadLetters,
        ack_wait: Duration,
        give_up: CancellationToken,
    ) -> Self {
        let spec = record_type.spec();
        Sink {
            spec,
            statements: Statements::new(spec),
            db,
            metrics,
            dead_letters,
            ack_wait,
            give_up,
            merges_ahead: AtomicU32::new(0),
        }
    }

    pub fn record_type(&self) -> RecordType {
        self.spec.record_type
    }

    /// Writes the batch (retrying while the database is unavailable), then
    /// acknowledges its messages. Dropping the batch frees its queue room.
    pub async fn flush(&self, batch: Vec<Delivery>, trigger: FlushTrigger) {
        let started = Instant::now();
        let rows = batch.iter().map(|d| d.rows.len()).sum::<usize>();
        let data = self.encode(&self.stage(&batch));
        match self.write_retrying(&data, rows, &batch).await {
            WriteOutcome::Written => {
                self.metrics.flushed(
                    self.record_type(),
                    trigger,
                    rows,
                    batch.len(),
                    started.elapsed(),
                );
                acknowledge(&batch).await;
            }
            WriteOutcome::Refused => {
                self.write_isolating_bad_rows(&batch, trigger, started)
                    .await
            }
            WriteOutcome::GaveUp => self.gave_up(rows),
        }
    }

    fn gave_up(&self, rows: usize) {
        tracing::warn!(
            r#type = self.record_type().name(),
            rows,
            "shutting down with the database unavailable: leaving the rows unacknowledged for redelivery"
        );
    }

    /// Writes encoded rows, retrying with backoff everything but a refusal of
    /// the data, and keeping the `held` messages from being redelivered meanwhile.
    async fn write_retrying(&self, data: &str, rows: usize, held: &[Delivery]) -> WriteOutcome {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        let mut last_progress = Instant::now();
        loop {
            let attempt = tokio::select! {
                _ = self.give_up.cancelled() => return WriteOutcome::GaveUp,
                attempt = tokio::time::timeout(WRITE_TIMEOUT, self.write(data)) => attempt,
            };
            let error = match attempt {
                Ok(Ok(())) => return WriteOutcome::Written,
                Ok(Err(e)) if is_data_error(&e) => return WriteOutcome::Refused,
                Ok(Err(e)) => WriteError::Database(e),
                Err(_) => WriteError::TimedOut(WRITE_TIMEOUT),
            };
            let delay = backoff.next_delay();
            self.metrics
                .flush_failed(self.record_type(), rows, delay, &error);
            if last_progress.elapsed() >= self.ack_wait / 3 {
                progress(held).await;
                last_progress = Instant::now();
            }
            tokio::select! {
                _ = self.give_up.cancelled() => return WriteOutcome::GaveUp,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// The batch's rows with in-batch duplicate keys resolved by the type's rule.
    fn stage<'a>(&self, batch: &'a [Delivery]) -> Vec<StagedRow<'a>> {
        let key_positions = self.spec.key_positions();
        let mut by_key: HashMap<String, usize> = HashMap::new();
        let mut staged: Vec<StagedRow<'a>> = Vec::new();
        for delivery in batch {
            for values in &delivery.rows {
                let mut key = String::new();
                for &p in &key_positions {
                    values[p].write_copy_text(&mut key);
                    key.push('\u{1f}');
                }
                let row = StagedRow {
                    values,
                    stream_seq: delivery.stream_seq,
                };
                match by_key.get(&key) {
                    None => {
                        by_key.insert(key, staged.len());
                        staged.push(row);
                    }
                    Some(&i) => {
                        let newer = row.stream_seq.unwrap_or(u64::MAX)
                            >= staged[i].stream_seq.unwrap_or(u64::MAX);
                        if self.spec.conflict == Conflict::NewestWins && newer {
                            staged[i] = row;
                        }
                    }
                }
            }
        }
        staged
    }

    fn encode(&self, rows: &[StagedRow<'_>]) -> String {
        let mut data = String::with_capacity(rows.len() * 96);
        let newest_wins = self.spec.conflict == Conflict::NewestWins;
        for row in rows {
            let stream_seq = newest_wins.then_some(match row.stream_seq {
                Some(seq) => Value::Int(seq as i64),
                None => Value::Null,
            });
            write_copy_row(row.values.iter().chain(stream_seq.as_ref()), &mut data);
        }
        data
    }

    /// One transaction: the direct COPY, or on a key conflict the staging merge.
    async fn write(&self, data: &str) -> Result<(), sqlx::Error> {
        let mut conn = self.db.pool.acquire().await?;
        let merge_now = self
            .merges_ahead
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        if !merge_now {
            let mut tx = conn.begin().await?;
            match copy(&mut tx, &self.statements.copy_direct, data).await {
                Ok(()) => return tx.commit().await,
                Err(e) if !is_unique_violation(&e) => return Err(e),
                Err(_) => {
                    tx.rollback().await?;
                    self.merges_ahead.store(MERGE_STREAK, Ordering::Relaxed);
                }
            }
        }
        let mut tx = conn.begin().await?;
        // The staging table usually exists already on this connection: no notice for that.
        sqlx::query("SET LOCAL client_min_messages = warning")
            .execute(&mut *tx)
            .await?;
        sqlx::query(&self.statements.create_staging)
            .execute(&mut *tx)
            .await?;
        copy(&mut tx, &self.statements.copy_staging, data).await?;
        sqlx::query(&self.statements.merge)
            .execute(&mut *tx)
            .await?;
        tx.commit().await
    }

    /// PostgreSQL refused data that passed validation: write each message,
    /// then each of its rows, alone; dead-letter the rows it refuses, so one
    /// bad row never blocks the queue. Each message is acknowledged once its
    /// rows are written or dead-lettered.
    async fn write_isolating_bad_rows(
        &self,
        batch: &[Delivery],
        trigger: FlushTrigger,
        started: Instant,
    ) {
        let mut written = 0;
        for (done, delivery) in batch.iter().enumerate() {
            let staged = self.stage(std::slice::from_ref(delivery));
            let held = std::slice::from_ref(delivery);
            let mut dead_lettered = true;
            match self
                .write_retrying(&self.encode(&staged), staged.len(), held)
                .await
            {
                WriteOutcome::Written => written += staged.len(),
                WriteOutcome::GaveUp => {
                    self.gave_up(batch[done..].iter().map(|d| d.rows.len()).sum());
                    break;
                }
                WriteOutcome::Refused => {
                    for row in &staged {
                        let one = self.encode(std::slice::from_ref(row));
                        match self.write_retrying(&one, 1, held).await {
                            WriteOutcome::Written => written += 1,
                            WriteOutcome::Refused => {
                                let rejected = Rejected {
                                    reject: Reject::new(
                                        RejectReason::DatabaseRejected,
                                        "PostgreSQL refused the row",
                                    ),
                                    payload: self.record_json(row.values).into(),
                                };
                                dead_lettered &= self
                                    .dead_letters
                                    .send_all(self.record_type(), &delivery.subject, &[rejected])
                                    .await;
                            }
                            WriteOutcome::GaveUp => {
                                self.gave_up(batch[done..].iter().map(|d| d.rows.len()).sum());
                                return;
                            }
                        }
                    }
                }
            }
            if dead_lettered {
                acknowledge(held).await;
            } else {
                // A refused row could not be dead-lettered: have it delivered again.
                retry_later(held).await;
            }
        }
        self.metrics.flushed(
            self.record_type(),
            trigger,
            written,
            batch.len(),
            started.elapsed(),
        );
    }

    fn record_json(&self, values: &[Value]) -> Vec<u8> {
        let object: serde_json::Map<String, serde_json::Value> = self
            .spec
            .column_names()
            .zip(values)
            .map(|(name, value)| (name.to_string(), value.to_json()))
            .collect();
        serde_json::to_vec(&object).unwrap_or_default()
    }
}

async fn copy(conn: &mut PgConnection, statement: &str, data: &str) -> Result<(), sqlx::Error> {
    let mut copy = conn.copy_in_raw(statement).await?;
    if let Err(e) = copy.send(data.as_bytes()).await {
        // A COPY is always finished or aborted, never left open.
        let _ = copy.abort("tickvault: send failed").await;
        return Err(e);
    }
    copy.finish().await.map(|_| ())
}

fn sql_state(error: &sqlx::Error) -> Option<String> {
    match error {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

fn is_unique_violation(error: &sqlx::Error) -> bool {
    sql_state(error).as_deref() == Some("23505")
}

/// The row itself is the problem (class 22 data exception, 23 integrity):
/// retrying the same data cannot help. Anything else is retried.
fn is_data_error(error: &sqlx::Error) -> bool {
    failure(error) == Failure::Refused
        && sql_state(error).is_some_and(|c| c.starts_with("22") || c.starts_with("23"))
}

async fn acknowledge(batch: &[Delivery]) {
    for delivery in batch {
        if let Some(ack) = &delivery.ack {
            if let Err(e) = ack.ack().await {
                // The rows are committed; a redelivery is written idempotently.
                tracing::warn!(error = %e, "could not acknowledge a written message; it will be redelivered");
            }
        }
    }
}

/// How long a message whose refused row could not be dead-lettered waits before redelivery.
const REDELIVER_AFTER: Duration = Duration::from_secs(5);

async fn retry_later(batch: &[Delivery]) {
    for delivery in batch {
        if let Some(ack) = &delivery.ack {
            let _ = ack.ack_with(AckKind::Nak(Some(REDELIVER_AFTER))).await;
        }
    }
}

/// Tells JetStream the messages are still being worked on (resets their ack wait).
pub async fn progress<'a>(batch: impl IntoIterator<Item = &'a Delivery>) {
    for delivery in batch {
        if let Some(ack) = &delivery.ack {
            let _ = ack.ack_with(AckKind::Progress).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_follow_the_spec() {
        let tick = Statements::new(RecordType::Tick.spec());
        assert_eq!(
            tick.copy_direct,
            "COPY tick_data (\"symbol\", \"timestamp\", \"price\", \"volume\", \"side\", \"seq\") FROM STDIN"
        );
        assert!(tick
            .merge
            .ends_with("ON CONFLICT (\"symbol\", \"timestamp\", \"seq\") DO NOTHING"));
        let candle = Statements::new(RecordType::Candle.spec());
        assert!(candle.copy_direct.contains("\"value\", stream_seq)"));
        assert!(candle.merge.contains("\"close\" = EXCLUDED.\"close\""));
        assert!(candle.merge.contains("stream_seq = EXCLUDED.stream_seq"));
        assert!(!candle.merge.contains("\"symbol\" = EXCLUDED"));
        assert!(candle
            .merge
            .contains("candles_1m.stream_seq <= EXCLUDED.stream_seq"));
    }
}
