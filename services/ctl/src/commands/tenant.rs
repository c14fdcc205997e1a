//! `tenant create|list|show|update|delete`.

use clap::{Args, Subcommand};
use tokenfleet_proto::v1 as pb;

use super::resource::{self, Name, Tenants};
use super::{Changes, Ctx, version_of};
use crate::args::{ConfirmArg, ListArgs, TenantName, VersionArg};
use crate::error::CtlError;

/// `tenant …`
#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Create a tenant.
    Create {
        #[command(flatten)]
        id: TenantName,
        #[command(flatten)]
        fields: TenantFields,
    },
    /// List all tenants.
    List {
        #[command(flatten)]
        list: ListArgs,
    },
    /// Show one tenant.
    Show {
        #[command(flatten)]
        id: TenantName,
    },
    /// Change the given fields of a tenant.
    Update {
        #[command(flatten)]
        id: TenantName,
        #[command(flatten)]
        fields: TenantFields,
        #[command(flatten)]
        version: VersionArg,
    },
    /// Delete a tenant (only when it holds nothing).
    Delete {
        #[command(flatten)]
        id: TenantName,
        #[command(flatten)]
        version: VersionArg,
        #[command(flatten)]
        confirm: ConfirmArg,
    },
}

/// Settable fields of a tenant.
#[derive(Debug, Clone, Default, Args)]
pub struct TenantFields {
    /// Human-readable name.
    #[arg(long, value_name = "TEXT")]
    pub display_name: Option<String>,
}

/// Runs `tenant …`.
pub async fn run(cmd: TenantCommand, ctx: &Ctx) -> Result<(), CtlError> {
    match cmd {
        TenantCommand::Create { id, fields } => {
            resource::create::<Tenants>(ctx, create_request(id, fields)).await
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
        TenantCommand::Delete {
            id,
            version,
            confirm,
        } => {
            let name = Name::global(id.name);
            resource::delete::<Tenants>(ctx, name, version.version, confirm.yes).await
        }
    }
}

/// Sets the fields whose flags were given.
pub(super) fn apply(fields: TenantFields, tenant: &mut pb::Tenant, changes: &mut Changes) {
    changes.set(
        "display_name",
        fields.display_name,
        &mut tenant.display_name,
    );
}

fn create_request(id: TenantName, fields: TenantFields) -> pb::CreateTenantRequest {
    resource::create_request::<Tenants>(Name::global(id.name), |t, c| apply(fields, t, c))
}

fn update_request(
    id: TenantName,
    fields: TenantFields,
    version: VersionArg,
) -> Result<pb::UpdateTenantRequest, CtlError> {
    let name = Name::global(id.name);
    let version = version_of(version.version);
    resource::update_request::<Tenants>(name, version, |t, c| apply(fields, t, c))
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
