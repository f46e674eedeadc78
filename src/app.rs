//! The application: [`App::build`] wires every component from a [`Config`]
//! (used by `main` and by the tests alike); [`App::run_until_stopped`] runs
//! them until the shutdown future completes, then drains.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::db::{self, Database, DbError, DbRole};
use crate::history;
use crate::ingest::{Ingest, IngestError};
use crate::nats::NatsError;
use crate::ops::health::Status;
use crate::ops::http::{self, OpsState};
use crate::ops::metrics::Metrics;

/// How long shutdown waits for an unavailable database before leaving
/// unwritten batches to JetStream redelivery.
const SHUTDOWN_DB_GRACE: Duration = Duration::from_secs(10);
/// The bound on the whole drain after the grace period.
const SHUTDOWN_DRAIN_BOUND: Duration = Duration::from_secs(10);
/// How long shutdown waits for database connections to be returned.
const POOL_CLOSE_BOUND: Duration = Duration::from_secs(5);
/// How long shutdown waits to send buffered acknowledgements (NATS may be gone).
const NATS_FLUSH_BOUND: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Database(#[from] DbError),
    #[error("cannot listen on http.addr {addr}: {source}; pick a free address or port")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Nats(#[from] NatsError),
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error("the HTTP server failed: {0}")]
    Http(#[source] std::io::Error),
    #[error("the {0} task failed: {1}; this is a bug, please report it with the log")]
    Task(&'static str, #[source] tokio::task::JoinError),
}

pub struct App {
    config: Config,
    listener: TcpListener,
    http_addr: SocketAddr,
    db: Database,
    /// History's own database (`history.database_url`), when set.
    history_db: Option<Database>,
    nats: async_nats::Client,
    metrics: Arc<Metrics>,
    status: Arc<Status>,
}

impl App {
    /// Binds the HTTP port and prepares the connections. Neither the
    /// database nor NATS needs to be up: both are (re)connected in the background.
    pub async fn build(config: Config) -> Result<App, BuildError> {
        let listener = TcpListener::bind(config.http.addr)
            .await
            .map_err(|source| BuildError::Bind {
                addr: config.http.addr,
                source,
            })?;
        let http_addr = listener.local_addr().map_err(|source| BuildError::Bind {
            addr: config.http.addr,
            source,
        })?;
        let db = Database::connect_lazy(&config.database)?;
        let history_db = config
            .history_database()
            .map(|replica| Database::connect_lazy_as(DbRole::History, &replica))
            .transpose()?;
        let metrics = Arc::new(Metrics::new());
        for record_type in crate::records::RecordType::ALL {
            metrics.queue_sized(record_type, config.ingest.queue_capacity);
        }
        let nats = connect_nats(&config, metrics.clone()).await?;
        tracing::info!(
            http = %http_addr,
            database = %config.database.url,
            history_database = %config.history.database_url.as_ref().unwrap_or(&config.database.url),
            nats = %config.nats.url,
            mode = ?config.ingest.mode,
            "tickvault built"
        );
        Ok(App {
            status: Arc::new(Status::new(history_db.is_some())),
            config,
            listener,
            http_addr,
            db,
            history_db,
            nats,
            metrics,
        })
    }

    /// The database history reads: its own, else the ingest database.
    fn history_database(&self) -> &Database {
        self.history_db.as_ref().unwrap_or(&self.db)
    }

    /// The bound HTTP address (useful with port 0).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Runs until `shutdown` completes (or ingest cannot go on), then stops
    /// intake, flushes every queue, acknowledges and returns — within a bound.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), RunError> {
        let stop_intake = CancellationToken::new();
        let give_up = CancellationToken::new();
        let stop_rest = CancellationToken::new();

        let mut supervisors = JoinSet::new();
        supervisors.spawn(db::supervise(
            self.db.clone(),
            self.config.database.migrate_on_start,
            self.status.clone(),
            self.metrics.clone(),
            stop_rest.clone(),
        ));
        if let Some(history_db) = &self.history_db {
            supervisors.spawn(db::supervise(
                history_db.clone(),
                false,
                self.status.clone(),
                self.metrics.clone(),
                stop_rest.clone(),
            ));
        }
        let history_db = self.history_database().clone();
        let ops = OpsState {
            status: self.status.clone(),
            metrics: self.metrics.clone(),
            db: self.db.clone(),
            nats: self.nats.clone(),
        };
        let http_stop = stop_rest.clone();
        let http_server = tokio::spawn(async move {
            axum::serve(self.listener, http::router(ops))
                .with_graceful_shutdown(async move { http_stop.cancelled().await })
                .await
        });
        let history = tokio::spawn(history::serve(
            self.nats.clone(),
            history_db,
            self.config.history.clone(),
            self.metrics.clone(),
            self.status.clone(),
            stop_intake.clone(),
        ));
        let ingest = Ingest {
            config: Arc::new(self.config.ingest.clone()),
            db: self.db.clone(),
            client: self.nats.clone(),
            metrics: self.metrics.clone(),
            status: self.status.clone(),
        };
        let mut ingest = tokio::spawn(ingest.run(stop_intake.clone(), give_up.clone()));
        let lag = tokio::spawn(crate::ops::lag::watch(
            self.nats.clone(),
            self.config.ingest.clone(),
            self.metrics.clone(),
            stop_rest.clone(),
        ));
        let summary = tokio::spawn(crate::ops::summary::run(
            self.metrics.clone(),
            Duration::from_secs(self.config.log.summary_interval_secs),
            stop_rest.clone(),
        ));

        let ingest_result = tokio::select! {
            _ = shutdown => None,
            result = &mut ingest => Some(result),
        };
        stop_intake.cancel();
        let ingest_result = match ingest_result {
            Some(result) => result,
            None => {
                tracing::info!("stopping intake and flushing every queue");
                let grace = tokio::time::sleep(SHUTDOWN_DB_GRACE);
                tokio::pin!(grace);
                tokio::select! {
                    result = &mut ingest => result,
                    _ = &mut grace => {
                        give_up.cancel();
                        match tokio::time::timeout(SHUTDOWN_DRAIN_BOUND, &mut ingest).await {
                            Ok(result) => result,
                            Err(_) => {
                                tracing::error!("ingest did not drain in time; unacknowledged messages will be redelivered");
                                ingest.abort();
                                Ok(Ok(()))
                            }
                        }
                    }
                }
            }
        };
        // Acknowledgements are buffered publishes: send them before leaving
        // (without a connection there is no one to send them to).
        let connected = self.nats.connection_state() == async_nats::connection::State::Connected;
        let flushed = connected
            && matches!(
                tokio::time::timeout(NATS_FLUSH_BOUND, self.nats.flush()).await,
                Ok(Ok(()))
            );
        if !flushed {
            tracing::warn!(
                "could not send the last acknowledgements to NATS; those messages will be redelivered"
            );
        }
        let _ = history.await;
        stop_rest.cancel();
        supervisors.join_all().await;
        let _ = summary.await;
        let _ = lag.await;
        let http_result = http_server.await;
        let pools = self
            .history_db
            .iter()
            .chain([&self.db])
            .map(|db| db.pool.close());
        if tokio::time::timeout(POOL_CLOSE_BOUND, futures::future::join_all(pools))
            .await
            .is_err()
        {
            tracing::warn!("database connections still busy at exit were dropped");
        }
        ingest_result.map_err(|e| RunError::Task("ingest", e))??;
        http_result
            .map_err(|e| RunError::Task("HTTP", e))?
            .map_err(RunError::Http)?;
        tracing::info!("tickvault stopped");
        Ok(())
    }
}

/// Connects in the background: a credential or TLS problem is reported at
/// start-up; the client retries the first connection and every reconnection
/// with capped backoff; connection events go to metrics.
async fn connect_nats(
    config: &Config,
    metrics: Arc<Metrics>,
) -> Result<async_nats::Client, NatsError> {
    // Each subscription buffers up to this many messages: a core-mode
    // type's queue capacity, and always a whole JetStream pull.
    let subscription_capacity = config.ingest.queue_capacity.max(config.ingest.fetch_batch);
    crate::nats::connect_in_background(&config.nats, |options| {
        let metrics = metrics.clone();
        options
            .subscription_capacity(subscription_capacity)
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(5))
            .event_callback(move |event| {
                let metrics = metrics.clone();
                async move { metrics.nats_event(&event) }
            })
    })
    .await
}
