//! History: the `tickvault-history` micro service and the CLI, against real
//! PostgreSQL and NATS. Rows are inserted with SQL straight into the test database.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::time::{Duration, Instant};

use chrono::{DateTime, FixedOffset, TimeZone, Utc};
use serde_json::{json, Value};
use sqlx::PgPool;
use tickvault::records::{FieldType, RecordType};

use crate::helpers::{
    spawn_app, spawn_app_on_private_pg, start, test_config, tickvault, tickvault_command, wait_for,
    NatsServer, TestApp, TestDatabase,
};

const SMALL_PAYLOAD: usize = 65_536;

pub(crate) fn local(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .unwrap()
        .with_timezone(&Utc)
}

fn market() -> FixedOffset {
    FixedOffset::east_opt(7 * 3600).unwrap()
}

/// One reply: its headers (when any), the payload size and its JSON.
pub(crate) struct Reply {
    pub headers: Option<async_nats::HeaderMap>,
    pub size: usize,
    pub json: Value,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_string())
    }

    pub fn rows(&self) -> &Vec<Value> {
        self.json["rows"]
            .as_array()
            .unwrap_or_else(|| panic!("a reply with rows: {}", self.json))
    }

    pub fn code(&self) -> u64 {
        self.json["error"]["code"].as_u64().unwrap_or(200)
    }
}

pub(crate) async fn ask_raw(nats: &async_nats::Client, subject: String, body: Vec<u8>) -> Reply {
    let message = tokio::time::timeout(
        Duration::from_secs(30),
        nats.send_request(subject, async_nats::Request::new().payload(body.into())),
    )
    .await
    .expect("the service answers within 30 s")
    .expect("the request is delivered");
    Reply {
        headers: message.headers.clone(),
        size: message.payload.len(),
        json: serde_json::from_slice(&message.payload).expect("replies are JSON"),
    }
}

pub(crate) fn subject(app: &TestApp, kind: &str) -> String {
    format!("{}.{kind}", app.config.history.subject_prefix)
}

pub(crate) async fn ask(app: &TestApp, kind: &str, body: Value) -> Reply {
    ask_raw(&app.nats, subject(app, kind), body.to_string().into_bytes()).await
}

/// Follows cursors to the end; returns every row and each reply's size.
pub async fn fetch_all(app: &TestApp, kind: &str, mut body: Value) -> (Vec<Value>, Vec<usize>) {
    let mut rows = Vec::new();
    let mut sizes = Vec::new();
    loop {
        let reply = ask(app, kind, body.clone()).await;
        assert_eq!(reply.code(), 200, "{}", reply.json);
        sizes.push(reply.size);
        rows.extend(reply.rows().iter().cloned());
        match reply.json["next_cursor"].as_str() {
            Some(cursor) => {
                assert!(!reply.rows().is_empty(), "a cursor comes with rows");
                body["cursor"] = json!(cursor);
            }
            None => break,
        }
        assert!(sizes.len() < 10_000, "pagination ends");
    }
    (rows, sizes)
}

/// Inserts one row of `record_type` whose values all derive from `n`; the
/// optional fields are NULL when `n` is odd.
pub(crate) async fn insert(
    pool: &PgPool,
    record_type: RecordType,
    symbol: &str,
    ts: DateTime<Utc>,
    n: i64,
) {
    let spec = record_type.spec();
    let columns: Vec<String> = spec.column_names().map(|c| format!("\"{c}\"")).collect();
    let params: Vec<String> = (1..=columns.len()).map(|i| format!("${i}")).collect();
    let sql = format!(
        "INSERT INTO {} ({}) VALUES ({})",
        spec.table,
        columns.join(", "),
        params.join(", ")
    );
    let mut query = sqlx::query(&sql);
    for field in spec.fields {
        let null = !field.required && n % 2 == 1;
        query = match field.ty {
            FieldType::Symbol => query.bind(symbol.to_string()),
            FieldType::Timestamp => query.bind(ts),
            FieldType::Side => query.bind("sell"),
            FieldType::Positive | FieldType::NonNegative | FieldType::Finite => {
                query.bind((!null).then_some(n as f64 + 0.25))
            }
            FieldType::PositiveInt | FieldType::NonNegativeInt => {
                query.bind((!null).then_some(n + 1))
            }
        };
    }
    query.execute(pool).await.expect("insert a row");
}

async fn count(pool: &PgPool, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(pool)
        .await
        .expect("count rows")
}

fn timestamps(rows: &[Value]) -> Vec<DateTime<Utc>> {
    rows.iter()
        .map(|r| {
            let text = r["timestamp"].as_str().expect("timestamp is a string");
            assert!(text.ends_with('Z'), "UTC: {text}");
            local(text)
        })
        .collect()
}

