//! Reading fleet records written before the fleet moved into the core: those kept the agents'
//! wire messages (`tokenfleet.v1.DeviceStatus`, `AgentCommand`, `CommandResult`) as base64 of
//! their protobuf encoding inside the JSON record. Records written now hold the domain types as
//! JSON ([`super::store`]); this module only reads the old form, so a device whose agent has not
//! reported since the upgrade still shows its last report, and a command or answer queued by a
//! replica of the previous version is still understood.
//!
//! Written by hand, not with `prost`: this crate has no transport or wire-format dependency (see
//! the crate header and its `core_is_transport_free` test), and reading the fixed, known set of
//! fields of three messages takes a field iterator of some 50 lines. The field numbers below are
//! those of `proto/tokenfleet/v1/fleet.proto` and `types.proto`; the broker's
//! `fleet::wire::tests` encode messages with `prost` and check that this reader gives what the
//! edge's conversion gives.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use time::OffsetDateTime;
use tokenfleet_domain::{MailPurpose, TokenStatus};

use super::model::{
    AgentCommand, CertificateInfo, Command, CommandResult, ConnectionTarget, ConnectionTestCommand,
    ConnectionTestResult, ConnectionTestStep, ConnectionVerdict, DeliveryResult, DeviceHealth,
    DeviceReport, MailboxTokenView,
};

/// A stored `DeviceStatus` (base64 of its protobuf encoding).
pub fn device_report(text: &str) -> Result<DeviceReport, String> {
    device_status(&bytes_of(text)?)
}

/// A stored `AgentCommand`.
pub fn agent_command(text: &str) -> Result<AgentCommand, String> {
    command(&bytes_of(text)?)
}

/// A stored `CommandResult`.
pub fn command_result(text: &str) -> Result<CommandResult, String> {
    result(&bytes_of(text)?)
}

fn bytes_of(text: &str) -> Result<Vec<u8>, String> {
    B64.decode(text)
        .map_err(|e| format!("stored message is not base64: {e}"))
}

// ---------------------------------------------------------------------------------------------
// The wire format: a sequence of (tag, value); tag = field number << 3 | wire type.

#[derive(Debug, Clone, Copy)]
enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    /// fixed32/fixed64: no field read here has one, so only skipped.
    Fixed,
}

fn varint(buf: &mut &[u8]) -> Result<u64, String> {
    let mut value = 0u64;
    for shift in (0..70).step_by(7) {
        let (&byte, rest) = buf
            .split_first()
            .ok_or_else(|| "message ends inside a varint".to_owned())?;
        *buf = rest;
        if shift == 63 && byte > 1 {
            return Err("varint longer than 64 bits".to_owned());
        }
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err("varint longer than 10 bytes".to_owned())
}

fn take<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
    if buf.len() < n {
        return Err("message ends inside a field".to_owned());
    }
    let (head, rest) = buf.split_at(n);
    *buf = rest;
    Ok(head)
}

/// Calls `each` with every field of the message in `buf`.
fn fields<'a>(
    mut buf: &'a [u8],
    mut each: impl FnMut(u64, Value<'a>) -> Result<(), String>,
) -> Result<(), String> {
    while !buf.is_empty() {
        let tag = varint(&mut buf)?;
        let value = match tag & 7 {
            0 => Value::Varint(varint(&mut buf)?),
            1 => {
                take(&mut buf, 8)?;
                Value::Fixed
            }
            2 => {
                let len = usize::try_from(varint(&mut buf)?)
                    .map_err(|_| "field length out of range".to_owned())?;
                Value::Bytes(take(&mut buf, len)?)
            }
            5 => {
                take(&mut buf, 4)?;
                Value::Fixed
            }
            other => return Err(format!("unsupported wire type {other}")),
        };
        each(tag >> 3, value)?;
    }
    Ok(())
}

fn int(value: Value<'_>) -> Result<u64, String> {
    match value {
        Value::Varint(v) => Ok(v),
        _ => Err("expected a varint".to_owned()),
    }
}

/// `int32`/enum fields: negative numbers are sign-extended to 64 bits on the wire.
fn int32(value: Value<'_>) -> Result<i32, String> {
    #[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]
    Ok(int(value)? as i64 as i32)
}

fn uint32(value: Value<'_>) -> Result<u32, String> {
    #[allow(clippy::cast_possible_truncation)]
    Ok(int(value)? as u32)
}

fn bytes<'a>(value: Value<'a>) -> Result<&'a [u8], String> {
    match value {
        Value::Bytes(b) => Ok(b),
        _ => Err("expected a length-delimited field".to_owned()),
    }
}

fn string(value: Value<'_>) -> Result<String, String> {
    String::from_utf8(bytes(value)?.to_vec()).map_err(|_| "a string is not UTF-8".to_owned())
}

