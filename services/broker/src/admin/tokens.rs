//! Token RPCs on the wire: `DeleteToken` and `RefreshNow`. The operations (authorization, the
//! lifecycle, audit) are the core's [`crate::tokens::operator::delete_token`] and
//! [`crate::tokens::operator::refresh_now`]; this file only converts.

use tokenfleet_proto::v1 as pb;

use super::mailboxes::mailbox_out;
use crate::authz::Principal;
use crate::ops::Error;
use crate::state::BrokerState;
use crate::tokens::lifecycle::TokenService;
use crate::tokens::operator;

pub(super) async fn delete_token(
    _state: &BrokerState,
    principal: &Principal,
    req: pb::DeleteTokenRequest,
    tokens: &TokenService,
) -> Result<pb::Mailbox, Error> {
    operator::delete_token(tokens, principal, &req.tenant, &req.mailbox)
        .await
        .map(mailbox_out)
}

pub(super) async fn refresh_now(
    _state: &BrokerState,
    principal: &Principal,
    req: pb::RefreshNowRequest,
    tokens: &TokenService,
) -> Result<pb::Mailbox, Error> {
    operator::refresh_now(tokens, principal, &req.tenant, &req.mailbox)
        .await
        .map(mailbox_out)
}
