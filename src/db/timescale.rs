//! TimescaleDB: what stores the tables ([`Storage`]), the version guard, and
//! the reconciliation that brings a TimescaleDB database to the desired
//! state: each table a hypertable, compressed by its identifier and ordered
//! by the rest of its key, with exactly one compression and one retention
//! policy at the configured intervals.
//!
//! Every step reads the current state first and changes only what differs,
//! so a second run changes nothing and policies keep their job ids. The
//! caller holds an advisory lock, so replicas take turns. Detection reads
//! only what a database owner may read: `pg_extension`,
//! `pg_available_extensions` and a setting the TimescaleDB loader defines,
//! never the superuser-only `shared_preload_libraries`.

use std::fmt;

use serde::Serialize;
use sqlx::PgConnection;

use crate::config::DatabaseConfig;
use crate::records::{RecordSpec, RecordType};

/// The oldest TimescaleDB tickvault writes to. Before 2.18.1, `INSERT ... ON
/// CONFLICT DO NOTHING` into a compressed chunk stops at the first
/// conflicting row and silently drops the rows after it (TimescaleDB issue
/// 7672): a redelivered tick batch would lose its new ticks.
const MIN_VERSION: Version = Version(2, 18, 1);

/// A TimescaleDB version, compared part by part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Version(u32, u32, u32);

impl Version {
    /// Reads `2.18.1` (or `2.19.0-dev`); a part that is not a number reads as 0.
    fn parse(text: &str) -> Version {
        let mut parts = text.split('.').map(|part| {
            let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().unwrap_or(0)
        });
        let mut next = || parts.next().unwrap_or(0);
        Version(next(), next(), next())
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// What stores the tables, as `/health` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "engine", rename_all = "lowercase")]
pub enum Storage {
    /// Not checked yet: the database was not reached.
    Unknown,
    Postgresql,
    Timescaledb {
        version: String,
    },
}

impl fmt::Display for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Storage::Unknown => write!(f, "not checked yet"),
            Storage::Postgresql => write!(f, "plain PostgreSQL"),
            Storage::Timescaledb { version } => write!(f, "TimescaleDB {version}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TimescaleError {
    #[error(
        "TimescaleDB {version} is installed in this database, but tickvault needs {MIN_VERSION} \
         or later: older versions silently drop ticks written into compressed chunks (TimescaleDB \
         issue 7672). Install TimescaleDB {MIN_VERSION} or later on the database server, then run \
         `ALTER EXTENSION timescaledb UPDATE;` in this database as the first command of a new \
         session (`psql -X`). Until then tickvault writes nothing to this database"
    )]
    TooOld { version: String },
    #[error(
        "the timescaledb extension ({version}) is created in this database, but the server does \
         not load it: add timescaledb to shared_preload_libraries and restart PostgreSQL"
    )]
    NotLoaded { version: String },
    #[error("{key} = {value:?} is not usable as a TimescaleDB policy interval: {reason}; use e.g. \"7 days\", or \"\" for no policy")]
    Interval {
        key: &'static str,
        value: String,
        reason: String,
    },
    #[error(
        "TimescaleDB set-up could not {action}: {source}; run tickvault as the owner of its tables"
    )]
    Step {
        action: String,
        #[source]
        source: sqlx::Error,
    },
}

impl TimescaleError {
    /// The storage found before the error, when it is known.
    pub fn storage(&self) -> Option<Storage> {
        match self {
            TimescaleError::TooOld { version } | TimescaleError::NotLoaded { version } => {
                Some(Storage::Timescaledb {
                    version: version.clone(),
                })
            }
            _ => None,
        }
    }
}

fn step(action: impl fmt::Display) -> impl FnOnce(sqlx::Error) -> TimescaleError {
    let action = action.to_string();
    move |source| TimescaleError::Step { action, source }
}

