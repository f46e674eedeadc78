//! The command-line tools around the worker. They use the library's public
//! pieces (configuration, records, the NATS connection, the application
//! itself for the benchmark); nothing in the service imports them.
//!
//! - [`history`]: `tickvault history`, a client of the history service.
//! - [`feed`]: `tickvault feed`, the synthetic upstream feed.
//! - [`bench`]: `tickvault bench`, ingest throughput against a COPY baseline.

pub mod bench;
pub mod feed;
pub mod history;
