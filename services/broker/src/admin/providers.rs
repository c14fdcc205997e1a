//! Providers as a [`Resource`]. Client secrets, service-account keys and proxy passwords are
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

use tokenfleet_domain::{Mailbox, Provider, ProviderKind, Role, Stamps, ValidationError};
use tokenfleet_proto::v1 as pb;
use tokenfleet_seal::{Sealed, Secret};
use tokenfleet_store::Scope;

use crate::authz::Principal;
use crate::convert::{self, ProviderSecrets, SecretChange, UpdateMask, secret_change};
use crate::ops::Error;
use crate::ops::names::{name_list, shown};
use crate::ops::provider_policy::ProviderPolicy;
use crate::ops::resource::{self, Id, Resource, resource_basics};
use crate::ops::stored::{Reference, Referrer, records};
use crate::records::provider_key;
use crate::state::BrokerState;
use crate::tokens::lifecycle::{Revocation, TokenService};

/// The provider resource, with the policy for destinations and the token service that discards
/// grants when a provider is re-pointed.
#[derive(Debug, Clone)]
pub(crate) struct Providers {
    /// Where non-fleet-admin callers may point providers.
    pub policy: ProviderPolicy,
    /// Revokes and wipes grants.
    pub tokens: TokenService,
}

/// What an update does to the secrets, worked out once (sealed once), and what it did.
#[derive(Debug, Default)]
pub(crate) struct SecretsPlan {
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
    type Extra = ProviderSecrets;
    type Plan = SecretsPlan;
    resource_basics!(scoped "provider" in "providers": Provider as pb::Provider, key provider_key, to_wire convert::provider_to_proto, merge convert::merge_provider);
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

    fn from_wire(
        wire: &pb::Provider,
        stamps: Stamps,
    ) -> Result<(Provider, ProviderSecrets), ValidationError> {
        convert::provider_from_proto(wire, stamps)
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
        input: &pb::Provider,
        mask: &UpdateMask,
    ) -> Result<SecretsPlan, Error> {
        let kind = convert::provider_kind_in("provider.kind", input.kind)?;
        let (tenant, name) = (input.tenant.as_str(), input.name.as_str());
        let client_secret = secret_change(mask, "client_secret", &input.client_secret);
        let service_account_key =
            secret_change(mask, "service_account_key", &input.service_account_key);
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
    ) -> Result<(pb::Provider, String), Error> {
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
        Ok((Self::to_wire(next, version), detail))
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
}
