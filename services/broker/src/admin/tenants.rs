//! Tenants as a [`Resource`]. Tenant records are global: only fleet admins create, change or
//! delete them; a tenant's own keys read it. A tenant is deleted only when empty.

use tokenfleet_domain::Tenant;
use tokenfleet_proto::v1 as pb;
use tokenfleet_store::Scope;

use crate::authz::{Access, Principal, Target, authorize};
use crate::convert::{self};
use crate::ops::Error;
use crate::ops::paging::page_request;
use crate::ops::resource::{Id, Resource, resource_basics};
use crate::ops::stored::{Reference, Referrer, list_page, records};
use crate::records::tenant_key;
use crate::state::BrokerState;

/// The tenant resource.
pub(crate) struct Tenants;

impl Resource for Tenants {
    type Plan = ();
    resource_basics!(global "tenant" in "tenants": Tenant as pb::Tenant, key tenant_key, to_wire convert::tenant_to_proto, from_wire convert::tenant_from_proto, merge convert::merge_tenant);
    /// Changing tenant records is a fleet decision; reading one is the tenant's.
    fn target(id: &Id, access: Access) -> Target<'_> {
        match access {
            Access::Write => Target::Fleet,
            Access::Read => Target::Tenant(&id.name),
        }
    }

    /// A tenant that still holds objects is not deleted (they would be orphaned).
    const REFERENCES: &'static [Reference] = &[Reference::new(
        Referrer::TenantContents,
        "still holds",
        "delete them first",
    )];
}

/// `ListTenants`: every tenant for fleet-wide keys; a tenant-bound key sees its own tenant and
/// nothing else.
pub(crate) async fn list(
    state: &BrokerState,
    principal: &Principal,
    req: pb::ListTenantsRequest,
) -> Result<pb::ListTenantsResponse, Error> {
    let page = page_request(req.page_size, &req.page_token)?;
    let (items, next_page_token) = match &principal.tenant {
        Some(own) => {
            let past = page.cursor.as_deref().is_some_and(|c| c >= own.as_str());
            let own = if past {
                None
            } else {
                records(state).get::<Tenant>(&tenant_key(own)).await?
            };
            (own.into_iter().collect(), String::new())
        }
        None => {
            authorize(principal, Target::Fleet, Access::Read)?;
            list_page::<Tenant>(state, &Scope::Global, &page).await?
        }
    };
    Ok(pb::ListTenantsResponse {
        tenants: items
            .iter()
            .map(|t| Tenants::to_wire(&t.value, t.version))
            .collect(),
        next_page_token,
    })
}
