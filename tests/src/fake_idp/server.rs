//! HTTP glue: one handler that routes by path, holds token requests while the fake hangs,
//! records every request, applies outage, scripts and latency, and turns [`Reply`] into a
//! response.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State as AxumState;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use time::format_description::FormatItem;
use time::macros::format_description;

use super::state::{ClientAuth, Reply, ReplyBody, State};
use super::{Endpoint, RecordedRequest};

type Shared = Arc<Mutex<State>>;

const HTTP_DATE: &[FormatItem<'static>] = format_description!(
    "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
);

pub(super) fn router(state: Shared) -> Router {
    Router::new().fallback(handle).with_state(state)
}

/// Which endpoint a path is, the Microsoft tenant segment, and the method it takes.
fn route(path: &str) -> Option<(Endpoint, String, &'static [Method])> {
    const POST: &[Method] = &[Method::POST];
    const GET: &[Method] = &[Method::GET];
    const BOTH: &[Method] = &[Method::GET, Method::POST];
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match segments.as_slice() {
        [tenant, "oauth2", "v2.0", "devicecode"] => {
            Some((Endpoint::MicrosoftDeviceCode, (*tenant).to_owned(), POST))
        }
        [tenant, "oauth2", "v2.0", "token"] => {
            Some((Endpoint::MicrosoftToken, (*tenant).to_owned(), POST))
        }
        [tenant, "oauth2", "v2.0", "authorize"] => {
            Some((Endpoint::MicrosoftAuthorize, (*tenant).to_owned(), GET))
        }
        ["o", "oauth2", "v2", "auth"] => Some((Endpoint::GoogleAuthorize, String::new(), GET)),
        ["token"] => Some((Endpoint::GoogleToken, String::new(), POST)),
        ["revoke"] => Some((Endpoint::GoogleRevoke, String::new(), POST)),
        ["introspect"] => Some((Endpoint::Introspect, String::new(), POST)),
        ["devicelogin"] => Some((Endpoint::DeviceLogin, String::new(), BOTH)),
        _ => None,
    }
}

fn pairs(text: &str) -> Vec<(String, String)> {
    url::form_urlencoded::parse(text.as_bytes())
        .into_owned()
        .collect()
}

fn client_auth(headers: &HeaderMap, form: &[(String, String)]) -> ClientAuth {
    let field = |n: &str| {
        form.iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.clone())
            .filter(|v| !v.is_empty())
    };
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| STANDARD.decode(b.trim()).ok())
        .and_then(|raw| String::from_utf8(raw).ok())
        .and_then(|s| {
            let (id, secret) = s.split_once(':')?;
            let dec = |x: &str| {
                url::form_urlencoded::parse(format!("v={x}").as_bytes())
                    .next()
                    .map(|(_, v)| v.into_owned())
            };
            Some((dec(id)?, dec(secret)?))
        });
    match basic {
        Some((id, secret)) => ClientAuth {
            client_id: Some(id),
            secret: Some(secret),
        },
        None => ClientAuth {
            client_id: field("client_id"),
            secret: field("client_secret"),
        },
    }
}

