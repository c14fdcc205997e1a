//! Mail API delivery for tenants where SMTP AUTH is switched off: Microsoft Graph
//! ([`GraphDelivery`], `POST {base}/users/{address}/sendMail` with the raw MIME, base64, as
//! `text/plain`) and the Gmail API ([`GmailDelivery`], `POST {base}/gmail/v1/users/{address}/
//! messages/send` with `{"raw": base64url(MIME)}`, or the media upload endpoint with
//! `message/rfc822` for messages over [`GMAIL_SIMPLE_SEND_LIMIT`]).
//!
//! Both speak HTTPS through reqwest with rustls (ring, the [`TlsSettings`] of the profile), never
//! follow redirects, send the token only as `Authorization: Bearer` (a sensitive header, never
//! logged) and map the answers onto [`DeliveryError`]:
//!
//! | answer | kind |
//! |---|---|
//! | 2xx | delivered |
//! | 401 | [`FailureKind::AuthRejected`]; the error JSON and `WWW-Authenticate` in `final_reply` |
//! | 408, 429, 5xx | [`FailureKind::Transient`], `retry_after` from `Retry-After` (seconds or HTTP date) |
//! | 3xx | [`FailureKind::Transient`]: a redirect means a wrong `api_base_url`; fixing the profile must not lose mail |
//! | other 4xx (400, 403, 404, 413, …) | [`FailureKind::Permanent`] with the API's error code and message |
//! | network error, timeout | [`FailureKind::Transient`] |
//!
//! **Recipients.** In MIME mode both APIs take the recipients from the `To`/`Cc`/`Bcc` headers,
//! not from an envelope: there is no way to pass `RCPT TO` separately. So before encoding,
//! [`reconcile_recipients`] adds a `Bcc:` header naming every envelope recipient that no
//! recipient header names (a printer's "send a copy to" addresses, or a relay's Bcc): both APIs
//! deliver to `Bcc` and strip the header from what recipients see. The opposite case — a header
//! recipient that is not an envelope recipient — cannot be expressed without rewriting the
//! visible headers, and sending would reach someone the sender did not ask for, so such a
//! message fails [`FailureKind::Permanent`] with the address named. The headers are read by
//! [`crate::wire::header`], the same parser the ingress's sender rewrite uses.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use reqwest::StatusCode;
use reqwest::header::{
    AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue, RETRY_AFTER, WWW_AUTHENTICATE,
};

use super::tls::TlsSettings;
use super::{Credentials, Delivery, DeliveryError, DeliveryReceipt, FailureKind, OutgoingMessage};
use crate::wire::header;

/// Microsoft Graph's public endpoint (`api_base_url` empty).
pub const GRAPH_DEFAULT_BASE: &str = "https://graph.microsoft.com/v1.0";
/// The Gmail API's public endpoint (`api_base_url` empty).
pub const GMAIL_DEFAULT_BASE: &str = "https://gmail.googleapis.com";
/// Largest message sent with the simple `messages/send` JSON call; larger ones go through the
/// media upload endpoint (`uploadType=media`), which Google recommends above about 5 MB.
pub const GMAIL_SIMPLE_SEND_LIMIT: usize = 5 * 1024 * 1024;
/// Largest request body Graph's `sendMail` takes (4 MB); the base64 of the MIME must fit, so
/// about 3 MB of message. Larger messages fail permanently before anything is sent.
pub const GRAPH_REQUEST_LIMIT: usize = 4 * 1024 * 1024;
/// Default request timeout (the whole exchange, upload included).
pub const DEFAULT_API_TIMEOUT: Duration = Duration::from_secs(120);
/// How much of an error body is read and kept.
const MAX_ERROR_BODY: usize = 16 * 1024;

/// Where "now" comes from, for turning an HTTP-date `Retry-After` into a delay.
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// Settings of a mail API upstream (from the device's `SmtpProfile`).
#[derive(Debug, Clone, Default)]
pub struct ApiSettings {
    /// `api_base_url`; `None` or empty = the provider's public endpoint.
    pub base_url: Option<String>,
    /// TLS: extra CA, versions, verification.
    pub tls: TlsSettings,
    /// Timeout of one request; `None` = [`DEFAULT_API_TIMEOUT`].
    pub timeout: Option<Duration>,
}

