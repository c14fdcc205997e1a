//! Consent flows: how a mailbox's grant is obtained in the first place.
//!
//! - Device code (RFC 8628, Microsoft and generic providers): [`start`] asks the provider for a
//!   user code, seals the device code into the grant record ([`PendingConsent::DeviceCode`]) and
//!   puts the mailbox on the `consent-poll` schedule; [`crate::tokens::device_poller`] polls the
//!   token endpoint from whichever replica picks it up.
//! - Authorization code + PKCE (Microsoft, Google, generic): [`start`] builds the authorization
//!   URL with a random `state` and keeps the sealed PKCE verifier ([`PendingConsent::AuthCode`])
//!   plus an index record `consent-state/<state>` (global scope) so the browser redirect to
//!   `/oauth/callback` finds its mailbox (the broker's HTTP edge answers it); [`complete`] takes a pasted code or
//!   the whole redirect URL.
//! - App-only (client credentials) and Google service accounts (JWT bearer): [`start`] obtains a
//!   token at once; nobody has to sign in.
//!
//! Delegated consents also ask for the OpenID Connect scopes, and the ID token that comes back
//! must name the mailbox's address (or its `consent_account`): a sign-in with another account
//! ends the consent with `account_mismatch` and stores nothing of it
//! ([`ConsentTarget::check_signed_in_account`]).
//!
//! Every success stores the sealed tokens, sets the mailbox ACTIVE and puts it on the `refresh`
//! schedule at ~75 % of the access token's lifetime, where the refresh lifecycle takes over.
//! Tokens, device codes and verifiers never appear in logs, errors or audit details.

use std::fmt::Write as _;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokenfleet_domain::{AuditEvent, GrantType, Mailbox, Provider, TokenError};
use tokenfleet_providers::{
    ErrorClass, ProviderClient, ProviderError, ProviderSettings, TokenGrant, identity_scopes,
    new_state, parse_pasted_code, signed_in_account,
};
use tokenfleet_seal::SealError;
use tokenfleet_store::{Precondition, RecordKey, Scope, StoreError};

use crate::records::{
    CAS_ATTEMPTS, Records, Versioned, mailbox_key, open_client_secret, open_service_account_key,
    provider_key,
};
use crate::state::BrokerState;
use crate::tokens::grant::{
    GrantField, GrantRecord, PendingConsent, grant_key, open_field, seal_field,
};
use crate::tokens::machine;

/// Store schedule of device-code polls (member `<tenant>/<mailbox>`).
pub const CONSENT_POLL_SCHEDULE: &str = "consent-poll";
pub use crate::tokens::scheduler::{REFRESH_SCHEDULE, parse_member, unix_ms};
/// Collection (global scope) of [`ConsentStateIndex`] records, id = the OAuth `state`.
pub const CONSENT_STATES: &str = "consent-state";
/// Path of the browser redirect target on the broker's HTTP listener.
pub const CALLBACK_PATH: &str = "/oauth/callback";
/// How long an authorization-code consent waits for the browser step.
pub const AUTH_CODE_LIFETIME: Duration = Duration::from_secs(15 * 60);
/// Shortest polling interval, whatever the provider says.
pub const MIN_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// The first refresh of a delegated grant happens at least this soon (inactivity expiry of
/// refresh tokens).
pub const MAX_FIRST_REFRESH: Duration = Duration::from_secs(24 * 3600);
/// Audit actor of consent steps the broker takes by itself.
pub const POLLER_ACTOR: &str = "broker:consent-poller";
/// Audit actor of consents completed through the browser redirect.
pub const CALLBACK_ACTOR: &str = "browser:oauth-callback";

/// Schedule member of a mailbox: `<tenant>/<mailbox>` (names never contain `/`).
pub fn schedule_member(tenant: &str, mailbox: &str) -> String {
    crate::tokens::scheduler::member(tenant, mailbox)
}

/// Where the browser redirect of an auth-code consent belongs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsentStateIndex {
    pub tenant: String,
    pub mailbox: String,
    #[serde(with = "time::serde::rfc3339")]
    pub expires: OffsetDateTime,
}

fn consent_state_key(state: &str) -> RecordKey {
    RecordKey::global(CONSENT_STATES, state)
}

