//! Mailbox RPCs. A mailbox's provider must exist in its tenant and support its grant type.

use tokenfleet_domain::{Device, GrantType, Mailbox, Provider, Stamps, TokenState};
use tokenfleet_proto::v1 as pb;
use tokenfleet_store::{Precondition, Scope, StoreError};
use tonic::Status;

use super::{
    Change, audited, check_version, commit, delete_record, invalid, list_page, must_get,
    object_path, page_request, precondition, records, refuse_if_referenced, require_tenant, shown,
    span_object, store_status,
};
use crate::authz::{Access, Principal, Target, authorize};
use crate::convert::{self, MAILBOX_FIELDS, UpdateMask};
use crate::records::{CAS_ATTEMPTS, mailbox_key, provider_key};
use crate::state::BrokerState;
use crate::tokens::grant::{GrantRecord, grant_key};
use crate::tokens::lifecycle::discard_grant;

fn what(tenant: &str, name: &str) -> String {
    format!("mailbox `{}` in tenant `{}`", shown(name), shown(tenant))
}

fn change(action: &'static str, tenant: &str, name: &str) -> Change {
    Change {
        action,
        target: object_path(tenant, "mailboxes", name),
        tenant: tenant.to_owned(),
    }
}

/// The provider exists in the mailbox's tenant, fits the grant type, and holds the credential the
/// grant type needs.
async fn check_provider(state: &BrokerState, m: &Mailbox) -> Result<(), Status> {
    let provider = records(state)
        .get::<Provider>(&provider_key(&m.tenant, &m.provider))
        .await
        .map_err(store_status)?
        .ok_or_else(|| {
            precondition(
                "mailbox.provider",
                format!(
                    "no provider `{}` in tenant `{}`; create it first",
                    m.provider, m.tenant
                ),
            )
        })?
        .value;
    convert::check_grant_fits(provider.kind, m.grant_type).map_err(invalid)?;
    match m.grant_type {
        GrantType::AppOnly if provider.client_secret.is_none() => Err(precondition(
            "mailbox.grant_type",
            format!(
                "app_only needs a client secret, and provider `{}` has none; set provider.client_secret first",
                m.provider
            ),
        )),
        GrantType::ServiceAccount if provider.service_account_key.is_none() => Err(precondition(
            "mailbox.grant_type",
            format!(
                "service_account needs a service-account key, and provider `{}` has none; set provider.service_account_key first",
                m.provider
            ),
        )),
        _ => Ok(()),
    }
}

pub(super) async fn create(
    state: &BrokerState,
    principal: &Principal,
    req: pb::CreateMailboxRequest,
) -> Result<pb::Mailbox, Status> {
    let input = req.mailbox.unwrap_or_default();
    span_object(&input.tenant, &input.name);
    audited(
        state,
        principal,
        change("mailbox.create", &input.tenant, &input.name),
        async {
            authorize(principal, Target::Tenant(&input.tenant), Access::Write)?;
            let mailbox = convert::mailbox_from_proto(&input, Stamps::new(state.clock.now()))
                .map_err(invalid)?;
            require_tenant(state, &mailbox.tenant).await?;
            check_provider(state, &mailbox).await?;
            let version = match records(state).put(&mailbox, Precondition::Absent).await {
                Ok(v) => v,
                Err(StoreError::AlreadyExists(_)) => {
                    return Err(Status::already_exists(format!(
                        "{} already exists",
                        what(&mailbox.tenant, &mailbox.name)
                    )));
                }
                Err(e) => return Err(store_status(e)),
            };
            Ok((convert::mailbox_to_proto(&mailbox, version), String::new()))
        },
    )
    .await
}

pub(super) async fn get(
    state: &BrokerState,
    principal: &Principal,
    req: pb::GetMailboxRequest,
) -> Result<pb::Mailbox, Status> {
    span_object(&req.tenant, &req.name);
    authorize(principal, Target::Tenant(&req.tenant), Access::Read)?;
    tokenfleet_domain::name("tenant", &req.tenant).map_err(invalid)?;
    tokenfleet_domain::name("name", &req.name).map_err(invalid)?;
    super::tokens::mailbox_view(state, &req.tenant, &req.name).await
}

pub(super) async fn list(
    state: &BrokerState,
    principal: &Principal,
    req: pb::ListMailboxesRequest,
) -> Result<pb::ListMailboxesResponse, Status> {
    span_object(&req.tenant, "");
    authorize(principal, Target::Tenant(&req.tenant), Access::Read)?;
    tokenfleet_domain::name("tenant", &req.tenant).map_err(invalid)?;
    let page = page_request(req.page_size, &req.page_token)?;
    require_tenant(state, &req.tenant).await?;
    let scope = Scope::Tenant(req.tenant.clone());
    let (items, next_page_token) = list_page::<Mailbox>(state, &scope, &page).await?;
    let grants = grants_of(state, &scope, &page, &items).await?;
    Ok(pb::ListMailboxesResponse {
        mailboxs: items
            .iter()
            .map(|m| super::mailbox_with_grant(&m.value, m.version, grants.get(&m.value.name)))
            .collect(),
        next_page_token,
    })
}