#[tokio::test]
async fn each_kind_returns_the_requested_symbol_range_and_order_with_contract_fields() {
    let app = spawn_app(|_| {}).await;
    let day = local("2026-11-26T09:00:00+07:00");
    for record_type in RecordType::ALL {
        let (mine, other) = match record_type {
            RecordType::Index => ("VN30", "VNINDEX"),
            RecordType::Deriv => ("VN30F2412", "VN30F2501"),
            _ => ("FPT", "VNM"),
        };
        for i in 0..6 {
            let ts = day + chrono::Duration::minutes(i);
            insert(&app.pool, record_type, mine, ts, i).await;
            insert(&app.pool, record_type, other, ts, 100 + i).await;
        }
        // Outside the range: the day before and the day after.
        insert(
            &app.pool,
            record_type,
            mine,
            day - chrono::Duration::days(1),
            50,
        )
        .await;
        insert(
            &app.pool,
            record_type,
            mine,
            day + chrono::Duration::days(1),
            51,
        )
        .await;
    }
    for record_type in RecordType::ALL {
        let spec = record_type.spec();
        let kind = spec.history_kind;
        let mine = match record_type {
            RecordType::Index => "vn30",
            RecordType::Deriv => " vn30f2412 ",
            _ => "fpt",
        };
        for order in ["asc", "desc"] {
            let reply = ask(
                &app,
                kind,
                json!({"symbol": mine, "from": "2026-11-26", "to": "2026-11-26", "order": order}),
            )
            .await;
            assert_eq!(reply.code(), 200, "{kind}: {}", reply.json);
            assert!(reply.json["next_cursor"].is_null(), "{kind}");
            let rows = reply.rows();
            assert_eq!(rows.len(), 6, "{kind} {order}: {}", reply.json);
            let mut expected_ts: Vec<_> =
                (0..6).map(|i| day + chrono::Duration::minutes(i)).collect();
            if order == "desc" {
                expected_ts.reverse();
            }
            assert_eq!(timestamps(rows), expected_ts, "{kind} {order}");
            for row in rows {
                let object = row.as_object().unwrap();
                let names: Vec<&str> = object.keys().map(String::as_str).collect();
                let mut expected: Vec<&str> = spec.column_names().collect();
                expected.sort();
                let mut names_sorted = names.clone();
                names_sorted.sort();
                assert_eq!(names_sorted, expected, "{kind}: contract field names");
                assert!(!object.contains_key("stream_seq"));
                assert_eq!(
                    row[spec.id_field()].as_str().unwrap(),
                    mine.trim().to_uppercase()
                );
                let minute = (local(row["timestamp"].as_str().unwrap()) - day).num_minutes();
                for field in spec.fields {
                    let value = &row[field.name];
                    match field.ty {
                        FieldType::Positive | FieldType::NonNegative | FieldType::Finite => {
                            if !field.required && minute % 2 == 1 {
                                assert!(value.is_null(), "{kind}.{}", field.name);
                            } else {
                                assert_eq!(
                                    value.as_f64(),
                                    Some(minute as f64 + 0.25),
                                    "{kind}.{}",
                                    field.name
                                );
                            }
                        }
                        FieldType::PositiveInt | FieldType::NonNegativeInt => {
                            if !field.required && minute % 2 == 1 {
                                assert!(value.is_null(), "{kind}.{}", field.name);
                            } else {
                                assert_eq!(
                                    value.as_i64(),
                                    Some(minute + 1),
                                    "{kind}.{}",
                                    field.name
                                );
                            }
                        }
                        FieldType::Side => assert_eq!(value, "sell"),
                        _ => {}
                    }
                }
            }
        }
    }
    assert!(
        app.metric(
            "tickvault_history_requests_total",
            &[("kind", "index"), ("code", "200")]
        )
        .await
            >= 2.0
    );
}

