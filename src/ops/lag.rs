//! Lag: how far each type's ingest is behind its feed, kept current while
//! nothing is delivered (a stall is exactly when it matters).
//!
//! Two sources, the older wins:
//! - [`HeldMessages`]: the arrival time of every message this worker holds
//!   (received, not yet settled). Each [`Delivery`](crate::ingest::delivery::Delivery)
//!   carries a [`Held`] token from the moment it is received until it is
//!   dropped, so the oldest arrival is one ordered-map lookup.
//! - JetStream mode: every `ingest.lag_interval_ms`, the type's durable
//!   consumer state — `num_pending`, `num_ack_pending` — and, when something
//!   is pending or unacknowledged, the stream time of the oldest
//!   unacknowledged message: the first message of the type's subjects after
//!   the consumer's ack floor. That covers messages not yet delivered, held
//!   by this worker, held by another replica, or waiting for redelivery.
//!
//! Two requests per type per interval, off the delivery path (reading
//! consumer info for every delivery made nats-server 2.9 deliver 30 times
//! slower; see the README's Benchmarks for this timer's measured cost).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, context::ConsumerInfoErrorKind};
use tokio_util::sync::CancellationToken;

use crate::config::{IngestConfig, IngestMode};
use crate::ingest::source::{durable_name, type_subject};
use crate::ops::metrics::{LagReading, Metrics};
use crate::records::RecordType;

/// The arrival times of the messages one type holds, oldest first, to the
/// millisecond: a queue full of messages that arrived within a few
/// milliseconds is a few entries, not one per message.
#[derive(Debug, Default)]
pub struct HeldMessages {
    /// Arrival (milliseconds since [`origin`]) → how many held messages
    /// arrived in that millisecond.
    arrivals: Mutex<BTreeMap<u64, usize>>,
}

/// The instant arrivals are counted from.
fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

impl HeldMessages {
    /// Registers a message received now; it counts until the token is dropped.
    pub fn hold(self: &Arc<Self>) -> Held {
        let at_ms = origin().elapsed().as_millis() as u64;
        *self.lock().entry(at_ms).or_default() += 1;
        Held {
            messages: self.clone(),
            at_ms,
        }
    }

