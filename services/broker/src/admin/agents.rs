//! Agent RPCs. Only the display name is set here; enrollment, certificates and heartbeats fill in
//! the rest. Deleting an agent also removes its enrollment codes.

use tokenfleet_domain::{Agent, Device, Stamps};
use tokenfleet_proto::v1 as pb;
use tokenfleet_store::{Precondition, Scope, StoreError};
use tonic::Status;

use super::{
    Change, audited, check_version, commit, delete_record, invalid, list_page, must_get,
    object_path, page_request, records, refuse_if_referenced, require_tenant, shown, span_object,
    store_status,
};
use crate::authz::{Access, Principal, Target, authorize};
use crate::convert::{self, AGENT_FIELDS, UpdateMask};
use crate::records::{CAS_ATTEMPTS, agent_key};
use crate::state::BrokerState;

fn what(tenant: &str, name: &str) -> String {
    format!("agent `{}` in tenant `{}`", shown(name), shown(tenant))
}

fn change(action: &'static str, tenant: &str, name: &str) -> Change {
    Change {
        action,
        target: object_path(tenant, "agents", name),
        tenant: tenant.to_owned(),
    }
}

pub(super) async fn create(
    state: &BrokerState,
    principal: &Principal,
    req: pb::CreateAgentRequest,
) -> Result<pb::Agent, Status> {
    let input = req.agent.unwrap_or_default();
    span_object(&input.tenant, &input.name);
    audited(
        state,
        principal,
        change("agent.create", &input.tenant, &input.name),
        async {
            authorize(principal, Target::Tenant(&input.tenant), Access::Write)?;
            let agent = convert::agent_from_proto(&input, Stamps::new(state.clock.now()))
                .map_err(invalid)?;
            require_tenant(state, &agent.tenant).await?;
            let version = match records(state).put(&agent, Precondition::Absent).await {
                Ok(v) => v,
                Err(StoreError::AlreadyExists(_)) => {
                    return Err(Status::already_exists(format!(
                        "{} already exists",
                        what(&agent.tenant, &agent.name)
                    )));
                }
                Err(e) => return Err(store_status(e)),
            };
            Ok((convert::agent_to_proto(&agent, version), String::new()))
        },
    )
    .await
}

pub(super) async fn get(
    state: &BrokerState,
    principal: &Principal,
    req: pb::GetAgentRequest,
) -> Result<pb::Agent, Status> {
    span_object(&req.tenant, &req.name);
    authorize(principal, Target::Tenant(&req.tenant), Access::Read)?;
    tokenfleet_domain::name("tenant", &req.tenant).map_err(invalid)?;
    tokenfleet_domain::name("name", &req.name).map_err(invalid)?;
    let a = must_get::<Agent>(
        state,
        &agent_key(&req.tenant, &req.name),
        &what(&req.tenant, &req.name),
    )
    .await?;
    Ok(convert::agent_to_proto(&a.value, a.version))
}

pub(super) async fn list(
    state: &BrokerState,
    principal: &Principal,
    req: pb::ListAgentsRequest,
) -> Result<pb::ListAgentsResponse, Status> {
    span_object(&req.tenant, "");
    authorize(principal, Target::Tenant(&req.tenant), Access::Read)?;
    tokenfleet_domain::name("tenant", &req.tenant).map_err(invalid)?;
    let page = page_request(req.page_size, &req.page_token)?;
    require_tenant(state, &req.tenant).await?;
    let (items, next_page_token) =
        list_page::<Agent>(state, &Scope::Tenant(req.tenant.clone()), &page).await?;
    Ok(pb::ListAgentsResponse {
        agents: items
            .iter()
            .map(|a| convert::agent_to_proto(&a.value, a.version))
            .collect(),
        next_page_token,
    })
}

pub(super) async fn update(
    state: &BrokerState,
    principal: &Principal,
    req: pb::UpdateAgentRequest,
) -> Result<pb::Agent, Status> {
    let input = req.agent.unwrap_or_default();
    span_object(&input.tenant, &input.name);
    let mask = UpdateMask::parse(&AGENT_FIELDS, req.update_mask.as_ref());
    audited(
        state,
        principal,
        change("agent.update", &input.tenant, &input.name),
        async {
            authorize(principal, Target::Tenant(&input.tenant), Access::Write)?;
            tokenfleet_domain::name("agent.tenant", &input.tenant).map_err(invalid)?;
            tokenfleet_domain::name("agent.name", &input.name).map_err(invalid)?;
            let mask = mask.map_err(invalid)?;
            let what = what(&input.tenant, &input.name);
            let key = agent_key(&input.tenant, &input.name);
            for attempt in 0..CAS_ATTEMPTS {
                let stored = must_get::<Agent>(state, &key, &what).await?;
                check_version(&what, input.version, stored.version)?;
                let old = &stored.value;
                let mut merged = convert::agent_to_proto(old, stored.version);
                convert::merge_agent(&mut merged, &input, &mask);
                let stamps = Stamps {
                    created: old.stamps.created,
                    updated: state.clock.now(),
                };
                let mut next = convert::agent_from_proto(&merged, stamps).map_err(invalid)?;
                next.revoked = old.revoked;
                next.certificate_expires = old.certificate_expires;
                next.last_seen = old.last_seen;
                next.software_version.clone_from(&old.software_version);
                if let Some(v) =
                    commit(state, &what, &next, stored.version, input.version, attempt).await?
                {
                    return Ok((
                        convert::agent_to_proto(&next, v),
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
    req: pb::DeleteAgentRequest,
) -> Result<pb::DeleteAgentResponse, Status> {
    span_object(&req.tenant, &req.name);
    audited(
        state,
        principal,
        change("agent.delete", &req.tenant, &req.name),
        async {
            authorize(principal, Target::Tenant(&req.tenant), Access::Write)?;
            tokenfleet_domain::name("tenant", &req.tenant).map_err(invalid)?;
            tokenfleet_domain::name("name", &req.name).map_err(invalid)?;
            let what = what(&req.tenant, &req.name);
            let key = agent_key(&req.tenant, &req.name);
            let stored = must_get::<Agent>(state, &key, &what).await?;
            check_version(&what, req.version, stored.version)?;
            refuse_if_referenced::<Device>(
                state,
                &req.tenant,
                &what,
                |d| d.agent == req.name,
                |d| d.name.as_str(),
                "still hosts devices",
                "move or delete them first",
            )
            .await?;
            delete_record(state, &key, &what, req.version).await?;
            // Its enrollment codes are bound to this record and useless now; remove them (best
            // effort: a code left behind still cannot enroll a re-created agent).
            if let Err(error) =
                crate::identity::codes::remove_all(state, &req.tenant, &req.name).await
            {
                tracing::warn!(%error, "removing the enrollment codes of a deleted agent failed");
            }
            Ok((pb::DeleteAgentResponse {}, String::new()))
        },
    )
    .await
}
