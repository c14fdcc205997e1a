//! A fake Microsoft Graph and Gmail API for the agent's API upstreams, on `127.0.0.1:0`.
//!
//! ```text
//! Graph  POST /v1.0/users/{address}/sendMail                          text/plain, base64(MIME)       → 202
//! Gmail  POST /gmail/v1/users/{address}/messages/send                 application/json {"raw": b64url} → 200 {"id",…}
//!        POST /upload/gmail/v1/users/{address}/messages/send?uploadType=media   message/rfc822, MIME → 200
//!        GET  /gmail/v1/users/{address}/profile                        (connection tests)              → 200 {"emailAddress",…}
//! Graph  GET  /v1.0/                                               no token (connection tests)     → 200 service root
//! ```
//!
//! Every request is checked exactly — method, path, the bearer token registered for the address
//! ([`FakeMailApi::expect_token`]), content type, body encoding and (if set) the expected MIME —
//! and recorded ([`FakeMailApi::requests`]). With [`FakeMailApi::validate_with_introspection`]
//! the fake also accepts tokens the way the real APIs do: it asks the identity provider's RFC 7662
//! introspection whether the token is live, belongs to the address and was issued for this API's
//! audience (Graph: `https://graph.microsoft.com`; Gmail: `https://mail.google.com`), so a token
//! for another resource (Exchange Online's mail protocols) gets the real 401. A wrong or missing token gets the API's real 401
//! answer; anything else that is wrong is a violation ([`FakeMailApi::violations`]) and gets a
//! 400. Tests script the next answers per API ([`FakeMailApi::script`]): 429 with `Retry-After`,
//! 503, 401, 400.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Context as _;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State as AxumState;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};

/// Which endpoint a request went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MailApi {
    /// Graph `sendMail` (MIME mode).
    Graph,
    /// Gmail `messages/send` with `{"raw": …}`.
    Gmail,
    /// Gmail media upload `messages/send?uploadType=media`.
    GmailUpload,
    /// Gmail `users.getProfile` (`GET …/profile`), read by connection tests.
    GmailProfile,
    /// Graph's service root (`GET /v1.0/`, no token), read by connection tests.
    GraphRoot,
}

impl MailApi {
    fn is_google(self) -> bool {
        matches!(self, Self::Gmail | Self::GmailUpload | Self::GmailProfile)
    }
}

/// A scripted answer for the next request to an API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scripted {
    /// `429 Too Many Requests` with this `Retry-After` value (seconds or HTTP date).
    Throttled {
        /// The `Retry-After` header value.
        retry_after: String,
    },
    /// `503 Service Unavailable`, with `Retry-After` if given.
    Unavailable {
        /// The `Retry-After` header value, if any.
        retry_after: Option<String>,
    },
    /// The API's real `401` (expired/invalid token) even if the token is right.
    Unauthorized,
    /// `400` with this error message (Graph code `ErrorInvalidRecipients`, Google status
    /// `INVALID_ARGUMENT`).
    BadRequest {
        /// The error message.
        message: String,
    },
}

/// One request the fake received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiRequest {
    /// The endpoint.
    pub api: MailApi,
    /// The `{address}` path segment, percent-decoded.
    pub user: String,
    /// The `Content-Type` header.
    pub content_type: String,
    /// The message after decoding the body (base64, base64url or as is); empty if it did not
    /// decode.
    pub mime: Vec<u8>,
    /// Whether the bearer token was the expected one.
    pub authorized: bool,
    /// The status the fake answered.
    pub status: u16,
}

#[derive(Debug, Default)]
struct State {
    tokens: HashMap<String, String>,
    introspection_url: Option<String>,
    expected_mime: Option<Vec<u8>>,
    scripts: HashMap<MailApi, VecDeque<Scripted>>,
    requests: Vec<ApiRequest>,
    violations: Vec<String>,
    next_id: u64,
}

type Shared = Arc<Mutex<State>>;

/// The running fake; stops on drop.
#[derive(Debug)]
pub struct FakeMailApi {
    addr: SocketAddr,
    state: Shared,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeMailApi {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.abort();
    }
}

