//! The audit log: JSON [`AuditEvent`]s in bounded streams, three per scope, one per [`AuditKind`]:
//!
//! - `audit` — **changes**: what took effect (admin changes, certificates issued, consents, ...);
//! - `audit_refused` — **refused** attempts and failed calls (any result but `ok`);
//! - `audit_issuance` — **issuance**: access tokens handed to agents (`token.issue`, any result).
//!
//! Each kind has its own retention ([`AuditRetention`], the `[audit]` configuration section): a
//! count bound and an age bound. So a flood of refused calls or of issuances can evict only older
//! refusals or issuances, never a change. Changes to a tenant's objects go to that tenant's
//! streams; tenant records, fleet-wide API keys, and attempts a caller was not allowed to make in
//! a tenant go to the global ones.
//!
//! The change an event describes has already happened when the event is written, so a failed
//! audit write cannot undo it; it is logged at error level instead of being dropped silently.
//!
//! Reading the log is the operation [`list_events`] (authorized: a tenant's streams for whoever
//! may read the tenant, the global ones for fleet admins), one page of the kinds asked for
//! merged newest first.

use std::sync::RwLock;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use tokenfleet_domain::AuditEvent;
use tokenfleet_store::{RecordKey, Scope, StoreError, StoreResult};

use crate::authz::{Principal, Target};
use crate::ops::Error;
use crate::ops::change::{Change, authorize_read};
use crate::ops::names::{shown, span_object};
use crate::ops::paging::page_request;
use crate::state::BrokerState;

/// Name of the changes stream in every scope.
pub const STREAM: &str = "audit";
/// Name of the refused-attempts stream in every scope.
pub const REFUSED_STREAM: &str = "audit_refused";
/// Name of the issuance stream in every scope.
pub const ISSUANCE_STREAM: &str = "audit_issuance";
/// Default count bound of the changes stream (per scope).
pub const MAX_LEN: usize = 100_000;
/// The most characters an audit record's detail keeps ([`detail`]).
pub const DETAIL_CHARS: usize = 300;

/// `text` as an audit record's detail: its first [`DETAIL_CHARS`] characters (cut in place; a
/// text that short in bytes is returned as it is).
pub fn detail(mut text: String) -> String {
    if text.len() > DETAIL_CHARS
        && let Some((cut, _)) = text.char_indices().nth(DETAIL_CHARS)
    {
        text.truncate(cut);
    }
    text
}

/// Audit action of a token issuance (see `tokens::issue`).
const ISSUE_ACTION: &str = "token.issue";

/// Which stream an event belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AuditKind {
    /// Admin changes and other state changes that took effect.
    Changes,
    /// Refused or failed attempts.
    Refused,
    /// Access tokens issued to agents (and refused issuances).
    Issuance,
}

impl AuditKind {
    /// Every kind, in the order page tokens list them.
    pub const ALL: [AuditKind; 3] = [Self::Changes, Self::Refused, Self::Issuance];

    /// The kind of `event`: issuances by action, then anything not `ok` is a refusal.
    pub fn of(event: &AuditEvent) -> Self {
        if event.action == ISSUE_ACTION {
            Self::Issuance
        } else if event.result != "ok" {
            Self::Refused
        } else {
            Self::Changes
        }
    }

    /// The stream the kind is kept in.
    pub fn stream(self) -> &'static str {
        match self {
            Self::Changes => STREAM,
            Self::Refused => REFUSED_STREAM,
            Self::Issuance => ISSUANCE_STREAM,
        }
    }

    /// Name in the API and CLI (`changes`, `refused`, `issuance`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Changes => "changes",
            Self::Refused => "refused",
            Self::Issuance => "issuance",
        }
    }

    /// Parses a name; `None` for an unknown one.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(text.trim()))
    }
}

/// How much of one kind's stream is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Newest entries kept per scope (at least 1).
    pub max_entries: usize,
    /// Entries older than this are removed; `None` = no age bound.
    pub max_age: Option<Duration>,
}

/// Retention of every kind (the validated `[audit]` configuration section).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditRetention {
    /// Changes (`audit`).
    pub changes: Retention,
    /// Refused attempts (`audit_refused`).
    pub refused: Retention,
    /// Issuances (`audit_issuance`).
    pub issuance: Retention,
}

