//! A message's life, in one place: received → queued → written or
//! dead-lettered → acknowledged, nak'ed or terminated — and kept alive
//! while it is held. This module is the only code that answers JetStream
//! about a message: the source, the batcher and the sink report an
//! [`Outcome`]; [`Lifecycle::settle`] turns it into `+ACK`, `-NAK` or `+TERM`
//! and counts what the message's rejected input became.
//!
//! Keep-alive: a held message (prefetched by the source, waiting in the
//! queue, being written or retried) gets a progress ack once it has been
//! held for a sixth of the consumer's ack wait, as the server reports it,
//! so JetStream never redelivers a message this worker still holds.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_nats::jetstream::AckKind;
use async_nats::Subject;
use bytes::Bytes;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use crate::ops::lag::Held;
use crate::ops::metrics::Metrics;
use crate::records::{RecordType, Reject, Rows};

/// How long a message whose dead letters could not be stored waits before
/// JetStream delivers it again.
pub const DEAD_LETTER_RETRY: Duration = Duration::from_secs(5);
/// Deliveries of one message that may fail to store its dead letters; the
/// last one terminates the message (counted in
/// `tickvault_dead_letter_failures_total`) so it never loops.
pub const DEAD_LETTER_DELIVERIES: i64 = 3;
/// The longest a single write may take, whatever the ack wait.
const MAX_WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// How a message's processing ended, as the stage that ended it reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Every row is committed (and every rejected record dead-lettered): ack.
    Written,
    /// Some records were rejected: the message's other rows are committed
    /// and `rejects` (rows PostgreSQL refused, `unstored` of them not
    /// published) went to the dead letters: ack, or retry when some could
    /// not be published.
    DeadLettered {
        rejects: Vec<Reject>,
        unstored: usize,
    },
    /// Not finished: have JetStream deliver it again after `after`.
    Retry { after: Duration },
    /// This worker will not write it (shutdown): nak at once so another
    /// replica takes it now rather than after the ack wait.
    Abandoned,
    /// Its dead letters could not be stored within the bound: stop
    /// redelivery (`+TERM`), counted and logged.
    Terminated,
    /// Core mode only: the queue was full, the message is not written.
    Dropped,
}

impl Outcome {
    /// Whether the message's story ends here (no redelivery follows).
    pub fn is_final(&self) -> bool {
        !matches!(self, Outcome::Retry { .. } | Outcome::Abandoned)
    }

    fn ack_kind(&self) -> AckKind {
        match self {
            Outcome::Written | Outcome::DeadLettered { .. } => AckKind::Ack,
            Outcome::Retry { after } => AckKind::Nak(Some(*after)),
            Outcome::Abandoned | Outcome::Dropped => AckKind::Nak(None),
            Outcome::Terminated => AckKind::Term,
        }
    }
}

/// Where a JetStream message is answered: its reply subject, through the
/// worker's one NATS client. (async-nats' own `Acker` holds a copy of the
/// JetStream context per message, several allocations each: with 50,000
/// single-record messages held, that was a sizeable part of the memory.)
pub struct Acker {
    reply: Subject,
    client: Arc<async_nats::Client>,
}

impl Acker {
    pub fn new(reply: Subject, client: Arc<async_nats::Client>) -> Acker {
        Acker { reply, client }
    }

    /// What async-nats' `Acker::ack_with` sends: the answer to the reply subject.
    async fn ack_with(&self, kind: AckKind) -> Result<(), async_nats::PublishError> {
        self.client.publish(self.reply.clone(), kind.into()).await
    }
}

