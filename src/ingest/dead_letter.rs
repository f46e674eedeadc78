//! Dead letters: rejected input republished to `<prefix>.dlq.<type>` with
//! the reason and the original subject as headers. In JetStream mode the
//! `<stream>_DLQ` stream keeps them, and the publish is confirmed before the
//! original message is acknowledged.
//!
//! A publish that cannot succeed must not hold its message forever: each
//! waits at most 2 s, a dead-letter stream deleted at runtime is created
//! again, a dead letter
//! larger than the server's max payload is truncated (and says so in the
//! `Tickvault-Truncated` header), and what still fails is reported to the
//! delivery lifecycle, which retries the message a bounded number of times.
//! Each dead letter carries a `Nats-Msg-Id`, so a redelivered message does
//! not store its dead letters twice.

use std::sync::Arc;
use std::time::Duration;

use async_nats::{jetstream, HeaderMap};
use bytes::Bytes;

use crate::config::IngestConfig;
use crate::ingest::decode::Rejected;
use crate::ingest::delivery::Delivery;
use crate::ingest::source;
use crate::records::RecordType;

pub const REASON_HEADER: &str = "Tickvault-Reject-Reason";
pub const DETAIL_HEADER: &str = "Tickvault-Reject-Detail";
pub const ORIGINAL_SUBJECT_HEADER: &str = "Tickvault-Original-Subject";
/// Set when the dead letter's body was cut to fit the server's max payload:
/// the original body's length in bytes.
pub const TRUNCATED_HEADER: &str = "Tickvault-Truncated";
const MESSAGE_ID_HEADER: &str = "Nats-Msg-Id";
/// The longest `Tickvault-Reject-Detail`, in characters.
const MAX_DETAIL_CHARS: usize = 512;
/// How long one dead letter's publish may wait for the stream's answer.
const PUBLISH_BOUND: Duration = Duration::from_secs(2);

/// Which stage rejected the input: part of a dead letter's identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Decoding: bad JSON or a record breaking the rules.
    Input,
    /// PostgreSQL refused a row that passed every rule.
    Database,
}

impl Origin {
    fn tag(self) -> &'static str {
        match self {
            Origin::Input => "input",
            Origin::Database => "db",
        }
    }
}

#[derive(Clone)]
pub struct DeadLetters {
    client: async_nats::Client,
    /// Set in JetStream mode: publishes wait for the DLQ stream's ack.
    jetstream: Option<jetstream::Context>,
    config: Arc<IngestConfig>,
}

/// Why one dead letter was not stored.
struct Failed {
    index: usize,
    error: String,
}

impl DeadLetters {
    pub fn new(
        client: async_nats::Client,
        jetstream: Option<jetstream::Context>,
        config: Arc<IngestConfig>,
    ) -> Self {
        Self {
            client,
            jetstream,
            config,
        }
    }

    /// Publishes one message's rejections (concurrently) and returns how
    /// many could not be published. Counting happens when the message is
    /// settled, once, whatever the number of attempts.
    pub async fn send_all(
        &self,
        record_type: RecordType,
        delivery: &Delivery,
        origin: Origin,
        rejected: &[Rejected],
    ) -> usize {
        if rejected.is_empty() {
            return 0;
        }
        let subject = format!("{}.dlq.{}", self.config.subject_prefix, record_type.name());
        let max_payload = self.client.max_payload();
        let letters: Vec<(HeaderMap, Bytes)> = rejected
            .iter()
            .enumerate()
            .map(|(n, r)| letter(delivery, origin, n, r, max_payload))
            .collect();
        let mut failed = self.publish(&subject, &letters, 0..letters.len()).await;
        if let (Some(js), false) = (&self.jetstream, failed.is_empty()) {
            // The dead-letter stream may have been deleted at runtime (the
            // publish then finds no stream, or times out when something
            // else subscribes to the subject): create it again, and retry once.
            if let Err(e) = source::ensure_streams(js, &self.config).await {
                tracing::warn!(error = %e, "could not make sure the dead-letter stream exists");
            }
            let retry: Vec<usize> = failed.iter().map(|f| f.index).collect();
            failed = self.publish(&subject, &letters, retry).await;
        }
        if let Some(first) = failed.first() {
            tracing::warn!(
                r#type = record_type.name(),
                subject = delivery.subject.as_str(),
                failed = failed.len(),
                error = %first.error,
                "could not publish dead letters"
            );
        }
        failed.len()
    }

