//! Sources: where messages come from. In JetStream mode a durable pull
//! consumer per type (`tickvault-<type>`), reconciled with the
//! configuration; in core mode a queue-group subscription per type. Both
//! decode each message, dead-letter what is bad and queue the rest.
//!
//! JetStream pulls are bounded by messages (`ingest.fetch_batch`) and bytes
//! ([`pull_bytes`]); the next pull is only asked for once every message of
//! the last one is queued, so what a type holds is its queue plus at most one
//! pull, and every message the worker holds is kept alive.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{self, pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::context::{CreateStreamErrorKind, GetStreamErrorKind};
use async_nats::jetstream::stream::{Config as StreamConfig, StorageType};
use async_nats::jetstream::{self, ErrorCode};
use futures::StreamExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::IngestConfig;
use crate::ingest::batcher::QueueSender;
use crate::ingest::dead_letter::{DeadLetters, Origin};
use crate::ingest::decode::{decode, Limits};
use crate::ingest::delivery::{Acker, Delivery, JetStreamOrigin, Lifecycle, Outcome};
use crate::ingest::IngestError;
use crate::ops::health::Status;
use crate::ops::metrics::IntakeMetrics;
use crate::records::RecordType;
use crate::retry::Backoff;

/// The queue group of core-mode subscriptions.
pub const CORE_QUEUE_GROUP: &str = "tickvault";
/// How long one pull request waits for messages on the server. Short, so
/// that at shutdown the last pull ends soon and everything it still brings
/// is handed back.
const PULL_EXPIRES: Duration = Duration::from_secs(2);
/// How long past its expiry (and past its last message) a pull may go
/// without the server's word that it ended before it is treated as ended.
/// The end is a status message; when it goes missing (seen with a loaded
/// nats-server), async-nats alone waits 5 s more, and nothing is pulled
/// meanwhile. Ending too early costs only a redelivery after the ack wait.
const PULL_END_GRACE: Duration = Duration::from_secs(1);
/// Room for a delivered message's subject and headers beyond its payload.
const PULL_OVERHEAD_BYTES: usize = 64 * 1024;
/// How long to wait after a pull that was refused without a message.
const REFUSED_PULL_PAUSE: Duration = Duration::from_millis(250);
/// How long a lost consumer waits before it is re-created.
const LOST_CONSUMER_PAUSE: Duration = Duration::from_secs(1);
/// How long shutdown reads a core subscription's buffered messages.
const CORE_DRAIN_BOUND: Duration = Duration::from_secs(5);

/// The feed subjects a type is read from: `<prefix>.<type>.>`.
pub fn type_subject(prefix: &str, record_type: RecordType) -> String {
    format!("{prefix}.{}.>", record_type.name())
}

pub fn durable_name(record_type: RecordType) -> String {
    format!("tickvault-{}", record_type.name())
}

/// The most bytes one pull asks for: two of the largest messages the server
/// (or `ingest.max_message_bytes`) allows, so the largest message always
/// fits and a pull never holds more than that.
pub fn pull_bytes(server_max_payload: usize, max_message_bytes: usize) -> usize {
    2 * server_max_payload.max(max_message_bytes) + PULL_OVERHEAD_BYTES
}

/// Makes sure the feed stream and the dead-letter stream exist, creating
/// them when they are missing (at start-up, or deleted at runtime). An
/// existing stream is used as it is when its subjects cover ours; otherwise
/// this fails.
pub async fn ensure_streams(
    js: &jetstream::Context,
    config: &IngestConfig,
) -> Result<(), IngestError> {
    let feed: Vec<String> = RecordType::ALL
        .iter()
        .map(|t| type_subject(&config.subject_prefix, *t))
        .collect();
    let feed_subjects = ensure_stream(js, config, config.stream.clone(), feed).await?;
    let dead_letters = format!("{}.dlq.>", config.subject_prefix);
    if feed_subjects
        .iter()
        .any(|s| subject_covers(s, &dead_letters))
    {
        // The feed stream (e.g. on `md.>`) keeps the dead letters already; a
        // second stream on the same subjects would be refused by the server.
        tracing::debug!(stream = %config.stream, "the feed stream keeps the dead letters too");
        return Ok(());
    }
    ensure_stream(
        js,
        config,
        format!("{}_DLQ", config.stream),
        vec![dead_letters],
    )
    .await?;
    Ok(())
}

