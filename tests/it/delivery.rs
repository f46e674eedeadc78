//! The delivery lifecycle: held messages are kept alive and never delivered
//! twice, consumers follow the configuration, shutdown hands back what it
//! will not write, and nothing (a refused row, an unusable dead-letter
//! stream, a flood in core mode) stalls a type or grows memory without bound.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection};

use crate::helpers::{
    spawn_app, spawn_app_on_private_pg, start, test_config, wait_for, StreamCleanup, TestApp,
    TestDatabase,
};
use crate::ingest::tick;

const T0: i64 = 1_764_123_300_000;

/// Publishes `n` single-tick messages with seqs `first..first + n`.
async fn publish_ticks(app: &TestApp, first: i64, n: i64) {
    for seq in first..first + n {
        app.publish_json("tick", "FPT", &tick("FPT", T0, seq, 10.0))
            .await;
    }
}

async fn counter(app: &TestApp, name: &str, record_type: &str) -> f64 {
    app.metric(name, &[("type", record_type)]).await
}

/// Holds `LOCK TABLE ... IN ACCESS EXCLUSIVE MODE` in an open transaction
/// until released (or dropped).
struct TableLock {
    conn: PgConnection,
}

impl TableLock {
    async fn take(app: &TestApp, table: &str) -> TableLock {
        let mut conn = PgConnection::connect(app.config.database.url.expose())
            .await
            .expect("connect for the lock");
        sqlx::query("BEGIN").execute(&mut conn).await.unwrap();
        sqlx::query(&format!("LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
            .execute(&mut conn)
            .await
            .unwrap();
        TableLock { conn }
    }

    async fn release(mut self) {
        sqlx::query("ROLLBACK")
            .execute(&mut self.conn)
            .await
            .unwrap();
    }
}

/// Waits until a session of the app's database waits for a lock: the worker's write is stuck.
async fn wait_for_a_blocked_write(app: &TestApp) {
    wait_for(Duration::from_secs(30), "a write waiting for the lock", || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&app.pool)
        .await
        .expect("pg_stat_activity");
        (waiting > 0).then_some(())
    })
    .await
}

#[tokio::test]
async fn a_write_held_up_longer_than_the_ack_wait_is_not_delivered_twice() {
    let app = spawn_app(|c| {
        c.ingest.ack_wait_secs = 3;
        c.ingest.flush_interval_ms = 100;
    })
    .await;
    let lock = TableLock::take(&app, "tick_data").await;
    let locked_at = tokio::time::Instant::now();
    let messages = 20;
    publish_ticks(&app, 0, messages).await;
    wait_for_a_blocked_write(&app).await;
    // The scenario itself: the write stays held up for 10 s, more than three ack waits.
    tokio::time::sleep_until(locked_at + Duration::from_secs(10)).await;
    lock.release().await;

    app.wait_for_rows("tick_data", messages).await;
    wait_for(
        Duration::from_secs(20),
        "every message acknowledged",
        || async {
            let info = app.consumer_info("tick").await;
            (info.num_ack_pending == 0 && info.num_pending == 0).then_some(())
        },
    )
    .await;
    let info = app.consumer_info("tick").await;
    // Only ticks are in the stream: one delivery per message means the
    // consumer's delivery count equals the last stream sequence.
    assert_eq!(
        (
            info.delivered.consumer_sequence,
            info.delivered.stream_sequence
        ),
        (messages as u64, messages as u64),
        "no message was delivered twice"
    );
    assert_eq!(
        counter(&app, "tickvault_messages_received_total", "tick").await,
        messages as f64
    );
    assert_eq!(
        counter(&app, "tickvault_rows_written_total", "tick").await,
        messages as f64
    );
    assert!(
        counter(&app, "tickvault_flush_errors_total", "tick").await >= 1.0,
        "the held-up write timed out (statement_timeout) and was retried"
    );
}

#[tokio::test]
async fn a_changed_ack_wait_or_queue_capacity_updates_the_consumers_on_restart() {
    let mut first = spawn_app(|_| {}).await;
    let info = first.consumer_info("tick").await;
    assert_eq!(
        (info.config.ack_wait, info.config.max_ack_pending),
        (Duration::from_secs(30), 10_500)
    );
    first.stop().await.unwrap();

    let mut config = first.config.clone();
    config.ingest.ack_wait_secs = 7;
    config.ingest.queue_capacity = 2_000;
    let db = first.take_database();
    let mut second = start(config).await;
    second.set_database(db);
    second.wait_ready().await;
    for record_type in ["tick", "candle", "foreign", "index", "deriv"] {
        let info = second.consumer_info(record_type).await;
        assert_eq!(
            (info.config.ack_wait, info.config.max_ack_pending),
            (Duration::from_secs(7), 2_500),
            "{record_type}"
        );
    }
    // The updated consumer kept its place: a message still flows.
    second
        .publish_json("tick", "FPT", &tick("FPT", T0, 1, 10.0))
        .await;
    second.wait_for_rows("tick_data", 1).await;
    second.stop().await.unwrap();
}

