//! The agent's access-token cache: tokens from the broker, in memory only, keyed by (device,
//! mailbox or user address, purpose); reused until `expiry − margin`, renewed in the background
//! while in use, and — while the broker is unreachable — used until they really expire.

use std::collections::HashMap;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, SystemTime};

use tokenfleet_proto::v1 as pb;
use tokio::sync::Mutex;

use super::clock::Clock;
use crate::metrics::{AgentMetrics, TokenResult};
use crate::sasl::AccessToken;
use crate::upstream::Credentials;

/// A token is "in use" (renewed in the background) when it was used this recently.
pub const IN_USE_WINDOW: Duration = Duration::from_secs(15 * 60);

/// After the broker gave no token, messages needing the same token do not ask again for this
/// long (or the broker's `retry-after`, if longer): a queue of a device whose grant is dead must
/// not turn into a stream of requests.
pub const FAILURE_HOLD: Duration = Duration::from_secs(5);

/// What a token is for: the key of the cache.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenKey {
    /// Device the token is for.
    pub device: String,
    /// Mailbox name; empty when asked by `user_address` (the user's own mailbox).
    pub mailbox: String,
    /// Address of the user signed in at the device (LOGIN_USER / ALLOW_USER_CHANGE); empty
    /// otherwise.
    pub user_address: String,
    /// Purpose (a `pb::MailPurpose` value).
    pub purpose: pb::MailPurpose,
}

impl TokenKey {
    /// A send token of a named mailbox.
    pub fn send(device: &str, mailbox: &str) -> Self {
        Self {
            device: device.to_owned(),
            mailbox: mailbox.to_owned(),
            user_address: String::new(),
            purpose: pb::MailPurpose::Send,
        }
    }

    /// What to show as the mailbox in status reports: the name, else the user address.
    pub fn shown_mailbox(&self) -> &str {
        if self.mailbox.is_empty() {
            &self.user_address
        } else {
            &self.mailbox
        }
    }
}

/// A token the broker issued. `Debug` does not show the token.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    /// The bearer token.
    pub token: AccessToken,
    /// When it expires.
    pub expires: SystemTime,
    /// SASL user name (the mailbox address).
    pub sasl_username: String,
    /// Name of the mailbox the token is for (the user mailbox when asked by address).
    pub mailbox: String,
}

/// The broker's answer to a token request.
#[derive(Debug, Clone)]
pub enum TokenAnswer {
    /// A token.
    Token(IssuedToken),
    /// A person must consent first (user mailbox without a grant).
    ConsentRequired(pb::ConsentRequired),
}

/// Why the broker gave no token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenFailure {
    /// The broker could not be reached (network, TLS, timeout).
    #[error("broker unreachable: {0}")]
    Unreachable(String),
    /// The broker is up but could not refresh the token just now (UNAVAILABLE).
    #[error("{0}")]
    RefreshFailing(String),
    /// The mailbox has no usable grant (FAILED_PRECONDITION); `status` is what the message says.
    #[error("{message}")]
    NoGrant {
        /// REAUTH_REQUIRED, NOT_RETRIEVED, CONSENT_PENDING or DISABLED.
        status: pb::TokenStatus,
        /// The broker's message (with the fix).
        message: String,
    },
    /// The device may never have this token (PERMISSION_DENIED, NOT_FOUND, INVALID_ARGUMENT).
    #[error("{0}")]
    Denied(String),
    /// The agent asks too often (RESOURCE_EXHAUSTED); wait this long.
    #[error("{message}")]
    RateLimited {
        /// Wait before asking again.
        retry_after: Duration,
        /// The broker's message.
        message: String,
    },
}

/// Where tokens come from: the broker (`IssueAccessToken`), or a fake in tests.
#[async_trait::async_trait]
pub trait TokenSource: Send + Sync + 'static {
    /// Asks for a token.
    async fn issue(&self, key: &TokenKey) -> Result<TokenAnswer, TokenFailure>;
}

/// Why no token can be used now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenUnavailable {
    /// Keep the message queued and try later (outcome `waiting-for-token`).
    Wait {
        /// Token status to report.
        status: pb::TokenStatus,
        /// One line for the status report.
        reason: String,
        /// Do not ask before this long (rate limits).
        retry_after: Option<Duration>,
    },
    /// The message will never be allowed: dead-letter it.
    Denied(String),
}

#[derive(Debug)]
struct Slot {
    token: Option<IssuedToken>,
    status: pb::TokenStatus,
    error: String,
    mailbox: String,
    last_used: SystemTime,
    /// No new request before this time (after a failure).
    hold_until: Option<(SystemTime, TokenUnavailable)>,
}

