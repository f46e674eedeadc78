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

    /// Counts, logs and publishes one rejection. Returns false when the
    /// dead letter could not be published (JetStream then redelivers the
    /// original message rather than lose it).
    pub async fn send(
        &self,
        record_type: RecordType,
        original_subject: &str,
        rejected: &Rejected,
    ) -> bool {
        self.metrics
            .rejected(record_type, original_subject, &rejected.reject);
        let subject = format!("{}.dlq.{}", self.subject_prefix, record_type.name());
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
        let result = match &self.jetstream {
            Some(js) => match js.publish_with_headers(subject, headers, payload).await {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            },
            None => self
                .client
                .publish_with_headers(subject, headers, payload)
                .await
                .map_err(|e| e.to_string()),
        };
        match result {
            Ok(()) => true,
            Err(error) => {
                self.metrics.dead_letter_failed(record_type, &error);
                false
            }
        }
    }
}
