//! Mailboxes on the wire: the Admin API's mailbox calls convert the `Mailbox` message to the
//! core's [`MailboxInput`] and its [`MailboxView`] back, and call the core's domain-typed mailbox
//! resource ([`tokenfleet_core::resources::Mailboxes`]: authorization, validation, the provider
//! checks, versions, references, the grant's fate, audit). The web console calls the same
//! operations without converting. The token and consent calls answer with a mailbox too
//! ([`mailbox_out`] of the core's view, [`mailbox_with_grant`] of a mailbox and its grant).

use tokenfleet_core::resources::mailboxes::{self as core_mailboxes, MailboxInput, MailboxView};
use tokenfleet_domain::Mailbox;
use tokenfleet_proto::v1 as pb;

pub(crate) use tokenfleet_core::resources::Mailboxes;

use crate::convert;
use crate::tokens::grant::GrantRecord;

/// The core's form of a mailbox a caller sent (validated by the core, after authorization).
pub(crate) fn mailbox_in(wire: Option<pb::Mailbox>) -> MailboxInput {
    convert::mailbox_in(&wire.unwrap_or_default())
}

/// The wire form of a mailbox as reads show it.
pub(crate) fn mailbox_out(view: MailboxView) -> pb::Mailbox {
    convert::mailbox_view_to_proto(&view)
}

/// Wire form of a mailbox whose token state comes from its grant record (when there is one): a
/// disabled mailbox shows DISABLED; a pending device-code consent shows its user code.
pub fn mailbox_with_grant(
    mailbox: &Mailbox,
    version: u64,
    grant: Option<&GrantRecord>,
) -> pb::Mailbox {
    mailbox_out(core_mailboxes::view_of(mailbox, version, grant))
}
