//! Argument groups that many commands share: how an object is named (positional `NAME`, with
//! `--name` accepted as an alias), the tenant it lives in, paging, conditional writes and the
//! confirmation of irreversible verbs. A leaf module: it knows clap and nothing of the commands.
//!
//! `ScopedName` and `TenantName` implement clap's `Args` by hand because the derive cannot fold
//! two arguments (the positional and `--name`) into one field.

use clap::{Arg, ArgMatches, Args, Command, FromArgMatches};

/// Id of the positional `NAME`.
const NAME: &str = "name";
/// Id of `--name`, the alias of the positional.
const NAME_FLAG: &str = "name_flag";
/// Id of `--tenant`.
const TENANT: &str = "tenant";

/// Adds the positional `NAME` and its `--name` alias (one of them is required; both is an error).
fn with_name(cmd: Command, what: &'static str) -> Command {
    cmd.arg(
        Arg::new(NAME)
            .value_name("NAME")
            .help(format!("Name of the {what}"))
            .required_unless_present(NAME_FLAG)
            .conflicts_with(NAME_FLAG),
    )
    .arg(
        Arg::new(NAME_FLAG)
            .long("name")
            .value_name("NAME")
            .help("Same as the positional NAME (give one of them)"),
    )
}

fn name_of(m: &ArgMatches) -> String {
    m.get_one::<String>(NAME)
        .or_else(|| m.get_one::<String>(NAME_FLAG))
        .cloned()
        .unwrap_or_default()
}

/// `--tenant`: optional on the command line because a context may give the default; the command
/// resolves an empty value (see `Ctx::tenant`).
fn tenant_arg(help: &'static str) -> Arg {
    Arg::new(TENANT)
        .long("tenant")
        .env("TOKENFLEET_TENANT")
        .value_name("TENANT")
        .help(help)
}

fn tenant_of(m: &ArgMatches) -> String {
    m.get_one::<String>(TENANT).cloned().unwrap_or_default()
}

/// Identifies an object inside a tenant: `NAME --tenant TENANT` (or `--name NAME`). An empty
/// `tenant` means "the context's default tenant".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopedName {
    pub tenant: String,
    pub name: String,
}

impl FromArgMatches for ScopedName {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        Ok(Self {
            tenant: tenant_of(m),
            name: name_of(m),
        })
    }
    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl Args for ScopedName {
    fn augment_args(cmd: Command) -> Command {
        with_name(
            cmd.arg(tenant_arg(
                "Tenant the object belongs to (default: the context's tenant)",
            )),
            "object",
        )
    }
    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

/// Identifies a tenant: `NAME` (or `--name NAME`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantName {
    pub name: String,
}

impl FromArgMatches for TenantName {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        Ok(Self { name: name_of(m) })
    }
    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl Args for TenantName {
    fn augment_args(cmd: Command) -> Command {
        with_name(cmd, "tenant")
    }
    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

/// Tenant whose objects to list (empty: the context's default tenant).
#[derive(Debug, Clone, Default, Args)]
pub struct TenantScope {
    /// Tenant whose objects to list (default: the context's tenant).
    #[arg(
        long,
        env = "TOKENFLEET_TENANT",
        value_name = "TENANT",
        default_value = ""
    )]
    pub tenant: String,
}

/// Which tenants a `list` covers: one (`--tenant`, default the context's), or with
/// `--all-tenants` every one the API key may see.
#[derive(Debug, Clone, Default, Args)]
pub struct TenantsScope {
    #[command(flatten)]
    pub scope: TenantScope,
    /// Every tenant the API key may see (a tenant-bound key sees its own); --tenant is ignored.
    #[arg(long)]
    pub all_tenants: bool,
}

/// Paging of `list`.
#[derive(Debug, Clone, Copy, Default, Args)]
pub struct ListArgs {
    /// Results per request to the broker (1-1000; default: the broker's, 100).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(1..=1000))]
    pub page_size: Option<i32>,
    /// Stop after this many results (default: all pages).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub limit: Option<u64>,
}

/// Conditional update/delete.
#[derive(Debug, Clone, Copy, Default, Args)]
pub struct VersionArg {
    /// Only if the stored version is still N (fails with "aborted" otherwise).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub version: Option<u64>,
}

/// Confirmation of an irreversible verb.
#[derive(Debug, Clone, Copy, Default, Args)]
pub struct ConfirmArg {
    /// Do not ask for confirmation (required when standard input is not a terminal).
    #[arg(short = 'y', long)]
    pub yes: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Probe {
        #[command(flatten)]
        id: ScopedName,
    }

    fn parse(args: &[&str]) -> Result<ScopedName, clap::Error> {
        Probe::try_parse_from(std::iter::once("probe").chain(args.iter().copied())).map(|p| p.id)
    }

    #[test]
    fn the_name_is_positional_or_given_with_name() {
        let want = ScopedName {
            tenant: "acme".into(),
            name: "scan".into(),
        };
        assert_eq!(
            parse(&["scan", "--tenant", "acme"]).ok(),
            Some(want.clone())
        );
        assert_eq!(
            parse(&["--name", "scan", "--tenant", "acme"]).ok(),
            Some(want)
        );
    }

    #[test]
    fn both_or_neither_name_is_refused() {
        let both = parse(&["scan", "--name", "other", "--tenant", "a"]).err();
        assert_eq!(
            both.map(|e| e.kind()),
            Some(clap::error::ErrorKind::ArgumentConflict)
        );
        let neither = parse(&["--tenant", "a"]).err();
        assert_eq!(
            neither.map(|e| e.kind()),
            Some(clap::error::ErrorKind::MissingRequiredArgument)
        );
    }
}
