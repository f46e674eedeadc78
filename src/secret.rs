//! A connection URL whose credentials never reach logs or printed configuration.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use url::Url;

/// A URL that may carry a password (or, for NATS, a token in the user part).
///
/// `Debug`, `Display` and `Serialize` all show the redacted form; only
/// [`SecretUrl::expose`] gives the real one, at the place that connects.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The real URL, credentials included: pass it to a client, never to a log.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn parse(&self) -> Result<Url, String> {
        Url::parse(&self.0).map_err(|e| format!("is not a valid URL ({e})"))
    }

    /// The URL with its password (and a NATS token) replaced by `***`.
    pub fn redacted(&self) -> String {
        let Ok(mut url) = Url::parse(&self.0) else {
            return "***".into();
        };
        // Drivers also take credentials as query parameters (`?password=`).
        let hidden: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| {
                let secret = matches!(k.as_ref(), "password" | "sslpassword" | "token" | "pass");
                (
                    k.into_owned(),
                    if secret { "***".into() } else { v.into_owned() },
                )
            })
            .collect();
        if url.query().is_some() {
            url.query_pairs_mut().clear().extend_pairs(hidden);
        }
        if url.password().is_some() {
            let _ = url.set_password(Some("***"));
        } else if !url.username().is_empty() && !matches!(url.scheme(), "postgres" | "postgresql") {
            // nats://TOKEN@host: the user part is the secret.
            let _ = url.set_username("***");
        }
        url.to_string()
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Serialize for SecretUrl {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.redacted())
    }
}

impl<'de> Deserialize<'de> for SecretUrl {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(SecretUrl)
    }
}

#[cfg(test)]
mod tests {
    use super::SecretUrl;

    #[test]
    fn passwords_and_tokens_are_redacted_everywhere_but_expose() {
        let db = SecretUrl::new("postgres://app:hunter2@db:5432/market");
        assert_eq!(db.redacted(), "postgres://app:***@db:5432/market");
        assert_eq!(format!("{db} {db:?}").matches("hunter2").count(), 0);
        assert_eq!(db.expose(), "postgres://app:hunter2@db:5432/market");

        let token = SecretUrl::new("nats://s3cr3t@nats:4222");
        assert_eq!(token.redacted(), "nats://***@nats:4222");
        let plain = SecretUrl::new("postgres://postgres@127.0.0.1:5432/postgres");
        assert_eq!(plain.redacted(), plain.expose());
        assert_eq!(SecretUrl::new("not a url").redacted(), "***");
        let query = SecretUrl::new("postgres://app@db/market?sslmode=require&password=hunter2");
        assert_eq!(
            query.redacted(),
            "postgres://app@db/market?sslmode=require&password=***"
        );
    }
}
