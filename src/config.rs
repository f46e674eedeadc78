//! Configuration: built-in defaults → TOML file → `TICKVAULT_*` environment →
//! the conventional `DATABASE_URL`, `NATS_URL`, `DB_POOL_MIN`, `DB_POOL_MAX`.
//!
//! Every key has its default here, in `Default` impls, and nowhere else.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::secret::{Secret, SecretUrl};

/// The file read when no `--config` is given (it may be absent).
pub const DEFAULT_CONFIG_FILE: &str = "tickvault.toml";

/// Why a configuration could not be used. Each variant names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {path} was not found: check the --config path")]
    FileNotFound { path: String },
    #[error("invalid configuration key `{key}`: {message}{origin}")]
    Parse {
        key: String,
        message: String,
        origin: String,
    },
    #[error("invalid configuration key `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

/// The whole configuration of a tickvault worker.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub database: DatabaseConfig,
    pub nats: NatsConfig,
    pub ingest: IngestConfig,
    pub history: HistoryConfig,
    pub http: HttpConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// PostgreSQL connection URL (`DATABASE_URL`). Its password never reaches logs.
    pub url: SecretUrl,
    /// Connections the pool keeps open (`DB_POOL_MIN`).
    pub pool_min: u32,
    /// Most connections the pool opens (`DB_POOL_MAX`).
    pub pool_max: u32,
    /// How long a query waits for a free connection before failing.
    pub acquire_timeout_ms: u64,
    /// Apply the embedded migrations when `tickvault run` starts.
    pub migrate_on_start: bool,
    /// TimescaleDB only: compress chunks older than this (a PostgreSQL interval; empty = never).
    pub compress_after: String,
    /// TimescaleDB only: drop chunks older than this (a PostgreSQL interval; empty = keep forever).
    pub retention: String,
    /// TLS to the server: `disable`, `prefer`, `require`, `verify-ca` or
    /// `verify-full`. Unset: the URL's `sslmode`, else `prefer` (as libpq).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sslmode: Option<SslMode>,
    /// CA certificate(s) (PEM) the server's certificate must chain to, besides the system's; beats the URL's `sslrootcert`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sslrootcert: Option<PathBuf>,
    /// Client certificate (PEM) for certificate authentication; beats the URL's `sslcert`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sslcert: Option<PathBuf>,
    /// The client certificate's private key (PEM); beats the URL's `sslkey`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sslkey: Option<PathBuf>,
    /// A file whose content (trailing newline trimmed) is the password; beats
    /// a password in the URL. Any character works, nothing to percent-encode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Server-side bound on each history query, in milliseconds: a slower
    /// one is cancelled by PostgreSQL and answered 503.
    pub statement_timeout_ms: u64,
}

/// PostgreSQL's `sslmode`, as libpq spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// TLS when the server offers it, without checking its certificate.
    Prefer,
    /// TLS always, without checking the certificate.
    Require,
    /// TLS always; the certificate must chain to a trusted CA.
    VerifyCa,
    /// As `verify-ca`, and the certificate must name the host connected to.
    VerifyFull,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: SecretUrl::new("postgres://postgres@127.0.0.1:5432/postgres"),
            pool_min: 2,
            pool_max: 10,
            acquire_timeout_ms: 5_000,
            migrate_on_start: true,
            compress_after: "7 days".into(),
            retention: String::new(),
            sslmode: None,
            sslrootcert: None,
            sslcert: None,
            sslkey: None,
            password_file: None,
            statement_timeout_ms: 5_000,
        }
    }
}

/// The `nats.*` settings. Credentials come from at most one method (user +
/// password file, token file, NKey seed file or `.creds` file); a method set
/// here beats credentials in `nats.url`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// NATS server URL, or a comma-separated list of a cluster's servers
    /// (`NATS_URL`); user, password or token in it never reach logs.
    pub url: SecretUrl,
    /// Name this client reports to the server.
    pub client_name: String,
    /// User name, with `nats.password_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// A file holding the password of `nats.user`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// A file holding an authentication token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// A file holding an NKey seed (`SU...`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nkey_file: Option<PathBuf>,
    /// A `.creds` file: a user JWT and its NKey seed (decentralized auth).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub creds_file: Option<PathBuf>,
    /// CA certificate(s) (PEM) the server's certificate must chain to,
    /// instead of the system's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM), for servers that verify clients.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// Refuse a server that does not offer TLS (also implied by `tls://` URLs).
    pub tls_required: bool,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: SecretUrl::new("nats://127.0.0.1:4222"),
            client_name: "tickvault".into(),
            user: None,
            password_file: None,
            token_file: None,
            nkey_file: None,
            creds_file: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            tls_required: false,
        }
    }
}

impl DatabaseConfig {
    pub fn acquire_timeout(&self) -> Duration {
        Duration::from_millis(self.acquire_timeout_ms)
    }

    pub fn statement_timeout(&self) -> Duration {
        Duration::from_millis(self.statement_timeout_ms)
    }
}

