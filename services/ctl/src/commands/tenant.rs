//! `tenant create|list|show|update|delete`.

use tokenfleet_proto::v1 as pb;

use super::resource::{self, Name, Tenants};
use super::{Changes, Ctx, version_of};
use crate::cli::{TenantCommand, TenantFields, TenantName, VersionArg};
use crate::error::CtlError;

pub(super) async fn run(cmd: TenantCommand, ctx: &Ctx) -> Result<(), CtlError> {
    match cmd {
        TenantCommand::Create { id, fields } => {
            let req = create_request(id, fields);
            resource::create::<Tenants>(ctx, req).await
        }
        TenantCommand::List { list } => resource::list::<Tenants>(ctx, String::new(), list).await,
        TenantCommand::Show { id } => resource::show::<Tenants>(ctx, Name::global(id.name)).await,
        TenantCommand::Update {
            id,
            fields,
            version,
        } => {
            let req = update_request(id, fields, version)?;
            resource::update::<Tenants>(ctx, req).await
        }
        TenantCommand::Delete { id, version } => {
            resource::delete::<Tenants>(ctx, Name::global(id.name), version.version).await
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