/// Why a consent step failed. Messages name the mailbox and say what to do; they never hold
/// secrets.
#[derive(Debug, thiserror::Error)]
pub enum ConsentError {
    /// The mailbox (or the pending consent looked up by `state`) does not exist.
    #[error("{0}")]
    NotFound(String),
    /// What the caller sent is wrong (pasted code, state mismatch, redirect URI).
    #[error("{0}")]
    InvalidArgument(String),
    /// The mailbox, its provider or the provider's answer does not allow the step.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The provider could not be reached or had a temporary problem; retrying may succeed.
    #[error("{0}")]
    Unavailable(String),
    /// Someone else changed the grant meanwhile.
    #[error("{0}")]
    Conflict(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Sealing or opening a secret failed.
    #[error("sealing a secret of {record}: {source}")]
    Seal {
        /// Which record (never the secret).
        record: String,
        /// What failed.
        source: SealError,
    },
}

impl ConsentError {
    fn seal(record: impl Into<String>) -> impl FnOnce(SealError) -> Self {
        let record = record.into();
        move |source| Self::Seal { record, source }
    }
}

/// The one mapping of consent errors to the operations' error.
impl From<&ConsentError> for crate::ops::Error {
    fn from(err: &ConsentError) -> Self {
        match err {
            ConsentError::NotFound(m) => Self::NotFound(m.clone()),
            ConsentError::InvalidArgument(m) => Self::InvalidArgument(m.clone()),
            ConsentError::FailedPrecondition(m) => Self::FailedPrecondition(m.clone()),
            ConsentError::Unavailable(m) => Self::Unavailable {
                message: m.clone(),
                retry_after: None,
                detail: String::new(),
            },
            ConsentError::Conflict(m) => Self::Aborted(m.clone()),
            ConsentError::Store(e) => e.into(),
            ConsentError::Seal { record, source } => Self::seal(source, record),
        }
    }
}

impl From<ConsentError> for crate::ops::Error {
    fn from(err: ConsentError) -> Self {
        Self::from(&err)
    }
}

/// A provider error as one line for an operator: reason, what the provider said, code, fix.
pub fn describe_provider_error(e: &ProviderError, mailbox: &str) -> String {
    let mut text = e.reason.clone();
    if let Some(message) = e.provider_message() {
        let _ = write!(text, " (provider said: {message})");
    }
    let _ = write!(text, " [{}]. Fix: {}", e.code, e.fix_for(mailbox));
    text
}

/// Maps a failed provider call to a consent error by its class.
fn provider_failure(e: &ProviderError, mailbox: &str) -> ConsentError {
    let text = describe_provider_error(e, mailbox);
    match e.class {
        ErrorClass::Transient => ConsentError::Unavailable(text),
        ErrorClass::InvalidRequest if e.code == "invalid_redirect_uri" => {
            ConsentError::InvalidArgument(format!("redirect_uri: {text}"))
        }
        _ => ConsentError::FailedPrecondition(text),
    }
}

// ---------------------------------------------------------------------------------------------
// Grant record I/O

/// A grant record as read, with its store version (`None` = not stored yet).
#[derive(Debug, Clone)]
pub struct StoredGrant {
    /// Store version; `None` when the mailbox has no grant record yet.
    pub version: Option<u64>,
    /// The record (an empty one when none is stored).
    pub grant: GrantRecord,
}

/// Reads a mailbox's grant record (an empty one when there is none).
pub async fn load_grant(
    state: &BrokerState,
    tenant: &str,
    mailbox: &str,
) -> Result<StoredGrant, StoreError> {
    let key = grant_key(tenant, mailbox);
    let Some(record) = state.store.get(&key).await? else {
        return Ok(StoredGrant {
            version: None,
            grant: GrantRecord::empty(tenant, mailbox),
        });
    };
    let grant: GrantRecord =
        serde_json::from_slice(&record.data).map_err(|e| StoreError::Corrupt {
            key: key.to_string(),
            // serde_json names the position and the expected type, never the data.
            problem: format!("not a valid grant record: {e}"),
        })?;
    if grant.tenant != tenant || grant.mailbox != mailbox {
        return Err(StoreError::Corrupt {
            key: key.to_string(),
            problem: format!(
                "record content belongs to mailbox `{}` of tenant `{}`",
                grant.mailbox, grant.tenant
            ),
        });
    }
    Ok(StoredGrant {
        version: Some(record.version),
        grant,
    })
}

/// Writes a grant record if it is still at `version` (`None`: if there is none yet).
pub async fn save_grant(
    state: &BrokerState,
    version: Option<u64>,
    grant: &GrantRecord,
) -> Result<u64, StoreError> {
    let key = grant.key();
    let data = serde_json::to_vec(grant).map_err(|e| StoreError::Corrupt {
        key: key.to_string(),
        problem: format!("cannot encode grant record: {e}"),
    })?;
    let pre = match version {
        Some(v) => Precondition::Version(v),
        None => Precondition::Absent,
    };
    state.store.put(&key, data, pre).await
}

/// Whether a failed write only lost a race (re-read and try again).
pub fn lost_race(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::Conflict { .. } | StoreError::AlreadyExists(_) | StoreError::NotFound(_)
    )
}

