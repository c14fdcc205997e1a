//! Device RPCs. A device's agent and mailboxes must exist in its tenant. The ingress password is
//! stored only as an Argon2id hash (PHC string).

use tokenfleet_domain::{Agent, Device, Mailbox, Provider, Stamps};
use tokenfleet_proto::v1 as pb;
use tokenfleet_seal::Secret;
use tokenfleet_store::{Precondition, Scope, StoreError};
use tonic::Status;

use super::{
    Change, audited, check_version, commit, delete_record, invalid, list_page, must_get,
    object_path, page_request, precondition, records, require_tenant, shown, span_object,
    store_status,
};
use crate::authz::{Access, Principal, Target, authorize};
use crate::convert::{self, DEVICE_FIELDS, SecretChange, UpdateMask};
use crate::records::{CAS_ATTEMPTS, agent_key, device_key, mailbox_key, provider_key};
use crate::state::BrokerState;

fn what(tenant: &str, name: &str) -> String {
    format!("device `{}` in tenant `{}`", shown(name), shown(tenant))
}

fn change(action: &'static str, tenant: &str, name: &str) -> Change {
    Change {
        action,
        target: object_path(tenant, "devices", name),
        tenant: tenant.to_owned(),
    }
}

/// Argon2id hash (PHC string) of an ingress password, computed off the async runtime.
async fn hash_password(password: Secret) -> Result<String, Status> {
    let hashed = tokio::task::spawn_blocking(move || {
        use argon2::password_hash::PasswordHasher as _;
        argon2::Argon2::default()
            .hash_password(password.expose().as_bytes())
            .map(|h| h.to_string())
    })
    .await;
    match hashed {
        Ok(Ok(phc)) => Ok(phc),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "hashing an ingress password failed");
            Err(Status::internal(
                "internal error while hashing the password",
            ))
        }
        Err(e) => {
            tracing::error!(error = %e, "password hashing task failed");
            Err(Status::internal(
                "internal error while hashing the password",
            ))
        }
    }
}

/// The agent, every mailbox and the user provider the device names exist in its tenant.
async fn check_references(state: &BrokerState, d: &Device) -> Result<(), Status> {
    let r = records(state);
    if !d.agent.is_empty()
        && r.get::<Agent>(&agent_key(&d.tenant, &d.agent))
            .await
            .map_err(store_status)?
            .is_none()
    {
        return Err(precondition(
            "device.agent",
            format!(
                "no agent `{}` in tenant `{}`; create it first",
                d.agent, d.tenant
            ),
        ));
    }
    if !d.user_provider.is_empty()
        && r.get::<Provider>(&provider_key(&d.tenant, &d.user_provider))
            .await
            .map_err(store_status)?
            .is_none()
    {
        return Err(precondition(
            "device.user_provider",
            format!(
                "no provider `{}` in tenant `{}`; create it first",
                d.user_provider, d.tenant
            ),
        ));
    }
    let named = [
        ("device.admin_mailbox".to_owned(), d.admin_mailbox.as_str()),
        ("device.bulk_mailbox".to_owned(), d.bulk_mailbox.as_str()),
    ]
    .into_iter()
    .chain(
        d.allowed_mailboxes
            .iter()
            .enumerate()
            .map(|(i, m)| (format!("device.allowed_mailboxes[{i}]"), m.as_str())),
    );
    for (field, mailbox) in named.filter(|(_, m)| !m.is_empty()) {
        if r.get::<Mailbox>(&mailbox_key(&d.tenant, mailbox))
            .await
            .map_err(store_status)?
            .is_none()
        {
            return Err(precondition(
                &field,
                format!(
                    "no mailbox `{mailbox}` in tenant `{}`; create it first",
                    d.tenant
                ),
            ));
        }
    }
    Ok(())
}

