//! The PostgreSQL side: the pool and the health check here; the schema in
//! [`migrate`]; [`supervise`] watches the database and migrates once it is up.
//! The pool is lazy so the worker starts while the database is down.

mod migrate;
mod supervise;

pub use migrate::MIGRATOR;
pub use supervise::supervise;

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
}

pub fn classify(error: &sqlx::Error) -> DbFailureKind {
    match error {
        sqlx::Error::PoolTimedOut => DbFailureKind::Timeout,
        sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            DbFailureKind::ConnectionRefused
        }
        sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => DbFailureKind::Timeout,
        sqlx::Error::Database(db) if db.code().is_some_and(|c| c.starts_with("28")) => {
            DbFailureKind::Authentication
        }
        _ => DbFailureKind::Other,
    }
}

/// Errors after which the same write can succeed later: connection loss,
/// timeouts, the server shutting down or refusing connections for now.
pub fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08: connection exception, 53: insufficient resources,
            // 57P: operator intervention (shutdown), 40: serialization/deadlock, 28: auth.
            ["08", "53", "57P", "40", "28"]
                .iter()
                .any(|class| code.starts_with(class))
        }),
        _ => false,
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