    /// When the oldest held message arrived (to the millisecond).
    pub fn oldest(&self) -> Option<Instant> {
        self.lock()
            .first_key_value()
            .map(|(at_ms, _)| origin() + Duration::from_millis(*at_ms))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, usize>> {
        self.arrivals.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One held message: registered in its type's [`HeldMessages`] until dropped.
#[derive(Debug)]
pub struct Held {
    messages: Arc<HeldMessages>,
    at_ms: u64,
}

impl Held {
    /// When it arrived (to the millisecond).
    #[cfg(test)]
    fn at(&self) -> Instant {
        origin() + Duration::from_millis(self.at_ms)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut arrivals = self.messages.lock();
        if let Some(count) = arrivals.get_mut(&self.at_ms) {
            *count -= 1;
            if *count == 0 {
                arrivals.remove(&self.at_ms);
            }
        }
    }
}

/// What one reading of a type's consumer found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ConsumerState {
    pending: u64,
    ack_pending: u64,
    /// Stream time of the oldest unacknowledged message (ns since the epoch).
    oldest_unacked_ns: Option<i128>,
}

/// Why a reading failed.
enum Unreadable {
    /// The stream or consumer does not exist (yet): nothing is waiting in it.
    Missing,
    /// NATS did not answer (timed out, refused): what was known stays,
    /// since nothing can be acknowledged meanwhile.
    Failed(String),
    /// The client is not connected: not asked, for the same reason.
    Disconnected,
}

fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

/// The lag: the age of the oldest held arrival or of the oldest
/// unacknowledged message, whichever is older; zero when there is neither.
fn lag(held_since: Option<Instant>, oldest_unacked_ns: Option<i128>, now_ns: i128) -> Duration {
    let held = held_since.map_or(Duration::ZERO, |at| at.elapsed());
    let unacked = oldest_unacked_ns.map_or(Duration::ZERO, |at| {
        Duration::from_nanos((now_ns - at).clamp(0, u64::MAX as i128) as u64)
    });
    held.max(unacked)
}

async fn read_consumer(
    js: &jetstream::Context,
    config: &IngestConfig,
    record_type: RecordType,
) -> Result<ConsumerState, Unreadable> {
    let stream = js
        .get_stream_no_info(&config.stream)
        .await
        .map_err(|e| Unreadable::Failed(e.to_string()))?;
    let info = stream
        .consumer_info(durable_name(record_type))
        .await
        .map_err(|e| match e.kind() {
            ConsumerInfoErrorKind::NotFound | ConsumerInfoErrorKind::StreamNotFound => {
                Unreadable::Missing
            }
            _ => Unreadable::Failed(e.to_string()),
        })?;
    let pending = info.num_pending;
    let ack_pending = info.num_ack_pending as u64;
    let oldest_unacked_ns = if pending + ack_pending == 0 {
        None
    } else {
        // Everything at or below the ack floor is acknowledged, so the first
        // message of the type's subjects after it is the oldest that is not.
        let filter = if info.config.filter_subject.is_empty() {
            type_subject(&config.subject_prefix, record_type)
        } else {
            info.config.filter_subject.clone()
        };
        let first = stream
            .get_first_raw_message_by_subject(&filter, info.ack_floor.stream_sequence + 1)
            .await;
        match first {
            Ok(message) => Some(message.time.unix_timestamp_nanos()),
            Err(e)
                if e.kind()
                    == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound =>
            {
                None
            }
            Err(e) => return Err(Unreadable::Failed(e.to_string())),
        }
    };
    Ok(ConsumerState {
        pending,
        ack_pending,
        oldest_unacked_ns,
    })
}

/// Reads every type's lag every `ingest.lag_interval_ms` until `shutdown`.
pub async fn watch(
    client: async_nats::Client,
    config: IngestConfig,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let js = (config.mode == IngestMode::Jetstream).then(|| jetstream::new(client.clone()));
    // Per type: the oldest unacknowledged message as last read.
    let mut oldest_unacked: [Option<i128>; RecordType::ALL.len()] = [None; RecordType::ALL.len()];
    let mut ticks = tokio::time::interval(config.lag_interval());
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        // Without a connection the requests could only time out: the
        // pending gauges keep their last value and the lag keeps counting.
        let disconnected = client.connection_state() != async_nats::connection::State::Connected;
        let reads = futures::future::join_all(RecordType::ALL.map(|record_type| {
            let js = js.as_ref();
            let config = &config;
            async move {
                match js {
                    Some(_) if disconnected => Some(Err(Unreadable::Disconnected)),
                    Some(js) => Some(read_consumer(js, config, record_type).await),
                    None => None,
                }
            }
        }));
        let readings = tokio::select! {
            _ = shutdown.cancelled() => return,
            readings = reads => readings,
        };
        let now = now_ns();
        for ((i, record_type), reading) in RecordType::ALL.into_iter().enumerate().zip(readings) {
            let counts = match reading {
                // Core mode: nothing waits in JetStream.
                None => Some((0, 0)),
                Some(Ok(state)) => {
                    oldest_unacked[i] = state.oldest_unacked_ns;
                    Some((state.pending, state.ack_pending))
                }
                Some(Err(Unreadable::Missing)) => {
                    oldest_unacked[i] = None;
                    Some((0, 0))
                }
                Some(Err(Unreadable::Failed(error))) => {
                    metrics.lag_unreadable(record_type, &error);
                    None
                }
                // The disconnection itself is logged where it happens.
                Some(Err(Unreadable::Disconnected)) => None,
            };
            let held_since = metrics.held(record_type).oldest();
            metrics.lag_read(
                record_type,
                LagReading {
                    pending: counts.map(|c| c.0),
                    ack_pending: counts.map(|c| c.1),
                    lag: lag(held_since, oldest_unacked[i], now),
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_messages_know_their_oldest_arrival() {
        let held = Arc::new(HeldMessages::default());
        assert_eq!(held.oldest(), None);
        let first = held.hold();
        let second = held.hold();
        std::thread::sleep(Duration::from_millis(2));
        let third = held.hold();
        assert_eq!(held.oldest(), Some(first.at()));
        drop(second);
        assert_eq!(held.oldest(), Some(first.at()), "a newer one settled first");
        drop(first);
        assert_eq!(held.oldest(), Some(third.at()));
        drop(third);
        assert_eq!(held.oldest(), None);
    }

    #[test]
    fn two_messages_arriving_in_the_same_millisecond_are_both_counted() {
        let held = Arc::new(HeldMessages::default());
        let one = held.hold();
        let same = Held {
            messages: held.clone(),
            at_ms: one.at_ms,
        };
        *held.lock().get_mut(&one.at_ms).unwrap() += 1;
        drop(one);
        assert_eq!(held.oldest(), Some(same.at()));
        drop(same);
        assert_eq!(held.oldest(), None);
    }

    #[test]
    fn the_lag_is_the_older_of_held_and_unacknowledged() {
        let now = now_ns();
        assert_eq!(lag(None, None, now), Duration::ZERO);
        let ten_s_ago = now - 10_000_000_000;
        assert_eq!(lag(None, Some(ten_s_ago), now), Duration::from_secs(10));
        let held = Instant::now() - Duration::from_secs(30);
        assert!(lag(Some(held), Some(ten_s_ago), now) >= Duration::from_secs(30));
        assert!(lag(Some(Instant::now()), Some(ten_s_ago), now) >= Duration::from_secs(10));
        assert_eq!(
            lag(None, Some(now + 1_000_000_000), now),
            Duration::ZERO,
            "a server clock ahead of ours is no lag"
        );
    }
}
