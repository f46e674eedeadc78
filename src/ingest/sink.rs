//! The COPY sink: writes one batch of one type in one transaction and
//! reports each message's [`Outcome`]; the delivery lifecycle turns those
//! into acknowledgements.
//!
//! The common case — no stored row has any of the batch's keys — is a direct
//! `COPY` into the table. When that hits a unique violation (a redelivery, a
//! replica, a re-published candle), the same rows go through a temporary
//! staging table and `INSERT ... ON CONFLICT` with the type's conflict rule.
//! Duplicate keys within the batch are resolved in memory first.
//!
//! Failures follow [`db::failure`](crate::db::failure): an unavailable
//! database is retried with backoff, credentials or schema problems at the
//! slowest pace (an operator must act), and refused data goes to bad-row
//! isolation, where a row refused alone is dead-lettered. Each write is
//! bounded on both sides by the lifecycle's write timeout.
//!
//! Rows that did not come from NATS (a back-fill from files) take the same
//! path through [`Sink::write_rows`]: nothing to acknowledge, and the rows
//! PostgreSQL refuses go back to the caller instead of the dead letters.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::{Connection, PgConnection, Postgres};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::db::{failure, Database, Failure};
use crate::ingest::dead_letter::{DeadLetters, Origin};
use crate::ingest::decode::{record_texts, Rejected};
use crate::ingest::delivery::{Delivery, Lifecycle, Outcome};
use crate::ops::metrics::{FlushTrigger, Metrics};
use crate::records::{
    write_copy_row, Conflict, RecordSpec, RecordType, Reject, RejectReason, Value,
};
use crate::retry::Backoff;

