//! The tokenfleet fleet agent: relays legacy printers' mail to Exchange Online and Gmail with
//! OAuth tokens it gets from the broker, and fetches their mail back.
//!
//! A printer's message, one hop per module: [`ingress`] (the LAN-side SMTP server: devices,
//! local credentials, sender policy) → [`spool`] (durable, fsync before `250`) →
//! [`runtime::worker`] (retries, per-device status) → [`upstream`] (SMTP submission with
//! XOAUTH2/OAUTHBEARER, Microsoft Graph, the Gmail API). Fetching goes the other way:
//! [`fetch`] (POP3/IMAP with XOAUTH2) → [`maildrop`] → [`pop3_server`] (the LAN-side POP3
//! server). [`probe`] runs connection tests; [`identity`] enrolls the agent and keeps its client
//! certificate; [`config`] reads the local settings; [`metrics`] serves `/metrics` and
//! `/healthz` on a listener of their own.
//!
//! Underneath: [`wire`], the mail protocols without I/O (SMTP both sides, IMAP, POP3 both sides,
//! RFC 5322 headers), which every socket loop above drives, and [`sasl`]; [`fuzz`] holds their
//! fuzz targets. [`runtime`] is the running agent, assembled in one place
//! ([`runtime::wiring`], the composition root).
//!
//! Dependency direction: depends only on `tokenfleet-proto` (the wire types) and general crates,
//! never on broker crates. Inside the crate no import circle is larger than 3 files
//! (`python3 scripts/import-cycles.py agent`).

pub mod config;
pub mod durable;
pub mod fetch;
pub mod fuzz;
pub mod identity;
pub mod ingress;
mod line_server;
pub mod maildrop;
pub mod metrics;
pub mod pop3_server;
pub mod probe;
pub mod runtime;
pub mod sasl;
pub mod spool;
pub mod upstream;
pub mod wire;
