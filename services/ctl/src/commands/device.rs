//! `device create|list|show|update|delete` (the generic verbs of [`super::crud`] with a device's
//! profiles, merged into the stored ones on update) and `device test`.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use tokenfleet_proto::v1 as pb;

use super::crud::{self, CrudOf, CrudResource, Nothing};
use super::fleet::DeviceTestArgs;
use super::resource::{self, Devices, Name};
use super::{Changes, Ctx, leaf, version_of};
use crate::args::{ListArgs, ScopedName, TenantsScope, VersionArg};
use crate::enums::{FetchProtocol, SendMethod, SenderMode, TlsMode, TlsVersion};
use crate::error::CtlError;
use crate::input::FileInput;

/// `device …`
// Parsed once per run: the size of the device flags does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    #[command(flatten)]
    Crud(CrudOf<Devices>),
    /// Test a device's upstream connection from its agent (exit 0 only when the verdict is ok).
    Test(DeviceTestArgs),
}

/// Settable fields of a device.
#[derive(Debug, Clone, Default, Args)]
pub struct DeviceFields {
    /// Human-readable name.
    #[arg(long, value_name = "TEXT")]
    pub display_name: Option<String>,
    /// Agent (in the same tenant) that hosts the device; "" unassigns it.
    #[arg(long, value_name = "NAME")]
    pub agent: Option<String>,
    /// Which sender the device's mail leaves as.
    #[arg(long, value_enum)]
    pub sender_mode: Option<SenderMode>,
    /// Mailbox used in fixed_admin mode.
    #[arg(long, value_name = "NAME")]
    pub admin_mailbox: Option<String>,
    /// Mailbox used in bulk mode.
    #[arg(long, value_name = "NAME")]
    pub bulk_mailbox: Option<String>,
    /// Further mailbox the device may use (allow_user_change); repeat. Replaces the list on update.
    #[arg(long = "allowed-mailbox", value_name = "NAME")]
    pub allowed_mailboxes: Vec<String>,
    /// Provider (in the same tenant) of the user mailboxes the broker creates on demand
    /// (login_user, allow_user_change); "" unsets it.
    #[arg(long, value_name = "NAME")]
    pub user_provider: Option<String>,

    #[command(flatten)]
    pub smtp: SmtpFields,
    #[command(flatten)]
    pub fetch: FetchFields,
    #[command(flatten)]
    pub ingress: IngressFields,
}

/// Upstream SMTP profile of a device.
#[derive(Debug, Clone, Default, Args)]
#[command(next_help_heading = "SMTP send profile")]
pub struct SmtpFields {
    /// SMTP server host name, e.g. smtp.office365.com.
    #[arg(long, value_name = "HOST")]
    pub smtp_server: Option<String>,
    /// SMTP server port (587 STARTTLS, 465 implicit TLS).
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u32).range(1..=65535))]
    pub smtp_port: Option<u32>,
    /// SMTP transport security.
    #[arg(long, value_enum)]
    pub smtp_security: Option<TlsMode>,
    /// SMTP connection and command timeout in seconds (0 = default 60).
    #[arg(long, value_name = "SECONDS")]
    pub smtp_timeout: Option<u32>,
    /// Display name of the sender.
    #[arg(long, value_name = "TEXT")]
    pub smtp_sender_name: Option<String>,
    /// Sender address override ("" = the mailbox address).
    #[arg(long, value_name = "EMAIL")]
    pub smtp_sender_address: Option<String>,
    /// Do not verify the SMTP server's certificate (lab servers only); `=false` verifies again.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub smtp_skip_certificate_verification: Option<bool>,
    /// Extra trusted CA certificate (PEM file) for the SMTP server.
    #[arg(long, value_name = "PATH")]
    pub smtp_extra_ca_file: Option<PathBuf>,
    /// Lowest TLS version for SMTP.
    #[arg(long, value_enum)]
    pub smtp_tls_min_version: Option<TlsVersion>,
    /// Highest TLS version for SMTP.
    #[arg(long, value_enum)]
    pub smtp_tls_max_version: Option<TlsVersion>,
    /// How mail is sent upstream: SMTP submission, or the Graph / Gmail mail API.
    #[arg(long, value_enum)]
    pub smtp_method: Option<SendMethod>,
    /// Mail API base URL override for graph / gmail_api ("" = the public endpoint).
    #[arg(long, value_name = "URL")]
    pub smtp_api_base_url: Option<String>,
    /// INSECURE: let the agent send the OAuth token to a non-loopback host without TLS
    /// (`--smtp-security none`, an http:// API URL) or without certificate verification. Refused
    /// otherwise; audited and flagged in device output and fleet status. `=false` turns it off.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub smtp_insecure_allow_cleartext_tokens: Option<bool>,
}

