//! Members and due times of the store's schedules (`due` sorted sets): the refresh schedule, the
//! consent poller's and the alert outbox all name a mailbox as `<tenant>/<mailbox>` and order by
//! Unix milliseconds. A leaf: the token lifecycle and alerts both use it without importing each
//! other.

use time::OffsetDateTime;

/// Splits a schedule member into tenant and mailbox.
pub fn parse_member(member: &str) -> Option<(&str, &str)> {
    let (tenant, mailbox) = member.split_once('/')?;
    (!tenant.is_empty() && !mailbox.is_empty() && !mailbox.contains('/'))
        .then_some((tenant, mailbox))
}

/// Unix milliseconds of `t`, clamped to what a schedule holds.
pub fn unix_ms(t: OffsetDateTime) -> i64 {
    let ms = t.unix_timestamp_nanos() / 1_000_000;
    let max = i128::from(tokenfleet_store::MAX_DUE_MS);
    // Clamped to ±2^53, so the conversion cannot fail.
    i64::try_from(ms.clamp(-max, max)).unwrap_or_default()
}
