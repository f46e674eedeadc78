//! The per-type queue and batcher: rows wait here until `batch_size` rows
//! or `flush_interval` after the first of them, then go to the sink as one
//! batch of whole messages. While a flush is in flight new rows keep
//! arriving and form the next batch (group commit, up to `max_batch_rows`).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::message::Acker;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::ingest::sink::{self, Sink};
use crate::ops::health::Status;
use crate::ops::metrics::{FlushTrigger, IntakeMetrics, Metrics};
use crate::records::{RecordType, Value};

/// The rows of one NATS message, waiting to be written.
pub struct Delivery {
    /// The message's subject, named in dead letters.
    pub subject: String,
    pub rows: Vec<Vec<Value>>,
    /// JetStream stream sequence: orders versions for newest-wins tables.
    pub stream_seq: Option<u64>,
    /// Acknowledges the message once its rows are committed (JetStream only).
    pub ack: Option<Acker>,
    /// This delivery's room in the queue, given back when it is dropped.
    _room: OwnedSemaphorePermit,
    arrived: Instant,
}

/// A type's queue room (bounded in rows, not messages) and its reporting.
#[derive(Clone)]
struct QueueRoom {
    record_type: RecordType,
    room: Arc<Semaphore>,
    capacity: usize,
    metrics: IntakeMetrics,
    status: Arc<Status>,
}

impl QueueRoom {
    fn report_depth(&self) {
        let depth = self.capacity - self.room.available_permits();
        self.metrics.queue_depth(depth);
        self.status.set_queue_rows(self.record_type, depth);
    }
}

/// The sending side of a type's bounded queue.
#[derive(Clone)]
pub struct QueueSender {
    tx: mpsc::UnboundedSender<Delivery>,
    room: QueueRoom,
}

/// The receiving side, owned by the batcher; it ends when every sender is gone.
pub struct QueueReceiver {
    rx: mpsc::UnboundedReceiver<Delivery>,
    room: QueueRoom,
}

#[derive(Debug, thiserror::Error)]
#[error("the {0} queue is closed: the worker is shutting down")]
pub struct QueueClosed(pub &'static str);

pub fn queue(
    record_type: RecordType,
    capacity: usize,
    metrics: Arc<Metrics>,
    status: Arc<Status>,
) -> (QueueSender, QueueReceiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    metrics.queue_sized(record_type, capacity);
    let metrics = metrics.intake(record_type);
    let room = QueueRoom {
        record_type,
        room: Arc::new(Semaphore::new(capacity)),
        capacity,
        metrics,
        status,
    };
    let receiver = QueueReceiver {
        rx,
        room: room.clone(),
    };
    (QueueSender { tx, room }, receiver)
}

impl QueueSender {
    /// Waits for room for the rows (backpressure), then queues them.
    pub async fn push(
        &self,
        subject: String,
        rows: Vec<Vec<Value>>,
        stream_seq: Option<u64>,
        ack: Option<Acker>,
    ) -> Result<(), QueueClosed> {
        let closed = || QueueClosed(self.room.record_type.name());
        let needed = rows.len().clamp(1, self.room.capacity) as u32;
        let room = self
            .room
            .room
            .clone()
            .acquire_many_owned(needed)
            .await
            .map_err(|_| closed())?;
        let delivery = Delivery {
            subject,
            rows,
            stream_seq,
            ack,
            _room: room,
            arrived: Instant::now(),
        };
        self.tx.send(delivery).map_err(|_| closed())?;
        self.room.report_depth();
        Ok(())
    }
}

/// Batching limits, from `ingest.*`.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    pub batch_size: usize,
    pub max_batch_rows: usize,
    pub flush_interval: Duration,
    /// JetStream's ack wait: rows waiting longer than a third of it get a
    /// progress ack so they are not redelivered while still held.
    pub ack_wait: Duration,
}

/// Runs until every sender is gone and every row is flushed.
pub async fn run(mut queue: QueueReceiver, sink: Arc<Sink>, limits: BatchLimits) {
    let mut pending: VecDeque<Delivery> = VecDeque::new();
    let mut pending_rows = 0usize;
    let mut in_flight: Option<tokio::task::JoinHandle<()>> = None;
    let mut open = true;
    let mut keep_alive = tokio::time::interval(limits.ack_wait / 3);
    keep_alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let deadline = pending.front().map(|d| d.arrived + limits.flush_interval);
        tokio::select! {
            finished = async { in_flight.as_mut().expect("guarded").await }, if in_flight.is_some() => {
                in_flight = None;
                if let Err(e) = finished {
                    tracing::error!(r#type = sink.record_type().name(), error = %e, "flush task failed");
                }
                queue.room.report_depth();
            }
            delivery = queue.rx.recv(), if open => match delivery {
                Some(delivery) => {
                    pending_rows += delivery.rows.len();
                    pending.push_back(delivery);
                }
                None => open = false,
            },
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)),
                if deadline.is_some() && in_flight.is_none() => {}
            _ = keep_alive.tick() => {
                let waiting = pending
                    .iter()
                    .take_while(|d| d.arrived.elapsed() >= limits.ack_wait / 3)
                    .count();
                sink::progress(pending.range(..waiting)).await;
            }
        }
        if in_flight.is_none() && !pending.is_empty() {
            let trigger = if pending_rows >= limits.batch_size {
                Some(FlushTrigger::Size)
            } else if !open {
                Some(FlushTrigger::Shutdown)
            } else if deadline.is_some_and(|d| d <= Instant::now()) {
                Some(FlushTrigger::Interval)
            } else {
                None
            };
            if let Some(trigger) = trigger {
                let batch = take_batch(&mut pending, &mut pending_rows, limits.max_batch_rows);
                let sink = sink.clone();
                in_flight = Some(tokio::spawn(
                    async move { sink.flush(batch, trigger).await },
                ));
            }
        }
        if !open && pending.is_empty() && in_flight.is_none() {
            return;
        }
    }
}

/// Whole deliveries from the front, up to `max_rows` rows (at least one delivery).
fn take_batch(
    pending: &mut VecDeque<Delivery>,
    pending_rows: &mut usize,
    max_rows: usize,
) -> Vec<Delivery> {
    let mut batch = Vec::new();
    let mut rows = 0;
    while let Some(next) = pending.front() {
        if !batch.is_empty() && rows + next.rows.len() > max_rows {
            break;
        }
        rows += next.rows.len();
        batch.push(pending.pop_front().expect("front exists"));
    }
    *pending_rows -= rows;
    batch
}
