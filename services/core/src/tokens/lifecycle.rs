//! [`TokenService`]: access tokens for mailboxes, refreshed when needed, exactly one refresh per
//! mailbox at a time across all replicas; on-demand and forced refreshes, token deletion, and the
//! status transitions every surface shows.
//!
//! One refresh at a time:
//! - in this process, callers that find the cached token too old join one in-flight refresh per
//!   mailbox (a spawned task, so a caller that gives up does not abandon a half-done refresh);
//! - across replicas, the refresh runs under the store lease `refresh/<tenant>/<mailbox>`. The
//!   lease is short (`lease_ttl`, 5 s by default) and renewed every third of it by a
//!   [`LeaseKeeper`] while its holder works, so it lasts as long as a slow provider call but dies
//!   with its holder: a replica killed mid-refresh blocks the mailbox for at most one TTL. The
//!   lease holder re-reads the grant first: another replica may have refreshed while it waited,
//!   and then its token is used without calling the provider. The result is written with
//!   compare-and-set on the version read under the lease and carries the lease's fence, so a
//!   holder that stalled past its lease cannot overwrite the next holder's result. A replica
//!   that does not get the lease polls the grant with a short backoff until a fresh token (or a
//!   recorded failure) appears or the lease frees, for at most `lease_wait`; then the caller gets
//!   [`TokenError::Busy`] (gRPC `UNAVAILABLE`, "retry in a few seconds") instead of hanging. It
//!   never calls the provider itself meanwhile.
//!
//! Status transitions of a refresh (see [`tokenfleet_providers::ErrorClass::refresh_status`]):
//! success → `ACTIVE` (failures reset); a dead grant (`invalid_grant`, grant-killing AADSTS codes)
//! → `REAUTH_REQUIRED` with the provider's code, the reason and `tokenfleetctl mailbox consent
//! <mailbox>` as the fix, taken off the schedule; anything else (network, 5xx, 429, a broken app
//! registration) → `REFRESH_FAILING` with the reason and fix, retried with exponential backoff
//! (at least `Retry-After`), never `REAUTH_REQUIRED`. While `REFRESH_FAILING`, an access token
//! that is still valid is still handed out, and requests do not call the provider before the
//! retry time (the scheduler retries; `RefreshNow` retries at once). A consent started for a
//! mailbox (`CONSENT_PENDING`) does not take the earlier grant's still-valid token away.
//!
//! Consents write grant records without the lease. A refresh whose write meets such a change
//! applies its result on top of it when the stored credentials are still the ones it started from
//! (a rotated refresh token is never lost), and drops it when a new grant replaced them.
//!
//! Per resource: one grant mints an access token per [`TokenResource`] (Microsoft issues each
//! token for one API: Exchange Online's mail protocols or Microsoft Graph). The mail protocols'
//! token is the one the scheduler keeps fresh; others (Graph, for devices that send with
//! `sendMail`) are minted on demand from the same refresh token (or app registration), under the
//! same lease, and cached per resource ([`TokenService::access_token_for`]). A rotated refresh
//! token from either is persisted the same way.
//!
//! Idle user tokens: every issuance notes `last_issued` on the grant (hourly granularity). When
//! the scheduler comes to a `user`-kind mailbox whose grant has not been issued for
//! `[tokens] user_token_idle_days` ([`idle_beyond`]), it deletes the token (revoked where
//! possible, wiped, `NOT_RETRIEVED` with the reason "deleted after N idle days"), audited as
//! `token.idle_delete`, instead of refreshing it.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::FutureExt as _;
use futures::future::{BoxFuture, Shared};
use time::OffsetDateTime;
use tokenfleet_domain::{GrantType, Mailbox, MailboxKind, Provider, TokenStatus};
use tokenfleet_providers::{
    ErrorClass, ProviderClient, ProviderError, ProviderSettings, SKEW_REPORT_THRESHOLD,
    TokenResource,
};
use tokenfleet_seal::{SealError, Secret};
use tokenfleet_store::{Lease, Precondition, StoreError};

use super::backoff::{Backoff, unit_random};
use super::breaker::{Admission, BreakerConfig, Breakers, GrantId, Held, Outcome, release_delay};
use super::grant::{
    GrantField, GrantRecord, LAST_ISSUED_GRANULARITY, ResourceToken, grant_key, open_field,
    seal_field,
};
use super::machine::{self, Alert, Effects, Event, Failure, Lifecycle, Schedule};
use super::scheduler::{RefreshOutcome, SchedulerConfig, schedule_refresh, unschedule_refresh};
use crate::records::{
    CAS_ATTEMPTS, Records, Snapshot, Versioned, mailbox_key, open_client_secret,
    open_service_account_key, provider_key,
};
use crate::state::BrokerState;

/// Largest validity a caller may ask for; asking for more than a token lives would refresh on
/// every call.
pub const MAX_MIN_VALIDITY: Duration = Duration::from_secs(30 * 60);

/// A still-valid token is handed out during `REFRESH_FAILING` only if it has at least this left.
pub const FALLBACK_FLOOR: Duration = Duration::from_secs(30);

/// How long a disabled mailbox's schedule entry waits before it is looked at again (cheap: no
/// provider call), so a mailbox that is enabled again is picked up.
pub const DISABLED_RECHECK: Duration = Duration::from_secs(3600);

/// First and largest pause while waiting for another replica's refresh.
const WAIT_PAUSE: (Duration, Duration) = (Duration::from_millis(20), Duration::from_millis(250));

/// Settings of the token lifecycle.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenConfig {
    /// Refresh on demand when the cached access token has less than this left.
    pub refresh_margin: Duration,
    /// Delegated grants are refreshed at least this often (Microsoft refresh tokens die after 90
    /// days without use).
    pub max_refresh_interval: Duration,
    /// Timeout of one provider request.
    pub provider_timeout: Duration,
    /// TTL of a mailbox's refresh lease. The holder renews it every third of this while it
    /// works, so it bounds how long a dead holder blocks the mailbox, not how long a refresh may
    /// take.
    pub lease_ttl: Duration,
    /// Longest a caller waits for a lease another holder has (for that holder's result or for
    /// the lease to free) before it gets [`TokenError::Busy`]; keep it below the clients' gRPC
    /// deadlines and, so a caller outlasts a dead holder's lease, at least `lease_ttl`.
    pub lease_wait: Duration,
    /// Retry timing after failed refreshes.
    pub backoff: Backoff,
    /// The background scheduler.
    pub scheduler: SchedulerConfig,
    /// The per-provider breaker that pauses calls to a failing token endpoint.
    pub breaker: BreakerConfig,
    /// Names this replica in lease owners and logs (random by default).
    pub replica_id: String,
    /// Grants of `user`-kind mailboxes unused (no issuance) for this long are deleted by the
    /// scheduler instead of refreshed; `None` = never.
    pub user_token_idle: Option<Duration>,
    /// Most user mailboxes created on demand that one device's user addresses admit.
    pub max_user_mailboxes_per_device: usize,
    /// Most user mailboxes in one tenant; further ones are not created on demand.
    pub max_user_mailboxes_per_tenant: usize,
}

impl Default for TokenConfig {
    fn default() -> Self {
        Self {
            refresh_margin: Duration::from_secs(5 * 60),
            max_refresh_interval: Duration::from_secs(24 * 3600),
            provider_timeout: Duration::from_secs(30),
            lease_ttl: Duration::from_secs(5),
            lease_wait: Duration::from_secs(10),
            backoff: Backoff::default(),
            scheduler: SchedulerConfig::default(),
            breaker: BreakerConfig::default(),
            replica_id: format!("broker-{}", uuid::Uuid::new_v4().simple()),
            user_token_idle: Some(Duration::from_secs(30 * 86_400)),
            max_user_mailboxes_per_device: 500,
            max_user_mailboxes_per_tenant: 5000,
        }
    }
}

impl TokenConfig {
    /// Checks the settings fit together; the error names the field (as in the `[tokens]`
    /// configuration section).
    pub fn check(&self) -> Result<(), tokenfleet_domain::ValidationError> {
        use tokenfleet_domain::ValidationError as E;
        if self.provider_timeout.is_zero() {
            return Err(E::new(
                "tokens.provider_timeout_seconds",
                "must be positive",
            ));
        }
        if !(MIN_LEASE_TTL..=MAX_LEASE_TTL).contains(&self.lease_ttl) {
            return Err(E::new(
                "tokens.lease_ttl_seconds",
                format!(
                    "must be between {} and {} (seconds): the lease is renewed while its holder works, so this is how long a dead replica blocks a mailbox",
                    MIN_LEASE_TTL.as_secs(),
                    MAX_LEASE_TTL.as_secs()
                ),
            ));
        }
        if self.lease_wait.is_zero() || self.lease_wait > MAX_LEASE_WAIT {
            return Err(E::new(
                "tokens.lease_wait_seconds",
                format!(
                    "must be between 1 and {} (seconds) and below the clients' deadlines",
                    MAX_LEASE_WAIT.as_secs()
                ),
            ));
        }
        if self.max_refresh_interval < Duration::from_secs(60) {
            return Err(E::new(
                "tokens.max_refresh_interval_seconds",
                "must be at least 60",
            ));
        }
        if self.backoff.min.is_zero() || self.backoff.max < self.backoff.min {
            return Err(E::new(
                "tokens.backoff_max_seconds",
                "backoff_min_seconds must be positive and backoff_max_seconds at least as large",
            ));
        }
        if self.scheduler.interval.is_zero() {
            return Err(E::new("tokens.scheduler_interval_ms", "must be positive"));
        }
        if self.breaker.probe_interval.is_zero() || self.breaker.probe_interval > MAX_PROBE_INTERVAL
        {
            return Err(E::new(
                "tokens.breaker_probe_interval_ms",
                format!(
                    "must be between 1 and {} (milliseconds)",
                    MAX_PROBE_INTERVAL.as_millis()
                ),
            ));
        }
        if self.breaker.release_spread > MAX_RELEASE_SPREAD {
            return Err(E::new(
                "tokens.breaker_release_spread_ms",
                format!(
                    "must be at most {} (milliseconds)",
                    MAX_RELEASE_SPREAD.as_millis()
                ),
            ));
        }
        if self.breaker.release_concurrency == 0 {
            return Err(E::new(
                "tokens.breaker_release_concurrency",
                "must be positive",
            ));
        }
        if self.scheduler.batch == 0 || self.scheduler.concurrency == 0 {
            return Err(E::new(
                "tokens.scheduler_concurrency",
                "scheduler_batch and scheduler_concurrency must be positive",
            ));
        }
        Ok(())
    }

    /// How long a caller waits for another replica's refresh before giving up.
    pub fn wait_timeout(&self) -> Duration {
        self.lease_wait
    }

    /// How often a lease holder renews its lease: a third of the TTL, so two renewals may fail
    /// (a store hiccup) before the lease lapses under a live holder.
    pub fn lease_renew_every(&self) -> Duration {
        (self.lease_ttl / 3).max(Duration::from_millis(100))
    }
}

