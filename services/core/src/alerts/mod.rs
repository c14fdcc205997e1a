//! Alerts: tell an operator when a mailbox needs a person, before printers start failing.
//!
//! Two problems raise an [`AlertEvent`]:
//! - [`AlertKind::ReauthRequired`]: a mailbox's grant went into `REAUTH_REQUIRED` (raised on the
//!   transition only, by whoever wrote it: the refresh lifecycle or the device-code poller);
//! - [`AlertKind::RefreshTokenExpiring`]: the refresh token expires within the configured horizon
//!   (Google apps in "Testing" publishing status get 7-day refresh tokens; checked whenever a
//!   grant is refreshed, and the refresh scheduler makes sure a refresh happens at
//!   `expiry - horizon`).
//!
//! One problem is one alert, across all replicas: raising writes an [`AlertRecord`] per
//! (tenant, mailbox, kind) that names the problem (for a dead grant: when its refresh token was
//! obtained; for an expiring one: the expiry), created with [`Precondition::Absent`] (or a
//! compare-and-set over a record of an earlier, different problem). Only the replica whose write
//! wins delivers. The record of a dead grant is removed when the mailbox is ACTIVE again, so a
//! later failure alerts again; a new consent is a new problem anyway.
//!
//! The record is also the outbox: it says which channels are still pending, and the mailbox's
//! member in the store schedule [`ALERT_OUTBOX`] comes due `redeliver_after` later. Delivery runs
//! in the background ([`Alerter::spawn_worker`]: a bounded queue, never blocking a refresh) under
//! a store lease per alert; a round retries each channel with exponential backoff. What a round
//! (or a crashed replica) leaves undelivered, any replica's periodic sweep of the due outbox
//! entries tries again, for up to [`GIVE_UP_AFTER`]. Delivery is at least once: receivers
//! deduplicate by the event id (`X-Tokenfleet-Event-Id`).
//!
//! Channels: a webhook ([`webhook`]: JSON, HMAC-SHA256 signed, `X-Tokenfleet-Signature:
//! sha256=<hex>`) and e-mail ([`email`]: plain text over SMTP, sent from a configured mailbox with
//! its own access token via XOAUTH2). Events carry what is wrong and how to fix it, never a token.

pub mod email;
pub mod webhook;

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokenfleet_seal::Secret;
use tokenfleet_store::{Precondition, RecordKey, StoreError};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::{JoinHandle, JoinSet};

use crate::records::{CAS_ATTEMPTS, Records, StoredRecord};
use crate::schedule::{parse_member, unix_ms};
use crate::state::BrokerState;

/// Collection (tenant scope) of [`AlertRecord`]s, id `<mailbox>.<kind>`.
pub const ALERTS: &str = "alert";
/// Store schedule of alerts to (re)deliver; member `<tenant>/<mailbox>.<kind>`.
pub const ALERT_OUTBOX: &str = "alert-outbox";
/// An alert still undelivered this long after it was raised is given up (logged as an error).
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(24 * 3600);
/// Alerts waiting for the worker on one replica; beyond it the sweep picks them up later.
const QUEUE_CAPACITY: usize = 256;
/// Deliveries one replica runs at once.
const CONCURRENCY: usize = 4;
/// Outbox entries taken per sweep.
const SWEEP_BATCH: usize = 64;

// ---------------------------------------------------------------------------------------------
// Events

/// What an alert is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// The grant is dead: a person must consent again.
    ReauthRequired,
    /// The refresh token expires within the configured horizon.
    RefreshTokenExpiring,
}

impl AlertKind {
    /// The wire and record spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ReauthRequired => "reauth_required",
            Self::RefreshTokenExpiring => "refresh_token_expiring",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        [Self::ReauthRequired, Self::RefreshTokenExpiring]
            .into_iter()
            .find(|k| k.as_str() == text)
    }
}

