//! Consent links: a single-use address an operator sends to a mailbox's owner, who opens it and
//! signs in with the provider there, with no operator present and no other access.
//!
//! A link is `<public_url>/consent/<token>`; the token is `tfc_` and 40 hex digits (160 random
//! bits). Like enrollment codes ([`crate::identity::codes`]) the store keeps only its SHA-256
//! (record id, global scope, so the public page finds it without knowing the tenant), with the
//! mailbox, who made it, its expiry and its state. The short link id shown to operators (for
//! `list` and `revoke`) is the first 16 hex digits of the hash, never the token.
//!
//! Operator side ([`create`], [`list`], [`revoke`]): authorized like consent itself (write access
//! to the mailbox's tenant creates and revokes, read access lists) and audited.
//!
//! Owner side ([`open`], [`start`], [`status`]): the token is the only credential. Opening
//! (`GET`) only explains and never consumes, so mail scanners that fetch links do not burn them.
//! **The link is consumed when the sign-in starts** ([`start`], a compare-and-set from `pending`
//! to `used`): the token is a bearer credential that was sent by mail, so once a person set out
//! to sign in, nobody else holding the link may restart the flow and race or replace theirs; a
//! person whose sign-in failed asks the operator for a new link (cheap, and the operator learns
//! of the failure). A start that fails before the provider was asked (provider misconfigured,
//! store down) puts the link back to `pending`. After the start, [`status`] keeps answering
//! the mailbox's status (and the device code to enter) until the link's expiry.
//!
//! The signed-in account is checked against the mailbox by the consent itself
//! ([`crate::tokens::consent::ConsentTarget::check_signed_in_account`]): a sign-in as somebody
//! else ends with `account_mismatch` and stores nothing.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use time::OffsetDateTime;
use tokenfleet_domain::{Device, GrantType, Mailbox, ProviderKind, TokenState, TokenStatus};
use tokenfleet_seal::Secret;
use tokenfleet_store::{Precondition, RecordKey, Scope, StoreError};

use crate::authz::{Access, Principal, Target, authorize};
use crate::identity::ca::hex;
use crate::ops::Error;
use crate::ops::change::{Change, audited, authorize_read};
use crate::ops::names::span_object;
use crate::records::{Records, mailbox_key};
use crate::state::BrokerState;
use crate::tokens::consent::{self, Challenge, StartOutcome};

/// Collection of consent link records (global scope, id = hex SHA-256 of the token).
pub const LINKS: &str = "consent_link";
/// Prefix of every link token.
pub const TOKEN_PREFIX: &str = "tfc_";
/// Path prefix of the owner's page on the broker's HTTP listener.
pub const LINK_PATH: &str = "/consent/";
/// Default lifetime of a link.
pub const DEFAULT_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Shortest lifetime of a link.
pub const MIN_TTL: Duration = Duration::from_secs(5 * 60);
/// Longest lifetime of a link.
pub const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Links that ended (expired, used, revoked) are kept this long for `list`, then removed.
pub const KEEP_ENDED: Duration = Duration::from_secs(7 * 24 * 3600);
/// Length of the link id shown to operators (hex digits of the hash).
pub const ID_LEN: usize = 16;

/// Where a link stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkState {
    /// Not opened for sign-in yet.
    Pending,
    /// The owner started the sign-in (the link is consumed).
    Used,
    /// An operator revoked it.
    Revoked,
}

impl LinkState {
    /// `pending`, `used`, `revoked`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Used => "used",
            Self::Revoked => "revoked",
        }
    }
}

/// A stored consent link (its hash, never the token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsentLink {
    /// Hex SHA-256 of the token (also the record id).
    pub hash: String,
    /// Tenant of the mailbox.
    pub tenant: String,
    /// The mailbox the link grants consent for.
    pub mailbox: String,
    /// Audit actor that created the link.
    pub created_by: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub expires: OffsetDateTime,
    pub state: LinkState,
    /// When the sign-in started (state `used`).
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub used: Option<OffsetDateTime>,
    /// When and by whom it was revoked.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub revoked: Option<OffsetDateTime>,
    #[serde(default)]
    pub revoked_by: String,
}

