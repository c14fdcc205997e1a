//! The fleet's records in the store (all tenant scope, JSON like every other record):
//!
//! | collection              | id                      | what                                          |
//! |-------------------------|-------------------------|-----------------------------------------------|
//! | `device_status`         | `<device>`              | last [`DeviceReport`] for the device           |
//! | `agent_presence`        | `<agent>`               | which replica holds the agent's stream, until |
//! | `agent_command`         | `<agent>/<command id>`  | an [`AgentCommand`] waiting to be sent         |
//! | `agent_command_result`  | `<command id>`          | the agent's [`CommandResult`], for the waiter  |
//!
//! Command ids start with the enqueue time in milliseconds (13 digits), so an agent's commands
//! list in the order they were enqueued.
//!
//! Until the fleet moved into the core, reports, commands and answers were kept as base64 of the
//! agents' protobuf messages in a field of their own (`status`, `command`, `result`). Records
//! hold the domain types now (`report`, `order`, `answer`); a record of the old form is still
//! read ([`super::legacy`]), so nothing needs migrating: old device reports stay readable until
//! the device's agent next reports, and old commands and answers expire within minutes.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokenfleet_store::{RecordKey, StoreError, StoreResult};

use super::legacy;
use super::model::{AgentCommand, CommandResult, DeviceReport};
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
    /// The report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<DeviceReport>,
    /// A report stored before the fleet moved into the core: `DeviceStatus`, protobuf, base64.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub status: String,
}

impl DeviceStatusRecord {
    /// A record of `report`.
    pub fn new(
        tenant: &str,
        agent: &str,
        report: DeviceReport,
        report_time: OffsetDateTime,
        heartbeat_seconds: u32,
    ) -> Self {
        Self {
            tenant: tenant.to_owned(),
            device: report.device.clone(),
            agent: agent.to_owned(),
            report_time,
            heartbeat_seconds,
            report: Some(report),
            status: String::new(),
        }
    }

    /// The reported status; `Corrupt` when an old record's bytes do not decode.
    pub fn decode_status(&self) -> StoreResult<DeviceReport> {
        match &self.report {
            Some(report) => Ok(report.clone()),
            None => legacy::device_report(&self.status).map_err(|e| corrupt(&self.key(), e)),
        }
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
    /// The command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<AgentCommand>,
    /// A command queued before the fleet moved into the core: `AgentCommand`, protobuf, base64.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub command: String,
}

impl QueuedCommand {
    /// `command` for agent `agent` of `tenant`, dropped unsent after `expires`.
    pub fn new(tenant: &str, agent: &str, command: AgentCommand, expires: OffsetDateTime) -> Self {
        Self {
            tenant: tenant.to_owned(),
            agent: agent.to_owned(),
            id: command.id.clone(),
            expires,
            order: Some(command),
            command: String::new(),
        }
    }

    /// The command; `Corrupt` when an old record's bytes do not decode.
    pub fn decode_command(&self) -> StoreResult<AgentCommand> {
        match &self.order {
            Some(command) => Ok(command.clone()),
            None => legacy::agent_command(&self.command).map_err(|e| corrupt(&self.key(), e)),
        }
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
    /// The answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<CommandResult>,
    /// An answer stored before the fleet moved into the core: `CommandResult`, protobuf, base64.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub result: String,
}

impl CommandAnswer {
    /// `result` of agent `agent` of `tenant`, received at `time`.
    pub fn new(tenant: &str, agent: &str, result: CommandResult, time: OffsetDateTime) -> Self {
        Self {
            tenant: tenant.to_owned(),
            agent: agent.to_owned(),
            id: result.command_id.clone(),
            time,
            answer: Some(result),
            result: String::new(),
        }
    }

    /// The result; `Corrupt` when an old record's bytes do not decode.
    pub fn decode_result(&self) -> StoreResult<CommandResult> {
        match &self.answer {
            Some(result) => Ok(result.clone()),
            None => legacy::command_result(&self.result).map_err(|e| corrupt(&self.key(), e)),
        }
    }
}

impl StoredRecord for CommandAnswer {
    const COLLECTION: &'static str = AGENT_COMMAND_RESULTS;
    fn key(&self) -> RecordKey {
        command_result_key(&self.tenant, &self.id)
    }
}

fn corrupt(key: &RecordKey, problem: String) -> StoreError {
    StoreError::Corrupt {
        key: key.to_string(),
        problem: format!("stored message does not decode: {problem}"),
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
    use crate::fleet::model::DeviceHealth;

    #[test]
    fn reports_round_trip_as_json_and_old_records_still_read() {
        let report = DeviceReport {
            device: "mfp".into(),
            health: DeviceHealth::Degraded,
            queue_depth: 3,
            ..Default::default()
        };
        let record = DeviceStatusRecord::new(
            "acme",
            "site",
            report.clone(),
            OffsetDateTime::UNIX_EPOCH,
            30,
        );
        let json = serde_json::to_string(&record).unwrap();
        assert!(!json.contains("\"status\""), "{json}");
        let back: DeviceStatusRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(back.decode_status().unwrap(), report);

        // The old form: the wire message in `status` (`device: "mfp"`, `queue_depth: 3`).
        let old = r#"{"tenant":"acme","device":"mfp","agent":"site",
            "report_time":"1970-01-01T00:00:00Z","heartbeat_seconds":30,"status":"CgNtZnAwAw=="}"#;
        let old: DeviceStatusRecord = serde_json::from_str(old).unwrap();
        let read = old.decode_status().unwrap();
        assert_eq!((read.device.as_str(), read.queue_depth), ("mfp", 3));
        let bad = DeviceStatusRecord {
            status: "%%%".into(),
            ..old
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
