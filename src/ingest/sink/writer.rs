//! The writer: one batch of one type in one transaction, retried while the
//! database is unavailable, each attempt bounded on both sides.
//!
//! The common case — no stored row has any of the batch's keys — is a
//! direct binary `COPY` into the table. When that hits a unique violation (a
//! redelivery, a replica, a re-published candle), the same rows go through
//! a temporary staging table and `INSERT ... ON CONFLICT` with the type's
//! conflict rule, and the next [`MERGE_STREAK`] batches go straight there.
//!
//! Failures follow [`db::failure`](crate::db::failure): an unavailable
//! database is retried with backoff, credentials or schema problems at the
//! slowest pace (an operator must act); refused data is reported to the
//! caller, which isolates it.
//!
//! [`Writer`] is public: tools that write checked rows without NATS (the
//! import) use it as the worker's sink does.

use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::DateTime;
use sqlx::pool::PoolConnection;
use sqlx::{Connection, PgConnection, Postgres};
use tokio_util::sync::CancellationToken;

use crate::db::{failure, Database, Failure};
use crate::ops::metrics::Metrics;
use crate::records::{
    Cell, Conflict, FieldType, RecordSpec, RecordType, Reject, RejectReason, Rows,
};
use crate::retry::Backoff;

use super::encode::encode;
use super::sql::Statements;
use super::staging::{stage, StagedRow};

/// After a direct COPY hit a key conflict, this many batches go straight to
/// the staging merge before the direct path is tried again (re-published
/// candles conflict on nearly every batch).
const MERGE_STREAK: u32 = 16;
const FIRST_RETRY: Duration = Duration::from_millis(200);
const LAST_RETRY: Duration = Duration::from_secs(10);

/// How writing some rows ended, after every retry.
#[derive(Debug)]
pub enum Written {
    /// Committed: this many rows were new or changed a stored row.
    Done(u64),
    /// PostgreSQL refused the data itself: retrying the same rows cannot help.
    Refused(sqlx::Error),
    /// `give_up` fired first: nothing was committed.
    GaveUp,
}

/// What [`Writer::write_rows`] did.
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
    /// Report the refusal: the caller finds the rows PostgreSQL refuses.
    Refused,
    /// Retry with a growing delay: the database may be back soon.
    Backoff,
    /// Retry at the longest delay: an operator must fix credentials or schema.
    Slowly,
}

