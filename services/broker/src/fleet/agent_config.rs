//! `GetAgentConfig`: the devices an agent hosts, built from the device and mailbox records.
//! Carries no secret but the devices' Argon2id password hashes.

use std::collections::HashMap;

use prost::Message as _;
use sha2::{Digest as _, Sha256};
use tokenfleet_domain::{Device, Mailbox};
use tokenfleet_proto::v1 as pb;
use tokenfleet_store::{Scope, StoreResult};

use crate::convert;
use crate::records::Records;
use crate::state::BrokerState;

/// The configuration of agent `agent` of `tenant`, revision set.
pub async fn build(
    state: &BrokerState,
    tenant: &str,
    agent: &str,
    heartbeat_seconds: u32,
) -> StoreResult<pb::AgentConfig> {
    let records = Records::new(state.store.as_ref());
    let scope = Scope::Tenant(tenant.to_owned());
    let devices: Vec<Device> = records
        .list_all::<Device>(&scope)
        .await?
        .into_iter()
        .map(|v| v.value)
        .filter(|d| d.agent == agent)
        .collect();
    let mailboxes: HashMap<String, Mailbox> = if devices.is_empty() {
        HashMap::new()
    } else {
        records
            .list_all::<Mailbox>(&scope)
            .await?
            .into_iter()
            .map(|v| (v.value.name.clone(), v.value))
            .collect()
    };
    let mut config = pb::AgentConfig {
        tenant: tenant.to_owned(),
        agent: agent.to_owned(),
        devices: devices
            .iter()
            .map(|d| agent_device(d, &mailboxes))
            .collect(),
        revision: String::new(),
        heartbeat_seconds,
    };
    config.revision = revision(&config);
    Ok(config)
}

/// Hex SHA-256 of the encoded configuration without its revision.
pub fn revision(config: &pb::AgentConfig) -> String {
    let mut bare = config.clone();
    bare.revision.clear();
    crate::identity::ca::hex(&Sha256::digest(bare.encode_to_vec()))
}

fn mailbox_ref(
    name: &str,
    mailboxes: &HashMap<String, Mailbox>,
    device: &Device,
) -> pb::MailboxRef {
    match mailboxes.get(name) {
        Some(m) => pb::MailboxRef {
            name: m.name.clone(),
            address: m.address.clone(),
            kind: convert::mailbox_kind_out(m.kind),
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
            pb::MailboxRef {
                name: name.to_owned(),
                address: String::new(),
                kind: pb::MailboxKind::Unspecified as i32,
            }
        }
    }
}

fn agent_device(d: &Device, mailboxes: &HashMap<String, Mailbox>) -> pb::AgentDevice {
    let optional = |name: &str| (!name.is_empty()).then(|| mailbox_ref(name, mailboxes, d));
    // The admin API's wire form has the profiles; its ingress part never has the hash.
    let wire = convert::device_to_proto(d, 0);
    pb::AgentDevice {
        name: d.name.clone(),
        display_name: d.display_name.clone(),
        sender_mode: convert::sender_mode_out(d.sender_mode),
        admin_mailbox: optional(&d.admin_mailbox),
        bulk_mailbox: optional(&d.bulk_mailbox),
        allowed_mailboxes: d
            .allowed_mailboxes
            .iter()
            .map(|m| mailbox_ref(m, mailboxes, d))
            .collect(),
        smtp: wire.smtp,
        fetch: wire.fetch,
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
        let mut config = pb::AgentConfig {
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