/// Creates the stream if it does not exist; returns the subjects it has.
async fn ensure_stream(
    js: &jetstream::Context,
    config: &IngestConfig,
    name: String,
    subjects: Vec<String>,
) -> Result<Vec<String>, IngestError> {
    let unavailable = |message: String| IngestError::Stream {
        stream: name.clone(),
        message,
    };
    let existing = match js.get_stream(&name).await {
        Ok(stream) => stream.cached_info().config.subjects.clone(),
        Err(e) if matches!(e.kind(), GetStreamErrorKind::JetStream(j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND) =>
        {
            let created = js
                .create_stream(StreamConfig {
                    name: name.clone(),
                    subjects: subjects.clone(),
                    storage: StorageType::File,
                    max_age: Duration::from_secs(config.stream_max_age_secs),
                    max_bytes: config.stream_max_bytes,
                    num_replicas: config.stream_replicas,
                    ..Default::default()
                })
                .await;
            match created {
                Ok(stream) => {
                    tracing::info!(stream = %name, subjects = %subjects.join(", "), "created JetStream stream");
                    stream.cached_info().config.subjects.clone()
                }
                // The server answered and refused (e.g. the subjects overlap another
                // stream): retrying cannot help, the operator must change something.
                Err(e)
                    if matches!(
                        e.kind(),
                        CreateStreamErrorKind::JetStream(_)
                            | CreateStreamErrorKind::InvalidStreamName
                    ) =>
                {
                    return Err(IngestError::StreamRefused {
                        stream: name,
                        subjects: subjects.join(", "),
                        message: e.to_string(),
                    })
                }
                Err(e) => return Err(unavailable(e.to_string())),
            }
        }
        Err(e) => return Err(unavailable(e.to_string())),
    };
    if let Some(missing) = subjects
        .iter()
        .find(|s| !existing.iter().any(|e| subject_covers(e, s)))
    {
        return Err(IngestError::StreamMismatch {
            stream: name,
            missing: missing.clone(),
            existing: existing.join(", "),
        });
    }
    Ok(existing)
}

/// Warns about each of the streams (feed, dead letters) whose replica count
/// is not `ingest.stream_replicas`: an existing stream is used as it is, so
/// the operator should know. Called once, after [`ensure_streams`].
pub async fn warn_on_other_replicas(js: &jetstream::Context, config: &IngestConfig) {
    for name in [config.stream.clone(), format!("{}_DLQ", config.stream)] {
        // No dead-letter stream when the feed stream keeps the dead letters.
        let Ok(stream) = js.get_stream(&name).await else {
            continue;
        };
        let replicas = stream.cached_info().config.num_replicas.max(1);
        if replicas != config.stream_replicas {
            tracing::warn!(stream = %name, replicas, setting = config.stream_replicas,
                "the stream exists with another replica count than ingest.stream_replicas and is used as it is; change it with `nats stream edit {name} --replicas {}` if that is wanted",
                config.stream_replicas);
        }
    }
}

/// Whether the subject pattern `pattern` matches every subject `subject` does.
fn subject_covers(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(t)) if t != ">" => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The durable consumer tickvault wants for a type.
pub fn consumer_config(config: &IngestConfig, record_type: RecordType) -> pull::Config {
    pull::Config {
        durable_name: Some(durable_name(record_type)),
        filter_subject: type_subject(&config.subject_prefix, record_type),
        ack_policy: AckPolicy::Explicit,
        deliver_policy: DeliverPolicy::All,
        ack_wait: config.ack_wait(),
        // Room for a full queue plus one pull in flight.
        max_ack_pending: (config.queue_capacity + config.fetch_batch) as i64,
        ..Default::default()
    }
}

/// One consumer setting tickvault sets that differs on the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerChange {
    pub field: &'static str,
    /// The configuration key that decides it.
    pub setting: &'static str,
    pub from: String,
    pub to: String,
}

