//! `config set-context|use-context|get-contexts|current-context|delete-context`: the named
//! contexts of the config file (see [`crate::config`]). These commands never contact a broker.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use serde::Serialize;

use crate::config::{self, ConfigFile};
use crate::error::CtlError;
use crate::output::{Listed, Printer};

/// `config …`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Create or change a context: `config set-context NAME --broker URL --ca FILE --key-file
    /// FILE --tenant TENANT` (only the given fields change; paths are stored absolute).
    SetContext(SetContextArgs),
    /// Make NAME the context used when --context is not given.
    UseContext {
        /// Name of the context.
        #[arg(value_name = "NAME")]
        name: String,
    },
    /// List the contexts (the current one marked with `*`).
    GetContexts,
    /// Print the name of the current context.
    CurrentContext,
    /// Remove a context from the file.
    DeleteContext {
        /// Name of the context.
        #[arg(value_name = "NAME")]
        name: String,
    },
}

/// `config set-context`. The broker URL is the global `--broker` (as typed, never taken from
/// `TOKENFLEET_BROKER`).
#[derive(Debug, Clone, Args)]
pub struct SetContextArgs {
    /// Name of the context.
    #[arg(value_name = "NAME")]
    pub name: String,
    /// CA certificate (PEM) of the broker.
    #[arg(long, value_name = "PATH")]
    pub ca: Option<PathBuf>,
    /// File holding the API key for this broker.
    #[arg(long, value_name = "PATH")]
    pub key_file: Option<PathBuf>,
    /// Default tenant of the scoped commands ("" removes it).
    #[arg(long, value_name = "TENANT")]
    pub tenant: Option<String>,
    /// Also make it the current context.
    #[arg(long)]
    pub use_context: bool,
}

/// One row of `config get-contexts`.
#[derive(Debug, Clone, Serialize)]
pub struct ContextView {
    pub name: String,
    pub current: bool,
    pub broker: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub tenant: Option<String>,
}

impl Listed for ContextView {
    const PLURAL: &'static str = "contexts";
    fn columns() -> &'static [&'static str] {
        &["CURRENT", "NAME", "BROKER", "CA FILE", "KEY FILE", "TENANT"]
    }
    fn row(&self) -> Vec<String> {
        let path = |p: &Option<PathBuf>| {
            p.as_ref()
                .map_or_else(|| "-".to_owned(), |p| p.display().to_string())
        };
        vec![
            if self.current { "*" } else { "" }.to_owned(),
            self.name.clone(),
            self.broker.clone().unwrap_or_else(|| "-".to_owned()),
            path(&self.ca_file),
            path(&self.key_file),
            self.tenant.clone().unwrap_or_else(|| "-".to_owned()),
        ]
    }
    fn name(&self) -> String {
        self.name.clone()
    }
}

/// Runs `config …`; `broker` is `--broker` when it was typed on the command line.
pub fn run(cmd: ConfigCommand, broker: Option<String>, printer: &Printer) -> Result<(), CtlError> {
    let path = config::config_path(|name| std::env::var(name).ok())?;
    let mut file = config::load(&path)?;
    match cmd {
        ConfigCommand::SetContext(args) => {
            let name = args.name.clone();
            set_context(&mut file, args, broker)?;
            config::save(&path, &file)?;
            eprintln!("context `{name}` saved in {}", path.display());
            Ok(())
        }
        ConfigCommand::UseContext { name } => {
            known_context(&file, &name)?;
            file.current_context = Some(name.clone());
            config::save(&path, &file)?;
            eprintln!("now using context `{name}`");
            Ok(())
        }
        ConfigCommand::GetContexts => printer.list(&views(&file)),
        ConfigCommand::CurrentContext => match &file.current_context {
            Some(name) => crate::output::emit(name),
            None => Err(CtlError::usage(format!(
                "no current context in {}; see `tokenfleetctl config use-context NAME`",
                path.display()
            ))),
        },
        ConfigCommand::DeleteContext { name } => {
            known_context(&file, &name)?;
            file.contexts.remove(&name);
            if file.current_context.as_deref() == Some(name.as_str()) {
                file.current_context = None;
            }
            config::save(&path, &file)?;
            eprintln!("context `{name}` deleted");
            Ok(())
        }
    }
}

fn known_context(file: &ConfigFile, name: &str) -> Result<(), CtlError> {
    if file.contexts.contains_key(name) {
        return Ok(());
    }
    Err(CtlError::usage(format!(
        "no context `{name}` (known: {}); create it with `tokenfleetctl config set-context {name} --broker URL`",
        config::known(file)
    )))
}

/// Changes the given fields of context `args.name` (creating it).
fn set_context(
    file: &mut ConfigFile,
    args: SetContextArgs,
    broker: Option<String>,
) -> Result<(), CtlError> {
    if args.name.trim().is_empty() {
        return Err(CtlError::usage("the context name is empty"));
    }
    let cwd = std::env::current_dir().unwrap_or_default();
    let context = file.contexts.entry(args.name.clone()).or_default();
    if let Some(broker) = broker {
        context.broker = Some(broker);
    }
    if let Some(ca) = args.ca {
        context.ca_file = Some(absolute(&cwd, ca, "--ca")?);
    }
    if let Some(key) = args.key_file {
        context.key_file = Some(absolute(&cwd, key, "--key-file")?);
    }
    if let Some(tenant) = args.tenant {
        context.tenant = Some(tenant).filter(|t| !t.is_empty());
    }
    if args.use_context || file.current_context.is_none() {
        file.current_context = Some(args.name);
    }
    Ok(())
}

/// `path` made absolute against `cwd`; it must name an existing file (so a typo shows now, not at
/// the next call).
fn absolute(cwd: &Path, path: PathBuf, flag: &str) -> Result<PathBuf, CtlError> {
    let path = if path.is_absolute() {
        path
    } else {
        cwd.join(path)
    };
    if !path.is_file() {
        return Err(CtlError::usage(format!(
            "{flag} {}: no such file",
            path.display()
        )));
    }
    Ok(path)
}

fn views(file: &ConfigFile) -> Vec<ContextView> {
    file.contexts
        .iter()
        .map(|(name, c)| ContextView {
            name: name.clone(),
            current: file.current_context.as_deref() == Some(name.as_str()),
            broker: c.broker.clone(),
            ca_file: c.ca_file.clone(),
            key_file: c.key_file.clone(),
            tenant: c.tenant.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(name: &str) -> SetContextArgs {
        SetContextArgs {
            name: name.into(),
            ca: None,
            key_file: None,
            tenant: None,
            use_context: false,
        }
    }

    #[test]
    fn set_context_changes_only_the_given_fields_and_the_first_becomes_current() {
        let mut file = ConfigFile::default();
        let mut a = args("east");
        a.tenant = Some("acme".into());
        set_context(&mut file, a, Some("https://east.example:1".into())).unwrap();
        set_context(
            &mut file,
            args("west"),
            Some("https://west.example:1".into()),
        )
        .unwrap();
        assert_eq!(file.current_context.as_deref(), Some("east"));
        let mut a = args("east");
        a.tenant = Some(String::new());
        set_context(&mut file, a, None).unwrap();
        let east = &file.contexts["east"];
        assert_eq!(east.broker.as_deref(), Some("https://east.example:1"));
        assert_eq!(east.tenant, None);
        let mut a = args("west");
        a.key_file = Some("/nonexistent/key".into());
        assert!(set_context(&mut file, a, None).is_err());
    }
}
