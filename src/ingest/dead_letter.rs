//! Dead letters: rejected input republished to `<prefix>.dlq.<type>` with
//! the reason and the original subject as headers. In JetStream mode the
//! `<stream>_DLQ` stream keeps them, and the publish is confirmed before the
//! original message is acknowledged.

use std::sync::Arc;

use async_nats::jetstream;
use async_nats::HeaderMap;

use crate::ingest::decode::Rejected;
use crate::ops::metrics::Metrics;
use crate::records::RecordType;

pub const REASON_HEADER: &str = "Tickvault-Reject-Reason";
pub const DETAIL_HEADER: &str = "Tickvault-Reject-Detail";
pub const ORIGINAL_SUBJECT_HEADER: &str = "Tickvault-Original-Subject";

#[derive(Clone)]
pub struct DeadLetters {
    client: async_nats::Client,
    /// Set in JetStream mode: publishes wait for the DLQ stream's ack.
    jetstream: Option<jetstream::Context>,
    subject_prefix: String,
    metrics: Arc<Metrics>,
}

impl DeadLetters {
    pub fn new(
        client: async_nats::Client,
        jetstream: Option<jetstream::Context>,
        subject_prefix: &str,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            client,
            jetstream,
            subject_prefix: subject_prefix.to_string(),
            metrics,
        }
    }

    /// Counts, logs and publishes one message's rejections (concurrently).
    /// Returns false when a dead letter could not be published (JetStream
    /// then redelivers the original message rather than lose it).
    pub async fn send_all(
        &self,
        record_type: RecordType,
        original_subject: &str,
        rejected: &[Rejected],
    ) -> bool {
        if rejected.is_empty() {
            return true;
        }
        self.metrics.rejected(
            record_type,
            original_subject,
            rejected.iter().map(|r| &r.reject),
        );
        let subject = format!("{}.dlq.{}", self.subject_prefix, record_type.name());
        let publishes = rejected
            .iter()
            .map(|r| self.publish(subject.clone(), original_subject, r));
        let failures: Vec<String> = futures::future::join_all(publishes)
            .await
            .into_iter()
            .filter_map(Result::err)
            .collect();
        match failures.first() {
            None => true,
            Some(error) => {
                self.metrics
                    .dead_letters_failed(record_type, failures.len(), error);
                false
            }
        }
    }

    async fn publish(
        &self,
        subject: String,
        original_subject: &str,
        rejected: &Rejected,
    ) -> Result<(), String> {
        let mut headers = HeaderMap::new();
        headers.insert(REASON_HEADER, rejected.reject.reason.as_str());
        // Header values are one line of printable text.
        let detail: String = rejected
            .reject
            .detail
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(512)
            .collect();
        headers.insert(DETAIL_HEADER, detail.as_str());
        headers.insert(ORIGINAL_SUBJECT_HEADER, original_subject);
        let payload = rejected.payload.clone();
        match &self.jetstream {
            Some(js) => match js.publish_with_headers(subject, headers, payload).await {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            },
            None => self
                .client
                .publish_with_headers(subject, headers, payload)
                .await
                .map_err(|e| e.to_string()),
        }
    }
}
