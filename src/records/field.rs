//! Field rules: how one JSON value becomes a checked column [`Value`], and
//! how a value is written in PostgreSQL's COPY text format.

use std::fmt::Write as _;

use std::borrow::Cow;

use chrono::{DateTime, Datelike, SecondsFormat, Timelike, Utc};
use serde_json::Value as Json;

use super::rows::{Cell, Checked, Scalar};

/// Why a record (or a whole message) was not written: the metric's `reason`
/// label and the `Tickvault-Reject-Reason` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// The payload is not UTF-8 JSON.
    InvalidJson,
    /// Valid JSON, but neither a record object nor an array of them.
    InvalidShape,
    /// An array with no record in it.
    EmptyMessage,
    /// The payload is larger than `ingest.max_message_bytes`.
    TooLarge,
    /// The array holds more than `ingest.max_records_per_message` records.
    TooManyRecords,
    MissingField,
    InvalidValue,
    InvalidSymbol,
    /// PostgreSQL refused the row although it passed every rule.
    DatabaseRejected,
}

impl RejectReason {
    pub const ALL: [RejectReason; 9] = [
        RejectReason::InvalidJson,
        RejectReason::InvalidShape,
        RejectReason::EmptyMessage,
        RejectReason::TooLarge,
        RejectReason::TooManyRecords,
        RejectReason::MissingField,
        RejectReason::InvalidValue,
        RejectReason::InvalidSymbol,
        RejectReason::DatabaseRejected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::InvalidJson => "invalid_json",
            RejectReason::InvalidShape => "invalid_shape",
            RejectReason::EmptyMessage => "empty_message",
            RejectReason::TooLarge => "too_large",
            RejectReason::TooManyRecords => "too_many_records",
            RejectReason::MissingField => "missing_field",
            RejectReason::InvalidValue => "invalid_value",
            RejectReason::InvalidSymbol => "invalid_symbol",
            RejectReason::DatabaseRejected => "database_rejected",
        }
    }
}

/// A rejection: the fixed reason plus a human explanation naming the field.
#[derive(Debug, Clone, PartialEq)]
pub struct Reject {
    pub reason: RejectReason,
    pub detail: String,
}

impl Reject {
    pub fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

/// The rule one field follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    /// Trimmed, upper-cased, `^[A-Z0-9][A-Z0-9_-]{0,31}$`.
    Symbol,
    /// RFC 3339 with an offset, or integer epoch milliseconds.
    Timestamp,
    /// A finite number > 0.
    Positive,
    /// A finite number >= 0.
    NonNegative,
    /// Any finite number.
    Finite,
    /// An integer > 0.
    PositiveInt,
    /// An integer >= 0.
    NonNegativeInt,
    /// `buy`, `sell` or `unknown`.
    Side,
}

/// A checked column value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Text(String),
    Timestamp(DateTime<Utc>),
    Float(f64),
    Int(i64),
    Null,
}

impl Value {
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Float(v) => Some(*v),
            Value::Int(v) => Some(*v as f64),
            _ => None,
        }
    }

    /// Appends the value in COPY text format (no delimiter).
    pub fn write_copy_text(&self, out: &mut String) {
        match self {
            Value::Text(text) => {
                for c in text.chars() {
                    match c {
                        '\\' => out.push_str("\\\\"),
                        '\t' => out.push_str("\\t"),
                        '\n' => out.push_str("\\n"),
                        '\r' => out.push_str("\\r"),
                        c => out.push(c),
                    }
                }
            }
            // Field by field: chrono's `format` reads its pattern anew for
            // every value, and this runs for every row written. Years are
            // 1..=9999 (parse_timestamp refuses the others).
            Value::Timestamp(ts) => {
                let _ = write!(
                    out,
                    "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:06}+00",
                    ts.year(),
                    ts.month(),
                    ts.day(),
                    ts.hour(),
                    ts.minute(),
                    ts.second(),
                    ts.timestamp_subsec_micros()
                );
            }
            // `{:?}` on f64 prints the shortest text that reads back to the
            // same value, with an exponent for very large or small ones
            // (`5e-324`, `1.7976931348623157e308`, `-0.0`): stored bit for bit.
            Value::Float(v) => {
                let _ = write!(out, "{v:?}");
            }
            Value::Int(v) => {
                let _ = write!(out, "{v}");
            }
            Value::Null => out.push_str("\\N"),
        }
    }

    /// The value as it appears in a history reply.
    pub fn to_json(&self) -> Json {
        match self {
            Value::Text(text) => Json::String(text.clone()),
            Value::Timestamp(ts) => Json::String(format_timestamp(ts)),
            Value::Float(v) => serde_json::Number::from_f64(*v)
                .map(Json::Number)
                .unwrap_or(Json::Null),
            Value::Int(v) => Json::from(*v),
            Value::Null => Json::Null,
        }
    }
}

