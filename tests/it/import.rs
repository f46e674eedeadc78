//! `tickvault import`: CSV files of the five types (some gzipped) through the
//! real binary into a database of its own; rows checked with SQL, rejects by
//! line and reason, and a second import that changes nothing.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};

use flate2::write::GzEncoder;
use sqlx::PgPool;

use crate::helpers::TestDatabase;

/// 2026-11-26 09:00 +07:00, in epoch milliseconds.
const T0: i64 = 1_795_658_400_000;
const SYMBOLS: [&str; 3] = ["FPT", "VNM", "HPG"];

/// Runs `tickvault import <args>` against `db` (NATS is not needed).
fn import(db: &TestDatabase, dir: &Path, args: &[&str]) -> (Output, String, String) {
    let output = tokio::task::block_in_place(|| {
        Command::new(env!("CARGO_BIN_EXE_tickvault"))
            .arg("import")
            .args(args)
            .current_dir(dir)
            .env("DATABASE_URL", &db.url)
            .env_remove("NATS_URL")
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    });
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    (output, stdout, stderr)
}

fn write_plain(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

fn write_gzip(path: &Path, text: &str) {
    let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(text.as_bytes()).unwrap();
    std::fs::write(path, gz.finish().unwrap()).unwrap();
}

/// An RFC 3339 timestamp in market time, `seconds` after [`T0`].
fn at(seconds: i64) -> String {
    chrono::DateTime::from_timestamp_millis(T0 + seconds * 1000)
        .unwrap()
        .with_timezone(&chrono::FixedOffset::east_opt(7 * 3600).unwrap())
        .to_rfc3339()
}

/// The table's rows as text, ordered by key: what the test compares.
async fn dump(pool: &PgPool, table: &str, columns: &str, key: &str) -> Vec<String> {
    sqlx::query_scalar(&format!(
        "SELECT concat_ws('|', {columns}) FROM {table} ORDER BY {key}"
    ))
    .fetch_all(pool)
    .await
    .unwrap()
}

/// `extract(epoch)` in milliseconds, as text the test can build.
const MS: &str = "(extract(epoch FROM timestamp) * 1000)::bigint";

struct Files {
    /// (file, line, reason) of every line that must be rejected.
    rejected: Vec<(String, u64, &'static str)>,
    ticks: Vec<String>,
    candles: Vec<String>,
    foreign: Vec<String>,
    index: Vec<String>,
    deriv: Vec<String>,
}

/// A CSV file being written, counting its lines (the header is line 1).
struct Csv {
    name: &'static str,
    text: String,
    line: u64,
}

impl Csv {
    fn new(name: &'static str, header: &str) -> Csv {
        Csv {
            name,
            text: format!("{header}\n"),
            line: 1,
        }
    }

    fn push(&mut self, line: String) {
        self.text.push_str(&line);
        self.text.push('\n');
        self.line += 1;
    }

    /// A line that must be rejected with `reason`.
    fn reject(
        &mut self,
        line: String,
        reason: &'static str,
        rejected: &mut Vec<(String, u64, &'static str)>,
    ) {
        self.push(line);
        rejected.push((self.name.to_string(), self.line, reason));
    }
}

/// Writes the five files into `dir` and returns what the tables must hold.
fn write_files(dir: &Path) -> Files {
    let mut rejected = Vec::new();

    // Ticks, gzipped, columns in another order: 1,000 good rows, a re-sent
    // trade with another price far later in the file (the first stays), and
    // four bad lines.
    let mut csv = Csv::new("ticks.csv.gz", "seq,symbol,timestamp,side,volume,price");
    let mut ticks = Vec::new();
    for i in 0..1000i64 {
        let symbol = SYMBOLS[i as usize % 3];
        let price = 90.0 + (i % 40) as f64 * 0.25;
        let volume = 100 * (i % 7 + 1);
        let side = ["buy", "sell", "unknown"][i as usize % 3];
        csv.push(format!("{i},{symbol},{},{side},{volume},{price}", at(i)));
        ticks.push((
            symbol,
            i,
            format!("{symbol}|{}|{price}|{volume}|{side}|{i}", T0 + i * 1000),
        ));
        match i {
            20 => {
                csv.reject(
                    format!("21,FPT,{},buy,100,-5", at(21)),
                    "invalid_value",
                    &mut rejected,
                );
                csv.reject(
                    format!("22,FPT.X,{},buy,100,5", at(22)),
                    "invalid_symbol",
                    &mut rejected,
                );
            }
            30 => {
                csv.reject(
                    format!(",FPT,{},buy,100,5", at(30)),
                    "missing_field",
                    &mut rejected,
                );
                csv.reject("31,FPT,oops".into(), "invalid_shape", &mut rejected);
            }
            500 => csv.push(format!("10,{},{},buy,1,1.5", SYMBOLS[10 % 3], at(10))),
            _ => {}
        }
    }
    ticks.sort_by_key(|(symbol, i, _)| (symbol.to_string(), *i));
    let ticks = ticks.into_iter().map(|(_, _, row)| row).collect();
    write_gzip(&dir.join(csv.name), &csv.text);

    // Candles, plain: 60 minutes of FPT, minute 5 re-published on the next
    // line with another close (the later one wins), the optional `value`
    // blank on odd minutes, one bar whose close is above its high.
    let mut csv = Csv::new(
        "candles.csv",
        "symbol,timestamp,open,high,low,close,volume,value",
    );
    let mut candles = Vec::new();
    for m in 0..60i64 {
        let value = if m % 2 == 0 {
            format!("{}", m * 1000)
        } else {
            String::new()
        };
        csv.push(format!("FPT,{},10,12,9,11,{m},{value}", at(m * 60)));
        if m == 5 {
            csv.push(format!("FPT,{},10,12,9,11.5,5,0", at(5 * 60)));
            candles.push(format!("FPT|{}|10|12|9|11.5|5|0|", T0 + m * 60_000));
        } else {
            candles.push(format!("FPT|{}|10|12|9|11|{m}|{value}|", T0 + m * 60_000));
        }
    }
    csv.reject(
        format!("FPT,{},10,12,9,13,1,", at(70 * 60)),
        "invalid_value",
        &mut rejected,
    );
    write_plain(&dir.join(csv.name), &csv.text);

    // Foreign flow, gzipped under a name without .gz: found by its magic bytes.
    let mut csv = Csv::new(
        "foreign.data",
        "symbol,timestamp,buy_volume,sell_volume,buy_value,sell_value,room",
    );
    let mut foreign = Vec::new();
    for i in 0..20i64 {
        let room = if i == 3 {
            String::new()
        } else {
            format!("{}", 1_000_000 - i)
        };
        csv.push(format!(
            "vnm,{},{i},{},{}.5,0,{room}",
            at(i * 60),
            i * 2,
            i * 10
        ));
        foreign.push(format!(
            "VNM|{}|{i}|{}|{}.5|0|{room}|",
            T0 + i * 60_000,
            i * 2,
            i * 10
        ));
    }
    csv.reject(
        format!("VNM,{},-1,0,0,0,", at(99 * 60)),
        "invalid_value",
        &mut rejected,
    );
    write_gzip(&dir.join(csv.name), &csv.text);

    // Index snapshots without the optional breadth columns, epoch-millisecond timestamps.
    let mut csv = Csv::new(
        "index.csv",
        "index_name,timestamp,value,change,change_pct,volume,traded_value",
    );
    let mut index = Vec::new();
    for i in 0..10i64 {
        csv.push(format!(
            "VNINDEX,{},1250.25,-3.5,-0.28,{i},1e9",
            T0 + i * 1000
        ));
        index.push(format!(
            "VNINDEX|{}|1250.25|-3.5|-0.28|{i}|1000000000||",
            T0 + i * 1000
        ));
    }
    csv.reject(
        format!("VNINDEX,{T0},0,0,0,0,0"),
        "invalid_value",
        &mut rejected,
    );
    write_plain(&dir.join(csv.name), &csv.text);

    // Futures: the database refuses a basis of 1000 or more (a constraint
    // the test adds), which no field rule knows.
    let mut csv = Csv::new(
        "deriv.csv",
        "contract,timestamp,price,basis,open_interest,volume",
    );
    let mut deriv = Vec::new();
    for i in 0..10i64 {
        if i == 4 {
            csv.reject(
                format!("VN30F2412,{},1300.5,5000,{i},{i}", at(i)),
                "database_rejected",
                &mut rejected,
            );
        } else {
            csv.push(format!("VN30F2412,{},1300.5,{i},{i},{i}", at(i)));
            deriv.push(format!("VN30F2412|{}|1300.5|{i}|{i}|{i}|", T0 + i * 1000));
        }
    }
    write_plain(&dir.join(csv.name), &csv.text);

    Files {
        rejected,
        ticks,
        candles,
        foreign,
        index,
        deriv,
    }
}

/// The line of the file's first reject with `reason`.
fn line_of(files: &Files, file: &str, reason: &str) -> u64 {
    files
        .rejected
        .iter()
        .find(|(f, _, r)| f == file && *r == reason)
        .map(|(_, line, _)| *line)
        .unwrap()
}

/// Every table as text, plus each row's `xmin` (which changes when a row is rewritten).
async fn tables(pool: &PgPool) -> Vec<Vec<String>> {
    let mut all = vec![
        dump(pool, "tick_data", &format!("symbol, {MS}, price, volume, side, seq"), "symbol, timestamp, seq").await,
        dump(pool, "candles_1m", &format!("symbol, {MS}, open, high, low, close, volume, coalesce(value::text, ''), coalesce(stream_seq::text, '')"), "symbol, timestamp").await,
        dump(pool, "foreign_flow", &format!("symbol, {MS}, buy_volume, sell_volume, buy_value, sell_value, coalesce(room::text, ''), coalesce(stream_seq::text, '')"), "symbol, timestamp").await,
        dump(pool, "index_snapshots", &format!("index_name, {MS}, value, change, change_pct, volume, traded_value, coalesce(advances::text, ''), coalesce(stream_seq::text, '')"), "index_name, timestamp").await,
        dump(pool, "derivatives", &format!("contract, {MS}, price, basis, open_interest, volume, coalesce(stream_seq::text, '')"), "contract, timestamp").await,
    ];
    for table in [
        "tick_data",
        "candles_1m",
        "foreign_flow",
        "index_snapshots",
        "derivatives",
    ] {
        all.push(dump(pool, table, "xmin::text", "xmin::text").await);
    }
    all
}

#[tokio::test(flavor = "multi_thread")]
async fn csv_files_of_every_type_land_exactly_rejects_are_reported_and_a_rerun_changes_nothing() {
    let db = TestDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let files = write_files(dir.path());
    let migrate = tokio::task::block_in_place(|| {
        Command::new(env!("CARGO_BIN_EXE_tickvault"))
            .arg("migrate")
            .env("DATABASE_URL", &db.url)
            .output()
            .unwrap()
    });
    assert!(migrate.status.success(), "{migrate:?}");
    let pool = db.pool().await;
    sqlx::query("ALTER TABLE derivatives ADD CONSTRAINT basis_cap CHECK (basis < 1000)")
        .execute(&pool)
        .await
        .unwrap();

    // Small batches: duplicates and the re-published candle land in other
    // batches than their first version, so the staging merge decides.
    let args = [
        "ticks.csv.gz",
        "candles.csv",
        "foreign.data",
        "index.csv",
        "deriv.csv",
        "--rejects",
        "rejects.csv",
        "--batch-rows",
        "7",
    ];
    let (output, stdout, stderr) = import(&db, dir.path(), &args);
    assert!(output.status.success(), "{stdout}\n{stderr}");

    let stored = tables(&pool).await;
    assert_eq!(stored[0], files.ticks, "ticks");
    assert_eq!(
        stored[1], files.candles,
        "candles: the later line wins, no stream_seq"
    );
    assert_eq!(stored[2], files.foreign, "foreign");
    assert_eq!(stored[3], files.index, "index");
    assert_eq!(stored[4], files.deriv, "derivatives");

    // Each reject on stderr by file, line and reason, with the field named.
    for (file, line, reason) in &files.rejected {
        let prefix = format!("{file}:{line}: {reason}: ");
        assert!(stderr.contains(&prefix), "{prefix} missing in:\n{stderr}");
    }
    let price = line_of(&files, "ticks.csv.gz", "invalid_value");
    let shape = line_of(&files, "ticks.csv.gz", "invalid_shape");
    for expected in [
        format!("ticks.csv.gz:{price}: invalid_value: field `price` must be > 0"),
        format!("ticks.csv.gz:{shape}: invalid_shape: the line has 3 fields, the header 6"),
        "deriv.csv:6: database_rejected: PostgreSQL refused the row (SQLSTATE 23514)".into(),
    ] {
        assert!(
            stderr.contains(&expected),
            "{expected} missing in:\n{stderr}"
        );
    }

    // The rejects file: the same lines, with the type and the record.
    let mut reader = csv::Reader::from_path(dir.path().join("rejects.csv")).unwrap();
    assert_eq!(
        reader.headers().unwrap().iter().collect::<Vec<_>>(),
        ["file", "line", "type", "reason", "detail", "record"]
    );
    let listed: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    let mut keys: Vec<(String, u64, String)> = listed
        .iter()
        .map(|r| (r[0].to_string(), r[1].parse().unwrap(), r[3].to_string()))
        .collect();
    let mut expected: Vec<(String, u64, String)> = files
        .rejected
        .iter()
        .map(|(f, l, r)| (f.clone(), *l, r.to_string()))
        .collect();
    keys.sort();
    expected.sort();
    assert_eq!(keys, expected);
    let bad_price = listed.iter().find(|r| r[1] == price.to_string()).unwrap();
    assert_eq!(&bad_price[2], "tick");
    assert_eq!(&bad_price[4], "field `price` must be > 0");
    assert_eq!(&bad_price[5], format!("21,FPT,{},buy,100,-5", at(21)));
    let refused = listed.iter().find(|r| &r[0] == "deriv.csv").unwrap();
    assert_eq!(
        &refused[5],
        "VN30F2412,2026-11-26T02:00:04Z,1300.5,5000,4,4"
    );

    // The summary: per file, then the whole import.
    for expected in [
        "ticks.csv.gz: tick, 1005 lines read, 1001 rows accepted (1000 new or changed), 4 rejected",
        "candles.csv: candle, 62 lines read, 61 rows accepted (60 new or changed), 1 rejected",
        "foreign.data: foreign, 21 lines read, 20 rows accepted (20 new or changed), 1 rejected",
        "index.csv: index, 11 lines read, 10 rows accepted (10 new or changed), 1 rejected",
        "deriv.csv: deriv, 10 lines read, 9 rows accepted (9 new or changed), 1 rejected",
        "imported 5 files in",
        "1109 lines read, 1101 rows accepted (1099 new or changed), 8 rejected",
        "8 lines rejected (listed in rejects.csv)",
    ] {
        assert!(
            stdout.contains(expected),
            "{expected} missing in:\n{stdout}"
        );
    }

    // The same import again: nothing new, nothing rewritten.
    let (output, stdout, stderr) = import(&db, dir.path(), &args);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("1109 lines read, 1101 rows accepted (0 new or changed), 8 rejected"),
        "{stdout}"
    );
    assert_eq!(
        tables(&pool).await,
        stored,
        "a re-run changes no row, not even its version"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_header_is_an_error_naming_the_expected_columns_and_nothing_is_written() {
    let db = TestDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    write_plain(
        &dir.path().join("good.csv"),
        &format!(
            "symbol,timestamp,price,volume,side,seq\nFPT,{},1,1,buy,1\n",
            at(0)
        ),
    );
    write_plain(
        &dir.path().join("bad.csv"),
        &format!(
            "symbol,timestamp,prize,volume,side,seq\nFPT,{},1,1,buy,1\n",
            at(0)
        ),
    );

    let (output, stdout, stderr) =
        import(&db, dir.path(), &["good.csv", "bad.csv", "--type", "tick"]);
    assert!(!output.status.success(), "{stdout}");
    assert!(
        stderr.contains("bad.csv: column `prize` is not a tick field; expected the tick columns symbol,timestamp,price,volume,side,seq"),
        "{stderr}"
    );
    // Recognising the type: every type's columns are named.
    let (output, _, stderr) = import(&db, dir.path(), &["bad.csv"]);
    assert!(!output.status.success());
    assert!(stderr.contains("the header `symbol,timestamp,prize,volume,side,seq` is not the columns of one record type"), "{stderr}");
    assert!(
        stderr.contains(
            "the candle columns symbol,timestamp,open,high,low,close,volume,value (optional)"
        ),
        "{stderr}"
    );

    // Headers are checked before the database is touched: the good file waited.
    let pool = db.pool().await;
    let tables: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE tablename = 'tick_data'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(tables, 0, "nothing was migrated or written");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_later_line_wins_across_batches_and_a_rerun_ends_in_the_same_rows() {
    let db = TestDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let mut csv = Csv::new("bars.csv", "symbol,timestamp,open,high,low,close,volume");
    csv.push(format!("FPT,{},10,12,9,11,1", at(0)));
    for m in 1..4 {
        csv.push(format!("FPT,{},10,12,9,11,1", at(m * 60)));
    }
    csv.push(format!("FPT,{},10,12,9,11.75,2", at(0)));
    write_plain(&dir.path().join(csv.name), &csv.text);
    let args = ["bars.csv", "--batch-rows", "2"];
    let columns = format!("{MS}, close, volume, coalesce(stream_seq::text, '-')");

    let (output, stdout, stderr) = import(&db, dir.path(), &args);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("5 rows accepted (5 new or changed)"),
        "{stdout}"
    );
    let pool = db.pool().await;
    let first = dump(&pool, "candles_1m", &columns, "timestamp").await;
    assert_eq!(first.len(), 4);
    assert_eq!(
        first[0],
        format!("{T0}|11.75|2|-"),
        "the later line wins, without a stream sequence"
    );

    // Run again: the earlier version is written, then the later one; the
    // same rows in the end.
    let (output, stdout, stderr) = import(&db, dir.path(), &args);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("5 rows accepted (2 new or changed)"),
        "{stdout}"
    );
    assert_eq!(
        dump(&pool, "candles_1m", &columns, "timestamp").await,
        first
    );
}

/// A newer version that differs only in the sign of a zero is a change:
/// doubles are compared by their bits, not by `=` (where 0 = -0).
#[tokio::test(flavor = "multi_thread")]
async fn a_version_differing_only_in_the_sign_of_zero_replaces_the_stored_one() {
    let db = TestDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let header = "symbol,timestamp,open,high,low,close,volume,value";
    let mut positive = Csv::new("zero.csv", header);
    positive.push(format!("FPT,{},10,12,9,11,1,0", at(0)));
    write_plain(&dir.path().join(positive.name), &positive.text);
    let (output, stdout, stderr) = import(&db, dir.path(), &["zero.csv"]);
    assert!(output.status.success(), "{stdout}\n{stderr}");

    let mut negative = Csv::new("negative-zero.csv", header);
    negative.push(format!("FPT,{},10,12,9,11,1,-0", at(0)));
    write_plain(&dir.path().join(negative.name), &negative.text);
    let (output, stdout, stderr) = import(&db, dir.path(), &["negative-zero.csv"]);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("1 row accepted (1 new or changed)"),
        "{stdout}"
    );
    let pool = db.pool().await;
    assert_eq!(
        dump(&pool, "candles_1m", "value::text", "timestamp").await,
        vec!["-0".to_string()]
    );
}
