//! The `tickvault` command line: a thin edge over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tickvault::{ops, App, Config};

mod tools;

#[derive(Parser)]
#[command(
    name = "tickvault",
    version,
    about = "Persists live market data from NATS into PostgreSQL and serves it back"
)]
struct Cli {
    /// Configuration file (default: ./tickvault.toml when it exists).
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the worker: ingest, history service, HTTP endpoints (the default).
    Run,
    /// Apply the database migrations and exit.
    Migrate,
    /// Print the effective configuration as TOML, secrets shown as ***.
    Config,
    /// Query stored history through the running service.
    History(tools::history::HistoryArgs),
    /// The newest row of each symbol of a watch-list (or of every symbol).
    Latest(tools::latest::LatestArgs),
    /// Every stored symbol of a kind, with its first and last timestamps.
    Symbols(tools::latest::SymbolsArgs),
    /// Inspect and replay dead letters (stats, show, replay).
    Dlq(tools::dlq::DlqArgs),
    /// Back-fill from CSV files (gzip accepted) through the worker's validation and COPY path.
    Import(tools::import::ImportArgs),
    /// Publish a synthetic market feed to NATS.
    Feed(tools::feed::FeedArgs),
    /// Measure ingest throughput against a baseline.
    Bench(tools::bench::BenchArgs),
    /// Exit 0 when the running worker's /ready answers 200.
    Health {
        /// The worker's HTTP address (default: http.addr from the configuration).
        #[arg(long)]
        url: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    ops::logging::init(config.log.format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let command = cli.command.unwrap_or(Command::Run);
    let is_worker = matches!(command, Command::Run);
    match runtime.block_on(dispatch(command, config)) {
        Ok(code) => code,
        Err(e) => {
            // Once: the worker's log, or a tool's stderr.
            let text = error_text(&e);
            if is_worker {
                tracing::error!("{text}");
            } else {
                eprintln!("error: {text}");
            }
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes joined by ": ", leaving out a cause whose text
/// the message already carries (many messages embed their source).
fn error_text(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let part = cause.to_string();
        if !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
    }
    text
}

async fn dispatch(command: Command, config: Config) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run => {
            let app = App::build(config).await.context("cannot start tickvault")?;
            app.run_until_stopped(ops::shutdown::signal()).await?;
        }
        Command::Migrate => {
            let db = tickvault::db::Database::connect_lazy(&config.database)?;
            // A refused login or certificate says which setting to fix.
            db.health_check().await?;
            let storage = db.migrate().await?;
            println!(
                "migrations applied to {} (storage: {storage})",
                config.database.url
            );
        }
        Command::Config => print!("{}", config.to_redacted_toml()),
        Command::History(args) => tools::history::run(&config, args).await?,
        Command::Latest(args) => tools::latest::run_latest(&config, args).await?,
        Command::Symbols(args) => tools::latest::run_symbols(&config, args).await?,
        Command::Dlq(args) => tools::dlq::run(&config, args).await?,
        Command::Import(args) => return tools::import::run(&config, args).await,
        Command::Feed(args) => tools::feed::run(&config, args).await?,
        Command::Bench(args) => tools::bench::run(&config, args).await?,
        Command::Health { url } => {
            let url = url.unwrap_or_else(|| ready_url(&config));
            let client = reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(5))
                .build()?;
            let status = client
                .get(&url)
                .send()
                .await
                .with_context(|| format!("{url} did not answer: is `tickvault run` running?"))?
                .status();
            println!("{url}: {status}");
            if !status.is_success() {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `/ready` at http.addr, with an unspecified address read as loopback.
fn ready_url(config: &Config) -> String {
    let mut addr = config.http.addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    format!("http://{addr}/ready")
}