/// `google.protobuf.Timestamp`; `None` when out of the range a record can hold.
fn timestamp(value: Value<'_>) -> Result<Option<OffsetDateTime>, String> {
    let (mut seconds, mut nanos) = (0i64, 0i32);
    fields(bytes(value)?, |n, v| {
        match n {
            #[allow(clippy::cast_possible_wrap)]
            1 => seconds = int(v)? as i64,
            2 => nanos = int32(v)?,
            _ => {}
        }
        Ok(())
    })?;
    Ok(timestamp_of(seconds, nanos))
}

/// A wire timestamp as a record holds it: `None` when out of range (years 1-9999, the range of
/// RFC 3339 text) or with nanoseconds outside 0-999,999,999.
pub fn timestamp_of(seconds: i64, nanos: i32) -> Option<OffsetDateTime> {
    let nanos = u32::try_from(nanos).ok().filter(|n| *n < 1_000_000_000)?;
    let t = OffsetDateTime::from_unix_timestamp(seconds)
        .ok()?
        .replace_nanosecond(nanos)
        .ok()?;
    (1..=9999).contains(&t.year()).then_some(t)
}

// ---------------------------------------------------------------------------------------------
// Enumerations by wire number.

/// `DeviceHealth` by wire number (unknown: UNSPECIFIED).
pub fn health_of(n: i32) -> DeviceHealth {
    match n {
        1 => DeviceHealth::Ok,
        2 => DeviceHealth::Degraded,
        3 => DeviceHealth::Failing,
        4 => DeviceHealth::Unknown,
        _ => DeviceHealth::Unspecified,
    }
}

fn token_status_of(n: i32) -> Option<TokenStatus> {
    match n {
        1 => Some(TokenStatus::NotRetrieved),
        2 => Some(TokenStatus::ConsentPending),
        3 => Some(TokenStatus::Active),
        4 => Some(TokenStatus::RefreshFailing),
        5 => Some(TokenStatus::ReauthRequired),
        6 => Some(TokenStatus::Disabled),
        _ => None,
    }
}

fn purpose_of(n: i32) -> Option<MailPurpose> {
    match n {
        1 => Some(MailPurpose::Send),
        2 => Some(MailPurpose::Pop),
        3 => Some(MailPurpose::Imap),
        _ => None,
    }
}

fn target_of(n: i32) -> ConnectionTarget {
    match n {
        1 => ConnectionTarget::Send,
        2 => ConnectionTarget::Fetch,
        _ => ConnectionTarget::Unspecified,
    }
}