impl fmt::Display for AlertKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One alert, as the webhook receives it (JSON) and the e-mail describes it. Holds no secrets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertEvent {
    /// Unique id of this alert (receivers deduplicate by it; also `X-Tokenfleet-Event-Id`).
    pub id: String,
    /// What happened.
    pub kind: AlertKind,
    /// Tenant of the mailbox.
    pub tenant: String,
    /// Mailbox name.
    pub mailbox: String,
    /// Mailbox address.
    pub address: String,
    /// The provider's error code (e.g. `AADSTS700082`) or `refresh_token_expiring`.
    pub code: String,
    /// What is wrong, in plain words.
    pub reason: String,
    /// What fixes it.
    pub fix: String,
    /// When the refresh token expires, if known.
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub expires_at: Option<OffsetDateTime>,
    /// When the problem was detected.
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
}

impl AlertEvent {
    /// A dead grant (`REAUTH_REQUIRED`) with the recorded error.
    pub fn reauth_required(
        tenant: &str,
        mailbox: &str,
        address: &str,
        error: &tokenfleet_domain::TokenError,
        now: OffsetDateTime,
    ) -> Self {
        Self {
            id: new_event_id(),
            kind: AlertKind::ReauthRequired,
            tenant: tenant.to_owned(),
            mailbox: mailbox.to_owned(),
            address: address.to_owned(),
            code: error.code.clone(),
            reason: error.reason.clone(),
            fix: error.fix.clone(),
            expires_at: None,
            time: now,
        }
    }

    /// A refresh token that expires at `expires_at`.
    pub fn refresh_token_expiring(
        tenant: &str,
        mailbox: &str,
        address: &str,
        expires_at: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Self {
        let left = (expires_at - now).whole_hours().max(0);
        Self {
            id: new_event_id(),
            kind: AlertKind::RefreshTokenExpiring,
            tenant: tenant.to_owned(),
            mailbox: mailbox.to_owned(),
            address: address.to_owned(),
            code: AlertKind::RefreshTokenExpiring.as_str().to_owned(),
            reason: format!(
                "the refresh token expires at {} (in about {left} h); after that the mailbox needs a new consent (Google gives apps in \"Testing\" publishing status 7-day refresh tokens)",
                rfc3339(expires_at)
            ),
            fix: format!(
                "publish the app (Google Cloud console → OAuth consent screen → Publish app), then run `tokenfleetctl mailbox consent {mailbox}` before it expires"
            ),
            expires_at: Some(expires_at),
            time: now,
        }
    }
}

/// What alert e-mail needs from the token lifecycle: the sender mailbox's access token. The
/// lifecycle's `TokenService` implements it; alerts do not import the lifecycle (which raises
/// alerts), so the two stay out of one import circle.
#[async_trait::async_trait]
pub trait SenderTokens: Send + Sync + 'static {
    /// An access token of `tenant`/`mailbox` for the mail protocols, valid for at least
    /// `min_validity`; the error says why there is none (never a secret).
    async fn sender_token(
        &self,
        tenant: &str,
        mailbox: &str,
        min_validity: Duration,
    ) -> Result<SenderToken, String>;
}

/// A sender mailbox's credentials for SMTP XOAUTH2.
#[derive(Debug)]
pub struct SenderToken {
    /// The SASL user name (the mailbox address).
    pub username: String,
    /// The access token.
    pub access_token: tokenfleet_seal::Secret,
}

/// Names a dead grant's problem: the grant incarnation (when its refresh token was obtained), so
/// the same dead grant alerts once, and a new consent that dies again alerts again.
pub fn grant_problem(grant: &crate::tokens::grant::GrantRecord) -> String {
    let obtained = grant
        .refresh_token_obtained
        .map(|t| t.unix_timestamp_nanos())
        .unwrap_or_default();
    format!("grant-{obtained}")
}

fn new_event_id() -> String {
    format!("alert-{}", uuid::Uuid::new_v4().simple())
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

// ---------------------------------------------------------------------------------------------
// Settings

/// How SMTP is secured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SmtpSecurity {
    /// Plain connection upgraded with STARTTLS (port 587).
    #[default]
    Starttls,
    /// TLS from the first byte (port 465).
    ImplicitTls,
    /// No TLS (a relay on the same host only).
    None,
}