/// One NATS message from the time it is received until it is settled.
pub struct Delivery {
    /// The message's subject, named in dead letters.
    pub subject: Subject,
    /// The payload as received: the source of a row's original record text.
    pub payload: Bytes,
    /// The checked rows, in the order of the payload's valid records.
    pub rows: Rows,
    /// JetStream stream sequence: orders versions for newest-wins tables.
    pub stream_seq: Option<u64>,
    /// When JetStream stored the message (nanoseconds since the epoch):
    /// with the sequence, the identity its dead letters are de-duplicated by.
    published_ns: i64,
    /// How many times JetStream has delivered it (1 the first time).
    delivered: i64,
    /// Answers JetStream (`None` in core mode, or once settled).
    acker: Option<Acker>,
    /// Records rejected when the message was decoded, counted once settled.
    rejects: Vec<Reject>,
    /// How many of `rejects` could not be published as dead letters.
    unstored: usize,
    /// Its room in the type's queue, given back when it is dropped.
    room: Option<OwnedSemaphorePermit>,
    /// When it was received.
    pub arrived: Instant,
    /// Its rows' key fingerprints, once the batcher needed them (empty before).
    pub key_fingerprints: Vec<u64>,
    /// When JetStream last heard about it (received or progress-acked), in
    /// milliseconds since [`epoch`].
    touched: AtomicU64,
    /// Counts it in its type's lag until it is dropped.
    _held: Held,
}

/// The origin of [`Delivery::touched`].
fn epoch() -> std::time::Instant {
    static EPOCH: OnceLock<std::time::Instant> = OnceLock::new();
    *EPOCH.get_or_init(std::time::Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

/// What JetStream says about a delivery, read from its reply subject.
#[derive(Debug, Clone, Copy)]
pub struct JetStreamOrigin {
    pub stream_seq: u64,
    pub delivered: i64,
    pub published_ns: i64,
}

impl Delivery {
    fn new(subject: Subject, payload: Bytes, acker: Option<Acker>, held: Held) -> Delivery {
        Delivery {
            subject,
            // A copy of its own: async-nats' payload is a view of the
            // connection's 64 KiB read buffer, which a held message would
            // keep alive with every other message's protocol lines in it
            // (with full queues of single records, 9 % of the memory).
            payload: Bytes::copy_from_slice(&payload),
            rows: Rows::default(),
            stream_seq: None,
            published_ns: 0,
            delivered: 1,
            acker,
            rejects: Vec::new(),
            unstored: 0,
            room: None,
            arrived: Instant::now(),
            key_fingerprints: Vec::new(),
            touched: AtomicU64::new(now_ms()),
            _held: held,
        }
    }

    /// A JetStream message whose metadata was read; `held` is the token
    /// its reception gave ([`IntakeMetrics::message_received`](crate::ops::metrics::IntakeMetrics::message_received)).
    pub fn jetstream(
        subject: Subject,
        payload: Bytes,
        origin: JetStreamOrigin,
        acker: Acker,
        held: Held,
    ) -> Delivery {
        let mut delivery = Delivery::new(subject, payload, Some(acker), held);
        delivery.stream_seq = Some(origin.stream_seq);
        delivery.delivered = origin.delivered;
        delivery.published_ns = origin.published_ns;
        delivery
    }

    /// A core-mode message: no sequence, no acknowledgement, no redelivery.
    pub fn core(subject: Subject, payload: Bytes, held: Held) -> Delivery {
        Delivery::new(subject, payload, None, held)
    }

    /// Records the message's rejected input: `unstored` of them could not
    /// be published as dead letters.
    pub fn note_rejects(&mut self, rejects: impl IntoIterator<Item = Reject>, unstored: usize) {
        self.rejects.extend(rejects);
        self.unstored += unstored;
    }

    /// The identity a dead letter of this message is de-duplicated by in
    /// the dead-letter stream (`Nats-Msg-Id`), so a redelivered message
    /// does not store its dead letters twice. `None` in core mode.
    /// `stage` tells the stages that reject apart; `n` numbers the message's
    /// dead letters of that stage (decoding is deterministic, so it is stable).
    pub fn dead_letter_id(&self, stage: &str, n: usize) -> Option<String> {
        self.stream_seq
            .map(|seq| format!("tickvault-{seq}-{}-{stage}-{n}", self.published_ns))
    }

    /// Gives the delivery its room in the queue.
    pub(crate) fn hold_room(&mut self, room: OwnedSemaphorePermit) {
        self.room = Some(room);
    }

    /// Whether a failure to store dead letters may still be retried by a redelivery.
    fn may_redeliver(&self) -> bool {
        self.acker.is_some() && self.delivered < DEAD_LETTER_DELIVERIES
    }

    #[cfg(test)]
    pub(crate) fn for_test(rows: Rows, stream_seq: Option<u64>) -> Delivery {
        let held = Arc::new(crate::ops::lag::HeldMessages::default()).hold();
        let mut delivery = Delivery::core(Subject::from_static("md.test.X"), Bytes::new(), held);
        delivery.rows = rows;
        delivery.stream_seq = stream_seq;
        delivery
    }
}

impl Drop for Delivery {
    /// A delivery dropped without an outcome (a task aborted at shutdown)
    /// is handed back at once rather than left to the ack wait.
    fn drop(&mut self) {
        if let Some(acker) = self.acker.take() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    let _ = acker.ack_with(AckKind::Nak(None)).await;
                });
            }
        }
    }
}

