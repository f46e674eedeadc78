//! `tickvault bench`: ingest throughput, measured against a baseline taken
//! on the same machine at the same time (the machine is noisy, a ratio is not).
//!
//! 1. A fresh database on the configured server, a unique stream and prefix.
//! 2. The stream is pre-filled with `--messages` messages of
//!    `--records-per-message` records each; `--republish-pct` of the records
//!    (newest-wins types) are newer versions of a key published 5,050
//!    records earlier, the others have keys of their own.
//! 3. Each run, in alternating order:
//!    - baseline: one plain text `COPY` of the expected rows (every key once,
//!      its newest version) into a scratch copy of the table (same columns
//!      and indexes), in one transaction — PostgreSQL's own bulk load;
//!    - worker: [`App::build`] + [`App::run_until_stopped`] in this process,
//!      consuming the pre-filled stream from its start, timed until every
//!      row is committed, its CPU time (user + system of the process) and
//!      peak RSS read from `/proc`;
//!    - exactness: the table must equal the baseline's rows, every value
//!      compared by its exact text (PostgreSQL prints the shortest text
//!      that reads back to the same double), with no duplicate key.
//! 4. Medians of rows/s, of the ratio and of the CPU per row and message.
//!    The database and streams are removed at the end.
//!
//! `--scenario history` measures the history service: one market day of
//! 1-minute candles and 50,000 ticks, read through the running service and
//! with the service's own SQL through a pool; then the one-day candle
//! request at each `--concurrency`, against the same SQL run directly at the
//! same concurrency. `--scenario memory` fills all five types' queues while
//! the tables are locked and reports the process's resident memory.

use std::time::Duration;

use async_nats::jetstream;
use serde_json::{json, Value as Json};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgPool};
use tokio::time::Instant;

use tickvault::app::App;
use tickvault::config::{Config, IngestMode};
use tickvault::db::Database;
use tickvault::ingest::source;
use tickvault::records::{Conflict, RecordSpec, RecordType};
use tickvault::secret::SecretUrl;

/// Options of `tickvault bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Messages pre-filled into the stream.
    #[arg(long, default_value_t = 100_000)]
    pub messages: u64,
    /// Records in each message (1 = a single object, more = a JSON array).
    #[arg(long, default_value_t = 1)]
    pub records_per_message: usize,
    /// Runs of baseline + worker; medians are reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Record type to bench: tick, candle, foreign, index or deriv.
    #[arg(long = "type", default_value = "tick", value_parser = parse_type)]
    pub record_type: RecordType,
    /// Give up on a worker run after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_secs: u64,
    /// What to measure: `ingest` throughput, `history` latency or `memory` with full queues.
    #[arg(long, value_enum, default_value_t = Scenario::Ingest)]
    pub scenario: Scenario,
    /// Percent of records that are a newer version of an earlier record's
    /// key (0-50; newest-wins types only).
    #[arg(long, default_value_t = 0)]
    pub republish_pct: u64,
    /// History: concurrent clients, one level after the other.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub concurrency: Vec<usize>,
    /// History: one-day candle requests per concurrency level.
    #[arg(long, default_value_t = 2000)]
    pub requests: usize,
}

/// The benchmark's workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Messages pre-filled into a stream, consumed and written by the worker.
    Ingest,
    /// A day of candles and 50,000 ticks asked for through the history service.
    History,
    /// Every type's queue filled while its table is locked: resident memory.
    Memory,
}

