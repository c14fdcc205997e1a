//! Tenants as a [`Resource`], in domain types: the operations take and return the [`Tenant`]
//! record with its store version ([`Versioned`]). Tenant records are global: only fleet admins
//! create, change or delete them; a tenant's own keys read it. A tenant is deleted only when
//! empty. Listing shows every tenant to fleet-wide keys and only its own to a tenant-bound key.

use tokenfleet_domain::{MAX_TEXT_LEN, Stamps, Tenant, Valid};
use tokenfleet_store::Scope;

use crate::authz::{Access, Principal, Target};
use crate::ops::Error;
use crate::ops::change::{Change, authorize_read};
use crate::ops::mask::{FieldTable, UpdateMask};
use crate::ops::paging::page_request;
use crate::ops::resource::{Id, Resource, resource_names};
use crate::ops::stored::{Reference, Referrer, list_page, records};
use crate::records::{Versioned, tenant_key};
use crate::state::BrokerState;

/// The fields of a tenant as update masks name them (the Admin API's field names).
pub const FIELDS: FieldTable = FieldTable {
    resource: "tenant",
    mutable: &["display_name"],
    immutable: &["name"],
    output_only: &["create_time", "update_time", "version"],
};

/// The tenant resource.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tenants;

/// A validated tenant record from what a caller sent (only the name and display name are read).
pub fn from_input(input: &Tenant, stamps: Stamps) -> Valid<Tenant> {
    tokenfleet_domain::name("tenant.name", &input.name)?;
    tokenfleet_domain::text("tenant.display_name", &input.display_name, MAX_TEXT_LEN)?;
    Ok(Tenant {
        name: input.name.clone(),
        display_name: input.display_name.clone(),
        stamps,
    })
}

impl Resource for Tenants {
    type Plan = ();
    resource_names!(global versioned "tenant" in "tenants": Tenant, from from_input, key tenant_key);
    fn merge(dst: &mut Versioned<Tenant>, src: &Versioned<Tenant>, mask: &UpdateMask) {
        if mask.includes("display_name") {
            dst.value.display_name.clone_from(&src.value.display_name);
        }
    }

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

/// One page of tenants: every tenant for fleet-wide keys; a tenant-bound key sees its own tenant
/// and nothing else. Returns them and the next page token.
pub async fn list(
    state: &BrokerState,
    principal: &Principal,
    page_size: i32,
    page_token: &str,
) -> Result<(Vec<Versioned<Tenant>>, String), Error> {
    let page = page_request(page_size, page_token)?;
    match &principal.tenant {
        Some(own) => {
            let past = page.cursor.as_deref().is_some_and(|c| c >= own.as_str());
            let own = if past {
                None
            } else {
                records(state).get::<Tenant>(&tenant_key(own)).await?
            };
            Ok((own.into_iter().collect(), String::new()))
        }
        None => {
            let read = || Change::of_collection("tenant.list", "", "tenants");
            authorize_read(state, principal, read, Target::Fleet).await?;
            list_page::<Tenant>(state, &Scope::Global, &page).await
        }
    }
}

#[cfg(test)]
mod tests {
    use time::OffsetDateTime;
    use tokenfleet_domain::Role;

    use super::*;
    use crate::ops::resource;
    use crate::testing::{principal, state};

    fn input(name: &str, display_name: &str) -> Versioned<Tenant> {
        Versioned {
            version: 0,
            value: Tenant {
                name: name.into(),
                display_name: display_name.into(),
                stamps: Stamps::new(OffsetDateTime::UNIX_EPOCH),
            },
        }
    }

    /// Only fleet admins change tenant records; a tenant's keys read and list their own tenant
    /// only; a tenant that holds objects is not deleted.
    #[tokio::test]
    async fn tenants_are_a_fleet_decision_and_read_by_their_own_keys() {
        let dir = tempfile::tempdir().unwrap();
        let state = state(dir.path()).await;
        let fleet = principal(Role::FleetAdmin, None);
        let acme_admin = principal(Role::TenantAdmin, Some("acme"));

        let err = resource::create(&Tenants, &state, &acme_admin, input("acme", ""))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::PermissionDenied(_)), "{err:?}");
        let created = resource::create(&Tenants, &state, &fleet, input("acme", "Acme"))
            .await
            .unwrap();
        assert_eq!(created.version, 1);
        resource::create(&Tenants, &state, &fleet, input("beta", ""))
            .await
            .unwrap();
        let err = resource::create(&Tenants, &state, &fleet, input("Bad Name", ""))
            .await
            .unwrap_err();
        assert!(err.to_string().starts_with("tenant.name: "), "{err}");

        let own = resource::get(&Tenants, &state, &acme_admin, Id::global("acme"))
            .await
            .unwrap();
        assert_eq!(own.value.display_name, "Acme");
        let err = resource::get(&Tenants, &state, &acme_admin, Id::global("beta"))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::PermissionDenied(_)), "{err:?}");

        let (listed, next) = list(&state, &acme_admin, 10, "").await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].value.name, "acme");
        assert!(next.is_empty());
        let (all, _) = list(&state, &fleet, 10, "").await.unwrap();
        assert_eq!(all.len(), 2);
        // A viewer without a tenant is a fleet-wide reader.
        let viewer = principal(Role::Viewer, None);
        assert_eq!(list(&state, &viewer, 10, "").await.unwrap().0.len(), 2);

        let mask = UpdateMask::parse(&FIELDS, &["display_name".to_owned()]).unwrap();
        let err = resource::update(&Tenants, &state, &acme_admin, input("acme", "X"), Ok(mask))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::PermissionDenied(_)), "{err:?}");
        let mask = UpdateMask::parse(&FIELDS, &["display_name".to_owned()]).unwrap();
        let updated = resource::update(
            &Tenants,
            &state,
            &fleet,
            input("acme", "Acme Ltd"),
            Ok(mask),
        )
        .await
        .unwrap();
        assert_eq!(updated.value.display_name, "Acme Ltd");
        assert_eq!(updated.version, 2);

        let err = resource::delete(&Tenants, &state, &acme_admin, Id::global("beta"), 0)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::PermissionDenied(_)), "{err:?}");
        resource::delete(&Tenants, &state, &fleet, Id::global("beta"), 0)
            .await
            .unwrap();
    }
}
