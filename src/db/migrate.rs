//! The schema: the embedded migrations of `migrations/`, then the TimescaleDB
//! reconciliation ([`super::timescale`]), both on one connection holding an
//! advisory lock, so replicas starting together take turns.

use std::sync::LazyLock;

use sqlx::migrate::Migrator;
use sqlx::{ConnectOptions, Connection, PgConnection};

use super::timescale::{self, Storage};
use super::{Database, DbError};

/// Migrations an earlier tickvault applied that this one no longer has.
/// `20261126000002_timescaledb` made the tables hypertables once, and recorded
/// itself as applied even where TimescaleDB was absent; the reconciliation
/// does that job now, at every migration.
const RETIRED: [i64; 1] = [20261126000002];

/// The embedded migrations of `migrations/`. It tolerates applied migrations
/// it does not have; [`refuse_unknown_migrations`] lets through only the retired ones.
static MIGRATOR: LazyLock<Migrator> = LazyLock::new(|| {
    let mut migrator = sqlx::migrate!();
    migrator.set_ignore_missing(true);
    migrator
});

/// The advisory lock held while one tickvault migrates a database
/// (`tickvaul` in ASCII).
const MIGRATE_LOCK: i64 = 0x7469_636b_7661_756c;

impl Database {
    /// Applies the embedded migrations (a no-op when they are all applied),
    /// then reconciles TimescaleDB where it is available.
    pub async fn migrate(&self) -> Result<Storage, DbError> {
        let mut conn = self.options.connect().await.map_err(DbError::Query)?;
        let result = self.migrate_on(&mut conn).await;
        // Closing the connection also releases the advisory lock.
        let _ = conn.close().await;
        result
    }

    async fn migrate_on(&self, conn: &mut PgConnection) -> Result<Storage, DbError> {
        // Converting a large table takes as long as it takes; history's
        // statement timeout is not for this connection.
        sqlx::query("SET statement_timeout = 0")
            .execute(&mut *conn)
            .await
            .map_err(DbError::Query)?;
        let free: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(MIGRATE_LOCK)
            .fetch_one(&mut *conn)
            .await
            .map_err(DbError::Query)?;
        if !free {
            tracing::info!("another tickvault is migrating this database; waiting for it");
            sqlx::query("SELECT pg_advisory_lock($1)")
                .bind(MIGRATE_LOCK)
                .execute(&mut *conn)
                .await
                .map_err(DbError::Query)?;
        }
        refuse_unknown_migrations(conn).await?;
        MIGRATOR.run_direct(conn).await.map_err(DbError::Migrate)?;
        Ok(timescale::reconcile(conn, &self.config).await?)
    }

    /// Reads the storage and applies TimescaleDB's version guard without
    /// changing anything (for `database.migrate_on_start = false`).
    pub async fn verify_storage(&self) -> Result<Storage, DbError> {
        let mut conn = self.pool.acquire().await.map_err(DbError::Query)?;
        Ok(timescale::verify(&mut conn).await?)
    }
}

/// A database migrated by a newer tickvault (an applied migration that is
/// neither embedded nor retired) is refused, as sqlx would without
/// `ignore_missing`.
async fn refuse_unknown_migrations(conn: &mut PgConnection) -> Result<(), DbError> {
    let migrated: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(&mut *conn)
        .await
        .map_err(DbError::Query)?;
    if !migrated {
        return Ok(());
    }
    let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM _sqlx_migrations")
        .fetch_all(&mut *conn)
        .await
        .map_err(DbError::Query)?;
    match applied
        .into_iter()
        .find(|v| !RETIRED.contains(v) && !MIGRATOR.version_exists(*v))
    {
        Some(version) => Err(DbError::NewerSchema(version)),
        None => Ok(()),
    }
}
