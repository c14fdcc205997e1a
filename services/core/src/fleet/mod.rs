//! Fleet state and its operations: the configuration each agent receives ([`config`]), what the
//! agents report about their devices and the operator's view of it ([`status`]), the commands
//! queued for an agent and its answers ([`session`], [`test_connection`](mod@test_connection), [`reload`]), all as the
//! domain types of [`model`], stored as JSON records ([`store`]).
//!
//! Replicas share nothing but the store, so everything that crosses an agent's stream goes
//! through it: the last status per device, a presence marker per connected agent (which replica
//! holds its stream, valid for three heartbeats), commands queued for an agent (taken and sent by
//! whichever replica holds the agent's stream, woken through the store's notification channel
//! ([`wake`]), with a sweep at most every [`settings::COMMAND_SWEEP_MAX`] as a backstop) and the
//! agents' answers (read by whoever waits); [`housekeeping`] removes the commands and answers
//! nobody will read. A change of a device or mailbox queues a `ReloadConfig` for the tenant's
//! connected agents ([`reload::config_changed`]); the stream holding each, on any replica, is
//! woken at once and rebuilds the configuration from a per-tenant snapshot ([`config`]) dropped
//! by the same announcement.
//!
//! Operations take their caller: an operator's [`crate::authz::Principal`] (the fleet status:
//! read access; a connection test: write access to the device's tenant) or an authenticated
//! agent ([`crate::identity::peer::AgentPeer`]: its own configuration, its own session). The
//! broker's `fleet` module is the edge: the `StatusStream` and `GetAgentConfig` gRPC calls, and
//! the conversions between these types and the wire messages.
//!
//! Dependency direction inside: `model` and `settings` are leaves; `store` reads `legacy`;
//! `config` ↔ `wake` (a change drops the snapshot) is the only circle.

pub mod config;
pub mod exposure;
pub mod housekeeping;
pub mod legacy;
pub mod model;
pub mod reload;
pub mod session;
pub mod settings;
pub mod status;
pub mod store;
pub mod test_connection;
pub mod wake;

use crate::identity::peer::AgentPeer;
use crate::ops::Error;
use crate::state::BrokerState;

pub use config::revision;
pub use model::{AgentConfig, FleetDeviceStatus};
pub use reload::{CONFIG_ACTIONS, config_changed, queue_reload};
pub use session::{AgentSession, CommandSink};
pub use settings::{
    COMMAND_SWEEP_MAX, DEFAULT_HEARTBEAT_SECONDS, FleetSettings, MAX_HEARTBEAT_SECONDS,
    STALE_HEARTBEATS, format_age,
};
pub use status::fleet_status;
pub use test_connection::{TestRequest, test_connection};

/// The configuration of the authenticated agent `peer` (its own: tenant and name come from its
/// certificate), revision set.
pub async fn agent_config(
    state: &BrokerState,
    settings: &FleetSettings,
    peer: &AgentPeer,
) -> Result<AgentConfig, Error> {
    let config = config::build(
        state,
        &peer.id.tenant,
        &peer.id.name,
        settings.heartbeat_seconds,
    )
    .await?;
    tracing::debug!(
        devices = config.devices.len(),
        revision = %config.revision,
        "agent configuration sent"
    );
    Ok(config)
}