/// One row ready for COPY: its values, the sequence that orders its
/// versions, and its position among its message's rows.
struct StagedRow<'a> {
    values: &'a [Value],
    stream_seq: Option<u64>,
    index: usize,
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
                let updated: Vec<&String> = columns
                    .iter()
                    .filter(|c| !spec.key.iter().any(|k| format!("\"{k}\"") == **c))
                    .collect();
                let updates = updated
                    .iter()
                    .map(|c| format!("{c} = EXCLUDED.{c}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                let list = |prefix: &str| {
                    updated
                        .iter()
                        .map(|c| format!("{prefix}.{c}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                // A lower stream sequence never overwrites a higher one; core
                // mode has no sequence (NULL), so there the last write wins.
                // A version equal to the stored one is left alone, so writing
                // the same rows again changes (and counts) nothing.
                format!(
                    "DO UPDATE SET {updates} WHERE ({table}.stream_seq IS NULL \
                     OR EXCLUDED.stream_seq IS NULL OR {table}.stream_seq <= EXCLUDED.stream_seq) \
                     AND ({}) IS DISTINCT FROM ({})",
                    list(table),
                    list("EXCLUDED"),
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
enum Written {
    /// Committed: this many rows were new or changed a stored row.
    Done(u64),
    /// PostgreSQL refused the data itself: retrying the same rows cannot help.
    Refused(sqlx::Error),
    /// Shutdown's grace period ended first: the messages are handed back.
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

/// What a failed write leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Find the rows PostgreSQL refuses and dead-letter them.
    Isolate,
    /// Retry with a growing delay: the database may be back soon.
    Backoff,
    /// Retry at the longest delay: an operator must fix credentials or schema.
    Slowly,
}

fn step_after(failure: Failure) -> Step {
    match failure {
        Failure::Refused => Step::Isolate,
        Failure::Unavailable => Step::Backoff,
        Failure::Auth | Failure::Schema => Step::Slowly,
    }
}

/// After a direct COPY hit a key conflict, this many batches go straight to
/// the staging merge before the direct path is tried again (re-published
/// candles conflict on nearly every batch).
const MERGE_STREAK: u32 = 16;
const FIRST_RETRY: Duration = Duration::from_millis(200);
const LAST_RETRY: Duration = Duration::from_secs(10);

/// What [`Sink::write_rows`] did with rows that did not come from NATS.
#[derive(Debug, Default)]
pub struct RowsWritten {
    /// Rows that were new or changed a stored row. A row already stored
    /// with the same values, a tick whose key is stored, or a row whose key
    /// repeats later in the same rows (the later one is written) is not counted.
    pub changed: u64,
    /// Rows PostgreSQL refused although they passed every rule: their
    /// index in the rows given, and why.
    pub refused: Vec<(usize, Reject)>,
    /// `give_up` fired before every row was written: some or none were.
    pub gave_up: bool,
}

pub struct Sink {
    spec: &'static RecordSpec,
    statements: Statements,
    db: Database,
    metrics: Arc<Metrics>,
    /// `None` for rows that do not come from NATS ([`Sink::for_rows`]):
    /// their refusals go back to the caller.
    dead_letters: Option<DeadLetters>,
    lifecycle: Lifecycle,
    /// Fired when shutdown can wait no longer for the database.
    give_up: CancellationToken,
    /// Batches left to send straight to the staging merge.
    merges_ahead: AtomicU32,
    /// The failure the last write attempt met (0 = none), so a lasting
    /// state is logged when it starts and when it ends, not per retry.
    failing: AtomicU8,
}

impl Sink {
    pub fn new(
        record_type: RecordType,
        db: Database,
        metrics: Arc<Metrics>,
        dead_letters: DeadLetters,
        lifecycle: Lifecycle,
        give_up: CancellationToken,
    ) -> Self {
        let mut sink = Sink::for_rows(record_type, db, metrics, lifecycle, give_up);
        sink.dead_letters = Some(dead_letters);
        sink
    }

    /// A sink for rows that do not come from NATS, written with
    /// [`write_rows`](Self::write_rows): same statements, conflict rules,
    /// retries and bad-row isolation, nothing to acknowledge or dead-letter.
    pub fn for_rows(
        record_type: RecordType,
        db: Database,
        metrics: Arc<Metrics>,
        lifecycle: Lifecycle,
        give_up: CancellationToken,
    ) -> Self {
        let spec = record_type.spec();
        Sink {
            spec,
            statements: Statements::new(spec),
            db,
            metrics,
            dead_letters: None,
            lifecycle,
            give_up,
            merges_ahead: AtomicU32::new(0),
            failing: AtomicU8::new(0),
        }
    }

    pub fn record_type(&self) -> RecordType {
        self.spec.record_type
    }

    /// Writes the batch (retrying while the database is unavailable) and
    /// returns each message's outcome, in order.
    pub async fn flush(&self, batch: &[Delivery], trigger: FlushTrigger) -> Vec<Outcome> {
        let started = Instant::now();
        // Counted as sent: a key repeated within the batch is one row in
        // the table but every message's rows were written.
        let rows = batch.iter().map(|d| d.rows.len()).sum();
        let staged = stage(self.spec, messages(batch));
        let data = self.encode(&staged);
        match self.write_retrying(&data, rows).await {
            Written::Done(_) => {
                self.metrics.flushed(
                    self.record_type(),
                    trigger,
                    rows,
                    batch.len(),
                    started.elapsed(),
                );
                vec![Outcome::Written; batch.len()]
            }
            Written::Refused(_) => self.isolate_bad_rows(batch, trigger, started).await,
            Written::GaveUp => {
                self.gave_up(batch);
                vec![Outcome::Abandoned; batch.len()]
            }
        }
    }

    /// Writes rows that did not come from NATS (no stream sequence: in a
    /// newest-wins table they overwrite what is stored, and a later row with
    /// the same key wins over an earlier one), retrying while the database
    /// is unavailable. When PostgreSQL refuses the rows, each is written
    /// alone and those it refuses are returned with the reason.
    pub async fn write_rows(&self, rows: &[Vec<Value>]) -> RowsWritten {
        let staged = stage(self.spec, [(rows, None)]);
        match self
            .write_retrying(&self.encode(&staged), staged.len())
            .await
        {
            Written::Done(changed) => RowsWritten {
                changed,
                ..RowsWritten::default()
            },
            Written::GaveUp => RowsWritten {
                gave_up: true,
                ..RowsWritten::default()
            },
            Written::Refused(_) => self.write_alone(&staged).await,
        }
    }

    /// Writes each row in its own transaction, collecting those PostgreSQL
    /// refuses; stops when `give_up` fires.
    async fn write_alone(&self, staged: &[StagedRow<'_>]) -> RowsWritten {
        let mut result = RowsWritten::default();
        for row in staged {
            let one = self.encode(std::slice::from_ref(row));
            match self.write_retrying(&one, 1).await {
                Written::Done(changed) => result.changed += changed,
                Written::Refused(e) => result.refused.push((row.index, refusal(&e))),
                Written::GaveUp => {
                    result.gave_up = true;
                    break;
                }
            }
        }
        result
    }

    fn gave_up(&self, left: &[Delivery]) {
        self.metrics.writes_abandoned(
            self.record_type(),
            left.len(),
            left.iter().map(|d| d.rows.len()).sum(),
        );
    }

    /// Writes encoded rows, retrying everything but a refusal of the data.
    async fn write_retrying(&self, data: &str, rows: usize) -> Written {
        let mut backoff = Backoff::new(FIRST_RETRY, LAST_RETRY);
        loop {
            let timeout = self.lifecycle.write_timeout();
            // The client waits a little longer than the server's statement
            // timeout, so the server normally ends a slow write cleanly.
            let bound = timeout + self.lifecycle.ack_wait() / 4;
            let attempt = tokio::select! {
                biased;
                _ = self.give_up.cancelled() => return Written::GaveUp,
                attempt = tokio::time::timeout(bound, self.write(data, timeout)) => attempt,
            };
            let (error, failure) = match attempt {
                Ok(Ok(changed)) => {
                    if self.failing.swap(0, Ordering::Relaxed) != 0 {
                        self.metrics.writes_recovered(self.record_type());
                    }
                    return Written::Done(changed);
                }
                Ok(Err(e)) => {
                    let failure = failure(&e);
                    (WriteError::Database(e), failure)
                }
                Err(_) => (WriteError::TimedOut(bound), Failure::Unavailable),
            };
            let delay = match step_after(failure) {
                Step::Isolate => {
                    let WriteError::Database(e) = error else {
                        unreachable!("a timeout is never a refusal")
                    };
                    return Written::Refused(e);
                }
                Step::Backoff => backoff.next_delay(),
                Step::Slowly => LAST_RETRY,
            };
            let code = failure_code(failure);
            let first = self.failing.swap(code, Ordering::Relaxed) != code;
            self.metrics
                .flush_failed(self.record_type(), rows, delay, failure, first, &error);
            tokio::select! {
                biased;
                _ = self.give_up.cancelled() => return Written::GaveUp,
                _ = tokio::time::sleep(delay) => {}
            }
        }
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

    /// One transaction: the direct COPY, or on a key conflict the staging
    /// merge. Every statement is bounded server-side by `timeout`. Returns
    /// how many rows were new or changed a stored row.
    async fn write(&self, data: &str, timeout: Duration) -> Result<u64, sqlx::Error> {
        let mut conn = WriteConnection {
            conn: self.db.pool.acquire().await?,
            settled: false,
        };
        let result = self.write_on(&mut conn.conn, data, timeout).await;
        conn.settled = true;
        result
    }

    async fn write_on(
        &self,
        conn: &mut PgConnection,
        data: &str,
        timeout: Duration,
    ) -> Result<u64, sqlx::Error> {
        let bound = format!(
            "SET LOCAL statement_timeout = {}",
            timeout.as_millis().max(1)
        );
        let merge_now = self
            .merges_ahead
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        if !merge_now {
            let mut tx = conn.begin_with(format!("BEGIN; {bound}")).await?;
            match copy(&mut tx, &self.statements.copy_direct, data).await {
                Ok(copied) => return tx.commit().await.map(|()| copied),
                Err(e) if !is_unique_violation(&e) => return Err(e),
                Err(_) => {
                    tx.rollback().await?;
                    self.merges_ahead.store(MERGE_STREAK, Ordering::Relaxed);
                }
            }
        }
        // The staging table usually exists already on this connection: no notice for that.
        let mut tx = conn
            .begin_with(format!(
                "BEGIN; {bound}; SET LOCAL client_min_messages = warning"
            ))
            .await?;
        sqlx::query(&self.statements.create_staging)
            .execute(&mut *tx)
            .await?;
        copy(&mut tx, &self.statements.copy_staging, data).await?;
        let merged = sqlx::query(&self.statements.merge)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await.map(|()| merged)
    }

    /// PostgreSQL refused data that passed validation: write each message,
    /// then each of its rows, alone; dead-letter the rows it refuses with
    /// their original record text, so one bad row never blocks the queue.
    async fn isolate_bad_rows(
        &self,
        batch: &[Delivery],
        trigger: FlushTrigger,
        started: Instant,
    ) -> Vec<Outcome> {
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut written = 0;
        for (done, delivery) in batch.iter().enumerate() {
            let staged = stage(self.spec, messages(std::slice::from_ref(delivery)));
            let outcome = match self
                .write_retrying(&self.encode(&staged), staged.len())
                .await
            {
                Written::Done(_) => {
                    written += delivery.rows.len();
                    Outcome::Written
                }
                Written::GaveUp => Outcome::Abandoned,
                Written::Refused(_) => {
                    let alone = self.write_alone(&staged).await;
                    if alone.gave_up {
                        Outcome::Abandoned
                    } else {
                        written += staged.len() - alone.refused.len();
                        self.dead_letter_refused(delivery, alone.refused).await
                    }
                }
            };
            if outcome == Outcome::Abandoned {
                self.gave_up(&batch[done..]);
                outcomes.resize(batch.len(), Outcome::Abandoned);
                break;
            }
            outcomes.push(outcome);
        }
        self.metrics.flushed(
            self.record_type(),
            trigger,
            written,
            batch.len(),
            started.elapsed(),
        );
        outcomes
    }

    /// Publishes the rows PostgreSQL refused, each as its record's original text.
    async fn dead_letter_refused(
        &self,
        delivery: &Delivery,
        refused: Vec<(usize, Reject)>,
    ) -> Outcome {
        if refused.is_empty() {
            return Outcome::Written;
        }
        let texts = record_texts(self.spec, &delivery.payload);
        let rejected: Vec<Rejected> = refused
            .into_iter()
            .map(|(index, reject)| Rejected {
                payload: texts
                    .get(index)
                    .cloned()
                    .unwrap_or_else(|| delivery.payload.clone()),
                reject,
            })
            .collect();
        let unstored = match &self.dead_letters {
            Some(dead_letters) => {
                dead_letters
                    .send_all(self.record_type(), delivery, Origin::Database, &rejected)
                    .await
            }
            // Nowhere to keep them: the lifecycle retries, then terminates.
            None => rejected.len(),
        };
        Outcome::DeadLettered {
            rejects: rejected.into_iter().map(|r| r.reject).collect(),
            unstored,
        }
    }
}

/// A pooled connection for one write. A write abandoned mid-way (its future
/// dropped by the client-side timeout or by shutdown) may leave the
/// connection busy on the server: it is closed, never returned to the pool.
struct WriteConnection {
    conn: PoolConnection<Postgres>,
    /// The write ran to its end, so the connection is in a known state.
    settled: bool,
}

impl Drop for WriteConnection {
    fn drop(&mut self) {
        if !self.settled {
            self.conn.close_on_drop();
        }
    }
}

fn failure_code(failure: Failure) -> u8 {
    match failure {
        Failure::Unavailable => 1,
        Failure::Auth => 2,
        Failure::Schema => 3,
        Failure::Refused => 4,
    }
}

/// The dead letter's reason for a row PostgreSQL refused, with its words.
fn refusal(error: &sqlx::Error) -> Reject {
    let detail = match error {
        sqlx::Error::Database(db) => format!(
            "PostgreSQL refused the row (SQLSTATE {}): {}",
            db.code().as_deref().unwrap_or("?"),
            db.message()
        ),
        other => format!("PostgreSQL refused the row: {other}"),
    };
    Reject::new(RejectReason::DatabaseRejected, detail)
}

/// Each message's rows with its stream sequence, as [`stage`] takes them.
fn messages(batch: &[Delivery]) -> impl Iterator<Item = (&[Vec<Value>], Option<u64>)> {
    batch.iter().map(|d| (&d.rows[..], d.stream_seq))
}

/// The batch's rows — each message's rows with its stream sequence — with
/// in-batch duplicate keys resolved by the type's rule: a tick keeps its
/// first version, the other types the newest (the higher stream sequence;
/// within one message, or without sequences, the later record).
fn stage<'a>(
    spec: &RecordSpec,
    batch: impl IntoIterator<Item = (&'a [Vec<Value>], Option<u64>)>,
) -> Vec<StagedRow<'a>> {
    let key_positions = spec.key_positions();
    let mut by_key: HashMap<String, usize> = HashMap::new();
    let mut staged: Vec<StagedRow<'a>> = Vec::new();
    for (rows, stream_seq) in batch {
        for (index, values) in rows.iter().enumerate() {
            let mut key = String::new();
            for &p in &key_positions {
                values[p].write_copy_text(&mut key);
                key.push('\u{1f}');
            }
            let row = StagedRow {
                values,
                stream_seq,
                index,
            };
            match by_key.get(&key) {
                None => {
                    by_key.insert(key, staged.len());
                    staged.push(row);
                }
                Some(&i) => {
                    let newer = row.stream_seq.unwrap_or(u64::MAX)
                        >= staged[i].stream_seq.unwrap_or(u64::MAX);
                    if spec.conflict == Conflict::NewestWins && newer {
                        staged[i] = row;
                    }
                }
            }
        }
    }
    staged
}

/// Returns the number of rows copied.
async fn copy(conn: &mut PgConnection, statement: &str, data: &str) -> Result<u64, sqlx::Error> {
    let mut copy = conn.copy_in_raw(statement).await?;
    if let Err(e) = copy.send(data.as_bytes()).await {
        // A COPY is always finished or aborted, never left open.
        let _ = copy.abort("tickvault: send failed").await;
        return Err(e);
    }
    copy.finish().await
}

fn is_unique_violation(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => db.code().as_deref() == Some("23505"),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::DateTime;

    fn text(s: &str) -> Value {
        Value::Text(s.into())
    }

    fn at(ms: i64) -> Value {
        Value::Timestamp(DateTime::from_timestamp_millis(ms).unwrap())
    }

    /// A tick row: symbol, timestamp, price, volume, side, seq.
    fn tick(symbol: &str, seq: i64, price: f64) -> Vec<Value> {
        vec![
            text(symbol),
            at(0),
            Value::Float(price),
            Value::Int(1),
            text("buy"),
            Value::Int(seq),
        ]
    }

    /// A candle row whose close tells its version apart.
    fn candle(symbol: &str, close: f64) -> Vec<Value> {
        let c = Value::Float(close);
        vec![
            text(symbol),
            at(0),
            c.clone(),
            c.clone(),
            c.clone(),
            c,
            Value::Int(1),
            Value::Null,
        ]
    }

    #[test]
    fn in_batch_duplicates_keep_the_first_tick_and_the_newest_version() {
        let ticks = [
            Delivery::for_test(
                vec![
                    tick("FPT", 1, 10.0),
                    tick("FPT", 1, 99.0),
                    tick("FPT", 2, 11.0),
                ],
                Some(5),
            ),
            Delivery::for_test(vec![tick("FPT", 1, 55.0)], Some(6)),
        ];
        let staged = stage(RecordType::Tick.spec(), messages(&ticks));
        let kept: Vec<(f64, usize)> = staged
            .iter()
            .map(|r| (r.values[2].as_f64().unwrap(), r.index))
            .collect();
        assert_eq!(
            kept,
            [(10.0, 0), (11.0, 2)],
            "a trade is immutable: the first stays"
        );

        // Newest wins: the higher stream sequence, whatever the batch order;
        // within one message the later record.
        let candles = [
            Delivery::for_test(vec![candle("FPT", 3.0)], Some(9)),
            Delivery::for_test(
                vec![candle("FPT", 1.0), candle("FPT", 2.0), candle("VNM", 7.0)],
                Some(4),
            ),
        ];
        let staged = stage(RecordType::Candle.spec(), messages(&candles));
        let kept: Vec<(String, f64, Option<u64>)> = staged
            .iter()
            .map(|r| {
                (
                    format!("{:?}", r.values[0]),
                    r.values[5].as_f64().unwrap(),
                    r.stream_seq,
                )
            })
            .collect();
        assert_eq!(
            kept,
            [
                ("Text(\"FPT\")".to_string(), 3.0, Some(9)),
                ("Text(\"VNM\")".to_string(), 7.0, Some(4)),
            ]
        );
        let within_one = [Delivery::for_test(
            vec![candle("FPT", 1.0), candle("FPT", 2.0)],
            Some(4),
        )];
        let staged = stage(RecordType::Candle.spec(), messages(&within_one));
        assert_eq!(
            (staged.len(), staged[0].index),
            (1, 1),
            "the later record of a message"
        );
        // Rows from outside NATS have no sequence: the later row wins.
        let rows = [candle("FPT", 1.0), candle("VNM", 7.0), candle("FPT", 2.0)];
        let staged = stage(RecordType::Candle.spec(), [(&rows[..], None)]);
        let kept: Vec<usize> = staged.iter().map(|r| r.index).collect();
        assert_eq!(kept, [2, 1]);
    }

    #[test]
    fn every_failure_class_has_its_step() {
        assert_eq!(step_after(Failure::Unavailable), Step::Backoff);
        assert_eq!(step_after(Failure::Auth), Step::Slowly);
        assert_eq!(step_after(Failure::Schema), Step::Slowly);
        assert_eq!(step_after(Failure::Refused), Step::Isolate);
    }

    #[test]
    fn a_refusal_names_the_sqlstate_and_reason() {
        let reject = refusal(&sqlx::Error::Protocol("lost".into()));
        assert_eq!(reject.reason, RejectReason::DatabaseRejected);
        assert!(reject.detail.contains("lost"), "{}", reject.detail);
    }

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
        assert!(
            candle.merge.ends_with(
                "AND (candles_1m.\"open\", candles_1m.\"high\", candles_1m.\"low\", \
                 candles_1m.\"close\", candles_1m.\"volume\", candles_1m.\"value\", \
                 candles_1m.stream_seq) IS DISTINCT FROM (EXCLUDED.\"open\", \
                 EXCLUDED.\"high\", EXCLUDED.\"low\", EXCLUDED.\"close\", \
                 EXCLUDED.\"volume\", EXCLUDED.\"value\", EXCLUDED.stream_seq)"
            ),
            "an equal version is left alone: {}",
            candle.merge
        );
    }
}
