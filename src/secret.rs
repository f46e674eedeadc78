//! Secrets that never reach logs, errors or printed configuration: a
//! connection URL that may carry credentials ([`SecretUrl`]) and a password,
//! token or key read from a file ([`Secret`]).

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use url::Url;

/// A URL that may carry a password (or, for NATS, a token in the user part).
/// A NATS URL may also be a comma-separated list of servers, each redacted.
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

    /// Each comma-separated entry of a server list (NATS), parsed. An entry
    /// without a scheme is read as `nats://`, as the NATS clients do.
    pub fn parse_list(&self) -> Result<Vec<Url>, String> {
        self.0
            .split(',')
            .map(str::trim)
            .enumerate()
            .map(|(n, entry)| {
                let entry = with_nats_scheme(entry);
                Url::parse(&entry).map_err(|e| {
                    format!(
                        "server {} ({}) is not a valid URL ({e})",
                        n + 1,
                        redact_one(&entry)
                    )
                })
            })
            .collect()
    }

    /// The URL with its password (and a NATS token) replaced by `***`; for a
    /// server list, every entry's.
    pub fn redacted(&self) -> String {
        // A PostgreSQL password may hold a comma; only NATS URLs are lists.
        if is_postgres(&self.0) {
            return redact_one(&self.0);
        }
        self.0
            .split(',')
            .map(|entry| redact_one(&with_nats_scheme(entry.trim())))
            .collect::<Vec<_>>()
            .join(",")
    }
}

fn with_nats_scheme(entry: &str) -> String {
    if entry.contains("://") {
        entry.to_string()
    } else {
        format!("nats://{entry}")
    }
}

fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

fn redact_one(url: &str) -> String {
    let Ok(mut url) = Url::parse(url) else {
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

/// A password, token or key: `Debug` and `Display` show `***`; only
/// [`Secret::expose`] gives the value, at the place that connects.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

/// Why a secret file could not be used. Names the file, never its content.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is empty", path.display())]
    Empty { path: PathBuf },
}

impl Secret {
    /// The file's content with trailing newlines trimmed (Docker and
    /// Kubernetes secrets often end with one); every other character is kept.
    pub fn read_file(path: &Path) -> Result<Secret, SecretFileError> {
        let content = std::fs::read_to_string(path).map_err(|source| SecretFileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let value = content.trim_end_matches(['\n', '\r']);
        if value.is_empty() {
            return Err(SecretFileError::Empty {
                path: path.to_path_buf(),
            });
        }
        Ok(Secret(value.to_string()))
    }

    /// The real value: pass it to a client, never to a log.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[cfg(test)]
mod tests {
    use super::{Secret, SecretUrl};

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

    #[test]
    fn every_server_of_a_list_is_redacted() {
        let list = SecretUrl::new("nats://a:pw1@n1:4222, tls://tok3n@n2:4222,n3:4222");
        assert_eq!(
            list.redacted(),
            "nats://a:***@n1:4222,tls://***@n2:4222,nats://n3:4222"
        );
        assert!(!format!("{list} {list:?}").contains("pw1"));
        let parsed = list.parse_list().unwrap();
        assert_eq!(parsed.len(), 3);
        assert_eq!(parsed[2].as_str(), "nats://n3:4222");
        let bad = SecretUrl::new("nats://n1:4222,nats://u:s3cret@bad host:1");
        let message = bad.parse_list().unwrap_err();
        assert!(message.contains("server 2"), "{message}");
        assert!(!message.contains("s3cret"), "{message}");
        // A comma inside a PostgreSQL password does not split the URL.
        let db = SecretUrl::new("postgres://app:a,b@db/market");
        assert_eq!(db.redacted(), "postgres://app:***@db/market");
    }

    #[test]
    fn a_secret_file_keeps_every_character_but_the_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("password");
        std::fs::write(&path, "p@ss/w:rd+= x\r\n").unwrap();
        let secret = Secret::read_file(&path).unwrap();
        assert_eq!(secret.expose(), "p@ss/w:rd+= x");
        assert_eq!(format!("{secret} {secret:?}"), "*** \"***\"");
        std::fs::write(&path, "\n").unwrap();
        let empty = Secret::read_file(&path).unwrap_err().to_string();
        assert!(empty.contains("is empty"), "{empty}");
        let missing = Secret::read_file(&dir.path().join("nope")).unwrap_err();
        assert!(missing.to_string().contains("nope"), "{missing}");
    }
}
