//! The fleet status (`Admin.GetFleetStatus`): every device the caller may see, joined with its last report and
//! with the broker's own grant status of the mailboxes it names. The agent reports the access
//! token it caches, which stays usable for up to an hour after the grant behind it died; the
//! broker knows at once (REAUTH_REQUIRED), so a grant that is not ACTIVE makes the device's
//! health at least as bad as the grant's and is named as its problem.

use std::collections::HashMap;

use time::OffsetDateTime;
use tokenfleet_domain::{Agent, Device, Mailbox, Tenant, TokenStatus};
use tokenfleet_store::Scope;

use super::exposure::cleartext_token_warnings;
use super::model::{DeviceHealth, FleetDeviceStatus, FleetMailboxGrant};
use super::settings::{STALE_HEARTBEATS, format_age};
use super::store::{AgentPresence, DeviceStatusRecord};
use crate::authz::{Principal, Target};
use crate::ops::Error;
use crate::ops::change::{Change, authorize_read};
use crate::ops::names::span_object;
use crate::ops::stored::records;
use crate::state::BrokerState;
use crate::tokens::grant::GrantRecord;

/// What a refused fleet-status read is audited as.
const STATUS_READ: &str = "fleet_status.get";

/// The status of every device of `tenant` (empty: of every tenant the caller may see),
/// problems first: FAILING, UNKNOWN, DEGRADED, OK; then by tenant and device. Needs read access
/// to the tenant (all tenants: to the fleet).
pub async fn fleet_status(
    state: &BrokerState,
    principal: &Principal,
    tenant: &str,
) -> Result<Vec<FleetDeviceStatus>, Error> {
    let tenants = if tenant.is_empty() {
        match &principal.tenant {
            Some(own) => vec![own.clone()],
            None => {
                let read = || Change::of_collection(STATUS_READ, "", "fleet_status");
                authorize_read(state, principal, read, Target::Fleet).await?;
                records(state)
                    .list_all::<Tenant>(&Scope::Global)
                    .await?
                    .into_iter()
                    .map(|t| t.value.name)
                    .collect()
            }
        }
    } else {
        let read = || Change::of_collection(STATUS_READ, tenant, "fleet_status");
        authorize_read(state, principal, read, Target::Tenant(tenant)).await?;
        tokenfleet_domain::name("tenant", tenant)?;
        span_object(tenant, "");
        vec![tenant.to_owned()]
    };
    let now = state.clock.now();
    let mut devices = Vec::new();
    for tenant in &tenants {
        devices.extend(tenant_status(state, tenant, now).await?);
    }
    devices.sort_by(|a, b| {
        (a.health.rank(), &a.tenant, &a.device).cmp(&(b.health.rank(), &b.tenant, &b.device))
    });
    Ok(devices)
}

async fn tenant_status(
    state: &BrokerState,
    tenant: &str,
    now: OffsetDateTime,
) -> Result<Vec<FleetDeviceStatus>, Error> {
    let r = records(state);
    let scope = Scope::Tenant(tenant.to_owned());
    let devices = r.list_all::<Device>(&scope).await?;
    if devices.is_empty() {
        return Ok(Vec::new());
    }
    let agents: HashMap<String, Agent> = r
        .list_all::<Agent>(&scope)
        .await?
        .into_iter()
        .map(|a| (a.value.name.clone(), a.value))
        .collect();
    let presence: HashMap<String, AgentPresence> = r
        .list_all::<AgentPresence>(&scope)
        .await?
        .into_iter()
        .map(|p| (p.value.agent.clone(), p.value))
        .collect();
    let reports: HashMap<String, DeviceStatusRecord> = r
        .list_all::<DeviceStatusRecord>(&scope)
        .await?
        .into_iter()
        .map(|s| (s.value.device.clone(), s.value))
        .collect();
    let mailboxes: HashMap<String, Mailbox> = r
        .list_all::<Mailbox>(&scope)
        .await?
        .into_iter()
        .map(|m| (m.value.name.clone(), m.value))
        .collect();
    let grants: HashMap<String, GrantRecord> = r
        .list_all::<GrantRecord>(&scope)
        .await?
        .into_iter()
        .map(|g| (g.value.mailbox.clone(), g.value))
        .collect();
    Ok(devices
        .into_iter()
        .map(|d| {
            let device = d.value;
            let presence = presence.get(&device.agent).filter(|p| p.live(now));
            // A report by an agent that no longer hosts the device says nothing about it.
            let report = reports
                .get(&device.name)
                .filter(|s| s.agent == device.agent);
            let mut out = device_status(&device, agents.get(&device.agent), presence, report, now);
            apply_grants(&mut out, &device, &mailboxes, &grants);
            flag_insecure_token_transport(&device, &mut out);
            out
        })
        .collect())
}

