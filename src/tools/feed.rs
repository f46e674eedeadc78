//! `tickvault feed`: a synthetic, realistic upstream feed of the Vietnamese
//! market, published to `<ingest.subject_prefix>.<type>.<SYMBOL>`.
//!
//! [`Market`] generates the messages and does no I/O: given a seed and a
//! start time it always produces the same sequence, which the unit tests
//! check against [`RecordSpec::parse_record`](tickvault::records::RecordSpec::parse_record).
//! [`run`] paces them to `--rate` and publishes them, plainly or through
//! JetStream with acknowledgements, logging a progress line every
//! `--progress`. The simulated clock follows the wall clock; with
//! `--backfill-from` it starts in the past and advances `--step` per message
//! until it catches up with the wall clock, then follows it.
//! A plain publish that no JetStream stream captures is not persisted by a
//! JetStream-mode worker: the feed checks its subjects and warns.

use std::collections::VecDeque;
use std::time::Duration;

use async_nats::jetstream;
use chrono::{DateTime, Datelike, FixedOffset, Months, TimeZone, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value as Json};
use tokio::time::Instant;

use tickvault::config::Config;
use tickvault::records::RecordType;

use super::time::TimeArg;

/// VN30 constituents with a plausible reference price (thousand VND).
pub const VN30: [(&str, f64); 30] = [
    ("FPT", 97.5),
    ("VNM", 66.8),
    ("HPG", 26.4),
    ("VCB", 91.2),
    ("MWG", 61.3),
    ("TCB", 23.9),
    ("VIC", 41.6),
    ("VHM", 40.15),
    ("ACB", 24.8),
    ("MBB", 23.25),
    ("BID", 47.3),
    ("CTG", 35.6),
    ("GAS", 68.4),
    ("MSN", 74.0),
    ("SSI", 25.95),
    ("VPB", 19.2),
    ("STB", 34.1),
    ("HDB", 25.6),
    ("PLX", 39.5),
    ("POW", 12.35),
    ("SAB", 55.7),
    ("VRE", 18.9),
    ("VJC", 101.4),
    ("GVR", 31.7),
    ("BCM", 64.2),
    ("BVH", 44.85),
    ("SHB", 10.25),
    ("SSB", 17.6),
    ("TPB", 16.45),
    ("VIB", 19.35),
];

/// Indices with a plausible reference level.
pub const INDICES: [(&str, f64); 3] = [("VNINDEX", 1252.6), ("VN30", 1318.4), ("HNXINDEX", 226.9)];

/// HOSE's daily price band around the reference price.
const PRICE_BAND: f64 = 0.07;

/// The market's time zone, UTC+7 without DST.
fn market_tz() -> FixedOffset {
    FixedOffset::east_opt(7 * 3600).expect("UTC+7 is a valid offset")
}

/// One message ready to publish: `<prefix>.<type>.<key>` and its JSON payload.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedMessage {
    pub record_type: RecordType,
    /// The subject's last token: symbol, index name or contract.
    pub key: String,
    /// One record object, or an array of records of `record_type`.
    pub payload: Json,
}

impl FeedMessage {
    pub fn subject(&self, prefix: &str) -> String {
        format!("{prefix}.{}.{}", self.record_type.name(), self.key)
    }

    /// How many records the payload carries.
    pub fn records(&self) -> usize {
        match &self.payload {
            Json::Array(items) => items.len(),
            _ => 1,
        }
    }
}

/// A forming 1-minute bar.
#[derive(Debug, Clone)]
struct Candle {
    start: DateTime<Utc>,
    open: f64,
    high: f64,
    low: f64,
    close: f64,
    volume: i64,
    value: f64,
}

#[derive(Debug, Clone)]
struct Stock {
    symbol: &'static str,
    reference: f64,
    price: f64,
    seq: i64,
    candle: Option<Candle>,
    day_volume: i64,
    foreign_buy_volume: i64,
    foreign_sell_volume: i64,
    foreign_buy_value: f64,
    foreign_sell_value: f64,
    room: i64,
}

#[derive(Debug, Clone)]
struct IndexState {
    name: &'static str,
    reference: f64,
    value: f64,
    volume: i64,
    traded_value: f64,
}

#[derive(Debug, Clone)]
struct Contract {
    name: String,
    basis: f64,
    open_interest: i64,
    volume: i64,
}

/// The simulated market: every price and counter, a deterministic clock and
/// the random source. [`Market::next_message`] is the whole generator.
pub struct Market {
    rng: StdRng,
    clock: DateTime<Utc>,
    /// Simulated time between two messages.
    step: Duration,
    stocks: Vec<Stock>,
    indices: Vec<IndexState>,
    contracts: Vec<Contract>,
}