/// Read-modify-write of a grant record with compare-and-set; `change` runs on every attempt.
async fn update_grant<T>(
    state: &BrokerState,
    tenant: &str,
    mailbox: &str,
    mut change: impl FnMut(&mut GrantRecord) -> Result<T, ConsentError>,
) -> Result<(GrantRecord, T), ConsentError> {
    for _ in 0..CAS_ATTEMPTS {
        let stored = load_grant(state, tenant, mailbox).await?;
        let mut grant = stored.grant;
        let out = change(&mut grant)?;
        match save_grant(state, stored.version, &grant).await {
            Ok(_) => return Ok((grant, out)),
            Err(e) if lost_race(&e) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ConsentError::Conflict(format!(
        "the grant of mailbox `{mailbox}` in tenant `{tenant}` was changed concurrently; retry"
    )))
}

// ---------------------------------------------------------------------------------------------
// Schedules

/// Puts the mailbox on the device-code poll schedule at `at`.
pub async fn schedule_poll(
    state: &BrokerState,
    tenant: &str,
    mailbox: &str,
    at: OffsetDateTime,
) -> Result<(), StoreError> {
    state
        .store
        .schedule(
            CONSENT_POLL_SCHEDULE,
            &schedule_member(tenant, mailbox),
            unix_ms(at),
        )
        .await
}

/// Takes the mailbox off the device-code poll schedule.
pub async fn unschedule_poll(
    state: &BrokerState,
    tenant: &str,
    mailbox: &str,
) -> Result<(), StoreError> {
    state
        .store
        .unschedule(CONSENT_POLL_SCHEDULE, &schedule_member(tenant, mailbox))
        .await
}

/// Hands a freshly activated grant to the refresh lifecycle and ends any device-code polling.
pub async fn hand_over(state: &BrokerState, grant: &GrantRecord) -> Result<(), StoreError> {
    if let Some(at) = grant.next_refresh {
        crate::tokens::scheduler::schedule_refresh(
            state.store.as_ref(),
            &grant.tenant,
            &grant.mailbox,
            at,
        )
        .await?;
    }
    unschedule_poll(state, &grant.tenant, &grant.mailbox).await
}

// ---------------------------------------------------------------------------------------------
// Grant transitions (pure: no I/O)

/// Stores a granted token: sealed tokens, ACTIVE, no pending consent, first refresh at ~75 % of
/// the access token's lifetime (65–85 %, spread at random; for delegated grants at most a day
/// away, see [`crate::tokens::scheduler::next_refresh_at`]). The grant record's tokens are
/// replaced wholesale: a new consent starts a new grant.
pub fn activate(
    state: &BrokerState,
    grant: &mut GrantRecord,
    token: &TokenGrant,
    scopes: &[String],
    now: OffsetDateTime,
) -> Result<(), ConsentError> {
    let (tenant, mailbox) = (grant.tenant.clone(), grant.mailbox.clone());
    let record = format!("grant of mailbox `{mailbox}` in tenant `{tenant}`");
    let access = seal_field(
        &state.keyring,
        &tenant,
        &mailbox,
        GrantField::AccessToken,
        &token.access_token,
    )
    .map_err(ConsentError::seal(record.clone()))?;
    let refresh = token
        .refresh_token
        .as_ref()
        .map(|r| {
            seal_field(
                &state.keyring,
                &tenant,
                &mailbox,
                GrantField::RefreshToken,
                r,
            )
        })
        .transpose()
        .map_err(ConsentError::seal(record))?;
    let lifetime = token.expires_in;
    let delegated = refresh.is_some();
    grant.refresh_token_obtained = refresh.as_ref().map(|_| now);
    // Google apps in "Testing" publishing status: 7-day refresh tokens (alerted before expiry).
    grant.refresh_token_expires = refresh
        .as_ref()
        .and(token.refresh_token_expires_in)
        .map(|d| now + d);
    grant.refresh_token = refresh;
    grant.access_token = Some(access);
    // Tokens of other resources came from the replaced grant (maybe another account).
    grant.resource_tokens.clear();
    grant.scopes = token
        .scope
        .as_deref()
        .map(|s| s.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| scopes.to_vec());
    // Status, times and the first refresh: the state machine's (`hand_over` schedules it).
    step(
        grant,
        machine::Event::ConsentCompleted {
            lifetime,
            delegated,
            first_refresh_within: MAX_FIRST_REFRESH,
        },
        now,
    );
    grant.clock_skew_secs = token
        .server_date
        .map(|d| (d - now).whole_seconds())
        .unwrap_or(0);
    grant.pending = None;
    Ok(())
}

/// Ends a pending consent without a grant: NOT_RETRIEVED, or REAUTH_REQUIRED when an earlier
/// grant exists (it is not usable on its own any more once someone set out to replace it).
pub fn fail_consent(grant: &mut GrantRecord, error: TokenError) {
    grant.pending = None;
    let had_grant = grant.refresh_token.is_some() || grant.access_token.is_some();
    // The failure's own time is the clock reading of this transition.
    let now = error.time;
    step(
        grant,
        machine::Event::ConsentFailed { error, had_grant },
        now,
    );
}

/// Sets a new pending consent; returns the one it replaces.
fn begin_pending(
    grant: &mut GrantRecord,
    pending: PendingConsent,
    now: OffsetDateTime,
) -> Option<PendingConsent> {
    let previous = grant.pending.replace(pending);
    step(grant, machine::Event::ConsentStarted, now);
    previous
}

/// Runs the token state machine on a grant for a consent event. Consent transitions schedule
/// and alert through their own callers (`hand_over`, the device poller), so the effects are
/// not needed here.
fn step(grant: &mut GrantRecord, event: machine::Event, now: OffsetDateTime) {
    let cx = machine::Context {
        now,
        unit: crate::tokens::backoff::unit_random(),
        backoff: crate::tokens::backoff::Backoff::default(),
        max_refresh_interval: MAX_FIRST_REFRESH,
    };
    let (next, _effects) = machine::transition(&machine::Lifecycle::of(grant), event, &cx);
    next.apply_to(grant);
}

// ---------------------------------------------------------------------------------------------
// The mailbox, its provider and a client for it

/// A mailbox with its provider and an OAuth client for the provider.
#[derive(Debug)]
pub struct ConsentTarget {
    /// The mailbox record and its version.
    pub mailbox: Versioned<Mailbox>,
    /// Its provider.
    pub provider: Provider,
    /// OAuth client of the provider (using the broker's clock).
    pub client: ProviderClient,
}

/// Reads the mailbox and its provider and builds the provider's client.
pub async fn load_target(
    state: &BrokerState,
    tenant: &str,
    name: &str,
) -> Result<ConsentTarget, ConsentError> {
    let records = Records::new(state.store.as_ref());
    let mailbox = records
        .get::<Mailbox>(&mailbox_key(tenant, name))
        .await?
        .ok_or_else(|| {
            ConsentError::NotFound(format!("mailbox `{name}` in tenant `{tenant}` not found"))
        })?;
    let provider_name = mailbox.value.provider.clone();
    let provider = records
        .get::<Provider>(&provider_key(tenant, &provider_name))
        .await?
        .ok_or_else(|| {
            ConsentError::FailedPrecondition(format!(
                "mailbox `{name}` uses provider `{provider_name}`, which does not exist in tenant `{tenant}`; create it or change the mailbox's provider"
            ))
        })?
        .value;
    let secret = open_client_secret(&state.keyring, &provider).map_err(ConsentError::seal(
        format!("provider `{provider_name}` in tenant `{tenant}`"),
    ))?;
    let bad_provider = |e: tokenfleet_domain::ValidationError| {
        ConsentError::FailedPrecondition(format!(
            "provider `{provider_name}` cannot be used: {e}; fix it with `tokenfleetctl provider update`"
        ))
    };
    let proxy_password = crate::records::open_http_proxy_password(&state.keyring, &provider)
        .map_err(ConsentError::seal(format!(
            "provider `{provider_name}` in tenant `{tenant}`"
        )))?;
    let settings = ProviderSettings::from_provider(&provider, secret)
        .map_err(bad_provider)?
        .with_proxy_password(proxy_password);
    let client = ProviderClient::new(settings)
        .map_err(bad_provider)?
        .with_clock(state.clock.clone());
    Ok(ConsentTarget {
        mailbox,
        provider,
        client,
    })
}

impl ConsentTarget {
    fn name(&self) -> &str {
        &self.mailbox.value.name
    }
    fn tenant(&self) -> &str {
        &self.mailbox.value.tenant
    }
    /// The scopes a consent for this mailbox asks for (also shown on consent-link pages).
    pub fn scopes_to_request(&self) -> Result<Vec<String>, ConsentError> {
        self.scopes()
    }

    fn scopes(&self) -> Result<Vec<String>, ConsentError> {
        let m = &self.mailbox.value;
        let mut scopes = self
            .client
            .scopes_for(m.grant_type, &m.purposes)
            .map_err(|e| provider_failure(&e, &m.name))?;
        if delegated(m.grant_type) {
            // An ID token naming who signed in, to check against the mailbox.
            for s in identity_scopes(self.provider.kind) {
                if !scopes.iter().any(|have| have.as_str() == *s) {
                    scopes.push((*s).to_owned());
                }
            }
        }
        Ok(scopes)
    }

    /// Checks that the account that signed in for `token` is the one the mailbox expects: its
    /// `consent_account`, or else its address. Generic providers are not checked (their ID
    /// tokens follow no known convention). The error is the mailbox's new `last_error`.
    pub fn check_signed_in_account(
        &self,
        token: &TokenGrant,
        now: OffsetDateTime,
    ) -> Result<(), TokenError> {
        let m = &self.mailbox.value;
        if identity_scopes(self.provider.kind).is_empty() || !delegated(m.grant_type) {
            return Ok(());
        }
        let expected = if m.consent_account.is_empty() {
            &m.address
        } else {
            &m.consent_account
        };
        let (tenant, name) = (&m.tenant, &m.name);
        let failure = |code: &str, reason: String, fix: String| TokenError {
            code: code.to_owned(),
            reason,
            fix,
            time: now,
        };
        let Some(id_token) = &token.id_token else {
            return Err(failure(
                "id_token_missing",
                format!(
                    "the provider returned no ID token, so the account that signed in for mailbox `{name}` cannot be checked; the grant was not stored"
                ),
                "check that the app registration may sign users in (OpenID Connect scopes openid, profile, email) and consent again".to_owned(),
            ));
        };
        let account = signed_in_account(self.provider.kind, id_token, &self.provider.client_id)
            .map_err(|e| {
                failure(
                    &e.code,
                    format!("{}; the grant of mailbox `{name}` was not stored", e.reason),
                    e.fix_for(name),
                )
            })?;
        if account.is(expected) {
            return Ok(());
        }
        let signed = &account.username;
        let address = &m.address;
        let (reason, fix) = if m.consent_account.is_empty() {
            (
                format!(
                    "the sign-in was made as {signed}, but mailbox `{name}` is {address}; the grant was not stored (it would have sent as {signed})"
                ),
                format!(
                    "consent again and sign in as {address}; if {signed} is meant to send as {address} (e.g. it has Send As rights), set it with `tokenfleetctl mailbox update --tenant {tenant} --name {name} --consent-account {signed}` first"
                ),
            )
        } else {
            (
                format!(
                    "the sign-in was made as {signed}, but mailbox `{name}` expects {expected} (its consent_account); the grant was not stored"
                ),
                format!(
                    "consent again and sign in as {expected}, or change the mailbox's consent account with `tokenfleetctl mailbox update --tenant {tenant} --name {name} --consent-account <account>`"
                ),
            )
        };
        Err(failure("account_mismatch", reason, fix))
    }
}

impl ConsentTarget {
    /// Best effort: revokes at the provider the tokens a consent with the wrong account obtained
    /// (where the provider has a revocation endpoint: Google, not Microsoft), so that grant does
    /// not linger unused. The tokens are never stored either way.
    pub async fn revoke_unbound(&self, token: &TokenGrant) {
        let revoked = match &token.refresh_token {
            Some(refresh) => self.client.revoke(refresh).await,
            None => self.client.revoke(&token.access_token).await,
        };
        if let Err(e) = revoked {
            tracing::info!(
                mailbox = %self.name(),
                code = %e.code,
                "the tokens of a consent with the wrong account could not be revoked at the provider; they are not stored"
            );
        }
    }
}

/// Whether a person signs in to obtain grants of `grant_type`.
fn delegated(grant_type: GrantType) -> bool {
    matches!(
        grant_type,
        GrantType::DelegatedDeviceCode | GrantType::DelegatedAuthCode
    )
}

// ---------------------------------------------------------------------------------------------
// Start

/// What a person must do to finish a consent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// Nothing: the token was obtained without a person (app-only, service account).
    None,
    /// Enter a user code at a verification URI.
    DeviceCode {
        user_code: String,
        verification_uri: String,
        message: String,
        expires: OffsetDateTime,
        interval_secs: u64,
    },
    /// Open the authorization URL in a browser and sign in.
    Authorization {
        url: String,
        state: String,
        redirect_uri: String,
        expires: OffsetDateTime,
    },
}