/// The broker's status of mailbox `name`'s grant, and its problem when not ACTIVE.
fn grant_view(
    name: &str,
    mailboxes: &HashMap<String, Mailbox>,
    grants: &HashMap<String, GrantRecord>,
) -> FleetMailboxGrant {
    let Some(mailbox) = mailboxes.get(name) else {
        return FleetMailboxGrant {
            mailbox: name.to_owned(),
            address: String::new(),
            status: None,
            problem: format!("mailbox {name} does not exist"),
        };
    };
    let state = grants.get(name).map_or(&mailbox.token, |g| &g.state);
    let status = if mailbox.disabled {
        TokenStatus::Disabled
    } else {
        state.status
    };
    let problem = match (status, &state.last_error) {
        (TokenStatus::Active, _) => String::new(),
        (TokenStatus::Disabled, _) => format!("mailbox {name} is disabled"),
        (TokenStatus::NotRetrieved, None) => format!(
            "mailbox {name} has no grant yet; run `tokenfleetctl mailbox consent {name} --tenant {}`",
            mailbox.tenant
        ),
        (TokenStatus::ConsentPending, _) => {
            format!("mailbox {name}: consent pending, waiting for the sign-in")
        }
        (status, Some(e)) => format!(
            "mailbox {name}: {} at the broker: {}{}",
            status_name(status),
            e.reason,
            if e.fix.is_empty() {
                String::new()
            } else {
                format!("; fix: {}", e.fix)
            }
        ),
        (status, None) => format!("mailbox {name}: {} at the broker", status_name(status)),
    };
    FleetMailboxGrant {
        mailbox: name.to_owned(),
        address: mailbox.address.clone(),
        status: Some(status),
        problem,
    }
}

/// `REAUTH_REQUIRED`, `REFRESH_FAILING`, … (the wire names, as operators read them elsewhere).
fn status_name(status: TokenStatus) -> &'static str {
    match status {
        TokenStatus::NotRetrieved => "NOT_RETRIEVED",
        TokenStatus::ConsentPending => "CONSENT_PENDING",
        TokenStatus::Active => "ACTIVE",
        TokenStatus::RefreshFailing => "REFRESH_FAILING",
        TokenStatus::ReauthRequired => "REAUTH_REQUIRED",
        TokenStatus::Disabled => "DISABLED",
    }
}

/// Health a grant status gives a device, where the agent's cached token can hide it: FAILING
/// when the grant died or the mailbox is disabled (a person must act), DEGRADED while refreshing
/// fails. A grant not obtained yet or a pending consent the agent reports itself (it gets no
/// token), so they add nothing here.
fn grant_health(status: Option<TokenStatus>) -> Option<DeviceHealth> {
    match status? {
        TokenStatus::ReauthRequired | TokenStatus::Disabled => Some(DeviceHealth::Failing),
        TokenStatus::RefreshFailing => Some(DeviceHealth::Degraded),
        TokenStatus::NotRetrieved | TokenStatus::ConsentPending | TokenStatus::Active => None,
    }
}

/// Adds the broker's grant status of every mailbox `device` names to `out`: the worst grant that
/// is not ACTIVE sets health and problem when it is worse than what the agent reported, and the
/// agent's view of each such mailbox's tokens shows the broker's status.
fn apply_grants(
    out: &mut FleetDeviceStatus,
    device: &Device,
    mailboxes: &HashMap<String, Mailbox>,
    grants: &HashMap<String, GrantRecord>,
) {
    let mut names: Vec<&str> = [device.admin_mailbox.as_str(), device.bulk_mailbox.as_str()]
        .into_iter()
        .chain(device.allowed_mailboxes.iter().map(String::as_str))
        .filter(|n| !n.is_empty())
        .collect();
    names.sort_unstable();
    names.dedup();
    out.grants = names
        .iter()
        .map(|n| grant_view(n, mailboxes, grants))
        .collect();
    let mut worst: Option<(DeviceHealth, &FleetMailboxGrant)> = None;
    for grant in &out.grants {
        if let Some(health) = grant_health(grant.status)
            && worst.is_none_or(|(h, _)| health.severity() > h.severity())
        {
            worst = Some((health, grant));
        }
    }
    if let Some((health, grant)) = worst
        && health.severity() > out.health.severity()
    {
        out.health = health;
        out.problem.clone_from(&grant.problem);
    }
    if let Some(status) = out.status.as_mut() {
        for view in &mut status.tokens {
            if let Some(grant) = out
                .grants
                .iter()
                .find(|g| g.mailbox == view.mailbox && grant_health(g.status).is_some())
            {
                view.status = grant.status;
                view.error.clone_from(&grant.problem);
            }
        }
    }
}

