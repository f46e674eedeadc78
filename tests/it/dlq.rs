//! `tickvault dlq`: dead letters made by the real worker, inspected and
//! replayed through the real streams into the real tables.

use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::tickvault;
use crate::helpers::{wait_for, TestApp};
use crate::ingest::{candle, tick};

/// 2026-11-26 09:15 +07:00
const T0: i64 = 1_764_123_300_000;

async fn stream_messages(app: &TestApp, stream: &str) -> u64 {
    let mut stream = app.js.get_stream(stream).await.expect("the stream exists");
    stream.info().await.expect("stream info").state.messages
}

async fn last_sequence(app: &TestApp, stream: &str) -> u64 {
    let mut stream = app.js.get_stream(stream).await.expect("the stream exists");
    stream
        .info()
        .await
        .expect("stream info")
        .state
        .last_sequence
}

async fn tick_seqs(app: &TestApp) -> Vec<i64> {
    sqlx::query_scalar("SELECT seq FROM tick_data ORDER BY seq")
        .fetch_all(&app.pool)
        .await
        .unwrap()
}

/// Runs `tickvault dlq <args>`; returns (success, stdout, stderr).
fn dlq(app: &TestApp, args: &[&str]) -> (bool, String, String) {
    let mut all = vec!["dlq"];
    all.extend_from_slice(args);
    let out = tokio::task::block_in_place(|| tickvault(app, &all));
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_are_counted_shown_and_replayed_once_the_table_is_fixed() {
    let app = crate::helpers::spawn_app(|c| c.ingest.flush_interval_ms = 200).await;
    let dlq_stream = format!("{}_DLQ", app.config.ingest.stream);
    let feed_stream = app.config.ingest.stream.clone();
    let prefix = app.config.ingest.subject_prefix.clone();
    // A rule only the database knows: prices of 1000 and more are refused.
    sqlx::query("ALTER TABLE tick_data ADD CONSTRAINT price_cap CHECK (price < 1000)")
        .execute(&app.pool)
        .await
        .unwrap();
    app.publish_json(
        "tick",
        "FPT",
        &json!([
            tick("FPT", T0, 1, 5000.0),
            tick("FPT", T0, 10, 10.0),
            tick("FPT", T0, 2, 5000.0)
        ]),
    )
    .await;
    app.publish_json("tick", "FPT", &tick("FPT", T0, 3, 5000.0))
        .await;
    app.publish_json("tick", "FPT", &tick("FPT", T0, 11, 10.0))
        .await;
    let mut bad_candle = candle("VNM", T0, 10.0);
    bad_candle["high"] = json!(1.0);
    app.publish_json("candle", "VNM", &bad_candle).await;
    app.publish(app.subject("tick", "HPG"), "not json").await;
    wait_for(Duration::from_secs(30), "5 dead letters stored", || async {
        (stream_messages(&app, &dlq_stream).await == 5).then_some(())
    })
    .await;
    app.wait_for_rows("tick_data", 2).await;

    // stats: per type and reason.
    let (ok, out, err) = dlq(&app, &["stats", "--format", "csv"]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "type,reason,count,oldest,newest");
    let counts: Vec<(String, String, String)> = lines[1..]
        .iter()
        .map(|l| {
            let c: Vec<&str> = l.split(',').collect();
            assert!(c[3].ends_with("+07:00") && c[4].ends_with("+07:00"), "{l}");
            (c[0].into(), c[1].into(), c[2].into())
        })
        .collect();
    assert_eq!(
        counts,
        vec![
            ("candle".into(), "invalid_value".into(), "1".into()),
            ("tick".into(), "database_rejected".into(), "3".into()),
            ("tick".into(), "invalid_json".into(), "1".into()),
        ]
    );
    assert!(err.contains("5 dead letters match"), "{err}");
    let (_, out, _) = dlq(&app, &["stats", "--since", "2999-01-01"]);
    assert!(out.is_empty(), "{out}");

    // show: the refused rows with their reason and original subject.
    let (ok, out, err) = dlq(
        &app,
        &[
            "show",
            "--type",
            "tick",
            "--reason",
            "database_rejected",
            "--json",
        ],
    );
    assert!(ok, "{err}");
    let shown: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(shown.len(), 3, "{out}");
    for letter in &shown {
        assert_eq!(letter["original_subject"], format!("{prefix}.tick.FPT"));
        let detail = letter["detail"].as_str().unwrap();
        assert!(
            detail.starts_with("PostgreSQL refused the row (SQLSTATE 23514)"),
            "{detail}"
        );
        let payload: Value = serde_json::from_str(letter["payload"].as_str().unwrap()).unwrap();
        assert_eq!(payload["price"].as_f64(), Some(5000.0));
    }
    let (_, text, _) = dlq(&app, &["show", "--limit", "1", "--type", "candle"]);
    assert!(
        text.contains("invalid_value") && text.contains(&format!("{prefix}.candle.VNM")),
        "{text}"
    );

    let selection = [
        "--type",
        "tick",
        "--reason",
        "database_rejected",
        "--wait",
        "30",
    ];
    let with = |extra: &[&'static str]| {
        let mut args = vec!["replay"];
        args.extend_from_slice(&selection);
        args.extend_from_slice(extra);
        args
    };

    // --dry-run changes nothing.
    let feed_before = last_sequence(&app, &feed_stream).await;
    let (ok, out, err) = dlq(&app, &with(&["--dry-run"]));
    assert!(ok, "{err}");
    assert!(
        out.contains("3 of 4 dead letters") && out.contains("dry run"),
        "{out}"
    );
    assert_eq!(last_sequence(&app, &feed_stream).await, feed_before);
    assert_eq!(stream_messages(&app, &dlq_stream).await, 5);
    assert_eq!(tick_seqs(&app).await, vec![10, 11]);

    // Replayed before the fix: refused again, dead-lettered again, and the
    // command neither loops nor replays its own new dead letters.
    let (ok, out, err) = dlq(&app, &with(&[]));
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("replayed 3 to their original subjects: 0 went back, 3 dead-lettered again (database_rejected: 3)"),
        "{out}"
    );
    assert_eq!(last_sequence(&app, &feed_stream).await, feed_before + 3);
    assert_eq!(
        stream_messages(&app, &dlq_stream).await,
        5,
        "3 replaced by their 3 new dead letters"
    );
    assert_eq!(tick_seqs(&app).await, vec![10, 11]);

    // The table fixed: the replay lands every row and removes the dead letters.
    sqlx::query("ALTER TABLE tick_data DROP CONSTRAINT price_cap")
        .execute(&app.pool)
        .await
        .unwrap();
    let (ok, out, err) = dlq(&app, &with(&[]));
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("replayed 3 to their original subjects: 3 went back, 0 dead-lettered again"),
        "{out}"
    );
    assert!(out.contains("removed 3 replayed dead letters"), "{out}");
    assert_eq!(tick_seqs(&app).await, vec![1, 2, 3, 10, 11]);
    assert_eq!(stream_messages(&app, &dlq_stream).await, 2);

    // The same selection again: nothing new.
    let feed_after = last_sequence(&app, &feed_stream).await;
    let (ok, out, err) = dlq(&app, &with(&[]));
    assert!(ok, "{err}");
    assert!(
        out.contains("0 of 1 dead letters") && out.contains("nothing to replay"),
        "{out}"
    );
    assert_eq!(last_sequence(&app, &feed_stream).await, feed_after);
    assert_eq!(tick_seqs(&app).await, vec![1, 2, 3, 10, 11]);

    // A filter by original subject: only the candle, still invalid, kept with --keep.
    let subject = format!("{prefix}.candle.*");
    let (ok, out, err) = dlq(
        &app,
        &["replay", "--subject", &subject, "--keep", "--wait", "30"],
    );
    assert!(ok, "{err}");
    assert!(out.contains("1 of 2 dead letters"), "{out}");
    assert!(
        out.contains("0 went back, 1 dead-lettered again (invalid_value: 1)"),
        "{out}"
    );
    assert!(out.contains("kept the replayed dead letters"), "{out}");
    assert_eq!(stream_messages(&app, &dlq_stream).await, 3);
    assert_eq!(app.count("candles_1m").await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_says_when_the_worker_did_not_process_it() {
    let mut app = crate::helpers::spawn_app(|c| c.ingest.flush_interval_ms = 200).await;
    let dlq_stream = format!("{}_DLQ", app.config.ingest.stream);
    app.publish(app.subject("tick", "FPT"), "{").await;
    wait_for(Duration::from_secs(30), "a dead letter", || async {
        (stream_messages(&app, &dlq_stream).await == 1).then_some(())
    })
    .await;
    app.stop().await.expect("the worker stops");
    let (ok, out, err) = dlq(&app, &["replay", "--wait", "2"]);
    assert!(!ok, "{out}");
    assert!(out.contains("1 not processed yet"), "{out}");
    assert!(
        err.contains("1 replayed message(s) were not processed") && err.contains("tickvault run"),
        "{err}"
    );
    assert_eq!(err.matches("error").count(), 1, "{err}");
    assert_eq!(
        stream_messages(&app, &dlq_stream).await,
        1,
        "kept for a later replay"
    );
}
