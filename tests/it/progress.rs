//! What the feed and the worker say while they run: the feed's progress
//! lines and its warning when no stream keeps its plain publishes, its clock
//! (live or back-filling), and the worker's periodic summary.

use std::process::{Command, Stdio};
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::helpers::tickvault_command;
use crate::helpers::{
    free_port, shared_nats_url, spawn_app, test_config, unique, wait_for, StreamCleanup,
    TestDatabase,
};

fn stderr_of(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_feed_warns_when_no_stream_keeps_its_publishes_and_logs_progress() {
    // A prefix no stream captures.
    let dir = tempfile::tempdir().unwrap();
    let output = tokio::task::block_in_place(|| {
        Command::new(env!("CARGO_BIN_EXE_tickvault"))
            .args([
                "feed",
                "--count",
                "60",
                "--rate",
                "60",
                "--progress",
                "300ms",
            ])
            .current_dir(dir.path())
            .env("NATS_URL", shared_nats_url())
            .env(
                "TICKVAULT_INGEST__SUBJECT_PREFIX",
                format!("nostream{}", unique()),
            )
            .env("TICKVAULT_LOG__FORMAT", "json")
            .env("RUST_LOG", "info")
            .output()
            .unwrap()
    });
    let log = stderr_of(&output);
    assert!(output.status.success(), "{log}");
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let warning = lines
        .iter()
        .find(|l| {
            l["message"]
                .as_str()
                .unwrap_or("")
                .contains("no JetStream stream captures")
        })
        .unwrap_or_else(|| panic!("no capture warning in {log}"));
    assert_eq!(warning["level"], "WARN");
    assert_eq!(warning["uncaptured"], warning["of"], "{warning}");
    let progress: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["message"] == "feed progress")
        .collect();
    assert!(progress.len() >= 2, "progress lines: {log}");
    let last = progress.last().unwrap();
    assert!(last["messages"].as_u64().unwrap() > 0, "{last}");
    let records: serde_json::Value =
        serde_json::from_str(last["records"].as_str().unwrap()).unwrap();
    assert!(records["tick"].as_u64().unwrap() > 0, "{records}");
    assert!(last["rate"].as_str().unwrap().parse::<f64>().unwrap() > 0.0);
}