/// What the server and this database offer.
#[derive(Debug)]
struct Found {
    /// The extension's version in this database (`pg_extension`).
    installed: Option<String>,
    /// The version `CREATE EXTENSION` would install (`pg_available_extensions`).
    available: Option<String>,
    /// The TimescaleDB loader is preloaded into every session.
    loaded: bool,
}

/// The extension's version in this database, and whether the TimescaleDB
/// loader is preloaded: it defines `timescaledb.disable_load` in every
/// session, a setting any role may read (unlike shared_preload_libraries).
const INSTALLED_AND_LOADED: &str =
    "(SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'), \
     current_setting('timescaledb.disable_load', true) IS NOT NULL";

async fn find(conn: &mut PgConnection) -> Result<Found, sqlx::Error> {
    let (installed, loaded, available) = sqlx::query_as(&format!(
        "SELECT {INSTALLED_AND_LOADED}, \
         (SELECT default_version FROM pg_available_extensions WHERE name = 'timescaledb')"
    ))
    .fetch_one(conn)
    .await?;
    Ok(Found {
        installed,
        available,
        loaded,
    })
}

/// What to do with what was found.
#[derive(Debug, PartialEq, Eq)]
enum Plan {
    /// Use the extension created in this database, at this version.
    Use(String),
    /// Create the extension (the server offers it at a safe version).
    Create,
    /// Stay plain PostgreSQL, for this reason.
    Plain(String),
}

/// The version guard lives here: a database whose extension tickvault must
/// not write to is an error; a server whose extension tickvault should not
/// create stays plain.
fn plan(found: &Found) -> Result<Plan, TimescaleError> {
    match (&found.installed, &found.available) {
        (Some(version), _) if !found.loaded => Err(TimescaleError::NotLoaded {
            version: version.clone(),
        }),
        (Some(version), _) if Version::parse(version) < MIN_VERSION => {
            Err(TimescaleError::TooOld {
                version: version.clone(),
            })
        }
        (Some(version), _) => Ok(Plan::Use(version.clone())),
        (None, None) => Ok(Plan::Plain(
            "TimescaleDB is not installed on the database server".into(),
        )),
        (None, Some(version)) if !found.loaded => Ok(Plan::Plain(format!(
            "TimescaleDB {version} is installed on the database server but not preloaded; \
             add timescaledb to shared_preload_libraries and restart PostgreSQL to use it"
        ))),
        (None, Some(version)) if Version::parse(version) < MIN_VERSION => Ok(Plan::Plain(format!(
            "the database server offers TimescaleDB {version}, older than {MIN_VERSION}; \
             install TimescaleDB {MIN_VERSION} or later to use it"
        ))),
        (None, Some(_)) => Ok(Plan::Create),
    }
}

/// Logs the one line that says the tables stay plain, and why.
fn stay_plain(found: &Found, reason: &str) -> Storage {
    if found.available.is_some() {
        tracing::warn!("storage: plain PostgreSQL tables: {reason}");
    } else {
        tracing::info!("storage: plain PostgreSQL tables: {reason}");
    }
    Storage::Postgresql
}

/// Reads the storage and applies the version guard, changing nothing.
pub(super) async fn verify(conn: &mut PgConnection) -> Result<Storage, TimescaleError> {
    let found = find(conn)
        .await
        .map_err(step("read the installed extensions"))?;
    Ok(match plan(&found)? {
        Plan::Use(version) => Storage::Timescaledb { version },
        Plan::Create => stay_plain(
            &found,
            "TimescaleDB is available but not created in this database (database.migrate_on_start = false)",
        ),
        Plan::Plain(reason) => stay_plain(&found, &reason),
    })
}

/// Whether a new session may write: not where the version guard refuses.
/// (Cheaper than [`find`]: what the server offers does not matter here.)
async fn session_may_write(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    let (installed, loaded) = sqlx::query_as(&format!("SELECT {INSTALLED_AND_LOADED}"))
        .fetch_one(conn)
        .await?;
    let found = Found {
        installed,
        available: None,
        loaded,
    };
    Ok(plan(&found).is_ok())
}

