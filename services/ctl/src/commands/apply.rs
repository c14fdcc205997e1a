//! `apply -f FILE` and `export`: tenants, providers, mailboxes and devices as YAML documents
//! (see [`super::manifest`]), so hundreds of printers can be onboarded from one file and a
//! fleet can be reviewed, versioned and re-applied.
//!
//! `apply` works in two phases. The plan reads the file (every document checked: fields, enum
//! names, secret references), then reads each object from the broker and decides: create, update
//! (with an update mask of exactly the fields that differ, conditional on the version read) or
//! unchanged. Nothing is written unless the whole plan is sound. Then the writes run in
//! dependency order (tenants, providers, mailboxes, devices). `--dry-run` stops after the plan.
//! A write the broker refuses stops the run; the report says what was done before it.

use std::path::{Path, PathBuf};

use clap::Args;
use prost_types::FieldMask;
use serde::Serialize;

use super::Ctx;
use super::manifest::{self, Document, SecretRef, Spec, Wire};
use super::resource::{self, CtlResource, Devices, Mailboxes, Name, Providers, Tenants};
use crate::error::CtlError;
use crate::output::{Listed, Printer};

/// `apply`
#[derive(Debug, Clone, Args)]
#[command(after_help = "\
Documents: `kind` (tenant, provider, mailbox, device), `tenant` (not for tenants), `name`, and
`spec` with the object's fields as `export` writes them. Secrets are references:
`client_secret: {file: ./m365.secret}` (relative to the YAML file), `{env: M365_SECRET}`, or
`{stored: true}` to keep the value the broker holds.")]
pub struct ApplyArgs {
    /// YAML file with one object per document ("-" reads standard input).
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub file: PathBuf,
    /// Show what would change; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// `export`
#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    /// Only this tenant (default: every tenant the API key may see).
    #[arg(long, value_name = "TENANT")]
    pub tenant: Option<String>,
}

/// What happened to one object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApplyResultView {
    pub kind: &'static str,
    pub tenant: String,
    pub name: String,
    /// `created`, `updated`, `unchanged` (with --dry-run: `would create`, `would update`).
    pub action: String,
    /// The fields an update changes.
    pub fields: Vec<String>,
}

impl Listed for ApplyResultView {
    const PLURAL: &'static str = "objects";
    fn columns() -> &'static [&'static str] {
        &["KIND", "NAME", "ACTION", "FIELDS"]
    }
    fn row(&self) -> Vec<String> {
        let name = if self.tenant.is_empty() {
            self.name.clone()
        } else {
            format!("{}/{}", self.tenant, self.name)
        };
        let fields = if self.fields.is_empty() {
            "-".to_owned()
        } else {
            self.fields.join(", ")
        };
        vec![self.kind.to_owned(), name, self.action.clone(), fields]
    }
    fn name(&self) -> String {
        format!("{}/{}", self.kind, self.row()[1])
    }
}

/// What `apply` will do with one document.
#[derive(Debug)]
enum Action {
    Create,
    Update(Vec<String>),
    Unchanged,
}

#[derive(Debug)]
struct Step {
    doc: Document,
    action: Action,
    wire: Wire,
}

/// How a kind's objects appear in documents.
trait Manifested: CtlResource {
    /// The document of a stored object.
    fn document(object: &Self::Wire) -> Document;
    /// The typed object inside a [`Wire`].
    fn typed(wire: Wire) -> Option<Self::Wire>;
    /// The [`Wire`] of a typed object.
    fn wire(object: Self::Wire) -> Wire;
    /// Secret fields the broker holds for `object` (as update-mask paths).
    fn held(object: &Self::Wire) -> Vec<&'static str>;
    /// Sets the version the update is conditional on.
    fn set_version(object: &mut Self::Wire, version: u64);
    /// The stored version.
    fn version(object: &Self::Wire) -> u64;
}

macro_rules! manifested {
    ($res:ident, $variant:ident, $document:path, |$o:ident| $held:expr) => {
        impl Manifested for $res {
            fn document(object: &Self::Wire) -> Document {
                $document(object)
            }
            fn typed(wire: Wire) -> Option<Self::Wire> {
                match wire {
                    Wire::$variant(object) => Some(object),
                    _ => None,
                }
            }
            fn wire(object: Self::Wire) -> Wire {
                Wire::$variant(object)
            }
            fn held($o: &Self::Wire) -> Vec<&'static str> {
                $held
            }
            fn set_version(object: &mut Self::Wire, version: u64) {
                object.version = version;
            }
            fn version(object: &Self::Wire) -> u64 {
                object.version
            }
        }
    };
}

manifested!(Tenants, Tenant, manifest::tenant_document, |_o| Vec::new());
manifested!(Providers, Provider, manifest::provider_document, |o| {
    let mut held = Vec::new();
    if o.client_secret_set {
        held.push("client_secret");
    }
    if o.service_account_key_set {
        held.push("service_account_key");
    }
    held
});
manifested!(Mailboxes, Mailbox, manifest::mailbox_document, |_o| {
    Vec::new()
});
manifested!(Devices, Device, manifest::device_document, |o| {
    if o.ingress.as_ref().is_some_and(|i| i.password_set) {
        vec!["ingress.password"]
    } else {
        Vec::new()
    }
});