/// How messages are taken from NATS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IngestMode {
    /// Durable pull consumers, ack after commit: nothing is lost.
    Jetstream,
    /// Plain queue-group subscriptions: at-most-once.
    Core,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestConfig {
    /// `jetstream` (default) or `core`.
    pub mode: IngestMode,
    /// JetStream stream holding the feed; its dead letters go to `<stream>_DLQ`.
    pub stream: String,
    /// First subject token of the feed's subjects (`md.tick.FPT`).
    pub subject_prefix: String,
    /// Rows waiting in a type's queue that trigger a flush.
    pub batch_size: usize,
    /// Milliseconds after the first waiting row that trigger a flush.
    pub flush_interval_ms: u64,
    /// Most rows one flush writes when rows piled up behind a slow flush (group commit).
    pub max_batch_rows: usize,
    /// Flushes of one type written at once, each on its own connection,
    /// when a backlog waits (batches in flight together never share a key).
    pub flushes_in_flight: usize,
    /// Rows a type may hold in memory; when full, that type stops taking messages.
    pub queue_capacity: usize,
    /// Most records one message may carry.
    pub max_records_per_message: usize,
    /// Largest payload accepted, in bytes.
    pub max_message_bytes: usize,
    /// Seconds JetStream waits for an ack before redelivering.
    pub ack_wait_secs: u64,
    /// Messages asked for per JetStream pull.
    pub fetch_batch: usize,
    /// Oldest message the stream keeps, in seconds (0 = no limit). Used only when tickvault creates the stream.
    pub stream_max_age_secs: u64,
    /// Largest size of the stream in bytes (-1 = no limit). Used only when tickvault creates the stream.
    pub stream_max_bytes: i64,
    /// Copies a JetStream cluster keeps of the feed and dead-letter streams
    /// (1-5; 3 on a 3-node cluster). Used only when tickvault creates them.
    pub stream_replicas: usize,
    /// Milliseconds between two readings of each type's consumer state
    /// (pending, ack-pending, oldest unacknowledged message) for the lag
    /// metrics; off the delivery path, so they move during a stall too.
    pub lag_interval_ms: u64,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            mode: IngestMode::Jetstream,
            stream: "MARKET_DATA".into(),
            subject_prefix: "md".into(),
            batch_size: 500,
            flush_interval_ms: 1_000,
            max_batch_rows: 5_000,
            flushes_in_flight: 2,
            queue_capacity: 10_000,
            max_records_per_message: 1_000,
            max_message_bytes: 1024 * 1024,
            ack_wait_secs: 30,
            fetch_batch: 500,
            stream_max_age_secs: 7 * 24 * 3600,
            stream_max_bytes: -1,
            stream_replicas: 1,
            lag_interval_ms: 5_000,
        }
    }
}

impl IngestConfig {
    pub fn flush_interval(&self) -> Duration {
        Duration::from_millis(self.flush_interval_ms)
    }

    pub fn ack_wait(&self) -> Duration {
        Duration::from_secs(self.ack_wait_secs)
    }

    pub fn lag_interval(&self) -> Duration {
        Duration::from_millis(self.lag_interval_ms)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HistoryConfig {
    /// First subject token of the history endpoints (`history.ticks`).
    pub subject_prefix: String,
    /// The database history reads, typically a streaming read replica.
    /// Unset: the ingest database (`database.url`), through its pool. Its
    /// password never reaches logs; see [`Config::history_database`] for the
    /// `database.*` settings that apply to it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<SecretUrl>,
    /// Connections of the pool to `history.database_url`: one is kept for
    /// its health check, the others answer requests, one each.
    pub pool_max: u32,
    /// Largest request body accepted, in bytes; a larger one is a 400 before
    /// it is parsed. A 500-symbol `latest` request is about 20 KiB.
    pub max_request_bytes: usize,
    /// Most requests waiting for a free slot; beyond it a request is a 503.
    pub max_queued_requests: usize,
    /// Most request bytes (bodies as received) waiting for a free slot;
    /// beyond it a request is a 503.
    pub max_queued_bytes: usize,
    /// Milliseconds a request may wait for a free slot: one that waited
    /// longer is answered 503 and never run.
    pub queue_deadline_ms: u64,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            subject_prefix: "history".into(),
            database_url: None,
            pool_max: 6,
            max_request_bytes: 64 * 1024,
            max_queued_requests: 256,
            max_queued_bytes: 8 * 1024 * 1024,
            queue_deadline_ms: 3_000,
        }
    }
}

impl HistoryConfig {
    pub fn queue_deadline(&self) -> Duration {
        Duration::from_millis(self.queue_deadline_ms)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of `/metrics`, `/health` and `/ready` (port 0 picks a free port).
    pub addr: SocketAddr,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([0, 0, 0, 0], 9464)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `pretty` (default) or `json`. The filter comes from `RUST_LOG`.
    pub format: LogFormat,
    /// Seconds between the worker's summary lines at info (rows/s per type,
    /// consumer pending, dead letters); 0 turns them off.
    pub summary_interval_secs: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Pretty,
            summary_interval_secs: 60,
        }
    }
}

