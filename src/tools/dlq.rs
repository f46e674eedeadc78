//! `tickvault dlq`: the dead letters the worker keeps in JetStream (the
//! stream that captures `<prefix>.dlq.>`: `<stream>_DLQ`, or the feed stream
//! when it covers those subjects).
//!
//! - `stats`: counts per type and reason, oldest and newest.
//! - `show`: the most recent dead letters with reason, detail, original
//!   subject and payload.
//! - `replay`: re-publishes the selected dead letters through JetStream to
//!   their original subjects, waits until the worker has processed them
//!   (its durable consumers' ack floors pass them), reports what went back
//!   and what was dead-lettered again, then removes the replayed dead letters
//!   (a failure again is a new dead letter), so replaying the same selection
//!   twice sends nothing twice.
//!
//! Every command reads the stream with an ordered (ephemeral, ack-less)
//! consumer and stops at the stream's last sequence as of its start, so a
//! dead letter a replay produces is never read, let alone replayed, by the
//! same command.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::Duration;

use async_nats::jetstream::consumer::pull::{Ordered, OrderedConfig};
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::{self, stream::Stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt as _;
use serde_json::{json, Value as Json};
use tokio::time::Instant;

use tickvault::config::Config;
use tickvault::ingest::dead_letter::{DETAIL_HEADER, ORIGINAL_SUBJECT_HEADER, REASON_HEADER};
use tickvault::ingest::source::durable_name;
use tickvault::records::{RecordType, RejectReason};

use super::render::{Column, ColumnKind, Format, RowWriter};
use super::time::{TimeArg, Tz};

/// Set on every replayed message: `<dlq stream>:<sequence>` of its dead letter.
pub const REPLAY_OF_HEADER: &str = "Tickvault-Replay-Of";
/// A scan that receives nothing for this long ends (the stream went away).
const IDLE_BOUND: Duration = Duration::from_secs(10);
/// Replays awaiting their JetStream ack at once.
const ACK_WINDOW: usize = 256;

/// Inspect and replay dead letters.
#[derive(Debug, clap::Args)]
pub struct DlqArgs {
    #[command(subcommand)]
    pub command: DlqCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum DlqCommand {
    /// Counts per type and reason, with the oldest and newest dead letter.
    Stats {
        #[command(flatten)]
        filter: Filter,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
        /// Zone of the printed timestamps: market (UTC+7) or utc.
        #[arg(long, value_enum, default_value = "market")]
        tz: Tz,
    },
    /// The most recent dead letters (oldest first): reason, detail, original subject, payload.
    Show {
        #[command(flatten)]
        filter: Filter,
        /// How many of the most recent matching dead letters.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Print whole payloads (default: the first 300 characters).
        #[arg(long)]
        full: bool,
        /// JSON lines instead of text blocks.
        #[arg(long)]
        json: bool,
        /// Zone of the printed timestamps: market (UTC+7) or utc.
        #[arg(long, value_enum, default_value = "market")]
        tz: Tz,
    },
    /// Re-publish the selected dead letters to their original subjects.
    #[command(
        after_help = "Examples:\n  tickvault dlq replay --type candle --reason database_rejected --dry-run\n  \
tickvault dlq replay --subject 'md.tick.FPT' --since today"
    )]
    Replay {
        #[command(flatten)]
        filter: Filter,
        /// Only say what would be replayed; send and remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Keep the replayed dead letters in the stream (a later replay sends them again).
        #[arg(long)]
        keep: bool,
        /// Seconds to wait for the worker to process the replayed messages.
        #[arg(long, default_value_t = 60)]
        wait: u64,
    },
}

/// Which dead letters a command looks at.
#[derive(Debug, Clone, clap::Args)]
pub struct Filter {
    /// Only this record type (tick, candle, foreign, index, deriv); repeatable.
    #[arg(long = "type", value_parser = parse_type)]
    pub types: Vec<RecordType>,
    /// Only this reject reason (e.g. invalid_value, database_rejected); repeatable.
    #[arg(long = "reason", value_parser = parse_reason)]
    pub reasons: Vec<String>,
    /// Dead-lettered at or after this time: today, yesterday, a day, market time or RFC 3339.
    #[arg(long)]
    pub since: Option<String>,
    /// Dead-lettered before this time (a day is included whole).
    #[arg(long)]
    pub until: Option<String>,
    /// Only dead letters whose original subject matches this NATS pattern (`md.tick.FPT`, `md.*.FPT`, `md.tick.>`).
    #[arg(long)]
    pub subject: Option<String>,
}

