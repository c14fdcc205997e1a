//! Command-line definition (clap derive). Flags mirror the fields of `tokenfleet.v1`; secrets are
//! only ever read from files (or `-` for standard input), never taken as flag values.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::enums::{
    ApiKeyRole, AuditKind, FetchProtocol, GrantType, MailPurpose, MailboxKind, ProviderKind,
    SendMethod, SenderMode, TlsMode, TlsVersion,
};

/// Broker address used when neither `--broker` nor `TOKENFLEET_BROKER` is set.
/// (`https://localhost`: the broker serves TLS, and `serve --dev` issues its certificate for
/// `localhost`; the dev CA is found in `./tokenfleet-data/`.)
pub const DEFAULT_BROKER: &str = "https://localhost:50051";

const ENV_HELP: &str = "\
Environment:
  TOKENFLEET_BROKER         broker URL (same as --broker)
  TOKENFLEET_API_KEY        the API key itself
  TOKENFLEET_API_KEY_FILE   file holding the API key (same as --api-key-file)
  TOKENFLEET_TENANT         default for --tenant
  TOKENFLEET_CA_FILE        CA certificate for an https:// broker (same as --ca-file)

Exit codes: 0 ok, 1 the broker refused the request, 2 usage or local input error,
69 broker unreachable or unavailable.";

/// Operator CLI for the tokenfleet broker.
#[derive(Debug, Parser)]
#[command(name = "tokenfleetctl", version, about, after_help = ENV_HELP)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every command takes.
#[derive(Debug, Args)]
#[command(next_help_heading = "Global options")]
pub struct GlobalArgs {
    /// Broker admin API URL (http:// or https://).
    #[arg(
        long,
        global = true,
        env = "TOKENFLEET_BROKER",
        default_value = DEFAULT_BROKER,
        value_name = "URL",
        value_parser = parse_broker_url
    )]
    pub broker: String,

    /// File holding the API key (overrides TOKENFLEET_API_KEY and TOKENFLEET_API_KEY_FILE).
    #[arg(long, global = true, value_name = "PATH")]
    pub api_key_file: Option<PathBuf>,

    /// CA certificate (PEM) to trust for an https:// broker instead of the system roots.
    #[arg(long, global = true, env = "TOKENFLEET_CA_FILE", value_name = "PATH")]
    pub ca_file: Option<PathBuf>,

    /// Output format.
    #[arg(
        short = 'o',
        long = "output",
        global = true,
        value_enum,
        value_name = "FORMAT",
        default_value_t = OutputFormat::Table
    )]
    pub output: OutputFormat,

    /// Timeout of each call to the broker, in seconds.
    #[arg(
        long,
        global = true,
        default_value_t = 30,
        value_name = "SECONDS",
        value_parser = clap::value_parser!(u64).range(1..=3600)
    )]
    pub timeout: u64,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Human-readable tables.
    Table,
    /// JSON: an array for `list`, an object otherwise (shape documented in the README).
    Json,
}

