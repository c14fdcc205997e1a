//! API key RPCs: `CreateApiKey` (the key is in the response once), `ListApiKeys` (never a
//! secret), `RevokeApiKey` (the key fails its next call).
//!
//! Rights: a fleet admin manages every key. A tenant admin manages only keys bound to its own
//! tenant, and only with roles up to its own (`tenant-admin`, `viewer`), so it can neither mint a
//! fleet-wide key nor reach another tenant. Viewers manage none. A key outside the caller's reach
//! answers NOT_FOUND, like one that does not exist, so ids of other tenants' keys reveal nothing.
//! Each change is audited (in the key's tenant's stream when it is bound to one).

use crate::api_keys;
use crate::authz::Principal;
use crate::convert::timestamp;
use crate::ops::Error;
use crate::ops::change::{Change, audited};
use crate::ops::names::{shown, span_object};
use crate::state::BrokerState;
use tokenfleet_domain::{ApiKey, Role};
use tokenfleet_proto::v1 as pb;

fn to_proto(key: &ApiKey) -> pb::ApiKey {
    pb::ApiKey {
        id: key.id.clone(),
        role: key.role.as_str().to_owned(),
        tenant: key.tenant.clone().unwrap_or_default(),
        description: key.description.clone(),
        create_time: Some(timestamp(key.created)),
    }
}

/// Whether `principal` may manage a key with `role` bound to `tenant`.
fn may_manage(principal: &Principal, role: Role, tenant: Option<&str>) -> bool {
    match principal.role {
        Role::FleetAdmin => true,
        Role::TenantAdmin => {
            role != Role::FleetAdmin && tenant.is_some() && tenant == principal.tenant.as_deref()
        }
        Role::Viewer => false,
    }
}

fn no_key_rights(principal: &Principal) -> Result<(), Error> {
    if principal.role == Role::Viewer {
        return Err(Error::PermissionDenied(format!(
            "API key `{}` is a viewer and may not manage API keys",
            principal.key_id
        )));
    }
    Ok(())
}

pub(super) async fn create(
    state: &BrokerState,
    principal: &Principal,
    req: pb::CreateApiKeyRequest,
) -> Result<pb::CreateApiKeyResponse, Error> {
    span_object(&req.tenant, "");
    let change = Change {
        action: "apikey.create",
        target: "apikeys".to_owned(),
        tenant: req.tenant.clone(),
    };
    audited(state, principal, change, async {
        no_key_rights(principal)?;
        let role = Role::parse(&req.role).ok_or_else(|| {
            let names: Vec<_> = Role::ALL.iter().map(|r| r.as_str()).collect();
            Error::InvalidArgument(format!(
                "role: unknown role `{}` (expected one of: {})",
                shown(&req.role),
                names.join(", ")
            ))
        })?;
        let tenant = (!req.tenant.is_empty()).then_some(req.tenant.as_str());
        if !may_manage(principal, role, tenant) {
            return Err(Error::PermissionDenied(format!(
                "API key `{}` ({}) may create only tenant-admin or viewer keys bound to its own \
                 tenant, not a {role} key{}",
                principal.key_id,
                principal.role,
                tenant
                    .map(|t| format!(" for tenant `{}`", shown(t)))
                    .unwrap_or_default()
            )));
        }
        let (record, key) =
            api_keys::create_unaudited(state, role, tenant, &req.description).await?;
        let detail = format!("id {}, role {role}", record.id);
        Ok((
            pb::CreateApiKeyResponse {
                api_key: Some(to_proto(&record)),
                key: key.expose().to_owned(),
            },
            detail,
        ))
    })
    .await
}

pub(super) async fn list(
    state: &BrokerState,
    principal: &Principal,
    req: pb::ListApiKeysRequest,
) -> Result<pb::ListApiKeysResponse, Error> {
    span_object(&req.tenant, "");
    no_key_rights(principal)?;
    if principal.role == Role::TenantAdmin
        && !req.tenant.is_empty()
        && Some(req.tenant.as_str()) != principal.tenant.as_deref()
    {
        return Err(Error::PermissionDenied(format!(
            "API key `{}` may not access tenant `{}`",
            principal.key_id,
            shown(&req.tenant)
        )));
    }
    let keys = api_keys::list_all(state).await?;
    let api_keys = keys
        .iter()
        .filter(|k| may_manage(principal, k.role, k.tenant.as_deref()))
        .filter(|k| req.tenant.is_empty() || k.tenant.as_deref() == Some(req.tenant.as_str()))
        .map(to_proto)
        .collect();
    Ok(pb::ListApiKeysResponse { api_keys })
}

pub(super) async fn revoke(
    state: &BrokerState,
    principal: &Principal,
    req: pb::RevokeApiKeyRequest,
) -> Result<pb::RevokeApiKeyResponse, Error> {
    span_object("", &req.id);
    // The audit stream is the key's tenant's, once the caller is known to reach it.
    let stored = if principal.role == Role::Viewer {
        None
    } else {
        api_keys::get(state, &req.id).await?
    };
    let visible = stored
        .as_ref()
        .filter(|k| may_manage(principal, k.role, k.tenant.as_deref()));
    let change = Change {
        action: "apikey.revoke",
        target: format!("apikeys/{}", shown(&req.id)),
        tenant: visible.and_then(|k| k.tenant.clone()).unwrap_or_default(),
    };
    audited(state, principal, change, async {
        no_key_rights(principal)?;
        let Some(key) = visible else {
            return Err(Error::NotFound(format!(
                "API key `{}` not found",
                shown(&req.id)
            )));
        };
        if !api_keys::revoke(state, &key.id).await? {
            return Err(Error::NotFound(format!(
                "API key `{}` not found (revoked concurrently)",
                shown(&req.id)
            )));
        }
        let detail = format!("role {}", key.role);
        Ok((pb::RevokeApiKeyResponse {}, detail))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(role: Role, tenant: Option<&str>) -> Principal {
        Principal {
            key_id: "k".into(),
            role,
            tenant: tenant.map(str::to_owned),
        }
    }

    #[test]
    fn key_rights_follow_role_and_tenant() {
        let fleet = p(Role::FleetAdmin, None);
        assert!(may_manage(&fleet, Role::FleetAdmin, None));
        assert!(may_manage(&fleet, Role::Viewer, Some("b")));
        let ta = p(Role::TenantAdmin, Some("a"));
        assert!(may_manage(&ta, Role::TenantAdmin, Some("a")));
        assert!(may_manage(&ta, Role::Viewer, Some("a")));
        assert!(!may_manage(&ta, Role::Viewer, None), "fleet-wide viewer");
        assert!(!may_manage(&ta, Role::FleetAdmin, None));
        assert!(!may_manage(&ta, Role::TenantAdmin, Some("b")));
        let viewer = p(Role::Viewer, None);
        assert!(!may_manage(&viewer, Role::Viewer, None));
    }
}