/// Upstream fetch profile of a device.
#[derive(Debug, Clone, Default, Args)]
#[command(next_help_heading = "Fetch profile")]
pub struct FetchFields {
    /// Fetch protocol.
    #[arg(long, value_enum)]
    pub fetch_protocol: Option<FetchProtocol>,
    /// POP3/IMAP server host name, e.g. outlook.office365.com.
    #[arg(long, value_name = "HOST")]
    pub fetch_server: Option<String>,
    /// POP3/IMAP server port.
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u32).range(1..=65535))]
    pub fetch_port: Option<u32>,
    /// Fetch transport security.
    #[arg(long, value_enum)]
    pub fetch_security: Option<TlsMode>,
    /// Check interval in seconds (0 = fetching disabled).
    #[arg(long, value_name = "SECONDS")]
    pub fetch_interval: Option<u32>,
    /// Do not verify the fetch server's certificate (lab servers only); `=false` verifies again.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub fetch_skip_certificate_verification: Option<bool>,
    /// Extra trusted CA certificate (PEM file) for the fetch server.
    #[arg(long, value_name = "PATH")]
    pub fetch_extra_ca_file: Option<PathBuf>,
    /// Lowest TLS version for fetching.
    #[arg(long, value_enum)]
    pub fetch_tls_min_version: Option<TlsVersion>,
    /// Highest TLS version for fetching.
    #[arg(long, value_enum)]
    pub fetch_tls_max_version: Option<TlsVersion>,
    /// IMAP folder to fetch from (default INBOX), as users see it (e.g. "Scans Büro"); the agent
    /// sends it in IMAP's modified UTF-7.
    #[arg(long, value_name = "FOLDER")]
    pub fetch_folder: Option<String>,
    /// INSECURE: let the agent log in to a non-loopback POP3/IMAP server with the OAuth token
    /// without TLS or without certificate verification. Audited and flagged in device output and
    /// fleet status. `=false` turns it off.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub fetch_insecure_allow_cleartext_tokens: Option<bool>,
}

/// Local ingress credentials of a device.
#[derive(Debug, Clone, Default, Args)]
#[command(next_help_heading = "Local ingress (device → agent)")]
pub struct IngressFields {
    /// User name the device logs in to the agent with.
    #[arg(long, value_name = "USER")]
    pub ingress_username: Option<String>,
    /// File holding the device's local password ("-" reads standard input).
    #[arg(long, value_name = "PATH")]
    pub ingress_password_file: Option<PathBuf>,
    /// Source address or CIDR allowed without login, e.g. 192.168.1.20/32; repeat. Replaces the
    /// list on update.
    #[arg(long = "allowed-source", value_name = "CIDR")]
    pub allowed_sources: Vec<String>,
    /// login_user / allow_user_change: a user address the device may send as (and get the
    /// token of), or @domain for every address of a domain; repeat. Replaces the list on
    /// update. Without any, no user mailbox may be used.
    #[arg(long = "ingress-user-address", value_name = "ADDRESS")]
    pub user_addresses: Vec<String>,
}