fn verdict_of(n: i32) -> ConnectionVerdict {
    usize::try_from(n)
        .ok()
        .and_then(|i| ConnectionVerdict::ALL.get(i).copied())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Messages.

fn device_status(buf: &[u8]) -> Result<DeviceReport, String> {
    let mut out = DeviceReport::default();
    fields(buf, |n, v| {
        match n {
            1 => out.device = string(v)?,
            2 => out.health = health_of(int32(v)?),
            3 => out.problem = string(v)?,
            4 => out.tokens.push(token_view(bytes(v)?)?),
            5 => out.last_delivery = Some(delivery(bytes(v)?)?),
            6 => out.queue_depth = uint32(v)?,
            7 => out.oldest_queued_seconds = int(v)?,
            8 => out.delivered_total = int(v)?,
            9 => out.failed_total = int(v)?,
            10 => out.dead_lettered_total = int(v)?,
            11 => out.duplicates_total = int(v)?,
            12 => out.last_connection_test = Some(test_result(bytes(v)?)?),
            13 => out.fetched_total = int(v)?,
            14 => out.maildrop_depth = uint32(v)?,
            _ => {}
        }
        Ok(())
    })?;
    Ok(out)
}

fn token_view(buf: &[u8]) -> Result<MailboxTokenView, String> {
    let mut out = MailboxTokenView::default();
    fields(buf, |n, v| {
        match n {
            1 => out.mailbox = string(v)?,
            2 => out.status = token_status_of(int32(v)?),
            3 => out.expire_time = timestamp(v)?,
            4 => out.error = string(v)?,
            5 => out.purpose = purpose_of(int32(v)?),
            _ => {}
        }
        Ok(())
    })?;
    Ok(out)
}

fn delivery(buf: &[u8]) -> Result<DeliveryResult, String> {
    let mut out = DeliveryResult::default();
    fields(buf, |n, v| {
        match n {
            1 => out.time = timestamp(v)?,
            2 => out.ok = int(v)? != 0,
            3 => out.final_reply = string(v)?,
            4 => out.auth_challenge_json = string(v)?,
            5 => out.message_id = string(v)?,
            6 => out.outcome = string(v)?,
            7 => out.mailbox = string(v)?,
            _ => {}
        }
        Ok(())
    })?;
    Ok(out)
}

fn test_result(buf: &[u8]) -> Result<ConnectionTestResult, String> {
    let mut out = ConnectionTestResult::default();
    fields(buf, |n, v| {
        match n {
            1 => out.device = string(v)?,
            2 => out.target = target_of(int32(v)?),
            3 => out.verdict = verdict_of(int32(v)?),
            4 => out.summary = string(v)?,
            5 => out.fix = string(v)?,
            6 => out.steps.push(step(bytes(v)?)?),
            7 => out.certificate = Some(certificate(bytes(v)?)?),
            8 => out.time = timestamp(v)?,
            9 => out.endpoint = string(v)?,
            _ => {}
        }
        Ok(())
    })?;
    Ok(out)
}

fn step(buf: &[u8]) -> Result<ConnectionTestStep, String> {
    let mut out = ConnectionTestStep::default();
    fields(buf, |n, v| {
        match n {
            1 => out.name = string(v)?,
            2 => out.ok = int(v)? != 0,
            3 => out.detail = string(v)?,
            4 => out.duration_ms = uint32(v)?,
            _ => {}
        }
        Ok(())
    })?;
    Ok(out)
}

fn certificate(buf: &[u8]) -> Result<CertificateInfo, String> {
    let mut out = CertificateInfo::default();
    fields(buf, |n, v| {
        match n {
            1 => out.subject = string(v)?,
            2 => out.issuer = string(v)?,
            3 => out.dns_names.push(string(v)?),
            4 => out.not_before = timestamp(v)?,
            5 => out.not_after = timestamp(v)?,
            6 => out.sha256_fingerprint = string(v)?,
            7 => out.tls_version = string(v)?,
            8 => out.cipher_suite = string(v)?,
            _ => {}
        }
        Ok(())
    })?;
    Ok(out)
}

fn command(buf: &[u8]) -> Result<AgentCommand, String> {
    let mut out = AgentCommand::default();
    fields(buf, |n, v| {
        match n {
            1 => out.id = string(v)?,
            2 => {
                bytes(v)?;
                out.command = Some(Command::ReloadConfig);
            }
            3 => {
                let mut mailbox = String::new();
                fields(bytes(v)?, |n, v| {
                    if n == 1 {
                        mailbox = string(v)?;
                    }
                    Ok(())
                })?;
                out.command = Some(Command::DropToken { mailbox });
            }
            4 => {
                let mut test = ConnectionTestCommand::default();
                fields(bytes(v)?, |n, v| {
                    match n {
                        1 => test.device = string(v)?,
                        2 => test.target = target_of(int32(v)?),
                        3 => test.timeout_seconds = uint32(v)?,
                        _ => {}
                    }
                    Ok(())
                })?;
                out.command = Some(Command::TestConnection(test));
            }
            _ => {}
        }
        Ok(())
    })?;
    Ok(out)
}

fn result(buf: &[u8]) -> Result<CommandResult, String> {
    let mut out = CommandResult::default();
    fields(buf, |n, v| {
        match n {
            1 => out.command_id = string(v)?,
            2 => out.ok = int(v)? != 0,
            3 => out.detail = string(v)?,
            4 => out.connection_test = Some(test_result(bytes(v)?)?),
            _ => {}
        }
        Ok(())
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_encoded_messages_read_and_bad_bytes_do_not() {
        // DeviceStatus { device: "mfp" (1), health: FAILING (2), queue_depth: 300 (6),
        // tokens: [{ mailbox: "s" (1), status: ACTIVE (2) }] (4) }
        let bytes = [
            0x0a, 3, b'm', b'f', b'p', 0x10, 3, 0x30, 0xac, 0x02, 0x22, 5, 0x0a, 1, b's', 0x10, 3,
        ];
        let report = device_report(&B64.encode(bytes)).unwrap();
        assert_eq!(report.device, "mfp");
        assert_eq!(report.health, DeviceHealth::Failing);
        assert_eq!(report.queue_depth, 300);
        assert_eq!(report.tokens[0].mailbox, "s");
        assert_eq!(report.tokens[0].status, Some(TokenStatus::Active));
        assert!(device_report("%%%").is_err());
        // A length running past the end, and a varint that never ends.
        assert!(device_report(&B64.encode([0x0a, 9, b'm'])).is_err());
        assert!(device_report(&B64.encode([0x30, 0xff, 0xff])).is_err());
        // An empty message is the default one, as in protobuf.
        assert_eq!(device_report("").unwrap(), DeviceReport::default());
    }

    #[test]
    fn timestamps_out_of_range_are_none() {
        assert_eq!(timestamp_of(0, 0), Some(OffsetDateTime::UNIX_EPOCH));
        assert_eq!(timestamp_of(0, -1), None);
        assert_eq!(timestamp_of(0, 1_000_000_000), None);
        assert_eq!(timestamp_of(i64::MAX, 0), None);
        assert_eq!(timestamp_of(300_000_000_000, 0), None);
    }
}