/// How the broker logs in to the SMTP server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SmtpAuth {
    /// SASL XOAUTH2 with the sender mailbox's access token.
    #[default]
    Xoauth2,
    /// No login (an open local relay).
    None,
}

/// Where webhooks go. `Debug` redacts the key.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Target URL (checked by [`check_webhook_url`]).
    pub url: String,
    /// HMAC-SHA256 key.
    pub secret: Secret,
}

/// Where alert e-mails go and how they are sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmailConfig {
    /// Recipients.
    pub to: Vec<String>,
    /// Tenant of the sender mailbox.
    pub from_tenant: String,
    /// The sender mailbox (its address is the sender; its token logs in).
    pub from_mailbox: String,
    /// SMTP server.
    pub host: String,
    /// SMTP port.
    pub port: u16,
    /// TLS mode.
    pub security: SmtpSecurity,
    /// Login mode.
    pub auth: SmtpAuth,
}

/// Retries within one delivery round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per round.
    pub attempts: u32,
    /// Pause after the first failure (doubles per attempt).
    pub min: Duration,
    /// Longest pause (also caps `Retry-After`).
    pub max: Duration,
}

impl RetryPolicy {
    /// The pause after failed attempt `n` (1-based), at least `retry_after` (capped at `max`).
    pub fn pause(&self, n: u32, retry_after: Option<Duration>) -> Duration {
        let doubled = self
            .min
            .saturating_mul(1u32 << n.saturating_sub(1).min(16))
            .min(self.max);
        doubled.max(retry_after.unwrap_or_default().min(self.max))
    }
}

/// Validated alert settings (`[alerts]`).
#[derive(Debug, Clone)]
pub struct AlertsConfig {
    /// The webhook, if configured.
    pub webhook: Option<WebhookConfig>,
    /// E-mail, if configured.
    pub email: Option<EmailConfig>,
    /// Alert when a refresh token expires within this.
    pub expiry_horizon: Duration,
    /// Timeout of one webhook request or SMTP session.
    pub timeout: Duration,
    /// Retries within a round.
    pub retry: RetryPolicy,
    /// When an undelivered alert is tried again (by any replica).
    pub redeliver_after: Duration,
    /// How often each replica looks for alerts due for another round.
    pub sweep_interval: Duration,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            webhook: None,
            email: None,
            expiry_horizon: Duration::from_secs(48 * 3600),
            timeout: Duration::from_secs(10),
            retry: RetryPolicy {
                attempts: 5,
                min: Duration::from_secs(1),
                max: Duration::from_secs(60),
            },
            redeliver_after: Duration::from_secs(600),
            sweep_interval: Duration::from_secs(30),
        }
    }
}

impl AlertsConfig {
    /// Whether any channel is configured (alerts are off otherwise).
    pub fn enabled(&self) -> bool {
        self.webhook.is_some() || self.email.is_some()
    }
}

/// Checks a webhook URL: `https`, or `http` for a loopback host; no credentials or fragment.
/// Returns it unchanged, or what is wrong.
pub fn check_webhook_url(url: &str) -> Result<String, String> {
    let parsed = url::Url::parse(url.trim()).map_err(|e| {
        format!("`{url}` is not a URL ({e}); expected e.g. `https://hooks.example.com/tokenfleet`")
    })?;
    let loopback = match parsed.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => return Err("needs a host".to_owned()),
    };
    match parsed.scheme() {
        "https" => {}
        "http" if loopback => {}
        "http" => {
            return Err(
                "must be https (http is allowed for loopback receivers only): alerts name mailboxes and their problems".to_owned(),
            );
        }
        other => return Err(format!("scheme must be https, not `{other}`")),
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("must not carry a user name or password".to_owned());
    }
    if parsed.fragment().is_some() {
        return Err("must not have a fragment".to_owned());
    }
    Ok(parsed.to_string())
}

