//! The PostgreSQL side: the connection options (URL + TLS + password file +
//! server-side limits, built in [`connect_options`]), the pool, the bounded
//! read transaction of history and the health check here; the schema in
//! [`migrate`]; TimescaleDB's reconciliation and version guard in
//! [`timescale`]; [`supervise`] watches the database and migrates once it is up.
//! The pool is lazy so the worker starts while the database is down.

mod migrate;
mod supervise;
mod timescale;

pub use supervise::supervise;
pub use timescale::{Storage, TimescaleError};

use std::str::FromStr;
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::{ConnectOptions, Connection, Executor as _, PgConnection, PgPool, Postgres};

use crate::config::{DatabaseConfig, SslMode};
use crate::ops::metrics::DbFailureKind;
use crate::secret::{Secret, SecretFileError};

const HEALTH_CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// Set on every connection: a statement waiting longer than this for a lock
/// fails (SQLSTATE 55P03, retried as "unavailable") instead of queueing
/// behind a stuck session forever.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(10);
/// Set on every connection: the server ends a session left idle inside a
/// transaction this long, releasing its locks and its connection slot.
pub const IDLE_IN_TRANSACTION_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database.url {url} is not a usable PostgreSQL URL: {source}")]
    BadUrl { url: String, source: sqlx::Error },
    #[error("database.password_file cannot be used: {0}")]
    PasswordFile(#[source] SecretFileError),
    #[error("health check timed out after {0:?}: is the database overloaded or unreachable?")]
    Timeout(Duration),
    #[error("the database refused tickvault's connection: {source}; {hint}", hint = auth_hint(source))]
    Auth { source: sqlx::Error },
    #[error("database check failed: {0}")]
    Query(#[source] sqlx::Error),
    #[error(
        "migrations failed: {0}; check the database's log and that the user may create tables"
    )]
    Migrate(#[source] sqlx::migrate::MigrateError),
    #[error("this database was migrated by a newer tickvault (migration {0} is unknown to this one): run that version or a newer one")]
    NewerSchema(i64),
    #[error(transparent)]
    Timescale(#[from] TimescaleError),
}

impl DbError {
    /// A failed connection or statement: authentication and TLS failures
    /// apart, as only an operator can fix them.
    pub fn from_sqlx(error: sqlx::Error) -> DbError {
        if failure(&error) == Failure::Auth {
            DbError::Auth { source: error }
        } else {
            DbError::Query(error)
        }
    }

    /// The failure's label, telling apart what an operator fixes differently.
    pub fn kind(&self) -> DbFailureKind {
        match self {
            DbError::Timeout(_) => DbFailureKind::Timeout,
            DbError::Auth { .. } | DbError::PasswordFile(_) => DbFailureKind::Authentication,
            DbError::Query(e) => classify(e),
            _ => DbFailureKind::Other,
        }
    }

    /// The storage found before the error, when it is known.
    pub fn storage(&self) -> Option<Storage> {
        match self {
            DbError::Timescale(e) => e.storage(),
            _ => None,
        }
    }
}

/// The settings to fix when the server refuses tickvault (SQLSTATE class
/// 28, a TLS failure, a certificate the client cannot use).
fn auth_hint(error: &sqlx::Error) -> &'static str {
    match error {
        sqlx::Error::Database(db) if db.code().as_deref() == Some("28P01") => {
            "check the password: database.password_file, or the password in database.url"
        }
        sqlx::Error::Database(_) => {
            "check the user in database.url and that the server's pg_hba.conf admits it this way (a hostssl-only server needs database.sslmode require or stricter)"
        }
        sqlx::Error::Tls(_) | sqlx::Error::Io(_) => {
            "check database.sslmode, and database.sslrootcert (the CA that signed the server's certificate), or database.sslcert / database.sslkey"
        }
        _ => "check database.url and the database.ssl* settings",
    }
}

/// A TLS failure (handshake, certificate) that reached sqlx as an I/O error.
fn is_tls_failure(error: &std::io::Error) -> bool {
    error
        .get_ref()
        .is_some_and(|inner| inner.is::<rustls::Error>())
}

pub fn classify(error: &sqlx::Error) -> DbFailureKind {
    match error {
        sqlx::Error::PoolTimedOut => DbFailureKind::Timeout,
        sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            DbFailureKind::ConnectionRefused
        }
        sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => DbFailureKind::Timeout,
        e if failure(e) == Failure::Auth => DbFailureKind::Authentication,
        _ => DbFailureKind::Other,
    }
}

