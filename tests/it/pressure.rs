//! History under pressure: a slow (locked) database, a flood of large
//! requests, the database down, stored values that overflow a bar's sum,
//! and the extreme dates. The service answers fast or refuses fast, never
//! piles requests up, and never keeps a busy connection.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use serde_json::json;
use sqlx::PgPool;

use crate::helpers::{
    free_port, shared_nats_url, spawn_app, spawn_app_on_private_pg, unique, wait_for,
    StreamCleanup, TestDatabase,
};
use crate::history::{ask, ask_raw, fetch_all, local, subject, Reply};
use crate::ingest::{candle, tick};

/// 2026-11-26 09:00 +07:00, in epoch milliseconds.
const T0: i64 = 1_795_658_400_000;

/// A reply and how long it took.
async fn timed(nats: &async_nats::Client, subject: String, body: Vec<u8>) -> (Reply, Duration) {
    let started = Instant::now();
    let reply = ask_raw(nats, subject, body).await;
    (reply, started.elapsed())
}

/// Like [`timed`], waiting up to a minute: a client sending 400 MB at once
/// needs longer than the default 10 s just to send the last requests.
async fn patiently(nats: &async_nats::Client, subject: String, body: Vec<u8>) -> (Reply, Duration) {
    let started = Instant::now();
    let request = async_nats::Request::new()
        .payload(body.into())
        .timeout(Some(Duration::from_secs(60)));
    let message = nats
        .send_request(subject, request)
        .await
        .expect("answered within a minute");
    let reply = Reply {
        headers: message.headers.clone(),
        size: message.payload.len(),
        json: serde_json::from_slice(&message.payload).expect("replies are JSON"),
    };
    (reply, started.elapsed())
}

