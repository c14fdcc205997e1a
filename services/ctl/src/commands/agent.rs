//! `agent create|list|show|update|delete|enroll-code|revoke` (the last two with
//! [`crate::agent_identity`]).

use tokenfleet_proto::v1 as pb;

use super::resource::{self, Agents, Name};
use super::{Changes, Ctx, version_of};
use crate::cli::{AgentCommand, AgentFields, ScopedName, VersionArg};
use crate::error::CtlError;
use crate::view::AgentView;

pub(super) async fn run(cmd: AgentCommand, ctx: &Ctx) -> Result<(), CtlError> {
    match cmd {
        AgentCommand::Create { id, fields } => {
            let req = create_request(id, fields);
            resource::create::<Agents>(ctx, req).await
        }
        AgentCommand::List { scope, list } => {
            resource::list::<Agents>(ctx, scope.tenant, list).await
        }
        AgentCommand::Show { id } => resource::show::<Agents>(ctx, Name::scoped(id)).await,
        AgentCommand::Update {
            id,
            fields,
            version,
        } => {
            let req = update_request(id, fields, version)?;
            resource::update::<Agents>(ctx, req).await
        }
        AgentCommand::EnrollCode(args) => {
            let req = crate::agent_identity::enroll_code_request(args);
            let created = ctx
                .call(|mut c| async move { c.create_enrollment_code(req).await })
                .await?;
            ctx.printer.object(&crate::agent_identity::enroll_code_view(
                &created,
                &ctx.global.broker,
            ))
        }
        AgentCommand::Revoke(args) => {
            let req = crate::agent_identity::revoke_request(args);
            let a = ctx
                .call(|mut c| async move { c.revoke_agent(req).await })
                .await?;
            ctx.printer.object(&AgentView::from(&a))
        }
        AgentCommand::Delete { id, version } => {
            resource::delete::<Agents>(ctx, Name::scoped(id), version.version).await
        }
    }
}

fn apply(f: AgentFields, a: &mut pb::Agent, changes: &mut Changes) {
    changes.set("display_name", f.display_name, &mut a.display_name);
}

fn create_request(id: ScopedName, fields: AgentFields) -> pb::CreateAgentRequest {
    let mut agent = pb::Agent {
        tenant: id.tenant,
        name: id.name,
        ..Default::default()
    };
    apply(fields, &mut agent, &mut Changes::default());
    pb::CreateAgentRequest { agent: Some(agent) }
}

fn update_request(
    id: ScopedName,
    fields: AgentFields,
    version: VersionArg,
) -> Result<pb::UpdateAgentRequest, CtlError> {
    let mut agent = pb::Agent {
        tenant: id.tenant,
        name: id.name,
        version: version_of(version.version),
        ..Default::default()
    };
    let mut changes = Changes::default();
    apply(fields, &mut agent, &mut changes);
    Ok(pb::UpdateAgentRequest {
        agent: Some(agent),
        update_mask: Some(changes.into_mask("agent")?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> ScopedName {
        ScopedName {
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
