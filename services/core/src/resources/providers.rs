//! Providers as a [`Resource`], in domain types: callers send a [`ProviderInput`] (the fields as
//! given, secrets in clear) and get back a [`ProviderView`] (the record without its sealed
//! secrets, which flags say are set). Client secrets, service-account keys and proxy passwords are
//! sealed before they are stored, bound to the provider through the associated data, and never
//! returned (a proxy URL is shown as `http://user:[redacted]@host`). A provider's kind is
//! immutable; a provider that mailboxes or devices use is not deleted.
//!
//! Where a provider's requests go — its endpoints, its HTTP proxy, its extra trusted CA — decides
//! who receives the stored secrets and refresh tokens. So:
//! - pointing a provider at a host other than the well-known Microsoft and Google sign-in hosts
//!   (or a proxy, or adding a trust root) is a fleet-level decision: fleet admins may, other
//!   callers only to hosts in the broker's `[admin] provider_hosts` allowlist ([`ProviderPolicy`]);
//! - changing the destination of an existing provider requires every stored secret that would
//!   follow it (client secret, service-account key, proxy password) in the same request, and
//!   discards the grants of the mailboxes that use the provider (revoked at the old destination
//!   first), so no refresh token is ever sent to the new host. The audit entry names the old and
//!   the new hosts.

use tokenfleet_domain::{
    self as dom, MAX_TEXT_LEN, Mailbox, Provider, ProviderEndpoints, ProviderKind, Role, Stamps,
    Valid, ValidationError,
};
use tokenfleet_seal::{Sealed, Secret};
use tokenfleet_store::Scope;

use super::fields::list_len;
use crate::authz::Principal;
use crate::ops::Error;
use crate::ops::choice::Choice;
use crate::ops::mask::{FieldTable, SecretChange, UpdateMask, secret_change};
use crate::ops::names::{name_list, shown};
use crate::ops::provider_policy::ProviderPolicy;
use crate::ops::resource::{self, Id, Resource, resource_names};
use crate::ops::stored::{Reference, Referrer, records};
use crate::records::provider_key;
use crate::state::BrokerState;
use crate::tokens::lifecycle::{Revocation, TokenService};

/// Most scopes a provider may list.
const MAX_SCOPES: usize = 50;

/// The fields of a provider as update masks name them (the Admin API's field names). The kind
/// is immutable: mailboxes' grant types were checked against it.
pub const FIELDS: FieldTable = FieldTable {
    resource: "provider",
    mutable: &[
        "authority",
        "client_id",
        "client_secret",
        "endpoints",
        "http_proxy",
        "tls",
        "scopes",
        "service_account_key",
    ],
    immutable: &["tenant", "name", "kind"],
    output_only: &[
        "client_secret_set",
        "service_account_key_set",
        "create_time",
        "update_time",
        "version",
    ],
};

/// A provider as a caller sent it, before validation. Secrets are in clear and input only
/// (empty: none given); the proxy URL may carry a password (`http://user:password@host`).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ProviderInput {
    /// Version the change is conditional on (0: unconditional).
    pub version: u64,
    /// Tenant.
    pub tenant: String,
    /// Name.
    pub name: String,
    /// Microsoft, Google or generic.
    pub kind: Choice<ProviderKind>,
    /// Entra authority segment (Microsoft only; empty: `organizations`).
    pub authority: String,
    /// OAuth client id.
    pub client_id: String,
    /// OAuth client secret.
    pub client_secret: Secret,
    /// Endpoint overrides.
    pub endpoints: ProviderEndpoints,
    /// HTTP proxy URL, possibly with a password.
    pub http_proxy: String,
    /// Extra trusted CA (PEM).
    pub extra_ca_pem: String,
    /// Scopes requested.
    pub scopes: Vec<String>,
    /// Google service-account key file contents.
    pub service_account_key: Secret,
}

impl std::fmt::Debug for ProviderInput {
    /// Secrets redacted, the proxy's password too.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderInput")
            .field("version", &self.version)
            .field("tenant", &self.tenant)
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("authority", &self.authority)
            .field("client_id", &self.client_id)
            .field("client_secret", &self.client_secret)
            .field("endpoints", &self.endpoints)
            .field("http_proxy", &dom::redact_url_password(&self.http_proxy))
            .field("extra_ca_pem", &self.extra_ca_pem)
            .field("scopes", &self.scopes)
            .field("service_account_key", &self.service_account_key)
            .finish()
    }
}

