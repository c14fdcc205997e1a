//! The end-to-end suites: real brokers, agents, CLI, Redis, Dovecot, helm and browsers, one test
//! binary with a module per suite. The log scan (`zz_log_scan.rs`) stays a binary of its own: it
//! runs last, after every test here has logged.

mod agent_connection_test_e2e;
mod agent_fetch;
mod agent_fetch_e2e;
mod agent_mail_api;
mod agent_metrics;
mod agent_send_e2e;
mod agent_smtp_upstream;
mod broker_e2e;
mod chaos;
mod cli_tenants;
mod consent_e2e;
mod console;
mod console_browser;
mod dovecot_xoauth2;
mod enrollment_e2e;
mod helm_chart;
mod malformed_grpc;
mod observability;
mod providers_fake_idp;
mod readiness;
mod refresh_replicas;
mod secrets_at_rest;
mod store_conformance;
mod traces;

/// Where the pages a mailbox owner opens (consent links) and everything they load live: what the
/// chart's Ingress routes from outside the cluster besides the consent callback (`helm_chart`
/// checks the routes, `console` the pages).
const OWNER_PAGE_PREFIXES: [&str; 2] = ["/consent/", "/console/static/"];

/// The libtest name of the test `name` in `module` (a `module_path!()` of this binary): the path
/// without the binary's crate name, for re-running one test of this binary in a child process.
fn libtest_name(module: &str, name: &str) -> String {
    let module = module.split_once("::").map_or(module, |(_, rest)| rest);
    format!("{module}::{name}")
}
