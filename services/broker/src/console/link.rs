//! The mailbox owner's pages behind a consent link (`/consent/<token>`): no session, no other
//! access; the token is the credential (see [`crate::consent_links`] for its life). The page
//! explains in the owner's terms what is granted — which mailbox, which provider, what the
//! permissions allow, which devices will use them — and runs the provider's sign-in: auth code with PKCE
//! through the broker's `/oauth/callback`, or the device code with a countdown and a live
//! status. A cross-site POST to `start` would have to know the token, so the token doubles as
//! the form's CSRF protection.

use std::fmt::Write as _;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use tokenfleet_domain::{GrantType, ProviderKind};

use super::ConsoleState;
use super::html::{badge, esc, notice, page, relative, seg};
use crate::consent_links::{self, LinkError};
use crate::tokens::consent::Challenge;

/// What a scope allows, in the owner's words.
fn scope_words(scope: &str, address: &str) -> String {
    let s = scope.to_ascii_lowercase();
    if s.ends_with("/smtp.send") {
        format!("Send e-mail as {address} (for scan-to-mail, fax and alerts from your devices)")
    } else if s.ends_with("/mail.send") {
        format!("Send e-mail as {address} through Microsoft Graph")
    } else if s.ends_with("/pop.accessasuser.all") {
        format!("Read and remove the messages of {address} over POP3 (for e-mail printing)")
    } else if s.ends_with("/imap.accessasuser.all") {
        format!("Read the messages of {address} over IMAP (for e-mail printing)")
    } else if s == "https://mail.google.com/" {
        format!(
            "Read, send and delete e-mail of {address} in Gmail (Google grants mail access only as a whole)"
        )
    } else if s == "offline_access" {
        "Keep this permission without you signing in again, until you or your administrator withdraw it".to_owned()
    } else if matches!(s.as_str(), "openid" | "profile" | "email") {
        "See which account you signed in with, to check it is the right mailbox".to_owned()
    } else {
        format!("Permission {scope}")
    }
}

fn provider_words(kind: ProviderKind) -> &'static str {
    match kind {
        ProviderKind::Microsoft => "Microsoft 365",
        ProviderKind::Google => "Google Workspace",
        ProviderKind::Generic => "your e-mail provider",
    }
}

/// The answer for a link that cannot be used: 404 for unknown links, 410 for expired and
/// revoked ones, 409 for used ones.
fn refusal(err: &LinkError) -> Response {
    let (status, title) = match err {
        LinkError::Unknown => (StatusCode::NOT_FOUND, "Link not found"),
        LinkError::Expired => (StatusCode::GONE, "Link expired"),
        LinkError::Revoked => (StatusCode::GONE, "Link withdrawn"),
        LinkError::Used => (StatusCode::CONFLICT, "Link already used"),
        LinkError::Failed(e) => {
            let status = StatusCode::from_u16(crate::edge::http_status::http_status(e))
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            if let crate::ops::Error::Internal { detail, .. } = e {
                tracing::error!(error = %detail, "consent link failed");
            }
            (status, "Sign-in could not start")
        }
    };
    (
        status,
        Html(page(title, None, &notice("bad", &err.to_string()))),
    )
        .into_response()
}

