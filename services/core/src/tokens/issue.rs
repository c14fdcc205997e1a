//! Issuance: the access token a device's agent gets for (device, mailbox, purpose).
//!
//! [`issue`] checks that the device exists in the tenant, that its sender mode lets it use the
//! mailbox (`fixed_admin` → its admin mailbox only, `bulk` → its bulk mailbox only, `login_user`
//! → its allowed mailboxes, `allow_user_change` → its allowed mailboxes and its admin mailbox),
//! and that the mailbox serves the purpose; then it hands out [`TokenService::access_token`].
//! Every issuance, granted or refused, is audited (actor, device, mailbox, purpose, result;
//! never the token).
//!
//! [`issue_for_agent`] adds the user's own mailbox (`login_user` / `allow_user_change` devices,
//! request field `user_address`):
//!
//! - The user mailbox has a deterministic name derived from the address, [`user_mailbox_name`]
//!   (`user-<local part slug>-<10 hex digits of SHA-256 of the lower-cased address>`), so finding
//!   it is one key lookup and concurrent first requests race on one key: the mailbox is created
//!   with compare-and-set `Absent`, so exactly one is created (kind `user`, provider =
//!   `device.user_provider`, grant type `delegated_device_code` for Microsoft providers and
//!   `delegated_auth_code` for Google and generic ones, purposes = the requested one, more
//!   added as they are asked for). The creation is audited as `mailbox.create` by the agent.
//! - Without a usable grant (NOT_RETRIEVED, CONSENT_PENDING, REAUTH_REQUIRED) the answer is a
//!   [`UserConsent`] instead of a token: the pending consent if one is pending (and not about to
//!   expire), else a new one started with [`consent::start`] (device code: user code,
//!   verification URI, message; auth code: the authorization URL, which is kept in a
//!   `user-consent-url/<mailbox>` record because the grant keeps only its `state`). Starts are
//!   serialized across replicas by the store lease `consent-start/<tenant>/<mailbox>`, so
//!   concurrent requests share one start at the provider. Audited with result
//!   `consent_required`.
//! - Once the person consented (the device-code poller or the browser callback stored the
//!   grant), the next request gets the token.
//! - Sender binding: the user address must be one the device's ingress user addresses admit
//!   (an exact address or its `@domain`), else the request is denied naming the device and the
//!   address; the agent checks the same list before it accepts the message, so a device cannot
//!   obtain the token of any user who consented elsewhere in the tenant by writing their address
//!   into `From:`.
//! - Limits: a user mailbox is created on demand only while the tenant has fewer than
//!   `max_user_mailboxes_per_tenant` user mailboxes and the device's user addresses admit
//!   fewer than `max_user_mailboxes_per_device` of them ([`TokenService::config`]); otherwise
//!   [`IssueError::Limit`] (RESOURCE_EXHAUSTED naming the setting).
//!
//! The token's resource follows the device: a device that sends with Microsoft Graph
//! (`smtp.method graph`) gets a Graph token for `send`, every other use a token for the mail
//! protocols ([`resource_for`]). The agent only names the purpose.
//!
//! [`issue_to_agent`] is the agent's `IssueAccessToken`, and the one place that decides who may
//! get a token: the agent (authenticated by [`crate::identity::peer::admit`], which read the
//! records [`issue_keys`] names in the same round trip) must be within its per-agent rate
//! ([`RateLimiter`], RESOURCE_EXHAUSTED with the wait), name a purpose, and host the device
//! (else PERMISSION_DENIED, audited as a refused `token.issue`); then [`issue_for_agent`]
//! checks the rest. The tenant is always the agent's own, so no call reaches across tenants.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use time::OffsetDateTime;
use tokenfleet_domain::{
    AuditEvent, Device, GrantType, MailPurpose, Mailbox, MailboxKind, Provider, ProviderKind,
    SenderMode, Stamps, TokenStatus,
};
use tokenfleet_providers::TokenResource;
use tokenfleet_store::{Precondition, RecordKey, Scope, StoreError};

use super::consent::{self, Challenge, ConsentError};
use super::grant::PendingConsent;
use super::lifecycle::{IssuedToken, TokenError, TokenService};
use crate::audit;
use crate::identity::AgentId;
use crate::ops::choice::Choice;
use crate::rate_limit::RateLimiter;
use crate::records::{
    CAS_ATTEMPTS, Records, Snapshot, Versioned, device_key, mailbox_key, provider_key,
};

/// Audit action of an issuance.
pub const ISSUE_ACTION: &str = "token.issue";
/// Audit action of a user mailbox created on demand.
pub const MAILBOX_CREATE_ACTION: &str = "mailbox.create";
/// Audit action of a purpose added to a user mailbox on demand.
pub const MAILBOX_UPDATE_ACTION: &str = "mailbox.update";
/// Audit result of an issuance answered with a consent for the person to complete.
pub const CONSENT_REQUIRED_RESULT: &str = "consent_required";
/// Collection (tenant scope) of [`UserConsentUrl`] records, id = mailbox name.
pub const USER_CONSENT_URLS: &str = "user-consent-url";
/// A pending consent with less than this left is replaced by a new one (the person would not
/// make it in time).
pub const PENDING_MIN_LEFT: Duration = Duration::from_secs(60);
/// Prefix of user mailbox names.
pub const USER_MAILBOX_PREFIX: &str = "user-";

/// First and largest pause while another request starts the consent.
const START_WAIT_PAUSE: (Duration, Duration) =
    (Duration::from_millis(20), Duration::from_millis(250));

/// Whether `device`'s sender mode lets it use `mailbox` by name (user mailboxes found by
/// address are checked by [`issue_for_agent`]).
pub fn device_may_use(device: &Device, mailbox: &str) -> bool {
    match device.sender_mode {
        SenderMode::FixedAdmin => device.admin_mailbox == mailbox,
        SenderMode::Bulk => device.bulk_mailbox == mailbox,
        SenderMode::LoginUser => device.allowed_mailboxes.iter().any(|m| m == mailbox),
        SenderMode::AllowUserChange => {
            (!device.admin_mailbox.is_empty() && device.admin_mailbox == mailbox)
                || device.allowed_mailboxes.iter().any(|m| m == mailbox)
        }
    }
}

