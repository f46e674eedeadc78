//! `history.latest` and `history.symbols`: the newest row per symbol and each
//! symbol's coverage, answered from the key indexes. Checked against plain
//! SQL on tables of a million rows, with the service's own SQL explained.

use std::time::Instant;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use sqlx::PgPool;
use tickvault::history::query;
use tickvault::history::request::{self, SymbolsQuery};
use tickvault::records::RecordType;

use crate::helpers::spawn_app;
use crate::history::{ask, insert, local, small_payload_server, start_on};

/// `EXPLAIN` of exactly what the service runs for `body` (a latest request)
/// or for a symbols request of `kind`.
async fn plan_of_latest(pool: &PgPool, body: &Value) -> String {
    let latest = request::parse_latest(body.to_string().as_bytes()).unwrap();
    let (sql, args) = query::build_latest(&latest).unwrap();
    let lines: Vec<String> = sqlx::query_scalar_with(&format!("EXPLAIN {sql}"), args)
        .fetch_all(pool)
        .await
        .expect("EXPLAIN the latest query");
    lines.join("\n")
}

async fn plan_of_symbols(pool: &PgPool, record_type: RecordType) -> String {
    let sql = query::build_symbols(&SymbolsQuery {
        spec: record_type.spec(),
    });
    let lines: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN {sql}"))
        .fetch_all(pool)
        .await
        .expect("EXPLAIN the symbols query");
    lines.join("\n")
}

fn assert_index_only(plan: &str, what: &str) {
    assert!(!plan.contains("Seq Scan"), "{what} scans a table:\n{plan}");
    assert!(plan.contains("Index"), "{what} uses no index:\n{plan}");
}

/// A row as (symbol, timestamp µs, the type's distinguishing column).
fn key_of(row: &Value, id: &str, extra: &str) -> (String, i64, i64) {
    (
        row[id].as_str().unwrap().to_string(),
        local(row["timestamp"].as_str().unwrap()).timestamp_micros(),
        row[extra].as_i64().unwrap(),
    )
}

