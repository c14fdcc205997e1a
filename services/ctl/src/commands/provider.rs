//! `provider create|list|show|update|delete`: the generic verbs of [`super::crud`] with a
//! provider's flags, secret files and endpoint merging.

use std::path::PathBuf;

use clap::Args;
use tokenfleet_proto::v1 as pb;

use super::crud::{self, CrudOf, CrudResource};
use super::resource::{self, Name, Providers};
use super::{Changes, Ctx, leaf, version_of};
use crate::args::{ListArgs, TenantsScope, VersionArg};
use crate::enums::ProviderKind;
use crate::error::CtlError;
use crate::input::FileInput;

/// `provider …`
pub type ProviderCommand = CrudOf<Providers>;

/// What only `provider create` takes.
#[derive(Debug, Clone, Args)]
pub struct ProviderNew {
    /// Kind of app registration (cannot change later).
    #[arg(long, value_enum)]
    pub kind: ProviderKind,
}

/// Settable fields of a provider.
#[derive(Debug, Clone, Default, Args)]
pub struct ProviderFields {
    /// Microsoft: Entra tenant segment (organizations, common, consumers, tenant id or domain).
    #[arg(long, value_name = "SEGMENT")]
    pub authority: Option<String>,
    /// OAuth client (application) id.
    #[arg(long, value_name = "ID")]
    pub client_id: Option<String>,
    /// File holding the OAuth client secret ("-" reads standard input).
    #[arg(long, value_name = "PATH")]
    pub client_secret_file: Option<PathBuf>,
    /// Google service-account key JSON file ("-" reads standard input).
    #[arg(long, value_name = "PATH")]
    pub service_account_key_file: Option<PathBuf>,
    /// Authorization endpoint override.
    #[arg(long, value_name = "URL")]
    pub authorize_url: Option<String>,
    /// Token endpoint override.
    #[arg(long, value_name = "URL")]
    pub token_url: Option<String>,
    /// Device authorization endpoint override.
    #[arg(long, value_name = "URL")]
    pub device_code_url: Option<String>,
    /// Revocation endpoint override.
    #[arg(long, value_name = "URL")]
    pub revoke_url: Option<String>,
    /// HTTPS proxy for calls to this provider, e.g. http://proxy.example:3128.
    #[arg(long, value_name = "URL")]
    pub http_proxy: Option<String>,
    /// Extra trusted CA certificate (PEM file) for calls to this provider.
    #[arg(long, value_name = "PATH")]
    pub extra_ca_file: Option<PathBuf>,
    /// Scope to request (generic providers); repeat for several. Replaces the list on update.
    #[arg(long = "scope", value_name = "SCOPE")]
    pub scopes: Vec<String>,
}

/// Fields of a provider that `update` can empty.
#[derive(Debug, Clone, Default, Args)]
pub struct ProviderClear {
    /// Remove the stored client secret.
    #[arg(long, conflicts_with = "client_secret_file")]
    pub clear_client_secret: bool,
    /// Remove the stored service-account key.
    #[arg(long, conflicts_with = "service_account_key_file")]
    pub clear_service_account_key: bool,
    /// Empty the scope list.
    #[arg(long, conflicts_with = "scopes")]
    pub clear_scopes: bool,
    /// Remove the extra trusted CA certificate.
    #[arg(long, conflicts_with = "extra_ca_file")]
    pub clear_extra_ca: bool,
}

impl CrudResource for Providers {
    type Id = crate::args::ScopedName;
    type Scope = TenantsScope;
    type New = ProviderNew;
    type Fields = ProviderFields;
    type Clear = ProviderClear;

    async fn from_create_flags(
        _: &Ctx,
        id: Name,
        new: ProviderNew,
        fields: ProviderFields,
    ) -> Result<pb::CreateProviderRequest, CtlError> {
        create_request(id, new.kind, fields, &mut FileInput::new())
    }
    async fn from_update_flags(
        ctx: &Ctx,
        id: Name,
        fields: ProviderFields,
        clear: ProviderClear,
        version: VersionArg,
    ) -> Result<pb::UpdateProviderRequest, CtlError> {
        // Local input first: a bad file fails before anything is sent.
        let files = ProviderFiles::read(&fields, &mut FileInput::new())?;
        let current = if needs_current(&fields) {
            Some(resource::get::<Providers>(ctx, id.clone()).await?)
        } else {
            None
        };
        update_request(id, fields, files, clear, version, current.as_ref())
    }
    async fn list_command(ctx: &Ctx, scope: TenantsScope, list: ListArgs) -> Result<(), CtlError> {
        crud::list_scoped::<Providers>(ctx, scope, list).await
    }
}

/// Runs `provider …`.
pub async fn run(cmd: ProviderCommand, ctx: &Ctx) -> Result<(), CtlError> {
    crud::run::<Providers>(cmd, ctx).await
}

