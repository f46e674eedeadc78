//! `tickvault import`: back-fill from CSV files, through the worker's own
//! validation ([`RecordSpec::parse_text_record`]) and COPY sink
//! ([`Writer::write_rows`]), so keys, conflict rules, retries and bad-row
//! isolation are those of live ingest.
//!
//! Each file holds one record type, with the contract's field names as its
//! header (any order; optional columns may be left out). A file is gzip when
//! it starts with gzip's magic bytes or its name ends in `.gz`. Every
//! header is checked before anything is written. A reader thread parses and
//! validates the next batch while the current one is written; batches of a
//! file are written in order, so a later line wins over an earlier one with
//! the same key (ticks: the first stays).

use std::fs::File;
use std::io::{self, IsTerminal, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flate2::read::MultiGzDecoder;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use tickvault::db::Database;
use tickvault::ingest::delivery::Lifecycle;
use tickvault::ingest::sink::Writer;
use tickvault::ops::metrics::Metrics;
use tickvault::records::{
    format_timestamp, RecordSpec, RecordType, Reject, RejectReason, Rows, Value,
};
use tickvault::{ops, Config};

use super::dlq::parse_type;

/// Rejected lines printed on stderr; the rejects file keeps them all.
const REJECTS_SHOWN: u64 = 100;
/// How often the progress is printed when stderr is not a terminal.
const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Batches parsed ahead of the one being written.
const BATCHES_AHEAD: usize = 2;

#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// CSV files (gzip accepted), each of one record type, the contract's
    /// field names as the header; imported in the order given.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// The record type of every file (tick, candle, foreign, index, deriv);
    /// by default recognised from each file's header.
    #[arg(long = "type", value_parser = parse_type)]
    pub record_type: Option<RecordType>,
    /// Also write every rejected line to this CSV file
    /// (file, line, type, reason, detail, record).
    #[arg(long, value_name = "PATH")]
    pub rejects: Option<PathBuf>,
    /// Rows per COPY transaction.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub batch_rows: u64,
}

/// Why an import could not go on.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read {path}: {source}; check the path and its permissions")]
    Open { path: String, source: io::Error },
    #[error("{path}: {problem}; expected {expected}")]
    Header {
        path: String,
        problem: String,
        expected: String,
    },
    #[error("{path}, line {line}: {message}; is the file complete (not cut short, not corrupt)?")]
    Read {
        path: String,
        line: u64,
        message: String,
    },
    #[error("cannot write the rejects file {path}: {message}; check that its directory exists and is writable")]
    Rejects { path: String, message: String },
    #[error("interrupted in {path}: its lines up to line {line} are stored; run the same import again to finish (what is stored already stays as it is)")]
    Interrupted { path: String, line: u64 },
}

