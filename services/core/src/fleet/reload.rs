//! Configuration nudges: after a change of a record the agents' configurations are built from,
//! a `ReloadConfig` is queued in the store for each connected agent of the tenant (see
//! [`config_changed`]), and the stream holding the agent is woken. A leaf over [`super::store`]
//! and [`super::wake`].

use super::model::{AgentCommand, Command};
use super::{store, wake};
use crate::state::BrokerState;

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
/// replica holding the stream (any replica: the queue is in the store) is woken through the
/// store's notification channel ([`super::wake`]), takes it, builds the agent's configuration
/// again and sends the command on only when the agent does not run that configuration already, so unrelated agents reload nothing. Best
/// effort: a failure is logged, and the agent's next report catches up.
pub async fn config_changed(state: &BrokerState, tenant: &str) {
    // First, so every replica drops its snapshot of the tenant before the wakes below arrive.
    wake::config_changed(state, tenant).await;
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
pub async fn queue_reload(state: &BrokerState, tenant: &str, agent: &str) {
    let now = state.clock.now();
    let id = store::new_command_id(now);
    let command = AgentCommand {
        id,
        command: Some(Command::ReloadConfig),
    };
    let queued = store::QueuedCommand::new(tenant, agent, command, now + CONFIG_NUDGE_TTL);
    match crate::records::Records::new(state.store.as_ref())
        .put(&queued, tokenfleet_store::Precondition::Absent)
        .await
    {
        Ok(_) => wake::wake(state, tenant, agent).await,
        Err(error) => {
            tracing::warn!(%error, tenant, agent, "queueing a configuration reload failed");
        }
    }
}