/// Shortest and longest refresh lease TTL (`tokens.lease_ttl_seconds`).
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(2);
/// See [`MIN_LEASE_TTL`].
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(300);
/// Longest bounded wait for a held lease (`tokens.lease_wait_seconds`).
pub const MAX_LEASE_WAIT: Duration = Duration::from_secs(300);
/// Longest breaker probe interval (`tokens.breaker_probe_interval_ms`).
pub const MAX_PROBE_INTERVAL: Duration = Duration::from_secs(600);
/// Longest release spread (`tokens.breaker_release_spread_ms`).
pub const MAX_RELEASE_SPREAD: Duration = Duration::from_secs(600);

/// Keeps a held store lease alive while its holder works: renews it every `every` (for `ttl`)
/// until dropped. When the holder dies, so does the keeper, and the lease expires one TTL after
/// the last renewal. A renewal the store refuses means the lease was lost (it lapsed, e.g. the
/// store was unreachable for a whole TTL); the keeper then stops and says so, and the lease's
/// fence keeps the holder's late write from overwriting the next holder's.
#[derive(Debug)]
pub struct LeaseKeeper {
    task: tokio::task::JoinHandle<()>,
    lost: Arc<std::sync::atomic::AtomicBool>,
}

impl LeaseKeeper {
    /// Starts renewing `lease` (held by `lease.owner`).
    pub fn start(
        store: Arc<dyn tokenfleet_store::Store>,
        lease: &Lease,
        ttl: Duration,
        every: Duration,
    ) -> Self {
        let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (name, owner, flag) = (lease.name.clone(), lease.owner.clone(), lost.clone());
        let task = tokio::spawn(async move {
            let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                match store.renew_lease(&name, &owner, ttl).await {
                    Ok(true) => {}
                    Ok(false) => {
                        flag.store(true, Ordering::Relaxed);
                        tracing::warn!(lease = %name, "lost a lease while holding it (it lapsed before a renewal); its fence guards the late write");
                        return;
                    }
                    // Retried at the next tick; the lease outlives two missed renewals.
                    Err(error) => {
                        tracing::warn!(%error, lease = %name, "renewing a lease failed; retrying")
                    }
                }
            }
        });
        Self { task, lost }
    }

    /// Whether a renewal found the lease gone.
    pub fn lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An access token handed out. `Debug` redacts the token.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    /// The access token.
    pub access_token: Secret,
    /// When it expires (broker clock).
    pub expires: OffsetDateTime,
    /// The SASL user name to log in with (the mailbox address).
    pub sasl_username: String,
}

/// Why no token could be had. Never holds secrets. Cheap to clone (shared by every caller that
/// waited for the same refresh).
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    /// The mailbox does not exist.
    #[error("mailbox `{mailbox}` in tenant `{tenant}` not found")]
    MailboxNotFound {
        /// Tenant.
        tenant: String,
        /// Mailbox.
        mailbox: String,
    },
    /// An operator disabled the mailbox.
    #[error(
        "mailbox `{mailbox}` is disabled; enable it with `tokenfleetctl mailbox update {mailbox} --disabled=false`"
    )]
    Disabled {
        /// Mailbox.
        mailbox: String,
    },
    /// No grant was obtained yet (or it was deleted).
    #[error(
        "no token has been obtained for mailbox `{mailbox}` yet; run `tokenfleetctl mailbox consent {mailbox}`"
    )]
    NotRetrieved {
        /// Mailbox.
        mailbox: String,
    },
    /// A consent is in progress.
    #[error("the consent for mailbox `{mailbox}` is still waiting for a person to sign in")]
    ConsentPending {
        /// Mailbox.
        mailbox: String,
    },
    /// The grant is dead; a person must consent again.
    #[error("mailbox `{mailbox}` needs a new consent: {} [{}]. Fix: {}", .error.reason, .error.code, .error.fix)]
    ReauthRequired {
        /// Mailbox.
        mailbox: String,
        /// Why, and what fixes it.
        error: Box<tokenfleet_domain::TokenError>,
    },
    /// Refreshing failed; it is retried automatically.
    #[error("refreshing the token of mailbox `{mailbox}` failed: {} [{}]. Fix: {}", .error.reason, .error.code, .error.fix)]
    RefreshFailing {
        /// Mailbox.
        mailbox: String,
        /// Why, and what fixes it.
        error: Box<tokenfleet_domain::TokenError>,
        /// When the next attempt is scheduled.
        retry_at: Option<OffsetDateTime>,
    },
    /// Another replica held the mailbox's refresh lease for longer than the wait allows.
    #[error(
        "the token of mailbox `{mailbox}` is being refreshed by another broker replica and was not ready within the wait (tokens.lease_wait_seconds); retry in a few seconds (a lease whose holder died expires within tokens.lease_ttl_seconds)"
    )]
    Busy {
        /// Mailbox.
        mailbox: String,
    },
    /// The mailbox's provider record is missing or unusable.
    #[error("provider of mailbox `{mailbox}`: {problem}")]
    Provider {
        /// Mailbox.
        mailbox: String,
        /// What is wrong (names the field).
        problem: String,
    },
    /// The grant changed while it was refreshed (a consent completed or the token was deleted).
    #[error("the grant of mailbox `{mailbox}` changed while it was refreshed; retry")]
    Changed {
        /// Mailbox.
        mailbox: String,
    },
    /// Issuance refused: the device may not have this token.
    #[error("{0}")]
    Denied(String),
    /// Invalid input (names the field).
    #[error("{0}")]
    Invalid(String),
    /// The store failed.
    #[error("store: {0}")]
    Store(Arc<StoreError>),
    /// Something internal failed (details in the log).
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<StoreError> for TokenError {
    fn from(e: StoreError) -> Self {
        Self::Store(Arc::new(e))
    }
}

/// The one mapping of token errors to the operations' error (the gRPC and HTTP edges map that).
impl From<&TokenError> for crate::ops::Error {
    fn from(e: &TokenError) -> Self {
        match e {
            TokenError::MailboxNotFound { .. } => Self::NotFound(e.to_string()),
            TokenError::Disabled { .. }
            | TokenError::NotRetrieved { .. }
            | TokenError::ConsentPending { .. }
            | TokenError::ReauthRequired { .. }
            | TokenError::Provider { .. } => Self::FailedPrecondition(e.to_string()),
            TokenError::RefreshFailing { .. } | TokenError::Busy { .. } => Self::Unavailable {
                message: e.to_string(),
                retry_after: None,
                detail: String::new(),
            },
            TokenError::Changed { .. } => Self::Aborted(e.to_string()),
            TokenError::Denied(m) => Self::PermissionDenied(m.clone()),
            TokenError::Invalid(m) => Self::InvalidArgument(m.clone()),
            TokenError::Store(s) => s.as_ref().into(),
            TokenError::Internal(_) => Self::internal(
                "internal error (details in the broker log)",
                format_args!("token lifecycle failure: {e}"),
            ),
        }
    }
}

impl From<TokenError> for crate::ops::Error {
    fn from(e: TokenError) -> Self {
        Self::from(&e)
    }
}

/// What started a refresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// A caller needs a token valid for at least this long.
    OnDemand(Duration),
    /// The scheduler found the mailbox due.
    Scheduled,
    /// An operator asked (`RefreshNow`): refresh even if the cached token is fine. Not held
    /// back by the provider's breaker (its answer may close it).
    Forced,
    /// The provider's breaker released the grant (a probe got an answer), or picked it as the
    /// probe: refresh a failing grant now, whatever its backoff said.
    Released,
}

/// What [`TokenService::delete_token`] did at the provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revocation {
    /// Nothing was stored.
    NothingStored,
    /// The provider revoked the grant.
    Revoked,
    /// The provider has no revocation endpoint (Microsoft); only the stored tokens were wiped.
    Unsupported {
        /// What the operator can do instead.
        fix: String,
    },
    /// Revocation failed; the stored tokens were wiped anyway.
    Failed {
        /// Code of the failure.
        code: String,
        /// What went wrong.
        reason: String,
    },
}

impl fmt::Display for Revocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NothingStored => f.write_str("no tokens were stored"),
            Self::Revoked => f.write_str("grant revoked at the provider; stored tokens wiped"),
            Self::Unsupported { fix } => write!(
                f,
                "stored tokens wiped; the provider has no revocation endpoint ({fix})"
            ),
            Self::Failed { code, reason } => write!(
                f,
                "stored tokens wiped, but revoking at the provider failed: {reason} [{code}]"
            ),
        }
    }
}

type Flight = Shared<BoxFuture<'static, Result<IssuedToken, TokenError>>>;

/// One in-flight refresh per (tenant, mailbox, resource).
type FlightKey = (String, String, TokenResource);

#[derive(Debug)]
struct CachedClient {
    version: u64,
    created: OffsetDateTime,
    client: Arc<ProviderClient>,
}

struct Inner {
    state: BrokerState,
    config: TokenConfig,
    clients: Mutex<HashMap<(String, String), CachedClient>>,
    flights: Mutex<HashMap<FlightKey, (u64, Flight)>>,
    next_flight: AtomicU64,
    /// Where status problems are reported (set once, see [`TokenService::with_alerts`]).
    alerts: std::sync::OnceLock<crate::alerts::Alerter>,
    /// One breaker per provider token endpoint.
    breakers: Arc<Breakers>,
    /// Where refreshes and issuances are counted (set once, see [`TokenService::with_metrics`]).
    metrics: std::sync::OnceLock<crate::metrics::CoreMetrics>,
}

/// Access tokens for mailboxes; see the module documentation. Cheap to clone.
#[derive(Clone)]
pub struct TokenService {
    inner: Arc<Inner>,
}

impl fmt::Debug for TokenService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenService")
            .field("replica_id", &self.inner.config.replica_id)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The maps stay consistent even if a holder panicked (every update is a single insert/remove).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn seal_error(record: &str) -> impl Fn(SealError) -> TokenError + '_ {
    move |e| {
        tracing::error!(error = %e, record, "sealing failed");
        TokenError::Internal(format!("sealing failed for {record}"))
    }
}

/// RFC 6749 §6: a refresh token in `granted` replaces the grant's in the same write; none means
/// keep the old one, whose expiry then does not move (providers report the remaining lifetime,
/// which would drift by the request's latency) unless none was known. Shared by every token the
/// grant mints, whatever its resource.
fn keep_refresh_token(
    keyring: &tokenfleet_seal::Keyring,
    m: &Mailbox,
    record: &str,
    grant: &mut GrantRecord,
    granted: &tokenfleet_providers::TokenGrant,
    now: OffsetDateTime,
) -> Result<(), TokenError> {
    if let Some(rt) = &granted.refresh_token {
        grant.refresh_token = Some(
            seal_field(keyring, &m.tenant, &m.name, GrantField::RefreshToken, rt)
                .map_err(seal_error(record))?,
        );
        grant.refresh_token_obtained = Some(now);
        grant.refresh_token_expires = granted.refresh_token_expires_in.map(|d| now + d);
    } else if grant.refresh_token_expires.is_none() {
        grant.refresh_token_expires = granted.refresh_token_expires_in.map(|d| now + d);
    }
    Ok(())
}

