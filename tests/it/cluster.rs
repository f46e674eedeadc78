//! Clustered deployments on private servers: a 3-node JetStream cluster with
//! R3 streams that loses the worker's node and the stream's leader under a
//! steady feed, `ingest.stream_replicas`, and history reading a streaming
//! standby (`history.database_url`) that goes away while ingest goes on.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use serde_json::{json, Value};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tickvault::secret::SecretUrl;
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

/// 2026-11-26T09:15:00+07:00 in epoch milliseconds.
const SESSION_START_MS: i64 = 1_795_659_300_000;

fn tick(seq: i64) -> Value {
    json!({"symbol": "FPT", "timestamp": SESSION_START_MS + seq, "price": 97.5,
           "volume": 100, "side": "buy", "seq": seq})
}

/// The stream's info, once the server answers (a leader may be being elected).
async fn stream_info(js: &jetstream::Context, name: &str) -> stream::Info {
    wait_for(
        Duration::from_secs(30),
        &format!("info of stream {name}"),
        || async {
            let mut stream = js.get_stream(name).await.ok()?;
            stream.info().await.ok().cloned()
        },
    )
    .await
}

/// Waits until the stream has a leader and every peer is current (caught up).
async fn wait_until_replicated(js: &jetstream::Context, name: &str) -> stream::ClusterInfo {
    wait_for(
        Duration::from_secs(60),
        &format!("stream {name} with a leader and every replica current"),
        || async {
            let mut stream = js.get_stream(name).await.ok()?;
            let cluster = stream.info().await.ok()?.cluster.clone()?;
            let complete = cluster.leader.is_some()
                && cluster.replicas.len() == 2
                && cluster.replicas.iter().all(|r| r.current && !r.offline);
            complete.then_some(cluster)
        },
    )
    .await
}

async fn wait_for_rows_at_least(app: &TestApp, rows: i64) {
    wait_for(
        Duration::from_secs(60),
        &format!("at least {rows} rows in tick_data"),
        || async { (app.count("tick_data").await >= rows).then_some(()) },
    )
    .await
}