#[tokio::test]
async fn a_consumer_change_jetstream_refuses_stops_start_up_naming_the_setting() {
    let db = TestDatabase::create().await;
    let config = test_config(&db.url, &crate::helpers::shared_nats_url());
    let _cleanup = StreamCleanup {
        nats_url: crate::helpers::shared_nats_url(),
        stream: config.ingest.stream.clone(),
    };
    let nats = async_nats::connect(crate::helpers::shared_nats_url())
        .await
        .unwrap();
    let js = jetstream::new(nats);
    tickvault::ingest::source::ensure_streams(&js, &config.ingest)
        .await
        .unwrap();
    // A consumer someone created by hand that delivers only new messages:
    // JetStream cannot change a deliver policy in place.
    let mut wanted = tickvault::ingest::source::consumer_config(
        &config.ingest,
        tickvault::records::RecordType::Tick,
    );
    wanted.deliver_policy = jetstream::consumer::DeliverPolicy::New;
    js.get_stream(&config.ingest.stream)
        .await
        .unwrap()
        .create_consumer(wanted)
        .await
        .unwrap();

    let app = tickvault::App::build(config.clone()).await.unwrap();
    let result = tokio::time::timeout(
        Duration::from_secs(30),
        app.run_until_stopped(std::future::pending()),
    )
    .await
    .expect("start-up fails instead of running");
    let message = result
        .expect_err("a refused update is an error")
        .to_string();
    assert!(message.contains("tickvault-tick"), "{message}");
    assert!(message.contains("deliver_policy"), "{message}");
}

#[tokio::test]
async fn at_shutdown_prefetched_messages_go_to_another_replica_at_once() {
    // A full queue that only flushes at shutdown, and one more pull held
    // beside it: the prefetched messages nobody will write here.
    let mut first = spawn_app(|c| {
        c.ingest.ack_wait_secs = 60;
        c.ingest.queue_capacity = 100;
        c.ingest.max_records_per_message = 10;
        c.ingest.fetch_batch = 50;
        c.ingest.batch_size = 1_000;
        c.ingest.max_batch_rows = 1_000;
        c.ingest.flush_interval_ms = 600_000;
    })
    .await;
    let messages = 300;
    publish_ticks(&first, 0, messages).await;
    wait_for(
        Duration::from_secs(30),
        "a full queue and a held pull",
        || async {
            let depth = counter(&first, "tickvault_queue_depth", "tick").await;
            let received = counter(&first, "tickvault_messages_received_total", "tick").await;
            // No pull open any more: intake has stopped with some messages held.
            let pulls = first.consumer_info("tick").await.num_waiting;
            (depth == 100.0 && received > 100.0 && pulls == 0).then_some(())
        },
    )
    .await;
    first.stop().await.unwrap();
    assert_eq!(first.count("tick_data").await, 100, "the queue was flushed");

    let signalled = Instant::now();
    let db = first.take_database();
    // The second replica flushes as usual.
    let mut config = first.config.clone();
    config.ingest.flush_interval_ms = 100;
    let mut second = start(config).await;
    second.set_database(db);
    // Within seconds, not after the 60 s ack wait: the 50 held messages were handed back.
    crate::helpers::wait_for_rows(&second.pool, "tick_data", messages, Duration::from_secs(15))
        .await;
    assert!(signalled.elapsed() < Duration::from_secs(15));
    assert_eq!(
        counter(&second, "tickvault_messages_received_total", "tick").await,
        200.0,
        "each message not written by the first replica was delivered once to the second"
    );
    second.stop().await.unwrap();
}

