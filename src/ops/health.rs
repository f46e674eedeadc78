//! What `/health` and `/ready` report: the state each component sets here.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::Serialize;

use crate::db::{DbRole, Storage};
use crate::records::RecordType;

/// What the supervisor of one database found at its last check.
#[derive(Default)]
struct DbFlags {
    up: AtomicBool,
    /// The last check failed on authentication or TLS (an operator must act).
    auth_failed: AtomicBool,
}

impl DbFlags {
    fn up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    fn state(&self) -> &'static str {
        if self.up() {
            "up"
        } else {
            "down"
        }
    }

    /// Why it is down when that is not transient.
    fn error(&self) -> Option<&'static str> {
        (!self.up() && self.auth_failed.load(Ordering::Relaxed)).then_some("auth_failed")
    }
}

/// Shared flags, each set by the one component that knows.
pub struct Status {
    db: DbFlags,
    /// History's own database (`history.database_url`), when it has one.
    history_db: Option<DbFlags>,
    schema_ready: AtomicBool,
    /// One per record type: its consumer or subscription is in place.
    intake_ready: [AtomicBool; RecordType::ALL.len()],
    history_ready: AtomicBool,
    /// Rows waiting per record type.
    queue_rows: [AtomicUsize; RecordType::ALL.len()],
    storage: Mutex<Storage>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct HealthReport {
    pub status: &'static str,
    pub database: &'static str,
    /// Why the database is down when that is not transient: `auth_failed`
    /// (login or TLS refused). Absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_error: Option<&'static str>,
    pub nats: &'static str,
    /// The database history reads: `up` or `down` (`database`'s state when
    /// history reads the ingest database).
    pub history_database: &'static str,
    /// `replica` when history reads `history.database_url`, else `primary`.
    pub history_database_source: &'static str,
    /// As `database_error`, for the database history reads.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history_database_error: Option<&'static str>,
    pub queues: BTreeMap<&'static str, usize>,
    /// `{"engine": "timescaledb", "version": "2.18.1"}`, `{"engine": "postgresql"}`,
    /// or `{"engine": "unknown"}` until the database was reached.
    pub storage: Storage,
}

fn slot(record_type: RecordType) -> usize {
    RecordType::ALL
        .iter()
        .position(|t| *t == record_type)
        .expect("every type is in ALL")
}

impl Status {
    /// `history_database`: history reads a database of its own.
    pub fn new(history_database: bool) -> Self {
        Self {
            db: DbFlags::default(),
            history_db: history_database.then(DbFlags::default),
            schema_ready: AtomicBool::new(false),
            intake_ready: Default::default(),
            history_ready: AtomicBool::new(false),
            queue_rows: Default::default(),
            storage: Mutex::new(Storage::Unknown),
        }
    }

    /// The flags of the database of `role` (history's are the primary's
    /// when it has none of its own).
    fn db(&self, role: DbRole) -> &DbFlags {
        match (role, &self.history_db) {
            (DbRole::History, Some(history)) => history,
            _ => &self.db,
        }
    }

    pub fn set_db_up(&self, role: DbRole, up: bool) {
        self.db(role).up.store(up, Ordering::Relaxed);
    }

    pub fn set_db_auth_failed(&self, role: DbRole, failed: bool) {
        self.db(role).auth_failed.store(failed, Ordering::Relaxed);
    }

    pub fn db_up(&self) -> bool {
        self.db.up()
    }

    /// History has a database of its own, and its supervisor last found it
    /// down (or has not reached it yet): requests are answered 503 without
    /// waiting for a connection.
    pub fn history_db_down(&self) -> bool {
        self.history_db.as_ref().is_some_and(|db| !db.up())
    }

    /// History reads a database of its own (`history.database_url`).
    pub fn has_history_database(&self) -> bool {
        self.history_db.is_some()
    }

    pub fn set_schema_ready(&self, ready: bool) {
        self.schema_ready.store(ready, Ordering::Relaxed);
    }

    pub fn set_intake_ready(&self, record_type: RecordType, ready: bool) {
        self.intake_ready[slot(record_type)].store(ready, Ordering::Relaxed);
    }

    pub fn set_history_ready(&self, ready: bool) {
        self.history_ready.store(ready, Ordering::Relaxed);
    }

    pub fn set_storage(&self, storage: Storage) {
        *self.storage.lock().unwrap_or_else(|e| e.into_inner()) = storage;
    }

    pub fn set_queue_rows(&self, record_type: RecordType, rows: usize) {
        self.queue_rows[slot(record_type)].store(rows, Ordering::Relaxed);
    }

    pub fn report(&self, nats_connected: bool) -> HealthReport {
        let history_db = self.db(DbRole::History);
        HealthReport {
            status: if self.db_up() && history_db.up() && nats_connected {
                "ok"
            } else {
                "degraded"
            },
            database: self.db.state(),
            database_error: self.db.error(),
            nats: if nats_connected {
                "connected"
            } else {
                "disconnected"
            },
            history_database: history_db.state(),
            history_database_source: if self.history_db.is_some() {
                "replica"
            } else {
                "primary"
            },
            history_database_error: history_db.error(),
            queues: RecordType::ALL
                .iter()
                .map(|t| (t.name(), self.queue_rows[slot(*t)].load(Ordering::Relaxed)))
                .collect(),
            storage: self
                .storage
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }

    /// Ready: database up and migrated, NATS connected, every consumer and
    /// the history service in place. History's own database is not part of
    /// it: while it is down ingest goes on, and restarting the worker (what
    /// a failing container health check does) would not bring it back.
    pub fn ready(&self, nats_connected: bool) -> bool {
        self.db_up()
            && self.schema_ready.load(Ordering::Relaxed)
            && nats_connected
            && self.intake_ready.iter().all(|r| r.load(Ordering::Relaxed))
            && self.history_ready.load(Ordering::Relaxed)
    }
}

impl Default for Status {
    fn default() -> Self {
        Self::new(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_in_place(status: &Status) {
        status.set_schema_ready(true);
        status.set_history_ready(true);
        for t in RecordType::ALL {
            status.set_intake_ready(t, true);
        }
    }

    #[test]
    fn history_reads_the_ingest_database_unless_it_has_its_own() {
        let status = Status::new(false);
        all_in_place(&status);
        status.set_db_up(DbRole::Primary, true);
        let report = status.report(true);
        assert_eq!(
            (
                report.status,
                report.history_database,
                report.history_database_source
            ),
            ("ok", "up", "primary")
        );
        assert!(!status.history_db_down());
        status.set_db_up(DbRole::Primary, false);
        assert_eq!(status.report(true).history_database, "down");
        assert!(
            !status.history_db_down(),
            "the shared pool answers for itself"
        );
    }

    #[test]
    fn a_replica_down_degrades_health_and_history_but_not_readiness() {
        let status = Status::new(true);
        all_in_place(&status);
        status.set_db_up(DbRole::Primary, true);
        assert!(
            status.history_db_down(),
            "down until its first check passes"
        );
        status.set_db_up(DbRole::History, true);
        let report = status.report(true);
        assert_eq!(
            (
                report.status,
                report.history_database,
                report.history_database_source
            ),
            ("ok", "up", "replica")
        );
        status.set_db_auth_failed(DbRole::History, true);
        status.set_db_up(DbRole::History, false);
        let report = status.report(true);
        assert_eq!(
            (report.status, report.database, report.history_database),
            ("degraded", "up", "down")
        );
        assert_eq!(report.history_database_error, Some("auth_failed"));
        assert_eq!(report.database_error, None);
        assert!(status.history_db_down());
        assert!(status.ready(true), "ingest goes on");
    }
}
