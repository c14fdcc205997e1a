//! Fleet status and agent commands: the agent configuration (`GetAgentConfig`), the agents'
//! status streams (`StatusStream`), the last report per device (`Admin.GetFleetStatus`) and
//! connection tests routed to an agent (`Admin.TestConnection`).
//!
//! Replicas share nothing but the store, so everything that crosses a stream goes through it
//! ([`store`]): the last status per device, a presence marker per connected agent (which replica
//! holds its stream, valid for three heartbeats), commands queued for an agent (taken and sent by
//! whichever replica holds the agent's stream, polled every [`COMMAND_POLL`]) and the agents'
//! answers (read by whoever waits); [`housekeeping`] removes the commands and answers nobody
//! will read. A change of a device or mailbox queues a `ReloadConfig` for the tenant's connected
//! agents ([`config_changed`]), so the change reaches them within a second; a stream held by this
//! process is woken at once ([`wake`]), one on another replica takes it at its next poll. Depends on `records`, `convert`, `authz`, `admin` (audit and
//! error mapping) and `identity` (the authenticated peer).

mod agent_config;
pub mod housekeeping;
mod status;
pub mod store;
mod stream;
mod test_connection;
mod wake;

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use tokenfleet_proto::v1 as pb;
use tonic::{Status, Streaming};

use crate::authz::Principal;
use crate::identity::peer::AgentPeer;
use crate::ops::Error;
use crate::state::BrokerState;

pub use agent_config::revision;
pub use status::format_age;

/// Default seconds between an agent's status reports (`[agents] heartbeat_seconds`).
pub const DEFAULT_HEARTBEAT_SECONDS: u32 = 30;
/// Largest `[agents] heartbeat_seconds`.
pub const MAX_HEARTBEAT_SECONDS: u32 = 3600;
/// A report (and a presence marker) older than this many heartbeats no longer counts.
pub const STALE_HEARTBEATS: i32 = 3;
/// How often the replica holding an agent's stream looks for commands queued for it.
pub const COMMAND_POLL: Duration = Duration::from_millis(200);

/// The stream of commands sent down to one agent.
pub type CommandStream = Pin<Box<dyn Stream<Item = Result<pb::AgentCommand, Status>> + Send>>;

/// What the agent-facing side of the fleet needs from the broker's configuration.
#[derive(Debug, Clone)]
pub struct FleetSettings {
    /// Seconds between an agent's status reports (sent in the agent configuration).
    pub heartbeat_seconds: u32,
    /// This replica's id in presence markers (random per process).
    pub replica: String,
    /// How often a stream looks for queued commands.
    pub command_poll: Duration,
    /// Turns true when the broker shuts down: open streams end with UNAVAILABLE.
    pub shutdown: Option<tokio::sync::watch::Receiver<bool>>,
}

impl Default for FleetSettings {
    fn default() -> Self {
        Self::new(DEFAULT_HEARTBEAT_SECONDS)
    }
}

impl FleetSettings {
    /// Settings with `heartbeat_seconds` and a new replica id.
    pub fn new(heartbeat_seconds: u32) -> Self {
        Self {
            heartbeat_seconds: heartbeat_seconds.clamp(1, MAX_HEARTBEAT_SECONDS),
            replica: uuid::Uuid::new_v4().simple().to_string()[..12].to_owned(),
            command_poll: COMMAND_POLL,
            shutdown: None,
        }
    }

    /// Ends open streams when `shutdown` turns true.
    #[must_use]
    pub fn with_shutdown(mut self, shutdown: tokio::sync::watch::Receiver<bool>) -> Self {
        self.shutdown = Some(shutdown);
        self
    }
}

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
    .map_err(Error::from)?;
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

/// Admin changes after which the agents of the tenant may run an outdated configuration: the
/// configuration is built from device and mailbox records.
pub const CONFIG_ACTIONS: &[&str] = &[
    "device.create",
    "device.update",
    "device.delete",
    "mailbox.create",
    "mailbox.update",
    "mailbox.delete",
];

/// How long a queued configuration nudge waits for the stream before it is dropped.
const CONFIG_NUDGE_TTL: time::Duration = time::Duration::seconds(60);

/// A record the agents' configurations of `tenant` are built from changed: queues a
/// `ReloadConfig` in the store for every agent of the tenant with a live status stream. The
/// replica holding the stream (any replica: the queue is in the store) takes it within
/// [`COMMAND_POLL`], builds the agent's configuration again and sends the command on only when
/// the agent does not run that configuration already, so unrelated agents reload nothing. Best
/// effort: a failure is logged, and the agent's next report catches up.
pub async fn config_changed(state: &BrokerState, tenant: &str) {
    let records = crate::records::Records::new(state.store.as_ref());
    let scope = tokenfleet_store::Scope::Tenant(tenant.to_owned());
    let now = state.clock.now();
    let agents = match records.list_all::<store::AgentPresence>(&scope).await {
        Ok(all) => all,
        Err(error) => {
            tracing::warn!(%error, tenant, "listing connected agents for a configuration change failed");
            return;
        }
    };
    for presence in agents.into_iter().map(|p| p.value).filter(|p| p.live(now)) {
        queue_reload(state, tenant, &presence.agent).await;
    }
}

/// Queues a `ReloadConfig` for agent `agent` of `tenant` (see [`config_changed`]). Best effort.
pub(crate) async fn queue_reload(state: &BrokerState, tenant: &str, agent: &str) {
    let now = state.clock.now();
    let id = store::new_command_id(now);
    let command = pb::AgentCommand {
        id: id.clone(),
        command: Some(pb::agent_command::Command::ReloadConfig(
            pb::ReloadConfig {},
        )),
    };
    let queued = store::QueuedCommand {
        tenant: tenant.to_owned(),
        agent: agent.to_owned(),
        id,
        expires: now + CONFIG_NUDGE_TTL,
        command: store::encode_wire(&command),
    };
    match crate::records::Records::new(state.store.as_ref())
        .put(&queued, tokenfleet_store::Precondition::Absent)
        .await
    {
        Ok(_) => wake::wake(state, tenant, agent),
        Err(error) => {
            tracing::warn!(%error, tenant, agent, "queueing a configuration reload failed");
        }
    }
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