/// Fields of a device that `update` can empty.
#[derive(Debug, Clone, Default, Args)]
pub struct DeviceClear {
    /// Empty the allowed-mailbox list.
    #[arg(long, conflicts_with = "allowed_mailboxes")]
    pub clear_allowed_mailboxes: bool,
    /// Empty the allowed-source list.
    #[arg(long, conflicts_with = "allowed_sources")]
    pub clear_allowed_sources: bool,
    /// Empty the ingress user-address list.
    #[arg(long, conflicts_with = "user_addresses")]
    pub clear_ingress_user_addresses: bool,
    /// Remove the local ingress password.
    #[arg(long, conflicts_with = "ingress_password_file")]
    pub clear_ingress_password: bool,
    /// Remove the SMTP send profile.
    #[arg(long, conflicts_with_all = SMTP_FLAGS)]
    pub clear_smtp: bool,
    /// Remove the fetch profile.
    #[arg(long, conflicts_with_all = FETCH_FLAGS)]
    pub clear_fetch: bool,
    /// Remove the SMTP extra trusted CA certificate.
    #[arg(long, conflicts_with = "smtp_extra_ca_file")]
    pub clear_smtp_extra_ca: bool,
    /// Remove the fetch extra trusted CA certificate.
    #[arg(long, conflicts_with = "fetch_extra_ca_file")]
    pub clear_fetch_extra_ca: bool,
}

const SMTP_FLAGS: [&str; 14] = [
    "smtp_server",
    "smtp_port",
    "smtp_security",
    "smtp_timeout",
    "smtp_sender_name",
    "smtp_sender_address",
    "smtp_skip_certificate_verification",
    "smtp_extra_ca_file",
    "smtp_tls_min_version",
    "smtp_tls_max_version",
    "smtp_method",
    "smtp_api_base_url",
    "smtp_insecure_allow_cleartext_tokens",
    "clear_smtp_extra_ca",
];

const FETCH_FLAGS: [&str; 12] = [
    "fetch_protocol",
    "fetch_server",
    "fetch_port",
    "fetch_security",
    "fetch_interval",
    "fetch_skip_certificate_verification",
    "fetch_extra_ca_file",
    "fetch_tls_min_version",
    "fetch_tls_max_version",
    "fetch_folder",
    "fetch_insecure_allow_cleartext_tokens",
    "clear_fetch_extra_ca",
];

impl CrudResource for Devices {
    type Id = ScopedName;
    type Scope = TenantsScope;
    type New = Nothing;
    type Fields = DeviceFields;
    type Clear = DeviceClear;

    async fn from_create_flags(
        _: &Ctx,
        id: Name,
        _: Nothing,
        fields: DeviceFields,
    ) -> Result<pb::CreateDeviceRequest, CtlError> {
        create_request(id, fields, &mut FileInput::new())
    }
    async fn from_update_flags(
        ctx: &Ctx,
        id: Name,
        fields: DeviceFields,
        clear: DeviceClear,
        version: VersionArg,
    ) -> Result<pb::UpdateDeviceRequest, CtlError> {
        // Local input first: a bad file fails before anything is sent.
        let files = DeviceFiles::read(&fields, &mut FileInput::new())?;
        let current = if needs_current(&fields, &clear) {
            Some(resource::get::<Devices>(ctx, id.clone()).await?)
        } else {
            None
        };
        update_request(id, fields, files, clear, version, current.as_ref())
    }
    async fn list_command(ctx: &Ctx, scope: TenantsScope, list: ListArgs) -> Result<(), CtlError> {
        crud::list_scoped::<Devices>(ctx, scope, list).await
    }
}

/// Runs `device …`.
pub async fn run(cmd: DeviceCommand, ctx: &Ctx) -> Result<(), CtlError> {
    match cmd {
        DeviceCommand::Crud(cmd) => crud::run::<Devices>(cmd, ctx).await,
        DeviceCommand::Test(args) => super::fleet::run_test(args, ctx).await,
    }
}

/// Contents of the files the flags name.
#[derive(Debug, Default)]
struct DeviceFiles {
    smtp_extra_ca_pem: Option<String>,
    fetch_extra_ca_pem: Option<String>,
    ingress_password: Option<String>,
}

impl DeviceFiles {
    fn read(f: &DeviceFields, input: &mut FileInput) -> Result<Self, CtlError> {
        Ok(Self {
            smtp_extra_ca_pem: f
                .smtp
                .smtp_extra_ca_file
                .as_deref()
                .map(|p| input.document("--smtp-extra-ca-file", p))
                .transpose()?,
            fetch_extra_ca_pem: f
                .fetch
                .fetch_extra_ca_file
                .as_deref()
                .map(|p| input.document("--fetch-extra-ca-file", p))
                .transpose()?,
            ingress_password: f
                .ingress
                .ingress_password_file
                .as_deref()
                .map(|p| input.secret("--ingress-password-file", p))
                .transpose()?,
        })
    }
}

