//! Lifecycle: start degraded without the database or NATS and recover
//! without a restart; SIGTERM drains and exits 0; a killed worker loses
//! nothing on restart.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use crate::helpers::{
    free_port, shared_nats_url, start, test_config, wait_for, NatsServer, PgServer, StreamCleanup,
    TestDatabase,
};
use crate::ingest::{candle, tick};

const T0: i64 = 1_764_123_300_000;

#[tokio::test]
async fn starts_degraded_without_the_database_and_recovers_by_itself() {
    let mut pg = PgServer::start();
    let db = TestDatabase::create_on(&pg.admin_url()).await;
    pg.stop();
    let mut app = start(test_config(&db.url, &shared_nats_url())).await;
    app.set_database(Some(db));
    wait_for(
        Duration::from_secs(20),
        "the database reported down",
        || async {
            let health = app.health().await;
            (health["database"] == "down" && health["nats"] == "connected").then_some(health)
        },
    )
    .await;
    let health = app.health().await;
    assert_eq!(health["status"], "degraded");
    assert_eq!(health["queues"]["tick"], 0);
    assert_eq!(app.ready_status().await, 503);
    // The health check tells a refused connection apart from other failures.
    // (An extra metric: its series appears with the first failure of a kind.)
    app.wait_for_metric(
        "tickvault_db_health_check_failures_total",
        &[("kind", "connection_refused")],
        1.0,
    )
    .await;

    pg.resume();
    app.wait_ready().await;
    assert_eq!(app.health().await["status"], "ok");
    assert_eq!(app.metric("tickvault_db_up", &[]).await, 1.0);
    // Migrated on recovery: the tables exist.
    assert_eq!(app.count("tick_data").await, 0);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn starts_degraded_without_nats_and_recovers_by_itself() {
    let mut nats = NatsServer::start();
    nats.stop();
    let db = TestDatabase::create().await;
    let mut app = start(test_config(&db.url, &nats.url())).await;
    app.set_database(Some(db));
    wait_for(Duration::from_secs(20), "the database up", || async {
        (app.health().await["database"] == "up").then_some(())
    })
    .await;
    let health = app.health().await;
    assert_eq!(
        (health["status"].as_str(), health["nats"].as_str()),
        (Some("degraded"), Some("disconnected"))
    );
    assert_eq!(app.ready_status().await, 503);

    nats.resume();
    app.wait_ready().await;
    assert_eq!(app.health().await["nats"], "connected");
    // The consumers are in place: a message flows end to end.
    app.publish(
        app.subject("tick", "FPT"),
        tick("FPT", T0, 1, 10.0).to_string(),
    )
    .await;
    app.wait_for_rows("tick_data", 1).await;
    app.stop().await.unwrap();
}

/// The `tickvault` binary as a child process, configured through the environment.
pub struct Worker {
    child: Child,
    http_port: u16,
}

/// A database, a feed prefix, the worker's environment and the stream cleanup.
pub async fn worker_setup() -> (TestDatabase, String, Vec<(String, String)>, StreamCleanup) {
    let db = TestDatabase::create().await;
    let id = crate::helpers::unique();
    let (stream, prefix) = (format!("TV_{id}"), format!("md{id}"));
    let env = worker_env(&db.url, &stream, &prefix, free_port());
    let cleanup = StreamCleanup {
        nats_url: shared_nats_url(),
        stream,
    };
    (db, prefix, env, cleanup)
}

pub fn worker_env(
    database_url: &str,
    stream: &str,
    prefix: &str,
    http_port: u16,
) -> Vec<(String, String)> {
    vec![
        ("DATABASE_URL".into(), database_url.into()),
        ("NATS_URL".into(), shared_nats_url()),
        ("TICKVAULT_INGEST__STREAM".into(), stream.into()),
        ("TICKVAULT_INGEST__SUBJECT_PREFIX".into(), prefix.into()),
        (
            "TICKVAULT_HISTORY__SUBJECT_PREFIX".into(),
            format!("{prefix}history"),
        ),
        (
            "TICKVAULT_HTTP__ADDR".into(),
            format!("127.0.0.1:{http_port}"),
        ),
        ("TICKVAULT_LOG__FORMAT".into(), "json".into()),
    ]
}

impl Worker {
    pub fn spawn(env: &[(String, String)], extra: &[(&str, &str)]) -> Worker {
        let http_port = env
            .iter()
            .find(|(k, _)| k == "TICKVAULT_HTTP__ADDR")
            .and_then(|(_, v)| v.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_tickvault"))
            .arg("run")
            .envs(env.iter().cloned())
            .envs(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the tickvault binary starts");
        Worker { child, http_port }
    }

    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        let response = reqwest::get(format!("http://127.0.0.1:{}{path}", self.http_port))
            .await
            .ok()?;
        Some((response.status().as_u16(), response.text().await.ok()?))
    }

    async fn wait_ready(&self) {
        wait_for(Duration::from_secs(30), "the worker /ready", || async {
            (self.get("/ready").await?.0 == 200).then_some(())
        })
        .await
    }

    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let (_, body) = self
            .get("/metrics")
            .await
            .expect("the worker answers /metrics");
        crate::helpers::metric_value(&body, name, labels)
    }

    /// A line of the worker's `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`).
    pub fn memory_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("the worker's /proc status");
        status
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{field}:")))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc status"))
    }

    fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), signal).unwrap();
    }

    /// Waits for the exit, within `bound`.
    async fn wait_exit(&mut self, bound: Duration) -> std::process::ExitStatus {
        wait_for(bound, "the worker to exit", || {
            let status = self.child.try_wait().unwrap();
            async move { status }
        })
        .await
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn publish(js: &async_nats::jetstream::Context, subject: String, payload: String) -> u64 {
    js.publish(subject, payload.into())
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence
}

async fn count(pool: &sqlx::PgPool, table: &str) -> i64 {
    crate::helpers::count(pool, table)
        .await
        .unwrap_or_else(|e| panic!("count {table}: {e}"))
}

#[tokio::test]
async fn sigterm_flushes_every_queue_and_exits_zero() {
    let (db, prefix, env, _cleanup) = worker_setup().await;
    let mut worker = Worker::spawn(&env, &[("TICKVAULT_INGEST__FLUSH_INTERVAL_MS", "600000")]);
    worker.wait_ready().await;
    let nats = async_nats::connect(shared_nats_url()).await.unwrap();
    let js = async_nats::jetstream::new(nats);
    for seq in 0..25 {
        publish(
            &js,
            format!("{prefix}.tick.FPT"),
            tick("FPT", T0, seq, 10.0).to_string(),
        )
        .await;
    }
    wait_for(Duration::from_secs(20), "25 rows waiting", || async {
        (worker
            .metric("tickvault_queue_depth", &[("type", "tick")])
            .await
            == 25.0)
            .then_some(())
    })
    .await;
    let pool = db.pool().await;
    assert_eq!(count(&pool, "tick_data").await, 0);

    let signalled = Instant::now();
    worker.signal(Signal::SIGTERM);
    let status = worker.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0), "SIGTERM exits 0");
    assert!(
        signalled.elapsed() < Duration::from_secs(20),
        "within the bound"
    );
    assert_eq!(
        count(&pool, "tick_data").await,
        25,
        "every waiting row was flushed"
    );
}

