//! Ingest: NATS → batched COPY, for all five types, with the contract's key
//! semantics, flush triggers, redelivery, backpressure and shutdown.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sqlx::Row;
use tickvault::records::{FieldType, RecordType};

use crate::helpers::{
    metric_value, spawn_app, spawn_app_on_private_pg, start, test_config, wait_for, PgServer,
    TestDatabase,
};

pub fn tick(symbol: &str, ts_ms: i64, seq: i64, price: f64) -> Value {
    json!({"symbol": symbol, "timestamp": ts_ms, "price": price, "volume": 100,
           "side": "buy", "seq": seq})
}

/// A valid candle whose close tells its version apart.
pub fn candle(symbol: &str, ts_ms: i64, close: f64) -> Value {
    json!({"symbol": symbol, "timestamp": ts_ms, "open": close, "high": close + 1.0,
           "low": close, "close": close, "volume": 1000, "value": 1.5e7})
}

/// 2025-11-26 09:15 +07:00
const T0: i64 = 1_764_123_300_000;

#[tokio::test]
async fn every_type_lands_with_its_values_from_objects_and_arrays() {
    let app = spawn_app(|c| c.ingest.flush_interval_ms = 200).await;
    let messages = [
        (
            "tick",
            "FPT",
            json!({"symbol": "fpt", "timestamp": "2026-11-26T09:15:03.123456+07:00",
            "price": 97.5, "volume": 100.0, "side": "SELL", "seq": 1}),
        ),
        (
            "tick",
            "FPT",
            json!([tick("FPT", T0, 2, 97.6), tick("FPT", T0, 3, 97.7)]),
        ),
        (
            "candle",
            "FPT",
            json!({"symbol": "FPT", "timestamp": "2026-11-26T09:15:00+07:00",
            "open": 97.0, "high": 98.0, "low": 96.5, "close": 97.5, "volume": 12000}),
        ),
        (
            "candle",
            "VNM",
            json!([candle("VNM", T0, 11.0), candle("VNM", T0 + 60_000, 12.0)]),
        ),
        (
            "foreign",
            "HPG",
            json!({"symbol": "HPG", "timestamp": T0, "buy_volume": 10,
            "sell_volume": 20, "buy_value": 1.5e6, "sell_value": 3.0e6, "room": 1000}),
        ),
        (
            "foreign",
            "HPG",
            json!([{"symbol": "HPG", "timestamp": T0 + 1000, "buy_volume": 11,
            "sell_volume": 21, "buy_value": 1.6e6, "sell_value": 3.1e6}]),
        ),
        (
            "index",
            "VNINDEX",
            json!({"index_name": "VNINDEX", "timestamp": "2026-11-26T09:15:00+07:00",
            "value": 1250.5, "change": -3.25, "change_pct": -0.26, "volume": 500000,
            "traded_value": 1.2e10, "advances": 120, "declines": 200}),
        ),
        (
            "index",
            "VN30",
            json!([{"index_name": "VN30", "timestamp": T0, "value": 1300.0,
            "change": 1.0, "change_pct": 0.08, "volume": 1, "traded_value": 2.0}]),
        ),
        (
            "deriv",
            "VN30F2412",
            json!({"contract": "VN30F2412", "timestamp": T0, "price": 1301.5,
            "basis": -1.5, "open_interest": 40000, "volume": 1200}),
        ),
        (
            "deriv",
            "VN30F2501",
            json!([{"contract": "VN30F2501", "timestamp": T0, "price": 1302.0,
            "basis": 0.5, "open_interest": 100, "volume": 10}]),
        ),
    ];
    for (record_type, symbol, payload) in messages {
        app.publish(app.subject(record_type, symbol), payload.to_string())
            .await;
    }
    for (table, rows) in [
        ("tick_data", 3),
        ("candles_1m", 3),
        ("foreign_flow", 2),
        ("index_snapshots", 2),
        ("derivatives", 2),
    ] {
        app.wait_for_rows(table, rows).await;
    }

    let tick = sqlx::query(
        "SELECT symbol, price, volume, side, seq, \"timestamp\" = '2026-11-26 02:15:03.123456+00' AS ts_ok \
         FROM tick_data WHERE seq = 1",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        tick.get::<String, _>("symbol"),
        "FPT",
        "symbols are trimmed and upper-cased"
    );
    assert_eq!(tick.get::<f64, _>("price"), 97.5);
    assert_eq!(tick.get::<i64, _>("volume"), 100);
    assert_eq!(tick.get::<String, _>("side"), "sell");
    assert!(
        tick.get::<bool, _>("ts_ok"),
        "RFC 3339 with offset kept to the microsecond"
    );

    let ms_ts: bool = sqlx::query_scalar(
        "SELECT \"timestamp\" = to_timestamp(1764123300) FROM tick_data WHERE seq = 2",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(ms_ts, "epoch milliseconds");

    let candle =
        sqlx::query("SELECT close, value, stream_seq FROM candles_1m WHERE symbol = 'FPT'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(candle.get::<f64, _>("close"), 97.5);
    assert_eq!(
        candle.get::<Option<f64>, _>("value"),
        None,
        "optional value absent → NULL"
    );
    assert!(candle.get::<Option<i64>, _>("stream_seq").is_some());

    let room: Vec<Option<i64>> =
        sqlx::query_scalar("SELECT room FROM foreign_flow ORDER BY \"timestamp\"")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(room, vec![Some(1000), None]);

    let index = sqlx::query(
        "SELECT value, change, advances, declines, unchanged FROM index_snapshots WHERE index_name = 'VNINDEX'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(index.get::<f64, _>("change"), -3.25);
    assert_eq!(index.get::<Option<i64>, _>("advances"), Some(120));
    assert_eq!(index.get::<Option<i64>, _>("unchanged"), None);

    let deriv =
        sqlx::query("SELECT basis, open_interest FROM derivatives WHERE contract = 'VN30F2412'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(deriv.get::<f64, _>("basis"), -1.5);
    assert_eq!(deriv.get::<i64, _>("open_interest"), 40000);

    assert_eq!(
        app.metric("tickvault_rows_written_total", &[("type", "tick")])
            .await,
        3.0
    );
    assert_eq!(
        app.metric("tickvault_messages_received_total", &[("type", "candle")])
            .await,
        2.0
    );
}

#[tokio::test]
async fn a_full_batch_flushes_before_the_interval() {
    let app = spawn_app(|c| {
        c.ingest.batch_size = 500;
        c.ingest.flush_interval_ms = 120_000;
    })
    .await;
    for m in 0..5 {
        let records: Vec<Value> = (0..100)
            .map(|i| tick("FPT", T0, m * 100 + i, 10.0))
            .collect();
        app.publish_json("tick", "FPT", &Value::Array(records))
            .await;
    }
    app.wait_for_rows("tick_data", 500).await;
    assert_eq!(tick_flushes(&app, "size").await, 1.0);
    assert_eq!(tick_flushes(&app, "interval").await, 0.0);
}

#[tokio::test]
async fn a_few_rows_flush_when_the_interval_ends() {
    let app = spawn_app(|c| {
        c.ingest.batch_size = 500;
        c.ingest.flush_interval_ms = 1000;
    })
    .await;
    let started = Instant::now();
    for seq in 0..3 {
        app.publish_json("tick", "VNM", &tick("VNM", T0, seq, 70.0))
            .await;
    }
    app.wait_for_rows("tick_data", 3).await;
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900),
        "flushed after {elapsed:?}, before the interval"
    );
    assert_eq!(tick_flushes(&app, "interval").await, 1.0);
    assert_eq!(tick_flushes(&app, "size").await, 0.0);
}

/// Tick flushes counted with this trigger label.
async fn tick_flushes(app: &crate::helpers::TestApp, trigger: &str) -> f64 {
    app.metric(
        "tickvault_flushes_total",
        &[("type", "tick"), ("trigger", trigger)],
    )
    .await
}

/// Waits until the stored candle at T0 is `expected` (close, stream_seq).
async fn wait_for_candle(app: &crate::helpers::TestApp, symbol: &str, expected: (f64, i64)) {
    wait_for(
        Duration::from_secs(20),
        "the expected candle version",
        || async { (candle_close(&app.pool, symbol, T0).await == expected).then_some(()) },
    )
    .await
}

/// (close, stream_seq) of the stored candle, or (NaN, -1) when there is none yet.
async fn candle_close(pool: &sqlx::PgPool, symbol: &str, ts_ms: i64) -> (f64, i64) {
    let row = sqlx::query(
        "SELECT close, stream_seq FROM candles_1m WHERE symbol = $1 AND \"timestamp\" = to_timestamp($2::float8 / 1000)",
    )
    .bind(symbol)
    .bind(ts_ms)
    .fetch_optional(pool)
    .await
    .unwrap();
    row.map_or((f64::NAN, -1), |row| {
        (row.get("close"), row.get("stream_seq"))
    })
}

#[tokio::test]
async fn ticks_keep_the_first_and_other_types_keep_the_newest() {
    let app = spawn_app(|c| c.ingest.flush_interval_ms = 100).await;
    // Within one message (one batch): a repeated tick key keeps the first,
    // a repeated candle key keeps the later record.
    app.publish_json(
        "tick",
        "FPT",
        &json!([tick("FPT", T0, 1, 10.0), tick("FPT", T0, 1, 99.0)]),
    )
    .await;
    let seq = app
        .publish_json(
            "candle",
            "FPT",
            &json!([candle("FPT", T0, 11.0), candle("FPT", T0, 12.0)]),
        )
        .await;
    app.wait_for_rows("tick_data", 1).await;
    app.wait_for_rows("candles_1m", 1).await;
    assert_eq!(candle_close(&app.pool, "FPT", T0).await, (12.0, seq as i64));

    // Across batches: the stored tick stays, the newer candle replaces the stored one.
    app.publish_json("tick", "FPT", &tick("FPT", T0, 1, 55.0))
        .await;
    let seq = app
        .publish_json("candle", "FPT", &candle("FPT", T0, 13.0))
        .await;
    wait_for_candle(&app, "FPT", (13.0, seq as i64)).await;
    wait_for(
        Duration::from_secs(20),
        "the repeated tick to be processed",
        || async {
            (app.metric("tickvault_rows_written_total", &[("type", "tick")])
                .await
                >= 2.0)
                .then_some(())
        },
    )
    .await;
    let prices: Vec<f64> = sqlx::query_scalar("SELECT price FROM tick_data")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(
        prices,
        vec![10.0],
        "a trade is immutable: the first version stays"
    );
}

#[tokio::test]
async fn older_versions_redelivered_after_a_newer_one_is_committed_change_nothing() {
    let mut first = spawn_app(|c| c.ingest.flush_interval_ms = 100).await;
    let mut sent_ticks = 0;
    for version in 1..=3 {
        first
            .publish_json("candle", "FPT", &candle("FPT", T0, version as f64))
            .await;
        let ticks: Vec<Value> = (0..50)
            .map(|i| tick("FPT", T0, version * 100 + i, 10.0))
            .collect();
        first
            .publish_json("tick", "FPT", &Value::Array(ticks))
            .await;
        sent_ticks += 50;
    }
    let newest = first
        .publish_json("candle", "FPT", &candle("FPT", T0, 4.0))
        .await;
    first.wait_for_rows("tick_data", sent_ticks).await;
    wait_for_candle(&first, "FPT", (4.0, newest as i64)).await;
    assert_eq!(
        first
            .metric("tickvault_rows_written_total", &[("type", "tick")])
            .await,
        sent_ticks as f64,
        "each tick written once"
    );
    first.stop().await.unwrap();

    // What a crash between commit and ack leaves, for the older versions
    // only: the newest is committed and gone from the stream, versions 1-3
    // and the ticks are delivered again. Newest-wins must keep version 4;
    // last-write-wins would end on version 3.
    let stream = first
        .js
        .get_stream(&first.config.ingest.stream)
        .await
        .unwrap();
    stream.delete_message(newest).await.unwrap();
    for t in ["tick", "candle"] {
        stream
            .delete_consumer(&format!("tickvault-{t}"))
            .await
            .unwrap();
    }
    let db = first.take_database();
    let mut second = start(first.config.clone()).await;
    second.set_database(db);
    wait_for(
        Duration::from_secs(30),
        "the three old versions and the ticks written again",
        || async {
            let candles = second
                .metric("tickvault_rows_written_total", &[("type", "candle")])
                .await;
            let ticks = second
                .metric("tickvault_rows_written_total", &[("type", "tick")])
                .await;
            (candles == 3.0 && ticks == sent_ticks as f64).then_some(())
        },
    )
    .await;
    assert_eq!(
        candle_close(&second.pool, "FPT", T0).await,
        (4.0, newest as i64),
        "the older versions did not overwrite the newer one"
    );
    assert_eq!(
        second
            .metric("tickvault_messages_received_total", &[])
            .await,
        6.0,
        "each redelivered message taken once"
    );
    assert_eq!(second.count("tick_data").await, sent_ticks);
    second.stop().await.unwrap();
}

#[tokio::test]
async fn an_older_version_redelivered_after_a_newer_one_is_ignored() {
    let app = spawn_app(|c| c.ingest.flush_interval_ms = 100).await;
    let old = app
        .publish_json("candle", "HPG", &candle("HPG", T0, 1.0))
        .await;
    let new = app
        .publish_json("candle", "HPG", &candle("HPG", T0, 2.0))
        .await;
    wait_for_candle(&app, "HPG", (2.0, new as i64)).await;
    // A replica that committed the newer version first, then the older one
    // arriving late: the stored row keeps the higher sequence.
    sqlx::query("UPDATE candles_1m SET close = 3.0, stream_seq = $1")
        .bind(new as i64 + 1000)
        .execute(&app.pool)
        .await
        .unwrap();
    let stream = app.js.get_stream(&app.config.ingest.stream).await.unwrap();
    stream.delete_consumer("tickvault-candle").await.unwrap();
    wait_for(
        Duration::from_secs(30),
        "the old versions to be processed again",
        || async {
            (app.metric("tickvault_messages_received_total", &[("type", "candle")])
                .await
                >= 4.0
                && app
                    .metric("tickvault_queue_depth", &[("type", "candle")])
                    .await
                    == 0.0)
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        candle_close(&app.pool, "HPG", T0).await,
        (3.0, new as i64 + 1000)
    );
    assert!(old < new);
}

#[tokio::test]
async fn a_full_queue_stops_intake_waits_for_the_database_and_loses_nothing() {
    let (mut pg, mut app) = spawn_app_on_private_pg(|config| {
        config.ingest.queue_capacity = 1000;
        config.ingest.max_records_per_message = 100;
        config.ingest.batch_size = 100;
        config.ingest.max_batch_rows = 200;
        config.ingest.flush_interval_ms = 100;
        config.ingest.fetch_batch = 5;
    })
    .await;

    pg.stop();
    app.wait_database_down().await;
    let total = 3000;
    for m in 0..30 {
        let records: Vec<Value> = (0..100)
            .map(|i| tick("FPT", T0, m * 100 + i, 10.0))
            .collect();
        app.publish_json("tick", "FPT", &Value::Array(records))
            .await;
    }
    // The queue holds 10 messages, what is left of one pull (up to 5) waits
    // beside it, and no further pull is asked for.
    let taken = wait_for(Duration::from_secs(30), "intake to stop", || async {
        let depth = app
            .metric("tickvault_queue_depth", &[("type", "tick")])
            .await;
        let received = app
            .metric("tickvault_messages_received_total", &[("type", "tick")])
            .await;
        let pulls = app.consumer_info("tick").await.num_waiting;
        (depth == 1000.0 && received > 10.0 && pulls == 0).then_some(received)
    })
    .await;
    assert!(taken <= 15.0, "the queue and one pull: {taken}");
    assert_eq!(app.health().await["status"], "degraded");
    // Time passes with the writes failing and retried: intake stays stopped.
    let errors = app
        .wait_for_metric("tickvault_flush_errors_total", &[("type", "tick")], 1.0)
        .await;
    app.wait_for_metric(
        "tickvault_flush_errors_total",
        &[("type", "tick")],
        errors + 2.0,
    )
    .await;
    assert_eq!(
        app.metric("tickvault_messages_received_total", &[("type", "tick")])
            .await,
        taken,
        "no message taken while the queue is full"
    );
    assert_eq!(
        app.consumer_info("tick").await.num_pending,
        30 - taken as u64,
        "the rest waits in JetStream"
    );

    pg.resume();
    app.wait_for_rows("tick_data", total).await;
    wait_for(Duration::from_secs(30), "the queue to drain", || async {
        (app.metric("tickvault_queue_depth", &[("type", "tick")])
            .await
            == 0.0)
            .then_some(())
    })
    .await;
    assert_eq!(
        app.metric("tickvault_rows_written_total", &[("type", "tick")])
            .await,
        total as f64,
        "every row written once"
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn shutdown_flushes_every_waiting_row() {
    let mut app = spawn_app(|c| {
        c.ingest.batch_size = 10_000;
        c.ingest.max_batch_rows = 10_000;
        c.ingest.flush_interval_ms = 600_000;
    })
    .await;
    for seq in 0..40 {
        app.publish_json("tick", "FPT", &tick("FPT", T0, seq, 10.0))
            .await;
    }
    let seq = app
        .publish_json("candle", "FPT", &candle("FPT", T0, 1.0))
        .await;
    wait_for(
        Duration::from_secs(20),
        "rows waiting in the queues",
        || async {
            let depth = app.metric("tickvault_queue_depth", &[]).await;
            (depth == 41.0).then_some(())
        },
    )
    .await;
    assert_eq!(
        app.count("tick_data").await,
        0,
        "nothing flushed before shutdown"
    );
    app.stop().await.unwrap();
    assert_eq!(app.count("tick_data").await, 40);
    assert_eq!(candle_close(&app.pool, "FPT", T0).await, (1.0, seq as i64));
    let metrics = app.metrics.render();
    assert_eq!(
        metric_value(
            &metrics,
            "tickvault_flushes_total",
            &[("trigger", "shutdown")]
        ),
        2.0
    );
    // Acknowledged: nothing is left for the consumer to deliver again.
    let info = app.consumer_info("tick").await;
    assert_eq!((info.num_ack_pending, info.num_pending), (0, 0));
}

#[tokio::test]
async fn shutdown_with_the_database_down_hands_the_messages_back_and_a_restart_writes_them() {
    let mut pg = PgServer::start();
    let db = TestDatabase::create_on(&pg.admin_url()).await;
    let mut config = test_config(&db.url, &crate::helpers::shared_nats_url());
    config.ingest.flush_interval_ms = 100;
    // Long: only a nak at shutdown makes the messages available soon.
    config.ingest.ack_wait_secs = 60;
    let mut first = start(config.clone()).await;
    first.set_database(Some(db));
    first.wait_ready().await;

    pg.stop();
    let messages = 50;
    for seq in 0..messages {
        first
            .publish_json("tick", "FPT", &tick("FPT", T0, seq, 10.0))
            .await;
    }
    wait_for(
        Duration::from_secs(30),
        "the ticks to wait in the queue",
        || async {
            let depth = first
                .metric("tickvault_queue_depth", &[("type", "tick")])
                .await;
            (depth >= messages as f64).then_some(())
        },
    )
    .await;
    first
        .stop()
        .await
        .expect("shutdown succeeds with the database down");
    // Nothing was acknowledged: the ack floor never moved.
    let info = first.consumer_info("tick").await;
    assert_eq!(info.ack_floor.stream_sequence, 0, "{info:?}");

    pg.resume();
    let db = first.take_database();
    let stopped = Instant::now();
    let mut second = start(config.clone()).await;
    second.set_database(db);
    crate::helpers::wait_for_rows(&second.pool, "tick_data", messages, Duration::from_secs(20))
        .await;
    assert!(
        stopped.elapsed() < Duration::from_secs(20),
        "handed back at shutdown, not left to the 60 s ack wait"
    );
    let seqs: Vec<i64> = sqlx::query_scalar("SELECT seq FROM tick_data ORDER BY seq")
        .fetch_all(&second.pool)
        .await
        .unwrap();
    assert_eq!(seqs, (0..messages).collect::<Vec<_>>(), "each tick once");
    assert_eq!(
        second
            .metric("tickvault_messages_received_total", &[("type", "tick")])
            .await,
        messages as f64
    );
    second.stop().await.unwrap();
}

#[tokio::test]
async fn core_mode_workers_share_the_queue_group() {
    let core = |c: &mut tickvault::Config| {
        c.ingest.mode = tickvault::config::IngestMode::Core;
        c.ingest.flush_interval_ms = 100;
    };
    let first = spawn_app(core).await;
    let mut config = first.config.clone();
    config.http.addr = "127.0.0.1:0".parse().unwrap();
    let second = start(config).await;
    second.wait_ready().await;
    // Plain publishes: core mode reads the subjects, not a stream.
    let messages = 200;
    for seq in 0..messages {
        let payload = tick("FPT", T0, seq, 10.0).to_string();
        first
            .nats
            .publish(first.subject("tick", "FPT"), payload.into())
            .await
            .unwrap();
    }
    first.wait_for_rows("tick_data", messages).await;
    let received = |app: &crate::helpers::TestApp| {
        let metrics = app.metrics.render();
        metric_value(
            &metrics,
            "tickvault_messages_received_total",
            &[("type", "tick")],
        )
    };
    let written = |app: &crate::helpers::TestApp| {
        app.metrics
            .rows_written(tickvault::records::RecordType::Tick) as f64
    };
    let (a, b) = (received(&first), received(&second));
    assert!(
        a >= 1.0 && b >= 1.0,
        "both workers took messages: {a} + {b}"
    );
    assert_eq!(
        a + b,
        messages as f64,
        "the group delivers each message to one worker"
    );
    assert_eq!(
        written(&first) + written(&second),
        messages as f64,
        "each written once"
    );

    // Core mode has no sequence: the last version to arrive wins.
    first
        .nats
        .publish(
            first.subject("candle", "FPT"),
            candle("FPT", T0, 1.0).to_string().into(),
        )
        .await
        .unwrap();
    first.wait_for_rows("candles_1m", 1).await;
    let stream_seq: Option<i64> = sqlx::query_scalar("SELECT stream_seq FROM candles_1m")
        .fetch_one(&first.pool)
        .await
        .unwrap();
    assert_eq!(stream_seq, None, "core mode has no stream sequence");
}

#[tokio::test]
async fn replicas_share_the_durable_consumers() {
    // Small pulls, so one replica's pull request cannot take the whole feed.
    let first = spawn_app(|c| {
        c.ingest.flush_interval_ms = 100;
        c.ingest.fetch_batch = 10;
    })
    .await;
    let second_config = first.config.clone();
    assert_eq!(second_config.ingest.fetch_batch, 10);
    let second = start(second_config).await;
    second.wait_ready().await;
    let messages = 400;
    for seq in 0..messages {
        first
            .publish_json("tick", "SSI", &tick("SSI", T0, seq, 20.0))
            .await;
    }
    first.wait_for_rows("tick_data", messages).await;
    wait_for(
        Duration::from_secs(20),
        "every message acknowledged",
        || async {
            let info = first.consumer_info("tick").await;
            (info.num_ack_pending == 0).then_some(())
        },
    )
    .await;
    let counted = |name: &'static str| {
        let (first, second) = (&first, &second);
        async move {
            (
                first.metric(name, &[("type", "tick")]).await,
                second.metric(name, &[("type", "tick")]).await,
            )
        }
    };
    let (a, b) = counted("tickvault_messages_received_total").await;
    assert!(
        a >= 1.0 && b >= 1.0,
        "both replicas took messages: {a} + {b}"
    );
    assert_eq!(
        a + b,
        messages as f64,
        "each message delivered to one replica, once"
    );
    let (a, b) = counted("tickvault_rows_written_total").await;
    assert_eq!(
        a + b,
        messages as f64,
        "each row written by one replica, once"
    );
}

/// A random finite double, any exponent, from random bits.
fn random_double(rng: &mut impl rand::Rng) -> f64 {
    loop {
        let v = f64::from_bits(rng.random::<u64>());
        if v.is_finite() {
            return v;
        }
    }
}

/// `v` made acceptable for a float field's rule, keeping its digits.
fn allowed(v: f64, ty: FieldType) -> f64 {
    match ty {
        FieldType::Positive if v.abs() == 0.0 => 5e-324,
        FieldType::Positive => v.abs(),
        // -0.0 passes `>= 0`: it must come back as -0.0.
        FieldType::NonNegative if v == 0.0 => v,
        FieldType::NonNegative => v.abs(),
        _ => v,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_float_column_round_trips_bit_for_bit_through_the_table_and_history() {
    let app = spawn_app(|c| c.ingest.flush_interval_ms = 100).await;
    let specials = [
        13.841000000000001,
        0.1 + 0.2,
        1312.2930000000001,
        5e-324,
        2.2250738585072014e-308,
        1.7976931348623157e308,
        -0.0,
        -1.5e-7,
        123456789012345680.0,
    ];
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0x7ec5_f10a7);
    let rows = specials.len() + 10_000;
    let mut expected = Vec::new();
    for record_type in RecordType::ALL {
        let spec = record_type.spec();
        let floats: Vec<(usize, FieldType)> = spec
            .fields
            .iter()
            .enumerate()
            .filter(|(_, f)| {
                matches!(
                    f.ty,
                    FieldType::Positive | FieldType::NonNegative | FieldType::Finite
                )
            })
            .map(|(i, f)| (i, f.ty))
            .collect();
        let id = match record_type {
            RecordType::Index => "VNINDEX",
            RecordType::Deriv => "VN30F2412",
            _ => "FPT",
        };
        let mut values_of_type = Vec::with_capacity(rows);
        let mut records = Vec::with_capacity(rows);
        for i in 0..rows {
            let mut values: Vec<f64> = floats
                .iter()
                .map(|(_, ty)| {
                    let v = specials
                        .get(i)
                        .copied()
                        .unwrap_or_else(|| random_double(&mut rng));
                    allowed(v, *ty)
                })
                .collect();
            if record_type == RecordType::Candle {
                // open, high, low, close: low the least, high the most.
                let mut ohlc = values[..4].to_vec();
                ohlc.sort_by(|a, b| a.total_cmp(b));
                values[..4].copy_from_slice(&[ohlc[1], ohlc[3], ohlc[0], ohlc[2]]);
            }
            let mut record = serde_json::Map::new();
            for (f, field) in spec.fields.iter().enumerate() {
                let value = match field.ty {
                    FieldType::Symbol => json!(id),
                    FieldType::Timestamp => json!(T0 + i as i64),
                    FieldType::Side => json!("buy"),
                    FieldType::PositiveInt | FieldType::NonNegativeInt => json!(i as i64 + 1),
                    _ => {
                        let k = floats.iter().position(|(p, _)| *p == f).unwrap();
                        json!(values[k])
                    }
                };
                record.insert(field.name.to_string(), value);
            }
            records.push(Value::Object(record));
            values_of_type.push(values);
        }
        for chunk in records.chunks(1000) {
            // serde_json prints each double in its shortest round-trip form.
            app.publish_json(record_type.name(), id, &Value::Array(chunk.to_vec()))
                .await;
        }
        expected.push((record_type, id, floats, values_of_type));
    }

    for (record_type, id, floats, values) in &expected {
        let spec = record_type.spec();
        app.wait_for_rows(spec.table, rows as i64).await;
        let columns: Vec<String> = floats
            .iter()
            .map(|(i, _)| format!("\"{}\"", spec.fields[*i].name))
            .collect();
        let stored = sqlx::query(&format!(
            "SELECT {} FROM {} ORDER BY \"timestamp\"",
            columns.join(", "),
            spec.table
        ))
        .fetch_all(&app.pool)
        .await
        .unwrap();
        let from_table: Vec<Vec<f64>> = stored
            .iter()
            .map(|row| (0..floats.len()).map(|k| row.get::<f64, _>(k)).collect())
            .collect();
        assert_bits_equal(&from_table, values, &format!("{} table", spec.table));

        // The history reply, page by page.
        let subject = format!(
            "{}.{}",
            app.config.history.subject_prefix, spec.history_kind
        );
        let mut body =
            json!({"symbol": id, "from": "2025-11-26", "to": "2025-11-26", "limit": 50_000});
        let mut from_history = Vec::new();
        loop {
            let reply = app
                .nats
                .request(subject.clone(), body.to_string().into())
                .await
                .expect("history answers");
            let reply: Value = serde_json::from_slice(&reply.payload).expect("JSON reply");
            for row in reply["rows"].as_array().expect("rows") {
                from_history.push(
                    floats
                        .iter()
                        .map(|(i, _)| row[spec.fields[*i].name].as_f64().expect("a number"))
                        .collect::<Vec<f64>>(),
                );
            }
            match reply["next_cursor"].as_str() {
                Some(cursor) => body["cursor"] = json!(cursor),
                None => break,
            }
        }
        assert_bits_equal(
            &from_history,
            values,
            &format!("history.{}", spec.history_kind),
        );
    }
}

fn assert_bits_equal(got: &[Vec<f64>], want: &[Vec<f64>], place: &str) {
    assert_eq!(got.len(), want.len(), "{place}: rows");
    let differing: Vec<(usize, f64, f64)> = got
        .iter()
        .zip(want)
        .enumerate()
        .flat_map(|(i, (g, w))| {
            g.iter()
                .zip(w)
                .filter(|(g, w)| g.to_bits() != w.to_bits())
                .map(move |(g, w)| (i, *g, *w))
        })
        .collect();
    assert!(
        differing.is_empty(),
        "{place}: {} values differ, first (row, got, sent): {:?}",
        differing.len(),
        &differing[..differing.len().min(5)]
    );
}
