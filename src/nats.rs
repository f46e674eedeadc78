//! The one way every part of tickvault connects to NATS: the worker, the
//! history service and the command-line tools all call [`connect`] with the
//! `nats.*` settings, so credentials and servers are handled in one place.

use async_nats::ConnectOptions;

use crate::config::NatsConfig;

/// Why a NATS connection could not be made or configured.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("nats.url {url} cannot be used: {message}")]
    Url { url: String, message: String },
    #[error("cannot connect to NATS at {url}: {message}; is nats.url (NATS_URL) right and the server up?")]
    Connect { url: String, message: String },
}

/// Connects with the credentials of `config`; `tune` adds what the caller
/// needs on top (its client name, timeouts, retries, an event callback).
pub async fn connect(
    config: &NatsConfig,
    tune: impl FnOnce(ConnectOptions) -> ConnectOptions,
) -> Result<async_nats::Client, NatsError> {
    let shown = config.url.redacted();
    let nats_url = config.url.parse().map_err(|message| NatsError::Url {
        url: shown.clone(),
        message,
    })?;
    let mut options = ConnectOptions::new().name(&config.client_name);
    // Credentials in the URL: passed as options so they are not re-parsed or logged.
    if let Some(password) = nats_url.password() {
        options = options.user_and_password(nats_url.username().into(), password.into());
    } else if !nats_url.username().is_empty() {
        options = options.token(nats_url.username().into());
    }
    let mut server = nats_url.clone();
    let _ = server.set_username("");
    let _ = server.set_password(None);
    tune(options)
        .connect(server.as_str())
        .await
        .map_err(|e| NatsError::Connect {
            url: shown,
            message: e.to_string(),
        })
}