/// Contents of the files the flags name.
#[derive(Debug, Default)]
struct ProviderFiles {
    client_secret: Option<String>,
    service_account_key: Option<String>,
    extra_ca_pem: Option<String>,
}

impl ProviderFiles {
    fn read(f: &ProviderFields, input: &mut FileInput) -> Result<Self, CtlError> {
        Ok(Self {
            client_secret: f
                .client_secret_file
                .as_deref()
                .map(|p| input.secret("--client-secret-file", p))
                .transpose()?,
            service_account_key: f
                .service_account_key_file
                .as_deref()
                .map(|p| input.document("--service-account-key-file", p))
                .transpose()?,
            extra_ca_pem: f
                .extra_ca_file
                .as_deref()
                .map(|p| input.document("--extra-ca-file", p))
                .transpose()?,
        })
    }
}

/// The API replaces `endpoints` whole; changing one URL needs the others as they are now.
fn needs_current(f: &ProviderFields) -> bool {
    f.authorize_url.is_some()
        || f.token_url.is_some()
        || f.device_code_url.is_some()
        || f.revoke_url.is_some()
}

/// Applies the flags to `p`. `current` is the stored provider (update) whose endpoints the given
/// URLs are merged into; `None` on create.
fn apply(
    f: ProviderFields,
    files: ProviderFiles,
    clear: &ProviderClear,
    current: Option<&pb::Provider>,
    p: &mut pb::Provider,
    changes: &mut Changes,
) {
    changes.set("authority", f.authority, &mut p.authority);
    changes.set("client_id", f.client_id, &mut p.client_id);
    if let Some(secret) = files.client_secret {
        p.client_secret = secret;
        changes.touch("client_secret");
    } else if clear.clear_client_secret {
        p.client_secret.clear();
        changes.touch("client_secret");
    }
    if let Some(key) = files.service_account_key {
        p.service_account_key = key;
        changes.touch("service_account_key");
    } else if clear.clear_service_account_key {
        p.service_account_key.clear();
        changes.touch("service_account_key");
    }

    let mut endpoints = current
        .and_then(|c| c.endpoints.clone())
        .unwrap_or_default();
    let mut touched = false;
    touched |= leaf(f.authorize_url, &mut endpoints.authorize_url);
    touched |= leaf(f.token_url, &mut endpoints.token_url);
    touched |= leaf(f.device_code_url, &mut endpoints.device_code_url);
    touched |= leaf(f.revoke_url, &mut endpoints.revoke_url);
    if touched {
        p.endpoints = Some(endpoints);
        changes.touch("endpoints");
    }

    changes.set("http_proxy", f.http_proxy, &mut p.http_proxy);
    if let Some(pem) = files.extra_ca_pem {
        p.tls = Some(pb::ProviderTls { extra_ca_pem: pem });
        changes.touch("tls");
    } else if clear.clear_extra_ca {
        p.tls = Some(pb::ProviderTls::default());
        changes.touch("tls");
    }
    changes.set_list("scopes", f.scopes, clear.clear_scopes, &mut p.scopes);
}

fn create_request(
    id: Name,
    kind: ProviderKind,
    fields: ProviderFields,
    input: &mut FileInput,
) -> Result<pb::CreateProviderRequest, CtlError> {
    let files = ProviderFiles::read(&fields, input)?;
    let clear = ProviderClear::default();
    Ok(resource::create_request::<Providers>(id, |p, c| {
        p.kind = kind.to_proto();
        apply(fields, files, &clear, None, p, c);
    }))
}

