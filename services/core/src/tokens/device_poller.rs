//! The device-code poller: polls the token endpoint for every pending device-code consent, from
//! every broker replica, with exactly one replica polling a given code at a time.
//!
//! Everything it needs is in the store: the `consent-poll` schedule says which mailboxes are due,
//! the grant record holds the sealed device code, the current interval and the next poll time. A
//! replica takes a store lease per mailbox before polling, re-reads the grant under the lease,
//! polls once, writes the outcome (compare-and-set, carrying the lease's fence) and reschedules.
//! A replica killed mid-poll leaves its lease to expire; another replica then finds the mailbox
//! still due and polls it. A broker restart loses nothing.
//!
//! RFC 8628: `authorization_pending` → poll again after `interval`; `slow_down` → the interval
//! grows by 5 s for this and every later poll (kept in the grant record, so it survives restarts
//! and replica changes); network trouble, 5xx and 429 → retry with backoff, the consent stays
//! pending; `expired_token`, `authorization_declined`, `bad_verification_code` → the consent ends.
//!
//! Time comes from the broker's [`tokenfleet_domain::Clock`] (due times, intervals, expiry) and
//! `tokio::time` (the pause between rounds), so tests drive it with controlled time:
//! [`DevicePoller::run_once`] does one round at the clock's "now".

use std::time::Duration;

use time::OffsetDateTime;
use tokenfleet_domain::{TokenError, TokenStatus};
use tokenfleet_providers::{DevicePoll, ErrorClass, SLOW_DOWN_STEP};
use tokenfleet_store::{Lease, StoreError};
use tokio::sync::watch;

use crate::state::BrokerState;
use crate::tokens::consent::{
    self, CONSENT_POLL_SCHEDULE, ConsentError, POLLER_ACTOR, describe_provider_error, load_grant,
    lost_race, parse_member, save_grant, unix_ms,
};
use crate::tokens::grant::{GrantField, GrantRecord, PendingConsent, open_field};

/// Longest wait between polls after transient failures.
pub const MAX_RETRY_WAIT: Duration = Duration::from_secs(300);
/// How long after a code's expiry the broker stops asking the provider and ends the consent
/// itself (the provider's clock may be a little behind ours).
pub const EXPIRY_GRACE: Duration = Duration::from_secs(60);

/// Poller timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollerSettings {
    /// Pause between rounds (a poll happens at most this late).
    pub tick: Duration,
    /// Lease per mailbox while polling; another replica takes over this long after a crash.
    /// Must be longer than one poll (the provider request timeout).
    pub lease_ttl: Duration,
    /// Most mailboxes handled per round.
    pub batch: usize,
}

impl Default for PollerSettings {
    fn default() -> Self {
        Self {
            tick: Duration::from_secs(1),
            lease_ttl: Duration::from_secs(60),
            batch: 100,
        }
    }
}

/// What one poll of one mailbox came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PollOutcome {
    /// Another replica holds the mailbox's lease.
    Leased,
    /// Not due yet (rescheduled at the grant's `next_poll`).
    NotDue,
    /// Nothing to poll any more (no pending device code, mailbox gone); taken off the schedule.
    Dropped,
    /// The grant changed while polling (a new consent started, token deleted): result discarded.
    Superseded,
    /// Still waiting for the person; next poll at this time.
    Pending { next_poll: OffsetDateTime },
    /// The provider asked to slow down; the interval is now this many seconds.
    SlowDown { interval_secs: u64 },
    /// A transient failure; next attempt at this time.
    Retry { next_poll: OffsetDateTime },
    /// Signed in: the mailbox is ACTIVE.
    Granted,
    /// The consent ended without a grant (status NOT_RETRIEVED or REAUTH_REQUIRED).
    Failed { status: TokenStatus, code: String },
}

/// Polls pending device codes. Cheap to clone; run one per replica ([`DevicePoller::run`]).
#[derive(Debug, Clone)]
pub struct DevicePoller {
    state: BrokerState,
    owner: String,
    settings: PollerSettings,
    alerts: Option<crate::alerts::Alerter>,
}

impl DevicePoller {
    /// A poller over `state` with a fresh owner id and default settings.
    pub fn new(state: BrokerState) -> Self {
        Self {
            state,
            owner: format!("consent-poller-{}", uuid::Uuid::new_v4().simple()),
            settings: PollerSettings::default(),
            alerts: None,
        }
    }

    /// Reports consents that end with the mailbox in `REAUTH_REQUIRED` (an earlier grant exists
    /// and nobody completed the new sign-in) to `alerter`.
    #[must_use]
    pub fn with_alerts(mut self, alerter: crate::alerts::Alerter) -> Self {
        self.alerts = Some(alerter);
        self
    }