fn message(reply: &Reply) -> String {
    reply.json["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The sessions of tickvault on the test database that are running a
/// statement or sitting inside a transaction.
async fn busy_sessions(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
         AND application_name = 'tickvault' AND pid <> pg_backend_pid() \
         AND state IN ('active', 'idle in transaction', 'idle in transaction (aborted)')",
    )
    .fetch_one(pool)
    .await
    .expect("read pg_stat_activity")
}

/// Takes `LOCK TABLE <table> IN ACCESS EXCLUSIVE MODE` in a transaction
/// left open: every statement touching the table waits until it ends.
async fn lock_table(pool: &PgPool, table: &str) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut blocker = pool.begin().await.unwrap();
    sqlx::query(&format!("LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
        .execute(&mut *blocker)
        .await
        .unwrap();
    blocker
}

// ------------------------------------------------------------- a locked table

/// A table lock held 11 s (eleven history statement timeouts, and past the
/// 10 s lock timeout of every connection), while history requests hammer
/// that table and ticks keep arriving: ticks keep landing, every history
/// request is answered within deadline + statement timeout, the candle
/// write fails on the lock and is retried, and once the lock is gone the
/// pool is idle within seconds.
#[tokio::test(flavor = "multi_thread")]
async fn a_locked_table_stalls_neither_ingest_of_the_others_nor_the_pool() {
    const FLUSH_MS: u64 = 200;
    const STATEMENT_MS: u64 = 1_000;
    const DEADLINE_MS: u64 = 1_000;
    let app = Arc::new(
        spawn_app(|c| {
            c.database.pool_max = 10;
            c.database.statement_timeout_ms = STATEMENT_MS;
            c.history.queue_deadline_ms = DEADLINE_MS;
            c.ingest.flush_interval_ms = FLUSH_MS;
        })
        .await,
    );
    app.publish_json("candle", "FPT", &candle("FPT", T0, 100.0))
        .await;
    app.wait_for_rows("candles_1m", 1).await;

    // The feed: one tick every 20 ms until told to stop.
    let feeding = Arc::new(AtomicBool::new(true));
    let feed = {
        let (app, feeding) = (app.clone(), feeding.clone());
        tokio::spawn(async move {
            let mut seq = 0;
            while feeding.load(Ordering::Relaxed) {
                seq += 1;
                app.publish_json("tick", "FPT", &tick("FPT", T0, seq, 100.0))
                    .await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            seq
        })
    };
    // Rows landing over time, sampled every 25 ms on a connection of the test's own.
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (pool, sampling) = (app.pool.clone(), sampling.clone());
        tokio::spawn(async move {
            let mut samples = Vec::new();
            while sampling.load(Ordering::Relaxed) {
                let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM tick_data")
                    .fetch_one(&pool)
                    .await
                    .unwrap();
                samples.push((Instant::now(), rows));
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            samples
        })
    };
    wait_for(Duration::from_secs(30), "ticks to land", || async {
        (app.count("tick_data").await > 0).then_some(())
    })
    .await;

    let blocker = lock_table(&app.pool, "candles_1m").await;
    let locked_at = Instant::now();
    // Longer than the history statement timeout, and than the lock timeout
    // every connection has, so the candle write fails (and is retried) too.
    let hold = tickvault::db::LOCK_TIMEOUT + Duration::from_secs(1);
    // Candles arriving meanwhile wait for the lock, fail, are retried, then land.
    for i in 1..=3 {
        app.publish_json("candle", "VNM", &candle("VNM", T0 + i * 60_000, 50.0))
            .await;
    }
    // 30 clients asking for candles back to back while the lock is held.
    let clients = (0..30).map(|i| {
        let app = app.clone();
        async move {
            let mut answers = Vec::new();
            while locked_at.elapsed() < hold {
                let body = if i % 3 == 0 {
                    json!({"kind": "candles", "symbols": ["FPT", "VNM"]})
                } else {
                    json!({"symbol": "FPT", "from": "2026-11-26", "to": "2026-11-26", "interval": "5m"})
                };
                let kind = if i % 3 == 0 { "latest" } else { "candles" };
                let (reply, took) =
                    timed(&app.nats, subject(&app, kind), body.to_string().into_bytes()).await;
                answers.push((reply.code(), took, message(&reply)));
            }
            answers
        }
    });
    // The most requests running at once, sampled meanwhile.
    let most_in_flight = async {
        let mut most = 0.0f64;
        while locked_at.elapsed() < hold {
            most = most.max(app.metric("tickvault_history_in_flight", &[]).await);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        most
    };
    let (answers, in_flight) = tokio::join!(futures::future::join_all(clients), most_in_flight);
    let answers: Vec<(u64, Duration, String)> = answers.into_iter().flatten().collect();
    blocker.commit().await.unwrap();
    let released_at = Instant::now();

    // History: answered within the deadline plus the statement timeout
    // (plus room for a loaded machine), 503 with retry_after_s, never 500.
    let bound = Duration::from_millis(DEADLINE_MS + STATEMENT_MS + 2_000);
    let slowest = answers.iter().map(|(_, took, _)| *took).max().unwrap();
    let expired = answers
        .iter()
        .filter(|(_, _, m)| m.contains("was not run"))
        .count();
    println!(
        "PRESSURE lock: {} history answers, slowest {slowest:?}, {expired} expired in the queue, at most {in_flight} running at once",
        answers.len()
    );
    assert!(answers.len() >= 30, "{}", answers.len());
    for (code, took, message) in &answers {
        assert!(*took <= bound, "answered after {took:?}: {message}");
        assert_eq!(*code, 503, "the table is locked: {message}");
    }
    assert!(expired > 0, "more requests than slots: some must expire");
    assert!(
        in_flight <= 5.0,
        "history uses at most half the pool: {in_flight}"
    );
    let expired_total = app.metric("tickvault_history_expired_total", &[]).await;
    assert!(
        expired_total >= expired as f64,
        "{expired_total} < {expired}"
    );

    // Ingest of the other tables went on: the longest time without a new tick row.
    sampling.store(false, Ordering::Relaxed);
    let samples = sampler.await.unwrap();
    let mut longest = Duration::ZERO;
    let mut last_change = locked_at;
    let mut last_rows = samples
        .iter()
        .take_while(|(at, _)| *at <= locked_at)
        .last()
        .map_or(0, |(_, rows)| *rows);
    for (at, rows) in samples.iter().filter(|(at, _)| *at > locked_at) {
        if *rows > last_rows {
            longest = longest.max(*at - last_change);
            last_change = *at;
            last_rows = *rows;
        }
    }
    longest = longest.max(released_at.min(samples.last().unwrap().0) - last_change);
    println!(
        "PRESSURE lock: longest pause of tick ingest while candles_1m was locked {}s: {longest:?} (flush interval {FLUSH_MS} ms)",
        hold.as_secs()
    );
    assert!(
        longest < Duration::from_millis(10 * FLUSH_MS),
        "tick ingest paused {longest:?} while another table was locked"
    );

    // The candles that waited for the lock land; the pool is idle within seconds.
    app.wait_for_rows("candles_1m", 4).await;
    let candle_write_failures = app
        .metric("tickvault_flush_errors_total", &[("type", "candle")])
        .await;
    println!("PRESSURE lock: candle writes failed {candle_write_failures} time(s) on the lock, then landed");
    assert!(
        candle_write_failures >= 1.0,
        "the candle write met the lock timeout"
    );
    feeding.store(false, Ordering::Relaxed);
    let published = feed.await.unwrap();
    app.wait_for_rows("tick_data", published).await;
    let idle_after = wait_for(Duration::from_secs(10), "an idle pool", || async {
        let in_use = app
            .metric("tickvault_db_pool_connections", &[("state", "in_use")])
            .await;
        (in_use == 0.0 && busy_sessions(&app.pool).await == 0).then(|| released_at.elapsed())
    })
    .await;
    println!("PRESSURE lock: pool idle {idle_after:?} after the lock was released");
    assert_eq!(app.metric("tickvault_history_in_flight", &[]).await, 0.0);
    assert_eq!(app.metric("tickvault_history_queue_depth", &[]).await, 0.0);
    let reply = ask(
        &app,
        "candles",
        json!({"symbol": "VNM", "from": "2026-11-26", "to": "2026-11-26"}),
    )
    .await;
    assert_eq!(reply.rows().len(), 3, "{}", reply.json);
}

// ---------------------------------------------------- 400 requests of 1 MB

/// The worker as a child process (its memory is its own), killed on drop.
struct Worker {
    child: std::process::Child,
    http: u16,
    _dir: tempfile::TempDir,
    _streams: StreamCleanup,
}

impl Worker {
    fn start(db: &TestDatabase, history_prefix: &str, env: &[(&str, &str)]) -> Worker {
        let dir = tempfile::tempdir().unwrap();
        let http = free_port();
        let stream = format!("TV_{}", unique());
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_tickvault"))
            .arg("run")
            .current_dir(dir.path())
            .env("DATABASE_URL", &db.url)
            .env("NATS_URL", shared_nats_url())
            .env("TICKVAULT_INGEST__STREAM", &stream)
            .env(
                "TICKVAULT_INGEST__SUBJECT_PREFIX",
                format!("md{}", unique()),
            )
            .env("TICKVAULT_HISTORY__SUBJECT_PREFIX", history_prefix)
            .env("TICKVAULT_HTTP__ADDR", format!("127.0.0.1:{http}"))
            .env("TICKVAULT_LOG__SUMMARY_INTERVAL_SECS", "0")
            .env("RUST_LOG", "error")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("the tickvault binary runs");
        Worker {
            child,
            http,
            _dir: dir,
            _streams: StreamCleanup {
                nats_url: shared_nats_url(),
                stream,
            },
        }
    }

    async fn get(&self, path: &str) -> Option<(u16, String)> {
        let response = reqwest::get(format!("http://127.0.0.1:{}{path}", self.http))
            .await
            .ok()?;
        let status = response.status().as_u16();
        Some((status, response.text().await.ok()?))
    }

    async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let (_, body) = self.get("/metrics").await.expect("/metrics answers");
        crate::helpers::metric_value(&body, name, labels)
    }

    /// `VmRSS` or `VmHWM` (the peak) from /proc, in KiB.
    fn memory_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("the worker is running");
        status
            .lines()
            .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} in /proc/<pid>/status"))
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Watches `pg_stat_activity` every 50 ms until `watching` is cleared and
/// returns how many distinct statements of tickvault it saw waiting for a
/// lock on the test database: each history query that reached the locked
/// table waits there for the whole statement timeout, so none is missed.
async fn lock_waits_seen(pool: PgPool, watching: Arc<AtomicBool>) -> usize {
    let mut seen = std::collections::HashSet::new();
    while watching.load(Ordering::Relaxed) {
        let waiting: Vec<(i32, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
            "SELECT pid, query_start FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name = 'tickvault' AND wait_event_type = 'Lock'",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        seen.extend(waiting);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    seen.len()
}

/// 400 requests of 1 MB each while every slot is stuck on a locked table:
/// the worker's memory stays bounded (the wait queue holds 16 MiB at most
/// and the rest is refused at once), and a request that expired in the
/// queue never reaches the database: the queries PostgreSQL shows waiting
/// for the lock are exactly those the service says it ran.
#[tokio::test(flavor = "multi_thread")]
async fn four_hundred_one_megabyte_requests_keep_memory_bounded_and_expired_ones_never_run() {
    const STATEMENT_MS: u64 = 2_000;
    let db = TestDatabase::create().await;
    let prefix = format!("history{}", unique());
    let worker = Worker::start(
        &db,
        &prefix,
        &[
            ("DB_POOL_MAX", "4"),
            ("DB_POOL_MIN", "0"),
            ("TICKVAULT_DATABASE__STATEMENT_TIMEOUT_MS", "2000"),
            ("TICKVAULT_HISTORY__QUEUE_DEADLINE_MS", "1000"),
            ("TICKVAULT_HISTORY__MAX_REQUEST_BYTES", "1100000"),
            ("TICKVAULT_HISTORY__MAX_QUEUED_BYTES", "16777216"),
        ],
    );
    wait_for(
        Duration::from_secs(60),
        "the worker to be ready",
        || async { (worker.get("/ready").await?.0 == 200).then_some(()) },
    )
    .await;
    let pool = db.pool().await;
    let nats = async_nats::connect(shared_nats_url()).await.unwrap();
    let ticks = format!("{prefix}.ticks");
    let small = json!({"symbol": "FPT", "from": "2026-11-26", "to": "2026-11-26"}).to_string();
    for _ in 0..5 {
        let reply = ask_raw(&nats, ticks.clone(), small.clone().into_bytes()).await;
        assert_eq!(reply.code(), 200, "{}", reply.json);
    }
    let before_kib = worker.memory_kib("VmRSS");
    let ran_before = worker
        .metric("tickvault_history_queue_wait_seconds_count", &[])
        .await;
    let blocker = lock_table(&pool, "tick_data").await;
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = tokio::spawn(lock_waits_seen(pool.clone(), watching.clone()));
    let mut big = json!({"symbol": "FPT", "from": "2026-11-26", "to": "2026-11-26", "pad": ""});
    big["pad"] = json!("x".repeat(1_000_000 - big.to_string().len()));
    let big = big.to_string().into_bytes();
    assert_eq!(big.len(), 1_000_000);
    let started = Instant::now();
    let replies: Vec<(Reply, Duration)> =
        futures::future::join_all((0..400).map(|_| patiently(&nats, ticks.clone(), big.clone())))
            .await;
    let storm = started.elapsed();
    let peak_kib = worker.memory_kib("VmHWM");
    watching.store(false, Ordering::Relaxed);
    let seen = watcher.await.unwrap();
    blocker.commit().await.unwrap();

    let count = |needle: &str| {
        replies
            .iter()
            .filter(|(reply, _)| message(reply).contains(needle))
            .count()
    };
    let (expired, queue_full, ran) = (
        count("was not run"),
        count("queue is full"),
        count("database is unavailable"),
    );
    let slowest = replies.iter().map(|(_, took)| *took).max().unwrap();
    for (reply, _) in &replies {
        assert_eq!(reply.code(), 503, "{}", reply.json);
        assert_eq!(reply.json["error"]["retry_after_s"], 2, "{}", reply.json);
    }
    assert_eq!(
        expired + queue_full + ran,
        400,
        "every reply is one of the three"
    );

    // The service's own account, and PostgreSQL's.
    let ran_metric = worker
        .metric("tickvault_history_queue_wait_seconds_count", &[])
        .await
        - ran_before;
    assert_eq!(ran_metric, ran as f64);
    assert_eq!(
        worker.metric("tickvault_history_expired_total", &[]).await,
        expired as f64
    );
    assert_eq!(
        worker
            .metric("tickvault_history_shed_total", &[("reason", "queue_full")])
            .await,
        queue_full as f64
    );
    assert_eq!(
        seen, ran,
        "the database saw exactly the queries the service ran"
    );
    // Two slots, each busy for the statement timeout per query.
    let at_most = 2 * (storm.as_millis() as usize / STATEMENT_MS as usize + 2);
    assert!(ran <= at_most, "{ran} queries ran in {storm:?}");
    assert!(
        expired > 0 && queue_full > 0,
        "{expired} expired, {queue_full} refused"
    );

    // Settled: the worker answers again and gives back what it held.
    let reply = ask_raw(&nats, ticks.clone(), small.clone().into_bytes()).await;
    assert_eq!(reply.code(), 200, "{}", reply.json);
    let after_kib = wait_for(Duration::from_secs(10), "the queue to drain", || async {
        let queued = worker.metric("tickvault_history_queue_depth", &[]).await;
        (queued == 0.0).then(|| worker.memory_kib("VmRSS"))
    })
    .await;
    println!(
        "PRESSURE 400 x 1 MB: RSS before {before_kib} KiB, peak {peak_kib} KiB, after {after_kib} KiB; \
         {ran} ran, {expired} expired, {queue_full} refused (queue full) in {storm:?}, slowest reply {slowest:?}"
    );
    // Generous: 400 MB arrived, at most 16 MiB of it may wait; the rest is
    // buffers and what the allocator keeps (measured: +70 to +160 MiB, the
    // same for 800 and 1,200 requests; +480 MiB when requests piled up).
    assert!(
        peak_kib < before_kib + 256 * 1024,
        "peak RSS {peak_kib} KiB from {before_kib} KiB"
    );
}

// ------------------------------------------------------------ database down

/// With the database known to be down, 64 concurrent requests of every
/// endpoint are each answered 503 within a second (no pool wait).
#[tokio::test(flavor = "multi_thread")]
async fn with_the_database_down_64_requests_are_refused_within_a_second() {
    let (mut pg, app) = spawn_app_on_private_pg(|_| {}).await;
    pg.stop();
    app.wait_database_down().await;

    let requests = (0..64).map(|i| {
        let (kind, body) = match i % 4 {
            0 => ("candles", json!({"symbol": "FPT", "from": "2026-11-26", "to": "2026-11-26", "interval": "1d"})),
            1 => ("ticks", json!({"symbol": "FPT", "from": "2026-11-26", "to": "2026-11-26"})),
            2 => ("latest", json!({"kind": "index"})),
            _ => ("symbols", json!({"kind": "derivatives"})),
        };
        timed(&app.nats, subject(&app, kind), body.to_string().into_bytes())
    });
    let replies = futures::future::join_all(requests).await;
    let slowest = replies.iter().map(|(_, took)| *took).max().unwrap();
    println!("PRESSURE database down: 64 concurrent requests, slowest refusal {slowest:?}");
    for (reply, took) in &replies {
        assert_eq!(reply.code(), 503, "{}", reply.json);
        assert_eq!(reply.json["error"]["retry_after_s"], 2);
        assert_eq!(
            reply.header("Nats-Service-Error-Code").as_deref(),
            Some("503")
        );
        assert!(
            message(reply).contains("database is unavailable"),
            "{}",
            reply.json
        );
        assert!(*took < Duration::from_secs(1), "refused after {took:?}");
    }
    app.wait_for_metric(
        "tickvault_history_shed_total",
        &[("reason", "database_down")],
        64.0,
    )
    .await;

    pg.resume();
    wait_for(
        Duration::from_secs(60),
        "history to answer again",
        || async {
            let reply = ask(&app, "symbols", json!({"kind": "ticks"})).await;
            (reply.code() == 200).then_some(())
        },
    )
    .await;
}

// ----------------------------------------------------- overflowing values

async fn insert_candle(pool: &PgPool, symbol: &str, minute: i64, volume: i64, value: f64) {
    sqlx::query(
        "INSERT INTO candles_1m (symbol, \"timestamp\", open, high, low, close, volume, value) \
         VALUES ($1, TIMESTAMPTZ '2026-11-26 09:00:00+07' + $2 * INTERVAL '1 minute', 10, 11, 9, 10, $3, $4)",
    )
    .bind(symbol)
    .bind(minute as f64)
    .bind(volume)
    .bind(value)
    .execute(pool)
    .await
    .unwrap();
}

/// Values stored by another program (ingest now refuses them) whose bar
/// sums overflow: an aggregated request is a 400 naming the field and what
/// to do, the 1m rows still come back, other bars are unaffected; and
/// ingest dead-letters such values with a reason naming the field.
#[tokio::test]
async fn overflowing_stored_values_are_a_client_error_and_ingest_refuses_them() {
    let app = spawn_app(|c| c.ingest.flush_interval_ms = 200).await;
    for minute in [0, 1] {
        insert_candle(&app.pool, "BIGVOL", minute, i64::MAX, 1.0).await;
        insert_candle(&app.pool, "BIGVAL", minute, 1, 1e308).await;
        insert_candle(&app.pool, "NEGVAL", minute, 1, -1e308).await;
        insert_candle(&app.pool, "FPT", minute, 100, 1.5e9).await;
    }
    // One huge value alone in its bar fits; with an ordinary one too.
    insert_candle(&app.pool, "ONEBIG", 0, 1, 1e308).await;
    insert_candle(&app.pool, "ONEBIG", 1, 1, 2.5).await;

    let bars = |symbol: &str, interval: &str| json!({"symbol": symbol, "from": "2026-11-26", "to": "2026-11-26", "interval": interval});
    for (symbol, field) in [
        ("BIGVOL", "volume"),
        ("BIGVAL", "value"),
        ("NEGVAL", "value"),
    ] {
        for interval in ["5m", "15m", "30m", "1h", "1d"] {
            let reply = ask(&app, "candles", bars(symbol, interval)).await;
            assert_eq!(reply.code(), 400, "{symbol} {interval}: {}", reply.json);
            let m = message(&reply);
            assert!(m.contains(&format!("field `{field}`")), "{m}");
            assert!(m.contains(&format!("{interval} bar starting")), "{m}");
            assert!(m.contains("`interval`"), "says what to do: {m}");
        }
        let minutes = ask(&app, "candles", bars(symbol, "1m")).await;
        assert_eq!(minutes.rows().len(), 2, "{}", minutes.json);
    }
    let raw = ask(&app, "candles", bars("BIGVOL", "1m")).await;
    assert_eq!(raw.rows()[0]["volume"].as_i64(), Some(i64::MAX));
    let one_big = ask(&app, "candles", bars("ONEBIG", "1h")).await;
    assert_eq!(one_big.rows().len(), 1, "{}", one_big.json);
    assert_eq!(one_big.rows()[0]["value"].as_f64(), Some(1e308));
    let fpt = ask(&app, "candles", bars("FPT", "1d")).await;
    assert_eq!(fpt.rows()[0]["volume"].as_i64(), Some(200), "{}", fpt.json);
    assert_eq!(fpt.rows()[0]["value"].as_f64(), Some(3e9));
    let failed = app
        .metric_if_present(
            "tickvault_history_requests_total",
            &[("kind", "candles"), ("code", "500")],
        )
        .await;
    assert_eq!(failed.unwrap_or(0.0), 0.0, "never a 500");

    // Ingest refuses such quantities, naming the field; any finite double is
    // stored as sent (it aggregates to data or to the 400 above).
    let prefix = app.config.ingest.subject_prefix.clone();
    let mut dead_letters = app
        .nats
        .subscribe(format!("{prefix}.dlq.candle"))
        .await
        .unwrap();
    app.nats.flush().await.unwrap();
    let mut huge_volume = candle("HPG", T0, 20.0);
    huge_volume["volume"] = json!(i64::MAX);
    let mut over_bound = candle("HPG", T0 + 60_000, 20.0);
    over_bound["volume"] = json!(1_000_000_000_000_001i64);
    let fine = candle("HPG", T0 + 120_000, 20.0);
    app.publish_json("candle", "HPG", &json!([huge_volume, over_bound, fine]))
        .await;
    let mut details = Vec::new();
    for _ in 0..2 {
        let letter = tokio::time::timeout(Duration::from_secs(30), dead_letters.next())
            .await
            .expect("a dead letter")
            .unwrap();
        let headers = letter.headers.clone().unwrap();
        assert_eq!(
            headers.get("Tickvault-Reject-Reason").unwrap().as_str(),
            "invalid_value"
        );
        details.push(headers.get("Tickvault-Reject-Detail").unwrap().to_string());
    }
    for detail in &details {
        assert!(
            detail.contains("field `volume` must be at most"),
            "{details:?}"
        );
    }
    wait_for(Duration::from_secs(30), "the valid candle", || async {
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM candles_1m WHERE symbol = 'HPG'")
            .fetch_one(&app.pool)
            .await
            .ok()?;
        (rows == 1).then_some(())
    })
    .await;
}

// ------------------------------------------------------------- extreme dates

/// Candles of year 1 (the earliest ingest stores): their `1d` bars start on
/// 0000-12-31 in UTC, and every cursor the service issues pages on; dates
/// outside the years 0001-9999 are 400s naming the field.
#[tokio::test]
async fn a_cursor_of_year_one_pages_on_and_extreme_dates_are_400() {
    let app = spawn_app(|_| {}).await;
    sqlx::query(
        "INSERT INTO candles_1m (symbol, \"timestamp\", open, high, low, close, volume, value) \
         SELECT 'FPT', TIMESTAMPTZ '0001-01-01 00:00:00+00' + d * INTERVAL '1 day' + m * INTERVAL '1 minute', \
         10, 11, 9, 10, 1, 1 FROM generate_series(0, 3) AS d, generate_series(0, 2) AS m",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    for order in ["asc", "desc"] {
        let body = json!({"symbol": "FPT", "from": "0001-01-01", "to": "0001-01-10",
            "interval": "1d", "limit": 1, "order": order});
        let (mut rows, pages) = fetch_all(&app, "candles", body).await;
        assert_eq!(pages.len(), 4, "{order}: one bar a page");
        if order == "desc" {
            rows.reverse();
        }
        let starts: Vec<&str> = rows
            .iter()
            .map(|r| r["timestamp"].as_str().unwrap())
            .collect();
        assert_eq!(
            starts,
            [
                "0000-12-31T17:00:00Z",
                "0001-01-01T17:00:00Z",
                "0001-01-02T17:00:00Z",
                "0001-01-03T17:00:00Z"
            ],
            "{order}"
        );
        assert!(rows.iter().all(|r| r["volume"] == 3), "{rows:?}");
    }
    let minutes = json!({"symbol": "FPT", "from": "0001-01-01T00:00:00+07:00",
        "to": "0001-01-10", "limit": 5});
    let (rows, _) = fetch_all(&app, "candles", minutes).await;
    assert_eq!(rows.len(), 12);
    assert_eq!(
        local(rows[0]["timestamp"].as_str().unwrap()).timestamp(),
        -62_135_596_800
    );

    for (field, value) in [
        ("from", "-262000-01-01"),
        ("from", "0000-01-01"),
        ("from", "0000-12-31T16:59:59Z"),
        ("from", "-0001-06-01T00:00:00Z"),
        ("to", "10000-01-01"),
        ("to", "+10000-01-01"),
        ("to", "262143-12-31"),
        ("to", "+262000-01-01T00:00:00Z"),
    ] {
        let mut body = json!({"symbol": "FPT", "from": "0001-01-01", "to": "9999-12-31"});
        body[field] = json!(value);
        for kind in ["candles", "ticks"] {
            let reply = ask(&app, kind, body.clone()).await;
            assert_eq!(reply.code(), 400, "{field}={value}: {}", reply.json);
            assert!(
                message(&reply).contains(&format!("`{field}`")),
                "{}",
                reply.json
            );
        }
    }
    let whole = ask(
        &app,
        "candles",
        json!({"symbol": "FPT", "from": "0001-01-01", "to": "9999-12-31", "interval": "1d"}),
    )
    .await;
    assert_eq!(whole.rows().len(), 4, "{}", whole.json);
}

// ------------------------------------------------------- refusals do not wait

/// With every slot stuck on a locked table and requests waiting, a body
/// over the limit and a malformed one are refused at once; a 500-symbol
/// `latest` request fits the default limit and waits its turn; the queue
/// and in-flight gauges show the load.
#[tokio::test(flavor = "multi_thread")]
async fn bad_or_oversized_requests_are_refused_at_once_while_history_is_saturated() {
    let app = Arc::new(
        spawn_app(|c| {
            c.database.pool_max = 4;
            c.database.statement_timeout_ms = 3_000;
            c.history.queue_deadline_ms = 10_000;
        })
        .await,
    );
    let blocker = lock_table(&app.pool, "tick_data").await;
    let body = json!({"symbol": "FPT", "from": "2026-11-26", "to": "2026-11-26"}).to_string();
    let waiting: Vec<_> = (0..5)
        .map(|_| {
            let (nats, subject, body) = (app.nats.clone(), subject(&app, "ticks"), body.clone());
            tokio::spawn(async move { timed(&nats, subject, body.into_bytes()).await })
        })
        .collect();
    wait_for(
        Duration::from_secs(10),
        "2 running and 3 waiting",
        || async {
            let running = app.metric("tickvault_history_in_flight", &[]).await;
            let queued = app.metric("tickvault_history_queue_depth", &[]).await;
            (running == 2.0 && queued == 3.0).then_some(())
        },
    )
    .await;

    let watch_list: Vec<String> = (0..500)
        .map(|i| format!("SYMBOL{i:04}_ABCDEFGHIJKLMNOPQRS"))
        .collect();
    let latest = json!({"kind": "index", "symbols": watch_list}).to_string();
    assert!(
        latest.len() > 16 * 1024 && latest.len() < 64 * 1024,
        "{}",
        latest.len()
    );
    let watch = {
        let (nats, subject) = (app.nats.clone(), subject(&app, "latest"));
        tokio::spawn(async move { timed(&nats, subject, latest.into_bytes()).await })
    };

    let too_large = format!(
        "{{\"symbol\": \"FPT\", \"from\": \"2026-11-26\", \"to\": \"2026-11-26\", \"pad\": \"{}\"}}",
        "x".repeat(70_000)
    );
    let attempts = [
        ("ticks", too_large.into_bytes(), "history.max_request_bytes"),
        ("latest", vec![b'['; 100_000], "history.max_request_bytes"),
        ("ticks", b"{\"symbol\": \"FPT\"}".to_vec(), "`from`"),
        ("candles", b"not json".to_vec(), "JSON object"),
    ];
    for (kind, body, named) in attempts {
        let (reply, took) = timed(&app.nats, subject(&app, kind), body).await;
        assert_eq!(reply.code(), 400, "{}", reply.json);
        assert!(message(&reply).contains(named), "{}", reply.json);
        assert!(
            took < Duration::from_secs(1),
            "{kind}: refused after {took:?}"
        );
    }
    assert_eq!(
        app.metric("tickvault_history_shed_total", &[("reason", "too_large")])
            .await,
        2.0
    );
    assert_eq!(app.metric("tickvault_history_queue_depth", &[]).await, 4.0);

    blocker.commit().await.unwrap();
    for task in waiting {
        let (reply, _) = task.await.unwrap();
        // The first two hit the lock timeout; the others ran after the release.
        assert!(matches!(reply.code(), 200 | 503), "{}", reply.json);
    }
    let (reply, _) = watch.await.unwrap();
    assert_eq!(reply.code(), 200, "{}", reply.json);
    assert_eq!(reply.rows().len(), 0);
}

// --------------------------------------------------- abandoned connections

async fn backend_pid(tx: &mut tickvault::db::ReadTransaction) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut **tx)
        .await
}

/// A history read given up by the client while its statement still runs
/// (here: waiting for a lock) closes its connection: the pool's only slot
/// is free at once, not when the statement ends. A read that ends, with
/// rows or with an error from the server, gives its connection back.
#[tokio::test]
async fn an_abandoned_read_closes_its_connection_and_a_finished_one_is_reused() {
    let app = spawn_app(|_| {}).await;
    let mut config = app.config.database.clone();
    config.pool_min = 0;
    config.pool_max = 1;
    config.statement_timeout_ms = 60_000;
    let db = tickvault::db::Database::connect_lazy(&config).unwrap();

    // Ended with rows, or with the server's error: the same connection again.
    let mut tx = db.begin_read().await.unwrap();
    let first = backend_pid(&mut tx).await.unwrap();
    tx.end(Ok::<_, sqlx::Error>(())).await.unwrap();
    let mut tx = db.begin_read().await.unwrap();
    assert_eq!(backend_pid(&mut tx).await.unwrap(), first);
    let failed = sqlx::query("SELECT 1/0")
        .execute(&mut *tx)
        .await
        .map(|_| ());
    assert!(tx.end(failed).await.is_err());
    let mut tx = db.begin_read().await.unwrap();
    assert_eq!(
        backend_pid(&mut tx).await.unwrap(),
        first,
        "rolled back, not closed"
    );
    tx.end(Ok::<_, sqlx::Error>(())).await.unwrap();

    // Given up while waiting for a lock.
    let blocker = lock_table(&app.pool, "tick_data").await;
    let mut tx = db.begin_read().await.unwrap();
    let abandoned = backend_pid(&mut tx).await.unwrap();
    let waiting = tokio::time::timeout(
        Duration::from_millis(300),
        sqlx::query("SELECT count(*) FROM tick_data").execute(&mut *tx),
    )
    .await;
    assert!(waiting.is_err(), "the statement waits for the lock");
    drop(tx);
    let started = Instant::now();
    let mut tx = tokio::time::timeout(Duration::from_secs(2), db.begin_read())
        .await
        .expect("the pool's only slot is free at once")
        .unwrap();
    let replacement = backend_pid(&mut tx).await.unwrap();
    println!(
        "PRESSURE abandoned read: a fresh connection in {:?}",
        started.elapsed()
    );
    assert_ne!(replacement, abandoned, "a new connection, not the busy one");
    tx.end(Ok::<_, sqlx::Error>(())).await.unwrap();

    // The abandoned backend ends once its wait does.
    blocker.commit().await.unwrap();
    wait_for(
        Duration::from_secs(10),
        "the abandoned backend to end",
        || async {
            let alive: i64 =
                sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE pid = $1")
                    .bind(abandoned)
                    .fetch_one(&app.pool)
                    .await
                    .ok()?;
            (alive == 0).then_some(())
        },
    )
    .await;
    db.pool.close().await;
}