/// The lease that serializes work on a mailbox's grant.
pub fn lease_name(tenant: &str, mailbox: &str) -> String {
    format!("refresh/{tenant}/{mailbox}")
}

/// Whether a grant of this type has a refresh token.
pub fn is_delegated(grant_type: GrantType) -> bool {
    matches!(
        grant_type,
        GrantType::DelegatedDeviceCode | GrantType::DelegatedAuthCode
    )
}

/// Whether a grant in this state may hand out its cached token and be refreshed.
fn usable(status: TokenStatus) -> bool {
    matches!(status, TokenStatus::Active | TokenStatus::RefreshFailing)
}

/// How long the grant's access token of `resource` is still valid at `now` (zero when expired
/// or missing).
fn remaining(grant: &GrantRecord, now: OffsetDateTime, resource: TokenResource) -> Duration {
    match grant.cached(resource) {
        (Some(_), Some(exp), _) if exp > now => (exp - now).unsigned_abs(),
        _ => Duration::ZERO,
    }
}

/// The validity to insist on: what the caller wants, but at most half the token's lifetime (a
/// provider issuing short tokens must not cause a refresh on every call).
fn needed(grant: &GrantRecord, want: Duration, resource: TokenResource) -> Duration {
    let want = want.min(MAX_MIN_VALIDITY);
    match grant.cached(resource) {
        (_, Some(to), Some(from)) if to > from => want.min((to - from).unsigned_abs() / 2),
        _ => want,
    }
}

/// The error a grant's recorded state stands for, when it cannot hand out a token.
fn state_error(grant: &GrantRecord, mailbox: &str) -> TokenError {
    let mailbox = mailbox.to_owned();
    match grant.state.status {
        TokenStatus::ReauthRequired => match &grant.state.last_error {
            Some(error) => TokenError::ReauthRequired {
                mailbox,
                error: Box::new(error.clone()),
            },
            None => TokenError::NotRetrieved { mailbox },
        },
        TokenStatus::RefreshFailing => match &grant.state.last_error {
            Some(error) => TokenError::RefreshFailing {
                mailbox,
                error: Box::new(error.clone()),
                retry_at: grant.next_refresh,
            },
            None => TokenError::Busy { mailbox },
        },
        TokenStatus::ConsentPending => TokenError::ConsentPending { mailbox },
        TokenStatus::Disabled => TokenError::Disabled { mailbox },
        TokenStatus::NotRetrieved | TokenStatus::Active => TokenError::NotRetrieved { mailbox },
    }
}

#[async_trait::async_trait]
impl crate::alerts::SenderTokens for TokenService {
    async fn sender_token(
        &self,
        tenant: &str,
        mailbox: &str,
        min_validity: Duration,
    ) -> Result<crate::alerts::SenderToken, String> {
        let token = self
            .access_token(tenant, mailbox, min_validity)
            .await
            .map_err(|e| e.to_string())?;
        Ok(crate::alerts::SenderToken {
            username: token.sasl_username,
            access_token: token.access_token,
        })
    }
}