/// The result of [`start`].
#[derive(Debug)]
pub struct StartOutcome {
    /// The mailbox (as read before the consent started).
    pub mailbox: Versioned<Mailbox>,
    /// The grant record after the call.
    pub grant: GrantRecord,
    /// What the person must do.
    pub challenge: Challenge,
}

/// Starts obtaining a grant for a mailbox, by its grant type (see the module documentation).
/// `redirect_uri` (auth code only) defaults to `<public_url>/oauth/callback`.
pub async fn start(
    state: &BrokerState,
    tenant: &str,
    name: &str,
    redirect_uri: Option<&str>,
    public_url: &str,
) -> Result<StartOutcome, ConsentError> {
    let target = load_target(state, tenant, name).await?;
    if target.mailbox.value.disabled {
        return Err(ConsentError::FailedPrecondition(format!(
            "mailbox `{name}` is disabled; enable it first (`tokenfleetctl mailbox update --tenant {tenant} --name {name} --disabled=false`)"
        )));
    }
    match target.mailbox.value.grant_type {
        GrantType::DelegatedDeviceCode => start_device_code(state, target).await,
        GrantType::DelegatedAuthCode => {
            let redirect = match redirect_uri.map(str::trim).filter(|r| !r.is_empty()) {
                Some(r) => r.to_owned(),
                None => format!("{}{CALLBACK_PATH}", public_url.trim_end_matches('/')),
            };
            start_auth_code(state, target, redirect).await
        }
        GrantType::AppOnly | GrantType::ServiceAccount => obtain_now(state, target).await,
    }
}

