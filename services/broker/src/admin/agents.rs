//! Agents on the wire: the Admin API's agent calls convert the `Agent` message to and from the
//! domain record and call the core's domain-typed agent resource
//! ([`tokenfleet_core::resources::Agents`]: authorization, validation, versions, references,
//! server-owned fields, audit). The web console calls the same operations without converting.

use tokenfleet_core::records::Versioned;
use tokenfleet_domain::Agent;
use tokenfleet_proto::v1 as pb;

pub(crate) use tokenfleet_core::resources::Agents;

use crate::convert;

/// The core's form of an agent a caller sent (validated by the core, after authorization).
pub(crate) fn agent_in(wire: Option<pb::Agent>) -> Versioned<Agent> {
    convert::agent_in(&wire.unwrap_or_default())
}

/// The wire form of an agent and its version.
pub(crate) fn agent_out(agent: Versioned<Agent>) -> pb::Agent {
    convert::agent_to_proto(&agent.value, agent.version)
}