pub(super) async fn open(State(state): State<ConsoleState>, Path(token): Path<String>) -> Response {
    let broker = state.admin.broker_state();
    let view = match consent_links::open(broker, &token).await {
        Ok(v) => v,
        Err(e) => return refusal(&e),
    };
    let now = broker.clock.now();
    let provider = provider_words(view.provider_kind);
    let mut body = String::new();
    let _ = write!(
        body,
        "<section class=\"card narrow\"><p class=\"lead\">Your IT provider asks you to let <strong>tokenfleet</strong> use the mailbox <strong>{}</strong> for your printers and scanners. You sign in with {provider} yourself; your password is never shown to anyone.</p>\
<h2>What you allow</h2><ul class=\"scopes\">",
        esc(&view.address)
    );
    // One line per meaning (openid, profile and email say the same thing to the owner).
    let mut lines: Vec<String> = Vec::new();
    for s in &view.scopes {
        let line = scope_words(s, &view.address);
        if !lines.contains(&line) {
            lines.push(line);
        }
    }
    for line in &lines {
        let _ = write!(body, "<li>{}</li>", esc(line));
    }
    body.push_str("</ul><h2>Which devices will use it</h2>");
    if view.devices.is_empty() {
        body.push_str("<p>No device uses this mailbox yet; your IT provider will add them.</p>");
    } else {
        body.push_str("<ul class=\"devices\">");
        for d in &view.devices {
            let _ = write!(body, "<li>{}</li>", esc(d));
        }
        body.push_str("</ul>");
    }
    let how = match view.grant_type {
        GrantType::DelegatedDeviceCode => format!(
            "You will get a short code to enter on {provider}'s sign-in page, and sign in there."
        ),
        _ => format!("You will go to {provider}'s sign-in page and come back here."),
    };
    let _ = write!(
        body,
        "<h2>Sign in</h2><p>Sign in as <strong>{}</strong> (another account is refused). {}</p>\
<p class=\"muted\">This link works once and expires {}. You can withdraw the permission later in your account's security settings.</p>\
<form method=\"post\" action=\"/consent/{}/start\"><button class=\"btn primary\" type=\"submit\">Sign in with {provider}</button></form></section>",
        esc(&view.account),
        esc(&how),
        esc(&relative(view.link.expires, now)),
        esc(&seg(&token))
    );
    (StatusCode::OK, Html(page("Allow mail access", None, &body))).into_response()
}

pub(super) async fn start(
    State(state): State<ConsoleState>,
    Path(token): Path<String>,
) -> Response {
    let broker = state.admin.broker_state();
    let (_, outcome) = match consent_links::start(broker, &token, state.admin.public_url()).await {
        Ok(v) => v,
        Err(e) => return refusal(&e),
    };
    let now = broker.clock.now();
    match outcome.challenge {
        Challenge::Authorization { url, .. } => Redirect::to(&url).into_response(),
        Challenge::DeviceCode {
            user_code,
            verification_uri,
            expires,
            ..
        } => {
            let body = format!(
                "<section class=\"card narrow\" aria-live=\"polite\"><p>Open <a href=\"{0}\" target=\"_blank\" rel=\"noopener noreferrer\">{0}</a>, enter this code and sign in as <strong>{1}</strong>:</p>\
<p class=\"user-code\" id=\"user-code\">{2}</p><p>The code expires in <span data-countdown=\"{3}\">{4}</span>.</p>\
<p>Status: <span id=\"live-status\" data-poll=\"/consent/{5}/status.json\">{6}</span></p><p class=\"muted\">This page updates by itself; when it says ACTIVE you are done and can close it.</p></section>",
                esc(&verification_uri),
                esc(&outcome.mailbox.value.address),
                esc(&user_code),
                expires.unix_timestamp(),
                esc(&relative(expires, now)),
                esc(&seg(&token)),
                badge("CONSENT_PENDING", "warn")
            );
            (StatusCode::OK, Html(page("Enter the code", None, &body))).into_response()
        }
        Challenge::None => (
            StatusCode::OK,
            Html(page(
                "Done",
                None,
                &notice("ok", "The mailbox is ready; nothing else to do."),
            )),
        )
            .into_response(),
    }
}

pub(super) async fn status(
    State(state): State<ConsoleState>,
    Path(token): Path<String>,
) -> Response {
    match consent_links::status(state.admin.broker_state(), &token).await {
        Ok(token_state) => {
            let status = token_state.status;
            let word = status.as_str().to_ascii_uppercase();
            let class = match word.as_str() {
                "ACTIVE" => "ok",
                "REAUTH_REQUIRED" | "REFRESH_FAILING" => "bad",
                _ => "warn",
            };
            let err = token_state.last_error.clone();
            axum::Json(serde_json::json!({
                "status": word,
                "class": class,
                "reason": err.as_ref().map(|e| e.reason.clone()).unwrap_or_default(),
                "fix": err.as_ref().map(|e| e.fix.clone()).unwrap_or_default(),
            }))
            .into_response()
        }
        Err(e) => {
            let status = match e {
                LinkError::Unknown => StatusCode::NOT_FOUND,
                LinkError::Expired | LinkError::Revoked => StatusCode::GONE,
                LinkError::Used => StatusCode::CONFLICT,
                LinkError::Failed(ref err) => {
                    StatusCode::from_u16(crate::edge::http_status::http_status(err))
                        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
                }
            };
            (
                status,
                axum::Json(serde_json::json!({"error": e.to_string()})),
            )
                .into_response()
        }
    }
}
