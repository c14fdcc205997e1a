//! Removes agent command records nobody will read again: a connection test queued for an agent
//! that did not take it before it expired (the agent stayed away, or the waiting replica died
//! before taking it back), and an answer stored for a waiter that had already given up (possible
//! only when replicas' clocks disagree). Every replica sweeps; deletes are conditional on the
//! version read, so replicas never remove a record another one has just rewritten.

use std::time::Duration;

use time::OffsetDateTime;
use tokenfleet_domain::Tenant;
use tokenfleet_store::{Precondition, Scope, StoreError, StoreResult};

use super::store::{CommandAnswer, QueuedCommand};
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
}

/// Removes, in every tenant, queued commands that expired before `now` and answers stored
/// [`ANSWER_KEEP`] or longer before it.
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

/// Sweeps every [`SWEEP_INTERVAL`] until `stop` turns true.
pub fn spawn(
    state: BrokerState,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(SWEEP_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            match sweep(&state, state.clock.now()).await {
                Ok(Swept {
                    commands: 0,
                    answers: 0,
                }) => {}
                Ok(swept) => tracing::info!(
                    commands = swept.commands,
                    answers = swept.answers,
                    "removed expired agent commands and unread answers"
                ),
                Err(error) => tracing::warn!(%error, "sweeping agent commands failed"),
            }
        }
    })
}
