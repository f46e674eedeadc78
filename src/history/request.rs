//! A history request: the JSON body parsed and checked into a typed
//! [`Query`] (a range), [`LatestQuery`] or [`SymbolsQuery`]. Every refusal is
//! a [`HistoryError::BadRequest`] naming the field.

use chrono::{DateTime, Datelike, Days, FixedOffset, NaiveDate, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};

use super::cursor::Cursor;
use super::HistoryError;
use crate::records::{is_symbol, RecordSpec, RecordType};

/// `limit` when the request has none.
pub const DEFAULT_LIMIT: u32 = 1000;
/// The largest `limit` accepted; above it is an error, not a clamp.
pub const MAX_LIMIT: u32 = 50_000;
/// Most symbols one `history.latest` request may name.
pub const MAX_SYMBOLS: usize = 500;
/// The market time zone, Asia/Ho_Chi_Minh: UTC+7 all year (no DST).
pub const MARKET_OFFSET_SECS: i32 = 7 * 3600;
/// The earliest instant a bound (or a cursor) may name, in epoch
/// microseconds: the start of market day 0001-01-01 (0000-12-31T17:00:00Z).
/// Every bar the service builds from there starts at or after it.
pub const EARLIEST_MICROS: i64 = -62_135_596_800_000_000 - MARKET_OFFSET_SECS as i64 * 1_000_000;
/// The latest instant a bound (or a cursor) may name: 10000-01-01T00:00:00Z,
/// just after the last instant ingest stores (year 9999, UTC).
pub const LATEST_MICROS: i64 = 253_402_300_800_000_000;

pub fn market_offset() -> FixedOffset {
    FixedOffset::east_opt(MARKET_OFFSET_SECS).expect("UTC+7 is a valid offset")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    Asc,
    Desc,
}

impl Order {
    pub fn sql(self) -> &'static str {
        match self {
            Order::Asc => "ASC",
            Order::Desc => "DESC",
        }
    }
}

/// Candle bar width. `1m` reads the stored rows as they are; the others
/// aggregate them into buckets aligned to the market time zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Interval {
    #[serde(rename = "1m")]
    M1,
    #[serde(rename = "5m")]
    M5,
    #[serde(rename = "15m")]
    M15,
    #[serde(rename = "30m")]
    M30,
    #[serde(rename = "1h")]
    H1,
    #[serde(rename = "1d")]
    D1,
}

impl Interval {
    pub const ALL: [Interval; 6] = [
        Interval::M1,
        Interval::M5,
        Interval::M15,
        Interval::M30,
        Interval::H1,
        Interval::D1,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Interval::M1 => "1m",
            Interval::M5 => "5m",
            Interval::M15 => "15m",
            Interval::M30 => "30m",
            Interval::H1 => "1h",
            Interval::D1 => "1d",
        }
    }

    pub fn seconds(self) -> i64 {
        match self {
            Interval::M1 => 60,
            Interval::M5 => 300,
            Interval::M15 => 900,
            Interval::M30 => 1800,
            Interval::H1 => 3600,
            Interval::D1 => 86_400,
        }
    }

    pub fn parse(text: &str) -> Option<Interval> {
        Self::ALL.into_iter().find(|i| i.as_str() == text)
    }
}

/// A checked request: everything the SQL needs, nothing else.
#[derive(Debug, Clone)]
pub struct Query {
    pub spec: &'static RecordSpec,
    pub symbol: String,
    /// Inclusive lower bound.
    pub from: DateTime<Utc>,
    /// Exclusive upper bound.
    pub to: DateTime<Utc>,
    pub limit: u32,
    pub order: Order,
    pub interval: Interval,
    /// Resume strictly after this key.
    pub after: Option<Cursor>,
}

impl Query {
    pub fn kind(&self) -> &'static str {
        self.spec.history_kind
    }

    /// Whether candles are aggregated into wider bars.
    pub fn aggregated(&self) -> bool {
        self.interval != Interval::M1
    }

    /// The cursor that resumes after a row with this key.
    pub fn cursor_after(&self, timestamp: DateTime<Utc>, seq: Option<i64>) -> Cursor {
        Cursor {
            kind: self.kind().to_string(),
            symbol: self.symbol.clone(),
            order: self.order,
            interval: self.interval,
            timestamp,
            seq,
        }
    }
}

fn bad(message: impl Into<String>) -> HistoryError {
    HistoryError::BadRequest(message.into())
}

