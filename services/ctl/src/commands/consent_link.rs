//! `consent-link create|list|revoke`: single-use links a mailbox's owner opens to consent
//! themselves (issue 14). `create` prints the link once (the broker keeps only its hash); `list`
//! shows the links of a tenant or one mailbox with their state; `revoke` ends a link before it is
//! used (asks first). Authorization is the broker's: operators of the tenant create and revoke,
//! viewers only list.

use clap::Subcommand;
use tokenfleet_proto::v1 as pb;

use super::Ctx;
use crate::args::{ConfirmArg, ScopedName, TenantScope};
use crate::error::CtlError;
use crate::view::{ConsentLinkView, CreatedConsentLinkView};

/// Longest link lifetime the broker accepts (30 days), in seconds.
const MAX_TTL_SECONDS: i64 = 30 * 24 * 3600;

/// `consent-link …`
#[derive(Debug, Subcommand)]
pub enum ConsentLinkCommand {
    /// Create a link for one mailbox and print it once; send it to the mailbox's owner.
    Create {
        /// The mailbox (NAME, or --name) and its tenant.
        #[command(flatten)]
        mailbox: ScopedName,
        /// How long the link stays valid, in seconds (300 to 2592000; default 7 days).
        #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(i64).range(300..=MAX_TTL_SECONDS))]
        ttl_seconds: Option<i64>,
    },
    /// List consent links (never their tokens) with their state.
    List {
        #[command(flatten)]
        scope: TenantScope,
        /// Only the links of this mailbox.
        #[arg(long, value_name = "MAILBOX", default_value = "")]
        mailbox: String,
    },
    /// Revoke a link: it stops working at once. Asks first.
    Revoke {
        /// The link's id (as `create` and `list` show it) and its tenant.
        #[command(flatten)]
        link: ScopedName,
        #[command(flatten)]
        confirm: ConfirmArg,
    },
}

/// Runs `consent-link …`.
pub async fn run(cmd: ConsentLinkCommand, ctx: &Ctx) -> Result<(), CtlError> {
    match cmd {
        ConsentLinkCommand::Create {
            mailbox,
            ttl_seconds,
        } => {
            let req = pb::CreateConsentLinkRequest {
                tenant: ctx.tenant(mailbox.tenant)?,
                mailbox: mailbox.name,
                // The value parser keeps it within the broker's range, which fits an i32.
                ttl_seconds: ttl_seconds.map_or(0, |s| i32::try_from(s).unwrap_or(i32::MAX)),
            };
            let created = ctx
                .call(|mut c| async move { c.create_consent_link(req).await })
                .await?;
            let link = created
                .link
                .as_ref()
                .map(ConsentLinkView::from)
                .ok_or_else(|| {
                    CtlError::Output("the broker's answer has no link record".to_owned())
                })?;
            eprintln!(
                "The link is shown this once; send it to the mailbox's owner now (the broker keeps only its hash)."
            );
            ctx.printer.shown_once(&CreatedConsentLinkView {
                url: created.url,
                link,
            })
        }
        ConsentLinkCommand::List { scope, mailbox } => {
            let req = pb::ListConsentLinksRequest {
                tenant: ctx.tenant(scope.tenant)?,
                mailbox,
            };
            let links = ctx
                .call(|mut c| async move { c.list_consent_links(req).await })
                .await?;
            ctx.printer.list(
                &links
                    .links
                    .iter()
                    .map(ConsentLinkView::from)
                    .collect::<Vec<_>>(),
            )
        }
        ConsentLinkCommand::Revoke { link, confirm } => {
            let tenant = ctx.tenant(link.tenant)?;
            ctx.confirm(
                &format!("revoke consent link {} of tenant {tenant}", link.name),
                confirm.yes,
            )?;
            let req = pb::RevokeConsentLinkRequest {
                tenant,
                id: link.name,
            };
            let revoked = ctx
                .call(|mut c| async move { c.revoke_consent_link(req).await })
                .await?;
            ctx.printer.object(&ConsentLinkView::from(&revoked))
        }
    }
}
