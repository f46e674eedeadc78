//! Sources: where messages come from. In JetStream mode a durable pull
//! consumer per type (`tickvault-<type>`); in core mode a queue-group
//! subscription per type. Both decode each message, dead-letter what is bad
//! and push the rows to the type's queue, waiting while it is full.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::message::Acker;
use async_nats::jetstream::stream::{Config as StreamConfig, StorageType};
use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::config::IngestConfig;
use crate::ingest::batcher::QueueSender;
use crate::ingest::dead_letter::DeadLetters;
use crate::ingest::decode::{decode, Limits};
use crate::ingest::IngestError;
use crate::ops::health::Status;
use crate::ops::metrics::IntakeMetrics;
use crate::records::RecordType;
use crate::retry::Backoff;

/// The queue group of core-mode subscriptions.
pub const CORE_QUEUE_GROUP: &str = "tickvault";
/// How long a message whose dead letter could not be stored waits before redelivery.
const DEAD_LETTER_RETRY: Duration = Duration::from_secs(5);

/// The feed subjects a type is read from: `<prefix>.<type>.>`.
pub fn type_subject(prefix: &str, record_type: RecordType) -> String {
    format!("{prefix}.{}.>", record_type.name())
}

pub fn durable_name(record_type: RecordType) -> String {
    format!("tickvault-{}", record_type.name())
}

/// Makes sure the feed stream and the dead-letter stream exist. An existing
/// stream is used as it is when its subjects cover ours; otherwise this fails.
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
        tracing::info!(stream = %config.stream, "the feed stream keeps the dead letters too");
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
    use async_nats::jetstream::context::CreateStreamErrorKind as Kind;
    let created = js
        .get_or_create_stream(StreamConfig {
            name: name.clone(),
            subjects: subjects.clone(),
            storage: StorageType::File,
            max_age: Duration::from_secs(config.stream_max_age_secs),
            max_bytes: config.stream_max_bytes,
            num_replicas: config.stream_replicas,
            ..Default::default()
        })
        .await;
    let stream = match created {
        Ok(stream) => stream,
        // The server answered and refused (e.g. the subjects overlap another
        // stream): retrying cannot help, the operator must change something.
        Err(e) if matches!(e.kind(), Kind::JetStream(_) | Kind::InvalidStreamName) => {
            return Err(IngestError::StreamRefused {
                stream: name,
                subjects: subjects.join(", "),
                message: e.to_string(),
            })
        }
        Err(e) => {
            return Err(IngestError::Stream {
                stream: name,
                message: e.to_string(),
            })
        }
    };
    let existing = stream.cached_info().config.subjects.clone();
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

/// Takes one type's messages and hands their rows to its queue.
pub struct Source {
    pub record_type: RecordType,
    pub config: Arc<IngestConfig>,
    pub queue: QueueSender,
    pub dead_letters: DeadLetters,
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

    /// Decodes one message, dead-letters what is bad, queues the rest.
    /// Returns false when shutdown came while waiting for queue room.
    async fn handle(
        &self,
        subject: &str,
        payload: &Bytes,
        stream_seq: Option<u64>,
        ack: Option<Acker>,
        shutdown: &CancellationToken,
    ) -> bool {
        self.intake.message_received();
        let decoded = decode(self.record_type.spec(), payload, self.limits());
        let dead_lettered = self
            .dead_letters
            .send_all(self.record_type, subject, &decoded.rejected)
            .await;
        if !dead_lettered {
            if let Some(ack) = &ack {
                // The rejections are not stored yet: have the message delivered again.
                let _ = ack.ack_with(AckKind::Nak(Some(DEAD_LETTER_RETRY))).await;
                return true;
            }
            // Core mode has no redelivery: the valid rows are still written.
        }
        if decoded.rows.is_empty() {
            if let Some(ack) = &ack {
                let _ = ack.ack().await;
            }
            return true;
        }
        tokio::select! {
            // Not acknowledged: JetStream delivers it again after restart.
            _ = shutdown.cancelled() => false,
            pushed = self.queue.push(subject.to_string(), decoded.rows, stream_seq, ack) => pushed.is_ok(),
        }
    }