/// Secrets given with a provider (non-empty inputs only).
#[derive(Debug, Default)]
pub struct ProviderSecrets {
    /// `client_secret`.
    pub client_secret: Option<Secret>,
    /// `service_account_key`.
    pub service_account_key: Option<Secret>,
    /// The password inside `http_proxy` (`http://user:password@host`), taken out of the URL.
    pub http_proxy_password: Option<Secret>,
}

/// A provider as reads show it: the record without its sealed secrets (`None`), the proxy URL
/// with `[redacted]` for a stored password, and which secrets are set.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderView {
    /// Store version.
    pub version: u64,
    /// The provider, its secrets removed.
    pub provider: Provider,
    /// Whether a client secret is stored.
    pub client_secret_set: bool,
    /// Whether a service-account key is stored.
    pub service_account_key_set: bool,
}

/// The provider resource, with the policy for destinations and the token service that discards
/// grants when a provider is re-pointed.
#[derive(Debug, Clone)]
pub struct Providers {
    /// Where non-fleet-admin callers may point providers.
    pub policy: ProviderPolicy,
    /// Revokes and wipes grants.
    pub tokens: TokenService,
}

/// What an update does to the secrets, worked out once (sealed once), and what it did.
#[derive(Debug, Default)]
pub struct SecretsPlan {
    kind: Option<ProviderKind>,
    client_secret: SecretChange,
    service_account_key: SecretChange,
    sealed_client_secret: Option<Sealed>,
    sealed_service_account_key: Option<Sealed>,
    /// Whether the mask names `http_proxy` (its password then follows the URL).
    proxy_in_mask: bool,
    proxy_password: SecretChange,
    /// `re-pointed from … to …` when the destination changed.
    route: Option<String>,
    /// Mailboxes whose grants were discarded because of it.
    discarded: Vec<String>,
}

/// The proxy URL as shown: never the password; `http://user:[redacted]@proxy:3128` says one is
/// stored.
pub fn shown_proxy(p: &Provider) -> String {
    match &p.http_proxy_password {
        Some(_) if !p.http_proxy.is_empty() => {
            dom::with_url_password(&dom::split_url_password(&p.http_proxy).0, dom::REDACTED)
        }
        _ => dom::redact_url_password(&p.http_proxy),
    }
}

/// An Entra authority segment: `organizations`, `common`, `consumers`, a tenant id or a domain.
fn authority(field: &str, value: &str) -> Valid {
    if value.len() > 253
        || !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        let shown: String = value
            .chars()
            .take(80)
            .flat_map(char::escape_debug)
            .collect();
        return Err(ValidationError::new(
            field,
            format!(
                "`{shown}` is not an Entra tenant segment (organizations, common, consumers, a tenant id or a domain)"
            ),
        ));
    }
    Ok(())
}

/// An OAuth scope token (RFC 6749 §3.3: printable ASCII without space, `"` or `\`).
fn scope(field: &str, value: &str) -> Valid {
    if value.is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if value.len() > 512 {
        return Err(ValidationError::new(
            field,
            "must be at most 512 characters",
        ));
    }
    if !value
        .bytes()
        .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b))
    {
        return Err(ValidationError::new(
            field,
            "may contain only printable ASCII without spaces, quotes or backslashes (give one scope per entry)",
        ));
    }
    Ok(())
}

/// A Google service-account key: the JSON key file's contents. The value is never echoed.
fn service_account_key(field: &str, value: &str) -> Valid {
    dom::secret_len(field, value)?;
    let parsed: serde_json::Value = serde_json::from_str(value)
        .map_err(|_| ValidationError::new(field, "is not JSON (give the key file's contents)"))?;
    let text = |name: &str| {
        parsed
            .get(name)
            .and_then(serde_json::Value::as_str)
            .unwrap_or("")
    };
    if text("client_email").is_empty() || text("private_key").is_empty() {
        return Err(ValidationError::new(
            field,
            "is not a service-account key file (needs `client_email` and `private_key`)",
        ));
    }
    Ok(())
}