/// What a failed statement means for whoever issued it: the one
/// classification ingest, history and the health check all act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The server or the connection is unavailable now (down, restarting,
    /// overloaded, a statement or lock timeout): the same statement can
    /// succeed later.
    Unavailable,
    /// The server refused who we are or how we connect (SQLSTATE class 28,
    /// TLS, connection settings): only an operator can fix it.
    Auth,
    /// The schema or privileges are not what tickvault expects (classes 42,
    /// 3D, 3F): an operator must migrate or grant.
    Schema,
    /// The statement's data was refused (a constraint, a trigger, a value
    /// out of range, ...): retrying the same rows cannot help.
    Refused,
}

pub fn failure(error: &sqlx::Error) -> Failure {
    match error {
        sqlx::Error::Io(io) if is_tls_failure(io) => Failure::Auth,
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => Failure::Unavailable,
        sqlx::Error::Tls(_) | sqlx::Error::Configuration(_) => Failure::Auth,
        sqlx::Error::Database(db) => match db.code() {
            Some(code) => failure_of_sqlstate(&code),
            None => Failure::Refused,
        },
        _ => Failure::Refused,
    }
}

fn failure_of_sqlstate(code: &str) -> Failure {
    // 08 connection exception, 53 insufficient resources, 57P operator
    // intervention (shutdown), 57014 statement timeout, 55P03 lock timeout,
    // 40 serialization failure or deadlock, 58 system (I/O) error, 25006 a
    // read-only session (a standby, or storage the version guard refuses).
    const UNAVAILABLE: [&str; 8] = ["08", "53", "57P", "57014", "55P03", "40", "58", "25006"];
    if UNAVAILABLE.iter().any(|prefix| code.starts_with(prefix)) {
        Failure::Unavailable
    } else if code.starts_with("28") {
        Failure::Auth
    } else if ["42", "3D", "3F"]
        .iter()
        .any(|prefix| code.starts_with(prefix))
    {
        Failure::Schema
    } else {
        Failure::Refused
    }
}

/// What a [`Database`] is to tickvault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbRole {
    /// `database.url`: ingest writes it, migrations run there, and history
    /// reads it unless `history.database_url` is set.
    Primary,
    /// `history.database_url`: history's own database, typically a
    /// streaming read replica; only read, never migrated.
    History,
}

#[derive(Clone)]
pub struct Database {
    pub pool: PgPool,
    options: PgConnectOptions,
    pub(crate) config: DatabaseConfig,
    role: DbRole,
}

/// The one place connection options are made: the URL, then the
/// `database.*` settings over it (sslmode, certificates, the password from
/// `database.password_file`), then the server-side limits every session gets.
pub fn connect_options(config: &DatabaseConfig) -> Result<PgConnectOptions, DbError> {
    let mut options =
        PgConnectOptions::from_str(config.url.expose()).map_err(|source| DbError::BadUrl {
            url: config.url.redacted(),
            source,
        })?;
    if let Some(mode) = config.sslmode {
        options = options.ssl_mode(match mode {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Prefer => PgSslMode::Prefer,
            SslMode::Require => PgSslMode::Require,
            SslMode::VerifyCa => PgSslMode::VerifyCa,
            SslMode::VerifyFull => PgSslMode::VerifyFull,
        });
    }
    if let Some(path) = &config.sslrootcert {
        options = options.ssl_root_cert(path);
    }
    if let Some(path) = &config.sslcert {
        options = options.ssl_client_cert(path);
    }
    if let Some(path) = &config.sslkey {
        options = options.ssl_client_key(path);
    }
    if let Some(path) = &config.password_file {
        let password = Secret::read_file(path).map_err(DbError::PasswordFile)?;
        options = options.password(password.expose());
    }
    Ok(options
        .application_name("tickvault")
        .options([
            ("lock_timeout", millis(LOCK_TIMEOUT)),
            (
                "idle_in_transaction_session_timeout",
                millis(IDLE_IN_TRANSACTION_TIMEOUT),
            ),
        ])
        .log_statements(tracing::log::LevelFilter::Debug)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(2)))
}

/// A duration as a PostgreSQL setting value.
fn millis(duration: Duration) -> String {
    format!("{}ms", duration.as_millis())
}

