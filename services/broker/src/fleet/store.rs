//! The fleet's records in the store (all tenant scope, JSON like every other record; wire
//! messages inside them are kept as base64 of their protobuf encoding):
//!
//! | collection              | id                      | what                                          |
//! |-------------------------|-------------------------|-----------------------------------------------|
//! | `device_status`         | `<device>`              | last [`pb::DeviceStatus`] reported for it      |
//! | `agent_presence`        | `<agent>`               | which replica holds the agent's stream, until |
//! | `agent_command`         | `<agent>/<command id>`  | a command waiting to be sent to the agent     |
//! | `agent_command_result`  | `<command id>`          | the agent's answer, for whoever waits on it   |
//!
//! Command ids start with the enqueue time in milliseconds (13 digits), so an agent's commands
//! list in the order they were enqueued.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokenfleet_proto::v1 as pb;
use tokenfleet_store::{RecordKey, StoreError, StoreResult};

use crate::records::StoredRecord;

/// Collection of [`DeviceStatusRecord`]s.
pub const DEVICE_STATUS: &str = "device_status";
/// Collection of [`AgentPresence`] records.
pub const AGENT_PRESENCE: &str = "agent_presence";
/// Collection of [`QueuedCommand`]s.
pub const AGENT_COMMANDS: &str = "agent_command";
/// Collection of [`CommandAnswer`]s.
pub const AGENT_COMMAND_RESULTS: &str = "agent_command_result";

/// The last status an agent reported for one of its devices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceStatusRecord {
    /// Tenant of the device.
    pub tenant: String,
    /// Device name.
    pub device: String,
    /// Agent that reported it.
    pub agent: String,
    /// When the broker received the report.
    #[serde(with = "time::serde::rfc3339")]
    pub report_time: OffsetDateTime,
    /// Heartbeat in force when it was reported (the report is stale after three).
    pub heartbeat_seconds: u32,
    /// `pb::DeviceStatus`, protobuf, base64.
    pub status: String,
}

impl DeviceStatusRecord {
    /// The reported status; `Corrupt` when the stored bytes do not decode.
    pub fn decode_status(&self) -> StoreResult<pb::DeviceStatus> {
        decode_wire(&self.key(), &self.status)
    }
}

impl StoredRecord for DeviceStatusRecord {
    const COLLECTION: &'static str = DEVICE_STATUS;
    fn key(&self) -> RecordKey {
        device_status_key(&self.tenant, &self.device)
    }
}

/// An agent's open status stream: which replica holds it and until when it counts as connected
/// (refreshed with every report, deleted when the stream ends).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentPresence {
    /// Tenant of the agent.
    pub tenant: String,
    /// Agent name.
    pub agent: String,
    /// Replica holding the stream.
    pub replica: String,
    /// The stream (a newer stream of the same agent replaces this one).
    pub stream: String,
    /// When the agent last reported.
    #[serde(with = "time::serde::rfc3339")]
    pub last_report: OffsetDateTime,
    /// Connected until then unless refreshed (three heartbeats after the last report).
    #[serde(with = "time::serde::rfc3339")]
    pub expires: OffsetDateTime,
    /// Revision of the configuration the agent said (in its last report) it runs.
    #[serde(default)]
    pub config_revision: String,
    /// Heartbeat the stream's replica sends in the agent configuration (part of the revision).
    #[serde(default)]
    pub heartbeat_seconds: u32,
    /// The configuration revision of the last `ReloadConfig` the agent answered (applied or
    /// not): the agent has acted on that change.
    #[serde(default)]
    pub reloaded_revision: String,
}

impl AgentPresence {
    /// Whether the stream counts as open at `now`.
    pub fn live(&self, now: OffsetDateTime) -> bool {
        self.expires > now
    }
}

impl StoredRecord for AgentPresence {
    const COLLECTION: &'static str = AGENT_PRESENCE;
    fn key(&self) -> RecordKey {
        presence_key(&self.tenant, &self.agent)
    }
}

