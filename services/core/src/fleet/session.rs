//! One agent's status-stream session, without the stream: what the broker does with each report
//! of a connected agent and with the commands queued for it. Each report is checked against the
//! agent record (revoked or deleted: PERMISSION_DENIED), refreshes the agent's presence marker
//! (with the configuration revision the agent runs; a newer stream of the same agent that took
//! the marker over: ABORTED), stores the reported device statuses and the answer to a command
//! someone waits for, updates the agent's `last_seen` and software version, and sends a
//! `ReloadConfig` when the agent runs an old configuration revision. [`AgentSession::poll`] takes
//! the commands queued for the agent in the store (by any replica) and sends them; a queued
//! `ReloadConfig` (a device or mailbox changed, [`super::reload`]) rebuilds the configuration and
//! is sent on only when the agent's configuration did change.
//!
//! The edge (the broker's `StatusStream`) owns the transport: it decodes reports, calls these
//! operations, and hands commands to the agent through a [`CommandSink`].

use std::collections::HashMap;

use time::OffsetDateTime;
use tokenfleet_domain::Agent;
use tokenfleet_store::{Precondition, Scope, StoreError};

use super::model::{AgentCommand, AgentConfig, AgentReport, Command, CommandResult, DeviceReport};
use super::settings::{FleetSettings, STALE_HEARTBEATS};
use super::store::{
    AgentPresence, CommandAnswer, DeviceStatusRecord, QueuedCommand, new_command_id, presence_key,
};
use crate::identity::peer::AgentPeer;
use crate::ops::Error;
use crate::records::{CAS_ATTEMPTS, Records, StoredRecord as _, Versioned, agent_key};
use crate::state::BrokerState;

/// Commands taken from the store per poll.
const COMMAND_BATCH: usize = 16;
/// Longest software version kept on the agent record.
const MAX_VERSION_LEN: usize = 100;
/// How long a built agent configuration serves further reports of the same stream. Short: the
/// agent may report more often than the broker's heartbeat (a local override). A device change
/// does not wait for it: it queues a `ReloadConfig`, which rebuilds the configuration.
const CONFIG_REUSE: time::Duration = time::Duration::seconds(1);
/// Longest command id accepted in a result.
const MAX_COMMAND_ID_LEN: usize = 64;

/// Where a session's commands go: the agent's stream.
#[async_trait::async_trait]
pub trait CommandSink: Send {
    /// Sends `command` down to the agent; `false` when the agent is gone.
    async fn send(&mut self, command: AgentCommand) -> bool;
}

/// What a session keeps of its agent's configuration between reports: its revision and the
/// devices it hosts. Not the whole configuration: that is kilobytes per agent (every device's
/// mailboxes and settings), held by every idle stream of the fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ConfigSummary {
    revision: String,
    devices: Vec<String>,
}

impl From<AgentConfig> for ConfigSummary {
    fn from(config: AgentConfig) -> Self {
        Self {
            revision: config.revision,
            devices: config.devices.into_iter().map(|d| d.name).collect(),
        }
    }
}

/// The broker's side of one agent's status stream.
#[derive(Debug)]
pub struct AgentSession {
    state: BrokerState,
    settings: FleetSettings,
    tenant: String,
    agent: String,
    /// Id of this stream in the presence marker.
    stream: String,
    /// Version of the presence marker this stream last wrote (`None` before the first report).
    presence_version: Option<u64>,
    /// When this stream last wrote the agent record.
    agent_written: Option<OffsetDateTime>,
    /// The configuration revision a ReloadConfig was last sent for.
    pushed_revision: Option<String>,
    /// The configuration revision the agent said (in its last report) it runs.
    running_revision: String,
    /// Id and configuration revision of the last `ReloadConfig` sent.
    reload_sent: Option<(String, String)>,
    /// Revision of the last `ReloadConfig` the agent answered.
    reloaded_revision: String,
    /// Commands sent down this stream that someone waits for an answer to, with when the
    /// waiter gives up. Only their answers are stored: a late answer, or one for a command this
    /// stream never sent, would otherwise stay in the store with nobody to read it.
    awaited: HashMap<String, OffsetDateTime>,
    /// What this session needs of the agent's configuration, and when it was built: reports come
    /// in bursts (every command answer and health change sends one), and building lists every
    /// device and mailbox of the tenant, so it is rebuilt at most once per [`CONFIG_REUSE`].
    config: Option<(ConfigSummary, OffsetDateTime)>,
}

