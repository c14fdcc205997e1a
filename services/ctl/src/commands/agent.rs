//! `agent create|list|show|update|delete|enroll-code|revoke` (the last two with
//! [`crate::agent_identity`]).

use clap::{Args, Subcommand};
use tokenfleet_proto::v1 as pb;

use super::resource::{self, Agents, Name};
use super::{Changes, Ctx, version_of};
use crate::agent_identity::{EnrollCodeArgs, RevokeArgs, enroll_code_view};
use crate::args::{ConfirmArg, ListArgs, ScopedName, TenantScope, VersionArg};
use crate::error::CtlError;
use crate::view::AgentView;

/// `agent …`
#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Pre-register an agent.
    Create {
        #[command(flatten)]
        id: ScopedName,
        #[command(flatten)]
        fields: AgentFields,
    },
    /// List the agents of a tenant.
    List {
        #[command(flatten)]
        scope: TenantScope,
        #[command(flatten)]
        list: ListArgs,
    },
    /// Show one agent.
    Show {
        #[command(flatten)]
        id: ScopedName,
    },
    /// Change the given fields of an agent.
    Update {
        #[command(flatten)]
        id: ScopedName,
        #[command(flatten)]
        fields: AgentFields,
        #[command(flatten)]
        version: VersionArg,
    },
    /// Create a one-time enrollment code for `tokenfleet-agent enroll` (creating the agent when
    /// it is new). The code is printed once.
    EnrollCode(EnrollCodeArgs),
    /// Revoke an agent: its next call to the broker is refused. Final for this agent name.
    Revoke(RevokeArgs),
    /// Delete an agent (only when it hosts no devices).
    Delete {
        #[command(flatten)]
        id: ScopedName,
        #[command(flatten)]
        version: VersionArg,
        #[command(flatten)]
        confirm: ConfirmArg,
    },
}

/// Settable fields of an agent.
#[derive(Debug, Clone, Default, Args)]
pub struct AgentFields {
    /// Human-readable name (site).
    #[arg(long, value_name = "TEXT")]
    pub display_name: Option<String>,
}

/// Runs `agent …`.
pub async fn run(cmd: AgentCommand, ctx: &Ctx) -> Result<(), CtlError> {
    match cmd {
        AgentCommand::Create { id, fields } => {
            let req = create_request(Name::scoped(ctx, id)?, fields);
            resource::create::<Agents>(ctx, req).await
        }
        AgentCommand::List { scope, list } => {
            resource::list::<Agents>(ctx, ctx.tenant(scope.tenant)?, list).await
        }
        AgentCommand::Show { id } => resource::show::<Agents>(ctx, Name::scoped(ctx, id)?).await,
        AgentCommand::Update {
            id,
            fields,
            version,
        } => {
            let req = update_request(Name::scoped(ctx, id)?, fields, version)?;
            resource::update::<Agents>(ctx, req).await
        }
        AgentCommand::EnrollCode(mut args) => {
            args.id.tenant = ctx.tenant(args.id.tenant)?;
            let req = crate::agent_identity::enroll_code_request(args);
            let created = ctx
                .call(|mut c| async move { c.create_enrollment_code(req).await })
                .await?;
            ctx.printer
                .object(&enroll_code_view(&created, &ctx.settings.broker))
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
        AgentCommand::Delete {
            id,
            version,
            confirm,
        } => {
            let name = Name::scoped(ctx, id)?;
            resource::delete::<Agents>(ctx, name, version.version, confirm.yes).await
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
