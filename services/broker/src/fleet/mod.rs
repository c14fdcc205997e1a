//! Fleet status and agent commands: the agent configuration (`GetAgentConfig`), the agents'
//! status streams (`StatusStream`), the last report per device (`Admin.GetFleetStatus`) and
//! connection tests routed to an agent (`Admin.TestConnection`).
//!
//! Replicas share nothing but the store, so everything that crosses a stream goes through it
//! ([`store`]): the last status per device, a presence marker per connected agent (which replica
//! holds its stream, valid for three heartbeats), commands queued for an agent (taken and sent by
//! whichever replica holds the agent's stream, woken through the store's notification channel
//! ([`wake`]), with a sweep at most every [`COMMAND_SWEEP_MAX`] as a backstop) and the agents'
//! answers (read by whoever waits); [`housekeeping`] removes the commands and answers nobody
//! will read. A change of a device or mailbox queues a `ReloadConfig` for the tenant's connected
//! agents ([`config_changed`]); the stream holding each, on any replica, is woken at once and
//! rebuilds the configuration from a per-tenant snapshot ([`agent_config`]) dropped by the same
//! announcement. Depends on `records`, `convert`, `authz`, the edge's error mapping and
//! `identity` (the authenticated peer).

pub mod agent_config;
pub mod housekeeping;
mod reload;
pub mod settings;
mod status;
pub mod store;
mod stream;
mod test_connection;
pub mod wake;

use tokenfleet_proto::v1 as pb;
use tonic::{Status, Streaming};

use crate::authz::Principal;
use crate::edge::grpc_status::status;
use crate::identity::peer::AgentPeer;
use crate::ops::Error;
use crate::state::BrokerState;

pub use agent_config::revision;
pub use reload::{CONFIG_ACTIONS, config_changed, queue_reload};
pub use settings::{
    COMMAND_SWEEP_MAX, CommandStream, DEFAULT_HEARTBEAT_SECONDS, FleetSettings,
    MAX_HEARTBEAT_SECONDS, STALE_HEARTBEATS, format_age,
};

/// `TokenBroker.GetAgentConfig` for an authenticated agent.
pub async fn agent_config(
    state: &BrokerState,
    settings: &FleetSettings,
    peer: &AgentPeer,
    _req: pb::GetAgentConfigRequest,
) -> Result<pb::AgentConfig, Status> {
    let config = agent_config::build(
        state,
        &peer.id.tenant,
        &peer.id.name,
        settings.heartbeat_seconds,
    )
    .await
    .map_err(status)?;
    tracing::debug!(
        devices = config.devices.len(),
        revision = %config.revision,
        "agent configuration sent"
    );
    Ok(config)
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
    status::fleet_status(state, principal, req).await
}

/// `Admin.TestConnection`.
pub async fn test_connection(
    state: &BrokerState,
    principal: &Principal,
    req: pb::TestConnectionRequest,
) -> Result<pb::ConnectionTestResult, Error> {
    test_connection::run(state, principal, req).await
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
