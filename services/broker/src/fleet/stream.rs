//! One agent's `StatusStream`: a task per stream that stores each report, keeps the agent's
//! presence marker fresh (with the configuration revision the agent runs), sends down the
//! commands queued for the agent in the store (by any replica) and a `ReloadConfig` when the agent
//! runs an old configuration revision: checked with every report, and at once when a change of a
//! device or mailbox queued a `ReloadConfig` for the agent ([`super::config_changed`]; sent on
//! only when the agent's configuration did change).
//!
//! The stream ends
//! - cleanly when the agent closes its side or goes away;
//! - ABORTED when a newer stream of the same agent (on any replica) took over the presence marker;
//! - PERMISSION_DENIED when the agent record is revoked or deleted (checked on every report);
//! - UNAVAILABLE when the broker shuts down, or the store fails while a report is handled.

use std::time::Duration;

use time::OffsetDateTime;
use tokenfleet_domain::Agent;
use tokenfleet_proto::v1 as pb;
use tokenfleet_store::{Precondition, Scope, StoreError};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};
use tracing::Instrument as _;

use super::agent_config;
use super::settings::{CommandStream, FleetSettings, STALE_HEARTBEATS};
use super::store::{
    AgentPresence, CommandAnswer, DeviceStatusRecord, QueuedCommand, encode_wire, new_command_id,
    presence_key,
};
use crate::edge::grpc_status::status;
use crate::identity::peer::AgentPeer;
use crate::records::{CAS_ATTEMPTS, Records, StoredRecord as _, agent_key};
use crate::state::BrokerState;

/// Commands buffered towards one agent.
const COMMAND_BUFFER: usize = 16;
/// Commands taken from the store per poll.
const COMMAND_BATCH: usize = 16;
/// Longest software version kept on the agent record.
const MAX_VERSION_LEN: usize = 100;
/// Largest device status kept (encoded); bigger ones are dropped with a warning.
const MAX_STATUS_BYTES: usize = 64 * 1024;
/// How long a built agent configuration serves further reports of the same stream. Short: the
/// agent may report more often than the broker's heartbeat (a local override). A device change
/// does not wait for it: it queues a `ReloadConfig`, which rebuilds the configuration.
const CONFIG_REUSE: time::Duration = time::Duration::seconds(1);
/// Longest command id accepted in a result.
const MAX_COMMAND_ID_LEN: usize = 64;

/// Starts the stream's task; the returned stream carries the commands.
pub fn start(
    state: &BrokerState,
    settings: &FleetSettings,
    peer: AgentPeer,
    reports: Streaming<pb::AgentReport>,
) -> CommandStream {
    let (tx, rx) = mpsc::channel(COMMAND_BUFFER);
    let session = Session {
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
        awaited: std::collections::HashMap::new(),
        config: None,
    };
    let span = tracing::info_span!(
        "status_stream",
        agent = %peer.id,
        replica = %settings.replica,
    );
    tokio::spawn(session.run(reports, tx).instrument(span));
    Box::pin(ReceiverStream::new(rx))
}

type Tx = mpsc::Sender<Result<pb::AgentCommand, Status>>;

struct Session {
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
    awaited: std::collections::HashMap<String, OffsetDateTime>,
    /// The agent's configuration and when it was built: reports come in bursts (every command
    /// answer and health change sends one), and building lists every device and mailbox of the
    /// tenant, so it is rebuilt at most once per [`CONFIG_REUSE`].
    config: Option<(pb::AgentConfig, OffsetDateTime)>,
}