impl std::fmt::Display for ConsumerChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} -> {} ({})",
            self.field, self.from, self.to, self.setting
        )
    }
}

/// What differs between the consumer on the server and the one wanted.
pub fn consumer_changes(existing: &consumer::Config, wanted: &pull::Config) -> Vec<ConsumerChange> {
    let mut changes = Vec::new();
    let mut compare = |field, setting, from: String, to: String| {
        if from != to {
            changes.push(ConsumerChange {
                field,
                setting,
                from,
                to,
            });
        }
    };
    compare(
        "ack_wait",
        "ingest.ack_wait_secs",
        format!("{:?}", existing.ack_wait),
        format!("{:?}", wanted.ack_wait),
    );
    compare(
        "max_ack_pending",
        "ingest.queue_capacity + ingest.fetch_batch",
        existing.max_ack_pending.to_string(),
        wanted.max_ack_pending.to_string(),
    );
    compare(
        "filter_subject",
        "ingest.subject_prefix",
        existing.filter_subject.clone(),
        wanted.filter_subject.clone(),
    );
    compare(
        "ack_policy",
        "fixed by tickvault",
        format!("{:?}", existing.ack_policy),
        format!("{:?}", wanted.ack_policy),
    );
    compare(
        "deliver_policy",
        "fixed by tickvault",
        format!("{:?}", existing.deliver_policy),
        format!("{:?}", wanted.deliver_policy),
    );
    changes
}

/// Takes one type's messages and hands their rows to its queue.
pub struct Source {
    pub record_type: RecordType,
    pub config: Arc<IngestConfig>,
    pub client: async_nats::Client,
    /// The same client, shared by every held message's [`Acker`].
    pub acks: Arc<async_nats::Client>,
    pub queue: QueueSender,
    pub dead_letters: DeadLetters,
    pub lifecycle: Lifecycle,
    /// This type's per-message series.
    pub intake: IntakeMetrics,
    pub status: Arc<Status>,
}

impl Source {
    fn limits(&self) -> Limits {
        Limits {
            max_message_bytes: self.config.max_message_bytes,
            max_records_per_message: self.config.max_records_per_message,
        }
    }

    /// Decodes a received message and dead-letters what is bad. Returns the
    /// delivery when it has rows to write; otherwise it is settled here.
    async fn prepare(&self, mut delivery: Delivery) -> Option<Delivery> {
        let decoded = decode(self.record_type.spec(), &delivery.payload, self.limits());
        if !decoded.rejected.is_empty() {
            let unstored = self
                .dead_letters
                .send_all(
                    self.record_type,
                    &delivery,
                    Origin::Input,
                    &decoded.rejected,
                )
                .await;
            delivery.note_rejects(decoded.rejected.into_iter().map(|r| r.reject), unstored);
        }
        delivery.rows = decoded.rows;
        if delivery.rows.is_empty() {
            let outcome = Outcome::DeadLettered {
                rejects: Vec::new(),
                unstored: 0,
            };
            self.lifecycle.settle(delivery, outcome).await;
            return None;
        }
        Some(delivery)
    }

    /// Core mode: a queue-group subscription, at-most-once. A message that
    /// finds the queue full is dropped and counted; at shutdown the
    /// subscription is drained, so what the client already buffered is
    /// taken rather than thrown away.
    pub async fn run_core(self, shutdown: CancellationToken) -> Result<(), IngestError> {
        let subject = type_subject(&self.config.subject_prefix, self.record_type);
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let mut subscription = loop {
            match self
                .client
                .queue_subscribe(subject.clone(), CORE_QUEUE_GROUP.to_string())
                .await
            {
                Ok(subscription) => break subscription,
                Err(e) => {
                    tracing::warn!(subject, error = %e, "could not subscribe; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
            }
        };
        tracing::info!(
            subject,
            queue_group = CORE_QUEUE_GROUP,
            "subscribed (core mode)"
        );
        self.status.set_intake_ready(self.record_type, true);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                message = subscription.next() => match message {
                    Some(message) => self.take_core(message).await,
                    None => break,
                },
            }
        }
        self.status.set_intake_ready(self.record_type, false);
        if subscription.drain().await.is_ok() {
            let drained = async {
                while let Some(message) = subscription.next().await {
                    self.take_core(message).await;
                }
            };
            if tokio::time::timeout(CORE_DRAIN_BOUND, drained)
                .await
                .is_err()
            {
                tracing::warn!(subject, "the subscription did not drain in time");
            }
        }
        Ok(())
    }

