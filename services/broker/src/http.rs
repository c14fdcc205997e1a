//! The broker's HTTP surface: `GET /healthz` (the process is up), `GET /readyz` (the store
//! answers), `GET /metrics` (Prometheus text) and `GET /oauth/callback` (the browser redirect
//! of auth-code consents, see [`crate::tokens::consent::callback_page`]).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::Html;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokenfleet_store::Store;

use crate::metrics::Metrics;
use crate::state::BrokerState;

/// How long `/readyz` waits for the store before answering 503.
pub const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// What the HTTP handlers need.
#[derive(Debug, Clone)]
pub struct HttpState {
    /// Pinged by `/readyz`.
    pub store: Arc<dyn Store>,
    /// Rendered by `/metrics`.
    pub metrics: Metrics,
    /// Used by `/oauth/callback` to complete consents.
    pub broker: BrokerState,
}

/// The HTTP routes.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route(crate::tokens::consent::CALLBACK_PATH, get(oauth_callback))
        .with_state(state)
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<HttpState>) -> Response {
    let ping = tokio::time::timeout(READY_TIMEOUT, state.store.ping()).await;
    match ping {
        Ok(Ok(())) => {
            state.metrics.store_ping(true);
            (StatusCode::OK, "ready").into_response()
        }
        Ok(Err(error)) => {
            state.metrics.store_ping(false);
            tracing::warn!(%error, "readiness: store ping failed");
            (StatusCode::SERVICE_UNAVAILABLE, "store unavailable").into_response()
        }
        Err(_) => {
            state.metrics.store_ping(false);
            tracing::warn!("readiness: store ping timed out");
            (StatusCode::SERVICE_UNAVAILABLE, "store unavailable").into_response()
        }
    }
}

async fn metrics(State(state): State<HttpState>) -> Response {
    match state.metrics.encode() {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "encoding metrics failed").into_response(),
    }
}

async fn oauth_callback(State(state): State<HttpState>, RawQuery(query): RawQuery) -> Response {
    let page = crate::tokens::consent::callback_page(&state.broker, query.as_deref()).await;
    let status = StatusCode::from_u16(page.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [
            (header::CACHE_CONTROL, "no-store"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        Html(page.html),
    )
        .into_response()
}