/// The grant records of a page of mailboxes. Grants share their mailbox's id, so one listing
/// from the same cursor finds them; mailboxes beyond a full listing (possible only with orphaned
/// grants) are read one by one.
async fn grants_of(
    state: &BrokerState,
    scope: &Scope,
    page: &super::PageRequest,
    items: &[crate::records::Versioned<Mailbox>],
) -> Result<std::collections::HashMap<String, GrantRecord>, Status> {
    let limit = page.size + 1;
    let listed = records(state)
        .list::<GrantRecord>(scope, page.cursor.as_deref(), limit)
        .await
        .map_err(store_status)?;
    let complete_up_to = (listed.len() >= limit)
        .then(|| listed.last().map(|g| g.value.mailbox.clone()))
        .flatten();
    let mut grants: std::collections::HashMap<String, GrantRecord> = listed
        .into_iter()
        .map(|g| (g.value.mailbox.clone(), g.value))
        .collect();
    if let Some(last) = complete_up_to {
        for m in items.iter().filter(|m| m.value.name > last) {
            if let Some(g) = records(state)
                .get::<GrantRecord>(&grant_key(&m.value.tenant, &m.value.name))
                .await
                .map_err(store_status)?
            {
                grants.insert(m.value.name.clone(), g.value);
            }
        }
    }
    Ok(grants)
}

pub(super) async fn update(
    state: &BrokerState,
    principal: &Principal,
    req: pb::UpdateMailboxRequest,
) -> Result<pb::Mailbox, Status> {
    let input = req.mailbox.unwrap_or_default();
    span_object(&input.tenant, &input.name);
    let mask = UpdateMask::parse(&MAILBOX_FIELDS, req.update_mask.as_ref());
    audited(
        state,
        principal,
        change("mailbox.update", &input.tenant, &input.name),
        async {
            authorize(principal, Target::Tenant(&input.tenant), Access::Write)?;
            tokenfleet_domain::name("mailbox.tenant", &input.tenant).map_err(invalid)?;
            tokenfleet_domain::name("mailbox.name", &input.name).map_err(invalid)?;
            let mask = mask.map_err(invalid)?;
            let what = what(&input.tenant, &input.name);
            let key = mailbox_key(&input.tenant, &input.name);
            for attempt in 0..CAS_ATTEMPTS {
                let stored = must_get::<Mailbox>(state, &key, &what).await?;
                check_version(&what, input.version, stored.version)?;
                let old = &stored.value;
                let mut merged = convert::mailbox_to_proto(old, stored.version);
                convert::merge_mailbox(&mut merged, &input, &mask);
                let stamps = Stamps {
                    created: old.stamps.created,
                    updated: state.clock.now(),
                };
                let mut next = convert::mailbox_from_proto(&merged, stamps).map_err(invalid)?;
                // A grant belongs to one address, app registration, flow and signed-in account:
                // changing any of them means a new consent.
                let same_grant = next.address == old.address
                    && next.provider == old.provider
                    && next.grant_type == old.grant_type
                    && next
                        .consent_account
                        .eq_ignore_ascii_case(&old.consent_account);
                next.token = if same_grant {
                    old.token.clone()
                } else {
                    TokenState::default()
                };
                check_provider(state, &next).await?;
                if let Some(v) =
                    commit(state, &what, &next, stored.version, input.version, attempt).await?
                {
                    let grant = if same_grant {
                        records(state)
                            .get::<GrantRecord>(&grant_key(&next.tenant, &next.name))
                            .await
                            .map_err(store_status)?
                            .map(|g| g.value)
                    } else {
                        // The grant belongs to the old address, app, flow or account.
                        discard_grant(state, &next.tenant, &next.name)
                            .await
                            .map_err(store_status)?;
                        None
                    };
                    return Ok((
                        super::mailbox_with_grant(&next, v, grant.as_ref()),
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
    req: pb::DeleteMailboxRequest,
) -> Result<pb::DeleteMailboxResponse, Status> {
    span_object(&req.tenant, &req.name);
    audited(
        state,
        principal,
        change("mailbox.delete", &req.tenant, &req.name),
        async {
            authorize(principal, Target::Tenant(&req.tenant), Access::Write)?;
            tokenfleet_domain::name("tenant", &req.tenant).map_err(invalid)?;
            tokenfleet_domain::name("name", &req.name).map_err(invalid)?;
            let what = what(&req.tenant, &req.name);
            let key = mailbox_key(&req.tenant, &req.name);
            let stored = must_get::<Mailbox>(state, &key, &what).await?;
            check_version(&what, req.version, stored.version)?;
            refuse_if_referenced::<Device>(
                state,
                &req.tenant,
                &what,
                |d| d.referenced_mailboxes().any(|m| m == req.name),
                |d| d.name.as_str(),
                "is still used by devices",
                "change or delete them first",
            )
            .await?;
            delete_record(state, &key, &what, req.version).await?;
            // Its tokens must not outlive it.
            discard_grant(state, &req.tenant, &req.name)
                .await
                .map_err(store_status)?;
            Ok((pb::DeleteMailboxResponse {}, String::new()))
        },
    )
    .await
}