async fn handle(
    AxumState(state): AxumState<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    let query = pairs(uri.query().unwrap_or(""));
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.to_ascii_lowercase()
                .starts_with("application/x-www-form-urlencoded")
        });
    let form = if method == Method::POST {
        pairs(&String::from_utf8_lossy(&body))
    } else {
        Vec::new()
    };
    let grant_type = form
        .iter()
        .find(|(k, _)| k == "grant_type")
        .map(|(_, v)| v.clone());
    let routed = route(&path);

    let token_request = routed.as_ref().is_some_and(|(e, _, _)| {
        matches!(
            e,
            Endpoint::MicrosoftToken | Endpoint::GoogleToken | Endpoint::MicrosoftDeviceCode
        )
    });
    if token_request {
        hold(&state).await;
    }

    let (reply, now, latency) = {
        let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
        let reply = match &routed {
            None => {
                if st.strict {
                    st.violations
                        .push(format!("{method} {path}: no such endpoint"));
                }
                Reply::text(404, "Not Found")
            }
            Some((endpoint, _, methods)) if !methods.contains(&method) => {
                if st.strict {
                    st.violations.push(format!(
                        "{method} {path}: {endpoint:?} does not take {method}"
                    ));
                }
                Reply::text(405, "Method Not Allowed")
            }
            Some((endpoint, _, _)) if method == Method::POST && !is_form && !body.is_empty() => {
                st.violations.push(format!(
                    "{method} {path}: {endpoint:?} needs an application/x-www-form-urlencoded body"
                ));
                Reply::json(
                    400,
                    serde_json::json!({"error": "invalid_request", "error_description": "form body expected"}),
                )
            }
            Some(_) if st.outage => {
                let mut r = Reply::text(503, "Service Unavailable");
                if let Some(s) = st.outage_retry_after {
                    r.headers.push(("retry-after".into(), s.to_string()));
                }
                r
            }
            Some((endpoint, tenant, _)) => match st.take_script(*endpoint, grant_type.as_deref()) {
                Some(s) => Reply::scripted(s),
                None => {
                    let auth = client_auth(&headers, &form);
                    match endpoint {
                        Endpoint::MicrosoftDeviceCode => {
                            st.ms_device_authorization(tenant, &auth, &form)
                        }
                        Endpoint::MicrosoftToken => st.ms_token(tenant, &auth, &form),
                        Endpoint::MicrosoftAuthorize | Endpoint::GoogleAuthorize => {
                            st.authorize_get(&query)
                        }
                        Endpoint::GoogleToken => st.google_token(&auth, &form),
                        Endpoint::GoogleRevoke => {
                            let params: Vec<(String, String)> =
                                form.iter().chain(query.iter()).cloned().collect();
                            st.google_revoke(&params)
                        }
                        Endpoint::Introspect => st.introspection_reply(&form, &query),
                        Endpoint::DeviceLogin if method == Method::GET => st.device_login_page(),
                        Endpoint::DeviceLogin => st.device_login_post(&form),
                    }
                }
            },
        };
        let now = st.now();
        if let (Some((Endpoint::MicrosoftToken | Endpoint::GoogleToken, _, _)), Some(g)) =
            (&routed, &grant_type)
        {
            *st.token_request_counts.entry(g.clone()).or_insert(0) += 1;
        }
        if st.recording {
            st.requests.push(RecordedRequest {
                endpoint: routed.as_ref().map(|(e, _, _)| *e),
                method: method.to_string(),
                path,
                query,
                form,
                grant_type,
                status: reply.status,
                time: now,
            });
        }
        (reply, now, st.latency)
    };

    let delay = latency + reply.delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    into_response(reply, now)
}

/// Counts a held request while it waits; dropped when it goes on or its client gives up.
struct Holding(Shared);

impl Drop for Holding {
    fn drop(&mut self) {
        let mut st = self.0.lock().unwrap_or_else(|p| p.into_inner());
        st.held_now = st.held_now.saturating_sub(1);
    }
}

/// Holds a token request while the fake hangs (until the hang ends) or while it is one of the
/// next requests to hold (until `release_held`).
async fn hold(state: &Shared) {
    let (mut rx, hanging) = {
        let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
        if st.hang {
            (st.release.subscribe(), true)
        } else if st.hold_next > 0 {
            st.hold_next -= 1;
            (st.release.subscribe(), false)
        } else {
            return;
        }
    };
    let _holding = {
        let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
        st.held_now += 1;
        st.held_total += 1;
        Holding(state.clone())
    };
    loop {
        if rx.changed().await.is_err() {
            return;
        }
        let still_hanging = state.lock().unwrap_or_else(|p| p.into_inner()).hang;
        if !hanging || !still_hanging {
            return;
        }
    }
}

fn into_response(reply: Reply, now: time::OffsetDateTime) -> Response {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = match reply.body {
        ReplyBody::Json(v) => (
            status,
            [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
            v.to_string(),
        )
            .into_response(),
        ReplyBody::Html(h) => (
            status,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            h,
        )
            .into_response(),
        ReplyBody::Text(t) => (status, t).into_response(),
        ReplyBody::Redirect(location) => (status, [(header::LOCATION, location)]).into_response(),
    };
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // The fake's clock, so tests can provoke clock skew with `advance`.
    if let Ok(date) = now.format(HTTP_DATE)
        && let Ok(v) = HeaderValue::from_str(&date)
    {
        headers.insert(header::DATE, v);
    }
    for (k, v) in reply.headers {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(&v),
        ) {
            headers.insert(k, v);
        }
    }
    response
}
