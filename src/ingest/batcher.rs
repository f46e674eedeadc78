//! The per-type queue and batcher: deliveries wait here until `batch_size`
//! rows or `flush_interval` after the first of them, then go to the sink as
//! one batch of whole messages. Up to `flushes_in_flight` batches are
//! written at once, each on its own connection; while they are, new rows
//! keep arriving and form the next batch, which grows with the backlog
//! (group commit, up to `max_batch_rows`), so a quiet feed gets small
//! batches within `flush_interval` and a busy one few large transactions.
//! Batches in flight together never share a key: a delivery with a key a
//! flush in flight holds waits for it, so concurrent writers never wait for
//! each other's locks or deadlock. Every waiting or in-flight delivery is
//! kept alive, and settled with the outcome the sink reports.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::config::IngestConfig;
use crate::ingest::delivery::{Delivery, Lifecycle};
use crate::ingest::sink::Sink;
use crate::ops::health::Status;
use crate::ops::metrics::{FlushTrigger, IntakeMetrics, Metrics};
use crate::records::{KeyHashing, RecordType};

/// Payload bytes one place of the queue stands for: a message takes one
/// place per row, or one per KiB of payload when that is more, so the
/// payloads a full queue holds stay within `queue_capacity` KiB.
pub const BYTES_PER_PLACE: usize = 1024;

/// A type's queue room (bounded in places, not messages) and its reporting.
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

/// Room reserved in a queue for one delivery.
pub struct Room(OwnedSemaphorePermit);

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

/// The places a delivery of `rows` rows and `payload_bytes` bytes takes in a
/// queue of `capacity` (a message always fits an empty queue).
fn places(rows: usize, payload_bytes: usize, capacity: usize) -> u32 {
    rows.max(payload_bytes.div_ceil(BYTES_PER_PLACE))
        .clamp(1, capacity) as u32
}

impl QueueSender {
    fn places(&self, delivery: &Delivery) -> u32 {
        places(
            delivery.rows.len(),
            delivery.payload.len(),
            self.room.capacity,
        )
    }

    /// Waits for room for the delivery (backpressure).
    pub async fn reserve(&self, delivery: &Delivery) -> Result<Room, QueueClosed> {
        self.room
            .room
            .clone()
            .acquire_many_owned(self.places(delivery))
            .await
            .map(Room)
            .map_err(|_| QueueClosed(self.room.record_type.name()))
    }

    /// Room for the delivery if there is some now.
    pub fn try_reserve(&self, delivery: &Delivery) -> Option<Room> {
        self.room
            .room
            .clone()
            .try_acquire_many_owned(self.places(delivery))
            .ok()
            .map(Room)
    }

    /// Queues the delivery in the room reserved for it.
    pub fn push(&self, mut delivery: Delivery, room: Room) -> Result<(), QueueClosed> {
        delivery.hold_room(room.0);
        self.tx
            .send(delivery)
            .map_err(|_| QueueClosed(self.room.record_type.name()))?;
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
    pub flushes_in_flight: usize,
}

impl BatchLimits {
    /// A batch holds its rows' queue room until it is settled, so one
    /// batch takes at most a `flushes_in_flight + 1`-th of the queue: with
    /// every flush in flight at its largest, the queue still has room to
    /// fill the next batch meanwhile (measured: batches of the whole queue
    /// stalled intake during every flush, ratio 0.68 against 1.05).
    pub fn new(config: &IngestConfig) -> Self {
        let share = config.queue_capacity / (config.flushes_in_flight + 1);
        BatchLimits {
            batch_size: config.batch_size,
            max_batch_rows: config.max_batch_rows.min(share).max(config.batch_size),
            flush_interval: config.flush_interval(),
            flushes_in_flight: config.flushes_in_flight,
        }
    }
}

/// The keys (hashed) the flushes in flight write, and how many hold each.
struct Claims {
    key_positions: Vec<usize>,
    held: HashMap<u64, u32, KeyHashing>,
    by_flush: HashMap<tokio::task::Id, Vec<u64>>,
}

impl Claims {
    fn new(record_type: RecordType) -> Self {
        Claims {
            key_positions: record_type.spec().key_positions(),
            held: HashMap::default(),
            by_flush: HashMap::new(),
        }
    }

