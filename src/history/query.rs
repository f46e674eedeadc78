//! The SQL of a history request, built from the record type's
//! [`RecordSpec`](crate::records::RecordSpec): table, columns and key are
//! data; the request's values are always bind parameters. Rows are written
//! straight into the reply as JSON objects in column order.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgArguments, PgRow};
use sqlx::{Arguments as _, Row as _};

use super::request::{Order, Query, MARKET_OFFSET_SECS};
use crate::records::{format_timestamp, FieldType, RecordSpec};

/// How each candle column is aggregated into a wider bar: open first, close
/// last, high max, low min, volume and value summed (value NULL when every
/// minute's is NULL). `bucket` is the bar's start.
const CANDLE_AGGREGATES: &[(&str, &str)] = &[
    ("symbol", "min(\"symbol\")"),
    ("timestamp", "bucket"),
    (
        "open",
        "(array_agg(\"open\" ORDER BY \"timestamp\" ASC))[1]",
    ),
    ("high", "max(\"high\")"),
    ("low", "min(\"low\")"),
    (
        "close",
        "(array_agg(\"close\" ORDER BY \"timestamp\" DESC))[1]",
    ),
    ("volume", "sum(\"volume\")::BIGINT"),
    ("value", "sum(\"value\")"),
];

/// The origin buckets are aligned to: a midnight in the market time zone,
/// so `1d` bars are market days and `1h` bars start on local hours.
fn bucket_origin() -> String {
    format!(
        "TIMESTAMPTZ '2000-01-01 00:00:00+{:02}'",
        MARKET_OFFSET_SECS / 3600
    )
}

/// The key of a row: what a cursor resumes after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowKey {
    pub timestamp: DateTime<Utc>,
    /// The last key column after `timestamp`, when the key has one (tick `seq`).
    pub seq: Option<i64>,
}

/// The statement and its arguments for `query`, returning at most `fetch` rows.
pub fn build(query: &Query, fetch: i64) -> Result<(String, PgArguments), sqlx::Error> {
    let spec = query.spec;
    let mut args = PgArguments::default();
    let mut n = 0;
    let mut param = || -> String {
        n += 1;
        format!("${n}")
    };
    let mut sql = String::with_capacity(512);
    let id = quote(spec.id_field());
    let ord = query.order.sql();

    let p_symbol = param();
    args.add(query.symbol.as_str())
        .map_err(sqlx::Error::Encode)?;
    let p_from = param();
    args.add(query.from).map_err(sqlx::Error::Encode)?;
    let p_to = param();
    args.add(query.to).map_err(sqlx::Error::Encode)?;
    let range =
        format!("{id} = {p_symbol} AND \"timestamp\" >= {p_from} AND \"timestamp\" < {p_to}");

    if query.aggregated() {
        let p_width = param();
        args.add(query.interval.seconds() as f64)
            .map_err(sqlx::Error::Encode)?;
        let columns = spec
            .fields
            .iter()
            .map(|f| {
                let expr = CANDLE_AGGREGATES
                    .iter()
                    .find(|(name, _)| *name == f.name)
                    .map_or("NULL", |(_, expr)| *expr);
                format!("{expr} AS {}", quote(f.name))
            })
            .collect::<Vec<_>>()
            .join(", ");
        // Buckets are aligned, so "after bucket B" is a bound on the 1-minute rows.
        let resume = match &query.after {
            None => String::new(),
            Some(cursor) => {
                let p = param();
                match query.order {
                    Order::Asc => {
                        // Cursor timestamps are years 1-9999, so this never saturates in practice.
                        let next = cursor
                            .timestamp
                            .checked_add_signed(chrono::Duration::seconds(query.interval.seconds()))
                            .unwrap_or(DateTime::<Utc>::MAX_UTC);
                        args.add(next).map_err(sqlx::Error::Encode)?;
                        format!(" AND \"timestamp\" >= {p}")
                    }
                    Order::Desc => {
                        args.add(cursor.timestamp).map_err(sqlx::Error::Encode)?;
                        format!(" AND \"timestamp\" < {p}")
                    }
                }
            }
        };
        let p_limit = param();
        args.add(fetch).map_err(sqlx::Error::Encode)?;
        let _ = write!(
            sql,
            "SELECT {columns} FROM (SELECT date_bin(make_interval(secs => {p_width}), \"timestamp\", {origin}) AS bucket, * \
             FROM {table} WHERE {range}{resume}) AS minutes \
             GROUP BY bucket ORDER BY bucket {ord} LIMIT {p_limit}",
            origin = bucket_origin(),
            table = quote(spec.table),
        );
        return Ok((sql, args));
    }

    let columns = spec
        .column_names()
        .map(quote)
        .collect::<Vec<_>>()
        .join(", ");
    let sort_keys = &spec.key[1..];
    let resume = match &query.after {
        None => String::new(),
        Some(cursor) => {
            let mut values = Vec::new();
            let p = param();
            args.add(cursor.timestamp).map_err(sqlx::Error::Encode)?;
            values.push(p);
            if sort_keys.len() > 1 {
                let p = param();
                args.add(cursor.seq.unwrap_or_default())
                    .map_err(sqlx::Error::Encode)?;
                values.push(p);
            }
            let op = match query.order {
                Order::Asc => ">",
                Order::Desc => "<",
            };
            format!(
                " AND ({}) {op} ({})",
                sort_keys
                    .iter()
                    .map(|k| quote(k))
                    .collect::<Vec<_>>()
                    .join(", "),
                values.join(", ")
            )
        }
    };
    let order_by = sort_keys
        .iter()
        .map(|k| format!("{} {ord}", quote(k)))
        .collect::<Vec<_>>()
        .join(", ");
    let p_limit = param();
    args.add(fetch).map_err(sqlx::Error::Encode)?;
    let _ = write!(
        sql,
        "SELECT {columns} FROM {table} WHERE {range}{resume} ORDER BY {order_by} LIMIT {p_limit}",
        table = quote(spec.table),
    );
    Ok((sql, args))
}

