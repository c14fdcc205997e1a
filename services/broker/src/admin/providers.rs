//! Provider RPCs. Client secrets and service-account keys are sealed before they are stored,
//! bound to the provider through the associated data, and never returned.

use tokenfleet_domain::{Device, Mailbox, Provider, Stamps};
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
fn secrets_detail(client_secret: &str, service_account_key: &str) -> String {
    let mut parts = Vec::new();
    if !client_secret.is_empty() {
        parts.push(format!("client_secret {client_secret}"));
    }
    if !service_account_key.is_empty() {
        parts.push(format!("service_account_key {service_account_key}"));
    }
    parts.join(", ")
}

pub(super) async fn create(
    state: &BrokerState,
    principal: &Principal,
    req: pb::CreateProviderRequest,
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
            let detail = secrets_detail(
                if provider.client_secret.is_some() {
                    "set"
                } else {
                    ""
                },
                if provider.service_account_key.is_some() {
                    "set"
                } else {
                    ""
                },
            );
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

pub(super) async fn update(
    state: &BrokerState,
    principal: &Principal,
    req: pb::UpdateProviderRequest,
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
            let (mut next, _) = convert::provider_from_proto(&merged, stamps).map_err(invalid)?;
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
            if let Some(v) = commit(state, &what, &next, stored.version, input.version, attempt).await? {
                let verb = |c: &SecretChange| match c {
                    SecretChange::Keep => "",
                    SecretChange::Clear => "cleared",
                    SecretChange::Set(_) => "replaced",
                };
                let secrets = secrets_detail(verb(&client_secret), verb(&service_account_key));
                let mut detail = format!("fields: {}", mask.describe());
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