impl Database {
    /// Builds the pool of the ingest database without connecting: the first use connects.
    pub fn connect_lazy(config: &DatabaseConfig) -> Result<Database, DbError> {
        Self::connect_lazy_as(DbRole::Primary, config)
    }

    /// Like [`Database::connect_lazy`], for the database of `role`; `config`
    /// is [`crate::config::Config::history_database`]'s for [`DbRole::History`].
    pub fn connect_lazy_as(role: DbRole, config: &DatabaseConfig) -> Result<Database, DbError> {
        let options = connect_options(config)?;
        let pool = PgPoolOptions::new()
            .min_connections(config.pool_min)
            .max_connections(config.pool_max)
            .acquire_timeout(config.acquire_timeout())
            .after_connect(|conn, _| Box::pin(timescale::guard_session(conn)))
            .connect_lazy_with(options.clone());
        Ok(Database {
            pool,
            options,
            config: config.clone(),
            role,
        })
    }

    pub fn role(&self) -> DbRole {
        self.role
    }

    /// `SELECT 1` within 5 s. When the pool only says it timed out, one
    /// direct connection tells why (refused, authentication, ...).
    pub async fn health_check(&self) -> Result<(), DbError> {
        let result = tokio::time::timeout(
            HEALTH_CHECK_TIMEOUT,
            sqlx::query("SELECT 1").execute(&self.pool),
        )
        .await;
        match result {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(sqlx::Error::PoolTimedOut)) => {
                match tokio::time::timeout(HEALTH_CHECK_TIMEOUT, self.options.connect()).await {
                    // The database answers; the pool is only busy.
                    Ok(Ok(conn)) => {
                        let _ = conn.close().await;
                        Ok(())
                    }
                    Ok(Err(e)) => Err(DbError::from_sqlx(e)),
                    Err(_) => Err(DbError::Timeout(HEALTH_CHECK_TIMEOUT)),
                }
            }
            Ok(Err(e)) => Err(DbError::from_sqlx(e)),
            Err(_) => Err(DbError::Timeout(HEALTH_CHECK_TIMEOUT)),
        }
    }

    pub fn pool_max(&self) -> u32 {
        self.config.pool_max
    }

    /// A read-only transaction whose statements PostgreSQL itself cancels
    /// after `database.statement_timeout_ms` (and whose lock waits end as
    /// soon): a slow history query ends on the server, not only in the
    /// client. See [`ReadTransaction`] for how its connection goes back.
    pub async fn begin_read(&self) -> Result<ReadTransaction, sqlx::Error> {
        let mut read = ReadTransaction {
            conn: Some(self.pool.acquire().await?),
            ended: false,
        };
        // One round trip; the value is a number from the configuration.
        let limit = millis(self.config.statement_timeout());
        let begin = format!(
            "BEGIN READ ONLY; SET LOCAL statement_timeout = '{limit}'; SET LOCAL lock_timeout = '{limit}'"
        );
        // Without arguments: the simple protocol, which takes several statements.
        read.execute(begin.as_str()).await?;
        Ok(read)
    }
}

/// How long ending a read transaction after an error may take before its
/// connection is closed instead.
const ROLLBACK_BOUND: Duration = Duration::from_secs(1);

/// A history read on a connection held explicitly. It goes back to the pool
/// only once [`end`](ReadTransaction::end) committed or rolled it back. A
/// read dropped before that (a client-side timeout, an abandoned request,
/// shutdown) may still have a statement running: its connection is taken
/// out of the pool and its socket closed at once, so the pool's slot is
/// free for a fresh connection. (A graceful close would wait for the busy
/// server over TLS; the server ends that backend when its statement ends,
/// at the latest after `database.statement_timeout_ms`.)
pub struct ReadTransaction {
    /// Always `Some` until dropped.
    conn: Option<PoolConnection<Postgres>>,
    ended: bool,
}

impl ReadTransaction {
    /// Commits after `result` succeeded; otherwise rolls back (within 1 s,
    /// else the connection is closed) and returns `result`'s error.
    pub async fn end<T, E: From<sqlx::Error>>(mut self, result: Result<T, E>) -> Result<T, E> {
        match result {
            Ok(value) => {
                self.execute("COMMIT").await?;
                self.ended = true;
                Ok(value)
            }
            Err(error) => {
                let rollback = self.execute("ROLLBACK");
                self.ended = matches!(
                    tokio::time::timeout(ROLLBACK_BOUND, rollback).await,
                    Ok(Ok(_))
                );
                Err(error)
            }
        }
    }
}

