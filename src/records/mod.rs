//! The five record types. Everything that differs between them — fields,
//! rules, table, key, conflict rule, subjects — is data in [`RecordSpec`],
//! read by the one generic ingest pipeline and the one history service.

mod field;
pub mod rows;

pub use field::{
    format_timestamp, is_symbol, parse_timestamp, write_copy_row, FieldType, Reject, RejectReason,
    Value,
};
pub use rows::{Cell, KeyHashing, Row, Rows};

use serde_json::Value as Json;

use rows::{Checked, Scalar};

/// One of the five market-data types; its [`name`](RecordType::name) is the
/// subject token, metric label, `/health` key and dead-letter subject token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RecordType {
    Tick,
    Candle,
    Foreign,
    Index,
    Deriv,
}

/// What happens when a row's key is already stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conflict {
    /// The stored row stays: a re-sent trade is a duplicate.
    KeepFirst,
    /// The version from the higher JetStream stream sequence wins (`stream_seq` column).
    NewestWins,
}

/// One column: its JSON field name (equal to the column name) and rule.
#[derive(Debug)]
pub struct Field {
    pub name: &'static str,
    pub ty: FieldType,
    pub required: bool,
    /// The largest magnitude accepted, beyond the type's rule (`None`: any).
    pub max: Option<f64>,
}

const fn req(name: &'static str, ty: FieldType) -> Field {
    Field {
        name,
        ty,
        required: true,
        max: None,
    }
}

const fn opt(name: &'static str, ty: FieldType) -> Field {
    Field {
        name,
        ty,
        required: false,
        max: None,
    }
}

/// The largest volume, share count or contract count accepted: 10^15, over
/// 100,000 times the shares of the largest listed company, and small enough
/// that a whole day of 1-minute candles at this bound (1.44e18) sums within
/// a BIGINT (9.2e18).
pub const MAX_QUANTITY: f64 = 1e15;

impl Field {
    /// The same field, refusing magnitudes above `max`.
    const fn at_most(self, max: f64) -> Field {
        Field {
            max: Some(max),
            ..self
        }
    }

    /// Parses a present, non-null value with the field's rule and bound.
    fn parse<'a>(&self, value: &Scalar<'a>) -> Result<Checked<'a>, Reject> {
        let checked = self.ty.parse(self.name, value)?;
        let number = match &checked {
            Checked::Cell(cell) => cell.as_f64(),
            Checked::Text(_) => None,
        };
        match (self.max, number) {
            (Some(max), Some(v)) if v.abs() > max => Err(Reject::new(
                RejectReason::InvalidValue,
                format!(
                    "field `{}` must be at most {max:e} in magnitude, the bound that keeps stored values aggregatable",
                    self.name
                ),
            )),
            _ => Ok(checked),
        }
    }
}

/// Everything tickvault knows about one record type.
#[derive(Debug)]
pub struct RecordSpec {
    pub record_type: RecordType,
    pub table: &'static str,
    /// Name of the history endpoint (`history.<kind>`) and its metric label.
    pub history_kind: &'static str,
    /// Columns in table order; the first is the identifier, the second `timestamp`.
    pub fields: &'static [Field],
    /// The unique key, as column names: the identifier, `timestamp`, then the rest.
    pub key: &'static [&'static str],
    /// TimescaleDB only: the time span of one hypertable chunk (a day for
    /// ticks, the busiest type; a week for the others).
    pub chunk_interval: &'static str,
    pub conflict: Conflict,
    /// A rule across fields, run after each field passed its own.
    pub check: fn(&[Cell]) -> Result<(), Reject>,
}

fn no_cross_field_rule(_: &[Cell]) -> Result<(), Reject> {
    Ok(())
}

/// A candle's low is at most its open and close, which are at most its high.
fn candle_range(row: &[Cell]) -> Result<(), Reject> {
    let [open, high, low, close] = [2, 3, 4, 5].map(|i| row[i].as_f64().unwrap_or(f64::NAN));
    if low <= open && low <= close && open <= high && close <= high {
        Ok(())
    } else {
        Err(Reject::new(
            RejectReason::InvalidValue,
            "candle must satisfy low <= open, close <= high",
        ))
    }
}

use FieldType::*;