/// Runs `apply -f`.
pub async fn run_apply(args: ApplyArgs, ctx: &Ctx) -> Result<(), CtlError> {
    let (text, base) = read_file(&args.file)?;
    let mut docs = manifest::parse(&text)?;
    if docs.is_empty() {
        return Err(CtlError::usage(format!(
            "{}: no documents",
            args.file.display()
        )));
    }
    // Dependency order; within a kind, the order of the file.
    docs.sort_by_key(|d| manifest::KINDS.iter().position(|k| *k == d.kind()));

    let mut steps = Vec::with_capacity(docs.len());
    for doc in docs {
        let step = match doc.spec {
            Spec::Tenant(_) => plan::<Tenants>(ctx, doc, &base).await?,
            Spec::Provider(_) => plan::<Providers>(ctx, doc, &base).await?,
            Spec::Mailbox(_) => plan::<Mailboxes>(ctx, doc, &base).await?,
            Spec::Device(_) => plan::<Devices>(ctx, doc, &base).await?,
        };
        steps.push(step);
    }

    let mut report = Vec::with_capacity(steps.len());
    for step in steps {
        let (verb, fields) = match (&step.action, args.dry_run) {
            (Action::Unchanged, _) => ("unchanged", Vec::new()),
            (Action::Create, true) => ("would create", Vec::new()),
            (Action::Update(f), true) => ("would update", f.clone()),
            (Action::Create, false) => ("created", Vec::new()),
            (Action::Update(f), false) => ("updated", f.clone()),
        };
        if !args.dry_run {
            let done = match step.doc.spec {
                Spec::Tenant(_) => execute::<Tenants>(ctx, &step).await,
                Spec::Provider(_) => execute::<Providers>(ctx, &step).await,
                Spec::Mailbox(_) => execute::<Mailboxes>(ctx, &step).await,
                Spec::Device(_) => execute::<Devices>(ctx, &step).await,
            };
            if let Err(e) = done {
                print_report(ctx, &report)?;
                return Err(prefixed(&step.doc, e));
            }
        }
        report.push(ApplyResultView {
            kind: step.doc.kind(),
            tenant: step.doc.name.tenant.clone(),
            name: step.doc.name.name.clone(),
            action: verb.to_owned(),
            fields,
        });
    }
    print_report(ctx, &report)
}

fn print_report(ctx: &Ctx, report: &[ApplyResultView]) -> Result<(), CtlError> {
    if report.is_empty() {
        return Ok(());
    }
    ctx.printer.list(report)
}

/// An error of one document, naming it.
fn prefixed(doc: &Document, e: CtlError) -> CtlError {
    match e {
        CtlError::Api { code, message } => CtlError::Api {
            code,
            message: format!("{}: {message}", doc.place()),
        },
        CtlError::Usage(m) => CtlError::Usage(format!("{}: {m}", doc.place())),
        other => other,
    }
}

/// The file's text and the directory secret files are relative to.
fn read_file(path: &Path) -> Result<(String, PathBuf), CtlError> {
    if path == Path::new("-") {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .map_err(|e| CtlError::usage(format!("reading standard input: {e}")))?;
        return Ok((text, std::env::current_dir().unwrap_or_default()));
    }
    let text = std::fs::read_to_string(path).map_err(|e| {
        CtlError::usage(format!(
            "cannot read {}: {}",
            path.display(),
            crate::input::io_problem(&e)
        ))
    })?;
    let base = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| std::env::current_dir().unwrap_or_default());
    Ok((text, base))
}

/// Decides what to do with `doc`: reads the stored object, resolves the secret references and
/// compares fields. Writes nothing.
async fn plan<R: Manifested>(ctx: &Ctx, doc: Document, base: &Path) -> Result<Step, CtlError> {
    let current = resource::find::<R>(ctx, doc.name.clone())
        .await
        .map_err(|e| prefixed(&doc, e))?;
    let held = current.as_ref().map(R::held).unwrap_or_default();
    let mut secret_paths = Vec::new();
    let wire = manifest::to_wire(&doc, &mut |field, reference| {
        let value = secret_value(field, reference, &held, base)?;
        if !value.is_empty() {
            secret_paths.push(field.to_owned());
        }
        Ok(value)
    })
    .map_err(|e| prefixed(&doc, e))?;
    let action = match &current {
        None => Action::Create,
        Some(current) => {
            let stored = R::document(current);
            let mut fields = manifest::changed_fields(&doc.fields(), &stored.fields());
            check_changes(&doc, &stored, &fields)?;
            fields.extend(secret_paths);
            if fields.is_empty() {
                Action::Unchanged
            } else {
                Action::Update(fields)
            }
        }
    };
    if matches!(action, Action::Create) {
        // A new object has no stored secret to keep, and the proxy password must be given.
        check_changes(&doc, &doc, &["http_proxy".to_owned()])?;
    }
    let wire = match (current.as_ref().map(R::version), R::typed(wire.clone())) {
        (Some(version), Some(mut typed)) => {
            R::set_version(&mut typed, version);
            R::wire(typed)
        }
        _ => wire,
    };
    Ok(Step { doc, action, wire })
}