// ---------------------------------------------------------------------------------------------
// The dedup record / outbox

/// One alert per (tenant, mailbox, kind): which problem it is about, the event, and which
/// channels still wait for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertRecord {
    /// Tenant.
    pub tenant: String,
    /// Mailbox.
    pub mailbox: String,
    /// Kind.
    pub kind: AlertKind,
    /// Names the problem (same problem, same id: no second alert).
    pub problem: String,
    /// The event being delivered.
    pub event: AlertEvent,
    /// The webhook still has to receive it.
    pub webhook_pending: bool,
    /// The e-mail still has to go out.
    pub email_pending: bool,
    /// Delivery rounds so far.
    #[serde(default)]
    pub rounds: u32,
    /// Why the last round did not deliver everything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl AlertRecord {
    /// Whether nothing remains to deliver.
    pub fn done(&self) -> bool {
        !self.webhook_pending && !self.email_pending
    }
}

/// Store key of the alert of `kind` for a mailbox.
pub fn alert_key(tenant: &str, mailbox: &str, kind: AlertKind) -> RecordKey {
    RecordKey::tenant(tenant, ALERTS, &format!("{mailbox}.{kind}"))
}

impl StoredRecord for AlertRecord {
    const COLLECTION: &'static str = ALERTS;
    fn key(&self) -> RecordKey {
        alert_key(&self.tenant, &self.mailbox, self.kind)
    }
}

/// The outbox member of an alert: `<tenant>/<mailbox>.<kind>`.
pub fn outbox_member(tenant: &str, mailbox: &str, kind: AlertKind) -> String {
    format!("{tenant}/{mailbox}.{kind}")
}

fn parse_outbox_member(member: &str) -> Option<(String, String, AlertKind)> {
    let (tenant, rest) = parse_member(member)?;
    let (mailbox, kind) = rest.split_once('.')?;
    Some((
        tenant.to_owned(),
        mailbox.to_owned(),
        AlertKind::parse(kind)?,
    ))
}

/// Why an alert could not be recorded.
#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// What one channel's delivery round came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Delivered.
    Delivered,
    /// Refused for good (4xx, SMTP 5xx): retrying does not help.
    Rejected(String),
    /// Still failing after the round's attempts; another round follows.
    Failed(String),
}

// ---------------------------------------------------------------------------------------------
// The alerter

struct Inner {
    state: BrokerState,
    config: AlertsConfig,
    owner: String,
    queue: mpsc::Sender<String>,
    receiver: Mutex<Option<mpsc::Receiver<String>>>,
    http: Option<reqwest::Client>,
    /// Where raised alerts and delivery rounds are counted (see [`Alerter::with_metrics`]).
    metrics: std::sync::OnceLock<crate::metrics::CoreMetrics>,
}

/// Raises alerts (deduplicated in the store) and delivers them in the background. Cheap to
/// clone; one per replica.
#[derive(Clone)]
pub struct Alerter {
    inner: Arc<Inner>,
}

impl fmt::Debug for Alerter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Alerter")
            .field("webhook", &self.inner.config.webhook.is_some())
            .field("email", &self.inner.config.email.is_some())
            .finish_non_exhaustive()
    }
}

impl Alerter {
    /// An alerter over the shared state. Fails only when the webhook's HTTP client cannot be
    /// built (names the field).
    pub fn new(
        state: BrokerState,
        config: AlertsConfig,
    ) -> Result<Self, tokenfleet_domain::ValidationError> {
        let http = match &config.webhook {
            Some(_) => Some(webhook::build_client(config.timeout)?),
            None => None,
        };
        let (queue, receiver) = mpsc::channel(QUEUE_CAPACITY);
        Ok(Self {
            inner: Arc::new(Inner {
                state,
                config,
                owner: format!("alerts-{}", uuid::Uuid::new_v4().simple()),
                queue,
                receiver: Mutex::new(Some(receiver)),
                http,
                metrics: std::sync::OnceLock::new(),
            }),
        })
    }