impl Config {
    /// Layers defaults, the TOML file, `TICKVAULT_*` and the conventional
    /// variables, then validates. `file = None` reads `tickvault.toml` if present.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let figment = match file {
            Some(path) if !path.exists() => {
                return Err(ConfigError::FileNotFound {
                    path: path.display().to_string(),
                })
            }
            Some(path) => Self::figment(path),
            None => Self::figment(Path::new(DEFAULT_CONFIG_FILE)),
        };
        let config: Config = figment.extract().map_err(ConfigError::from)?;
        config.validate()?;
        Ok(config)
    }

    fn figment(file: &Path) -> Figment {
        Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::file(file))
            .merge(Env::prefixed("TICKVAULT_").split("__"))
            .merge(
                Env::raw()
                    .only(&["DATABASE_URL"])
                    .map(|_| "database.url".into()),
            )
            .merge(Env::raw().only(&["NATS_URL"]).map(|_| "nats.url".into()))
            .merge(
                Env::raw()
                    .only(&["DB_POOL_MIN"])
                    .map(|_| "database.pool_min".into()),
            )
            .merge(
                Env::raw()
                    .only(&["DB_POOL_MAX"])
                    .map(|_| "database.pool_max".into()),
            )
    }

    /// Checks what types alone cannot; each error names its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let db = &self.database;
        let url = postgres_url("database.url", &db.url)?;
        if db.pool_max == 0 {
            return Err(invalid("database.pool_max", "must be at least 1"));
        }
        if db.pool_min > db.pool_max {
            return Err(invalid(
                "database.pool_min",
                format!(
                    "{} is more than database.pool_max ({})",
                    db.pool_min, db.pool_max
                ),
            ));
        }
        if db.acquire_timeout_ms == 0 {
            return Err(invalid("database.acquire_timeout_ms", "must be at least 1"));
        }
        if db.statement_timeout_ms == 0 {
            return Err(invalid(
                "database.statement_timeout_ms",
                "must be at least 1",
            ));
        }
        validate_database_tls(db)?;
        validate_url_parameters("database.url", db, &url)?;
        if let Some(history_url) = &self.history.database_url {
            let url = postgres_url("history.database_url", history_url)?;
            validate_url_parameters("history.database_url", db, &url)?;
        }
        if self.history.pool_max < 2 {
            return Err(invalid(
                "history.pool_max",
                "must be at least 2: one connection for the health check, the others for requests",
            ));
        }
        validate_nats(&self.nats)?;
        let ingest = &self.ingest;
        let history = &self.history;
        for (key, value) in [
            ("ingest.stream", &ingest.stream),
            ("ingest.subject_prefix", &ingest.subject_prefix),
            ("history.subject_prefix", &self.history.subject_prefix),
        ] {
            if !is_subject_token(value) {
                return Err(invalid(
                    key,
                    format!("{value:?} must be one NATS token of letters, digits, '_' or '-'"),
                ));
            }
        }
        let positive = [
            ("ingest.batch_size", ingest.batch_size as u64),
            ("ingest.flush_interval_ms", ingest.flush_interval_ms),
            ("ingest.max_batch_rows", ingest.max_batch_rows as u64),
            ("ingest.flushes_in_flight", ingest.flushes_in_flight as u64),
            ("ingest.queue_capacity", ingest.queue_capacity as u64),
            (
                "ingest.max_records_per_message",
                ingest.max_records_per_message as u64,
            ),
            ("ingest.max_message_bytes", ingest.max_message_bytes as u64),
            ("ingest.ack_wait_secs", ingest.ack_wait_secs),
            ("ingest.fetch_batch", ingest.fetch_batch as u64),
            (
                "history.max_request_bytes",
                history.max_request_bytes as u64,
            ),
            (
                "history.max_queued_requests",
                history.max_queued_requests as u64,
            ),
            ("history.max_queued_bytes", history.max_queued_bytes as u64),
            ("history.queue_deadline_ms", history.queue_deadline_ms),
            ("ingest.lag_interval_ms", ingest.lag_interval_ms),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if !(1..=5).contains(&ingest.stream_replicas) {
            return Err(invalid(
                "ingest.stream_replicas",
                format!(
                    "{} is not 1 to 5 (JetStream keeps at most 5 replicas; a cluster needs at least as many servers)",
                    ingest.stream_replicas
                ),
            ));
        }
        // Upper bounds keep sizes within what the queue and NATS can count.
        let bounded = [
            ("ingest.queue_capacity", ingest.queue_capacity, 10_000_000),
            ("ingest.max_batch_rows", ingest.max_batch_rows, 1_000_000),
            ("ingest.flushes_in_flight", ingest.flushes_in_flight, 64),
            ("ingest.fetch_batch", ingest.fetch_batch, 10_000),
            (
                "ingest.lag_interval_ms",
                ingest.lag_interval_ms as usize,
                3_600_000,
            ),
            (
                "ingest.max_message_bytes",
                ingest.max_message_bytes,
                64 * 1024 * 1024,
            ),
            (
                "history.max_request_bytes",
                history.max_request_bytes,
                64 * 1024 * 1024,
            ),
            (
                "history.max_queued_requests",
                history.max_queued_requests,
                1_000_000,
            ),
            (
                "history.max_queued_bytes",
                history.max_queued_bytes,
                1024 * 1024 * 1024,
            ),
        ];
        for (key, value, max) in bounded {
            if value > max {
                return Err(invalid(
                    key,
                    format!("{value} is more than the maximum {max}"),
                ));
            }
        }
        // Reading consumer info often makes nats-server 2.9 deliver far slower
        // (measured: every 100 ms, ~100x; every 5 s, no measurable cost).
        if ingest.lag_interval_ms < 1_000 {
            return Err(invalid(
                "ingest.lag_interval_ms",
                "must be at least 1000: reading the consumers' state more often slows JetStream deliveries",
            ));
        }
        if self.log.summary_interval_secs > 86_400 {
            return Err(invalid(
                "log.summary_interval_secs",
                "must be at most 86400 (a day); 0 turns the summary off",
            ));
        }
        if ingest.max_batch_rows < ingest.batch_size {
            return Err(invalid(
                "ingest.max_batch_rows",
                "must be at least ingest.batch_size",
            ));
        }
        if history.max_queued_bytes < history.max_request_bytes {
            return Err(invalid(
                "history.max_queued_bytes",
                "must be at least history.max_request_bytes, or a request of the largest size could never wait for a slot",
            ));
        }
        if ingest.queue_capacity < ingest.max_records_per_message {
            return Err(invalid(
                "ingest.queue_capacity",
                "must hold at least ingest.max_records_per_message rows, or one full message could never be queued",
            ));
        }
        Ok(())
    }

    /// The connection settings of `history.database_url`, when set: that
    /// URL, a pool of `history.pool_max` opened on demand, and every other
    /// `database.*` setting as the ingest database has it (TLS, password
    /// file, timeouts), since a streaming replica has the primary's roles
    /// and usually its CA. Migrations and TimescaleDB policies are the
    /// primary's business: the replica receives them through replication.
    pub fn history_database(&self) -> Option<DatabaseConfig> {
        let url = self.history.database_url.clone()?;
        Some(DatabaseConfig {
            url,
            pool_min: 0,
            pool_max: self.history.pool_max,
            migrate_on_start: false,
            ..self.database.clone()
        })
    }

    /// The effective configuration as TOML, with every secret shown as `***`.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the configuration always serializes to TOML")
    }
}

