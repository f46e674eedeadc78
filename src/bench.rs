//! PLACEHOLDER (being written): the ingest benchmark.
use crate::config::Config;
#[derive(Debug, clap::Args)]
pub struct BenchArgs {}
#[derive(Debug, thiserror::Error)]
#[error("bench")]
pub struct BenchError;
pub async fn run(_config: &Config, _args: BenchArgs) -> Result<(), BenchError> {
    Ok(())
}