    async fn take_core(&self, message: async_nats::Message) {
        let held = self.intake.message_received();
        let delivery = Delivery::core(message.subject, message.payload, held);
        let Some(delivery) = self.prepare(delivery).await else {
            return;
        };
        match self.queue.try_reserve(&delivery) {
            Some(room) => {
                let _ = self.queue.push(delivery, room);
            }
            None => self.lifecycle.settle(delivery, Outcome::Dropped).await,
        }
    }

    /// JetStream mode: the durable pull consumer, re-established with
    /// backoff whenever it is lost (NATS restart, consumer or stream
    /// deleted). Fails only when JetStream refuses the configuration.
    pub async fn run_jetstream(
        self,
        js: jetstream::Context,
        shutdown: CancellationToken,
    ) -> Result<(), IngestError> {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        while !shutdown.is_cancelled() {
            match self.consumer(&js).await {
                Ok(consumer) => {
                    backoff.reset();
                    self.consume(consumer, &shutdown).await;
                    self.status.set_intake_ready(self.record_type, false);
                    // Lost (or shutting down): pause before re-creating it. A
                    // stream deleted at runtime is removed from disk after the
                    // server answers, and nats-server 2.9 can remove the files
                    // of a stream created again too soon under the same name.
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep(LOST_CONSUMER_PAUSE) => {}
                    }
                }
                Err(e) if e.is_fatal() => return Err(e),
                Err(e) => {
                    tracing::warn!(r#type = self.record_type.name(), error = %e, "JetStream consumer unavailable; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
            }
        }
        Ok(())
    }

    /// The type's durable consumer, created or reconciled with the
    /// configuration: a setting that changed is updated on the server (and
    /// logged once); a change JetStream refuses stops the worker.
    async fn consumer(&self, js: &jetstream::Context) -> Result<PullConsumer, IngestError> {
        let config = &self.config;
        ensure_streams(js, config).await?;
        let stream = js
            .get_stream(&config.stream)
            .await
            .map_err(|e| IngestError::Stream {
                stream: config.stream.clone(),
                message: e.to_string(),
            })?;
        let name = durable_name(self.record_type);
        let wanted = consumer_config(config, self.record_type);
        let unavailable = |e: &dyn std::fmt::Display| IngestError::Consumer {
            consumer: name.clone(),
            message: e.to_string(),
        };
        use async_nats::jetstream::context::ConsumerInfoErrorKind as InfoKind;
        let consumer: PullConsumer = match stream.consumer_info(&name).await {
            Ok(info) => {
                let changes = consumer_changes(&info.config, &wanted);
                if changes.is_empty() {
                    stream
                        .get_consumer(&name)
                        .await
                        .map_err(|e| unavailable(&e))?
                } else {
                    let consumer = stream.create_consumer(wanted).await.map_err(|e| {
                        match e.kind() {
                            consumer_kind @ async_nats::jetstream::stream::ConsumerErrorKind::JetStream(_) => {
                                IngestError::ConsumerRefused {
                                    consumer: name.clone(),
                                    changes: changes.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", "),
                                    message: consumer_kind.to_string(),
                                }
                            }
                            _ => unavailable(&e),
                        }
                    })?;
                    for change in &changes {
                        tracing::info!(consumer = %name, field = change.field, from = %change.from, to = %change.to, setting = change.setting, "updated the JetStream consumer to the configuration");
                    }
                    consumer
                }
            }
            Err(e) if e.kind() == InfoKind::NotFound => {
                let consumer = stream
                    .create_consumer(wanted)
                    .await
                    .map_err(|e| unavailable(&e))?;
                tracing::info!(consumer = %name, "created the JetStream consumer");
                consumer
            }
            Err(e) => return Err(unavailable(&e)),
        };
        self.lifecycle
            .set_ack_wait(consumer.cached_info().config.ack_wait);
        Ok(consumer)
    }