/// Brings the database to the desired state; see the module's comment.
pub(super) async fn reconcile(
    conn: &mut PgConnection,
    config: &DatabaseConfig,
) -> Result<Storage, TimescaleError> {
    let found = find(&mut *conn)
        .await
        .map_err(step("read the installed extensions"))?;
    let version = match plan(&found)? {
        Plan::Use(version) => version,
        Plan::Plain(reason) => return Ok(stay_plain(&found, &reason)),
        Plan::Create => match create_extension(conn).await {
            Ok(version) => version,
            Err(sqlx::Error::Database(e))
                if e.code().as_deref() == Some(INSUFFICIENT_PRIVILEGE) =>
            {
                return Ok(stay_plain(
                    &found,
                    &format!(
                        "TimescaleDB is available but this role may not create the extension ({e}); \
                         a superuser can run `CREATE EXTENSION timescaledb;` in this database, \
                         then restart tickvault"
                    ),
                ));
            }
            Err(e) => return Err(step("create the timescaledb extension")(e)),
        },
    };
    // Converting a table notices every chunk it makes.
    sqlx::query("SET client_min_messages = warning")
        .execute(&mut *conn)
        .await
        .map_err(step("set up the session"))?;
    let compress_after = interval(conn, "database.compress_after", &config.compress_after).await?;
    let retention = interval(conn, "database.retention", &config.retention).await?;
    let mut changes = 0;
    for record_type in RecordType::ALL {
        let spec = record_type.spec();
        let table = Table::find(conn, spec).await?;
        changes += table.make_hypertable(conn).await?;
        changes += table.set_compression(conn).await?;
        changes += table
            .set_policy(conn, &COMPRESSION, compress_after.as_deref())
            .await?;
        changes += table
            .set_policy(conn, &RETENTION, retention.as_deref())
            .await?;
    }
    if changes == 0 {
        tracing::info!(
            "storage: TimescaleDB {version}; hypertables, compression and policies already as configured"
        );
    } else {
        tracing::info!("storage: TimescaleDB {version}; {changes} change(s) applied");
    }
    Ok(Storage::Timescaledb { version })
}

const INSUFFICIENT_PRIVILEGE: &str = "42501";

async fn create_extension(conn: &mut PgConnection) -> Result<String, sqlx::Error> {
    sqlx::query("CREATE EXTENSION IF NOT EXISTS timescaledb")
        .execute(&mut *conn)
        .await?;
    let version: String =
        sqlx::query_scalar("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'")
            .fetch_one(conn)
            .await?;
    tracing::info!("storage: created the timescaledb extension {version}");
    Ok(version)
}

/// A configured interval in PostgreSQL's own spelling (`None` when empty),
/// so it compares equal to what a policy's configuration holds.
async fn interval(
    conn: &mut PgConnection,
    key: &'static str,
    value: &str,
) -> Result<Option<String>, TimescaleError> {
    let value = value.trim();
    if value.is_empty() {
        return Ok(None);
    }
    let invalid = |reason: String| TimescaleError::Interval {
        key,
        value: value.to_string(),
        reason,
    };
    let (text, positive): (String, bool) =
        sqlx::query_as("SELECT $1::interval::text, $1::interval > interval '0'")
            .bind(value)
            .fetch_one(conn)
            .await
            .map_err(|e| match &e {
                sqlx::Error::Database(db) => invalid(db.message().to_string()),
                _ => step(format!("read {key}"))(e),
            })?;
    if !positive {
        return Err(invalid("it must be longer than zero".into()));
    }
    Ok(Some(text))
}

/// One kind of TimescaleDB policy job.
struct Policy {
    /// For logs.
    name: &'static str,
    proc_name: &'static str,
    /// The job configuration's key holding the interval.
    config_key: &'static str,
    add: &'static str,
}

const COMPRESSION: Policy = Policy {
    name: "compression",
    proc_name: "policy_compression",
    config_key: "compress_after",
    add: "add_compression_policy",
};

