//! `tickvault history`: asks the running history service, follows
//! `next_cursor` to the end (or `--limit` rows), prints the rows.

use std::process::ExitCode;
use std::time::Duration;

use serde_json::{Map, Value as Json};

use tickvault::config::Config;
use tickvault::history::request::MAX_LIMIT;
use tickvault::records::RecordType;

/// What to ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    Ticks,
    Candles,
    Foreign,
    Index,
    Derivatives,
}

impl Kind {
    pub fn record_type(self) -> RecordType {
        match self {
            Kind::Ticks => RecordType::Tick,
            Kind::Candles => RecordType::Candle,
            Kind::Foreign => RecordType::Foreign,
            Kind::Index => RecordType::Index,
            Kind::Derivatives => RecordType::Deriv,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns with a header.
    Table,
    /// JSON lines: one JSON object per row, fields in column order.
    Json,
    /// A header line, then one comma-separated line per row.
    Csv,
}

/// Query stored history through the running `tickvault-history` service.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Dates are market days (Asia/Ho_Chi_Minh, UTC+7); --to YYYY-MM-DD includes that day.\n\
Examples:\n  tickvault history ticks FPT --from 2026-11-26 --to 2026-11-26\n  \
tickvault history candles VNM --from 2026-11-20 --to 2026-11-26 --interval 1h --format csv"
)]
pub struct HistoryArgs {
    /// What to read.
    #[arg(value_enum)]
    pub kind: Kind,
    /// Symbol, index name (VNINDEX) or futures contract (VN30F2412).
    pub symbol: String,
    /// First day (YYYY-MM-DD, market time) or RFC 3339 timestamp (inclusive).
    #[arg(long)]
    pub from: String,
    /// Last day (YYYY-MM-DD, included) or RFC 3339 timestamp (exclusive).
    #[arg(long)]
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
    /// Output: table (aligned columns), json (JSON lines, one object per row) or csv.
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
    /// Seconds to wait for each reply.
    #[arg(long, default_value_t = 30)]
    pub timeout: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Connect(#[from] tickvault::nats::NatsError),
    #[error("no answer on {subject}: {message}; is `tickvault run` running with history.subject_prefix as configured here?")]
    Request { subject: String, message: String },
    #[error("the service sent a reply that is not valid history JSON: {0}")]
    BadReply(String),
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
}

/// Runs the request; exits 1 (after printing the service's message on
/// stderr) when the service answers with an error.
pub async fn run(config: &Config, args: HistoryArgs) -> Result<ExitCode, ClientError> {
    let client = tickvault::nats::connect(&config.nats, |options| {
        options
            .name("tickvault-history-cli")
            .request_timeout(Some(Duration::from_secs(args.timeout.max(1))))
            .connection_timeout(Duration::from_secs(args.timeout.clamp(1, 10)))
    })
    .await?;
    let subject = format!(
        "{}.{}",
        config.history.subject_prefix,
        args.kind.record_type().spec().history_kind
    );
    let mut rows: Vec<Map<String, Json>> = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let remaining = args.limit.map(|l| l.saturating_sub(rows.len() as u64));
        if remaining == Some(0) {
            break;
        }
        let page = remaining.map_or(MAX_LIMIT as u64, |r| r.min(MAX_LIMIT as u64));
        let mut body = serde_json::json!({
            "symbol": args.symbol,
            "from": args.from,
            "to": args.to,
            "order": args.order,
            "limit": page,
            "cursor": cursor,
        });
        if let Some(interval) = &args.interval {
            body["interval"] = Json::from(interval.as_str());
        }
        let reply = client
            .request(subject.clone(), body.to_string().into())
            .await
            .map_err(|e| ClientError::Request {
                subject: subject.clone(),
                message: e.to_string(),
            })?;
        let reply: Json = serde_json::from_slice(&reply.payload)
            .map_err(|e| ClientError::BadReply(e.to_string()))?;
        if let Some(error) = reply.get("error") {
            let code = error.get("code").and_then(Json::as_u64).unwrap_or(0);
            let message = error.get("message").and_then(Json::as_str).unwrap_or("");
            match error.get("retry_after_s").and_then(Json::as_u64) {
                Some(s) => eprintln!("error {code}: {message} (retry after {s} s)"),
                None => eprintln!("error {code}: {message}"),
            }
            return Ok(ExitCode::FAILURE);
        }
        let page_rows = reply
            .get("rows")
            .and_then(Json::as_array)
            .ok_or_else(|| ClientError::BadReply("no `rows` array".into()))?;
        for row in page_rows {
            let object = row
                .as_object()
                .ok_or_else(|| ClientError::BadReply("a row is not an object".into()))?;
            rows.push(object.clone());
        }
        match reply.get("next_cursor").and_then(Json::as_str) {
            Some(next) if !page_rows.is_empty() => cursor = Some(next.to_string()),
            _ => break,
        }
    }
    if let Some(limit) = args.limit {
        rows.truncate(limit as usize);
    }
    let columns: Vec<&str> = args.kind.record_type().spec().column_names().collect();
    let text = render(&columns, &rows, args.format);
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// Prints `rows` with `columns` in that order. Pure, for the tests.
pub fn render(columns: &[&str], rows: &[Map<String, Json>], format: Format) -> String {
    let cell = |row: &Map<String, Json>, column: &str| -> String {
        match row.get(column) {
            None | Some(Json::Null) => String::new(),
            Some(Json::String(s)) => s.clone(),
            Some(other) => other.to_string(),
        }
    };
    let mut out = String::new();
    match format {
        Format::Json => {
            for row in rows {
                let fields: Vec<String> = columns
                    .iter()
                    .map(|c| {
                        format!(
                            "{}:{}",
                            Json::from(*c),
                            row.get(*c).cloned().unwrap_or(Json::Null)
                        )
                    })
                    .collect();
                out.push('{');
                out.push_str(&fields.join(","));
                out.push_str("}\n");
            }
        }
        Format::Csv => {
            let line = |cells: Vec<String>| {
                cells
                    .into_iter()
                    .map(|c| {
                        if c.contains([',', '"', '\n', '\r']) {
                            format!("\"{}\"", c.replace('"', "\"\""))
                        } else {
                            c
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(",")
            };
            out.push_str(&line(columns.iter().map(|c| c.to_string()).collect()));
            out.push('\n');
            for row in rows {
                out.push_str(&line(columns.iter().map(|c| cell(row, c)).collect()));
                out.push('\n');
            }
        }
        Format::Table => {
            let cells: Vec<Vec<String>> = rows
                .iter()
                .map(|row| columns.iter().map(|c| cell(row, c)).collect())
                .collect();
            let widths: Vec<usize> = columns
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    cells
                        .iter()
                        .map(|r| r[i].chars().count())
                        .chain([c.len()])
                        .max()
                        .unwrap_or(0)
                })
                .collect();
            let line = |values: &[String]| {
                values
                    .iter()
                    .zip(&widths)
                    .map(|(v, w)| format!("{v:<w$}"))
                    .collect::<Vec<_>>()
                    .join("  ")
                    .trim_end()
                    .to_string()
            };
            let header: Vec<String> = columns.iter().map(|c| c.to_string()).collect();
            out.push_str(&line(&header));
            out.push('\n');
            for row in &cells {
                out.push_str(&line(row));
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rows() -> Vec<Map<String, Json>> {
        [
            json!({"value": null, "symbol": "FPT", "timestamp": "2026-11-26T02:15:00Z", "close": 97.5}),
            json!({"symbol": "FPT", "timestamp": "2026-11-26T02:16:00Z", "close": 100, "value": 1.5e9}),
        ]
        .into_iter()
        .map(|v| v.as_object().unwrap().clone())
        .collect()
    }

    const COLUMNS: [&str; 4] = ["symbol", "timestamp", "close", "value"];

    #[test]
    fn json_lines_keep_column_order() {
        let text = render(&COLUMNS, &rows(), Format::Json);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            r#"{"symbol":"FPT","timestamp":"2026-11-26T02:15:00Z","close":97.5,"value":null}"#
        );
        let back: Json = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(back["value"], json!(1.5e9));
        assert_eq!(render(&COLUMNS, &[], Format::Json), "");
    }

    #[test]
    fn csv_has_a_header_and_quotes_when_needed() {
        let text = render(&COLUMNS, &rows(), Format::Csv);
        assert_eq!(
            text,
            "symbol,timestamp,close,value\nFPT,2026-11-26T02:15:00Z,97.5,\nFPT,2026-11-26T02:16:00Z,100,1500000000.0\n"
        );
        let mut odd = rows();
        odd[0].insert("symbol".into(), json!("A,\"B\""));
        assert!(render(&COLUMNS, &odd, Format::Csv).contains("\"A,\"\"B\"\"\""));
    }

    #[test]
    fn table_columns_are_aligned() {
        let text = render(&COLUMNS, &rows(), Format::Table);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        let at = lines[0].find("close").unwrap();
        assert_eq!(&lines[1][at..at + 4], "97.5");
        assert_eq!(&lines[2][at..at + 3], "100");
        assert!(lines[0].starts_with("symbol  timestamp"));
    }
}
