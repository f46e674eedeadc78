//! Integration tests: one binary, modules per capability. Every test starts
//! the real application (`App::build`) against the real PostgreSQL and NATS,
//! with its own database, stream and subject prefixes.

mod helpers;

mod bad_input;
mod cluster;
mod config_cli;
mod delivery;
mod dlq;
mod history;
mod import;
mod ingest;
mod latest;
mod lifecycle;
mod migrations;
mod ops;
mod pressure;
mod progress;
mod run_local;
mod secure;
mod timescale;