/// Identifiers come from the record specs, never from a request; quoted anyway.
fn quote(name: &str) -> String {
    format!("\"{name}\"")
}

/// The fewest bytes one row's JSON object can take, used to bound how many
/// rows a reply of `budget` bytes can hold.
pub fn min_row_bytes(spec: &RecordSpec) -> usize {
    let timestamp = "\"1970-01-01T00:00:00Z\"".len();
    1 + spec
        .fields
        .iter()
        .map(|f| {
            let value = if f.ty == FieldType::Timestamp {
                timestamp
            } else {
                1
            };
            f.name.len() + 3 + value + 1
        })
        .sum::<usize>()
}

/// Appends `row` as a JSON object with the record's field names in column
/// order and returns its key.
pub fn write_row(spec: &RecordSpec, row: &PgRow, out: &mut Vec<u8>) -> Result<RowKey, sqlx::Error> {
    let mut key = RowKey {
        timestamp: DateTime::UNIX_EPOCH,
        seq: None,
    };
    let seq_field = (spec.key.len() > 2).then(|| spec.key[spec.key.len() - 1]);
    out.push(b'{');
    for (i, field) in spec.fields.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'"');
        out.extend_from_slice(field.name.as_bytes());
        out.extend_from_slice(b"\":");
        match field.ty {
            FieldType::Symbol | FieldType::Side => {
                let text: Option<String> = row.try_get(i)?;
                json_into(out, &text)?;
            }
            FieldType::Timestamp => {
                let ts: DateTime<Utc> = row.try_get(i)?;
                if field.name == "timestamp" {
                    key.timestamp = ts;
                }
                out.push(b'"');
                out.extend_from_slice(format_timestamp(&ts).as_bytes());
                out.push(b'"');
            }
            FieldType::Positive | FieldType::NonNegative | FieldType::Finite => {
                let v: Option<f64> = row.try_get(i)?;
                json_into(out, &v.filter(|v| v.is_finite()))?;
            }
            FieldType::PositiveInt | FieldType::NonNegativeInt => {
                let v: Option<i64> = row.try_get(i)?;
                if Some(field.name) == seq_field {
                    key.seq = v;
                }
                json_into(out, &v)?;
            }
        }
    }
    out.push(b'}');
    Ok(key)
}

fn json_into<T: serde::Serialize>(out: &mut Vec<u8>, value: &T) -> Result<(), sqlx::Error> {
    serde_json::to_writer(out, value).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::request::{self, Interval};
    use crate::records::RecordType;
    use serde_json::json;

    fn query(kind: RecordType, extra: serde_json::Value) -> Query {
        let mut body = json!({"symbol": "FPT", "from": "2026-11-20", "to": "2026-11-26"});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        request::parse(kind, body.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn every_candle_column_has_an_aggregate() {
        let spec = RecordType::Candle.spec();
        for field in spec.fields {
            assert!(
                CANDLE_AGGREGATES
                    .iter()
                    .any(|(name, _)| *name == field.name),
                "{}",
                field.name
            );
        }
    }

    #[test]
    fn the_request_only_reaches_bind_parameters() {
        for kind in RecordType::ALL {
            let q = query(kind, json!({"order": "desc"}));
            let cursor = q.cursor_after(
                DateTime::UNIX_EPOCH,
                (kind == RecordType::Tick).then_some(3),
            );
            let mut resumed = q.clone();
            resumed.after = Some(cursor);
            let (sql, _) = build(&resumed, 11).unwrap();
            assert!(!sql.contains("FPT"), "{sql}");
            assert!(
                sql.contains(&format!("FROM \"{}\"", kind.spec().table)),
                "{sql}"
            );
            assert!(sql.contains("DESC"), "{sql}");
            if kind == RecordType::Tick {
                assert!(sql.contains("(\"timestamp\", \"seq\") < ($4, $5)"), "{sql}");
            } else {
                assert!(sql.contains("(\"timestamp\") < ($4)"), "{sql}");
            }
        }
        let candles = query(RecordType::Candle, json!({"interval": "1h"}));
        assert_eq!(candles.interval, Interval::H1);
        let (sql, _) = build(&candles, 11).unwrap();
        assert!(sql.contains("date_bin"), "{sql}");
        assert!(sql.contains("+07'"), "{sql}");
    }

    #[test]
    fn the_smallest_row_is_a_lower_bound() {
        let tick = r#"{"symbol":"A","timestamp":"1970-01-01T00:00:00Z","price":1,"volume":1,"side":"buy","seq":0}"#;
        assert!(min_row_bytes(RecordType::Tick.spec()) <= tick.len());
    }
}