impl Session {
    async fn run(mut self, mut reports: Streaming<pb::AgentReport>, tx: Tx) {
        tracing::info!("status stream opened");
        let mut poll = tokio::time::interval(self.settings.command_sweep);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shutdown = self.settings.shutdown.clone();
        // Woken when a command is queued for the agent on this replica (see `super::wake`).
        let woken = super::wake::register(&self.state, &self.tenant, &self.agent);
        let end: Result<&'static str, Status> = loop {
            tokio::select! {
                () = tx.closed() => break Ok("agent went away"),
                () = stopping(&mut shutdown) => {
                    break Err(Status::unavailable("the broker is shutting down; reconnect"));
                }
                message = reports.message() => match message {
                    Ok(Some(report)) => {
                        if let Err(status) = self.on_report(report, &tx).await {
                            break Err(status);
                        }
                    }
                    Ok(None) => break Ok("agent closed the stream"),
                    Err(status) => {
                        // A report that does not decode is the agent's bad input, not a break.
                        if let Some(invalid) = crate::malformed::request_decode_failure(&status) {
                            break Err(invalid);
                        }
                        tracing::debug!(code = ?status.code(), message = status.message(), "status stream broken");
                        break Ok("stream broken");
                    }
                },
                () = woken.notified() => {
                    if self.presence_version.is_some()
                        && let Err(status) = self.poll(&tx, true).await
                    {
                        break Err(status);
                    }
                }
                _ = poll.tick() => {
                    if self.presence_version.is_some()
                        && let Err(status) = self.poll(&tx, true).await
                    {
                        break Err(status);
                    }
                }
            }
        };
        self.leave().await;
        match end {
            Ok(why) => tracing::info!(why, "status stream closed"),
            Err(status) => {
                tracing::info!(code = ?status.code(), message = status.message(), "status stream ended");
                // The agent may not be reading; do not hang on it.
                let _ = tokio::time::timeout(Duration::from_secs(1), tx.send(Err(status))).await;
            }
        }
    }

    fn records(&self) -> Records<'_> {
        Records::new(self.state.store.as_ref())
    }

    fn heartbeat(&self) -> time::Duration {
        time::Duration::seconds(i64::from(self.settings.heartbeat_seconds))
    }

    async fn on_report(&mut self, report: pb::AgentReport, tx: &Tx) -> Result<(), Status> {
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
        self.store_statuses(&report, &config, now).await?;
        if let Some(result) = report.command_result.as_ref().filter(|_| !reload_answer) {
            self.store_result(result, now).await?;
        }
        self.touch_agent(agent, &report.software_version, now)
            .await?;
        self.push_config(&config, new_command_id(now), tx).await;
        Ok(())
    }

    /// Sends `ReloadConfig` (with id `id`) when the agent runs another revision than `config`'s
    /// and none was sent for that revision yet.
    async fn push_config(&mut self, config: &pb::AgentConfig, id: String, tx: &Tx) {
        if self.running_revision == config.revision
            || self.pushed_revision.as_deref() == Some(config.revision.as_str())
        {
            return;
        }
        let command = pb::AgentCommand {
            id: id.clone(),
            command: Some(pb::agent_command::Command::ReloadConfig(
                pb::ReloadConfig {},
            )),
        };
        tracing::info!(
            running = %self.running_revision,
            current = %config.revision,
            "agent runs an old configuration; sending ReloadConfig"
        );
        if tx.send(Ok(command)).await.is_ok() {
            self.pushed_revision = Some(config.revision.clone());
            self.reload_sent = Some((id, config.revision.clone()));
        }
    }

    /// A `ReloadConfig` queued because a record the agent's configuration is built from changed:
    /// the configuration is built afresh and the command sent on only if the agent does not run
    /// it already.
    async fn on_config_changed(&mut self, id: String, tx: &Tx) {
        let now = self.state.clock.now();
        let built = agent_config::build_fresh(
            &self.state,
            &self.tenant,
            &self.agent,
            self.settings.heartbeat_seconds,
        )
        .await
        .map_err(status);
        match built {
            Ok(config) => {
                self.config = Some((config.clone(), now));
                self.push_config(&config, id, tx).await;
            }
            Err(status) => {
                tracing::warn!(
                    message = status.message(),
                    "building the agent configuration failed"
                );
            }
        }
    }

    /// The agent's configuration, built again when the cached one is older than
    /// [`CONFIG_REUSE`]: a device change reaches the agent (ReloadConfig) with its next report
    /// after that.
    async fn current_config(&mut self, now: OffsetDateTime) -> Result<pb::AgentConfig, Status> {
        if let Some((config, built)) = &self.config
            && now - *built < CONFIG_REUSE
        {
            return Ok(config.clone());
        }
        let config = agent_config::build(
            &self.state,
            &self.tenant,
            &self.agent,
            self.settings.heartbeat_seconds,
        )
        .await
        .map_err(status)?;
        self.config = Some((config.clone(), now));
        Ok(config)
    }

    /// The agent record; PERMISSION_DENIED when it was revoked or deleted since the call began.
    async fn check_agent(&self) -> Result<crate::records::Versioned<Agent>, Status> {
        let agent = self
            .records()
            .get::<Agent>(&agent_key(&self.tenant, &self.agent))
            .await
            .map_err(status)?;
        match agent {
            None => Err(Status::permission_denied(format!(
                "agent `{}` of tenant `{}` was deleted",
                self.agent, self.tenant
            ))),
            Some(a) if a.value.revoked => Err(Status::permission_denied(format!(
                "agent `{}` of tenant `{}` was revoked",
                self.agent, self.tenant
            ))),
            Some(a) => Ok(a),
        }
    }

    /// Writes the presence marker: unconditionally on the first report (a newer stream replaces
    /// an older one), afterwards only while it is still this stream's.
    async fn refresh_presence(&mut self, now: OffsetDateTime) -> Result<(), Status> {
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
                let v = self
                    .records()
                    .put(&presence, Precondition::Any)
                    .await
                    .map_err(status)?;
                self.presence_version = Some(v);
                Ok(())
            }
            Err(e) => Err(status(e)),
        }
    }

    /// ABORTED when another stream holds the presence marker now.
    async fn check_presence(&self) -> Result<(), Status> {
        let current = self
            .records()
            .get::<AgentPresence>(&presence_key(&self.tenant, &self.agent))
            .await
            .map_err(status)?;
        match current {
            Some(p) if p.value.stream != self.stream => Err(Status::aborted(format!(
                "a newer status stream of agent `{}` (replica {}) replaced this one",
                self.agent, p.value.replica
            ))),
            _ => Ok(()),
        }
    }

    async fn store_statuses(
        &self,
        report: &pb::AgentReport,
        config: &pb::AgentConfig,
        now: OffsetDateTime,
    ) -> Result<(), Status> {
        for status in &report.devices {
            if !config.devices.iter().any(|d| d.name == status.device) {
                tracing::debug!(
                    device = %crate::ops::names::shown(&status.device),
                    "report names a device this agent does not host; ignored"
                );
                continue;
            }
            let encoded = encode_wire(status);
            if encoded.len() > MAX_STATUS_BYTES {
                tracing::warn!(device = %status.device, bytes = encoded.len(), "device status too large; not stored");
                continue;
            }
            let record = DeviceStatusRecord {
                tenant: self.tenant.clone(),
                device: status.device.clone(),
                agent: self.agent.clone(),
                report_time: now,
                heartbeat_seconds: self.settings.heartbeat_seconds,
                status: encoded,
            };
            self.records()
                .put(&record, Precondition::Any)
                .await
                .map_err(crate::edge::grpc_status::status)?;
        }
        Ok(())
    }

    async fn store_result(
        &mut self,
        result: &pb::CommandResult,
        now: OffsetDateTime,
    ) -> Result<(), Status> {
        let id = &result.command_id;
        self.awaited.retain(|_, expires| *expires > now);
        if self.awaited.remove(id).is_none() {
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
        let answer = CommandAnswer {
            tenant: self.tenant.clone(),
            agent: self.agent.clone(),
            id: id.clone(),
            time: now,
            result: encode_wire(result),
        };
        tracing::info!(command = %id, ok = result.ok, "command answered");
        self.records()
            .put(&answer, Precondition::Any)
            .await
            .map(|_| ())
            .map_err(status)
    }

    /// Updates `last_seen` and `software_version` on the agent record, at most every half
    /// heartbeat unless the version changed.
    async fn touch_agent(
        &mut self,
        mut current: crate::records::Versioned<Agent>,
        version: &str,
        now: OffsetDateTime,
    ) -> Result<(), Status> {
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
                    return Err(Status::permission_denied(format!(
                        "agent `{}` of tenant `{}` was deleted",
                        self.agent, self.tenant
                    )));
                }
                Err(e) => return Err(status(e)),
            }
        }
        // Someone keeps changing the record; the next report tries again.
        tracing::warn!("agent record kept changing; last_seen not updated");
        Ok(())
    }

    /// Sends the commands queued for the agent (each taken out of the store first, so only one
    /// stream sends it); every few polls also checks this stream still holds the presence marker.
    async fn poll(&mut self, tx: &Tx, check_presence: bool) -> Result<(), Status> {
        if check_presence {
            match self.check_presence().await {
                Err(status) if status.code() == tonic::Code::Aborted => return Err(status),
                Err(status) => tracing::warn!(message = status.message(), "presence check failed"),
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
                Ok(pb::AgentCommand {
                    id,
                    command: Some(pb::agent_command::Command::ReloadConfig(_)),
                }) => self.on_config_changed(id, tx).await,
                Ok(command) => {
                    tracing::info!(command = %entry.value.id, "sending command");
                    if tx.send(Ok(command)).await.is_err() {
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

    /// Removes the presence marker if it is still this stream's.
    async fn leave(&self) {
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

/// Completes when the broker is shutting down (never without a shutdown signal).
async fn stopping(shutdown: &mut Option<tokio::sync::watch::Receiver<bool>>) {
    match shutdown {
        Some(rx) => {
            if rx.wait_for(|stop| *stop).await.is_err() {
                // The sender is gone: the server is going away too.
            }
        }
        None => std::future::pending().await,
    }
}
