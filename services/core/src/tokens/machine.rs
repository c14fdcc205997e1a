//! The token state machine as a pure function: ([`Lifecycle`] of a grant, [`Event`], [`Context`]
//! with the clock reading and the policy) → (next [`Lifecycle`], [`Effects`] to run: where the
//! refresh schedule entry goes, which alert to raise or clear, what to audit).
//!
//! ```text
//!                      consent started               consent completed
//!   NOT_RETRIEVED ───────────────────▶ CONSENT_PENDING ─────────────────▶ ACTIVE ◀──┐
//!        ▲                                   │ consent failed                │ │      │ refreshed /
//!        │ deleted / idle-deleted            ▼ (earlier grant: REAUTH)       │ │      │ resource minted
//!        └──────────── any ◀──────── NOT_RETRIEVED | REAUTH_REQUIRED         │ ▼      │
//!                                            ▲       dead grant   transient / misconfigured / held
//!                                            └──────────────────── REFRESH_FAILING ──┘
//! ```
//!
//! No store, sealing, tonic or I/O here: [`super::lifecycle::TokenService`] and the consent
//! flows read the grant, call [`transition`], write the result with compare-and-set under the
//! mailbox's lease and run the effects. They decide nothing themselves.

use std::time::Duration;

use time::OffsetDateTime;
use tokenfleet_domain::{TokenError, TokenStatus};
use tokenfleet_providers::ErrorClass;

use super::backoff::{Backoff, MAX_RETRY_AFTER};
use super::grant::GrantRecord;
use super::scheduler::next_refresh_at;

/// The part of a grant the machine decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lifecycle {
    /// Status every surface shows.
    pub status: TokenStatus,
    /// Why the grant is not ACTIVE (or what an idle deletion left).
    pub last_error: Option<TokenError>,
    /// Consecutive failed refreshes (drives the backoff).
    pub consecutive_failures: u32,
    /// When the grant is looked at next (`None`: never).
    pub next_refresh: Option<OffsetDateTime>,
    /// Nothing calls the provider for the grant before this (`Retry-After`).
    pub retry_not_before: Option<OffsetDateTime>,
    /// When the access token was last obtained.
    pub last_refresh: Option<OffsetDateTime>,
    /// When the mail protocols' access token expires.
    pub access_token_expires: Option<OffsetDateTime>,
}

impl Default for Lifecycle {
    /// A grant with nothing retrieved.
    fn default() -> Self {
        Self {
            status: TokenStatus::NotRetrieved,
            last_error: None,
            consecutive_failures: 0,
            next_refresh: None,
            retry_not_before: None,
            last_refresh: None,
            access_token_expires: None,
        }
    }
}

impl Lifecycle {
    /// The machine's part of `grant`.
    pub fn of(grant: &GrantRecord) -> Self {
        Self {
            status: grant.state.status,
            last_error: grant.state.last_error.clone(),
            consecutive_failures: grant.consecutive_failures,
            next_refresh: grant.next_refresh,
            retry_not_before: grant.retry_not_before,
            last_refresh: grant.state.last_refresh,
            access_token_expires: grant.state.access_token_expires,
        }
    }

    /// Writes the machine's part into `grant` (the rest — sealed tokens, scopes — is the
    /// caller's).
    pub fn apply_to(self, grant: &mut GrantRecord) {
        grant.state.status = self.status;
        grant.state.last_error = self.last_error;
        grant.consecutive_failures = self.consecutive_failures;
        grant.next_refresh = self.next_refresh;
        grant.retry_not_before = self.retry_not_before;
        grant.state.last_refresh = self.last_refresh;
        grant.state.access_token_expires = self.access_token_expires;
    }
}

/// How a failed refresh counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The grant is dead (`invalid_grant`, grant-killing AADSTS codes): a person must consent.
    DeadGrant,
    /// The app registration or provider settings are wrong: an administrator must fix them;
    /// retried with backoff (the grant itself may be fine).
    Misconfigured,
    /// Network, timeouts, HTTP 5xx/429: retried with backoff, at least `Retry-After`.
    Transient,
}