/// The resource of the token `device` needs for `purpose`: Microsoft Graph for sending from a
/// device whose send method is Graph, else the mail protocols (SMTP, POP3, IMAP; Google's
/// mail scope also covers the Gmail API).
pub fn resource_for(device: &Device, purpose: MailPurpose) -> TokenResource {
    if purpose == MailPurpose::Send && device.smtp.method == tokenfleet_domain::SendMethod::Graph {
        TokenResource::MicrosoftGraph
    } else {
        TokenResource::MailProtocols
    }
}

/// The name of the user mailbox of `address` (see the module documentation). Case-insensitive
/// in the address; always a valid resource name.
pub fn user_mailbox_name(address: &str) -> String {
    let normalized = address.trim().to_ascii_lowercase();
    let digest = Sha256::digest(normalized.as_bytes());
    let hash: String = digest.iter().take(5).map(|b| format!("{b:02x}")).collect();
    let local = normalized
        .rsplit_once('@')
        .map_or(normalized.as_str(), |(l, _)| l);
    let mut slug = String::new();
    for c in local.chars() {
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() {
            c
        } else {
            '-'
        };
        if c == '-' && (slug.is_empty() || slug.ends_with('-')) {
            continue;
        }
        slug.push(c);
    }
    // "user-" + slug + "-" + 10 hex digits ≤ 63 characters.
    let room = tokenfleet_domain::MAX_NAME_LEN - USER_MAILBOX_PREFIX.len() - 1 - hash.len();
    slug.truncate(room);
    let slug = slug.trim_end_matches('-');
    if slug.is_empty() {
        format!("{USER_MAILBOX_PREFIX}{hash}")
    } else {
        format!("{USER_MAILBOX_PREFIX}{slug}-{hash}")
    }
}

/// What the person at the device must do before the user mailbox has a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserConsent {
    /// The user mailbox.
    pub mailbox: String,
    /// Device code flow: the code to enter at `verification_uri` (empty for auth code).
    pub user_code: String,
    /// Device code flow: where to enter it.
    pub verification_uri: String,
    /// When the code or the authorization request expires.
    pub expires: OffsetDateTime,
    /// The provider's instruction text (device code).
    pub message: String,
    /// Auth code flow: the URL to open (empty for device code).
    pub authorization_url: String,
}

/// The authorization URL of an auth-code consent started for a user mailbox (not a secret: it
/// is what the person's browser opens), with the `state` of the consent it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserConsentUrl {
    /// Tenant.
    pub tenant: String,
    /// Mailbox.
    pub mailbox: String,
    /// OAuth `state` of the pending consent.
    pub state: String,
    /// The URL.
    pub url: String,
    /// When the consent expires.
    #[serde(with = "time::serde::rfc3339")]
    pub expires: OffsetDateTime,
}

fn consent_url_key(tenant: &str, mailbox: &str) -> RecordKey {
    RecordKey::tenant(tenant, USER_CONSENT_URLS, mailbox)
}

/// The answer to an agent's request.
#[derive(Debug, Clone)]
pub enum Issued {
    /// A token of `mailbox`.
    Token {
        /// The mailbox the token is for.
        mailbox: String,
        /// The token (`Debug` redacts it).
        token: IssuedToken,
    },
    /// No token yet: the person must consent first.
    ConsentRequired(UserConsent),
}

/// An agent's request, as [`issue_for_agent`] takes it.
#[derive(Debug, Clone, Copy)]
pub struct IssueRequest<'a> {
    /// Device name.
    pub device: &'a str,
    /// Mailbox name (may be empty when `user_address` is set).
    pub mailbox: &'a str,
    /// Address of the user signed in at the device (empty: none).
    pub user_address: &'a str,
    /// What the token is for.
    pub purpose: MailPurpose,
}

/// Why [`issue_for_agent`] gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// From the token lifecycle (authorization, grant state, store).
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The device or tenant is not set up for user mailboxes (names the field).
    #[error("{0}")]
    Precondition(String),
    /// Starting the consent failed.
    #[error(transparent)]
    Consent(#[from] ConsentError),
    /// A user-mailbox limit is reached (names the setting).
    #[error("{0}")]
    Limit(String),
}

impl From<StoreError> for IssueError {
    fn from(e: StoreError) -> Self {
        Self::Token(e.into())
    }
}

/// The one mapping of issuance errors to the operations' error.
impl From<&IssueError> for crate::ops::Error {
    fn from(e: &IssueError) -> Self {
        match e {
            IssueError::Token(e) => e.into(),
            IssueError::Precondition(m) => Self::FailedPrecondition(m.clone()),
            IssueError::Limit(m) => Self::ResourceExhausted {
                message: m.clone(),
                retry_after: None,
            },
            IssueError::Consent(e) => e.into(),
        }
    }
}