    /// Core mode: a queue-group subscription, at-most-once.
    pub async fn run_core(self, client: async_nats::Client, shutdown: CancellationToken) {
        let subject = type_subject(&self.config.subject_prefix, self.record_type);
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let mut subscription = loop {
            match client
                .queue_subscribe(subject.clone(), CORE_QUEUE_GROUP.to_string())
                .await
            {
                Ok(subscription) => break subscription,
                Err(e) => {
                    tracing::warn!(subject, error = %e, "could not subscribe; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
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
            let message = tokio::select! {
                _ = shutdown.cancelled() => break,
                message = subscription.next() => match message {
                    Some(message) => message,
                    None => break,
                },
            };
            if !self
                .handle(
                    message.subject.as_str(),
                    &message.payload,
                    None,
                    None,
                    &shutdown,
                )
                .await
            {
                break;
            }
        }
        let _ = subscription.unsubscribe().await;
        self.status.set_intake_ready(self.record_type, false);
    }

    /// JetStream mode: the durable pull consumer, re-established with
    /// backoff whenever it is lost (NATS restart, consumer deleted).
    pub async fn run_jetstream(self, js: jetstream::Context, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        while !shutdown.is_cancelled() {
            match self.consumer(&js).await {
                Ok(consumer) => {
                    backoff.reset();
                    self.consume(consumer, &shutdown).await;
                    self.status.set_intake_ready(self.record_type, false);
                }
                Err(e) => {
                    tracing::warn!(r#type = self.record_type.name(), error = %e, "JetStream consumer unavailable; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
            }
        }
    }

    async fn consumer(&self, js: &jetstream::Context) -> Result<PullConsumer, IngestError> {
        let config = &self.config;
        let stream = js
            .get_stream(&config.stream)
            .await
            .map_err(|e| IngestError::Stream {
                stream: config.stream.clone(),
                message: e.to_string(),
            })?;
        let name = durable_name(self.record_type);
        stream
            .get_or_create_consumer(
                &name,
                pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subject: type_subject(&config.subject_prefix, self.record_type),
                    ack_policy: AckPolicy::Explicit,
                    deliver_policy: DeliverPolicy::All,
                    ack_wait: config.ack_wait(),
                    // Room for a full queue plus one pull in flight.
                    max_ack_pending: (config.queue_capacity + config.fetch_batch) as i64,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| IngestError::Consumer {
                consumer: name,
                message: e.to_string(),
            })
    }

    async fn consume(&self, consumer: PullConsumer, shutdown: &CancellationToken) {
        let name = self.record_type.name();
        let messages = consumer
            .stream()
            .max_messages_per_batch(self.config.fetch_batch)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await;
        let mut messages = match messages {
            Ok(messages) => messages,
            Err(e) => {
                tracing::warn!(r#type = name, error = %e, "could not start pulling messages");
                return;
            }
        };
        tracing::info!(r#type = name, consumer = %durable_name(self.record_type), "consuming");
        self.status.set_intake_ready(self.record_type, true);
        loop {
            let message = tokio::select! {
                _ = shutdown.cancelled() => return,
                message = messages.next() => message,
            };
            let message = match message {
                Some(Ok(message)) => message,
                Some(Err(e)) => {
                    use async_nats::jetstream::consumer::pull::MessagesErrorKind as Kind;
                    match e.kind() {
                        Kind::MissingHeartbeat | Kind::Pull | Kind::NoResponders | Kind::Other => {
                            tracing::debug!(r#type = name, error = %e, "pull interrupted; continuing");
                            continue;
                        }
                        _ => {
                            tracing::warn!(r#type = name, error = %e, "consumer lost; re-creating it");
                            return;
                        }
                    }
                }
                None => return,
            };
            // The delivery's reply subject carries its stream sequence and how many
            // messages the consumer still has to deliver. (Asking the server with
            // consumer info instead slowed nats-server 2.9's deliveries 30-fold.)
            let stream_seq = match message.info() {
                Ok(info) => {
                    self.intake.consumer_pending(info.pending);
                    Some(info.stream_sequence)
                }
                Err(_) => None,
            };
            let (message, ack) = message.split();
            if !self
                .handle(
                    message.subject.as_str(),
                    &message.payload,
                    stream_seq,
                    Some(ack),
                    shutdown,
                )
                .await
            {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::subject_covers;

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
}