fn parse_type(name: &str) -> Result<RecordType, String> {
    RecordType::from_name(name)
        .ok_or_else(|| format!("{name:?} is not one of tick, candle, foreign, index, deriv"))
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("--{arg}: {message}")]
    InvalidArgument { arg: &'static str, message: String },
    #[error("database: {context}: {source}")]
    Database {
        context: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("database: {0}")]
    Migrate(#[from] tickvault::db::DbError),
    #[error("NATS: {context}: {message}")]
    Nats { context: String, message: String },
    #[error(transparent)]
    Connect(#[from] tickvault::nats::NatsError),
    #[error("the worker could not start: {0}")]
    Build(#[from] tickvault::app::BuildError),
    #[error("the worker failed: {0}")]
    Run(#[from] tickvault::app::RunError),
    #[error("the worker wrote {actual} rows to {table} within {timeout:?}, expected {expected}")]
    Timeout {
        table: &'static str,
        expected: u64,
        actual: i64,
        timeout: Duration,
    },
    #[error("{table} holds {actual} rows after the run, expected exactly {expected}")]
    WrongCount {
        table: &'static str,
        expected: u64,
        actual: i64,
    },
    #[error("{table} differs from the expected rows: {missing} expected rows missing or different, {unexpected} rows not expected, {duplicates} duplicate keys")]
    NotExact {
        table: &'static str,
        missing: i64,
        unexpected: i64,
        duplicates: i64,
    },
}

fn db_error(context: impl Into<String>) -> impl FnOnce(sqlx::Error) -> BenchError {
    let context = context.into();
    move |source| BenchError::Database { context, source }
}

fn nats_error<E: std::fmt::Display>(context: impl Into<String>) -> impl FnOnce(E) -> BenchError {
    let context = context.into();
    move |e| BenchError::Nats {
        context,
        message: e.to_string(),
    }
}

/// Records apart a re-published version follows its key's first one: more
/// than a default batch, so the two meet in the table, not only in a batch.
const REPUBLISH_DISTANCE: u64 = 5_050;

/// Version `version` (0 = the first) of the record with key `i`.
pub fn bench_record(record_type: RecordType, i: u64, version: u64) -> Json {
    const SYMBOLS: [&str; 10] = [
        "FPT", "VNM", "HPG", "VCB", "MWG", "TCB", "VIC", "VHM", "ACB", "MBB",
    ];
    const INDEX_NAMES: [&str; 3] = ["VNINDEX", "VN30", "HNXINDEX"];
    const CONTRACTS: [&str; 2] = ["VN30F2612", "VN30F2701"];
    // 2026-11-26 09:00:00 +07:00; one millisecond apart per record.
    let base_ms: i64 = 1_764_122_400_000;
    let ts = base_ms + i as i64;
    let symbol = SYMBOLS[(i % SYMBOLS.len() as u64) as usize];
    // A later version moves by a third: a double with every digit used.
    let x = (i % 1000) as f64 / 100.0 + version as f64 / 3.0;
    match record_type {
        RecordType::Tick => json!({
            "symbol": symbol, "timestamp": ts, "price": 50.0 + x,
            "volume": 100 * (1 + i % 50), "side": if i.is_multiple_of(2) { "buy" } else { "sell" },
            "seq": i,
        }),
        RecordType::Candle => json!({
            "symbol": symbol, "timestamp": ts, "open": 50.0 + x, "high": 52.0 + x,
            "low": 49.0 + x, "close": 51.0 + x, "volume": 1000 + i % 977 + version, "value": 5.1e7 + x,
        }),
        RecordType::Foreign => json!({
            "symbol": symbol, "timestamp": ts, "buy_volume": i + version, "sell_volume": i / 2,
            "buy_value": i as f64 * 5e4 + x, "sell_value": i as f64 * 2.5e4, "room": 1_000_000,
        }),
        RecordType::Index => json!({
            "index_name": INDEX_NAMES[(i % 3) as usize],
            "timestamp": ts, "value": 1250.0 + x, "change": x - 5.0, "change_pct": x / 12.5,
            "volume": i, "traded_value": i as f64 * 1e6, "advances": 12, "declines": 15,
            "unchanged": 3,
        }),
        RecordType::Deriv => json!({
            "contract": CONTRACTS[(i % 2) as usize], "timestamp": ts,
            "price": 1320.0 + x, "basis": x - 5.0, "open_interest": 40_000 + i % 100,
            "volume": i,
        }),
    }
}

/// The feed's records: which are re-published versions, and what is expected.
#[derive(Debug, Clone, Copy)]
struct Feed {
    record_type: RecordType,
    records: u64,
    republish_pct: u64,
}

impl Feed {
    /// Whether record `n` of the stream re-publishes the key of record
    /// `n - REPUBLISH_DISTANCE` (whose own position is never a re-publish).
    fn republishes(&self, n: u64) -> bool {
        n >= REPUBLISH_DISTANCE && n % 100 < self.republish_pct
    }

    /// Record `n` of the stream.
    fn record(&self, n: u64) -> Json {
        if self.republishes(n) {
            bench_record(self.record_type, n - REPUBLISH_DISTANCE, 1)
        } else {
            bench_record(self.record_type, n, 0)
        }
    }

    /// Message `m`'s payload: a single object, or an array of `per_message` records.
    fn payload(&self, m: u64, per_message: usize) -> Json {
        if per_message == 1 {
            return self.record(m);
        }
        let first = m * per_message as u64;
        Json::Array(
            (first..first + per_message as u64)
                .map(|n| self.record(n))
                .collect(),
        )
    }

    /// The rows the table must hold: every key once, in its newest version.
    fn expected(&self) -> impl Iterator<Item = Json> + '_ {
        (0..self.records)
            .filter(|&n| !self.republishes(n))
            .map(|n| {
                let later = n + REPUBLISH_DISTANCE;
                let version = u64::from(later < self.records && self.republishes(later));
                bench_record(self.record_type, n, version)
            })
    }

    fn expected_rows(&self) -> u64 {
        (0..self.records).filter(|&n| !self.republishes(n)).count() as u64
    }
}

/// One run's result.
#[derive(Debug, Clone, Copy)]
struct Run {
    baseline_rows_per_s: f64,
    worker_rows_per_s: f64,
    /// CPU time of the process while the worker ran, in microseconds.
    cpu_us: f64,
    peak_rss_kib: u64,
}

impl Run {
    fn ratio(&self) -> f64 {
        self.worker_rows_per_s / self.baseline_rows_per_s
    }
}

/// Everything the bench created, removed by [`Scratch::remove`].
struct Scratch {
    admin: PgPool,
    database: String,
    url: String,
    js: jetstream::Context,
    stream: String,
    prefix: String,
}

impl Scratch {
    async fn remove(self) {
        for stream in [self.stream.clone(), format!("{}_DLQ", self.stream)] {
            if let Err(e) = self.js.delete_stream(&stream).await {
                tracing::warn!(stream, error = %e, "could not delete the bench stream");
            }
        }
        let drop = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.database);
        if let Err(e) = sqlx::query(&drop).execute(&self.admin).await {
            tracing::warn!(database = %self.database, error = %e, "could not drop the bench database");
        }
        self.admin.close().await;
    }
}

pub async fn run(config: &Config, args: BenchArgs) -> Result<(), BenchError> {
    validate(config, &args)?;
    let id = format!("{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff);
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(tickvault::db::connect_options(&config.database)?)
        .await
        .map_err(db_error(format!("connect to {}", config.database.url)))?;
    let database = format!("tickvault_bench_{id}");
    sqlx::query(&format!("CREATE DATABASE {database}"))
        .execute(&admin)
        .await
        .map_err(db_error("create the bench database"))?;
    let mut url = config
        .database
        .url
        .parse()
        .map_err(|e| BenchError::InvalidArgument {
            arg: "config",
            message: format!("database.url: {e}"),
        })?;
    url.set_path(&database);
    let nats =
        tickvault::nats::connect(&config.nats, |options| options.name("tickvault-bench")).await?;
    let scratch = Scratch {
        admin,
        database,
        url: url.to_string(),
        js: jetstream::new(nats.clone()),
        stream: format!("TVBENCH_{id}"),
        prefix: format!("mdbench{id}"),
    };
    let result = match args.scenario {
        Scenario::Ingest => bench(config, &args, &scratch).await,
        Scenario::History => history(config, &args, &scratch).await,
        Scenario::Memory => memory(config, &args, &scratch).await,
    };
    scratch.remove().await;
    result
}

fn validate(config: &Config, args: &BenchArgs) -> Result<(), BenchError> {
    let invalid = |arg, message: String| Err(BenchError::InvalidArgument { arg, message });
    if args.messages == 0 {
        return invalid("messages", "must be at least 1".into());
    }
    let max = config.ingest.max_records_per_message;
    if args.records_per_message == 0 || args.records_per_message > max {
        return invalid(
            "records-per-message",
            format!("must be between 1 and ingest.max_records_per_message ({max})"),
        );
    }
    if args.runs == 0 {
        return invalid("runs", "must be at least 1".into());
    }
    if args.republish_pct > 50 {
        return invalid("republish-pct", "must be 0 to 50".into());
    }
    if args.republish_pct > 0 && args.record_type.spec().conflict != Conflict::NewestWins {
        return invalid(
            "republish-pct",
            "a re-published trade is a duplicate (keep-first): use a newest-wins type".into(),
        );
    }
    if args.concurrency.contains(&0) || args.requests == 0 {
        return invalid(
            "concurrency",
            "levels and --requests must be at least 1".into(),
        );
    }
    Ok(())
}

/// The worker's configuration: the bench's database, stream and prefixes.
fn worker_config(config: &Config, scratch: &Scratch) -> Config {
    let mut worker = config.clone();
    worker.database.url = SecretUrl::new(scratch.url.clone());
    worker.ingest.mode = IngestMode::Jetstream;
    worker.ingest.stream = scratch.stream.clone();
    worker.ingest.subject_prefix = scratch.prefix.clone();
    worker.history.subject_prefix = format!("{}history", scratch.prefix);
    worker.http.addr = "127.0.0.1:0".parse().expect("a valid socket address");
    worker
}

fn feed(args: &BenchArgs) -> Feed {
    Feed {
        record_type: args.record_type,
        records: args.messages * args.records_per_message as u64,
        republish_pct: args.republish_pct,
    }
}

async fn bench(config: &Config, args: &BenchArgs, scratch: &Scratch) -> Result<(), BenchError> {
    let spec = args.record_type.spec();
    let feed = feed(args);
    let rows = feed.expected_rows();
    let worker = worker_config(config, scratch);

    let db = Database::connect_lazy(&worker.database)?;
    db.migrate().await?;
    let baseline_table = format!("bench_baseline_{}", spec.table);
    sqlx::query(&format!(
        "CREATE TABLE {baseline_table} (LIKE {} INCLUDING ALL)",
        spec.table
    ))
    .execute(&db.pool)
    .await
    .map_err(db_error("create the baseline table"))?;

    let prefill_started = Instant::now();
    prefill(&worker, args, &feed, scratch, args.record_type).await?;
    let copy_data = copy_text(spec, &feed)?;
    tracing::info!(
        messages = args.messages,
        rows,
        elapsed_s = format!("{:.1}", prefill_started.elapsed().as_secs_f64()),
        stream = %scratch.stream,
        "stream pre-filled"
    );

    let mut runs = Vec::with_capacity(args.runs);
    let mut flushes = Vec::new();
    for n in 0..args.runs {
        let (baseline, worker_run) = if n.is_multiple_of(2) {
            let b = baseline(&db.pool, spec, &baseline_table, &copy_data, rows).await?;
            let w = run_worker(&worker, args, &db.pool, scratch, rows).await?;
            (b, w)
        } else {
            let w = run_worker(&worker, args, &db.pool, scratch, rows).await?;
            let b = baseline(&db.pool, spec, &baseline_table, &copy_data, rows).await?;
            (b, w)
        };
        check_exact(&db.pool, spec, &baseline_table).await?;
        let (mut run, exposition) = worker_run;
        run.baseline_rows_per_s = baseline;
        flushes.push(flush_quantiles(&exposition, args.record_type));
        println!(
            "run {}/{}: baseline COPY {:>9.0} rows/s   worker {:>9.0} rows/s   ratio {:.3}   worker CPU {:.2} us/row {:.2} us/msg   peak RSS {:.1} MiB   exact",
            n + 1,
            args.runs,
            run.baseline_rows_per_s,
            run.worker_rows_per_s,
            run.ratio(),
            run.cpu_us / rows as f64,
            run.cpu_us / args.messages as f64,
            run.peak_rss_kib as f64 / 1024.0,
        );
        runs.push(run);
    }
    db.pool.close().await;

    let median_of = |f: &dyn Fn(&Run) -> f64| median(runs.iter().map(f).collect());
    println!(
        "tickvault bench: type={} messages={} records/message={} republished={}% rows={} runs={}",
        args.record_type.name(),
        args.messages,
        args.records_per_message,
        args.republish_pct,
        rows,
        args.runs
    );
    println!(
        "  median baseline COPY : {:>10.0} rows/s",
        median_of(&|r| r.baseline_rows_per_s)
    );
    println!(
        "  median worker        : {:>10.0} rows/s",
        median_of(&|r| r.worker_rows_per_s)
    );
    println!(
        "  median ratio worker/baseline: {:.3}",
        median_of(&|r| r.ratio())
    );
    println!(
        "  median worker CPU: {:.2} us/row, {:.2} us/message (user + system of this process while the worker ran)",
        median_of(&|r| r.cpu_us) / rows as f64,
        median_of(&|r| r.cpu_us) / args.messages as f64,
    );
    println!(
        "  peak RSS while the worker ran: {:.1} MiB (max of the runs; this process, the bench's copy of the expected rows included: {:.1} MiB)",
        runs.iter().map(|r| r.peak_rss_kib).max().unwrap_or(0) as f64 / 1024.0,
        copy_data.len() as f64 / (1024.0 * 1024.0),
    );
    if let Some(Some((count, p50, p99))) = flushes.last() {
        println!(
            "  flushes (last run): {count}, duration p50 {:.1} ms, p99 {:.1} ms (histogram estimate)",
            p50 * 1e3,
            p99 * 1e3
        );
    }
    Ok(())
}

/// Every type's queue filled while its table is locked: the process's
/// resident memory then, and exactness once the lock is gone.
async fn memory(config: &Config, args: &BenchArgs, scratch: &Scratch) -> Result<(), BenchError> {
    let mut worker = worker_config(config, scratch);
    // Migrations would wait for the locks the bench holds.
    worker.database.migrate_on_start = false;
    let db = Database::connect_lazy(&worker.database)?;
    db.migrate().await?;
    for record_type in RecordType::ALL {
        let feed = Feed {
            record_type,
            records: args.messages * args.records_per_message as u64,
            republish_pct: 0,
        };
        prefill(&worker, args, &feed, scratch, record_type).await?;
    }
    let tables: Vec<&str> = RecordType::ALL.iter().map(|t| t.spec().table).collect();
    let mut lock = db.pool.begin().await.map_err(db_error("begin the lock"))?;
    sqlx::query(&format!(
        "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
        tables.join(", ")
    ))
    .execute(&mut *lock)
    .await
    .map_err(db_error("lock the tables"))?;

    reset_peak_rss();
    let before = current_rss_kib().unwrap_or(0);
    let app = App::build(worker.clone()).await?;
    let metrics = app.metrics();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    // Full: less room left than one more message takes.
    let capacity = worker.ingest.queue_capacity as i64;
    let full_at = capacity - args.records_per_message as i64;
    let started = Instant::now();
    let mut depths = Vec::new();
    while started.elapsed() < Duration::from_secs(args.timeout_secs) {
        let exposition = metrics.render();
        depths = RecordType::ALL
            .iter()
            .map(|t| gauge(&exposition, "tickvault_queue_depth", t.name()))
            .collect();
        if depths.iter().all(|d| *d >= full_at) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let the held pulls settle too.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = current_rss_kib().unwrap_or(0);
    let peak = peak_rss_kib().unwrap_or(0);
    lock.rollback()
        .await
        .map_err(db_error("release the lock"))?;
    let expected = args.messages * args.records_per_message as u64;
    let drained = Instant::now();
    while RecordType::ALL
        .iter()
        .any(|t| metrics.rows_written(*t) < expected)
        && drained.elapsed() < Duration::from_secs(args.timeout_secs)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let drained_peak = peak_rss_kib().unwrap_or(0);
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(40), handle).await;
    for t in RecordType::ALL {
        let count = count_rows(&db.pool, t.spec().table).await?;
        if count != expected as i64 {
            return Err(BenchError::WrongCount {
                table: t.spec().table,
                expected,
                actual: count,
            });
        }
    }
    db.pool.close().await;
    println!(
        "tickvault bench --scenario memory: 5 types x {} messages x {} records, queue_capacity {}",
        args.messages, args.records_per_message, capacity
    );
    println!("  queue depths when measured: {depths:?} (full at >= {full_at})");
    println!(
        "  resident memory: {:.1} MiB with every queue full, peak {:.1} MiB (this process; {:.1} MiB before the worker started)",
        rss as f64 / 1024.0,
        peak as f64 / 1024.0,
        before as f64 / 1024.0
    );
    println!(
        "  after the tables were unlocked every row was written (exact counts); peak while draining: {:.1} MiB",
        drained_peak as f64 / 1024.0
    );
    Ok(())
}

/// A gauge's value for one type in a Prometheus exposition.
fn gauge(exposition: &str, name: &str, record_type: &str) -> i64 {
    let series = format!("{name}{{type=\"{record_type}\"}} ");
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as i64)
}

/// The history scenario's data: 375 one-minute candles (09:00-15:14 on
/// 2026-11-26, market time) and 50,000 ticks, four per 100 ms, all of FPT.
const HISTORY_CANDLES: i64 = 375;
const HISTORY_TICKS: i64 = 50_000;
const HISTORY_DAY: &str = "2026-11-26";

async fn history(config: &Config, args: &BenchArgs, scratch: &Scratch) -> Result<(), BenchError> {
    let worker = worker_config(config, scratch);
    let db = Database::connect_lazy(&worker.database)?;
    db.migrate().await?;
    for sql in [
        format!(
            "INSERT INTO candles_1m (symbol, \"timestamp\", open, high, low, close, volume, value) \
             SELECT 'FPT', TIMESTAMPTZ '{HISTORY_DAY} 09:00:00+07' + i * INTERVAL '1 minute', 10, 12, 9, 11, 100, 1.5e6 \
             FROM generate_series(0, {}) AS i",
            HISTORY_CANDLES - 1
        ),
        format!(
            "INSERT INTO tick_data SELECT 'FPT', TIMESTAMPTZ '{HISTORY_DAY} 09:00:00+07' + (i / 4) * INTERVAL '100 milliseconds', \
             97.5, 100, 'buy', i FROM generate_series(0, {}) AS i",
            HISTORY_TICKS - 1
        ),
    ] {
        sqlx::query(&sql)
            .execute(&db.pool)
            .await
            .map_err(db_error("insert the history rows"))?;
    }

    let app = App::build(worker.clone()).await?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    let client =
        tickvault::nats::connect(&worker.nats, |options| options.name("tickvault-bench")).await?;
    let prefix = &worker.history.subject_prefix;
    let day = json!({"symbol": "FPT", "from": HISTORY_DAY, "to": HISTORY_DAY, "limit": 50_000});
    // The service answers once the worker is up.
    let started = Instant::now();
    while ask_all(&client, &format!("{prefix}.candles"), &day)
        .await
        .is_err()
    {
        if started.elapsed() > Duration::from_secs(args.timeout_secs) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut timings: Vec<[f64; 4]> = Vec::with_capacity(args.runs);
    for _ in 0..args.runs {
        let (candles, candle_s) =
            timed(ask_all(&client, &format!("{prefix}.candles"), &day)).await?;
        let (ticks, tick_s) = timed(ask_all(&client, &format!("{prefix}.ticks"), &day)).await?;
        let (candle_rows, candle_sql_s) = timed(select_day(&db, "candles_1m")).await?;
        let (tick_rows, tick_sql_s) = timed(select_day(&db, "tick_data")).await?;
        for (table, served, read, expected) in [
            ("candles_1m", candles.0, candle_rows, HISTORY_CANDLES),
            ("tick_data", ticks.0, tick_rows, HISTORY_TICKS),
        ] {
            if served != expected || read != expected {
                return Err(BenchError::WrongCount {
                    table,
                    expected: expected as u64,
                    actual: served.min(read),
                });
            }
        }
        println!(
            "run: candles {:.1} ms (baseline {:.1} ms)   ticks {:.1} ms in {} replies (baseline {:.1} ms)",
            candle_s * 1e3,
            candle_sql_s * 1e3,
            tick_s * 1e3,
            ticks.1,
            tick_sql_s * 1e3
        );
        timings.push([candle_s, candle_sql_s, tick_s, tick_sql_s]);
    }
    let levels = concurrency_levels(&client, prefix, &worker, args).await?;
    let _ = stop.send(());
    match tokio::time::timeout(Duration::from_secs(40), handle).await {
        Ok(Ok(result)) => result?,
        Ok(Err(e)) => tracing::error!(error = %e, "the worker task failed"),
        Err(_) => tracing::error!("the worker did not stop within 40 s"),
    }
    db.pool.close().await;
    let median_of = |k: usize| median(timings.iter().map(|t| t[k]).collect());
    println!("tickvault bench --scenario history: runs={}", args.runs);
    for (what, served, baseline) in [
        (
            "one day of 1m candles (375 rows)",
            median_of(0),
            median_of(1),
        ),
        ("50,000 ticks, every page", median_of(2), median_of(3)),
    ] {
        println!(
            "  {what}: median {:.1} ms, baseline query {:.1} ms, ratio service/baseline {:.2}",
            served * 1e3,
            baseline * 1e3,
            served / baseline
        );
    }
    println!(
        "  one-day 1m-candle requests, {} per level; direct = the service's SQL through a pool of as many connections as the service has slots:",
        args.requests
    );
    for level in levels {
        println!(
            "  concurrency {:>2}: service {:>7.0} req/s (p50 {:.2} ms, p99 {:.2} ms)   direct SQL {:>7.0} req/s (p50 {:.2} ms, p99 {:.2} ms)   ratio {:.2}",
            level.concurrency,
            level.service.per_s,
            level.service.p50 * 1e3,
            level.service.p99 * 1e3,
            level.direct.per_s,
            level.direct.p50 * 1e3,
            level.direct.p99 * 1e3,
            level.service.per_s / level.direct.per_s
        );
    }
    Ok(())
}

/// A history reply as far as the load checks it: how many rows.
#[derive(serde::Deserialize)]
struct RowsReply {
    rows: Vec<serde::de::IgnoredAny>,
}

/// Requests per second and latency quantiles of one load.
#[derive(Debug, Clone, Copy)]
struct Load {
    per_s: f64,
    p50: f64,
    p99: f64,
}

struct Level {
    concurrency: usize,
    service: Load,
    direct: Load,
}

/// `requests` calls of `call` from `concurrency` tasks at once.
async fn load<F, Fut>(concurrency: usize, requests: usize, call: F) -> Result<Load, BenchError>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), BenchError>> + Send,
{
    let left = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(requests));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let left = left.clone();
        let call = call.clone();
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            while left
                .fetch_update(
                    std::sync::atomic::Ordering::Relaxed,
                    std::sync::atomic::Ordering::Relaxed,
                    |n| n.checked_sub(1),
                )
                .is_ok()
            {
                let asked = Instant::now();
                call().await?;
                latencies.push(asked.elapsed().as_secs_f64());
            }
            Ok::<_, BenchError>(latencies)
        });
    }
    let mut latencies = Vec::with_capacity(requests);
    while let Some(done) = tasks.join_next().await {
        latencies.extend(done.map_err(|e| BenchError::Nats {
            context: "a load task".into(),
            message: e.to_string(),
        })??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_by(|a, b| a.total_cmp(b));
    let quantile =
        |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    Ok(Load {
        per_s: requests as f64 / elapsed,
        p50: quantile(0.5),
        p99: quantile(0.99),
    })
}

/// The one-day candle request at each `--concurrency`: through the service,
/// then its own SQL directly through a pool.
async fn concurrency_levels(
    client: &async_nats::Client,
    prefix: &str,
    worker: &Config,
    args: &BenchArgs,
) -> Result<Vec<Level>, BenchError> {
    let body = json!({"symbol": "FPT", "from": HISTORY_DAY, "to": HISTORY_DAY}).to_string();
    let query =
        tickvault::history::request::parse(RecordType::Candle, body.as_bytes()).map_err(|e| {
            BenchError::InvalidArgument {
                arg: "scenario",
                message: format!("the history request: {e}"),
            }
        })?;
    let slots = (worker.database.pool_max / 2).max(1);
    let direct_pool = PgPoolOptions::new()
        .max_connections(slots)
        .connect_with(tickvault::db::connect_options(&worker.database)?)
        .await
        .map_err(db_error("connect the direct pool"))?;
    let subject = format!("{prefix}.candles");
    let mut levels = Vec::new();
    for &concurrency in &args.concurrency {
        let service = {
            let client = client.clone();
            let subject = subject.clone();
            let body = body.clone();
            load(concurrency, args.requests, move || {
                let client = client.clone();
                let subject = subject.clone();
                let body = body.clone();
                async move {
                    let reply = client
                        .request(subject, body.into())
                        .await
                        .map_err(nats_error("ask for candles"))?;
                    // Counted without building the rows: the load's own
                    // CPU is on the same cores as the service it measures.
                    let rows = serde_json::from_slice::<RowsReply>(&reply.payload)
                        .ok()
                        .map(|r| r.rows.len());
                    if rows != Some(HISTORY_CANDLES as usize) {
                        return Err(BenchError::WrongCount {
                            table: "candles_1m",
                            expected: HISTORY_CANDLES as u64,
                            actual: rows.map_or(-1, |n| n as i64),
                        });
                    }
                    Ok(())
                }
            })
            .await?
        };
        let direct = {
            let pool = direct_pool.clone();
            let query = query.clone();
            load(concurrency, args.requests, move || {
                let pool = pool.clone();
                let query = query.clone();
                async move {
                    let (sql, arguments) =
                        tickvault::history::query::build(&query, i64::from(query.limit) + 1)
                            .map_err(db_error("build the history SQL"))?;
                    let rows = sqlx::query_with(&sql, arguments)
                        .fetch_all(&pool)
                        .await
                        .map_err(db_error("the history SQL"))?;
                    if rows.len() != HISTORY_CANDLES as usize {
                        return Err(BenchError::WrongCount {
                            table: "candles_1m",
                            expected: HISTORY_CANDLES as u64,
                            actual: rows.len() as i64,
                        });
                    }
                    Ok(())
                }
            })
            .await?
        };
        levels.push(Level {
            concurrency,
            service,
            direct,
        });
    }
    direct_pool.close().await;
    Ok(levels)
}

async fn timed<T>(
    work: impl std::future::Future<Output = Result<T, BenchError>>,
) -> Result<(T, f64), BenchError> {
    let started = Instant::now();
    let value = work.await?;
    Ok((value, started.elapsed().as_secs_f64()))
}

/// Asks the history service, following cursors; returns (rows, replies).
async fn ask_all(
    client: &async_nats::Client,
    subject: &str,
    request: &Json,
) -> Result<(i64, usize), BenchError> {
    let mut request = request.clone();
    let (mut rows, mut replies) = (0, 0);
    loop {
        let reply = client
            .request(subject.to_string(), request.to_string().into())
            .await
            .map_err(nats_error(format!("ask {subject}")))?;
        replies += 1;
        let reply: Json = serde_json::from_slice(&reply.payload)
            .map_err(nats_error(format!("read the reply of {subject}")))?;
        let page = reply["rows"].as_array().ok_or_else(|| BenchError::Nats {
            context: format!("ask {subject}"),
            message: format!("no rows in the reply: {reply}"),
        })?;
        rows += page.len() as i64;
        match reply["next_cursor"].as_str() {
            Some(cursor) => request["cursor"] = json!(cursor),
            None => return Ok((rows, replies)),
        }
    }
}

/// The baseline: the day's rows read with a plain parameterless query.
async fn select_day(db: &Database, table: &str) -> Result<i64, BenchError> {
    let order = if table == "tick_data" {
        "\"timestamp\", seq"
    } else {
        "\"timestamp\""
    };
    let rows = sqlx::query(&format!(
        "SELECT * FROM {table} WHERE symbol = 'FPT' AND \"timestamp\" >= TIMESTAMPTZ '{HISTORY_DAY} 00:00:00+07' \
         AND \"timestamp\" < TIMESTAMPTZ '{HISTORY_DAY} 00:00:00+07' + INTERVAL '1 day' ORDER BY {order}"
    ))
    .fetch_all(&db.pool)
    .await
    .map_err(db_error(format!("read {table}")))?;
    Ok(rows.len() as i64)
}

/// Publishes every message of one type through JetStream, a window of
/// acks at a time, then checks the stream holds them all.
async fn prefill(
    worker: &Config,
    args: &BenchArgs,
    feed: &Feed,
    scratch: &Scratch,
    record_type: RecordType,
) -> Result<(), BenchError> {
    source::ensure_streams(&scratch.js, &worker.ingest)
        .await
        .map_err(nats_error("create the bench stream"))?;
    let subject_prefix = format!("{}.{}", scratch.prefix, record_type.name());
    let mut pending = std::collections::VecDeque::new();
    for m in 0..args.messages {
        let payload = feed.payload(m, args.records_per_message);
        let key = payload
            .get(0)
            .unwrap_or(&payload)
            .get(record_type.spec().id_field())
            .and_then(Json::as_str)
            .unwrap_or("X")
            .to_string();
        let ack = scratch
            .js
            .publish(
                format!("{subject_prefix}.{key}"),
                payload.to_string().into(),
            )
            .await
            .map_err(nats_error("pre-fill publish"))?;
        pending.push_back(ack);
        if pending.len() >= 1024 {
            if let Some(ack) = pending.pop_front() {
                ack.await.map_err(nats_error("pre-fill ack"))?;
            }
        }
    }
    for ack in pending {
        ack.await.map_err(nats_error("pre-fill ack"))?;
    }
    let mut stream = scratch
        .js
        .get_stream(&scratch.stream)
        .await
        .map_err(nats_error("read the bench stream"))?;
    let info = stream
        .info()
        .await
        .map_err(nats_error("read the bench stream"))?;
    // The types are pre-filled one after the other, each with `--messages`.
    let types_before = RecordType::ALL
        .iter()
        .position(|t| *t == record_type)
        .filter(|_| args.scenario == Scenario::Memory)
        .unwrap_or(0) as u64;
    let expected = (types_before + 1) * args.messages;
    if info.state.messages != expected {
        return Err(BenchError::Nats {
            context: "pre-fill".into(),
            message: format!(
                "stream {} holds {} messages, expected {expected}",
                scratch.stream, info.state.messages
            ),
        });
    }
    Ok(())
}

/// The expected rows as COPY text, parsed by the record rules and written
/// as PostgreSQL reads them back exactly.
fn copy_text(spec: &RecordSpec, feed: &Feed) -> Result<String, BenchError> {
    let mut data = String::with_capacity(feed.records as usize * 80);
    for record in feed.expected() {
        let values = spec
            .parse_record(&record)
            .map_err(|r| BenchError::InvalidArgument {
                arg: "type",
                message: format!("generated record rejected: {}", r.detail),
            })?;
        tickvault::records::write_copy_row(&values, &mut data);
    }
    Ok(data)
}

/// One `COPY` of every row into the empty scratch table, in one transaction.
async fn baseline(
    pool: &PgPool,
    spec: &RecordSpec,
    table: &str,
    data: &str,
    rows: u64,
) -> Result<f64, BenchError> {
    let mut conn = pool.acquire().await.map_err(db_error("baseline connect"))?;
    sqlx::query(&format!("TRUNCATE {table}"))
        .execute(&mut *conn)
        .await
        .map_err(db_error("truncate the baseline table"))?;
    let started = Instant::now();
    let mut tx = conn.begin().await.map_err(db_error("baseline begin"))?;
    let mut copy = tx
        .copy_in_raw(&format!("COPY {table} ({}) FROM STDIN", spec.column_list()))
        .await
        .map_err(db_error("baseline COPY"))?;
    for chunk in data.as_bytes().chunks(1 << 20) {
        if let Err(e) = copy.send(chunk).await {
            let _ = copy.abort("tickvault bench: send failed").await;
            return Err(db_error("baseline COPY")(e));
        }
    }
    copy.finish().await.map_err(db_error("baseline COPY"))?;
    tx.commit().await.map_err(db_error("baseline commit"))?;
    let elapsed = started.elapsed();
    let count: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(&mut *conn)
        .await
        .map_err(db_error("baseline count"))?;
    if count != rows as i64 {
        return Err(BenchError::WrongCount {
            table: "baseline",
            expected: rows,
            actual: count,
        });
    }
    Ok(rows as f64 / elapsed.as_secs_f64())
}

/// The worker's table equals the expected rows (the baseline's), value for
/// value: each row compared as text, where PostgreSQL prints a double in the
/// shortest form that reads back to the same bits; and no key twice.
async fn check_exact(pool: &PgPool, spec: &RecordSpec, expected: &str) -> Result<(), BenchError> {
    let table = spec.table;
    let row = format!("ROW({})::text", spec.column_list());
    let key = spec.key_list();
    let (missing, unexpected, duplicates): (i64, i64, i64) = sqlx::query_as(&format!(
        "SELECT (SELECT count(*) FROM (SELECT {row} FROM {expected} EXCEPT ALL SELECT {row} FROM {table}) m), \
                (SELECT count(*) FROM (SELECT {row} FROM {table} EXCEPT ALL SELECT {row} FROM {expected}) u), \
                (SELECT count(*) - count(DISTINCT ({key})) FROM {table})"
    ))
    .fetch_one(pool)
    .await
    .map_err(db_error("compare the rows"))?;
    if missing + unexpected + duplicates > 0 {
        return Err(BenchError::NotExact {
            table,
            missing,
            unexpected,
            duplicates,
        });
    }
    Ok(())
}

/// Starts the worker on the pre-filled stream with fresh consumers and an
/// empty table; returns its rows/s, CPU and peak memory, and its final metrics.
async fn run_worker(
    config: &Config,
    args: &BenchArgs,
    pool: &PgPool,
    scratch: &Scratch,
    rows: u64,
) -> Result<(Run, String), BenchError> {
    let spec = args.record_type.spec();
    // Fresh consumers start from the first message kept in the stream.
    for t in RecordType::ALL {
        let _ = scratch
            .js
            .delete_consumer_from_stream(source::durable_name(t), &scratch.stream)
            .await;
    }
    sqlx::query(&format!("TRUNCATE {}", spec.table))
        .execute(pool)
        .await
        .map_err(db_error("truncate the table"))?;

    reset_peak_rss();
    let cpu_before = cpu_time_us();
    let started = Instant::now();
    let app = App::build(config.clone()).await?;
    let metrics = app.metrics();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut handle = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    let timeout = Duration::from_secs(args.timeout_secs);
    let mut finished = None;
    let mut cpu_us = 0.0;
    while started.elapsed() < timeout {
        if metrics.rows_written(args.record_type) >= args.messages * args.records_per_message as u64
        {
            finished = Some(started.elapsed());
            cpu_us = cpu_time_us()
                .zip(cpu_before)
                .map_or(f64::NAN, |(a, b)| a - b);
            break;
        }
        if handle.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let peak_rss_kib = peak_rss_kib().unwrap_or(0);
    let count = count_rows(pool, spec.table).await?;
    let _ = stop.send(());
    let exposition = metrics.render();
    match tokio::time::timeout(Duration::from_secs(40), &mut handle).await {
        Ok(Ok(result)) => result?,
        Ok(Err(e)) => tracing::error!(error = %e, "the worker task failed"),
        Err(_) => {
            handle.abort();
            tracing::error!("the worker did not stop within 40 s");
        }
    }
    let Some(elapsed) = finished else {
        return Err(BenchError::Timeout {
            table: spec.table,
            expected: rows,
            actual: count,
            timeout,
        });
    };
    // Exact: a missing row or a duplicate fails the bench.
    if count != rows as i64 {
        return Err(BenchError::WrongCount {
            table: spec.table,
            expected: rows,
            actual: count,
        });
    }
    let run = Run {
        baseline_rows_per_s: f64::NAN,
        worker_rows_per_s: rows as f64 / elapsed.as_secs_f64(),
        cpu_us,
        peak_rss_kib,
    };
    Ok((run, exposition))
}

async fn count_rows(pool: &PgPool, table: &'static str) -> Result<i64, BenchError> {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(pool)
        .await
        .map_err(db_error(format!("count {table}")))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// A `/proc/self/status` line's value in KiB.
fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Peak resident set size (`VmHWM`) in KiB.
fn peak_rss_kib() -> Option<u64> {
    status_kib("VmHWM:")
}

fn current_rss_kib() -> Option<u64> {
    status_kib("VmRSS:")
}

/// Starts the peak (`VmHWM`) anew from the current resident size.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// User + system CPU time of this process (every thread), in microseconds.
fn cpu_time_us() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces), from field 3.
    let fields: Vec<&str> = stat.rsplit_once(") ")?.1.split(' ').collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // Clock ticks are 1/100 s on Linux (USER_HZ).
    Some(ticks as f64 * 10_000.0)
}

/// (flushes, p50, p99) of `tickvault_flush_duration_seconds{type}`, estimated
/// from the histogram buckets as Prometheus' `histogram_quantile` does.
fn flush_quantiles(exposition: &str, record_type: RecordType) -> Option<(u64, f64, f64)> {
    let label = format!("type=\"{}\"", record_type.name());
    let mut buckets: Vec<(f64, f64)> = exposition
        .lines()
        .filter(|l| l.starts_with("tickvault_flush_duration_seconds_bucket{") && l.contains(&label))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let count = l.rsplit_once(' ')?.1.parse().ok()?;
            Some((bound, count))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let quantile = |q: f64| {
        let rank = q * total;
        let mut previous = (0.0, 0.0);
        for &(bound, count) in &buckets {
            if count >= rank {
                if bound.is_infinite() {
                    return previous.0;
                }
                let width = count - previous.1;
                let fraction = if width > 0.0 {
                    (rank - previous.1) / width
                } else {
                    1.0
                };
                return previous.0 + (bound - previous.0) * fraction;
            }
            previous = (bound, count);
        }
        previous.0
    };
    Some((total as u64, quantile(0.5), quantile(0.99)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn bench_records_pass_their_spec_with_unique_keys() {
        for t in RecordType::ALL {
            let spec = t.spec();
            let positions = spec.key_positions();
            let mut keys = HashSet::new();
            for m in 0..200 {
                let payload = Feed {
                    record_type: t,
                    records: 600,
                    republish_pct: 0,
                }
                .payload(m, 3);
                for record in payload.as_array().unwrap() {
                    let row = spec.parse_record(record).unwrap();
                    let key: Vec<String> =
                        positions.iter().map(|&p| format!("{:?}", row[p])).collect();
                    assert!(keys.insert(key), "{t:?}: duplicate key in {record}");
                }
            }
        }
        let feed = Feed {
            record_type: RecordType::Tick,
            records: 1,
            republish_pct: 0,
        };
        assert!(feed.payload(0, 1).is_object());
    }

    #[test]
    fn republished_versions_replace_their_key_once_and_are_expected() {
        let feed = Feed {
            record_type: RecordType::Candle,
            records: 20_000,
            republish_pct: 10,
        };
        let spec = RecordType::Candle.spec();
        let positions = spec.key_positions();
        let key = |record: &Json| {
            let row = spec.parse_record(record).unwrap();
            positions
                .iter()
                .map(|&p| format!("{:?}", row[p]))
                .collect::<Vec<_>>()
        };
        let mut newest = std::collections::HashMap::new();
        let mut republished = 0;
        for n in 0..feed.records {
            let record = feed.record(n);
            if newest.insert(key(&record), record).is_some() {
                republished += 1;
            }
        }
        assert_eq!(republished, feed.records - feed.expected_rows());
        assert!(republished > 1000, "{republished}");
        let expected: Vec<Json> = feed.expected().collect();
        assert_eq!(expected.len(), newest.len());
        for record in expected {
            assert_eq!(
                newest[&key(&record)],
                record,
                "the newest version is expected"
            );
        }
    }

    #[test]
    fn quantiles_follow_the_buckets() {
        let text = "\
tickvault_flush_duration_seconds_bucket{type=\"tick\",le=\"0.01\"} 50
tickvault_flush_duration_seconds_bucket{type=\"tick\",le=\"0.1\"} 100
tickvault_flush_duration_seconds_bucket{type=\"tick\",le=\"+Inf\"} 100
tickvault_flush_duration_seconds_bucket{type=\"candle\",le=\"+Inf\"} 0
";
        let (count, p50, p99) = flush_quantiles(text, RecordType::Tick).unwrap();
        assert_eq!(count, 100);
        assert!((p50 - 0.01).abs() < 1e-9, "{p50}");
        assert!((p99 - 0.0982).abs() < 1e-6, "{p99}");
        assert!(flush_quantiles(text, RecordType::Candle).is_none());
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
