//! TimescaleDB: the reconciliation (hypertables, compression, one policy of
//! each kind per table), the version guard, and ingest and history on
//! compressed chunks — on a real TimescaleDB in a private cluster.
//!
//! The tests that need TimescaleDB are `#[ignore]`d: `scripts/test` runs them
//! (`--ignored`) where `timescaledb.control` is installed, and says which ran.
//! They share one private cluster while any of them runs; each has its own
//! database in it.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use serde_json::{json, Value};
use sqlx::{Connection, PgPool};
use tickvault::config::DatabaseConfig;
use tickvault::db::{Database, DbError, Storage, TimescaleError};
use tickvault::records::RecordType;
use tickvault::secret::SecretUrl;

use crate::helpers::{
    pg_bin, pg_sharedir, shared_nats_url, spawn_app, spawn_app_with, start, test_config, unique,
    wait_for, PgServer, TestApp, TestDatabase,
};
use crate::history::fetch_all;
use crate::ingest::{candle, tick};

/// What a private cluster needs to run TimescaleDB here; telemetry off, so
/// it never tries to reach the network.
const TIMESCALE_SETTINGS: [&str; 3] = [
    "shared_preload_libraries = 'timescaledb'",
    "max_worker_processes = 32",
    "timescaledb.telemetry_level = 'off'",
];

/// Panics, saying why, unless TimescaleDB is installed for the PostgreSQL
/// whose binaries the tests run.
fn require_timescaledb() {
    let control = pg_sharedir().join("extension/timescaledb.control");
    assert!(
        control.exists(),
        "these tests need TimescaleDB installed for {} ({} is missing)",
        pg_bin().display(),
        control.display()
    );
}

/// The cluster the TimescaleDB tests share while any of them runs (stopped
/// when the last one holding it ends).
fn timescale_server() -> Arc<PgServer> {
    static SHARED: Mutex<Weak<PgServer>> = Mutex::new(Weak::new());
    let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(server) = shared.upgrade() {
        return server;
    }
    require_timescaledb();
    let server = Arc::new(PgServer::start_with_settings(&TIMESCALE_SETTINGS));
    *shared = Arc::downgrade(&server);
    server
}

async fn admin_pool(url: &str) -> PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(url)
        .await
        .expect("connect as the administrator")
}

fn database(url: &str, compress_after: &str, retention: &str) -> Database {
    let config = DatabaseConfig {
        url: SecretUrl::new(url),
        pool_min: 0,
        pool_max: 2,
        compress_after: compress_after.into(),
        retention: retention.into(),
        ..DatabaseConfig::default()
    };
    Database::connect_lazy(&config).unwrap()
}

