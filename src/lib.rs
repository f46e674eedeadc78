//! tickvault persists the Vietnamese market's live data from NATS into
//! PostgreSQL/TimescaleDB and serves it back over NATS request/reply.
//!
//! Components, in the order data flows:
//! - [`config`]: every setting, layered defaults → file → environment.
//! - [`records`]: the five record types as data (fields, rules, key, conflict rule).
//! - [`ingest`]: source (NATS) → decode → batcher → COPY sink, one pipeline per type.
//! - [`history`]: the `tickvault-history` NATS micro service.
//! - [`ops`]: `/health`, `/ready`, `/metrics`, logging, shutdown.
//! - [`db`]: the pool, health check and migrations.
//! - [`app`]: [`App::build`] wires them; `main` and the tests both use it.
//! - [`feed`] and [`bench`]: the synthetic upstream feed and the benchmark.

pub mod app;
pub mod bench;
pub mod config;
pub mod db;
pub mod feed;
pub mod history;
pub mod ingest;
pub mod ops;
pub mod records;
pub mod retry;
pub mod secret;

pub use app::App;
pub use config::Config;