/// HOSE tick size for a price in thousand VND.
fn tick_size(price: f64) -> f64 {
    if price < 10.0 {
        0.01
    } else if price < 50.0 {
        0.05
    } else {
        0.1
    }
}

/// Rounds to the tick size, keeping two decimals exact in the JSON.
fn round_to_tick(price: f64) -> f64 {
    let tick = tick_size(price);
    ((price / tick).round() * tick * 100.0).round() / 100.0
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// Futures codes `VN30F<YY><MM>` for this month and the next.
fn contract_names(start: DateTime<Utc>) -> Vec<String> {
    let local = start.with_timezone(&market_tz());
    let next = local
        .checked_add_months(Months::new(1))
        .unwrap_or(local)
        .with_timezone(&market_tz());
    [local, next]
        .iter()
        .map(|d| format!("VN30F{:02}{:02}", d.year() % 100, d.month()))
        .collect()
}

impl Market {
    /// A market of the first `symbols` VN30 stocks (1..=30), whose clock
    /// starts at `start` and advances `step` per message.
    pub fn new(seed: u64, symbols: usize, start: DateTime<Utc>, step: Duration) -> Market {
        let mut rng = StdRng::seed_from_u64(seed);
        let stocks = VN30
            .iter()
            .take(symbols.clamp(1, VN30.len()))
            .map(|&(symbol, reference)| {
                let price = round_to_tick(reference * (1.0 + rng.random_range(-0.01..0.01)));
                Stock {
                    symbol,
                    reference,
                    price,
                    seq: rng.random_range(1_000..100_000),
                    candle: None,
                    day_volume: 0,
                    foreign_buy_volume: 0,
                    foreign_sell_volume: 0,
                    foreign_buy_value: 0.0,
                    foreign_sell_value: 0.0,
                    room: rng.random_range(10_000_000..500_000_000),
                }
            })
            .collect();
        let indices = INDICES
            .iter()
            .map(|&(name, reference)| IndexState {
                name,
                reference,
                value: reference,
                volume: 0,
                traded_value: 0.0,
            })
            .collect();
        let contracts = contract_names(start)
            .into_iter()
            .map(|name| Contract {
                name,
                basis: rng.random_range(-8.0..4.0),
                open_interest: rng.random_range(20_000..60_000),
                volume: 0,
            })
            .collect();
        Market {
            rng,
            clock: start,
            step,
            stocks,
            indices,
            contracts,
        }
    }

    /// Moves the simulated clock to `now` unless it is already later (it
    /// never goes back).
    pub fn follow(&mut self, now: DateTime<Utc>) {
        self.clock = self.clock.max(now);
    }

    pub fn clock(&self) -> DateTime<Utc> {
        self.clock
    }

    /// Every subject the market publishes to, with its type.
    pub fn subjects(&self, prefix: &str) -> Vec<(RecordType, String)> {
        let stock_types = [RecordType::Tick, RecordType::Candle, RecordType::Foreign];
        let stocks = self
            .stocks
            .iter()
            .flat_map(|s| stock_types.map(|t| (t, s.symbol.to_string())));
        let indices = self
            .indices
            .iter()
            .map(|i| (RecordType::Index, i.name.to_string()));
        let contracts = self
            .contracts
            .iter()
            .map(|c| (RecordType::Deriv, c.name.clone()));
        stocks
            .chain(indices)
            .chain(contracts)
            .map(|(t, key)| (t, format!("{prefix}.{}.{key}", t.name())))
            .collect()
    }

    /// The next message: mostly ticks, then candles, foreign flow, index
    /// snapshots and futures, as a real feed's mix.
    pub fn next_message(&mut self) -> FeedMessage {
        let roll = self.rng.random_range(0..100);
        let message = match roll {
            0..=67 => self.ticks(),
            68..=79 => self.candle(),
            80..=86 => self.foreign(),
            87..=93 => self.index(),
            _ => self.deriv(),
        };
        let step = chrono::Duration::from_std(self.step).unwrap_or(chrono::Duration::zero());
        self.clock += step;
        message
    }

    /// Either form the contract allows: epoch milliseconds or RFC 3339 in market time.
    fn timestamp(&mut self, ts: DateTime<Utc>) -> Json {
        if self.rng.random_bool(0.5) {
            json!(ts.timestamp_millis())
        } else {
            let micros = ts.timestamp_subsec_micros();
            let local = ts.with_timezone(&market_tz());
            Json::String(format!(
                "{}.{:06}+07:00",
                local.format("%Y-%m-%dT%H:%M:%S"),
                micros
            ))
        }
    }

    fn ticks(&mut self) -> FeedMessage {
        let i = self.rng.random_range(0..self.stocks.len());
        let batch = if self.rng.random_bool(0.3) {
            self.rng.random_range(2..=5)
        } else {
            1
        };
        let mut records = Vec::with_capacity(batch);
        let mut ts = self.clock;
        for _ in 0..batch {
            let record = self.one_tick(i, ts);
            records.push(record);
            ts += chrono::Duration::microseconds(self.rng.random_range(0..2_000));
        }
        // The clock never goes back: later messages are never older.
        self.clock = self.clock.max(ts);
        let key = self.stocks[i].symbol.to_string();
        FeedMessage {
            record_type: RecordType::Tick,
            key,
            payload: single_or_array(records),
        }
    }

    fn one_tick(&mut self, i: usize, ts: DateTime<Utc>) -> Json {
        let moves = self.rng.random_range(-3i32..=3);
        let stock = &self.stocks[i];
        let (floor, ceiling) = (
            stock.reference * (1.0 - PRICE_BAND),
            stock.reference * (1.0 + PRICE_BAND),
        );
        let price = round_to_tick(
            (stock.price + f64::from(moves) * tick_size(stock.price)).clamp(floor, ceiling),
        )
        .max(0.01);
        let volume = 100 * self.rng.random_range(1..=50i64);
        let side = match self.rng.random_range(0..100) {
            0..=46 => "buy",
            47..=93 => "sell",
            _ => "unknown",
        };
        let timestamp = self.timestamp(ts);
        let stock = &mut self.stocks[i];
        stock.price = price;
        stock.seq += 1;
        stock.day_volume += volume;
        let minute = minute_start(ts);
        let value = price * 1000.0 * volume as f64;
        match &mut stock.candle {
            Some(c) if c.start == minute => {
                c.high = c.high.max(price);
                c.low = c.low.min(price);
                c.close = price;
                c.volume += volume;
                c.value += value;
            }
            candle => {
                *candle = Some(Candle {
                    start: minute,
                    open: price,
                    high: price,
                    low: price,
                    close: price,
                    volume,
                    value,
                })
            }
        }
        json!({
            "symbol": stock.symbol,
            "timestamp": timestamp,
            "price": price,
            "volume": volume,
            "side": side,
            "seq": stock.seq,
        })
    }

    /// The symbol's forming bar, re-published as it forms (newest wins).
    fn candle(&mut self) -> FeedMessage {
        let i = self.rng.random_range(0..self.stocks.len());
        let minute = minute_start(self.clock);
        let price = self.stocks[i].price;
        let candle = match &mut self.stocks[i].candle {
            Some(c) if c.start >= minute => c.clone(),
            // No trade yet this minute: a flat bar at the last price, which
            // the minute's trades then extend.
            slot => {
                let flat = Candle {
                    start: minute,
                    open: price,
                    high: price,
                    low: price,
                    close: price,
                    volume: 0,
                    value: 0.0,
                };
                *slot = Some(flat.clone());
                flat
            }
        };
        let timestamp = self.timestamp(candle.start);
        let mut record = json!({
            "symbol": self.stocks[i].symbol,
            "timestamp": timestamp,
            "open": candle.open,
            "high": candle.high,
            "low": candle.low,
            "close": candle.close,
            "volume": candle.volume,
        });
        // `value` is optional: most feeds send it, some do not.
        if self.rng.random_bool(0.9) {
            record["value"] = json!(candle.value.round());
        }
        FeedMessage {
            record_type: RecordType::Candle,
            key: self.stocks[i].symbol.to_string(),
            payload: record,
        }
    }

    /// Cumulative foreign flow for the day.
    fn foreign(&mut self) -> FeedMessage {
        let i = self.rng.random_range(0..self.stocks.len());
        let buy = 100 * self.rng.random_range(0..=200i64);
        let sell = 100 * self.rng.random_range(0..=200i64);
        let with_room = self.rng.random_bool(0.8);
        let timestamp = self.timestamp(self.clock);
        let stock = &mut self.stocks[i];
        let price_vnd = stock.price * 1000.0;
        stock.foreign_buy_volume += buy;
        stock.foreign_sell_volume += sell;
        stock.foreign_buy_value += buy as f64 * price_vnd;
        stock.foreign_sell_value += sell as f64 * price_vnd;
        stock.room = (stock.room - buy + sell).max(0);
        let mut record = json!({
            "symbol": stock.symbol,
            "timestamp": timestamp,
            "buy_volume": stock.foreign_buy_volume,
            "sell_volume": stock.foreign_sell_volume,
            "buy_value": stock.foreign_buy_value.round(),
            "sell_value": stock.foreign_sell_value.round(),
        });
        if with_room {
            record["room"] = json!(stock.room);
        }
        FeedMessage {
            record_type: RecordType::Foreign,
            key: stock.symbol.to_string(),
            payload: record,
        }
    }

    /// An index snapshot; VNINDEX and VN30 carry breadth from the simulated stocks.
    fn index(&mut self) -> FeedMessage {
        let i = self.rng.random_range(0..self.indices.len());
        let drift = self.rng.random_range(-0.0006..0.0006);
        let volume = self.rng.random_range(10_000..2_000_000i64);
        let avg_price = self.rng.random_range(15.0..60.0) * 1000.0;
        let timestamp = self.timestamp(self.clock);
        let (advances, declines, unchanged) = self.breadth();
        let state = &mut self.indices[i];
        let (floor, ceiling) = (state.reference * 0.93, state.reference * 1.07);
        state.value = round2((state.value * (1.0 + drift)).clamp(floor, ceiling));
        state.volume += volume;
        state.traded_value += volume as f64 * avg_price;
        let change = round2(state.value - state.reference);
        let mut record = json!({
            "index_name": state.name,
            "timestamp": timestamp,
            "value": state.value,
            "change": change,
            "change_pct": round2(change / state.reference * 100.0),
            "volume": state.volume,
            "traded_value": state.traded_value.round(),
        });
        // HNX breadth is not simulated: those optional fields stay absent.
        if state.name != "HNXINDEX" {
            record["advances"] = json!(advances);
            record["declines"] = json!(declines);
            record["unchanged"] = json!(unchanged);
        }
        FeedMessage {
            record_type: RecordType::Index,
            key: state.name.to_string(),
            payload: record,
        }
    }

    fn breadth(&self) -> (usize, usize, usize) {
        self.stocks.iter().fold((0, 0, 0), |(a, d, u), s| {
            match s.price.partial_cmp(&s.reference) {
                Some(std::cmp::Ordering::Greater) => (a + 1, d, u),
                Some(std::cmp::Ordering::Less) => (a, d + 1, u),
                _ => (a, d, u + 1),
            }
        })
    }

    /// VN30F futures: the VN30 level plus a wandering basis; sometimes a
    /// short burst of snapshots in one array.
    fn deriv(&mut self) -> FeedMessage {
        let i = self.rng.random_range(0..self.contracts.len());
        let vn30 = self
            .indices
            .iter()
            .find(|s| s.name == "VN30")
            .map(|s| s.value)
            .unwrap_or(INDICES[1].1);
        let batch = if self.rng.random_bool(0.2) { 2 } else { 1 };
        let mut records = Vec::with_capacity(batch);
        for n in 0..batch {
            let ts = self.clock + chrono::Duration::milliseconds(n as i64 * 250);
            let timestamp = self.timestamp(ts);
            let basis_step = self.rng.random_range(-0.3..0.3);
            let oi_step = self.rng.random_range(-150..=150i64);
            let volume = self.rng.random_range(1..=300i64);
            let contract = &mut self.contracts[i];
            contract.basis = (contract.basis + basis_step).clamp(-25.0, 25.0);
            contract.open_interest = (contract.open_interest + oi_step).max(0);
            contract.volume += volume;
            let price = round2((vn30 + contract.basis).max(1.0) * 10.0) / 10.0;
            records.push(json!({
                "contract": contract.name,
                "timestamp": timestamp,
                "price": price,
                "basis": round2(price - vn30),
                "open_interest": contract.open_interest,
                "volume": contract.volume,
            }));
        }
        self.clock += chrono::Duration::milliseconds((batch as i64 - 1) * 250);
        FeedMessage {
            record_type: RecordType::Deriv,
            key: self.contracts[i].name.clone(),
            payload: single_or_array(records),
        }
    }
}

fn single_or_array(mut records: Vec<Json>) -> Json {
    if records.len() == 1 {
        records.pop().unwrap_or(Json::Null)
    } else {
        Json::Array(records)
    }
}

fn minute_start(ts: DateTime<Utc>) -> DateTime<Utc> {
    let secs = ts.timestamp() - ts.timestamp().rem_euclid(60);
    Utc.timestamp_opt(secs, 0).single().unwrap_or(ts)
}

/// Options of `tickvault feed`.
#[derive(Debug, Clone, clap::Args)]
pub struct FeedArgs {
    /// Messages per second.
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// Stop after this long (`90`, `30s`, `5m`, `1h`); default: until Ctrl-C/SIGTERM.
    #[arg(long, value_parser = parse_duration, conflicts_with = "count")]
    pub duration: Option<Duration>,
    /// Stop after this many messages; default: until Ctrl-C/SIGTERM.
    #[arg(long)]
    pub count: Option<u64>,
    /// How many VN30 stocks to simulate (1-30).
    #[arg(long, default_value_t = 10)]
    pub symbols: usize,
    /// Publish through JetStream and wait for every acknowledgement.
    #[arg(long)]
    pub jetstream: bool,
    /// Seed of the generator (default: random, logged so a run can be repeated).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Back-fill: start the simulated clock at this time (a day, market time
    /// or RFC 3339) and advance it --step per message until it reaches the
    /// wall clock, which it then follows. Default: follow the wall clock.
    #[arg(long, value_name = "TIME")]
    pub backfill_from: Option<String>,
    /// Back-fill only: simulated time between two messages (`100ms`, `1s`).
    #[arg(long, value_parser = parse_duration, default_value = "100ms", requires = "backfill_from")]
    pub step: Duration,
    /// Time between progress lines (`10s`, `1m`; `0` turns them off).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub progress: Duration,
}

/// `90`, `90s`, `1500ms`, `5m`, `1h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 30s, 5m or 1h"))?;
    let seconds = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!(
                "unknown duration unit {other:?}: use ms, s, m or h"
            ))
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}

