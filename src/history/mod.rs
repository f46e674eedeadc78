//! The history service (contract section 2): a NATS micro service named
//! `tickvault-history` answering `<prefix>.ticks|candles|foreign|index|derivatives`
//! from the five tables.
//!
//! - [`request`]: the JSON request parsed and checked into a typed [`request::Query`].
//! - [`query`]: the parameterised SQL, generic over the record specs, and row → JSON.
//! - [`cursor`]: the opaque keyset-pagination cursor.
//! - [`admission`]: the waiting budget (requests, bytes) and the wait queue
//!   (with its deadline) in front of the service's slots.
//! - [`service`]: the endpoints, admission control (body size, parsing, the
//!   queue, the database's state), replies cut to the server's max payload,
//!   errors, metrics.
//!
//! Semantics the contract leaves open: dates are market days (UTC+7); with
//! an `interval` wider than `1m`, bars are built from the 1-minute rows inside
//! `[from, to)` only, so a bar cut by a bound aggregates the minutes in range;
//! `null` for an optional request field means "absent".

pub mod admission;
pub mod cursor;
pub mod query;
pub mod request;
pub mod service;

use std::time::Duration;

use bytes::Bytes;

pub use service::serve;

/// Seconds a client should wait before retrying after a 503.
pub const RETRY_AFTER_S: u64 = 2;

/// Why a history request was not answered with rows. Its `Display` is the
/// reply's message: it never carries SQL, connection strings or paths.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// The request is malformed; the message names the field.
    #[error("{0}")]
    BadRequest(String),
    /// The database cannot be reached now; the same request can succeed later.
    #[error("the database is unavailable; retry in {RETRY_AFTER_S} s")]
    Unavailable(#[source] sqlx::Error),
    #[error("the database did not answer within {0:?}; retry later or ask for a shorter range")]
    Timeout(Duration),
    /// Any other database failure.
    #[error("the query failed; see the service's log")]
    Database(#[source] sqlx::Error),
    #[error("a row does not fit in the server's max payload; raise the NATS max_payload")]
    RowTooLarge,
    /// The body is over `history.max_request_bytes`; it was not parsed.
    #[error("the request body is {bytes} bytes, over this service's limit of {max} (history.max_request_bytes); send a smaller request")]
    TooLarge { bytes: usize, max: usize },
    /// History's database (the ingest database, or its own read replica) is
    /// known to be down: refused without waiting for a connection.
    #[error("the database is unavailable; retry in {RETRY_AFTER_S} s")]
    DatabaseDown,
    /// Every slot is busy and the wait queue is full.
    #[error(
        "the history service is overloaded (its wait queue is full); retry in {RETRY_AFTER_S} s"
    )]
    QueueFull,
    /// The request waited past `history.queue_deadline_ms`; it was not run.
    #[error("the history service is overloaded: the request waited {} ms for a free slot and was not run; retry in {RETRY_AFTER_S} s", .0.as_millis())]
    Expired(Duration),
    /// The worker is shutting down; another replica (or this one, restarted) answers.
    #[error("this history worker is stopping; retry in {RETRY_AFTER_S} s")]
    Stopping,
    /// A bar's sum does not fit its column (minutes stored outside the ingest bounds).
    #[error(
        "field `{field}` of the {interval} bar starting {bar} is out of range: its minutes sum beyond {range}; \
         ask for a narrower `interval` (1m returns the stored minutes) or a range without that bar",
        field = .0.field, interval = .1, bar = crate::records::format_timestamp(&.0.bar), range = .0.range
    )]
    OutOfRange(query::OutOfRange, &'static str),
}

impl From<sqlx::Error> for HistoryError {
    fn from(error: sqlx::Error) -> Self {
        use crate::db::{failure, Failure};
        // To a client, a database it cannot reach for any reason is unavailable.
        if matches!(failure(&error), Failure::Unavailable | Failure::Auth) {
            HistoryError::Unavailable(error)
        } else {
            HistoryError::Database(error)
        }
    }
}