async fn start_device_code(
    state: &BrokerState,
    target: ConsentTarget,
) -> Result<StartOutcome, ConsentError> {
    let (tenant, name) = (target.tenant().to_owned(), target.name().to_owned());
    let scopes = target.scopes()?;
    let auth = target
        .client
        .start_device_code(&scopes)
        .await
        .map_err(|e| provider_failure(&e, &name))?;
    let now = state.clock.now();
    let interval = auth.interval.max(MIN_POLL_INTERVAL);
    let next_poll = now + interval;
    let device_code = seal_field(
        &state.keyring,
        &tenant,
        &name,
        GrantField::DeviceCode,
        &auth.device_code,
    )
    .map_err(ConsentError::seal(format!("grant of mailbox `{name}`")))?;
    let pending = PendingConsent::DeviceCode {
        device_code,
        user_code: auth.user_code.clone(),
        verification_uri: auth.verification_uri.clone(),
        message: auth.message.clone(),
        expires: auth.expires_at,
        interval_secs: interval.as_secs(),
        next_poll,
        scopes,
    };
    // Scheduled before the grant is written: a crash in between leaves a schedule entry the
    // poller drops, never a pending consent nobody polls.
    schedule_poll(state, &tenant, &name, next_poll).await?;
    let (grant, previous) = update_grant(state, &tenant, &name, |g| {
        Ok(begin_pending(g, pending.clone(), now))
    })
    .await?;
    forget_previous(state, previous).await;
    Ok(StartOutcome {
        mailbox: target.mailbox,
        grant,
        challenge: Challenge::DeviceCode {
            user_code: auth.user_code,
            verification_uri: auth.verification_uri,
            message: auth.message,
            expires: auth.expires_at,
            interval_secs: interval.as_secs(),
        },
    })
}

