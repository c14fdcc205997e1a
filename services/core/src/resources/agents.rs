//! Agents as a [`Resource`], in domain types: the operations take and return the [`Agent`]
//! record with its store version ([`Versioned`]). Only the display name is set by callers;
//! enrollment, certificates and heartbeats fill in the rest, which updates keep. An agent that
//! hosts devices is not deleted; deleting one also removes its enrollment codes.
//!
//! What a caller sends is read for `tenant`, `name`, `display_name` and the version only; the
//! other fields are the broker's ([`from_input`] resets them, updates keep the stored ones).

use tokenfleet_domain::{Agent, MAX_TEXT_LEN, Stamps, Valid};

use crate::ops::Error;
use crate::ops::mask::{FieldTable, UpdateMask};
use crate::ops::resource::{Id, Resource, resource_names};
use crate::ops::stored::{Reference, Referrer};
use crate::records::{Versioned, agent_key};
use crate::state::BrokerState;

/// The fields of an agent as update masks name them (the Admin API's field names).
pub const FIELDS: FieldTable = FieldTable {
    resource: "agent",
    mutable: &["display_name"],
    immutable: &["tenant", "name"],
    output_only: &[
        "revoked",
        "certificate_expire_time",
        "last_seen_time",
        "software_version",
        "create_time",
        "update_time",
        "version",
    ],
};

/// The agent resource.
#[derive(Debug, Clone, Copy, Default)]
pub struct Agents;

/// A validated new agent record from what a caller sent (output-only fields start empty).
pub fn from_input(input: &Agent, stamps: Stamps) -> Valid<Agent> {
    tokenfleet_domain::name("agent.tenant", &input.tenant)?;
    tokenfleet_domain::name("agent.name", &input.name)?;
    tokenfleet_domain::text("agent.display_name", &input.display_name, MAX_TEXT_LEN)?;
    Ok(Agent {
        tenant: input.tenant.clone(),
        name: input.name.clone(),
        display_name: input.display_name.clone(),
        revoked: false,
        certificate_expires: None,
        last_seen: None,
        software_version: String::new(),
        stamps,
    })
}

impl Resource for Agents {
    type Plan = ();
    resource_names!(scoped versioned "agent" in "agents": Agent, from from_input, key agent_key);
    fn merge(dst: &mut Versioned<Agent>, src: &Versioned<Agent>, mask: &UpdateMask) {
        if mask.includes("display_name") {
            dst.value.display_name.clone_from(&src.value.display_name);
        }
    }

    const REFERENCES: &'static [Reference] = &[Reference::new(
        Referrer::DeviceAgent,
        "still hosts devices",
        "move or delete them first",
    )];

    /// Revocation, certificates and heartbeats are the broker's, not the caller's.
    fn keep_server_owned(old: &Agent, next: &mut Agent) {
        next.revoked = old.revoked;
        next.certificate_expires = old.certificate_expires;
        next.last_seen = old.last_seen;
        next.software_version.clone_from(&old.software_version);
    }

    /// Its enrollment codes are bound to the record and useless now; removed best effort (a code
    /// left behind still cannot enroll a re-created agent).
    async fn deleted(&self, state: &BrokerState, id: &Id) -> Result<(), Error> {
        if let Err(error) = crate::identity::codes::remove_all(state, &id.tenant, &id.name).await {
            tracing::warn!(%error, "removing the enrollment codes of a deleted agent failed");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use time::OffsetDateTime;
    use tokenfleet_domain::{Role, Tenant};
    use tokenfleet_store::Precondition;

    use super::*;
    use crate::ops::resource;
    use crate::records::{Records, tenant_key};
    use crate::testing::{principal, state};

    fn input(name: &str, display_name: &str, version: u64) -> Versioned<Agent> {
        Versioned {
            version,
            value: Agent {
                tenant: "acme".into(),
                name: name.into(),
                display_name: display_name.into(),
                revoked: true,
                certificate_expires: None,
                last_seen: Some(OffsetDateTime::UNIX_EPOCH),
                software_version: "forged".into(),
                stamps: Stamps::new(OffsetDateTime::UNIX_EPOCH),
            },
        }
    }

    /// The domain-typed operations: what a caller sends beyond the display name is ignored,
    /// server-owned fields survive an update, authorization and validation come from the core.
    #[tokio::test]
    async fn agents_are_created_updated_and_deleted_in_domain_types() {
        let dir = tempfile::tempdir().unwrap();
        let state = state(dir.path()).await;
        let tenant = Tenant {
            name: "acme".into(),
            display_name: String::new(),
            stamps: Stamps::new(state.clock.now()),
        };
        Records::new(state.store.as_ref())
            .put(&tenant, Precondition::Absent)
            .await
            .unwrap();
        assert!(
            Records::new(state.store.as_ref())
                .get::<Tenant>(&tenant_key("acme"))
                .await
                .unwrap()
                .is_some()
        );
        let admin = principal(Role::TenantAdmin, Some("acme"));

        let created = resource::create(&Agents, &state, &admin, input("site-a", "Site A", 0))
            .await
            .unwrap();
        assert_eq!(created.version, 1);
        assert!(!created.value.revoked, "revocation is the broker's");
        assert_eq!(created.value.last_seen, None);
        assert_eq!(created.value.software_version, "");

        // The broker records a heartbeat; an update of the display name keeps it.
        let mut seen = created.value.clone();
        seen.last_seen = Some(state.clock.now());
        seen.software_version = "1.2.3".into();
        Records::new(state.store.as_ref())
            .put(&seen, Precondition::Version(1))
            .await
            .unwrap();
        let mask = UpdateMask::parse(&FIELDS, &["display_name".to_owned()]);
        let updated = resource::update(&Agents, &state, &admin, input("site-a", "Site B", 0), mask)
            .await
            .unwrap();
        assert_eq!(updated.value.display_name, "Site B");
        assert_eq!(updated.value.software_version, "1.2.3");
        assert_eq!(updated.value.last_seen, seen.last_seen);
        assert!(!updated.value.revoked);

        let listed = resource::list(&Agents, &state, &admin, "acme", 10, "")
            .await
            .unwrap();
        assert_eq!(listed.0, vec![updated.clone()]);

        // Another tenant's key, a viewer writing, a bad name.
        let other = principal(Role::TenantAdmin, Some("beta"));
        let err = resource::get(&Agents, &state, &other, Id::scoped("acme", "site-a"))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::PermissionDenied(_)), "{err:?}");
        let viewer = principal(Role::Viewer, Some("acme"));
        let err = resource::create(&Agents, &state, &viewer, input("site-c", "", 0))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::PermissionDenied(_)), "{err:?}");
        let err = resource::create(&Agents, &state, &admin, input("Bad Name", "", 0))
            .await
            .unwrap_err();
        assert!(err.to_string().starts_with("agent.name: "), "{err}");

        resource::delete(&Agents, &state, &admin, Id::scoped("acme", "site-a"), 0)
            .await
            .unwrap();
        let err = resource::get(&Agents, &state, &admin, Id::scoped("acme", "site-a"))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::NotFound(_)), "{err:?}");
    }
}