/// Parses a request body for the endpoint of `record_type`.
pub fn parse(record_type: RecordType, body: &[u8]) -> Result<Query, HistoryError> {
    let json: Json = serde_json::from_slice(body).map_err(|_| {
        bad("the request body must be a JSON object, e.g. {\"symbol\": \"FPT\", \"from\": \"2026-11-20\", \"to\": \"2026-11-26\"}")
    })?;
    let object = json
        .as_object()
        .ok_or_else(|| bad("the request body must be a JSON object"))?;
    let spec = record_type.spec();
    let is_candles = record_type == RecordType::Candle;

    let symbol = required_str(object, "symbol")?.trim().to_ascii_uppercase();
    if !is_symbol(&symbol) {
        return Err(bad(
            "field `symbol` must be 1 to 32 characters A-Z, 0-9, `_` or `-`, starting with a letter or digit",
        ));
    }

    let from = parse_bound(required_str(object, "from")?, "from")?;
    let to = parse_bound(required_str(object, "to")?, "to")?;
    // A date `to` covers its whole market day: `from` is after it from the
    // next local midnight on. An RFC 3339 `to` is an instant: `from` is
    // after it when later (equal is an empty range, not an error).
    let from_after_to = if to.is_date {
        from.start >= to.end
    } else {
        from.start > to.end
    };
    if from_after_to {
        return Err(bad("field `from` must not be after field `to`"));
    }

    let limit = match present(object, "limit") {
        None => DEFAULT_LIMIT,
        Some(value) => parse_limit(value)?,
    };

    let order = match present(object, "order") {
        None => Order::Asc,
        Some(value) => match value.as_str().map(|s| s.trim().to_ascii_lowercase()) {
            Some(s) if s == "asc" => Order::Asc,
            Some(s) if s == "desc" => Order::Desc,
            Some(_) => return Err(bad("field `order` must be \"asc\" or \"desc\"")),
            None => return Err(bad("field `order` must be a string: \"asc\" or \"desc\"")),
        },
    };

    let interval = match present(object, "interval") {
        None => Interval::M1,
        Some(_) if !is_candles => {
            return Err(bad(format!(
                "field `interval` applies to candles only, not to {}",
                spec.history_kind
            )))
        }
        Some(value) => {
            let text = value.as_str().ok_or_else(|| {
                bad("field `interval` must be a string: 1m, 5m, 15m, 30m, 1h or 1d")
            })?;
            Interval::parse(text.trim())
                .ok_or_else(|| bad("field `interval` must be one of 1m, 5m, 15m, 30m, 1h, 1d"))?
        }
    };

    let after = match present(object, "cursor") {
        None => None,
        Some(value) => {
            let text = value
                .as_str()
                .ok_or_else(|| bad("field `cursor` must be a string or null"))?;
            let cursor = Cursor::decode(text).map_err(|e| bad(e.to_string()))?;
            let matches = cursor.kind == spec.history_kind
                && cursor.symbol == symbol
                && cursor.order == order
                && cursor.interval == interval
                && cursor.seq.is_some() == (record_type == RecordType::Tick);
            if !matches {
                return Err(bad(
                    "field `cursor` belongs to another query: keep symbol, order and interval as in the request that returned it",
                ));
            }
            Some(cursor)
        }
    };

    Ok(Query {
        spec,
        symbol,
        from: from.start,
        to: to.end,
        limit,
        order,
        interval,
        after,
    })
}

/// A checked `history.latest` request.
#[derive(Debug, Clone)]
pub struct LatestQuery {
    pub spec: &'static RecordSpec,
    /// The requested identifiers, normalised, each once, in request order;
    /// `None`: every identifier of the kind.
    pub symbols: Option<Vec<String>>,
}

/// A checked `history.symbols` request.
#[derive(Debug, Clone)]
pub struct SymbolsQuery {
    pub spec: &'static RecordSpec,
}

/// The record type a `latest` or `symbols` body asks for, when it names a
/// valid `kind` (used to label the metrics of refused requests too).
pub fn requested_kind(body: &[u8]) -> Option<RecordType> {
    let json: Json = serde_json::from_slice(body).ok()?;
    let kind = json.get("kind")?.as_str()?;
    kind_named(kind)
}

fn kind_named(kind: &str) -> Option<RecordType> {
    let kind = kind.trim().to_ascii_lowercase();
    RecordType::ALL
        .into_iter()
        .find(|t| t.spec().history_kind == kind)
}