/// A validated provider record from what a caller sent. Secrets come back separately, unsealed;
/// the record's sealed fields are `None`.
pub fn from_input(p: &ProviderInput, stamps: Stamps) -> Valid<(Provider, ProviderSecrets)> {
    dom::name("provider.tenant", &p.tenant)?;
    dom::name("provider.name", &p.name)?;
    let kind = p.kind.required("provider.kind")?;
    let authority_value = match kind {
        dom::ProviderKind::Microsoft if p.authority.is_empty() => "organizations".to_owned(),
        dom::ProviderKind::Microsoft => {
            authority("provider.authority", &p.authority)?;
            p.authority.clone()
        }
        // Other kinds do not use an authority segment.
        _ => String::new(),
    };
    dom::required_text("provider.client_id", &p.client_id, MAX_TEXT_LEN)?;
    if p.client_id.chars().any(char::is_whitespace) {
        return Err(ValidationError::new(
            "provider.client_id",
            "must not contain spaces",
        ));
    }
    dom::secret_len("provider.client_secret", p.client_secret.expose())?;
    let e = p.endpoints.clone();
    let generic = kind == dom::ProviderKind::Generic;
    dom::url(
        "provider.endpoints.authorize_url",
        &e.authorize_url,
        generic,
    )?;
    dom::url("provider.endpoints.token_url", &e.token_url, generic)?;
    dom::url(
        "provider.endpoints.device_code_url",
        &e.device_code_url,
        false,
    )?;
    dom::url("provider.endpoints.revoke_url", &e.revoke_url, false)?;
    dom::url("provider.http_proxy", &p.http_proxy, false)?;
    let extra_ca_pem = p.extra_ca_pem.clone();
    dom::pem("provider.tls.extra_ca_pem", &extra_ca_pem)?;
    list_len("provider.scopes", p.scopes.len(), MAX_SCOPES)?;
    for (i, s) in p.scopes.iter().enumerate() {
        scope(&format!("provider.scopes[{i}]"), s)?;
    }
    if !p.service_account_key.is_empty() {
        if kind != dom::ProviderKind::Google {
            return Err(ValidationError::new(
                "provider.service_account_key",
                format!("only google providers use a service-account key, this one is {kind}"),
            ));
        }
        service_account_key(
            "provider.service_account_key",
            p.service_account_key.expose(),
        )?;
    }
    let nonempty = |s: &Secret| (!s.is_empty()).then(|| s.clone());
    // A proxy password is kept apart from the URL and sealed like the other secrets.
    let (proxy_url, proxy_password) = dom::split_url_password(&p.http_proxy);
    Ok((
        Provider {
            tenant: p.tenant.clone(),
            name: p.name.clone(),
            kind,
            authority: authority_value,
            client_id: p.client_id.clone(),
            client_secret: None,
            endpoints: ProviderEndpoints {
                authorize_url: e.authorize_url,
                token_url: e.token_url,
                device_code_url: e.device_code_url,
                revoke_url: e.revoke_url,
            },
            http_proxy: proxy_url,
            http_proxy_password: None,
            extra_ca_pem,
            scopes: p.scopes.clone(),
            service_account_key: None,
            stamps,
        },
        ProviderSecrets {
            client_secret: nonempty(&p.client_secret),
            service_account_key: nonempty(&p.service_account_key),
            http_proxy_password: proxy_password.filter(|p| !p.is_empty()).map(Secret::new),
        },
    ))
}

fn seal(state: &BrokerState, aad: &str, secret: &Secret) -> Result<Sealed, Error> {
    state
        .keyring
        .seal_secret(aad, secret)
        .map_err(|e| Error::seal(&e, aad))
}

