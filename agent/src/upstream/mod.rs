//! Upstream delivery: how a spooled message leaves the agent. One trait, [`Delivery`], with an
//! implementation per send method — SMTP submission with XOAUTH2/OAUTHBEARER ([`smtp`]) and the
//! Microsoft Graph / Gmail mail APIs ([`api`]) — so the delivery worker and its retry policy are
//! the same for all of them. [`tls`] sets up TLS for every upstream connection.

pub mod api;
pub mod smtp;
pub mod tls;

use std::fmt;

use crate::sasl::AccessToken;

/// A message to send: the envelope and the raw RFC 5322 bytes (CRLF line ends, not dot-stuffed).
#[derive(Debug, Clone, Copy)]
pub struct OutgoingMessage<'a> {
    /// Envelope sender (`MAIL FROM`); the mailbox address in most sender modes.
    pub from: &'a str,
    /// Envelope recipients (`RCPT TO`), at least one.
    pub rcpts: &'a [String],
    /// The message.
    pub data: &'a [u8],
}

/// Who the message is sent as: the SASL user name (mailbox address) and a bearer token.
#[derive(Clone)]
pub struct Credentials {
    /// The SASL user name (`user=` of XOAUTH2, `a=` of OAUTHBEARER); the mailbox address.
    pub username: String,
    /// The access token, in memory only.
    pub token: AccessToken,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("token", &"[redacted]")
            .finish()
    }
}

/// The upstream accepted the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryReceipt {
    /// The upstream's final reply, e.g. `250 2.0.0 Ok: queued as 4F2…` or `HTTP 202 Accepted`.
    pub final_reply: String,
}

/// How a failed delivery should be treated by the spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Try again later with backoff: 4xx replies, network errors, timeouts, HTTP 429/5xx.
    Transient,
    /// The token was refused (SMTP 535 / 5.7.3, HTTP 401): fetch a fresh token once at once and
    /// retry; if that fails too, treat as [`FailureKind::Transient`] with backoff (the operator
    /// sees the reason in the status).
    AuthRejected,
    /// Never going to work for this message: other 5xx replies, HTTP 400/403/404/413.
    Permanent,
}

/// A failed delivery attempt, with everything the status report needs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{final_reply}")]
pub struct DeliveryError {
    /// How the spool should treat it.
    pub kind: FailureKind,
    /// The last thing the upstream said (`535 5.7.3 Authentication unsuccessful`, `HTTP 429 …`),
    /// or the local error (`connection refused`, `tls handshake … failed: …`). Never a token.
    pub final_reply: String,
    /// The decoded JSON of the server's SASL error challenge, if it sent one.
    pub auth_challenge_json: Option<String>,
    /// The upstream asked to wait this long before retrying (HTTP `Retry-After`).
    pub retry_after: Option<std::time::Duration>,
}

impl DeliveryError {
    /// A transient failure with no upstream reply (network, timeout).
    pub fn transient(reason: impl Into<String>) -> Self {
        Self {
            kind: FailureKind::Transient,
            final_reply: reason.into(),
            auth_challenge_json: None,
            retry_after: None,
        }
    }

    /// A permanent failure.
    pub fn permanent(reason: impl Into<String>) -> Self {
        Self {
            kind: FailureKind::Permanent,
            final_reply: reason.into(),
            auth_challenge_json: None,
            retry_after: None,
        }
    }
}

/// One way of sending mail upstream (object safe: the delivery worker holds an
/// `Arc<dyn Delivery>` per device). Implementations open a connection per call (or reuse one
/// internally) and never log the token.
#[async_trait::async_trait]
pub trait Delivery: Send + Sync + fmt::Debug + 'static {
    /// Sends `message` as `credentials`.
    async fn send(
        &self,
        message: OutgoingMessage<'_>,
        credentials: &Credentials,
    ) -> Result<DeliveryReceipt, DeliveryError>;

    /// Most messages one mailbox may send a minute through this upstream (`None`: no limit). The
    /// delivery worker holds each mailbox to it, deferring (never dropping) what would exceed it.
    fn messages_per_minute(&self) -> Option<u32> {
        None
    }
}

/// Exchange Online's documented submission limit: 30 messages a minute per mailbox
/// (`/work/shared/FACTS.md`, "Exchange Online SMTP client submission limits"). An agent that
/// queues must stay under it rather than trip it.
pub const EXCHANGE_ONLINE_MESSAGES_PER_MINUTE: u32 = 30;

/// The per-mailbox rate limit of a submission host: [`EXCHANGE_ONLINE_MESSAGES_PER_MINUTE`] for
/// Exchange Online (`smtp.office365.com` and the other `*.office365.com`, `*.outlook.com`
/// hosts, and the sovereign clouds' `*.office365.us`, `*.partner.outlook.cn`), none otherwise.
pub fn messages_per_minute_for(host: &str) -> Option<u32> {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let exchange = [
        "office365.com",
        "outlook.com",
        "office365.us",
        "partner.outlook.cn",
    ]
    .iter()
    .any(|d| host == *d || host.ends_with(&format!(".{d}")));
    exchange.then_some(EXCHANGE_ONLINE_MESSAGES_PER_MINUTE)
}