/// The body as an object and its `kind`.
fn object_and_kind(body: &[u8]) -> Result<(Map<String, Json>, RecordType), HistoryError> {
    let json: Json = serde_json::from_slice(body).map_err(|_| {
        bad("the request body must be a JSON object, e.g. {\"kind\": \"candles\", \"symbols\": [\"FPT\", \"VNM\"]}")
    })?;
    let Json::Object(object) = json else {
        return Err(bad("the request body must be a JSON object"));
    };
    let kind = required_str(&object, "kind")?;
    let record_type = kind_named(kind).ok_or_else(|| {
        bad("field `kind` must be one of ticks, candles, foreign, index, derivatives")
    })?;
    Ok((object, record_type))
}

/// Parses a `history.latest` body: `kind`, and `symbols` (optional, at most
/// [`MAX_SYMBOLS`]; a repeated symbol counts once, at its first place).
pub fn parse_latest(body: &[u8]) -> Result<LatestQuery, HistoryError> {
    let (object, record_type) = object_and_kind(body)?;
    let symbols = match present(&object, "symbols") {
        None => None,
        Some(value) => {
            let items = value.as_array().ok_or_else(|| {
                bad("field `symbols` must be an array of strings, e.g. [\"FPT\", \"VNM\"]")
            })?;
            if items.len() > MAX_SYMBOLS {
                return Err(bad(format!(
                    "field `symbols` names {} symbols; at most {MAX_SYMBOLS} per request",
                    items.len()
                )));
            }
            let mut symbols: Vec<String> = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let symbol = item
                    .as_str()
                    .map(|s| s.trim().to_ascii_uppercase())
                    .filter(|s| is_symbol(s))
                    .ok_or_else(|| {
                        bad(format!(
                            "field `symbols` item {} must be a string of 1 to 32 characters A-Z, 0-9, `_` or `-`, starting with a letter or digit",
                            i + 1
                        ))
                    })?;
                if !symbols.contains(&symbol) {
                    symbols.push(symbol);
                }
            }
            Some(symbols)
        }
    };
    Ok(LatestQuery {
        spec: record_type.spec(),
        symbols,
    })
}

/// Parses a `history.symbols` body: `kind`.
pub fn parse_symbols(body: &[u8]) -> Result<SymbolsQuery, HistoryError> {
    let (_, record_type) = object_and_kind(body)?;
    Ok(SymbolsQuery {
        spec: record_type.spec(),
    })
}

/// A field that is present and not null.
fn present<'a>(object: &'a Map<String, Json>, field: &str) -> Option<&'a Json> {
    object.get(field).filter(|v| !v.is_null())
}

fn required_str<'a>(object: &'a Map<String, Json>, field: &str) -> Result<&'a str, HistoryError> {
    match present(object, field) {
        None => Err(bad(format!("field `{field}` is required"))),
        Some(value) => value
            .as_str()
            .ok_or_else(|| bad(format!("field `{field}` must be a string"))),
    }
}

fn parse_limit(value: &Json) -> Result<u32, HistoryError> {
    let number = value.as_number().ok_or_else(|| {
        bad(format!(
            "field `limit` must be an integer from 1 to {MAX_LIMIT}"
        ))
    })?;
    let whole = number.as_i64().or_else(|| {
        number
            .as_f64()
            .filter(|v| v.fract() == 0.0 && v.abs() < 1e15)
            .map(|v| v as i64)
    });
    match whole {
        Some(n) if (1..=i64::from(MAX_LIMIT)).contains(&n) => Ok(n as u32),
        Some(n) if n > i64::from(MAX_LIMIT) => Err(bad(format!(
            "field `limit` must be at most {MAX_LIMIT}; follow next_cursor for more rows"
        ))),
        _ => Err(bad(format!(
            "field `limit` must be an integer from 1 to {MAX_LIMIT}"
        ))),
    }
}

/// A bound as given: its first instant and the instant after it (the same
/// for a timestamp; the next local midnight for a date).
struct Bound {
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    /// Given as a date (a whole market day), not as a timestamp.
    is_date: bool,
}

/// Whether an instant (epoch microseconds) is one a bound or a cursor may name.
pub fn in_supported_range(micros: i64) -> bool {
    (EARLIEST_MICROS..=LATEST_MICROS).contains(&micros)
}