impl Failure {
    /// The failure a provider error class stands for in a refresh.
    pub fn of(class: ErrorClass) -> Self {
        match class {
            _ if class.refresh_status() == TokenStatus::ReauthRequired => Self::DeadGrant,
            ErrorClass::Transient => Self::Transient,
            _ => Self::Misconfigured,
        }
    }
}

/// What happened to a grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A refresh got a mail-protocols access token valid for `lifetime`. `expiry_check_at`:
    /// when the refresh token enters the expiry-alert horizon (the grant must be looked at
    /// again by then).
    Refreshed {
        lifetime: Duration,
        delegated: bool,
        expiry_check_at: Option<OffsetDateTime>,
    },
    /// An access token of another resource (Microsoft Graph) was minted from the grant.
    ResourceMinted,
    /// A refresh failed.
    Failed {
        failure: Failure,
        error: TokenError,
        retry_after: Option<Duration>,
    },
    /// The provider's breaker held the refresh back (no call was made).
    Held {
        error: TokenError,
        next_probe: OffsetDateTime,
    },
    /// An operator deleted the token (revoked where possible, wiped). `note`: what the wiped
    /// grant says (a failed revocation).
    Deleted { note: Option<TokenError> },
    /// The scheduler deleted an idle user token.
    IdleDeleted { note: TokenError },
    /// A consent started for the mailbox.
    ConsentStarted,
    /// A consent completed with a token valid for `lifetime` (`delegated`: with a refresh
    /// token).
    ConsentCompleted {
        lifetime: Duration,
        delegated: bool,
        first_refresh_within: Duration,
    },
    /// A consent ended without a grant. `had_grant`: an earlier grant's tokens are still stored.
    ConsentFailed { error: TokenError, had_grant: bool },
}

/// The clock reading and the policy a transition uses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Context {
    /// Now.
    pub now: OffsetDateTime,
    /// A random number in `[0, 1)` (jitter).
    pub unit: f64,
    /// Retry timing after failures.
    pub backoff: Backoff,
    /// Delegated grants are refreshed at least this often.
    pub max_refresh_interval: Duration,
}

/// Where the grant's refresh schedule entry goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Due at this time.
    At(OffsetDateTime),
    /// Off the schedule (nothing to refresh until a person acts).
    Remove,
    /// Left as it is.
    Keep,
}

/// The dead-grant alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alert {
    /// Nothing to do.
    None,
    /// Raise "REAUTH_REQUIRED" (a transition into it).
    RaiseReauth,
    /// The grant works again: clear it.
    ResolveReauth,
}

/// What the caller runs after writing the next state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Effects {
    /// The refresh schedule entry.
    pub schedule: Schedule,
    /// The dead-grant alert.
    pub alert: Alert,
    /// Check the refresh token's expiry alert (it may be nearing its end).
    pub check_expiry: bool,
    /// Audit action to record, when the transition is audited by the lifecycle itself.
    pub audit: Option<&'static str>,
}

impl Effects {
    fn schedule(schedule: Schedule) -> Self {
        Self {
            schedule,
            alert: Alert::None,
            check_expiry: false,
            audit: None,
        }
    }
}

/// Audit action of an idle user token's deletion.
pub const IDLE_DELETE_ACTION: &str = "token.idle_delete";