/// The outcome that is acted on, given the one reported and how many of the
/// message's dead letters from decoding (`unstored`) or from the reported
/// outcome are still unpublished.
fn resolve(reported: Outcome, unstored: usize, may_redeliver: bool) -> Outcome {
    let unstored = unstored
        + match &reported {
            Outcome::DeadLettered { unstored, .. } => *unstored,
            _ => 0,
        };
    match reported {
        Outcome::Written | Outcome::DeadLettered { .. } if unstored > 0 => {
            if may_redeliver {
                Outcome::Retry {
                    after: DEAD_LETTER_RETRY,
                }
            } else {
                Outcome::Terminated
            }
        }
        other => other,
    }
}

/// One record type's acknowledgement policy: the consumer's ack wait as the
/// server reports it, and what keeps a held message alive and bounds a write.
#[derive(Clone)]
pub struct Lifecycle {
    record_type: RecordType,
    metrics: Arc<Metrics>,
    /// The consumer's ack wait in milliseconds.
    ack_wait_ms: Arc<AtomicU64>,
}

impl Lifecycle {
    /// `ack_wait` is the configured one, used until the consumer reports its own.
    pub fn new(record_type: RecordType, metrics: Arc<Metrics>, ack_wait: Duration) -> Self {
        Lifecycle {
            record_type,
            metrics,
            ack_wait_ms: Arc::new(AtomicU64::new(ack_wait.as_millis() as u64)),
        }
    }

    pub fn record_type(&self) -> RecordType {
        self.record_type
    }

    /// Paces keep-alive and write timeouts by the consumer's actual ack wait.
    pub fn set_ack_wait(&self, ack_wait: Duration) {
        let ms = (ack_wait.as_millis() as u64).max(1);
        self.ack_wait_ms.store(ms, Ordering::Relaxed);
    }

    pub fn ack_wait(&self) -> Duration {
        Duration::from_millis(self.ack_wait_ms.load(Ordering::Relaxed))
    }

    /// How often held messages are looked at, and how long one may go
    /// without a word to JetStream: a sixth of the ack wait, so that even a
    /// message handed between holders at the worst moment is progress-acked
    /// within half the ack wait.
    pub fn keep_alive_every(&self) -> Duration {
        self.ack_wait() / 6
    }

    /// The bound on one write (client and server side): half the ack wait,
    /// at most 30 s. A slow write never outlives the ack wait.
    pub fn write_timeout(&self) -> Duration {
        (self.ack_wait() / 2).min(MAX_WRITE_TIMEOUT)
    }

