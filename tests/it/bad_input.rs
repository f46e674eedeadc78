//! Bad input: never written, counted, dead-lettered with its reason; the
//! valid records beside it still land and the worker keeps running.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};

use crate::helpers::{spawn_app_on, wait_for, NatsServer};
use crate::ingest::{candle, tick};

const T0: i64 = 1_764_123_300_000;

#[tokio::test]
async fn malformed_payloads_go_to_the_dead_letter_subject_and_valid_records_land() {
    // A private server that accepts 4 MB messages, so a 2 MB payload reaches the worker.
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("nats.conf");
    std::fs::write(&conf, "max_payload: 4194304\n").unwrap();
    let nats = NatsServer::start_with(&["-c", conf.to_str().unwrap()]);
    let app = spawn_app_on(&nats.url(), |c| {
        c.ingest.flush_interval_ms = 100;
        c.ingest.max_records_per_message = 1000;
    })
    .await;
    let prefix = app.config.ingest.subject_prefix.clone();
    let mut dead_letters = app.nats.subscribe(format!("{prefix}.dlq.>")).await.unwrap();
    app.nats.flush().await.unwrap();

    let valid = |seq| tick("FPT", T0, seq, 10.0);
    let with = |field: &str, value: Value| {
        let mut record = valid(1);
        record[field] = value;
        record.to_string()
    };
    let mut missing_seq = valid(1);
    missing_seq.as_object_mut().unwrap().remove("seq");
    let mut bad_candle = candle("FPT", T0, 10.0);
    bad_candle["high"] = json!(1.0);
    let too_many: Vec<Value> = (0..1001).map(valid).collect();
    let nested = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let huge = format!(
        "[{}]",
        vec![valid(1).to_string(); 2 * 1024 * 1024 / 90].join(",")
    );
    assert!(huge.len() > 2_000_000);

    let corpus: Vec<(&str, Vec<u8>, &str)> = vec![
        ("tick", b"not json at all".to_vec(), "invalid_json"),
        (
            "tick",
            with("price", json!("abc")).into_bytes(),
            "invalid_value",
        ),
        (
            "tick",
            with("volume", json!(-5)).into_bytes(),
            "invalid_value",
        ),
        (
            "tick",
            with("seq", json!(1.5)).into_bytes(),
            "invalid_value",
        ),
        (
            "tick",
            valid(1).to_string().replace("10.0", "NaN").into_bytes(),
            "invalid_json",
        ),
        (
            "tick",
            valid(1)
                .to_string()
                .replace("10.0", "Infinity")
                .into_bytes(),
            "invalid_json",
        ),
        (
            "tick",
            with("side", json!("hold")).into_bytes(),
            "invalid_value",
        ),
        (
            "tick",
            with("symbol", json!("FPT.X")).into_bytes(),
            "invalid_symbol",
        ),
        (
            "tick",
            with("symbol", json!("'; DROP TABLE tick_data; --")).into_bytes(),
            "invalid_symbol",
        ),
        (
            "tick",
            with("timestamp", json!("yesterday")).into_bytes(),
            "invalid_value",
        ),
        (
            "tick",
            missing_seq.to_string().into_bytes(),
            "missing_field",
        ),
        ("tick", huge.into_bytes(), "too_large"),
        ("tick", nested.into_bytes(), "invalid_json"),
        ("tick", b"[]".to_vec(), "empty_message"),
        ("tick", b"\"just a string\"".to_vec(), "invalid_shape"),
        ("tick", vec![0xff, 0xfe, 0x00], "invalid_json"),
        (
            "tick",
            Value::Array(too_many).to_string().into_bytes(),
            "too_many_records",
        ),
        (
            "candle",
            bad_candle.to_string().into_bytes(),
            "invalid_value",
        ),
        // Integers outside i64 are refused, never wrapped or rounded.
        (
            "tick",
            with("volume", json!(9_223_372_036_854_775_808u64)).into_bytes(),
            "invalid_value",
        ),
        (
            "tick",
            with("seq", json!(0))
                .replace("\"seq\":0", "\"seq\":1e19")
                .into_bytes(),
            "invalid_value",
        ),
        (
            "tick",
            json!([valid(10), {"symbol": "FPT", "timestamp": T0, "price": 1, "volume": 1,
                "side": "hold", "seq": 11}, valid(12)])
            .to_string()
            .into_bytes(),
            "invalid_value",
        ),
    ];
    let mut expected: BTreeMap<(String, String), usize> = BTreeMap::new();
    for (record_type, payload, reason) in &corpus {
        app.publish(app.subject(record_type, "FPT"), payload.clone())
            .await;
        *expected
            .entry((record_type.to_string(), reason.to_string()))
            .or_default() += 1;
    }

    // Every rejected input arrives on the dead-letter subject with its headers.
    let mut seen: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut mixed_record = None;
    for _ in 0..corpus.len() {
        let message = tokio::time::timeout(Duration::from_secs(30), dead_letters.next())
            .await
            .expect("a dead letter for each bad input")
            .unwrap();
        let headers = message.headers.clone().expect("dead letters carry headers");
        let reason = headers.get("Tickvault-Reject-Reason").unwrap().to_string();
        let original = headers
            .get("Tickvault-Original-Subject")
            .unwrap()
            .to_string();
        let record_type = message
            .subject
            .as_str()
            .rsplit('.')
            .next()
            .unwrap()
            .to_string();
        assert_eq!(original, app.subject(&record_type, "FPT"));
        if message.payload.as_ref().starts_with(b"{") && message.payload.len() < 200 {
            let record: Value = serde_json::from_slice(&message.payload).unwrap_or_default();
            if record["seq"] == 11 {
                mixed_record = Some(record);
            }
        }
        *seen.entry((record_type, reason)).or_default() += 1;
    }
    assert_eq!(seen, expected);
    let mixed_record = mixed_record.expect("the array's bad record is dead-lettered alone");
    assert_eq!(mixed_record["side"], "hold");

    // The valid records of the mixed array landed; the worker still takes input.
    app.publish(app.subject("tick", "FPT"), valid(99).to_string())
        .await;
    app.wait_for_rows("tick_data", 3).await;
    let seqs: Vec<i64> = sqlx::query_scalar("SELECT seq FROM tick_data ORDER BY seq")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(seqs, vec![10, 12, 99]);
    assert_eq!(app.count("candles_1m").await, 0);

    for ((record_type, reason), count) in &expected {
        let counted = app
            .metric(
                "tickvault_rejected_total",
                &[("type", record_type), ("reason", reason)],
            )
            .await;
        assert_eq!(counted, *count as f64, "{record_type}/{reason}");
    }
    // JetStream keeps the dead letters, and the originals were acknowledged.
    let mut dlq = app
        .js
        .get_stream(format!("{}_DLQ", app.config.ingest.stream))
        .await
        .unwrap();
    let kept = dlq.info().await.unwrap().state.messages;
    assert_eq!(kept, corpus.len() as u64);
    wait_for(
        Duration::from_secs(10),
        "every original acknowledged",
        || async {
            let stream = app.js.get_stream(&app.config.ingest.stream).await.ok()?;
            let mut consumer: async_nats::jetstream::consumer::PullConsumer =
                stream.get_consumer("tickvault-tick").await.ok()?;
            let info = consumer.info().await.ok()?;
            (info.num_ack_pending == 0 && info.num_pending == 0).then_some(())
        },
    )
    .await;
    assert_eq!(app.ready_status().await, 200, "the worker is still ready");
}

