//! The client side of the history service, shared by `tickvault history`,
//! `latest` and `symbols`: one request, its JSON reply, or one clear error.

use std::time::Duration;

use serde_json::Value as Json;

use tickvault::config::Config;
use tickvault::records::RecordType;

/// What to ask for: the service's `kind` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    Ticks,
    Candles,
    Foreign,
    Index,
    Derivatives,
}

impl Kind {
    pub fn record_type(self) -> RecordType {
        match self {
            Kind::Ticks => RecordType::Tick,
            Kind::Candles => RecordType::Candle,
            Kind::Foreign => RecordType::Foreign,
            Kind::Index => RecordType::Index,
            Kind::Derivatives => RecordType::Deriv,
        }
    }

    /// `ticks`, `candles`, ...: the endpoint and `kind` name.
    pub fn name(self) -> &'static str {
        self.record_type().spec().history_kind
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Connect(#[from] tickvault::nats::NatsError),
    #[error("no reply on {subject} within {timeout_s} s; is `tickvault run` up and history.subject_prefix the same here?")]
    TimedOut { subject: String, timeout_s: u64 },
    #[error("nothing answers on {subject}; start the worker (`tickvault run`) or check history.subject_prefix")]
    NoService { subject: String },
    #[error("the request to {subject} failed: {message}")]
    Request { subject: String, message: String },
    #[error("the history service answered {code}: {message}{}", retry_after_s.map(|s| format!(" (retry after {s} s)")).unwrap_or_default())]
    Refused {
        code: u64,
        message: String,
        retry_after_s: Option<u64>,
    },
    #[error(
        "the service sent a reply that is not history JSON ({0}); are both sides the same version?"
    )]
    BadReply(String),
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
}

/// A connection to the history service.
pub struct HistoryClient {
    client: async_nats::Client,
    prefix: String,
    timeout: Duration,
}

impl HistoryClient {
    /// Connects with the `nats.*` settings; `timeout` bounds each reply.
    pub async fn connect(config: &Config, timeout: Duration) -> Result<HistoryClient, ClientError> {
        let timeout = timeout.max(Duration::from_secs(1));
        let client = tickvault::nats::connect(&config.nats, |options| {
            options
                .name("tickvault-cli")
                .request_timeout(Some(timeout))
                .connection_timeout(timeout.min(Duration::from_secs(10)))
        })
        .await?;
        Ok(HistoryClient {
            client,
            prefix: config.history.subject_prefix.clone(),
            timeout,
        })
    }

    /// Sends `body` to `<prefix>.<endpoint>`; an error reply is [`ClientError::Refused`].
    pub async fn ask(&self, endpoint: &str, body: &Json) -> Result<Json, ClientError> {
        use async_nats::RequestErrorKind as Kind;
        let subject = format!("{}.{endpoint}", self.prefix);
        let reply = self
            .client
            .request(subject.clone(), body.to_string().into())
            .await
            .map_err(|e| match e.kind() {
                Kind::TimedOut => ClientError::TimedOut {
                    subject: subject.clone(),
                    timeout_s: self.timeout.as_secs(),
                },
                Kind::NoResponders => ClientError::NoService {
                    subject: subject.clone(),
                },
                _ => ClientError::Request {
                    subject: subject.clone(),
                    message: e.to_string(),
                },
            })?;
        let json: Json = serde_json::from_slice(&reply.payload)
            .map_err(|e| ClientError::BadReply(e.to_string()))?;
        if let Some(error) = json.get("error") {
            return Err(ClientError::Refused {
                code: error.get("code").and_then(Json::as_u64).unwrap_or(0),
                message: error
                    .get("message")
                    .and_then(Json::as_str)
                    .unwrap_or("")
                    .to_string(),
                retry_after_s: error.get("retry_after_s").and_then(Json::as_u64),
            });
        }
        Ok(json)
    }
}