async fn start_auth_code(
    state: &BrokerState,
    target: ConsentTarget,
    redirect_uri: String,
) -> Result<StartOutcome, ConsentError> {
    let (tenant, name) = (target.tenant().to_owned(), target.name().to_owned());
    let scopes = target.scopes()?;
    let oauth_state = new_state();
    let auth = target
        .client
        .authorization_url(
            &scopes,
            &redirect_uri,
            &oauth_state,
            Some(&target.mailbox.value.address),
        )
        .map_err(|e| provider_failure(&e, &name))?;
    let now = state.clock.now();
    let expires = now + AUTH_CODE_LIFETIME;
    let pkce_verifier = seal_field(
        &state.keyring,
        &tenant,
        &name,
        GrantField::PkceVerifier,
        &auth.pkce_verifier,
    )
    .map_err(ConsentError::seal(format!("grant of mailbox `{name}`")))?;
    let index = ConsentStateIndex {
        tenant: tenant.clone(),
        mailbox: name.clone(),
        expires,
    };
    let key = consent_state_key(&oauth_state);
    let data = serde_json::to_vec(&index).map_err(|e| StoreError::Corrupt {
        key: key.to_string(),
        problem: format!("cannot encode consent state: {e}"),
    })?;
    state.store.put(&key, data, Precondition::Absent).await?;
    let pending = PendingConsent::AuthCode {
        state: oauth_state.clone(),
        pkce_verifier,
        redirect_uri: redirect_uri.clone(),
        expires,
        scopes,
    };
    let (grant, previous) = match update_grant(state, &tenant, &name, |g| {
        Ok(begin_pending(g, pending.clone(), now))
    })
    .await
    {
        Ok(done) => done,
        Err(e) => {
            delete_state_index(state, &oauth_state).await;
            return Err(e);
        }
    };
    forget_previous(state, previous).await;
    if let Err(error) = unschedule_poll(state, &tenant, &name).await {
        tracing::warn!(%error, tenant, mailbox = name, "could not unschedule an earlier device-code poll");
    }
    Ok(StartOutcome {
        mailbox: target.mailbox,
        grant,
        challenge: Challenge::Authorization {
            url: auth.url,
            state: oauth_state,
            redirect_uri,
            expires,
        },
    })
}

/// Removes what a replaced pending consent left behind (its `state` index).
async fn forget_previous(state: &BrokerState, previous: Option<PendingConsent>) {
    if let Some(PendingConsent::AuthCode { state: s, .. }) = previous {
        delete_state_index(state, &s).await;
    }
}

