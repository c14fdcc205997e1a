//! Provider RPCs. Client secrets, service-account keys and proxy passwords are sealed before they
//! are stored, bound to the provider through the associated data, and never returned (a proxy URL
//! is shown as `http://user:[redacted]@host`).
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

use tokenfleet_domain::{Device, Mailbox, Provider, Role, Stamps};
use tokenfleet_proto::v1 as pb;
use tokenfleet_seal::{Sealed, Secret};
use tokenfleet_store::{Precondition, Scope, StoreError};
use tonic::Status;

use super::{
    Change, audited, check_version, commit, delete_record, invalid, list_page, must_get,
    object_path, page_request, records, refuse_if_referenced, require_tenant, seal_status, shown,
    span_object, store_status,
};
use crate::authz::{Access, Principal, Target, authorize};
use crate::convert::{self, PROVIDER_FIELDS, SecretChange, UpdateMask, secret_change};
use crate::records::{CAS_ATTEMPTS, provider_key};
use crate::state::BrokerState;
use crate::tokens::lifecycle::TokenService;

/// Sign-in hosts of Microsoft (public and sovereign clouds) and Google that any caller with write
/// access may point a provider at.
pub const WELL_KNOWN_PROVIDER_HOSTS: &[&str] = &[
    "login.microsoftonline.com",
    "login.microsoftonline.us",
    "login.partner.microsoftonline.cn",
    "login.chinacloudapi.cn",
    "accounts.google.com",
    "oauth2.googleapis.com",
    "www.googleapis.com",
];

/// Who may point providers where (the `[admin]` section of the broker configuration).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProviderPolicy {
    /// Hosts (lower case, optionally `host:port`) that tenant admins may use in endpoint overrides
    /// and as HTTP proxy, besides [`WELL_KNOWN_PROVIDER_HOSTS`]. Fleet admins may use any host.
    pub allowed_hosts: Vec<String>,
}

impl ProviderPolicy {
    fn allows(&self, host: &str, port: Option<u16>) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let with_port = port.map(|p| format!("{host}:{p}"));
        WELL_KNOWN_PROVIDER_HOSTS.contains(&host.as_str())
            || self.allowed_hosts.iter().any(|allowed| {
                let allowed = allowed.trim().to_ascii_lowercase();
                allowed == host || Some(&allowed) == with_port.as_ref()
            })
    }
}

fn what(tenant: &str, name: &str) -> String {
    format!("provider `{}` in tenant `{}`", shown(name), shown(tenant))
}

fn change(action: &'static str, tenant: &str, name: &str) -> Change {
    Change {
        action,
        target: object_path(tenant, "providers", name),
        tenant: tenant.to_owned(),
    }
}

