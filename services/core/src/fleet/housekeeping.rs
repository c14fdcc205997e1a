//! Removes fleet records nobody will read again: a connection test queued for an agent that did
//! not take it before it expired (the agent stayed away, or the waiting replica died before
//! taking it back), an answer stored for a waiter that had already given up (possible only when
//! replicas' clocks disagree), and the last status of a device that was deleted (a device created
//! again under its name would otherwise show it until its agent reports). Every replica sweeps;
//! deletes are conditional on the version read, so replicas never remove a record another one
//! has just rewritten.

use std::time::Duration;

use time::OffsetDateTime;
use tokenfleet_domain::{Device, Tenant};
use tokenfleet_store::{Precondition, Scope, StoreError, StoreResult};

use super::store::{CommandAnswer, DeviceStatusRecord, QueuedCommand};
use crate::records::{Records, StoredRecord};
use crate::state::BrokerState;

/// How often each replica sweeps.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(300);
/// An answer older than this has no waiter left: no connection test waits longer than
/// [`super::test_connection::MAX_TIMEOUT_SECONDS`] (120 s).
pub const ANSWER_KEEP: time::Duration = time::Duration::minutes(10);

/// What one sweep removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    /// Queued commands past their expiry.
    pub commands: usize,
    /// Answers older than [`ANSWER_KEEP`].
    pub answers: usize,
    /// Last statuses of devices that no longer exist.
    pub statuses: usize,
}

/// Removes, in every tenant, queued commands that expired before `now`, answers stored
/// [`ANSWER_KEEP`] or longer before it, and statuses of devices that are gone.
pub async fn sweep(state: &BrokerState, now: OffsetDateTime) -> StoreResult<Swept> {
    let records = Records::new(state.store.as_ref());
    let mut swept = Swept::default();
    for tenant in records.list_all::<Tenant>(&Scope::Global).await? {
        let scope = Scope::Tenant(tenant.value.name.clone());
        for queued in records.list_all::<QueuedCommand>(&scope).await? {
            if queued.value.expires <= now
                && remove(&records, &queued.value, queued.version).await?
            {
                swept.commands += 1;
            }
        }
        for answer in records.list_all::<CommandAnswer>(&scope).await? {
            if answer.value.time + ANSWER_KEEP <= now
                && remove(&records, &answer.value, answer.version).await?
            {
                swept.answers += 1;
            }
        }
        // Statuses first, devices second: a device created in between has no status in the
        // first list, so nothing of it can be taken for an orphan.
        let statuses = records.list_all::<DeviceStatusRecord>(&scope).await?;
        if !statuses.is_empty() {
            let devices: std::collections::HashSet<String> = records
                .list_all::<Device>(&scope)
                .await?
                .into_iter()
                .map(|d| d.value.name)
                .collect();
            for status in statuses {
                if !devices.contains(&status.value.device)
                    && remove(&records, &status.value, status.version).await?
                {
                    swept.statuses += 1;
                }
            }
        }
    }
    Ok(swept)
}

/// Deletes `record` if it still has `version`; `false` when it changed or went meanwhile.
async fn remove<T: StoredRecord>(
    records: &Records<'_>,
    record: &T,
    version: u64,
) -> StoreResult<bool> {
    match records
        .delete(&record.key(), Precondition::Version(version))
        .await
    {
        Ok(removed) => Ok(removed),
        Err(StoreError::Conflict { .. } | StoreError::NotFound(_)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Sweeps every [`SWEEP_INTERVAL`], the first time one interval after the call, until `stop` turns
/// true.
pub fn spawn(
    state: BrokerState,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // The first sweep one interval after start: nothing is urgent, and start-up stays quiet.
        let mut ticker =
            tokio::time::interval_at(tokio::time::Instant::now() + SWEEP_INTERVAL, SWEEP_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            match sweep(&state, state.clock.now()).await {
                Ok(swept) if swept == Swept::default() => {}
                Ok(swept) => tracing::info!(
                    commands = swept.commands,
                    answers = swept.answers,
                    statuses = swept.statuses,
                    "removed expired agent commands, unread answers and statuses of deleted devices"
                ),
                Err(error) => tracing::warn!(%error, "sweeping fleet records failed"),
            }
        }
    })
}
