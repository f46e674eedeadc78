//! The history service (contract section 2): a NATS micro service named
//! `tickvault-history` answering `<prefix>.ticks|candles|foreign|index|derivatives`
//! from the five tables.
//!
//! - [`request`]: the JSON request parsed and checked into a typed [`request::Query`].
//! - [`query`]: the parameterised SQL, generic over the record specs, and row → JSON.
//! - [`cursor`]: the opaque keyset-pagination cursor.
//! - [`service`]: the endpoints, replies cut to the server's max payload, errors, metrics.
//!
//! Semantics the contract leaves open: dates are market days (UTC+7); with
//! an `interval` wider than `1m`, bars are built from the 1-minute rows inside
//! `[from, to)` only, so a bar cut by a bound aggregates the minutes in range;
//! `null` for an optional request field means "absent".

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
    /// History's own database was found down by its health check: answered
    /// at once, without waiting for a connection.
    #[error("the database is unavailable; retry in {RETRY_AFTER_S} s")]
    DatabaseDown,
    #[error("the database did not answer within {0:?}; retry later or ask for a shorter range")]
    Timeout(Duration),
    /// Any other database failure.
    #[error("the query failed; see the service's log")]
    Database(#[source] sqlx::Error),
    #[error("a row does not fit in the server's max payload; raise the NATS max_payload")]
    RowTooLarge,
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
            HistoryError::BadRequest(_) => 400,
            HistoryError::Unavailable(_)
            | HistoryError::DatabaseDown
            | HistoryError::Timeout(_) => 503,
            HistoryError::Database(_) | HistoryError::RowTooLarge => 500,
        }
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
}