    /// Answers JetStream for one message and counts its rejected input once
    /// its story ends.
    pub async fn settle(&self, delivery: Delivery, outcome: Outcome) {
        if !self.settle_quietly(delivery, outcome).await {
            tracing::warn!(
                r#type = self.record_type.name(),
                "could not answer JetStream for a message; it will be delivered again after the ack wait"
            );
        }
    }

    /// Settles a batch with its outcomes, in order.
    pub async fn settle_all(&self, batch: Vec<Delivery>, outcomes: Vec<Outcome>) {
        debug_assert_eq!(batch.len(), outcomes.len());
        let mut unanswered = 0;
        for (delivery, outcome) in batch.into_iter().zip(outcomes) {
            if !self.settle_quietly(delivery, outcome).await {
                unanswered += 1;
            }
        }
        if unanswered > 0 {
            tracing::warn!(
                r#type = self.record_type.name(),
                messages = unanswered,
                "could not answer JetStream for some messages; they will be delivered again after the ack wait"
            );
        }
    }

    /// Returns false when the answer could not be sent.
    async fn settle_quietly(&self, mut delivery: Delivery, reported: Outcome) -> bool {
        let may_redeliver = delivery.may_redeliver();
        let unstored = delivery.unstored;
        let outcome = resolve(reported, unstored, may_redeliver);
        let answered = match delivery.acker.take() {
            Some(acker) => acker.ack_with(outcome.ack_kind()).await.is_ok(),
            None => true,
        };
        if !outcome.is_final() {
            return answered;
        }
        let record_type = self.record_type;
        let mut rejects = std::mem::take(&mut delivery.rejects);
        let subject = delivery.subject.as_str();
        let mut unstored = unstored;
        if let Outcome::DeadLettered {
            rejects: refused,
            unstored: refused_unstored,
        } = &outcome
        {
            rejects.extend(refused.iter().cloned());
            unstored += refused_unstored;
        }
        self.metrics.rejected(record_type, subject, rejects.iter());
        match outcome {
            Outcome::Terminated => {
                self.metrics
                    .dead_letters_abandoned(record_type, subject, unstored)
            }
            Outcome::Dropped => self.metrics.dropped(record_type, subject),
            _ => {}
        }
        answered
    }

    /// A JetStream message whose metadata (stream sequence) cannot be read
    /// is never written: without a sequence it could overwrite a newer
    /// version. It is nak'ed and delivered again after a pause.
    pub async fn refuse_unreadable(&self, subject: &str, acker: Option<Acker>) {
        tracing::warn!(
            r#type = self.record_type.name(),
            subject,
            "a message's JetStream metadata could not be read; it is not written and will be delivered again"
        );
        if let Some(acker) = acker {
            let _ = acker.ack_with(AckKind::Nak(Some(DEAD_LETTER_RETRY))).await;
        }
    }

    /// A pulled message this worker will not even look at (it arrived while
    /// shutting down): handed back at once for another worker.
    pub async fn hand_back_unread(&self, acker: Acker) {
        let _ = acker.ack_with(Outcome::Abandoned.ack_kind()).await;
    }