#[tokio::test]
async fn a_date_to_includes_its_whole_market_day_and_a_timestamp_to_is_exclusive() {
    let app = spawn_app(|_| {}).await;
    let points = [
        ("2026-11-25T23:59:59+07:00", 1),
        ("2026-11-26T00:00:00+07:00", 2),
        ("2026-11-26T23:30:00+07:00", 3),
        ("2026-11-26T23:59:59.999999+07:00", 4),
        ("2026-11-27T00:00:00+07:00", 5),
    ];
    for (ts, seq) in points {
        insert(&app.pool, RecordType::Tick, "FPT", local(ts), seq).await;
    }
    let seqs = |reply: &Reply| -> Vec<i64> {
        reply
            .rows()
            .iter()
            .map(|r| r["seq"].as_i64().unwrap() - 1)
            .collect()
    };
    let by_date = ask(
        &app,
        "ticks",
        json!({"symbol": "FPT", "from": "2026-11-26", "to": "2026-11-26"}),
    )
    .await;
    assert_eq!(seqs(&by_date), vec![2, 3, 4], "{}", by_date.json);
    let by_time = ask(
        &app,
        "ticks",
        json!({"symbol": "FPT", "from": "2026-11-26T00:00:00+07:00", "to": "2026-11-26T23:30:00+07:00"}),
    )
    .await;
    assert_eq!(seqs(&by_time), vec![2], "{}", by_time.json);
    let mixed = ask(
        &app,
        "ticks",
        json!({"symbol": "FPT", "from": "2026-11-25T16:59:59Z", "to": "2026-11-27"}),
    )
    .await;
    assert_eq!(seqs(&mixed), vec![1, 2, 3, 4, 5], "{}", mixed.json);
    for (from, to) in [
        ("2026-11-27", "2026-11-26"),
        ("2026-11-26T10:00:00Z", "2026-11-26T09:59:59Z"),
    ] {
        let reply = ask(
            &app,
            "ticks",
            json!({"symbol": "FPT", "from": from, "to": to}),
        )
        .await;
        assert_eq!(reply.code(), 400, "{}", reply.json);
        assert!(reply.json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`from`"));
    }
}

#[tokio::test]
async fn limit_defaults_to_1000_accepts_50000_and_refuses_50001() {
    let app = spawn_app(|_| {}).await;
    sqlx::query(
        "INSERT INTO tick_data SELECT 'FPT', TIMESTAMPTZ '2026-11-26 09:00:00+07' + i * INTERVAL '1 second', \
         100.5, 10, 'buy', i FROM generate_series(0, 1499) AS i",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let base = json!({"symbol": "FPT", "from": "2026-11-26", "to": "2026-11-26"});
    let default = ask(&app, "ticks", base.clone()).await;
    assert_eq!(default.rows().len(), 1000);
    assert!(default.json["next_cursor"].is_string());
    let mut body = base.clone();
    body["limit"] = json!(50_000);
    let max = ask(&app, "ticks", body.clone()).await;
    assert_eq!(max.code(), 200, "{}", max.json);
    assert_eq!(max.rows().len(), 1500);
    assert!(max.json["next_cursor"].is_null());
    body["limit"] = json!(3);
    let three = ask(&app, "ticks", body.clone()).await;
    assert_eq!(three.rows().len(), 3);
    for bad in [json!(50_001), json!(0), json!(-1), json!(2.5)] {
        body["limit"] = bad.clone();
        let reply = ask(&app, "ticks", body.clone()).await;
        assert_eq!(reply.code(), 400, "limit {bad}: {}", reply.json);
        assert_eq!(
            reply.header("Nats-Service-Error-Code").as_deref(),
            Some("400")
        );
        assert!(reply.json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`limit`"));
    }
}

/// One hand-built minute candle.
#[derive(Clone, Copy)]
struct Minute {
    ts: DateTime<Utc>,
    open: f64,
    high: f64,
    low: f64,
    close: f64,
    volume: i64,
    value: Option<f64>,
}

fn minutes() -> Vec<Minute> {
    // 22:50 local on the 26th to 01:09 local on the 27th: across the market's midnight.
    let start = market()
        .with_ymd_and_hms(2026, 11, 26, 22, 50, 0)
        .unwrap()
        .with_timezone(&Utc);
    (0..140i64)
        .map(|i| {
            let base = 100.0 + ((i * 37) % 23) as f64 * 0.5;
            let open = base;
            let close = base + ((i * 11) % 7) as f64 * 0.25 - 0.75;
            let high = open.max(close) + (i % 3) as f64 * 0.5;
            let low = open.min(close) - (i % 4) as f64 * 0.25;
            Minute {
                ts: start + chrono::Duration::minutes(i),
                open,
                high,
                low,
                close,
                volume: 1000 + i * 13,
                // The 23:10-23:14 bucket has no value at all.
                value: (!(20..25).contains(&i) && i % 5 != 3).then_some(1.0e6 * i as f64 + 0.5),
            }
        })
        .collect()
}

/// The bars the service must return, computed here independently.
fn bars(minutes: &[Minute], width_s: i64) -> Vec<Minute> {
    let mut buckets: BTreeMap<i64, Vec<Minute>> = BTreeMap::new();
    for m in minutes {
        let local_s = m.ts.timestamp() + 7 * 3600;
        let start = local_s.div_euclid(width_s) * width_s - 7 * 3600;
        buckets.entry(start).or_default().push(*m);
    }
    buckets
        .into_iter()
        .map(|(start, ms)| {
            let values: Vec<f64> = ms.iter().filter_map(|m| m.value).collect();
            Minute {
                ts: DateTime::from_timestamp(start, 0).unwrap(),
                open: ms.first().unwrap().open,
                close: ms.last().unwrap().close,
                high: ms.iter().map(|m| m.high).fold(f64::MIN, f64::max),
                low: ms.iter().map(|m| m.low).fold(f64::MAX, f64::min),
                volume: ms.iter().map(|m| m.volume).sum(),
                value: (!values.is_empty()).then(|| values.iter().sum()),
            }
        })
        .collect()
}

#[tokio::test]
async fn candle_intervals_aggregate_in_market_time_and_paginate() {
    let app = spawn_app(|_| {}).await;
    let minutes = minutes();
    // Insert out of order; the service must order by timestamp.
    for m in minutes.iter().rev() {
        sqlx::query(
            "INSERT INTO candles_1m (symbol, \"timestamp\", open, high, low, close, volume, value) \
             VALUES ('FPT', $1, $2, $3, $4, $5, $6, $7), ('VNM', $1, 1, 1, 1, 1, 1, 1)",
        )
        .bind(m.ts)
        .bind(m.open)
        .bind(m.high)
        .bind(m.low)
        .bind(m.close)
        .bind(m.volume)
        .bind(m.value)
        .execute(&app.pool)
        .await
        .unwrap();
    }
    let close_enough = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs().max(1.0);
    for (interval, width) in [("5m", 300), ("1h", 3600), ("1d", 86_400), ("1m", 60)] {
        let expected = bars(&minutes, width);
        for order in ["asc", "desc"] {
            let body = json!({"symbol": "FPT", "from": "2026-11-26", "to": "2026-11-27",
                "interval": interval, "order": order, "limit": 7});
            let (rows, _) = fetch_all(&app, "candles", body).await;
            let mut expected = expected.clone();
            if order == "desc" {
                expected.reverse();
            }
            assert_eq!(rows.len(), expected.len(), "{interval} {order}");
            for (row, bar) in rows.iter().zip(&expected) {
                let what = format!("{interval} {order} {}", row);
                assert_eq!(row["symbol"], "FPT", "{what}");
                assert_eq!(local(row["timestamp"].as_str().unwrap()), bar.ts, "{what}");
                assert_eq!(row["open"].as_f64(), Some(bar.open), "{what}");
                assert_eq!(row["close"].as_f64(), Some(bar.close), "{what}");
                assert_eq!(row["high"].as_f64(), Some(bar.high), "{what}");
                assert_eq!(row["low"].as_f64(), Some(bar.low), "{what}");
                assert_eq!(row["volume"].as_i64(), Some(bar.volume), "{what}");
                match bar.value {
                    None => assert!(row["value"].is_null(), "{what}"),
                    Some(v) => assert!(close_enough(row["value"].as_f64().unwrap(), v), "{what}"),
                }
            }
        }
    }
    // 1d bars follow the market's day: two bars, starting at local midnights.
    let daily = bars(&minutes, 86_400);
    assert_eq!(daily.len(), 2);
    assert_eq!(daily[1].ts, local("2026-11-27T00:00:00+07:00"));
    // A null-valued 5m bucket really is in the data.
    assert!(bars(&minutes, 300).iter().any(|b| b.value.is_none()));
    let reply = ask(
        &app,
        "ticks",
        json!({"symbol": "FPT", "from": "2026-11-26", "to": "2026-11-27", "interval": "5m"}),
    )
    .await;
    assert_eq!(reply.code(), 400);
    assert!(reply.json["error"]["message"]
        .as_str()
        .unwrap()
        .contains("`interval`"));
}

/// A private nats-server whose max payload is 64 KiB.
pub(crate) fn small_payload_server() -> (NatsServer, tempfile::NamedTempFile) {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    writeln!(file, "max_payload: {SMALL_PAYLOAD}").unwrap();
    let path = file.path().to_str().unwrap().to_string();
    (NatsServer::start_with(&["-c", &path]), file)
}

pub(crate) async fn start_on(nats_url: &str) -> (TestApp, TestDatabase) {
    let db = TestDatabase::create().await;
    let app = start(test_config(&db.url, nats_url)).await;
    app.wait_ready().await;
    (app, db)
}

#[tokio::test]
async fn pages_fit_the_max_payload_and_cursors_return_every_tick_once_in_order() {
    let (server, _config_file) = small_payload_server();
    let (app, _db) = start_on(&server.url()).await;
    assert_eq!(app.nats.server_info().max_payload, SMALL_PAYLOAD);
    // 60,000 ticks, 7 per timestamp (same-time trades differ by seq), seq descending
    // within a timestamp so seq order alone is not timestamp order; plus another symbol.
    sqlx::query(
        "INSERT INTO tick_data SELECT 'FPT', TIMESTAMPTZ '2026-11-26 09:00:00+07' + (i / 7) * INTERVAL '1 millisecond', \
         100 + (i % 13) * 0.05, 100 + i, CASE WHEN i % 2 = 0 THEN 'buy' ELSE 'sell' END, 1000000 - i \
         FROM generate_series(0, 59999) AS i",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO tick_data SELECT 'VNM', TIMESTAMPTZ '2026-11-26 09:00:00+07' + i * INTERVAL '1 second', 1, 1, 'buy', i \
         FROM generate_series(0, 99) AS i",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let expected: Vec<(i64, i64, i64)> = sqlx::query_as(
        "SELECT (extract(epoch FROM \"timestamp\") * 1000000)::BIGINT, seq, volume FROM tick_data \
         WHERE symbol = 'FPT' ORDER BY \"timestamp\", seq",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(expected.len(), 60_000);
    for order in ["asc", "desc"] {
        let started = Instant::now();
        let (rows, sizes) = fetch_all(
            &app,
            "ticks",
            json!({"symbol": "FPT", "from": "2026-11-26", "to": "2026-11-26", "order": order, "limit": 50_000}),
        )
        .await;
        assert!(sizes.len() > 60, "{order}: many pages ({})", sizes.len());
        assert!(
            sizes.iter().all(|s| *s <= SMALL_PAYLOAD),
            "{order}: a reply exceeded the max payload: {:?}",
            sizes.iter().max()
        );
        let got: Vec<(i64, i64, i64)> = rows
            .iter()
            .map(|r| {
                (
                    local(r["timestamp"].as_str().unwrap()).timestamp_micros(),
                    r["seq"].as_i64().unwrap(),
                    r["volume"].as_i64().unwrap(),
                )
            })
            .collect();
        let mut want = expected.clone();
        if order == "desc" {
            want.reverse();
        }
        assert_eq!(got.len(), want.len(), "{order}: no row skipped or repeated");
        assert!(got == want, "{order}: the union equals the table, in order");
        println!(
            "60,000 ticks {order} in {} pages of <= {SMALL_PAYLOAD} B: {:?}",
            sizes.len(),
            started.elapsed()
        );
    }
    // A limit smaller than a page is a page limit; its cursor resumes right after.
    let first = ask(
        &app,
        "ticks",
        json!({"symbol": "FPT", "from": "2026-11-26", "to": "2026-11-26", "limit": 10}),
    )
    .await;
    assert_eq!(first.rows().len(), 10);
    let next = ask(
        &app,
        "ticks",
        json!({"symbol": "FPT", "from": "2026-11-26", "to": "2026-11-26", "limit": 10,
            "cursor": first.json["next_cursor"]}),
    )
    .await;
    assert_eq!(next.rows()[0]["seq"].as_i64(), Some(expected[10].1));
}

#[tokio::test]
async fn hostile_requests_get_400_with_headers_and_change_nothing() {
    let app = spawn_app(|_| {}).await;
    insert(
        &app.pool,
        RecordType::Tick,
        "FPT",
        local("2026-11-26T09:00:00+07:00"),
        1,
    )
    .await;
    let before: Vec<i64> = {
        let mut counts = Vec::new();
        for t in RecordType::ALL {
            counts.push(count(&app.pool, t.spec().table).await);
        }
        counts
    };
    let long = "A".repeat(10_240);
    let ok = json!({"symbol": "FPT", "from": "2026-11-26", "to": "2026-11-26"});
    let with = |field: &str, value: Value| {
        let mut body = ok.clone();
        body[field] = value;
        body.to_string().into_bytes()
    };
    let without = |field: &str| {
        let mut body = ok.clone();
        body.as_object_mut().unwrap().remove(field);
        body.to_string().into_bytes()
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "symbol",
            with("symbol", json!("FPT'; DROP TABLE tick_data; --")),
        ),
        ("symbol", with("symbol", json!("FPT' OR '1'='1"))),
        ("symbol", with("symbol", json!("ĐHG"))),
        ("symbol", with("symbol", json!("📈"))),
        ("symbol", with("symbol", json!(long.clone()))),
        ("symbol", with("symbol", json!(42))),
        ("symbol", with("symbol", json!(["FPT"]))),
        ("symbol", without("symbol")),
        ("from", without("from")),
        ("to", without("to")),
        ("from", with("from", json!(long.clone()))),
        (
            "from",
            with("from", json!("2026-11-26'; SELECT pg_sleep(10); --")),
        ),
        ("to", with("to", json!({"date": "2026-11-26"}))),
        ("to", with("to", json!(true))),
        ("limit", with("limit", json!("1000"))),
        ("limit", with("limit", json!(1e300))),
        ("order", with("order", json!("asc; DROP TABLE tick_data"))),
        ("order", with("order", json!(["asc"]))),
        ("cursor", with("cursor", json!(long.clone()))),
        (
            "cursor",
            with("cursor", json!("eyJ2IjoxLCJ0IjoiJzsgRFJPUCJ9")),
        ),
        ("cursor", with("cursor", json!(12))),
        ("JSON", b"not json".to_vec()),
        ("JSON", b"[]".to_vec()),
        ("JSON", b"".to_vec()),
        ("JSON", vec![0xff, 0xfe, 0x00]),
        ("JSON", long.clone().into_bytes()),
    ];
    for (field, body) in cases {
        let reply = ask_raw(&app.nats, subject(&app, "ticks"), body.clone()).await;
        let shown = String::from_utf8_lossy(&body[..body.len().min(60)]).to_string();
        assert_eq!(reply.code(), 400, "{shown}: {}", reply.json);
        assert_eq!(
            reply.header("Nats-Service-Error-Code").as_deref(),
            Some("400"),
            "{shown}"
        );
        let message = reply.json["error"]["message"].as_str().unwrap().to_string();
        assert_eq!(
            reply.header("Nats-Service-Error").as_deref(),
            Some(message.as_str())
        );
        assert!(
            message.len() < 400,
            "the message does not echo input: {message}"
        );
        assert!(reply.json["error"].get("retry_after_s").is_none());
        if field == "JSON" {
            assert!(message.contains("JSON object"), "{shown}: {message}");
        } else if !body.is_empty() {
            assert!(
                message.contains(&format!("`{field}`")),
                "{shown}: {message}"
            );
        }
    }
    let mut after = Vec::new();
    for t in RecordType::ALL {
        after.push(count(&app.pool, t.spec().table).await);
    }
    assert_eq!(before, after, "tables unchanged");
    // Counted just after the reply is sent: wait for it rather than race it.
    app.wait_for_metric(
        "tickvault_history_requests_total",
        &[("kind", "ticks"), ("code", "400")],
        20.0,
    )
    .await;
    // The service still answers.
    let reply = ask(&app, "ticks", ok).await;
    assert_eq!(reply.rows().len(), 1);
}

#[tokio::test]
async fn database_down_gives_503_with_retry_after_then_200_when_back() {
    let (mut pg, app) = spawn_app_on_private_pg(|_| {}).await;
    insert(
        &app.pool,
        RecordType::Candle,
        "FPT",
        local("2026-11-26T09:00:00+07:00"),
        2,
    )
    .await;
    let body = json!({"symbol": "FPT", "from": "2026-11-26", "to": "2026-11-26"});
    assert_eq!(ask(&app, "candles", body.clone()).await.rows().len(), 1);

    pg.stop();
    let reply = ask(&app, "candles", body.clone()).await;
    assert_eq!(reply.code(), 503, "{}", reply.json);
    assert_eq!(reply.json["error"]["retry_after_s"].as_u64(), Some(2));
    assert_eq!(
        reply.header("Nats-Service-Error-Code").as_deref(),
        Some("503")
    );
    let message = reply.json["error"]["message"].as_str().unwrap();
    assert!(
        !message.contains("postgres")
            && !message.contains("127.0.0.1")
            && !message.contains("SELECT"),
        "{message}"
    );
    // Counted just after the reply is sent: wait for it rather than race it.
    app.wait_for_metric(
        "tickvault_history_requests_total",
        &[("kind", "candles"), ("code", "503")],
        1.0,
    )
    .await;

    pg.resume();
    let rows = wait_for(
        Duration::from_secs(60),
        "history to answer 200 again",
        || async {
            let reply = ask(&app, "candles", body.clone()).await;
            (reply.code() == 200).then(|| reply.rows().len())
        },
    )
    .await;
    assert_eq!(rows, 1);
}

#[tokio::test]
async fn the_service_answers_ping_info_and_stats() {
    let server = NatsServer::start();
    let (app, _db) = start_on(&server.url()).await;
    let ping = ask_raw(&app.nats, "$SRV.PING.tickvault-history".into(), vec![]).await;
    assert_eq!(ping.json["name"], "tickvault-history", "{}", ping.json);
    assert_eq!(ping.json["type"], "io.nats.micro.v1.ping_response");
    let info = ask_raw(&app.nats, "$SRV.INFO.tickvault-history".into(), vec![]).await;
    let mut subjects: Vec<String> = info.json["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert_eq!(e["queue_group"], "tickvault-history", "{e}");
            e["subject"].as_str().unwrap().to_string()
        })
        .collect();
    subjects.sort();
    let mut expected: Vec<String> = [
        "candles",
        "derivatives",
        "foreign",
        "index",
        "latest",
        "symbols",
        "ticks",
    ]
    .iter()
    .map(|k| subject(&app, k))
    .collect();
    expected.sort();
    assert_eq!(subjects, expected);
    ask(
        &app,
        "index",
        json!({"symbol": "VNINDEX", "from": "2026-11-26", "to": "2026-11-26"}),
    )
    .await;
    let stats = ask_raw(&app.nats, "$SRV.STATS.tickvault-history".into(), vec![]).await;
    let index = stats.json["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "index")
        .cloned()
        .expect("an index endpoint");
    assert_eq!(index["num_requests"], 1, "{index}");
}

fn cli(app: &TestApp, args: &[&str]) -> std::process::Output {
    let mut all = vec!["history"];
    all.extend_from_slice(args);
    tickvault(app, &all)
}

/// A printed row with its timestamp read back as an instant.
fn with_instant(mut row: Value) -> Value {
    let ts = local(row["timestamp"].as_str().unwrap());
    row["timestamp"] = json!(ts.timestamp_micros());
    row
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_prints_what_the_service_returns_in_each_format() {
    let (server, _config_file) = small_payload_server();
    let (app, _db) = start_on(&server.url()).await;
    sqlx::query(
        "INSERT INTO tick_data SELECT 'FPT', TIMESTAMPTZ '2026-11-26 09:00:00+07' + (i / 3) * INTERVAL '1 second', \
         97.5 + i * 0.1, 100 + i, 'buy', i FROM generate_series(0, 2999) AS i",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let base = json!({"symbol": "FPT", "from": "2026-11-26", "to": "2026-11-26"});
    let (expected, sizes) = fetch_all(&app, "ticks", base).await;
    assert_eq!(expected.len(), 3000);
    assert!(sizes.len() > 3, "the CLI must follow cursors");

    let run = |extra: &[&str]| {
        let mut args = vec!["ticks", "fpt", "--from", "2026-11-26", "--to", "2026-11-26"];
        args.extend_from_slice(extra);
        tokio::task::block_in_place(|| cli(&app, &args))
    };
    let json_out = run(&["--format", "json"]);
    assert!(
        json_out.status.success(),
        "{}",
        String::from_utf8_lossy(&json_out.stderr)
    );
    let text = String::from_utf8(json_out.stdout).unwrap();
    let printed: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON lines"))
        .collect();
    // Market time by default, fixed precision: the same instants as the service's.
    let first = printed[0]["timestamp"].as_str().unwrap();
    assert_eq!(first, "2026-11-26T09:00:00.000000+07:00");
    assert!(printed
        .iter()
        .all(|r| r["timestamp"].as_str().unwrap().len() == first.len()));
    let instants = |rows: &[Value]| rows.iter().cloned().map(with_instant).collect::<Vec<_>>();
    assert_eq!(instants(&printed), instants(&expected));

    let csv_out = run(&["--format", "csv", "--tz", "utc"]);
    assert!(csv_out.status.success());
    let csv = String::from_utf8(csv_out.stdout).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "symbol,timestamp,price,volume,side,seq");
    assert_eq!(lines.len(), 3001);
    for (line, row) in lines[1..].iter().zip(&expected) {
        let cells: Vec<&str> = line.split(',').collect();
        assert!(cells[1].ends_with(".000000Z"), "{line}");
        assert_eq!(local(cells[1]), local(row["timestamp"].as_str().unwrap()));
        assert_eq!(cells[2].parse::<f64>().ok(), row["price"].as_f64());
        assert_eq!(cells[5].parse::<i64>().ok(), row["seq"].as_i64());
    }
    // Fixed precision: sorting the lines as text keeps them in time order.
    let mut sorted = lines[1..].to_vec();
    sorted.sort_by_key(|l| l.split(',').nth(1).unwrap().to_string());
    assert_eq!(sorted.len(), 3000);
    assert!(sorted
        .iter()
        .zip(&lines[1..])
        .all(|(a, b)| a.split(',').nth(1) == b.split(',').nth(1)));

    let table_out = run(&[]);
    assert!(table_out.status.success());
    let table = String::from_utf8(table_out.stdout).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3001);
    assert!(lines[0].starts_with("symbol") && lines[0].contains("timestamp"));
    let last_cells: Vec<&str> = lines[3000].split_whitespace().collect();
    assert_eq!(last_cells[5], expected[2999]["seq"].to_string());
    let at = lines[0].find("timestamp").unwrap();
    assert!(lines[1..]
        .iter()
        .all(|l| l[at..].starts_with("2026-11-26T")));

    let limited = run(&["--format", "json", "--order", "desc", "--limit", "5"]);
    let printed: Vec<Value> = String::from_utf8(limited.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(printed.len(), 5);
    assert_eq!(
        with_instant(printed[0].clone()),
        with_instant(expected[2999].clone())
    );

    let error = tokio::task::block_in_place(|| {
        cli(
            &app,
            &["ticks", "FPT", "--from", "2026-11-27", "--to", "2026-11-26"],
        )
    });
    assert!(!error.status.success());
    let stderr = String::from_utf8_lossy(&error.stderr);
    assert!(stderr.contains("`from`"), "{stderr}");
    assert_eq!(stderr.matches("error").count(), 1, "printed once: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(error.stdout.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_reads_today_and_naive_times_in_market_time_and_says_when_nothing_matched() {
    let app = spawn_app(|_| {}).await;
    let market_now = Utc::now().with_timezone(&market());
    let midnight = market_now
        .date_naive()
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_local_timezone(market())
        .unwrap()
        .with_timezone(&Utc);
    // Today's market midnight and the instant before it (yesterday's last).
    insert(&app.pool, RecordType::Candle, "FPT", midnight, 2).await;
    insert(
        &app.pool,
        RecordType::Candle,
        "FPT",
        midnight - chrono::Duration::microseconds(1),
        4,
    )
    .await;
    let volumes = |args: &[&str]| -> (Vec<i64>, String) {
        let mut all = vec!["candles", "FPT", "--format", "json"];
        all.extend_from_slice(args);
        let out = tokio::task::block_in_place(|| cli(&app, &all));
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{args:?}: {stderr}");
        let rows = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["volume"]
                    .as_i64()
                    .unwrap()
            })
            .collect();
        (rows, stderr)
    };
    assert_eq!(volumes(&[]).0, vec![3], "the default range is today");
    assert_eq!(
        volumes(&["--from", "yesterday", "--to", "yesterday"]).0,
        vec![5]
    );
    assert_eq!(volumes(&["--from", "yesterday"]).0, vec![5, 3]);
    let day = market_now.format("%Y-%m-%d").to_string();
    let naive_midnight = format!("{day} 00:00");
    assert_eq!(
        volumes(&["--from", "yesterday", "--to", &naive_midnight]).0,
        vec![5],
        "a naive time is market time"
    );
    assert_eq!(
        volumes(&["--from", &format!("{day}T00:00:00"), "--to", "now"]).0,
        vec![3]
    );
    let (rows, stderr) = volumes(&["--from", "2020-01-01", "--to", "2020-01-02"]);
    assert!(rows.is_empty());
    assert!(stderr.contains("no candles for FPT from"), "{stderr}");
    let bad = tokio::task::block_in_place(|| cli(&app, &["candles", "FPT", "--from", "soon"]));
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("--from") && stderr.contains("market day"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn latest_and_symbols_commands_print_the_watch_list() {
    let app = spawn_app(|_| {}).await;
    let day = local("2026-11-26T09:00:00+07:00");
    for (symbol, minutes) in [("FPT", 3), ("VNM", 1), ("HPG", 2)] {
        for minute in 0..minutes {
            insert(
                &app.pool,
                RecordType::Candle,
                symbol,
                day + chrono::Duration::minutes(minute),
                minute,
            )
            .await;
        }
    }
    let run = |args: &[&str]| tokio::task::block_in_place(|| tickvault(&app, args));
    let out = run(&["latest", "candles", "FPT", "VNM", "HPG", "ACB"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(lines[0].starts_with("symbol"));
    let symbols: Vec<&str> = lines[1..]
        .iter()
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(symbols, ["FPT", "VNM", "HPG"], "in the order asked");
    assert!(
        lines[1].contains("2026-11-26T09:02:00.000000+07:00"),
        "{}",
        lines[1]
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no candles for ACB"), "{stderr}");

    let out = run(&["symbols", "candles", "--format", "csv", "--tz", "utc"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "symbol,first,last\n\
         FPT,2026-11-26T02:00:00.000000Z,2026-11-26T02:02:00.000000Z\n\
         HPG,2026-11-26T02:00:00.000000Z,2026-11-26T02:01:00.000000Z\n\
         VNM,2026-11-26T02:00:00.000000Z,2026-11-26T02:00:00.000000Z\n"
    );
    let out = run(&["latest", "ticks"]);
    assert!(out.status.success());
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no ticks stored"));
}

/// Runs `command` with stdout piped and counted (not kept); returns the
/// exit status, the lines printed and the child's peak RSS in KiB, from
/// `wait4` (the kernel's high-water mark for exactly this process).
pub(crate) fn run_measuring_peak_rss(
    mut command: std::process::Command,
) -> (std::process::ExitStatus, u64, u64) {
    use std::io::Read as _;
    use std::os::unix::process::ExitStatusExt as _;
    // Reaped by `wait4` below, which also reports its resource usage.
    #[allow(clippy::zombie_processes)]
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("the tickvault binary runs");
    let mut stdout = child.stdout.take().unwrap();
    let counter = std::thread::spawn(move || {
        let mut buffer = vec![0u8; 64 * 1024];
        let mut lines = 0u64;
        loop {
            match stdout.read(&mut buffer) {
                Ok(0) | Err(_) => return lines,
                Ok(n) => lines += buffer[..n].iter().filter(|b| **b == b'\n').count() as u64,
            }
        }
    });
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data the kernel fills; pid is our own child, not yet reaped.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let reaped = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(reaped, pid, "wait4 on the CLI");
    let lines = counter.join().unwrap();
    println!(
        "child CPU: user {}.{:06} s, system {}.{:06} s",
        usage.ru_utime.tv_sec,
        usage.ru_utime.tv_usec,
        usage.ru_stime.tv_sec,
        usage.ru_stime.tv_usec
    );
    // ru_maxrss is in KiB on Linux.
    (
        std::process::ExitStatus::from_raw(status),
        lines,
        usage.ru_maxrss as u64,
    )
}

/// The CLI prints pages as they arrive: its peak RSS for 1,000,000 rows is
/// about that for 10,000 (a CLI that buffered the range would need ~100x).
#[tokio::test(flavor = "multi_thread")]
async fn the_cli_streams_a_million_rows_in_the_memory_of_ten_thousand() {
    let app = spawn_app(|_| {}).await;
    sqlx::query(
        "INSERT INTO tick_data SELECT 'FPT', TIMESTAMPTZ '2026-11-26 09:00:00+07' + i * INTERVAL '10 milliseconds', \
         97.5 + (i % 100) * 0.1, 100 + i, 'buy', i FROM generate_series(0, 999999) AS i",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let measure = |rows: u64| {
        let mut command = tickvault_command(&app);
        command.args([
            "history",
            "ticks",
            "FPT",
            "--from",
            "2026-11-26",
            "--to",
            "2026-11-26",
            "--format",
            "csv",
            "--limit",
            &rows.to_string(),
        ]);
        let started = Instant::now();
        let (status, lines, peak_kib) =
            tokio::task::block_in_place(|| run_measuring_peak_rss(command));
        assert!(status.success(), "{rows} rows: {status:?}");
        assert_eq!(lines, rows + 1, "a header and every row");
        println!(
            "MEMORY history CLI, {rows} rows: peak RSS {} KiB in {:?}",
            peak_kib,
            started.elapsed()
        );
        peak_kib
    };
    let small = measure(10_000);
    let large = measure(1_000_000);
    assert!(
        (large as f64) < small as f64 * 1.5 + 4096.0,
        "peak RSS grew with the range: {small} KiB for 10,000 rows, {large} KiB for 1,000,000"
    );
}
