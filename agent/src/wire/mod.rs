//! The agent's mail protocols without I/O: bytes (or lines) in, typed commands, replies and
//! events out, every size bounded. The socket loops — the SMTP ingress
//! ([`crate::ingress`]), the local POP3 server ([`crate::pop3_server`]), the upstream SMTP
//! client ([`crate::upstream::smtp`]), the POP3/IMAP fetch clients ([`crate::fetch`]) — own the
//! sockets, timeouts and session state and drive these modules; nothing here can block, read a
//! clock or touch a file, so every parser is fuzzed on its own ([`crate::fuzz`]).
//!
//! - [`smtp_server`]: SMTP commands and the `DATA` line grammar (SMTP-smuggling safe).
//! - [`smtp_client`]: SMTP replies, EHLO keywords, the `DATA` payload.
//! - [`imap`]: IMAP response framing (lines and literals, bounded) and the response fields the
//!   fetch client reads.
//! - [`pop3`]: POP3 commands (server side) and responses and multi-line bodies (client side).
//! - [`header`]: the RFC 5322 header block and address lists, one parser for the ingress's
//!   sender rewrite and the mail APIs' recipient check.
//! - SASL payloads live in [`crate::sasl`] (already pure).
//!
//! Libraries: `mail-parser` (stalwart) parses address lists; `smtp-proto` (stalwart) is the
//! reference implementation the fuzz targets compare the SMTP grammar against. Each module's
//! header says where a library does not fit and why.

pub mod header;
pub mod imap;
pub mod pop3;
pub mod smtp_client;
pub mod smtp_server;
