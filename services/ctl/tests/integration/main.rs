//! `tokenfleetctl`'s integration tests: the real CLI binary against an in-process broker, one test
//! binary with a module per area.

mod agent_identity;
mod cli;
mod consent;
mod fleet;
mod operator;
