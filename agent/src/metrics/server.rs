//! The metrics listener (`[metrics] listen`): HTTP/1.1 with `GET /metrics` (Prometheus text, by
//! `Accept` header OpenMetrics or 0.0.4) and `GET /healthz` (`200 ok`, or `503` and the reason).
//!
//! Its limits are the agent's other listeners' (the accept loop of `crate::line_server`:
//! connections at once, in total and per source, each closed after a longest lifetime) plus
//! HTTP's own, applied by hyper's HTTP/1 connection builder: the request header must arrive
//! within `header_read_timeout` (also the next one on a keep-alive connection) and fit in
//! `max_header_bytes` with at most 64 fields (else `431`). Requests with a body are refused
//! (`413`): nothing here reads one. HTTP/1.1 only — protocol detection for h2c would read the
//! first bytes without a timeout, and scrapers and probes speak HTTP/1.1.
//!
//! A connection waits (`tokenfleet_listen::Waiting`) whenever it serves no request — before its
//! first one and idle between keep-alive requests — so when all `max_connections` are taken a
//! new connection closes the one that has waited longest and takes its slot: hosts that connect
//! and send nothing cannot keep Prometheus or a health probe out. A new connection gets `503` and
//! is closed only when its own source is at `max_connections_per_source`, or when every open
//! connection is serving a request.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Body as _, Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokenfleet_listen::{Calls, GuardedBody, Waiting};
use tokio::net::TcpListener;

use super::{AgentMetrics, Format, Health};
use crate::line_server::{self, Gate, Refusal, SessionLimits};

/// The limits of the metrics listener (`[metrics]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsLimits {
    /// Connections at once (in total and per source) and the longest a connection may last.
    pub connections: SessionLimits,
    /// Longest wait for a complete request header.
    pub header_read_timeout: Duration,
    /// Largest request header (request line and header fields), at least 8192 bytes.
    pub max_header_bytes: usize,
}

impl Default for MetricsLimits {
    fn default() -> Self {
        Self {
            connections: SessionLimits {
                max_sessions: 16,
                max_sessions_per_source: 8,
                max_session: Duration::from_secs(60),
            },
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 8192,
        }
    }
}

/// The smallest `max_header_bytes` hyper allows.
pub const MIN_HEADER_BYTES: usize = 8192;

/// Most header fields in one request.
const MAX_HEADER_FIELDS: usize = 64;

/// The answer to a connection over a cap (written without waiting, then closed).
fn busy(_: Refusal) -> &'static [u8] {
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n\
      Content-Length: 21\r\nConnection: close\r\n\r\ntoo many connections\n"
}

/// Serves `/metrics` and `/healthz` on `listener` until `shutdown` completes, then finishes
/// the requests in progress (see the module documentation).
pub async fn serve(
    listener: TcpListener,
    limits: MetricsLimits,
    metrics: AgentMetrics,
    health: Health,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(MIN_HEADER_BYTES))
        .max_headers(MAX_HEADER_FIELDS);
    line_server::serve(
        listener,
        shutdown,
        "metrics",
        Gate {
            limits: limits.connections,
            busy,
            known: Box::new(|_| false),
            // Connections waiting for a request (the first, or the next on a keep-alive one).
            waiting: Some(Arc::new(Waiting::default())),
            closed: metrics.closed_by(super::Listener::Metrics),
        },
        move |stream, _peer, mut stop, seat| {
            let builder = builder.clone();
            let metrics = metrics.clone();
            let health = health.clone();
            // Waiting whenever no request is in flight, until the answer is sent; no source is
            // known, so every connection has its seat (and ends when it is closed).
            let calls = seat.map(Calls::seated);
            async move {
                let service_calls = calls;
                let service = hyper::service::service_fn(move |request| {
                    let call = service_calls.as_ref().map(Calls::start);
                    let metrics = metrics.clone();
                    let health = health.clone();
                    async move {
                        let response = respond(request, metrics, health).await;
                        Ok::<_, Infallible>(response.map(|body| GuardedBody::new(body, call)))
                    }
                });
                let connection = builder.serve_connection(TokioIo::new(stream), service);
                tokio::pin!(connection);
                let stopped = async move {
                    let _ = stop.wait_for(|stopping| *stopping).await;
                };
                let result = tokio::select! {
                    result = connection.as_mut() => result,
                    () = stopped => {
                        connection.as_mut().graceful_shutdown();
                        connection.await
                    }
                };
                // A client's doing (timeout, reset, bad request): line_server logs it at debug.
                result.map_err(io::Error::other)
            }
        },
    )
    .await
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn respond(
    request: Request<Incoming>,
    metrics: AgentMetrics,
    health: Health,
) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET and HEAD are served here\n",
        );
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    if !request.body().is_end_stream() {
        let mut response = text(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request bodies are not accepted here\n",
        );
        // The body is not read, so the connection cannot carry another request.
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return response;
    }
    match request.uri().path() {
        "/metrics" => {
            let accept = request
                .headers()
                .get_all(header::ACCEPT)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect::<Vec<_>>()
                .join(",");
            let format = Format::from_accept(&accept);
            match tokio::task::spawn_blocking(move || metrics.encode(format)).await {
                Ok(Ok(body)) => {
                    let mut response = text(StatusCode::OK, body);
                    response.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static(format.content_type()),
                    );
                    response
                }
                _ => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "encoding the metrics failed\n",
                ),
            }
        }
        "/healthz" => match health.check().await {
            Ok(()) => text(StatusCode::OK, "ok\n"),
            Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: this listener serves /metrics and /healthz\n",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_busy_answer_is_one_whole_response() {
        let answer = std::str::from_utf8(busy(Refusal::Total)).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{answer:?}"
        );
    }
}