impl FakeMailApi {
    /// Starts the fake on `127.0.0.1:0`.
    pub async fn start() -> anyhow::Result<Self> {
        crate::logs::capture();
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .context("binding 127.0.0.1:0 for the fake mail API")?;
        let addr = listener.local_addr()?;
        let state: Shared = Arc::default();
        // Gmail takes messages up to 35 MB (base64url in JSON: ~47 MB); axum's own 2 MB default
        // would refuse real-sized scans before the fake saw them.
        let app = Router::new()
            .fallback(handle)
            .layer(axum::extract::DefaultBodyLimit::max(64 * 1024 * 1024))
            .with_state(Arc::clone(&state));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        Ok(Self {
            addr,
            state,
            shutdown: Some(tx),
            task,
        })
    }

    fn st(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `api_base_url` for Graph: `http://127.0.0.1:<port>/v1.0`.
    pub fn graph_base_url(&self) -> String {
        format!("http://{}/v1.0", self.addr)
    }

    /// `api_base_url` for Gmail: `http://127.0.0.1:<port>`.
    pub fn gmail_base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Accepts `token` (and only it) for `address`; registers it as a secret for the log scan.
    pub fn expect_token(&self, address: &str, token: &str) {
        crate::logs::secret(token);
        self.st()
            .tokens
            .insert(address.to_ascii_lowercase(), token.to_owned());
    }

    /// Also accepts tokens that the RFC 7662 introspection endpoint at `url` (the fake identity
    /// provider's [`crate::fake_idp::FakeIdp::introspection_url`], loopback `http://`) reports
    /// active for the request's address and this API's audience; see the module documentation.
    pub fn validate_with_introspection(&self, url: &str) {
        self.st().introspection_url = Some(url.to_owned());
    }

    /// Every following request's body must decode to exactly `mime` (else a violation and 400).
    pub fn expect_mime(&self, mime: &[u8]) {
        self.st().expected_mime = Some(mime.to_vec());
    }

    /// Answers the next request to `api` with `reply` (queued in order).
    pub fn script(&self, api: MailApi, reply: Scripted) {
        self.st().scripts.entry(api).or_default().push_back(reply);
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<ApiRequest> {
        self.st().requests.clone()
    }

    /// Everything that was wrong about the requests (wrong path, method, content type,
    /// encoding, MIME).
    pub fn violations(&self) -> Vec<String> {
        self.st().violations.clone()
    }
}

fn json(
    status: StatusCode,
    headers: Vec<(header::HeaderName, String)>,
    body: serde_json::Value,
) -> Response {
    let mut response = (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response();
    for (name, value) in headers {
        if let Ok(value) = value.parse() {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

fn error_reply(
    api: MailApi,
    status: StatusCode,
    code: &str,
    message: &str,
    headers: Vec<(header::HeaderName, String)>,
) -> Response {
    let body = if api.is_google() {
        let google_status = match status.as_u16() {
            400 => "INVALID_ARGUMENT",
            401 => "UNAUTHENTICATED",
            429 => "RESOURCE_EXHAUSTED",
            503 => "UNAVAILABLE",
            _ => "UNKNOWN",
        };
        serde_json::json!({"error": {"code": status.as_u16(), "message": message,
            "errors": [{"message": message, "domain": "global", "reason": code}],
            "status": google_status}})
    } else {
        serde_json::json!({"error": {"code": code, "message": message,
            "innerError": {"date": "2026-01-01T00:00:00", "request-id": "00000000-0000-0000-0000-000000000000"}}})
    };
    json(status, headers, body)
}

fn unauthorized(api: MailApi) -> Response {
    if api.is_google() {
        error_reply(
            api,
            StatusCode::UNAUTHORIZED,
            "authError",
            "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential.",
            vec![(
                header::WWW_AUTHENTICATE,
                r#"Bearer realm="https://accounts.google.com/", error="invalid_token""#.to_owned(),
            )],
        )
    } else {
        error_reply(
            api,
            StatusCode::UNAUTHORIZED,
            "InvalidAuthenticationToken",
            "Access token validation failure. Invalid audience.",
            vec![(header::WWW_AUTHENTICATE, r#"Bearer realm="", authorization_uri="https://login.microsoftonline.com/common/oauth2/authorize", client_id="00000003-0000-0000-c000-000000000000""#.to_owned())],
        )
    }
}

/// The audience (`aud`) a token must have for `api`.
pub fn audience_of(api: MailApi) -> &'static str {
    if api.is_google() {
        "https://mail.google.com"
    } else {
        "https://graph.microsoft.com"
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// Whether the introspection endpoint at `url` reports `token` active for `user` with the
/// audience of `api` (asked as a resource server: `?audience=<aud>`).
async fn introspection_accepts(url: &str, token: &str, api: MailApi, user: &str) -> bool {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let audience: String =
        url::form_urlencoded::byte_serialize(audience_of(api).as_bytes()).collect();
    let body: String = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("token", token)
        .finish();
    let request = format!(
        "POST /{path}?audience={audience} HTTP/1.1\r\nHost: {host}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    let Ok(mut stream) = tokio::net::TcpStream::connect(host).await else {
        return false;
    };
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut answer = String::new();
    if stream.read_to_string(&mut answer).await.is_err() {
        return false;
    }
    let Some((_, json)) = answer.split_once("\r\n\r\n") else {
        return false;
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
        return false;
    };
    v["active"] == serde_json::Value::Bool(true)
        && v["username"]
            .as_str()
            .is_some_and(|u| u.eq_ignore_ascii_case(user))
}

/// `(api, user)` of a request that carries a token: the send endpoints and Gmail's profile.
fn token_target(method: &Method, uri: &Uri) -> Option<(MailApi, String)> {
    if *method == Method::GET {
        let segments: Vec<&str> = uri.path().trim_start_matches('/').split('/').collect();
        if let ["gmail", "v1", "users", user, "profile"] = segments.as_slice() {
            let user =
                url::form_urlencoded::parse(format!("u={}", user.replace('+', "%2B")).as_bytes())
                    .next()
                    .map(|(_, v)| v.into_owned())?;
            return Some((MailApi::GmailProfile, user));
        }
        return None;
    }
    route(uri)
}

/// `(api, user)` for a path, percent-decoded.
fn route(uri: &Uri) -> Option<(MailApi, String)> {
    let segments: Vec<&str> = uri.path().trim_start_matches('/').split('/').collect();
    let (api, user) = match segments.as_slice() {
        ["v1.0", "users", user, "sendMail"] => (MailApi::Graph, *user),
        ["gmail", "v1", "users", user, "messages", "send"] => (MailApi::Gmail, *user),
        ["upload", "gmail", "v1", "users", user, "messages", "send"] => {
            (MailApi::GmailUpload, *user)
        }
        _ => return None,
    };
    let user = url::form_urlencoded::parse(format!("u={}", user.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())?;
    Some((api, user))
}

/// The read-only endpoints connection tests use: Gmail `users.getProfile` (with the address's
/// token) and Graph's service root (no token). `None` for any other path.
fn read_only(
    st: &mut State,
    uri: &Uri,
    headers: &HeaderMap,
    introspected: bool,
) -> Option<Response> {
    let segments: Vec<&str> = uri.path().trim_start_matches('/').split('/').collect();
    let (api, user, response) = match segments.as_slice() {
        ["v1.0"] | ["v1.0", ""] => (
            MailApi::GraphRoot,
            String::new(),
            json(
                StatusCode::OK,
                vec![],
                serde_json::json!({"@odata.context": "https://graph.microsoft.com/v1.0/$metadata", "value": []}),
            ),
        ),
        ["gmail", "v1", "users", user, "profile"] => {
            let user =
                url::form_urlencoded::parse(format!("u={}", user.replace('+', "%2B")).as_bytes())
                    .next()
                    .map(|(_, v)| v.into_owned())?;
            let presented = bearer(headers);
            let authorized = introspected
                || matches!((presented, st.tokens.get(&user.to_ascii_lowercase())), (Some(p), Some(t)) if p == t);
            let response = if authorized {
                json(
                    StatusCode::OK,
                    vec![],
                    serde_json::json!({"emailAddress": user, "messagesTotal": 0,
                        "threadsTotal": 0, "historyId": "1"}),
                )
            } else {
                unauthorized(MailApi::GmailProfile)
            };
            (MailApi::GmailProfile, user, response)
        }
        _ => return None,
    };
    let authorized = response.status() == StatusCode::OK;
    st.requests.push(ApiRequest {
        api,
        user,
        content_type: String::new(),
        mime: Vec::new(),
        authorized,
        status: response.status().as_u16(),
    });
    Some(response)
}

async fn handle(
    AxumState(state): AxumState<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // Token validation at the identity provider happens before the state is locked.
    let introspection = state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .introspection_url
        .clone();
    let introspected = match (introspection, bearer(&headers), token_target(&method, &uri)) {
        (Some(url), Some(token), Some((api, user))) => {
            introspection_accepts(&url, token, api, &user).await
        }
        _ => false,
    };
    let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
    if method == Method::GET
        && let Some(response) = read_only(&mut st, &uri, &headers, introspected)
    {
        return response;
    }
    let Some((api, user)) = route(&uri) else {
        st.violations
            .push(format!("{method} {uri}: unknown endpoint"));
        return (StatusCode::NOT_FOUND, "unknown endpoint").into_response();
    };
    let mut problems = Vec::new();
    if method != Method::POST {
        problems.push(format!("method {method}, expected POST"));
    }
    let query = uri.query().unwrap_or_default();
    match api {
        MailApi::GmailUpload if query != "uploadType=media" => {
            problems.push(format!("query {query:?}, expected uploadType=media"))
        }
        MailApi::Graph | MailApi::Gmail if !query.is_empty() => {
            problems.push(format!("unexpected query {query:?}"))
        }
        _ => {}
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let expected_type = match api {
        MailApi::Graph => "text/plain",
        MailApi::Gmail => "application/json",
        MailApi::GmailUpload => "message/rfc822",
        // Served by `read_only`.
        MailApi::GmailProfile | MailApi::GraphRoot => "",
    };
    if content_type.split(';').next().map(str::trim) != Some(expected_type) {
        problems.push(format!(
            "content-type {content_type:?}, expected {expected_type}"
        ));
    }
    let mime = match api {
        MailApi::Graph => std::str::from_utf8(&body)
            .ok()
            .and_then(|b| STANDARD.decode(b.trim()).ok()),
        MailApi::Gmail => serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|j| j.get("raw").and_then(|r| r.as_str()).map(str::to_owned))
            .and_then(|raw| {
                URL_SAFE_NO_PAD
                    .decode(&raw)
                    .or_else(|_| URL_SAFE.decode(&raw))
                    .ok()
            }),
        MailApi::GmailUpload => Some(body.to_vec()),
        MailApi::GmailProfile | MailApi::GraphRoot => None,
    };
    if mime.is_none() {
        problems.push("the body does not decode to a message".to_owned());
    }
    let mime = mime.unwrap_or_default();
    if let Some(expected) = st.expected_mime.as_ref().filter(|e| **e != mime) {
        problems.push(format!(
            "the message differs from the expected one ({} bytes, expected {})",
            mime.len(),
            expected.len()
        ));
    }
    let presented = bearer(&headers);
    let authorized = introspected
        || matches!((presented, st.tokens.get(&user.to_ascii_lowercase())), (Some(p), Some(t)) if p == t);
    let response = if !problems.is_empty() {
        let message = format!("{api:?} {user}: {}", problems.join("; "));
        st.violations.push(message.clone());
        error_reply(
            api,
            StatusCode::BAD_REQUEST,
            "ErrorInvalidRequest",
            &message,
            vec![],
        )
    } else if !authorized {
        unauthorized(api)
    } else {
        match st.scripts.get_mut(&api).and_then(VecDeque::pop_front) {
            Some(Scripted::Throttled { retry_after }) => error_reply(
                api,
                StatusCode::TOO_MANY_REQUESTS,
                "TooManyRequests",
                "Too many requests; please retry later",
                vec![(header::RETRY_AFTER, retry_after)],
            ),
            Some(Scripted::Unavailable { retry_after }) => error_reply(
                api,
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                "The service is temporarily unavailable",
                retry_after
                    .map(|r| vec![(header::RETRY_AFTER, r)])
                    .unwrap_or_default(),
            ),
            Some(Scripted::Unauthorized) => unauthorized(api),
            Some(Scripted::BadRequest { message }) => {
                let code = if api.is_google() {
                    "invalidArgument"
                } else {
                    "ErrorInvalidRecipients"
                };
                error_reply(api, StatusCode::BAD_REQUEST, code, &message, vec![])
            }
            None if api == MailApi::Graph => StatusCode::ACCEPTED.into_response(),
            None => {
                st.next_id += 1;
                let id = format!("18c{:013x}", st.next_id);
                json(
                    StatusCode::OK,
                    vec![],
                    serde_json::json!({"id": id, "threadId": id, "labelIds": ["SENT"]}),
                )
            }
        }
    };
    st.requests.push(ApiRequest {
        api,
        user,
        content_type,
        mime,
        authorized,
        status: response.status().as_u16(),
    });
    response
}