/// The newest row per symbol by plain SQL: (symbol, timestamp µs, `extra`).
async fn newest_by_sql(
    pool: &PgPool,
    record_type: RecordType,
    extra: &str,
) -> Vec<(String, i64, i64)> {
    let spec = record_type.spec();
    let id = spec.id_field();
    let order = spec.key[1..]
        .iter()
        .map(|k| format!("\"{k}\" DESC"))
        .collect::<Vec<_>>()
        .join(", ");
    sqlx::query_as(&format!(
        "SELECT DISTINCT ON ({id}) {id}, (extract(epoch FROM \"timestamp\") * 1000000)::BIGINT, {extra} \
         FROM {} ORDER BY {id}, {order}",
        spec.table
    ))
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn coverage_by_sql(
    pool: &PgPool,
    record_type: RecordType,
) -> Vec<(String, DateTime<Utc>, DateTime<Utc>)> {
    let spec = record_type.spec();
    let id = spec.id_field();
    sqlx::query_as(&format!(
        "SELECT {id}, min(\"timestamp\"), max(\"timestamp\") FROM {} GROUP BY {id} ORDER BY {id} COLLATE \"C\"",
        spec.table
    ))
    .fetch_all(pool)
    .await
    .unwrap()
}

/// 500 symbols, 1,000,000 ticks and 1,000,000 candles; every symbol's newest
/// row, asked for as a watch-list, as every symbol, and as coverage, equals
/// what plain SQL says; the service's SQL never scans a table.
#[tokio::test(flavor = "multi_thread")]
async fn latest_and_symbols_on_a_million_rows_match_sql_and_use_the_key_index() {
    let app = spawn_app(|_| {}).await;
    // Ticks: 1,000 per timestamp, two per symbol with different seq, so the
    // newest row is decided by (timestamp, seq); seq is scrambled.
    sqlx::query(
        "INSERT INTO tick_data SELECT 'S' || lpad((i % 500)::text, 3, '0'), \
         TIMESTAMPTZ '2026-11-26 09:00:00+07' + (i / 1000) * INTERVAL '1 second', \
         10 + (i % 7), 100 + i, 'buy', (i::BIGINT * 7919) % 1000003 \
         FROM generate_series(0, 999999) AS i",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    // Candles: symbol k has rows up to a minute that depends on k.
    sqlx::query(
        "INSERT INTO candles_1m (symbol, \"timestamp\", open, high, low, close, volume, value) \
         SELECT 'S' || lpad((i % 500)::text, 3, '0'), \
         TIMESTAMPTZ '2026-11-20 09:00:00+07' + ((i / 500) - (i % 500) * 3) * INTERVAL '1 minute', \
         10, 12, 9, 11, i, NULL FROM generate_series(0, 999999) AS i",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE tick_data")
        .execute(&app.pool)
        .await
        .unwrap();
    sqlx::query("ANALYZE candles_1m")
        .execute(&app.pool)
        .await
        .unwrap();

    for (record_type, extra) in [(RecordType::Tick, "volume"), (RecordType::Candle, "volume")] {
        let kind = record_type.spec().history_kind;
        let expected = newest_by_sql(&app.pool, record_type, extra).await;
        assert_eq!(expected.len(), 500, "{kind}");

        // A watch-list of 500 names: 480 stored symbols in a scrambled order
        // and 20 that have no data, mixed in.
        let mut names: Vec<String> = (0..480)
            .map(|k| format!("S{:03}", (k * 37) % 500))
            .collect();
        for m in 0..20 {
            names.insert(m * 23, format!("NONE{m}"));
        }
        assert_eq!(names.len(), 500);
        let body = json!({"kind": kind, "symbols": names});
        let reply = ask(&app, "latest", body.clone()).await;
        assert_eq!(reply.code(), 200, "{kind}: {}", reply.json);
        let got: Vec<_> = reply
            .rows()
            .iter()
            .map(|r| key_of(r, "symbol", extra))
            .collect();
        let want: Vec<_> = names
            .iter()
            .filter_map(|n| expected.iter().find(|e| &e.0 == n).cloned())
            .collect();
        assert_eq!(want.len(), 480);
        assert_eq!(
            got, want,
            "{kind}: newest rows in the order requested, missing left out"
        );
        for row in reply.rows() {
            let fields: Vec<&str> = row
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            assert_eq!(
                fields.len(),
                record_type.spec().fields.len(),
                "{kind}: {row}"
            );
        }
        assert_index_only(
            &plan_of_latest(&app.pool, &body).await,
            &format!("latest {kind} (watch-list)"),
        );

        // Every symbol, sorted.
        let every = json!({"kind": kind});
        let reply = ask(&app, "latest", every.clone()).await;
        assert_eq!(reply.code(), 200, "{kind}: {}", reply.json);
        let got: Vec<_> = reply
            .rows()
            .iter()
            .map(|r| key_of(r, "symbol", extra))
            .collect();
        assert_eq!(
            got, expected,
            "{kind}: every symbol's newest row, by symbol"
        );
        assert_index_only(
            &plan_of_latest(&app.pool, &every).await,
            &format!("latest {kind} (every symbol)"),
        );

        // Coverage.
        let reply = ask(&app, "symbols", json!({"kind": kind})).await;
        assert_eq!(reply.code(), 200, "{kind}: {}", reply.json);
        let got: Vec<(String, DateTime<Utc>, DateTime<Utc>)> = reply.json["symbols"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["symbol"].as_str().unwrap().to_string(),
                    local(s["first"].as_str().unwrap()),
                    local(s["last"].as_str().unwrap()),
                )
            })
            .collect();
        assert_eq!(
            got,
            coverage_by_sql(&app.pool, record_type).await,
            "{kind}: coverage"
        );
        assert_index_only(
            &plan_of_symbols(&app.pool, record_type).await,
            &format!("symbols {kind}"),
        );

        // The latency of a 500-symbol watch-list (printed; speed is not asserted).
        let mut times = Vec::new();
        for _ in 0..7 {
            let started = Instant::now();
            let reply = ask(&app, "latest", body.clone()).await;
            times.push(started.elapsed());
            assert_eq!(reply.rows().len(), 480);
        }
        times.sort();
        println!(
            "LATENCY latest {kind}, 500 symbols (480 found) on 1,000,000 rows: median {:?}, min {:?}, max {:?}",
            times[3], times[0], times[6]
        );
    }

    // More than 500 symbols is refused, naming the field.
    let names: Vec<String> = (0..501).map(|k| format!("S{k:03}")).collect();
    let reply = ask(&app, "latest", json!({"kind": "ticks", "symbols": names})).await;
    assert_eq!(reply.code(), 400, "{}", reply.json);
    assert_eq!(
        reply.header("Nats-Service-Error-Code").as_deref(),
        Some("400")
    );
    assert!(reply.json["error"]["message"]
        .as_str()
        .unwrap()
        .contains("`symbols`"));
    app.wait_for_metric(
        "tickvault_history_requests_total",
        &[("kind", "ticks"), ("code", "400")],
        1.0,
    )
    .await;
}

#[tokio::test]
async fn latest_and_symbols_cover_every_kind_with_their_own_identifiers() {
    let app = spawn_app(|_| {}).await;
    let day = local("2026-11-26T09:00:00+07:00");
    for record_type in RecordType::ALL {
        let names = match record_type {
            RecordType::Index => ["VN30", "VNINDEX", "HNXINDEX"],
            RecordType::Deriv => ["VN30F2412", "VN30F2501", "VN30F2503"],
            _ => ["FPT", "VNM", "HPG"],
        };
        // Symbol k has rows at minutes 0..=k+1; the last of HPG/HNXINDEX/... is minute 3.
        for (k, name) in names.iter().enumerate() {
            for minute in 0..=(k as i64 + 1) {
                insert(
                    &app.pool,
                    record_type,
                    name,
                    day + chrono::Duration::minutes(minute),
                    minute,
                )
                .await;
            }
        }
        if record_type == RecordType::Tick {
            // Two trades in FPT's last second: the greater seq is the newest.
            insert(
                &app.pool,
                record_type,
                "FPT",
                day + chrono::Duration::minutes(1),
                40,
            )
            .await;
        }
    }
    for record_type in RecordType::ALL {
        let spec = record_type.spec();
        let kind = spec.history_kind;
        let id = spec.id_field();
        let names = match record_type {
            RecordType::Index => ["vn30", "VNINDEX", "HNXINDEX"],
            RecordType::Deriv => ["VN30F2412", "vn30f2501", "VN30F2503"],
            _ => ["fpt", "VNM", "HPG"],
        };
        let asked = json!([names[2], "MISSING", names[0], names[2]]);
        let reply = ask(&app, "latest", json!({"kind": kind, "symbols": asked})).await;
        assert_eq!(reply.code(), 200, "{kind}: {}", reply.json);
        let rows = reply.rows();
        assert_eq!(
            rows.len(),
            2,
            "{kind}: missing left out, repeats once: {}",
            reply.json
        );
        assert_eq!(rows[0][id], names[2].to_uppercase(), "{kind}");
        assert_eq!(rows[1][id], names[0].to_uppercase(), "{kind}");
        assert_eq!(
            local(rows[0]["timestamp"].as_str().unwrap()),
            day + chrono::Duration::minutes(3)
        );
        assert_eq!(
            local(rows[1]["timestamp"].as_str().unwrap()),
            day + chrono::Duration::minutes(1)
        );
        if record_type == RecordType::Tick {
            assert_eq!(rows[1]["seq"], 41, "the greatest key wins: {}", rows[1]);
        }
        assert!(rows.iter().all(|r| r.get("stream_seq").is_none()));

        let every = ask(&app, "latest", json!({"kind": kind, "symbols": null})).await;
        let mut sorted: Vec<String> = names.iter().map(|n| n.to_uppercase()).collect();
        sorted.sort();
        let got: Vec<&str> = every
            .rows()
            .iter()
            .map(|r| r[id].as_str().unwrap())
            .collect();
        assert_eq!(got, sorted, "{kind}: every symbol, sorted");

        let empty = ask(&app, "latest", json!({"kind": kind, "symbols": []})).await;
        assert_eq!(empty.json, json!({"rows": []}), "{kind}");

        let coverage = ask(&app, "symbols", json!({"kind": kind})).await;
        let list = coverage.json["symbols"].as_array().unwrap();
        assert_eq!(list.len(), 3, "{kind}: {}", coverage.json);
        for item in list {
            let name = item["symbol"].as_str().unwrap();
            let k = names
                .iter()
                .position(|n| n.eq_ignore_ascii_case(name))
                .unwrap() as i64;
            assert_eq!(local(item["first"].as_str().unwrap()), day, "{kind} {name}");
            assert_eq!(
                local(item["last"].as_str().unwrap()),
                day + chrono::Duration::minutes(k + 1),
                "{kind} {name}"
            );
            assert!(item["first"].as_str().unwrap().ends_with('Z'));
        }
    }
    // Counted under the data kind asked for.
    app.wait_for_metric(
        "tickvault_history_requests_total",
        &[("kind", "derivatives"), ("code", "200")],
        4.0,
    )
    .await;

    for (endpoint, body, field) in [
        ("latest", json!({"kind": "bars"}), "`kind`"),
        ("symbols", json!({}), "`kind`"),
        (
            "latest",
            json!({"kind": "ticks", "symbols": "FPT"}),
            "`symbols`",
        ),
        (
            "latest",
            json!({"kind": "ticks", "symbols": ["FPT", "F'; DROP TABLE tick_data"]}),
            "`symbols`",
        ),
    ] {
        let reply = ask(&app, endpoint, body.clone()).await;
        assert_eq!(reply.code(), 400, "{body}: {}", reply.json);
        assert_eq!(
            reply.header("Nats-Service-Error-Code").as_deref(),
            Some("400")
        );
        let message = reply.json["error"]["message"].as_str().unwrap();
        assert!(message.contains(field), "{body}: {message}");
    }
    app.wait_for_metric(
        "tickvault_history_requests_total",
        &[("kind", "unknown"), ("code", "400")],
        2.0,
    )
    .await;
    assert_eq!(
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM tick_data")
            .fetch_one(&app.pool)
            .await
            .unwrap(),
        10
    );
}

#[tokio::test]
async fn a_latest_or_symbols_reply_that_cannot_fit_is_a_400_naming_symbols() {
    let (server, _config_file) = small_payload_server();
    let (app, _db) = start_on(&server.url()).await;
    // 1,200 symbols: every symbol's candle (~150 B) or coverage (~80 B) is over 64 KiB.
    sqlx::query(
        "INSERT INTO candles_1m (symbol, \"timestamp\", open, high, low, close, volume, value) \
         SELECT 'SYM' || i, TIMESTAMPTZ '2026-11-26 09:00:00+07', 10, 12, 9, 11, 100, 1.5e6 \
         FROM generate_series(1, 1200) AS i",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    for (endpoint, body) in [
        ("latest", json!({"kind": "candles"})),
        ("symbols", json!({"kind": "candles"})),
    ] {
        let reply = ask(&app, endpoint, body).await;
        assert_eq!(reply.code(), 400, "{endpoint}: {}", reply.json);
        assert!(reply.size <= 65_536);
        let message = reply.json["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("`symbols`") && message.contains("max payload"),
            "{message}"
        );
    }
    // A watch-list that fits is answered.
    let names: Vec<String> = (1..=300).map(|i| format!("SYM{i}")).collect();
    let reply = ask(&app, "latest", json!({"kind": "candles", "symbols": names})).await;
    assert_eq!(reply.code(), 200, "{}", reply.json);
    assert_eq!(reply.rows().len(), 300);
    assert!(reply.size <= 65_536);
}