impl HistoryError {
    /// The reply code: 400, 503 or 500.
    pub fn code(&self) -> u16 {
        match self {
            HistoryError::BadRequest(_)
            | HistoryError::TooLarge { .. }
            | HistoryError::OutOfRange(..) => 400,
            HistoryError::Unavailable(_)
            | HistoryError::Timeout(_)
            | HistoryError::DatabaseDown
            | HistoryError::QueueFull
            | HistoryError::Expired(_)
            | HistoryError::Stopping => 503,
            HistoryError::Database(_) | HistoryError::RowTooLarge => 500,
        }
    }

    /// Refused by admission control without running: its metrics event
    /// logs it, so it is not logged again as a failure.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            HistoryError::TooLarge { .. }
                | HistoryError::DatabaseDown
                | HistoryError::QueueFull
                | HistoryError::Expired(_)
                | HistoryError::Stopping
        )
    }

    pub fn retry_after_s(&self) -> Option<u64> {
        (self.code() == 503).then_some(RETRY_AFTER_S)
    }

    /// `{"error": {"code": C, "message": "...", "retry_after_s": S}}`.
    pub fn reply_body(&self) -> Bytes {
        let mut error = serde_json::json!({"code": self.code(), "message": self.to_string()});
        if let Some(seconds) = self.retry_after_s() {
            error["retry_after_s"] = seconds.into();
        }
        Bytes::from(serde_json::json!({ "error": error }).to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_codes_and_hide_details() {
        let secret = "postgres://user:pw@db/x SELECT * FROM tick_data";
        let unavailable = HistoryError::from(sqlx::Error::PoolTimedOut);
        assert_eq!(unavailable.code(), 503);
        let body: serde_json::Value = serde_json::from_slice(&unavailable.reply_body()).unwrap();
        assert_eq!(body["error"]["retry_after_s"], 2);
        let other = HistoryError::from(sqlx::Error::Protocol(secret.into()));
        assert_eq!(other.code(), 503);
        let failed = HistoryError::from(sqlx::Error::ColumnNotFound(secret.into()));
        assert_eq!(failed.code(), 500);
        let body: serde_json::Value = serde_json::from_slice(&failed.reply_body()).unwrap();
        assert_eq!(body["error"]["code"], 500);
        assert!(body["error"].get("retry_after_s").is_none());
        for e in [unavailable, failed, other] {
            assert!(!e.to_string().contains("postgres://"));
            assert!(!e.to_string().contains("SELECT"));
        }
        assert_eq!(HistoryError::BadRequest("field `x`".into()).code(), 400);
    }

    #[test]
    fn refusals_say_what_to_do() {
        let too_large = HistoryError::TooLarge {
            bytes: 1_000_000,
            max: 65_536,
        };
        assert_eq!(too_large.code(), 400);
        assert!(too_large.to_string().contains("history.max_request_bytes"));
        for busy in [
            HistoryError::QueueFull,
            HistoryError::Expired(Duration::from_millis(3001)),
            HistoryError::DatabaseDown,
            HistoryError::Stopping,
        ] {
            assert_eq!(busy.code(), 503, "{busy}");
            assert_eq!(busy.retry_after_s(), Some(RETRY_AFTER_S), "{busy}");
            assert!(busy.to_string().contains("retry in 2 s"), "{busy}");
        }
        assert!(HistoryError::Expired(Duration::from_millis(3001))
            .to_string()
            .contains("3001 ms"));
        let overflow = HistoryError::OutOfRange(
            query::OutOfRange {
                field: "volume",
                range: "a BIGINT",
                bar: chrono::DateTime::UNIX_EPOCH,
            },
            "1d",
        );
        assert_eq!(overflow.code(), 400);
        let message = overflow.to_string();
        for part in [
            "`volume`",
            "1d bar",
            "1970-01-01T00:00:00Z",
            "a BIGINT",
            "`interval`",
        ] {
            assert!(message.contains(part), "{message}");
        }
    }
}