/// Publishes a batch whose middle record PostgreSQL refuses and checks
/// that only that record is dead-lettered, as its original text, with
/// `sqlstate` in its detail, while the rest of the type flows on.
async fn a_refused_row_is_dead_lettered_alone(app: &crate::helpers::TestApp, sqlstate: &str) {
    let prefix = app.config.ingest.subject_prefix.clone();
    let mut dead_letters = app
        .nats
        .subscribe(format!("{prefix}.dlq.tick"))
        .await
        .unwrap();
    app.nats.flush().await.unwrap();

    // The refused record as the feed wrote it: its own field order, spacing
    // and an unknown field, which a re-serialised row would not have.
    let refused = r#"{ "seq": 2, "symbol": "fpt", "note": "x", "timestamp": 1764123300000, "price": 5000.0, "volume": 100, "side": "buy" }"#;
    let batch = format!(
        "[{}, {refused}, {}]",
        tick("FPT", T0, 1, 10.0),
        tick("FPT", T0, 3, 10.0)
    );
    app.publish(app.subject("tick", "FPT"), batch).await;
    app.publish(
        app.subject("tick", "FPT"),
        tick("FPT", T0, 4, 10.0).to_string(),
    )
    .await;
    app.publish(
        app.subject("candle", "FPT"),
        candle("FPT", T0, 10.0).to_string(),
    )
    .await;

    let message = tokio::time::timeout(Duration::from_secs(30), dead_letters.next())
        .await
        .expect("the refused row is dead-lettered")
        .unwrap();
    let headers = message.headers.clone().unwrap();
    assert_eq!(
        headers.get("Tickvault-Reject-Reason").unwrap().as_str(),
        "database_rejected"
    );
    let detail = headers.get("Tickvault-Reject-Detail").unwrap().to_string();
    assert!(detail.contains(sqlstate), "{detail}");
    assert_eq!(
        std::str::from_utf8(&message.payload).unwrap(),
        refused,
        "the record's original text"
    );

    app.wait_for_rows("tick_data", 3).await;
    app.wait_for_rows("candles_1m", 1).await;
    let seqs: Vec<i64> = sqlx::query_scalar("SELECT seq FROM tick_data ORDER BY seq")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(seqs, vec![1, 3, 4]);
    wait_for(
        Duration::from_secs(10),
        "every message acknowledged",
        || async {
            let info = app.consumer_info("tick").await;
            (info.num_ack_pending == 0 && info.num_pending == 0).then_some(())
        },
    )
    .await;
    let rejected = app
        .metric(
            "tickvault_rejected_total",
            &[("type", "tick"), ("reason", "database_rejected")],
        )
        .await;
    assert_eq!(rejected, 1.0);
}