    /// Progress-acks every held message JetStream has not heard about for
    /// [`keep_alive_every`](Self::keep_alive_every).
    pub async fn keep_alive<'a>(&self, held: impl IntoIterator<Item = &'a Delivery>) {
        let every = self.keep_alive_every().as_millis() as u64;
        let now = now_ms();
        for delivery in held {
            let Some(acker) = &delivery.acker else {
                continue;
            };
            let touched = delivery.touched.load(Ordering::Relaxed);
            if now.saturating_sub(touched) >= every {
                let _ = acker.ack_with(AckKind::Progress).await;
                delivery.touched.store(now, Ordering::Relaxed);
            }
        }
    }

    /// Runs `work` while keeping `held` alive.
    pub async fn keep_alive_while<T>(&self, held: &[Delivery], work: impl Future<Output = T>) -> T {
        tokio::pin!(work);
        loop {
            let tick = tokio::time::sleep(self.keep_alive_every());
            tokio::select! {
                biased;
                done = &mut work => return done,
                _ = tick => self.keep_alive(held).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::RejectReason;

    fn refused(n: usize, unstored: usize) -> Outcome {
        Outcome::DeadLettered {
            rejects: vec![Reject::new(RejectReason::DatabaseRejected, "x"); n],
            unstored,
        }
    }

    #[test]
    fn outcomes_map_to_the_jetstream_answers() {
        let kind = |o: Outcome| format!("{:?}", o.ack_kind());
        assert_eq!(kind(Outcome::Written), "Ack");
        assert_eq!(kind(refused(1, 0)), "Ack");
        assert_eq!(
            kind(Outcome::Retry {
                after: Duration::from_secs(5)
            }),
            "Nak(Some(5s))"
        );
        assert_eq!(kind(Outcome::Abandoned), "Nak(None)");
        assert_eq!(kind(Outcome::Terminated), "Term");
        assert!(Outcome::Written.is_final() && Outcome::Terminated.is_final());
        assert!(!Outcome::Abandoned.is_final());
        assert!(!Outcome::Retry {
            after: Duration::ZERO
        }
        .is_final());
    }

    #[test]
    fn unpublished_dead_letters_retry_then_terminate() {
        let retry = Outcome::Retry {
            after: DEAD_LETTER_RETRY,
        };
        // Everything stored: the reported outcome stands.
        assert_eq!(resolve(Outcome::Written, 0, true), Outcome::Written);
        assert_eq!(resolve(refused(2, 0), 0, false), refused(2, 0));
        // A dead letter is missing: redeliver while attempts remain, then terminate.
        assert_eq!(resolve(Outcome::Written, 1, true), retry);
        assert_eq!(resolve(refused(2, 1), 1, true), retry);
        assert_eq!(
            resolve(refused(2, 1), 0, true),
            retry,
            "a refused row's dead letter missing"
        );
        assert_eq!(resolve(refused(2, 1), 0, false), Outcome::Terminated);
        assert_eq!(resolve(Outcome::Written, 1, false), Outcome::Terminated);
        // Shutdown and explicit retries are never turned into an ack.
        assert_eq!(resolve(Outcome::Abandoned, 1, true), Outcome::Abandoned);
        assert_eq!(resolve(Outcome::Abandoned, 0, false), Outcome::Abandoned);
    }

    #[test]
    fn dead_letters_are_retried_a_bounded_number_of_deliveries() {
        let mut delivery = Delivery::for_test(Rows::default(), Some(7));
        assert!(!delivery.may_redeliver(), "core mode has no redelivery");
        assert_eq!(
            delivery.dead_letter_id("db", 2).as_deref(),
            Some("tickvault-7-0-db-2")
        );
        delivery.delivered = DEAD_LETTER_DELIVERIES;
        assert!(!delivery.may_redeliver());
        assert_eq!(
            Delivery::for_test(Rows::default(), None).dead_letter_id("db", 0),
            None
        );
    }

    #[test]
    fn timings_follow_the_ack_wait() {
        let lifecycle = Lifecycle::new(
            RecordType::Tick,
            Arc::new(Metrics::new()),
            Duration::from_secs(30),
        );
        assert_eq!(lifecycle.write_timeout(), Duration::from_secs(15));
        lifecycle.set_ack_wait(Duration::from_secs(3));
        assert_eq!(lifecycle.ack_wait(), Duration::from_secs(3));
        assert_eq!(lifecycle.keep_alive_every(), Duration::from_millis(500));
        assert_eq!(lifecycle.write_timeout(), Duration::from_millis(1500));
        lifecycle.set_ack_wait(Duration::from_secs(3600));
        assert_eq!(lifecycle.write_timeout(), MAX_WRITE_TIMEOUT);
    }
}