/// The settings of a mail API upstream are unusable (bad base URL, bad TLS settings).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("mail api settings: {0}")]
pub struct ApiSettingsError(pub String);

/// The HTTP side shared by both APIs.
#[derive(Clone)]
struct Http {
    client: reqwest::Client,
    base: url::Url,
    clock: Clock,
}

impl std::fmt::Debug for Http {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http")
            .field("base", &self.base.as_str())
            .finish()
    }
}

impl Http {
    fn new(settings: &ApiSettings, default_base: &str) -> Result<Self, ApiSettingsError> {
        let base = match settings.base_url.as_deref().map(str::trim) {
            Some(b) if !b.is_empty() => b,
            _ => default_base,
        };
        let base = url::Url::parse(base)
            .map_err(|e| ApiSettingsError(format!("api_base_url {base:?} is not a URL: {e}")))?;
        if !matches!(base.scheme(), "https" | "http") || base.cannot_be_a_base() {
            return Err(ApiSettingsError(format!(
                "api_base_url {base} must be an http(s) URL"
            )));
        }
        if base.query().is_some() || base.fragment().is_some() {
            return Err(ApiSettingsError(format!(
                "api_base_url {base} must not have a query or fragment"
            )));
        }
        // Every request carries the bearer token: none in clear text to a non-loopback host.
        settings
            .tls
            .check_token_transport(
                "smtp",
                base.host_str().unwrap_or_default(),
                base.port_or_known_default().unwrap_or(443),
                base.scheme() == "https",
            )
            .map_err(ApiSettingsError)?;
        let tls = settings
            .tls
            .client_config()
            .map_err(|e| ApiSettingsError(e.to_string()))?;
        let timeout = settings.timeout.unwrap_or(DEFAULT_API_TIMEOUT);
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(Arc::unwrap_or_clone(tls))
            // A mail API that redirects is misconfigured or hostile: never follow it with a token.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(30)))
            .no_proxy()
            .user_agent(concat!("tokenfleet-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ApiSettingsError(format!("building the HTTP client failed: {e}")))?;
        Ok(Self {
            client,
            base,
            clock: Arc::new(SystemTime::now),
        })
    }

    /// `{base}/{segments…}` with each segment percent-encoded (the address may hold `+`, `/`…).
    fn url(&self, segments: &[&str]) -> url::Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    async fn post(
        &self,
        url: url::Url,
        content_type: &'static str,
        body: Vec<u8>,
        credentials: &Credentials,
        api: Api,
    ) -> Result<(StatusCode, Vec<u8>), DeliveryError> {
        let mut auth = HeaderValue::try_from(format!("Bearer {}", credentials.token.expose()))
            .map_err(|_| {
                DeliveryError::permanent(format!(
                    "{}: the access token holds characters not allowed in an HTTP header",
                    api.name()
                ))
            })?;
        auth.set_sensitive(true);
        let shown = url.as_str().to_owned();
        tracing::debug!(api = api.name(), url = %shown, bytes = body.len(), "mail api request");
        let response = self
            .client
            .post(url)
            .header(AUTHORIZATION, auth)
            .header(CONTENT_TYPE, content_type)
            .body(body)
            .send()
            .await
            .map_err(|e| network_error(api, &shown, &e))?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = read_limited(response, MAX_ERROR_BODY)
            .await
            .map_err(|e| network_error(api, &shown, &e))?;
        tracing::debug!(
            api = api.name(),
            status = status.as_u16(),
            "mail api answer"
        );
        if status.is_success() {
            Ok((status, body))
        } else {
            Err(classify(api, status, &headers, &body, (self.clock)()))
        }
    }
}

/// Reads at most `limit` bytes of the body (the rest is dropped).
async fn read_limited(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, reqwest::Error> {
    let mut out = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = limit.saturating_sub(out.len());
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if out.len() >= limit {
            break;
        }
    }
    Ok(out)
}

fn network_error(api: Api, url: &str, e: &reqwest::Error) -> DeliveryError {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    // reqwest's Display names the URL (host and address, never the token); the source chain says why.
    let mut reason = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        reason.push_str(": ");
        reason.push_str(&s.to_string());
        source = s.source();
    }
    DeliveryError::transient(format!("{} POST {url} {what}: {reason}", api.name()))
}

/// Which API, for messages and error-body parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    Graph,
    Gmail,
}