pub fn parse_type(name: &str) -> Result<RecordType, String> {
    RecordType::from_name(name.trim())
        .ok_or_else(|| format!("{name:?} is not one of tick, candle, foreign, index, deriv"))
}

fn parse_reason(name: &str) -> Result<String, String> {
    let name = name.trim();
    if RejectReason::ALL.iter().any(|r| r.as_str() == name) {
        Ok(name.to_string())
    } else {
        let known: Vec<&str> = RejectReason::ALL.iter().map(|r| r.as_str()).collect();
        Err(format!(
            "{name:?} is not a reject reason: {}",
            known.join(", ")
        ))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error("--{arg}: {message}")]
    Argument { arg: &'static str, message: String },
    #[error(transparent)]
    Connect(#[from] tickvault::nats::NatsError),
    #[error("no JetStream stream keeps {subject}: the worker creates one in JetStream mode; are ingest.stream and ingest.subject_prefix the same here? ({message})")]
    NoStream { subject: String, message: String },
    #[error("JetStream: {context}: {message}")]
    JetStream { context: String, message: String },
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
    #[error("{0} replayed message(s) were not processed by the worker in time; they stay in the dead-letter stream: is `tickvault run` running? (raise --wait to wait longer)")]
    NotProcessed(u64),
}

fn js_error(context: impl Into<String>) -> impl FnOnce(&dyn std::fmt::Display) -> DlqError {
    let context = context.into();
    move |e| DlqError::JetStream {
        context,
        message: e.to_string(),
    }
}

/// One dead letter as stored.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub sequence: u64,
    pub stored: DateTime<Utc>,
    pub record_type: Option<RecordType>,
    pub reason: String,
    pub detail: String,
    pub original_subject: String,
    pub payload: Bytes,
}

impl DeadLetter {
    fn type_name(&self) -> &'static str {
        self.record_type.map_or("?", RecordType::name)
    }
}

/// The filter with its times resolved.
struct Selection {
    filter: Filter,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
}

impl Selection {
    fn new(filter: Filter) -> Result<Selection, DlqError> {
        let now = Utc::now();
        let time = |text: &Option<String>, arg| {
            text.as_deref()
                .map(|t| TimeArg::parse(t, now))
                .transpose()
                .map_err(|message| DlqError::Argument { arg, message })
        };
        let since = time(&filter.since, "since")?.map(|t| t.start);
        let until = time(&filter.until, "until")?.map(|t| t.end);
        Ok(Selection {
            filter,
            since,
            until,
        })
    }

    fn matches(&self, letter: &DeadLetter) -> bool {
        let f = &self.filter;
        (f.types.is_empty() || letter.record_type.is_some_and(|t| f.types.contains(&t)))
            && (f.reasons.is_empty() || f.reasons.contains(&letter.reason))
            && self.since.is_none_or(|since| letter.stored >= since)
            && self.until.is_none_or(|until| letter.stored < until)
            && f.subject
                .as_deref()
                .is_none_or(|p| subject_matches(p, &letter.original_subject))
    }
}

/// Whether `subject` matches the NATS pattern (`*` one token, `>` the rest).
fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.trim().split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The dead-letter stream and where reading it stops.
struct DeadLetterStream {
    js: jetstream::Context,
    stream: Stream,
    name: String,
    prefix: String,
    /// The stream's last sequence when the command started.
    last: u64,
}

impl DeadLetterStream {
    async fn open(config: &Config) -> Result<DeadLetterStream, DlqError> {
        let client = tickvault::nats::connect(&config.nats, |options| {
            options
                .name("tickvault-dlq")
                .connection_timeout(Duration::from_secs(10))
        })
        .await?;
        let js = jetstream::new(client);
        let prefix = config.ingest.subject_prefix.clone();
        // Any type's dead-letter subject finds the stream that keeps them all.
        let probe = format!("{prefix}.dlq.{}", RecordType::Tick.name());
        let name = js
            .stream_by_subject(probe)
            .await
            .map_err(|e| DlqError::NoStream {
                subject: format!("{prefix}.dlq.>"),
                message: e.to_string(),
            })?;
        let mut stream = js
            .get_stream(&name)
            .await
            .map_err(|e| js_error(format!("stream {name}"))(&e))?;
        let last = stream
            .info()
            .await
            .map_err(|e| js_error(format!("stream {name}"))(&e))?
            .state
            .last_sequence;
        Ok(DeadLetterStream {
            js,
            stream,
            name,
            prefix,
            last,
        })
    }

