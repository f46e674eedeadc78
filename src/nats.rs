//! The one way every part of tickvault connects to NATS: the worker, the
//! history service and the command-line tools all call [`connect`] (the
//! worker [`connect_in_background`]) with the `nats.*` settings, so servers,
//! credentials and TLS are handled in one place.
//!
//! - `nats.url` is one server or a comma-separated list (a cluster); the
//!   client connects to any of them and follows the cluster's reconnects.
//! - Credentials: the one method set among `nats.user` + `nats.password_file`,
//!   `nats.token_file`, `nats.nkey_file`, `nats.creds_file`; otherwise those
//!   carried by `nats.url` (`user:password@` or `token@`). They are handed to
//!   the client as options, never left in a server address it could log.
//! - TLS: `tls://` servers, `nats.tls_required`, `nats.tls_ca` (instead of
//!   the system's CAs), `nats.tls_cert` + `nats.tls_key` for client certificates.

use std::path::Path;

use async_nats::{ConnectError, ConnectErrorKind, ConnectOptions, ServerAddr};
use percent_encoding::percent_decode_str;
use url::Url;

use crate::config::NatsConfig;
use crate::secret::Secret;

/// Why a NATS connection could not be made or configured. Messages name the
/// setting to fix and never carry a secret.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("nats.url {url} cannot be used: {message}")]
    Url { url: String, message: String },
    #[error("{key} cannot be used: {message}")]
    Credentials { key: &'static str, message: String },
    #[error("NATS at {url} refused the credentials ({message}); check {settings}")]
    Auth {
        url: String,
        message: String,
        settings: &'static str,
    },
    #[error("TLS with NATS at {url} failed ({message}); check nats.tls_ca (the CA that signed the server's certificate), nats.tls_cert / nats.tls_key, and that the certificate names the host in nats.url")]
    Tls { url: String, message: String },
    #[error("cannot connect to NATS at {url}: {message}; is nats.url (NATS_URL) right and the server up?")]
    Connect { url: String, message: String },
}

impl NatsError {
    /// Retrying cannot help: the settings or the server's configuration must change.
    pub fn is_permanent(&self) -> bool {
        !matches!(self, NatsError::Connect { .. })
    }
}

/// Connects once with the settings of `config`; `tune` adds what the caller
/// needs on top (its client name, timeouts, an event callback). Once
/// connected, the client reconnects by itself.
pub async fn connect(
    config: &NatsConfig,
    tune: impl FnOnce(ConnectOptions) -> ConnectOptions,
) -> Result<async_nats::Client, NatsError> {
    let servers = servers(config)?;
    let options = credentials(config, &servers.with_credentials)
        .await?
        .name(&config.client_name);
    let options = tls(config, options);
    tune(options)
        .connect(servers.addresses)
        .await
        .map_err(|e| classify(config, e))
}

/// For the worker, which must run while NATS is down: one attempt now, so a
/// wrong credential or certificate is reported at start-up, once and
/// clearly; then, whatever happened, a client that keeps connecting in the
/// background. Fails only when the settings themselves cannot be used.
pub async fn connect_in_background(
    config: &NatsConfig,
    tune: impl Fn(ConnectOptions) -> ConnectOptions,
) -> Result<async_nats::Client, NatsError> {
    match connect(config, &tune).await {
        Ok(client) => return Ok(client),
        Err(e @ (NatsError::Url { .. } | NatsError::Credentials { .. })) => return Err(e),
        Err(e) if e.is_permanent() => tracing::error!(error = %e,
            "NATS refuses tickvault; connecting again in the background until this is fixed"),
        Err(e) => {
            tracing::warn!(error = %e, "NATS is not reachable yet; connecting in the background")
        }
    }
    connect(config, |options| tune(options).retry_on_initial_connect()).await
}

struct Servers {
    /// Without credentials: the client may log its server list.
    addresses: Vec<ServerAddr>,
    /// The first server that carried credentials in `nats.url`, if any.
    with_credentials: Option<Url>,
}

fn servers(config: &NatsConfig) -> Result<Servers, NatsError> {
    let url_error = |message: String| NatsError::Url {
        url: config.url.redacted(),
        message,
    };
    let urls = config.url.parse_list().map_err(url_error)?;
    let with_credentials = urls.iter().find(|u| !u.username().is_empty()).cloned();
    let addresses = urls
        .into_iter()
        .map(|mut url| {
            let _ = url.set_username("");
            let _ = url.set_password(None);
            ServerAddr::from_url(url).map_err(|e| url_error(e.to_string()))
        })
        .collect::<Result<_, _>>()?;
    Ok(Servers {
        addresses,
        with_credentials,
    })
}

fn read(key: &'static str, path: &Path) -> Result<Secret, NatsError> {
    Secret::read_file(path).map_err(|e| NatsError::Credentials {
        key,
        message: e.to_string(),
    })
}

