//! Issuance: the access token a device's agent gets for (device, mailbox, purpose).
//!
//! [`issue`] checks that the device exists in the tenant, that its sender mode lets it use the
//! mailbox (`fixed_admin` → its admin mailbox only, `bulk` → its bulk mailbox only, `login_user`
//! and `allow_user_change` → its allowed mailboxes), and that the mailbox serves the purpose; then
//! it hands out [`TokenService::access_token`]. Every issuance, granted or refused, is audited
//! (actor, device, mailbox, purpose, result; never the token).
//!
//! Checking that the calling agent hosts the device needs agent identity, which arrives with
//! agent enrollment; until then the agent-facing gRPC `IssueAccessToken` stays closed and only
//! this domain function exists.

use tokenfleet_domain::{AuditEvent, Device, MailPurpose, Mailbox, SenderMode};
use tokenfleet_store::Scope;

use super::lifecycle::{IssuedToken, TokenError, TokenService};
use crate::audit;
use crate::records::{Records, device_key, mailbox_key};

/// Audit action of an issuance.
pub const ISSUE_ACTION: &str = "token.issue";

/// Whether `device`'s sender mode lets it use `mailbox`.
pub fn device_may_use(device: &Device, mailbox: &str) -> bool {
    match device.sender_mode {
        SenderMode::FixedAdmin => device.admin_mailbox == mailbox,
        SenderMode::Bulk => device.bulk_mailbox == mailbox,
        SenderMode::LoginUser | SenderMode::AllowUserChange => {
            device.allowed_mailboxes.iter().any(|m| m == mailbox)
        }
    }
}

/// An access token for `device` to use `mailbox` for `purpose`, on behalf of `actor` (who asked,
/// for the audit log). See the module documentation.
pub async fn issue(
    service: &TokenService,
    actor: &str,
    tenant: &str,
    device: &str,
    mailbox: &str,
    purpose: MailPurpose,
) -> Result<IssuedToken, TokenError> {
    let result = authorize_and_issue(service, tenant, device, mailbox, purpose).await;
    if result.is_ok()
        && let Err(error) = service.record_issued(tenant, mailbox).await
    {
        tracing::warn!(%error, tenant, mailbox, "recording the issuance time failed");
    }
    let state = service.state();
    let (outcome, detail) = match &result {
        Ok(token) => (
            "ok",
            format!(
                "device `{device}`, purpose {purpose}; token expires {}",
                token
                    .expires
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default()
            ),
        ),
        Err(e) => (
            audit::result_of(e.to_status().code()),
            format!("device `{device}`, purpose {purpose}: {e}")
                .chars()
                .take(300)
                .collect(),
        ),
    };
    let valid_tenant = tokenfleet_domain::name("tenant", tenant).is_ok();
    let scope = if valid_tenant {
        Scope::Tenant(tenant.to_owned())
    } else {
        Scope::Global
    };
    let event = AuditEvent {
        time: state.clock.now(),
        actor: actor.to_owned(),
        action: ISSUE_ACTION.to_owned(),
        target: crate::admin::object_path(tenant, "mailboxes", mailbox),
        tenant: crate::admin::shown(tenant),
        result: outcome.to_owned(),
        detail,
    };
    match &result {
        Ok(_) => tracing::info!(tenant, device, mailbox, %purpose, actor, "access token issued"),
        Err(error) => {
            tracing::info!(tenant, device, mailbox, %purpose, actor, %error, "access token refused")
        }
    }
    audit::record(state, &scope, event).await;
    result
}

async fn authorize_and_issue(
    service: &TokenService,
    tenant: &str,
    device: &str,
    mailbox: &str,
    purpose: MailPurpose,
) -> Result<IssuedToken, TokenError> {
    for (field, value) in [("tenant", tenant), ("device", device), ("mailbox", mailbox)] {
        tokenfleet_domain::name(field, value).map_err(|e| TokenError::Invalid(e.to_string()))?;
    }
    let records = Records::new(service.state().store.as_ref());
    let Some(d) = records.get::<Device>(&device_key(tenant, device)).await? else {
        return Err(TokenError::Denied(format!(
            "device `{device}` does not exist in tenant `{tenant}`"
        )));
    };
    if !device_may_use(&d.value, mailbox) {
        let allowed = match d.value.sender_mode {
            SenderMode::FixedAdmin => format!("its admin mailbox `{}`", d.value.admin_mailbox),
            SenderMode::Bulk => format!("its bulk mailbox `{}`", d.value.bulk_mailbox),
            SenderMode::LoginUser | SenderMode::AllowUserChange => {
                format!(
                    "its allowed mailboxes [{}]",
                    d.value.allowed_mailboxes.join(", ")
                )
            }
        };
        return Err(TokenError::Denied(format!(
            "device `{device}` (sender mode {}) may use only {allowed}, not mailbox `{mailbox}`",
            d.value.sender_mode
        )));
    }
    let Some(m) = records
        .get::<Mailbox>(&mailbox_key(tenant, mailbox))
        .await?
    else {
        return Err(TokenError::MailboxNotFound {
            tenant: tenant.to_owned(),
            mailbox: mailbox.to_owned(),
        });
    };
    if !m.value.purposes.contains(&purpose) {
        return Err(TokenError::Denied(format!(
            "mailbox `{mailbox}` is not set up for {purpose} (its purposes: {})",
            m.value
                .purposes
                .iter()
                .map(|p| p.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    service
        .access_token(tenant, mailbox, service.config().refresh_margin)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::OffsetDateTime;
    use tokenfleet_domain::Stamps;

    fn device(mode: SenderMode) -> Device {
        Device {
            tenant: "acme".into(),
            name: "mfp".into(),
            display_name: String::new(),
            agent: String::new(),
            sender_mode: mode,
            admin_mailbox: "admin".into(),
            bulk_mailbox: "bulk".into(),
            allowed_mailboxes: vec!["alice".into(), "bob".into()],
            smtp: Default::default(),
            fetch: Default::default(),
            ingress: Default::default(),
            stamps: Stamps::new(OffsetDateTime::UNIX_EPOCH),
        }
    }

    #[test]
    fn sender_modes_pick_the_mailboxes() {
        let d = device(SenderMode::FixedAdmin);
        assert!(device_may_use(&d, "admin"));
        assert!(!device_may_use(&d, "bulk") && !device_may_use(&d, "alice"));
        let d = device(SenderMode::Bulk);
        assert!(device_may_use(&d, "bulk"));
        assert!(!device_may_use(&d, "admin") && !device_may_use(&d, "alice"));
        for mode in [SenderMode::LoginUser, SenderMode::AllowUserChange] {
            let d = device(mode);
            assert!(device_may_use(&d, "alice") && device_may_use(&d, "bob"));
            assert!(!device_may_use(&d, "admin") && !device_may_use(&d, "carol"));
        }
    }
}