const DAY: u64 = 86_400;

impl AuditRetention {
    /// The documented defaults: changes 100,000 per scope and no age bound; refusals 10,000 and
    /// 30 days; issuances 100,000 and 90 days.
    pub const DEFAULT: Self = Self {
        changes: Retention {
            max_entries: MAX_LEN,
            max_age: None,
        },
        refused: Retention {
            max_entries: 10_000,
            max_age: Some(Duration::from_secs(30 * DAY)),
        },
        issuance: Retention {
            max_entries: 100_000,
            max_age: Some(Duration::from_secs(90 * DAY)),
        },
    };

    /// The retention of `kind`.
    pub fn of(&self, kind: AuditKind) -> Retention {
        match kind {
            AuditKind::Changes => self.changes,
            AuditKind::Refused => self.refused,
            AuditKind::Issuance => self.issuance,
        }
    }
}

impl Default for AuditRetention {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// The retention this process applies. Every component that audits (admin API, token issuance,
/// agents' calls, the scheduler) writes through [`record`] with only the shared [`BrokerState`],
/// so the setting is process-wide, set once from the configuration when the broker builds its
/// state ([`configure`]); one broker runs per process.
static RETENTION: RwLock<AuditRetention> = RwLock::new(AuditRetention::DEFAULT);

/// Sets the retention of every later append.
pub fn configure(retention: AuditRetention) {
    match RETENTION.write() {
        Ok(mut r) => *r = retention,
        Err(poisoned) => *poisoned.into_inner() = retention,
    }
}

/// The retention in force.
pub fn retention() -> AuditRetention {
    match RETENTION.read() {
        Ok(r) => *r,
        Err(poisoned) => *poisoned.into_inner(),
    }
}

/// Appends `event` to the stream of its kind in `scope` and applies that kind's retention;
/// returns the entry id.
pub async fn append(state: &BrokerState, scope: &Scope, event: &AuditEvent) -> StoreResult<String> {
    let kind = AuditKind::of(event);
    let data = serde_json::to_vec(event).map_err(|e| StoreError::Corrupt {
        key: format!("{scope}/{}", kind.stream()),
        problem: format!("cannot encode audit event: {e}"),
    })?;
    let keep = retention().of(kind);
    let id = state
        .store
        .append(scope, kind.stream(), data, keep.max_entries.max(1))
        .await?;
    if let Some(age) = keep.max_age
        && age_trim_due(scope, kind, age)
    {
        // Stream ids carry the wall-clock append time (the store's, not the injected clock's).
        let now_ms = u64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0),
        )
        .unwrap_or(u64::MAX);
        let cut = now_ms.saturating_sub(u64::try_from(age.as_millis()).unwrap_or(u64::MAX));
        state.store.trim_stream(scope, kind.stream(), cut).await?;
    }
    Ok(id)
}

/// How often one process trims a stream by age at most: a tenth of the age bound, and at least once
/// a minute. Ages are days, so a minute late costs nothing, while trimming on every append doubled
/// the store calls of each token issuance.
fn age_trim_every(age: std::time::Duration) -> std::time::Duration {
    (age / 10).min(std::time::Duration::from_secs(60))
}

/// Whether the stream of `kind` in `scope` is due for its age trim (and marks it done). The table
/// is bounded: past [`AGE_TRIM_TABLE_MAX`] scopes it starts afresh, which only trims early.
fn age_trim_due(scope: &Scope, kind: AuditKind, age: std::time::Duration) -> bool {
    /// Per scope, each kind's last trim (looked up by the caller's scope: no key is built per
    /// append, which is every token issuance).
    type LastTrims =
        std::collections::HashMap<Scope, [Option<std::time::Instant>; AuditKind::ALL.len()]>;
    static LAST_TRIM: std::sync::Mutex<Option<LastTrims>> = std::sync::Mutex::new(None);
    let now = std::time::Instant::now();
    let mut table = match LAST_TRIM.lock() {
        Ok(t) => t,
        Err(poisoned) => poisoned.into_inner(),
    };
    let table = table.get_or_insert_with(Default::default);
    let slot = AuditKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
    if let Some(last) = table.get(scope).and_then(|kinds| kinds[slot])
        && now.duration_since(last) < age_trim_every(age)
    {
        return false;
    }
    if table.len() >= AGE_TRIM_TABLE_MAX && !table.contains_key(scope) {
        table.clear();
    }
    table.entry(scope.clone()).or_default()[slot] = Some(now);
    true
}

