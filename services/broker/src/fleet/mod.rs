//! The fleet's edge: the agent-facing `TokenBroker.GetAgentConfig` and `TokenBroker.StatusStream`
//! calls and the operator-facing `Admin.GetFleetStatus` and `Admin.TestConnection`, each decoding
//! the wire messages ([`wire`], the conversions in one place), calling the core's fleet
//! operations and encoding their results. The fleet's state and its operations — the agent
//! configuration, the stored device reports, presence markers, queued commands and answers, the
//! per-agent session, connection tests, housekeeping and the wake channel — live in
//! [`tokenfleet_core::fleet`]; its modules are re-exported here under their own names, so
//! `tokenfleet_broker::fleet::store` is `tokenfleet_core::fleet::store`. Depends on the core,
//! `wire`, the edge's error mapping and `identity` (the authenticated peer).

mod stream;
pub mod wire;

use std::pin::Pin;

use futures::Stream;
use tokenfleet_proto::v1 as pb;
use tonic::{Status, Streaming};

use crate::authz::Principal;
use crate::edge::grpc_status::status;
use crate::identity::peer::AgentPeer;
use crate::ops::Error;
use crate::state::BrokerState;

pub use tokenfleet_core::fleet::{
    COMMAND_SWEEP_MAX, CONFIG_ACTIONS, DEFAULT_HEARTBEAT_SECONDS, FleetSettings,
    MAX_HEARTBEAT_SECONDS, STALE_HEARTBEATS, config, config_changed, format_age, housekeeping,
    model, queue_reload, revision, settings, store, wake,
};

/// The stream of commands sent down to one agent.
pub type CommandStream = Pin<Box<dyn Stream<Item = Result<pb::AgentCommand, Status>> + Send>>;

/// `TokenBroker.GetAgentConfig` for an authenticated agent.
pub async fn agent_config(
    state: &BrokerState,
    settings: &FleetSettings,
    peer: &AgentPeer,
    _req: pb::GetAgentConfigRequest,
) -> Result<pb::AgentConfig, Status> {
    tokenfleet_core::fleet::agent_config(state, settings, peer)
        .await
        .map(wire::config_out)
        .map_err(status)
}

/// `TokenBroker.StatusStream` for an authenticated agent.
pub async fn status_stream(
    state: &BrokerState,
    settings: &FleetSettings,
    peer: AgentPeer,
    reports: Streaming<pb::AgentReport>,
) -> Result<CommandStream, Status> {
    Ok(stream::start(state, settings, peer, reports))
}

/// `Admin.GetFleetStatus`.
pub async fn get_fleet_status(
    state: &BrokerState,
    principal: &Principal,
    req: pb::GetFleetStatusRequest,
) -> Result<pb::GetFleetStatusResponse, Error> {
    tokenfleet_core::fleet::fleet_status(state, principal, &req.tenant)
        .await
        .map(wire::fleet_status_out)
}

/// `Admin.TestConnection`.
pub async fn test_connection(
    state: &BrokerState,
    principal: &Principal,
    req: pb::TestConnectionRequest,
) -> Result<pb::ConnectionTestResult, Error> {
    tokenfleet_core::fleet::test_connection(state, principal, wire::test_request_in(req))
        .await
        .map(wire::test_result_out)
}

#[cfg(test)]
mod tests {
    use crate::config::{AgentsSection, DEFAULT_CONFIG_TOML, RawConfig};

    #[test]
    fn heartbeat_is_configured_checked_and_in_the_default_config() {
        let parsed = RawConfig::from_toml_str(DEFAULT_CONFIG_TOML).unwrap();
        assert_eq!(
            parsed.agents.heartbeat_seconds,
            super::DEFAULT_HEARTBEAT_SECONDS
        );
        let loaded = AgentsSection {
            heartbeat_seconds: 5,
            ..AgentsSection::default()
        }
        .load()
        .unwrap();
        assert_eq!(loaded.heartbeat_seconds, 5);
        for bad in [0, super::MAX_HEARTBEAT_SECONDS + 1] {
            let err = AgentsSection {
                heartbeat_seconds: bad,
                ..AgentsSection::default()
            }
            .load()
            .unwrap_err();
            assert!(
                err.to_string().contains("agents.heartbeat_seconds"),
                "{err}"
            );
        }
    }
}
