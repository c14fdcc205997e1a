//! `tenant create|list|show|update|delete`: the generic verbs ([`super::crud`]) with a tenant's
//! one settable field.

use clap::Args;
use tokenfleet_proto::v1 as pb;

use super::crud::{self, CrudOf, CrudResource, Nothing};
use super::resource::{self, Name, Tenants};
use super::{Changes, Ctx, version_of};
use crate::args::{ListArgs, TenantName, VersionArg};
use crate::error::CtlError;

/// `tenant …`
pub type TenantCommand = CrudOf<Tenants>;

/// Settable fields of a tenant.
#[derive(Debug, Clone, Default, Args)]
pub struct TenantFields {
    /// Human-readable name.
    #[arg(long, value_name = "TEXT")]
    pub display_name: Option<String>,
}

impl CrudResource for Tenants {
    type Id = TenantName;
    type Scope = Nothing;
    type New = Nothing;
    type Fields = TenantFields;
    type Clear = Nothing;

    async fn from_create_flags(
        _: &Ctx,
        id: Name,
        _: Nothing,
        fields: TenantFields,
    ) -> Result<pb::CreateTenantRequest, CtlError> {
        Ok(resource::create_request::<Tenants>(id, |t, c| {
            apply(fields, t, c)
        }))
    }
    async fn from_update_flags(
        _: &Ctx,
        id: Name,
        fields: TenantFields,
        _: Nothing,
        version: VersionArg,
    ) -> Result<pb::UpdateTenantRequest, CtlError> {
        update_request(id, fields, version)
    }
    async fn list_command(ctx: &Ctx, scope: Nothing, list: ListArgs) -> Result<(), CtlError> {
        crud::list_in::<Tenants>(ctx, scope, list).await
    }
}

/// Runs `tenant …`.
pub async fn run(cmd: TenantCommand, ctx: &Ctx) -> Result<(), CtlError> {
    crud::run::<Tenants>(cmd, ctx).await
}

/// Sets the fields whose flags were given.
fn apply(fields: TenantFields, tenant: &mut pb::Tenant, changes: &mut Changes) {
    changes.set(
        "display_name",
        fields.display_name,
        &mut tenant.display_name,
    );
}

fn update_request(
    id: Name,
    fields: TenantFields,
    version: VersionArg,
) -> Result<pb::UpdateTenantRequest, CtlError> {
    let version = version_of(version.version);
    resource::update_request::<Tenants>(id, version, |t, c| apply(fields, t, c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_sends_only_given_fields_and_the_version() {
        let req = update_request(
            Name::global("acme".into()),
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
            Name::global("acme".into()),
            TenantFields::default(),
            VersionArg { version: None },
        )
        .unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }
}