const TICK: RecordSpec = RecordSpec {
    record_type: RecordType::Tick,
    table: "tick_data",
    history_kind: "ticks",
    fields: &[
        req("symbol", Symbol),
        req("timestamp", Timestamp),
        req("price", Positive),
        req("volume", PositiveInt).at_most(MAX_QUANTITY),
        req("side", Side),
        req("seq", NonNegativeInt),
    ],
    key: &["symbol", "timestamp", "seq"],
    chunk_interval: "1 day",
    conflict: Conflict::KeepFirst,
    check: no_cross_field_rule,
};

const CANDLE: RecordSpec = RecordSpec {
    record_type: RecordType::Candle,
    table: "candles_1m",
    history_kind: "candles",
    fields: &[
        req("symbol", Symbol),
        req("timestamp", Timestamp),
        req("open", Positive),
        req("high", Positive),
        req("low", Positive),
        req("close", Positive),
        req("volume", NonNegativeInt).at_most(MAX_QUANTITY),
        opt("value", NonNegative),
    ],
    key: &["symbol", "timestamp"],
    chunk_interval: "7 days",
    conflict: Conflict::NewestWins,
    check: candle_range,
};

const FOREIGN: RecordSpec = RecordSpec {
    record_type: RecordType::Foreign,
    table: "foreign_flow",
    history_kind: "foreign",
    fields: &[
        req("symbol", Symbol),
        req("timestamp", Timestamp),
        req("buy_volume", NonNegativeInt).at_most(MAX_QUANTITY),
        req("sell_volume", NonNegativeInt).at_most(MAX_QUANTITY),
        req("buy_value", NonNegative),
        req("sell_value", NonNegative),
        opt("room", NonNegativeInt).at_most(MAX_QUANTITY),
    ],
    key: &["symbol", "timestamp"],
    chunk_interval: "7 days",
    conflict: Conflict::NewestWins,
    check: no_cross_field_rule,
};

const INDEX: RecordSpec = RecordSpec {
    record_type: RecordType::Index,
    table: "index_snapshots",
    history_kind: "index",
    fields: &[
        req("index_name", Symbol),
        req("timestamp", Timestamp),
        req("value", Positive),
        req("change", Finite),
        req("change_pct", Finite),
        req("volume", NonNegativeInt).at_most(MAX_QUANTITY),
        req("traded_value", NonNegative),
        opt("advances", NonNegativeInt).at_most(MAX_QUANTITY),
        opt("declines", NonNegativeInt).at_most(MAX_QUANTITY),
        opt("unchanged", NonNegativeInt).at_most(MAX_QUANTITY),
    ],
    key: &["index_name", "timestamp"],
    chunk_interval: "7 days",
    conflict: Conflict::NewestWins,
    check: no_cross_field_rule,
};

const DERIV: RecordSpec = RecordSpec {
    record_type: RecordType::Deriv,
    table: "derivatives",
    history_kind: "derivatives",
    fields: &[
        req("contract", Symbol),
        req("timestamp", Timestamp),
        req("price", Positive),
        req("basis", Finite),
        req("open_interest", NonNegativeInt).at_most(MAX_QUANTITY),
        req("volume", NonNegativeInt).at_most(MAX_QUANTITY),
    ],
    key: &["contract", "timestamp"],
    chunk_interval: "7 days",
    conflict: Conflict::NewestWins,
    check: no_cross_field_rule,
};

impl RecordType {
    pub const ALL: [RecordType; 5] = [
        RecordType::Tick,
        RecordType::Candle,
        RecordType::Foreign,
        RecordType::Index,
        RecordType::Deriv,
    ];

    pub const fn spec(self) -> &'static RecordSpec {
        match self {
            RecordType::Tick => &TICK,
            RecordType::Candle => &CANDLE,
            RecordType::Foreign => &FOREIGN,
            RecordType::Index => &INDEX,
            RecordType::Deriv => &DERIV,
        }
    }

    /// The contract's type name: `tick`, `candle`, `foreign`, `index`, `deriv`.
    pub fn name(self) -> &'static str {
        match self {
            RecordType::Tick => "tick",
            RecordType::Candle => "candle",
            RecordType::Foreign => "foreign",
            RecordType::Index => "index",
            RecordType::Deriv => "deriv",
        }
    }

    pub fn from_name(name: &str) -> Option<RecordType> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }
}

