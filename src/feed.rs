//! PLACEHOLDER (being written): the synthetic upstream feed.
use crate::config::Config;
#[derive(Debug, clap::Args)]
pub struct FeedArgs {}
#[derive(Debug, thiserror::Error)]
#[error("feed")]
pub struct FeedError;
pub async fn run(_config: &Config, _args: FeedArgs) -> Result<(), FeedError> {
    Ok(())
}