pub async fn run(config: &Config, args: ImportArgs) -> anyhow::Result<ExitCode> {
    let mut files = Vec::with_capacity(args.files.len());
    for path in &args.files {
        let (_, header) = open_csv(path, Arc::default())?;
        let record_type = match args.record_type {
            Some(t) => t,
            None => recognise(path, &header)?,
        };
        let columns = columns(path, record_type.spec(), &header)?;
        files.push(Input {
            path: path.clone(),
            record_type,
            columns,
            width: header.len(),
        });
    }
    let mut rejects = Rejects::create(args.rejects.as_deref())?;

    let db = Database::connect_lazy(&config.database)?;
    db.health_check().await?;
    if config.database.migrate_on_start {
        db.migrate().await?;
    } else {
        db.verify_storage().await?;
    }

    let stop = CancellationToken::new();
    let on_signal = stop.clone();
    tokio::spawn(async move {
        ops::shutdown::signal().await;
        on_signal.cancel();
    });
    let total_bytes = args
        .files
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    let progress = Progress::start(total_bytes);
    rejects.bar = progress.bar.clone();
    let metrics = Arc::new(Metrics::new());
    let mut totals = Tally::default();
    let mut interrupted = None;
    for input in files {
        let writer = Writer::new(input.record_type, db.clone(), metrics.clone(), stop.clone());
        // Each write is bounded as the worker bounds it.
        let timeout = Lifecycle::new(input.record_type, metrics.clone(), config.ingest.ack_wait())
            .write_timeout();
        let file = import_file(
            &input,
            (&writer, timeout),
            args.batch_rows as usize,
            &progress,
            &mut rejects,
            &stop,
        )
        .await?;
        progress.println(&format!(
            "{}: {}, {}",
            input.path.display(),
            input.record_type.name(),
            file.tally.describe()
        ));
        totals.add(&file.tally);
        if let Some(line) = file.interrupted_after {
            interrupted = Some(ImportError::Interrupted {
                path: input.path.display().to_string(),
                line,
            });
            break;
        }
    }
    progress.finish();
    rejects.finish()?;
    let elapsed = progress.started.elapsed();
    println!(
        "imported {} in {:.1} s ({:.0} rows/s): {}",
        plural(args.files.len() as u64, "file"),
        elapsed.as_secs_f64(),
        totals.accepted as f64 / elapsed.as_secs_f64().max(1e-9),
        totals.describe()
    );
    if totals.rejected > 0 {
        let kept = match &args.rejects {
            Some(path) => format!("listed in {}", path.display()),
            None => "--rejects PATH keeps them in a file".into(),
        };
        println!("{} rejected ({kept})", plural(totals.rejected, "line"));
    }
    match interrupted {
        Some(e) => Err(e.into()),
        None => Ok(ExitCode::SUCCESS),
    }
}

/// A file checked and ready to import.
#[derive(Clone)]
struct Input {
    path: PathBuf,
    record_type: RecordType,
    /// For each of the type's fields, its position in the file's header.
    columns: Vec<Option<usize>>,
    /// Fields per line, as in the header.
    width: usize,
}

/// What an import did, for one file or all of them.
#[derive(Debug, Default)]
struct Tally {
    /// Data lines read.
    lines: u64,
    /// Valid rows PostgreSQL took: stored now, by this import or before.
    accepted: u64,
    /// Rows that were new or changed a stored row.
    changed: u64,
    rejected: u64,
}

impl Tally {
    fn add(&mut self, other: &Tally) {
        self.lines += other.lines;
        self.accepted += other.accepted;
        self.changed += other.changed;
        self.rejected += other.rejected;
    }

    fn describe(&self) -> String {
        format!(
            "{} read, {} accepted ({} new or changed), {} rejected",
            plural(self.lines, "line"),
            plural(self.accepted, "row"),
            self.changed,
            self.rejected
        )
    }
}