impl From<IssueError> for crate::ops::Error {
    fn from(e: IssueError) -> Self {
        Self::from(&e)
    }
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Records one issuance outcome in the audit log (and the log). `detail` follows
/// "device `d`, purpose p" (start it with `: ` or `; `).
#[allow(clippy::too_many_arguments)]
async fn audit_issue(
    service: &TokenService,
    actor: &str,
    tenant: &str,
    device: &str,
    mailbox: &str,
    purpose: MailPurpose,
    outcome: &str,
    detail: String,
) {
    let state = service.state();
    let scope = if tokenfleet_domain::name("tenant", tenant).is_ok() {
        Scope::Tenant(tenant.to_owned())
    } else {
        Scope::Global
    };
    let event = AuditEvent {
        time: state.clock.now(),
        actor: actor.to_owned(),
        action: ISSUE_ACTION.to_owned(),
        target: crate::ops::names::object_path(tenant, "mailboxes", mailbox),
        tenant: crate::ops::names::shown(tenant),
        result: outcome.to_owned(),
        detail: audit::detail(format!(
            "device `{}`, purpose {purpose}{detail}",
            crate::ops::names::shown(device)
        )),
    };
    match outcome {
        "ok" => tracing::info!(tenant, device, mailbox, %purpose, actor, "access token issued"),
        CONSENT_REQUIRED_RESULT => {
            tracing::info!(tenant, device, mailbox, %purpose, actor, "access token not issued: consent required")
        }
        _ => {
            tracing::info!(tenant, device, mailbox, %purpose, actor, result = outcome, "access token refused")
        }
    }
    audit::record(state, &scope, event).await;
}

/// An access token for `device` to use `mailbox` for `purpose`, on behalf of `actor` (who asked,
/// for the audit log). See the module documentation.
pub async fn issue(
    service: &TokenService,
    actor: &str,
    tenant: &str,
    device: &str,
    mailbox: &str,
    purpose: MailPurpose,
) -> Result<IssuedToken, TokenError> {
    issue_via(None, service, actor, tenant, device, mailbox, purpose).await
}

/// [`issue`] reading the device, mailbox and grant from `snapshot` first (see
/// [`issue_keys`]).
async fn issue_via(
    snapshot: Option<&Snapshot>,
    service: &TokenService,
    actor: &str,
    tenant: &str,
    device: &str,
    mailbox: &str,
    purpose: MailPurpose,
) -> Result<IssuedToken, TokenError> {
    let started = std::time::Instant::now();
    let result = authorize_and_issue(snapshot, service, tenant, device, mailbox, purpose).await;
    let (outcome, detail) = match &result {
        Ok(token) => {
            record_issued(snapshot, service, tenant, mailbox).await;
            ("ok", format!("; token expires {}", rfc3339(token.expires)))
        }
        Err(e) => (crate::ops::Error::from(e).result(), format!(": {e}")),
    };
    service
        .metrics()
        .issuance(tenant, outcome, started.elapsed());
    audit_issue(
        service, actor, tenant, device, mailbox, purpose, outcome, detail,
    )
    .await;
    result
}

async fn record_issued(
    snapshot: Option<&Snapshot>,
    service: &TokenService,
    tenant: &str,
    mailbox: &str,
) {
    if let Err(error) = service.record_issued_via(snapshot, tenant, mailbox).await {
        tracing::warn!(%error, tenant, mailbox, "recording the issuance time failed");
    }
}

async fn authorize_and_issue(
    snapshot: Option<&Snapshot>,
    service: &TokenService,
    tenant: &str,
    device: &str,
    mailbox: &str,
    purpose: MailPurpose,
) -> Result<IssuedToken, TokenError> {
    for (field, value) in [("tenant", tenant), ("device", device), ("mailbox", mailbox)] {
        tokenfleet_domain::name(field, value).map_err(|e| TokenError::Invalid(e.to_string()))?;
    }
    let d = load_device(snapshot, service, tenant, device).await?;
    if !device_may_use(&d, mailbox) {
        let allowed = match d.sender_mode {
            SenderMode::FixedAdmin => format!("its admin mailbox `{}`", d.admin_mailbox),
            SenderMode::Bulk => format!("its bulk mailbox `{}`", d.bulk_mailbox),
            SenderMode::LoginUser => format!(
                "the user's own mailbox (by `user_address`) and its allowed mailboxes [{}]",
                d.allowed_mailboxes.join(", ")
            ),
            SenderMode::AllowUserChange => format!(
                "the user's own mailbox (by `user_address`), its admin mailbox `{}` and its allowed mailboxes [{}]",
                d.admin_mailbox,
                d.allowed_mailboxes.join(", ")
            ),
        };
        return Err(TokenError::Denied(format!(
            "device `{device}` (sender mode {}) may use only {allowed}, not mailbox `{mailbox}`",
            d.sender_mode
        )));
    }
    issue_mailbox(
        snapshot,
        service,
        tenant,
        mailbox,
        purpose,
        resource_for(&d, purpose),
    )
    .await
}

async fn load_device(
    snapshot: Option<&Snapshot>,
    service: &TokenService,
    tenant: &str,
    device: &str,
) -> Result<Device, TokenError> {
    Records::new(service.state().store.as_ref())
        .get_via::<Device>(snapshot, &device_key(tenant, device))
        .await?
        .map(|d| d.value)
        .ok_or_else(|| {
            TokenError::Denied(format!(
                "device `{device}` does not exist in tenant `{tenant}`"
            ))
        })
}

/// The token of a mailbox the device may use: the mailbox must exist and serve `purpose`.
async fn issue_mailbox(
    snapshot: Option<&Snapshot>,
    service: &TokenService,
    tenant: &str,
    mailbox: &str,
    purpose: MailPurpose,
    resource: TokenResource,
) -> Result<IssuedToken, TokenError> {
    let Some(m) = Records::new(service.state().store.as_ref())
        .get_via::<Mailbox>(snapshot, &mailbox_key(tenant, mailbox))
        .await?
    else {
        return Err(TokenError::MailboxNotFound {
            tenant: tenant.to_owned(),
            mailbox: mailbox.to_owned(),
        });
    };
    if !m.value.purposes.contains(&purpose) {
        return Err(TokenError::Denied(format!(
            "mailbox `{mailbox}` is not set up for {purpose} (its purposes: {})",
            m.value
                .purposes
                .iter()
                .map(|p| p.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    service
        .access_token_via(
            snapshot,
            tenant,
            mailbox,
            resource,
            service.config().refresh_margin,
        )
        .await
}

/// The answer to an agent's `IssueAccessToken`: [`issue`] when the request names no user, else
/// the user's own mailbox (or, for `allow_user_change`, another mailbox the device may use);
/// see the module documentation. `public_url` is the broker's HTTP base URL (auth-code
/// consents redirect to `<public_url>/oauth/callback`). Every outcome is audited.
pub async fn issue_for_agent(
    service: &TokenService,
    actor: &str,
    tenant: &str,
    req: &IssueRequest<'_>,
    public_url: &str,
) -> Result<Issued, IssueError> {
    issue_for_agent_via(None, service, actor, tenant, req, public_url).await
}

/// The records an agent's request reads, for one round trip before the call
/// ([`crate::identity::peer::authenticate_handshake_verified`] reads them with the agent's own):
/// the device, and for a request without `user_address` the mailbox and its grant. Names that
/// are not valid are left out (the call refuses them).
pub fn issue_keys(tenant: &str, device: &str, mailbox: &str, user_address: &str) -> Vec<RecordKey> {
    let mut keys = Vec::new();
    if tokenfleet_domain::name("tenant", tenant).is_err()
        || tokenfleet_domain::name("device", device).is_err()
    {
        return keys;
    }
    keys.push(device_key(tenant, device));
    if user_address.is_empty() && tokenfleet_domain::name("mailbox", mailbox).is_ok() {
        keys.push(mailbox_key(tenant, mailbox));
        keys.push(super::grant::grant_key(tenant, mailbox));
    }
    keys
}

/// An agent's `IssueAccessToken` as it arrived ([`issue_to_agent`]): the purpose as sent, so it
/// is checked after the rate limit.
#[derive(Debug, Clone, Copy)]
pub struct AgentRequest<'a> {
    /// Device name.
    pub device: &'a str,
    /// Mailbox name (may be empty when `user_address` is set).
    pub mailbox: &'a str,
    /// Address of the user signed in at the device (empty: none).
    pub user_address: &'a str,
    /// What the token is for, as sent.
    pub purpose: Choice<MailPurpose>,
}

/// Agent `agent`'s `IssueAccessToken` (see the module documentation): the rate limit, the
/// purpose, that the agent hosts the device, then [`issue_for_agent`]. `snapshot` holds the
/// records [`issue_keys`] names, read with the agent's own; nothing here reads the store again
/// unless a record is missing from it. Every refusal after the purpose is audited.
pub async fn issue_to_agent(
    snapshot: &Snapshot,
    service: &TokenService,
    limit: &RateLimiter,
    agent: &AgentId,
    req: &AgentRequest<'_>,
    public_url: &str,
) -> Result<Issued, crate::ops::Error> {
    if let Err(wait) = limit.check(&agent.to_string(), std::time::Instant::now()) {
        return Err(rate_limited(agent, wait));
    }
    let purpose = req.purpose.required("purpose")?;
    let request = IssueRequest {
        device: req.device,
        mailbox: req.mailbox,
        user_address: req.user_address,
        purpose,
    };
    check_hosted(snapshot, service, agent, &request).await?;
    Ok(issue_for_agent_via(
        Some(snapshot),
        service,
        &agent.actor(),
        &agent.tenant,
        &request,
        public_url,
    )
    .await?)
}

/// RESOURCE_EXHAUSTED for an agent over its issue rate, with the wait.
fn rate_limited(agent: &AgentId, wait: Duration) -> crate::ops::Error {
    let err = crate::ops::Error::exhausted_for(
        format_args!(
            "agent `{agent}` is over its IssueAccessToken rate (`[agents] issue_rate_per_minute`)"
        ),
        wait,
    );
    tracing::info!(agent = %agent, error = %err, "access token refused: rate limited");
    err
}

/// PERMISSION_DENIED (audited) unless `agent` hosts the device. A missing device (or bad
/// names) is left to [`issue_for_agent`], which refuses and audits it.
async fn check_hosted(
    snapshot: &Snapshot,
    service: &TokenService,
    agent: &AgentId,
    req: &IssueRequest<'_>,
) -> Result<(), crate::ops::Error> {
    if tokenfleet_domain::name("device", req.device).is_err() {
        return Ok(());
    }
    let Some(device) = Records::new(service.state().store.as_ref())
        .get_via::<Device>(Some(snapshot), &device_key(&agent.tenant, req.device))
        .await?
    else {
        return Ok(());
    };
    if device.value.agent == agent.name {
        return Ok(());
    }
    let shown = crate::ops::names::shown;
    let message = format!(
        "device `{}` is not hosted by agent `{agent}`",
        shown(req.device)
    );
    tracing::info!(agent = %agent, device = %shown(req.device), mailbox = %shown(req.mailbox), "access token refused: device hosted elsewhere");
    let error = crate::ops::Error::PermissionDenied(message);
    let target = if req.mailbox.is_empty() {
        req.user_address
    } else {
        req.mailbox
    };
    crate::identity::peer::audit(
        service.state(),
        ISSUE_ACTION,
        agent,
        crate::ops::names::object_path(&agent.tenant, "mailboxes", target),
        error.result(),
        format!(
            "device `{}`, purpose {}: {error}",
            shown(req.device),
            req.purpose
        ),
    )
    .await;
    Err(error)
}

/// [`issue_for_agent`] reading the records [`issue_keys`] names from `snapshot` (read in the
/// same round trip as the agent's identity) instead of one store read each. Writes are
/// unchanged (compare-and-set on the versions read), and a refresh reads the grant again.
pub async fn issue_for_agent_via(
    snapshot: Option<&Snapshot>,
    service: &TokenService,
    actor: &str,
    tenant: &str,
    req: &IssueRequest<'_>,
    public_url: &str,
) -> Result<Issued, IssueError> {
    if req.user_address.is_empty() {
        let token = issue_via(
            snapshot,
            service,
            actor,
            tenant,
            req.device,
            req.mailbox,
            req.purpose,
        )
        .await?;
        return Ok(Issued::Token {
            mailbox: req.mailbox.to_owned(),
            token,
        });
    }
    // The audit target: the mailbox once it is known.
    let mut target = if req.mailbox.is_empty() {
        crate::ops::names::shown(req.user_address)
    } else {
        req.mailbox.to_owned()
    };
    let started = std::time::Instant::now();
    // Boxed: the user path (consent flows, mailbox creation) is a future of ~9 KB; inline it
    // made every issuance's future (mailbox path included) that much larger, and every one of
    // them was moved whole into its box.
    let result = Box::pin(for_user(
        snapshot,
        service,
        actor,
        tenant,
        req,
        public_url,
        &mut target,
    ))
    .await;
    let (outcome, detail) = match &result {
        Ok(Issued::Token { token, .. }) => {
            record_issued(None, service, tenant, &target).await;
            ("ok", format!("; token expires {}", rfc3339(token.expires)))
        }
        Ok(Issued::ConsentRequired(c)) => (
            CONSENT_REQUIRED_RESULT,
            format!(
                ": consent required for user `{}` ({}, expires {})",
                crate::ops::names::shown(req.user_address),
                if c.authorization_url.is_empty() {
                    "device code"
                } else {
                    "authorization URL"
                },
                rfc3339(c.expires)
            ),
        ),
        Err(e) => (crate::ops::Error::from(e).result(), format!(": {e}")),
    };
    service
        .metrics()
        .issuance(tenant, outcome, started.elapsed());
    audit_issue(
        service,
        actor,
        tenant,
        req.device,
        &target,
        req.purpose,
        outcome,
        detail,
    )
    .await;
    result
}

async fn for_user(
    snapshot: Option<&Snapshot>,
    service: &TokenService,
    actor: &str,
    tenant: &str,
    req: &IssueRequest<'_>,
    public_url: &str,
    target: &mut String,
) -> Result<Issued, IssueError> {
    let invalid = |e: tokenfleet_domain::ValidationError| TokenError::Invalid(e.to_string());
    tokenfleet_domain::name("tenant", tenant).map_err(invalid)?;
    tokenfleet_domain::name("device", req.device).map_err(invalid)?;
    tokenfleet_domain::optional_name("mailbox", req.mailbox).map_err(invalid)?;
    tokenfleet_domain::email("user_address", req.user_address).map_err(invalid)?;
    let device = load_device(snapshot, service, tenant, req.device).await?;
    if !matches!(
        device.sender_mode,
        SenderMode::LoginUser | SenderMode::AllowUserChange
    ) {
        return Err(TokenError::Denied(format!(
            "device `{}` has sender mode {}, which has no user mailboxes; `user_address` is only for login_user and allow_user_change devices",
            req.device, device.sender_mode
        ))
        .into());
    }
    let name = user_mailbox_name(req.user_address);
    if !req.mailbox.is_empty() && req.mailbox != name {
        // Another mailbox than the user's own.
        if device.sender_mode == SenderMode::AllowUserChange && device_may_use(&device, req.mailbox)
        {
            let token = issue_mailbox(
                None,
                service,
                tenant,
                req.mailbox,
                req.purpose,
                resource_for(&device, req.purpose),
            )
            .await?;
            return Ok(Issued::Token {
                mailbox: req.mailbox.to_owned(),
                token,
            });
        }
        return Err(TokenError::Denied(format!(
            "device `{}` (sender mode {}) may use only the user's own mailbox `{name}`{}, not mailbox `{}`",
            req.device,
            device.sender_mode,
            if device.sender_mode == SenderMode::AllowUserChange {
                ", its admin mailbox and its allowed mailboxes"
            } else {
                ""
            },
            req.mailbox
        ))
        .into());
    }
    if !device.ingress.admits_user(req.user_address) {
        return Err(TokenError::Denied(format!(
            "device `{}` may not send as user `{}`: the address is not among the device's ingress user addresses [{}]; add it (or its @domain) with `tokenfleetctl device update --tenant {tenant} --name {} --ingress-user-address <address>`",
            req.device,
            crate::ops::names::shown(req.user_address),
            device.ingress.user_addresses.join(", "),
            req.device
        ))
        .into());
    }
    target.clone_from(&name);
    let (mailbox, purpose_added) = user_mailbox(
        service,
        actor,
        tenant,
        &device,
        req.user_address,
        &name,
        req.purpose,
    )
    .await?;
    if mailbox.disabled {
        return Err(TokenError::Disabled { mailbox: name }.into());
    }
    // A grant obtained before the purpose was added may lack its scopes.
    let mut stale_scopes = purpose_added && lacks_scopes(service, tenant, &mailbox).await?;
    for _ in 0..CAS_ATTEMPTS {
        let status = service
            .grant(tenant, &name)
            .await?
            .map_or(TokenStatus::NotRetrieved, |g| g.value.state.status);
        if !stale_scopes && matches!(status, TokenStatus::Active | TokenStatus::RefreshFailing) {
            match service
                .access_token_for(
                    tenant,
                    &name,
                    resource_for(&device, req.purpose),
                    service.config().refresh_margin,
                )
                .await
            {
                Ok(token) => {
                    return Ok(Issued::Token {
                        mailbox: name,
                        token,
                    });
                }
                // The grant died meanwhile: a person must consent (again).
                Err(
                    TokenError::NotRetrieved { .. }
                    | TokenError::ReauthRequired { .. }
                    | TokenError::ConsentPending { .. },
                ) => {}
                Err(e) => return Err(e.into()),
            }
        } else if status == TokenStatus::Disabled {
            return Err(TokenError::Disabled { mailbox: name }.into());
        }
        match user_consent(service, tenant, &name, public_url, stale_scopes).await? {
            Some(consent) => return Ok(Issued::ConsentRequired(consent)),
            // Granted meanwhile: hand out the token.
            None => stale_scopes = false,
        }
    }
    Err(TokenError::Changed { mailbox: name }.into())
}

/// The user mailbox `name` of `address`, created on demand; `purpose` is added to its purposes
/// when missing (the `bool`: whether it was).
async fn user_mailbox(
    service: &TokenService,
    actor: &str,
    tenant: &str,
    device: &Device,
    address: &str,
    name: &str,
    purpose: MailPurpose,
) -> Result<(Mailbox, bool), IssueError> {
    let state = service.state();
    let records = Records::new(state.store.as_ref());
    let key = mailbox_key(tenant, name);
    for _ in 0..CAS_ATTEMPTS {
        let Some(stored) = records.get::<Mailbox>(&key).await? else {
            check_user_mailbox_limits(service, tenant, device).await?;
            let mailbox = new_user_mailbox(service, tenant, device, address, name, purpose).await?;
            match records.put(&mailbox, Precondition::Absent).await {
                Ok(_) => {
                    tracing::info!(tenant, mailbox = name, device = %device.name, actor, "user mailbox created on demand");
                    audit_mailbox(
                        service,
                        actor,
                        MAILBOX_CREATE_ACTION,
                        &mailbox,
                        format!(
                            "user mailbox of `{}` created on demand for device `{}` (provider `{}`, {}, purposes {})",
                            crate::ops::names::shown(address),
                            device.name,
                            mailbox.provider,
                            mailbox.grant_type,
                            purpose
                        ),
                    )
                    .await;
                    return Ok((mailbox, false));
                }
                // Another request created it first: use that one.
                Err(StoreError::AlreadyExists(_) | StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        let Versioned { version, value } = stored;
        if value.kind != MailboxKind::User || !value.address.eq_ignore_ascii_case(address) {
            return Err(IssueError::Precondition(format!(
                "mailbox `{name}` in tenant `{tenant}` (kind {}, address `{}`) is not the user mailbox of `{}`; rename or delete it",
                value.kind,
                crate::ops::names::shown(&value.address),
                crate::ops::names::shown(address)
            )));
        }
        if value.purposes.contains(&purpose) {
            return Ok((value, false));
        }
        let mut updated = value;
        updated.purposes.push(purpose);
        updated.stamps.updated = state.clock.now();
        match records.put(&updated, Precondition::Version(version)).await {
            Ok(_) => {
                audit_mailbox(
                    service,
                    actor,
                    MAILBOX_UPDATE_ACTION,
                    &updated,
                    format!(
                        "purpose {purpose} added on demand for device `{}`",
                        device.name
                    ),
                )
                .await;
                return Ok((updated, true));
            }
            Err(StoreError::Conflict { .. } | StoreError::NotFound(_)) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(TokenError::Changed {
        mailbox: name.to_owned(),
    }
    .into())
}

/// Room for one more user mailbox in the tenant and for the device (see the module
/// documentation). Two concurrent creations may both pass at the limit.
async fn check_user_mailbox_limits(
    service: &TokenService,
    tenant: &str,
    device: &Device,
) -> Result<(), IssueError> {
    let config = service.config();
    let users: Vec<Mailbox> = Records::new(service.state().store.as_ref())
        .list_all::<Mailbox>(&Scope::Tenant(tenant.to_owned()))
        .await?
        .into_iter()
        .map(|m| m.value)
        .filter(|m| m.kind == MailboxKind::User)
        .collect();
    if users.len() >= config.max_user_mailboxes_per_tenant {
        return Err(IssueError::Limit(format!(
            "tenant `{tenant}` has {} user mailboxes, the limit (`[tokens] max_user_mailboxes_per_tenant` = {}); delete unused ones or raise the limit",
            users.len(),
            config.max_user_mailboxes_per_tenant
        )));
    }
    let admitted = users
        .iter()
        .filter(|m| device.ingress.admits_user(&m.address))
        .count();
    if admitted >= config.max_user_mailboxes_per_device {
        return Err(IssueError::Limit(format!(
            "device `{}` already reaches {admitted} user mailboxes, the limit (`[tokens] max_user_mailboxes_per_device` = {}); delete unused ones or raise the limit",
            device.name, config.max_user_mailboxes_per_device
        )));
    }
    Ok(())
}

/// A new user mailbox record from the device's `user_provider`.
async fn new_user_mailbox(
    service: &TokenService,
    tenant: &str,
    device: &Device,
    address: &str,
    name: &str,
    purpose: MailPurpose,
) -> Result<Mailbox, IssueError> {
    let state = service.state();
    if device.user_provider.is_empty() {
        return Err(IssueError::Precondition(format!(
            "device.user_provider: device `{}` has no provider for user mailboxes; set one with `tokenfleetctl device update --tenant {tenant} --name {} --user-provider <provider>`",
            device.name, device.name
        )));
    }
    let provider = Records::new(state.store.as_ref())
        .get::<Provider>(&provider_key(tenant, &device.user_provider))
        .await?
        .ok_or_else(|| {
            IssueError::Precondition(format!(
                "device.user_provider: provider `{}` of device `{}` does not exist in tenant `{tenant}`",
                device.user_provider, device.name
            ))
        })?
        .value;
    let grant_type = match provider.kind {
        ProviderKind::Microsoft => GrantType::DelegatedDeviceCode,
        ProviderKind::Google | ProviderKind::Generic => GrantType::DelegatedAuthCode,
    };
    Ok(Mailbox {
        consent_account: String::new(),
        tenant: tenant.to_owned(),
        name: name.to_owned(),
        address: address.to_owned(),
        provider: provider.name,
        grant_type,
        kind: MailboxKind::User,
        purposes: vec![purpose],
        disabled: false,
        token: Default::default(),
        stamps: Stamps::new(state.clock.now()),
    })
}

async fn audit_mailbox(
    service: &TokenService,
    actor: &str,
    action: &str,
    mailbox: &Mailbox,
    detail: String,
) {
    let state = service.state();
    let event = AuditEvent {
        time: state.clock.now(),
        actor: actor.to_owned(),
        action: action.to_owned(),
        target: crate::ops::names::object_path(&mailbox.tenant, "mailboxes", &mailbox.name),
        tenant: mailbox.tenant.clone(),
        result: "ok".to_owned(),
        detail: audit::detail(detail),
    };
    audit::record(state, &Scope::Tenant(mailbox.tenant.clone()), event).await;
}

/// Whether the mailbox's grant was obtained without a scope its purposes now need.
async fn lacks_scopes(
    service: &TokenService,
    tenant: &str,
    mailbox: &Mailbox,
) -> Result<bool, IssueError> {
    let Some(grant) = service.grant(tenant, &mailbox.name).await? else {
        return Ok(false);
    };
    if grant.value.scopes.is_empty() {
        return Ok(false);
    }
    let target = consent::load_target(service.state(), tenant, &mailbox.name).await?;
    let Ok(needed) = target
        .client
        .scopes_for(mailbox.grant_type, &mailbox.purposes)
    else {
        return Ok(false);
    };
    // Providers do not echo these in the token response.
    const IMPLIED: [&str; 4] = ["offline_access", "openid", "profile", "email"];
    Ok(needed
        .iter()
        .filter(|s| !IMPLIED.contains(&s.as_str()))
        .any(|s| !grant.value.scopes.iter().any(|g| g.eq_ignore_ascii_case(s))))
}

/// What [`pending_consent`] found.
enum Pending {
    /// A consent is pending, with this much time left.
    Waiting(UserConsent),
    /// The grant is usable now.
    Granted,
    /// Nothing usable is pending.
    Nothing,
}

/// The consent pending for the mailbox, if one is and it has at least [`PENDING_MIN_LEFT`]
/// left.
async fn pending_consent(
    service: &TokenService,
    tenant: &str,
    name: &str,
) -> Result<Pending, IssueError> {
    let state = service.state();
    let stored = consent::load_grant(state, tenant, name).await?;
    let grant = stored.grant;
    if grant.pending.is_none()
        && matches!(
            grant.state.status,
            TokenStatus::Active | TokenStatus::RefreshFailing
        )
    {
        return Ok(Pending::Granted);
    }
    let fresh = |expires: OffsetDateTime| expires - state.clock.now() >= PENDING_MIN_LEFT;
    match &grant.pending {
        Some(PendingConsent::DeviceCode {
            user_code,
            verification_uri,
            message,
            expires,
            ..
        }) if fresh(*expires) => Ok(Pending::Waiting(UserConsent {
            mailbox: name.to_owned(),
            user_code: user_code.clone(),
            verification_uri: verification_uri.clone(),
            expires: *expires,
            message: message.clone(),
            authorization_url: String::new(),
        })),
        Some(PendingConsent::AuthCode {
            state: oauth_state,
            expires,
            ..
        }) if fresh(*expires) => {
            let key = consent_url_key(tenant, name);
            let Some(record) = state.store.get(&key).await? else {
                return Ok(Pending::Nothing);
            };
            let url: UserConsentUrl =
                serde_json::from_slice(&record.data).map_err(|e| StoreError::Corrupt {
                    key: key.to_string(),
                    problem: format!("not a valid user consent URL record: {e}"),
                })?;
            if url.state != *oauth_state {
                // Started elsewhere (e.g. `tokenfleetctl mailbox consent`): its URL is unknown here.
                return Ok(Pending::Nothing);
            }
            Ok(Pending::Waiting(UserConsent {
                mailbox: name.to_owned(),
                user_code: String::new(),
                verification_uri: String::new(),
                expires: *expires,
                message: String::new(),
                authorization_url: url.url,
            }))
        }
        _ => Ok(Pending::Nothing),
    }
}

/// The consent the person must complete for the user mailbox: the pending one, or a new one
/// (one start at a time across replicas). `None` when the grant became usable meanwhile.
/// `replace` starts a new consent even when the grant is usable (its scopes are stale).
async fn user_consent(
    service: &TokenService,
    tenant: &str,
    name: &str,
    public_url: &str,
    replace: bool,
) -> Result<Option<UserConsent>, IssueError> {
    let state = service.state();
    let lease = format!("consent-start/{tenant}/{name}");
    let owner = format!(
        "{}-{}",
        service.config().replica_id,
        uuid::Uuid::new_v4().simple()
    );
    let deadline = tokio::time::Instant::now() + service.config().wait_timeout();
    let mut pause = START_WAIT_PAUSE.0;
    loop {
        match pending_consent(service, tenant, name).await? {
            Pending::Waiting(c) => return Ok(Some(c)),
            Pending::Granted if !replace => return Ok(None),
            Pending::Granted | Pending::Nothing => {}
        }
        if let Some(held) = state
            .store
            .try_lease(&lease, &owner, service.config().lease_ttl)
            .await?
        {
            // The lease is short (seconds) and the start calls the provider: keep it renewed while
            // the start runs, so no second replica starts a parallel consent meanwhile.
            let _keep = service.keep(&held);
            let result = start_user_consent(service, tenant, name, public_url, replace).await;
            if let Err(error) = state.store.release_lease(&lease, &owner).await {
                tracing::warn!(%error, tenant, mailbox = name, "releasing the consent-start lease failed");
            }
            return result;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(TokenError::Busy {
                mailbox: name.to_owned(),
            }
            .into());
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(START_WAIT_PAUSE.1);
    }
}

/// Starts the consent, holding the consent-start lease.
async fn start_user_consent(
    service: &TokenService,
    tenant: &str,
    name: &str,
    public_url: &str,
    replace: bool,
) -> Result<Option<UserConsent>, IssueError> {
    let state = service.state();
    // Re-read under the lease: another request may have started it just before.
    match pending_consent(service, tenant, name).await? {
        Pending::Waiting(c) => return Ok(Some(c)),
        Pending::Granted if !replace => return Ok(None),
        Pending::Granted | Pending::Nothing => {}
    }
    let outcome = consent::start(state, tenant, name, None, public_url).await?;
    tracing::info!(tenant, mailbox = name, "consent started for a user mailbox");
    match outcome.challenge {
        Challenge::None => Ok(None),
        Challenge::DeviceCode {
            user_code,
            verification_uri,
            message,
            expires,
            ..
        } => Ok(Some(UserConsent {
            mailbox: name.to_owned(),
            user_code,
            verification_uri,
            expires,
            message,
            authorization_url: String::new(),
        })),
        Challenge::Authorization {
            url,
            state: oauth_state,
            expires,
            ..
        } => {
            let record = UserConsentUrl {
                tenant: tenant.to_owned(),
                mailbox: name.to_owned(),
                state: oauth_state,
                url: url.clone(),
                expires,
            };
            let key = consent_url_key(tenant, name);
            let data = serde_json::to_vec(&record).map_err(|e| StoreError::Corrupt {
                key: key.to_string(),
                problem: format!("cannot encode user consent URL record: {e}"),
            })?;
            state.store.put(&key, data, Precondition::Any).await?;
            Ok(Some(UserConsent {
                mailbox: name.to_owned(),
                user_code: String::new(),
                verification_uri: String::new(),
                expires,
                message: String::new(),
                authorization_url: url,
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::OffsetDateTime;
    use tokenfleet_domain::Stamps;

    fn device(mode: SenderMode) -> Device {
        Device {
            tenant: "acme".into(),
            name: "mfp".into(),
            display_name: String::new(),
            agent: String::new(),
            sender_mode: mode,
            admin_mailbox: "admin".into(),
            bulk_mailbox: "bulk".into(),
            allowed_mailboxes: vec!["alice".into(), "bob".into()],
            smtp: Default::default(),
            fetch: Default::default(),
            ingress: Default::default(),
            user_provider: String::new(),
            stamps: Stamps::new(OffsetDateTime::UNIX_EPOCH),
        }
    }

    #[test]
    fn sender_modes_pick_the_mailboxes() {
        let d = device(SenderMode::FixedAdmin);
        assert!(device_may_use(&d, "admin"));
        assert!(!device_may_use(&d, "bulk") && !device_may_use(&d, "alice"));
        let d = device(SenderMode::Bulk);
        assert!(device_may_use(&d, "bulk"));
        assert!(!device_may_use(&d, "admin") && !device_may_use(&d, "alice"));
        let d = device(SenderMode::LoginUser);
        assert!(device_may_use(&d, "alice") && device_may_use(&d, "bob"));
        assert!(!device_may_use(&d, "admin") && !device_may_use(&d, "carol"));
        let d = device(SenderMode::AllowUserChange);
        assert!(device_may_use(&d, "alice") && device_may_use(&d, "admin"));
        assert!(!device_may_use(&d, "bulk") && !device_may_use(&d, "carol"));
    }

    /// The records an agent's call reads, as the broker reads them with the agent's own.
    async fn snapshot(state: &crate::state::BrokerState, req: &AgentRequest<'_>) -> Snapshot {
        let keys = issue_keys("acme", req.device, req.mailbox, req.user_address);
        Snapshot::read(state.store.as_ref(), keys).await.unwrap()
    }

    /// Who may get a token: the rate limit comes first, then the purpose, then the device must
    /// be hosted by the calling agent (refused and audited otherwise); the hosting agent gets
    /// past that check to the device's own rules.
    #[tokio::test]
    async fn only_the_agent_hosting_the_device_gets_past_the_host_check() {
        let dir = tempfile::tempdir().unwrap();
        let state = crate::testing::state(dir.path()).await;
        crate::testing::put_tenant(&state, "acme").await;
        let mut hosted = device(SenderMode::FixedAdmin);
        hosted.agent = "site-b".into();
        Records::new(state.store.as_ref())
            .put(&hosted, Precondition::Any)
            .await
            .unwrap();
        let service = TokenService::new(state.clone(), Default::default());
        let unlimited = RateLimiter::new(crate::rate_limit::Rate {
            per_minute: 0,
            burst: 1,
        });
        let req = AgentRequest {
            device: "mfp",
            mailbox: "admin",
            user_address: "",
            purpose: Choice::Is(MailPurpose::Send),
        };
        let site_a = AgentId::new("acme", "site-a").unwrap();
        let site_b = AgentId::new("acme", "site-b").unwrap();
        let snap = snapshot(&state, &req).await;

        let err = issue_to_agent(&snap, &service, &unlimited, &site_a, &req, "")
            .await
            .unwrap_err();
        assert_eq!(
            err,
            crate::ops::Error::PermissionDenied(
                "device `mfp` is not hosted by agent `acme/site-a`".into()
            )
        );
        let events = audit::list(&state, &Scope::Tenant("acme".into()), None, 10)
            .await
            .unwrap();
        let refused = &events.first().expect("the refusal is audited").1;
        assert_eq!(
            (
                refused.action.as_str(),
                refused.result.as_str(),
                refused.actor.as_str(),
                refused.target.as_str(),
                refused.detail.as_str()
            ),
            (
                ISSUE_ACTION,
                "permission_denied",
                "agent:acme/site-a",
                "tenants/acme/mailboxes/admin",
                "device `mfp`, purpose send: device `mfp` is not hosted by agent `acme/site-a`"
            )
        );

        // The hosting agent passes the host check; the missing mailbox stops it next.
        let err = issue_to_agent(&snap, &service, &unlimited, &site_b, &req, "")
            .await
            .unwrap_err();
        assert!(
            !err.to_string().contains("not hosted"),
            "the hosting agent was refused as a stranger: {err}"
        );

        // The purpose is checked before the device, and the rate limit before both.
        let unset = AgentRequest {
            purpose: Choice::Unset,
            ..req
        };
        let err = issue_to_agent(&snap, &service, &unlimited, &site_a, &unset, "")
            .await
            .unwrap_err();
        assert_eq!(
            err,
            crate::ops::Error::InvalidArgument(
                "purpose: must be set (UNSPECIFIED is not a value)".into()
            )
        );
        let one = RateLimiter::new(crate::rate_limit::Rate {
            per_minute: 1,
            burst: 1,
        });
        let _ = issue_to_agent(&snap, &service, &one, &site_a, &unset, "").await;
        let err = issue_to_agent(&snap, &service, &one, &site_a, &unset, "")
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                crate::ops::Error::ResourceExhausted {
                    retry_after: Some(_),
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn user_mailbox_names_are_valid_stable_and_distinct() {
        let a = user_mailbox_name("Alice.Smith@Example.com");
        assert_eq!(a, user_mailbox_name("alice.smith@example.com"));
        assert!(a.starts_with("user-alice-smith-"), "{a}");
        assert_ne!(a, user_mailbox_name("alice.smith@example.org"));
        for address in [
            "a@b.c",
            "---@x.org",
            "ü+tag@x.org",
            &format!("{}@example.com", "x".repeat(64)),
            &format!("{}-@example.com", "y".repeat(48)),
        ] {
            let name = user_mailbox_name(address);
            tokenfleet_domain::name("mailbox", &name).unwrap_or_else(|e| panic!("{address}: {e}"));
        }
        assert_eq!(user_mailbox_name("---@x.org").len(), "user-".len() + 10);
    }
}
