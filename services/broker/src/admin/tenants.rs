//! Tenant RPCs. Tenant records are global: only fleet admins create, change or delete them.

use tokenfleet_domain::{Agent, Device, Mailbox, Provider, Stamps, Tenant};
use tokenfleet_proto::v1 as pb;
use tokenfleet_store::{Precondition, Scope, StoreError};
use tonic::Status;

use super::{
    Change, audited, check_version, commit, delete_record, invalid, list_page, must_get,
    page_request, records, shown, span_object, store_status,
};
use crate::authz::{Access, Principal, Target, authorize};
use crate::convert::{self, TENANT_FIELDS, UpdateMask};
use crate::records::{CAS_ATTEMPTS, tenant_key};
use crate::state::BrokerState;

fn what(name: &str) -> String {
    format!("tenant `{}`", shown(name))
}

fn change(action: &'static str, name: &str) -> Change {
    Change {
        action,
        target: format!("tenants/{}", shown(name)),
        tenant: String::new(),
    }
}

pub(super) async fn create(
    state: &BrokerState,
    principal: &Principal,
    req: pb::CreateTenantRequest,
) -> Result<pb::Tenant, Status> {
    let input = req.tenant.unwrap_or_default();
    span_object(&input.name, "");
    audited(
        state,
        principal,
        change("tenant.create", &input.name),
        async {
            authorize(principal, Target::Fleet, Access::Write)?;
            let tenant = convert::tenant_from_proto(&input, Stamps::new(state.clock.now()))
                .map_err(invalid)?;
            let version = match records(state).put(&tenant, Precondition::Absent).await {
                Ok(v) => v,
                Err(StoreError::AlreadyExists(_)) => {
                    return Err(Status::already_exists(format!(
                        "{} already exists",
                        what(&tenant.name)
                    )));
                }
                Err(e) => return Err(store_status(e)),
            };
            Ok((convert::tenant_to_proto(&tenant, version), String::new()))
        },
    )
    .await
}

pub(super) async fn get(
    state: &BrokerState,
    principal: &Principal,
    req: pb::GetTenantRequest,
) -> Result<pb::Tenant, Status> {
    span_object(&req.name, "");
    authorize(principal, Target::Tenant(&req.name), Access::Read)?;
    tokenfleet_domain::name("name", &req.name).map_err(invalid)?;
    let t = must_get::<Tenant>(state, &tenant_key(&req.name), &what(&req.name)).await?;
    Ok(convert::tenant_to_proto(&t.value, t.version))
}

pub(super) async fn list(
    state: &BrokerState,
    principal: &Principal,
    req: pb::ListTenantsRequest,
) -> Result<pb::ListTenantsResponse, Status> {
    let page = page_request(req.page_size, &req.page_token)?;
    if let Some(own) = &principal.tenant {
        // A tenant-bound key sees its own tenant and nothing else.
        let past = page.cursor.as_deref().is_some_and(|c| c >= own.as_str());
        let tenant = if past {
            None
        } else {
            records(state)
                .get::<Tenant>(&tenant_key(own))
                .await
                .map_err(store_status)?
        };
        return Ok(pb::ListTenantsResponse {
            tenants: tenant
                .iter()
                .map(|t| convert::tenant_to_proto(&t.value, t.version))
                .collect(),
            next_page_token: String::new(),
        });
    }
    authorize(principal, Target::Fleet, Access::Read)?;
    let (items, next_page_token) = list_page::<Tenant>(state, &Scope::Global, &page).await?;
    Ok(pb::ListTenantsResponse {
        tenants: items
            .iter()
            .map(|t| convert::tenant_to_proto(&t.value, t.version))
            .collect(),
        next_page_token,
    })
}

pub(super) async fn update(
    state: &BrokerState,
    principal: &Principal,
    req: pb::UpdateTenantRequest,
) -> Result<pb::Tenant, Status> {
    let input = req.tenant.unwrap_or_default();
    span_object(&input.name, "");
    let mask = UpdateMask::parse(&TENANT_FIELDS, req.update_mask.as_ref());
    audited(
        state,
        principal,
        change("tenant.update", &input.name),
        async {
            authorize(principal, Target::Fleet, Access::Write)?;
            tokenfleet_domain::name("tenant.name", &input.name).map_err(invalid)?;
            let mask = mask.map_err(invalid)?;
            let what = what(&input.name);
            let key = tenant_key(&input.name);
            for attempt in 0..CAS_ATTEMPTS {
                let stored = must_get::<Tenant>(state, &key, &what).await?;
                check_version(&what, input.version, stored.version)?;
                let mut merged = convert::tenant_to_proto(&stored.value, stored.version);
                convert::merge_tenant(&mut merged, &input, &mask);
                let stamps = Stamps {
                    created: stored.value.stamps.created,
                    updated: state.clock.now(),
                };
                let next = convert::tenant_from_proto(&merged, stamps).map_err(invalid)?;
                if let Some(v) =
                    commit(state, &what, &next, stored.version, input.version, attempt).await?
                {
                    return Ok((
                        convert::tenant_to_proto(&next, v),
                        format!("fields: {}", mask.describe()),
                    ));
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
    req: pb::DeleteTenantRequest,
) -> Result<pb::DeleteTenantResponse, Status> {
    span_object(&req.name, "");
    audited(
        state,
        principal,
        change("tenant.delete", &req.name),
        async {
            authorize(principal, Target::Fleet, Access::Write)?;
            tokenfleet_domain::name("name", &req.name).map_err(invalid)?;
            let what = what(&req.name);
            let stored = must_get::<Tenant>(state, &tenant_key(&req.name), &what).await?;
            check_version(&what, req.version, stored.version)?;
            let scope = Scope::Tenant(req.name.clone());
            let r = records(state);
            let counts = [
                ("provider", "providers", r.count::<Provider>(&scope).await),
                ("mailbox", "mailboxes", r.count::<Mailbox>(&scope).await),
                ("device", "devices", r.count::<Device>(&scope).await),
                ("agent", "agents", r.count::<Agent>(&scope).await),
            ];
            let mut held = Vec::new();
            for (one, many, count) in counts {
                match count.map_err(store_status)? {
                    0 => {}
                    1 => held.push(format!("1 {one}")),
                    n => held.push(format!("{n} {many}")),
                }
            }
            if !held.is_empty() {
                return Err(Status::failed_precondition(format!(
                    "{what} still holds {}; delete them first",
                    held.join(", ")
                )));
            }
            delete_record(state, &tenant_key(&req.name), &what, req.version).await?;
            Ok((pb::DeleteTenantResponse {}, String::new()))
        },
    )
    .await
}
