//! PLACEHOLDER: the history service is being written.
use crate::config::HistoryConfig;
use crate::db::Database;
use crate::ops::health::Status;
use crate::ops::metrics::Metrics;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

pub mod client {
    use crate::config::Config;
    #[derive(Debug, clap::Args)]
    pub struct HistoryArgs {}
    #[derive(Debug, thiserror::Error)]
    #[error("history")]
    pub struct ClientError;
    pub async fn run(
        _config: &Config,
        _args: HistoryArgs,
    ) -> Result<std::process::ExitCode, ClientError> {
        Ok(std::process::ExitCode::SUCCESS)
    }
}

pub async fn serve(
    _client: async_nats::Client,
    _db: Database,
    _config: HistoryConfig,
    _metrics: Arc<Metrics>,
    status: Arc<Status>,
    shutdown: CancellationToken,
) {
    status.set_history_ready(true);
    shutdown.cancelled().await;
}