/// The version `CREATE EXTENSION timescaledb` installs on this server.
async fn newest_version(pool: &PgPool) -> String {
    sqlx::query_scalar(
        "SELECT default_version FROM pg_available_extensions WHERE name = 'timescaledb'",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

fn timescaledb(version: &str) -> Storage {
    Storage::Timescaledb {
        version: version.into(),
    }
}

fn tables() -> Vec<String> {
    let mut tables: Vec<String> = RecordType::ALL
        .iter()
        .map(|t| t.spec().table.to_string())
        .collect();
    tables.sort();
    tables
}

async fn hypertables(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT hypertable_name::text FROM timescaledb_information.hypertables ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// (table, policy, job id, interval) of every policy job, in that order.
async fn policies(pool: &PgPool) -> Vec<(String, String, i32, String)> {
    sqlx::query_as(
        "SELECT hypertable_name::text, proc_name::text, job_id, \
                coalesce(config->>'compress_after', config->>'drop_after') \
         FROM timescaledb_information.jobs WHERE hypertable_name IS NOT NULL ORDER BY 1, 2, 3",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Asserts every table has exactly one job of each policy with `interval`
/// (none of a policy whose interval is `None`).
fn assert_one_policy_each(
    jobs: &[(String, String, i32, String)],
    compress_after: Option<&str>,
    retention: Option<&str>,
) {
    for table in tables() {
        for (policy, interval) in [
            ("policy_compression", compress_after),
            ("policy_retention", retention),
        ] {
            let intervals: Vec<&str> = jobs
                .iter()
                .filter(|j| j.0 == table && j.1 == policy)
                .map(|j| j.3.as_str())
                .collect();
            let expected: Vec<&str> = interval.into_iter().collect();
            assert_eq!(intervals, expected, "{policy} of {table}: {jobs:?}");
        }
    }
}

/// (segment-by columns, order-by columns with direction) of a table.
async fn compression(pool: &PgPool, table: &str) -> (Vec<String>, Vec<String>) {
    sqlx::query_as(
        "SELECT coalesce(array_agg(attname::text ORDER BY segmentby_column_index) \
                    FILTER (WHERE segmentby_column_index IS NOT NULL), '{}'), \
                coalesce(array_agg(attname::text || CASE WHEN orderby_asc THEN ' ASC' ELSE ' DESC' END \
                    ORDER BY orderby_column_index) FILTER (WHERE orderby_column_index IS NOT NULL), '{}') \
         FROM timescaledb_information.compression_settings WHERE hypertable_name = $1",
    )
    .bind(table)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Compresses every chunk of `table`; returns how many chunks it has.
async fn compress_all(pool: &PgPool, table: &str) -> i64 {
    sqlx::query(
        "SELECT compress_chunk(c, if_not_compressed => true) FROM show_chunks($1::regclass) c",
    )
    .bind(table)
    .execute(pool)
    .await
    .expect("compress the chunks");
    let (compressed, all): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE is_compressed), count(*) \
         FROM timescaledb_information.chunks WHERE hypertable_name = $1",
    )
    .bind(table)
    .fetch_one(pool)
    .await
    .unwrap();
    assert!(all > 0, "{table} has chunks");
    assert_eq!(compressed, all, "every chunk of {table} is compressed");
    all
}

fn ms(rfc3339: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .unwrap()
        .timestamp_millis()
}

#[tokio::test]
async fn plain_postgresql_shows_in_health_and_stays_plain() {
    let app = spawn_app(|_| {}).await;
    assert_eq!(
        app.health().await["storage"],
        json!({"engine": "postgresql"})
    );
    let extension: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(extension, 0, "plain PostgreSQL stays plain");

    // Without migrations at start-up, the storage is still checked before /ready.
    let unmigrated = spawn_app(|c| c.database.migrate_on_start = false).await;
    assert_eq!(
        unmigrated.health().await["storage"],
        json!({"engine": "postgresql"})
    );
}

#[tokio::test]
#[ignore = "needs TimescaleDB: scripts/test runs it where timescaledb.control is installed"]
async fn a_fresh_database_gets_hypertables_compression_and_one_policy_of_each_kind() {
    let server = timescale_server();
    let db = TestDatabase::create_on(&server.admin_url()).await;
    let pool = db.pool().await;
    let version = newest_version(&pool).await;

    let storage = database(&db.url, "7 days", "90 days")
        .migrate()
        .await
        .unwrap();
    assert_eq!(storage, timescaledb(&version));
    let checked = database(&db.url, "", "").verify_storage().await.unwrap();
    assert_eq!(checked, timescaledb(&version));
    assert_eq!(hypertables(&pool).await, tables());
    for t in RecordType::ALL {
        let spec = t.spec();
        let (segment_by, order_by) = compression(&pool, spec.table).await;
        assert_eq!(segment_by, [spec.key[0]], "{}", spec.table);
        let expected: Vec<String> = spec.key[1..].iter().map(|c| format!("{c} DESC")).collect();
        assert_eq!(order_by, expected, "{}", spec.table);
        let chunk: String = sqlx::query_scalar(
            "SELECT time_interval::text FROM timescaledb_information.dimensions WHERE hypertable_name = $1",
        )
        .bind(spec.table)
        .fetch_one(&pool)
        .await
        .unwrap();
        let expected_chunk = if spec.table == "tick_data" {
            "1 day"
        } else {
            "7 days"
        };
        assert_eq!(chunk, expected_chunk, "{}", spec.table);
    }
    assert_eq!(
        compression(&pool, "tick_data").await.1,
        ["timestamp DESC", "seq DESC"]
    );
    let first = policies(&pool).await;
    assert_one_policy_each(&first, Some("7 days"), Some("90 days"));

    // A second run changes nothing: the same jobs, the same ids.
    database(&db.url, "7 days", "90 days")
        .migrate()
        .await
        .unwrap();
    assert_eq!(policies(&pool).await, first);

    // A changed interval is changed in place; an emptied one is removed.
    database(&db.url, "3 days", "").migrate().await.unwrap();
    let changed = policies(&pool).await;
    assert_one_policy_each(&changed, Some("3 days"), None);
    let compression_jobs = |jobs: &[(String, String, i32, String)]| -> Vec<i32> {
        jobs.iter()
            .filter(|j| j.1 == "policy_compression")
            .map(|j| j.2)
            .collect()
    };
    assert_eq!(compression_jobs(&changed), compression_jobs(&first));

    // An interval PostgreSQL cannot read is an error naming the key.
    let error = database(&db.url, "7 dayz", "").migrate().await.unwrap_err();
    assert!(
        error.to_string().contains("database.compress_after"),
        "{error}"
    );
    pool.close().await;
}

#[tokio::test]
#[ignore = "needs TimescaleDB: scripts/test runs it where timescaledb.control is installed"]
async fn three_concurrent_migrations_leave_one_policy_per_table_and_keep_job_ids() {
    let server = timescale_server();
    let db = TestDatabase::create_on(&server.admin_url()).await;
    let migrate_three = || async {
        let children: Vec<_> = (0..3)
            .map(|_| {
                tokio::process::Command::new(env!("CARGO_BIN_EXE_tickvault"))
                    .arg("migrate")
                    .env("DATABASE_URL", &db.url)
                    .env("TICKVAULT_DATABASE__RETENTION", "30 days")
                    .output()
            })
            .collect();
        for output in futures::future::join_all(children).await {
            let output = output.unwrap();
            assert!(
                output.status.success(),
                "{}",
                String::from_utf8_lossy(&output.stderr)
            );
            assert!(
                String::from_utf8_lossy(&output.stdout).contains("storage: TimescaleDB"),
                "{}",
                String::from_utf8_lossy(&output.stdout)
            );
        }
    };
    migrate_three().await;
    let pool = db.pool().await;
    assert_eq!(hypertables(&pool).await, tables());
    let first = policies(&pool).await;
    assert_one_policy_each(&first, Some("7 days"), Some("30 days"));

    migrate_three().await;
    assert_eq!(policies(&pool).await, first, "the same jobs, the same ids");
    pool.close().await;
}

#[tokio::test]
#[ignore = "needs TimescaleDB: scripts/test runs it where timescaledb.control is installed"]
async fn an_owner_that_is_not_a_superuser_migrates() {
    let server = timescale_server();
    let admin = admin_pool(&server.admin_url()).await;
    let owner = format!("tv_owner_{}", unique());
    sqlx::query(&format!("CREATE ROLE {owner} LOGIN"))
        .execute(&admin)
        .await
        .unwrap();
    let as_owner = |db: &TestDatabase| {
        db.url
            .replacen("postgres://postgres@", &format!("postgres://{owner}@"), 1)
    };
    // The extension created by an administrator, the tables by the owner.
    let given = TestDatabase::create_on(&server.admin_url()).await;
    // The owner creates the (trusted) extension itself.
    let own = TestDatabase::create_on(&server.admin_url()).await;
    for db in [&given, &own] {
        sqlx::query(&format!("ALTER DATABASE {} OWNER TO {owner}", db.name))
            .execute(&admin)
            .await
            .unwrap();
    }
    let given_pool = given.pool().await;
    sqlx::query("CREATE EXTENSION timescaledb")
        .execute(&given_pool)
        .await
        .unwrap();
    let version = newest_version(&given_pool).await;

    for db in [&given, &own] {
        let owner_pool = admin_pool(&as_owner(db)).await;
        let refused = sqlx::query("SHOW shared_preload_libraries")
            .execute(&owner_pool)
            .await;
        assert!(refused.is_err(), "the owner may not read the preload list");

        let storage = database(&as_owner(db), "7 days", "60 days")
            .migrate()
            .await
            .unwrap();
        assert_eq!(storage, timescaledb(&version));
        assert_eq!(hypertables(&owner_pool).await, tables());
        let first = policies(&owner_pool).await;
        assert_one_policy_each(&first, Some("7 days"), Some("60 days"));
        let owners: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT owner::text FROM timescaledb_information.jobs WHERE hypertable_name IS NOT NULL",
        )
        .fetch_all(&owner_pool)
        .await
        .unwrap();
        assert_eq!(owners, std::slice::from_ref(&owner));

        database(&as_owner(db), "7 days", "60 days")
            .migrate()
            .await
            .unwrap();
        assert_eq!(policies(&owner_pool).await, first);
        owner_pool.close().await;
    }
    given_pool.close().await;
    admin.close().await;
}

#[tokio::test]
#[ignore = "needs TimescaleDB: scripts/test runs it where timescaledb.control is installed"]
async fn a_plain_postgresql_database_moves_to_timescaledb() {
    // TimescaleDB installed but not preloaded: the server is plain PostgreSQL.
    require_timescaledb();
    let mut server = PgServer::start();
    let db = TestDatabase::create_on(&server.admin_url()).await;
    let storage = database(&db.url, "7 days", "").migrate().await.unwrap();
    assert_eq!(storage, Storage::Postgresql);
    let pool = db.pool().await;
    // The previous tickvault recorded its one-shot TimescaleDB migration.
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (20261126000002, 'timescaledb', true, '\\x00', 0)",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO tick_data SELECT 'FPT', TIMESTAMPTZ '2026-01-05 09:15:00+07' + n * INTERVAL '1 minute', \
         100 + n, 10, 'buy', n FROM generate_series(1, 3000) AS n",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO candles_1m SELECT 'FPT', TIMESTAMPTZ '2026-01-05 09:15:00+07' + n * INTERVAL '1 minute', \
         10, 11, 9, 10, 5, NULL, n FROM generate_series(1, 500) AS n",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;

    server.stop();
    server.configure(&TIMESCALE_SETTINGS);
    server.resume();

    let app = spawn_app_with(db, &shared_nats_url(), |c| c.ingest.flush_interval_ms = 100).await;
    let version = newest_version(&app.pool).await;
    assert_eq!(
        app.health().await["storage"],
        json!({"engine": "timescaledb", "version": version})
    );
    assert_eq!(hypertables(&app.pool).await, tables());
    assert_eq!(app.count("tick_data").await, 3000, "every row kept");
    assert_eq!(app.count("candles_1m").await, 500, "every row kept");
    let (in_parent, chunks): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM ONLY tick_data), \
                (SELECT num_chunks FROM timescaledb_information.hypertables WHERE hypertable_name = 'tick_data')",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(in_parent, 0, "the rows moved into chunks");
    assert!(chunks >= 3, "3000 minutes make at least 3 daily chunks");

    // The worker writes into the hypertable.
    let ts = ms("2026-01-08T09:15:00+07:00");
    app.publish_json("tick", "FPT", &tick("FPT", ts, 1, 99.5))
        .await;
    app.wait_for_rows("tick_data", 3001).await;
}

#[tokio::test]
#[ignore = "needs TimescaleDB: scripts/test runs it where timescaledb.control is installed"]
async fn ticks_and_candles_written_into_compressed_chunks_follow_their_conflict_rules() {
    let server = timescale_server();
    let db = TestDatabase::create_on(&server.admin_url()).await;
    // No compression policy: the test compresses when it chooses.
    let app = spawn_app_with(db, &shared_nats_url(), |c| {
        c.ingest.flush_interval_ms = 100;
        c.database.compress_after = String::new();
    })
    .await;
    let t0 = ms("2026-01-05T09:15:00+07:00");
    let first: Vec<Value> = (1..=10)
        .map(|seq| tick("FPT", t0 + seq * 1000, seq, 100.0 + seq as f64))
        .collect();
    app.publish_json("tick", "FPT", &json!(first)).await;
    let candles: Vec<Value> = (0..5)
        .map(|m| candle("FPT", t0 + m * 60_000, 50.0 + m as f64))
        .collect();
    app.publish_json("candle", "FPT", &json!(candles)).await;
    app.wait_for_rows("tick_data", 10).await;
    app.wait_for_rows("candles_1m", 5).await;
    compress_all(&app.pool, "tick_data").await;
    compress_all(&app.pool, "candles_1m").await;

    // A duplicate of a compressed tick (another price), then new ticks.
    let mut again = vec![tick("FPT", t0 + 3000, 3, 999.0)];
    again.extend((11..=15).map(|seq| tick("FPT", t0 + seq * 1000, seq, 100.0 + seq as f64)));
    app.publish_json("tick", "FPT", &json!(again)).await;
    app.wait_for_rows("tick_data", 15).await;
    let stored: Vec<(i64, f64)> =
        sqlx::query_as("SELECT seq, price FROM tick_data WHERE symbol = 'FPT' ORDER BY seq")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    let expected: Vec<(i64, f64)> = (1..=15).map(|seq| (seq, 100.0 + seq as f64)).collect();
    assert_eq!(
        stored, expected,
        "every new tick stored, the duplicate kept first"
    );

    // A newer version of a compressed candle replaces it.
    let newer = app
        .publish_json("candle", "FPT", &candle("FPT", t0 + 60_000, 77.0))
        .await;
    wait_for(Duration::from_secs(20), "the newer candle", || async {
        let row: (f64, f64, i64) = sqlx::query_as(
            "SELECT close, high, stream_seq FROM candles_1m WHERE symbol = 'FPT' \
             AND \"timestamp\" = to_timestamp($1::float8 / 1000)",
        )
        .bind(t0 + 60_000)
        .fetch_one(&app.pool)
        .await
        .unwrap();
        (row == (77.0, 78.0, newer as i64)).then_some(())
    })
    .await;
    let closes: Vec<f64> = sqlx::query_scalar(
        "SELECT close FROM candles_1m WHERE symbol = 'FPT' ORDER BY \"timestamp\"",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(closes, [50.0, 77.0, 52.0, 53.0, 54.0]);
}

#[tokio::test]
#[ignore = "needs TimescaleDB: scripts/test runs it where timescaledb.control is installed"]
async fn timescaledb_2_17_2_is_refused_until_it_is_updated() {
    let server = timescale_server();
    let db = TestDatabase::create_on(&server.admin_url()).await;
    let pool = db.pool().await;
    let newest = newest_version(&pool).await;
    sqlx::query("CREATE EXTENSION timescaledb VERSION '2.17.2'")
        .execute(&pool)
        .await
        .expect(
            "TimescaleDB 2.17.2's scripts are installed (build and install 2.17.2, then 2.18.1)",
        );

    let refused = database(&db.url, "7 days", "").migrate().await.unwrap_err();
    assert!(
        matches!(&refused, DbError::Timescale(TimescaleError::TooOld { version }) if version == "2.17.2"),
        "{refused}"
    );
    let checked = database(&db.url, "", "")
        .verify_storage()
        .await
        .unwrap_err();
    assert!(
        matches!(&checked, DbError::Timescale(TimescaleError::TooOld { .. })),
        "{checked}"
    );
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tickvault"))
        .arg("migrate")
        .env("DATABASE_URL", &db.url)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for says in ["2.17.2", "2.18.1", "ALTER EXTENSION timescaledb UPDATE"] {
        assert!(stderr.contains(says), "{stderr}");
    }

    let mut config = test_config(&db.url, &shared_nats_url());
    config.ingest.flush_interval_ms = 100;
    let app: TestApp = start(config).await;
    wait_for(
        Duration::from_secs(30),
        "the storage in /health",
        || async {
            (app.health().await["storage"] == json!({"engine": "timescaledb", "version": "2.17.2"}))
                .then_some(())
        },
    )
    .await;
    let t0 = ms("2026-01-05T09:15:00+07:00");
    let ticks: Vec<Value> = (1..=5).map(|seq| tick("FPT", t0, seq, 10.0)).collect();
    app.publish_json("tick", "FPT", &json!(ticks)).await;
    app.wait_for_metric("tickvault_flush_errors_total", &[("type", "tick")], 1.0)
        .await;
    assert_eq!(app.count("tick_data").await, 0, "nothing written to 2.17.2");
    assert_eq!(app.ready_status().await, 503);

    // What the error says to do: update the extension, first in a new session.
    let mut session = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::raw_sql("ALTER EXTENSION timescaledb UPDATE")
        .execute(&mut session)
        .await
        .unwrap();
    session.close().await.unwrap();

    wait_for(
        Duration::from_secs(60),
        "/ready after the update",
        || async { (app.ready_status().await == 200).then_some(()) },
    )
    .await;
    app.wait_for_rows("tick_data", 5).await;
    assert_eq!(
        app.health().await["storage"],
        json!({"engine": "timescaledb", "version": newest})
    );
    assert_eq!(hypertables(&app.pool).await, tables());
    pool.close().await;
}

#[tokio::test]
#[ignore = "needs TimescaleDB: scripts/test runs it where timescaledb.control is installed"]
async fn history_answers_the_same_before_and_after_compression() {
    let server = timescale_server();
    let db = TestDatabase::create_on(&server.admin_url()).await;
    let app = spawn_app_with(db, &shared_nats_url(), |c| {
        c.ingest.flush_interval_ms = 100;
        c.database.compress_after = String::new();
    })
    .await;
    for day in ["2026-01-05", "2026-01-06", "2026-01-07"] {
        let open = ms(&format!("{day}T09:15:00+07:00"));
        let ticks: Vec<Value> = (0..40)
            .map(|i| tick("FPT", open + i * 7_000, i, 100.0 + i as f64 / 10.0))
            .collect();
        app.publish_json("tick", "FPT", &json!(ticks)).await;
        let candles: Vec<Value> = (0..30)
            .map(|m| candle("FPT", open + m * 60_000, 50.0 + (m % 7) as f64))
            .collect();
        app.publish_json("candle", "FPT", &json!(candles)).await;
    }
    app.wait_for_rows("tick_data", 120).await;
    app.wait_for_rows("candles_1m", 90).await;

    let range = json!({"symbol": "FPT", "from": "2026-01-05", "to": "2026-01-07"});
    let with = |extra: Value| {
        let mut body = range.clone();
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    let requests = [
        ("ticks", with(json!({"limit": 17}))),
        ("ticks", with(json!({"order": "desc", "limit": 23}))),
        ("candles", with(json!({"limit": 11}))),
        ("candles", with(json!({"interval": "5m", "order": "desc"}))),
        ("candles", with(json!({"interval": "1d"}))),
    ];
    let answers = || async {
        let mut all = Vec::new();
        for (kind, body) in &requests {
            all.push(fetch_all(&app, kind, body.clone()).await.0);
        }
        all
    };
    let before = answers().await;
    assert_eq!(before[0].len(), 120);
    assert_eq!(before[1].len(), 120);
    assert_eq!(before[2].len(), 90);
    assert_eq!(before[4].len(), 3);
    assert_eq!(compress_all(&app.pool, "tick_data").await, 3);
    compress_all(&app.pool, "candles_1m").await;
    assert_eq!(answers().await, before);
}
