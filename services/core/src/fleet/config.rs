//! The configuration of an agent ([`AgentConfig`], sent by `GetAgentConfig`): the devices it
//! hosts, built from the device and mailbox records. Carries no secret but the devices' Argon2id
//! password hashes. Its revision ([`revision`]) is the SHA-256 of the configuration's JSON
//! without the revision, so it changes whenever anything the agent receives changes.
//!
//! Every agent's report compares the configuration it runs with the current one, so building
//! must not list the tenant's records each time (with one large tenant that made reports cost
//! O(agents × devices)). A process keeps one snapshot per tenant — its devices by agent and its
//! mailboxes — built once and reused until a change of the tenant's devices or mailboxes is
//! announced on the fleet channel ([`super::wake`]: [`forget`]), the subscription restarts
//! ([`forget_all`]) or [`SNAPSHOT_TTL`] passes (a backstop, never the mechanism). A generation
//! counter per tenant keeps a build that raced with a change from being kept. One caller at a time
//! reads a tenant's records; the others wait for its snapshot (see `Slot`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use tokenfleet_domain::{Device, Mailbox};
use tokenfleet_store::{Scope, StoreResult};

use super::model::{AgentConfig, AgentDevice, MailboxRef};
use crate::records::Records;
use crate::state::BrokerState;

/// Longest a tenant snapshot serves without a change announced (a backstop for a lost
/// notification; changes are announced and drop the snapshot at once).
pub const SNAPSHOT_TTL: Duration = Duration::from_secs(60);

/// A tenant's configuration records as one process last read them.
#[derive(Debug)]
struct Snapshot {
    devices: HashMap<String, Vec<Device>>,
    mailboxes: HashMap<String, Mailbox>,
    /// When reading the records began (what the snapshot is at least as new as).
    built: Instant,
}

/// Per (store, tenant): the generation (bumped by every announced change), the snapshot built at
/// that generation, and the lock held by the one caller reading the records: callers that find
/// no usable snapshot wait for that read and take its snapshot instead of each reading every
/// device of the tenant at once (with 10,000 agents connecting, or reloading after a change,
/// that was thousands of concurrent reads of every device, and their memory).
#[derive(Debug, Default)]
struct Slot {
    generation: u64,
    snapshot: Option<(u64, Arc<Snapshot>)>,
    building: Arc<tokio::sync::Mutex<()>>,
}

impl Slot {
    /// The kept snapshot if it is current and, for a caller asking at `fresh_since`, was read
    /// after that.
    fn usable(&self, fresh_since: Option<Instant>) -> Option<Arc<Snapshot>> {
        match &self.snapshot {
            Some((generation, snapshot))
                if *generation == self.generation
                    && snapshot.built.elapsed() < SNAPSHOT_TTL
                    && fresh_since.is_none_or(|asked| snapshot.built >= asked) =>
            {
                Some(Arc::clone(snapshot))
            }
            _ => None,
        }
    }
}

type Slots = HashMap<(usize, String), Slot>;

fn slots() -> &'static Mutex<Slots> {
    static SLOTS: OnceLock<Mutex<Slots>> = OnceLock::new();
    SLOTS.get_or_init(|| Mutex::new(HashMap::new()))
}

fn locked() -> std::sync::MutexGuard<'static, Slots> {
    slots()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Drops the snapshot of `tenant` (a device or mailbox of it changed).
pub fn forget(store: usize, tenant: &str) {
    let mut slots = locked();
    let slot = slots.entry((store, tenant.to_owned())).or_default();
    slot.generation += 1;
    slot.snapshot = None;
}

/// Drops every snapshot of `store` (notifications may have been lost).
pub fn forget_all(store: usize) {
    for ((s, _), slot) in locked().iter_mut() {
        if *s == store {
            slot.generation += 1;
            slot.snapshot = None;
        }
    }
}

/// The tenant's snapshot: the kept one while current, else read from the store by one caller
/// at a time (`fresh`: one read after this call began, for a change the caller knows of).
async fn snapshot(state: &BrokerState, tenant: &str, fresh: bool) -> StoreResult<Arc<Snapshot>> {
    let key = (super::wake::store_id(state), tenant.to_owned());
    let fresh_since = fresh.then(Instant::now);
    let building = {
        let mut slots = locked();
        let slot = slots.entry(key.clone()).or_default();
        if let Some(snapshot) = slot.usable(fresh_since) {
            return Ok(snapshot);
        }
        Arc::clone(&slot.building)
    };
    let _building = building.lock().await;
    let generation = {
        let mut slots = locked();
        let slot = slots.entry(key.clone()).or_default();
        // Read by the caller this one waited for.
        if let Some(snapshot) = slot.usable(fresh_since) {
            return Ok(snapshot);
        }
        slot.generation
    };
    let started = Instant::now();
    let records = Records::new(state.store.as_ref());
    let scope = Scope::Tenant(tenant.to_owned());
    let mut devices: HashMap<String, Vec<Device>> = HashMap::new();
    for d in records.list_all::<Device>(&scope).await? {
        devices
            .entry(d.value.agent.clone())
            .or_default()
            .push(d.value);
    }
    let mailboxes = records
        .list_all::<Mailbox>(&scope)
        .await?
        .into_iter()
        .map(|v| (v.value.name.clone(), v.value))
        .collect();
    let snapshot = Arc::new(Snapshot {
        devices,
        mailboxes,
        built: started,
    });
    let mut slots = locked();
    let slot = slots.entry(key).or_default();
    // A change announced while this was read: do not keep it (it may predate the change).
    if slot.generation == generation {
        slot.snapshot = Some((generation, Arc::clone(&snapshot)));
    }
    Ok(snapshot)
}

