//! `audit` and `whoami`.

use clap::Args;
use tokenfleet_proto::v1 as pb;

use super::{Ctx, collect_pages};
use crate::args::ListArgs;
use crate::enums::AuditKind;
use crate::error::CtlError;
use crate::view::{AuditEventView, WhoAmIView};

/// `audit`
#[derive(Debug, Clone, Args)]
pub struct AuditArgs {
    /// Tenant whose events to list (default: fleet-wide events; fleet-admin only).
    #[arg(long, env = "TOKENFLEET_TENANT", value_name = "TENANT")]
    pub tenant: Option<String>,
    /// Show at most N events.
    #[arg(long, default_value_t = 50, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub limit: u64,
    /// Events per request to the broker (1-1000).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(1..=1000))]
    pub page_size: Option<i32>,
    /// Which records: changes that took effect, refused attempts, token issuances, or all.
    #[arg(long, value_enum, default_value_t = AuditKind::All)]
    pub kind: AuditKind,
}

/// Runs `audit`.
pub async fn run_audit(args: AuditArgs, ctx: &Ctx) -> Result<(), CtlError> {
    let tenant = args.tenant.unwrap_or_default();
    let kind = args.kind.as_str().to_owned();
    let list = ListArgs {
        page_size: args.page_size,
        limit: Some(args.limit),
    };
    let events = collect_pages(list, |page_size, page_token| {
        let req = pb::ListAuditEventsRequest {
            tenant: tenant.clone(),
            page_size,
            page_token,
            kind: kind.clone(),
        };
        async move {
            let page = ctx
                .call(|mut c| async move { c.list_audit_events(req).await })
                .await?;
            Ok((page.events, page.next_page_token))
        }
    })
    .await?;
    ctx.printer
        .list(&events.iter().map(AuditEventView::from).collect::<Vec<_>>())
}

/// Runs `whoami`.
pub async fn run_whoami(ctx: &Ctx) -> Result<(), CtlError> {
    let me = ctx
        .call(|mut c| async move { c.who_am_i(pb::WhoAmIRequest {}).await })
        .await?;
    ctx.printer.object(&WhoAmIView::from(&me))
}
