//! The grant record: everything the broker keeps about a mailbox's OAuth grant. Secret material
//! (refresh token, access token, device code, PKCE verifier) is sealed with associated data that
//! names the mailbox and the field, so it cannot be moved to another mailbox or field.
//!
//! One grant mints access tokens per resource ([`TokenResource`]): the mail protocols' token is
//! `access_token` (refreshed on schedule); tokens of other resources (Microsoft Graph) are kept
//! in `resource_tokens`, each sealed under its own field name, and minted on demand.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokenfleet_domain::TokenState;
use tokenfleet_providers::TokenResource;
use tokenfleet_seal::{Keyring, SealError, Sealed, Secret};
use tokenfleet_store::RecordKey;

/// Collection of [`GrantRecord`]s (tenant scope, id = mailbox name).
pub const GRANTS: &str = "grant";

/// Store key of a mailbox's grant.
pub fn grant_key(tenant: &str, mailbox: &str) -> RecordKey {
    RecordKey::tenant(tenant, GRANTS, mailbox)
}

/// Sealed fields of a grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantField {
    /// The refresh token.
    RefreshToken,
    /// The cached access token.
    AccessToken,
    /// A pending device code.
    DeviceCode,
    /// A pending PKCE verifier.
    PkceVerifier,
    /// The cached access token of a resource other than the mail protocols.
    ResourceAccessToken(TokenResource),
}

impl GrantField {
    fn as_str(self) -> &'static str {
        match self {
            GrantField::RefreshToken => "refresh_token",
            GrantField::AccessToken => "access_token",
            GrantField::DeviceCode => "device_code",
            GrantField::PkceVerifier => "pkce_verifier",
            GrantField::ResourceAccessToken(TokenResource::MailProtocols) => "access_token",
            GrantField::ResourceAccessToken(TokenResource::MicrosoftGraph) => "access_token@graph",
        }
    }
}

/// Associated data binding a sealed grant field to its mailbox.
pub fn grant_aad(tenant: &str, mailbox: &str, field: GrantField) -> String {
    format!(
        "tenants/{tenant}/mailboxes/{mailbox}/grant#{}",
        field.as_str()
    )
}

/// Seals a grant field.
pub fn seal_field(
    keyring: &Keyring,
    tenant: &str,
    mailbox: &str,
    field: GrantField,
    value: &Secret,
) -> Result<Sealed, SealError> {
    keyring.seal_secret(&grant_aad(tenant, mailbox, field), value)
}

/// Opens a grant field.
pub fn open_field(
    keyring: &Keyring,
    tenant: &str,
    mailbox: &str,
    field: GrantField,
    sealed: &Sealed,
) -> Result<Secret, SealError> {
    keyring.open_secret(&grant_aad(tenant, mailbox, field), sealed)
}

/// A consent waiting for a person.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "flow", rename_all = "snake_case")]
pub enum PendingConsent {
    /// RFC 8628 device code: the broker polls the token endpoint.
    DeviceCode {
        /// Sealed ([`GrantField::DeviceCode`]).
        device_code: Sealed,
        user_code: String,
        verification_uri: String,
        message: String,
        #[serde(with = "time::serde::rfc3339")]
        expires: OffsetDateTime,
        /// Current polling interval (grows by 5 s on every `slow_down`).
        interval_secs: u64,
        #[serde(with = "time::serde::rfc3339")]
        next_poll: OffsetDateTime,
        /// Scopes requested.
        scopes: Vec<String>,
    },
    /// Authorization code with PKCE: waiting for the redirect or a pasted code.
    AuthCode {
        /// Anti-forgery value the redirect must carry back.
        state: String,
        /// Sealed ([`GrantField::PkceVerifier`]).
        pkce_verifier: Sealed,
        redirect_uri: String,
        #[serde(with = "time::serde::rfc3339")]
        expires: OffsetDateTime,
        /// Scopes requested.
        scopes: Vec<String>,
    },
}

/// An access token of a resource other than the mail protocols, minted from the grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceToken {
    /// Sealed ([`GrantField::ResourceAccessToken`]).
    pub access_token: Sealed,
    /// When it expires.
    #[serde(with = "time::serde::rfc3339")]
    pub expires: OffsetDateTime,
    /// When it was obtained.
    #[serde(with = "time::serde::rfc3339")]
    pub obtained: OffsetDateTime,
}