/// The device's ingress user name is not the login of another device on the same agent (the
/// agent could not tell which device logged in; it refuses such a configuration too). Compared
/// without regard to case. Two concurrent writes can still both pass; the agent then refuses
/// the login of both devices until one is changed.
async fn check_unique_login(state: &BrokerState, d: &Device) -> Result<(), Status> {
    if d.agent.is_empty() || d.ingress.username.is_empty() {
        return Ok(());
    }
    let devices = records(state)
        .list_all::<Device>(&Scope::Tenant(d.tenant.clone()))
        .await
        .map_err(store_status)?;
    if let Some(other) = devices.iter().map(|v| &v.value).find(|o| {
        o.name != d.name
            && o.agent == d.agent
            && o.ingress.username.eq_ignore_ascii_case(&d.ingress.username)
    }) {
        return Err(precondition(
            "device.ingress.username",
            format!(
                "`{}` is already the ingress login of device `{}` on agent `{}`; each device of an agent needs its own user name",
                shown(&d.ingress.username),
                other.name,
                d.agent
            ),
        ));
    }
    Ok(())
}

pub(super) async fn create(
    state: &BrokerState,
    principal: &Principal,
    req: pb::CreateDeviceRequest,
) -> Result<pb::Device, Status> {
    let input = req.device.unwrap_or_default();
    span_object(&input.tenant, &input.name);
    audited(
        state,
        principal,
        change("device.create", &input.tenant, &input.name),
        async {
            authorize(principal, Target::Tenant(&input.tenant), Access::Write)?;
            let (mut device, password) =
                convert::device_from_proto(&input, Stamps::new(state.clock.now()))
                    .map_err(invalid)?;
            if password.is_some() {
                // Placeholder so the user-name check sees a password; replaced by the hash below.
                device.ingress.password_hash = Some(String::new());
            }
            convert::check_device_ingress(&device).map_err(invalid)?;
            require_tenant(state, &device.tenant).await?;
            check_references(state, &device).await?;
            check_unique_login(state, &device).await?;
            if let Some(password) = password {
                device.ingress.password_hash = Some(hash_password(password).await?);
            }
            let version = match records(state).put(&device, Precondition::Absent).await {
                Ok(v) => v,
                Err(StoreError::AlreadyExists(_)) => {
                    return Err(Status::already_exists(format!(
                        "{} already exists",
                        what(&device.tenant, &device.name)
                    )));
                }
                Err(e) => return Err(store_status(e)),
            };
            // Insecure token transport allowed by the profile: written into the audit entry.
            let detail = convert::cleartext_token_warnings(&device).join("; ");
            Ok((convert::device_to_proto(&device, version), detail))
        },
    )
    .await
}

pub(super) async fn get(
    state: &BrokerState,
    principal: &Principal,
    req: pb::GetDeviceRequest,
) -> Result<pb::Device, Status> {
    span_object(&req.tenant, &req.name);
    authorize(principal, Target::Tenant(&req.tenant), Access::Read)?;
    tokenfleet_domain::name("tenant", &req.tenant).map_err(invalid)?;
    tokenfleet_domain::name("name", &req.name).map_err(invalid)?;
    let d = must_get::<Device>(
        state,
        &device_key(&req.tenant, &req.name),
        &what(&req.tenant, &req.name),
    )
    .await?;
    Ok(convert::device_to_proto(&d.value, d.version))
}

pub(super) async fn list(
    state: &BrokerState,
    principal: &Principal,
    req: pb::ListDevicesRequest,
) -> Result<pb::ListDevicesResponse, Status> {
    span_object(&req.tenant, "");
    authorize(principal, Target::Tenant(&req.tenant), Access::Read)?;
    tokenfleet_domain::name("tenant", &req.tenant).map_err(invalid)?;
    let page = page_request(req.page_size, &req.page_token)?;
    require_tenant(state, &req.tenant).await?;
    let (items, next_page_token) =
        list_page::<Device>(state, &Scope::Tenant(req.tenant.clone()), &page).await?;
    Ok(pb::ListDevicesResponse {
        devices: items
            .iter()
            .map(|d| convert::device_to_proto(&d.value, d.version))
            .collect(),
        next_page_token,
    })
}

