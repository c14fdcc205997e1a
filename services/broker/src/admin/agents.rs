//! Agents as a [`Resource`]. Only the display name is set here; enrollment, certificates and
//! heartbeats fill in the rest, which updates keep. An agent that hosts devices is not deleted;
//! deleting one also removes its enrollment codes.

use tokenfleet_domain::Agent;
use tokenfleet_proto::v1 as pb;

use crate::convert::{self};
use crate::ops::Error;
use crate::ops::resource::{Id, Resource, resource_basics};
use crate::ops::stored::{Reference, Referrer};
use crate::records::agent_key;
use crate::state::BrokerState;

/// The agent resource.
pub(crate) struct Agents;

impl Resource for Agents {
    type Plan = ();
    resource_basics!(scoped "agent" in "agents": Agent as pb::Agent, key agent_key, to_wire convert::agent_to_proto, from_wire convert::agent_from_proto, merge convert::merge_agent);
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
