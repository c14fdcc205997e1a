//! Token RPCs: `DeleteToken` and `RefreshNow` (the lifecycle itself is in
//! [`crate::tokens::lifecycle`]), and reading a mailbox together with its grant's state.

use tokenfleet_domain::Mailbox;
use tokenfleet_proto::v1 as pb;
use tonic::Status;

use super::{Change, audited, invalid, must_get, object_path, shown, span_object, store_status};
use crate::authz::{Access, Principal, Target, authorize};
use crate::records::mailbox_key;
use crate::state::BrokerState;
use crate::tokens::lifecycle::{TokenError, TokenService};

fn change(action: &'static str, tenant: &str, mailbox: &str) -> Change {
    Change {
        action,
        target: object_path(tenant, "mailboxes", mailbox),
        tenant: tenant.to_owned(),
    }
}

fn check_names(tenant: &str, mailbox: &str) -> Result<(), Status> {
    tokenfleet_domain::name("tenant", tenant).map_err(invalid)?;
    tokenfleet_domain::name("mailbox", mailbox).map_err(invalid)?;
    Ok(())
}

/// The wire form of a mailbox with the token state of its grant record.
pub(super) async fn mailbox_view(
    state: &BrokerState,
    tenant: &str,
    mailbox: &str,
) -> Result<pb::Mailbox, Status> {
    let m = must_get::<Mailbox>(
        state,
        &mailbox_key(tenant, mailbox),
        &format!("mailbox `{}` in tenant `{}`", shown(mailbox), shown(tenant)),
    )
    .await?;
    let grant = super::records(state)
        .get::<crate::tokens::grant::GrantRecord>(&crate::tokens::grant::grant_key(tenant, mailbox))
        .await
        .map_err(store_status)?;
    Ok(super::mailbox_with_grant(
        &m.value,
        m.version,
        grant.as_ref().map(|g| &g.value),
    ))
}

pub(super) async fn delete_token(
    state: &BrokerState,
    principal: &Principal,
    req: pb::DeleteTokenRequest,
    tokens: &TokenService,
) -> Result<pb::Mailbox, Status> {
    span_object(&req.tenant, &req.mailbox);
    audited(
        state,
        principal,
        change("mailbox.delete_token", &req.tenant, &req.mailbox),
        async {
            authorize(principal, Target::Tenant(&req.tenant), Access::Write)?;
            check_names(&req.tenant, &req.mailbox)?;
            let revocation = tokens
                .delete_token(&req.tenant, &req.mailbox)
                .await
                .map_err(|e| e.to_status())?;
            let mailbox = mailbox_view(state, &req.tenant, &req.mailbox).await?;
            Ok((mailbox, revocation.to_string()))
        },
    )
    .await
}

pub(super) async fn refresh_now(
    state: &BrokerState,
    principal: &Principal,
    req: pb::RefreshNowRequest,
    tokens: &TokenService,
) -> Result<pb::Mailbox, Status> {
    span_object(&req.tenant, &req.mailbox);
    audited(
        state,
        principal,
        change("mailbox.refresh_now", &req.tenant, &req.mailbox),
        async {
            authorize(principal, Target::Tenant(&req.tenant), Access::Write)?;
            check_names(&req.tenant, &req.mailbox)?;
            // A provider failure is recorded in the grant: the caller gets the mailbox showing
            // it (status, reason, fix, next attempt). Only what kept the refresh from being
            // attempted is an error.
            let detail = match tokens.refresh_now(&req.tenant, &req.mailbox).await {
                Ok(token) => format!(
                    "refreshed; access token expires {}",
                    token
                        .expires
                        .format(&time::format_description::well_known::Rfc3339)
                        .unwrap_or_default()
                ),
                Err(
                    e @ (TokenError::RefreshFailing { .. } | TokenError::ReauthRequired { .. }),
                ) => e.to_string().chars().take(300).collect(),
                Err(e) => return Err(e.to_status()),
            };
            let mailbox = mailbox_view(state, &req.tenant, &req.mailbox).await?;
            Ok((mailbox, detail))
        },
    )
    .await
}