/// Top-level commands.
// Parsed once per run: the size of the largest variant (device flags) does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Tenants (MSP customers).
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Providers (app registrations).
    #[command(subcommand)]
    Provider(ProviderCommand),
    /// Mailboxes (the printers' "tokens").
    #[command(subcommand)]
    Mailbox(MailboxCommand),
    /// Devices (printers, MFDs).
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Agents (site processes hosting devices).
    #[command(subcommand)]
    Agent(AgentCommand),
    /// Fleet status: what the agents report about their devices.
    #[command(subcommand)]
    Fleet(crate::commands::fleet::FleetCommand),
    /// List audit events, newest first.
    Audit(AuditArgs),
    /// Admin API keys: create (the key is shown once), list, revoke.
    #[command(subcommand)]
    ApiKey(ApiKeyCommand),
    /// Show the role and tenant of the API key in use.
    Whoami,
    /// Print a shell completion script.
    Completions {
        /// Shell to generate the script for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Accepts only `http://` and `https://` URLs with a host.
fn parse_broker_url(text: &str) -> Result<String, String> {
    let uri: tonic::transport::Uri = text
        .parse()
        .map_err(|e| format!("not a URL ({e}); expected e.g. {DEFAULT_BROKER}"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => {
            return Err(format!(
                "must start with http:// or https://, e.g. {DEFAULT_BROKER}"
            ));
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("has no host; expected e.g. {DEFAULT_BROKER}"));
    }
    Ok(text.trim_end_matches('/').to_owned())
}

// ---------------------------------------------------------------------------------------------
// Shared argument groups

/// Paging of `list`.
#[derive(Debug, Clone, Copy, Args)]
pub struct ListArgs {
    /// Results per request to the broker (1-1000; default: the broker's, 100).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(1..=1000))]
    pub page_size: Option<i32>,
    /// Stop after this many results (default: all pages).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub limit: Option<u64>,
}

/// Identifies an object inside a tenant.
#[derive(Debug, Clone, Args)]
pub struct ScopedName {
    /// Tenant the object belongs to.
    #[arg(long, env = "TOKENFLEET_TENANT", value_name = "TENANT")]
    pub tenant: String,
    /// Name of the object.
    #[arg(long, value_name = "NAME")]
    pub name: String,
}

/// Identifies a tenant.
#[derive(Debug, Clone, Args)]
pub struct TenantName {
    /// Name of the tenant.
    #[arg(long, value_name = "NAME")]
    pub name: String,
}

/// Tenant whose objects to list.
#[derive(Debug, Clone, Args)]
pub struct TenantScope {
    /// Tenant whose objects to list.
    #[arg(long, env = "TOKENFLEET_TENANT", value_name = "TENANT")]
    pub tenant: String,
}

/// Conditional update/delete.
#[derive(Debug, Clone, Copy, Args)]
pub struct VersionArg {
    /// Only if the stored version is still N (fails with "aborted" otherwise).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub version: Option<u64>,
}

// ---------------------------------------------------------------------------------------------
// Tenants

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
    },
}