/// Appends one COPY text row: the values tab-separated, then a newline.
pub fn write_copy_row<'a>(values: impl IntoIterator<Item = &'a Value>, out: &mut String) {
    for (i, value) in values.into_iter().enumerate() {
        if i > 0 {
            out.push('\t');
        }
        value.write_copy_text(out);
    }
    out.push('\n');
}

/// RFC 3339 in UTC with as many fractional digits as needed (`...Z`).
pub fn format_timestamp(ts: &DateTime<Utc>) -> String {
    ts.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// The first and the last instant PostgreSQL-storable years 1 to 9999
/// allow, in microseconds since the Unix epoch.
const FIRST_MICROS: i64 = -62_135_596_800_000_000;
const END_MICROS: i64 = 253_402_300_800_000_000;

/// Parses the contract's two timestamp forms into microseconds since the
/// Unix epoch. Sub-microsecond digits are truncated, since PostgreSQL keeps
/// microseconds.
pub fn parse_timestamp(value: &Scalar<'_>) -> Result<i64, String> {
    let micros = match value {
        Scalar::Str(text) => DateTime::parse_from_rfc3339(text.trim())
            .map(|ts| ts.timestamp_micros())
            .map_err(|_| {
                "must be an RFC 3339 timestamp with an offset or epoch milliseconds".to_string()
            })?,
        Scalar::Int(_) | Scalar::UInt(_) | Scalar::Float(_) => {
            let millis = integer(value).map_err(|rule| format!("epoch milliseconds {rule}"))?;
            millis
                .checked_mul(1000)
                .ok_or("epoch milliseconds out of range")?
        }
        _ => return Err("must be an RFC 3339 string or epoch milliseconds".into()),
    };
    if micros < FIRST_MICROS {
        return Err("is before year 1, which PostgreSQL cannot store".into());
    }
    if micros >= END_MICROS {
        return Err("is out of the supported range".into());
    }
    Ok(micros)
}

/// A JSON number with no fractional part, stored exactly as an `i64`, or
/// why not. Never wrapped or rounded: an integer outside the signed 64-bit
/// range is refused, and one written with a fraction or an exponent
/// (`100.0`, `1e3`) only below 2^53, where a double still holds every
/// integer exactly. (Such a number is read as a double first, so digits
/// beyond a double's precision, as in `1.00000000000000001`, are not seen.)
fn integer(value: &Scalar<'_>) -> Result<i64, &'static str> {
    const NOT_AN_INTEGER: &str = "must be an integer";
    const OUT_OF_RANGE: &str =
        "is outside the signed 64-bit integer range (-9223372036854775808..=9223372036854775807)";
    let v = match *value {
        Scalar::Int(v) => return Ok(v),
        Scalar::UInt(v) => return i64::try_from(v).map_err(|_| OUT_OF_RANGE),
        Scalar::Float(v) => v,
        _ => return Err(NOT_AN_INTEGER),
    };
    if v.fract() != 0.0 || !v.is_finite() {
        return Err(NOT_AN_INTEGER);
    }
    const TWO_POW_53: f64 = 9_007_199_254_740_992.0;
    const TWO_POW_63: f64 = 9_223_372_036_854_775_808.0;
    if v.abs() >= TWO_POW_63 {
        Err(OUT_OF_RANGE)
    } else if v.abs() >= TWO_POW_53 {
        Err("cannot be read exactly when written with a fraction or an exponent from 2^53 up: write it as a plain integer")
    } else {
        Ok(v as i64)
    }
}

const SIDES: [&str; 3] = ["buy", "sell", "unknown"];

impl FieldType {
    /// The JSON value a text cell (a CSV field) spells for this rule:
    /// identifiers and sides are strings; for the others, a number when the
    /// text reads as a JSON number (`97.5`, `1764123303123`), else the text
    /// itself, which the rule then reads (a timestamp) or refuses, naming
    /// the field.
    pub fn json_from_text(self, text: &str) -> Json {
        match self {
            FieldType::Symbol | FieldType::Side => Json::String(text.to_string()),
            _ => text
                .parse::<serde_json::Number>()
                .map(Json::Number)
                .unwrap_or_else(|_| Json::String(text.to_string())),
        }
    }

    /// Checks one present, non-null JSON value.
    pub fn parse<'a>(self, name: &str, value: &Scalar<'a>) -> Result<Checked<'a>, Reject> {
        let invalid =
            |rule: &str| Reject::new(RejectReason::InvalidValue, format!("field `{name}` {rule}"));
        match self {
            FieldType::Symbol => {
                let text = value.as_str().ok_or_else(|| {
                    Reject::new(
                        RejectReason::InvalidSymbol,
                        format!("field `{name}` must be a string"),
                    )
                })?;
                let trimmed = text.trim();
                let symbol = if trimmed.bytes().any(|b| b.is_ascii_lowercase()) {
                    Cow::Owned(trimmed.to_ascii_uppercase())
                } else {
                    match value {
                        Scalar::Str(Cow::Borrowed(text)) => Cow::Borrowed(text.trim()),
                        _ => Cow::Owned(trimmed.to_owned()),
                    }
                };
                if is_symbol(&symbol) {
                    Ok(Checked::Text(symbol))
                } else {
                    Err(Reject::new(
                        RejectReason::InvalidSymbol,
                        format!("field `{name}` must match ^[A-Z0-9][A-Z0-9_-]{{0,31}}$"),
                    ))
                }
            }
            FieldType::Timestamp => parse_timestamp(value)
                .map(|micros| Checked::Cell(Cell::Timestamp(micros)))
                .map_err(|rule| invalid(&rule)),
            FieldType::Positive | FieldType::NonNegative | FieldType::Finite => {
                let v = value
                    .as_f64()
                    .filter(|v| v.is_finite())
                    .ok_or_else(|| invalid("must be a finite number"))?;
                match self {
                    FieldType::Positive if v <= 0.0 => Err(invalid("must be > 0")),
                    FieldType::NonNegative if v < 0.0 => Err(invalid("must be >= 0")),
                    _ => Ok(Checked::Cell(Cell::Float(v))),
                }
            }
            FieldType::PositiveInt | FieldType::NonNegativeInt => {
                let v = integer(value).map_err(invalid)?;
                match self {
                    FieldType::PositiveInt if v <= 0 => Err(invalid("must be > 0")),
                    FieldType::NonNegativeInt if v < 0 => Err(invalid("must be >= 0")),
                    _ => Ok(Checked::Cell(Cell::Int(v))),
                }
            }
            FieldType::Side => value
                .as_str()
                .map(str::trim)
                .and_then(|side| SIDES.into_iter().find(|s| s.eq_ignore_ascii_case(side)))
                .map(|side| Checked::Text(Cow::Borrowed(side)))
                .ok_or_else(|| invalid("must be \"buy\", \"sell\" or \"unknown\"")),
        }
    }
}