/// Waits until the tick consumer has nothing pending or unacknowledged;
/// returns the rows stored.
async fn all_ticks_written(app: &crate::helpers::TestApp) -> i64 {
    wait_for(
        Duration::from_secs(30),
        "every tick message processed",
        || async {
            let info = app.consumer_info("tick").await;
            (info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
        },
    )
    .await;
    app.count("tick_data").await
}

/// The oldest and newest tick timestamps stored.
async fn tick_range(pool: &sqlx::PgPool) -> (DateTime<Utc>, DateTime<Utc>) {
    sqlx::query_as("SELECT min(\"timestamp\"), max(\"timestamp\") FROM tick_data")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_feed_clock_follows_real_time_unless_back_filling() {
    let app = spawn_app(|c| c.ingest.flush_interval_ms = 100).await;
    let run = |args: &[&str]| {
        let mut command = tickvault_command(&app);
        command.arg("feed").args(args).env("RUST_LOG", "info");
        let output = tokio::task::block_in_place(|| command.output().unwrap());
        let log = stderr_of(&output);
        assert!(output.status.success(), "{log}");
        log
    };
    // Back-fill two days ago, one simulated second per message: 300 s of that day.
    let two_days_ago = (Utc::now() - chrono::Duration::days(2))
        .format("%Y-%m-%d")
        .to_string();
    let log = run(&[
        "--count",
        "300",
        "--rate",
        "1000",
        "--jetstream",
        "--backfill-from",
        &two_days_ago,
        "--step",
        "1s",
        "--seed",
        "7",
    ]);
    assert!(!log.contains("caught up"), "still in the past: {log}");
    let rows = all_ticks_written(&app).await;
    assert!(rows > 100, "{rows}");
    let (oldest, newest) = tick_range(&app.pool).await;
    let day_start = chrono::NaiveDate::parse_from_str(&two_days_ago, "%Y-%m-%d")
        .unwrap()
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_local_timezone(chrono::FixedOffset::east_opt(7 * 3600).unwrap())
        .unwrap()
        .with_timezone(&Utc);
    assert!(oldest >= day_start, "{oldest} ({rows} rows)");
    assert!(
        newest < day_start + chrono::Duration::seconds(330),
        "{newest}"
    );

    // Live: stamped with the wall clock.
    sqlx::query("DELETE FROM tick_data")
        .execute(&app.pool)
        .await
        .unwrap();
    let before = Utc::now();
    // A plain publish, which the app's stream captures: no warning.
    let log = run(&["--count", "100", "--rate", "200", "--seed", "8"]);
    let after = Utc::now();
    assert!(!log.contains("no JetStream stream captures"), "{log}");
    assert!(all_ticks_written(&app).await > 30);
    let (oldest, newest) = tick_range(&app.pool).await;
    let slack = chrono::Duration::milliseconds(50);
    assert!(
        oldest >= before - slack && newest <= after + slack,
        "{before} <= {oldest} .. {newest} <= {after}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_worker_logs_a_periodic_summary() {
    let db = TestDatabase::create().await;
    let config = test_config(&db.url, &shared_nats_url());
    let _streams = StreamCleanup {
        nats_url: shared_nats_url(),
        stream: config.ingest.stream.clone(),
    };
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("stderr.log");
    let http = format!("127.0.0.1:{}", free_port());
    let mut worker = Command::new(env!("CARGO_BIN_EXE_tickvault"))
        .arg("run")
        .current_dir(dir.path())
        .env("DATABASE_URL", &db.url)
        .env("NATS_URL", shared_nats_url())
        .env("TICKVAULT_INGEST__STREAM", &config.ingest.stream)
        .env(
            "TICKVAULT_INGEST__SUBJECT_PREFIX",
            &config.ingest.subject_prefix,
        )
        .env(
            "TICKVAULT_HISTORY__SUBJECT_PREFIX",
            &config.history.subject_prefix,
        )
        .env("TICKVAULT_INGEST__FLUSH_INTERVAL_MS", "100")
        .env("TICKVAULT_HTTP__ADDR", &http)
        .env("TICKVAULT_LOG__SUMMARY_INTERVAL_SECS", "1")
        .env("TICKVAULT_LOG__FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let ready = format!("http://{http}/ready");
    wait_for(
        Duration::from_secs(30),
        "the worker to be ready",
        || async {
            let status = reqwest::get(&ready).await.ok().map(|r| r.status().as_u16());
            (status == Some(200)).then_some(())
        },
    )
    .await;
    let nats = async_nats::connect(shared_nats_url()).await.unwrap();
    let js = async_nats::jetstream::new(nats);
    let subject = format!("{}.tick.FPT", config.ingest.subject_prefix);
    for seq in 0..50 {
        let tick = serde_json::json!({"symbol": "FPT", "timestamp": 1_764_123_300_000i64,
            "price": 10.0, "volume": 100, "side": "buy", "seq": seq});
        js.publish(subject.clone(), tick.to_string().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    js.publish(subject.clone(), "not json".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let line = wait_for(
        Duration::from_secs(30),
        "a summary with the ticks",
        || async {
            let logged = std::fs::read_to_string(&log_path).unwrap_or_default();
            logged
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|l| {
                    l["message"] == "ingest summary"
                        && l["level"] == "INFO"
                        && !l["rows_per_s"]
                            .as_str()
                            .unwrap_or("")
                            .starts_with("tick=0.0 ")
                })
        },
    )
    .await;
    let rows_per_s = line["rows_per_s"].as_str().unwrap();
    assert!(
        rows_per_s.contains("candle=0.0") && rows_per_s.contains("deriv=0.0"),
        "{line}"
    );
    assert!(
        line["consumer_pending"]
            .as_str()
            .unwrap()
            .starts_with("tick="),
        "{line}"
    );
    wait_for(
        Duration::from_secs(30),
        "the dead letter in a summary",
        || async {
            let logged = std::fs::read_to_string(&log_path).unwrap_or_default();
            logged.contains("\"dead_letters_total\":1").then_some(())
        },
    )
    .await;
    let status = crate::helpers::terminate(&mut worker, Duration::from_secs(40)).await;
    assert_eq!(status.code(), Some(0));
}
