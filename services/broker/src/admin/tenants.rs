//! Tenants on the wire: the Admin API's tenant calls convert the `Tenant` message to and from
//! the domain record and call the core's domain-typed tenant resource
//! ([`tokenfleet_core::resources::Tenants`]: authorization — changes are fleet-admin only —,
//! validation, versions, the refusal to delete a tenant that still holds objects, audit). The web
//! console calls the same operations without converting.

use tokenfleet_core::records::Versioned;
use tokenfleet_domain::Tenant;
use tokenfleet_proto::v1 as pb;

pub(crate) use tokenfleet_core::resources::Tenants;

use crate::authz::Principal;
use crate::convert;
use crate::ops::Error;
use crate::state::BrokerState;

/// The core's form of a tenant a caller sent (validated by the core, after authorization).
pub(crate) fn tenant_in(wire: Option<pb::Tenant>) -> Versioned<Tenant> {
    convert::tenant_in(&wire.unwrap_or_default())
}

/// The wire form of a tenant and its version.
pub(crate) fn tenant_out(tenant: Versioned<Tenant>) -> pb::Tenant {
    convert::tenant_to_proto(&tenant.value, tenant.version)
}

/// `ListTenants`: every tenant for fleet-wide keys, its own for a tenant-bound key.
pub(crate) async fn list(
    state: &BrokerState,
    principal: &Principal,
    req: pb::ListTenantsRequest,
) -> Result<pb::ListTenantsResponse, Error> {
    let (tenants, next_page_token) =
        tokenfleet_core::resources::tenants::list(state, principal, req.page_size, &req.page_token)
            .await?;
    Ok(pb::ListTenantsResponse {
        tenants: tenants.into_iter().map(tenant_out).collect(),
        next_page_token,
    })
}