/// The update request. When `current` was read (to merge endpoint URLs), the update is
/// conditional on its version unless `--version` says otherwise, so a concurrent change is not
/// overwritten.
fn update_request(
    id: Name,
    fields: ProviderFields,
    files: ProviderFiles,
    clear: ProviderClear,
    version: VersionArg,
    current: Option<&pb::Provider>,
) -> Result<pb::UpdateProviderRequest, CtlError> {
    let version = version_of(version.version.or(current.map(|c| c.version)));
    resource::update_request::<Providers>(id, version, |p, c| {
        apply(fields, files, &clear, current, p, c);
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::ScopedName;
    use crate::cli::{Cli, Command};
    use crate::commands::crud::Crud;
    use clap::Parser;

    fn name(id: ScopedName) -> Name {
        Name {
            tenant: id.tenant,
            name: id.name,
        }
    }

    fn parse(args: &[&str]) -> ProviderCommand {
        let cli = Cli::try_parse_from(
            ["tokenfleetctl", "provider"]
                .into_iter()
                .chain(args.iter().copied()),
        );
        match cli {
            Ok(Cli {
                command: Command::Provider(cmd),
                ..
            }) => cmd,
            other => panic!("did not parse: {other:?}"),
        }
    }

    #[test]
    fn create_maps_every_flag_and_reads_the_secret_file() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s3cret\n").unwrap();
        let Crud::Create { id, new, fields } = parse(&[
            "create",
            "--tenant",
            "acme",
            "--name",
            "m365",
            "--kind",
            "microsoft",
            "--authority",
            "organizations",
            "--client-id",
            "ID",
            "--client-secret-file",
            secret.to_str().unwrap(),
            "--token-url",
            "http://127.0.0.1:9/token",
            "--scope",
            "a",
            "--scope",
            "b",
        ]) else {
            panic!("expected create");
        };
        let req = create_request(name(id), new.kind, fields, &mut FileInput::new()).unwrap();
        let p = req.provider.unwrap();
        assert_eq!(p.tenant, "acme");
        assert_eq!(p.name, "m365");
        assert_eq!(p.kind, pb::ProviderKind::Microsoft as i32);
        assert_eq!(p.authority, "organizations");
        assert_eq!(p.client_id, "ID");
        assert_eq!(p.client_secret, "s3cret");
        let endpoints = p.endpoints.unwrap();
        assert_eq!(endpoints.token_url, "http://127.0.0.1:9/token");
        assert_eq!(endpoints.authorize_url, "");
        assert_eq!(p.scopes, vec!["a", "b"]);
        assert!(p.tls.is_none());
        assert_eq!(p.version, 0);
    }

    fn stored() -> pb::Provider {
        pb::Provider {
            tenant: "acme".into(),
            name: "m365".into(),
            kind: pb::ProviderKind::Microsoft as i32,
            endpoints: Some(pb::ProviderEndpoints {
                token_url: "http://127.0.0.1:9/token".into(),
                ..Default::default()
            }),
            version: 5,
            ..Default::default()
        }
    }

    fn update(args: &[&str], current: Option<&pb::Provider>) -> pb::UpdateProviderRequest {
        let Crud::Update {
            id,
            fields,
            clear,
            version,
        } = parse(args)
        else {
            panic!("expected update");
        };
        let files = ProviderFiles::read(&fields, &mut FileInput::new()).unwrap();
        update_request(name(id), fields, files, clear, version, current).unwrap()
    }

    #[test]
    fn update_mask_names_exactly_the_given_flags() {
        let req = update(
            &[
                "update",
                "--tenant",
                "acme",
                "--name",
                "m365",
                "--authority",
                "common",
                "--device-code-url",
                "http://127.0.0.1:9/devicecode",
                "--clear-client-secret",
                "--version",
                "7",
            ],
            Some(&stored()),
        );
        assert_eq!(
            req.update_mask.unwrap().paths,
            vec!["authority", "client_secret", "endpoints"]
        );
        let p = req.provider.unwrap();
        assert_eq!(p.version, 7, "an explicit --version wins");
        assert_eq!(p.authority, "common");
        assert_eq!(p.client_secret, "");
        assert_eq!(p.kind, 0);
        // The API replaces `endpoints` whole: the stored token URL goes along unchanged.
        let endpoints = p.endpoints.unwrap();
        assert_eq!(endpoints.device_code_url, "http://127.0.0.1:9/devicecode");
        assert_eq!(endpoints.token_url, "http://127.0.0.1:9/token");
    }

    #[test]
    fn merged_update_is_conditional_on_the_version_read() {
        let args = [
            "update",
            "--tenant",
            "acme",
            "--name",
            "m365",
            "--revoke-url",
            "",
        ];
        let Crud::Update { fields, .. } = parse(&args) else {
            panic!("expected update");
        };
        assert!(needs_current(&fields));
        let req = update(&args, Some(&stored()));
        assert_eq!(req.provider.unwrap().version, 5);
        let Crud::Update { fields, .. } =
            parse(&["update", "--tenant", "a", "--name", "p", "--client-id", "x"])
        else {
            panic!("expected update");
        };
        assert!(!needs_current(&fields));
    }

    #[test]
    fn update_can_empty_scopes_and_the_ca() {
        let req = update(
            &[
                "update",
                "--tenant",
                "a",
                "--name",
                "p",
                "--clear-scopes",
                "--clear-extra-ca",
            ],
            None,
        );
        assert_eq!(req.update_mask.unwrap().paths, vec!["tls", "scopes"]);
        let p = req.provider.unwrap();
        assert!(p.scopes.is_empty());
        assert_eq!(p.tls, Some(pb::ProviderTls::default()));
        assert_eq!(p.version, 0);
    }

    #[test]
    fn kind_cannot_be_updated_and_set_conflicts_with_clear() {
        for extra in [
            &["--kind", "google"][..],
            &["--scope", "x", "--clear-scopes"][..],
        ] {
            let args = [
                "tokenfleetctl",
                "provider",
                "update",
                "--tenant",
                "a",
                "--name",
                "p",
            ];
            let cli = Cli::try_parse_from(args.iter().chain(extra.iter()));
            assert!(cli.is_err(), "{extra:?}");
        }
    }
}
