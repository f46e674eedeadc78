//! The COPY sink: writes one batch of one type's deliveries and reports
//! each message's [`Outcome`]; the delivery lifecycle turns those into
//! acknowledgements. One concern per file:
//!
//! - [`sql`]: the statements, built once per type;
//! - [`staging`]: a batch's rows with duplicate keys resolved;
//! - [`encode`]: the rows in PostgreSQL's binary COPY format;
//! - [`writer`]: the transaction (direct COPY, or the staging merge on a key
//!   conflict), its timeout and retries — public as [`Writer`] for tools
//!   that write rows without NATS;
//! - here: deliveries in, outcomes out, and bad-row isolation: when
//!   PostgreSQL refuses data that passed validation, each message, then
//!   each of its rows, is written alone and a row refused alone is
//!   dead-lettered.

mod encode;
mod sql;
mod staging;
mod writer;

pub use writer::{RowsWritten, Writer};

use writer::Written;

use std::sync::Arc;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::db::Database;
use crate::ingest::dead_letter::{DeadLetters, Origin};
use crate::ingest::decode::{record_texts, Rejected};
use crate::ingest::delivery::{Delivery, Lifecycle, Outcome};
use crate::ops::metrics::{FlushTrigger, Metrics};
use crate::records::{RecordType, Reject};

pub struct Sink {
    writer: Writer,
    metrics: Arc<Metrics>,
    dead_letters: DeadLetters,
    lifecycle: Lifecycle,
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
        Sink {
            writer: Writer::new(record_type, db, metrics.clone(), give_up),
            metrics,
            dead_letters,
            lifecycle,
        }
    }

    pub fn record_type(&self) -> RecordType {
        self.writer.record_type()
    }

    /// Writes the batch (retrying while the database is unavailable) and
    /// returns each message's outcome, in order.
    pub async fn flush(&self, batch: &[Delivery], trigger: FlushTrigger) -> Vec<Outcome> {
        let started = Instant::now();
        // Counted as sent: a key repeated within the batch is one row in
        // the table but every message's rows were written.
        let rows = batch.iter().map(|d| d.rows.len()).sum();
        let staged = self
            .writer
            .stage(batch.iter().map(|d| (&d.rows, d.stream_seq)));
        match self
            .writer
            .write_staged(&staged, self.lifecycle.write_timeout())
            .await
        {
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

    /// Shutdown stopped waiting for the database: the messages go back.
    fn gave_up(&self, batch: &[Delivery]) {
        let rows = batch.iter().map(|d| d.rows.len()).sum();
        self.metrics
            .writes_abandoned(self.record_type(), batch.len(), rows);
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
            let timeout = self.lifecycle.write_timeout();
            let staged = self.writer.stage([(&delivery.rows, delivery.stream_seq)]);
            let outcome = match self.writer.write_staged(&staged, timeout).await {
                Written::Done(_) => {
                    written += delivery.rows.len();
                    Outcome::Written
                }
                Written::GaveUp => Outcome::Abandoned,
                Written::Refused(_) => {
                    let alone = self.writer.write_alone(&staged, timeout).await;
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
        let texts = record_texts(self.writer.spec(), &delivery.payload);
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
        let unstored = self
            .dead_letters
            .send_all(self.record_type(), delivery, Origin::Database, &rejected)
            .await;
        Outcome::DeadLettered {
            rejects: rejected.into_iter().map(|r| r.reject).collect(),
            unstored,
        }
    }
}
