//! tickvault persists the Vietnamese market's live data from NATS into
//! PostgreSQL/TimescaleDB and serves it back over NATS request/reply.
//!
//! Components, in the order data flows:
//! - [`config`]: every setting, layered defaults → file → environment.
//! - [`records`]: the five record types as data (fields, rules, key, conflict rule).
//! - [`ingest`]: source (NATS) → decode → batcher → COPY sink, one pipeline per type.
//! - [`history`]: the `tickvault-history` NATS micro service.
//! - [`ops`]: `/health`, `/ready`, `/metrics`, logging, the periodic summary, shutdown.
//! - [`db`]: the pool, health check and migrations.
//! - [`nats`]: the one way to connect to NATS, for the worker and the tools.
//! - [`app`]: [`App::build`] wires them; `main` and the tests both use it.
//!
//! The command-line tools (history, latest and symbols clients, dead-letter
//! replay, CSV import, feed, bench) live in the binary's `tools` module and use only this
//! library's public API; nothing here imports them.

pub mod app;
pub mod config;
pub mod db;
pub mod history;
pub mod ingest;
pub mod nats;
pub mod ops;
pub mod records;
pub mod retry;
pub mod secret;

pub use app::App;
pub use config::Config;