/// Settable fields of a tenant.
#[derive(Debug, Clone, Default, Args)]
pub struct TenantFields {
    /// Human-readable name.
    #[arg(long, value_name = "TEXT")]
    pub display_name: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Providers

/// `provider …`
#[derive(Debug, Subcommand)]
pub enum ProviderCommand {
    /// Create a provider (app registration).
    #[command(mut_arg("client_id", |a| a.required(true)))]
    Create {
        #[command(flatten)]
        id: ScopedName,
        /// Kind of app registration (cannot change later).
        #[arg(long, value_enum)]
        kind: ProviderKind,
        #[command(flatten)]
        fields: ProviderFields,
    },
    /// List the providers of a tenant.
    List {
        #[command(flatten)]
        scope: TenantScope,
        #[command(flatten)]
        list: ListArgs,
    },
    /// Show one provider.
    Show {
        #[command(flatten)]
        id: ScopedName,
    },
    /// Change the given fields of a provider (the kind cannot change).
    Update {
        #[command(flatten)]
        id: ScopedName,
        #[command(flatten)]
        fields: ProviderFields,
        #[command(flatten)]
        clear: ProviderClear,
        #[command(flatten)]
        version: VersionArg,
    },
    /// Delete a provider (only when no mailbox uses it).
    Delete {
        #[command(flatten)]
        id: ScopedName,
        #[command(flatten)]
        version: VersionArg,
    },
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

// ---------------------------------------------------------------------------------------------
// Mailboxes

/// `mailbox …`
#[derive(Debug, Subcommand)]
pub enum MailboxCommand {
    /// Create a mailbox.
    #[command(
        mut_arg("address", |a| a.required(true)),
        mut_arg("provider", |a| a.required(true)),
        mut_arg("grant_type", |a| a.required(true)),
        mut_arg("kind", |a| a.required(true)),
        mut_arg("purposes", |a| a.required(true))
    )]
    Create {
        #[command(flatten)]
        id: ScopedName,
        #[command(flatten)]
        fields: MailboxFields,
    },
    /// List the mailboxes of a tenant, with their token status.
    List {
        #[command(flatten)]
        scope: TenantScope,
        #[command(flatten)]
        list: ListArgs,
    },
    /// Show one mailbox.
    Show {
        #[command(flatten)]
        id: ScopedName,
    },
    /// Change the given fields of a mailbox.
    Update {
        #[command(flatten)]
        id: ScopedName,
        #[command(flatten)]
        fields: MailboxFields,
        #[command(flatten)]
        version: VersionArg,
    },
    /// Delete a mailbox (only when no device uses it).
    Delete {
        #[command(flatten)]
        id: ScopedName,
        #[command(flatten)]
        version: VersionArg,
    },
    /// Obtain the mailbox's grant: show the device code or sign-in URL and wait for the person
    /// (app-only and service-account mailboxes get their token at once). Exit 0 only when ACTIVE.
    Consent(crate::commands::consent::ConsentArgs),
    /// Delete the mailbox's stored tokens (revoked at the provider where possible).
    DeleteToken(crate::commands::consent::MailboxRef),
    /// Refresh the mailbox's access token now.
    Refresh(crate::commands::consent::MailboxRef),
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

// ---------------------------------------------------------------------------------------------
// Devices

/// `device …`
#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Create a device.
    #[command(mut_arg("sender_mode", |a| a.required(true)))]
    Create {
        #[command(flatten)]
        id: ScopedName,
        #[command(flatten)]
        fields: DeviceFields,
    },
    /// List the devices of a tenant.
    List {
        #[command(flatten)]
        scope: TenantScope,
        #[command(flatten)]
        list: ListArgs,
    },
    /// Show one device.
    Show {
        #[command(flatten)]
        id: ScopedName,
    },
    /// Change the given fields of a device.
    Update {
        #[command(flatten)]
        id: ScopedName,
        #[command(flatten)]
        fields: DeviceFields,
        #[command(flatten)]
        clear: DeviceClear,
        #[command(flatten)]
        version: VersionArg,
    },
    /// Delete a device.
    Delete {
        #[command(flatten)]
        id: ScopedName,
        #[command(flatten)]
        version: VersionArg,
    },
    /// Test a device's upstream connection from its agent (exit 0 only when the verdict is ok).
    Test(crate::commands::fleet::DeviceTestArgs),
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

// ---------------------------------------------------------------------------------------------
// Agents

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
    EnrollCode(crate::agent_identity::EnrollCodeArgs),
    /// Revoke an agent: its next call to the broker is refused. Final for this agent name.
    Revoke(crate::agent_identity::RevokeArgs),
    /// Delete an agent (only when it hosts no devices).
    Delete {
        #[command(flatten)]
        id: ScopedName,
        #[command(flatten)]
        version: VersionArg,
    },
}