impl From<figment::Error> for ConfigError {
    /// Names the key as `section.key`, whichever provider (file, environment) it came from.
    fn from(error: figment::Error) -> Self {
        let origin = error
            .metadata
            .as_ref()
            .map(|m| format!(" (from {})", m.name))
            .unwrap_or_default();
        ConfigError::Parse {
            key: error.path.join(".").to_lowercase(),
            message: error.kind.to_string(),
            origin,
        }
    }
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// A file named by `key` must be readable now, so a typo stops start-up
/// instead of failing every connection later.
fn readable(key: &'static str, path: &Path) -> Result<(), ConfigError> {
    std::fs::File::open(path)
        .map(drop)
        .map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))
}

/// A secret file named by `key` must be readable and not empty.
fn secret_file(key: &'static str, path: &Path) -> Result<Secret, ConfigError> {
    Secret::read_file(path).map_err(|e| invalid(key, e.to_string()))
}

/// A PostgreSQL URL, as the client will read it.
fn postgres_url(key: &'static str, url: &SecretUrl) -> Result<url::Url, ConfigError> {
    let parsed = url.parse().map_err(|e| invalid(key, e))?;
    if !matches!(parsed.scheme(), "postgres" | "postgresql") {
        return Err(invalid(key, "must start with postgres:// or postgresql://"));
    }
    // What the client itself refuses (a port, `hostaddr`, ...); its
    // message carries no part of the URL.
    <sqlx::postgres::PgConnectOptions as std::str::FromStr>::from_str(url.expose())
        .map_err(|e| invalid(key, format!("cannot be used: {e}")))?;
    Ok(parsed)
}

fn validate_database_tls(db: &DatabaseConfig) -> Result<(), ConfigError> {
    if db.sslcert.is_some() != db.sslkey.is_some() {
        let missing = if db.sslcert.is_some() {
            "database.sslkey"
        } else {
            "database.sslcert"
        };
        return Err(invalid(
            missing,
            "database.sslcert and database.sslkey go together",
        ));
    }
    for (key, path) in [
        ("database.sslrootcert", &db.sslrootcert),
        ("database.sslcert", &db.sslcert),
        ("database.sslkey", &db.sslkey),
    ] {
        if let Some(path) = path {
            readable(key, path)?;
        }
    }
    if let Some(path) = &db.password_file {
        secret_file("database.password_file", path)?;
    }
    Ok(())
}