/// Refuses what the API would take but the operator cannot mean: changing a provider's kind,
/// or sending a proxy URL whose password is the `[redacted]` placeholder.
fn check_changes(doc: &Document, stored: &Document, fields: &[String]) -> Result<(), CtlError> {
    if let (Spec::Provider(want), Spec::Provider(have)) = (&doc.spec, &stored.spec) {
        if fields.iter().any(|f| f == "kind") && want.kind != have.kind {
            return Err(CtlError::usage(format!(
                "{}: spec.kind: a provider's kind cannot change (stored: {}); delete and re-create it",
                doc.place(),
                have.kind
            )));
        }
        if fields.iter().any(|f| f == "http_proxy") && want.http_proxy.contains("[redacted]") {
            return Err(CtlError::usage(format!(
                "{}: spec.http_proxy: holds the `[redacted]` placeholder of an export but differs from the stored proxy; write the whole URL with its password",
                doc.place()
            )));
        }
    }
    Ok(())
}

/// The value of a secret reference; empty for `{stored: true}` (keep what the broker holds).
fn secret_value(
    field: &str,
    reference: &SecretRef,
    held: &[&str],
    base: &Path,
) -> Result<String, CtlError> {
    let given = usize::from(reference.file.is_some())
        + usize::from(reference.env.is_some())
        + usize::from(reference.stored);
    if given != 1 {
        return Err(CtlError::usage(format!(
            "spec.{field}: give exactly one of file, env or stored: true"
        )));
    }
    if reference.stored {
        if !held.contains(&field) {
            return Err(CtlError::usage(format!(
                "spec.{field}: `stored: true` but the broker holds none for this object; give {{file: PATH}} or {{env: VARIABLE}}"
            )));
        }
        return Ok(String::new());
    }
    let value = match (&reference.file, &reference.env) {
        (Some(file), _) => {
            let path = if file.is_absolute() {
                file.clone()
            } else {
                base.join(file)
            };
            std::fs::read_to_string(&path).map_err(|e| {
                CtlError::usage(format!(
                    "spec.{field}: cannot read {}: {}",
                    path.display(),
                    crate::input::io_problem(&e)
                ))
            })?
        }
        (None, Some(var)) => std::env::var(var).map_err(|_| {
            CtlError::usage(format!(
                "spec.{field}: environment variable {var} is not set"
            ))
        })?,
        (None, None) => String::new(),
    };
    let value = value.trim_end_matches(['\r', '\n']).to_owned();
    if value.is_empty() {
        return Err(CtlError::usage(format!(
            "spec.{field}: the secret is empty"
        )));
    }
    Ok(value)
}

/// Runs one planned write.
async fn execute<R: Manifested>(ctx: &Ctx, step: &Step) -> Result<(), CtlError> {
    let Some(object) = R::typed(step.wire.clone()) else {
        return Err(CtlError::Output(format!(
            "{}: internal mismatch of kinds",
            step.doc.place()
        )));
    };
    match &step.action {
        Action::Unchanged => {}
        Action::Create => {
            resource::send_create::<R>(ctx, R::create_request(object)).await?;
        }
        Action::Update(fields) => {
            let mask = FieldMask {
                paths: fields.clone(),
            };
            resource::send_update::<R>(ctx, R::update_request(object, mask)).await?;
        }
    }
    Ok(())
}

/// Runs `export`.
pub async fn run_export(args: ExportArgs, ctx: &Ctx) -> Result<(), CtlError> {
    let all = crate::args::ListArgs::default();
    let tenants = match args.tenant {
        Some(name) => vec![resource::get::<Tenants>(ctx, Name::global(name)).await?],
        None => resource::fetch_all::<Tenants>(ctx, String::new(), all).await?,
    };
    let mut docs: Vec<Document> = tenants.iter().map(Tenants::document).collect();
    for tenant in &tenants {
        let name = &tenant.name;
        let providers = resource::fetch_all::<Providers>(ctx, name.clone(), all).await?;
        docs.extend(providers.iter().map(Providers::document));
        let mailboxes = resource::fetch_all::<Mailboxes>(ctx, name.clone(), all).await?;
        docs.extend(mailboxes.iter().map(Mailboxes::document));
        let devices = resource::fetch_all::<Devices>(ctx, name.clone(), all).await?;
        docs.extend(devices.iter().map(Devices::document));
    }
    let mut text = String::from(EXPORT_HEADER);
    text.push_str(&manifest::to_yaml(&docs)?);
    Printer::raw(text.as_bytes())
}

const EXPORT_HEADER: &str = "\
# tokenfleetctl export: `tokenfleetctl apply -f FILE` takes this back.
# Secrets are never exported. `{stored: true}` keeps the value the broker holds; to supply one
# (e.g. on another broker) write `{file: PATH}` (relative to this file) or `{env: VARIABLE}`.
# A proxy password shows as [redacted]: write the whole URL where the proxy changes.
";
