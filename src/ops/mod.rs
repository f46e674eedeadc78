//! The operations side: health and readiness, metrics, the HTTP server that
//! serves them, logging, the periodic summary and the shutdown signal.

pub mod health;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod shutdown;
pub mod summary;