    /// An alerter when any channel is configured, else `None` (alerts off).
    pub fn for_config(
        state: &BrokerState,
        config: &AlertsConfig,
    ) -> Result<Option<Self>, tokenfleet_domain::ValidationError> {
        if !config.enabled() {
            return Ok(None);
        }
        Self::new(state.clone(), config.clone()).map(Some)
    }

    /// Counts raised alerts and delivery rounds into `metrics`. Set once; later calls are
    /// ignored.
    #[must_use]
    pub fn with_metrics(self, metrics: crate::metrics::CoreMetrics) -> Self {
        if self.inner.metrics.set(metrics).is_err() {
            tracing::warn!("alerter already has a metrics handle; keeping the first");
        }
        self
    }

    fn metrics(&self) -> &crate::metrics::CoreMetrics {
        self.inner
            .metrics
            .get_or_init(crate::metrics::CoreMetrics::default)
    }

    /// The settings.
    pub fn config(&self) -> &AlertsConfig {
        &self.inner.config
    }

    fn records(&self) -> Records<'_> {
        Records::new(self.inner.state.store.as_ref())
    }

    /// Records `event` as the alert for `problem` unless that problem was alerted already (by
    /// any replica), and queues its delivery. Returns whether this call raised it.
    pub async fn raise(&self, event: AlertEvent, problem: &str) -> Result<bool, AlertError> {
        if !self.inner.config.enabled() {
            return Ok(false);
        }
        let (tenant, mailbox, kind) = (event.tenant.clone(), event.mailbox.clone(), event.kind);
        let key = alert_key(&tenant, &mailbox, kind);
        let existing = self.records().get::<AlertRecord>(&key).await?;
        let pre = match &existing {
            Some(stored) if stored.value.problem == problem => return Ok(false),
            // An earlier problem of the same kind (e.g. an older grant): this one replaces it.
            Some(stored) => Precondition::Version(stored.version),
            None => Precondition::Absent,
        };
        let record = AlertRecord {
            tenant: tenant.clone(),
            mailbox: mailbox.clone(),
            kind,
            problem: problem.to_owned(),
            webhook_pending: self.inner.config.webhook.is_some(),
            email_pending: self.inner.config.email.is_some(),
            rounds: 0,
            last_error: None,
            event,
        };
        match self.records().put(&record, pre).await {
            Ok(_) => {}
            // Another replica raised it first (or replaced it meanwhile): it delivers.
            Err(
                StoreError::AlreadyExists(_)
                | StoreError::Conflict { .. }
                | StoreError::NotFound(_),
            ) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
        let member = outbox_member(&tenant, &mailbox, kind);
        let now = self.inner.state.clock.now();
        // The sweep's safety net (a crash before delivery): due once a round surely ended.
        self.inner
            .state
            .store
            .schedule(
                ALERT_OUTBOX,
                &member,
                unix_ms(now + self.inner.config.redeliver_after),
            )
            .await?;
        tracing::warn!(
            event_id = %record.event.id,
            kind = %kind,
            tenant = %tenant,
            mailbox = %mailbox,
            code = %record.event.code,
            "alert raised"
        );
        self.metrics().alert_raised(&tenant, kind.as_str());
        if self.inner.queue.try_send(member).is_err() {
            tracing::warn!(
                event_id = %record.event.id,
                "alert queue full or stopped; the outbox sweep delivers it later"
            );
        }
        Ok(true)
    }

    /// Forgets the alert of `kind` for a mailbox (the problem is gone), so a later problem alerts
    /// again.
    pub async fn resolve(
        &self,
        tenant: &str,
        mailbox: &str,
        kind: AlertKind,
    ) -> Result<(), AlertError> {
        let removed = self
            .records()
            .delete(&alert_key(tenant, mailbox, kind), Precondition::Any)
            .await?;
        if removed {
            self.inner
                .state
                .store
                .unschedule(ALERT_OUTBOX, &outbox_member(tenant, mailbox, kind))
                .await?;
            tracing::info!(tenant, mailbox, kind = %kind, "alert resolved");
        }
        Ok(())
    }

    /// Raises [`AlertKind::RefreshTokenExpiring`] when `expires_at` is within the horizon of
    /// `now` (once per expiry).
    pub async fn check_expiry(
        &self,
        tenant: &str,
        mailbox: &str,
        address: &str,
        expires_at: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Result<bool, AlertError> {
        if expires_at - now > self.inner.config.expiry_horizon {
            return Ok(false);
        }
        // Minute resolution: providers report the remaining lifetime in seconds, so the same
        // token's expiry may come back a second off.
        let problem = format!("expires-{}", expires_at.unix_timestamp() / 60);
        let event = AlertEvent::refresh_token_expiring(tenant, mailbox, address, expires_at, now);
        self.raise(event, &problem).await
    }

    /// When a grant whose refresh token expires at `expires_at` must be looked at again so the
    /// expiry alert is not missed: `expires_at - horizon`, if that is still ahead.
    pub fn expiry_check_at(
        &self,
        expires_at: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Option<OffsetDateTime> {
        let at = expires_at - self.inner.config.expiry_horizon;
        (at > now).then_some(at)
    }

    /// Starts the delivery worker: takes queued alerts, and every `sweep_interval` the outbox
    /// entries that are due (another replica's leftovers, earlier failed rounds). `tokens` gets
    /// the sender mailbox's access token for e-mail. Stops when `shutdown` completes. Only the
    /// first call starts a worker; later ones return a finished task.
    pub fn spawn_worker(
        &self,
        tokens: impl SenderTokens,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> JoinHandle<()> {
        let tokens: Arc<dyn SenderTokens> = Arc::new(tokens);
        let receiver = self
            .inner
            .receiver
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let this = self.clone();
        tokio::spawn(async move {
            match receiver {
                Some(receiver) => this.run(receiver, tokens, shutdown).await,
                None => tracing::warn!("alert worker already running"),
            }
        })
    }

    async fn run(
        &self,
        mut receiver: mpsc::Receiver<String>,
        tokens: Arc<dyn SenderTokens>,
        shutdown: impl Future<Output = ()> + Send,
    ) {
        let mut shutdown = std::pin::pin!(shutdown);
        let semaphore = Arc::new(Semaphore::new(CONCURRENCY));
        let mut running = JoinSet::new();
        let mut ticker = tokio::time::interval(self.inner.config.sweep_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tracing::info!(
            webhook = self.inner.config.webhook.is_some(),
            email = self.inner.config.email.is_some(),
            "alert delivery running"
        );
        loop {
            let members: Vec<String> = tokio::select! {
                () = &mut shutdown => break,
                member = receiver.recv() => match member {
                    Some(m) => vec![m],
                    None => break,
                },
                _ = ticker.tick() => self.due().await,
            };
            while running.try_join_next().is_some() {}
            for member in members {
                let Ok(permit) = semaphore.clone().acquire_owned().await else {
                    return;
                };
                let (this, tokens) = (self.clone(), tokens.clone());
                running.spawn(async move {
                    this.deliver(&member, tokens.as_ref()).await;
                    drop(permit);
                });
            }
        }
        // Deliveries hold leases; give them a moment, the sweep finishes the rest elsewhere.
        let drain = async { while running.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
        tracing::info!("alert delivery stopped");
    }

    async fn due(&self) -> Vec<String> {
        let now = unix_ms(self.inner.state.clock.now());
        match self
            .inner
            .state
            .store
            .due(ALERT_OUTBOX, now, SWEEP_BATCH)
            .await
        {
            Ok(due) => due.into_iter().map(|(m, _)| m).collect(),
            Err(error) => {
                tracing::warn!(%error, "alert sweep cannot read the outbox; retrying");
                Vec::new()
            }
        }
    }

    /// One delivery round of the alert behind `member`, under its lease.
    pub async fn deliver(&self, member: &str, tokens: &dyn SenderTokens) {
        let store = self.inner.state.store.as_ref();
        let Some((tenant, mailbox, kind)) = parse_outbox_member(member) else {
            tracing::warn!(member, "dropping a malformed alert outbox entry");
            let _ = store.unschedule(ALERT_OUTBOX, member).await;
            return;
        };
        let lease = format!("alert/{member}");
        let owner = format!("{}:{}", self.inner.owner, uuid::Uuid::new_v4().simple());
        match store
            .try_lease(&lease, &owner, self.inner.config.redeliver_after)
            .await
        {
            Ok(Some(_)) => {}
            // Someone is delivering it right now.
            Ok(None) => return,
            Err(error) => {
                tracing::warn!(%error, member, "alert delivery: store unavailable; retrying later");
                return;
            }
        }
        if let Err(error) = self.round(&tenant, &mailbox, kind, member, tokens).await {
            tracing::warn!(%error, member, "alert delivery: store failure; the sweep retries");
        }
        let _ = store.release_lease(&lease, &owner).await;
    }

    async fn round(
        &self,
        tenant: &str,
        mailbox: &str,
        kind: AlertKind,
        member: &str,
        tokens: &dyn SenderTokens,
    ) -> Result<(), StoreError> {
        let store = self.inner.state.store.as_ref();
        let key = alert_key(tenant, mailbox, kind);
        let Some(stored) = self.records().get::<AlertRecord>(&key).await? else {
            store.unschedule(ALERT_OUTBOX, member).await?;
            return Ok(());
        };
        let record = stored.value;
        let now = self.inner.state.clock.now();
        if record.done() {
            store.unschedule(ALERT_OUTBOX, member).await?;
            return Ok(());
        }
        // Keep other replicas' sweeps off it while this round runs (the lease also does).
        store
            .schedule(
                ALERT_OUTBOX,
                member,
                unix_ms(now + self.inner.config.redeliver_after),
            )
            .await?;
        let event = &record.event;
        let mut webhook_result = None;
        if record.webhook_pending
            && let (Some(config), Some(http)) = (&self.inner.config.webhook, &self.inner.http)
        {
            webhook_result =
                Some(webhook::deliver(http, config, &self.inner.config.retry, event).await);
        }
        let mut email_result = None;
        if record.email_pending
            && let Some(config) = &self.inner.config.email
        {
            email_result = Some(
                email::deliver(config, &self.inner.config, tokens, &self.inner.state, event).await,
            );
        }
        for (channel, result) in [("webhook", &webhook_result), ("email", &email_result)] {
            if let Some(delivery) = result {
                let outcome = match delivery {
                    Delivery::Delivered => "delivered",
                    Delivery::Rejected(_) => "rejected",
                    Delivery::Failed(_) => "failed",
                };
                self.metrics().alert_delivery(channel, outcome);
            }
            match result {
                Some(Delivery::Delivered) => tracing::info!(
                    event_id = %event.id, kind = %kind, tenant, mailbox, channel,
                    "alert delivered"
                ),
                Some(Delivery::Rejected(reason)) => tracing::error!(
                    event_id = %event.id, kind = %kind, tenant, mailbox, channel, reason,
                    "alert rejected by the receiver; not retried"
                ),
                Some(Delivery::Failed(reason)) => tracing::warn!(
                    event_id = %event.id, kind = %kind, tenant, mailbox, channel, reason,
                    retry_in_s = self.inner.config.redeliver_after.as_secs(),
                    "alert not delivered; trying again later"
                ),
                None => {}
            }
        }
        // Write the outcome onto the record, if it is still this event.
        let settled =
            |r: &Option<Delivery>| matches!(r, Some(Delivery::Delivered | Delivery::Rejected(_)));
        let error = [&webhook_result, &email_result]
            .into_iter()
            .find_map(|r| match r {
                Some(Delivery::Failed(e) | Delivery::Rejected(e)) => Some(e.clone()),
                _ => None,
            });
        for _ in 0..CAS_ATTEMPTS {
            let Some(fresh) = self.records().get::<AlertRecord>(&key).await? else {
                return Ok(());
            };
            let mut updated = fresh.value;
            if updated.event.id != event.id {
                // Replaced by a newer problem meanwhile; that one is delivered on its own.
                return Ok(());
            }
            if settled(&webhook_result) {
                updated.webhook_pending = false;
            }
            if settled(&email_result) {
                updated.email_pending = false;
            }
            updated.rounds = updated.rounds.saturating_add(1);
            updated.last_error.clone_from(&error);
            let give_up = !updated.done() && now - event.time > GIVE_UP_AFTER;
            if give_up {
                tracing::error!(
                    event_id = %event.id, kind = %kind, tenant, mailbox,
                    rounds = updated.rounds,
                    "alert could not be delivered for a day; giving up (check alerts.* and the receiver)"
                );
                updated.webhook_pending = false;
                updated.email_pending = false;
            }
            match self
                .records()
                .put(&updated, Precondition::Version(fresh.version))
                .await
            {
                Ok(_) => {
                    if updated.done() {
                        store.unschedule(ALERT_OUTBOX, member).await?;
                    }
                    return Ok(());
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(StoreError::NotFound(_)) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_pauses_double_and_honour_retry_after_up_to_the_cap() {
        let p = RetryPolicy {
            attempts: 5,
            min: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        assert_eq!(p.pause(1, None), Duration::from_millis(100));
        assert_eq!(p.pause(2, None), Duration::from_millis(200));
        assert_eq!(p.pause(5, None), Duration::from_secs(1));
        assert_eq!(p.pause(40, None), Duration::from_secs(1));
        assert_eq!(
            p.pause(1, Some(Duration::from_millis(700))),
            Duration::from_millis(700)
        );
        assert_eq!(
            p.pause(1, Some(Duration::from_secs(3600))),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn webhook_urls_must_be_https_except_on_loopback() {
        assert!(check_webhook_url("https://hooks.example.com/x").is_ok());
        assert!(check_webhook_url("http://127.0.0.1:9/x").is_ok());
        assert!(check_webhook_url("http://[::1]:9/x").is_ok());
        assert!(
            check_webhook_url("http://hooks.example.com/x")
                .unwrap_err()
                .contains("https")
        );
        assert!(check_webhook_url("https://u:p@hooks.example.com/x").is_err());
        assert!(check_webhook_url("ftp://hooks.example.com/x").is_err());
        assert!(check_webhook_url("not a url").is_err());
    }

    #[test]
    fn outbox_members_round_trip() {
        let m = outbox_member("acme", "scan-1", AlertKind::RefreshTokenExpiring);
        assert_eq!(m, "acme/scan-1.refresh_token_expiring");
        assert_eq!(
            parse_outbox_member(&m),
            Some((
                "acme".into(),
                "scan-1".into(),
                AlertKind::RefreshTokenExpiring
            ))
        );
        assert_eq!(parse_outbox_member("acme/scan.other"), None);
        assert_eq!(parse_outbox_member("acme"), None);
    }

    #[test]
    fn events_serialize_without_secrets_and_with_the_documented_fields() {
        let now = OffsetDateTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let e = AlertEvent::refresh_token_expiring(
            "acme",
            "scan",
            "scan@example.com",
            now + Duration::from_secs(24 * 3600),
            now,
        );
        let json = serde_json::to_value(&e).unwrap();
        for field in [
            "id",
            "kind",
            "tenant",
            "mailbox",
            "address",
            "code",
            "reason",
            "fix",
            "expires_at",
            "time",
        ] {
            assert!(json.get(field).is_some(), "{field}");
        }
        assert_eq!(json["kind"], "refresh_token_expiring");
        assert!(e.reason.contains("24 h"), "{}", e.reason);
    }
}
