//! The fleet's conversions between the `tokenfleet.v1` wire messages and the core's domain types
//! ([`tokenfleet_core::fleet::model`]), in one place: what the agents send (reports, command
//! answers) is decoded here, what they and the operators receive (configuration, commands, the
//! fleet status, connection-test results) is encoded here. Field for field; a wire enum number
//! this broker does not know reads as UNSPECIFIED, a timestamp a record cannot hold (outside the
//! years 1-9999) as unset.

use prost::Message as _;
use prost_types::Timestamp;
use time::OffsetDateTime;
use tokenfleet_core::fleet::legacy::timestamp_of;
use tokenfleet_core::fleet::model::{
    AgentCommand, AgentConfig, AgentDevice, AgentReport, CertificateInfo, Command, CommandResult,
    ConnectionTarget, ConnectionTestResult, ConnectionTestStep, ConnectionVerdict, DeliveryResult,
    DeviceHealth, DeviceReport, FleetDeviceStatus, FleetMailboxGrant, MailboxRef, MailboxTokenView,
};
use tokenfleet_core::fleet::test_connection::TestRequest;
use tokenfleet_domain::{MailPurpose, TokenStatus, ValidationError};
use tokenfleet_proto::v1 as pb;

use crate::convert;

/// Largest device status kept (base64 of its protobuf encoding, the size it had in the store
/// before the fleet moved into the core); bigger ones are dropped with a warning.
pub const MAX_STATUS_BYTES: usize = 64 * 1024;

// ---------------------------------------------------------------------------------------------
// Scalars and enumerations.

fn time_in(t: Option<&Timestamp>) -> Option<OffsetDateTime> {
    t.and_then(|t| timestamp_of(t.seconds, t.nanos))
}

fn time_out(t: Option<OffsetDateTime>) -> Option<Timestamp> {
    t.map(convert::timestamp)
}

fn health_in(n: i32) -> DeviceHealth {
    match pb::DeviceHealth::try_from(n) {
        Ok(pb::DeviceHealth::Ok) => DeviceHealth::Ok,
        Ok(pb::DeviceHealth::Degraded) => DeviceHealth::Degraded,
        Ok(pb::DeviceHealth::Failing) => DeviceHealth::Failing,
        Ok(pb::DeviceHealth::Unknown) => DeviceHealth::Unknown,
        Ok(pb::DeviceHealth::Unspecified) | Err(_) => DeviceHealth::Unspecified,
    }
}

fn health_out(h: DeviceHealth) -> i32 {
    (match h {
        DeviceHealth::Unspecified => pb::DeviceHealth::Unspecified,
        DeviceHealth::Ok => pb::DeviceHealth::Ok,
        DeviceHealth::Degraded => pb::DeviceHealth::Degraded,
        DeviceHealth::Failing => pb::DeviceHealth::Failing,
        DeviceHealth::Unknown => pb::DeviceHealth::Unknown,
    }) as i32
}

fn token_status_in(n: i32) -> Option<TokenStatus> {
    convert::token_status_in("status", n).ok().flatten()
}

fn token_status_out(s: Option<TokenStatus>) -> i32 {
    s.map_or(
        pb::TokenStatus::Unspecified as i32,
        convert::token_status_out,
    )
}

fn purpose_in(n: i32) -> Option<MailPurpose> {
    convert::mail_purpose_in("purpose", n).ok().flatten()
}

fn purpose_out(p: Option<MailPurpose>) -> i32 {
    p.map_or(
        pb::MailPurpose::Unspecified as i32,
        convert::mail_purpose_out,
    )
}

fn target_in(n: i32) -> Result<ConnectionTarget, ValidationError> {
    match pb::ConnectionTarget::try_from(n) {
        Ok(pb::ConnectionTarget::Unspecified) => Ok(ConnectionTarget::Unspecified),
        Ok(pb::ConnectionTarget::Send) => Ok(ConnectionTarget::Send),
        Ok(pb::ConnectionTarget::Fetch) => Ok(ConnectionTarget::Fetch),
        Err(_) => Err(ValidationError::new("target", format!("unknown value {n}"))),
    }
}