impl TokenService {
    /// A service over the shared state.
    pub fn new(state: BrokerState, config: TokenConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                state,
                clients: Mutex::new(HashMap::new()),
                flights: Mutex::new(HashMap::new()),
                next_flight: AtomicU64::new(1),
                alerts: std::sync::OnceLock::new(),
                metrics: std::sync::OnceLock::new(),
                breakers: Breakers::new(config.breaker.clone()),
                config,
            }),
        }
    }

    /// Reports transitions into `REAUTH_REQUIRED` and refresh tokens nearing their expiry to
    /// `alerter`, and resolves the dead-grant alert when the mailbox is ACTIVE again. Set once;
    /// later calls are ignored.
    #[must_use]
    pub fn with_alerts(self, alerter: crate::alerts::Alerter) -> Self {
        if self.inner.alerts.set(alerter).is_err() {
            tracing::warn!("token service already has an alerter; keeping the first");
        }
        self
    }

    /// Counts provider token requests and issuances into `metrics` (the composition root's
    /// registered handle). Set once; later calls are ignored. Without it they count into an
    /// unregistered handle.
    #[must_use]
    pub fn with_metrics(self, metrics: crate::metrics::CoreMetrics) -> Self {
        if self.inner.metrics.set(metrics).is_err() {
            tracing::warn!("token service already has a metrics handle; keeping the first");
        }
        self
    }

    /// The metrics handle (an unregistered one when none was set).
    pub fn metrics(&self) -> &crate::metrics::CoreMetrics {
        self.inner
            .metrics
            .get_or_init(crate::metrics::CoreMetrics::default)
    }

    /// The alerter, if alerts are configured.
    pub fn alerts(&self) -> Option<&crate::alerts::Alerter> {
        self.inner.alerts.get()
    }

    /// The shared broker state.
    pub fn state(&self) -> &BrokerState {
        &self.inner.state
    }

    /// The settings.
    pub fn config(&self) -> &TokenConfig {
        &self.inner.config
    }

    fn records(&self) -> Records<'_> {
        Records::new(self.inner.state.store.as_ref())
    }

    fn now(&self) -> OffsetDateTime {
        self.inner.state.clock.now()
    }

    /// Reads a mailbox's grant.
    pub async fn grant(
        &self,
        tenant: &str,
        mailbox: &str,
    ) -> Result<Option<Versioned<GrantRecord>>, TokenError> {
        Ok(self
            .records()
            .get::<GrantRecord>(&grant_key(tenant, mailbox))
            .await?)
    }

    async fn mailbox(
        &self,
        snapshot: Option<&Snapshot>,
        tenant: &str,
        mailbox: &str,
    ) -> Result<Mailbox, TokenError> {
        self.records()
            .get_via::<Mailbox>(snapshot, &mailbox_key(tenant, mailbox))
            .await?
            .map(|m| m.value)
            .ok_or_else(|| TokenError::MailboxNotFound {
                tenant: tenant.to_owned(),
                mailbox: mailbox.to_owned(),
            })
    }

    fn check_names(tenant: &str, mailbox: &str) -> Result<(), TokenError> {
        tokenfleet_domain::name("tenant", tenant)
            .map_err(|e| TokenError::Invalid(e.to_string()))?;
        tokenfleet_domain::name("mailbox", mailbox)
            .map_err(|e| TokenError::Invalid(e.to_string()))?;
        Ok(())
    }

    fn open_access(
        &self,
        grant: &GrantRecord,
        address: &str,
        resource: TokenResource,
    ) -> Result<Option<IssuedToken>, TokenError> {
        self.open_access_via(None, grant, address, resource)
    }

    /// [`Self::open_access`], opened once per `snapshot` ([`Snapshot::memo`]: by the grant's
    /// field and its exact ciphertext, so any other ciphertext is opened afresh).
    fn open_access_via(
        &self,
        snapshot: Option<&Snapshot>,
        grant: &GrantRecord,
        address: &str,
        resource: TokenResource,
    ) -> Result<Option<IssuedToken>, TokenError> {
        let (Some(sealed), Some(expires), _) = grant.cached(resource) else {
            return Ok(None);
        };
        let record = format!("{}#access_token@{resource}", grant.key());
        let open = || {
            open_field(
                &self.inner.state.keyring,
                &grant.tenant,
                &grant.mailbox,
                GrantRecord::access_field(resource),
                sealed,
            )
            .map_err(seal_error(&record))
        };
        let access_token = match snapshot {
            Some(snapshot) => snapshot.memo(&record, sealed, open)?,
            None => open()?,
        };
        Ok(Some(IssuedToken {
            access_token,
            expires,
            sasl_username: address.to_owned(),
        }))
    }

    /// An access token for the mailbox valid for at least `min_validity` (capped at
    /// [`MAX_MIN_VALIDITY`] and half the token lifetime): the cached one if it is, else a refreshed
    /// one (one refresh per mailbox across all replicas; see the module documentation).
    pub async fn access_token(
        &self,
        tenant: &str,
        mailbox: &str,
        min_validity: Duration,
    ) -> Result<IssuedToken, TokenError> {
        self.access_token_for(tenant, mailbox, TokenResource::MailProtocols, min_validity)
            .await
    }

    /// [`Self::access_token`] for `resource`: the token of the mail protocols, or one of another
    /// API (Microsoft Graph) minted from the same grant and cached per resource.
    pub async fn access_token_for(
        &self,
        tenant: &str,
        mailbox: &str,
        resource: TokenResource,
        min_validity: Duration,
    ) -> Result<IssuedToken, TokenError> {
        self.access_token_via(None, tenant, mailbox, resource, min_validity)
            .await
    }

    /// [`Self::access_token_for`] reading the mailbox and its grant from `snapshot` first (the
    /// records the call read in one round trip); after a refresh they are read again from the
    /// store.
    pub async fn access_token_via(
        &self,
        snapshot: Option<&Snapshot>,
        tenant: &str,
        mailbox: &str,
        resource: TokenResource,
        min_validity: Duration,
    ) -> Result<IssuedToken, TokenError> {
        Self::check_names(tenant, mailbox)?;
        for round in 0..2 {
            let snapshot = if round == 0 { snapshot } else { None };
            let m = self.mailbox(snapshot, tenant, mailbox).await?;
            if m.disabled {
                return Err(TokenError::Disabled {
                    mailbox: mailbox.to_owned(),
                });
            }
            let Some(grant) = self
                .records()
                .get_via::<GrantRecord>(snapshot, &grant_key(tenant, mailbox))
                .await?
            else {
                return Err(TokenError::NotRetrieved {
                    mailbox: mailbox.to_owned(),
                });
            };
            let grant = grant.value;
            let need = needed(&grant, min_validity, resource);
            if let Some(done) =
                self.without_refresh(snapshot, &grant, need, &m.address, resource)?
            {
                return done;
            }
            let token = self
                .flight(tenant, mailbox, Trigger::OnDemand(need), resource)
                .await?;
            let now = self.now();
            if token.expires >= now + need || (round == 1 && token.expires > now) {
                return Ok(token);
            }
        }
        Err(TokenError::Busy {
            mailbox: mailbox.to_owned(),
        })
    }

    /// What an on-demand request gets without calling the provider: `Some` when the cached token
    /// is good enough, or when no refresh may happen now (the grant's state forbids it, or a
    /// failed refresh is backing off — then a still-valid token is handed out, else the recorded
    /// error). `None`: refresh.
    fn without_refresh(
        &self,
        snapshot: Option<&Snapshot>,
        grant: &GrantRecord,
        need: Duration,
        address: &str,
        resource: TokenResource,
    ) -> Result<Option<Result<IssuedToken, TokenError>>, TokenError> {
        let now = self.now();
        let left = remaining(grant, now, resource);
        let cached = |floor: Duration| -> Result<Option<IssuedToken>, TokenError> {
            if left >= floor && !left.is_zero() {
                self.open_access_via(snapshot, grant, address, resource)
            } else {
                Ok(None)
            }
        };
        let mailbox = grant.mailbox.as_str();
        match grant.state.status {
            // A re-consent in progress does not take the earlier grant's valid token away.
            TokenStatus::ConsentPending => Ok(Some(
                cached(need)?.ok_or_else(|| state_error(grant, mailbox)),
            )),
            status if !usable(status) => Ok(Some(Err(state_error(grant, mailbox)))),
            _ => {
                if let Some(token) = cached(need)? {
                    return Ok(Some(Ok(token)));
                }
                let backing_off = grant.state.status == TokenStatus::RefreshFailing
                    && grant.next_refresh.is_some_and(|t| t > now);
                if backing_off {
                    // The backoff is honoured while the last good token lasts; the scheduler
                    // (or the provider's breaker, once a probe gets an answer) retries.
                    if let Some(token) = cached(FALLBACK_FLOOR)? {
                        return Ok(Some(Ok(token)));
                    }
                    // A device needs a token and has none left: one bounded attempt, which the
                    // breaker turns into (or makes wait for) its probe.
                    if self.on_demand_attempt_allowed(grant, now) {
                        return Ok(None);
                    }
                    return Ok(Some(Err(state_error(grant, mailbox))));
                }
                Ok(None)
            }
        }
    }

    /// Whether a device's request may try a failing grant before its backoff ends: when the
    /// breaker is on, the grant's last attempt is a probe interval old, and the provider's
    /// `Retry-After` has passed. So a grant costs at most one on-demand attempt per probe
    /// interval, and the breaker decides whether that attempt reaches the provider.
    fn on_demand_attempt_allowed(&self, grant: &GrantRecord, now: OffsetDateTime) -> bool {
        let breaker = &self.inner.config.breaker;
        breaker.failures > 0
            && grant.retry_not_before.is_none_or(|t| t <= now)
            && grant
                .state
                .last_error
                .as_ref()
                .is_none_or(|e| e.time + breaker.probe_interval <= now)
    }

    /// The provider breakers of this process.
    pub fn breakers(&self) -> &Arc<Breakers> {
        &self.inner.breakers
    }

    /// Starts, in the background, a refresh of one held grant per open breaker whose probe is
    /// due (called by the scheduler on every tick).
    pub fn start_due_probes(&self) {
        for (tenant, mailbox) in self.inner.breakers.due_probes(self.now()) {
            let this = self.clone();
            tokio::spawn(async move { this.released_refresh(&tenant, &mailbox).await });
        }
    }

    /// Refreshes grants a closing breaker released: each starts at a random moment within the
    /// release spread, at most `release_concurrency` at once.
    fn release(&self, grants: Vec<GrantId>) {
        if grants.is_empty() {
            return;
        }
        let config = self.inner.config.breaker.clone();
        tracing::info!(
            grants = grants.len(),
            spread_ms = config.release_spread.as_millis() as u64,
            "the identity provider answers again: refreshing the grants held back"
        );
        let this = self.clone();
        tokio::spawn(async move {
            let permits = Arc::new(tokio::sync::Semaphore::new(
                config.release_concurrency.max(1),
            ));
            let count = grants.len();
            let mut running = tokio::task::JoinSet::new();
            for (index, (tenant, mailbox)) in grants.into_iter().enumerate() {
                let delay = release_delay(config.release_spread, index, count, unit_random());
                let (this, permits) = (this.clone(), permits.clone());
                running.spawn(async move {
                    tokio::time::sleep(delay).await;
                    let Ok(_permit) = permits.acquire_owned().await else {
                        return;
                    };
                    this.released_refresh(&tenant, &mailbox).await;
                });
            }
            while running.join_next().await.is_some() {}
        });
    }

    /// Joins the in-flight refresh of the mailbox in this process, or starts one.
    fn flight(
        &self,
        tenant: &str,
        mailbox: &str,
        trigger: Trigger,
        resource: TokenResource,
    ) -> Flight {
        let key = (tenant.to_owned(), mailbox.to_owned(), resource);
        let mut flights = lock(&self.inner.flights);
        if let Some((_, flight)) = flights.get(&key) {
            return flight.clone();
        }
        let id = self.inner.next_flight.fetch_add(1, Ordering::Relaxed);
        let this = self.clone();
        let (t, m, r) = key.clone();
        // The refresh is a child of the first caller's span (an agent's issuance, a scheduler
        // run), so its store and provider calls show up in that trace.
        let span = tracing::info_span!("refresh_token", trigger = ?trigger, resource = ?r);
        let task = tokio::spawn(tracing::Instrument::instrument(
            async move {
                let result = this.refresh_exclusive(&t, &m, trigger, r).await;
                let mut flights = lock(&this.inner.flights);
                if flights.get(&(t.clone(), m.clone(), r)).map(|(i, _)| *i) == Some(id) {
                    flights.remove(&(t, m, r));
                }
                result
            },
            span,
        ));
        let flight = async move {
            task.await
                .unwrap_or_else(|e| Err(TokenError::Internal(format!("refresh task failed: {e}"))))
        }
        .boxed()
        .shared();
        flights.insert(key, (id, flight.clone()));
        flight
    }

    /// Refreshes now, even if the cached token is fine (`RefreshNow`). Waits for a refresh that
    /// is already running. Provider failures are recorded in the grant and returned.
    pub async fn refresh_now(
        &self,
        tenant: &str,
        mailbox: &str,
    ) -> Result<IssuedToken, TokenError> {
        Self::check_names(tenant, mailbox)?;
        self.refresh_exclusive(
            tenant,
            mailbox,
            Trigger::Forced,
            TokenResource::MailProtocols,
        )
        .await
    }

    /// One scheduled refresh (called by the scheduler); outcomes are logged and the schedule
    /// entry is moved to when the mailbox should be looked at next. The returned outcome feeds
    /// the scheduler's concurrency controller.
    pub async fn scheduled_refresh(&self, tenant: &str, mailbox: &str) -> RefreshOutcome {
        self.background_refresh(tenant, mailbox, Trigger::Scheduled)
            .await
    }

    /// A refresh of a grant the provider's breaker released (or picked as its probe); outcomes
    /// are handled like the scheduler's.
    pub async fn released_refresh(&self, tenant: &str, mailbox: &str) {
        self.background_refresh(tenant, mailbox, Trigger::Released)
            .await;
    }

    async fn background_refresh(
        &self,
        tenant: &str,
        mailbox: &str,
        trigger: Trigger,
    ) -> RefreshOutcome {
        let store = self.inner.state.store.as_ref();
        match self.delete_if_idle(tenant, mailbox).await {
            Ok(true) => return RefreshOutcome::Other,
            Ok(false) => {}
            Err(error) => {
                tracing::warn!(%error, tenant, mailbox, "checking an idle user token failed");
            }
        }
        let result = self
            .flight(tenant, mailbox, trigger, TokenResource::MailProtocols)
            .await;
        let now = self.now();
        if !matches!(result, Err(TokenError::RefreshFailing { .. })) {
            // Whatever happened, the grant no longer waits for the provider's recovery.
            self.inner
                .breakers
                .forget(&(tenant.to_owned(), mailbox.to_owned()));
        }
        let next = match &result {
            Ok(_) => return RefreshOutcome::Refreshed,
            // Rescheduled where the failure was recorded (or by whoever recorded it).
            Err(TokenError::RefreshFailing { .. }) => return RefreshOutcome::ProviderFailing,
            // A dead grant waits for a person; nothing to schedule.
            Err(TokenError::ReauthRequired { .. }) => None,
            Err(TokenError::MailboxNotFound { .. }) => {
                // The mailbox was deleted: its grant must not outlive it.
                tracing::info!(tenant, mailbox, "mailbox gone: discarding its grant");
                if let Err(error) = discard_grant(&self.inner.state, tenant, mailbox).await {
                    tracing::warn!(%error, tenant, mailbox, "discarding an orphaned grant failed");
                }
                None
            }
            Err(TokenError::NotRetrieved { .. }) | Err(TokenError::ConsentPending { .. }) => None,
            Err(TokenError::Disabled { .. }) => Some(now + DISABLED_RECHECK),
            Err(error @ (TokenError::Busy { .. } | TokenError::Changed { .. })) => {
                tracing::debug!(%error, tenant, mailbox, "scheduled refresh deferred");
                Some(now + self.inner.config.lease_ttl)
            }
            Err(error @ TokenError::Store(_)) => {
                tracing::warn!(%error, tenant, mailbox, "scheduled refresh failed; retrying soon");
                Some(now + self.inner.config.lease_ttl)
            }
            Err(error) => {
                // A configuration problem (provider missing or invalid, unreadable secret):
                // retrying often does not help; an operator's RefreshNow retries at once.
                tracing::warn!(%error, tenant, mailbox, "scheduled refresh failed; retrying later");
                Some(now + self.inner.config.backoff.max)
            }
        };
        let written = match next {
            Some(at) => schedule_refresh(store, tenant, mailbox, at).await,
            None => unschedule_refresh(store, tenant, mailbox).await,
        };
        if let Err(error) = written {
            tracing::warn!(%error, tenant, mailbox, "updating the refresh schedule failed");
        }
        RefreshOutcome::Other
    }

    /// Takes the mailbox's lease (waiting for another holder, bounded by a deadline) and runs the
    /// refresh under it; while waiting, returns early when the holder's result shows up.
    async fn refresh_exclusive(
        &self,
        tenant: &str,
        mailbox: &str,
        trigger: Trigger,
        resource: TokenResource,
    ) -> Result<IssuedToken, TokenError> {
        let store = self.inner.state.store.as_ref();
        let name = lease_name(tenant, mailbox);
        let owner = format!(
            "{}:{}",
            self.inner.config.replica_id,
            uuid::Uuid::new_v4().simple()
        );
        let deadline = tokio::time::Instant::now() + self.inner.config.wait_timeout();
        let mut pause = WAIT_PAUSE.0;
        let mut first_version: Option<u64> = None;
        let mut address: Option<String> = None;
        loop {
            if let Some(lease) = store
                .try_lease(&name, &owner, self.inner.config.lease_ttl)
                .await?
            {
                let keeper = self.keep(&lease);
                let result = self
                    .refresh_under_lease(tenant, mailbox, trigger, resource, &lease)
                    .await;
                let lost = keeper.lost();
                drop(keeper);
                match store.release_lease(&name, &owner).await {
                    Ok(true) => {}
                    Ok(false) => tracing::warn!(
                        tenant,
                        mailbox,
                        lost,
                        "the refresh lease lapsed before the refresh finished (renewals failed); its fence kept a later holder's result"
                    ),
                    Err(error) => {
                        tracing::warn!(%error, tenant, mailbox, "releasing the refresh lease failed; it expires on its own")
                    }
                }
                return result;
            }
            // Another replica (or a forced refresh here) works on the grant: watch its record
            // instead of calling the provider.
            if trigger != Trigger::Forced {
                if address.is_none() {
                    address = Some(self.mailbox(None, tenant, mailbox).await?.address);
                }
                if let Some(done) = self
                    .check_while_waiting(
                        tenant,
                        mailbox,
                        trigger,
                        &mut first_version,
                        address.as_deref().unwrap_or_default(),
                        resource,
                    )
                    .await?
                {
                    return done;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(TokenError::Busy {
                    mailbox: mailbox.to_owned(),
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(WAIT_PAUSE.1);
        }
    }

    /// Renews `lease` until the returned keeper is dropped.
    pub fn keep(&self, lease: &Lease) -> LeaseKeeper {
        LeaseKeeper::start(
            self.inner.state.store.clone(),
            lease,
            self.inner.config.lease_ttl,
            self.inner.config.lease_renew_every(),
        )
    }

    /// While another holder refreshes: `Some` when its result is visible in the record.
    async fn check_while_waiting(
        &self,
        tenant: &str,
        mailbox: &str,
        trigger: Trigger,
        first_version: &mut Option<u64>,
        address: &str,
        resource: TokenResource,
    ) -> Result<Option<Result<IssuedToken, TokenError>>, TokenError> {
        let Some(stored) = self.grant(tenant, mailbox).await? else {
            return Ok(Some(Err(TokenError::NotRetrieved {
                mailbox: mailbox.to_owned(),
            })));
        };
        let first = *first_version.get_or_insert(stored.version);
        let grant = &stored.value;
        let now = self.now();
        let fresh = match trigger {
            Trigger::OnDemand(want) => {
                remaining(grant, now, resource) >= needed(grant, want, resource)
            }
            Trigger::Scheduled => grant.next_refresh.is_some_and(|t| t > now),
            Trigger::Released => {
                grant.state.status == TokenStatus::Active
                    && grant.next_refresh.is_some_and(|t| t > now)
            }
            Trigger::Forced => false,
        };
        if usable(grant.state.status)
            && fresh
            && let Some(token) = self.open_access(grant, address, resource)?
        {
            return Ok(Some(Ok(token)));
        }
        if stored.version != first
            && matches!(
                grant.state.status,
                TokenStatus::ReauthRequired
                    | TokenStatus::RefreshFailing
                    | TokenStatus::NotRetrieved
                    | TokenStatus::ConsentPending
            )
        {
            // The holder finished without a usable token.
            if grant.state.status == TokenStatus::RefreshFailing
                && remaining(grant, now, resource) >= FALLBACK_FLOOR
                && let Some(token) = self.open_access(grant, address, resource)?
            {
                return Ok(Some(Ok(token)));
            }
            return Ok(Some(Err(state_error(grant, mailbox))));
        }
        Ok(None)
    }

    /// The provider client for a provider record (cached; rebuilt when the record changes).
    fn client_for(
        &self,
        provider: &Versioned<Provider>,
        mailbox: &str,
    ) -> Result<Arc<ProviderClient>, TokenError> {
        let p = &provider.value;
        let key = (p.tenant.clone(), p.name.clone());
        if let Some(c) = lock(&self.inner.clients).get(&key)
            && c.version == provider.version
            && c.created == p.stamps.created
        {
            return Ok(c.client.clone());
        }
        let record = format!("{}#client_secret", provider_key(&p.tenant, &p.name));
        let secret =
            open_client_secret(&self.inner.state.keyring, p).map_err(seal_error(&record))?;
        let bad = |e: tokenfleet_domain::ValidationError| TokenError::Provider {
            mailbox: mailbox.to_owned(),
            problem: format!("provider `{}`: {e}", p.name),
        };
        let proxy_record = format!("{}#http_proxy_password", provider_key(&p.tenant, &p.name));
        let proxy_password = crate::records::open_http_proxy_password(&self.inner.state.keyring, p)
            .map_err(seal_error(&proxy_record))?;
        let settings = ProviderSettings::from_provider(p, secret)
            .map_err(bad)?
            .with_proxy_password(proxy_password)
            .with_timeout(self.inner.config.provider_timeout);
        let client = Arc::new(
            ProviderClient::new(settings)
                .map_err(bad)?
                .with_clock(self.inner.state.clock.clone()),
        );
        lock(&self.inner.clients).insert(
            key,
            CachedClient {
                version: provider.version,
                created: p.stamps.created,
                client: client.clone(),
            },
        );
        Ok(client)
    }

    async fn provider_of(
        &self,
        m: &Mailbox,
    ) -> Result<(Versioned<Provider>, Arc<ProviderClient>), TokenError> {
        let provider = self
            .records()
            .get::<Provider>(&provider_key(&m.tenant, &m.provider))
            .await?
            .ok_or_else(|| TokenError::Provider {
                mailbox: m.name.clone(),
                problem: format!(
                    "provider `{}` does not exist in tenant `{}`",
                    m.provider, m.tenant
                ),
            })?;
        let client = self.client_for(&provider, &m.name)?;
        Ok((provider, client))
    }

    /// The refresh itself, under the mailbox's lease.
    async fn refresh_under_lease(
        &self,
        tenant: &str,
        mailbox: &str,
        trigger: Trigger,
        resource: TokenResource,
        lease: &Lease,
    ) -> Result<IssuedToken, TokenError> {
        let m = self.mailbox(None, tenant, mailbox).await?;
        let Some(stored) = self.grant(tenant, mailbox).await? else {
            return Err(TokenError::NotRetrieved {
                mailbox: mailbox.to_owned(),
            });
        };
        if m.disabled {
            return Err(TokenError::Disabled {
                mailbox: mailbox.to_owned(),
            });
        }
        let grant = stored.value;
        let now = self.now();

        // Re-read under the lease: another replica may have refreshed meanwhile.
        match trigger {
            Trigger::OnDemand(want) => {
                if let Some(done) = self.without_refresh(
                    None,
                    &grant,
                    needed(&grant, want, resource),
                    &m.address,
                    resource,
                )? {
                    return done;
                }
            }
            // Released by the breaker: refreshed elsewhere meanwhile (ACTIVE, not due), or
            // still inside the provider's Retry-After.
            Trigger::Released
                if grant.state.status == TokenStatus::Active
                    && grant.next_refresh.is_some_and(|t| t > now) =>
            {
                return match self.open_access(&grant, &m.address, resource)? {
                    Some(token) => Ok(token),
                    None => Err(TokenError::NotRetrieved {
                        mailbox: mailbox.to_owned(),
                    }),
                };
            }
            Trigger::Released if grant.retry_not_before.is_some_and(|t| t > now) => {
                return Err(state_error(&grant, mailbox));
            }
            Trigger::Scheduled if usable(grant.state.status) => {
                if let Some(next) = grant.next_refresh
                    && next > now
                {
                    // Done elsewhere (or a failure was recorded meanwhile, which keeps the
                    // grant waiting for its retry or the breaker's release); make the schedule
                    // agree with the record.
                    schedule_refresh(self.inner.state.store.as_ref(), tenant, mailbox, next)
                        .await?;
                    if grant.state.status != TokenStatus::Active {
                        return Err(state_error(&grant, mailbox));
                    }
                    return match self.open_access(&grant, &m.address, resource)? {
                        Some(token) => Ok(token),
                        None => Err(TokenError::NotRetrieved {
                            mailbox: mailbox.to_owned(),
                        }),
                    };
                }
            }
            _ => {}
        }
        match grant.state.status {
            TokenStatus::Active | TokenStatus::RefreshFailing => {}
            // An operator may retry a dead grant by hand (e.g. after a Conditional Access block
            // was lifted); nothing else calls the provider for it.
            TokenStatus::ReauthRequired
                if trigger == Trigger::Forced
                    && (grant.refresh_token.is_some() || !is_delegated(m.grant_type)) => {}
            _ => return Err(state_error(&grant, mailbox)),
        }
        let delegated = is_delegated(m.grant_type);
        let refresh_token = match (&grant.refresh_token, delegated) {
            (Some(sealed), true) => Some(
                open_field(
                    &self.inner.state.keyring,
                    tenant,
                    mailbox,
                    GrantField::RefreshToken,
                    sealed,
                )
                .map_err(seal_error(&format!("{}#refresh_token", grant.key())))?,
            ),
            (None, true) => {
                return Err(TokenError::NotRetrieved {
                    mailbox: mailbox.to_owned(),
                });
            }
            (_, false) => None,
        };

        let (provider, client) = self.provider_of(&m).await?;
        // The mail protocols keep the scopes the grant was consented with; another resource
        // gets its own (one resource per token request).
        let scopes = if resource != TokenResource::MailProtocols || grant.scopes.is_empty() {
            match client.scopes_for_resource(m.grant_type, &m.purposes, resource) {
                Ok(s) => s,
                Err(e) => {
                    return self
                        .record_failure(&m, stored.version, grant, e, lease)
                        .await;
                }
            }
        } else {
            grant.scopes.clone()
        };
        // The provider's breaker: while its token endpoint fails transiently, only its probe
        // calls; everyone else is held back (and released when a probe gets an answer).
        let endpoint = client.settings().endpoints.token.to_string();
        let grant_id: GrantId = (tenant.to_owned(), mailbox.to_owned());
        let mut waited = false;
        let ticket = loop {
            let admission = match trigger {
                Trigger::Forced => Admission::Call(self.inner.breakers.unconditional(&endpoint)),
                _ => self.inner.breakers.admit(&endpoint, self.now()),
            };
            match admission {
                Admission::Call(ticket) | Admission::Probe(ticket) => break ticket,
                // A device waits (bounded) for a probe that is at the provider right now.
                Admission::Held(held)
                    if matches!(trigger, Trigger::OnDemand(_))
                        && held.probe_in_flight
                        && !waited =>
                {
                    waited = true;
                    self.inner
                        .breakers
                        .changed_within(self.inner.config.breaker.probe_interval)
                        .await;
                }
                Admission::Held(held) => {
                    self.inner.breakers.hold(&endpoint, &grant_id);
                    let result = self
                        .record_held(&m, stored.version, grant, &held, lease)
                        .await;
                    return self.on_demand_fallback(trigger, result, &m, resource).await;
                }
            }
        };
        let probe = ticket.is_probe();
        let started = std::time::Instant::now();
        let response = match (m.grant_type, refresh_token.as_ref()) {
            (_, Some(rt)) => client.refresh(rt, &scopes).await,
            (GrantType::ServiceAccount, _) => {
                let record = format!(
                    "{}#service_account_key",
                    provider_key(&provider.value.tenant, &provider.value.name)
                );
                match open_service_account_key(&self.inner.state.keyring, &provider.value)
                    .map_err(seal_error(&record))?
                {
                    Some(key) => client.jwt_bearer(&key, &m.address, &scopes).await,
                    None => Err(ProviderError::new(
                        ErrorClass::AppMisconfigured,
                        "service_account_key_missing",
                        format!(
                            "provider `{}` has no service-account key",
                            provider.value.name
                        ),
                        "store the service account's JSON key with `tokenfleetctl provider update`",
                    )),
                }
            }
            _ => client.client_credentials(&scopes).await,
        };
        tracing::debug!(
            tenant,
            mailbox,
            %resource,
            elapsed_ms = started.elapsed().as_millis() as u64,
            ok = response.is_ok(),
            probe,
            "provider token request"
        );
        let released = ticket.report(
            self.now(),
            &grant_id,
            Outcome::of(&response),
            response.as_ref().err(),
        );
        self.release(released);
        // A refresh token refused as dead may only be one that was already rotated: another
        // replica (or a consent) stored a newer one while this refresh was under way, or a
        // provider with single-use refresh tokens saw it spent. Before the grant is declared
        // dead, the stored one is tried once.
        let (version, grant, response) = match (response, refresh_token.as_ref()) {
            (Err(e), Some(presented)) if e.class == ErrorClass::GrantDead => {
                match self.stored_if_rotated(tenant, mailbox, presented).await? {
                    Some((fresh, stored_rt)) => {
                        tracing::info!(
                            tenant,
                            mailbox,
                            code = %e.code,
                            "the provider refused a refresh token that has since been replaced in the store; retrying once with the stored one"
                        );
                        let again = client.refresh(&stored_rt, &scopes).await;
                        (fresh.version, fresh.value, again)
                    }
                    None => (stored.version, grant, Err(e)),
                }
            }
            (response, _) => (stored.version, grant, response),
        };
        self.metrics().refresh(
            tenant,
            provider.value.kind.as_str(),
            match &response {
                Ok(_) => "ok",
                Err(e) => e.class.as_str(),
            },
            started.elapsed(),
        );
        match response {
            Ok(granted) if resource != TokenResource::MailProtocols => {
                self.record_resource_success(&m, version, grant, granted, resource, lease)
                    .await
            }
            Ok(granted) => {
                self.record_success(&m, version, grant, granted, lease)
                    .await
            }
            Err(e) => {
                let result = self.record_failure(&m, version, grant, e, lease).await;
                self.on_demand_fallback(trigger, result, &m, resource).await
            }
        }
    }

    /// The grant as stored now and its refresh token, when that is not the one just presented.
    async fn stored_if_rotated(
        &self,
        tenant: &str,
        mailbox: &str,
        presented: &Secret,
    ) -> Result<Option<(Versioned<GrantRecord>, Secret)>, TokenError> {
        let Some(fresh) = self.grant(tenant, mailbox).await? else {
            return Ok(None);
        };
        let Some(sealed) = fresh.value.refresh_token.as_ref() else {
            return Ok(None);
        };
        if !usable(fresh.value.state.status)
            && fresh.value.state.status != TokenStatus::ReauthRequired
        {
            return Ok(None);
        }
        let stored = open_field(
            &self.inner.state.keyring,
            tenant,
            mailbox,
            GrantField::RefreshToken,
            sealed,
        )
        .map_err(seal_error(&format!("{}#refresh_token", fresh.value.key())))?;
        Ok((stored.expose() != presented.expose()).then_some((fresh, stored)))
    }

    /// An on-demand request whose refresh failed transiently (or was held back) still gets the
    /// last good token while it has [`FALLBACK_FLOOR`] left.
    async fn on_demand_fallback(
        &self,
        trigger: Trigger,
        result: Result<IssuedToken, TokenError>,
        m: &Mailbox,
        resource: TokenResource,
    ) -> Result<IssuedToken, TokenError> {
        if matches!(trigger, Trigger::OnDemand(_))
            && let Err(TokenError::RefreshFailing { .. }) = &result
            && let Some(fresh) = self.grant(&m.tenant, &m.name).await?
            && remaining(&fresh.value, self.now(), resource) >= FALLBACK_FLOOR
            && let Some(token) = self.open_access(&fresh.value, &m.address, resource)?
        {
            return Ok(token);
        }
        result
    }

    /// The provider's breaker held the refresh back: the grant is `REFRESH_FAILING` with the
    /// provider's last transient error, and it is looked at again by the breaker (released when
    /// a probe gets an answer) or, should this replica stop, by the schedule at the backoff.
    async fn record_held(
        &self,
        m: &Mailbox,
        version: u64,
        mut grant: GrantRecord,
        held: &Held,
        lease: &Lease,
    ) -> Result<IssuedToken, TokenError> {
        let original = grant.clone();
        let (tenant, mailbox) = (m.tenant.as_str(), m.name.as_str());
        let now = self.now();
        let mut error = held.error.to_token_error(mailbox, now);
        error.reason = format!(
            "{}; calls to this provider are paused since {} until a probe (one every {} ms) gets an answer, then held mailboxes are refreshed at once",
            error.reason,
            held.since,
            self.inner.config.breaker.probe_interval.as_millis()
        );
        let effects = self.step(
            &mut grant,
            Event::Held {
                error: error.clone(),
                next_probe: held.next_probe,
            },
            now,
        );
        self.write(&original, &grant, version, lease).await?;
        self.run_effects(m, &grant, &effects, now, "").await?;
        tracing::debug!(
            tenant,
            mailbox,
            next_probe = %held.next_probe,
            "refresh held back: the provider's breaker is open"
        );
        Err(TokenError::RefreshFailing {
            mailbox: mailbox.to_owned(),
            error: Box::new(error),
            retry_at: Some(held.next_probe),
        })
    }

    async fn record_success(
        &self,
        m: &Mailbox,
        version: u64,
        mut grant: GrantRecord,
        granted: tokenfleet_providers::TokenGrant,
        lease: &Lease,
    ) -> Result<IssuedToken, TokenError> {
        let original = grant.clone();
        let keyring = &self.inner.state.keyring;
        let (tenant, mailbox) = (m.tenant.as_str(), m.name.as_str());
        let now = self.now();
        let record = grant.key().to_string();
        grant.access_token = Some(
            seal_field(
                keyring,
                tenant,
                mailbox,
                GrantField::AccessToken,
                &granted.access_token,
            )
            .map_err(seal_error(&record))?,
        );
        keep_refresh_token(keyring, m, &record, &mut grant, &granted, now)?;
        let expires = now + granted.expires_in;
        grant.clock_skew_secs = match granted.server_date {
            Some(date) => {
                let skew = (date - now).whole_seconds();
                if skew.unsigned_abs() > SKEW_REPORT_THRESHOLD.as_secs() {
                    tracing::warn!(
                        tenant,
                        mailbox,
                        skew_seconds = skew,
                        "the provider's clock differs from the broker's by more than 60 s; check NTP on the broker hosts"
                    );
                    skew
                } else {
                    0
                }
            }
            None => grant.clock_skew_secs,
        };
        if let Some(scope) = granted.scope.as_deref()
            && grant.scopes.is_empty()
        {
            grant.scopes = scope.split_whitespace().map(str::to_owned).collect();
        }
        // Be back when the refresh token enters the alert horizon, so the alert goes out in time.
        let expiry_check_at = match (self.alerts(), grant.refresh_token_expires) {
            (Some(alerts), Some(expiry)) => alerts.expiry_check_at(expiry, now),
            _ => None,
        };
        let effects = self.step(
            &mut grant,
            Event::Refreshed {
                lifetime: granted.expires_in,
                delegated: is_delegated(m.grant_type),
                expiry_check_at,
            },
            now,
        );
        // The rotated refresh token is stored (the store acknowledged the write) before anyone
        // gets the new access token.
        self.write(&original, &grant, version, lease).await?;
        self.run_effects(m, &grant, &effects, now, "").await?;
        tracing::info!(
            tenant,
            mailbox,
            rotated = granted.refresh_token.is_some(),
            expires = %expires,
            next_refresh = ?grant.next_refresh,
            "token refreshed"
        );
        Ok(IssuedToken {
            access_token: granted.access_token,
            expires,
            sasl_username: m.address.clone(),
        })
    }

    /// A token of `resource` (not the mail protocols) was minted: cache it under its resource and
    /// keep a rotated refresh token. The grant's refresh schedule (driven by the mail protocols'
    /// token) does not move.
    async fn record_resource_success(
        &self,
        m: &Mailbox,
        version: u64,
        mut grant: GrantRecord,
        granted: tokenfleet_providers::TokenGrant,
        resource: TokenResource,
        lease: &Lease,
    ) -> Result<IssuedToken, TokenError> {
        let original = grant.clone();
        let keyring = &self.inner.state.keyring;
        let (tenant, mailbox) = (m.tenant.as_str(), m.name.as_str());
        let now = self.now();
        let record = grant.key().to_string();
        let sealed = seal_field(
            keyring,
            tenant,
            mailbox,
            GrantRecord::access_field(resource),
            &granted.access_token,
        )
        .map_err(seal_error(&record))?;
        let expires = now + granted.expires_in;
        grant.resource_tokens.insert(
            resource.as_str().to_owned(),
            ResourceToken {
                access_token: sealed,
                expires,
                obtained: now,
            },
        );
        keep_refresh_token(keyring, m, &record, &mut grant, &granted, now)?;
        let effects = self.step(&mut grant, Event::ResourceMinted, now);
        self.write(&original, &grant, version, lease).await?;
        self.run_effects(m, &grant, &effects, now, "").await?;
        tracing::info!(
            tenant,
            mailbox,
            %resource,
            rotated = granted.refresh_token.is_some(),
            expires = %expires,
            "access token minted for another resource"
        );
        Ok(IssuedToken {
            access_token: granted.access_token,
            expires,
            sasl_username: m.address.clone(),
        })
    }

    async fn record_failure(
        &self,
        m: &Mailbox,
        version: u64,
        mut grant: GrantRecord,
        error: ProviderError,
        lease: &Lease,
    ) -> Result<IssuedToken, TokenError> {
        let original = grant.clone();
        let (tenant, mailbox) = (m.tenant.as_str(), m.name.as_str());
        let now = self.now();
        let token_error = error.to_token_error(mailbox, now);
        let effects = self.step(
            &mut grant,
            Event::Failed {
                failure: Failure::of(error.class),
                error: token_error.clone(),
                retry_after: error.retry_after,
            },
            now,
        );
        self.write(&original, &grant, version, lease).await?;
        self.run_effects(m, &grant, &effects, now, "").await?;
        if grant.state.status == TokenStatus::ReauthRequired {
            tracing::warn!(
                tenant,
                mailbox,
                code = %error.code,
                reason = %error.reason,
                "grant is dead: the mailbox needs a new consent"
            );
            return Err(TokenError::ReauthRequired {
                mailbox: mailbox.to_owned(),
                error: Box::new(token_error),
            });
        }
        tracing::warn!(
            tenant,
            mailbox,
            class = %error.class,
            code = %error.code,
            reason = %error.reason,
            failures = grant.consecutive_failures,
            retry_at = ?grant.next_refresh,
            "token refresh failed; retrying with backoff"
        );
        Err(TokenError::RefreshFailing {
            mailbox: mailbox.to_owned(),
            error: Box::new(token_error),
            retry_at: grant.next_refresh,
        })
    }

    /// Runs the state machine on `grant` (its [`Lifecycle`] part) and returns the effects to
    /// run once the result is written.
    fn step(&self, grant: &mut GrantRecord, event: Event, now: OffsetDateTime) -> Effects {
        let cx = machine::Context {
            now,
            unit: unit_random(),
            backoff: self.inner.config.backoff,
            max_refresh_interval: self.inner.config.max_refresh_interval,
        };
        let (next, effects) = machine::transition(&Lifecycle::of(grant), event, &cx);
        next.apply_to(grant);
        effects
    }

    /// Runs a transition's effects for the grant as written: the schedule entry (its errors are
    /// the caller's), alerts and audit (best effort, logged).
    async fn run_effects(
        &self,
        m: &Mailbox,
        grant: &GrantRecord,
        effects: &Effects,
        now: OffsetDateTime,
        audit_detail: &str,
    ) -> Result<(), TokenError> {
        let (tenant, mailbox) = (m.tenant.as_str(), m.name.as_str());
        let store = self.inner.state.store.as_ref();
        match effects.schedule {
            Schedule::At(at) => schedule_refresh(store, tenant, mailbox, at).await?,
            Schedule::Remove => unschedule_refresh(store, tenant, mailbox).await?,
            Schedule::Keep => {}
        }
        if let Some(alerts) = self.alerts() {
            match (effects.alert, grant.state.last_error.as_ref()) {
                (Alert::RaiseReauth, Some(error)) => {
                    let event = crate::alerts::AlertEvent::reauth_required(
                        tenant, mailbox, &m.address, error, now,
                    );
                    if let Err(error) = alerts
                        .raise(event, &crate::alerts::grant_problem(grant))
                        .await
                    {
                        tracing::warn!(%error, tenant, mailbox, "raising the alert failed");
                    }
                }
                (Alert::ResolveReauth, _) => {
                    if let Err(error) = alerts
                        .resolve(tenant, mailbox, crate::alerts::AlertKind::ReauthRequired)
                        .await
                    {
                        tracing::warn!(%error, tenant, mailbox, "clearing the mailbox's alert failed");
                    }
                }
                _ => {}
            }
            if effects.check_expiry
                && let Some(expiry) = grant.refresh_token_expires
                && let Err(error) = alerts
                    .check_expiry(tenant, mailbox, &m.address, expiry, now)
                    .await
            {
                tracing::warn!(%error, tenant, mailbox, "raising the expiry alert failed");
            }
        }
        if let Some(action) = effects.audit {
            let event = tokenfleet_domain::AuditEvent {
                time: now,
                actor: SCHEDULER_ACTOR.to_owned(),
                action: action.to_owned(),
                target: crate::ops::names::object_path(tenant, "mailboxes", mailbox),
                tenant: tenant.to_owned(),
                result: "ok".to_owned(),
                detail: audit_detail.to_owned(),
            };
            crate::audit::record(
                &self.inner.state,
                &tokenfleet_store::Scope::Tenant(tenant.to_owned()),
                event,
            )
            .await;
        }
        Ok(())
    }

    /// Writes `updated`, the refresh's outcome for the grant `original` read at `version` under
    /// `lease` (compare-and-set; the record carries the lease's fence).
    ///
    /// Someone not holding the lease may have written meanwhile (a consent starting or
    /// completing). If the stored credentials are still the ones this refresh started from, the
    /// refresh's fields are applied on top of the newer record (a rotated refresh token must not
    /// be lost), keeping its status when that is not a refreshable one (e.g. a consent in
    /// progress). If the credentials were replaced or wiped, the newer record wins and this
    /// outcome is dropped.
    async fn write(
        &self,
        original: &GrantRecord,
        updated: &GrantRecord,
        version: u64,
        lease: &Lease,
    ) -> Result<u64, TokenError> {
        let mut target = updated.clone();
        target.fence = lease.fence;
        let mut version = version;
        let changed = || {
            tracing::info!(
                tenant = %updated.tenant,
                mailbox = %updated.mailbox,
                "the grant was replaced during the refresh; keeping the newer record"
            );
            TokenError::Changed {
                mailbox: updated.mailbox.clone(),
            }
        };
        // A store that is failing over (Sentinel promotion, Cluster slot migration) answers
        // `Unavailable` for a few seconds. The provider may already have rotated the refresh
        // token this record carries, and this process holds the only copy: the write is retried
        // for up to `lease_wait` (the lease is renewed meanwhile) before the caller gets
        // UNAVAILABLE.
        let transient_until = std::time::Instant::now() + self.inner.config.lease_wait;
        let mut pause = Duration::from_millis(100);
        let mut conflicts = 0;
        while conflicts < CAS_ATTEMPTS {
            let outcome = match self
                .records()
                .put(&target, Precondition::Version(version))
                .await
            {
                Ok(v) => return Ok(v),
                Err(StoreError::Conflict { .. } | StoreError::NotFound(_)) => {
                    conflicts += 1;
                    self.grant(&updated.tenant, &updated.mailbox).await
                }
                Err(e) => Err(e.into()),
            };
            let fresh = match outcome {
                Ok(fresh) => fresh,
                Err(TokenError::Store(reason))
                    if matches!(*reason, StoreError::Unavailable(_))
                        && std::time::Instant::now() < transient_until =>
                {
                    tracing::warn!(
                        tenant = %updated.tenant,
                        mailbox = %updated.mailbox,
                        %reason,
                        "store unavailable while writing a refreshed grant; retrying"
                    );
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                    continue;
                }
                Err(e) => return Err(e),
            };
            let Some(fresh) = fresh else {
                return Err(changed());
            };
            let mut merged = fresh.value;
            if merged.refresh_token == updated.refresh_token
                && merged.access_token == updated.access_token
                && merged.fence == lease.fence
            {
                // An earlier attempt of this write landed (its acknowledgement was lost, or the
                // replicas had not confirmed it): write it again, to be acknowledged.
                target = merged;
                version = fresh.version;
                continue;
            }
            if merged.refresh_token != original.refresh_token
                || merged.access_token != original.access_token
                || merged.fence > lease.fence
            {
                return Err(changed());
            }
            merged.refresh_token.clone_from(&updated.refresh_token);
            merged.access_token.clone_from(&updated.access_token);
            merged.refresh_token_obtained = updated.refresh_token_obtained;
            merged.refresh_token_expires = updated.refresh_token_expires;
            merged.scopes.clone_from(&updated.scopes);
            merged.resource_tokens.clone_from(&updated.resource_tokens);
            merged.consecutive_failures = updated.consecutive_failures;
            merged.retry_not_before = updated.retry_not_before;
            merged.next_refresh = updated.next_refresh;
            merged.clock_skew_secs = updated.clock_skew_secs;
            merged.state.last_refresh = updated.state.last_refresh;
            merged.state.access_token_expires = updated.state.access_token_expires;
            if usable(merged.state.status) {
                merged.state.status = updated.state.status;
                merged
                    .state
                    .last_error
                    .clone_from(&updated.state.last_error);
            }
            merged.fence = lease.fence;
            target = merged;
            version = fresh.version;
        }
        Err(changed())
    }

    /// Notes that an agent was just handed a token of this mailbox (`last_issued`, at most one
    /// write per [`LAST_ISSUED_GRANULARITY`]). Best effort: a lost race is retried by the next
    /// issuance.
    pub async fn record_issued(&self, tenant: &str, mailbox: &str) -> Result<(), TokenError> {
        self.record_issued_via(None, tenant, mailbox).await
    }

    /// [`Self::record_issued`] looking at the grant as `snapshot` read it (when it did): a
    /// write is due at most once per [`LAST_ISSUED_GRANULARITY`], and then the compare-and-set
    /// write itself tells whether the grant changed since.
    pub async fn record_issued_via(
        &self,
        snapshot: Option<&Snapshot>,
        tenant: &str,
        mailbox: &str,
    ) -> Result<(), TokenError> {
        let now = self.now();
        let key = grant_key(tenant, mailbox);
        let Some(stored) = self
            .records()
            .get_via::<GrantRecord>(snapshot, &key)
            .await?
        else {
            return Ok(());
        };
        if stored
            .value
            .last_issued
            .is_some_and(|t| now - t < LAST_ISSUED_GRANULARITY)
        {
            return Ok(());
        }
        if !crate::records::claim_periodic_write(
            self.inner.state.store.as_ref(),
            &key,
            stored.version,
            now,
            LAST_ISSUED_GRANULARITY,
        ) {
            return Ok(());
        }
        let mut updated = stored.value;
        updated.last_issued = Some(now);
        match self
            .records()
            .put(&updated, Precondition::Version(stored.version))
            .await
        {
            Ok(_) | Err(StoreError::Conflict { .. } | StoreError::NotFound(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes (revokes and wipes, like [`Self::delete_token`]) the grant of a `user` mailbox idle
    /// beyond `user_token_idle` (see [`idle_beyond`]), audited; `true` when it did.
    pub async fn delete_if_idle(&self, tenant: &str, mailbox: &str) -> Result<bool, TokenError> {
        let Some(idle) = self.inner.config.user_token_idle else {
            return Ok(false);
        };
        let m = match self.mailbox(None, tenant, mailbox).await {
            Ok(m) => m,
            Err(TokenError::MailboxNotFound { .. }) => return Ok(false),
            Err(e) => return Err(e),
        };
        if m.kind != MailboxKind::User {
            return Ok(false);
        }
        let Some(stored) = self.grant(tenant, mailbox).await? else {
            return Ok(false);
        };
        if !idle_beyond(m.kind, &stored.value, Some(idle), self.now()) {
            return Ok(false);
        }
        let days = idle.as_secs() / 86_400;
        let reason = format!("deleted after {days} idle days");
        let revocation = self
            .delete_token_noting(tenant, mailbox, Some(&reason))
            .await?;
        // Audited (`token.idle_delete`) as the state machine's effect of the idle deletion.
        tracing::info!(tenant, mailbox, idle_days = days, outcome = %revocation, "idle user token deleted");
        Ok(true)
    }

    /// Revokes the grant at the provider where possible, then wipes every stored secret (status
    /// `NOT_RETRIEVED`) and takes the mailbox off the refresh schedule. A failed revocation is
    /// reported (in the result and the grant's `last_error`), but the wipe happens anyway.
    pub async fn delete_token(
        &self,
        tenant: &str,
        mailbox: &str,
    ) -> Result<Revocation, TokenError> {
        self.delete_token_noting(tenant, mailbox, None).await
    }

    /// [`Self::delete_token`], leaving `note` (why) as the wiped grant's `last_error` reason
    /// unless the revocation failed.
    async fn delete_token_noting(
        &self,
        tenant: &str,
        mailbox: &str,
        note: Option<&str>,
    ) -> Result<Revocation, TokenError> {
        Self::check_names(tenant, mailbox)?;
        let m = self.mailbox(None, tenant, mailbox).await?;
        let store = self.inner.state.store.as_ref();
        let name = lease_name(tenant, mailbox);
        let owner = format!(
            "{}:delete:{}",
            self.inner.config.replica_id,
            uuid::Uuid::new_v4().simple()
        );
        let deadline = tokio::time::Instant::now() + self.inner.config.wait_timeout();
        let mut pause = WAIT_PAUSE.0;
        let lease = loop {
            if let Some(lease) = store
                .try_lease(&name, &owner, self.inner.config.lease_ttl)
                .await?
            {
                break lease;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(TokenError::Busy {
                    mailbox: mailbox.to_owned(),
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(WAIT_PAUSE.1);
        };
        let keeper = self.keep(&lease);
        let result = self.delete_under_lease(&m, &lease, note).await;
        drop(keeper);
        if let Err(error) = store.release_lease(&name, &owner).await {
            tracing::warn!(%error, tenant, mailbox, "releasing the lease failed; it expires on its own");
        }
        result
    }

    async fn delete_under_lease(
        &self,
        m: &Mailbox,
        lease: &Lease,
        note: Option<&str>,
    ) -> Result<Revocation, TokenError> {
        let (tenant, mailbox) = (m.tenant.as_str(), m.name.as_str());
        let keyring = &self.inner.state.keyring;
        let stored = self.grant(tenant, mailbox).await?;
        let store = self.inner.state.store.as_ref();
        let Some(stored) = stored else {
            unschedule_refresh(store, tenant, mailbox).await?;
            return Ok(Revocation::NothingStored);
        };
        let grant = &stored.value;
        // The refresh token stands for the whole grant; without one, the access token.
        let to_revoke = match (&grant.refresh_token, &grant.access_token) {
            (Some(rt), _) => Some((GrantField::RefreshToken, rt)),
            (None, Some(at)) => Some((GrantField::AccessToken, at)),
            (None, None) => None,
        };
        let revocation = match to_revoke {
            None => Revocation::NothingStored,
            Some((field, sealed)) => match self.provider_of(m).await {
                Err(e) => Revocation::Failed {
                    code: "provider_unavailable".to_owned(),
                    reason: e.to_string(),
                },
                Ok((_, client)) if client.settings().endpoints.revoke.is_none() => {
                    // Without a revocation URL the client answers at once, without a request
                    // and without looking at the token, with what to do instead.
                    let unsupported = client
                        .revoke(&Secret::new(String::new()))
                        .await
                        .err()
                        .map(|e| e.fix)
                        .unwrap_or_default();
                    Revocation::Unsupported { fix: unsupported }
                }
                Ok((_, client)) => {
                    let token = open_field(keyring, tenant, mailbox, field, sealed)
                        .map_err(seal_error(&grant.key().to_string()))?;
                    match client.revoke(&token).await {
                        Ok(()) => Revocation::Revoked,
                        Err(e) => Revocation::Failed {
                            code: e.code.clone(),
                            reason: e.reason.clone(),
                        },
                    }
                }
            },
        };
        let now = self.now();
        let noted = note.map(|n| format!("{n}; ")).unwrap_or_default();
        let mut left = None;
        if let Revocation::Failed { code, reason } = &revocation {
            left = Some(tokenfleet_domain::TokenError {
                code: code.clone(),
                reason: format!(
                    "{noted}the stored tokens were wiped, but revoking the grant at the provider failed: {reason}"
                ),
                fix: "revoke the app's access in the provider's console (Google: myaccount.google.com → Security → Third-party access; admin console → Security → API controls)".to_owned(),
                time: now,
            });
        } else if let Some(note) = note {
            left = Some(tokenfleet_domain::TokenError {
                code: "idle_deleted".to_owned(),
                reason: note.to_owned(),
                fix: format!(
                    "the next sign-in at a device asks the person to consent again (`tokenfleetctl mailbox consent --tenant {tenant} --name {mailbox}`)"
                ),
                time: now,
            });
        }
        // The secrets are wiped here; the state machine decides the rest (NOT_RETRIEVED, off
        // the schedule, audited when it was an idle deletion).
        let mut wiped = grant.clone();
        let event = match (note, left) {
            (Some(_), Some(note)) => Event::IdleDeleted { note },
            (_, note) => Event::Deleted { note },
        };
        let effects = self.step(&mut wiped, event, now);
        let lifecycle = Lifecycle::of(&wiped);
        wiped = GrantRecord::empty(tenant, mailbox);
        lifecycle.apply_to(&mut wiped);
        wiped.fence = lease.fence;
        // Under the lease nobody else refreshes; a consent finishing right now loses to the
        // explicit delete, which is what the operator asked for.
        self.records().put(&wiped, Precondition::Any).await?;
        let detail = note.map_or_else(String::new, |reason| {
            format!("{reason} (user_token_idle_days); revocation: {revocation}")
        });
        self.run_effects(m, &wiped, &effects, now, &detail).await?;
        tracing::info!(tenant, mailbox, outcome = %revocation, "token deleted");
        Ok(revocation)
    }
}

pub use super::machine::IDLE_DELETE_ACTION;

/// Actor of the scheduler's own actions in the audit log.
pub const SCHEDULER_ACTOR: &str = "broker:refresh-scheduler";

/// Whether the grant of a mailbox of `kind` has been idle longer than `idle` at `now`, so the
/// scheduler deletes it instead of refreshing: only `user` mailboxes, only grants holding tokens,
/// idle since the last issuance (or, never issued, since the refresh token was obtained).
/// `idle` = `None` never deletes.
pub fn idle_beyond(
    kind: MailboxKind,
    grant: &GrantRecord,
    idle: Option<Duration>,
    now: OffsetDateTime,
) -> bool {
    let Some(idle) = idle else {
        return false;
    };
    if kind != MailboxKind::User || (grant.refresh_token.is_none() && grant.access_token.is_none())
    {
        return false;
    }
    let Some(since) = grant.last_issued.or(grant.refresh_token_obtained) else {
        return false;
    };
    let elapsed = now - since;
    elapsed.is_positive() && elapsed.unsigned_abs() > idle
}

/// Removes a mailbox's grant record and schedule entry (no revocation): for a mailbox that was
/// deleted, or whose address, provider or grant type changed so the grant no longer fits.
pub async fn discard_grant(
    state: &BrokerState,
    tenant: &str,
    mailbox: &str,
) -> Result<(), StoreError> {
    state
        .store
        .delete(&grant_key(tenant, mailbox), Precondition::Any)
        .await?;
    unschedule_refresh(state.store.as_ref(), tenant, mailbox).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant_with(
        status: TokenStatus,
        from: Option<OffsetDateTime>,
        to: Option<OffsetDateTime>,
    ) -> GrantRecord {
        let mut g = GrantRecord::empty("acme", "scan");
        g.state.status = status;
        g.state.last_refresh = from;
        g.state.access_token_expires = to;
        g
    }

    #[test]
    fn only_user_grants_idle_beyond_the_limit_are_deleted() {
        let t0 = OffsetDateTime::UNIX_EPOCH + time::Duration::days(20_000);
        let day = Duration::from_secs(86_400);
        let limit = Some(30 * day);
        let mut g = GrantRecord::empty("acme", "user-alice");
        g.refresh_token = Some(tokenfleet_seal::Sealed {
            kid: "k1".into(),
            nonce: String::new(),
            ct: String::new(),
        });
        g.refresh_token_obtained = Some(t0);
        let after = |days: i64| t0 + time::Duration::days(days);
        // Never issued: idle since the consent.
        assert!(!idle_beyond(MailboxKind::User, &g, limit, after(30)));
        assert!(idle_beyond(MailboxKind::User, &g, limit, after(31)));
        // An issuance restarts the count.
        g.last_issued = Some(after(20));
        assert!(!idle_beyond(MailboxKind::User, &g, limit, after(31)));
        assert!(!idle_beyond(MailboxKind::User, &g, limit, after(50)));
        assert!(idle_beyond(MailboxKind::User, &g, limit, after(51)));
        // Other kinds, no limit, nothing stored: never.
        assert!(!idle_beyond(MailboxKind::Admin, &g, limit, after(400)));
        assert!(!idle_beyond(MailboxKind::Bulk, &g, limit, after(400)));
        assert!(!idle_beyond(MailboxKind::User, &g, None, after(400)));
        let empty = GrantRecord::empty("acme", "user-bob");
        assert!(!idle_beyond(MailboxKind::User, &empty, limit, after(400)));
        // A clock that went backwards is not idle.
        assert!(!idle_beyond(MailboxKind::User, &g, limit, after(-100)));
    }

    #[test]
    fn needed_validity_is_capped_by_half_the_lifetime() {
        let t = OffsetDateTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let g = grant_with(
            TokenStatus::Active,
            Some(t),
            Some(t + Duration::from_secs(240)),
        );
        assert_eq!(
            needed(&g, Duration::from_secs(300), TokenResource::MailProtocols),
            Duration::from_secs(120)
        );
        let g = grant_with(
            TokenStatus::Active,
            Some(t),
            Some(t + Duration::from_secs(3600)),
        );
        assert_eq!(
            needed(&g, Duration::from_secs(300), TokenResource::MailProtocols),
            Duration::from_secs(300)
        );
        assert_eq!(
            needed(&g, Duration::from_secs(7200), TokenResource::MailProtocols),
            Duration::from_secs(1800)
        );
    }

    #[test]
    fn remaining_needs_a_token() {
        let t = OffsetDateTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let g = grant_with(
            TokenStatus::Active,
            Some(t),
            Some(t + Duration::from_secs(60)),
        );
        assert_eq!(
            remaining(&g, t, TokenResource::MailProtocols),
            Duration::ZERO,
            "no access token stored"
        );
        assert_eq!(
            remaining(&g, t, TokenResource::MicrosoftGraph),
            Duration::ZERO,
            "no Graph token stored"
        );
    }

    #[test]
    fn config_checks_name_the_field() {
        let mut c = TokenConfig::default();
        c.check().unwrap();
        // The lease no longer has to outlast a provider call: it is renewed while held.
        c.lease_ttl = Duration::from_secs(2);
        c.provider_timeout = Duration::from_secs(30);
        c.check().unwrap();
        c.lease_ttl = Duration::from_secs(1);
        assert_eq!(c.check().unwrap_err().field, "tokens.lease_ttl_seconds");
        c.lease_ttl = Duration::from_secs(301);
        assert_eq!(c.check().unwrap_err().field, "tokens.lease_ttl_seconds");
        c.lease_ttl = Duration::from_secs(5);
        c.lease_wait = Duration::ZERO;
        assert_eq!(c.check().unwrap_err().field, "tokens.lease_wait_seconds");
        c.lease_wait = Duration::from_secs(10);
        assert_eq!(c.wait_timeout(), Duration::from_secs(10));
        assert!(c.lease_renew_every() * 3 <= c.lease_ttl);
    }
}