impl ConsentLink {
    /// The short id operators see and revoke by.
    pub fn id(&self) -> &str {
        &self.hash[..ID_LEN.min(self.hash.len())]
    }

    /// The state as shown: `expired` for a pending link past its expiry.
    pub fn shown_state(&self, now: OffsetDateTime) -> &'static str {
        if self.state == LinkState::Pending && now >= self.expires {
            "expired"
        } else {
            self.state.as_str()
        }
    }

    fn actor(&self) -> String {
        format!("consent-link:{}", self.id())
    }
}

/// Why the owner's page cannot go on. Unknown links answer like a missing page.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LinkError {
    /// No such link (never existed, or removed after it ended).
    #[error("this consent link does not exist; check that the whole address was copied")]
    Unknown,
    /// The link expired before it was used.
    #[error("this consent link has expired; ask your IT provider for a new one")]
    Expired,
    /// An operator revoked the link.
    #[error("this consent link was withdrawn by your IT provider; ask them for a new one")]
    Revoked,
    /// The sign-in was started with this link already.
    #[error(
        "this consent link has been used already (a link works once); ask your IT provider for a new one if the sign-in did not finish"
    )]
    Used,
    /// The operation failed.
    #[error(transparent)]
    Failed(#[from] Error),
}

impl From<StoreError> for LinkError {
    fn from(e: StoreError) -> Self {
        Self::Failed(e.into())
    }
}

fn link_key(hash: &str) -> RecordKey {
    RecordKey::global(LINKS, hash)
}

/// Hex SHA-256 of a token as given (surrounding white space removed).
pub fn hash_token(token: &str) -> String {
    hex(&Sha256::digest(token.trim().as_bytes()))
}