    /// The delivery's key fingerprints, computed once.
    fn keys<'d>(&self, delivery: &'d mut Delivery) -> &'d [u64] {
        if delivery.key_fingerprints.is_empty() {
            delivery.key_fingerprints = delivery
                .rows
                .iter()
                .map(|row| row.key(&self.key_positions).fingerprint())
                .collect();
        }
        &delivery.key_fingerprints
    }

    fn is_free(&self, keys: &[u64]) -> bool {
        self.held.is_empty() || keys.iter().all(|k| !self.held.contains_key(k))
    }

    fn claim(&mut self, flush: tokio::task::Id, keys: Vec<u64>) {
        for key in &keys {
            *self.held.entry(*key).or_default() += 1;
        }
        self.by_flush.insert(flush, keys);
    }

    /// The flush ended (however): its keys are free again.
    fn release(&mut self, flush: tokio::task::Id) {
        for key in self.by_flush.remove(&flush).unwrap_or_default() {
            if let Some(n) = self.held.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    self.held.remove(&key);
                }
            }
        }
    }
}

/// Runs until every sender is gone and every delivery is settled.
pub async fn run(
    mut queue: QueueReceiver,
    sink: Arc<Sink>,
    lifecycle: Lifecycle,
    limits: BatchLimits,
) {
    let mut pending: VecDeque<Delivery> = VecDeque::new();
    let mut pending_rows = 0usize;
    let mut in_flight: JoinSet<()> = JoinSet::new();
    let mut claims = Claims::new(lifecycle.record_type());
    // Every waiting delivery needs a key a flush in flight holds: wait for one to end.
    let mut blocked = false;
    let mut open = true;
    let mut next_keep_alive = Instant::now() + lifecycle.keep_alive_every();
    loop {
        let deadline = pending.front().map(|d| d.arrived + limits.flush_interval);
        let room = in_flight.len() < limits.flushes_in_flight.max(1);
        tokio::select! {
            Some(finished) = in_flight.join_next_with_id(), if !in_flight.is_empty() => {
                let id = match finished {
                    Ok((id, ())) => id,
                    Err(e) => {
                        tracing::error!(r#type = lifecycle.record_type().name(), error = %e, "flush task failed");
                        e.id()
                    }
                };
                claims.release(id);
                blocked = false;
                queue.room.report_depth();
            }
            delivery = queue.rx.recv(), if open => match delivery {
                Some(delivery) => {
                    // While every waiting delivery is blocked, a new one can
                    // unblock the batcher only if `take_batch` would look at
                    // it: not when a batch's worth of rows waits before it
                    // (rescanning them for every arrival cost more than it found).
                    blocked &= pending_rows > limits.max_batch_rows;
                    pending_rows += delivery.rows.len();
                    pending.push_back(delivery);
                }
                None => open = false,
            },
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)),
                if deadline.is_some() && room && !blocked => {}
            _ = tokio::time::sleep_until(next_keep_alive) => {
                lifecycle.keep_alive(&pending).await;
                next_keep_alive = Instant::now() + lifecycle.keep_alive_every();
            }
        }
        while !blocked && !pending.is_empty() && in_flight.len() < limits.flushes_in_flight.max(1) {
            let deadline = pending.front().map(|d| d.arrived + limits.flush_interval);
            let Some(trigger) = trigger(
                pending_rows,
                limits.batch_size,
                open,
                deadline,
                Instant::now(),
            ) else {
                break;
            };
            let (batch, keys) = take_batch(
                &mut pending,
                &mut pending_rows,
                limits.max_batch_rows,
                &claims,
            );
            if batch.is_empty() {
                blocked = true;
                break;
            }
            let sink = sink.clone();
            let lifecycle = lifecycle.clone();
            let flush = in_flight.spawn(async move {
                let outcomes = lifecycle
                    .keep_alive_while(&batch, sink.flush(&batch, trigger))
                    .await;
                lifecycle.settle_all(batch, outcomes).await;
            });
            claims.claim(flush.id(), keys);
        }
        if !open && pending.is_empty() && in_flight.is_empty() {
            return;
        }
    }
}

