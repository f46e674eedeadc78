//! The COPY sink: writes one batch of one type in one transaction, then
//! acknowledges its messages.
//!
//! The common case — no stored row has any of the batch's keys — is a direct
//! `COPY` into the table. When that hits a unique violation (a redelivery, a
//! replica, a re-published candle), the same rows go through a temporary
//! staging table and `INSERT ... ON CONFLICT` with the type's conflict rule.
//! Duplicate keys within the batch are resolved in memory first.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::AckKind;
use sqlx::{Acquire, PgConnection};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::db::{is_transient, Database};
use crate::ingest::batcher::Delivery;
use crate::ingest::dead_letter::DeadLetters;
use crate::ingest::decode::Rejected;
use crate::ops::metrics::{FlushTrigger, Metrics};
use crate::records::{Conflict, RecordSpec, RecordType, Reject, RejectReason, Value};
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
                "INSERT INTO {table} ({column_list}) SELECT {column_list} FROM {staging} \
                 ON CONFLICT ({key}) {on_conflict}"
            ),
        }
    }
}

/// What became of a batch.
enum FlushOutcome {
    Committed,
    /// Shutdown's grace period ended while the database was unavailable:
    /// not acknowledged, so JetStream delivers it again later.
    Abandoned,
}

/// What became of rows written on their own, to single out bad ones.
enum RowsOutcome {
    Written,
    Refused,
    Abandoned,
}

pub struct Sink {
    spec: &'static RecordSpec,
    statements: Statements,
    db: Database,
    metrics: Arc<Metrics>,
    dead_letters: DeadLetters,
    ack_wait: Duration,
    /// Fired when shutdown can wait no longer for the database.
    give_up: CancellationToken,
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
        }
    }

    pub fn record_type(&self) -> RecordType {
        self.spec.record_type
    }

    /// Writes the batch (retrying while the database is unavailable), then
    /// acknowledges its messages. Dropping the batch frees its queue room.
    pub async fn flush(&self, batch: Vec<Delivery>, trigger: FlushTrigger) {
        let rows = batch.iter().map(|d| d.rows.len()).sum::<usize>();
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        let mut last_progress = Instant::now();
        loop {
            let started = Instant::now();
            let staged = self.stage(&batch);
            match self.write(&staged).await {
                Ok(()) => {
                    self.metrics.flushed(
                        self.record_type(),
                        trigger,
                        rows,
                        batch.len(),
                        started.elapsed(),
                    );
                    acknowledge(&batch).await;
                    return;
                }
                Err(e) if is_data_error(&e) => {
                    drop(staged);
                    self.write_isolating_bad_rows(&batch, trigger).await;
                    acknowledge(&batch).await;
                    return;
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    self.metrics
                        .flush_failed(self.record_type(), rows, delay, &e);
                    if last_progress.elapsed() >= self.ack_wait / 3 {
                        // Keep JetStream from redelivering what we still hold.
                        progress(&batch).await;
                        last_progress = Instant::now();
                    }
                    if let FlushOutcome::Abandoned = self.wait(delay).await {
                        tracing::warn!(
                            r#type = self.record_type().name(),
                            rows,
                            "shutting down with the database unavailable: leaving the batch unacknowledged for redelivery"
                        );
                        return;
                    }
                }
            }
        }
    }

    async fn wait(&self, delay: Duration) -> FlushOutcome {
        tokio::select! {
            _ = self.give_up.cancelled() => FlushOutcome::Abandoned,
            _ = tokio::time::sleep(delay) => FlushOutcome::Committed,
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
        for row in rows {
            for (i, value) in row.values.iter().enumerate() {
                if i > 0 {
                    data.push('\t');
                }
                value.write_copy_text(&mut data);
            }
            if self.spec.conflict == Conflict::NewestWins {
                data.push('\t');
                match row.stream_seq {
                    Some(seq) => data.push_str(&seq.to_string()),
                    None => data.push_str("\\N"),
                }
            }
            data.push('\n');
        }
        data
    }

    /// One transaction: the direct COPY, or on a key conflict the staging merge.
    async fn write(&self, rows: &[StagedRow<'_>]) -> Result<(), sqlx::Error> {
        let data = self.encode(rows);
        let mut conn = self.db.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        match copy(&mut tx, &self.statements.copy_direct, &data).await {
            Ok(()) => return tx.commit().await,
            Err(e) if !is_unique_violation(&e) => return Err(e),
            Err(_) => tx.rollback().await?,
        }
        let mut tx = conn.begin().await?;
        // The staging table usually exists already on this connection: no notice for that.
        sqlx::query("SET LOCAL client_min_messages = warning")
            .execute(&mut *tx)
            .await?;
        sqlx::query(&self.statements.create_staging)
            .execute(&mut *tx)
            .await?;
        copy(&mut tx, &self.statements.copy_staging, &data).await?;
        sqlx::query(&self.statements.merge)
            .execute(&mut *tx)
            .await?;
        tx.commit().await
    }

    /// PostgreSQL refused data that passed validation: write each message,
    /// then each row, alone, and dead-letter the rows it refuses, so one bad
    /// row never blocks the queue.
    async fn write_isolating_bad_rows(&self, batch: &[Delivery], trigger: FlushTrigger) {
        let started = Instant::now();
        let mut written = 0;
        for delivery in batch {
            let rows = self.stage(std::slice::from_ref(delivery));
            match self.write_until_done(&rows).await {
                RowsOutcome::Written => {
                    written += delivery.rows.len();
                    continue;
                }
                RowsOutcome::Abandoned => return,
                RowsOutcome::Refused => {}
            }
            for row in rows {
                match self.write_until_done(std::slice::from_ref(&row)).await {
                    RowsOutcome::Written => written += 1,
                    RowsOutcome::Refused => {
                        let record = self.record_json(row.values);
                        let rejected = Rejected {
                            reject: Reject::new(
                                RejectReason::DatabaseRejected,
                                "PostgreSQL refused the row",
                            ),
                            payload: record.into(),
                        };
                        self.dead_letters
                            .send(self.record_type(), &delivery.subject, &rejected)
                            .await;
                    }
                    RowsOutcome::Abandoned => return,
                }
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

    /// Writes the rows, retrying everything but a refusal of the data itself.
    async fn write_until_done(&self, rows: &[StagedRow<'_>]) -> RowsOutcome {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            match self.write(rows).await {
                Ok(()) => return RowsOutcome::Written,
                Err(e) if is_data_error(&e) => return RowsOutcome::Refused,
                Err(e) => {
                    let delay = backoff.next_delay();
                    self.metrics
                        .flush_failed(self.record_type(), rows.len(), delay, &e);
                    if let FlushOutcome::Abandoned = self.wait(delay).await {
                        return RowsOutcome::Abandoned;
                    }
                }
            }
        }
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
    !is_transient(error)
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

async fn progress(batch: &[Delivery]) {
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