/// Whether `token` has the shape of a link token (garbage is refused without a store lookup).
pub fn well_formed(token: &str) -> bool {
    token.trim().strip_prefix(TOKEN_PREFIX).is_some_and(|rest| {
        rest.len() == 40
            && rest
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

fn generate() -> Result<Secret, Error> {
    let mut bytes = [0_u8; 20];
    getrandom::fill(&mut bytes).map_err(|e| Error::Internal {
        message: "the broker could not make a random link".to_owned(),
        detail: e.to_string(),
    })?;
    Ok(Secret::new(format!("{TOKEN_PREFIX}{}", hex(&bytes))))
}

fn decode(key: &RecordKey, data: &[u8]) -> Result<ConsentLink, StoreError> {
    serde_json::from_slice(data).map_err(|e| StoreError::Corrupt {
        key: key.to_string(),
        problem: format!("not a valid consent link record: {e}"),
    })
}

fn encode(key: &RecordKey, link: &ConsentLink) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(link).map_err(|e| StoreError::Corrupt {
        key: key.to_string(),
        problem: format!("cannot encode consent link: {e}"),
    })
}

/// The URL of a link token under the broker's public URL.
pub fn link_url(public_url: &str, token: &str) -> String {
    format!("{}{LINK_PATH}{token}", public_url.trim_end_matches('/'))
}

/// The lifetime a caller asked for in seconds: 0 is the default ([`DEFAULT_TTL`], `None`), a
/// negative number is refused (INVALID_ARGUMENT naming `ttl_seconds`). The range is checked by
/// [`create`], inside its audited change; this check is part of reading the request.
pub fn ttl_from_seconds(seconds: i64) -> Result<Option<Duration>, Error> {
    match seconds {
        0 => Ok(None),
        s if s < 0 => Err(Error::invalid(
            "ttl_seconds",
            "must not be negative (0 = 7 days)",
        )),
        s => Ok(Some(Duration::from_secs(s.unsigned_abs()))),
    }
}

/// A new link (the token, shown once, and its record).
#[derive(Debug)]
pub struct NewLink {
    /// The token; the URL is [`link_url`] of it.
    pub token: Secret,
    /// Its record.
    pub link: ConsentLink,
}

impl NewLink {
    /// The address to send to the mailbox's owner, under the broker's `public_url`.
    pub fn url(&self, public_url: &str) -> String {
        link_url(public_url, self.token.expose())
    }
}

/// Creates a link for `mailbox` of `tenant`, valid for `ttl` (`None`: [`DEFAULT_TTL`]; between
/// [`MIN_TTL`] and [`MAX_TTL`]). Only delegated mailboxes have a person who signs in.
pub async fn create(
    state: &BrokerState,
    principal: &Principal,
    tenant: &str,
    mailbox: &str,
    ttl: Option<Duration>,
) -> Result<NewLink, Error> {
    span_object(tenant, mailbox);
    audited(
        state,
        principal,
        Change::of_object("consent_link.create", tenant, "mailboxes", mailbox),
        async {
            authorize(principal, Target::Tenant(tenant), Access::Write)?;
            crate::resources::mailboxes::check_names(tenant, mailbox)?;
            let ttl = ttl.unwrap_or(DEFAULT_TTL);
            if ttl < MIN_TTL || ttl > MAX_TTL {
                return Err(Error::invalid(
                    "ttl_seconds",
                    format!(
                        "must be between {} and {} seconds (5 minutes to 30 days), got {}",
                        MIN_TTL.as_secs(),
                        MAX_TTL.as_secs(),
                        ttl.as_secs()
                    ),
                ));
            }
            let record = Records::new(state.store.as_ref())
                .get::<Mailbox>(&mailbox_key(tenant, mailbox))
                .await?
                .ok_or_else(|| {
                    Error::NotFound(format!(
                        "mailbox `{mailbox}` in tenant `{tenant}` not found"
                    ))
                })?
                .value;
            if !matches!(
                record.grant_type,
                GrantType::DelegatedDeviceCode | GrantType::DelegatedAuthCode
            ) {
                return Err(Error::precondition(
                    "mailbox",
                    format!(
                        "`{mailbox}` uses {} and obtains its token without a person signing in; a consent link is for delegated mailboxes (run `tokenfleetctl mailbox consent` instead)",
                        record.grant_type
                    ),
                ));
            }
            if record.disabled {
                return Err(Error::precondition(
                    "mailbox",
                    format!("`{mailbox}` is disabled; enable it first"),
                ));
            }
            let now = state.clock.now();
            purge(state, now).await?;
            let token = generate()?;
            let link = ConsentLink {
                hash: hash_token(token.expose()),
                tenant: tenant.to_owned(),
                mailbox: mailbox.to_owned(),
                created_by: principal.actor(),
                created: now,
                expires: now + ttl,
                state: LinkState::Pending,
                used: None,
                revoked: None,
                revoked_by: String::new(),
            };
            let key = link_key(&link.hash);
            state
                .store
                .put(&key, encode(&key, &link)?, Precondition::Absent)
                .await?;
            let detail = format!(
                "consent link {} created, expires {}",
                link.id(),
                rfc3339(link.expires)
            );
            Ok((NewLink { token, link }, detail))
        },
    )
    .await
}

/// Links of `tenant` (of one mailbox when `mailbox` is not empty), newest first.
pub async fn list(
    state: &BrokerState,
    principal: &Principal,
    tenant: &str,
    mailbox: &str,
) -> Result<Vec<ConsentLink>, Error> {
    span_object(tenant, mailbox);
    let read = || Change::of_collection("consent_link.list", tenant, "consent_links");
    authorize_read(state, principal, read, Target::Tenant(tenant)).await?;
    tokenfleet_domain::name("tenant", tenant)?;
    if !mailbox.is_empty() {
        tokenfleet_domain::name("mailbox", mailbox)?;
    }
    let mut links: Vec<ConsentLink> = all(state)
        .await?
        .into_iter()
        .map(|(_, l)| l)
        .filter(|l| l.tenant == tenant && (mailbox.is_empty() || l.mailbox == mailbox))
        .collect();
    links.sort_by(|a, b| b.created.cmp(&a.created).then(a.hash.cmp(&b.hash)));
    Ok(links)
}

/// Every link record with its version (global scan, page by page).
async fn all(state: &BrokerState) -> Result<Vec<(u64, ConsentLink)>, StoreError> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = state
            .store
            .list(&Scope::Global, LINKS, after.as_deref(), 500)
            .await?;
        let full = page.len() == 500;
        for (id, record) in &page {
            out.push((record.version, decode(&link_key(id), &record.data)?));
        }
        match page.last() {
            Some((id, _)) if full => after = Some(id.clone()),
            _ => return Ok(out),
        }
    }
}