impl RecordSpec {
    /// The identifier column: `symbol`, `index_name` or `contract`.
    pub fn id_field(&self) -> &'static str {
        self.fields[0].name
    }

    pub fn column_names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.fields.iter().map(|f| f.name)
    }

    /// The key's columns quoted for SQL: `"symbol", "timestamp"`.
    pub fn key_list(&self) -> String {
        quoted_list(self.key.iter().copied())
    }

    /// Every column quoted for SQL, in row order.
    pub fn column_list(&self) -> String {
        quoted_list(self.column_names())
    }

    /// Positions of the key columns within a row.
    pub fn key_positions(&self) -> Vec<usize> {
        self.key
            .iter()
            .map(|k| {
                self.fields
                    .iter()
                    .position(|f| f.name == *k)
                    .expect("every key column is a field")
            })
            .collect()
    }

    /// Validates one JSON record into a row of [`Value`]s in column order
    /// (the same rules [`rows::read_payload`] applies to a payload).
    pub fn parse_record(&self, record: &Json) -> Result<Vec<Value>, Reject> {
        let mut rows = Rows::new(self);
        rows::push_json_record(self, record, &mut rows)?;
        Ok(rows.row(0).values())
    }

    /// Validates one record given as text, such as a CSV line: `cell(i)` is
    /// the text of the `i`-th of [`fields`](Self::fields), `None` or blank
    /// when absent. Each cell becomes the JSON value it spells
    /// ([`FieldType::json_from_text`]), so text follows exactly the rules
    /// of [`parse_record`](Self::parse_record).
    pub fn parse_text_record<'t>(
        &self,
        cell: impl Fn(usize) -> Option<&'t str>,
    ) -> Result<Vec<Value>, Reject> {
        let spelled: Vec<Option<Json>> = self
            .fields
            .iter()
            .enumerate()
            .map(|(i, field)| {
                let text = cell(i)?.trim();
                (!text.is_empty()).then(|| field.ty.json_from_text(text))
            })
            .collect();
        let mut rows = Rows::new(self);
        rows::push_scalars(
            self,
            spelled
                .iter()
                .map(|json| json.as_ref().map_or(Scalar::Null, Scalar::from_json)),
            &mut rows,
        )?;
        Ok(rows.row(0).values())
    }
}

/// The most fields of any record type.
const fn max_fields() -> usize {
    let mut max = 0;
    let mut i = 0;
    while i < RecordType::ALL.len() {
        let fields = RecordType::ALL[i].spec().fields.len();
        if fields > max {
            max = fields;
        }
        i += 1;
    }
    max
}

