//! The web console on the broker's HTTP listener: the admin operations as pages for operators
//! (signed in with an API key), and the consent-link pages for mailbox owners.
//!
//! Built on the operations layer: every page and every button calls the same operations as the
//! gRPC Admin API — the core's, in domain types (consent and the token buttons, consent links,
//! enrollment and agent revocation, the audit log, fleet status, connection tests), or the
//! resources' through [`crate::admin::AdminService`]'s in-process calls — with the principal the
//! session holds, resolved at sign-in by [`crate::api_keys::authenticate`] exactly as the gRPC
//! edge does, so authorization and audit are the API's. Hiding a button is presentation only: a
//! viewer's forged POST reaches the operation and is refused there (403).
//!
//! Routes: `/console/…` (operators, `pages.rs`), `/consent/<token>…` (mailbox owners,
//! `link.rs`), `/console/static/…` (one stylesheet, one script), `/console/help/troubleshooting`
//! (the troubleshooting guide the error messages link to), and `/` → `/console/`.
//!
//! Every answer carries the security headers (`security_headers`): CSP without inline script
//! and without framing, `nosniff`, `no-referrer`, and `no-store` on everything but the static
//! files. Sessions and CSRF: [`session`].

mod help;
pub mod html;
mod link;
mod pages;
pub mod session;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};

use crate::admin::AdminService;
use session::Sessions;

/// The Content-Security-Policy of every console answer.
pub const CSP: &str = "default-src 'self'; script-src 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'";
/// Largest form body the console accepts.
pub const MAX_FORM_BYTES: usize = 16 * 1024;

/// What the console's handlers share.
#[derive(Debug, Clone)]
pub struct ConsoleState {
    /// The admin operations (the same service the gRPC listener serves).
    pub admin: AdminService,
    /// This replica's console sessions.
    pub sessions: Sessions,
    /// Where sign-ins are counted (`tokenfleet_console_sign_ins_total`).
    pub metrics: crate::metrics::Metrics,
}

impl ConsoleState {
    /// A console over `admin` with no sessions yet, counting its sign-ins in `metrics`.
    pub fn new(admin: AdminService, metrics: crate::metrics::Metrics) -> Self {
        Self {
            sessions: Sessions::with_failures(admin.auth_failures()),
            admin,
            metrics,
        }
    }
}

/// The console's routes (merge into the HTTP listener's router).
pub fn router(state: ConsoleState) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/console/") }))
        .route("/console", get(|| async { Redirect::to("/console/") }))
        .route("/console/", get(pages::overview))
        .route(
            "/console/sign-in",
            get(pages::sign_in_form).post(pages::sign_in),
        )
        .route("/console/sign-out", post(pages::sign_out))
        .route("/console/agents", get(pages::agents))
        .route("/console/agents/enroll", post(pages::enroll))
        .route("/console/audit", get(pages::audit))
        .route("/console/t/{tenant}/mailboxes/{name}", get(pages::mailbox))
        .route(
            "/console/t/{tenant}/mailboxes/{name}/status.json",
            get(pages::mailbox_status),
        )
        .route(
            "/console/t/{tenant}/mailboxes/{name}/{action}",
            post(pages::mailbox_action),
        )
        .route(
            "/console/t/{tenant}/links/{id}/revoke",
            post(pages::revoke_link),
        )
        .route("/console/t/{tenant}/devices/{name}", get(pages::device))
        .route(
            "/console/t/{tenant}/devices/{name}/test",
            post(pages::test_connection),
        )
        .route(
            "/console/t/{tenant}/agents/{name}/revoke",
            post(pages::revoke_agent),
        )
        .route("/console/help/troubleshooting", get(help::troubleshooting))
        .route("/console/static/console.css", get(stylesheet))
        .route("/console/static/console.js", get(script))
        .route("/consent/{token}", get(link::open))
        .route("/consent/{token}/start", post(link::start))
        .route("/consent/{token}/status.json", get(link::status))
        .layer(DefaultBodyLimit::max(MAX_FORM_BYTES))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(state)
}

/// Adds the security headers to every console answer; `no-store` unless the answer set its own
/// cache policy (the static files).
async fn security_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

const CSS: &str = include_str!("assets/console.css");
const JS: &str = include_str!("assets/console.js");

async fn stylesheet() -> Response {
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        CSS,
    )
        .into_response()
}

async fn script() -> Response {
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        JS,
    )
        .into_response()
}