/// The TLS files and `sslmode` given as parameters of the URL of `key` (a
/// `database.*` setting replaces them).
fn validate_url_parameters(
    key: &'static str,
    db: &DatabaseConfig,
    url: &url::Url,
) -> Result<(), ConfigError> {
    for (name, value) in url.query_pairs() {
        let setting = match name.as_ref() {
            "sslrootcert" | "ssl-root-cert" | "ssl-ca" => &db.sslrootcert,
            "sslcert" | "ssl-cert" => &db.sslcert,
            "sslkey" | "ssl-key" => &db.sslkey,
            "sslmode" | "ssl-mode" => {
                if value.parse::<sqlx::postgres::PgSslMode>().is_err() {
                    return Err(invalid(
                        key,
                        format!("sslmode={value} is not one of disable, prefer, require, verify-ca, verify-full"),
                    ));
                }
                continue;
            }
            _ => continue,
        };
        if setting.is_none() {
            readable(key, Path::new(value.as_ref()))?;
        }
    }
    Ok(())
}

fn validate_nats(nats: &NatsConfig) -> Result<(), ConfigError> {
    let servers = nats.url.parse_list().map_err(|e| invalid("nats.url", e))?;
    for server in &servers {
        if !matches!(server.scheme(), "nats" | "tls" | "ws" | "wss") {
            return Err(invalid(
                "nats.url",
                "each server must start with nats://, tls://, ws:// or wss://",
            ));
        }
    }
    // async-nats sends one set of credentials to whichever server it reaches.
    let in_url: Vec<(&str, Option<&str>)> = servers
        .iter()
        .filter(|s| !s.username().is_empty())
        .map(|s| (s.username(), s.password()))
        .collect();
    if in_url.windows(2).any(|pair| pair[0] != pair[1]) {
        return Err(invalid(
            "nats.url",
            "its servers carry different credentials; one set is used for every server: give the same to each, or use nats.user / nats.password_file",
        ));
    }
    if nats.user.is_some() != nats.password_file.is_some() {
        let missing = if nats.user.is_some() {
            "nats.password_file"
        } else {
            "nats.user"
        };
        return Err(invalid(
            missing,
            "nats.user and nats.password_file go together",
        ));
    }
    let methods: Vec<&'static str> = [
        ("nats.user", nats.user.is_some()),
        ("nats.token_file", nats.token_file.is_some()),
        ("nats.nkey_file", nats.nkey_file.is_some()),
        ("nats.creds_file", nats.creds_file.is_some()),
    ]
    .into_iter()
    .filter_map(|(key, set)| set.then_some(key))
    .collect();
    if methods.len() > 1 {
        return Err(invalid(
            methods[1],
            format!("set one way to authenticate, not {}", methods.join(" and ")),
        ));
    }
    if let Some(path) = &nats.password_file {
        secret_file("nats.password_file", path)?;
    }
    if let Some(path) = &nats.token_file {
        secret_file("nats.token_file", path)?;
    }
    if let Some(path) = &nats.nkey_file {
        let seed = secret_file("nats.nkey_file", path)?;
        nkeys::KeyPair::from_seed(seed.expose().trim()).map_err(|_| {
            invalid(
                "nats.nkey_file",
                format!("{} does not hold an NKey seed (SU...)", path.display()),
            )
        })?;
    }
    if let Some(path) = &nats.creds_file {
        let creds = secret_file("nats.creds_file", path)?;
        crate::nats::with_creds(async_nats::ConnectOptions::new(), &creds).map_err(|e| {
            invalid(
                "nats.creds_file",
                format!("{} is not a NATS .creds file ({e})", path.display()),
            )
        })?;
    }
    if nats.tls_cert.is_some() != nats.tls_key.is_some() {
        let missing = if nats.tls_cert.is_some() {
            "nats.tls_key"
        } else {
            "nats.tls_cert"
        };
        return Err(invalid(
            missing,
            "nats.tls_cert and nats.tls_key go together",
        ));
    }
    for (key, path) in [
        ("nats.tls_ca", &nats.tls_ca),
        ("nats.tls_cert", &nats.tls_cert),
        ("nats.tls_key", &nats.tls_key),
    ] {
        if let Some(path) = path {
            readable(key, path)?;
        }
    }
    Ok(())
}