#[tokio::test]
async fn a_shutdown_while_writes_are_stuck_hands_the_messages_to_another_replica() {
    let mut first = spawn_app(|c| {
        c.ingest.ack_wait_secs = 60;
        c.ingest.flush_interval_ms = 100;
    })
    .await;
    let lock = TableLock::take(&first, "tick_data").await;
    let messages = 20;
    publish_ticks(&first, 0, messages).await;
    wait_for_a_blocked_write(&first).await;
    first
        .stop()
        .await
        .expect("shutdown succeeds with the writes stuck");
    lock.release().await;
    assert_eq!(
        first.count("tick_data").await,
        0,
        "the stuck write never committed"
    );

    let stopped = Instant::now();
    let db = first.take_database();
    let mut second = start(first.config.clone()).await;
    second.set_database(db);
    crate::helpers::wait_for_rows(&second.pool, "tick_data", messages, Duration::from_secs(15))
        .await;
    assert!(
        stopped.elapsed() < Duration::from_secs(15),
        "long before the 60 s ack wait"
    );
    assert_eq!(
        counter(&second, "tickvault_messages_received_total", "tick").await,
        messages as f64
    );
    second.stop().await.unwrap();
}

/// Subscribes to the app's dead letters of `record_type`.
async fn dead_letters(app: &TestApp, record_type: &str) -> async_nats::Subscriber {
    let subject = format!("{}.dlq.{record_type}", app.config.ingest.subject_prefix);
    let subscriber = app.nats.subscribe(subject).await.unwrap();
    app.nats.flush().await.unwrap();
    subscriber
}

async fn next_dead_letter(subscriber: &mut async_nats::Subscriber) -> async_nats::Message {
    tokio::time::timeout(Duration::from_secs(30), subscriber.next())
        .await
        .expect("a dead letter within 30 s")
        .expect("the subscription is open")
}

/// An array of a valid tick, a tick with an invalid side, another valid tick.
fn mixed(seqs: [i64; 2]) -> Value {
    let mut bad = tick("FPT", T0, 0, 10.0);
    bad["side"] = json!("hold");
    json!([
        tick("FPT", T0, seqs[0], 10.0),
        bad,
        tick("FPT", T0, seqs[1], 10.0)
    ])
}

async fn wait_all_acknowledged(app: &TestApp, record_type: &str) {
    wait_for(
        Duration::from_secs(30),
        "every message acknowledged",
        || async {
            let info = app.consumer_info(record_type).await;
            (info.num_ack_pending == 0 && info.num_pending == 0).then_some(())
        },
    )
    .await
}

#[tokio::test]
async fn a_dead_letter_stream_deleted_at_runtime_is_created_again() {
    let app = spawn_app(|c| c.ingest.flush_interval_ms = 100).await;
    let dlq = format!("{}_DLQ", app.config.ingest.stream);
    app.js.delete_stream(&dlq).await.unwrap();
    let mut letters = dead_letters(&app, "tick").await;

    app.publish_json("tick", "FPT", &mixed([1, 2])).await;
    let letter = next_dead_letter(&mut letters).await;
    assert_eq!(
        letter
            .headers
            .unwrap()
            .get("Tickvault-Reject-Reason")
            .unwrap()
            .as_str(),
        "invalid_value"
    );
    app.wait_for_rows("tick_data", 2).await;
    wait_all_acknowledged(&app, "tick").await;
    let mut stream = app.js.get_stream(&dlq).await.expect("created again");
    assert_eq!(stream.info().await.unwrap().state.messages, 1);
    let rejected = app
        .metric(
            "tickvault_rejected_total",
            &[("type", "tick"), ("reason", "invalid_value")],
        )
        .await;
    assert_eq!(rejected, 1.0, "counted once");
    assert_eq!(
        counter(&app, "tickvault_dead_letter_failures_total", "tick").await,
        0.0
    );
}

