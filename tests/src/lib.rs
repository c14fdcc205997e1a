//! Test kit: real servers for the tests, started on free loopback ports and stopped on drop (also
//! when a test panics) — Redis standalone and Cluster, an in-process broker — and the end-to-end
//! suites under `tests/tests/`.
//!
//! Dependency direction: depends on every tokenfleet crate; nothing ships depending on it.

pub mod agent_site;
pub mod broker;
pub mod chaos;
pub mod dovecot;
pub mod fake_idp;
pub mod fake_mail_api;
pub mod logs;
pub mod ports;
pub mod redis;
pub mod silent;
