//! Token RPCs on the wire: `DeleteToken` and `RefreshNow`. The operations (authorization, the
//! lifecycle, audit) are the core's [`crate::tokens::operator::delete_token`] and
//! [`crate::tokens::operator::refresh_now`]; this file only converts.

use tokenfleet_proto::v1 as pb;

use super::mailboxes::mailbox_with_grant;
use crate::authz::Principal;
use crate::ops::Error;
use crate::state::BrokerState;
use crate::tokens::lifecycle::TokenService;
use crate::tokens::operator::{self, MailboxGrant};

/// The wire form of a mailbox with the token state of its grant record.
fn mailbox_out(view: &MailboxGrant) -> pb::Mailbox {
    mailbox_with_grant(
        &view.mailbox.value,
        view.mailbox.version,
        view.grant.as_ref(),
    )
}

pub(super) async fn delete_token(
    _state: &BrokerState,
    principal: &Principal,
    req: pb::DeleteTokenRequest,
    tokens: &TokenService,
) -> Result<pb::Mailbox, Error> {
    let view = operator::delete_token(tokens, principal, &req.tenant, &req.mailbox).await?;
    Ok(mailbox_out(&view))
}

pub(super) async fn refresh_now(
    _state: &BrokerState,
    principal: &Principal,
    req: pb::RefreshNowRequest,
    tokens: &TokenService,
) -> Result<pb::Mailbox, Error> {
    let view = operator::refresh_now(tokens, principal, &req.tenant, &req.mailbox).await?;
    Ok(mailbox_out(&view))
}