fn smtp_given(s: &SmtpFields, clear: &DeviceClear) -> bool {
    s.smtp_server.is_some()
        || s.smtp_port.is_some()
        || s.smtp_security.is_some()
        || s.smtp_timeout.is_some()
        || s.smtp_sender_name.is_some()
        || s.smtp_sender_address.is_some()
        || s.smtp_skip_certificate_verification.is_some()
        || s.smtp_extra_ca_file.is_some()
        || s.smtp_tls_min_version.is_some()
        || s.smtp_tls_max_version.is_some()
        || s.smtp_method.is_some()
        || s.smtp_api_base_url.is_some()
        || s.smtp_insecure_allow_cleartext_tokens.is_some()
        || clear.clear_smtp_extra_ca
}

fn fetch_given(x: &FetchFields, clear: &DeviceClear) -> bool {
    x.fetch_protocol.is_some()
        || x.fetch_server.is_some()
        || x.fetch_port.is_some()
        || x.fetch_security.is_some()
        || x.fetch_interval.is_some()
        || x.fetch_skip_certificate_verification.is_some()
        || x.fetch_extra_ca_file.is_some()
        || x.fetch_tls_min_version.is_some()
        || x.fetch_tls_max_version.is_some()
        || x.fetch_folder.is_some()
        || x.fetch_insecure_allow_cleartext_tokens.is_some()
        || clear.clear_fetch_extra_ca
}

/// Ingress fields other than the password (which the API can change alone).
fn ingress_given(i: &IngressFields, clear: &DeviceClear) -> bool {
    i.ingress_username.is_some()
        || !i.allowed_sources.is_empty()
        || clear.clear_allowed_sources
        || !i.user_addresses.is_empty()
        || clear.clear_ingress_user_addresses
}

/// The API replaces `smtp`, `fetch` and `ingress` whole; changing part of one needs the rest as
/// it is now.
fn needs_current(f: &DeviceFields, clear: &DeviceClear) -> bool {
    smtp_given(&f.smtp, clear) || fetch_given(&f.fetch, clear) || ingress_given(&f.ingress, clear)
}

fn version(v: Option<TlsVersion>) -> Option<i32> {
    v.map(TlsVersion::to_proto)
}