async fn delete_state_index(state: &BrokerState, oauth_state: &str) {
    if let Err(error) = state
        .store
        .delete(&consent_state_key(oauth_state), Precondition::Any)
        .await
    {
        tracing::warn!(%error, "could not delete a consent-state index record");
    }
}

async fn obtain_now(
    state: &BrokerState,
    target: ConsentTarget,
) -> Result<StartOutcome, ConsentError> {
    let (tenant, name) = (target.tenant().to_owned(), target.name().to_owned());
    let scopes = target.scopes()?;
    let token = match target.mailbox.value.grant_type {
        GrantType::ServiceAccount => {
            let key = open_service_account_key(&state.keyring, &target.provider)
                .map_err(ConsentError::seal(format!(
                    "provider `{}` in tenant `{tenant}`",
                    target.provider.name
                )))?
                .ok_or_else(|| {
                    ConsentError::FailedPrecondition(format!(
                        "service_account needs a service-account key, and provider `{}` has none; set it with `tokenfleetctl provider update`",
                        target.provider.name
                    ))
                })?;
            target
                .client
                .jwt_bearer(&key, &target.mailbox.value.address, &scopes)
                .await
        }
        _ => target.client.client_credentials(&scopes).await,
    }
    .map_err(|e| provider_failure(&e, &name))?;
    let now = state.clock.now();
    let (grant, previous) = update_grant(state, &tenant, &name, |g| {
        let previous = g.pending.take();
        activate(state, g, &token, &scopes, now)?;
        Ok(previous)
    })
    .await?;
    forget_previous(state, previous).await;
    hand_over(state, &grant).await?;
    Ok(StartOutcome {
        mailbox: target.mailbox,
        grant,
        challenge: Challenge::None,
    })
}

// ---------------------------------------------------------------------------------------------
// Complete (pasted code or browser redirect)

/// The result of [`complete`].
#[derive(Debug)]
pub struct CompleteOutcome {
    /// The mailbox.
    pub mailbox: Versioned<Mailbox>,
    /// The grant record after the call (ACTIVE).
    pub grant: GrantRecord,
}

/// Completes an auth-code consent with what a person pasted: the bare code, or the whole
/// redirect URL (whose `state` must match the pending consent's). A provider error carried in
/// the redirect (`access_denied`, …) ends the consent; it is audited as `consent.failed` by
/// `actor`.
pub async fn complete(
    state: &BrokerState,
    tenant: &str,
    name: &str,
    input: &str,
    actor: &str,
) -> Result<CompleteOutcome, ConsentError> {
    let target = load_target(state, tenant, name).await?;
    let stored = load_grant(state, tenant, name).await?;
    let (expected, sealed_verifier, redirect_uri, expires, scopes) = match &stored.grant.pending {
        Some(PendingConsent::AuthCode {
            state: s,
            pkce_verifier,
            redirect_uri,
            expires,
            scopes,
        }) => (
            s.clone(),
            pkce_verifier.clone(),
            redirect_uri.clone(),
            *expires,
            scopes.clone(),
        ),
        Some(PendingConsent::DeviceCode { .. }) => {
            return Err(ConsentError::FailedPrecondition(format!(
                "mailbox `{name}` is waiting for a device-code sign-in, which completes by itself once the person enters the code; there is no code to paste"
            )));
        }
        None => {
            return Err(ConsentError::FailedPrecondition(format!(
                "no authorization-code consent is pending for mailbox `{name}`; start one with `tokenfleetctl mailbox consent {name} --tenant {tenant}`"
            )));
        }
    };
    let now = state.clock.now();
    if now >= expires {
        return Err(ConsentError::FailedPrecondition(format!(
            "the consent started for mailbox `{name}` expired at {}; start again with `tokenfleetctl mailbox consent {name} --tenant {tenant}`",
            rfc3339(expires)
        )));
    }
    let code = match parse_pasted_code(input, &expected) {
        Ok(code) => code,
        Err(e) if e.code == "state_mismatch" => {
            return Err(ConsentError::InvalidArgument(
                "code: state does not match the consent that was started; start again".to_owned(),
            ));
        }
        Err(e) if e.oauth_error().is_some() => {
            // The provider sent the browser back with an error: this attempt is over.
            let text = describe_provider_error(&e, name);
            let error = e.to_token_error(name, now);
            return Err(fail_auth_code(state, actor, tenant, name, &expected, error, text).await);
        }
        Err(e) => {
            return Err(ConsentError::InvalidArgument(format!(
                "code: {}",
                describe_provider_error(&e, name)
            )));
        }
    };
    let verifier = open_field(
        &state.keyring,
        tenant,
        name,
        GrantField::PkceVerifier,
        &sealed_verifier,
    )
    .map_err(ConsentError::seal(format!("grant of mailbox `{name}`")))?;
    let token = target
        .client
        .exchange_code(&code, &verifier, &redirect_uri)
        .await
        .map_err(|e| provider_failure(&e, name))?;
    let now = state.clock.now();
    if let Err(error) = target.check_signed_in_account(&token, now) {
        // The wrong person signed in: this attempt is over and nothing of it is kept.
        target.revoke_unbound(&token).await;
        let text = format!("{} Fix: {}", error.reason, error.fix);
        return Err(fail_auth_code(state, actor, tenant, name, &expected, error, text).await);
    }
    let (grant, ()) = update_grant(state, tenant, name, |g| {
        if !matches!(&g.pending, Some(PendingConsent::AuthCode { state: s, .. }) if *s == expected)
        {
            return Err(ConsentError::Conflict(format!(
                "another consent was started for mailbox `{name}` meanwhile; finish that one"
            )));
        }
        activate(state, g, &token, &scopes, now)
    })
    .await?;
    delete_state_index(state, &expected).await;
    hand_over(state, &grant).await?;
    Ok(CompleteOutcome {
        mailbox: target.mailbox,
        grant,
    })
}

