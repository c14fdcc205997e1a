//! `mailbox create|list|show|update|delete`.

use tokenfleet_proto::v1 as pb;

use super::resource::{self, Mailboxes, Name};
use super::{Changes, Ctx, version_of};
use crate::cli::{MailboxCommand, MailboxFields, ScopedName, VersionArg};
use crate::error::CtlError;

pub(super) async fn run(cmd: MailboxCommand, ctx: &Ctx) -> Result<(), CtlError> {
    match cmd {
        MailboxCommand::Create { id, fields } => {
            let req = create_request(id, fields);
            resource::create::<Mailboxes>(ctx, req).await
        }
        MailboxCommand::List { scope, list } => {
            resource::list::<Mailboxes>(ctx, scope.tenant, list).await
        }
        MailboxCommand::Show { id } => resource::show::<Mailboxes>(ctx, Name::scoped(id)).await,
        MailboxCommand::Update {
            id,
            fields,
            version,
        } => {
            let req = update_request(id, fields, version)?;
            resource::update::<Mailboxes>(ctx, req).await
        }
        MailboxCommand::Delete { id, version } => {
            resource::delete::<Mailboxes>(ctx, Name::scoped(id), version.version).await
        }
        MailboxCommand::Consent(args) => super::consent::run_consent(args, ctx).await,
        MailboxCommand::DeleteToken(target) => super::consent::run_delete_token(target, ctx).await,
        MailboxCommand::Refresh(target) => super::consent::run_refresh(target, ctx).await,
    }
}

fn apply(f: MailboxFields, m: &mut pb::Mailbox, changes: &mut Changes) {
    changes.set("address", f.address, &mut m.address);
    changes.set("provider", f.provider, &mut m.provider);
    changes.set(
        "grant_type",
        f.grant_type.map(|g| g.to_proto()),
        &mut m.grant_type,
    );
    changes.set("kind", f.kind.map(|k| k.to_proto()), &mut m.kind);
    let purposes = f.purposes.iter().map(|p| p.to_proto()).collect();
    changes.set_list("purposes", purposes, false, &mut m.purposes);
    changes.set("disabled", f.disabled, &mut m.disabled);
    changes.set("consent_account", f.consent_account, &mut m.consent_account);
}

fn create_request(id: ScopedName, fields: MailboxFields) -> pb::CreateMailboxRequest {
    let mut mailbox = pb::Mailbox {
        tenant: id.tenant,
        name: id.name,
        ..Default::default()
    };
    apply(fields, &mut mailbox, &mut Changes::default());
    pb::CreateMailboxRequest {
        mailbox: Some(mailbox),
    }
}

fn update_request(
    id: ScopedName,
    fields: MailboxFields,
    version: VersionArg,
) -> Result<pb::UpdateMailboxRequest, CtlError> {
    let mut mailbox = pb::Mailbox {
        tenant: id.tenant,
        name: id.name,
        version: version_of(version.version),
        ..Default::default()
    };
    let mut changes = Changes::default();
    apply(fields, &mut mailbox, &mut changes);
    Ok(pb::UpdateMailboxRequest {
        mailbox: Some(mailbox),
        update_mask: Some(changes.into_mask("mailbox")?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn parse(args: &[&str]) -> MailboxCommand {
        let cli = Cli::try_parse_from(
            ["tokenfleetctl", "mailbox"]
                .into_iter()
                .chain(args.iter().copied()),
        );
        match cli {
            Ok(Cli {
                command: Command::Mailbox(cmd),
                ..
            }) => cmd,
            other => panic!("did not parse: {other:?}"),
        }
    }

    #[test]
    fn create_maps_enums_and_repeated_purposes() {
        let MailboxCommand::Create { id, fields } = parse(&[
            "create",
            "--tenant",
            "acme",
            "--name",
            "scan",
            "--address",
            "scan@acme.example",
            "--provider",
            "m365",
            "--grant-type",
            "delegated_device_code",
            "--kind",
            "bulk",
            "--purpose",
            "send",
            "--purpose",
            "pop",
        ]) else {
            panic!("expected create");
        };
        let m = create_request(id, fields).mailbox.unwrap();
        assert_eq!(m.address, "scan@acme.example");
        assert_eq!(m.provider, "m365");
        assert_eq!(m.grant_type, pb::GrantType::DelegatedDeviceCode as i32);
        assert_eq!(m.kind, pb::MailboxKind::Bulk as i32);
        assert_eq!(
            m.purposes,
            vec![pb::MailPurpose::Send as i32, pb::MailPurpose::Pop as i32]
        );
        assert!(!m.disabled);
    }

    #[test]
    fn update_mask_for_disable_and_purposes() {
        let MailboxCommand::Update {
            id,
            fields,
            version,
        } = parse(&[
            "update",
            "--tenant",
            "acme",
            "--name",
            "scan",
            "--disabled",
            "--purpose",
            "imap",
        ])
        else {
            panic!("expected update");
        };
        let req = update_request(id, fields, version).unwrap();
        assert_eq!(req.update_mask.unwrap().paths, vec!["purposes", "disabled"]);
        let m = req.mailbox.unwrap();
        assert!(m.disabled);
        assert_eq!(m.purposes, vec![pb::MailPurpose::Imap as i32]);
        assert_eq!(m.version, 0);
        assert!(m.address.is_empty());
    }

    #[test]
    fn re_enabling_is_an_explicit_false() {
        let MailboxCommand::Update {
            id,
            fields,
            version,
        } = parse(&["update", "--tenant", "a", "--name", "m", "--disabled=false"])
        else {
            panic!("expected update");
        };
        let req = update_request(id, fields, version).unwrap();
        assert_eq!(req.update_mask.unwrap().paths, vec!["disabled"]);
        assert!(!req.mailbox.unwrap().disabled);
    }
}