fn quoted_list<'a>(names: impl Iterator<Item = &'a str>) -> String {
    names
        .map(|n| format!("\"{n}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::DateTime;
    use serde_json::json;

    #[test]
    fn every_key_column_is_a_field_and_names_round_trip() {
        for t in RecordType::ALL {
            let spec = t.spec();
            assert_eq!(spec.record_type, t);
            assert_eq!(spec.key_positions().len(), spec.key.len());
            assert_eq!(spec.fields[1].name, "timestamp");
            assert_eq!(RecordType::from_name(t.name()), Some(t));
        }
    }

    #[test]
    fn a_tick_parses_in_column_order() {
        let row = TICK
            .parse_record(&json!({"symbol": " fpt ", "timestamp": 1764123303123i64,
                "price": 97.5, "volume": 100.0, "side": "buy", "seq": 7, "extra": true}))
            .unwrap();
        assert_eq!(row[0], Value::Text("FPT".into()));
        assert_eq!(row[3], Value::Int(100));
        assert_eq!(row[4], Value::Text("buy".into()));
        assert_eq!(row[5], Value::Int(7));
    }

    #[test]
    fn text_cells_follow_the_same_rules_as_json() {
        let cells = |texts: &'static [&'static str]| move |i: usize| texts.get(i).copied();
        let from_text = CANDLE
            .parse_text_record(cells(&[
                " fpt ",
                "2026-11-26T09:15:00+07:00",
                "10",
                "12.5",
                "9",
                "11",
                "100",
                "",
            ]))
            .unwrap();
        let from_json = CANDLE
            .parse_record(
                &json!({"symbol": "fpt", "timestamp": "2026-11-26T09:15:00+07:00",
                "open": 10, "high": 12.5, "low": 9, "close": 11, "volume": 100}),
            )
            .unwrap();
        assert_eq!(from_text, from_json);
        assert_eq!(from_text[7], Value::Null, "a blank optional cell is absent");
        let epoch = TICK
            .parse_text_record(cells(&["VNM", "0", "1", "2", "SELL", "3"]))
            .unwrap();
        assert_eq!(epoch[1], Value::Timestamp(DateTime::UNIX_EPOCH));
        assert_eq!(epoch[4], Value::Text("sell".into()));
        let cases: [(&'static [&'static str], RejectReason, &str); 5] = [
            (
                &["FPT", "0", "abc", "1", "buy", "1"],
                RejectReason::InvalidValue,
                "`price` must be a finite number",
            ),
            (
                &["FPT", "0", "1", "1.5", "buy", "1"],
                RejectReason::InvalidValue,
                "`volume` must be an integer",
            ),
            (
                &["FPT", "0", "NaN", "1", "buy", "1"],
                RejectReason::InvalidValue,
                "`price`",
            ),
            (
                &["FPT", "0", "1", "1", "buy", " "],
                RejectReason::MissingField,
                "`seq` is required",
            ),
            (
                &["FPT.X", "0", "1", "1", "buy", "1"],
                RejectReason::InvalidSymbol,
                "`symbol`",
            ),
        ];
        for (texts, reason, detail) in cases {
            let reject = TICK.parse_text_record(cells(texts)).unwrap_err();
            assert_eq!(reject.reason, reason, "{texts:?}");
            assert!(
                reject.detail.contains(detail),
                "{texts:?}: {}",
                reject.detail
            );
        }
    }

    #[test]
    fn rules_reject_with_their_reason() {
        let base = json!({"symbol": "FPT", "timestamp": "2026-11-26T09:15:03+07:00",
            "open": 10, "high": 12, "low": 9, "close": 11, "volume": 5});
        assert!(CANDLE.parse_record(&base).is_ok());
        let cases = [
            ("high", json!(8), RejectReason::InvalidValue),
            ("volume", json!(-1), RejectReason::InvalidValue),
            ("volume", json!(1.5), RejectReason::InvalidValue),
            ("open", json!("10"), RejectReason::InvalidValue),
            ("symbol", json!("FPT.X"), RejectReason::InvalidSymbol),
            (
                "timestamp",
                json!("2026-11-26 09:15"),
                RejectReason::InvalidValue,
            ),
            ("low", Json::Null, RejectReason::MissingField),
        ];
        for (field, value, reason) in cases {
            let mut record = base.clone();
            record[field] = value.clone();
            let reject = CANDLE.parse_record(&record).unwrap_err();
            assert_eq!(reject.reason, reason, "{field}={value}: {}", reject.detail);
        }
        // Floats are any finite double (stored bit for bit); quantities are bounded.
        let at_bounds = CANDLE.parse_record(&json!({"symbol": "FPT", "timestamp": 0,
            "open": 1e308, "high": 1.7976931348623157e308, "low": 1e308, "close": 1e308,
            "volume": 1_000_000_000_000_000i64, "value": 1.7976931348623157e308}));
        assert!(at_bounds.is_ok(), "{at_bounds:?}");
        let too_big = [
            ("volume", json!(1_000_000_000_000_001i64)),
            ("volume", json!(i64::MAX)),
        ];
        for (field, value) in too_big {
            let mut record = base.clone();
            record[field] = value.clone();
            let reject = CANDLE.parse_record(&record).unwrap_err();
            assert_eq!(reject.reason, RejectReason::InvalidValue, "{field}={value}");
            assert!(
                reject
                    .detail
                    .contains(&format!("field `{field}` must be at most")),
                "{field}={value}: {}",
                reject.detail
            );
        }
        let huge_open_interest = DERIV
            .parse_record(
                &json!({"contract": "VN30F2412", "timestamp": 0, "price": 1300,
                "basis": -2e18, "open_interest": 2e15, "volume": 1}),
            )
            .unwrap_err();
        assert!(
            huge_open_interest.detail.contains("`open_interest`"),
            "{}",
            huge_open_interest.detail
        );
        // A feed's trade sequence is an identifier, not a quantity: any i64.
        assert!(TICK
            .parse_record(&json!({"symbol": "FPT", "timestamp": 0, "price": 1,
                "volume": 1, "side": "buy", "seq": i64::MAX}))
            .is_ok());
        let optional_missing = INDEX
            .parse_record(&json!({"index_name": "vn30",
            "timestamp": 0, "value": 1300.5, "change": -2, "change_pct": -0.15,
            "volume": 0, "traded_value": 0}))
            .unwrap();
        assert_eq!(optional_missing[7], Value::Null);
    }
}
