//! The agent's integration tests, one test binary with a module per area; `smtp_support` is the
//! scripted upstream SMTP server the upstream and probe tests share; `fuzz` runs the protocol
//! parsers' fuzz targets briefly.

mod cli;
mod fuzz;
mod maildrop;
mod pop3_server;
mod probe;
mod runtime;
mod smtp_ingress;
mod smtp_support;
mod spool;
mod upstream_smtp;

/// The libtest name of the test `name` in `module` (a `module_path!()` of this binary): the path
/// without the binary's crate name, for re-running one test of this binary in a child process.
fn libtest_name(module: &str, name: &str) -> String {
    let module = module.split_once("::").map_or(module, |(_, rest)| rest);
    format!("{module}::{name}")
}