/// Revokes the link with id `id` (the short id from [`list`]) of `tenant`. Revoking a revoked
/// link changes nothing; a used link is revoked too (its status page stops answering).
pub async fn revoke(
    state: &BrokerState,
    principal: &Principal,
    tenant: &str,
    id: &str,
) -> Result<ConsentLink, Error> {
    span_object(tenant, "");
    let id = id.trim().to_ascii_lowercase();
    audited(
        state,
        principal,
        Change {
            action: "consent_link.revoke",
            target: format!(
                "tenants/{tenant}/consent_links/{}",
                crate::ops::names::shown(&id)
            ),
            tenant: tenant.to_owned(),
        },
        async {
            authorize(principal, Target::Tenant(tenant), Access::Write)?;
            tokenfleet_domain::name("tenant", tenant)?;
            if id.len() != ID_LEN || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(Error::invalid(
                    "id",
                    format!("a link id is {ID_LEN} hex digits (see `consent-link list`)"),
                ));
            }
            // Ids are hash prefixes: the first record after the prefix is the only candidate.
            let not_found = || {
                Error::NotFound(format!(
                    "consent link `{id}` not found in tenant `{tenant}`"
                ))
            };
            let page = state
                .store
                .list(&Scope::Global, LINKS, Some(&id), 1)
                .await?;
            let Some((hash, record)) = page.into_iter().next().filter(|(h, _)| h.starts_with(&id))
            else {
                return Err(not_found());
            };
            let key = link_key(&hash);
            let mut link = decode(&key, &record.data)?;
            if link.tenant != tenant {
                return Err(not_found());
            }
            if link.state == LinkState::Revoked {
                return Ok((link, "already revoked".to_owned()));
            }
            link.state = LinkState::Revoked;
            link.revoked = Some(state.clock.now());
            link.revoked_by = principal.actor();
            state
                .store
                .put(
                    &key,
                    encode(&key, &link)?,
                    Precondition::Version(record.version),
                )
                .await
                .map_err(|e| match e {
                    StoreError::Conflict { .. } => Error::Aborted(
                        "the link changed while it was being revoked; try again".to_owned(),
                    ),
                    other => other.into(),
                })?;
            let detail = format!(
                "consent link {} of mailbox `{}` revoked",
                link.id(),
                link.mailbox
            );
            Ok((link, detail))
        },
    )
    .await
}