fn step_after(failure: Failure) -> Step {
    match failure {
        Failure::Refused => Step::Refused,
        Failure::Unavailable => Step::Backoff,
        Failure::Auth | Failure::Schema => Step::Slowly,
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

/// Writes one type's rows.
pub struct Writer {
    spec: &'static RecordSpec,
    statements: Statements,
    key_positions: Vec<usize>,
    db: Database,
    metrics: Arc<Metrics>,
    /// Fired when the caller can wait no longer for the database.
    give_up: CancellationToken,
    /// Batches left to send straight to the staging merge.
    merges_ahead: AtomicU32,
    /// The failure the last write attempt met (0 = none), so a lasting
    /// state is logged when it starts and when it ends, not per retry.
    failing: AtomicU8,
}

impl Writer {
    /// Failed attempts are counted and logged in `metrics`
    /// (`tickvault_flush_failures_total`); `give_up` ends the retries.
    pub fn new(
        record_type: RecordType,
        db: Database,
        metrics: Arc<Metrics>,
        give_up: CancellationToken,
    ) -> Writer {
        let spec = record_type.spec();
        Writer {
            spec,
            statements: Statements::new(spec),
            key_positions: spec.key_positions(),
            db,
            metrics,
            give_up,
            merges_ahead: AtomicU32::new(0),
            failing: AtomicU8::new(0),
        }
    }

    pub fn record_type(&self) -> RecordType {
        self.spec.record_type
    }

    pub fn spec(&self) -> &'static RecordSpec {
        self.spec
    }

    /// Writes rows that did not come from NATS (no stream sequence: in a
    /// newest-wins table they overwrite what is stored, and a later row with
    /// the same key wins over an earlier one), in one transaction, stored
    /// keys merged by the type's rule. Each attempt is bounded by `timeout`
    /// on the server (and a half more on the client); an unavailable
    /// database is retried until it answers or `give_up` fires. When
    /// PostgreSQL refuses the rows, each is written alone and those it
    /// refuses are returned with the reason.
    pub async fn write_rows(&self, rows: &Rows, timeout: Duration) -> RowsWritten {
        let staged = self.stage([(rows, None)]);
        match self.write_staged(&staged, timeout).await {
            Written::Done(changed) => RowsWritten {
                changed,
                ..RowsWritten::default()
            },
            Written::GaveUp => RowsWritten {
                gave_up: true,
                ..RowsWritten::default()
            },
            Written::Refused(_) => self.write_alone(&staged, timeout).await,
        }
    }

    /// Writes each row in its own transaction, collecting those PostgreSQL
    /// refuses (by their index among their message's rows); stops when
    /// `give_up` fires.
    pub(super) async fn write_alone(
        &self,
        staged: &[StagedRow<'_>],
        timeout: Duration,
    ) -> RowsWritten {
        let mut result = RowsWritten::default();
        for row in staged {
            match self.write_staged(std::slice::from_ref(row), timeout).await {
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

    pub(super) fn stage<'a>(
        &self,
        messages: impl IntoIterator<Item = (&'a Rows, Option<u64>)>,
    ) -> Vec<StagedRow<'a>> {
        stage(self.spec, &self.key_positions, messages)
    }

    pub(super) async fn write_staged(
        &self,
        staged: &[StagedRow<'_>],
        timeout: Duration,
    ) -> Written {
        let rows = staged.len();
        // The client waits a little longer than the server's statement
        // timeout, so the server normally ends a slow write cleanly.
        let bound = timeout + timeout / 2;
        let mut backoff = Backoff::new(FIRST_RETRY, LAST_RETRY);
        // Encoded once: the direct COPY of every row is the common case.
        let data = encode(self.spec, staged);
        loop {
            let attempt = tokio::select! {
                biased;
                _ = self.give_up.cancelled() => return Written::GaveUp,
                attempt = tokio::time::timeout(bound, self.write(staged, &data, timeout)) => attempt,
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
                Step::Refused => {
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

    /// One transaction: the direct COPY of `data` (the encoded `staged`),
    /// or on a key conflict the split write. Every statement is bounded
    /// server-side by `timeout`. Returns how many rows were new or changed
    /// a stored row.
    async fn write(
        &self,
        staged: &[StagedRow<'_>],
        data: &[u8],
        timeout: Duration,
    ) -> Result<u64, sqlx::Error> {
        let mut conn = WriteConnection {
            conn: self.db.pool.acquire().await?,
            settled: false,
        };
        let result = self.write_on(&mut conn.conn, staged, data, timeout).await;
        conn.settled = true;
        result
    }

    async fn write_on(
        &self,
        conn: &mut PgConnection,
        staged: &[StagedRow<'_>],
        data: &[u8],
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
        let begin = format!("BEGIN; {bound}; SET LOCAL client_min_messages = warning");
        let mut tx = conn.begin_with(begin.clone()).await?;
        match self.write_split(&mut tx, staged).await {
            Ok(changed) => return tx.commit().await.map(|()| changed),
            Err(e) if !is_unique_violation(&e) => return Err(e),
            // Another writer stored one of the new keys meanwhile.
            Err(_) => tx.rollback().await?,
        }
        let mut tx = conn.begin_with(begin).await?;
        let merged = self.merge(&mut tx, data).await?;
        tx.commit().await.map(|()| merged)
    }

    /// Only the rows whose key is stored go through the staging merge; the
    /// others are a direct COPY (which fails on a key stored meanwhile).
    async fn write_split(
        &self,
        conn: &mut PgConnection,
        staged: &[StagedRow<'_>],
    ) -> Result<u64, sqlx::Error> {
        let stored = self.stored_keys(conn, staged).await?;
        let (mut old, mut new) = (
            Vec::with_capacity(stored.len()),
            Vec::with_capacity(staged.len()),
        );
        for (i, row) in staged.iter().enumerate() {
            if stored.binary_search(&(i as i64 + 1)).is_ok() {
                old.push(*row);
            } else {
                new.push(*row);
            }
        }
        let mut changed = 0;
        if !new.is_empty() {
            changed += copy(conn, &self.statements.copy_direct, &encode(self.spec, &new)).await?;
        }
        // A stored tick stays as it is (keep-first): nothing to merge.
        if !old.is_empty() && self.spec.conflict == Conflict::NewestWins {
            changed += self.merge(conn, &encode(self.spec, &old)).await?;
        }
        Ok(changed)
    }

    /// The staging merge of `data`: COPY into the session's staging table,
    /// then `INSERT ... ON CONFLICT` with the type's rule.
    async fn merge(&self, conn: &mut PgConnection, data: &[u8]) -> Result<u64, sqlx::Error> {
        sqlx::query(&self.statements.create_staging)
            .execute(&mut *conn)
            .await?;
        copy(conn, &self.statements.copy_staging, data).await?;
        let merged = sqlx::query(&self.statements.merge)
            .execute(&mut *conn)
            .await?
            .rows_affected();
        Ok(merged)
    }

    /// The 1-based positions in `staged` of the rows whose key is stored, in order.
    async fn stored_keys(
        &self,
        conn: &mut PgConnection,
        staged: &[StagedRow<'_>],
    ) -> Result<Vec<i64>, sqlx::Error> {
        let mut query = sqlx::query_scalar::<_, i64>(&self.statements.stored_keys);
        for &p in &self.key_positions {
            let cells = staged.iter().map(|s| (s.row, s.row.cells()[p]));
            query = match self.spec.fields[p].ty {
                FieldType::Symbol | FieldType::Side => {
                    query.bind(cells.map(|(row, cell)| row.text(&cell)).collect::<Vec<_>>())
                }
                FieldType::Timestamp => query.bind(
                    cells
                        .map(|(_, cell)| match cell {
                            Cell::Timestamp(micros) => DateTime::from_timestamp_micros(micros),
                            _ => None,
                        })
                        .collect::<Vec<_>>(),
                ),
                FieldType::PositiveInt | FieldType::NonNegativeInt => query.bind(
                    cells
                        .map(|(_, cell)| match cell {
                            Cell::Int(v) => Some(v),
                            _ => None,
                        })
                        .collect::<Vec<_>>(),
                ),
                FieldType::Positive | FieldType::NonNegative | FieldType::Finite => {
                    query.bind(cells.map(|(_, cell)| cell.as_f64()).collect::<Vec<_>>())
                }
            };
        }
        let mut stored = query.fetch_all(&mut *conn).await?;
        stored.sort_unstable();
        Ok(stored)
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

/// Returns the number of rows copied.
async fn copy(conn: &mut PgConnection, statement: &str, data: &[u8]) -> Result<u64, sqlx::Error> {
    let mut copy = conn.copy_in_raw(statement).await?;
    if let Err(e) = copy.send(data).await {
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

    #[test]
    fn every_failure_class_has_its_step() {
        assert_eq!(step_after(Failure::Unavailable), Step::Backoff);
        assert_eq!(step_after(Failure::Auth), Step::Slowly);
        assert_eq!(step_after(Failure::Schema), Step::Slowly);
        assert_eq!(step_after(Failure::Refused), Step::Refused);
    }

    #[test]
    fn a_refusal_names_the_sqlstate_and_reason() {
        let reject = refusal(&sqlx::Error::Protocol("lost".into()));
        assert_eq!(reject.reason, RejectReason::DatabaseRejected);
        assert!(reject.detail.contains("lost"), "{}", reject.detail);
    }
}