    async fn publish(
        &self,
        subject: &str,
        letters: &[(HeaderMap, Bytes)],
        which: impl IntoIterator<Item = usize>,
    ) -> Vec<Failed> {
        let publishes = which.into_iter().map(|index| {
            let (headers, payload) = letters[index].clone();
            async move {
                self.publish_one(subject, headers, payload)
                    .await
                    .err()
                    .map(|error| Failed { index, error })
            }
        });
        futures::future::join_all(publishes)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    async fn publish_one(
        &self,
        subject: &str,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<(), String> {
        match &self.jetstream {
            Some(js) => {
                let stored = async {
                    js.publish_with_headers(subject.to_string(), headers, payload)
                        .await
                        .map_err(|e| e.to_string())?
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                };
                // The source waits for this: a stream that does not answer
                // must not hold the type's intake for long.
                tokio::time::timeout(PUBLISH_BOUND, stored)
                    .await
                    .unwrap_or_else(|_| {
                        Err(format!(
                            "no answer from the dead-letter stream within {PUBLISH_BOUND:?}"
                        ))
                    })
            }
            None => self
                .client
                .publish_with_headers(subject.to_string(), headers, payload)
                .await
                .map_err(|e| e.to_string()),
        }
    }
}

/// One dead letter: its headers and body, cut to fit `max_payload`.
fn letter(
    delivery: &Delivery,
    origin: Origin,
    n: usize,
    rejected: &Rejected,
    max_payload: usize,
) -> (HeaderMap, Bytes) {
    // Header values are one line of printable text.
    let detail: String = rejected
        .reject
        .detail
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_DETAIL_CHARS)
        .collect();
    let mut fields: Vec<(&str, String)> = vec![
        (REASON_HEADER, rejected.reject.reason.as_str().to_string()),
        (DETAIL_HEADER, detail),
        (ORIGINAL_SUBJECT_HEADER, delivery.subject.to_string()),
    ];
    if let Some(id) = delivery.dead_letter_id(origin.tag(), n) {
        fields.push((MESSAGE_ID_HEADER, id));
    }
    let kept = fit(&mut fields, rejected.payload.len(), max_payload);
    let mut headers = HeaderMap::new();
    for (name, value) in &fields {
        headers.insert(*name, value.as_str());
    }
    (headers, rejected.payload.slice(..kept))
}

/// How many body bytes fit with `fields` under `max_payload`; when not all
/// of them, adds the `Tickvault-Truncated` header with the original length.
fn fit(fields: &mut Vec<(&str, String)>, body: usize, max_payload: usize) -> usize {
    if header_bytes(fields) + body <= max_payload {
        return body;
    }
    fields.push((TRUNCATED_HEADER, body.to_string()));
    max_payload.saturating_sub(header_bytes(fields)).min(body)
}

/// The size of the header block on the wire: `NATS/1.0\r\n`, a
/// `name: value\r\n` line per header, and a closing `\r\n`.
fn header_bytes(fields: &[(&str, String)]) -> usize {
    10 + fields
        .iter()
        .map(|(name, value)| name.len() + 2 + value.len() + 2)
        .sum::<usize>()
        + 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_size_matches_the_wire_format() {
        let mut headers = HeaderMap::new();
        headers.insert("A", "b");
        headers.insert("Long-Name", "value with spaces");
        let fields = vec![
            ("A", "b".to_string()),
            ("Long-Name", "value with spaces".to_string()),
        ];
        let wire = "NATS/1.0\r\nA: b\r\nLong-Name: value with spaces\r\n\r\n";
        assert_eq!(header_bytes(&fields), wire.len());
    }

    #[test]
    fn a_dead_letter_is_cut_to_fit_the_max_payload_and_says_so() {
        let mut fields = vec![(REASON_HEADER, "invalid_json".to_string())];
        assert_eq!(fit(&mut fields, 100, 1000), 100);
        assert_eq!(fields.len(), 1, "nothing to say when it fits");

        let kept = fit(&mut fields, 1000, 1000);
        assert_eq!(
            fields.last().unwrap(),
            &(TRUNCATED_HEADER, "1000".to_string())
        );
        assert_eq!(header_bytes(&fields) + kept, 1000, "exactly at the limit");

        let mut tiny = vec![(REASON_HEADER, "x".repeat(100))];
        assert_eq!(fit(&mut tiny, 50, 20), 0, "headers alone exceed it");
    }
}