impl Api {
    fn name(self) -> &'static str {
        match self {
            Self::Graph => "graph",
            Self::Gmail => "gmail",
        }
    }
}

/// Parses `Retry-After`: delta-seconds or an HTTP date (a date in the past means "now").
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The `code` and `message` of a Graph (`{"error":{"code","message"}}`) or Google
/// (`{"error":{"code":400,"message","status"}}`) error body.
fn error_fields(api: Api, body: &[u8]) -> Option<(String, String)> {
    let json: serde_json::Value = serde_json::from_slice(body).ok()?;
    let error = json.get("error")?;
    let message = error
        .get("message")
        .and_then(|m| m.as_str())
        .unwrap_or_default()
        .to_owned();
    let code = match api {
        Api::Graph => error
            .get("code")
            .and_then(|c| c.as_str())
            .map(str::to_owned),
        Api::Gmail => error
            .get("status")
            .and_then(|c| c.as_str())
            .map(str::to_owned)
            .or_else(|| error.get("code").map(|c| c.to_string())),
    }
    .unwrap_or_default();
    Some((code, message))
}

/// Turns a non-2xx answer into the [`DeliveryError`] the spool acts on.
fn classify(
    api: Api,
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    now: SystemTime,
) -> DeliveryError {
    let code = status.as_u16();
    let mut reply = format!("HTTP {code}");
    match error_fields(api, body) {
        Some((c, m)) => {
            if !c.is_empty() {
                reply.push(' ');
                reply.push_str(&c);
            }
            if !m.is_empty() {
                reply.push_str(": ");
                reply.push_str(&m);
            }
        }
        None => {
            if let Some(reason) = status.canonical_reason() {
                reply.push(' ');
                reply.push_str(reason);
            }
            let text = String::from_utf8_lossy(body);
            let text: String = text.trim().chars().take(300).collect();
            if !text.is_empty() {
                reply.push_str(": ");
                reply.push_str(&text);
            }
        }
    }
    if let Some(challenge) = headers.get(WWW_AUTHENTICATE).and_then(|v| v.to_str().ok()) {
        reply.push_str(&format!(" (WWW-Authenticate: {challenge})"));
    }
    let retry_after = headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, now));
    let kind = match code {
        401 => FailureKind::AuthRejected,
        408 | 429 => FailureKind::Transient,
        300..=399 => {
            reply.push_str(" (the mail API redirected: check api_base_url)");
            FailureKind::Transient
        }
        400..=499 => FailureKind::Permanent,
        _ => FailureKind::Transient,
    };
    let auth_challenge_json = (kind == FailureKind::AuthRejected)
        .then(|| serde_json::from_slice::<serde_json::Value>(body).ok())
        .flatten()
        .map(|j| j.to_string());
    DeliveryError {
        kind,
        final_reply: reply,
        auth_challenge_json,
        retry_after: if kind == FailureKind::Transient {
            retry_after
        } else {
            None
        },
    }
}

// ---------------------------------------------------------------------------------------------
// Recipients: envelope vs. headers.

/// Makes the recipient headers of `data` match the envelope recipients `rcpts`, for APIs that
/// take recipients from the headers: adds a `Bcc:` header for envelope recipients no
/// `To`/`Cc`/`Bcc` names (the message is otherwise unchanged), and refuses (permanently) a
/// message whose headers name a recipient that is not in the envelope.
pub fn reconcile_recipients<'a>(
    data: &'a [u8],
    rcpts: &[String],
) -> Result<Cow<'a, [u8]>, DeliveryError> {
    let (block, _) = header::split_header_block(data);
    let mut in_headers: Vec<String> = Vec::new();
    for field in header::fields(block) {
        if field.is("to") || field.is("cc") || field.is("bcc") {
            in_headers.extend(field.addresses());
        }
    }
    let envelope: Vec<String> = rcpts
        .iter()
        .map(|r| r.trim().to_ascii_lowercase())
        .collect();
    if let Some(extra) = in_headers.iter().find(|a| !envelope.contains(a)) {
        return Err(DeliveryError::permanent(format!(
            "the message headers name recipient <{extra}> that is not an envelope recipient; \
             the mail API takes recipients from the headers only, so it would receive the message"
        )));
    }
    let missing: Vec<&String> = rcpts
        .iter()
        .filter(|r| !in_headers.contains(&r.trim().to_ascii_lowercase()))
        .collect();
    if missing.is_empty() {
        return Ok(Cow::Borrowed(data));
    }
    let mut out = Vec::with_capacity(data.len() + 64);
    out.extend_from_slice(b"Bcc: ");
    for (i, r) in missing.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(b",\r\n ");
        }
        out.extend_from_slice(r.trim().as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(data);
    Ok(Cow::Owned(out))
}