/// Applies the flags to `d`. `current` is the stored device (update) whose profiles the given
/// leaves are merged into; `None` on create.
fn apply(
    f: DeviceFields,
    files: DeviceFiles,
    clear: &DeviceClear,
    current: Option<&pb::Device>,
    d: &mut pb::Device,
    changes: &mut Changes,
) {
    changes.set("display_name", f.display_name, &mut d.display_name);
    changes.set("agent", f.agent, &mut d.agent);
    changes.set(
        "sender_mode",
        f.sender_mode.map(|m| m.to_proto()),
        &mut d.sender_mode,
    );
    changes.set("admin_mailbox", f.admin_mailbox, &mut d.admin_mailbox);
    changes.set("bulk_mailbox", f.bulk_mailbox, &mut d.bulk_mailbox);
    changes.set_list(
        "allowed_mailboxes",
        f.allowed_mailboxes,
        clear.clear_allowed_mailboxes,
        &mut d.allowed_mailboxes,
    );
    changes.set("user_provider", f.user_provider, &mut d.user_provider);

    if clear.clear_smtp {
        d.smtp = Some(pb::SmtpProfile::default());
        changes.touch("smtp");
    } else if smtp_given(&f.smtp, clear) {
        let s = f.smtp;
        let mut smtp = current.and_then(|c| c.smtp.clone()).unwrap_or_default();
        leaf(s.smtp_server, &mut smtp.server);
        leaf(s.smtp_port, &mut smtp.port);
        leaf(s.smtp_security.map(|m| m.to_proto()), &mut smtp.security);
        leaf(s.smtp_timeout, &mut smtp.timeout_seconds);
        leaf(s.smtp_sender_name, &mut smtp.sender_name);
        leaf(s.smtp_sender_address, &mut smtp.sender_address);
        leaf(
            s.smtp_skip_certificate_verification,
            &mut smtp.skip_certificate_verification,
        );
        if clear.clear_smtp_extra_ca {
            smtp.extra_ca_pem.clear();
        }
        leaf(files.smtp_extra_ca_pem, &mut smtp.extra_ca_pem);
        leaf(version(s.smtp_tls_min_version), &mut smtp.tls_min_version);
        leaf(version(s.smtp_tls_max_version), &mut smtp.tls_max_version);
        leaf(s.smtp_method.map(|m| m.to_proto()), &mut smtp.method);
        leaf(s.smtp_api_base_url, &mut smtp.api_base_url);
        leaf(
            s.smtp_insecure_allow_cleartext_tokens,
            &mut smtp.insecure_allow_cleartext_tokens,
        );
        d.smtp = Some(smtp);
        changes.touch("smtp");
    }

    if clear.clear_fetch {
        d.fetch = Some(pb::FetchProfile::default());
        changes.touch("fetch");
    } else if fetch_given(&f.fetch, clear) {
        let x = f.fetch;
        let mut fetch = current.and_then(|c| c.fetch.clone()).unwrap_or_default();
        leaf(x.fetch_protocol.map(|p| p.to_proto()), &mut fetch.protocol);
        leaf(x.fetch_server, &mut fetch.server);
        leaf(x.fetch_port, &mut fetch.port);
        leaf(x.fetch_security.map(|m| m.to_proto()), &mut fetch.security);
        leaf(x.fetch_interval, &mut fetch.interval_seconds);
        leaf(
            x.fetch_skip_certificate_verification,
            &mut fetch.skip_certificate_verification,
        );
        if clear.clear_fetch_extra_ca {
            fetch.extra_ca_pem.clear();
        }
        leaf(files.fetch_extra_ca_pem, &mut fetch.extra_ca_pem);
        leaf(version(x.fetch_tls_min_version), &mut fetch.tls_min_version);
        leaf(version(x.fetch_tls_max_version), &mut fetch.tls_max_version);
        leaf(x.fetch_folder, &mut fetch.folder);
        leaf(
            x.fetch_insecure_allow_cleartext_tokens,
            &mut fetch.insecure_allow_cleartext_tokens,
        );
        d.fetch = Some(fetch);
        changes.touch("fetch");
    }

    // `ingress` replaces user name and sources (an empty password there keeps the stored one);
    // `ingress.password` alone sets or, empty, clears the password.
    let i = f.ingress;
    let password_change = files.ingress_password.is_some() || clear.clear_ingress_password;
    if ingress_given(&i, clear) || password_change {
        let mut ingress = if ingress_given(&i, clear) {
            current.and_then(|c| c.ingress.clone()).unwrap_or_default()
        } else {
            pb::IngressCredentials::default()
        };
        ingress.password_set = false;
        ingress.password = files.ingress_password.unwrap_or_default();
        if ingress_given(&i, clear) {
            leaf(i.ingress_username, &mut ingress.username);
            if !i.allowed_sources.is_empty() || clear.clear_allowed_sources {
                ingress.allowed_sources = i.allowed_sources;
            }
            if !i.user_addresses.is_empty() || clear.clear_ingress_user_addresses {
                ingress.user_addresses = i.user_addresses;
            }
            changes.touch("ingress");
        }
        if password_change {
            changes.touch("ingress.password");
        }
        d.ingress = Some(ingress);
    }
}

fn create_request(
    id: Name,
    fields: DeviceFields,
    input: &mut FileInput,
) -> Result<pb::CreateDeviceRequest, CtlError> {
    let files = DeviceFiles::read(&fields, input)?;
    let clear = DeviceClear::default();
    Ok(resource::create_request::<Devices>(id, |d, c| {
        apply(fields, files, &clear, None, d, c);
    }))
}