fn seal(state: &BrokerState, aad: &str, secret: &Secret) -> Result<Sealed, Status> {
    state
        .keyring
        .seal_secret(aad, secret)
        .map_err(|e| seal_status(&e, aad))
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
fn no_credentials_in_endpoints(dest: &Destination<'_>) -> Result<(), Status> {
    for (field, url) in dest.overrides() {
        if tokenfleet_domain::split_url_password(url).1.is_some() {
            return Err(Status::invalid_argument(format!(
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
) -> Result<(), Status> {
    if principal.role == Role::FleetAdmin {
        return Ok(());
    }
    let denied = |field: &str, problem: String| {
        Status::permission_denied(format!(
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
        return Err(Status::permission_denied(
            "provider.tls.extra_ca_pem: trusting another CA for a provider is a fleet-level \
             decision; only a fleet-admin key may set it",
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

pub(super) async fn create(
    state: &BrokerState,
    principal: &Principal,
    req: pb::CreateProviderRequest,
    policy: &ProviderPolicy,
) -> Result<pb::Provider, Status> {
    let input = req.provider.unwrap_or_default();
    span_object(&input.tenant, &input.name);
    audited(
        state,
        principal,
        change("provider.create", &input.tenant, &input.name),
        async {
            authorize(principal, Target::Tenant(&input.tenant), Access::Write)?;
            let (mut provider, secrets) =
                convert::provider_from_proto(&input, Stamps::new(state.clock.now()))
                    .map_err(invalid)?;
            no_credentials_in_endpoints(&Destination::of(&provider))?;
            check_destination(principal, policy, &Destination::of(&provider), None)?;
            require_tenant(state, &provider.tenant).await?;
            let (tenant, name) = (provider.tenant.clone(), provider.name.clone());
            if let Some(s) = &secrets.client_secret {
                provider.client_secret = Some(seal(
                    state,
                    &Provider::client_secret_aad(&tenant, &name),
                    s,
                )?);
            }
            if let Some(s) = &secrets.service_account_key {
                provider.service_account_key = Some(seal(
                    state,
                    &Provider::service_account_key_aad(&tenant, &name),
                    s,
                )?);
            }
            if let Some(s) = &secrets.http_proxy_password {
                provider.http_proxy_password = Some(seal(
                    state,
                    &Provider::http_proxy_password_aad(&tenant, &name),
                    s,
                )?);
            }
            let version = match records(state).put(&provider, Precondition::Absent).await {
                Ok(v) => v,
                Err(StoreError::AlreadyExists(_)) => {
                    return Err(Status::already_exists(format!(
                        "{} already exists",
                        what(&tenant, &name)
                    )));
                }
                Err(e) => return Err(store_status(e)),
            };
            let set = |present: bool| if present { "set" } else { "" };
            let mut detail = Destination::of(&provider).describe(&provider);
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
            Ok((convert::provider_to_proto(&provider, version), detail))
        },
    )
    .await
}

pub(super) async fn get(
    state: &BrokerState,
    principal: &Principal,
    req: pb::GetProviderRequest,
) -> Result<pb::Provider, Status> {
    span_object(&req.tenant, &req.name);
    authorize(principal, Target::Tenant(&req.tenant), Access::Read)?;
    tokenfleet_domain::name("tenant", &req.tenant).map_err(invalid)?;
    tokenfleet_domain::name("name", &req.name).map_err(invalid)?;
    let p = must_get::<Provider>(
        state,
        &provider_key(&req.tenant, &req.name),
        &what(&req.tenant, &req.name),
    )
    .await?;
    Ok(convert::provider_to_proto(&p.value, p.version))
}

pub(super) async fn list(
    state: &BrokerState,
    principal: &Principal,
    req: pb::ListProvidersRequest,
) -> Result<pb::ListProvidersResponse, Status> {
    span_object(&req.tenant, "");
    authorize(principal, Target::Tenant(&req.tenant), Access::Read)?;
    tokenfleet_domain::name("tenant", &req.tenant).map_err(invalid)?;
    let page = page_request(req.page_size, &req.page_token)?;
    require_tenant(state, &req.tenant).await?;
    let (items, next_page_token) =
        list_page::<Provider>(state, &Scope::Tenant(req.tenant.clone()), &page).await?;
    Ok(pb::ListProvidersResponse {
        providers: items
            .iter()
            .map(|p| convert::provider_to_proto(&p.value, p.version))
            .collect(),
        next_page_token,
    })
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
) -> Result<(), Status> {
    let missing = |field: &str| {
        Status::invalid_argument(format!(
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
        return Err(Status::invalid_argument(
            "provider.http_proxy: the proxy changes and a proxy password is stored; give the \
             password again in the URL (`http://user:password@host:port`) or none",
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

pub(super) async fn update(
    state: &BrokerState,
    principal: &Principal,
    req: pb::UpdateProviderRequest,
    (tokens, policy): (&TokenService, &ProviderPolicy),
) -> Result<pb::Provider, Status> {
    let input = req.provider.unwrap_or_default();
    span_object(&input.tenant, &input.name);
    let mask = UpdateMask::parse(&PROVIDER_FIELDS, req.update_mask.as_ref());
    audited(state, principal, change("provider.update", &input.tenant, &input.name), async {
        authorize(principal, Target::Tenant(&input.tenant), Access::Write)?;
        tokenfleet_domain::name("provider.tenant", &input.tenant).map_err(invalid)?;
        tokenfleet_domain::name("provider.name", &input.name).map_err(invalid)?;
        let mask = mask.map_err(invalid)?;
        let kind = convert::provider_kind_in("provider.kind", input.kind).map_err(invalid)?;
        let (tenant, name) = (input.tenant.as_str(), input.name.as_str());
        let what = what(tenant, name);
        let key = provider_key(tenant, name);

        let client_secret = secret_change(&mask, "client_secret", &input.client_secret);
        let service_account_key = secret_change(&mask, "service_account_key", &input.service_account_key);
        // Sealed once, outside the retry loop; validated below together with everything else.
        let sealed_client_secret = match &client_secret {
            SecretChange::Set(s) => Some(seal(state, &Provider::client_secret_aad(tenant, name), s)?),
            _ => None,
        };
        let sealed_service_account_key = match &service_account_key {
            SecretChange::Set(s) => Some(seal(state, &Provider::service_account_key_aad(tenant, name), s)?),
            _ => None,
        };

        for attempt in 0..CAS_ATTEMPTS {
            let stored = must_get::<Provider>(state, &key, &what).await?;
            check_version(&what, input.version, stored.version)?;
            if let Some(kind) = kind
                && kind != stored.value.kind
            {
                return Err(Status::invalid_argument(format!(
                    "provider.kind: is immutable: {what} is {}; create a new provider for {kind}",
                    stored.value.kind
                )));
            }
            let mut merged = convert::provider_to_proto(&stored.value, stored.version);
            convert::merge_provider(&mut merged, &input, &mask);
            let stamps = Stamps {
                created: stored.value.stamps.created,
                updated: state.clock.now(),
            };
            let (mut next, secrets) = convert::provider_from_proto(&merged, stamps).map_err(invalid)?;
            next.client_secret = match &client_secret {
                SecretChange::Keep => stored.value.client_secret.clone(),
                SecretChange::Clear => None,
                SecretChange::Set(_) => sealed_client_secret.clone(),
            };
            next.service_account_key = match &service_account_key {
                SecretChange::Keep => stored.value.service_account_key.clone(),
                SecretChange::Clear => None,
                SecretChange::Set(_) => sealed_service_account_key.clone(),
            };
            let proxy_password = if mask.includes("http_proxy") {
                proxy_password_change(secrets.http_proxy_password.as_ref())
            } else {
                next.http_proxy.clone_from(&stored.value.http_proxy);
                SecretChange::Keep
            };
            next.http_proxy_password = match &proxy_password {
                SecretChange::Keep => stored.value.http_proxy_password.clone(),
                SecretChange::Clear => None,
                SecretChange::Set(s) => Some(seal(state, &Provider::http_proxy_password_aad(tenant, name), s)?),
            };

            let (before, after) = (Destination::of(&stored.value), Destination::of(&next));
            let moved = before != after;
            if moved {
                no_credentials_in_endpoints(&after)?;
                check_destination(principal, policy, &after, Some(&before))?;
                require_secrets_again(
                    &stored.value,
                    &client_secret,
                    &service_account_key,
                    &proxy_password,
                    before.http_proxy != after.http_proxy,
                    &moved_fields(&before, &after),
                )?;
            }
            let route = moved.then(|| {
                format!(
                    "re-pointed from {} to {}",
                    before.describe(&stored.value),
                    after.describe(&next)
                )
            });
            // The grants go before the new destination is stored: they are revoked at the old
            // (trusted) provider, and no refresh can reach the new host with them.
            let discarded = if moved {
                discard_grants(state, tokens, tenant, name).await?
            } else {
                Vec::new()
            };
            if let Some(v) = commit(state, &what, &next, stored.version, input.version, attempt).await? {
                let verb = |c: &SecretChange| match c {
                    SecretChange::Keep => "",
                    SecretChange::Clear => "cleared",
                    SecretChange::Set(_) => "replaced",
                };
                let secrets = secrets_detail(&[
                    ("client_secret", verb(&client_secret)),
                    ("service_account_key", verb(&service_account_key)),
                    ("http_proxy_password", verb(&proxy_password)),
                ]);
                let mut detail = format!("fields: {}", mask.describe());
                if let Some(route) = route {
                    detail = format!(
                        "{detail}; {route}; grants discarded: {}",
                        if discarded.is_empty() {
                            "none".to_owned()
                        } else {
                            super::name_list(discarded.iter().map(String::as_str))
                        }
                    );
                }
                if !secrets.is_empty() {
                    detail = format!("{detail}; {secrets}");
                }
                return Ok((convert::provider_to_proto(&next, v), detail));
            }
        }
        Err(Status::aborted(format!("{what} was changed concurrently; retry")))
    })
    .await
}

/// Deletes (revoking where the provider can) the grants of every mailbox that uses provider
/// `name`; returns the mailboxes whose grants were discarded.
async fn discard_grants(
    state: &BrokerState,
    tokens: &TokenService,
    tenant: &str,
    name: &str,
) -> Result<Vec<String>, Status> {
    let mailboxes = records(state)
        .list_all::<Mailbox>(&Scope::Tenant(tenant.to_owned()))
        .await
        .map_err(store_status)?;
    let mut discarded = Vec::new();
    for m in mailboxes.iter().filter(|m| m.value.provider == name) {
        let revocation = tokens
            .delete_token(tenant, &m.value.name)
            .await
            .map_err(|e| e.to_status())?;
        tracing::info!(
            tenant,
            mailbox = %m.value.name,
            outcome = %revocation,
            "grant discarded: its provider was re-pointed"
        );
        if !matches!(
            revocation,
            crate::tokens::lifecycle::Revocation::NothingStored
        ) {
            discarded.push(m.value.name.clone());
        }
    }
    Ok(discarded)
}

pub(super) async fn delete(
    state: &BrokerState,
    principal: &Principal,
    req: pb::DeleteProviderRequest,
) -> Result<pb::DeleteProviderResponse, Status> {
    span_object(&req.tenant, &req.name);
    audited(
        state,
        principal,
        change("provider.delete", &req.tenant, &req.name),
        async {
            authorize(principal, Target::Tenant(&req.tenant), Access::Write)?;
            tokenfleet_domain::name("tenant", &req.tenant).map_err(invalid)?;
            tokenfleet_domain::name("name", &req.name).map_err(invalid)?;
            let what = what(&req.tenant, &req.name);
            let key = provider_key(&req.tenant, &req.name);
            let stored = must_get::<Provider>(state, &key, &what).await?;
            check_version(&what, req.version, stored.version)?;
            refuse_if_referenced::<Mailbox>(
                state,
                &req.tenant,
                &what,
                |m| m.provider == req.name,
                |m| m.name.as_str(),
                "is still used by mailboxes",
                "change or delete them first",
            )
            .await?;
            refuse_if_referenced::<Device>(
                state,
                &req.tenant,
                &what,
                |d| d.user_provider == req.name,
                |d| d.name.as_str(),
                "is still the user provider of devices",
                "change their `user_provider` or delete them first",
            )
            .await?;
            delete_record(state, &key, &what, req.version).await?;
            Ok((pb::DeleteProviderResponse {}, String::new()))
        },
    )
    .await
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
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(err.message().starts_with("provider.endpoints.token_url:"));
        assert!(check_destination(&fa, &policy, &Destination::of(&evil), None).is_ok());
        // What a fleet admin set stays usable by a tenant admin as long as it does not change.
        let before = Destination::of(&evil);
        assert!(check_destination(&ta, &policy, &Destination::of(&evil), Some(&before)).is_ok());
        let proxy = provider("", "http://proxy.example:3128", "");
        assert!(check_destination(&ta, &policy, &Destination::of(&proxy), None).is_err());
        let ca = provider("", "", "-----BEGIN CERTIFICATE-----");
        let err = check_destination(&ta, &policy, &Destination::of(&ca), None).unwrap_err();
        assert!(err.message().contains("extra_ca_pem"));
    }

    #[test]
    fn endpoints_may_not_carry_passwords() {
        let p = provider("https://u:pw@login.microsoftonline.com/x/token", "", "");
        let err = no_credentials_in_endpoints(&Destination::of(&p)).unwrap_err();
        assert!(!err.message().contains("pw@"), "{}", err.message());
        assert!(err.message().starts_with("provider.endpoints.token_url:"));
        let p = provider("https://login.microsoftonline.com/x/token", "", "");
        assert!(no_credentials_in_endpoints(&Destination::of(&p)).is_ok());
    }

    #[test]
    fn policy_allows_well_known_and_listed_hosts() {
        let policy = ProviderPolicy {
            allowed_hosts: vec!["idp.example".into(), "127.0.0.1:9000".into()],
        };
        assert!(policy.allows("login.microsoftonline.com", None));
        assert!(policy.allows("LOGIN.microsoftonline.com.", None));
        assert!(policy.allows("idp.example", Some(443)));
        assert!(policy.allows("127.0.0.1", Some(9000)));
        assert!(!policy.allows("127.0.0.1", Some(9001)));
        assert!(!policy.allows("evil.example", None));
        assert!(!ProviderPolicy::default().allows("127.0.0.1", None));
    }
}
