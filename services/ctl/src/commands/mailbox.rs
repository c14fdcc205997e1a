//! `mailbox create|list|show|update|delete` (the generic verbs of [`super::crud`]; `list` also
//! across tenants, `--all-tenants`, and by token status, `--status reauth_required`) and
//! `mailbox consent|delete-token|refresh`.

use clap::{Args, Subcommand};
use tokenfleet_proto::v1 as pb;

use super::consent::{ConsentArgs, DeleteTokenArgs};
use super::crud::{self, CrudOf, CrudResource, Nothing};
use super::resource::{self, Mailboxes, Name};
use super::{Changes, Ctx, version_of};
use crate::args::{ListArgs, ScopedName, TenantsScope, VersionArg};
use crate::enums::{GrantType, MailPurpose, MailboxKind, TokenStatus};
use crate::error::CtlError;

/// `mailbox …`
#[derive(Debug, Subcommand)]
pub enum MailboxCommand {
    #[command(flatten)]
    Crud(CrudOf<Mailboxes>),
    /// Obtain the mailbox's grant: show the device code or sign-in URL and wait for the person
    /// (app-only and service-account mailboxes get their token at once). Exit 0 only when ACTIVE.
    Consent(ConsentArgs),
    /// Delete the mailbox's stored tokens (revoked at the provider where possible).
    DeleteToken(DeleteTokenArgs),
    /// Refresh the mailbox's access token now.
    Refresh(ScopedName),
}

/// Which mailboxes `mailbox list` shows.
#[derive(Debug, Clone, Default, Args)]
pub struct MailboxScope {
    #[command(flatten)]
    pub scope: TenantsScope,
    /// Only mailboxes whose token has this status (case does not matter).
    #[arg(long, value_enum, ignore_case = true, value_name = "STATUS")]
    pub status: Option<TokenStatus>,
}

/// Settable fields of a mailbox.
#[derive(Debug, Clone, Default, Args)]
pub struct MailboxFields {
    /// E-mail address (also the SASL user name).
    #[arg(long, value_name = "EMAIL")]
    pub address: Option<String>,
    /// Provider (in the same tenant) that obtains the tokens.
    #[arg(long, value_name = "NAME")]
    pub provider: Option<String>,
    /// How tokens are obtained.
    #[arg(long, value_enum)]
    pub grant_type: Option<GrantType>,
    /// Role of the mailbox.
    #[arg(long, value_enum)]
    pub kind: Option<MailboxKind>,
    /// What the tokens are used for; repeat for several. Replaces the list on update.
    #[arg(long = "purpose", value_enum, value_name = "PURPOSE")]
    pub purposes: Vec<MailPurpose>,
    /// Disable the mailbox (no refreshes, no issuance); `--disabled=false` enables it.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub disabled: Option<bool>,
    /// Account expected to sign in at consent when it is not the mailbox's address (e.g. one
    /// with Send As rights on it); `--consent-account ""` clears it. A consent signed in with any
    /// other account fails and stores nothing. Changing it discards the grant.
    #[arg(long, value_name = "EMAIL")]
    pub consent_account: Option<String>,
}

impl CrudResource for Mailboxes {
    type Id = ScopedName;
    type Scope = MailboxScope;
    type New = Nothing;
    type Fields = MailboxFields;
    type Clear = Nothing;

    async fn from_create_flags(
        _: &Ctx,
        id: Name,
        _: Nothing,
        fields: MailboxFields,
    ) -> Result<pb::CreateMailboxRequest, CtlError> {
        Ok(create_request(id, fields))
    }
    async fn from_update_flags(
        _: &Ctx,
        id: Name,
        fields: MailboxFields,
        _: Nothing,
        version: VersionArg,
    ) -> Result<pb::UpdateMailboxRequest, CtlError> {
        update_request(id, fields, version)
    }
    async fn list_command(ctx: &Ctx, scope: MailboxScope, list: ListArgs) -> Result<(), CtlError> {
        run_list(ctx, scope, list).await
    }
}

/// Runs `mailbox …`.
pub async fn run(cmd: MailboxCommand, ctx: &Ctx) -> Result<(), CtlError> {
    match cmd {
        MailboxCommand::Crud(cmd) => crud::run::<Mailboxes>(cmd, ctx).await,
        MailboxCommand::Consent(args) => super::consent::run_consent(args, ctx).await,
        MailboxCommand::DeleteToken(args) => super::consent::run_delete_token(args, ctx).await,
        MailboxCommand::Refresh(target) => super::consent::run_refresh(target, ctx).await,
    }
}

/// `mailbox list`: one tenant's, or every visible tenant's, filtered by token status.
async fn run_list(ctx: &Ctx, scope: MailboxScope, list: ListArgs) -> Result<(), CtlError> {
    let MailboxScope { scope, status } = scope;
    let has_status = |m: &pb::Mailbox| {
        status
            .is_none_or(|s| m.token.as_ref().map(|t| t.status).unwrap_or_default() == s.to_proto())
    };
    let keep: Option<resource::Keep<'_, pb::Mailbox>> = status.map(|_| &has_status as _);
    let found = resource::fetch_scoped::<Mailboxes>(ctx, scope, list, keep).await?;
    resource::print_scoped::<Mailboxes>(ctx, found)
}

/// Sets the fields whose flags were given.
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

fn create_request(id: Name, fields: MailboxFields) -> pb::CreateMailboxRequest {
    resource::create_request::<Mailboxes>(id, |m, c| apply(fields, m, c))
}

fn update_request(
    id: Name,
    fields: MailboxFields,
    version: VersionArg,
) -> Result<pb::UpdateMailboxRequest, CtlError> {
    let version = version_of(version.version);
    resource::update_request::<Mailboxes>(id, version, |m, c| apply(fields, m, c))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use crate::commands::crud::Crud;
    use clap::Parser;

    fn name(id: ScopedName) -> Name {
        Name {
            tenant: id.tenant,
            name: id.name,
        }
    }

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
        let MailboxCommand::Crud(Crud::Create { id, fields, .. }) = parse(&[
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
        let m = create_request(name(id), fields).mailbox.unwrap();
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
        let MailboxCommand::Crud(Crud::Update {
            id,
            fields,
            version,
            ..
        }) = parse(&[
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
        let req = update_request(name(id), fields, version).unwrap();
        assert_eq!(req.update_mask.unwrap().paths, vec!["purposes", "disabled"]);
        let m = req.mailbox.unwrap();
        assert!(m.disabled);
        assert_eq!(m.purposes, vec![pb::MailPurpose::Imap as i32]);
        assert_eq!(m.version, 0);
        assert!(m.address.is_empty());
    }

    #[test]
    fn re_enabling_is_an_explicit_false() {
        let MailboxCommand::Crud(Crud::Update {
            id,
            fields,
            version,
            ..
        }) = parse(&["update", "--tenant", "a", "--name", "m", "--disabled=false"])
        else {
            panic!("expected update");
        };
        let req = update_request(name(id), fields, version).unwrap();
        assert_eq!(req.update_mask.unwrap().paths, vec!["disabled"]);
        assert!(!req.mailbox.unwrap().disabled);
    }
}
