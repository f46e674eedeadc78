//! The PostgreSQL side: the pool and the health check here; the schema in
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

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

use crate::config::DatabaseConfig;
use crate::ops::metrics::DbFailureKind;

const HEALTH_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database.url {url} is not a usable PostgreSQL URL: {source}")]
    BadUrl { url: String, source: sqlx::Error },
    #[error("health check timed out after {0:?}: is the database overloaded or unreachable?")]
    Timeout(Duration),
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
    /// The failure's label, telling apart what an operator fixes differently.
    pub fn kind(&self) -> DbFailureKind {
        match self {
            DbError::Timeout(_) => DbFailureKind::Timeout,
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

#[derive(Clone)]
pub struct Database {
    pub pool: PgPool,
    options: PgConnectOptions,
    pub(crate) config: DatabaseConfig,
}

impl Database {
    /// Builds the pool without connecting: the first use connects.
    pub fn connect_lazy(config: &DatabaseConfig) -> Result<Database, DbError> {
        let options = PgConnectOptions::from_str(config.url.expose())
            .map_err(|source| DbError::BadUrl {
                url: config.url.redacted(),
                source,
            })?
            .application_name("tickvault")
            .log_statements(tracing::log::LevelFilter::Debug)
            .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(2));
        let pool = PgPoolOptions::new()
            .min_connections(config.pool_min)
            .max_connections(config.pool_max)
            .acquire_timeout(Duration::from_millis(config.acquire_timeout_ms))
            .after_connect(|conn, _| Box::pin(timescale::guard_session(conn)))
            .connect_lazy_with(options.clone());
        Ok(Database {
            pool,
            options,
            config: config.clone(),
        })
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
                    Ok(Err(e)) => Err(DbError::Query(e)),
                    Err(_) => Err(DbError::Timeout(HEALTH_CHECK_TIMEOUT)),
                }
            }
            Ok(Err(e)) => Err(DbError::Query(e)),
            Err(_) => Err(DbError::Timeout(HEALTH_CHECK_TIMEOUT)),
        }
    }

    pub fn pool_max(&self) -> u32 {
        self.config.pool_max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
