//! `tickvault latest` (the newest row of each symbol of a watch-list, or of
//! every symbol) and `tickvault symbols` (each symbol's first and last
//! timestamps): clients of `history.latest` and `history.symbols`.

use std::time::Duration;

use serde_json::{json, Map, Value as Json};

use tickvault::config::Config;
use tickvault::history::request::MAX_SYMBOLS;

use super::client::{ClientError, HistoryClient, Kind};
use super::render::{reader_gone, Column, ColumnKind, Output, RowWriter};

/// The newest row of each symbol (a watch-list), or of every symbol.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  tickvault latest candles FPT VNM HPG\n  \
tickvault latest index\n  tickvault latest ticks FPT --format json --tz utc")]
pub struct LatestArgs {
    #[arg(value_enum)]
    pub kind: Kind,
    /// Symbols in the order to print them (at most 500); none: every symbol, sorted.
    pub symbols: Vec<String>,
    #[command(flatten)]
    pub output: Output,
}

/// Every symbol of a kind with the timestamps of its first and last rows.
#[derive(Debug, clap::Args)]
#[command(after_help = "Example:\n  tickvault symbols ticks")]
pub struct SymbolsArgs {
    #[arg(value_enum)]
    pub kind: Kind,
    #[command(flatten)]
    pub output: Output,
}

#[derive(Debug, thiserror::Error)]
pub enum LatestError {
    #[error("{given} symbols given; at most {MAX_SYMBOLS} per request: split the list")]
    TooManySymbols { given: usize },
    #[error(transparent)]
    Client(#[from] ClientError),
}

pub async fn run_latest(config: &Config, args: LatestArgs) -> Result<(), LatestError> {
    if args.symbols.len() > MAX_SYMBOLS {
        return Err(LatestError::TooManySymbols {
            given: args.symbols.len(),
        });
    }
    let client = HistoryClient::connect(config, Duration::from_secs(args.output.timeout)).await?;
    let mut body = json!({"kind": args.kind.name()});
    if !args.symbols.is_empty() {
        body["symbols"] = json!(args.symbols);
    }
    let reply = client.ask("latest", &body).await?;
    let rows = items(&reply, "rows")?;
    let spec = args.kind.record_type().spec();
    print(&args.output, Column::of(spec), &rows)?;
    let found: Vec<&str> = rows
        .iter()
        .filter_map(|r| r.get(spec.id_field()).and_then(Json::as_str))
        .collect();
    let missing: Vec<String> = args
        .symbols
        .iter()
        .map(|s| s.trim().to_ascii_uppercase())
        .filter(|s| !found.contains(&s.as_str()))
        .collect();
    if rows.is_empty() && args.symbols.is_empty() {
        eprintln!("no {} stored", args.kind.name());
    } else if !missing.is_empty() {
        eprintln!("no {} for {}", args.kind.name(), missing.join(", "));
    }
    Ok(())
}

pub async fn run_symbols(config: &Config, args: SymbolsArgs) -> Result<(), LatestError> {
    let client = HistoryClient::connect(config, Duration::from_secs(args.output.timeout)).await?;
    let reply = client
        .ask("symbols", &json!({"kind": args.kind.name()}))
        .await?;
    let symbols = items(&reply, "symbols")?;
    let columns = vec![
        Column::new("symbol", ColumnKind::Text),
        Column::new("first", ColumnKind::Timestamp),
        Column::new("last", ColumnKind::Timestamp),
    ];
    print(&args.output, columns, &symbols)?;
    if symbols.is_empty() {
        eprintln!("no {} stored", args.kind.name());
    }
    Ok(())
}

/// The objects of the reply's array `field`.
fn items<'a>(reply: &'a Json, field: &str) -> Result<Vec<&'a Map<String, Json>>, ClientError> {
    reply
        .get(field)
        .and_then(Json::as_array)
        .ok_or_else(|| ClientError::BadReply(format!("no `{field}` array")))?
        .iter()
        .map(|item| {
            item.as_object().ok_or_else(|| {
                ClientError::BadReply(format!("an item of `{field}` is not an object"))
            })
        })
        .collect()
}

fn print(
    output: &Output,
    columns: Vec<Column>,
    rows: &[&Map<String, Json>],
) -> Result<(), ClientError> {
    let mut out = RowWriter::new(std::io::stdout().lock(), output.format, output.tz, columns);
    let written = rows
        .iter()
        .try_for_each(|row| out.write(row))
        .and_then(|()| out.flush());
    match written {
        Err(e) if !reader_gone(&e) => Err(ClientError::Output(e)),
        _ => Ok(()),
    }
}