/// A date of years 0001 to 9999 (market time), or an RFC 3339 timestamp
/// from the start of market day 0001-01-01 to the end of year 9999 (UTC):
/// the instants PostgreSQL and chrono both hold, and all ingest stores.
fn parse_bound(text: &str, field: &str) -> Result<Bound, HistoryError> {
    let text = text.trim();
    let invalid = || {
        bad(format!(
            "field `{field}` must be a date YYYY-MM-DD (market time, UTC+7) or an RFC 3339 timestamp, in the years 0001 to 9999"
        ))
    };
    if text.len() > 64 {
        return Err(invalid());
    }
    if let Ok(date) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        if !(1..=9999).contains(&date.year()) {
            return Err(invalid());
        }
        let start = local_midnight(date).ok_or_else(invalid)?;
        let end = date
            .checked_add_days(Days::new(1))
            .and_then(local_midnight)
            .ok_or_else(invalid)?;
        return Ok(Bound {
            start,
            end,
            is_date: true,
        });
    }
    let micros = DateTime::parse_from_rfc3339(text)
        .map_err(|_| invalid())?
        .timestamp_micros();
    if !in_supported_range(micros) {
        return Err(invalid());
    }
    // PostgreSQL keeps microseconds.
    let ts = DateTime::from_timestamp_micros(micros).ok_or_else(invalid)?;
    Ok(Bound {
        start: ts,
        end: ts,
        is_date: false,
    })
}

