//! `tenant create|list|show|update|delete`.

use tokenfleet_proto::v1 as pb;

use super::{Changes, Ctx, collect_pages, version_of};
use crate::cli::{TenantCommand, TenantFields, TenantName, VersionArg};
use crate::error::CtlError;
use crate::view::{DeletedView, TenantView};

pub(super) async fn run(cmd: TenantCommand, ctx: &Ctx) -> Result<(), CtlError> {
    match cmd {
        TenantCommand::Create { id, fields } => {
            let req = create_request(id, fields);
            let t = ctx
                .call(|mut c| async move { c.create_tenant(req).await })
                .await?;
            ctx.printer.object(&TenantView::from(&t))
        }
        TenantCommand::List { list } => {
            let all = collect_pages(list, |page_size, page_token| async move {
                let req = pb::ListTenantsRequest {
                    page_size,
                    page_token,
                };
                let page = ctx
                    .call(|mut c| async move { c.list_tenants(req).await })
                    .await?;
                Ok((page.tenants, page.next_page_token))
            })
            .await?;
            ctx.printer
                .list(&all.iter().map(TenantView::from).collect::<Vec<_>>())
        }
        TenantCommand::Show { id } => {
            let req = pb::GetTenantRequest { name: id.name };
            let t = ctx
                .call(|mut c| async move { c.get_tenant(req).await })
                .await?;
            ctx.printer.object(&TenantView::from(&t))
        }
        TenantCommand::Update {
            id,
            fields,
            version,
        } => {
            let req = update_request(id, fields, version)?;
            let t = ctx
                .call(|mut c| async move { c.update_tenant(req).await })
                .await?;
            ctx.printer.object(&TenantView::from(&t))
        }
        TenantCommand::Delete { id, version } => {
            let req = pb::DeleteTenantRequest {
                name: id.name.clone(),
                version: version_of(version.version),
            };
            ctx.call(|mut c| async move { c.delete_tenant(req).await })
                .await?;
            ctx.printer.deleted(&DeletedView {
                deleted: true,
                kind: "tenant",
                tenant: None,
                name: id.name,
            })
        }
    }
}

fn apply(fields: TenantFields, tenant: &mut pb::Tenant, changes: &mut Changes) {
    changes.set(
        "display_name",
        fields.display_name,
        &mut tenant.display_name,
    );
}

fn create_request(id: TenantName, fields: TenantFields) -> pb::CreateTenantRequest {
    let mut tenant = pb::Tenant {
        name: id.name,
        ..Default::default()
    };
    apply(fields, &mut tenant, &mut Changes::default());
    pb::CreateTenantRequest {
        tenant: Some(tenant),
    }
}

fn update_request(
    id: TenantName,
    fields: TenantFields,
    version: VersionArg,
) -> Result<pb::UpdateTenantRequest, CtlError> {
    let mut tenant = pb::Tenant {
        name: id.name,
        version: version_of(version.version),
        ..Default::default()
    };
    let mut changes = Changes::default();
    apply(fields, &mut tenant, &mut changes);
    Ok(pb::UpdateTenantRequest {
        tenant: Some(tenant),
        update_mask: Some(changes.into_mask("tenant")?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_sends_only_given_fields_and_the_version() {
        let req = update_request(
            TenantName {
                name: "acme".into(),
            },
            TenantFields {
                display_name: Some("Acme Corp".into()),
            },
            VersionArg { version: Some(4) },
        )
        .unwrap();
        let tenant = req.tenant.unwrap();
        assert_eq!(tenant.name, "acme");
        assert_eq!(tenant.display_name, "Acme Corp");
        assert_eq!(tenant.version, 4);
        assert_eq!(req.update_mask.unwrap().paths, vec!["display_name"]);
    }

    #[test]
    fn update_without_fields_is_refused() {
        let err = update_request(
            TenantName {
                name: "acme".into(),
            },
            TenantFields::default(),
            VersionArg { version: None },
        )
        .unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }
}
