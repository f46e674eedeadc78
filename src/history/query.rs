//! The SQL of a history request, built from the record type's
//! [`RecordSpec`](crate::records::RecordSpec): table, columns and key are
//! data; the request's values are always bind parameters. Rows are written
//! straight into the reply as JSON objects in column order.
//!
//! `latest` and `symbols` read only the unique key's B-tree, whose columns
//! start with (identifier, timestamp): one backward probe per identifier for
//! the newest row, two probes (first, last) for a symbol's coverage, and a
//! loose index scan (a recursive CTE hopping from one identifier to the next)
//! when the request names no symbols. Their cost grows with the number of
//! symbols, never with the number of rows.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgArguments, PgRow};
use sqlx::{Arguments as _, Row as _};

use super::request::{LatestQuery, Order, Query, SymbolsQuery, MARKET_OFFSET_SECS};
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
    ("volume", VOLUME_SUM),
    ("value", VALUE_SUM),
];

/// Sums never fail, whatever is stored: `volume` is summed by PostgreSQL in
/// numeric (the sum of BIGINT) and cast back only when it fits.
const VOLUME_SUM: &str =
    "CASE WHEN sum(\"volume\") BETWEEN -9223372036854775808 AND 9223372036854775807 \
     THEN sum(\"volume\")::BIGINT END";
/// `value`: minutes under 1e290 in magnitude are summed in float8, which
/// cannot overflow (that would take over 10^18 of them); larger ones in
/// numeric, and the total is
/// turned back into float8 when it fits. The common case costs a float sum.
const VALUE_SUM: &str = "CASE WHEN sum(\"value\"::numeric) FILTER (WHERE NOT abs(\"value\") < 1e290) IS NULL \
     THEN sum(\"value\") FILTER (WHERE abs(\"value\") < 1e290) \
     WHEN abs(coalesce((sum(\"value\") FILTER (WHERE abs(\"value\") < 1e290))::numeric, 0) \
     + sum(\"value\"::numeric) FILTER (WHERE NOT abs(\"value\") < 1e290)) <= 1.7976931348623157e308 \
     THEN (coalesce((sum(\"value\") FILTER (WHERE abs(\"value\") < 1e290))::numeric, 0) \
     + sum(\"value\"::numeric) FILTER (WHERE NOT abs(\"value\") < 1e290))::float8 END";

/// A bar column whose sum may not fit: its name, the SQL that is true when
/// it does not, and that range in words. Each is an extra column
/// `out_of_range_<name>` of an aggregated query.
const CANDLE_RANGE_CHECKS: &[(&str, &str, &str)] = &[
    (
        "volume",
        "NOT sum(\"volume\") BETWEEN -9223372036854775808 AND 9223372036854775807",
        "a BIGINT (at most 9223372036854775807)",
    ),
    (
        "value",
        "sum(\"value\"::numeric) FILTER (WHERE NOT abs(\"value\") < 1e290) IS NOT NULL \
         AND NOT abs(coalesce((sum(\"value\") FILTER (WHERE abs(\"value\") < 1e290))::numeric, 0) \
         + sum(\"value\"::numeric) FILTER (WHERE NOT abs(\"value\") < 1e290)) <= 1.7976931348623157e308",
        "a DOUBLE PRECISION (at most 1.7976931348623157e308)",
    ),
];

/// A bar whose sum of `field` does not fit its column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutOfRange {
    pub field: &'static str,
    /// The column's range, in words.
    pub range: &'static str,
    /// The bar's start.
    pub bar: DateTime<Utc>,
}

/// The first sum of an aggregated `row` that did not fit its column.
pub fn out_of_range(query: &Query, row: &PgRow) -> Result<Option<OutOfRange>, sqlx::Error> {
    if !query.aggregated() {
        return Ok(None);
    }
    for (field, _, range) in CANDLE_RANGE_CHECKS {
        let flagged: Option<bool> = row.try_get(format!("out_of_range_{field}").as_str())?;
        if flagged == Some(true) {
            return Ok(Some(OutOfRange {
                field,
                range,
                bar: row.try_get("timestamp")?,
            }));
        }
    }
    Ok(None)
}

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
            .chain(
                CANDLE_RANGE_CHECKS
                    .iter()
                    .map(|(name, check, _)| format!("({check}) AS \"out_of_range_{name}\"")),
            )
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

/// The distinct identifiers of `spec`'s table, as a recursive CTE named
/// `ids(id)`: each step is one index probe for the next identifier (a loose
/// index scan), so a billion rows of 500 symbols cost about 500 probes. The
/// last step yields a NULL `id`, which callers filter out.
fn distinct_ids(spec: &RecordSpec) -> String {
    let id = quote(spec.id_field());
    let table = quote(spec.table);
    format!(
        "WITH RECURSIVE ids(id) AS ( \
         (SELECT {id} FROM {table} ORDER BY {id} LIMIT 1) \
         UNION ALL \
         SELECT (SELECT {id} FROM {table} WHERE {id} > ids.id ORDER BY {id} LIMIT 1) \
         FROM ids WHERE ids.id IS NOT NULL) "
    )
}

