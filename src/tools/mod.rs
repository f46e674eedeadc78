//! The command-line tools around the worker. They use the library's public
//! pieces (configuration, records, the NATS connection, the application
//! itself for the benchmark); nothing in the service imports them.
//!
//! - [`history`]: `tickvault history`, rows of one symbol in a range, streamed.
//! - [`latest`]: `tickvault latest` and `tickvault symbols`.
//! - [`client`]: the history-service client those three share.
//! - [`render`]: printing rows as they arrive (table, JSON lines, CSV).
//! - [`time`]: times as typed (`today`, market time) and as printed (`--tz`).
//! - [`dlq`]: `tickvault dlq stats|show|replay`, the dead letters.
//! - [`import`]: `tickvault import`, back-fill from CSV files through the COPY sink.
//! - [`feed`]: `tickvault feed`, the synthetic upstream feed.
//! - [`bench`]: `tickvault bench`, ingest throughput against a COPY baseline.

pub mod bench;
pub mod client;
pub mod dlq;
pub mod feed;
pub mod history;
pub mod import;
pub mod latest;
pub mod render;
pub mod time;
