//! `tickvault history`: asks the running history service for one symbol's
//! rows in a range and prints each page as it arrives, following
//! `next_cursor` to the end (or `--limit` rows). Memory stays that of one
//! page whatever the range.

use std::io::Write as _;
use std::time::Duration;

use chrono::Utc;
use serde_json::{json, Value as Json};

use tickvault::config::Config;
use tickvault::history::request::MAX_LIMIT;

use super::client::{ClientError, HistoryClient, Kind};
use super::render::{reader_gone, Column, Output, RowWriter};
use super::time::TimeArg;

/// Query stored history through the running `tickvault-history` service.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Times: today, yesterday, now, a market day YYYY-MM-DD (--to includes it), \
market time YYYY-MM-DD HH:MM[:SS] (Asia/Ho_Chi_Minh, UTC+7) or RFC 3339 with an offset.\n\
Examples:\n  tickvault history ticks FPT\n  \
tickvault history ticks FPT --from 'today 09:00' --order desc --limit 20\n  \
tickvault history candles VNM --from 2026-11-20 --to 2026-11-26 --interval 1h --format csv --tz utc"
)]
pub struct HistoryArgs {
    /// What to read.
    #[arg(value_enum)]
    pub kind: Kind,
    /// Symbol, index name (VNINDEX) or futures contract (VN30F2412).
    pub symbol: String,
    /// Start (inclusive): a day, a market time or an RFC 3339 timestamp.
    #[arg(long, default_value = "today")]
    pub from: String,
    /// End: a day (included) or a timestamp (exclusive).
    #[arg(long, default_value = "today")]
    pub to: String,
    /// Candles only: bar width (1m, 5m, 15m, 30m, 1h, 1d).
    #[arg(long)]
    pub interval: Option<String>,
    /// By timestamp: asc or desc.
    #[arg(long, default_value = "asc", value_parser = ["asc", "desc"])]
    pub order: String,
    /// Most rows to print in total (default: every matching row).
    #[arg(long)]
    pub limit: Option<u64>,
    #[command(flatten)]
    pub output: Output,
}

#[derive(Debug, thiserror::Error)]
pub enum HistoryCliError {
    #[error("--{arg}: {message}")]
    Argument { arg: &'static str, message: String },
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// Prints the rows page by page; "no rows" goes to stderr.
pub async fn run(config: &Config, args: HistoryArgs) -> Result<(), HistoryCliError> {
    let now = Utc::now();
    let bound = |text: &str, arg| {
        TimeArg::parse(text, now).map_err(|message| HistoryCliError::Argument { arg, message })
    };
    let (from, to) = (bound(&args.from, "from")?, bound(&args.to, "to")?);
    let client = HistoryClient::connect(config, Duration::from_secs(args.output.timeout)).await?;
    let spec = args.kind.record_type().spec();
    let mut out = RowWriter::new(
        std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout().lock()),
        args.output.format,
        args.output.tz,
        Column::of(spec),
    );
    let mut cursor: Option<String> = None;
    loop {
        let remaining = args.limit.map(|l| l.saturating_sub(out.rows()));
        if remaining == Some(0) {
            break;
        }
        let page = remaining.map_or(u64::from(MAX_LIMIT), |r| r.min(u64::from(MAX_LIMIT)));
        let mut body = json!({
            "symbol": args.symbol,
            "from": from.wire,
            "to": to.wire,
            "order": args.order,
            "limit": page,
            "cursor": cursor,
        });
        if let Some(interval) = &args.interval {
            body["interval"] = Json::from(interval.as_str());
        }
        let reply = client.ask(args.kind.name(), &body).await?;
        let rows = reply
            .get("rows")
            .and_then(Json::as_array)
            .ok_or_else(|| ClientError::BadReply("no `rows` array".into()))?;
        for row in rows {
            let row = row
                .as_object()
                .ok_or_else(|| ClientError::BadReply("a row is not an object".into()))?;
            if let Err(e) = out.write(row) {
                return quiet_if_reader_gone(e);
            }
        }
        if let Err(e) = out.flush() {
            return quiet_if_reader_gone(e);
        }
        match reply.get("next_cursor").and_then(Json::as_str) {
            Some(next) if !rows.is_empty() => cursor = Some(next.to_string()),
            _ => break,
        }
    }
    if out.rows() == 0 {
        let mut stderr = std::io::stderr();
        let _ = writeln!(
            stderr,
            "no {} for {} from {} to {}",
            args.kind.name(),
            args.symbol.trim().to_ascii_uppercase(),
            args.output.tz.format(from.start),
            args.output.tz.format(to.end),
        );
    }
    Ok(())
}

/// `tickvault history ... | head` ends quietly when `head` has enough.
fn quiet_if_reader_gone(error: std::io::Error) -> Result<(), HistoryCliError> {
    if reader_gone(&error) {
        Ok(())
    } else {
        Err(ClientError::Output(error).into())
    }
}