#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error("--{arg}: {message}")]
    InvalidArgument { arg: &'static str, message: String },
    #[error(transparent)]
    Connect(#[from] tickvault::nats::NatsError),
    #[error("publishing to {subject} failed: {message}")]
    Publish { subject: String, message: String },
    #[error("{failed} of {sent} JetStream publishes were not acknowledged (last error: {last}); does a stream capture {prefix}.>? `tickvault run` creates it")]
    Unacknowledged {
        failed: u64,
        sent: u64,
        last: String,
        prefix: String,
    },
}

/// Most JetStream publishes awaiting their ack at once.
const ACK_WINDOW: usize = 512;

/// Counts of what the feed did, for the progress lines and the summary.
#[derive(Debug, Default)]
struct Progress {
    sent: u64,
    records: [u64; RecordType::ALL.len()],
    acked: u64,
    failed: u64,
    last_error: String,
}

impl Progress {
    fn records_json(&self) -> Json {
        let by_type: Map<String, Json> = RecordType::ALL
            .iter()
            .zip(self.records)
            .map(|(t, n)| (t.name().to_string(), json!(n)))
            .collect();
        Json::Object(by_type)
    }

    fn ack<T, E: std::fmt::Display>(&mut self, result: Result<T, E>) {
        record_ack(
            result,
            &mut self.acked,
            &mut self.failed,
            &mut self.last_error,
        );
    }
}

/// Which of `subjects` a JetStream stream captures: `None` when JetStream
/// cannot tell (not enabled, or no answer), else the uncaptured ones.
async fn uncaptured(
    js: &jetstream::Context,
    subjects: &[(RecordType, String)],
) -> Option<Vec<String>> {
    use async_nats::jetstream::context::GetStreamByNameErrorKind as Kind;
    let mut missing = Vec::new();
    for (_, subject) in subjects {
        match js.stream_by_subject(subject.clone()).await {
            Ok(_) => {}
            Err(e) if e.kind() == Kind::NotFound => missing.push(subject.clone()),
            Err(_) => return None,
        }
    }
    Some(missing)
}

/// Logs what changed about the subjects no stream captures.
fn report_capture(before: &Option<Vec<String>>, now: &Option<Vec<String>>, total: usize) {
    if before == now {
        return;
    }
    match now {
        None => tracing::warn!(
            "cannot ask JetStream which stream captures the feed's subjects; \
             a JetStream-mode worker persists only what a stream keeps (is JetStream enabled?)"
        ),
        Some(missing) if missing.is_empty() => {
            if before.is_some() {
                tracing::info!("every feed subject is now captured by a JetStream stream");
            }
        }
        Some(missing) => tracing::warn!(
            uncaptured = missing.len(),
            of = total,
            example = %missing[0],
            "no JetStream stream captures these plain publishes: a JetStream-mode worker never sees them; \
             start `tickvault run` (it creates the stream) or publish with --jetstream"
        ),
    }
}

/// Publishes the synthetic feed until `--count`, `--duration` or a signal.
pub async fn run(config: &Config, args: FeedArgs) -> Result<(), FeedError> {
    if !(args.rate.is_finite() && args.rate > 0.0) {
        return Err(FeedError::InvalidArgument {
            arg: "rate",
            message: format!("{} must be a number of messages per second > 0", args.rate),
        });
    }
    if !(1..=VN30.len()).contains(&args.symbols) {
        return Err(FeedError::InvalidArgument {
            arg: "symbols",
            message: format!("{} must be between 1 and {}", args.symbols, VN30.len()),
        });
    }
    let backfill_from = args
        .backfill_from
        .as_deref()
        .map(|text| TimeArg::parse(text, Utc::now()))
        .transpose()
        .map_err(|message| FeedError::InvalidArgument {
            arg: "backfill-from",
            message,
        })?
        .map(|t| t.start);
    let seed = args.seed.unwrap_or_else(rand::random);
    let prefix = config.ingest.subject_prefix.clone();
    let url = config.nats.url.redacted();
    let client = tickvault::nats::connect(&config.nats, |options| {
        options
            .name("tickvault-feed")
            .connection_timeout(Duration::from_secs(5))
    })
    .await?;
    let js = jetstream::new(client.clone());
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let (start, step) = match backfill_from {
        Some(from) => (from, args.step),
        None => (Utc::now(), Duration::ZERO),
    };
    let mut market = Market::new(seed, args.symbols, start, step);
    let mut backfilling = backfill_from.is_some_and(|from| from < Utc::now());
    tracing::info!(
        nats = %url,
        prefix = %prefix,
        rate = args.rate,
        symbols = args.symbols,
        seed,
        jetstream = args.jetstream,
        count = ?args.count,
        duration = ?args.duration,
        backfill_from = ?backfill_from,
        "publishing the synthetic feed (Ctrl-C to stop)"
    );
    let subjects = market.subjects(&prefix);
    let mut capture = Some(Vec::new());
    if !args.jetstream {
        let now = uncaptured(&js, &subjects).await;
        report_capture(&capture, &now, subjects.len());
        capture = now;
    }

    let shutdown = tickvault::ops::shutdown::signal();
    tokio::pin!(shutdown);
    let started = Instant::now();
    let deadline = args.duration.map(|d| started + d);
    let every = (!args.progress.is_zero()).then_some(args.progress);
    let mut progress_ticks = tokio::time::interval_at(
        started + args.progress,
        args.progress.max(Duration::from_millis(1)),
    );
    let mut progress = Progress::default();
    let mut last_report = (started, 0u64);
    let mut pending = VecDeque::new();
    loop {
        if args.count.is_some_and(|count| progress.sent >= count) {
            break;
        }
        let due = started + interval.mul_f64(progress.sent as f64);
        if deadline.is_some_and(|d| due >= d) {
            break;
        }
        tokio::select! {
            _ = &mut shutdown => break,
            _ = progress_ticks.tick(), if every.is_some() => {
                let (at, sent_then) = last_report;
                let rate = (progress.sent - sent_then) as f64 / at.elapsed().as_secs_f64().max(1e-9);
                tracing::info!(
                    messages = progress.sent,
                    records = %progress.records_json(),
                    rate = format!("{rate:.1}"),
                    acked = args.jetstream.then_some(progress.acked),
                    clock = %market.clock().to_rfc3339(),
                    "feed progress"
                );
                last_report = (Instant::now(), progress.sent);
                if !args.jetstream {
                    let now = uncaptured(&js, &subjects).await;
                    report_capture(&capture, &now, subjects.len());
                    capture = now;
                }
                continue;
            }
            _ = tokio::time::sleep_until(due) => {}
        }
        if backfilling && market.clock() >= Utc::now() {
            backfilling = false;
            tracing::info!("the back-fill caught up with the wall clock; following it from now on");
        }
        if !backfilling {
            market.follow(Utc::now());
        }
        let message = market.next_message();
        let subject = message.subject(&prefix);
        let payload = bytes::Bytes::from(message.payload.to_string());
        if args.jetstream {
            let ack =
                js.publish(subject.clone(), payload)
                    .await
                    .map_err(|e| FeedError::Publish {
                        subject,
                        message: e.to_string(),
                    })?;
            pending.push_back(ack);
            while pending.len() >= ACK_WINDOW {
                if let Some(ack) = pending.pop_front() {
                    progress.ack(ack.await);
                }
            }
        } else {
            client
                .publish(subject.clone(), payload)
                .await
                .map_err(|e| FeedError::Publish {
                    subject,
                    message: e.to_string(),
                })?;
        }
        progress.sent += 1;
        let slot = RecordType::ALL
            .iter()
            .position(|t| *t == message.record_type)
            .expect("every type is in ALL");
        progress.records[slot] += message.records() as u64;
    }
    for ack in pending {
        progress.ack(ack.await);
    }
    if let Err(e) = client.flush().await {
        tracing::warn!(error = %e, "could not flush the last messages");
    }
    let elapsed = started.elapsed().as_secs_f64();
    tracing::info!(
        messages = progress.sent,
        records = %progress.records_json(),
        elapsed_s = format!("{elapsed:.1}"),
        rate = format!("{:.1}", progress.sent as f64 / elapsed.max(1e-9)),
        acked = args.jetstream.then_some(progress.acked),
        seed,
        "feed finished"
    );
    if progress.failed > 0 {
        return Err(FeedError::Unacknowledged {
            failed: progress.failed,
            sent: progress.sent,
            last: progress.last_error,
            prefix,
        });
    }
    Ok(())
}

fn record_ack<T, E: std::fmt::Display>(
    result: Result<T, E>,
    acked: &mut u64,
    failed: &mut u64,
    last_error: &mut String,
) {
    match result {
        Ok(_) => *acked += 1,
        Err(e) => {
            *failed += 1;
            *last_error = e.to_string();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use tickvault::records::Value;

    fn start() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2024-12-02T09:15:00+07:00")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn market(seed: u64) -> Market {
        Market::new(seed, 10, start(), Duration::from_millis(5))
    }

    fn records(message: &FeedMessage) -> Vec<Json> {
        match &message.payload {
            Json::Array(items) => items.clone(),
            record => vec![record.clone()],
        }
    }

    #[test]
    fn every_generated_record_passes_its_spec() {
        let mut market = market(7);
        let mut seen = HashMap::new();
        for _ in 0..20_000 {
            let message = market.next_message();
            let spec = message.record_type.spec();
            *seen.entry(message.record_type).or_insert(0) += 1;
            for record in records(&message) {
                let row = spec
                    .parse_record(&record)
                    .unwrap_or_else(|r| panic!("{record} rejected: {r:?}"));
                assert_eq!(
                    row[0],
                    Value::Text(message.key.clone()),
                    "the subject token is the record's identifier"
                );
            }
        }
        for t in RecordType::ALL {
            assert!(seen.get(&t).copied().unwrap_or(0) > 100, "{t:?}: {seen:?}");
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_feed() {
        let (mut a, mut b, mut c) = (market(42), market(42), market(43));
        let first: Vec<FeedMessage> = (0..500).map(|_| a.next_message()).collect();
        let again: Vec<FeedMessage> = (0..500).map(|_| b.next_message()).collect();
        let other: Vec<FeedMessage> = (0..500).map(|_| c.next_message()).collect();
        assert_eq!(first, again);
        assert_ne!(first, other);
    }

    #[test]
    fn ticks_have_increasing_seq_per_symbol_and_a_side() {
        let mut market = market(1);
        let mut last: HashMap<String, i64> = HashMap::new();
        let mut sides = std::collections::HashSet::new();
        for _ in 0..5_000 {
            let message = market.next_message();
            if message.record_type != RecordType::Tick {
                continue;
            }
            for record in records(&message) {
                let symbol = record["symbol"].as_str().unwrap().to_string();
                let seq = record["seq"].as_i64().unwrap();
                if let Some(previous) = last.insert(symbol, seq) {
                    assert!(seq > previous, "{record}");
                }
                sides.insert(record["side"].as_str().unwrap().to_string());
            }
        }
        assert_eq!(sides.len(), 3, "{sides:?}");
    }

    #[test]
    fn the_mix_has_arrays_both_timestamp_forms_and_optional_fields() {
        let mut market = market(3);
        let (mut arrays, mut singles, mut millis, mut rfc3339) = (0, 0, 0, 0);
        let (mut hnx_without_breadth, mut foreign_without_room) = (0, 0);
        for _ in 0..5_000 {
            let message = market.next_message();
            match message.payload {
                Json::Array(_) => arrays += 1,
                _ => singles += 1,
            }
            for record in records(&message) {
                match &record["timestamp"] {
                    Json::Number(_) => millis += 1,
                    Json::String(s) => {
                        assert!(s.ends_with("+07:00"), "{s}");
                        rfc3339 += 1
                    }
                    other => panic!("timestamp {other}"),
                }
                if record.get("index_name").is_some_and(|n| n == "HNXINDEX") {
                    assert!(record.get("advances").is_none());
                    hnx_without_breadth += 1;
                }
                if message.record_type == RecordType::Foreign && record.get("room").is_none() {
                    foreign_without_room += 1;
                }
            }
        }
        for (what, n) in [
            ("arrays", arrays),
            ("singles", singles),
            ("millis", millis),
            ("rfc3339", rfc3339),
            ("hnx", hnx_without_breadth),
            ("foreign without room", foreign_without_room),
        ] {
            assert!(n > 10, "{what}: {n}");
        }
    }

    #[test]
    fn candles_re_publish_the_forming_minute_and_foreign_flow_is_cumulative() {
        let mut market = market(9);
        let mut candles: HashMap<(String, i64), (f64, f64, i64)> = HashMap::new();
        let mut republished = 0;
        let mut foreign: HashMap<String, (i64, i64)> = HashMap::new();
        for _ in 0..30_000 {
            let message = market.next_message();
            for record in records(&message) {
                match message.record_type {
                    RecordType::Candle => {
                        let spec = RecordType::Candle.spec();
                        let row = spec.parse_record(&record).unwrap();
                        let Value::Timestamp(ts) = row[1] else {
                            panic!("timestamp")
                        };
                        assert_eq!(ts.timestamp() % 60, 0, "a bar starts on a minute");
                        let key = (message.key.clone(), ts.timestamp());
                        let now = (
                            record["high"].as_f64().unwrap(),
                            record["low"].as_f64().unwrap(),
                            record["volume"].as_i64().unwrap(),
                        );
                        if let Some(before) = candles.insert(key, now) {
                            republished += 1;
                            assert!(now.0 >= before.0 && now.1 <= before.1 && now.2 >= before.2);
                        }
                    }
                    RecordType::Foreign => {
                        let now = (
                            record["buy_volume"].as_i64().unwrap(),
                            record["sell_volume"].as_i64().unwrap(),
                        );
                        if let Some(before) = foreign.insert(message.key.clone(), now) {
                            assert!(now.0 >= before.0 && now.1 >= before.1);
                        }
                    }
                    _ => {}
                }
            }
        }
        assert!(republished > 100, "{republished}");
        // 30,000 messages of 5 ms: the clock crossed a few minutes.
        let minutes: std::collections::HashSet<i64> = candles.keys().map(|k| k.1).collect();
        assert!(minutes.len() >= 2, "{minutes:?}");
    }

    #[test]
    fn futures_codes_follow_the_month() {
        assert_eq!(contract_names(start()), ["VN30F2412", "VN30F2501"]);
        let mut market = market(5);
        for _ in 0..2_000 {
            let message = market.next_message();
            if message.record_type == RecordType::Deriv {
                assert!(message.key.starts_with("VN30F24") || message.key == "VN30F2501");
            }
        }
    }

    #[test]
    fn every_message_goes_to_a_listed_subject() {
        let mut market = market(11);
        let subjects: Vec<String> = market.subjects("md").into_iter().map(|(_, s)| s).collect();
        assert_eq!(subjects.len(), 10 * 3 + 3 + 2);
        for _ in 0..3_000 {
            let subject = market.next_message().subject("md");
            assert!(subjects.contains(&subject), "{subject}");
        }
    }

    #[test]
    fn the_clock_follows_the_wall_clock_and_never_goes_back() {
        let mut live = Market::new(1, 3, start(), Duration::ZERO);
        let later = start() + chrono::Duration::hours(2);
        live.follow(later);
        assert_eq!(live.clock(), later);
        live.follow(start());
        assert_eq!(live.clock(), later, "never back");
        let message = live.next_message();
        let record = records(&message).remove(0);
        let spec = message.record_type.spec();
        let Value::Timestamp(ts) = spec.parse_record(&record).unwrap()[1] else {
            panic!("timestamp")
        };
        // A candle is stamped with its minute's start; others with the clock.
        assert!(
            (later - ts) < chrono::Duration::minutes(1),
            "{ts} vs {later}"
        );
        // Back-fill: the clock advances by the step alone.
        let mut backfill = Market::new(1, 3, start(), Duration::from_secs(1));
        for _ in 0..100 {
            backfill.next_message();
        }
        assert!(backfill.clock() >= start() + chrono::Duration::seconds(100));
        assert!(backfill.clock() < start() + chrono::Duration::seconds(102));
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("-5s").is_err());
    }
}