/// The one credential method in use: a setting, else the URL's.
async fn credentials(
    config: &NatsConfig,
    in_url: &Option<Url>,
) -> Result<ConnectOptions, NatsError> {
    let options = ConnectOptions::new();
    if let (Some(user), Some(path)) = (&config.user, &config.password_file) {
        let password = read("nats.password_file", path)?;
        return Ok(options.user_and_password(user.clone(), password.expose().into()));
    }
    if let Some(path) = &config.token_file {
        return Ok(options.token(read("nats.token_file", path)?.expose().into()));
    }
    if let Some(path) = &config.nkey_file {
        let seed = read("nats.nkey_file", path)?;
        return Ok(options.nkey(seed.expose().trim().into()));
    }
    if let Some(path) = &config.creds_file {
        let creds = read("nats.creds_file", path)?;
        return with_creds(options, &creds).map_err(|e| NatsError::Credentials {
            key: "nats.creds_file",
            message: format!("{} is not a NATS .creds file ({e})", path.display()),
        });
    }
    let Some(url) = in_url else {
        return Ok(options);
    };
    let decode = |part: &str| percent_decode_str(part).decode_utf8_lossy().into_owned();
    Ok(match url.password() {
        Some(password) => options.user_and_password(decode(url.username()), decode(password)),
        None => options.token(decode(url.username())),
    })
}

/// The user JWT and seed of a `.creds` file's content.
pub(crate) fn with_creds(
    options: ConnectOptions,
    creds: &Secret,
) -> std::io::Result<ConnectOptions> {
    // The parser wants the newline after the closing line, which reading trims.
    options.credentials(&format!("{}\n", creds.expose()))
}

fn tls(config: &NatsConfig, mut options: ConnectOptions) -> ConnectOptions {
    if let Some(ca) = &config.tls_ca {
        options = options.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    if config.tls_required {
        options = options.require_tls(true);
    }
    options
}

/// The settings to check when the server refuses the credentials.
fn auth_settings(config: &NatsConfig) -> &'static str {
    if config.creds_file.is_some() {
        "nats.creds_file (its user JWT and seed, and that the server trusts its account)"
    } else if config.nkey_file.is_some() {
        "nats.nkey_file (and that the server lists its public key)"
    } else if config.token_file.is_some() {
        "nats.token_file"
    } else if config.user.is_some() {
        "nats.user and nats.password_file"
    } else if config
        .url
        .parse_list()
        .is_ok_and(|urls| urls.iter().any(|u| !u.username().is_empty()))
    {
        "the credentials in nats.url"
    } else {
        "the server requires credentials: set nats.user + nats.password_file, nats.token_file, nats.nkey_file or nats.creds_file"
    }
}

fn classify(config: &NatsConfig, error: ConnectError) -> NatsError {
    let url = config.url.redacted();
    let message = error.to_string();
    match error.kind() {
        ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
            NatsError::Auth {
                url,
                message,
                settings: auth_settings(config),
            }
        }
        ConnectErrorKind::Tls => NatsError::Tls { url, message },
        _ if caused_by_tls(&error) => NatsError::Tls { url, message },
        _ => NatsError::Connect { url, message },
    }
}

/// A handshake or certificate failure reaches async-nats as an I/O error
/// wrapping the rustls error.
fn caused_by_tls(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(error) = next {
        let tls = error.is::<rustls::Error>()
            || error
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .is_some_and(|inner| inner.is::<rustls::Error>());
        if tls {
            return true;
        }
        next = error.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::SecretUrl;

    fn config(url: &str) -> NatsConfig {
        NatsConfig {
            url: SecretUrl::new(url),
            ..NatsConfig::default()
        }
    }

    #[test]
    fn a_server_list_loses_its_credentials_before_the_client_sees_it() {
        let servers = servers(&config("nats://u:p%40ss@n1:4222, tls://n2:4223,n3")).unwrap();
        let shown: Vec<String> = servers
            .addresses
            .iter()
            .map(|a| a.as_url_str().to_string())
            .collect();
        assert_eq!(
            shown,
            ["nats://n1:4222", "tls://n2:4223", "nats://n3"],
            "no credentials left in the addresses"
        );
        assert!(servers.addresses[1].tls_required());
        let with = servers.with_credentials.unwrap();
        assert_eq!((with.username(), with.password()), ("u", Some("p%40ss")));
    }

    #[test]
    fn a_bad_server_entry_names_nats_url_without_its_secret() {
        let error = servers(&config("nats://n1:4222,http://u:s3cret@n2"))
            .err()
            .unwrap()
            .to_string();
        assert!(error.starts_with("nats.url"), "{error}");
        assert!(!error.contains("s3cret"), "{error}");
    }

    #[test]
    fn refused_credentials_name_the_setting_in_use() {
        let mut nkey = config("nats://n1");
        nkey.nkey_file = Some("/run/secrets/seed".into());
        assert!(auth_settings(&nkey).starts_with("nats.nkey_file"));
        assert_eq!(
            auth_settings(&config("nats://tok@n1")),
            "the credentials in nats.url"
        );
        assert!(auth_settings(&config("nats://n1")).contains("nats.creds_file"));
        let refused = classify(
            &config("nats://u:s3cret@n1"),
            ConnectError::new(ConnectErrorKind::AuthorizationViolation),
        );
        assert!(refused.is_permanent());
        assert!(!refused.to_string().contains("s3cret"), "{refused}");
    }

    #[test]
    fn a_certificate_failure_inside_an_io_error_is_a_tls_error() {
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        let error = classify(&config("tls://n1"), ConnectError::from(io));
        assert!(matches!(error, NatsError::Tls { .. }), "{error}");
        assert!(error.to_string().contains("nats.tls_ca"), "{error}");
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let error = classify(&config("nats://n1"), ConnectError::from(refused));
        assert!(!error.is_permanent(), "{error}");
    }
}