    /// The dead letters with sequences in `(after, up_to]` that `selection`
    /// accepts, in order, read one at a time.
    async fn scan(&self, selection: &Selection, after: u64, up_to: u64) -> Result<Scan, DlqError> {
        let mut scan = Scan {
            messages: None,
            up_to,
            seen: 0,
            stream: self.name.clone(),
        };
        if up_to <= after {
            return Ok(scan);
        }
        let filter_subject = match selection.filter.types.as_slice() {
            [one] => format!("{}.dlq.{}", self.prefix, one.name()),
            _ => format!("{}.dlq.>", self.prefix),
        };
        let deliver_policy = match selection.since {
            Some(since) if after == 0 => DeliverPolicy::ByStartTime {
                start_time: async_nats::datetime::from_nanos(
                    i128::from(since.timestamp_micros()) * 1000,
                )
                .map_err(|e| js_error("--since")(&e))?,
            },
            _ => DeliverPolicy::ByStartSequence {
                start_sequence: after + 1,
            },
        };
        let consumer = self
            .stream
            .create_consumer(OrderedConfig {
                filter_subject,
                deliver_policy,
                ..Default::default()
            })
            .await
            .map_err(|e| js_error(format!("reading {}", self.name))(&e))?;
        if consumer.cached_info().num_pending > 0 {
            scan.messages = Some(
                consumer
                    .messages()
                    .await
                    .map_err(|e| js_error(format!("reading {}", self.name))(&e))?,
            );
        }
        Ok(scan)
    }
}

/// Dead letters being read; ends at `up_to` or when none are left.
struct Scan {
    messages: Option<Ordered>,
    up_to: u64,
    /// Dead letters read, matching or not.
    seen: u64,
    stream: String,
}

impl Scan {
    async fn next(&mut self, selection: &Selection) -> Result<Option<DeadLetter>, DlqError> {
        loop {
            let Some(messages) = self.messages.as_mut() else {
                return Ok(None);
            };
            let message = match tokio::time::timeout(IDLE_BOUND, messages.next()).await {
                Err(_) | Ok(None) => {
                    self.messages = None;
                    return Ok(None);
                }
                Ok(Some(Err(e))) => return Err(js_error(format!("reading {}", self.stream))(&e)),
                Ok(Some(Ok(message))) => message,
            };
            let info = message
                .info()
                .map_err(|e| js_error("a dead letter's metadata")(&e))?;
            let (sequence, pending) = (info.stream_sequence, info.pending);
            if sequence > self.up_to {
                self.messages = None;
                return Ok(None);
            }
            let last = sequence >= self.up_to || pending == 0;
            let stored = DateTime::from_timestamp_nanos(
                i64::try_from(info.published.unix_timestamp_nanos()).unwrap_or_default(),
            );
            let header = |name: &str| {
                message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(name))
                    .map(|v| v.as_str().to_string())
                    .unwrap_or_default()
            };
            let letter = DeadLetter {
                sequence,
                stored,
                record_type: message
                    .subject
                    .rsplit('.')
                    .next()
                    .and_then(RecordType::from_name),
                reason: header(REASON_HEADER),
                detail: header(DETAIL_HEADER),
                original_subject: header(ORIGINAL_SUBJECT_HEADER),
                payload: message.payload.clone(),
            };
            self.seen += 1;
            if last {
                self.messages = None;
            }
            if selection.matches(&letter) {
                return Ok(Some(letter));
            }
        }
    }
}

pub async fn run(config: &Config, args: DlqArgs) -> Result<(), DlqError> {
    let dlq = DeadLetterStream::open(config).await?;
    match args.command {
        DlqCommand::Stats { filter, format, tz } => {
            stats(&dlq, Selection::new(filter)?, format, tz).await
        }
        DlqCommand::Show {
            filter,
            limit,
            full,
            json,
            tz,
        } => show(&dlq, Selection::new(filter)?, limit, full, json, tz).await,
        DlqCommand::Replay {
            filter,
            dry_run,
            keep,
            wait,
        } => {
            let options = ReplayOptions {
                dry_run,
                keep,
                wait: Duration::from_secs(wait),
            };
            replay(&dlq, Selection::new(filter)?, options).await
        }
    }
}