/// The update request. When `current` was read (to merge profile fields), the update is
/// conditional on its version unless `--version` says otherwise, so a concurrent change is not
/// overwritten.
fn update_request(
    id: Name,
    fields: DeviceFields,
    files: DeviceFiles,
    clear: DeviceClear,
    version: VersionArg,
    current: Option<&pb::Device>,
) -> Result<pb::UpdateDeviceRequest, CtlError> {
    let version = version_of(version.version.or(current.map(|c| c.version)));
    resource::update_request::<Devices>(id, version, |d, c| {
        apply(fields, files, &clear, current, d, c);
    })
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

    fn parse(args: &[&str]) -> DeviceCommand {
        let cli = Cli::try_parse_from(
            ["tokenfleetctl", "device"]
                .into_iter()
                .chain(args.iter().copied()),
        );
        match cli {
            Ok(Cli {
                command: Command::Device(cmd),
                ..
            }) => cmd,
            other => panic!("did not parse: {other:?}"),
        }
    }

    #[test]
    fn create_maps_profiles_and_reads_the_password_file() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "local-pass\n").unwrap();
        let DeviceCommand::Crud(Crud::Create { id, fields, .. }) = parse(&[
            "create",
            "--tenant",
            "acme",
            "--name",
            "mfp-1",
            "--sender-mode",
            "bulk",
            "--bulk-mailbox",
            "scan",
            "--agent",
            "site-a",
            "--smtp-server",
            "smtp.office365.com",
            "--smtp-port",
            "587",
            "--smtp-security",
            "starttls",
            "--smtp-tls-min-version",
            "1.2",
            "--ingress-username",
            "mfp1",
            "--ingress-password-file",
            pw.to_str().unwrap(),
            "--allowed-source",
            "192.168.1.20/32",
        ]) else {
            panic!("expected create");
        };
        let d = create_request(name(id), fields, &mut FileInput::new())
            .unwrap()
            .device
            .unwrap();
        assert_eq!(d.sender_mode, pb::SenderMode::Bulk as i32);
        assert_eq!(d.bulk_mailbox, "scan");
        assert_eq!(d.agent, "site-a");
        let smtp = d.smtp.unwrap();
        assert_eq!(smtp.server, "smtp.office365.com");
        assert_eq!(smtp.port, 587);
        assert_eq!(smtp.security, pb::TlsMode::Starttls as i32);
        assert_eq!(smtp.tls_min_version, pb::TlsVersion::TlsVersion12 as i32);
        assert!(
            d.fetch.is_none(),
            "no fetch flag given, no fetch profile sent"
        );
        let ingress = d.ingress.unwrap();
        assert_eq!(ingress.username, "mfp1");
        assert_eq!(ingress.password, "local-pass");
        assert_eq!(ingress.allowed_sources, vec!["192.168.1.20/32"]);
    }

    fn stored() -> pb::Device {
        pb::Device {
            tenant: "acme".into(),
            name: "mfp-1".into(),
            sender_mode: pb::SenderMode::Bulk as i32,
            bulk_mailbox: "scan".into(),
            smtp: Some(pb::SmtpProfile {
                server: "smtp.office365.com".into(),
                port: 587,
                security: pb::TlsMode::Starttls as i32,
                sender_name: "Scanner".into(),
                ..Default::default()
            }),
            ingress: Some(pb::IngressCredentials {
                username: "mfp1".into(),
                password: String::new(),
                password_set: true,
                allowed_sources: vec!["192.168.1.20/32".into()],
                ..Default::default()
            }),
            version: 9,
            ..Default::default()
        }
    }

    fn update(args: &[&str], current: Option<&pb::Device>) -> pb::UpdateDeviceRequest {
        let DeviceCommand::Crud(Crud::Update {
            id,
            fields,
            clear,
            version,
        }) = parse(args)
        else {
            panic!("expected update");
        };
        assert_eq!(
            needs_current(&fields, &clear),
            current.is_some(),
            "{args:?}"
        );
        let files = DeviceFiles::read(&fields, &mut FileInput::new()).unwrap();
        update_request(name(id), fields, files, clear, version, current).unwrap()
    }

    #[test]
    fn update_merges_given_leaves_into_the_stored_profiles() {
        let req = update(
            &[
                "update",
                "--tenant",
                "acme",
                "--name",
                "mfp-1",
                "--smtp-port",
                "465",
                "--smtp-security",
                "implicit_tls",
                "--fetch-server",
                "outlook.office365.com",
                "--fetch-protocol",
                "pop3",
                "--fetch-security",
                "implicit_tls",
                "--fetch-interval",
                "300",
                "--clear-allowed-sources",
            ],
            Some(&stored()),
        );
        assert_eq!(
            req.update_mask.unwrap().paths,
            vec!["smtp", "fetch", "ingress"]
        );
        let d = req.device.unwrap();
        assert_eq!(d.version, 9, "conditional on the version that was read");
        let smtp = d.smtp.unwrap();
        assert_eq!(smtp.port, 465);
        assert_eq!(smtp.security, pb::TlsMode::ImplicitTls as i32);
        assert_eq!(
            smtp.server, "smtp.office365.com",
            "kept from the stored profile"
        );
        assert_eq!(smtp.sender_name, "Scanner", "kept from the stored profile");
        let fetch = d.fetch.unwrap();
        assert_eq!(fetch.server, "outlook.office365.com");
        assert_eq!(fetch.interval_seconds, 300);
        let ingress = d.ingress.unwrap();
        assert_eq!(ingress.username, "mfp1");
        assert!(ingress.allowed_sources.is_empty());
        assert!(
            ingress.password.is_empty(),
            "an empty password keeps the stored one"
        );
        assert_eq!(d.sender_mode, 0);
    }

    #[test]
    fn password_alone_is_its_own_path() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "new-pass\n").unwrap();
        let req = update(
            &[
                "update",
                "--tenant",
                "acme",
                "--name",
                "mfp-1",
                "--ingress-password-file",
                pw.to_str().unwrap(),
            ],
            None,
        );
        assert_eq!(req.update_mask.unwrap().paths, vec!["ingress.password"]);
        let d = req.device.unwrap();
        assert_eq!(d.version, 0);
        assert_eq!(d.ingress.unwrap().password, "new-pass");

        let req = update(
            &[
                "update",
                "--tenant",
                "acme",
                "--name",
                "mfp-1",
                "--clear-ingress-password",
            ],
            None,
        );
        assert_eq!(req.update_mask.unwrap().paths, vec!["ingress.password"]);
        assert_eq!(req.device.unwrap().ingress.unwrap().password, "");
    }

    #[test]
    fn explicit_version_wins_and_profiles_can_be_removed() {
        let req = update(
            &[
                "update",
                "--tenant",
                "acme",
                "--name",
                "mfp-1",
                "--clear-smtp",
                "--clear-fetch",
                "--version",
                "3",
            ],
            None,
        );
        assert_eq!(req.update_mask.unwrap().paths, vec!["smtp", "fetch"]);
        let d = req.device.unwrap();
        assert_eq!(d.version, 3);
        assert_eq!(d.smtp, Some(pb::SmtpProfile::default()));
        let req = update(
            &[
                "update",
                "--tenant",
                "acme",
                "--name",
                "mfp-1",
                "--smtp-timeout",
                "30",
                "--version",
                "4",
            ],
            Some(&stored()),
        );
        assert_eq!(req.device.unwrap().version, 4);
    }

    #[test]
    fn update_of_top_level_fields_sends_no_profiles() {
        let req = update(
            &[
                "update",
                "--tenant",
                "acme",
                "--name",
                "mfp-1",
                "--agent",
                "",
                "--allowed-mailbox",
                "a",
                "--allowed-mailbox",
                "b",
            ],
            None,
        );
        assert_eq!(
            req.update_mask.unwrap().paths,
            vec!["agent", "allowed_mailboxes"]
        );
        let d = req.device.unwrap();
        assert!(d.smtp.is_none() && d.fetch.is_none() && d.ingress.is_none());
        assert_eq!(d.allowed_mailboxes, vec!["a", "b"]);
    }

    #[test]
    fn user_provider_is_a_top_level_field() {
        let req = update(
            &[
                "update",
                "--tenant",
                "acme",
                "--name",
                "mfp-1",
                "--user-provider",
                "m365",
            ],
            None,
        );
        assert_eq!(req.update_mask.unwrap().paths, vec!["user_provider"]);
        assert_eq!(req.device.unwrap().user_provider, "m365");
    }

    #[test]
    fn bad_port_is_a_usage_error() {
        let cli = Cli::try_parse_from([
            "tokenfleetctl",
            "device",
            "update",
            "--tenant",
            "a",
            "--name",
            "d",
            "--smtp-port",
            "70000",
        ]);
        assert!(cli.is_err());
    }
}