/// The configuration of agent `agent` of `tenant`, revision set, from the tenant's snapshot.
pub async fn build(
    state: &BrokerState,
    tenant: &str,
    agent: &str,
    heartbeat_seconds: u32,
) -> StoreResult<AgentConfig> {
    from_snapshot(state, tenant, agent, heartbeat_seconds, false).await
}

/// [`build`] from the records as they are now (a change of them is known to the caller).
pub async fn build_fresh(
    state: &BrokerState,
    tenant: &str,
    agent: &str,
    heartbeat_seconds: u32,
) -> StoreResult<AgentConfig> {
    from_snapshot(state, tenant, agent, heartbeat_seconds, true).await
}

async fn from_snapshot(
    state: &BrokerState,
    tenant: &str,
    agent: &str,
    heartbeat_seconds: u32,
    fresh: bool,
) -> StoreResult<AgentConfig> {
    let snapshot = snapshot(state, tenant, fresh).await?;
    let devices: &[Device] = snapshot.devices.get(agent).map_or(&[], Vec::as_slice);
    let mailboxes = &snapshot.mailboxes;
    let mut config = AgentConfig {
        tenant: tenant.to_owned(),
        agent: agent.to_owned(),
        devices: devices.iter().map(|d| agent_device(d, mailboxes)).collect(),
        revision: String::new(),
        heartbeat_seconds,
    };
    config.revision = revision(&config);
    Ok(config)
}

/// Hex SHA-256 of the configuration's JSON without its revision.
pub fn revision(config: &AgentConfig) -> String {
    let mut bare = config.clone();
    bare.revision.clear();
    // Serializing plain structs, strings and numbers cannot fail; an empty text would still
    // give a revision, only one that no longer follows the content.
    let json = serde_json::to_vec(&bare).unwrap_or_default();
    crate::identity::ca::hex(&Sha256::digest(json))
}

fn mailbox_ref(name: &str, mailboxes: &HashMap<String, Mailbox>, device: &Device) -> MailboxRef {
    match mailboxes.get(name) {
        Some(m) => MailboxRef {
            name: m.name.clone(),
            address: m.address.clone(),
            kind: Some(m.kind),
        },
        None => {
            // Deleting a referenced mailbox is refused, so this is a race or damaged data: the
            // agent gets the name and no address, and the broker will refuse its tokens.
            tracing::warn!(
                tenant = %device.tenant,
                device = %device.name,
                mailbox = name,
                "device names a mailbox that does not exist"
            );
            MailboxRef {
                name: name.to_owned(),
                address: String::new(),
                kind: None,
            }
        }
    }
}

fn agent_device(d: &Device, mailboxes: &HashMap<String, Mailbox>) -> AgentDevice {
    let optional = |name: &str| (!name.is_empty()).then(|| mailbox_ref(name, mailboxes, d));
    AgentDevice {
        name: d.name.clone(),
        display_name: d.display_name.clone(),
        sender_mode: d.sender_mode,
        admin_mailbox: optional(&d.admin_mailbox),
        bulk_mailbox: optional(&d.bulk_mailbox),
        allowed_mailboxes: d
            .allowed_mailboxes
            .iter()
            .map(|m| mailbox_ref(m, mailboxes, d))
            .collect(),
        smtp: d.smtp.clone(),
        fetch: d.fetch.clone(),
        ingress_username: d.ingress.username.clone(),
        ingress_password_hash: d.ingress.password_hash.clone().unwrap_or_default(),
        ingress_allowed_sources: d.ingress.allowed_sources.clone(),
        ingress_user_addresses: d.ingress.user_addresses.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revision_ignores_itself_and_follows_content() {
        let mut config = AgentConfig {
            tenant: "acme".into(),
            agent: "site".into(),
            heartbeat_seconds: 30,
            ..Default::default()
        };
        let r1 = revision(&config);
        assert_eq!(r1.len(), 64);
        config.revision = r1.clone();
        assert_eq!(revision(&config), r1);
        config.heartbeat_seconds = 31;
        assert_ne!(revision(&config), r1);
    }
}