fn plural(n: u64, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// One file's import.
struct FileImport {
    tally: Tally,
    /// Set when the import stopped early: the last line whose batch was written.
    interrupted_after: Option<u64>,
}

/// Valid rows parsed from a run of lines, with the lines rejected among them.
#[derive(Default)]
struct Batch {
    rows: Vec<Vec<Value>>,
    /// Each row's line number.
    lines: Vec<u64>,
    rejected: Vec<RejectedLine>,
    /// The line of the batch's last record (0: none).
    last_line: u64,
}

struct RejectedLine {
    line: u64,
    reject: Reject,
    /// The line's fields, re-joined as CSV.
    record: String,
}

async fn import_file(
    input: &Input,
    (writer, timeout): (&Writer, Duration),
    batch_rows: usize,
    progress: &Progress,
    rejects: &mut Rejects,
    stop: &CancellationToken,
) -> Result<FileImport, ImportError> {
    let (batches, mut received) = mpsc::channel::<Batch>(BATCHES_AHEAD);
    let reader = {
        let input = input.clone();
        let read_bytes = progress.read_bytes.clone();
        let stop = stop.clone();
        tokio::task::spawn_blocking(move || {
            let (reader, _) = open_csv(&input.path, read_bytes)?;
            read_batches(&input, reader, batch_rows, &batches, &stop)
        })
    };
    let path = input.path.display().to_string();
    let type_name = input.record_type.name();
    let mut tally = Tally::default();
    let mut interrupted_after = None;
    let mut last_written = 0;
    while let Some(batch) = received.recv().await {
        for rejected in &batch.rejected {
            rejects.add(&path, type_name, rejected)?;
        }
        tally.rejected += batch.rejected.len() as u64;
        tally.lines += batch.rejected.len() as u64;
        if !batch.rows.is_empty() {
            let rows = Rows::from_values(input.record_type.spec(), &batch.rows);
            let written = writer.write_rows(&rows, timeout).await;
            if written.gave_up {
                interrupted_after = Some(last_written);
                break;
            }
            let refused = written.refused.len() as u64;
            for (index, reject) in written.refused {
                let record = csv_line(batch.rows[index].iter().map(cell_text));
                let line = batch.lines[index];
                rejects.add(
                    &path,
                    type_name,
                    &RejectedLine {
                        line,
                        reject,
                        record,
                    },
                )?;
            }
            let accepted = batch.rows.len() as u64 - refused;
            tally.rejected += refused;
            tally.lines += batch.rows.len() as u64;
            tally.accepted += accepted;
            tally.changed += written.changed;
            progress.stored(accepted);
        }
        last_written = last_written.max(batch.last_line);
    }
    // Unblocks the reader when the import stopped early.
    drop(received);
    let read = reader.await.map_err(|e| ImportError::Read {
        path: path.clone(),
        line: last_written,
        message: format!("the reader failed: {e}"),
    })?;
    match read {
        Ok(()) => {}
        // A stop cuts reading short; that is not the file's fault.
        Err(_) if interrupted_after.is_some() => {}
        Err(e) => return Err(e),
    }
    if interrupted_after.is_none() && stop.is_cancelled() {
        interrupted_after = Some(last_written);
    }
    Ok(FileImport {
        tally,
        interrupted_after,
    })
}

/// Parses and validates the file's lines into batches of `batch_rows`
/// valid rows, until the end, a stop, or the writer hanging up.
fn read_batches(
    input: &Input,
    mut reader: CsvReader,
    batch_rows: usize,
    batches: &mpsc::Sender<Batch>,
    stop: &CancellationToken,
) -> Result<(), ImportError> {
    let (spec, columns, width) = (input.record_type.spec(), &input.columns, input.width);
    let mut record = csv::StringRecord::new();
    let mut batch = Batch::default();
    loop {
        let more = match reader.read_record(&mut record) {
            Ok(more) => more,
            Err(e) => match e.kind() {
                csv::ErrorKind::Utf8 { pos, err } => {
                    let line = pos.as_ref().map_or(0, |p| p.line());
                    batch.rejected.push(RejectedLine {
                        line,
                        reject: Reject::new(
                            RejectReason::InvalidValue,
                            format!("field {} is not UTF-8 text", err.field() + 1),
                        ),
                        record: String::new(),
                    });
                    batch.last_line = line;
                    continue;
                }
                _ => {
                    return Err(ImportError::Read {
                        path: input.path.display().to_string(),
                        line: e.position().map_or(batch.last_line, |p| p.line()),
                        message: e.to_string(),
                    })
                }
            },
        };
        if more {
            let line = record.position().map_or(0, |p| p.line());
            batch.last_line = line;
            let parsed = if record.len() == width {
                spec.parse_text_record(|i| columns[i].and_then(|c| record.get(c)))
            } else {
                Err(Reject::new(
                    RejectReason::InvalidShape,
                    format!("the line has {} fields, the header {width}", record.len()),
                ))
            };
            match parsed {
                Ok(row) => {
                    batch.rows.push(row);
                    batch.lines.push(line);
                }
                Err(reject) => batch.rejected.push(RejectedLine {
                    line,
                    reject,
                    record: csv_line(record.iter().map(str::to_string)),
                }),
            }
        }
        let full = batch.rows.len() >= batch_rows || batch.rejected.len() >= batch_rows;
        if full || !more {
            if stop.is_cancelled() {
                return Ok(());
            }
            if batches.blocking_send(std::mem::take(&mut batch)).is_err() {
                return Ok(());
            }
        }
        if !more {
            return Ok(());
        }
    }
}

/// A CSV reader over a file, gunzipped or not.
type CsvReader = csv::Reader<Box<dyn Read + Send>>;

/// Opens a CSV file, gunzipping it when it starts with gzip's magic bytes
/// or is named `*.gz`, and reads its header (names trimmed). Bytes read
/// from disk are added to `read_bytes`.
fn open_csv(
    path: &Path,
    read_bytes: Arc<AtomicU64>,
) -> Result<(CsvReader, Vec<String>), ImportError> {
    let name = path.display().to_string();
    let open_error = |source| ImportError::Open {
        path: name.clone(),
        source,
    };
    let mut file = File::open(path).map_err(open_error)?;
    let mut magic = [0u8; 2];
    let mut got = 0;
    while got < magic.len() {
        match file.read(&mut magic[got..]).map_err(open_error)? {
            0 => break,
            n => got += n,
        }
    }
    file.seek(SeekFrom::Start(0)).map_err(open_error)?;
    let gzip = magic[..got] == [0x1f, 0x8b] || path.extension().is_some_and(|e| e == "gz");
    let counted = Counted {
        inner: file,
        read_bytes,
    };
    let input: Box<dyn Read + Send> = if gzip {
        Box::new(MultiGzDecoder::new(counted))
    } else {
        Box::new(counted)
    };
    let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(input);
    let header = reader.headers().map_err(|e| ImportError::Read {
        path: name.clone(),
        line: 1,
        message: e.to_string(),
    })?;
    let header: Vec<String> = header
        .iter()
        .map(|h| h.trim_start_matches('\u{feff}').trim().to_string())
        .collect();
    if header.iter().all(|h| h.is_empty()) {
        return Err(ImportError::Header {
            path: name,
            problem: "the file has no header line".into(),
            expected:
                "a first line naming the columns, e.g. symbol,timestamp,price,volume,side,seq"
                    .into(),
        });
    }
    Ok((reader, header))
}

/// Counts the bytes read from disk, for the progress.
struct Counted<R> {
    inner: R,
    read_bytes: Arc<AtomicU64>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read_bytes.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// A type's columns as its header would list them, optional ones marked.
fn expected_columns(spec: &RecordSpec) -> String {
    let names: Vec<String> = spec
        .fields
        .iter()
        .map(|f| {
            if f.required {
                f.name.to_string()
            } else {
                format!("{} (optional)", f.name)
            }
        })
        .collect();
    format!(
        "the {} columns {}",
        spec.record_type.name(),
        names.join(",")
    )
}

/// The one record type whose columns the header has: every required
/// field, and no column that is not a field.
fn recognise(path: &Path, header: &[String]) -> Result<RecordType, ImportError> {
    let fits = |t: &RecordType| {
        let spec = t.spec();
        header.iter().all(|h| spec.column_names().any(|c| c == h))
            && spec
                .fields
                .iter()
                .all(|f| !f.required || header.iter().any(|h| h == f.name))
    };
    let fitting: Vec<RecordType> = RecordType::ALL.into_iter().filter(fits).collect();
    match fitting[..] {
        [one] => Ok(one),
        _ => Err(ImportError::Header {
            path: path.display().to_string(),
            problem: format!(
                "the header `{}` is not the columns of one record type",
                header.join(",")
            ),
            expected: format!(
                "one of: {} (or give --type to be told what is missing)",
                RecordType::ALL
                    .map(|t| expected_columns(t.spec()))
                    .join("; ")
            ),
        }),
    }
}

/// For each of the type's fields, its position in the header; an unknown,
/// repeated or missing required column is an error naming the columns.
fn columns(
    path: &Path,
    spec: &RecordSpec,
    header: &[String],
) -> Result<Vec<Option<usize>>, ImportError> {
    let wrong = |problem: String| ImportError::Header {
        path: path.display().to_string(),
        problem,
        expected: expected_columns(spec),
    };
    for (i, name) in header.iter().enumerate() {
        if !spec.column_names().any(|c| c == name) {
            return Err(wrong(format!(
                "column `{name}` is not a {} field",
                spec.record_type.name()
            )));
        }
        if header[..i].contains(name) {
            return Err(wrong(format!("column `{name}` appears twice")));
        }
    }
    spec.fields
        .iter()
        .map(|f| match header.iter().position(|h| h == f.name) {
            None if f.required => Err(wrong(format!("the header has no column `{}`", f.name))),
            position => Ok(position),
        })
        .collect()
}

/// A checked value as a CSV cell, timestamps in RFC 3339 UTC.
fn cell_text(value: &Value) -> String {
    match value {
        Value::Text(text) => text.clone(),
        Value::Timestamp(ts) => format_timestamp(ts),
        Value::Float(v) => v.to_string(),
        Value::Int(v) => v.to_string(),
        Value::Null => String::new(),
    }
}

/// Fields joined as one CSV line (quoted where needed), without the newline.
fn csv_line(fields: impl IntoIterator<Item = String>) -> String {
    let mut writer = csv::WriterBuilder::new()
        .terminator(csv::Terminator::Any(b'\n'))
        .from_writer(Vec::new());
    let fields: Vec<String> = fields.into_iter().collect();
    // Writing to memory cannot fail.
    let _ = writer.write_record(&fields);
    let bytes = writer.into_inner().unwrap_or_default();
    String::from_utf8_lossy(&bytes)
        .trim_end_matches('\n')
        .to_string()
}

/// Where rejected lines are reported: stderr (the first
/// [`REJECTS_SHOWN`]) and the `--rejects` file (all of them).
struct Rejects {
    file: Option<(PathBuf, csv::Writer<File>)>,
    shown: u64,
    bar: Option<ProgressBar>,
}

impl Rejects {
    fn create(path: Option<&Path>) -> Result<Rejects, ImportError> {
        let file = match path {
            None => None,
            Some(path) => {
                let mut writer =
                    csv::Writer::from_path(path).map_err(|e| rejects_error(path, e.to_string()))?;
                writer
                    .write_record(["file", "line", "type", "reason", "detail", "record"])
                    .map_err(|e| rejects_error(path, e.to_string()))?;
                Some((path.to_path_buf(), writer))
            }
        };
        Ok(Rejects {
            file,
            shown: 0,
            bar: None,
        })
    }

    fn add(&mut self, path: &str, type_name: &str, line: &RejectedLine) -> Result<(), ImportError> {
        if self.shown < REJECTS_SHOWN {
            self.print(&format!(
                "{path}:{}: {}: {}",
                line.line,
                line.reject.reason.as_str(),
                line.reject.detail
            ));
        } else if self.shown == REJECTS_SHOWN {
            let rest = if self.file.is_some() {
                "the rejects file lists them all"
            } else {
                "--rejects PATH keeps them all in a file"
            };
            self.print(&format!("further rejected lines are not shown; {rest}"));
        }
        self.shown += 1;
        if let Some((file, writer)) = &mut self.file {
            writer
                .write_record([
                    path,
                    &line.line.to_string(),
                    type_name,
                    line.reject.reason.as_str(),
                    &line.reject.detail,
                    &line.record,
                ])
                .map_err(|e| rejects_error(file, e.to_string()))?;
        }
        Ok(())
    }

    fn print(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }

    fn finish(self) -> Result<(), ImportError> {
        if let Some((path, mut writer)) = self.file {
            writer
                .flush()
                .map_err(|e| rejects_error(&path, e.to_string()))?;
        }
        Ok(())
    }
}

fn rejects_error(path: &Path, message: String) -> ImportError {
    ImportError::Rejects {
        path: path.display().to_string(),
        message,
    }
}

/// Rows stored, rows/s and time left: a bar on a terminal, a plain line
/// every [`PLAIN_PROGRESS_EVERY`] otherwise.
struct Progress {
    started: Instant,
    total_bytes: u64,
    read_bytes: Arc<AtomicU64>,
    stored: Arc<AtomicU64>,
    bar: Option<ProgressBar>,
    ticker: tokio::task::JoinHandle<()>,
}

impl Progress {
    fn start(total_bytes: u64) -> Progress {
        let bar = io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total_bytes.max(1));
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] [{wide_bar}] {percent:>3}% {msg}, ETA {eta}",
                )
                .expect("a valid template"),
            );
            bar
        });
        let read_bytes = Arc::new(AtomicU64::new(0));
        let stored = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let ticker = {
            let (bar, read_bytes, stored) = (bar.clone(), read_bytes.clone(), stored.clone());
            tokio::spawn(async move {
                let every = if bar.is_some() {
                    Duration::from_millis(200)
                } else {
                    PLAIN_PROGRESS_EVERY
                };
                let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                loop {
                    tick.tick().await;
                    let read = read_bytes.load(Ordering::Relaxed);
                    let rows = stored.load(Ordering::Relaxed);
                    let elapsed = started.elapsed().as_secs_f64();
                    let rate = rows as f64 / elapsed.max(1e-9);
                    match &bar {
                        Some(bar) => {
                            bar.set_position(read);
                            bar.set_message(format!("{rows} rows, {rate:.0} rows/s"));
                        }
                        None => {
                            let share = read as f64 / total_bytes.max(1) as f64;
                            let eta = if share > 0.0 {
                                format!("{:.0} s", elapsed * (1.0 - share) / share)
                            } else {
                                "unknown".into()
                            };
                            eprintln!(
                                "import: {rows} rows stored, {rate:.0} rows/s, {:.0}% of the input read, ETA {eta}",
                                share * 100.0
                            );
                        }
                    }
                }
            })
        };
        Progress {
            started,
            total_bytes,
            read_bytes,
            stored,
            bar,
            ticker,
        }
    }

    fn stored(&self, rows: u64) {
        self.stored.fetch_add(rows, Ordering::Relaxed);
    }

    fn println(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => println!("{text}"),
        }
    }

    fn finish(&self) {
        self.ticker.abort();
        if let Some(bar) = &self.bar {
            bar.set_position(self.total_bytes);
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(names: &str) -> Vec<String> {
        names.split(',').map(str::to_string).collect()
    }

    #[test]
    fn a_header_names_its_type_or_says_what_is_expected() {
        let path = Path::new("x.csv");
        for t in RecordType::ALL {
            let all: Vec<String> = t.spec().column_names().map(str::to_string).collect();
            assert_eq!(recognise(path, &all).unwrap(), t);
        }
        let reordered = header("seq,side,volume,price,timestamp,symbol");
        assert_eq!(recognise(path, &reordered).unwrap(), RecordType::Tick);
        let columns = columns(path, RecordType::Tick.spec(), &reordered).unwrap();
        assert_eq!(columns, [5, 4, 3, 2, 1, 0].map(Some));
        let optional_left_out = header("symbol,timestamp,open,high,low,close,volume");
        let candle = super::columns(path, RecordType::Candle.spec(), &optional_left_out).unwrap();
        assert_eq!(candle[7], None);

        let unknown = recognise(path, &header("symbol,timestamp,prize")).unwrap_err();
        let text = unknown.to_string();
        assert!(
            text.contains("symbol,timestamp,price,volume,side,seq"),
            "{text}"
        );
        assert!(text.contains("index_name"), "{text}");
        for (names, problem) in [
            ("symbol,timestamp,price,volume,side", "no column `seq`"),
            (
                "symbol,timestamp,price,volume,side,seq,venue",
                "`venue` is not a tick field",
            ),
            (
                "symbol,timestamp,price,price,volume,side,seq",
                "`price` appears twice",
            ),
        ] {
            let text = super::columns(path, RecordType::Tick.spec(), &header(names))
                .unwrap_err()
                .to_string();
            assert!(text.contains(problem), "{text}");
            assert!(
                text.contains("expected the tick columns symbol,timestamp,price,volume,side,seq"),
                "{text}"
            );
        }
    }

    #[test]
    fn csv_lines_quote_what_needs_it() {
        let line = csv_line(["a".to_string(), "b,c".into(), "d\"e".into(), String::new()]);
        assert_eq!(line, "a,\"b,c\",\"d\"\"e\",");
        assert_eq!(cell_text(&Value::Float(1.5)), "1.5");
        assert_eq!(cell_text(&Value::Float(5000.0)), "5000");
        assert_eq!(cell_text(&Value::Null), "");
        assert_eq!(cell_text(&Value::Text("FPT".into())), "FPT");
    }
}