/// Scopes (tenants) whose last age trim one process remembers.
const AGE_TRIM_TABLE_MAX: usize = 100_000;

/// Appends `event`, logging (at error level) instead of returning a failure.
pub async fn record(state: &BrokerState, scope: &Scope, event: AuditEvent) {
    if let Err(error) = append(state, scope, &event).await {
        tracing::error!(
            %error,
            %scope,
            actor = %event.actor,
            action = %event.action,
            target = %event.target,
            result = %event.result,
            "audit event could not be written; the change itself took effect"
        );
    }
}

/// Up to `limit` events of every kind in `scope`, newest first, with ids below `before`
/// (stream ids grow with time in every stream, so one id bounds them all).
pub async fn list(
    state: &BrokerState,
    scope: &Scope,
    before: Option<&str>,
    limit: usize,
) -> StoreResult<Vec<(String, AuditEvent)>> {
    let mut all = Vec::new();
    for kind in AuditKind::ALL {
        all.extend(list_kind(state, scope, kind, before, limit).await?);
    }
    all.sort_by(|a, b| b.0.cmp(&a.0));
    all.truncate(limit);
    Ok(all)
}

/// Up to `limit` events of one kind's stream, newest first, older than the entry `before`.
pub async fn list_kind(
    state: &BrokerState,
    scope: &Scope,
    kind: AuditKind,
    before: Option<&str>,
    limit: usize,
) -> StoreResult<Vec<(String, AuditEvent)>> {
    let stream = kind.stream();
    let entries = state.store.read_back(scope, stream, before, limit).await?;
    entries
        .into_iter()
        .map(|entry| {
            let event = serde_json::from_slice(&entry.data).map_err(|e| StoreError::Corrupt {
                key: RecordKey {
                    scope: scope.clone(),
                    collection: stream,
                    id: entry.id.clone(),
                }
                .to_string(),
                problem: format!("not a valid audit event: {e}"),
            })?;
            Ok((entry.id, event))
        })
        .collect()
}

/// Where a listing over several kinds stands: per kind, the id of the last entry returned
/// (`None` = start from the newest), or `Done` when that stream is exhausted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor(Vec<(AuditKind, Position)>);

/// Position in one kind's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Position {
    /// From the newest entry.
    Start,
    /// Older than this id.
    Before(String),
    /// Nothing left.
    Done,
}

impl Cursor {
    /// The start of a listing over `kinds`.
    pub fn start(kinds: &[AuditKind]) -> Self {
        Self(kinds.iter().map(|k| (*k, Position::Start)).collect())
    }

    /// The opaque page token.
    pub fn token(&self) -> String {
        let text: Vec<String> = self
            .0
            .iter()
            .map(|(k, p)| match p {
                Position::Start => format!("{}=", k.as_str()),
                Position::Before(id) => format!("{}={id}", k.as_str()),
                Position::Done => format!("{}=-", k.as_str()),
            })
            .collect();
        B64URL.encode(text.join(";"))
    }

    /// Decodes a page token made for `kinds`; `None` when it is malformed or for other kinds.
    pub fn parse(token: &str, kinds: &[AuditKind]) -> Option<Self> {
        let text = String::from_utf8(B64URL.decode(token).ok()?).ok()?;
        let mut out = Vec::new();
        for part in text.split(';') {
            let (kind, pos) = part.split_once('=')?;
            let kind = AuditKind::parse(kind)?;
            let pos = match pos {
                "" => Position::Start,
                "-" => Position::Done,
                id if id.len() <= 64 && id.bytes().all(|b| b.is_ascii_digit() || b == b'-') => {
                    Position::Before(id.to_owned())
                }
                _ => return None,
            };
            out.push((kind, pos));
        }
        let listed: Vec<AuditKind> = out.iter().map(|(k, _)| *k).collect();
        (listed == kinds).then_some(Self(out))
    }
}