pub(super) async fn update(
    state: &BrokerState,
    principal: &Principal,
    req: pb::UpdateDeviceRequest,
) -> Result<pb::Device, Status> {
    let input = req.device.unwrap_or_default();
    span_object(&input.tenant, &input.name);
    let mask = UpdateMask::parse(&DEVICE_FIELDS, req.update_mask.as_ref());
    audited(
        state,
        principal,
        change("device.update", &input.tenant, &input.name),
        async {
            authorize(principal, Target::Tenant(&input.tenant), Access::Write)?;
            tokenfleet_domain::name("device.tenant", &input.tenant).map_err(invalid)?;
            tokenfleet_domain::name("device.name", &input.name).map_err(invalid)?;
            let mask = mask.map_err(invalid)?;
            let what = what(&input.tenant, &input.name);
            let key = device_key(&input.tenant, &input.name);

            let password = input
                .ingress
                .as_ref()
                .map(|i| i.password.as_str())
                .unwrap_or_default();
            let password_change = if mask.names("ingress.password") {
                convert::secret_change(&mask, "ingress.password", password)
            } else if mask.includes("ingress") && !password.is_empty() {
                SecretChange::Set(Secret::new(password))
            } else {
                SecretChange::Keep
            };

            let mut new_hash: Option<String> = None;
            for attempt in 0..CAS_ATTEMPTS {
                let stored = must_get::<Device>(state, &key, &what).await?;
                check_version(&what, input.version, stored.version)?;
                let mut merged = convert::device_to_proto(&stored.value, stored.version);
                convert::merge_device(&mut merged, &input, &mask);
                let stamps = Stamps {
                    created: stored.value.stamps.created,
                    updated: state.clock.now(),
                };
                let (mut next, _) = convert::device_from_proto(&merged, stamps).map_err(invalid)?;
                next.ingress.password_hash = match &password_change {
                    SecretChange::Keep => stored.value.ingress.password_hash.clone(),
                    SecretChange::Clear => None,
                    SecretChange::Set(_) => Some(String::new()),
                };
                convert::check_device_ingress(&next).map_err(invalid)?;
                check_references(state, &next).await?;
                check_unique_login(state, &next).await?;
                if let SecretChange::Set(p) = &password_change {
                    // Hashed once, after validation, and reused if the write must be retried.
                    if new_hash.is_none() {
                        new_hash = Some(hash_password(p.clone()).await?);
                    }
                    next.ingress.password_hash.clone_from(&new_hash);
                }
                if let Some(v) =
                    commit(state, &what, &next, stored.version, input.version, attempt).await?
                {
                    let mut detail = format!("fields: {}", mask.describe());
                    match password_change {
                        SecretChange::Keep => {}
                        SecretChange::Clear => detail.push_str("; ingress password cleared"),
                        SecretChange::Set(_) => detail.push_str("; ingress password replaced"),
                    }
                    for warning in convert::cleartext_token_warnings(&next) {
                        detail.push_str("; ");
                        detail.push_str(&warning);
                    }
                    return Ok((convert::device_to_proto(&next, v), detail));
                }
            }
            Err(Status::aborted(format!(
                "{what} was changed concurrently; retry"
            )))
        },
    )
    .await
}

pub(super) async fn delete(
    state: &BrokerState,
    principal: &Principal,
    req: pb::DeleteDeviceRequest,
) -> Result<pb::DeleteDeviceResponse, Status> {
    span_object(&req.tenant, &req.name);
    audited(
        state,
        principal,
        change("device.delete", &req.tenant, &req.name),
        async {
            authorize(principal, Target::Tenant(&req.tenant), Access::Write)?;
            tokenfleet_domain::name("tenant", &req.tenant).map_err(invalid)?;
            tokenfleet_domain::name("name", &req.name).map_err(invalid)?;
            let what = what(&req.tenant, &req.name);
            delete_record(
                state,
                &device_key(&req.tenant, &req.name),
                &what,
                req.version,
            )
            .await?;
            Ok((pb::DeleteDeviceResponse {}, String::new()))
        },
    )
    .await
}
