//! `agent create|list|show|update|delete` (the generic verbs of [`super::crud`]) and
//! `agent enroll-code|revoke` (with [`crate::agent_identity`]).

use clap::{Args, Subcommand};
use tokenfleet_proto::v1 as pb;

use super::crud::{self, CrudOf, CrudResource, Nothing};
use super::resource::{self, Agents, Name};
use super::{Changes, Ctx, version_of};
use crate::agent_identity::{EnrollCodeArgs, RevokeArgs, enroll_code_view};
use crate::args::{ListArgs, ScopedName, TenantsScope, VersionArg};
use crate::error::CtlError;
use crate::view::AgentView;

/// `agent …`
#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    #[command(flatten)]
    Crud(CrudOf<Agents>),
    /// Create a one-time enrollment code for `tokenfleet-agent enroll` (creating the agent when
    /// it is new). The code is printed once.
    EnrollCode(EnrollCodeArgs),
    /// Revoke an agent: its next call to the broker is refused. Final for this agent name.
    Revoke(RevokeArgs),
}

/// Settable fields of an agent.
#[derive(Debug, Clone, Default, Args)]
pub struct AgentFields {
    /// Human-readable name (site).
    #[arg(long, value_name = "TEXT")]
    pub display_name: Option<String>,
}

impl CrudResource for Agents {
    type Id = ScopedName;
    type Scope = TenantsScope;
    type New = Nothing;
    type Fields = AgentFields;
    type Clear = Nothing;

    async fn from_create_flags(
        _: &Ctx,
        id: Name,
        _: Nothing,
        fields: AgentFields,
    ) -> Result<pb::CreateAgentRequest, CtlError> {
        Ok(create_request(id, fields))
    }
    async fn from_update_flags(
        _: &Ctx,
        id: Name,
        fields: AgentFields,
        _: Nothing,
        version: VersionArg,
    ) -> Result<pb::UpdateAgentRequest, CtlError> {
        update_request(id, fields, version)
    }
    async fn list_command(ctx: &Ctx, scope: TenantsScope, list: ListArgs) -> Result<(), CtlError> {
        crud::list_scoped::<Agents>(ctx, scope, list).await
    }
}

/// Runs `agent …`.
pub async fn run(cmd: AgentCommand, ctx: &Ctx) -> Result<(), CtlError> {
    match cmd {
        AgentCommand::Crud(cmd) => crud::run::<Agents>(cmd, ctx).await,
        AgentCommand::EnrollCode(mut args) => {
            args.id.tenant = ctx.tenant(args.id.tenant)?;
            let req = crate::agent_identity::enroll_code_request(args);
            let created = ctx
                .call(|mut c| async move { c.create_enrollment_code(req).await })
                .await?;
            ctx.printer
                .shown_once(&enroll_code_view(&created, &ctx.settings.broker))
        }
        AgentCommand::Revoke(mut args) => {
            args.id.tenant = ctx.tenant(args.id.tenant)?;
            let what = format!("revoke agent {}/{}", args.id.tenant, args.id.name);
            ctx.confirm(&what, args.confirm.yes)?;
            let req = crate::agent_identity::revoke_request(args);
            let a = ctx
                .call(|mut c| async move { c.revoke_agent(req).await })
                .await?;
            ctx.printer.object(&AgentView::from(&a))
        }
    }
}

fn apply(f: AgentFields, a: &mut pb::Agent, changes: &mut Changes) {
    changes.set("display_name", f.display_name, &mut a.display_name);
}

fn create_request(id: Name, fields: AgentFields) -> pb::CreateAgentRequest {
    resource::create_request::<Agents>(id, |a, c| apply(fields, a, c))
}

fn update_request(
    id: Name,
    fields: AgentFields,
    version: VersionArg,
) -> Result<pb::UpdateAgentRequest, CtlError> {
    let version = version_of(version.version);
    resource::update_request::<Agents>(id, version, |a, c| apply(fields, a, c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> Name {
        Name {
            tenant: "acme".into(),
            name: "site-a".into(),
        }
    }

    #[test]
    fn create_and_update_map_the_display_name() {
        let fields = AgentFields {
            display_name: Some("Head office".into()),
        };
        let a = create_request(id(), fields.clone()).agent.unwrap();
        assert_eq!((a.tenant.as_str(), a.name.as_str()), ("acme", "site-a"));
        assert_eq!(a.display_name, "Head office");
        let req = update_request(id(), fields, VersionArg { version: None }).unwrap();
        assert_eq!(req.update_mask.unwrap().paths, vec!["display_name"]);
        assert_eq!(req.agent.unwrap().version, 0);
    }

    #[test]
    fn update_without_fields_is_refused() {
        assert!(
            update_request(
                id(),
                AgentFields::default(),
                VersionArg { version: Some(1) }
            )
            .is_err()
        );
    }
}
