//! `completion SHELL` (clap_complete's script for commands and flags, plus a few lines of shell
//! that complete object names) and the hidden `__complete KIND [--tenant T]` that those lines
//! call: it prints the names of the objects of one kind, one per line, as the broker lists them
//! to the key in use.
//!
//! Why hand-written shell lines: clap_complete's static scripts know no values that only the
//! broker knows, and its dynamic completion is still behind an unstable feature; the glue below
//! only decides when a name is wanted and otherwise hands over to clap_complete's function.

use clap::Args;

use super::Ctx;
use super::resource::{self, Agents, CtlResource, Devices, Mailboxes, Providers, Tenants};
use crate::args::{ListArgs, TenantScope};
use crate::error::CtlError;
use crate::output::{Printer, emit};

pub use clap_complete::Shell;

/// How to install the scripts (shown in `completion --help`).
pub const INSTALL_HELP: &str = "\
Install:
  bash:  tokenfleetctl completion bash > ~/.local/share/bash-completion/completions/tokenfleetctl
         (or: source <(tokenfleetctl completion bash) in ~/.bashrc)
  zsh:   source <(tokenfleetctl completion zsh) in ~/.zshrc, after compinit
  fish:  tokenfleetctl completion fish > ~/.config/fish/completions/tokenfleetctl.fish

Besides commands and flags, bash, zsh and fish complete object names (the NAME of show,
update, delete, … and the value of --tenant) by asking the broker with the settings in effect
(context, TOKENFLEET_* variables).";

/// `__complete`
#[derive(Debug, Clone, Args)]
pub struct CompleteArgs {
    /// What to list: tenant, provider, mailbox, device or agent.
    #[arg(value_name = "KIND")]
    pub kind: String,
    #[command(flatten)]
    pub scope: TenantScope,
}

/// Verbs whose positional NAME is an existing object.
const NAME_VERBS: &str = "show update delete consent delete-token refresh test enroll-code revoke";
/// Resources whose names can be completed.
const KINDS: &str = "tenant provider mailbox device agent";

/// Prints the completion script for `shell`.
pub fn script(shell: Shell, mut cmd: clap::Command) -> Result<(), CtlError> {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "tokenfleetctl", &mut out);
    let glue = match shell {
        Shell::Bash => BASH_NAMES,
        Shell::Zsh => ZSH_NAMES,
        Shell::Fish => FISH_NAMES,
        _ => "",
    };
    let glue = glue
        .replace("@VERBS@", NAME_VERBS)
        .replace("@KINDS@", KINDS);
    out.extend_from_slice(glue.as_bytes());
    Printer::raw(&out)
}

/// Runs `__complete`: the names of every object of a kind (in the tenant of `--tenant` or the
/// context for scoped kinds).
pub async fn names(args: CompleteArgs, ctx: &Ctx) -> Result<(), CtlError> {
    async fn all<R: CtlResource>(ctx: &Ctx, tenant: String) -> Result<Vec<String>, CtlError> {
        let objects = resource::fetch_all::<R>(ctx, tenant, ListArgs::default()).await?;
        Ok(objects.iter().map(|o| R::name_of(o).name).collect())
    }
    let scoped = |ctx: &Ctx| ctx.tenant(args.scope.tenant.clone());
    let names = match args.kind.as_str() {
        "tenant" => all::<Tenants>(ctx, String::new()).await?,
        "provider" => all::<Providers>(ctx, scoped(ctx)?).await?,
        "mailbox" => all::<Mailboxes>(ctx, scoped(ctx)?).await?,
        "device" => all::<Devices>(ctx, scoped(ctx)?).await?,
        "agent" => all::<Agents>(ctx, scoped(ctx)?).await?,
        other => {
            return Err(CtlError::usage(format!(
                "cannot complete `{other}`: use one of {KINDS}"
            )));
        }
    };
    if names.is_empty() {
        return Ok(());
    }
    emit(&names.join("\n"))
}

const BASH_NAMES: &str = r#"
# Object names, from the broker: `tokenfleetctl __complete KIND [--tenant TENANT]`.
_tokenfleetctl_with_names() {
    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}"
    local kind="${COMP_WORDS[1]}" verb="${COMP_WORDS[2]}" tenant="" words="" i
    for ((i = 1; i < COMP_CWORD; i++)); do
        if [[ "${COMP_WORDS[i]}" == --tenant ]]; then tenant="${COMP_WORDS[i+1]}"; fi
    done
    if [[ "$prev" == --tenant ]]; then
        words="$(tokenfleetctl __complete tenant 2>/dev/null)"
    elif [[ "$cur" != -* && " @KINDS@ " == *" $kind "* && " @VERBS@ " == *" $verb "* ]] &&
        { [[ "$prev" == --name ]] || [[ $COMP_CWORD -eq 3 ]] ||
          [[ $COMP_CWORD -eq 5 && "${COMP_WORDS[3]}" == --tenant ]]; }; then
        words="$(tokenfleetctl __complete "$kind" ${tenant:+--tenant "$tenant"} 2>/dev/null)"
    else
        _tokenfleetctl "$@"
        return
    fi
    local IFS=$'\n'
    COMPREPLY=($(compgen -W "$words" -- "$cur"))
}
complete -F _tokenfleetctl_with_names -o bashdefault -o default tokenfleetctl
"#;

const ZSH_NAMES: &str = r#"
# Object names, from the broker: `tokenfleetctl __complete KIND [--tenant TENANT]`.
_tokenfleetctl_with_names() {
    local kind=${words[2]} verb=${words[3]} tenant="" i
    local -a names
    for ((i = 2; i < CURRENT; i++)); do
        [[ ${words[i]} == --tenant ]] && tenant=${words[i+1]}
    done
    if [[ ${words[CURRENT-1]} == --tenant ]]; then
        names=(${(f)"$(tokenfleetctl __complete tenant 2>/dev/null)"})
        compadd -a names
        return
    fi
    if [[ ${words[CURRENT]} != -* && " @KINDS@ " == *" $kind "* && " @VERBS@ " == *" $verb "* ]] &&
        { [[ ${words[CURRENT-1]} == --name ]] || (( CURRENT == 4 )) ||
          [[ $CURRENT -eq 6 && ${words[4]} == --tenant ]] }; then
        if [[ -n $tenant ]]; then
            names=(${(f)"$(tokenfleetctl __complete $kind --tenant $tenant 2>/dev/null)"})
        else
            names=(${(f)"$(tokenfleetctl __complete $kind 2>/dev/null)"})
        fi
        compadd -a names
        return
    fi
    _tokenfleetctl "$@"
}
compdef _tokenfleetctl_with_names tokenfleetctl
"#;

const FISH_NAMES: &str = r#"
# Object names, from the broker: `tokenfleetctl __complete KIND [--tenant TENANT]`.
function __tokenfleetctl_names --argument-names kind
    set -l words (commandline -opc)
    set -l args
    set -l i (contains -i -- --tenant $words)
    if test -n "$i"
        set args --tenant $words[(math $i + 1)]
    end
    tokenfleetctl __complete $kind $args 2>/dev/null
end
for kind in @KINDS@
    complete -c tokenfleetctl -n "__fish_seen_subcommand_from $kind; and __fish_seen_subcommand_from @VERBS@" -f -a "(__tokenfleetctl_names $kind)"
end
complete -c tokenfleetctl -l tenant -x -a "(tokenfleetctl __complete tenant 2>/dev/null)"
"#;