/// A command waiting for the replica that holds the agent's stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueuedCommand {
    /// Tenant of the agent.
    pub tenant: String,
    /// Agent name.
    pub agent: String,
    /// Command id (also in the command).
    pub id: String,
    /// Dropped unsent after this.
    #[serde(with = "time::serde::rfc3339")]
    pub expires: OffsetDateTime,
    /// `pb::AgentCommand`, protobuf, base64.
    pub command: String,
}

impl QueuedCommand {
    /// The command; `Corrupt` when the stored bytes do not decode.
    pub fn decode_command(&self) -> StoreResult<pb::AgentCommand> {
        decode_wire(&self.key(), &self.command)
    }
}

impl StoredRecord for QueuedCommand {
    const COLLECTION: &'static str = AGENT_COMMANDS;
    fn key(&self) -> RecordKey {
        command_key(&self.tenant, &self.agent, &self.id)
    }
}

/// An agent's answer to a command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandAnswer {
    /// Tenant of the agent.
    pub tenant: String,
    /// Agent that answered.
    pub agent: String,
    /// Command id.
    pub id: String,
    /// When the broker received it.
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    /// `pb::CommandResult`, protobuf, base64.
    pub result: String,
}

impl CommandAnswer {
    /// The result; `Corrupt` when the stored bytes do not decode.
    pub fn decode_result(&self) -> StoreResult<pb::CommandResult> {
        decode_wire(&self.key(), &self.result)
    }
}

impl StoredRecord for CommandAnswer {
    const COLLECTION: &'static str = AGENT_COMMAND_RESULTS;
    fn key(&self) -> RecordKey {
        command_result_key(&self.tenant, &self.id)
    }
}

/// Key of a device's last status.
pub fn device_status_key(tenant: &str, device: &str) -> RecordKey {
    RecordKey::tenant(tenant, DEVICE_STATUS, device)
}
/// Key of an agent's presence marker.
pub fn presence_key(tenant: &str, agent: &str) -> RecordKey {
    RecordKey::tenant(tenant, AGENT_PRESENCE, agent)
}
/// Key of a queued command: `<agent>/<command id>`.
pub fn command_key(tenant: &str, agent: &str, id: &str) -> RecordKey {
    RecordKey::tenant(tenant, AGENT_COMMANDS, &format!("{agent}/{id}"))
}
/// Key of a command's answer.
pub fn command_result_key(tenant: &str, id: &str) -> RecordKey {
    RecordKey::tenant(tenant, AGENT_COMMAND_RESULTS, id)
}

/// A wire message as stored inside a record.
pub fn encode_wire<M: prost::Message>(message: &M) -> String {
    B64.encode(message.encode_to_vec())
}

fn decode_wire<M: prost::Message + Default>(key: &RecordKey, text: &str) -> StoreResult<M> {
    let corrupt = |problem: String| StoreError::Corrupt {
        key: key.to_string(),
        problem,
    };
    let bytes = B64
        .decode(text)
        .map_err(|e| corrupt(format!("stored message is not base64: {e}")))?;
    M::decode(bytes.as_slice()).map_err(|e| corrupt(format!("stored message does not decode: {e}")))
}

/// A new command id: enqueue time in milliseconds (13 digits, so ids sort by time) and 64 random
/// bits.
pub fn new_command_id(now: OffsetDateTime) -> String {
    let millis = (now.unix_timestamp_nanos() / 1_000_000).max(0);
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{millis:013}-{}", &random[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_messages_round_trip_and_bad_bytes_are_corrupt() {
        let status = pb::DeviceStatus {
            device: "mfp".into(),
            queue_depth: 3,
            ..Default::default()
        };
        let record = DeviceStatusRecord {
            tenant: "acme".into(),
            device: "mfp".into(),
            agent: "site".into(),
            report_time: OffsetDateTime::UNIX_EPOCH,
            heartbeat_seconds: 30,
            status: encode_wire(&status),
        };
        assert_eq!(record.decode_status().unwrap(), status);
        let bad = DeviceStatusRecord {
            status: "%%%".into(),
            ..record
        };
        assert!(matches!(
            bad.decode_status(),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn command_ids_sort_by_time() {
        let a = new_command_id(OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(5));
        let b = new_command_id(OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(50));
        assert!(a < b, "{a} {b}");
        assert_eq!(a.len(), 13 + 1 + 16);
    }
}
