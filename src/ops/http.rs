//! `GET /health`, `GET /ready` and `GET /metrics`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

use crate::db::Database;
use crate::ops::health::Status;
use crate::ops::metrics::Metrics;

#[derive(Clone)]
pub struct OpsState {
    pub status: Arc<Status>,
    pub metrics: Arc<Metrics>,
    pub db: Database,
    pub nats: async_nats::Client,
}

impl OpsState {
    fn nats_connected(&self) -> bool {
        let connected = self.nats.connection_state() == async_nats::connection::State::Connected;
        self.metrics.nats_connection(connected);
        connected
    }
}

pub fn router(state: OpsState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn health(State(state): State<OpsState>) -> impl IntoResponse {
    Json(state.status.report(state.nats_connected()))
}

async fn ready(State(state): State<OpsState>) -> impl IntoResponse {
    if state.status.ready(state.nats_connected()) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics(State(state): State<OpsState>) -> impl IntoResponse {
    // Gauges that mirror another component's state are read at scrape time.
    state.nats_connected();
    let pool = &state.db.pool;
    state
        .metrics
        .db_pool(pool.num_idle(), pool.size(), state.db.pool_max());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}