impl std::ops::Deref for ReadTransaction {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        self.conn.as_ref().expect("held until dropped")
    }
}

impl std::ops::DerefMut for ReadTransaction {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.conn.as_mut().expect("held until dropped")
    }
}

impl Drop for ReadTransaction {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            if !self.ended {
                // Dropping the detached connection closes its socket.
                drop(conn.detach());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::SecretUrl;

    fn config(url: &str) -> DatabaseConfig {
        DatabaseConfig {
            url: SecretUrl::new(url),
            ..DatabaseConfig::default()
        }
    }

    #[test]
    fn an_explicit_sslmode_beats_the_url_which_beats_prefer() {
        let ssl_mode = |config: &DatabaseConfig| connect_options(config).unwrap().get_ssl_mode();
        assert!(matches!(
            ssl_mode(&config("postgres://u@db/x")),
            PgSslMode::Prefer
        ));
        let mut from_url = config("postgres://u@db/x?sslmode=require");
        assert!(matches!(ssl_mode(&from_url), PgSslMode::Require));
        from_url.sslmode = Some(SslMode::VerifyFull);
        assert!(matches!(ssl_mode(&from_url), PgSslMode::VerifyFull));
    }

    #[test]
    fn every_connection_gets_the_server_side_limits() {
        let options =
            connect_options(&config("postgres://u@db/x?options=-c%20work_mem%3D8MB")).unwrap();
        let startup = options.get_options().unwrap();
        for expected in [
            "work_mem=8MB",
            "lock_timeout=10000ms",
            "idle_in_transaction_session_timeout=60000ms",
        ] {
            assert!(startup.contains(expected), "{startup}");
        }
    }

    #[test]
    fn an_unreadable_password_file_names_the_setting() {
        let mut config = config("postgres://u@db/x");
        config.password_file = Some("/nonexistent/db-password".into());
        let error = connect_options(&config).unwrap_err();
        assert!(
            error.to_string().contains("database.password_file"),
            "{error}"
        );
        assert_eq!(error.kind(), DbFailureKind::Authentication);
    }

    #[test]
    fn tls_and_login_failures_are_auth_failures_that_name_the_setting() {
        let certificate = sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        ));
        assert_eq!(failure(&certificate), Failure::Auth);
        assert_eq!(classify(&certificate), DbFailureKind::Authentication);
        let error = DbError::from_sqlx(certificate);
        assert!(
            error.to_string().contains("database.sslrootcert"),
            "{error}"
        );
        let plain_io = sqlx::Error::Io(std::io::ErrorKind::InvalidData.into());
        assert_eq!(failure(&plain_io), Failure::Unavailable);
        let no_tls = DbError::from_sqlx(sqlx::Error::Tls("server does not support TLS".into()));
        assert_eq!(no_tls.kind(), DbFailureKind::Authentication);
        assert!(no_tls.to_string().contains("database.sslmode"), "{no_tls}");
    }

    #[test]
    fn sqlstates_map_to_what_the_caller_does() {
        let cases = [
            ("08006", Failure::Unavailable),
            ("53300", Failure::Unavailable),
            ("57P01", Failure::Unavailable),
            ("57014", Failure::Unavailable),
            ("55P03", Failure::Unavailable),
            ("40P01", Failure::Unavailable),
            ("25006", Failure::Unavailable),
            ("28P01", Failure::Auth),
            ("28000", Failure::Auth),
            ("42P01", Failure::Schema),
            ("42501", Failure::Schema),
            ("3D000", Failure::Schema),
            ("23505", Failure::Refused),
            ("22003", Failure::Refused),
            ("P0001", Failure::Refused),
            ("54000", Failure::Refused),
            ("0A000", Failure::Refused),
            ("57000", Failure::Refused),
        ];
        for (code, expected) in cases {
            assert_eq!(failure_of_sqlstate(code), expected, "{code}");
        }
        assert_eq!(failure(&sqlx::Error::PoolTimedOut), Failure::Unavailable);
        assert_eq!(
            failure(&sqlx::Error::Io(
                std::io::ErrorKind::ConnectionRefused.into()
            )),
            Failure::Unavailable
        );
        assert_eq!(failure(&sqlx::Error::RowNotFound), Failure::Refused);
    }
}