async fn stats(
    dlq: &DeadLetterStream,
    selection: Selection,
    format: Format,
    tz: Tz,
) -> Result<(), DlqError> {
    #[derive(Default)]
    struct Group {
        count: u64,
        oldest: Option<DateTime<Utc>>,
        newest: Option<DateTime<Utc>>,
    }
    let mut groups: BTreeMap<(&'static str, String), Group> = BTreeMap::new();
    let mut scan = dlq.scan(&selection, 0, dlq.last).await?;
    while let Some(letter) = scan.next(&selection).await? {
        let group = groups
            .entry((letter.type_name(), letter.reason.clone()))
            .or_default();
        group.count += 1;
        group.oldest = Some(group.oldest.map_or(letter.stored, |t| t.min(letter.stored)));
        group.newest = Some(group.newest.map_or(letter.stored, |t| t.max(letter.stored)));
    }
    let columns = vec![
        Column::new("type", ColumnKind::Text),
        Column::new("reason", ColumnKind::Text),
        Column::new("count", ColumnKind::Number),
        Column::new("oldest", ColumnKind::Timestamp),
        Column::new("newest", ColumnKind::Timestamp),
    ];
    let mut out = RowWriter::new(std::io::stdout().lock(), format, tz, columns);
    let mut total = 0;
    for ((record_type, reason), group) in &groups {
        total += group.count;
        let row = json!({
            "type": record_type,
            "reason": reason,
            "count": group.count,
            "oldest": group.oldest.map(|t| t.to_rfc3339()),
            "newest": group.newest.map(|t| t.to_rfc3339()),
        });
        out.write(row.as_object().expect("an object"))?;
    }
    out.flush()?;
    eprintln!(
        "{total} dead letters match in {} (up to sequence {})",
        dlq.name, dlq.last
    );
    Ok(())
}

async fn show(
    dlq: &DeadLetterStream,
    selection: Selection,
    limit: usize,
    full: bool,
    json: bool,
    tz: Tz,
) -> Result<(), DlqError> {
    let mut recent: VecDeque<DeadLetter> = VecDeque::with_capacity(limit.min(1024));
    let mut total = 0u64;
    let mut scan = dlq.scan(&selection, 0, dlq.last).await?;
    while let Some(letter) = scan.next(&selection).await? {
        total += 1;
        if limit == 0 {
            continue;
        }
        if recent.len() == limit {
            recent.pop_front();
        }
        recent.push_back(letter);
    }
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    for letter in &recent {
        let payload = String::from_utf8_lossy(&letter.payload);
        if json {
            let line = json!({
                "sequence": letter.sequence,
                "stored": tz.format(letter.stored),
                "type": letter.type_name(),
                "reason": letter.reason,
                "detail": letter.detail,
                "original_subject": letter.original_subject,
                "payload": payload,
            });
            writeln!(out, "{line}")?;
        } else {
            let shown: String = if full {
                payload.to_string()
            } else {
                let mut cut: String = payload.chars().take(300).collect();
                if cut.len() < payload.len() {
                    cut.push_str(" …");
                }
                cut
            };
            writeln!(
                out,
                "#{} {} {} {} {}\n    {}\n    {}",
                letter.sequence,
                tz.format(letter.stored),
                letter.type_name(),
                letter.reason,
                letter.original_subject,
                letter.detail,
                shown.replace('\n', " "),
            )?;
        }
    }
    out.flush()?;
    eprintln!(
        "{} of {total} matching dead letters shown ({}, up to sequence {})",
        recent.len(),
        dlq.name,
        dlq.last
    );
    Ok(())
}

struct ReplayOptions {
    dry_run: bool,
    keep: bool,
    wait: Duration,
}

/// A replay's identity for matching it with a new dead letter: the
/// original subject and the payload (as canonical JSON when it parses).
fn fingerprint(subject: &str, payload: &[u8]) -> u64 {
    let mut hasher = DefaultHasher::new();
    subject.hash(&mut hasher);
    match serde_json::from_slice::<Json>(payload) {
        Ok(json) => json.to_string().hash(&mut hasher),
        Err(_) => payload.hash(&mut hasher),
    }
    hasher.finish()
}

/// One dead letter sent back, awaiting its JetStream ack. Payloads are not
/// kept: a replay of any size holds a few numbers per message.
struct Sent {
    sequence: u64,
    record_type: Option<RecordType>,
    fingerprint: u64,
    subject: String,
}

/// What a replay did, printed at the end.
#[derive(Default)]
struct Replays {
    /// Selected dead letters per (type, reason).
    selected: BTreeMap<(&'static str, String), u64>,
    /// Dead letters whose replay the stream acknowledged: sequence and type.
    sent: Vec<(u64, Option<RecordType>)>,
    not_sent: u64,
    last_send_error: String,
    /// Per (feed stream, type): the highest sequence a replay was stored at.
    highest: HashMap<(String, RecordType), u64>,
    /// Fingerprints of the replays, to recognise their new dead letters.
    expected: HashMap<u64, u64>,
    failed_again: BTreeMap<String, u64>,
    removed: u64,
}

impl Replays {
    fn settle(
        &mut self,
        sent: Sent,
        ack: Result<jetstream::publish::PublishAck, impl std::fmt::Display>,
    ) {
        match ack {
            Ok(ack) => {
                if let Some(record_type) = sent.record_type {
                    let top = self.highest.entry((ack.stream, record_type)).or_default();
                    *top = (*top).max(ack.sequence);
                }
                *self.expected.entry(sent.fingerprint).or_default() += 1;
                self.sent.push((sent.sequence, sent.record_type));
            }
            Err(e) => self.failed_to_send(&sent.subject, e),
        }
    }

    fn failed_to_send(&mut self, subject: &str, error: impl std::fmt::Display) {
        self.not_sent += 1;
        self.last_send_error = format!("{subject}: {error}");
    }
}

async fn replay(
    dlq: &DeadLetterStream,
    selection: Selection,
    options: ReplayOptions,
) -> Result<(), DlqError> {
    let mut replays = Replays::default();
    let mut in_flight: VecDeque<(Sent, jetstream::context::PublishAckFuture)> = VecDeque::new();
    let mut scan = dlq.scan(&selection, 0, dlq.last).await?;
    while let Some(letter) = scan.next(&selection).await? {
        *replays
            .selected
            .entry((letter.type_name(), letter.reason.clone()))
            .or_default() += 1;
        if options.dry_run {
            continue;
        }
        let mut headers = HeaderMap::new();
        headers.insert(
            REPLAY_OF_HEADER,
            format!("{}:{}", dlq.name, letter.sequence).as_str(),
        );
        let sent = Sent {
            sequence: letter.sequence,
            record_type: letter.record_type,
            fingerprint: fingerprint(&letter.original_subject, &letter.payload),
            subject: letter.original_subject.clone(),
        };
        match dlq
            .js
            .publish_with_headers(letter.original_subject, headers, letter.payload)
            .await
        {
            Ok(ack) => in_flight.push_back((sent, ack)),
            Err(e) => replays.failed_to_send(&sent.subject, e),
        }
        while in_flight.len() >= ACK_WINDOW {
            if let Some((sent, ack)) = in_flight.pop_front() {
                replays.settle(sent, ack.await);
            }
        }
    }
    while let Some((sent, ack)) = in_flight.pop_front() {
        replays.settle(sent, ack.await);
    }
    let selected: u64 = replays.selected.values().sum();
    let groups: Vec<String> = replays
        .selected
        .iter()
        .map(|((t, r), n)| format!("{t}/{r}: {n}"))
        .collect();
    println!(
        "{selected} of {} dead letters in {} (up to sequence {}) selected{}",
        scan.seen,
        dlq.name,
        dlq.last,
        if groups.is_empty() {
            String::new()
        } else {
            format!(" ({})", groups.join(", "))
        }
    );
    if options.dry_run {
        println!("dry run: nothing was sent or removed");
        return Ok(());
    }
    if selected == 0 {
        println!("nothing to replay");
        return Ok(());
    }

    // The worker acknowledges a replay once it is written or dead-lettered again.
    let deadline = Instant::now() + options.wait;
    let mut late: Vec<RecordType> = Vec::new();
    for ((stream_name, record_type), sequence) in &replays.highest {
        if !processed(&dlq.js, stream_name, *record_type, *sequence, deadline).await? {
            late.push(*record_type);
        }
    }

    // The dead letters the replays made: past the start's last sequence,
    // with the subject and payload of a replay.
    let mut stream = dlq.stream.clone();
    let now_last = stream
        .info()
        .await
        .map_err(|e| js_error(format!("stream {}", dlq.name))(&e))?
        .state
        .last_sequence;
    let every = Selection {
        filter: Filter {
            types: selection.filter.types.clone(),
            reasons: Vec::new(),
            since: None,
            until: None,
            subject: None,
        },
        since: None,
        until: None,
    };
    let mut again = dlq.scan(&every, dlq.last, now_last).await?;
    while let Some(letter) = again.next(&every).await? {
        let key = fingerprint(&letter.original_subject, &letter.payload);
        if let Some(n) = replays.expected.get_mut(&key).filter(|n| **n > 0) {
            *n -= 1;
            *replays.failed_again.entry(letter.reason).or_default() += 1;
        }
    }

    let processed_in_time =
        |record_type: &Option<RecordType>| record_type.is_some_and(|t| !late.contains(&t));
    if !options.keep {
        for (sequence, record_type) in &replays.sent {
            if !processed_in_time(record_type) {
                continue;
            }
            match dlq.stream.delete_message(*sequence).await {
                Ok(_) => replays.removed += 1,
                Err(e) => eprintln!(
                    "could not remove dead letter {sequence} from {}: {e}",
                    dlq.name
                ),
            }
        }
    }

    let sent = replays.sent.len() as u64;
    let pending = replays
        .sent
        .iter()
        .filter(|(_, t)| !processed_in_time(t))
        .count() as u64;
    let failed_again: u64 = replays.failed_again.values().sum();
    let reasons: Vec<String> = replays
        .failed_again
        .iter()
        .map(|(r, n)| format!("{r}: {n}"))
        .collect();
    println!(
        "replayed {sent} to their original subjects: {} went back, {failed_again} dead-lettered again{}{}",
        sent - pending - failed_again,
        if reasons.is_empty() {
            String::new()
        } else {
            format!(" ({})", reasons.join(", "))
        },
        if pending > 0 {
            format!(", {pending} not processed yet")
        } else {
            String::new()
        }
    );
    if replays.not_sent > 0 {
        println!(
            "not sent: {} (last error: {}); they stay in {}",
            replays.not_sent, replays.last_send_error, dlq.name
        );
    }
    if options.keep {
        println!("kept the replayed dead letters in {} (--keep)", dlq.name);
    } else {
        println!(
            "removed {} replayed dead letters from {}",
            replays.removed, dlq.name
        );
    }
    if pending > 0 {
        return Err(DlqError::NotProcessed(pending));
    }
    Ok(())
}

/// Waits until the type's durable consumer has acknowledged `sequence` of
/// `stream_name`; false when `deadline` came first.
async fn processed(
    js: &jetstream::Context,
    stream_name: &str,
    record_type: RecordType,
    sequence: u64,
    deadline: Instant,
) -> Result<bool, DlqError> {
    let stream = js
        .get_stream(stream_name)
        .await
        .map_err(|e| js_error(format!("stream {stream_name}"))(&e))?;
    let consumer = durable_name(record_type);
    loop {
        if let Ok(info) = stream.consumer_info(&consumer).await {
            if info.ack_floor.stream_sequence >= sequence {
                return Ok(true);
            }
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_patterns() {
        assert!(subject_matches("md.tick.FPT", "md.tick.FPT"));
        assert!(subject_matches("md.*.FPT", "md.candle.FPT"));
        assert!(subject_matches("md.tick.>", "md.tick.FPT"));
        assert!(subject_matches(">", "md.tick.FPT"));
        assert!(!subject_matches("md.tick.>", "md.tick"));
        assert!(!subject_matches("md.tick.FPT", "md.tick.VNM"));
        assert!(!subject_matches("md.tick", "md.tick.FPT"));
    }

    #[test]
    fn a_replay_matches_its_dead_letter_whatever_the_json_spacing() {
        let a = fingerprint("md.tick.FPT", br#"{"symbol": "FPT", "price": 10}"#);
        let b = fingerprint("md.tick.FPT", br#"{"price":10,"symbol":"FPT"}"#);
        assert_eq!(a, b);
        assert_ne!(
            a,
            fingerprint("md.tick.VNM", br#"{"price":10,"symbol":"FPT"}"#)
        );
        assert_ne!(
            fingerprint("s", b"not json"),
            fingerprint("s", b"not json!")
        );
    }

    #[test]
    fn filters_parse_their_names() {
        assert_eq!(parse_type("candle"), Ok(RecordType::Candle));
        assert!(parse_type("candles").is_err());
        assert_eq!(
            parse_reason("database_rejected").as_deref(),
            Ok("database_rejected")
        );
        assert!(parse_reason("bad").unwrap_err().contains("invalid_value"));
    }
}
