//! The broker's HTTP surface: `GET /healthz` (the process is up), `GET /readyz` (the store takes
//! writes now: reachable, a master, with the replicas writes wait for; see
//! [`tokenfleet_store::Store::ready`] — what a load balancer needs to route traffic here; 503
//! with a short reason otherwise), `GET /metrics` (OpenMetrics or Prometheus text by `Accept`) and `GET /oauth/callback` (the browser redirect
//! of auth-code consents, see [`crate::edge::callback::callback_page`]).

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
    let ready = tokio::time::timeout(READY_TIMEOUT, state.store.ready()).await;
    let reason = match ready {
        Ok(Ok(())) => {
            state.metrics.store_ping(true);
            return (StatusCode::OK, "ready\n").into_response();
        }
        Ok(Err(error)) => {
            tracing::warn!(%error, "readiness: the store cannot take writes");
            // The store's reason; the store redacts credentials from every error it makes.
            format!("not ready: {}\n", short_reason(&error))
        }
        Err(_) => {
            tracing::warn!("readiness: the store did not answer in time");
            format!(
                "not ready: the store did not answer within {} ms\n",
                READY_TIMEOUT.as_millis()
            )
        }
    };
    state.metrics.store_ping(false);
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::CACHE_CONTROL, "no-store")],
        reason,
    )
        .into_response()
}

/// The reason a probe shows: the store error's message, cut to one line of at most 200 bytes.
fn short_reason(error: &tokenfleet_store::StoreError) -> String {
    let text = error.to_string();
    let line = text.lines().next().unwrap_or_default();
    let mut end = line.len().min(200);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    line[..end].to_owned()
}

async fn metrics(State(state): State<HttpState>, headers: axum::http::HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    match state.metrics.encode_for(accept) {
        Ok((text, content_type)) => ([(header::CONTENT_TYPE, content_type)], text).into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "encoding metrics failed").into_response(),
    }
}

async fn oauth_callback(State(state): State<HttpState>, RawQuery(query): RawQuery) -> Response {
    let page = crate::edge::callback::callback_page(&state.broker, query.as_deref()).await;
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