/// Settable fields of an agent.
#[derive(Debug, Clone, Default, Args)]
pub struct AgentFields {
    /// Human-readable name (site).
    #[arg(long, value_name = "TEXT")]
    pub display_name: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Audit

/// `audit`
#[derive(Debug, Clone, Args)]
pub struct AuditArgs {
    /// Tenant whose events to list (default: fleet-wide events; fleet-admin only).
    #[arg(long, env = "TOKENFLEET_TENANT", value_name = "TENANT")]
    pub tenant: Option<String>,
    /// Show at most N events.
    #[arg(long, default_value_t = 50, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub limit: u64,
    /// Events per request to the broker (1-1000).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(1..=1000))]
    pub page_size: Option<i32>,
    /// Which records: changes that took effect, refused attempts, token issuances, or all.
    #[arg(long, value_enum, default_value_t = AuditKind::All)]
    pub kind: AuditKind,
}

// ---------------------------------------------------------------------------------------------
// API keys

/// `api-key …`
#[derive(Debug, Subcommand)]
pub enum ApiKeyCommand {
    /// Create an API key and print it once (the broker keeps only its hash).
    Create {
        /// Role of the key.
        #[arg(long, value_enum)]
        role: ApiKeyRole,
        /// Tenant the key is limited to (required for tenant-admin; optional for viewer).
        #[arg(long, value_name = "TENANT")]
        tenant: Option<String>,
        /// What the key is for.
        #[arg(long, default_value = "", value_name = "TEXT")]
        description: String,
    },
    /// List API keys (ids, roles, tenants; never the keys themselves).
    List {
        /// Only keys bound to this tenant.
        #[arg(long, env = "TOKENFLEET_TENANT", value_name = "TENANT")]
        tenant: Option<String>,
    },
    /// Revoke an API key: it stops working on its next call.
    Revoke {
        /// The key's id (`tfk_<id>_…`, as `api-key list` shows it).
        #[arg(long, value_name = "ID")]
        id: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use clap::error::ErrorKind;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("tokenfleetctl").chain(args.iter().copied()))
    }

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn create_requires_the_essential_fields_but_update_does_not() {
        let err = parse(&["provider", "create", "--tenant", "acme", "--name", "m365"])
            .err()
            .map(|e| e.kind());
        assert_eq!(err, Some(ErrorKind::MissingRequiredArgument));
        assert!(
            parse(&[
                "provider",
                "update",
                "--tenant",
                "acme",
                "--name",
                "m365",
                "--authority",
                "common"
            ])
            .is_ok()
        );
        let err = parse(&[
            "mailbox",
            "create",
            "--tenant",
            "a",
            "--name",
            "b",
            "--address",
            "x@y.z",
        ])
        .err()
        .map(|e| e.kind());
        assert_eq!(err, Some(ErrorKind::MissingRequiredArgument));
    }

    #[test]
    fn unknown_enum_value_lists_the_valid_ones() {
        let err = parse(&[
            "device",
            "create",
            "--tenant",
            "a",
            "--name",
            "d",
            "--sender-mode",
            "admin",
        ])
        .err();
        let Some(err) = err else {
            panic!("an unknown sender mode must be refused");
        };
        assert_eq!(err.kind(), ErrorKind::InvalidValue);
        let text = err.to_string();
        for valid in ["fixed_admin", "bulk", "login_user", "allow_user_change"] {
            assert!(text.contains(valid), "{text}");
        }
    }

    #[test]
    fn secrets_are_not_accepted_as_flag_values() {
        let err = parse(&[
            "provider",
            "create",
            "--tenant",
            "a",
            "--name",
            "p",
            "--kind",
            "microsoft",
            "--client-id",
            "id",
            "--client-secret",
            "hunter2",
        ])
        .err()
        .map(|e| e.kind());
        assert_eq!(err, Some(ErrorKind::UnknownArgument));
    }

    #[test]
    fn boolean_flags_take_an_optional_value() {
        let cli = parse(&[
            "mailbox",
            "update",
            "--tenant",
            "a",
            "--name",
            "m",
            "--disabled",
        ]);
        let Ok(Cli {
            command: Command::Mailbox(MailboxCommand::Update { fields, .. }),
            ..
        }) = cli
        else {
            panic!("mailbox update must parse");
        };
        assert_eq!(fields.disabled, Some(true));
        let cli = parse(&[
            "mailbox",
            "update",
            "--tenant",
            "a",
            "--name",
            "m",
            "--disabled=false",
        ]);
        let Ok(Cli {
            command: Command::Mailbox(MailboxCommand::Update { fields, .. }),
            ..
        }) = cli
        else {
            panic!("mailbox update must parse");
        };
        assert_eq!(fields.disabled, Some(false));
    }

    #[test]
    fn global_flags_go_anywhere_and_urls_are_checked() {
        let cli = parse(&[
            "tenant",
            "list",
            "-o",
            "json",
            "--broker",
            "http://127.0.0.1:1/",
        ]);
        let Ok(cli) = cli else {
            panic!("must parse");
        };
        assert_eq!(cli.global.output, OutputFormat::Json);
        assert_eq!(cli.global.broker, "http://127.0.0.1:1");
        assert!(parse(&["--broker", "127.0.0.1:50051", "whoami"]).is_err());
        assert!(parse(&["--broker", "ftp://127.0.0.1", "whoami"]).is_err());
    }
}