#[tokio::test]
async fn a_killed_worker_restarts_without_loss_duplicates_or_old_versions() {
    let (db, prefix, env, _cleanup) = worker_setup().await;
    let fast = [
        ("TICKVAULT_INGEST__FLUSH_INTERVAL_MS", "50"),
        ("TICKVAULT_INGEST__BATCH_SIZE", "100"),
        ("TICKVAULT_INGEST__ACK_WAIT_SECS", "2"),
    ];
    let mut worker = Worker::spawn(&env, &fast);
    worker.wait_ready().await;
    let nats = async_nats::connect(shared_nats_url()).await.unwrap();
    let js = async_nats::jetstream::new(nats);
    let pool = db.pool().await;

    // One message: 25 ticks and a new version of the same candle; returns
    // the candle's stream sequence.
    let publish_message = |m: i64| {
        let js = js.clone();
        let prefix = prefix.clone();
        async move {
            let ticks: Vec<Value> = (0..25).map(|i| tick("FPT", T0, m * 25 + i, 10.0)).collect();
            publish(
                &js,
                format!("{prefix}.tick.FPT"),
                Value::Array(ticks).to_string(),
            )
            .await;
            publish(
                &js,
                format!("{prefix}.candle.FPT"),
                candle("FPT", T0, m as f64 + 1.0).to_string(),
            )
            .await
        }
    };
    let messages: i64 = 200;
    let half = messages / 2;
    for m in 0..half {
        publish_message(m).await;
    }
    // Killed once it is writing: some rows committed, not necessarily all.
    wait_for(
        Duration::from_secs(30),
        "the worker to commit some ticks",
        || async { (count(&pool, "tick_data").await >= 250).then_some(()) },
    )
    .await;
    worker.signal(Signal::SIGKILL);
    worker.wait_exit(Duration::from_secs(10)).await;
    drop(worker);
    let committed_before = count(&pool, "tick_data").await;
    // The feed goes on while no worker runs: more ticks, newer candle versions.
    let mut last_candle_seq = 0;
    for m in half..messages {
        last_candle_seq = publish_message(m).await;
    }
    let last_version = messages as f64;
    let worker = Worker::spawn(&env, &fast);
    worker.wait_ready().await;
    let total = messages * 25;
    crate::helpers::wait_for_rows(&pool, "tick_data", total, Duration::from_secs(60)).await;
    wait_for(
        Duration::from_secs(30),
        "the last candle version, written by its own message",
        || async {
            let stored: Option<(f64, i64)> =
                sqlx::query_as("SELECT close, stream_seq FROM candles_1m")
                    .fetch_optional(&pool)
                    .await
                    .expect("read the candle");
            (stored == Some((last_version, last_candle_seq as i64))).then_some(())
        },
    )
    .await;
    // What the restarted worker did: it wrote at least every tick the killed
    // one had not committed, and no message twice (at most every row once).
    let written = worker
        .metric("tickvault_rows_written_total", &[("type", "tick")])
        .await as i64;
    assert!(
        (total - committed_before..=total).contains(&written),
        "restarted worker wrote {written} tick rows; {committed_before} of {total} were committed before the kill"
    );
    wait_for(
        Duration::from_secs(20),
        "every message acknowledged",
        || async {
            let stream = js
                .get_stream(env_value(&env, "TICKVAULT_INGEST__STREAM"))
                .await
                .ok()?;
            for consumer in ["tickvault-tick", "tickvault-candle"] {
                let info = stream.consumer_info(consumer).await.ok()?;
                if info.num_ack_pending > 0 || info.num_pending > 0 {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    drop(worker);
}

fn env_value<'a>(env: &'a [(String, String)], key: &str) -> &'a str {
    &env.iter().find(|(k, _)| k == key).expect("set").1
}

#[tokio::test]
async fn an_existing_stream_that_does_not_cover_the_feed_stops_start_up_saying_why() {
    let db = TestDatabase::create().await;
    let config = test_config(&db.url, &shared_nats_url());
    let _cleanup = StreamCleanup {
        nats_url: shared_nats_url(),
        stream: config.ingest.stream.clone(),
    };
    let nats = async_nats::connect(shared_nats_url()).await.unwrap();
    let js = async_nats::jetstream::new(nats);
    let only_ticks = format!("{}.tick.>", config.ingest.subject_prefix);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: config.ingest.stream.clone(),
        subjects: vec![only_ticks],
        ..Default::default()
    })
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
        .expect_err("a stream that misses subjects is an error")
        .to_string();
    let missing = format!("{}.candle.>", config.ingest.subject_prefix);
    assert!(message.contains(&config.ingest.stream), "{message}");
    assert!(message.contains(&missing), "{message}");
}