fn target_out(t: ConnectionTarget) -> i32 {
    (match t {
        ConnectionTarget::Unspecified => pb::ConnectionTarget::Unspecified,
        ConnectionTarget::Send => pb::ConnectionTarget::Send,
        ConnectionTarget::Fetch => pb::ConnectionTarget::Fetch,
    }) as i32
}

/// The core lists the verdicts in wire order (checked by `tests::verdicts_are_in_wire_order`).
fn verdict_in(n: i32) -> ConnectionVerdict {
    usize::try_from(n)
        .ok()
        .and_then(|i| ConnectionVerdict::ALL.get(i).copied())
        .unwrap_or_default()
}

fn verdict_out(v: ConnectionVerdict) -> i32 {
    ConnectionVerdict::ALL
        .iter()
        .position(|x| *x == v)
        .and_then(|i| i32::try_from(i).ok())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// From the agents.

/// An agent's report; device statuses larger than [`MAX_STATUS_BYTES`] are left out (logged).
pub fn report_in(r: pb::AgentReport) -> AgentReport {
    AgentReport {
        time: time_in(r.time.as_ref()),
        software_version: r.software_version,
        sequence: r.sequence,
        config_revision: r.config_revision,
        devices: r
            .devices
            .into_iter()
            .filter(|status| {
                let bytes = status.encoded_len().div_ceil(3) * 4;
                if bytes > MAX_STATUS_BYTES {
                    tracing::warn!(device = %status.device, bytes, "device status too large; not stored");
                }
                bytes <= MAX_STATUS_BYTES
            })
            .map(device_status_in)
            .collect(),
        command_result: r.command_result.map(command_result_in),
    }
}

/// A device's status as the agent reported it.
pub fn device_status_in(s: pb::DeviceStatus) -> DeviceReport {
    DeviceReport {
        device: s.device,
        health: health_in(s.health),
        problem: s.problem,
        tokens: s
            .tokens
            .into_iter()
            .map(|t| MailboxTokenView {
                status: token_status_in(t.status),
                expire_time: time_in(t.expire_time.as_ref()),
                purpose: purpose_in(t.purpose),
                mailbox: t.mailbox,
                error: t.error,
            })
            .collect(),
        last_delivery: s.last_delivery.map(|d| DeliveryResult {
            time: time_in(d.time.as_ref()),
            ok: d.ok,
            final_reply: d.final_reply,
            auth_challenge_json: d.auth_challenge_json,
            message_id: d.message_id,
            outcome: d.outcome,
            mailbox: d.mailbox,
        }),
        queue_depth: s.queue_depth,
        oldest_queued_seconds: s.oldest_queued_seconds,
        delivered_total: s.delivered_total,
        failed_total: s.failed_total,
        dead_lettered_total: s.dead_lettered_total,
        duplicates_total: s.duplicates_total,
        last_connection_test: s.last_connection_test.map(test_result_in),
        fetched_total: s.fetched_total,
        maildrop_depth: s.maildrop_depth,
    }
}

fn command_result_in(r: pb::CommandResult) -> CommandResult {
    CommandResult {
        command_id: r.command_id,
        ok: r.ok,
        detail: r.detail,
        connection_test: r.connection_test.map(test_result_in),
    }
}

fn test_result_in(t: pb::ConnectionTestResult) -> ConnectionTestResult {
    ConnectionTestResult {
        device: t.device,
        target: target_in(t.target).unwrap_or_default(),
        verdict: verdict_in(t.verdict),
        summary: t.summary,
        fix: t.fix,
        steps: t
            .steps
            .into_iter()
            .map(|s| ConnectionTestStep {
                name: s.name,
                ok: s.ok,
                detail: s.detail,
                duration_ms: s.duration_ms,
            })
            .collect(),
        certificate: t.certificate.map(|c| CertificateInfo {
            not_before: time_in(c.not_before.as_ref()),
            not_after: time_in(c.not_after.as_ref()),
            subject: c.subject,
            issuer: c.issuer,
            dns_names: c.dns_names,
            sha256_fingerprint: c.sha256_fingerprint,
            tls_version: c.tls_version,
            cipher_suite: c.cipher_suite,
        }),
        time: time_in(t.time.as_ref()),
        endpoint: t.endpoint,
    }
}

// ---------------------------------------------------------------------------------------------
// To the agents.

/// A command for the agent.
pub fn command_out(c: AgentCommand) -> pb::AgentCommand {
    use pb::agent_command::Command as Wire;
    pb::AgentCommand {
        id: c.id,
        command: c.command.map(|command| match command {
            Command::ReloadConfig => Wire::ReloadConfig(pb::ReloadConfig {}),
            Command::DropToken { mailbox } => Wire::DropToken(pb::DropToken { mailbox }),
            Command::TestConnection(t) => Wire::TestConnection(pb::ConnectionTestCommand {
                device: t.device,
                target: target_out(t.target),
                timeout_seconds: t.timeout_seconds,
            }),
        }),
    }
}

/// The agent's configuration.
pub fn config_out(c: AgentConfig) -> pb::AgentConfig {
    pb::AgentConfig {
        tenant: c.tenant,
        agent: c.agent,
        devices: c.devices.into_iter().map(device_out).collect(),
        revision: c.revision,
        heartbeat_seconds: c.heartbeat_seconds,
    }
}

fn mailbox_ref_out(m: MailboxRef) -> pb::MailboxRef {
    pb::MailboxRef {
        name: m.name,
        address: m.address,
        kind: m.kind.map_or(
            pb::MailboxKind::Unspecified as i32,
            convert::mailbox_kind_out,
        ),
    }
}

fn device_out(d: AgentDevice) -> pb::AgentDevice {
    pb::AgentDevice {
        smtp: convert::smtp_to_proto(&d.smtp),
        fetch: convert::fetch_to_proto(&d.fetch),
        name: d.name,
        display_name: d.display_name,
        sender_mode: convert::sender_mode_out(d.sender_mode),
        admin_mailbox: d.admin_mailbox.map(mailbox_ref_out),
        bulk_mailbox: d.bulk_mailbox.map(mailbox_ref_out),
        allowed_mailboxes: d
            .allowed_mailboxes
            .into_iter()
            .map(mailbox_ref_out)
            .collect(),
        ingress_username: d.ingress_username,
        ingress_password_hash: d.ingress_password_hash,
        ingress_allowed_sources: d.ingress_allowed_sources,
        ingress_user_addresses: d.ingress_user_addresses,
    }
}

// ---------------------------------------------------------------------------------------------
// To the operators.

/// A `TestConnection` request as the core takes it (an unknown target is reported by the core,
/// after authorization).
pub fn test_request_in(r: pb::TestConnectionRequest) -> TestRequest {
    TestRequest {
        target: target_in(r.target),
        tenant: r.tenant,
        device: r.device,
        timeout_seconds: r.timeout_seconds,
    }
}

/// A connection test's result.
pub fn test_result_out(t: ConnectionTestResult) -> pb::ConnectionTestResult {
    pb::ConnectionTestResult {
        device: t.device,
        target: target_out(t.target),
        verdict: verdict_out(t.verdict),
        summary: t.summary,
        fix: t.fix,
        steps: t
            .steps
            .into_iter()
            .map(|s| pb::ConnectionTestStep {
                name: s.name,
                ok: s.ok,
                detail: s.detail,
                duration_ms: s.duration_ms,
            })
            .collect(),
        certificate: t.certificate.map(|c| pb::CertificateInfo {
            not_before: time_out(c.not_before),
            not_after: time_out(c.not_after),
            subject: c.subject,
            issuer: c.issuer,
            dns_names: c.dns_names,
            sha256_fingerprint: c.sha256_fingerprint,
            tls_version: c.tls_version,
            cipher_suite: c.cipher_suite,
        }),
        time: time_out(t.time),
        endpoint: t.endpoint,
    }
}

/// A device's reported status.
pub fn device_status_out(s: DeviceReport) -> pb::DeviceStatus {
    pb::DeviceStatus {
        device: s.device,
        health: health_out(s.health),
        problem: s.problem,
        tokens: s
            .tokens
            .into_iter()
            .map(|t| pb::MailboxTokenView {
                mailbox: t.mailbox,
                status: token_status_out(t.status),
                expire_time: time_out(t.expire_time),
                error: t.error,
                purpose: purpose_out(t.purpose),
            })
            .collect(),
        last_delivery: s.last_delivery.map(|d| pb::DeliveryResult {
            time: time_out(d.time),
            ok: d.ok,
            final_reply: d.final_reply,
            auth_challenge_json: d.auth_challenge_json,
            message_id: d.message_id,
            outcome: d.outcome,
            mailbox: d.mailbox,
        }),
        queue_depth: s.queue_depth,
        oldest_queued_seconds: s.oldest_queued_seconds,
        delivered_total: s.delivered_total,
        failed_total: s.failed_total,
        dead_lettered_total: s.dead_lettered_total,
        duplicates_total: s.duplicates_total,
        last_connection_test: s.last_connection_test.map(test_result_out),
        fetched_total: s.fetched_total,
        maildrop_depth: s.maildrop_depth,
    }
}

/// The fleet status of the devices, in the core's order.
pub fn fleet_status_out(devices: Vec<FleetDeviceStatus>) -> pb::GetFleetStatusResponse {
    pb::GetFleetStatusResponse {
        devices: devices.into_iter().map(fleet_device_out).collect(),
    }
}

fn fleet_device_out(d: FleetDeviceStatus) -> pb::FleetDeviceStatus {
    pb::FleetDeviceStatus {
        tenant: d.tenant,
        device: d.device,
        agent: d.agent,
        agent_connected: d.agent_connected,
        last_report_time: time_out(d.last_report_time),
        health: health_out(d.health),
        problem: d.problem,
        status: d.status.map(device_status_out),
        agent_software_version: d.agent_software_version,
        grants: d.grants.into_iter().map(grant_out).collect(),
    }
}

fn grant_out(g: FleetMailboxGrant) -> pb::FleetMailboxGrant {
    pb::FleetMailboxGrant {
        mailbox: g.mailbox,
        address: g.address,
        status: token_status_out(g.status),
        problem: g.problem,
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD as B64;
    use tokenfleet_core::fleet::legacy;

    use super::*;

    #[test]
    fn verdicts_are_in_wire_order() {
        for (i, v) in ConnectionVerdict::ALL.iter().enumerate() {
            let wire = pb::ConnectionVerdict::try_from(i32::try_from(i).unwrap()).unwrap();
            assert_eq!(v.wire_name(), wire.as_str_name());
        }
        assert!(
            pb::ConnectionVerdict::try_from(i32::try_from(ConnectionVerdict::ALL.len()).unwrap())
                .is_err()
        );
    }

    fn at(seconds: i64) -> Option<Timestamp> {
        Some(Timestamp { seconds, nanos: 0 })
    }

    fn test_result() -> pb::ConnectionTestResult {
        pb::ConnectionTestResult {
            device: "mfp".into(),
            target: pb::ConnectionTarget::Fetch as i32,
            verdict: pb::ConnectionVerdict::DeviceNotLoaded as i32,
            summary: "535 5.7.139".into(),
            fix: "enable SMTP AUTH".into(),
            steps: vec![pb::ConnectionTestStep {
                name: "tls".into(),
                ok: true,
                detail: "TLSv1.3".into(),
                duration_ms: 12,
            }],
            certificate: Some(pb::CertificateInfo {
                subject: "CN=smtp".into(),
                issuer: "CN=ca".into(),
                dns_names: vec!["a".into(), "b".into()],
                not_before: at(1_000),
                not_after: at(2_000_000_000),
                sha256_fingerprint: "ab".into(),
                tls_version: "TLSv1.3".into(),
                cipher_suite: "TLS13_AES_128_GCM_SHA256".into(),
            }),
            time: Some(Timestamp {
                seconds: 1_700_000_000,
                nanos: 5,
            }),
            endpoint: "smtp:587".into(),
        }
    }

    /// A status with every field set, including a negative-free but multi-byte varint.
    fn full_status() -> pb::DeviceStatus {
        pb::DeviceStatus {
            device: "mfp".into(),
            health: pb::DeviceHealth::Degraded as i32,
            problem: "queue building".into(),
            tokens: vec![
                pb::MailboxTokenView {
                    mailbox: "scan".into(),
                    status: pb::TokenStatus::RefreshFailing as i32,
                    expire_time: at(1_800_000_000),
                    error: "broker unreachable".into(),
                    purpose: pb::MailPurpose::Imap as i32,
                },
                pb::MailboxTokenView {
                    mailbox: "bulk".into(),
                    ..Default::default()
                },
            ],
            last_delivery: Some(pb::DeliveryResult {
                time: at(1_700_000_100),
                ok: true,
                final_reply: "250 2.0.0 Ok".into(),
                auth_challenge_json: "{}".into(),
                message_id: "m1".into(),
                outcome: "delivered".into(),
                mailbox: "scan".into(),
            }),
            queue_depth: 300,
            oldest_queued_seconds: 1 << 40,
            delivered_total: 7,
            failed_total: 8,
            dead_lettered_total: 9,
            duplicates_total: 10,
            last_connection_test: Some(test_result()),
            fetched_total: 11,
            maildrop_depth: 12,
        }
    }

    #[test]
    fn statuses_and_test_results_round_trip_through_the_domain() {
        let status = full_status();
        assert_eq!(device_status_out(device_status_in(status.clone())), status);
        let result = test_result();
        assert_eq!(test_result_out(test_result_in(result.clone())), result);
    }

    /// What the store held before the fleet moved into the core (base64 of the protobuf
    /// encoding) reads in the core as the edge decodes the same message.
    #[test]
    fn the_cores_legacy_reader_agrees_with_the_wire_decoding() {
        let status = full_status();
        let stored = B64.encode(status.encode_to_vec());
        assert_eq!(
            legacy::device_report(&stored).unwrap(),
            device_status_in(status)
        );
        for command in [
            pb::AgentCommand {
                id: "1-a".into(),
                command: Some(pb::agent_command::Command::ReloadConfig(
                    pb::ReloadConfig {},
                )),
            },
            pb::AgentCommand {
                id: "2-b".into(),
                command: Some(pb::agent_command::Command::DropToken(pb::DropToken {
                    mailbox: "scan".into(),
                })),
            },
            pb::AgentCommand {
                id: "3-c".into(),
                command: Some(pb::agent_command::Command::TestConnection(
                    pb::ConnectionTestCommand {
                        device: "mfp".into(),
                        target: pb::ConnectionTarget::Send as i32,
                        timeout_seconds: 30,
                    },
                )),
            },
        ] {
            let stored = B64.encode(command.encode_to_vec());
            let read = legacy::agent_command(&stored).unwrap();
            assert_eq!(command_out(read), command);
        }
        let result = pb::CommandResult {
            command_id: "3-c".into(),
            ok: true,
            detail: "done".into(),
            connection_test: Some(test_result()),
        };
        let stored = B64.encode(result.encode_to_vec());
        assert_eq!(
            legacy::command_result(&stored).unwrap(),
            command_result_in(result)
        );
    }

    #[test]
    fn oversized_statuses_are_left_out_and_unknown_targets_refused() {
        let big = pb::DeviceStatus {
            device: "big".into(),
            problem: "x".repeat(MAX_STATUS_BYTES),
            ..Default::default()
        };
        let report = report_in(pb::AgentReport {
            devices: vec![big, full_status()],
            ..Default::default()
        });
        assert_eq!(report.devices.len(), 1);
        assert_eq!(report.devices[0].device, "mfp");
        let req = test_request_in(pb::TestConnectionRequest {
            target: 9,
            ..Default::default()
        });
        assert_eq!(
            req.target.unwrap_err().to_string(),
            "target: unknown value 9"
        );
    }
}