impl AgentSession {
    /// A session of the authenticated agent `peer`, before its first report. The agent reports
    /// and is sent commands only for itself: tenant and name come from its certificate.
    pub fn new(state: &BrokerState, settings: &FleetSettings, peer: &AgentPeer) -> Self {
        Self {
            state: state.clone(),
            settings: settings.clone(),
            tenant: peer.id.tenant.clone(),
            agent: peer.id.name.clone(),
            stream: uuid::Uuid::new_v4().simple().to_string(),
            presence_version: None,
            agent_written: None,
            pushed_revision: None,
            running_revision: String::new(),
            reload_sent: None,
            reloaded_revision: String::new(),
            awaited: HashMap::new(),
            config: None,
        }
    }

    /// Whether the first report was handled (the session holds the presence marker): commands
    /// are polled only from then on.
    pub fn joined(&self) -> bool {
        self.presence_version.is_some()
    }

    fn records(&self) -> Records<'_> {
        Records::new(self.state.store.as_ref())
    }

    fn heartbeat(&self) -> time::Duration {
        time::Duration::seconds(i64::from(self.settings.heartbeat_seconds))
    }

    /// Handles one report of the agent; commands it causes go to `sink`.
    pub async fn on_report(
        &mut self,
        report: AgentReport,
        sink: &mut dyn CommandSink,
    ) -> Result<(), Error> {
        let now = self.state.clock.now();
        let agent = self.check_agent().await?;
        self.running_revision.clone_from(&report.config_revision);
        // The answer to the last ReloadConfig: the agent acted on that revision (nobody else
        // waits for it, so it is not stored).
        let reload_answer = match (&report.command_result, &self.reload_sent) {
            (Some(result), Some((id, revision))) if result.command_id == *id => {
                self.reloaded_revision.clone_from(revision);
                true
            }
            _ => false,
        };
        self.refresh_presence(now).await?;
        let config = self.current_config(now).await?;
        self.store_statuses(report.devices, &config, now).await?;
        if let Some(result) = report.command_result.filter(|_| !reload_answer) {
            self.store_result(result, now).await?;
        }
        self.touch_agent(agent, &report.software_version, now)
            .await?;
        self.push_config(&config, new_command_id(now), sink).await;
        Ok(())
    }

    /// Sends `ReloadConfig` (with id `id`) when the agent runs another revision than `config`'s
    /// and none was sent for that revision yet.
    async fn push_config(
        &mut self,
        config: &ConfigSummary,
        id: String,
        sink: &mut dyn CommandSink,
    ) {
        if self.running_revision == config.revision
            || self.pushed_revision.as_deref() == Some(config.revision.as_str())
        {
            return;
        }
        let command = AgentCommand {
            id: id.clone(),
            command: Some(Command::ReloadConfig),
        };
        tracing::info!(
            running = %self.running_revision,
            current = %config.revision,
            "agent runs an old configuration; sending ReloadConfig"
        );
        if sink.send(command).await {
            self.pushed_revision = Some(config.revision.clone());
            self.reload_sent = Some((id, config.revision.clone()));
        }
    }

    /// A `ReloadConfig` queued because a record the agent's configuration is built from changed:
    /// the configuration is built afresh and the command sent on only if the agent does not run
    /// it already.
    async fn on_config_changed(&mut self, id: String, sink: &mut dyn CommandSink) {
        let now = self.state.clock.now();
        let built = super::config::build_fresh(
            &self.state,
            &self.tenant,
            &self.agent,
            self.settings.heartbeat_seconds,
        )
        .await;
        match built {
            Ok(config) => {
                let config = ConfigSummary::from(config);
                self.config = Some((config.clone(), now));
                self.push_config(&config, id, sink).await;
            }
            Err(error) => {
                tracing::warn!(%error, "building the agent configuration failed");
            }
        }
    }

    /// The agent's configuration, built again when the cached one is older than
    /// [`CONFIG_REUSE`]: a device change reaches the agent (ReloadConfig) with its next report
    /// after that.
    async fn current_config(&mut self, now: OffsetDateTime) -> Result<ConfigSummary, Error> {
        if let Some((config, built)) = &self.config
            && now - *built < CONFIG_REUSE
        {
            return Ok(config.clone());
        }
        let config = ConfigSummary::from(
            super::config::build(
                &self.state,
                &self.tenant,
                &self.agent,
                self.settings.heartbeat_seconds,
            )
            .await?,
        );
        self.config = Some((config.clone(), now));
        Ok(config)
    }

    /// The agent record; PERMISSION_DENIED when it was revoked or deleted since the call began.
    async fn check_agent(&self) -> Result<Versioned<Agent>, Error> {
        let agent = self
            .records()
            .get::<Agent>(&agent_key(&self.tenant, &self.agent))
            .await?;
        match agent {
            None => Err(Error::PermissionDenied(format!(
                "agent `{}` of tenant `{}` was deleted",
                self.agent, self.tenant
            ))),
            Some(a) if a.value.revoked => Err(Error::PermissionDenied(format!(
                "agent `{}` of tenant `{}` was revoked",
                self.agent, self.tenant
            ))),
            Some(a) => Ok(a),
        }
    }

    /// Writes the presence marker: unconditionally on the first report (a newer stream replaces
    /// an older one), afterwards only while it is still this stream's.
    async fn refresh_presence(&mut self, now: OffsetDateTime) -> Result<(), Error> {
        let presence = AgentPresence {
            tenant: self.tenant.clone(),
            agent: self.agent.clone(),
            replica: self.settings.replica.clone(),
            stream: self.stream.clone(),
            last_report: now,
            expires: now + self.heartbeat() * STALE_HEARTBEATS,
            config_revision: self.running_revision.clone(),
            heartbeat_seconds: self.settings.heartbeat_seconds,
            reloaded_revision: self.reloaded_revision.clone(),
        };
        let pre = match self.presence_version {
            None => Precondition::Any,
            Some(v) => Precondition::Version(v),
        };
        match self.records().put(&presence, pre).await {
            Ok(v) => {
                let first = self.presence_version.is_none();
                self.presence_version = Some(v);
                if first {
                    // A stream this one replaces (on any replica) learns it at once.
                    super::wake::wake(&self.state, &self.tenant, &self.agent).await;
                }
                Ok(())
            }
            Err(StoreError::Conflict { .. } | StoreError::NotFound(_)) => {
                self.check_presence().await?;
                // Still ours (or gone): take it again.
                let v = self.records().put(&presence, Precondition::Any).await?;
                self.presence_version = Some(v);
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// ABORTED when another stream holds the presence marker now.
    async fn check_presence(&self) -> Result<(), Error> {
        let current = self
            .records()
            .get::<AgentPresence>(&presence_key(&self.tenant, &self.agent))
            .await?;
        match current {
            Some(p) if p.value.stream != self.stream => Err(Error::Aborted(format!(
                "a newer status stream of agent `{}` (replica {}) replaced this one",
                self.agent, p.value.replica
            ))),
            _ => Ok(()),
        }
    }

    /// Stores the statuses of the devices the agent hosts (others are ignored: an agent reports
    /// only for its own devices). Statuses too large to keep the edge dropped while decoding.
    async fn store_statuses(
        &self,
        devices: Vec<DeviceReport>,
        config: &ConfigSummary,
        now: OffsetDateTime,
    ) -> Result<(), Error> {
        for status in devices {
            if !config.devices.contains(&status.device) {
                tracing::debug!(
                    device = %crate::ops::names::shown(&status.device),
                    "report names a device this agent does not host; ignored"
                );
                continue;
            }
            let record = DeviceStatusRecord::new(
                &self.tenant,
                &self.agent,
                status,
                now,
                self.settings.heartbeat_seconds,
            );
            self.records().put(&record, Precondition::Any).await?;
        }
        Ok(())
    }

    async fn store_result(
        &mut self,
        result: CommandResult,
        now: OffsetDateTime,
    ) -> Result<(), Error> {
        let id = result.command_id.clone();
        self.awaited.retain(|_, expires| *expires > now);
        if self.awaited.remove(&id).is_none() {
            tracing::info!(command = %id, "answer to a command nobody waits for (late, or not sent on this stream); dropped");
            return Ok(());
        }
        let well_formed = !id.is_empty()
            && id.len() <= MAX_COMMAND_ID_LEN
            && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !well_formed {
            tracing::debug!("command result with a malformed command id; ignored");
            return Ok(());
        }
        tracing::info!(command = %id, ok = result.ok, "command answered");
        let answer = CommandAnswer::new(&self.tenant, &self.agent, result, now);
        self.records().put(&answer, Precondition::Any).await?;
        Ok(())
    }

    /// Updates `last_seen` and `software_version` on the agent record, at most every half
    /// heartbeat unless the version changed.
    async fn touch_agent(
        &mut self,
        mut current: Versioned<Agent>,
        version: &str,
        now: OffsetDateTime,
    ) -> Result<(), Error> {
        let version: String = version.chars().take(MAX_VERSION_LEN).collect();
        let due = self
            .agent_written
            .is_none_or(|at| now - at >= self.heartbeat() / 2);
        if !due && current.value.software_version == version {
            return Ok(());
        }
        for _ in 0..CAS_ATTEMPTS {
            let mut agent = current.value.clone();
            agent.last_seen = Some(now);
            agent.software_version.clone_from(&version);
            match self
                .records()
                .put(&agent, Precondition::Version(current.version))
                .await
            {
                Ok(_) => {
                    self.agent_written = Some(now);
                    return Ok(());
                }
                Err(StoreError::Conflict { .. }) => current = self.check_agent().await?,
                Err(StoreError::NotFound(_)) => {
                    return Err(Error::PermissionDenied(format!(
                        "agent `{}` of tenant `{}` was deleted",
                        self.agent, self.tenant
                    )));
                }
                Err(e) => return Err(e.into()),
            }
        }
        // Someone keeps changing the record; the next report tries again.
        tracing::warn!("agent record kept changing; last_seen not updated");
        Ok(())
    }

    /// Sends the commands queued for the agent to `sink` (each taken out of the store first, so
    /// only one stream sends it); with `check_presence`, first checks that this stream still
    /// holds the presence marker (ABORTED when a newer stream took it over).
    pub async fn poll(
        &mut self,
        sink: &mut dyn CommandSink,
        check_presence: bool,
    ) -> Result<(), Error> {
        if check_presence {
            match self.check_presence().await {
                Err(aborted @ Error::Aborted(_)) => return Err(aborted),
                Err(error) => tracing::warn!(%error, "presence check failed"),
                Ok(()) => {}
            }
        }
        let prefix = format!("{}/", self.agent);
        let queued = match self
            .records()
            .list::<QueuedCommand>(
                &Scope::Tenant(self.tenant.clone()),
                Some(&prefix),
                COMMAND_BATCH,
            )
            .await
        {
            Ok(queued) => queued,
            Err(error) => {
                tracing::warn!(%error, "reading queued commands failed");
                return Ok(());
            }
        };
        let now = self.state.clock.now();
        for entry in queued {
            if !entry.value.key().id.starts_with(&prefix) {
                break;
            }
            match self
                .records()
                .delete(&entry.value.key(), Precondition::Version(entry.version))
                .await
            {
                Ok(true) => {}
                Ok(false) | Err(StoreError::Conflict { .. } | StoreError::NotFound(_)) => continue,
                Err(error) => {
                    tracing::warn!(%error, "taking a queued command failed");
                    return Ok(());
                }
            }
            if entry.value.expires <= now {
                tracing::info!(command = %entry.value.id, "queued command expired unsent");
                continue;
            }
            match entry.value.decode_command() {
                Ok(AgentCommand {
                    id,
                    command: Some(Command::ReloadConfig),
                }) => self.on_config_changed(id, sink).await,
                Ok(command) => {
                    tracing::info!(command = %entry.value.id, "sending command");
                    if !sink.send(command).await {
                        return Ok(());
                    }
                    self.awaited
                        .insert(entry.value.id.clone(), entry.value.expires);
                }
                Err(error) => tracing::warn!(%error, "queued command does not decode; dropped"),
            }
        }
        Ok(())
    }

    /// Removes the presence marker if it is still this stream's (the stream ended).
    pub async fn leave(&self) {
        let Some(version) = self.presence_version else {
            return;
        };
        match self
            .records()
            .delete(
                &presence_key(&self.tenant, &self.agent),
                Precondition::Version(version),
            )
            .await
        {
            Ok(_) | Err(StoreError::Conflict { .. } | StoreError::NotFound(_)) => {}
            Err(error) => tracing::warn!(%error, "removing the presence marker failed"),
        }
    }
}