/// One page of events of several kinds merged newest first (by stream id, which grows with the
/// append time in every backend), with the cursor of the next page (`None` at the end).
pub async fn list_merged(
    state: &BrokerState,
    scope: &Scope,
    cursor: &Cursor,
    limit: usize,
) -> StoreResult<(Vec<(String, AuditEvent)>, Option<Cursor>)> {
    let mut candidates: Vec<(String, AuditKind, AuditEvent)> = Vec::new();
    let mut read: Vec<(AuditKind, usize)> = Vec::new();
    for (kind, pos) in &cursor.0 {
        let before = match pos {
            Position::Done => continue,
            Position::Start => None,
            Position::Before(id) => Some(id.as_str()),
        };
        let page = list_kind(state, scope, *kind, before, limit + 1).await?;
        read.push((*kind, page.len()));
        candidates.extend(page.into_iter().map(|(id, e)| (id, *kind, e)));
    }
    candidates.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let more = candidates.len() > limit;
    candidates.truncate(limit);
    let mut next = cursor.clone();
    for (kind, pos) in &mut next.0 {
        let taken: Vec<&String> = candidates
            .iter()
            .filter(|(_, k, _)| k == kind)
            .map(|(id, _, _)| id)
            .collect();
        let read_here = read.iter().find(|(k, _)| k == kind).map_or(0, |(_, n)| *n);
        // Everything this stream had left was read (no more than `limit`) and returned.
        if read_here <= limit && taken.len() == read_here {
            *pos = Position::Done;
        } else if let Some(last) = taken.last() {
            *pos = Position::Before((*last).clone());
        }
    }
    let events = candidates.into_iter().map(|(id, _, e)| (id, e)).collect();
    Ok((events, more.then_some(next)))
}

// ---------------------------------------------------------------------------------------------
// The operation: reading the log

/// What a caller asks of the audit log (the Admin API's `ListAuditEvents`, the console's audit
/// page and mailbox history).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditQuery {
    /// The tenant whose streams to read; empty: the global streams (fleet admins only).
    pub tenant: String,
    /// `changes`, `refused`, `issuance`, or empty / `all` for every kind merged.
    pub kind: String,
    /// Events per page (0: the default, at most [`crate::ops::paging::MAX_PAGE_SIZE`]).
    pub page_size: i32,
    /// The `next_page_token` of the previous page, unchanged; empty: the newest events.
    pub page_token: String,
}

/// One page of the audit log, newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditPage {
    /// Stream id and event.
    pub events: Vec<(String, AuditEvent)>,
    /// The token of the next page; empty at the end.
    pub next_page_token: String,
}

