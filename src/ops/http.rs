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

/// 200 or 503 by [`Status::ready`]; the body also says when history's own
/// database is down, which does not make the worker unready.
async fn ready(State(state): State<OpsState>) -> impl IntoResponse {
    let (code, verdict) = if state.status.ready(state.nats_connected()) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    };
    let history = if state.status.history_db_down() {
        "; history database (history.database_url) down: history answers 503"
    } else {
        ""
    };
    (code, format!("{verdict}{history}\n"))
}

async fn metrics(State(state): State<OpsState>) -> impl IntoResponse {
    // Gauges that mirror another component's state are read at scrape time.
    state.nats_connected();
    if !state.status.has_history_database() {
        state.metrics.history_db_shares_primary();
    }
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