/// The next state and the effects of `event` on a grant in `current`.
pub fn transition(current: &Lifecycle, event: Event, cx: &Context) -> (Lifecycle, Effects) {
    let now = cx.now;
    let mut next = current.clone();
    let effects = match event {
        Event::Refreshed {
            lifetime,
            delegated,
            expiry_check_at,
        } => {
            let at = next_refresh_at(now, lifetime, delegated, cx.max_refresh_interval, cx.unit);
            let at = expiry_check_at.map_or(at, |check| at.min(check));
            next.status = TokenStatus::Active;
            next.last_error = None;
            next.consecutive_failures = 0;
            next.retry_not_before = None;
            next.last_refresh = Some(now);
            next.access_token_expires = Some(now + lifetime);
            next.next_refresh = Some(at);
            Effects {
                schedule: Schedule::At(at),
                alert: if current.status == TokenStatus::Active {
                    Alert::None
                } else {
                    Alert::ResolveReauth
                },
                check_expiry: true,
                audit: None,
            }
        }
        Event::ResourceMinted => {
            if current.status == TokenStatus::RefreshFailing {
                // The grant works again; the scheduler's next look refreshes the mail token.
                next.status = TokenStatus::Active;
                next.last_error = None;
                next.consecutive_failures = 0;
                next.retry_not_before = None;
            }
            Effects::schedule(Schedule::Keep)
        }
        Event::Failed {
            failure,
            error,
            retry_after,
        } => {
            next.last_error = Some(error);
            next.consecutive_failures = current.consecutive_failures.saturating_add(1);
            next.retry_not_before = retry_after.map(|r| now + r.min(MAX_RETRY_AFTER));
            match failure {
                Failure::DeadGrant => {
                    next.status = TokenStatus::ReauthRequired;
                    next.next_refresh = None;
                    Effects {
                        schedule: Schedule::Remove,
                        // On the transition only: a forced retry of a dead grant is no new
                        // problem.
                        alert: if current.status == TokenStatus::ReauthRequired {
                            Alert::None
                        } else {
                            Alert::RaiseReauth
                        },
                        check_expiry: false,
                        audit: None,
                    }
                }
                Failure::Misconfigured | Failure::Transient => {
                    next.status = TokenStatus::RefreshFailing;
                    let at = now
                        + cx.backoff
                            .delay(next.consecutive_failures, retry_after, cx.unit);
                    next.next_refresh = Some(at);
                    Effects::schedule(Schedule::At(at))
                }
            }
        }
        Event::Held { error, next_probe } => {
            // No attempt was made: the failure count stays. The breaker releases the grant when
            // a probe gets an answer; the schedule is the fallback should this replica stop.
            next.status = TokenStatus::RefreshFailing;
            next.last_error = Some(error);
            let at = (now
                + cx.backoff
                    .delay(current.consecutive_failures.max(1), None, cx.unit))
            .max(next_probe);
            next.next_refresh = Some(at);
            Effects::schedule(Schedule::At(at))
        }
        Event::Deleted { note } => {
            next = Lifecycle {
                last_error: note,
                ..Lifecycle::default()
            };
            Effects::schedule(Schedule::Remove)
        }
        Event::IdleDeleted { note } => {
            next = Lifecycle {
                last_error: Some(note),
                ..Lifecycle::default()
            };
            Effects {
                audit: Some(IDLE_DELETE_ACTION),
                ..Effects::schedule(Schedule::Remove)
            }
        }
        Event::ConsentStarted => {
            next.status = TokenStatus::ConsentPending;
            next.last_error = None;
            next.consecutive_failures = 0;
            Effects::schedule(Schedule::Keep)
        }
        Event::ConsentCompleted {
            lifetime,
            delegated,
            first_refresh_within,
        } => {
            let at = next_refresh_at(now, lifetime, delegated, first_refresh_within, cx.unit);
            next.status = TokenStatus::Active;
            next.last_error = None;
            next.consecutive_failures = 0;
            next.retry_not_before = None;
            next.last_refresh = Some(now);
            next.access_token_expires = Some(now + lifetime);
            next.next_refresh = Some(at);
            Effects::schedule(Schedule::At(at))
        }
        Event::ConsentFailed { error, had_grant } => {
            next.status = if had_grant {
                TokenStatus::ReauthRequired
            } else {
                TokenStatus::NotRetrieved
            };
            next.last_error = Some(error);
            Effects {
                alert: if had_grant {
                    Alert::RaiseReauth
                } else {
                    Alert::None
                },
                ..Effects::schedule(Schedule::Keep)
            }
        }
    };
    (next, effects)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);
    const DAY: Duration = Duration::from_secs(86_400);

    fn t0() -> OffsetDateTime {
        OffsetDateTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    fn cx() -> Context {
        Context {
            now: t0(),
            unit: 0.5,
            backoff: Backoff::default(),
            max_refresh_interval: DAY,
        }
    }

    fn err(code: &str) -> TokenError {
        TokenError {
            code: code.into(),
            reason: format!("{code} happened"),
            fix: "fix it".into(),
            time: t0(),
        }
    }

    fn in_state(status: TokenStatus) -> Lifecycle {
        let failing = status == TokenStatus::RefreshFailing;
        Lifecycle {
            status,
            last_error: (status != TokenStatus::Active && status != TokenStatus::NotRetrieved)
                .then(|| err("earlier")),
            consecutive_failures: if failing { 3 } else { 0 },
            next_refresh: Some(t0() + Duration::from_secs(600)),
            retry_not_before: failing.then(|| t0() + Duration::from_secs(60)),
            last_refresh: Some(t0() - HOUR),
            access_token_expires: Some(t0() + Duration::from_secs(60)),
        }
    }

    const ALL: [TokenStatus; 6] = [
        TokenStatus::NotRetrieved,
        TokenStatus::ConsentPending,
        TokenStatus::Active,
        TokenStatus::RefreshFailing,
        TokenStatus::ReauthRequired,
        TokenStatus::Disabled,
    ];

    fn refreshed() -> Event {
        Event::Refreshed {
            lifetime: HOUR,
            delegated: true,
            expiry_check_at: None,
        }
    }

    fn failed(failure: Failure, retry_after: Option<u64>) -> Event {
        Event::Failed {
            failure,
            error: err("http_503"),
            retry_after: retry_after.map(Duration::from_secs),
        }
    }

    /// The transition table: every event from every state, the resulting status and the
    /// alert. (Schedules and the remaining fields are checked per event below.)
    #[test]
    fn transition_table() {
        use Alert::*;
        use TokenStatus::*;
        type Row = (&'static str, fn() -> Event, [(TokenStatus, Alert); 6]);
        // Columns: from NOT_RETRIEVED, CONSENT_PENDING, ACTIVE, REFRESH_FAILING,
        // REAUTH_REQUIRED, DISABLED.
        #[rustfmt::skip]
        let table: [Row; 11] = [
            ("refreshed", refreshed, [
                (Active, ResolveReauth), (Active, ResolveReauth), (Active, None),
                (Active, ResolveReauth), (Active, ResolveReauth), (Active, ResolveReauth),
            ]),
            ("resource minted", || Event::ResourceMinted, [
                (NotRetrieved, None), (ConsentPending, None), (Active, None),
                (Active, None), (ReauthRequired, None), (Disabled, None),
            ]),
            ("dead grant", || failed(Failure::DeadGrant, Option::None), [
                (ReauthRequired, RaiseReauth), (ReauthRequired, RaiseReauth),
                (ReauthRequired, RaiseReauth), (ReauthRequired, RaiseReauth),
                (ReauthRequired, None), (ReauthRequired, RaiseReauth),
            ]),
            ("transient", || failed(Failure::Transient, Some(120)), [
                (RefreshFailing, None), (RefreshFailing, None), (RefreshFailing, None),
                (RefreshFailing, None), (RefreshFailing, None), (RefreshFailing, None),
            ]),
            ("misconfigured", || failed(Failure::Misconfigured, Option::None), [
                (RefreshFailing, None), (RefreshFailing, None), (RefreshFailing, None),
                (RefreshFailing, None), (RefreshFailing, None), (RefreshFailing, None),
            ]),
            ("held", || Event::Held { error: err("http_503"), next_probe: t0() + Duration::from_secs(5) }, [
                (RefreshFailing, None), (RefreshFailing, None), (RefreshFailing, None),
                (RefreshFailing, None), (RefreshFailing, None), (RefreshFailing, None),
            ]),
            ("deleted", || Event::Deleted { note: Option::None }, [
                (NotRetrieved, None), (NotRetrieved, None), (NotRetrieved, None),
                (NotRetrieved, None), (NotRetrieved, None), (NotRetrieved, None),
            ]),
            ("idle deleted", || Event::IdleDeleted { note: err("idle_deleted") }, [
                (NotRetrieved, None), (NotRetrieved, None), (NotRetrieved, None),
                (NotRetrieved, None), (NotRetrieved, None), (NotRetrieved, None),
            ]),
            ("consent started", || Event::ConsentStarted, [
                (ConsentPending, None), (ConsentPending, None), (ConsentPending, None),
                (ConsentPending, None), (ConsentPending, None), (ConsentPending, None),
            ]),
            ("consent completed", || Event::ConsentCompleted { lifetime: HOUR, delegated: true, first_refresh_within: DAY }, [
                (Active, None), (Active, None), (Active, None),
                (Active, None), (Active, None), (Active, None),
            ]),
            ("consent failed, earlier grant", || Event::ConsentFailed { error: err("declined"), had_grant: true }, [
                (ReauthRequired, RaiseReauth), (ReauthRequired, RaiseReauth),
                (ReauthRequired, RaiseReauth), (ReauthRequired, RaiseReauth),
                (ReauthRequired, RaiseReauth), (ReauthRequired, RaiseReauth),
            ]),
        ];
        for (name, event, row) in table {
            for (from, (to, alert)) in ALL.iter().zip(row) {
                let (next, effects) = transition(&in_state(*from), event(), &cx());
                assert_eq!(next.status, to, "{name} from {from:?}");
                assert_eq!(effects.alert, alert, "{name} from {from:?}");
            }
        }
        // Without an earlier grant a failed consent is NOT_RETRIEVED, no alert.
        let (next, effects) = transition(
            &in_state(ConsentPending),
            Event::ConsentFailed {
                error: err("declined"),
                had_grant: false,
            },
            &cx(),
        );
        assert_eq!((next.status, effects.alert), (NotRetrieved, None));
    }

    #[test]
    fn a_refresh_resets_failures_and_schedules_at_three_quarters() {
        let (next, effects) =
            transition(&in_state(TokenStatus::RefreshFailing), refreshed(), &cx());
        assert_eq!(next.consecutive_failures, 0);
        assert_eq!(next.last_error, None);
        assert_eq!(next.retry_not_before, None);
        assert_eq!(next.last_refresh, Some(t0()));
        assert_eq!(next.access_token_expires, Some(t0() + HOUR));
        assert_eq!(next.next_refresh, Some(t0() + HOUR.mul_f64(0.75)));
        assert_eq!(effects.schedule, Schedule::At(t0() + HOUR.mul_f64(0.75)));
        assert!(effects.check_expiry);
        // A refresh token nearing its expiry alert brings the next look forward.
        let check = t0() + Duration::from_secs(60);
        let (next, effects) = transition(
            &in_state(TokenStatus::Active),
            Event::Refreshed {
                lifetime: HOUR,
                delegated: true,
                expiry_check_at: Some(check),
            },
            &cx(),
        );
        assert_eq!(next.next_refresh, Some(check));
        assert_eq!(effects.schedule, Schedule::At(check));
    }

    #[test]
    fn failures_back_off_honour_retry_after_and_dead_grants_leave_the_schedule() {
        let active = in_state(TokenStatus::Active);
        let (next, effects) = transition(&active, failed(Failure::Transient, Option::None), &cx());
        assert_eq!(next.consecutive_failures, 1);
        assert_eq!(next.next_refresh, Some(t0() + Duration::from_secs(30)));
        assert_eq!(
            effects.schedule,
            Schedule::At(t0() + Duration::from_secs(30))
        );
        assert_eq!(next.retry_not_before, None);
        assert_eq!(
            next.access_token_expires, active.access_token_expires,
            "last token kept"
        );
        // The backoff doubles; Retry-After is a floor and remembered for on-demand attempts.
        let (next, _) = transition(&next, failed(Failure::Transient, Some(600)), &cx());
        assert_eq!(next.consecutive_failures, 2);
        assert_eq!(next.next_refresh, Some(t0() + Duration::from_secs(600)));
        assert_eq!(next.retry_not_before, Some(t0() + Duration::from_secs(600)));
        let (next, _) = transition(&next, failed(Failure::Misconfigured, Option::None), &cx());
        assert_eq!(next.next_refresh, Some(t0() + Duration::from_secs(120)));
        // Dead: off the schedule, the error kept, counted.
        let (dead, effects) = transition(&next, failed(Failure::DeadGrant, Option::None), &cx());
        assert_eq!(dead.next_refresh, None);
        assert_eq!(effects.schedule, Schedule::Remove);
        assert_eq!(dead.consecutive_failures, 4);
        assert_eq!(dead.last_error.as_ref().unwrap().code, "http_503");
    }

    #[test]
    fn held_grants_keep_their_count_and_wait_for_the_probe_at_least() {
        let failing = in_state(TokenStatus::RefreshFailing);
        let probe = t0() + Duration::from_secs(5);
        let (next, effects) = transition(
            &failing,
            Event::Held {
                error: err("http_503"),
                next_probe: probe,
            },
            &cx(),
        );
        assert_eq!(next.consecutive_failures, 3, "no attempt was made");
        // Fallback: the backoff for the failures so far, never before the next probe.
        assert_eq!(next.next_refresh, Some(t0() + Duration::from_secs(120)));
        assert_eq!(
            effects.schedule,
            Schedule::At(t0() + Duration::from_secs(120))
        );
        let far = t0() + Duration::from_secs(3600);
        let (next, _) = transition(
            &failing,
            Event::Held {
                error: err("http_429"),
                next_probe: far,
            },
            &cx(),
        );
        assert_eq!(next.next_refresh, Some(far), "a long Retry-After holds");
        assert_eq!(next.retry_not_before, failing.retry_not_before);
    }

    #[test]
    fn deletions_wipe_and_unschedule_and_idle_ones_are_audited() {
        for from in ALL {
            let (next, effects) = transition(
                &in_state(from),
                Event::Deleted { note: Option::None },
                &cx(),
            );
            assert_eq!(next, Lifecycle::default());
            assert_eq!(effects.schedule, Schedule::Remove);
            assert_eq!(effects.audit, Option::None);
            let (next, effects) = transition(
                &in_state(from),
                Event::IdleDeleted {
                    note: err("idle_deleted"),
                },
                &cx(),
            );
            assert_eq!(next.last_error.unwrap().code, "idle_deleted");
            assert_eq!(next.next_refresh, Option::None);
            assert_eq!(effects.schedule, Schedule::Remove);
            assert_eq!(effects.audit, Some(IDLE_DELETE_ACTION));
        }
    }

    #[test]
    fn consents_start_and_complete() {
        let (pending, effects) = transition(
            &in_state(TokenStatus::ReauthRequired),
            Event::ConsentStarted,
            &cx(),
        );
        assert_eq!(pending.last_error, None);
        assert_eq!(pending.consecutive_failures, 0);
        // A re-consent does not take the earlier token (or its schedule) away.
        assert_eq!(
            pending.access_token_expires,
            Some(t0() + Duration::from_secs(60))
        );
        assert_eq!(effects.schedule, Schedule::Keep);
        let (active, effects) = transition(
            &pending,
            Event::ConsentCompleted {
                lifetime: 7 * DAY,
                delegated: true,
                first_refresh_within: DAY,
            },
            &cx(),
        );
        assert_eq!(active.access_token_expires, Some(t0() + 7 * DAY));
        let at = active.next_refresh.unwrap();
        assert!(at <= t0() + DAY, "{at}");
        assert_eq!(effects.schedule, Schedule::At(at));
    }

    #[test]
    fn failure_kinds_follow_the_provider_error_class() {
        assert_eq!(Failure::of(ErrorClass::GrantDead), Failure::DeadGrant);
        assert_eq!(Failure::of(ErrorClass::Declined), Failure::DeadGrant);
        assert_eq!(Failure::of(ErrorClass::Expired), Failure::DeadGrant);
        assert_eq!(Failure::of(ErrorClass::Transient), Failure::Transient);
        for class in [
            ErrorClass::AppMisconfigured,
            ErrorClass::InvalidRequest,
            ErrorClass::Pending,
            ErrorClass::SlowDown,
        ] {
            assert_eq!(Failure::of(class), Failure::Misconfigured, "{class}");
        }
    }
}
