//! The opaque pagination cursor: base64url of a small JSON naming the last
//! row's key and what the request was (kind, symbol, order, interval), so a
//! cursor is only accepted by the query it came from.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::request::{in_supported_range, Interval, Order};

/// Version of the cursor layout; a cursor of another version is refused.
const VERSION: u8 = 1;
/// Longest cursor text accepted (they are about 120 characters).
const MAX_LEN: usize = 512;

/// Where the next page starts: strictly after this key in the request's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub kind: String,
    pub symbol: String,
    pub order: Order,
    pub interval: Interval,
    /// Timestamp of the last row returned (a bucket start for aggregated candles).
    pub timestamp: DateTime<Utc>,
    /// The tick `seq` of the last row returned (ticks only).
    pub seq: Option<i64>,
}

#[derive(Serialize, Deserialize)]
struct Wire {
    v: u8,
    k: String,
    s: String,
    o: Order,
    i: Interval,
    /// Epoch microseconds.
    t: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    q: Option<i64>,
}

/// Why a cursor was refused; the text goes into a 400 reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `cursor` {0}; pass the next_cursor of a previous reply unchanged, or omit it")]
pub struct CursorError(&'static str);

impl Cursor {
    pub fn encode(&self) -> String {
        let wire = Wire {
            v: VERSION,
            k: self.kind.clone(),
            s: self.symbol.clone(),
            o: self.order,
            i: self.interval,
            t: self.timestamp.timestamp_micros(),
            q: self.seq,
        };
        // Serializing plain strings and integers cannot fail.
        let json = serde_json::to_vec(&wire).unwrap_or_default();
        URL_SAFE_NO_PAD.encode(json)
    }

    pub fn decode(text: &str) -> Result<Cursor, CursorError> {
        if text.len() > MAX_LEN {
            return Err(CursorError("is too long"));
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(text.trim_end_matches('='))
            .map_err(|_| CursorError("is not a cursor this service issued"))?;
        let wire: Wire = serde_json::from_slice(&bytes)
            .map_err(|_| CursorError("is not a cursor this service issued"))?;
        if wire.v != VERSION {
            return Err(CursorError("was issued by another version of the service"));
        }
        // The instants a request's bounds may name: every row and bar the
        // service returns (so every cursor it issues) lies within them.
        let timestamp = DateTime::from_timestamp_micros(wire.t)
            .filter(|_| in_supported_range(wire.t))
            .ok_or(CursorError("holds an invalid timestamp"))?;
        Ok(Cursor {
            kind: wire.k,
            symbol: wire.s,
            order: wire.o,
            interval: wire.i,
            timestamp,
            seq: wire.q,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::request::{EARLIEST_MICROS, LATEST_MICROS};

    fn sample(seq: Option<i64>) -> Cursor {
        Cursor {
            kind: "ticks".into(),
            symbol: "FPT".into(),
            order: Order::Desc,
            interval: Interval::M1,
            timestamp: DateTime::from_timestamp_micros(1_764_123_303_123_456).unwrap(),
            seq,
        }
    }

    #[test]
    fn a_cursor_round_trips() {
        let mut last_second = sample(None);
        last_second.timestamp = DateTime::from_timestamp_micros(253_402_300_799_999_999).unwrap();
        // The first 1d bar of year 1 starts on 0000-12-31 in UTC.
        let mut first_bar = sample(None);
        first_bar.interval = Interval::D1;
        first_bar.timestamp = DateTime::from_timestamp_micros(EARLIEST_MICROS).unwrap();
        let mut latest = sample(None);
        latest.timestamp = DateTime::from_timestamp_micros(LATEST_MICROS).unwrap();
        for cursor in [
            sample(Some(42)),
            sample(None),
            sample(Some(0)),
            last_second,
            first_bar,
            latest,
        ] {
            let text = cursor.encode();
            assert!(text.len() < 200, "{text}");
            assert!(text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
            assert_eq!(Cursor::decode(&text), Ok(cursor));
        }
    }

    #[test]
    fn malformed_cursors_are_refused() {
        let good = sample(Some(1)).encode();
        let other_version =
            URL_SAFE_NO_PAD.encode(br#"{"v":9,"k":"ticks","s":"FPT","o":"asc","i":"1m","t":0}"#);
        let bad_order =
            URL_SAFE_NO_PAD.encode(br#"{"v":1,"k":"ticks","s":"FPT","o":"up","i":"1m","t":0}"#);
        let bad_time = URL_SAFE_NO_PAD.encode(format!(
            r#"{{"v":1,"k":"ticks","s":"FPT","o":"asc","i":"1m","t":{}}}"#,
            i64::MAX
        ));
        let far_future = URL_SAFE_NO_PAD.encode(format!(
            r#"{{"v":1,"k":"candles","s":"FPT","o":"asc","i":"1d","t":{}}}"#,
            LATEST_MICROS + 1
        ));
        let far_past = URL_SAFE_NO_PAD.encode(format!(
            r#"{{"v":1,"k":"candles","s":"FPT","o":"asc","i":"1d","t":{}}}"#,
            EARLIEST_MICROS - 1
        ));
        for bad in [
            &far_future,
            &far_past,
            "",
            "!!!",
            "eyJ2Ijox",
            &good[..good.len() - 3],
            &"A".repeat(10_000),
            &other_version,
            &bad_order,
            &bad_time,
            "'; DROP TABLE tick_data; --",
        ] {
            assert!(Cursor::decode(bad).is_err(), "{bad}");
        }
    }
}
