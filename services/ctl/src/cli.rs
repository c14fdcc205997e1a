//! The command line as a whole (clap derive) and the composition root: it parses, resolves the
//! settings (flags and environment over the context over the defaults), builds the [`Ctx`] and
//! dispatches to the one command module that runs. The commands' own flags live in their modules
//! (`commands::*`); flags mirror the fields of `tokenfleet.v1`; secrets are only ever read from
//! files (or `-` for standard input), never taken as flag values.

use std::path::PathBuf;

use clap::{Args, CommandFactory as _, Parser, Subcommand};

use crate::commands::{self, Ctx};
use crate::config::{self, Overrides};
use crate::error::CtlError;
use crate::output::{OutputFormat, Printer};

const ENV_HELP: &str = "\
Environment:
  TOKENFLEET_BROKER         broker URL (same as --broker)
  TOKENFLEET_API_KEY        the API key itself
  TOKENFLEET_API_KEY_FILE   file holding the API key (same as --api-key-file)
  TOKENFLEET_TENANT         default for --tenant
  TOKENFLEET_CA_FILE        CA certificate for an https:// broker (same as --ca-file)
  TOKENFLEETCTL_CONTEXT     context to use (same as --context)
  TOKENFLEETCTL_CONFIG      config file with the contexts (default:
                            $XDG_CONFIG_HOME/tokenfleetctl/config.yaml or
                            ~/.config/tokenfleetctl/config.yaml)

Flags and environment override the context; the context overrides the defaults.

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
    /// Broker admin API URL, http:// or https:// (default: the context's, else
    /// https://localhost:50051).
    #[arg(
        long,
        global = true,
        env = "TOKENFLEET_BROKER",
        value_name = "URL",
        value_parser = broker_url
    )]
    pub broker: Option<String>,

    /// File holding the API key (overrides TOKENFLEET_API_KEY, TOKENFLEET_API_KEY_FILE and the
    /// context's key file).
    #[arg(long, global = true, value_name = "PATH")]
    pub api_key_file: Option<PathBuf>,

    /// CA certificate (PEM) to trust for an https:// broker instead of the system roots.
    /// Set but empty, `TOKENFLEET_CA_FILE` counts as not set (as every variable here).
    #[arg(
        long,
        global = true,
        env = "TOKENFLEET_CA_FILE",
        value_name = "PATH",
        value_parser = any_path
    )]
    pub ca_file: Option<PathBuf>,

    /// Context of the config file to use (default: its current context).
    #[arg(
        long,
        global = true,
        env = "TOKENFLEETCTL_CONTEXT",
        value_name = "NAME"
    )]
    pub context: Option<String>,

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

/// Top-level commands.
// Parsed once per run: the size of the largest variant (device flags) does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Tenants (MSP customers).
    #[command(
        subcommand,
        mut_subcommand("create", |c| c.about("Create a tenant")),
        mut_subcommand("list", |c| c.about("List the tenants (a tenant-bound key: its own)")),
        mut_subcommand("show", |c| c.about("Show one tenant")),
        mut_subcommand("update", |c| c.about("Change the given fields of a tenant")),
        mut_subcommand("delete", |c| c.about("Delete a tenant (only when it holds nothing); asks first")),
    )]
    Tenant(commands::tenant::TenantCommand),
    /// Providers (app registrations).
    #[command(
        subcommand,
        mut_subcommand("create", |c| c
            .about("Create a provider (app registration)")
            .mut_arg("client_id", |a| a.required(true))),
        mut_subcommand("list", |c| c.about("List the providers of a tenant (or of every tenant)")),
        mut_subcommand("show", |c| c.about("Show one provider")),
        mut_subcommand("update", |c| c.about("Change the given fields of a provider (the kind cannot change)")),
        mut_subcommand("delete", |c| c.about("Delete a provider (only when no mailbox uses it); asks first")),
    )]
    Provider(commands::provider::ProviderCommand),
    /// Mailboxes (the printers' "tokens").
    #[command(
        subcommand,
        mut_subcommand("create", |c| c
            .about("Create a mailbox")
            .mut_arg("address", |a| a.required(true))
            .mut_arg("provider", |a| a.required(true))
            .mut_arg("grant_type", |a| a.required(true))
            .mut_arg("kind", |a| a.required(true))
            .mut_arg("purposes", |a| a.required(true))),
        mut_subcommand("list", |c| c.about("List the mailboxes of a tenant (or of every tenant), with their token status")),
        mut_subcommand("show", |c| c.about("Show one mailbox")),
        mut_subcommand("update", |c| c.about("Change the given fields of a mailbox")),
        mut_subcommand("delete", |c| c.about("Delete a mailbox (only when no device uses it); asks first")),
    )]
    Mailbox(commands::mailbox::MailboxCommand),
    /// Devices (printers, MFDs).
    #[command(
        subcommand,
        mut_subcommand("create", |c| c
            .about("Create a device")
            .mut_arg("sender_mode", |a| a.required(true))),
        mut_subcommand("list", |c| c.about("List the devices of a tenant (or of every tenant)")),
        mut_subcommand("show", |c| c.about("Show one device")),
        mut_subcommand("update", |c| c.about("Change the given fields of a device")),
        mut_subcommand("delete", |c| c.about("Delete a device; asks first")),
    )]
    Device(commands::device::DeviceCommand),
    /// Agents (site processes hosting devices).
    #[command(
        subcommand,
        mut_subcommand("create", |c| c.about("Pre-register an agent")),
        mut_subcommand("list", |c| c.about("List the agents of a tenant (or of every tenant)")),
        mut_subcommand("show", |c| c.about("Show one agent")),
        mut_subcommand("update", |c| c.about("Change the given fields of an agent")),
        mut_subcommand("delete", |c| c.about("Delete an agent (only when it hosts no devices); asks first")),
    )]
    Agent(commands::agent::AgentCommand),
    /// Consent links: single-use links a mailbox's owner opens to consent themselves.
    #[command(subcommand)]
    ConsentLink(commands::consent_link::ConsentLinkCommand),
    /// Fleet status: what the agents report about their devices.
    #[command(subcommand)]
    Fleet(commands::fleet::FleetCommand),
    /// Create or update tenants, providers, mailboxes and devices from a YAML file.
    Apply(commands::apply::ApplyArgs),
    /// Print tenants, providers, mailboxes and devices as YAML that `apply -f` accepts.
    Export(commands::apply::ExportArgs),
    /// List audit events, newest first.
    Audit(commands::audit::AuditArgs),
    /// Admin API keys: create (the key is shown once), list, revoke.
    #[command(subcommand)]
    ApiKey(commands::api_key::ApiKeyCommand),
    /// Show the role and tenant of the API key in use.
    Whoami,
    /// Named contexts (broker, CA, key file, default tenant) in the config file.
    #[command(subcommand)]
    Config(commands::config::ConfigCommand),
    /// Print a shell completion script (commands, flags and object names).
    #[command(alias = "completions", after_help = commands::completion::INSTALL_HELP)]
    Completion {
        /// Shell to generate the script for.
        #[arg(value_enum)]
        shell: commands::completion::Shell,
    },
    /// Names of objects, one per line, for the completion scripts.
    #[command(name = "__complete", hide = true)]
    Complete(commands::completion::CompleteArgs),
}