#[tokio::test]
async fn a_full_dead_letter_stream_ends_in_a_counted_termination_and_valid_rows_flow() {
    let app = spawn_app(|c| c.ingest.flush_interval_ms = 100).await;
    // The operator's DLQ: one message at most, new ones refused.
    let dlq = format!("{}_DLQ", app.config.ingest.stream);
    app.js.delete_stream(&dlq).await.unwrap();
    app.js
        .create_stream(jetstream::stream::Config {
            name: dlq.clone(),
            subjects: vec![format!("{}.dlq.>", app.config.ingest.subject_prefix)],
            max_messages: 1,
            discard: jetstream::stream::DiscardPolicy::New,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut bad = tick("FPT", T0, 0, 10.0);
    bad["side"] = json!("hold");
    app.publish_json("tick", "FPT", &bad).await;
    wait_all_acknowledged(&app, "tick").await;

    // The DLQ is full now: this message's dead letter cannot be stored.
    app.publish_json("tick", "FPT", &mixed([1, 2])).await;
    app.wait_for_rows("tick_data", 2).await;
    // The rest of the type flows meanwhile.
    app.publish_json("tick", "FPT", &tick("FPT", T0, 3, 10.0))
        .await;
    app.wait_for_rows("tick_data", 3).await;

    app.wait_for_metric(
        "tickvault_dead_letter_failures_total",
        &[("type", "tick")],
        1.0,
    )
    .await;
    wait_all_acknowledged(&app, "tick").await;
    let info = app.consumer_info("tick").await;
    // Stream: bad, mixed, valid. Deliveries: 1 + 3 (the bound) + 1.
    assert_eq!(
        (
            info.delivered.stream_sequence,
            info.delivered.consumer_sequence
        ),
        (3, 5),
        "the mixed message was delivered exactly 3 times, then terminated"
    );
    assert_eq!(
        counter(&app, "tickvault_dead_letter_failures_total", "tick").await,
        1.0
    );
    let rejected = app
        .metric(
            "tickvault_rejected_total",
            &[("type", "tick"), ("reason", "invalid_value")],
        )
        .await;
    assert_eq!(
        rejected, 2.0,
        "each bad record counted once, not per delivery"
    );
}

#[tokio::test]
async fn a_bad_payload_near_the_max_payload_is_dead_lettered_truncated() {
    let app = spawn_app(|c| c.ingest.flush_interval_ms = 100).await;
    let max_payload = app.nats.server_info().max_payload;
    let mut letters = dead_letters(&app, "tick").await;
    // Not JSON, 100 bytes under the limit: with its headers the dead letter would not fit.
    let payload = vec![b'x'; max_payload - 100];
    app.publish(app.subject("tick", "FPT"), payload.clone())
        .await;
    app.publish_json("tick", "FPT", &tick("FPT", T0, 1, 10.0))
        .await;

    let letter = next_dead_letter(&mut letters).await;
    let headers = letter.headers.clone().unwrap();
    assert_eq!(
        headers.get("Tickvault-Reject-Reason").unwrap().as_str(),
        "invalid_json"
    );
    assert_eq!(
        headers.get("Tickvault-Truncated").unwrap().as_str(),
        payload.len().to_string()
    );
    assert!(letter.payload.len() < payload.len());
    assert!(payload.starts_with(&letter.payload));
    app.wait_for_rows("tick_data", 1).await;
    wait_all_acknowledged(&app, "tick").await;
    let rejected = app
        .metric(
            "tickvault_rejected_total",
            &[("type", "tick"), ("reason", "invalid_json")],
        )
        .await;
    assert_eq!(rejected, 1.0);
    assert_eq!(
        counter(&app, "tickvault_dead_letter_failures_total", "tick").await,
        0.0
    );
    let info = app.consumer_info("tick").await;
    assert_eq!(info.delivered.consumer_sequence, 2, "no redelivery loop");
}

#[tokio::test]
async fn a_feed_stream_deleted_at_runtime_is_created_again() {
    let app = spawn_app(|c| c.ingest.flush_interval_ms = 100).await;
    app.publish_json("tick", "FPT", &tick("FPT", T0, 1, 10.0))
        .await;
    app.wait_for_rows("tick_data", 1).await;
    let before = app.consumer_info("tick").await.created;
    app.js
        .delete_stream(&app.config.ingest.stream)
        .await
        .unwrap();
    wait_for(
        Duration::from_secs(30),
        "the feed stream and a new consumer",
        || async {
            let stream = app.js.get_stream(&app.config.ingest.stream).await.ok()?;
            let info = stream.consumer_info("tickvault-tick").await.ok()?;
            (info.created != before && app.ready_status().await == 200).then_some(())
        },
    )
    .await;
    app.publish_json("tick", "FPT", &tick("FPT", T0, 2, 10.0))
        .await;
    app.wait_for_rows("tick_data", 2).await;
}

#[tokio::test]
async fn with_the_database_down_memory_is_bounded_by_the_queue_and_one_pull() {
    // A worker process of its own (its memory is measured), with defaults,
    // and a database that does not answer.
    let id = crate::helpers::unique();
    let (stream, prefix) = (format!("TV_{id}"), format!("md{id}"));
    let _cleanup = StreamCleanup {
        nats_url: crate::helpers::shared_nats_url(),
        stream: stream.clone(),
    };
    let nowhere = format!(
        "postgres://postgres@127.0.0.1:{}/none",
        crate::helpers::free_port()
    );
    let env = crate::lifecycle::worker_env(&nowhere, &stream, &prefix, crate::helpers::free_port());
    let worker = crate::lifecycle::Worker::spawn(&env, &[]);
    let nats = async_nats::connect(crate::helpers::shared_nats_url())
        .await
        .unwrap();
    let js = jetstream::new(nats.clone());
    wait_for(Duration::from_secs(30), "the tick consumer", || async {
        js.get_stream(&stream)
            .await
            .ok()?
            .consumer_info("tickvault-tick")
            .await
            .ok()
    })
    .await;
    let before_kib = worker.memory_kib("VmRSS");

    // 100 messages of ~1 MB each: one tick with a large field the record rules ignore.
    let max_payload = nats.server_info().max_payload;
    let pad = "x".repeat(max_payload - 2_000);
    let messages = 100;
    for seq in 0..messages {
        let mut record = tick("FPT", T0, seq, 10.0);
        record["pad"] = json!(pad);
        js.publish(format!("{prefix}.tick.FPT"), record.to_string().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    // Intake stops once the queue (10,000 places, ~1,000 per message) and
    // one pull (two such messages) are full.
    let received = wait_for(Duration::from_secs(30), "a full queue", || async {
        let depth = worker
            .metric("tickvault_queue_depth", &[("type", "tick")])
            .await;
        let received = worker
            .metric("tickvault_messages_received_total", &[("type", "tick")])
            .await;
        (depth > 9_000.0 && received >= 10.0).then_some(received)
    })
    .await;
    let peak_kib = worker.memory_kib("VmHWM");
    let grown_mib = peak_kib.saturating_sub(before_kib) as f64 / 1024.0;
    // The README's bound for one type with the defaults: 10 MiB of queued
    // payloads + a 2 MiB pull, doubled for the decoder's and the client's
    // transient copies, plus 8 MiB of slack.
    eprintln!("memory grew by {grown_mib:.1} MiB holding {received} messages of ~1 MB");
    assert!(
        grown_mib < 32.0,
        "memory grew by {grown_mib:.1} MiB holding {received} messages of ~1 MB"
    );
    assert!(
        received <= 14.0,
        "intake stopped: {received} of {messages} taken"
    );
    let info = js
        .get_stream(&stream)
        .await
        .unwrap()
        .consumer_info("tickvault-tick")
        .await
        .unwrap();
    assert!(
        info.num_pending >= (messages as u64 - 14),
        "the rest waits in JetStream"
    );
}

#[tokio::test]
async fn a_core_mode_flood_with_the_database_down_counts_every_drop() {
    let (mut pg, mut app) = spawn_app_on_private_pg(|config| {
        config.ingest.mode = tickvault::config::IngestMode::Core;
        config.ingest.queue_capacity = 1_000;
        config.ingest.flush_interval_ms = 100;
    })
    .await;
    pg.stop();
    app.wait_database_down().await;

    // A flood in chunks, each taken before the next (so the client's own
    // buffer never overflows): 3,000 valid ticks and 10 bad messages.
    let subject = app.subject("tick", "FPT");
    let mut published = 0;
    for chunk in 0..30 {
        for i in 0..100 {
            let seq = chunk * 100 + i;
            let payload = tick("FPT", T0, seq, 10.0).to_string();
            app.nats
                .publish(subject.clone(), payload.into())
                .await
                .unwrap();
        }
        if chunk % 3 == 0 {
            app.nats
                .publish(subject.clone(), "not json".into())
                .await
                .unwrap();
            published += 1;
        }
        published += 100;
        wait_for(Duration::from_secs(30), "the chunk taken", || async {
            let received = counter(&app, "tickvault_messages_received_total", "tick").await;
            (received == published as f64).then_some(())
        })
        .await;
    }
    let dropped = counter(&app, "tickvault_dropped_total", "tick").await;
    assert_eq!(
        dropped, 2_000.0,
        "the queue holds 1,000; the rest is dropped and counted"
    );

    pg.resume();
    app.wait_for_rows("tick_data", 1_000).await;
    let received = counter(&app, "tickvault_messages_received_total", "tick").await;
    let written = counter(&app, "tickvault_rows_written_total", "tick").await;
    let rejected = app
        .metric("tickvault_rejected_total", &[("type", "tick")])
        .await;
    assert_eq!((received, written, rejected), (3_010.0, 1_000.0, 10.0));
    assert_eq!(received, written + dropped + rejected);
    app.stop().await.unwrap();
}