    /// Uses `settings`.
    #[must_use]
    pub fn with_settings(mut self, settings: PollerSettings) -> Self {
        self.settings = settings;
        self
    }

    /// The lease owner id of this poller.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Runs rounds until `stop` turns true (or its sender is gone).
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        tracing::debug!(owner = %self.owner, "device-code poller started");
        loop {
            if let Err(error) = self.run_once().await {
                tracing::warn!(%error, "device-code poller: reading the schedule failed; retrying");
            }
            tokio::select! {
                () = tokio::time::sleep(self.settings.tick) => {}
                _ = stop.wait_for(|stop| *stop) => return,
            }
        }
    }

    /// One round: polls every mailbox due at the clock's now. Returns what happened to each.
    pub async fn run_once(&self) -> Result<Vec<(String, PollOutcome)>, StoreError> {
        let now = unix_ms(self.state.clock.now());
        let due = self
            .state
            .store
            .due(CONSENT_POLL_SCHEDULE, now, self.settings.batch)
            .await?;
        let mut outcomes = Vec::with_capacity(due.len());
        for (member, _) in due {
            let Some((tenant, mailbox)) = parse_member(&member) else {
                tracing::warn!(member, "dropping a malformed consent-poll schedule entry");
                self.state
                    .store
                    .unschedule(CONSENT_POLL_SCHEDULE, &member)
                    .await?;
                continue;
            };
            match self.poll_mailbox(tenant, mailbox).await {
                Ok(outcome) => outcomes.push((member.clone(), outcome)),
                Err(error) => {
                    tracing::warn!(%error, tenant, mailbox, "device-code poll failed; retrying next round");
                }
            }
        }
        Ok(outcomes)
    }

    /// Polls one mailbox now if it is due and no other replica is at it.
    pub async fn poll_mailbox(
        &self,
        tenant: &str,
        mailbox: &str,
    ) -> Result<PollOutcome, ConsentError> {
        // The one lease per mailbox that serializes all work on its grant (refreshes too), so
        // the fences written into the grant come from one sequence.
        let lease_name = crate::tokens::lifecycle::lease_name(tenant, mailbox);
        let Some(lease) = self
            .state
            .store
            .try_lease(&lease_name, &self.owner, self.settings.lease_ttl)
            .await?
        else {
            return Ok(PollOutcome::Leased);
        };
        let outcome = self.poll_leased(tenant, mailbox, &lease).await;
        // Not reached when this task is aborted mid-poll: the lease then expires by itself.
        if let Err(error) = self
            .state
            .store
            .release_lease(&lease_name, &self.owner)
            .await
        {
            tracing::warn!(%error, tenant, mailbox, "could not release the consent-poll lease; it expires by itself");
        }
        outcome
    }

    async fn poll_leased(
        &self,
        tenant: &str,
        mailbox: &str,
        lease: &Lease,
    ) -> Result<PollOutcome, ConsentError> {
        let state = &self.state;
        let stored = load_grant(state, tenant, mailbox).await?;
        let Some(PendingConsent::DeviceCode {
            device_code,
            user_code,
            expires,
            interval_secs,
            next_poll,
            scopes,
            ..
        }) = stored.grant.pending.clone()
        else {
            consent::unschedule_poll(state, tenant, mailbox).await?;
            return Ok(PollOutcome::Dropped);
        };
        if stored.grant.fence > lease.fence {
            // Someone holding a newer lease wrote the record; this lease is stale.
            return Ok(PollOutcome::Leased);
        }
        let now = state.clock.now();
        if next_poll > now {
            consent::schedule_poll(state, tenant, mailbox, next_poll).await?;
            return Ok(PollOutcome::NotDue);
        }
        let interval = Duration::from_secs(interval_secs);
        if now >= expires + EXPIRY_GRACE {
            return self
                .end(
                    tenant,
                    mailbox,
                    lease,
                    &user_code,
                    expired_error(mailbox, tenant, "expired_token", now),
                    "the code expired",
                )
                .await;
        }
        let target = match consent::load_target(state, tenant, mailbox).await {
            Ok(target) => target,
            Err(ConsentError::NotFound(_)) => {
                consent::unschedule_poll(state, tenant, mailbox).await?;
                return Ok(PollOutcome::Dropped);
            }
            Err(e) => return Err(e),
        };
        let code = open_field(
            &state.keyring,
            tenant,
            mailbox,
            GrantField::DeviceCode,
            &device_code,
        )
        .map_err(|source| ConsentError::Seal {
            record: format!("grant of mailbox `{mailbox}` in tenant `{tenant}`"),
            source,
        })?;
        let poll = target.client.poll_device_code(&code).await;
        let now = state.clock.now();
        match poll {
            DevicePoll::Pending => {
                let next_poll = now + interval;
                let written = self
                    .write(tenant, mailbox, lease, &user_code, |g| {
                        set_next_poll(g, interval_secs, next_poll);
                        g.consecutive_failures = 0;
                    })
                    .await?;
                if written.is_none() {
                    return Ok(PollOutcome::Superseded);
                }
                consent::schedule_poll(state, tenant, mailbox, next_poll).await?;
                Ok(PollOutcome::Pending { next_poll })
            }
            DevicePoll::SlowDown => {
                let interval_secs = interval_secs + SLOW_DOWN_STEP.as_secs();
                let next_poll = now + Duration::from_secs(interval_secs);
                tracing::info!(
                    tenant,
                    mailbox,
                    interval_secs,
                    "provider asked to slow down: polling interval raised"
                );
                let written = self
                    .write(tenant, mailbox, lease, &user_code, |g| {
                        set_next_poll(g, interval_secs, next_poll);
                    })
                    .await?;
                if written.is_none() {
                    return Ok(PollOutcome::Superseded);
                }
                consent::schedule_poll(state, tenant, mailbox, next_poll).await?;
                Ok(PollOutcome::SlowDown { interval_secs })
            }
            DevicePoll::Retry(e) => {
                if now >= expires {
                    return self
                        .end(
                            tenant,
                            mailbox,
                            lease,
                            &user_code,
                            expired_error(mailbox, tenant, &e.code, now),
                            "the code expired while the provider was unreachable",
                        )
                        .await;
                }
                let failures = stored.grant.consecutive_failures.saturating_add(1);
                let wait = retry_wait(interval, failures, e.retry_after);
                let next_poll = now + wait;
                tracing::warn!(
                    tenant,
                    mailbox,
                    code = %e.code,
                    failures,
                    retry_in_secs = wait.as_secs(),
                    "device-code poll failed transiently; the consent stays pending"
                );
                let written = self
                    .write(tenant, mailbox, lease, &user_code, |g| {
                        set_next_poll(g, interval_secs, next_poll);
                        g.consecutive_failures = failures;
                    })
                    .await?;
                if written.is_none() {
                    return Ok(PollOutcome::Superseded);
                }
                consent::schedule_poll(state, tenant, mailbox, next_poll).await?;
                Ok(PollOutcome::Retry { next_poll })
            }
            DevicePoll::Granted(token) => {
                if let Err(error) = target.check_signed_in_account(&token, now) {
                    // Signed in with the wrong account: the consent ends and its tokens are
                    // dropped unstored (and revoked where the provider can).
                    target.revoke_unbound(&token).await;
                    let detail = format!("{} Fix: {}", error.reason, error.fix);
                    return self
                        .end(tenant, mailbox, lease, &user_code, error, &detail)
                        .await;
                }
                let mut failure = None;
                let written = self
                    .write(tenant, mailbox, lease, &user_code, |g| {
                        if let Err(e) = consent::activate(state, g, &token, &scopes, now) {
                            failure = Some(e);
                        }
                    })
                    .await?;
                if let Some(e) = failure {
                    return Err(e);
                }
                let Some(grant) = written else {
                    tracing::warn!(
                        tenant,
                        mailbox,
                        "a device-code sign-in finished, but the consent was replaced meanwhile; its tokens are discarded"
                    );
                    return Ok(PollOutcome::Superseded);
                };
                consent::hand_over(state, &grant).await?;
                tracing::info!(
                    tenant,
                    mailbox,
                    "device-code consent completed: mailbox ACTIVE"
                );
                consent::audit(
                    state,
                    POLLER_ACTOR,
                    "consent.complete",
                    tenant,
                    mailbox,
                    "ok",
                    "device code sign-in completed",
                )
                .await;
                Ok(PollOutcome::Granted)
            }
            DevicePoll::Denied(e) => {
                let (error, detail) = match (e.class, e.oauth_error()) {
                    (_, Some("bad_verification_code")) => (
                        e.to_token_error(mailbox, now),
                        describe_provider_error(&e, mailbox),
                    ),
                    (ErrorClass::Expired, _) => (
                        expired_error(mailbox, tenant, &e.code, now),
                        "the code expired".to_owned(),
                    ),
                    (ErrorClass::Declined, _) => (
                        TokenError {
                            code: e.code.clone(),
                            reason: "the person declined the sign-in or the consent".to_owned(),
                            fix: again(mailbox, tenant),
                            time: now,
                        },
                        "declined".to_owned(),
                    ),
                    _ => (
                        e.to_token_error(mailbox, now),
                        describe_provider_error(&e, mailbox),
                    ),
                };
                self.end(tenant, mailbox, lease, &user_code, error, &detail)
                    .await
            }
        }
    }

    /// Ends the pending consent with `error`.
    async fn end(
        &self,
        tenant: &str,
        mailbox: &str,
        lease: &Lease,
        user_code: &str,
        error: TokenError,
        detail: &str,
    ) -> Result<PollOutcome, ConsentError> {
        let code = error.code.clone();
        let reason = error.reason.clone();
        let written = self
            .write(tenant, mailbox, lease, user_code, |g| {
                consent::fail_consent(g, error.clone());
            })
            .await?;
        let Some(grant) = written else {
            return Ok(PollOutcome::Superseded);
        };
        consent::unschedule_poll(&self.state, tenant, mailbox).await?;
        tracing::info!(
            tenant,
            mailbox,
            code,
            reason,
            "device-code consent ended without a grant"
        );
        if grant.state.status == TokenStatus::ReauthRequired
            && let Some(alerts) = &self.alerts
        {
            let address = crate::records::Records::new(self.state.store.as_ref())
                .get::<tokenfleet_domain::Mailbox>(&crate::records::mailbox_key(tenant, mailbox))
                .await
                .ok()
                .flatten()
                .map(|m| m.value.address)
                .unwrap_or_default();
            let event = crate::alerts::AlertEvent::reauth_required(
                tenant,
                mailbox,
                &address,
                &error,
                self.state.clock.now(),
            );
            if let Err(e) = alerts
                .raise(event, &crate::alerts::grant_problem(&grant))
                .await
            {
                tracing::warn!(error = %e, tenant, mailbox, "raising the alert failed");
            }
        }
        consent::audit(
            &self.state,
            POLLER_ACTOR,
            "consent.failed",
            tenant,
            mailbox,
            "failed",
            &format!("{detail} [{code}]"),
        )
        .await;
        Ok(PollOutcome::Failed {
            status: grant.state.status,
            code,
        })
    }

    /// Applies `change` to the grant if it still holds the device code `user_code`, with
    /// compare-and-set and the lease's fence. `None` when the consent was replaced or removed.
    async fn write(
        &self,
        tenant: &str,
        mailbox: &str,
        lease: &Lease,
        user_code: &str,
        mut change: impl FnMut(&mut GrantRecord),
    ) -> Result<Option<GrantRecord>, ConsentError> {
        for _ in 0..crate::records::CAS_ATTEMPTS {
            let stored = load_grant(&self.state, tenant, mailbox).await?;
            let same = matches!(
                &stored.grant.pending,
                Some(PendingConsent::DeviceCode { user_code: u, .. }) if u == user_code
            );
            if stored.version.is_none() || !same || stored.grant.fence > lease.fence {
                return Ok(None);
            }
            let mut grant = stored.grant;
            change(&mut grant);
            grant.fence = lease.fence;
            match save_grant(&self.state, stored.version, &grant).await {
                Ok(_) => return Ok(Some(grant)),
                Err(e) if lost_race(&e) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ConsentError::Conflict(format!(
            "the grant of mailbox `{mailbox}` in tenant `{tenant}` kept changing while the poll result was written"
        )))
    }
}

