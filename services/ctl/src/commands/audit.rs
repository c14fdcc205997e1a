//! `audit` and `whoami`.

use tokenfleet_proto::v1 as pb;

use super::{Ctx, collect_pages};
use crate::cli::{AuditArgs, ListArgs};
use crate::error::CtlError;
use crate::view::{AuditEventView, WhoAmIView};

pub(super) async fn run_audit(args: AuditArgs, ctx: &Ctx) -> Result<(), CtlError> {
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

pub(super) async fn run_whoami(ctx: &Ctx) -> Result<(), CtlError> {
    let me = ctx
        .call(|mut c| async move { c.who_am_i(pb::WhoAmIRequest {}).await })
        .await?;
    ctx.printer.object(&WhoAmIView::from(&me))
}