/// The newest row of one identifier (`ident`, an SQL expression): the
/// greatest key, read backwards from the key's index.
fn newest_row(spec: &RecordSpec, ident: &str) -> String {
    let columns = spec
        .column_names()
        .map(quote)
        .collect::<Vec<_>>()
        .join(", ");
    let order_by = spec.key[1..]
        .iter()
        .map(|k| format!("{} DESC", quote(k)))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "SELECT {columns} FROM {table} WHERE {id} = {ident} ORDER BY {order_by} LIMIT 1",
        table = quote(spec.table),
        id = quote(spec.id_field()),
    )
}

/// Symbols sort in byte order whatever the database's collation, so every
/// deployment returns the same order.
const BYTE_ORDER: &str = "COLLATE \"C\"";

/// `history.latest`: the spec's columns of each identifier's newest row, in
/// the order requested (with `symbols`) or by identifier (without).
pub fn build_latest(query: &LatestQuery) -> Result<(String, PgArguments), sqlx::Error> {
    let spec = query.spec;
    let columns = spec
        .column_names()
        .map(|c| format!("newest.{}", quote(c)))
        .collect::<Vec<_>>()
        .join(", ");
    let mut args = PgArguments::default();
    let sql = match &query.symbols {
        Some(symbols) => {
            args.add(symbols.as_slice()).map_err(sqlx::Error::Encode)?;
            format!(
                "SELECT {columns} FROM unnest($1::text[]) WITH ORDINALITY AS wanted(id, position) \
                 CROSS JOIN LATERAL ({probe}) AS newest ORDER BY wanted.position",
                probe = newest_row(spec, "wanted.id"),
            )
        }
        None => format!(
            "{ids}SELECT {columns} FROM ids CROSS JOIN LATERAL ({probe}) AS newest \
             WHERE ids.id IS NOT NULL ORDER BY ids.id {BYTE_ORDER}",
            ids = distinct_ids(spec),
            probe = newest_row(spec, "ids.id"),
        ),
    };
    Ok((sql, args))
}

/// `history.symbols`: every identifier with the timestamps of its first and
/// last rows, by identifier. Columns: `id`, `first`, `last`.
pub fn build_symbols(query: &SymbolsQuery) -> String {
    let spec = query.spec;
    let probe = |direction: &str| {
        format!(
            "(SELECT \"timestamp\" FROM {table} WHERE {id} = ids.id ORDER BY \"timestamp\" {direction} LIMIT 1)",
            table = quote(spec.table),
            id = quote(spec.id_field()),
        )
    };
    format!(
        "{ids}SELECT ids.id, {first} AS first, {last} AS last FROM ids \
         WHERE ids.id IS NOT NULL ORDER BY ids.id {BYTE_ORDER}",
        ids = distinct_ids(spec),
        first = probe("ASC"),
        last = probe("DESC"),
    )
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
        for (name, _, _) in CANDLE_RANGE_CHECKS {
            assert!(spec.fields.iter().any(|f| f.name == *name), "{name}");
        }
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
    fn latest_and_symbols_probe_the_key_and_bind_the_symbols() {
        for kind in RecordType::ALL {
            let spec = kind.spec();
            let watch = request::parse_latest(
                json!({"kind": spec.history_kind, "symbols": ["FPT", "VNM"]})
                    .to_string()
                    .as_bytes(),
            )
            .unwrap();
            let (sql, _) = build_latest(&watch).unwrap();
            assert!(!sql.contains("FPT"), "{sql}");
            assert!(sql.contains("unnest($1::text[]) WITH ORDINALITY"), "{sql}");
            assert!(sql.ends_with("ORDER BY wanted.position"), "{sql}");
            let newest = if kind == RecordType::Tick {
                "ORDER BY \"timestamp\" DESC, \"seq\" DESC LIMIT 1"
            } else {
                "ORDER BY \"timestamp\" DESC LIMIT 1"
            };
            assert!(sql.contains(newest), "{sql}");
            let every =
                request::parse_latest(json!({"kind": spec.history_kind}).to_string().as_bytes())
                    .unwrap();
            let (sql, _) = build_latest(&every).unwrap();
            assert!(sql.starts_with("WITH RECURSIVE ids(id)"), "{sql}");
            assert!(
                sql.contains(&format!("WHERE \"{}\" > ids.id", spec.id_field())),
                "{sql}"
            );
            let symbols = build_symbols(&SymbolsQuery { spec });
            assert!(
                symbols.contains("ORDER BY \"timestamp\" ASC LIMIT 1"),
                "{symbols}"
            );
            assert!(
                symbols.contains("ORDER BY \"timestamp\" DESC LIMIT 1"),
                "{symbols}"
            );
            assert!(
                symbols.ends_with("ORDER BY ids.id COLLATE \"C\""),
                "{symbols}"
            );
        }
    }

    #[test]
    fn the_smallest_row_is_a_lower_bound() {
        let tick = r#"{"symbol":"A","timestamp":"1970-01-01T00:00:00Z","price":1,"volume":1,"side":"buy","seq":0}"#;
        assert!(min_row_bytes(RecordType::Tick.spec()) <= tick.len());
    }
}