/// Why the waiting rows should be flushed now, if they should.
fn trigger(
    pending_rows: usize,
    batch_size: usize,
    open: bool,
    deadline: Option<Instant>,
    now: Instant,
) -> Option<FlushTrigger> {
    if pending_rows >= batch_size {
        Some(FlushTrigger::Size)
    } else if !open {
        Some(FlushTrigger::Shutdown)
    } else if deadline.is_some_and(|d| d <= now) {
        Some(FlushTrigger::Interval)
    } else {
        None
    }
}

/// Whole deliveries from the front, up to `max_rows` rows (at least one
/// delivery), skipping those with a key a flush in flight holds (they keep
/// their place); returns the batch and its keys.
fn take_batch(
    pending: &mut VecDeque<Delivery>,
    pending_rows: &mut usize,
    max_rows: usize,
    claims: &Claims,
) -> (Vec<Delivery>, Vec<u64>) {
    let mut batch = Vec::new();
    let mut keys = Vec::new();
    // Deliveries put back, in order, ahead of what was not looked at; a
    // later delivery sharing a key with one of them waits behind it.
    let mut skipped = Vec::new();
    let mut skipped_keys: HashSet<u64, KeyHashing> = HashSet::default();
    let mut rows = 0;
    let mut skipped_rows = 0;
    while let Some(next) = pending.front() {
        // Looking far behind waiting deliveries costs more than it finds.
        if (!batch.is_empty() && rows + next.rows.len() > max_rows) || skipped_rows > max_rows {
            break;
        }
        let mut delivery = pending.pop_front().expect("front exists");
        let own = claims.keys(&mut delivery);
        if claims.is_free(own) && !own.iter().any(|k| skipped_keys.contains(k)) {
            keys.extend_from_slice(own);
            rows += delivery.rows.len();
            batch.push(delivery);
        } else {
            skipped_keys.extend(own);
            skipped_rows += delivery.rows.len();
            skipped.push(delivery);
        }
    }
    for delivery in skipped.into_iter().rev() {
        pending.push_front(delivery);
    }
    *pending_rows -= rows;
    (batch, keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{Rows, Value};

    fn tick(seq: i64) -> Vec<Value> {
        vec![
            Value::Text("FPT".into()),
            Value::Timestamp(chrono::DateTime::from_timestamp_millis(0).unwrap()),
            Value::Float(1.0),
            Value::Int(1),
            Value::Text("buy".into()),
            Value::Int(seq),
        ]
    }

    fn delivery(rows: usize) -> Delivery {
        delivery_from(0, rows)
    }

    /// Ticks with seq `first..first + rows`.
    fn delivery_from(first: i64, rows: usize) -> Delivery {
        let rows: Vec<Vec<Value>> = (first..first + rows as i64).map(tick).collect();
        Delivery::for_test(Rows::from_values(RecordType::Tick.spec(), &rows), None)
    }

    #[test]
    fn a_flush_is_triggered_by_size_then_shutdown_then_the_interval() {
        let now = Instant::now();
        let later = now + Duration::from_secs(1);
        assert_eq!(
            trigger(500, 500, true, Some(later), now),
            Some(FlushTrigger::Size)
        );
        assert_eq!(
            trigger(600, 500, false, Some(later), now),
            Some(FlushTrigger::Size)
        );
        assert_eq!(
            trigger(1, 500, false, Some(later), now),
            Some(FlushTrigger::Shutdown)
        );
        assert_eq!(
            trigger(1, 500, true, Some(now), now),
            Some(FlushTrigger::Interval)
        );
        assert_eq!(trigger(1, 500, true, Some(later), now), None);
        assert_eq!(trigger(499, 500, true, None, now), None);
    }

    #[test]
    fn a_batch_leaves_queue_room_for_the_next_while_flushes_are_in_flight() {
        let config = IngestConfig::default();
        let limits = BatchLimits::new(&config);
        assert_eq!(limits.max_batch_rows, 10_000 / 3);
        let small_queue = IngestConfig {
            queue_capacity: 1_000,
            ..IngestConfig::default()
        };
        assert_eq!(
            BatchLimits::new(&small_queue).max_batch_rows,
            500,
            "never below batch_size"
        );
        let few_rows = IngestConfig {
            max_batch_rows: 600,
            ..IngestConfig::default()
        };
        assert_eq!(BatchLimits::new(&few_rows).max_batch_rows, 600);
    }

    #[test]
    fn a_batch_takes_whole_deliveries_up_to_the_row_limit() {
        let claims = Claims::new(RecordType::Tick);
        let mut pending: VecDeque<Delivery> = [3, 4, 2, 10].map(delivery).into_iter().collect();
        let mut rows = 19;
        let (batch, keys) = take_batch(&mut pending, &mut rows, 9, &claims);
        assert_eq!(
            batch.iter().map(|d| d.rows.len()).collect::<Vec<_>>(),
            [3, 4, 2]
        );
        assert_eq!(keys.len(), 9);
        assert_eq!((rows, pending.len()), (10, 1));
        // A delivery larger than the limit still goes, alone.
        let (batch, _) = take_batch(&mut pending, &mut rows, 9, &claims);
        assert_eq!(batch.len(), 1);
        assert_eq!((rows, pending.len()), (0, 0));
        assert!(take_batch(&mut pending, &mut rows, 9, &claims).0.is_empty());
    }

    #[tokio::test]
    async fn a_key_in_flight_keeps_its_deliveries_waiting_in_order() {
        let mut claims = Claims::new(RecordType::Tick);
        let mut pending: VecDeque<Delivery> = VecDeque::new();
        let mut rows = 0;
        for (first, n) in [(0, 2), (10, 1)] {
            rows += n;
            pending.push_back(delivery_from(first, n));
        }
        let (first, keys) = take_batch(&mut pending, &mut rows, 1, &claims);
        assert_eq!(first.len(), 1);
        let flush = tokio::spawn(async {}).id();
        claims.claim(flush, keys);
        // seq 1 (again) is in flight, seq 20 is not; seq 10 waits behind neither.
        for (first, n) in [(1, 1), (20, 1)] {
            rows += n;
            pending.push_back(delivery_from(first, n));
        }
        let (batch, _) = take_batch(&mut pending, &mut rows, 100, &claims);
        let firsts: Vec<Value> = batch.iter().map(|d| d.rows.row(0).value(5)).collect();
        assert_eq!(firsts, [Value::Int(10), Value::Int(20)]);
        assert_eq!(pending.len(), 1, "the delivery with a key in flight waits");
        assert!(take_batch(&mut pending, &mut rows, 100, &claims)
            .0
            .is_empty());
        claims.release(flush);
        let (batch, _) = take_batch(&mut pending, &mut rows, 100, &claims);
        assert_eq!(batch.len(), 1);
        assert_eq!(rows, 0);
    }

    #[test]
    fn a_message_takes_a_place_per_row_or_per_kib_of_payload() {
        assert_eq!(places(10, 300, 10_000), 10);
        assert_eq!(places(1, 1_000_000, 10_000), 977);
        assert_eq!(places(0, 0, 10_000), 1);
        assert_eq!(
            places(1, 100 << 20, 10_000),
            10_000,
            "always fits an empty queue"
        );
    }

    #[tokio::test]
    async fn the_queue_is_bounded_in_places_and_frees_room_when_a_delivery_goes() {
        let (sender, mut receiver) = queue(
            RecordType::Tick,
            5,
            Arc::new(Metrics::new()),
            Arc::new(Status::new(false)),
        );
        let three = delivery(3);
        let room = sender.try_reserve(&three).expect("room for 3 of 5");
        sender.push(three, room).unwrap();
        assert!(
            sender.try_reserve(&delivery(3)).is_none(),
            "full: 3 + 3 > 5"
        );
        let two = delivery(2);
        let room = sender.try_reserve(&two).expect("room for 2 more");
        sender.push(two, room).unwrap();
        drop(receiver.rx.recv().await.unwrap());
        assert!(
            sender.try_reserve(&delivery(3)).is_some(),
            "room given back"
        );
    }
}