/// The token cache. Shared behind an `Arc`; one fetch at a time per key.
pub struct TokenCache {
    source: Arc<dyn TokenSource>,
    clock: Arc<dyn Clock>,
    margin: Duration,
    slots: StdMutex<HashMap<TokenKey, Arc<Mutex<Slot>>>>,
    metrics: AgentMetrics,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("margin", &self.margin)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl TokenCache {
    /// A cache asking `source`, renewing tokens `margin` before they expire.
    pub fn new(source: Arc<dyn TokenSource>, clock: Arc<dyn Clock>, margin: Duration) -> Self {
        Self {
            source,
            clock,
            margin,
            slots: StdMutex::new(HashMap::new()),
            metrics: AgentMetrics::default(),
        }
    }

    /// Counts the requests to the source by result into `metrics`.
    pub fn with_metrics(mut self, metrics: AgentMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    fn slot(&self, key: &TokenKey) -> Arc<Mutex<Slot>> {
        let mut slots = lock(&self.slots);
        Arc::clone(slots.entry(key.clone()).or_insert_with(|| {
            Arc::new(Mutex::new(Slot {
                token: None,
                status: pb::TokenStatus::NotRetrieved,
                error: String::new(),
                mailbox: key.shown_mailbox().to_owned(),
                last_used: self.clock.now(),
                hold_until: None,
            }))
        }))
    }

    /// Credentials for `key`: the cached token while it is fresh, else a new one from the
    /// source; a still-valid cached token when the source fails transiently.
    pub async fn credentials(&self, key: &TokenKey) -> Result<Credentials, TokenUnavailable> {
        let slot = self.slot(key);
        let mut slot = slot.lock().await;
        let now = self.clock.now();
        slot.last_used = now;
        if let Some(token) = &slot.token
            && now + self.margin < token.expires
        {
            return Ok(credentials(token));
        }
        if let Some((until, answer)) = &slot.hold_until
            && now < *until
        {
            if let Some(token) = slot.token.as_ref().filter(|t| now < t.expires) {
                return Ok(credentials(token));
            }
            return Err(answer.clone());
        }
        self.fetch(key, &mut slot, now).await
    }

    async fn fetch(
        &self,
        key: &TokenKey,
        slot: &mut Slot,
        now: SystemTime,
    ) -> Result<Credentials, TokenUnavailable> {
        let answer = self.source.issue(key).await;
        self.metrics.token_request(match &answer {
            Ok(TokenAnswer::Token(_)) => TokenResult::Ok,
            Ok(TokenAnswer::ConsentRequired(_)) => TokenResult::ConsentRequired,
            Err(TokenFailure::Unreachable(_)) => TokenResult::Unreachable,
            Err(TokenFailure::RefreshFailing(_)) => TokenResult::RefreshFailing,
            Err(TokenFailure::NoGrant { .. }) => TokenResult::NoGrant,
            Err(TokenFailure::Denied(_)) => TokenResult::Denied,
            Err(TokenFailure::RateLimited { .. }) => TokenResult::RateLimited,
        });
        let still_valid = slot.token.as_ref().filter(|t| now < t.expires).cloned();
        match answer {
            Ok(TokenAnswer::Token(token)) => {
                slot.hold_until = None;
                slot.status = pb::TokenStatus::Active;
                slot.error.clear();
                if !token.mailbox.is_empty() {
                    slot.mailbox = token.mailbox.clone();
                }
                let creds = credentials(&token);
                slot.token = Some(token);
                Ok(creds)
            }
            Ok(TokenAnswer::ConsentRequired(consent)) => {
                slot.status = pb::TokenStatus::ConsentPending;
                slot.error = consent_text(&consent);
                if !consent.mailbox.is_empty() {
                    slot.mailbox = consent.mailbox.clone();
                }
                slot.token = None;
                let wait = TokenUnavailable::Wait {
                    status: slot.status,
                    reason: slot.error.clone(),
                    retry_after: None,
                };
                slot.hold_until = Some((now + FAILURE_HOLD, wait.clone()));
                Err(wait)
            }
            Err(failure) => {
                let (status, retry_after, denied) = match &failure {
                    TokenFailure::Unreachable(_) | TokenFailure::RefreshFailing(_) => {
                        (pb::TokenStatus::RefreshFailing, None, false)
                    }
                    TokenFailure::NoGrant { status, .. } => (*status, None, false),
                    TokenFailure::Denied(_) => (pb::TokenStatus::Unspecified, None, true),
                    TokenFailure::RateLimited { retry_after, .. } => {
                        (pb::TokenStatus::RefreshFailing, Some(*retry_after), false)
                    }
                };
                slot.status = status;
                slot.error = failure.to_string();
                let answer = if denied {
                    TokenUnavailable::Denied(slot.error.clone())
                } else {
                    TokenUnavailable::Wait {
                        status,
                        reason: slot.error.clone(),
                        retry_after,
                    }
                };
                slot.hold_until = (!denied).then(|| {
                    (
                        now + retry_after.unwrap_or_default().max(FAILURE_HOLD),
                        answer.clone(),
                    )
                });
                tracing::warn!(
                    device = %key.device,
                    mailbox = %key.shown_mailbox(),
                    error = %failure,
                    cached_token_usable = still_valid.is_some(),
                    "getting an access token from the broker failed"
                );
                if let Some(token) = still_valid {
                    return Ok(credentials(&token));
                }
                slot.token = None;
                Err(answer)
            }
        }
    }

    /// Forgets the token of `key` if it is still `rejected` (the upstream refused it), so the
    /// next [`TokenCache::credentials`] fetches a new one. A token renewed meanwhile is kept.
    pub async fn reject(&self, key: &TokenKey, rejected: &Credentials) {
        let slot = self.slot(key);
        let mut slot = slot.lock().await;
        if slot
            .token
            .as_ref()
            .is_some_and(|t| t.token.expose() == rejected.token.expose())
        {
            slot.token = None;
        }
    }

    /// Forgets the tokens of mailbox `mailbox` (name or user address); empty = every token.
    pub fn drop_mailbox(&self, mailbox: &str) -> usize {
        let mut slots = lock(&self.slots);
        let before = slots.len();
        slots.retain(|key, slot| {
            if mailbox.is_empty() {
                return false;
            }
            let slot_mailbox = slot
                .try_lock()
                .map(|s| s.mailbox.clone())
                .unwrap_or_default();
            key.mailbox != mailbox && key.user_address != mailbox && slot_mailbox != mailbox
        });
        before - slots.len()
    }

    /// Renews tokens in use that expire within the margin (called periodically).
    pub async fn renew_due(&self) {
        let now = self.clock.now();
        let slots: Vec<(TokenKey, Arc<Mutex<Slot>>)> = lock(&self.slots)
            .iter()
            .map(|(k, v)| (k.clone(), Arc::clone(v)))
            .collect();
        for (key, slot) in slots {
            let Ok(mut slot) = slot.try_lock() else {
                continue;
            };
            let in_use = now
                .duration_since(slot.last_used)
                .is_ok_and(|idle| idle < IN_USE_WINDOW)
                || slot.last_used > now;
            let due = slot
                .token
                .as_ref()
                .is_some_and(|t| now + self.margin >= t.expires);
            if in_use && due {
                let _ = self.fetch(&key, &mut slot, now).await;
            }
        }
    }

    /// What the cache knows about the tokens of `device`, for status reports.
    pub fn views(&self, device: &str) -> Vec<pb::MailboxTokenView> {
        let slots: Vec<(TokenKey, Arc<Mutex<Slot>>)> = lock(&self.slots)
            .iter()
            .filter(|(k, _)| k.device == device)
            .map(|(k, v)| (k.clone(), Arc::clone(v)))
            .collect();
        let mut views: Vec<pb::MailboxTokenView> = slots
            .into_iter()
            .filter_map(|(key, slot)| {
                let slot = slot.try_lock().ok()?;
                Some(pb::MailboxTokenView {
                    mailbox: slot.mailbox.clone(),
                    status: slot.status as i32,
                    expire_time: slot.token.as_ref().map(|t| timestamp(t.expires)),
                    error: slot.error.clone(),
                    // One token per mailbox and purpose: say which.
                    purpose: key.purpose as i32,
                })
            })
            .collect();
        views.sort_by(|a, b| (&a.mailbox, a.purpose).cmp(&(&b.mailbox, b.purpose)));
        views
    }
}

fn credentials(token: &IssuedToken) -> Credentials {
    Credentials {
        username: token.sasl_username.clone(),
        token: token.token.clone(),
    }
}

/// The problem text of a pending consent: what the person at the device must do.
pub fn consent_text(consent: &pb::ConsentRequired) -> String {
    let mailbox = if consent.mailbox.is_empty() {
        "the user mailbox".to_owned()
    } else {
        format!("mailbox `{}`", consent.mailbox)
    };
    if !consent.user_code.is_empty() {
        format!(
            "consent pending for {mailbox}: open {} and enter the code {}",
            consent.verification_uri, consent.user_code
        )
    } else if !consent.authorization_url.is_empty() {
        format!(
            "consent pending for {mailbox}: open {}",
            consent.authorization_url
        )
    } else {
        format!("consent pending for {mailbox}: {}", consent.message)
    }
}

/// A protobuf timestamp.
pub fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}
