//! `tokenfleetctl`: operator CLI over the broker's Admin gRPC API.
//!
//! Exit codes: 0 ok, 1 the broker refused or failed the request, 2 usage or local input error,
//! 69 broker unreachable or unavailable.

mod agent_identity;
mod cli;
mod client;
mod commands;
mod enums;
mod error;
mod input;
mod output;
mod view;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
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
    match runtime.block_on(commands::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