fn local_midnight(date: NaiveDate) -> Option<DateTime<Utc>> {
    let midnight = date.and_hms_opt(0, 0, 0)?;
    market_offset()
        .from_local_datetime(&midnight)
        .single()
        .map(|ts| ts.with_timezone(&Utc))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse_json(kind: RecordType, body: Json) -> Result<Query, HistoryError> {
        parse(kind, body.to_string().as_bytes())
    }

    fn message<T: std::fmt::Debug>(result: Result<T, HistoryError>) -> String {
        match result {
            Err(HistoryError::BadRequest(m)) => m,
            other => panic!("expected a bad request, got {other:?}"),
        }
    }

    fn utc(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn dates_are_market_days_and_to_includes_its_day() {
        let q = parse_json(
            RecordType::Tick,
            json!({"symbol": " fpt ", "from": "2026-11-20", "to": "2026-11-26"}),
        )
        .unwrap();
        assert_eq!(q.symbol, "FPT");
        assert_eq!(q.from, utc("2026-11-19T17:00:00Z"));
        assert_eq!(q.to, utc("2026-11-26T17:00:00Z"));
        assert_eq!(q.limit, DEFAULT_LIMIT);
        assert_eq!(q.order, Order::Asc);
        assert_eq!(q.interval, Interval::M1);
        assert!(q.after.is_none());
        let same_day = parse_json(
            RecordType::Tick,
            json!({"symbol": "FPT", "from": "2026-11-26", "to": "2026-11-26"}),
        )
        .unwrap();
        assert_eq!(same_day.to - same_day.from, chrono::Duration::days(1));
    }

    #[test]
    fn timestamps_are_taken_as_they_are_and_to_is_exclusive() {
        let q = parse_json(
            RecordType::Candle,
            json!({"symbol": "FPT", "from": "2026-11-26T09:00:00+07:00",
                "to": "2026-11-26T03:00:00.5Z", "order": "DESC", "interval": "5m",
                "limit": 50000.0, "cursor": null, "unknown": [1]}),
        )
        .unwrap();
        assert_eq!(q.from, utc("2026-11-26T02:00:00Z"));
        assert_eq!(q.to, utc("2026-11-26T03:00:00.5Z"));
        assert_eq!(q.order, Order::Desc);
        assert_eq!(q.interval, Interval::M5);
        assert_eq!(q.limit, MAX_LIMIT);
    }

    #[test]
    fn from_within_the_day_of_a_date_to_is_accepted() {
        let q = parse_json(
            RecordType::Tick,
            json!({"symbol": "FPT", "from": "2026-11-26T10:00:00+07:00", "to": "2026-11-26"}),
        )
        .unwrap();
        assert_eq!(q.from, utc("2026-11-26T03:00:00Z"));
        assert_eq!(q.to, utc("2026-11-26T17:00:00Z"));
        // The last instant of the day is still within it; the next day is after it.
        assert!(parse_json(
            RecordType::Tick,
            json!({"symbol": "FPT", "from": "2026-11-26T23:59:59.999999+07:00", "to": "2026-11-26"}),
        )
        .is_ok());
        for from in ["2026-11-27T00:00:00+07:00", "2026-11-27"] {
            let m = message(parse_json(
                RecordType::Tick,
                json!({"symbol": "FPT", "from": from, "to": "2026-11-26"}),
            ));
            assert!(m.contains("`from`"), "{from}: {m}");
        }
        // An RFC 3339 `to`: only a `from` after it is refused.
        let m = message(parse_json(
            RecordType::Tick,
            json!({"symbol": "FPT", "from": "2026-11-26T10:00:00.000001+07:00",
                "to": "2026-11-26T10:00:00+07:00"}),
        ));
        assert!(m.contains("`from`"), "{m}");
        assert!(parse_json(
            RecordType::Tick,
            json!({"symbol": "FPT", "from": "2026-11-26T10:00:00+07:00",
                "to": "2026-11-26T03:00:00Z"}),
        )
        .is_ok());
    }

    #[test]
    fn each_bad_field_is_named() {
        let base = json!({"symbol": "FPT", "from": "2026-11-20", "to": "2026-11-26"});
        let cases: Vec<(&str, Json, &str)> = vec![
            ("symbol", json!("FPT'; DROP TABLE tick_data;--"), "symbol"),
            ("symbol", json!("ĐHG"), "symbol"),
            ("symbol", json!("A".repeat(10_000)), "symbol"),
            ("symbol", json!(123), "symbol"),
            ("symbol", Json::Null, "symbol"),
            ("from", json!("2026-13-01"), "from"),
            ("from", json!(1764123303123i64), "from"),
            ("to", json!("yesterday"), "to"),
            ("to", json!("2026-11-19"), "from"),
            ("limit", json!(50_001), "limit"),
            ("limit", json!(0), "limit"),
            ("limit", json!(-5), "limit"),
            ("limit", json!(1.5), "limit"),
            ("limit", json!("100"), "limit"),
            ("order", json!("up"), "order"),
            ("order", json!(1), "order"),
            ("interval", json!("5m"), "interval"),
            ("cursor", json!(7), "cursor"),
            ("cursor", json!("not-a-cursor"), "cursor"),
        ];
        for (field, value, named) in cases {
            let mut body = base.clone();
            body[field] = value.clone();
            let m = message(parse_json(RecordType::Tick, body));
            assert!(m.contains(&format!("`{named}`")), "{field}={value}: {m}");
            assert!(m.len() < 300, "{m}");
        }
        let m = message(parse_json(
            RecordType::Candle,
            json!({"symbol": "FPT", "from": "2026-11-20", "to": "2026-11-26", "interval": "2m"}),
        ));
        assert!(m.contains("`interval`"), "{m}");
        for body in [&b"not json"[..], b"[1,2]", b"\"FPT\"", b"", b"{"] {
            let m = message(parse(RecordType::Tick, body));
            assert!(m.contains("JSON object"), "{m}");
        }
    }

    #[test]
    fn bounds_stay_in_the_years_1_to_9999() {
        let with = |from: &str, to: &str| {
            parse_json(
                RecordType::Candle,
                json!({"symbol": "FPT", "from": from, "to": to}),
            )
        };
        let first = with("0001-01-01", "0001-01-01").unwrap();
        assert_eq!(first.from.timestamp_micros(), EARLIEST_MICROS);
        assert_eq!(first.from, utc("0000-12-31T17:00:00Z"));
        assert!(with("0001-01-01T00:00:00+07:00", "0001-01-02").is_ok());
        let last = with("9999-12-31", "9999-12-31T23:59:59.999999Z").unwrap();
        assert_eq!(last.to, utc("9999-12-31T23:59:59.999999Z"));
        assert!(with("9999-12-31", "9999-12-31").is_ok());
        for (from, to, named) in [
            ("-262000-01-01", "2026-11-26", "`from`"),
            ("0000-01-01", "2026-11-26", "`from`"),
            ("0000-12-31", "2026-11-26", "`from`"),
            ("0000-12-31T16:59:59.999999Z", "2026-11-26", "`from`"),
            ("-0001-01-01T00:00:00Z", "2026-11-26", "`from`"),
            ("2026-11-26", "10000-01-01", "`to`"),
            ("2026-11-26", "+10000-01-01", "`to`"),
            ("2026-11-26", "10000-01-01T00:00:00.000001Z", "`to`"),
            ("2026-11-26", "+262143-12-31", "`to`"),
            ("2026-11-26", "9999-12-31T23:00:00-12:00", "`to`"),
        ] {
            let m = message(with(from, to));
            assert!(m.contains(named), "{from} {to}: {m}");
            assert!(m.contains("0001 to 9999"), "{m}");
        }
    }

    #[test]
    fn latest_takes_a_kind_and_an_optional_watch_list() {
        let q = parse_latest(
            br#"{"kind": " Candles ", "symbols": [" fpt", "VNM", "FPT", "vn30f2412"]}"#,
        )
        .unwrap();
        assert_eq!(q.spec.record_type, RecordType::Candle);
        assert_eq!(
            q.symbols.unwrap(),
            vec!["FPT".to_string(), "VNM".into(), "VN30F2412".into()]
        );
        for body in [
            &br#"{"kind": "ticks"}"#[..],
            br#"{"kind": "ticks", "symbols": null}"#,
        ] {
            assert!(parse_latest(body).unwrap().symbols.is_none());
        }
        assert_eq!(
            parse_latest(br#"{"kind": "index", "symbols": []}"#)
                .unwrap()
                .symbols,
            Some(vec![])
        );
        let full: Vec<String> = (0..MAX_SYMBOLS).map(|i| format!("S{i}")).collect();
        let body = json!({"kind": "derivatives", "symbols": full}).to_string();
        assert_eq!(
            parse_latest(body.as_bytes())
                .unwrap()
                .symbols
                .unwrap()
                .len(),
            MAX_SYMBOLS
        );
        assert_eq!(
            parse_symbols(br#"{"kind": "foreign"}"#)
                .unwrap()
                .spec
                .record_type,
            RecordType::Foreign
        );
        assert_eq!(
            requested_kind(br#"{"kind": "ticks", "symbols": 5}"#),
            Some(RecordType::Tick)
        );
        assert_eq!(requested_kind(br#"{"kind": "tick"}"#), None);
    }

    #[test]
    fn latest_and_symbols_name_the_bad_field() {
        let too_many: Vec<String> = (0..=MAX_SYMBOLS).map(|i| format!("S{i}")).collect();
        let cases: Vec<(Json, &str)> = vec![
            (json!({"symbols": ["FPT"]}), "`kind`"),
            (json!({"kind": "tick"}), "`kind`"),
            (json!({"kind": 5}), "`kind`"),
            (json!({"kind": "ticks", "symbols": "FPT"}), "`symbols`"),
            (
                json!({"kind": "ticks", "symbols": ["FPT", 7]}),
                "`symbols` item 2",
            ),
            (
                json!({"kind": "ticks", "symbols": ["FPT.X"]}),
                "`symbols` item 1",
            ),
            (json!({"kind": "ticks", "symbols": too_many}), "at most 500"),
        ];
        for (body, named) in cases {
            let m = message(parse_latest(body.to_string().as_bytes()));
            assert!(m.contains(named), "{body}: {m}");
            assert!(m.len() < 300, "{m}");
        }
        for body in [&b"[]"[..], b"nope", b""] {
            assert!(parse_latest(body).is_err());
            assert!(parse_symbols(body).is_err());
        }
        assert!(message(parse_symbols(br#"{"kind": "bars"}"#)).contains("`kind`"));
    }

    #[test]
    fn a_cursor_must_come_from_the_same_query() {
        let base = json!({"symbol": "FPT", "from": "2026-11-20", "to": "2026-11-26"});
        let q = parse_json(RecordType::Tick, base.clone()).unwrap();
        let cursor = q
            .cursor_after(utc("2026-11-21T02:00:00Z"), Some(5))
            .encode();
        let mut again = base.clone();
        again["cursor"] = json!(cursor);
        let resumed = parse_json(RecordType::Tick, again.clone()).unwrap();
        assert_eq!(resumed.after.unwrap().seq, Some(5));
        again["order"] = json!("desc");
        assert!(message(parse_json(RecordType::Tick, again.clone())).contains("`cursor`"));
        again["order"] = json!("asc");
        again["symbol"] = json!("VNM");
        assert!(message(parse_json(RecordType::Tick, again.clone())).contains("`cursor`"));
        again["symbol"] = json!("FPT");
        assert!(message(parse_json(RecordType::Foreign, again)).contains("`cursor`"));
    }
}