/// Which secrets a change touched, for the audit detail (never the values).
fn secrets_detail(changes: &[(&str, &str)]) -> String {
    changes
        .iter()
        .filter(|(_, verb)| !verb.is_empty())
        .map(|(field, verb)| format!("{field} {verb}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `host[:port]` of a URL; `None` for an empty or unparsable one.
fn host_of(url: &str) -> Option<(String, Option<u16>)> {
    let parsed = url::Url::parse(url.trim()).ok()?;
    Some((parsed.host_str()?.to_ascii_lowercase(), parsed.port()))
}

fn host_text((host, port): &(String, Option<u16>)) -> String {
    match port {
        Some(p) => format!("{host}:{p}"),
        None => host.clone(),
    }
}

/// Everything that decides where a provider's requests (and so its secrets) go.
#[derive(Debug, PartialEq, Eq)]
struct Destination<'a> {
    endpoints: &'a tokenfleet_domain::ProviderEndpoints,
    /// The proxy URL without its password.
    http_proxy: &'a str,
    extra_ca_pem: &'a str,
}

impl<'a> Destination<'a> {
    fn of(p: &'a Provider) -> Self {
        Self {
            endpoints: &p.endpoints,
            http_proxy: &p.http_proxy,
            extra_ca_pem: &p.extra_ca_pem,
        }
    }

    /// The overridden endpoint URLs with their field names.
    fn overrides(&self) -> [(&'static str, &'a str); 4] {
        let e = self.endpoints;
        [
            ("provider.endpoints.authorize_url", e.authorize_url.as_str()),
            ("provider.endpoints.token_url", e.token_url.as_str()),
            (
                "provider.endpoints.device_code_url",
                e.device_code_url.as_str(),
            ),
            ("provider.endpoints.revoke_url", e.revoke_url.as_str()),
        ]
    }

    /// One line naming the hosts requests go to: the effective token endpoint (defaults per kind
    /// when not overridden), the proxy and whether an extra CA is trusted.
    fn describe(&self, p: &Provider) -> String {
        let token = tokenfleet_providers::ProviderSettings::from_provider(p, None)
            .ok()
            .and_then(|s| {
                s.endpoints
                    .token
                    .host_str()
                    .map(|h| match s.endpoints.token.port() {
                        Some(port) => format!("{h}:{port}"),
                        None => h.to_owned(),
                    })
            })
            .or_else(|| host_of(&p.endpoints.token_url).map(|h| host_text(&h)))
            .unwrap_or_else(|| "(none)".to_owned());
        let mut text = format!("token host {token}");
        if let Some(proxy) = host_of(self.http_proxy) {
            text.push_str(&format!(" via proxy {}", host_text(&proxy)));
        }
        if !self.extra_ca_pem.trim().is_empty() {
            text.push_str(" with an extra trusted CA");
        }
        text
    }
}

/// Endpoint URLs must not carry credentials (`https://user:password@host/…`): they would be shown
/// and stored in clear, and a provider authenticates with its client secret, not with the URL.
fn no_credentials_in_endpoints(dest: &Destination<'_>) -> Result<(), Error> {
    for (field, url) in dest.overrides() {
        if tokenfleet_domain::split_url_password(url).1.is_some() {
            return Err(Error::InvalidArgument(format!(
                "{field}: must not carry a password (`user:password@`); the provider \
                 authenticates with its client secret"
            )));
        }
    }
    Ok(())
}

/// Checks that `principal` may point a provider at `dest` (all of it on create, only what changes
/// on update). Fleet admins may use any host; others only well-known or allowlisted hosts, and
/// only fleet admins may add trust roots.
fn check_destination(
    principal: &Principal,
    policy: &ProviderPolicy,
    dest: &Destination<'_>,
    before: Option<&Destination<'_>>,
) -> Result<(), Error> {
    if principal.role == Role::FleetAdmin {
        return Ok(());
    }
    let denied = |field: &str, problem: String| {
        Error::PermissionDenied(format!(
            "{field}: {problem}; only a fleet-admin key may point a provider elsewhere (or a fleet \
             admin adds the host to the broker's `[admin] provider_hosts`)"
        ))
    };
    let before_overrides = before.map(Destination::overrides);
    for (i, (field, url)) in dest.overrides().into_iter().enumerate() {
        let unchanged = before_overrides.as_ref().is_some_and(|b| b[i].1 == url);
        if url.trim().is_empty() || unchanged {
            continue;
        }
        match host_of(url) {
            Some((host, port)) if policy.allows(&host, port) => {}
            Some(host) => {
                return Err(denied(
                    field,
                    format!(
                        "host `{}` is not a well-known Microsoft or Google sign-in host",
                        shown(&host_text(&host))
                    ),
                ));
            }
            // Malformed URLs are reported by validation, naming the field.
            None => {}
        }
    }
    if !dest.http_proxy.trim().is_empty() && before.is_none_or(|b| b.http_proxy != dest.http_proxy)
    {
        match host_of(dest.http_proxy) {
            Some((host, port)) if policy.allows(&host, port) => {}
            Some(host) => {
                return Err(denied(
                    "provider.http_proxy",
                    format!(
                        "proxy host `{}` is not allowlisted",
                        shown(&host_text(&host))
                    ),
                ));
            }
            None => {}
        }
    }
    if !dest.extra_ca_pem.trim().is_empty()
        && before.is_none_or(|b| b.extra_ca_pem != dest.extra_ca_pem)
    {
        return Err(Error::PermissionDenied(
            "provider.tls.extra_ca_pem: trusting another CA for a provider is a fleet-level \
             decision; only a fleet-admin key may set it"
                .to_owned(),
        ));
    }
    Ok(())
}

/// The proxy password an update leaves: `[redacted]` (as the provider is shown) keeps the stored
/// one; another password replaces it; none clears it.
fn proxy_password_change(given: Option<&Secret>) -> SecretChange {
    match given {
        Some(p) if p.expose() == tokenfleet_domain::REDACTED => SecretChange::Keep,
        Some(p) => SecretChange::Set(p.clone()),
        None => SecretChange::Clear,
    }
}

/// Refuses a change of destination that would carry a stored secret along: each stored secret
/// must be given again (or cleared) in the same request.
fn require_secrets_again(
    stored: &Provider,
    client_secret: &SecretChange,
    service_account_key: &SecretChange,
    proxy_password: &SecretChange,
    proxy_changed: bool,
    moved: &str,
) -> Result<(), Error> {
    let missing = |field: &str| {
        Error::InvalidArgument(format!(
            "provider.{field}: this update changes {moved}, where the stored {field} would be \
             sent; give the {field} again in the same request (or clear it)"
        ))
    };
    if stored.client_secret.is_some() && matches!(client_secret, SecretChange::Keep) {
        return Err(missing("client_secret"));
    }
    if stored.service_account_key.is_some() && matches!(service_account_key, SecretChange::Keep) {
        return Err(missing("service_account_key"));
    }
    if proxy_changed
        && stored.http_proxy_password.is_some()
        && matches!(proxy_password, SecretChange::Keep)
    {
        return Err(Error::InvalidArgument(
            "provider.http_proxy: the proxy changes and a proxy password is stored; give the \
             password again in the URL (`http://user:password@host:port`) or none"
                .to_owned(),
        ));
    }
    Ok(())
}

/// What of the destination changed, for messages: `endpoints, http_proxy`.
fn moved_fields(before: &Destination<'_>, after: &Destination<'_>) -> String {
    let mut fields = Vec::new();
    if before.endpoints != after.endpoints {
        fields.push("endpoints");
    }
    if before.http_proxy != after.http_proxy {
        fields.push("http_proxy");
    }
    if before.extra_ca_pem != after.extra_ca_pem {
        fields.push("tls.extra_ca_pem");
    }
    fields.join(", ")
}

/// `set`/`replaced`/`cleared` for the audit detail.
fn verb(change: &SecretChange) -> &'static str {
    match change {
        SecretChange::Keep => "",
        SecretChange::Clear => "cleared",
        SecretChange::Set(_) => "replaced",
    }
}

/// Deletes (revoking where the provider can) the grants of every mailbox that uses provider
/// `name`; returns the mailboxes whose grants were discarded.
async fn discard_grants(
    state: &BrokerState,
    tokens: &TokenService,
    tenant: &str,
    name: &str,
) -> Result<Vec<String>, Error> {
    let mailboxes = records(state)
        .list_all::<Mailbox>(&Scope::Tenant(tenant.to_owned()))
        .await?;
    let mut discarded = Vec::new();
    for m in mailboxes.iter().filter(|m| m.value.provider == name) {
        let revocation = tokens.delete_token(tenant, &m.value.name).await?;
        tracing::info!(
            tenant,
            mailbox = %m.value.name,
            outcome = %revocation,
            "grant discarded: its provider was re-pointed"
        );
        if !matches!(revocation, Revocation::NothingStored) {
            discarded.push(m.value.name.clone());
        }
    }
    Ok(discarded)
}

impl Resource for Providers {
    type Output = ProviderView;
    type Extra = ProviderSecrets;
    type Plan = SecretsPlan;
    resource_names!(scoped "provider" in "providers": Provider, input ProviderInput, key provider_key);
    /// What a caller would send to keep the provider as it is: no secrets (they are kept unless
    /// named), the proxy URL as shown (`[redacted]` keeps its password).
    fn to_input(p: &Provider, version: u64) -> ProviderInput {
        ProviderInput {
            version,
            tenant: p.tenant.clone(),
            name: p.name.clone(),
            kind: p.kind.into(),
            authority: p.authority.clone(),
            client_id: p.client_id.clone(),
            client_secret: Secret::default(),
            endpoints: p.endpoints.clone(),
            http_proxy: shown_proxy(p),
            extra_ca_pem: p.extra_ca_pem.clone(),
            scopes: p.scopes.clone(),
            service_account_key: Secret::default(),
        }
    }
    fn output(p: &Provider, version: u64) -> ProviderView {
        ProviderView {
            version,
            client_secret_set: p.client_secret.is_some(),
            service_account_key_set: p.service_account_key.is_some(),
            provider: Provider {
                client_secret: None,
                service_account_key: None,
                http_proxy: shown_proxy(p),
                http_proxy_password: None,
                ..p.clone()
            },
        }
    }
    /// Copies the fields `mask` selects.
    fn merge(dst: &mut ProviderInput, src: &ProviderInput, mask: &UpdateMask) {
        for path in FIELDS.mutable.iter().filter(|p| mask.includes(p)) {
            match *path {
                "authority" => dst.authority.clone_from(&src.authority),
                "client_id" => dst.client_id.clone_from(&src.client_id),
                "client_secret" => dst.client_secret.clone_from(&src.client_secret),
                "endpoints" => dst.endpoints.clone_from(&src.endpoints),
                "http_proxy" => dst.http_proxy.clone_from(&src.http_proxy),
                "tls" => dst.extra_ca_pem.clone_from(&src.extra_ca_pem),
                "scopes" => dst.scopes.clone_from(&src.scopes),
                "service_account_key" => {
                    dst.service_account_key.clone_from(&src.service_account_key)
                }
                _ => {}
            }
        }
    }
    const REFERENCES: &'static [Reference] = &[
        Reference::new(
            Referrer::MailboxProvider,
            "is still used by mailboxes",
            "change or delete them first",
        ),
        Reference::new(
            Referrer::DeviceUserProvider,
            "is still the user provider of devices",
            "change their `user_provider` or delete them first",
        ),
    ];

    fn from_input(
        input: &ProviderInput,
        stamps: Stamps,
    ) -> Result<(Provider, ProviderSecrets), ValidationError> {
        from_input(input, stamps)
    }

    fn check_new(
        &self,
        principal: &Principal,
        provider: &mut Provider,
        _: &ProviderSecrets,
    ) -> Result<(), Error> {
        let dest = Destination::of(provider);
        no_credentials_in_endpoints(&dest)?;
        check_destination(principal, &self.policy, &dest, None)
    }

    async fn prepare_new(
        &self,
        state: &BrokerState,
        provider: &mut Provider,
        secrets: ProviderSecrets,
    ) -> Result<String, Error> {
        let (tenant, name) = (provider.tenant.clone(), provider.name.clone());
        let sealed = |aad: String, secret: &Option<Secret>| {
            secret.as_ref().map(|s| seal(state, &aad, s)).transpose()
        };
        provider.client_secret = sealed(
            Provider::client_secret_aad(&tenant, &name),
            &secrets.client_secret,
        )?;
        provider.service_account_key = sealed(
            Provider::service_account_key_aad(&tenant, &name),
            &secrets.service_account_key,
        )?;
        provider.http_proxy_password = sealed(
            Provider::http_proxy_password_aad(&tenant, &name),
            &secrets.http_proxy_password,
        )?;
        let set = |present: bool| if present { "set" } else { "" };
        let mut detail = Destination::of(provider).describe(provider);
        let secrets = secrets_detail(&[
            ("client_secret", set(provider.client_secret.is_some())),
            (
                "service_account_key",
                set(provider.service_account_key.is_some()),
            ),
            (
                "http_proxy_password",
                set(provider.http_proxy_password.is_some()),
            ),
        ]);
        if !secrets.is_empty() {
            detail = format!("{detail}; {secrets}");
        }
        Ok(detail)
    }

    /// The kind is checked, and given secrets sealed, once, before the read-modify-write loop.
    fn plan_update(
        &self,
        state: &BrokerState,
        input: &ProviderInput,
        mask: &UpdateMask,
    ) -> Result<SecretsPlan, Error> {
        let kind = input.kind.optional("provider.kind")?;
        let (tenant, name) = (input.tenant.as_str(), input.name.as_str());
        let client_secret = secret_change(mask, "client_secret", input.client_secret.expose());
        let service_account_key = secret_change(
            mask,
            "service_account_key",
            input.service_account_key.expose(),
        );
        let sealed = |aad: String, change: &SecretChange| match change {
            SecretChange::Set(s) => seal(state, &aad, s).map(Some),
            _ => Ok(None),
        };
        Ok(SecretsPlan {
            kind,
            sealed_client_secret: sealed(
                Provider::client_secret_aad(tenant, name),
                &client_secret,
            )?,
            sealed_service_account_key: sealed(
                Provider::service_account_key_aad(tenant, name),
                &service_account_key,
            )?,
            client_secret,
            service_account_key,
            proxy_in_mask: mask.includes("http_proxy"),
            ..SecretsPlan::default()
        })
    }

    fn check_stored(&self, plan: &SecretsPlan, stored: &Provider) -> Result<(), Error> {
        match plan.kind {
            Some(kind) if kind != stored.kind => Err(Error::InvalidArgument(format!(
                "provider.kind: is immutable: {} is {}; create a new provider for {kind}",
                resource::what::<Self>(&Id::scoped(&stored.tenant, &stored.name)),
                stored.kind
            ))),
            _ => Ok(()),
        }
    }

    async fn prepare_update(
        &self,
        state: &BrokerState,
        principal: &Principal,
        plan: &mut SecretsPlan,
        stored: &Provider,
        next: &mut Provider,
        secrets: ProviderSecrets,
    ) -> Result<(), Error> {
        let (tenant, name) = (stored.tenant.as_str(), stored.name.as_str());
        next.client_secret = match &plan.client_secret {
            SecretChange::Keep => stored.client_secret.clone(),
            SecretChange::Clear => None,
            SecretChange::Set(_) => plan.sealed_client_secret.clone(),
        };
        next.service_account_key = match &plan.service_account_key {
            SecretChange::Keep => stored.service_account_key.clone(),
            SecretChange::Clear => None,
            SecretChange::Set(_) => plan.sealed_service_account_key.clone(),
        };
        plan.proxy_password = if plan.proxy_in_mask {
            proxy_password_change(secrets.http_proxy_password.as_ref())
        } else {
            next.http_proxy.clone_from(&stored.http_proxy);
            SecretChange::Keep
        };
        next.http_proxy_password = match &plan.proxy_password {
            SecretChange::Keep => stored.http_proxy_password.clone(),
            SecretChange::Clear => None,
            SecretChange::Set(s) => Some(seal(
                state,
                &Provider::http_proxy_password_aad(tenant, name),
                s,
            )?),
        };
        let (before, after) = (Destination::of(stored), Destination::of(next));
        if before == after {
            plan.route = None;
            return Ok(());
        }
        no_credentials_in_endpoints(&after)?;
        check_destination(principal, &self.policy, &after, Some(&before))?;
        require_secrets_again(
            stored,
            &plan.client_secret,
            &plan.service_account_key,
            &plan.proxy_password,
            before.http_proxy != after.http_proxy,
            &moved_fields(&before, &after),
        )?;
        plan.route = Some(format!(
            "re-pointed from {} to {}",
            before.describe(stored),
            after.describe(next)
        ));
        // The grants go before the new destination is stored: they are revoked at the old
        // (trusted) provider, and no refresh can reach the new host with them.
        plan.discarded = discard_grants(state, &self.tokens, tenant, name).await?;
        Ok(())
    }

    async fn updated(
        &self,
        _: &BrokerState,
        plan: SecretsPlan,
        next: &Provider,
        version: u64,
        mask: &UpdateMask,
    ) -> Result<(ProviderView, String), Error> {
        let secrets = secrets_detail(&[
            ("client_secret", verb(&plan.client_secret)),
            ("service_account_key", verb(&plan.service_account_key)),
            ("http_proxy_password", verb(&plan.proxy_password)),
        ]);
        let mut detail = format!("fields: {}", mask.describe());
        if let Some(route) = plan.route {
            let discarded = if plan.discarded.is_empty() {
                "none".to_owned()
            } else {
                name_list(plan.discarded.iter().map(String::as_str))
            };
            detail = format!("{detail}; {route}; grants discarded: {discarded}");
        }
        if !secrets.is_empty() {
            detail = format!("{detail}; {secrets}");
        }
        Ok((Self::output(next, version), detail))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(token_url: &str, proxy: &str, ca: &str) -> Provider {
        Provider {
            tenant: "acme".into(),
            name: "p".into(),
            kind: tokenfleet_domain::ProviderKind::Microsoft,
            authority: "organizations".into(),
            client_id: "c".into(),
            client_secret: None,
            endpoints: tokenfleet_domain::ProviderEndpoints {
                token_url: token_url.into(),
                ..Default::default()
            },
            http_proxy: proxy.into(),
            http_proxy_password: None,
            extra_ca_pem: ca.into(),
            scopes: Vec::new(),
            service_account_key: None,
            stamps: Stamps::new(time::OffsetDateTime::UNIX_EPOCH),
        }
    }

    fn principal(role: Role) -> Principal {
        Principal {
            key_id: "k".into(),
            role,
            tenant: (role != Role::FleetAdmin).then(|| "acme".to_owned()),
        }
    }

    #[test]
    fn destinations_outside_the_policy_need_a_fleet_admin() {
        let policy = ProviderPolicy {
            allowed_hosts: vec!["127.0.0.1".into()],
        };
        let ta = principal(Role::TenantAdmin);
        let fa = principal(Role::FleetAdmin);
        let ok = provider("https://login.microsoftonline.com/x/token", "", "");
        assert!(check_destination(&ta, &policy, &Destination::of(&ok), None).is_ok());
        let local = provider("http://127.0.0.1:9/token", "http://127.0.0.1:3128", "");
        assert!(check_destination(&ta, &policy, &Destination::of(&local), None).is_ok());
        let evil = provider("https://evil.example/token", "", "");
        let err = check_destination(&ta, &policy, &Destination::of(&evil), None).unwrap_err();
        assert!(
            matches!(&err, Error::PermissionDenied(m) if m.starts_with("provider.endpoints.token_url:"))
        );
        assert!(check_destination(&fa, &policy, &Destination::of(&evil), None).is_ok());
        // What a fleet admin set stays usable by a tenant admin as long as it does not change.
        let before = Destination::of(&evil);
        assert!(check_destination(&ta, &policy, &Destination::of(&evil), Some(&before)).is_ok());
        let proxy = provider("", "http://proxy.example:3128", "");
        assert!(check_destination(&ta, &policy, &Destination::of(&proxy), None).is_err());
        let ca = provider("", "", "-----BEGIN CERTIFICATE-----");
        let err = check_destination(&ta, &policy, &Destination::of(&ca), None).unwrap_err();
        assert!(err.to_string().contains("extra_ca_pem"));
    }

    #[test]
    fn endpoints_may_not_carry_passwords() {
        let p = provider("https://u:pw@login.microsoftonline.com/x/token", "", "");
        let err = no_credentials_in_endpoints(&Destination::of(&p)).unwrap_err();
        assert!(!err.to_string().contains("pw@"), "{}", err.to_string());
        assert!(err.to_string().starts_with("provider.endpoints.token_url:"));
        let p = provider("https://login.microsoftonline.com/x/token", "", "");
        assert!(no_credentials_in_endpoints(&Destination::of(&p)).is_ok());
    }

    #[test]
    fn merge_copies_only_masked_fields() {
        let stored = provider("", "", "");
        let mut base = Providers::to_input(&stored, 1);
        let input = ProviderInput {
            client_id: "new-id".into(),
            http_proxy: "http://proxy.example:3128".into(),
            client_secret: Secret::new("s3cret"),
            ..Providers::to_input(&stored, 1)
        };
        let mask = UpdateMask::Paths(["client_id"].into_iter().collect());
        Providers::merge(&mut base, &input, &mask);
        assert_eq!(base.client_id, "new-id");
        assert!(base.http_proxy.is_empty());
        assert!(base.client_secret.is_empty());
    }

    /// Views never carry a secret; a stored proxy password shows as `[redacted]`, which an
    /// update's input form keeps.
    #[test]
    fn views_hide_secrets() {
        let state_key = tokenfleet_seal::Keyring::generate_key_base64().unwrap();
        let keyring =
            tokenfleet_seal::Keyring::from_base64("k", [("k", state_key.as_str())]).unwrap();
        let mut p = provider("", "http://u@proxy.example:3128", "");
        p.client_secret = Some(keyring.seal_secret("a", &Secret::new("s")).unwrap());
        p.http_proxy_password = Some(keyring.seal_secret("b", &Secret::new("pw")).unwrap());
        let view = Providers::output(&p, 3);
        assert!(view.client_secret_set && !view.service_account_key_set);
        assert_eq!(view.provider.client_secret, None);
        assert_eq!(view.provider.http_proxy_password, None);
        assert_eq!(
            view.provider.http_proxy,
            "http://u:[redacted]@proxy.example:3128"
        );
        assert!(!format!("{:?}", Providers::to_input(&p, 3)).contains("pw"));
        assert!(matches!(
            proxy_password_change(Some(&Secret::new(dom::REDACTED))),
            SecretChange::Keep
        ));
    }
}