/// Everything the broker keeps about one mailbox's grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantRecord {
    pub tenant: String,
    pub mailbox: String,
    /// Public state shown on every surface.
    #[serde(default)]
    pub state: TokenState,
    /// Sealed ([`GrantField::RefreshToken`]); `None` for app-only and service-account grants.
    #[serde(default)]
    pub refresh_token: Option<Sealed>,
    /// Sealed ([`GrantField::AccessToken`]).
    #[serde(default)]
    pub access_token: Option<Sealed>,
    /// Scopes the grant covers.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// When the current refresh token was obtained.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub refresh_token_obtained: Option<OffsetDateTime>,
    /// When the refresh token is known to expire (e.g. Google apps in "Testing": 7 days).
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub refresh_token_expires: Option<OffsetDateTime>,
    /// Consecutive failed refresh attempts (drives backoff).
    #[serde(default)]
    pub consecutive_failures: u32,
    /// Next scheduled refresh or retry.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub next_refresh: Option<OffsetDateTime>,
    /// The provider's `Retry-After` for this grant's last failure: nothing calls the provider
    /// for the grant before it (not a device's request, not the breaker's release).
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub retry_not_before: Option<OffsetDateTime>,
    /// Provider clock minus broker clock at the last token response, seconds.
    #[serde(default)]
    pub clock_skew_secs: i64,
    /// A consent in progress.
    #[serde(default)]
    pub pending: Option<PendingConsent>,
    /// Fence of the lease under which this record was last written (stale writers detectable).
    #[serde(default)]
    pub fence: u64,
    /// When an agent was last handed an access token of this grant (updated at most every
    /// [`LAST_ISSUED_GRANULARITY`]); drives the idle deletion of user tokens.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub last_issued: Option<OffsetDateTime>,
    /// Cached access tokens of resources other than the mail protocols (Microsoft Graph), by
    /// [`TokenResource::as_str`]. Cleared whenever the grant's credentials are replaced.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub resource_tokens: BTreeMap<String, ResourceToken>,
}

/// `last_issued` is rewritten only when it is older than this (one store write per mailbox per
/// hour at most, however many tokens are issued).
pub const LAST_ISSUED_GRANULARITY: time::Duration = time::Duration::hours(1);

impl GrantRecord {
    /// A grant with nothing retrieved yet.
    pub fn empty(tenant: &str, mailbox: &str) -> Self {
        Self {
            tenant: tenant.to_owned(),
            mailbox: mailbox.to_owned(),
            state: TokenState::default(),
            refresh_token: None,
            access_token: None,
            scopes: Vec::new(),
            refresh_token_obtained: None,
            refresh_token_expires: None,
            consecutive_failures: 0,
            next_refresh: None,
            retry_not_before: None,
            clock_skew_secs: 0,
            pending: None,
            fence: 0,
            last_issued: None,
            resource_tokens: BTreeMap::new(),
        }
    }

    /// Store key of this record.
    pub fn key(&self) -> RecordKey {
        grant_key(&self.tenant, &self.mailbox)
    }

    /// The cached access token of `resource`: the sealed token, its expiry and when it was
    /// obtained (each `None` when there is none).
    pub fn cached(
        &self,
        resource: TokenResource,
    ) -> (
        Option<&Sealed>,
        Option<OffsetDateTime>,
        Option<OffsetDateTime>,
    ) {
        match resource {
            TokenResource::MailProtocols => (
                self.access_token.as_ref(),
                self.state.access_token_expires,
                self.state.last_refresh,
            ),
            other => match self.resource_tokens.get(other.as_str()) {
                Some(t) => (Some(&t.access_token), Some(t.expires), Some(t.obtained)),
                None => (None, None, None),
            },
        }
    }

    /// The sealed-field name of `resource`'s access token.
    pub fn access_field(resource: TokenResource) -> GrantField {
        match resource {
            TokenResource::MailProtocols => GrantField::AccessToken,
            other => GrantField::ResourceAccessToken(other),
        }
    }
}

impl crate::records::StoredRecord for GrantRecord {
    const COLLECTION: &'static str = GRANTS;
    fn key(&self) -> RecordKey {
        grant_key(&self.tenant, &self.mailbox)
    }
}