/// Runs one parsed command line. `broker_typed` says whether `--broker` was given on the command
/// line (not taken from the environment): `config set-context` stores only what was typed.
pub async fn run(cli: Cli, broker_typed: bool) -> Result<(), CtlError> {
    let Cli { global, command } = cli;
    let printer = Printer::new(global.output);
    match command {
        Command::Config(cmd) => {
            let broker = set(&global.broker).filter(|_| broker_typed);
            commands::config::run(cmd, broker, &printer)
        }
        Command::Completion { shell } => commands::completion::script(shell, Cli::command()),
        Command::Complete(args) => commands::completion::names(args, &context(&global)?).await,
        Command::Tenant(cmd) => commands::tenant::run(cmd, &context(&global)?).await,
        Command::Provider(cmd) => commands::provider::run(cmd, &context(&global)?).await,
        Command::Mailbox(cmd) => commands::mailbox::run(cmd, &context(&global)?).await,
        Command::Device(cmd) => commands::device::run(cmd, &context(&global)?).await,
        Command::Agent(cmd) => commands::agent::run(cmd, &context(&global)?).await,
        Command::Fleet(cmd) => commands::fleet::run(cmd, &context(&global)?).await,
        Command::Apply(args) => commands::apply::run_apply(args, &context(&global)?).await,
        Command::Export(args) => commands::apply::run_export(args, &context(&global)?).await,
        Command::Audit(args) => commands::audit::run_audit(args, &context(&global)?).await,
        Command::ApiKey(cmd) => commands::api_key::run(cmd, &context(&global)?).await,
        Command::ConsentLink(cmd) => commands::consent_link::run(cmd, &context(&global)?).await,
        Command::Whoami => commands::audit::run_whoami(&context(&global)?).await,
    }
}

// A variable of the environment set but empty (as deployment templates often leave them) counts
// as not set, for every setting read from one: the parsers below let the empty value through
// (clap's own refuse it, naming a flag nobody typed) and `context` drops it with [`set`].

/// A path as given, the empty one included.
fn any_path(text: &str) -> Result<PathBuf, std::convert::Infallible> {
    Ok(PathBuf::from(text))
}

/// A broker URL ([`config::parse_broker_url`]), or the empty value.
fn broker_url(text: &str) -> Result<String, String> {
    if text.is_empty() {
        return Ok(String::new());
    }
    config::parse_broker_url(text)
}

/// `value` unless it is empty.
fn set<T: AsRef<std::ffi::OsStr> + Clone>(value: &Option<T>) -> Option<T> {
    value.clone().filter(|v| !v.as_ref().is_empty())
}

/// The context of a command that talks to the broker: the settings resolved from the flags, the
/// environment and the config file.
fn context(global: &GlobalArgs) -> Result<Ctx, CtlError> {
    let overrides = Overrides {
        broker: set(&global.broker),
        ca_file: set(&global.ca_file),
        api_key_file: global.api_key_file.clone(),
        context: set(&global.context),
        timeout: global.timeout,
    };
    let file = match config::config_path(|name| std::env::var(name).ok()) {
        Ok(path) => config::load(&path)?,
        // Without a place for a config file there are no contexts; naming one is an error below.
        Err(_) => config::ConfigFile::default(),
    };
    let settings = config::resolve(overrides, &file)?;
    Ok(Ctx::new(settings, Printer::new(global.output)))
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
            command:
                Command::Mailbox(commands::mailbox::MailboxCommand::Crud(
                    commands::crud::Crud::Update { fields, .. },
                )),
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
            command:
                Command::Mailbox(commands::mailbox::MailboxCommand::Crud(
                    commands::crud::Crud::Update { fields, .. },
                )),
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
        assert_eq!(cli.global.broker.as_deref(), Some("http://127.0.0.1:1"));
        assert!(parse(&["--broker", "127.0.0.1:50051", "whoami"]).is_err());
        assert!(parse(&["--broker", "ftp://127.0.0.1", "whoami"]).is_err());
    }
}
