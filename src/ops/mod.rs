//! The operations side: health and readiness, metrics, the HTTP server that
//! serves them, logging and the shutdown signal.

pub mod health;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod shutdown;