fn device_status(
    device: &Device,
    agent: Option<&Agent>,
    presence: Option<&AgentPresence>,
    report: Option<&DeviceStatusRecord>,
    now: OffsetDateTime,
) -> FleetDeviceStatus {
    let mut out = FleetDeviceStatus {
        tenant: device.tenant.clone(),
        device: device.name.clone(),
        agent: device.agent.clone(),
        agent_connected: presence.is_some(),
        last_report_time: report.map(|r| r.report_time),
        health: DeviceHealth::Unknown,
        problem: String::new(),
        status: None,
        agent_software_version: agent
            .map(|a| a.software_version.clone())
            .unwrap_or_default(),
        grants: Vec::new(),
    };
    if device.agent.is_empty() {
        out.problem = "no agent assigned".to_owned();
        return out;
    }
    let agent_name = &device.agent;
    let Some(report) = report else {
        out.problem = match (presence, agent.and_then(|a| a.last_seen)) {
            (Some(_), _) => format!("agent \"{agent_name}\" has not reported this device yet"),
            (None, Some(seen)) => {
                format!(
                    "agent \"{agent_name}\" not seen for {}",
                    format_age(now - seen)
                )
            }
            (None, None) => format!("agent \"{agent_name}\" has never reported"),
        };
        return out;
    };
    let status = match report.decode_status() {
        Ok(status) => status,
        Err(error) => {
            tracing::error!(%error, "stored device status is damaged");
            out.problem = "the stored status of this device is damaged (details in the broker log)"
                .to_owned();
            return out;
        }
    };
    let age = now - report.report_time;
    let stale =
        age > time::Duration::seconds(i64::from(report.heartbeat_seconds)) * STALE_HEARTBEATS;
    if stale {
        out.problem = match presence {
            Some(_) => format!(
                "agent \"{agent_name}\" has not reported this device for {}",
                format_age(age)
            ),
            None => format!("agent \"{agent_name}\" not seen for {}", format_age(age)),
        };
    } else {
        match status.health {
            h @ (DeviceHealth::Ok | DeviceHealth::Degraded | DeviceHealth::Failing) => {
                out.health = h;
                out.problem.clone_from(&status.problem);
            }
            DeviceHealth::Unknown => out.problem.clone_from(&status.problem),
            DeviceHealth::Unspecified => {
                out.problem = format!("agent \"{agent_name}\" reported no health for this device");
            }
        }
    }
    out.status = Some(status);
    out
}