/// `principal` reads one page of the audit log: a tenant's streams need read access to the
/// tenant, the global ones are for fleet admins only ([`Target::GlobalAudit`]).
pub async fn list_events(
    state: &BrokerState,
    principal: &Principal,
    query: &AuditQuery,
) -> Result<AuditPage, Error> {
    let read = || Change::of_collection("audit.list", &query.tenant, "audit");
    let scope = if query.tenant.is_empty() {
        authorize_read(state, principal, read, Target::GlobalAudit).await?;
        Scope::Global
    } else {
        authorize_read(state, principal, read, Target::Tenant(&query.tenant)).await?;
        tokenfleet_domain::name("tenant", &query.tenant)?;
        Scope::Tenant(query.tenant.clone())
    };
    span_object(&query.tenant, "");
    let kind = query.kind.trim();
    let kinds: Vec<AuditKind> = if kind.is_empty() || kind == "all" {
        AuditKind::ALL.to_vec()
    } else {
        vec![AuditKind::parse(&query.kind).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "kind: unknown audit kind `{}` (expected changes, refused, issuance or all)",
                shown(&query.kind)
            ))
        })?]
    };
    // Page tokens are per-kind cursors; only the page size is checked the common way.
    let size = page_request(query.page_size, "")?.size;
    let cursor = if query.page_token.is_empty() {
        Cursor::start(&kinds)
    } else {
        Cursor::parse(&query.page_token, &kinds).ok_or_else(|| {
            Error::InvalidArgument(
                "page_token: malformed (pass `next_page_token` back unchanged, with the same kind)"
                    .to_owned(),
            )
        })?
    };
    let (events, next) = list_merged(state, &scope, &cursor, size).await?;
    Ok(AuditPage {
        events,
        next_page_token: next.map(|c| c.token()).unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A detail keeps its first 300 characters, counted as characters (a multi-byte one is
    /// never cut), and a short one stays as it was.
    #[test]
    fn a_detail_keeps_its_first_300_characters() {
        assert_eq!(detail("short".into()), "short");
        let ascii = "a".repeat(DETAIL_CHARS + 5);
        assert_eq!(detail(ascii.clone()), ascii[..DETAIL_CHARS]);
        let exact = "é".repeat(DETAIL_CHARS);
        assert_eq!(
            detail(exact.clone()),
            exact,
            "300 two-byte characters are kept"
        );
        let long = format!("{exact}ü and more");
        assert_eq!(detail(long), exact);
        let mixed: String = "aé".repeat(DETAIL_CHARS);
        let kept = detail(mixed.clone());
        assert_eq!(kept.chars().count(), DETAIL_CHARS);
        assert!(mixed.starts_with(&kept));
    }

    #[test]
    fn age_trims_run_once_per_period_per_stream() {
        let day = std::time::Duration::from_secs(86_400);
        let scope = Scope::Tenant("age-trim-test".into());
        assert!(
            age_trim_due(&scope, AuditKind::Issuance, day),
            "the first append trims"
        );
        assert!(
            !age_trim_due(&scope, AuditKind::Issuance, day),
            "the next append within the period does not"
        );
        assert!(
            age_trim_due(&scope, AuditKind::Refused, day),
            "another stream of the scope has its own period"
        );
        let short = std::time::Duration::from_millis(200);
        let other = Scope::Tenant("age-trim-short".into());
        assert!(age_trim_due(&other, AuditKind::Refused, short));
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert!(
            age_trim_due(&other, AuditKind::Refused, short),
            "a short age bound trims after a tenth of it"
        );
    }

    fn event(action: &str, result: &str) -> AuditEvent {
        AuditEvent {
            time: time::OffsetDateTime::UNIX_EPOCH,
            actor: "apikey:x".into(),
            action: action.into(),
            target: "t".into(),
            tenant: String::new(),
            result: result.into(),
            detail: String::new(),
        }
    }

    #[test]
    fn events_are_sorted_into_their_kind() {
        assert_eq!(
            AuditKind::of(&event("provider.update", "ok")),
            AuditKind::Changes
        );
        assert_eq!(
            AuditKind::of(&event("provider.update", "permission_denied")),
            AuditKind::Refused
        );
        assert_eq!(
            AuditKind::of(&event("token.issue", "ok")),
            AuditKind::Issuance
        );
        assert_eq!(
            AuditKind::of(&event("token.issue", "permission_denied")),
            AuditKind::Issuance
        );
        for kind in AuditKind::ALL {
            assert_eq!(AuditKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(AuditKind::parse("everything"), None);
    }

    #[test]
    fn cursors_round_trip_and_reject_tampering() {
        let kinds = AuditKind::ALL;
        let cursor = Cursor(vec![
            (
                AuditKind::Changes,
                Position::Before("00000000000000000042".into()),
            ),
            (AuditKind::Refused, Position::Done),
            (AuditKind::Issuance, Position::Start),
        ]);
        assert_eq!(Cursor::parse(&cursor.token(), &kinds), Some(cursor.clone()));
        assert_eq!(Cursor::parse(&cursor.token(), &[AuditKind::Changes]), None);
        for bad in [
            "",
            "!!",
            &B64URL.encode("changes=1 OR 1"),
            &B64URL.encode("nope=1"),
        ] {
            assert_eq!(Cursor::parse(bad, &kinds), None, "{bad}");
        }
        let start = Cursor::start(&[AuditKind::Refused]);
        assert_eq!(
            Cursor::parse(&start.token(), &[AuditKind::Refused]),
            Some(start)
        );
    }
}