fn set_next_poll(grant: &mut GrantRecord, interval: u64, at: OffsetDateTime) {
    if let Some(PendingConsent::DeviceCode {
        interval_secs,
        next_poll,
        ..
    }) = &mut grant.pending
    {
        *interval_secs = interval;
        *next_poll = at;
    }
}

/// Wait after `failures` consecutive transient failures: the interval doubled per failure, at
/// most [`MAX_RETRY_WAIT`], never less than the provider's `Retry-After`.
pub fn retry_wait(interval: Duration, failures: u32, retry_after: Option<Duration>) -> Duration {
    let doubled = interval
        .checked_mul(1u32 << failures.min(8))
        .unwrap_or(MAX_RETRY_WAIT)
        .min(MAX_RETRY_WAIT)
        .max(interval);
    match retry_after {
        Some(r) => doubled.max(r.min(MAX_RETRY_WAIT * 4)),
        None => doubled,
    }
}

fn again(mailbox: &str, tenant: &str) -> String {
    format!("run `tokenfleetctl mailbox consent {mailbox} --tenant {tenant}` again")
}

fn expired_error(mailbox: &str, tenant: &str, code: &str, now: OffsetDateTime) -> TokenError {
    TokenError {
        code: code.to_owned(),
        reason: "the code expired before anyone entered it".to_owned(),
        fix: again(mailbox, tenant),
        time: now,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_and_honour_retry_after() {
        let five = Duration::from_secs(5);
        assert_eq!(retry_wait(five, 1, None), Duration::from_secs(10));
        assert_eq!(retry_wait(five, 2, None), Duration::from_secs(20));
        assert_eq!(retry_wait(five, 30, None), MAX_RETRY_WAIT);
        assert_eq!(
            retry_wait(five, 1, Some(Duration::from_secs(120))),
            Duration::from_secs(120)
        );
    }
}
