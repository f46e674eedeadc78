//! The schema: the embedded migrations of `migrations/`, then the
//! TimescaleDB policies where TimescaleDB is installed.

use super::{Database, DbError};

/// The embedded migrations of `migrations/`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

impl Database {
    /// Applies the embedded migrations (a no-op when they are all applied),
    /// then the TimescaleDB policies where TimescaleDB is installed.
    pub async fn migrate(&self) -> Result<(), DbError> {
        MIGRATOR.run(&self.pool).await.map_err(DbError::Migrate)?;
        self.apply_timescale_policies()
            .await
            .map_err(|e| DbError::Migrate(e.into()))?;
        Ok(())
    }

    async fn apply_timescale_policies(&self) -> Result<(), sqlx::Error> {
        let installed: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')",
        )
        .fetch_one(&self.pool)
        .await?;
        if !installed {
            return Ok(());
        }
        for t in crate::records::RecordType::ALL {
            let table = t.spec().table;
            for (interval, add, remove) in [
                (
                    &self.config.compress_after,
                    "add_compression_policy",
                    "remove_compression_policy",
                ),
                (
                    &self.config.retention,
                    "add_retention_policy",
                    "remove_retention_policy",
                ),
            ] {
                // Remove then add, so a changed interval takes effect.
                sqlx::query(&format!("SELECT {remove}($1::regclass, if_exists => true)"))
                    .bind(table)
                    .execute(&self.pool)
                    .await?;
                if !interval.trim().is_empty() {
                    sqlx::query(&format!("SELECT {add}($1::regclass, $2::interval)"))
                        .bind(table)
                        .bind(interval.trim())
                        .execute(&self.pool)
                        .await?;
                }
            }
        }
        tracing::info!("TimescaleDB compression and retention policies applied");
        Ok(())
    }
}
