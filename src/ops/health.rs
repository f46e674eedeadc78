//! What `/health` and `/ready` report: the state each component sets here.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::Serialize;

use crate::db::Storage;
use crate::records::RecordType;

/// Shared flags, each set by the one component that knows.
pub struct Status {
    db_up: AtomicBool,
    /// The last check failed on authentication or TLS (an operator must act).
    db_auth_failed: AtomicBool,
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
    pub fn new() -> Self {
        Self {
            db_up: AtomicBool::new(false),
            db_auth_failed: AtomicBool::new(false),
            schema_ready: AtomicBool::new(false),
            intake_ready: Default::default(),
            history_ready: AtomicBool::new(false),
            queue_rows: Default::default(),
            storage: Mutex::new(Storage::Unknown),
        }
    }

    pub fn set_db_up(&self, up: bool) {
        self.db_up.store(up, Ordering::Relaxed);
    }

    pub fn set_db_auth_failed(&self, failed: bool) {
        self.db_auth_failed.store(failed, Ordering::Relaxed);
    }

    pub fn db_up(&self) -> bool {
        self.db_up.load(Ordering::Relaxed)
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
        let db_up = self.db_up();
        HealthReport {
            status: if db_up && nats_connected {
                "ok"
            } else {
                "degraded"
            },
            database: if db_up { "up" } else { "down" },
            database_error: (!db_up && self.db_auth_failed.load(Ordering::Relaxed))
                .then_some("auth_failed"),
            nats: if nats_connected {
                "connected"
            } else {
                "disconnected"
            },
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
    /// the history service in place.
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
        Self::new()
    }
}