const RETENTION: Policy = Policy {
    name: "retention",
    proc_name: "policy_retention",
    config_key: "drop_after",
    add: "add_retention_policy",
};

/// One of the five tables, located for TimescaleDB's information views.
struct Table {
    spec: &'static RecordSpec,
    schema: String,
    name: String,
}

impl Table {
    async fn find(
        conn: &mut PgConnection,
        spec: &'static RecordSpec,
    ) -> Result<Table, TimescaleError> {
        let (schema, name) = sqlx::query_as(
            "SELECT n.nspname::text, c.relname::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1::regclass",
        )
        .bind(spec.table)
        .fetch_one(conn)
        .await
        .map_err(step(format!("find the table {}", spec.table)))?;
        Ok(Table { spec, schema, name })
    }

    /// Converts the table, moving its existing rows into chunks. Returns the
    /// number of changes made (0 or 1).
    async fn make_hypertable(&self, conn: &mut PgConnection) -> Result<u32, TimescaleError> {
        let table = self.spec.table;
        let is_hypertable: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM timescaledb_information.hypertables \
             WHERE hypertable_schema = $1 AND hypertable_name = $2)",
        )
        .bind(&self.schema)
        .bind(&self.name)
        .fetch_one(&mut *conn)
        .await
        .map_err(step(format!("check whether {table} is a hypertable")))?;
        if is_hypertable {
            return Ok(0);
        }
        sqlx::query(
            "SELECT create_hypertable($1::regclass, by_range('timestamp', $2::interval), \
             migrate_data => true)",
        )
        .bind(table)
        .bind(self.spec.chunk_interval)
        .execute(conn)
        .await
        .map_err(step(format!("make {table} a hypertable")))?;
        tracing::info!(
            table,
            chunk_interval = self.spec.chunk_interval,
            "storage: converted the table to a hypertable (existing rows moved into chunks)"
        );
        Ok(1)
    }

    /// Segments compressed data by the identifier and orders each segment by
    /// the rest of the key, newest first: TimescaleDB checks uniqueness in
    /// compressed chunks along that order. Returns the number of changes.
    async fn set_compression(&self, conn: &mut PgConnection) -> Result<u32, TimescaleError> {
        let table = self.spec.table;
        let columns: Vec<CompressionColumn> = sqlx::query_as(
            "SELECT attname::text, segmentby_column_index, orderby_column_index, orderby_asc \
             FROM timescaledb_information.compression_settings \
             WHERE hypertable_schema = $1 AND hypertable_name = $2",
        )
        .bind(&self.schema)
        .bind(&self.name)
        .fetch_all(&mut *conn)
        .await
        .map_err(step(format!("read the compression settings of {table}")))?;
        let desired = Compression::of(self.spec);
        if Compression::from_settings(&columns) == desired {
            return Ok(0);
        }
        let segment_by = desired
            .segment_by
            .iter()
            .map(|column| format!("\"{column}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let order_by = desired
            .order_by
            .iter()
            .map(|(column, _)| format!("\"{column}\" DESC"))
            .collect::<Vec<_>>()
            .join(", ");
        sqlx::query(&format!(
            "ALTER TABLE {table} SET (timescaledb.compress, \
             timescaledb.compress_segmentby = '{segment_by}', timescaledb.compress_orderby = '{order_by}')"
        ))
        .execute(conn)
        .await
        .map_err(step(format!("set the compression of {table}")))?;
        tracing::info!(
            table,
            segment_by,
            order_by,
            "storage: compression settings applied"
        );
        Ok(1)
    }

    /// Keeps exactly one job of the policy, at `interval` (none when
    /// `None`): added when missing, changed in place when the interval
    /// differs, extra jobs deleted. Returns the number of changes.
    async fn set_policy(
        &self,
        conn: &mut PgConnection,
        policy: &Policy,
        interval: Option<&str>,
    ) -> Result<u32, TimescaleError> {
        let table = self.spec.table;
        let jobs: Vec<(i32, Option<String>)> = sqlx::query_as(
            "SELECT job_id, (config->>$3)::interval::text FROM timescaledb_information.jobs \
             WHERE proc_name = $4 AND hypertable_schema = $1 AND hypertable_name = $2 \
             ORDER BY job_id",
        )
        .bind(&self.schema)
        .bind(&self.name)
        .bind(policy.config_key)
        .bind(policy.proc_name)
        .fetch_all(&mut *conn)
        .await
        .map_err(step(format!("read the {} policy of {table}", policy.name)))?;
        let keep = if interval.is_some() { 1 } else { 0 };
        let mut changes = 0;
        for (job, _) in jobs.iter().skip(keep) {
            sqlx::query("SELECT delete_job($1)")
                .bind(job)
                .execute(&mut *conn)
                .await
                .map_err(step(format!("delete job {job} of {table}")))?;
            tracing::info!(
                table,
                job,
                "storage: deleted an extra or unwanted {} policy",
                policy.name
            );
            changes += 1;
        }
        let Some(interval) = interval else {
            return Ok(changes);
        };
        match jobs.first() {
            None => {
                let job: i32 = sqlx::query_scalar(&format!(
                    "SELECT {}($1::regclass, $2::interval)",
                    policy.add
                ))
                .bind(table)
                .bind(interval)
                .fetch_one(conn)
                .await
                .map_err(step(format!("add the {} policy of {table}", policy.name)))?;
                tracing::info!(
                    table,
                    job,
                    interval,
                    "storage: added the {} policy",
                    policy.name
                );
                changes += 1;
            }
            Some((job, current)) if current.as_deref() != Some(interval) => {
                sqlx::query(
                    "SELECT alter_job(job_id, config => jsonb_set(config, ARRAY[$2], to_jsonb($3::text))) \
                     FROM timescaledb_information.jobs WHERE job_id = $1",
                )
                .bind(job)
                .bind(policy.config_key)
                .bind(interval)
                .execute(conn)
                .await
                .map_err(step(format!("change job {job} of {table}")))?;
                tracing::info!(
                    table,
                    job,
                    from = current.as_deref().unwrap_or("none"),
                    to = interval,
                    "storage: changed the {} policy's interval in place",
                    policy.name
                );
                changes += 1;
            }
            Some(_) => {}
        }
        Ok(changes)
    }
}

/// One row of `timescaledb_information.compression_settings`.
#[derive(sqlx::FromRow)]
struct CompressionColumn {
    attname: String,
    segmentby_column_index: Option<i16>,
    orderby_column_index: Option<i16>,
    orderby_asc: Option<bool>,
}

/// A table's compression: the segment-by columns, and the order-by columns
/// with `true` for ascending.
#[derive(Debug, PartialEq, Eq)]
struct Compression {
    segment_by: Vec<String>,
    order_by: Vec<(String, bool)>,
}

impl Compression {
    /// The desired one: segment by the identifier, order by the rest of the
    /// key, descending.
    fn of(spec: &RecordSpec) -> Compression {
        let (identifier, rest) = spec.key.split_first().expect("every key has columns");
        Compression {
            segment_by: vec![identifier.to_string()],
            order_by: rest.iter().map(|c| (c.to_string(), false)).collect(),
        }
    }

    /// The current one (no columns when compression is not enabled).
    fn from_settings(columns: &[CompressionColumn]) -> Compression {
        let mut segment_by: Vec<_> = columns
            .iter()
            .filter_map(|c| c.segmentby_column_index.map(|i| (i, c.attname.clone())))
            .collect();
        segment_by.sort();
        let mut order_by: Vec<_> = columns
            .iter()
            .filter_map(|c| {
                let asc = c.orderby_asc.unwrap_or(true);
                c.orderby_column_index
                    .map(|i| (i, (c.attname.clone(), asc)))
            })
            .collect();
        order_by.sort();
        Compression {
            segment_by: segment_by.into_iter().map(|(_, c)| c).collect(),
            order_by: order_by.into_iter().map(|(_, c)| c).collect(),
        }
    }
}

/// The pool's connect hook: a session on a database the version guard
/// refuses is made read-only, so the worker writes nothing there (its
/// batches are retried; see `failure`'s 25006). After `ALTER EXTENSION
/// timescaledb UPDATE`, TimescaleDB ends each session that loaded the old
/// version at its next statement, so the pool replaces them by itself.
pub(super) async fn guard_session(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    if !session_may_write(conn).await? {
        sqlx::query("SET default_transaction_read_only = on")
            .execute(conn)
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(installed: Option<&str>, available: Option<&str>, loaded: bool) -> Found {
        Found {
            installed: installed.map(Into::into),
            available: available.map(Into::into),
            loaded,
        }
    }

    #[test]
    fn versions_compare_part_by_part() {
        assert_eq!(Version::parse("2.18.1"), MIN_VERSION);
        assert!(Version::parse("2.17.2") < MIN_VERSION);
        assert!(Version::parse("2.18.0") < MIN_VERSION);
        assert!(Version::parse("2.9.3") < MIN_VERSION);
        assert!(Version::parse("2.18.2") > MIN_VERSION);
        assert!(Version::parse("2.19.0-dev") > MIN_VERSION);
        assert!(Version::parse("10.0") > MIN_VERSION);
        assert!(Version::parse("nonsense") < MIN_VERSION);
        assert_eq!(MIN_VERSION.to_string(), "2.18.1");
    }

    #[test]
    fn the_plan_follows_what_was_found() {
        use Plan::*;
        assert!(matches!(
            plan(&found(Some("2.17.2"), Some("2.18.1"), true)),
            Err(TimescaleError::TooOld { version }) if version == "2.17.2"
        ));
        assert!(matches!(
            plan(&found(Some("2.18.1"), Some("2.18.1"), false)),
            Err(TimescaleError::NotLoaded { .. })
        ));
        assert_eq!(
            plan(&found(Some("2.18.1"), Some("2.18.1"), true)).unwrap(),
            Use("2.18.1".into())
        );
        assert_eq!(plan(&found(None, Some("2.18.1"), true)).unwrap(), Create);
        for (available, loaded, says) in [
            (None, false, "not installed"),
            (Some("2.18.1"), false, "not preloaded"),
            (Some("2.17.2"), true, "older than 2.18.1"),
        ] {
            match plan(&found(None, available, loaded)).unwrap() {
                Plain(reason) => assert!(reason.contains(says), "{reason}"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn the_refusal_says_what_to_do() {
        let message = TimescaleError::TooOld {
            version: "2.17.2".into(),
        }
        .to_string();
        for part in ["2.17.2", "2.18.1", "ALTER EXTENSION timescaledb UPDATE"] {
            assert!(message.contains(part), "{message}");
        }
    }

    #[test]
    fn compression_is_segmented_by_identifier_and_ordered_by_the_rest_of_the_key() {
        let tick = Compression::of(RecordType::Tick.spec());
        assert_eq!(tick.segment_by, ["symbol"]);
        assert_eq!(
            tick.order_by,
            [("timestamp".to_string(), false), ("seq".to_string(), false)]
        );
        let index = Compression::of(RecordType::Index.spec());
        assert_eq!(index.segment_by, ["index_name"]);
        assert_eq!(index.order_by, [("timestamp".to_string(), false)]);

        let column = |name: &str, segment, order, asc| CompressionColumn {
            attname: name.into(),
            segmentby_column_index: segment,
            orderby_column_index: order,
            orderby_asc: asc,
        };
        let columns = [
            column("seq", None, Some(2), Some(false)),
            column("symbol", Some(1), None, None),
            column("timestamp", None, Some(1), Some(false)),
        ];
        assert_eq!(Compression::from_settings(&columns), tick);
        assert_ne!(
            Compression::from_settings(&columns[1..]),
            tick,
            "the old order (timestamp only) is changed"
        );
        assert_ne!(Compression::from_settings(&[]), tick, "not enabled");
    }
}
