//! Token RPCs: `DeleteToken` and `RefreshNow` (the lifecycle itself is in
//! [`crate::tokens::lifecycle`]).

use tokenfleet_proto::v1 as pb;

use super::mailboxes::{check_names, mailbox_view};
use crate::authz::{Access, Principal, Target, authorize};
use crate::ops::Error;
use crate::ops::change::{Change, audited};
use crate::ops::names::{object_path, span_object};
use crate::state::BrokerState;
use crate::tokens::lifecycle::{TokenError, TokenService};

fn change(action: &'static str, tenant: &str, mailbox: &str) -> Change {
    Change {
        action,
        target: object_path(tenant, "mailboxes", mailbox),
        tenant: tenant.to_owned(),
    }
}

pub(super) async fn delete_token(
    state: &BrokerState,
    principal: &Principal,
    req: pb::DeleteTokenRequest,
    tokens: &TokenService,
) -> Result<pb::Mailbox, Error> {
    span_object(&req.tenant, &req.mailbox);
    audited(
        state,
        principal,
        change("mailbox.delete_token", &req.tenant, &req.mailbox),
        async {
            authorize(principal, Target::Tenant(&req.tenant), Access::Write)?;
            check_names(&req.tenant, &req.mailbox)?;
            let revocation = tokens.delete_token(&req.tenant, &req.mailbox).await?;
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
) -> Result<pb::Mailbox, Error> {
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
                Err(e) => return Err(e.into()),
            };
            let mailbox = mailbox_view(state, &req.tenant, &req.mailbox).await?;
            Ok((mailbox, detail))
        },
    )
    .await
}