#[tokio::test]
async fn a_row_a_check_constraint_refuses_is_dead_lettered_alone_and_its_batch_still_lands() {
    let app = crate::helpers::spawn_app(|c| c.ingest.flush_interval_ms = 300).await;
    // A rule only the database knows: the row passes validation, PostgreSQL refuses it.
    sqlx::query("ALTER TABLE tick_data ADD CONSTRAINT price_cap CHECK (price < 1000)")
        .execute(&app.pool)
        .await
        .unwrap();
    a_refused_row_is_dead_lettered_alone(&app, "23514").await;
}

#[tokio::test]
async fn a_row_a_trigger_refuses_with_p0001_is_dead_lettered_alone_and_the_type_flows_on() {
    let app = crate::helpers::spawn_app(|c| c.ingest.flush_interval_ms = 300).await;
    // A site's validation trigger: RAISE EXCEPTION is SQLSTATE P0001, outside
    // the data-exception classes, and must not be retried forever.
    sqlx::raw_sql(
        "CREATE FUNCTION site_price_rule() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF NEW.price >= 1000 THEN RAISE EXCEPTION 'price % is above the site limit', NEW.price; END IF; \
         RETURN NEW; END $$; \
         CREATE TRIGGER site_price_rule BEFORE INSERT ON tick_data \
         FOR EACH ROW EXECUTE FUNCTION site_price_rule();",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    a_refused_row_is_dead_lettered_alone(&app, "P0001").await;
}