/// Publishes one tick every 10 ms through JetStream, each retried until the
/// stream acknowledges it (never abandoned, so what the stream holds is
/// exactly the acknowledged set); returns the sequences acknowledged.
fn steady_feed(
    client: async_nats::Client,
    subject: String,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<BTreeSet<i64>> {
    tokio::spawn(async move {
        let js = jetstream::context::ContextBuilder::new()
            .timeout(Duration::from_secs(2))
            .build(client);
        let mut acked = BTreeSet::new();
        let mut every = tokio::time::interval(Duration::from_millis(10));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq = 0;
        while !stop.is_cancelled() {
            every.tick().await;
            let payload = tick(seq).to_string();
            loop {
                let stored = match js.publish(subject.clone(), payload.clone().into()).await {
                    Ok(ack) => ack.await.is_ok(),
                    Err(_) => false,
                };
                if stored {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            acked.insert(seq);
            seq += 1;
        }
        acked
    })
}

/// Kills (SIGKILL) the node the worker is connected to, then the stream's
/// leader, each restarted after ingest went on without it: every
/// acknowledged tick is in the table once, the worker never exits and is
/// ready again.
#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_loses_the_workers_node_then_the_stream_leader_and_keeps_every_record_once() {
    let mut cluster = NatsCluster::start(3).await;
    let client_name = format!("tickvault-{}", unique());
    let app = spawn_app_on(&cluster.url(), |config| {
        config.ingest.stream_replicas = 3;
        // Deliveries lost with a killed node come back after this.
        config.ingest.ack_wait_secs = 5;
        config.nats.client_name = client_name.clone();
    })
    .await;
    let stream = app.config.ingest.stream.clone();
    assert_eq!(stream_info(&app.js, &stream).await.config.num_replicas, 3);
    wait_until_replicated(&app.js, &stream).await;

    let stop = CancellationToken::new();
    let feed = steady_feed(app.nats.clone(), app.subject("tick", "FPT"), stop.clone());
    wait_for_rows_at_least(&app, 100).await;

    // 1. The node the worker is connected to.
    let workers_node = wait_for(
        Duration::from_secs(10),
        "the worker's connection",
        || async {
            match cluster.nodes_serving(&client_name).await[..] {
                [node] => Some(node),
                _ => None,
            }
        },
    )
    .await;
    cluster.kill(workers_node);
    let rows = app.count("tick_data").await;
    wait_for(
        Duration::from_secs(30),
        "the worker connected to another node",
        || async {
            let serving = cluster.nodes_serving(&client_name).await;
            (!serving.is_empty() && !serving.contains(&workers_node)).then_some(())
        },
    )
    .await;
    wait_for_rows_at_least(&app, rows + 200).await;
    cluster.restart(workers_node);
    let replicated = wait_until_replicated(&app.js, &stream).await;

    // 2. The stream's leader.
    let leader = cluster.index_of(replicated.leader.as_deref().unwrap());
    cluster.kill(leader);
    let rows = app.count("tick_data").await;
    wait_for_rows_at_least(&app, rows + 200).await;
    cluster.restart(leader);
    wait_until_replicated(&app.js, &stream).await;

    stop.cancel();
    let acked = feed.await.unwrap();
    assert!(acked.len() > 500, "a steady feed: {} ticks", acked.len());
    app.wait_for_rows("tick_data", acked.len() as i64).await;
    let stored: Vec<i64> = sqlx::query_scalar("SELECT seq FROM tick_data ORDER BY seq")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(
        stored,
        acked.into_iter().collect::<Vec<_>>(),
        "every acknowledged tick once, nothing else"
    );
    assert!(app.is_running(), "the worker never exited");
    app.wait_ready().await;
}

/// The worker binary's log lines, one JSON object each.
fn log_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// `ingest.stream_replicas = 3` creates R3 feed and dead-letter streams; a
/// stream that already exists with another count is used as it is and the
/// difference is logged once, as a warning naming the setting.
#[tokio::test(flavor = "multi_thread")]
async fn stream_replicas_creates_r3_streams_and_an_existing_stream_is_used_as_it_is() {
    let cluster = NatsCluster::start(3).await;
    let app = spawn_app_on(&cluster.url(), |config| config.ingest.stream_replicas = 3).await;
    for name in [
        app.config.ingest.stream.clone(),
        format!("{}_DLQ", app.config.ingest.stream),
    ] {
        assert_eq!(stream_info(&app.js, &name).await.config.num_replicas, 3);
        wait_until_replicated(&app.js, &name).await;
    }

    // An R1 feed stream made by someone else, then the worker binary with 3.
    let id = unique();
    let (stream, prefix) = (format!("TV_{id}"), format!("md{id}"));
    app.js
        .create_stream(stream::Config {
            name: stream.clone(),
            subjects: ["tick", "candle", "foreign", "index", "deriv"]
                .iter()
                .map(|t| format!("{prefix}.{t}.>"))
                .collect(),
            num_replicas: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    let db = TestDatabase::create().await;
    let logs = tempfile::tempdir().unwrap();
    let log_path = logs.path().join("worker.log");
    let http = format!("127.0.0.1:{}", free_port());
    let mut worker = Command::new(env!("CARGO_BIN_EXE_tickvault"))
        .arg("run")
        .current_dir(logs.path())
        .env("DATABASE_URL", &db.url)
        .env("NATS_URL", cluster.url())
        .env("TICKVAULT_INGEST__STREAM", &stream)
        .env("TICKVAULT_INGEST__SUBJECT_PREFIX", &prefix)
        .env("TICKVAULT_INGEST__STREAM_REPLICAS", "3")
        .env("TICKVAULT_HISTORY__SUBJECT_PREFIX", format!("history{id}"))
        .env("TICKVAULT_HTTP__ADDR", &http)
        .env("TICKVAULT_LOG__FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    wait_for(Duration::from_secs(60), "the worker's /ready", || async {
        let response = reqwest::get(format!("http://{http}/ready")).await.ok()?;
        (response.status() == 200).then_some(())
    })
    .await;
    let status = crate::helpers::terminate(&mut worker, Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0));

    assert_eq!(
        stream_info(&app.js, &stream).await.config.num_replicas,
        1,
        "an existing stream is used as it is"
    );
    let dead_letters = format!("{stream}_DLQ");
    assert_eq!(
        stream_info(&app.js, &dead_letters)
            .await
            .config
            .num_replicas,
        3
    );
    let warnings: Vec<Value> = log_lines(&log_path)
        .into_iter()
        .filter(|l| {
            l["level"] == "WARN"
                && l["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("ingest.stream_replicas"))
        })
        .collect();
    assert_eq!(warnings.len(), 1, "logged once: {warnings:#?}");
    assert_eq!(warnings[0]["stream"], stream.as_str());
    assert_eq!(warnings[0]["replicas"], 1);
    for name in [stream, dead_letters] {
        let _ = app.js.delete_stream(name).await;
    }
}

/// A history request and its reply: the JSON body and the error code header.
async fn history_ticks(app: &TestApp) -> (Value, Option<String>) {
    let body = json!({"symbol": "FPT", "from": "2026-11-26", "to": "2026-11-26", "limit": 50000});
    let message = tokio::time::timeout(
        Duration::from_secs(30),
        app.nats.send_request(
            format!("{}.ticks", app.config.history.subject_prefix),
            async_nats::Request::new().payload(body.to_string().into()),
        ),
    )
    .await
    .expect("the service answers within 30 s")
    .expect("the request is delivered");
    let code = message
        .headers
        .as_ref()
        .and_then(|h| h.get("Nats-Service-Error-Code"))
        .map(|v| v.to_string());
    (serde_json::from_slice(&message.payload).unwrap(), code)
}

/// Scans of `tick_data` counted by the server behind `pool` (its own statistics).
async fn tick_data_scans(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT (coalesce(seq_scan, 0) + coalesce(idx_scan, 0))::bigint
         FROM pg_stat_user_tables WHERE relname = 'tick_data'",
    )
    .fetch_optional(pool)
    .await
    .unwrap()
    .unwrap_or(0)
}

/// `history.database_url` on a streaming standby: history reads it, ingest
/// writes the primary; the standby stopped, history answers 503 at once
/// while ingest goes on; back, history answers again.
#[tokio::test(flavor = "multi_thread")]
async fn history_reads_a_streaming_standby_and_answers_503_without_it_while_ingest_goes_on() {
    let primary = PgServer::start();
    let db = TestDatabase::create_on(&primary.admin_url()).await;
    let mut standby = PgServer::standby_of(&primary);
    let standby_url = standby.url(&db.name);
    let app = spawn_app_with(db, &shared_nats_url(), |config| {
        config.history.database_url = Some(SecretUrl::new(standby_url.clone()));
        config.history.pool_max = 3;
        // Without the health check's verdict, a request would wait this long
        // for a connection to the stopped standby.
        config.database.acquire_timeout_ms = 20_000;
    })
    .await;
    let health = wait_for(Duration::from_secs(30), "the standby up", || async {
        let health = app.health().await;
        (health["history_database"] == "up").then_some(health)
    })
    .await;
    assert_eq!(health["history_database_source"], "replica");
    assert_eq!(health["status"], "ok");
    let standby_pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&standby_url)
        .await
        .unwrap();
    let read_only: String = sqlx::query_scalar("SHOW transaction_read_only")
        .fetch_one(&standby_pool)
        .await
        .unwrap();
    assert_eq!(read_only, "on", "a standby takes no writes");

    for seq in 0..20 {
        app.publish_json("tick", "FPT", &tick(seq)).await;
    }
    app.wait_for_rows("tick_data", 20).await;
    // What the primary committed reaches the standby a moment later.
    wait_for(
        Duration::from_secs(30),
        "the standby to replay the rows",
        || async { (history_ticks(&app).await.0["rows"].as_array()?.len() == 20).then_some(()) },
    )
    .await;
    // Nothing but history reads tick_data on the standby: its scans count
    // history's reads. (A backend reports its statistics within seconds.)
    let standby_before = tick_data_scans(&standby_pool).await;
    const READS: i64 = 10;
    for _ in 0..READS {
        let (reply, code) = history_ticks(&app).await;
        assert_eq!(code, None, "{reply}");
        assert_eq!(reply["rows"].as_array().unwrap().len(), 20);
    }
    let standby_after = wait_for(
        Duration::from_secs(30),
        "the standby to count the history reads",
        || async {
            let scans = tick_data_scans(&standby_pool).await;
            (scans >= standby_before + READS).then_some(scans)
        },
    )
    .await;
    assert!(standby_after >= standby_before + READS);
    standby_pool.close().await;

    // The standby goes away: history answers 503 at once, ingest goes on.
    standby.stop();
    wait_for(
        Duration::from_secs(30),
        "/health to see the standby down",
        || async { (app.health().await["history_database"] == "down").then_some(()) },
    )
    .await;
    let asked = Instant::now();
    let (reply, code) = history_ticks(&app).await;
    assert_eq!(code.as_deref(), Some("503"), "{reply}");
    assert_eq!(reply["error"]["retry_after_s"], 2);
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "answered without waiting for a connection (acquire timeout 20 s): {:?}",
        asked.elapsed()
    );
    let health = app.health().await;
    assert_eq!(
        (&health["status"], &health["database"]),
        (&json!("degraded"), &json!("up"))
    );
    assert_eq!(app.metric("tickvault_history_db_up", &[]).await, 0.0);
    assert_eq!(app.metric("tickvault_db_up", &[]).await, 1.0);
    let (code, body) = app.get("/ready").await;
    assert_eq!(code, 200, "ingest is ready: {body}");
    assert!(body.contains("history database"), "{body}");
    for seq in 20..40 {
        app.publish_json("tick", "FPT", &tick(seq)).await;
    }
    app.wait_for_rows("tick_data", 40).await;

    // Back: history answers again, with the rows written meanwhile.
    standby.resume();
    wait_for(
        Duration::from_secs(60),
        "history from the standby again",
        || async {
            let (reply, _) = history_ticks(&app).await;
            (reply["rows"].as_array()?.len() == 40).then_some(())
        },
    )
    .await;
    assert_eq!(app.health().await["status"], "ok");
}
