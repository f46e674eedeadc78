//! The operations side: health and readiness, metrics and the lag they
//! report, the HTTP server that serves them, logging, the periodic summary
//! and the shutdown signal.

pub mod health;
pub mod http;
pub mod lag;
pub mod logging;
pub mod metrics;
pub mod shutdown;
pub mod summary;