/// `^[A-Z0-9][A-Z0-9_-]{0,31}$`
pub fn is_symbol(symbol: &str) -> bool {
    let bytes = symbol.as_bytes();
    (1..=32).contains(&bytes.len())
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || *b == b'_' || *b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn timestamp(json: Json) -> Result<i64, String> {
        parse_timestamp(&Scalar::from_json(&json))
    }

    #[test]
    fn both_timestamp_forms_give_the_same_instant() {
        let text = timestamp(json!("2026-11-26T09:15:03.123+07:00")).unwrap();
        let millis = timestamp(json!(text / 1000)).unwrap();
        let float_millis = timestamp(json!((text / 1000) as f64)).unwrap();
        assert_eq!(text, millis);
        assert_eq!(text, float_millis);
        let ts = DateTime::from_timestamp_micros(text).unwrap();
        assert_eq!(format_timestamp(&ts), "2026-11-26T02:15:03.123Z");
        assert!(
            timestamp(json!("2026-11-26T09:15:03")).is_err(),
            "offset required"
        );
        assert!(timestamp(json!(1.5)).is_err());
        assert!(timestamp(json!(i64::MAX)).is_err());
        assert!(timestamp(json!(true)).is_err());
        assert!(timestamp(json!(-62_167_219_200_000i64)).is_err(), "year 0");
        assert!(timestamp(json!(-62_135_596_800_000i64)).is_ok(), "year 1");
        assert!(
            timestamp(json!("9999-12-31T23:59:59.999999Z")).is_ok(),
            "year 9999"
        );
        assert!(timestamp(json!("+10000-01-01T00:00:00Z")).is_err());
        assert_eq!(
            timestamp(json!("2026-11-26T09:15:03.1234567+07:00")).unwrap() % 1_000_000,
            123_456,
            "sub-microsecond digits are truncated"
        );
    }

    fn parsed(text: &str) -> Result<i64, &'static str> {
        integer(&Scalar::from_json(&serde_json::from_str(text).unwrap()))
    }

    #[test]
    fn integers_are_exact_or_refused_never_wrapped_or_rounded() {
        assert_eq!(parsed("100"), Ok(100));
        assert_eq!(parsed("100.0"), Ok(100));
        assert_eq!(parsed("1e3"), Ok(1000));
        assert_eq!(parsed("-9223372036854775808"), Ok(i64::MIN));
        assert_eq!(parsed("9223372036854775807"), Ok(i64::MAX));
        assert_eq!(parsed("9007199254740991.0"), Ok((1 << 53) - 1));
        assert_eq!(parsed("100.5"), Err("must be an integer"));
        for out_of_range in [
            "9223372036854775808",
            "18446744073709551615",
            "-9223372036854775809",
            "1e19",
            "1e300",
            "99999999999999999999999",
        ] {
            let refused = parsed(out_of_range).unwrap_err();
            assert!(refused.contains("outside"), "{out_of_range}: {refused}");
        }
        // 2^53 + 1 written as a float would be read as 2^53: refused instead.
        assert!(parsed("9007199254740993.0")
            .unwrap_err()
            .contains("plain integer"));
        let reject = FieldType::NonNegativeInt
            .parse(
                "volume",
                &Scalar::from_json(&serde_json::from_str("9223372036854775808").unwrap()),
            )
            .err()
            .unwrap();
        assert_eq!(reject.reason, RejectReason::InvalidValue);
        assert!(
            reject.detail.starts_with("field `volume` is outside"),
            "{}",
            reject.detail
        );
    }

    #[test]
    fn floats_are_copied_with_every_bit() {
        let values = [
            13.841000000000001,
            0.1 + 0.2,
            5e-324,
            2.2250738585072014e-308,
            1.7976931348623157e308,
            -0.0,
            1e16,
            123456789012345680.0,
        ];
        for v in values {
            let mut text = String::new();
            Value::Float(v).write_copy_text(&mut text);
            let back: f64 = text.parse().unwrap();
            assert_eq!(back.to_bits(), v.to_bits(), "{v} as {text}");
            assert!(text.len() <= 24, "{text}: compact");
            let json: Json = serde_json::from_str(&serde_json::to_string(&v).unwrap()).unwrap();
            assert_eq!(json.as_f64().unwrap().to_bits(), v.to_bits(), "JSON {v}");
        }
        // serde_json reads the closest double (its float_roundtrip feature).
        let read: Json = serde_json::from_str("13.841000000000001").unwrap();
        assert_eq!(read.as_f64(), Some(13.841000000000001));
        assert_ne!(read.as_f64(), Some(13.841));
    }

    #[test]
    fn symbols_follow_the_contract_pattern() {
        for ok in ["FPT", "VN30F2412", "A", "X_Y-Z", &"A".repeat(32)] {
            assert!(is_symbol(ok), "{ok}");
        }
        for bad in [
            "",
            "-FPT",
            "FP T",
            "FPT.X",
            "fpt",
            "ĐHG",
            &"A".repeat(33),
            "A;DROP",
        ] {
            assert!(!is_symbol(bad), "{bad}");
        }
    }

    #[test]
    fn copy_text_escapes_and_formats() {
        let mut out = String::new();
        for v in [
            Value::Text("a\tb\\".into()),
            Value::Null,
            Value::Float(0.1),
            Value::Int(-3),
            Value::Timestamp(DateTime::from_timestamp_micros(1).unwrap()),
            Value::Timestamp(
                DateTime::parse_from_rfc3339("0001-02-03T04:05:06.789+07:00")
                    .unwrap()
                    .into(),
            ),
        ] {
            v.write_copy_text(&mut out);
            out.push('|');
        }
        assert_eq!(
            out,
            "a\\tb\\\\|\\N|0.1|-3|1970-01-01 00:00:00.000001+00|0001-02-02 21:05:06.789000+00|"
        );
    }
}