    /// Pulls until shutdown or until the consumer is lost.
    async fn consume(&self, mut consumer: PullConsumer, shutdown: &CancellationToken) {
        let name = self.record_type.name();
        tracing::info!(r#type = name, consumer = %durable_name(self.record_type), "consuming");
        self.status.set_intake_ready(self.record_type, true);
        // Pulled messages waiting for queue room, oldest first.
        let mut held: VecDeque<Delivery> = VecDeque::new();
        let mut next_keep_alive = Instant::now() + self.lifecycle.keep_alive_every();
        loop {
            let batch = consumer
                .batch()
                .max_messages(self.config.fetch_batch)
                .max_bytes(pull_bytes(
                    self.client.max_payload(),
                    self.config.max_message_bytes,
                ))
                .expires(PULL_EXPIRES)
                .messages()
                .await;
            let mut batch = match batch {
                Ok(batch) => batch,
                Err(e) => {
                    tracing::warn!(r#type = name, error = %e, "could not pull messages; re-creating the consumer");
                    self.hand_back(held, None).await;
                    return;
                }
            };
            let mut pull_ends_by = Instant::now() + PULL_EXPIRES + PULL_END_GRACE;
            let mut open = true;
            let mut received = 0usize;
            let mut interrupted = None;
            while open || !held.is_empty() {
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => {
                        self.hand_back(held, open.then_some(batch)).await;
                        return;
                    }
                    _ = tokio::time::sleep_until(next_keep_alive) => {
                        self.lifecycle.keep_alive(&held).await;
                        next_keep_alive = Instant::now() + self.lifecycle.keep_alive_every();
                    }
                    room = async {
                        match held.front() {
                            Some(front) => self.queue.reserve(front).await,
                            None => std::future::pending().await,
                        }
                    } => match room {
                        Ok(room) => {
                            let delivery = held.pop_front().expect("a front was reserved for");
                            let _ = self.queue.push(delivery, room);
                            self.queue_held(&mut held);
                        }
                        Err(_) => {
                            self.hand_back(held, open.then_some(batch)).await;
                            return;
                        }
                    },
                    message = batch.next(), if open => match message {
                        Some(Ok(message)) => {
                            received += 1;
                            // The server delivers nothing past the expiry:
                            // a message is a sign of a slow worker, not a lost end.
                            pull_ends_by = pull_ends_by.max(Instant::now() + PULL_END_GRACE);
                            if let Some(delivery) = self.receive(message).await {
                                held.push_back(delivery);
                                self.queue_held(&mut held);
                            }
                        }
                        Some(Err(e)) => {
                            open = false;
                            interrupted = Some(e);
                        }
                        None => open = false,
                    },
                    // Last: only when nothing the pull brought is waiting.
                    _ = tokio::time::sleep_until(pull_ends_by), if open => {
                        tracing::debug!(r#type = name, "the server did not end an expired pull; pulling again");
                        open = false;
                    }
                }
            }
            if let Some(e) = &interrupted {
                // Normal when a pull reaches its byte bound; anything else
                // shows in the consumer check below when nothing came.
                tracing::debug!(r#type = name, error = %e, "pull ended early");
            }
            if received == 0 {
                // An idle or failed pull: make sure the consumer is still there.
                match consumer.info().await {
                    Ok(info) => {
                        self.lifecycle.set_ack_wait(info.config.ack_wait);
                    }
                    Err(e) => {
                        tracing::warn!(r#type = name, error = %e, "consumer lost; re-creating it");
                        return;
                    }
                }
                if interrupted.is_some() {
                    // A pull refused at once: do not ask again in a tight loop.
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep(REFUSED_PULL_PAUSE) => {}
                    }
                }
            }
        }
    }

    /// Queues held deliveries, oldest first, while there is room.
    fn queue_held(&self, held: &mut VecDeque<Delivery>) {
        while let Some(front) = held.front() {
            let Some(room) = self.queue.try_reserve(front) else {
                return;
            };
            let delivery = held.pop_front().expect("front exists");
            let _ = self.queue.push(delivery, room);
        }
    }

    /// One pulled message: its metadata read, decoded, dead-lettered.
    async fn receive(&self, message: jetstream::Message) -> Option<Delivery> {
        let held = self.intake.message_received();
        // The delivery's reply subject carries its stream sequence. (The
        // consumer's pending counts are read on a timer, ops/lag.rs.)
        let origin = message.info().ok().map(|info| JetStreamOrigin {
            stream_seq: info.stream_sequence,
            delivered: info.delivered,
            // Nanoseconds since the epoch fit an i64 until 2262.
            published_ns: info.published.unix_timestamp_nanos() as i64,
        });
        // The per-message copy of the JetStream context goes at once.
        let message = message.message;
        let acker = message
            .reply
            .clone()
            .map(|reply| Acker::new(reply, self.acks.clone()));
        let (origin, acker) = match (origin, acker) {
            (Some(origin), Some(acker)) => (origin, acker),
            (_, acker) => {
                self.lifecycle
                    .refuse_unreadable(message.subject.as_str(), acker)
                    .await;
                return None;
            }
        };
        let delivery = Delivery::jetstream(message.subject, message.payload, origin, acker, held);
        self.prepare(delivery).await
    }

    /// Shutdown or a lost consumer: every held message, and whatever the
    /// last pull still delivers until it ends, goes back to JetStream at
    /// once for another worker.
    async fn hand_back(&self, held: VecDeque<Delivery>, batch: Option<pull::Batch>) {
        let mut handed = held.len();
        for delivery in held {
            self.lifecycle.settle(delivery, Outcome::Abandoned).await;
        }
        if let Some(mut batch) = batch {
            let deadline = Instant::now() + PULL_EXPIRES + Duration::from_secs(1);
            while let Ok(Some(Ok(message))) = tokio::time::timeout_at(deadline, batch.next()).await
            {
                if let Some(reply) = message.message.reply {
                    let acker = Acker::new(reply, self.acks.clone());
                    self.lifecycle.hand_back_unread(acker).await;
                }
                handed += 1;
            }
        }
        if handed > 0 {
            tracing::info!(
                r#type = self.record_type.name(),
                messages = handed,
                "handed pulled messages back to JetStream for another worker"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_coverage() {
        assert!(subject_covers("md.tick.>", "md.tick.>"));
        assert!(subject_covers("md.>", "md.tick.>"));
        assert!(subject_covers(">", "md.tick.>"));
        assert!(subject_covers("md.*.>", "md.tick.>"));
        assert!(!subject_covers("md.tick.*", "md.tick.>"));
        assert!(!subject_covers("md.candle.>", "md.tick.>"));
        assert!(!subject_covers("md.tick.FPT", "md.tick.>"));
    }

    #[test]
    fn consumer_changes_name_their_setting() {
        let config = IngestConfig::default();
        let wanted = consumer_config(&config, RecordType::Tick);
        let same = consumer::IntoConsumerConfig::into_consumer_config(&wanted);
        assert!(consumer_changes(&same, &wanted).is_empty());

        let mut changed = IngestConfig {
            ack_wait_secs: 3,
            queue_capacity: 2000,
            ..IngestConfig::default()
        };
        changed.subject_prefix = "feed".into();
        let changes = consumer_changes(&same, &consumer_config(&changed, RecordType::Tick));
        let settings: Vec<&str> = changes.iter().map(|c| c.setting).collect();
        assert_eq!(
            settings,
            [
                "ingest.ack_wait_secs",
                "ingest.queue_capacity + ingest.fetch_batch",
                "ingest.subject_prefix"
            ]
        );
        assert_eq!(
            changes[0].to_string(),
            "ack_wait 30s -> 3s (ingest.ack_wait_secs)"
        );
    }

    #[test]
    fn a_pull_always_fits_the_largest_message() {
        assert_eq!(
            pull_bytes(1 << 20, 1 << 20),
            (2 << 20) + PULL_OVERHEAD_BYTES
        );
        assert_eq!(
            pull_bytes(8 << 20, 1 << 20),
            (16 << 20) + PULL_OVERHEAD_BYTES
        );
    }
}