/// Ends the pending auth-code consent `expected_state` with `error`.
/// Ends the auth-code attempt `expected_state` as failed with `error` (if it is still the pending
/// one), audits `consent.failed` with `text`, and returns the caller's answer: FAILED_PRECONDITION
/// with `text`, or the store error that kept the failure from being recorded.
async fn fail_auth_code(
    state: &BrokerState,
    actor: &str,
    tenant: &str,
    name: &str,
    expected_state: &str,
    error: TokenError,
    text: String,
) -> ConsentError {
    let recorded = update_grant(state, tenant, name, |g| {
        if matches!(&g.pending, Some(PendingConsent::AuthCode { state: s, .. }) if s == expected_state)
        {
            fail_consent(g, error.clone());
        }
        Ok(())
    })
    .await;
    if let Err(e) = recorded {
        return e;
    }
    delete_state_index(state, expected_state).await;
    audit(
        state,
        actor,
        "consent.failed",
        tenant,
        name,
        "failed",
        &text,
    )
    .await;
    ConsentError::FailedPrecondition(text)
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

// ---------------------------------------------------------------------------------------------
// Audit of steps outside an admin RPC

/// Records a consent step the broker took outside an admin RPC (poller, browser redirect).
pub async fn audit(
    state: &BrokerState,
    actor: &str,
    action: &str,
    tenant: &str,
    mailbox: &str,
    result: &str,
    detail: &str,
) {
    let event = AuditEvent {
        time: state.clock.now(),
        actor: actor.to_owned(),
        action: action.to_owned(),
        target: format!("tenants/{tenant}/mailboxes/{mailbox}"),
        tenant: tenant.to_owned(),
        result: result.to_owned(),
        detail: crate::audit::detail(detail.to_owned()),
    };
    crate::audit::record(state, &Scope::Tenant(tenant.to_owned()), event).await;
}

pub async fn read_state_index(
    state: &BrokerState,
    oauth_state: &str,
) -> Result<Option<ConsentStateIndex>, StoreError> {
    // Never look up what cannot be one of our states (they are base64url, 22+ characters).
    if oauth_state.len() > 128
        || !oauth_state
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Ok(None);
    }
    let key = consent_state_key(oauth_state);
    let Some(record) = state.store.get(&key).await? else {
        return Ok(None);
    };
    let index: ConsentStateIndex =
        serde_json::from_slice(&record.data).map_err(|e| StoreError::Corrupt {
            key: key.to_string(),
            problem: format!("not a valid consent state: {e}"),
        })?;
    if index.expires <= state.clock.now() {
        delete_state_index(state, oauth_state).await;
        return Ok(None);
    }
    Ok(Some(index))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenfleet_domain::TokenStatus;

    #[test]
    fn consent_failures_keep_earlier_grants_visible() {
        let error = TokenError {
            code: "expired_token".into(),
            reason: "r".into(),
            fix: "f".into(),
            time: OffsetDateTime::UNIX_EPOCH,
        };
        let mut fresh = GrantRecord::empty("t", "m");
        fail_consent(&mut fresh, error.clone());
        assert_eq!(fresh.state.status, TokenStatus::NotRetrieved);
        let mut earlier = GrantRecord::empty("t", "m");
        earlier.refresh_token = Some(tokenfleet_seal::Sealed {
            kid: "k".into(),
            nonce: String::new(),
            ct: String::new(),
        });
        fail_consent(&mut earlier, error);
        assert_eq!(earlier.state.status, TokenStatus::ReauthRequired);
        assert!(earlier.pending.is_none());
    }
}