fn is_subject_token(value: &str) -> bool {
    !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

#[cfg(test)]
mod tests {
    // figment's Jail returns its large error type; that is its API, not ours.
    #![allow(clippy::result_large_err)]

    use super::*;
    use figment::Jail;

    fn load_in_jail() -> Result<Config, ConfigError> {
        Config::load(None)
    }

    #[test]
    fn defaults_match_the_contract() {
        Jail::expect_with(|_| {
            let config = load_in_jail().unwrap();
            assert_eq!(
                config.database.url.expose(),
                "postgres://postgres@127.0.0.1:5432/postgres"
            );
            assert_eq!(
                (config.database.pool_min, config.database.pool_max),
                (2, 10)
            );
            assert!(config.database.migrate_on_start);
            assert_eq!(config.nats.url.expose(), "nats://127.0.0.1:4222");
            assert_eq!(config.ingest.mode, IngestMode::Jetstream);
            assert_eq!(config.ingest.stream, "MARKET_DATA");
            assert_eq!(config.ingest.subject_prefix, "md");
            assert_eq!(config.ingest.batch_size, 500);
            assert_eq!(config.ingest.flush_interval_ms, 1000);
            assert_eq!(config.ingest.queue_capacity, 10_000);
            assert_eq!(config.ingest.max_records_per_message, 1000);
            assert_eq!(config.history.subject_prefix, "history");
            assert_eq!(config.history.max_request_bytes, 65_536);
            assert_eq!(config.history.queue_deadline_ms, 3_000);
            assert_eq!(config.http.addr.to_string(), "0.0.0.0:9464");
            assert_eq!(config.log.format, LogFormat::Pretty);
            assert_eq!(config.database.sslmode, None, "the URL's, else prefer");
            assert_eq!(config.database.statement_timeout_ms, 5000);
            assert!(config.database.password_file.is_none());
            assert!(config.nats.user.is_none() && config.nats.creds_file.is_none());
            assert!(!config.nats.tls_required);
            assert_eq!(config.ingest.stream_replicas, 1);
            assert!(config.history.database_url.is_none());
            assert!(
                config.history_database().is_none(),
                "history reads the ingest database"
            );
            Ok(())
        });
    }

    #[test]
    fn the_history_database_shares_the_database_settings_but_the_url_and_pool() {
        Jail::expect_with(|jail| {
            jail.create_file("db-password", "s3cret\n")?;
            jail.create_file("ca.pem", "not checked here")?;
            jail.set_env("DATABASE_URL", "postgres://app@primary:5432/market");
            jail.set_env("TICKVAULT_DATABASE__PASSWORD_FILE", "db-password");
            jail.set_env("TICKVAULT_DATABASE__SSLMODE", "verify-full");
            jail.set_env("TICKVAULT_DATABASE__SSLROOTCERT", "ca.pem");
            jail.set_env("TICKVAULT_DATABASE__STATEMENT_TIMEOUT_MS", "750");
            jail.set_env(
                "TICKVAULT_HISTORY__DATABASE_URL",
                "postgres://app:hunter2@replica:5432/market",
            );
            jail.set_env("TICKVAULT_HISTORY__POOL_MAX", "3");
            jail.set_env("TICKVAULT_INGEST__STREAM_REPLICAS", "3");
            let config = load_in_jail().unwrap();
            assert_eq!(config.ingest.stream_replicas, 3);
            let replica = config.history_database().unwrap();
            assert_eq!(
                replica.url.expose(),
                "postgres://app:hunter2@replica:5432/market"
            );
            assert_eq!((replica.pool_min, replica.pool_max), (0, 3));
            assert!(!replica.migrate_on_start);
            assert_eq!(replica.sslmode, Some(SslMode::VerifyFull));
            assert_eq!(replica.sslrootcert.as_deref(), Some(Path::new("ca.pem")));
            assert_eq!(
                replica.password_file.as_deref(),
                Some(Path::new("db-password"))
            );
            assert_eq!(replica.statement_timeout_ms, 750);
            let printed = config.to_redacted_toml();
            assert!(
                printed.contains("database_url = \"postgres://app:***@replica:5432/market\""),
                "{printed}"
            );
            assert!(!printed.contains("hunter2") && !format!("{config:?}").contains("hunter2"));
            Ok(())
        });
    }

    #[test]
    fn secure_settings_load_from_the_environment() {
        Jail::expect_with(|jail| {
            jail.create_file("db-password", "p@ss/w:rd+=\n")?;
            jail.create_file("ca.pem", "not checked here")?;
            jail.create_file("user.creds", &test_creds())?;
            jail.set_env("TICKVAULT_DATABASE__SSLMODE", "verify-full");
            jail.set_env("TICKVAULT_DATABASE__SSLROOTCERT", "ca.pem");
            jail.set_env("TICKVAULT_DATABASE__PASSWORD_FILE", "db-password");
            jail.set_env("TICKVAULT_DATABASE__STATEMENT_TIMEOUT_MS", "750");
            jail.set_env("TICKVAULT_NATS__CREDS_FILE", "user.creds");
            jail.set_env("TICKVAULT_NATS__TLS_CA", "ca.pem");
            jail.set_env("TICKVAULT_NATS__TLS_REQUIRED", "true");
            jail.set_env("NATS_URL", "nats://n1:4222,nats://n2:4222");
            let config = load_in_jail().unwrap();
            assert_eq!(config.database.sslmode, Some(SslMode::VerifyFull));
            assert_eq!(config.database.statement_timeout_ms, 750);
            assert_eq!(
                config.nats.creds_file.as_deref(),
                Some(Path::new("user.creds"))
            );
            assert!(config.nats.tls_required);
            let printed = config.to_redacted_toml();
            assert!(
                printed.contains("password_file = \"db-password\""),
                "{printed}"
            );
            assert!(printed.contains("sslmode = \"verify-full\""), "{printed}");
            assert!(!printed.contains("p@ss"), "{printed}");
            Ok(())
        });
    }

    /// A `.creds` file with a syntactically valid JWT and seed (not trusted by any server).
    fn test_creds() -> String {
        let seed = nkeys::KeyPair::new_user().seed().unwrap();
        format!(
            "-----BEGIN NATS USER JWT-----\neyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.e30.sig\n------END NATS USER JWT------\n\n-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
        )
    }

    #[test]
    fn secure_settings_are_checked_naming_their_key() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[("TICKVAULT_DATABASE__SSLMODE", "sometimes")],
                "database.sslmode",
            ),
            (
                &[("TICKVAULT_DATABASE__PASSWORD_FILE", "missing")],
                "database.password_file",
            ),
            (
                &[("TICKVAULT_DATABASE__PASSWORD_FILE", "empty")],
                "database.password_file",
            ),
            (
                &[("TICKVAULT_DATABASE__SSLROOTCERT", "missing")],
                "database.sslrootcert",
            ),
            (
                &[("TICKVAULT_DATABASE__SSLCERT", "file")],
                "database.sslkey",
            ),
            (
                &[("DATABASE_URL", "postgres://u@db/x?sslrootcert=missing")],
                "database.url",
            ),
            (
                &[("DATABASE_URL", "postgres://u@db/x?sslmode=maybe")],
                "database.url",
            ),
            (
                &[("TICKVAULT_DATABASE__STATEMENT_TIMEOUT_MS", "0")],
                "database.statement_timeout_ms",
            ),
            (&[("TICKVAULT_NATS__USER", "feeder")], "nats.password_file"),
            (&[("TICKVAULT_NATS__PASSWORD_FILE", "file")], "nats.user"),
            (
                &[
                    ("TICKVAULT_NATS__TOKEN_FILE", "file"),
                    ("TICKVAULT_NATS__NKEY_FILE", "file"),
                ],
                "nats.nkey_file",
            ),
            (&[("TICKVAULT_NATS__NKEY_FILE", "file")], "nats.nkey_file"),
            (&[("TICKVAULT_NATS__CREDS_FILE", "file")], "nats.creds_file"),
            (
                &[("TICKVAULT_NATS__TOKEN_FILE", "missing")],
                "nats.token_file",
            ),
            (&[("TICKVAULT_NATS__TLS_CA", "missing")], "nats.tls_ca"),
            (&[("TICKVAULT_NATS__TLS_CERT", "file")], "nats.tls_key"),
            (
                &[("NATS_URL", "nats://a:1@n1:4222,nats://b:2@n2:4222")],
                "nats.url",
            ),
            (&[("NATS_URL", "nats://n1:4222,http://n2")], "nats.url"),
        ];
        for (env, key) in cases {
            let mut message = String::new();
            Jail::expect_with(|jail| {
                jail.create_file("file", "not a seed, not creds")?;
                jail.create_file("empty", "\n")?;
                for (name, value) in *env {
                    jail.set_env(name, value);
                }
                message = load_in_jail().unwrap_err().to_string();
                Ok(())
            });
            assert!(
                message.contains(key),
                "{env:?}: error {message:?} does not name {key}"
            );
        }
    }

    #[test]
    fn precedence_is_default_file_prefixed_env_then_conventional_env() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "tickvault.toml",
                r#"
                [database]
                url = "postgres://file@127.0.0.1/file"
                pool_max = 20
                [ingest]
                batch_size = 100
                flush_interval_ms = 250
                "#,
            )?;
            let config = load_in_jail().unwrap();
            assert_eq!(
                config.database.url.expose(),
                "postgres://file@127.0.0.1/file"
            );
            assert_eq!(config.ingest.batch_size, 100);
            assert_eq!(config.database.pool_max, 20);

            jail.set_env(
                "TICKVAULT_DATABASE__URL",
                "postgres://prefixed@127.0.0.1/env",
            );
            jail.set_env("TICKVAULT_INGEST__BATCH_SIZE", "200");
            let config = load_in_jail().unwrap();
            assert_eq!(
                config.database.url.expose(),
                "postgres://prefixed@127.0.0.1/env"
            );
            assert_eq!(config.ingest.batch_size, 200);
            assert_eq!(config.ingest.flush_interval_ms, 250, "file value kept");

            jail.set_env("DATABASE_URL", "postgres://conventional@127.0.0.1/db");
            jail.set_env("DB_POOL_MAX", "30");
            jail.set_env("TICKVAULT_DATABASE__POOL_MIN", "3");
            let config = load_in_jail().unwrap();
            assert_eq!(
                config.database.url.expose(),
                "postgres://conventional@127.0.0.1/db"
            );
            assert_eq!(config.database.pool_max, 30);
            assert_eq!(config.database.pool_min, 3);
            Ok(())
        });
    }

    #[test]
    fn explicit_config_path_is_read_and_a_missing_one_is_an_error() {
        Jail::expect_with(|jail| {
            jail.create_file("other.toml", "[ingest]\nmode = \"core\"\n")?;
            let config = Config::load(Some(Path::new("other.toml"))).unwrap();
            assert_eq!(config.ingest.mode, IngestMode::Core);
            let err = Config::load(Some(Path::new("missing.toml"))).unwrap_err();
            assert!(err.to_string().contains("missing.toml"), "{err}");
            Ok(())
        });
    }

    fn error_with_env(name: &str, value: &str) -> String {
        let mut message = String::new();
        Jail::expect_with(|jail| {
            jail.set_env(name, value);
            message = load_in_jail().unwrap_err().to_string();
            Ok(())
        });
        message
    }

    #[test]
    fn invalid_values_name_their_key() {
        let cases = [
            ("DB_POOL_MIN", "11", "database.pool_min"),
            ("TICKVAULT_INGEST__BATCH_SIZE", "0", "ingest.batch_size"),
            ("DATABASE_URL", "not a url", "database.url"),
            ("DATABASE_URL", "mysql://x@y/z", "database.url"),
            ("NATS_URL", "http://127.0.0.1:4222", "nats.url"),
            ("TICKVAULT_LOG__FORMAT", "xml", "log.format"),
            ("TICKVAULT_INGEST__MODE", "kafka", "ingest.mode"),
            (
                "TICKVAULT_INGEST__QUEUE_CAPACITY",
                "10",
                "ingest.queue_capacity",
            ),
            (
                "TICKVAULT_INGEST__SUBJECT_PREFIX",
                "md.x",
                "ingest.subject_prefix",
            ),
            ("TICKVAULT_HTTP__ADDR", "nowhere", "http.addr"),
            (
                "TICKVAULT_INGEST__QUEUE_CAPACITY",
                "99999999999",
                "ingest.queue_capacity",
            ),
            ("TICKVAULT_INGEST__NO_SUCH_KEY", "1", "no_such_key"),
            (
                "TICKVAULT_INGEST__STREAM_REPLICAS",
                "0",
                "ingest.stream_replicas",
            ),
            (
                "TICKVAULT_INGEST__STREAM_REPLICAS",
                "6",
                "ingest.stream_replicas",
            ),
            (
                "TICKVAULT_HISTORY__DATABASE_URL",
                "mysql://u@replica/x",
                "history.database_url",
            ),
            (
                "TICKVAULT_HISTORY__DATABASE_URL",
                "postgres://u@replica/x?sslrootcert=missing.pem",
                "history.database_url",
            ),
            (
                "TICKVAULT_HISTORY__DATABASE_URL",
                "postgres://u@replica/x?hostaddr=not-an-ip",
                "history.database_url",
            ),
            (
                "DATABASE_URL",
                "postgres://u@db/x?port=99999",
                "database.url",
            ),
            ("TICKVAULT_HISTORY__POOL_MAX", "1", "history.pool_max"),
            (
                "TICKVAULT_HISTORY__QUEUE_DEADLINE_MS",
                "0",
                "history.queue_deadline_ms",
            ),
            (
                "TICKVAULT_HISTORY__MAX_QUEUED_BYTES",
                "1000",
                "history.max_queued_bytes",
            ),
            (
                "TICKVAULT_HISTORY__MAX_QUEUED_REQUESTS",
                "0",
                "history.max_queued_requests",
            ),
        ];
        for (name, value, key) in cases {
            let message = error_with_env(name, value);
            assert!(
                message.contains(key),
                "{name}={value}: error {message:?} does not name {key}"
            );
        }
    }

    #[test]
    fn printed_configuration_hides_secrets() {
        Jail::expect_with(|jail| {
            jail.set_env("DATABASE_URL", "postgres://app:hunter2@127.0.0.1/db");
            jail.set_env("NATS_URL", "nats://natsuser:s3cret@127.0.0.1:4222");
            let config = load_in_jail().unwrap();
            let printed = config.to_redacted_toml();
            assert!(!printed.contains("hunter2"), "{printed}");
            assert!(!printed.contains("s3cret"), "{printed}");
            assert!(
                printed.contains("postgres://app:***@127.0.0.1/db"),
                "{printed}"
            );
            let debugged = format!("{config:?}");
            assert!(!debugged.contains("hunter2") && !debugged.contains("s3cret"));
            Ok(())
        });
    }
}