fn check_message(api: Api, message: &OutgoingMessage<'_>) -> Result<(), DeliveryError> {
    if message.rcpts.is_empty() {
        return Err(DeliveryError::permanent(format!(
            "{}: no recipients",
            api.name()
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Graph.

/// Microsoft Graph `sendMail` with the raw MIME: `POST {base}/users/{address}/sendMail`,
/// `Content-Type: text/plain`, body = base64 of the message; `202 Accepted` = sent. The message
/// is saved in the mailbox's Sent Items (Graph's MIME mode cannot switch that off). Graph
/// limits a request to 4 MB ([`GRAPH_REQUEST_LIMIT`]), i.e. roughly 3 MB of MIME: a larger
/// message fails permanently here, naming both sizes, without a request (Graph would answer
/// `413`, also permanent).
#[derive(Debug, Clone)]
pub struct GraphDelivery {
    http: Http,
}

impl GraphDelivery {
    /// A Graph upstream with these settings (base default [`GRAPH_DEFAULT_BASE`]).
    pub fn new(settings: &ApiSettings) -> Result<Self, ApiSettingsError> {
        Ok(Self {
            http: Http::new(settings, GRAPH_DEFAULT_BASE)?,
        })
    }

    /// Uses `clock` for HTTP-date `Retry-After` values (tests).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.http.clock = clock;
        self
    }

    /// The URL a message for `address` is posted to.
    pub fn send_url(&self, address: &str) -> String {
        self.http.url(&["users", address, "sendMail"]).to_string()
    }
}

#[async_trait::async_trait]
impl Delivery for GraphDelivery {
    async fn send(
        &self,
        message: OutgoingMessage<'_>,
        credentials: &Credentials,
    ) -> Result<DeliveryReceipt, DeliveryError> {
        check_message(Api::Graph, &message)?;
        let mime = reconcile_recipients(message.data, message.rcpts)?;
        let body = STANDARD.encode(&mime).into_bytes();
        if body.len() > GRAPH_REQUEST_LIMIT {
            return Err(DeliveryError::permanent(format!(
                "Graph: the message is {} bytes, {} as base64; sendMail takes at most {} bytes \
                 per request (about 3 MB of message): send large scans over SMTP or the Gmail API, \
                 or lower the device's scan resolution",
                mime.len(),
                body.len(),
                GRAPH_REQUEST_LIMIT
            )));
        }
        let url = self.http.url(&["users", &credentials.username, "sendMail"]);
        let (status, _) = self
            .http
            .post(url, "text/plain", body, credentials, Api::Graph)
            .await?;
        Ok(DeliveryReceipt {
            final_reply: format!(
                "HTTP {} {}",
                status.as_u16(),
                status.canonical_reason().unwrap_or_default()
            ),
        })
    }

    /// Graph's `sendMail` submits from an Exchange Online mailbox: the same per-mailbox limit.
    fn messages_per_minute(&self) -> Option<u32> {
        Some(super::EXCHANGE_ONLINE_MESSAGES_PER_MINUTE)
    }
}

// ---------------------------------------------------------------------------------------------
// Gmail.

/// Gmail API `users.messages.send`: `POST {base}/gmail/v1/users/{address}/messages/send` with
/// `{"raw": base64url(MIME)}`, or for messages over [`GMAIL_SIMPLE_SEND_LIMIT`] the media upload
/// `POST {base}/upload/gmail/v1/users/{address}/messages/send?uploadType=media` with
/// `Content-Type: message/rfc822` and the message itself (Gmail's limit is 35 MB). `200` = sent;
/// the receipt names Gmail's message id.
#[derive(Debug, Clone)]
pub struct GmailDelivery {
    http: Http,
    simple_limit: usize,
}

impl GmailDelivery {
    /// A Gmail upstream with these settings (base default [`GMAIL_DEFAULT_BASE`]).
    pub fn new(settings: &ApiSettings) -> Result<Self, ApiSettingsError> {
        Ok(Self {
            http: Http::new(settings, GMAIL_DEFAULT_BASE)?,
            simple_limit: GMAIL_SIMPLE_SEND_LIMIT,
        })
    }

    /// Uses `clock` for HTTP-date `Retry-After` values (tests).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.http.clock = clock;
        self
    }

    /// Messages larger than `limit` bytes use the media upload endpoint (tests lower it).
    pub fn with_simple_send_limit(mut self, limit: usize) -> Self {
        self.simple_limit = limit;
        self
    }
}

#[async_trait::async_trait]
impl Delivery for GmailDelivery {
    async fn send(
        &self,
        message: OutgoingMessage<'_>,
        credentials: &Credentials,
    ) -> Result<DeliveryReceipt, DeliveryError> {
        check_message(Api::Gmail, &message)?;
        let mime = reconcile_recipients(message.data, message.rcpts)?;
        let user = credentials.username.as_str();
        let (url, content_type, body) = if mime.len() <= self.simple_limit {
            let body = serde_json::json!({ "raw": URL_SAFE_NO_PAD.encode(&mime) });
            (
                self.http
                    .url(&["gmail", "v1", "users", user, "messages", "send"]),
                "application/json",
                body.to_string().into_bytes(),
            )
        } else {
            let mut url = self
                .http
                .url(&["upload", "gmail", "v1", "users", user, "messages", "send"]);
            url.query_pairs_mut().append_pair("uploadType", "media");
            (url, "message/rfc822", mime.into_owned())
        };
        let (status, body) = self
            .http
            .post(url, content_type, body, credentials, Api::Gmail)
            .await?;
        let id = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|j| j.get("id").and_then(|i| i.as_str()).map(str::to_owned));
        Ok(DeliveryReceipt {
            final_reply: match id {
                Some(id) => format!("HTTP {} OK id={id}", status.as_u16()),
                None => format!("HTTP {} OK", status.as_u16()),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_envelope_recipients_become_bcc() {
        let data = b"To: a@x.org\r\nCc: \"B\"\r\n <b@x.org>\r\nSubject: s\r\n\r\nbody\r\n";
        let rcpts = vec![
            "a@x.org".to_owned(),
            "B@x.org".to_owned(),
            "c@x.org".to_owned(),
        ];
        let out = reconcile_recipients(data, &rcpts).unwrap();
        assert_eq!(
            &out[..],
            &[b"Bcc: c@x.org\r\n".as_slice(), data].concat()[..]
        );
        let same = reconcile_recipients(data, &rcpts[..2]).unwrap();
        assert!(matches!(same, Cow::Borrowed(_)));
        let err = reconcile_recipients(data, &rcpts[..1]).unwrap_err();
        assert_eq!(err.kind, FailureKind::Permanent);
        assert!(err.final_reply.contains("<b@x.org>"), "{}", err.final_reply);
    }

    #[test]
    fn retry_after_both_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(9));
        assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(9)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(9));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn error_bodies_are_classified() {
        let now = SystemTime::now();
        let graph = br#"{"error":{"code":"ErrorInvalidRecipients","message":"bad rcpt"}}"#;
        let e = classify(
            Api::Graph,
            StatusCode::BAD_REQUEST,
            &HeaderMap::new(),
            graph,
            now,
        );
        assert_eq!(
            (e.kind, e.final_reply.as_str()),
            (
                FailureKind::Permanent,
                "HTTP 400 ErrorInvalidRecipients: bad rcpt"
            )
        );
        let google = br#"{"error":{"code":403,"message":"no","status":"PERMISSION_DENIED"}}"#;
        let e = classify(
            Api::Gmail,
            StatusCode::FORBIDDEN,
            &HeaderMap::new(),
            google,
            now,
        );
        assert_eq!(e.final_reply, "HTTP 403 PERMISSION_DENIED: no");
        let e = classify(
            Api::Gmail,
            StatusCode::BAD_GATEWAY,
            &HeaderMap::new(),
            b"oops",
            now,
        );
        assert_eq!(
            (e.kind, e.final_reply.as_str()),
            (FailureKind::Transient, "HTTP 502 Bad Gateway: oops")
        );
    }
}
