//! The ingest path, one pipeline per record type:
//!
//! ```text
//! NATS ──source──▶ decode ──▶ queue (bounded) ──batcher──▶ sink (COPY) ──▶ PostgreSQL
//!                    └──▶ dead letters (<prefix>.dlq.<type>)
//! ```
//!
//! A message's life — held, kept alive, then acknowledged, nak'ed or
//! terminated — belongs to [`delivery`]: the stages report an outcome, and
//! only that module answers JetStream.

pub mod batcher;
pub mod dead_letter;
pub mod decode;
pub mod delivery;
pub mod sink;
pub mod source;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{IngestConfig, IngestMode};
use crate::db::Database;
use crate::ops::health::Status;
use crate::ops::metrics::Metrics;
use crate::records::RecordType;
use crate::retry::Backoff;

use batcher::BatchLimits;
use dead_letter::DeadLetters;
use delivery::Lifecycle;
use sink::Sink;
use source::Source;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("JetStream stream {stream}: {message}; is JetStream enabled on the NATS server (nats-server -js)?")]
    Stream { stream: String, message: String },
    #[error("stream {stream} already exists with subjects [{existing}], which do not cover {missing}: add that subject to the stream, or set ingest.stream to another name")]
    StreamMismatch {
        stream: String,
        missing: String,
        existing: String,
    },
    #[error("NATS refused to create stream {stream} on [{subjects}]: {message}; if another stream already holds these subjects, remove it or set ingest.stream / ingest.subject_prefix")]
    StreamRefused {
        stream: String,
        subjects: String,
        message: String,
    },
    #[error("JetStream consumer {consumer}: {message}")]
    Consumer { consumer: String, message: String },
    #[error("JetStream refused to update consumer {consumer} to the configuration ({changes}): {message}; set those keys back, or delete the consumer so tickvault creates it anew (it then starts from the first message kept in the stream)")]
    ConsumerRefused {
        consumer: String,
        changes: String,
        message: String,
    },
}

impl IngestError {
    /// An error only an operator can fix: retrying cannot help.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            IngestError::StreamMismatch { .. }
                | IngestError::StreamRefused { .. }
                | IngestError::ConsumerRefused { .. }
        )
    }
}

/// What the ingest pipelines need from the application.
pub struct Ingest {
    pub config: Arc<IngestConfig>,
    pub db: Database,
    pub client: async_nats::Client,
    pub metrics: Arc<Metrics>,
    pub status: Arc<Status>,
}

impl Ingest {
    /// Runs every type's pipeline until `shutdown`, then drains: sources stop
    /// and hand back what they will not queue, batchers flush what they
    /// hold. `give_up` ends waiting for an unavailable database: what is left
    /// is handed back to JetStream for another worker.
    pub async fn run(
        self,
        shutdown: CancellationToken,
        give_up: CancellationToken,
    ) -> Result<(), IngestError> {
        let js = match self.config.mode {
            IngestMode::Jetstream => {
                let js = jetstream::new(self.client.clone());
                if !self.wait_for_streams(&js, &shutdown).await? {
                    return Ok(());
                }
                Some(js)
            }
            IngestMode::Core => None,
        };
        let dead_letters = DeadLetters::new(self.client.clone(), js.clone(), self.config.clone());
        let limits = BatchLimits::new(&self.config);
        // Stops every source, at shutdown or when one of them cannot go on.
        let stop = shutdown.child_token();
        let acks = Arc::new(self.client.clone());
        let mut sources = JoinSet::new();
        let mut batchers = JoinSet::new();
        for record_type in RecordType::ALL {
            let lifecycle =
                Lifecycle::new(record_type, self.metrics.clone(), self.config.ack_wait());
            let (queue, receiver) = batcher::queue(
                record_type,
                self.config.queue_capacity,
                self.metrics.clone(),
                self.status.clone(),
            );
            let sink = Arc::new(Sink::new(
                record_type,
                self.db.clone(),
                self.metrics.clone(),
                dead_letters.clone(),
                lifecycle.clone(),
                give_up.clone(),
            ));
            batchers.spawn(batcher::run(receiver, sink, lifecycle.clone(), limits));
            let source = Source {
                record_type,
                config: self.config.clone(),
                client: self.client.clone(),
                acks: acks.clone(),
                queue,
                dead_letters: dead_letters.clone(),
                lifecycle,
                intake: self.metrics.intake(record_type),
                status: self.status.clone(),
            };
            match &js {
                Some(js) => sources.spawn(source.run_jetstream(js.clone(), stop.clone())),
                None => sources.spawn(source.run_core(stop.clone())),
            };
        }
        // Sources end on shutdown and drop their queue senders; each batcher
        // then flushes what it holds and ends.
        let mut failure = None;
        while let Some(ended) = sources.join_next().await {
            match ended {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    stop.cancel();
                    failure.get_or_insert(e);
                }
                Err(e) => tracing::error!(error = %e, "an ingest source failed"),
            }
        }
        batchers.join_all().await;
        tracing::info!("ingest drained");
        failure.map_or(Ok(()), Err)
    }

    /// Ok(false) when shutdown came first.
    async fn wait_for_streams(
        &self,
        js: &jetstream::Context,
        shutdown: &CancellationToken,
    ) -> Result<bool, IngestError> {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        loop {
            // A request in flight waits for its timeout: shutdown does not.
            let ensured = tokio::select! {
                _ = shutdown.cancelled() => return Ok(false),
                ensured = source::ensure_streams(js, &self.config) => ensured,
            };
            match ensured {
                Ok(()) => {
                    source::warn_on_other_replicas(js, &self.config).await;
                    return Ok(true);
                }
                Err(e) if e.is_fatal() => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, "JetStream not available yet; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(false),
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
            }
        }
    }
}