/// A device whose profile lets tokens leave in clear text (`insecure_allow_cleartext_tokens`)
/// says so in its problem, whatever its health.
fn flag_insecure_token_transport(device: &Device, out: &mut FleetDeviceStatus) {
    let warnings = cleartext_token_warnings(device);
    if warnings.is_empty() {
        return;
    }
    let insecure = warnings.join("; ");
    out.problem = if out.problem.is_empty() {
        insecure
    } else {
        format!("{}; {insecure}", out.problem)
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::model::{DeviceReport, MailboxTokenView};
    use tokenfleet_domain::{MailPurpose, SenderMode, Stamps};

    #[test]
    fn ages_read_like_people_write_them() {
        let s = time::Duration::seconds;
        assert_eq!(format_age(s(-5)), "0s");
        assert_eq!(format_age(s(45)), "45s");
        assert_eq!(format_age(s(250)), "4m 10s");
        assert_eq!(format_age(s(3 * 3600 + 301)), "3h 5m");
        assert_eq!(format_age(s(2 * 86_400 + 4 * 3600 + 9)), "2d 4h");
    }

    fn device(agent: &str) -> Device {
        Device {
            tenant: "acme".into(),
            name: "mfp".into(),
            display_name: String::new(),
            agent: agent.into(),
            sender_mode: SenderMode::FixedAdmin,
            admin_mailbox: "scan".into(),
            bulk_mailbox: String::new(),
            allowed_mailboxes: vec![],
            smtp: Default::default(),
            fetch: Default::default(),
            ingress: Default::default(),
            user_provider: String::new(),
            stamps: Stamps::new(OffsetDateTime::UNIX_EPOCH),
        }
    }

    #[test]
    fn stale_reports_and_missing_agents_are_unknown() {
        let now = OffsetDateTime::UNIX_EPOCH + time::Duration::hours(1);
        let out = device_status(&device(""), None, None, None, now);
        assert_eq!(out.health, DeviceHealth::Unknown);
        assert_eq!(out.problem, "no agent assigned");

        let failing = DeviceReport {
            device: "mfp".into(),
            health: DeviceHealth::Failing,
            problem: "535 5.7.139".into(),
            ..Default::default()
        };
        let report = DeviceStatusRecord::new(
            "acme",
            "site-a",
            failing,
            now - time::Duration::seconds(10),
            30,
        );
        let out = device_status(&device("site-a"), None, None, Some(&report), now);
        assert_eq!(out.health, DeviceHealth::Failing);
        assert_eq!(out.problem, "535 5.7.139");

        let old = DeviceStatusRecord {
            report_time: now - time::Duration::seconds(250),
            ..report
        };
        let out = device_status(&device("site-a"), None, None, Some(&old), now);
        assert_eq!(out.health, DeviceHealth::Unknown);
        assert_eq!(out.problem, "agent \"site-a\" not seen for 4m 10s");
        assert!(out.status.is_some());
    }

    fn mailbox(name: &str) -> Mailbox {
        Mailbox {
            tenant: "acme".into(),
            name: name.into(),
            address: format!("{name}@acme.example"),
            provider: "m365".into(),
            grant_type: tokenfleet_domain::GrantType::DelegatedDeviceCode,
            kind: tokenfleet_domain::MailboxKind::Admin,
            purposes: vec![tokenfleet_domain::MailPurpose::Send],
            disabled: false,
            token: Default::default(),
            stamps: Stamps::new(OffsetDateTime::UNIX_EPOCH),
            consent_account: String::new(),
        }
    }

    #[test]
    fn a_dead_grant_outranks_the_agents_cached_token() {
        let now = OffsetDateTime::UNIX_EPOCH + time::Duration::hours(1);
        // The agent reports OK: it holds an access token that has not expired.
        let healthy = DeviceReport {
            device: "mfp".into(),
            health: DeviceHealth::Ok,
            tokens: vec![MailboxTokenView {
                mailbox: "scan".into(),
                status: Some(TokenStatus::Active),
                purpose: Some(MailPurpose::Send),
                ..Default::default()
            }],
            ..Default::default()
        };
        let report = DeviceStatusRecord::new(
            "acme",
            "site-a",
            healthy.clone(),
            now - time::Duration::seconds(5),
            30,
        );
        let device = device("site-a");
        let mailboxes: HashMap<String, Mailbox> =
            [("scan".to_owned(), mailbox("scan"))].into_iter().collect();
        let mut grant = GrantRecord::empty("acme", "scan");
        grant.state.status = TokenStatus::Active;
        let mut grants: HashMap<String, GrantRecord> =
            [("scan".to_owned(), grant.clone())].into_iter().collect();

        // Grant ACTIVE: the report stands.
        let mut out = device_status(&device, None, None, Some(&report), now);
        apply_grants(&mut out, &device, &mailboxes, &grants);
        assert_eq!(out.health, DeviceHealth::Ok);
        assert_eq!(out.grants.len(), 1);
        assert_eq!(out.grants[0].status, Some(TokenStatus::Active));

        // The grant died at the broker: FAILING, the mailbox and the fix named, the agent's
        // token shown with the broker's status.
        grant.state.status = TokenStatus::ReauthRequired;
        grant.state.last_error = Some(tokenfleet_domain::TokenError {
            code: "invalid_grant".into(),
            reason: "the refresh token was revoked".into(),
            fix: "consent again".into(),
            time: now,
        });
        grants.insert("scan".into(), grant.clone());
        let mut out = device_status(&device, None, None, Some(&report), now);
        apply_grants(&mut out, &device, &mailboxes, &grants);
        assert_eq!(out.health, DeviceHealth::Failing);
        assert!(
            out.problem.starts_with("mailbox scan: REAUTH_REQUIRED"),
            "{}",
            out.problem
        );
        assert!(out.problem.contains("consent again"), "{}", out.problem);
        let token = &out.status.as_ref().unwrap().tokens[0];
        assert_eq!(token.status, Some(TokenStatus::ReauthRequired));
        assert_eq!(token.purpose, Some(MailPurpose::Send));

        // Refreshing fails for now: DEGRADED. A worse report (FAILING) is kept.
        grant.state.status = TokenStatus::RefreshFailing;
        grants.insert("scan".into(), grant);
        let mut out = device_status(&device, None, None, Some(&report), now);
        apply_grants(&mut out, &device, &mailboxes, &grants);
        assert_eq!(out.health, DeviceHealth::Degraded);
        let failing = DeviceStatusRecord {
            report: Some(DeviceReport {
                health: DeviceHealth::Failing,
                problem: "535 5.7.139".into(),
                ..healthy
            }),
            ..report
        };
        let mut out = device_status(&device, None, None, Some(&failing), now);
        apply_grants(&mut out, &device, &mailboxes, &grants);
        assert_eq!(out.health, DeviceHealth::Failing);
        assert_eq!(out.problem, "535 5.7.139");

        // A disabled mailbox is FAILING whatever its grant says.
        let mut disabled = mailboxes.clone();
        disabled.get_mut("scan").unwrap().disabled = true;
        let mut out = device_status(&device, None, None, Some(&failing), now);
        apply_grants(&mut out, &device, &disabled, &grants);
        assert_eq!(out.grants[0].status, Some(TokenStatus::Disabled));
    }
}
