//! `tokenfleetctl`: operator CLI over the broker's Admin gRPC API.
//!
//! Module layers (no module imports one above it): `cli` (the composition root: parses,
//! resolves settings, dispatches) → `commands::*` (one module per command) → `commands` (the
//! shared `Ctx`, update masks, paging) → `client`, `config`, `confirm`, `output`, `view`, `args`,
//! `enums`, `input`, `error` (leaves).
//!
//! Exit codes: 0 ok, 1 the broker refused or failed the request, 2 usage or local input error,
//! 69 broker unreachable or unavailable.

mod agent_identity;
mod args;
mod cli;
mod client;
mod commands;
mod config;
mod confirm;
mod enums;
mod error;
mod input;
mod output;
mod view;

use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::{CommandFactory as _, FromArgMatches as _};

fn main() -> ExitCode {
    let matches = cli::Cli::command().get_matches();
    let cli = match cli::Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let broker_typed = matches.value_source("broker") == Some(ValueSource::CommandLine);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(error::EXIT_API);
        }
    };
    match runtime.block_on(cli::run(cli, broker_typed)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