/// Removes links that ended more than [`KEEP_ENDED`] ago.
async fn purge(state: &BrokerState, now: OffsetDateTime) -> Result<(), StoreError> {
    for (version, link) in all(state).await? {
        let ended = match link.state {
            LinkState::Pending | LinkState::Used => link.expires,
            LinkState::Revoked => link.revoked.unwrap_or(link.expires),
        };
        if now >= ended + KEEP_ENDED {
            state
                .store
                .delete(&link_key(&link.hash), Precondition::Version(version))
                .await
                .ok();
        }
    }
    Ok(())
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// The owner's side: the token is the credential.

/// What the owner's page shows before the sign-in: everything in the customer's terms.
#[derive(Debug, Clone)]
pub struct LinkPage {
    pub link: ConsentLink,
    /// The mailbox's address.
    pub address: String,
    /// The account expected to sign in (the address, or the mailbox's `consent_account`).
    pub account: String,
    pub provider_kind: ProviderKind,
    pub grant_type: GrantType,
    /// The scopes the sign-in asks for.
    pub scopes: Vec<String>,
    /// Devices (display name or name) that will use the grant.
    pub devices: Vec<String>,
    /// The mailbox's token status now.
    pub status: TokenStatus,
}

async fn find(state: &BrokerState, token: &str) -> Result<(u64, ConsentLink), LinkError> {
    if !well_formed(token) {
        return Err(LinkError::Unknown);
    }
    let key = link_key(&hash_token(token));
    let record = state.store.get(&key).await?.ok_or(LinkError::Unknown)?;
    Ok((record.version, decode(&key, &record.data)?))
}

/// Checks a link for the page: unknown, revoked, used and expired links answer their error.
/// `allow_used`: the status page of a started sign-in (until the link's expiry).
fn usable(link: &ConsentLink, now: OffsetDateTime, allow_used: bool) -> Result<(), LinkError> {
    match link.state {
        LinkState::Revoked => Err(LinkError::Revoked),
        _ if now >= link.expires => Err(LinkError::Expired),
        LinkState::Used if !allow_used => Err(LinkError::Used),
        _ => Ok(()),
    }
}

/// Reads a link for its page (never consumes it).
pub async fn open(state: &BrokerState, token: &str) -> Result<LinkPage, LinkError> {
    let (_, link) = find(state, token).await?;
    usable(&link, state.clock.now(), false)?;
    describe(state, link).await
}

async fn describe(state: &BrokerState, link: ConsentLink) -> Result<LinkPage, LinkError> {
    let target = consent::load_target(state, &link.tenant, &link.mailbox)
        .await
        .map_err(|e| LinkError::Failed(e.into()))?;
    let scopes = target
        .scopes_to_request()
        .map_err(|e| LinkError::Failed(e.into()))?;
    let m = &target.mailbox.value;
    let devices = Records::new(state.store.as_ref())
        .list_all::<Device>(&Scope::Tenant(link.tenant.clone()))
        .await?
        .into_iter()
        .filter(|d| d.value.referenced_mailboxes().any(|n| n == m.name))
        .map(|d| {
            if d.value.display_name.is_empty() {
                d.value.name
            } else {
                d.value.display_name
            }
        })
        .collect();
    Ok(LinkPage {
        address: m.address.clone(),
        account: if m.consent_account.is_empty() {
            m.address.clone()
        } else {
            m.consent_account.clone()
        },
        provider_kind: target.provider.kind,
        grant_type: m.grant_type,
        scopes,
        devices,
        status: consent::load_grant(state, &link.tenant, &link.mailbox)
            .await?
            .grant
            .state
            .status,
        link,
    })
}

/// Starts the sign-in through a link: consumes it (see the module documentation), then starts
/// the mailbox's consent (auth code: the authorization URL to send the browser to, redirecting
/// back to `<public_url>/oauth/callback`; device code: the user code to enter).
pub async fn start(
    state: &BrokerState,
    token: &str,
    public_url: &str,
) -> Result<(ConsentLink, StartOutcome), LinkError> {
    let (version, mut link) = find(state, token).await?;
    let now = state.clock.now();
    usable(&link, now, false)?;
    let key = link_key(&link.hash);
    link.state = LinkState::Used;
    link.used = Some(now);
    let used_version = match state
        .store
        .put(&key, encode(&key, &link)?, Precondition::Version(version))
        .await
    {
        Ok(v) => v,
        // Another request consumed (or an operator revoked) it first.
        Err(StoreError::Conflict { .. }) => return Err(LinkError::Used),
        Err(e) => return Err(e.into()),
    };
    let actor = link.actor();
    match consent::start(state, &link.tenant, &link.mailbox, None, public_url).await {
        Ok(outcome) => {
            let detail = match &outcome.challenge {
                Challenge::DeviceCode { .. } => "device code issued through a consent link",
                Challenge::Authorization { .. } => {
                    "authorization URL issued through a consent link"
                }
                Challenge::None => "token obtained through a consent link",
            };
            consent::audit(
                state,
                &actor,
                "consent.start",
                &link.tenant,
                &link.mailbox,
                "ok",
                detail,
            )
            .await;
            Ok((link, outcome))
        }
        Err(e) => {
            let err = Error::from(e);
            consent::audit(
                state,
                &actor,
                "consent.start",
                &link.tenant,
                &link.mailbox,
                err.result(),
                &err.to_string(),
            )
            .await;
            // Nobody signed in: the link may be tried again once the cause is fixed.
            link.state = LinkState::Pending;
            link.used = None;
            let _ = state
                .store
                .put(
                    &key,
                    encode(&key, &link)?,
                    Precondition::Version(used_version),
                )
                .await;
            Err(LinkError::Failed(err))
        }
    }
}

/// The mailbox's token state (from its grant record, as every surface shows it; DISABLED for a
/// disabled mailbox) for the page of a link, until the link's expiry.
pub async fn status(state: &BrokerState, token: &str) -> Result<TokenState, LinkError> {
    let (_, link) = find(state, token).await?;
    usable(&link, state.clock.now(), true)?;
    let mailbox = Records::new(state.store.as_ref())
        .get::<Mailbox>(&mailbox_key(&link.tenant, &link.mailbox))
        .await?
        .ok_or(LinkError::Unknown)?;
    let mut token_state = consent::load_grant(state, &link.tenant, &link.mailbox)
        .await?
        .grant
        .state;
    if mailbox.value.disabled {
        token_state.status = TokenStatus::Disabled;
    }
    Ok(token_state)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(state: LinkState, expires_in: i64) -> ConsentLink {
        let now = OffsetDateTime::UNIX_EPOCH + time::Duration::days(1000);
        ConsentLink {
            hash: "0123456789abcdef0123".into(),
            tenant: "t".into(),
            mailbox: "m".into(),
            created_by: "apikey:x".into(),
            created: now,
            expires: now + time::Duration::seconds(expires_in),
            state,
            used: None,
            revoked: None,
            revoked_by: String::new(),
        }
    }

    #[test]
    fn tokens_are_checked_before_any_lookup() {
        assert!(well_formed(&format!("{TOKEN_PREFIX}{}", "a".repeat(40))));
        for bad in ["", "tfc_", "tfc_xyz", &format!("tfe_{}", "a".repeat(40))] {
            assert!(!well_formed(bad), "{bad}");
        }
        assert_eq!(hash_token(" x "), hash_token("x"));
    }

    #[test]
    fn usability_follows_state_and_expiry() {
        let now = OffsetDateTime::UNIX_EPOCH + time::Duration::days(1000);
        assert_eq!(usable(&link(LinkState::Pending, 10), now, false), Ok(()));
        assert_eq!(
            usable(&link(LinkState::Pending, 0), now, false),
            Err(LinkError::Expired)
        );
        assert_eq!(
            usable(&link(LinkState::Used, 10), now, false),
            Err(LinkError::Used)
        );
        assert_eq!(usable(&link(LinkState::Used, 10), now, true), Ok(()));
        assert_eq!(
            usable(&link(LinkState::Revoked, 10), now, true),
            Err(LinkError::Revoked)
        );
        assert_eq!(link(LinkState::Pending, 0).shown_state(now), "expired");
        assert_eq!(link(LinkState::Pending, 0).id(), "0123456789abcdef");
    }

    #[test]
    fn requested_lifetimes_are_read() {
        assert_eq!(ttl_from_seconds(0).unwrap(), None);
        assert_eq!(
            ttl_from_seconds(3600).unwrap(),
            Some(Duration::from_secs(3600))
        );
        let err = ttl_from_seconds(-1).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidArgument(m) if m.starts_with("ttl_seconds:")),
            "{err}"
        );
    }
}
