//! The broker's operations layer, without a transport: what the Admin gRPC service, the HTTP
//! listener and the agent-facing service share. It holds the one error type ([`Error`]), the
//! kit every operation uses (names for messages and audit targets, paging, reading and writing
//! versioned records with the errors a caller sees, audited changes), the generic resource
//! operations (create/get/list/update/delete with versions, references, server-owned fields and
//! audit, see [`resource`]) and the provider policy.
//!
//! Dependency direction: `ops` uses the domain, store, seal and `crate::{records, audit, authz,
//! state, convert}`; it never names tonic, the proto crate or axum, and nothing in it imports
//! the edges (the Admin and TokenBroker services, the status mappings in `edge`). The test
//! below fails when a transport type or an edge appears here, so the later move into a crate of
//! its own is a move.

pub mod change;
pub mod error;
pub mod names;
pub mod paging;
pub mod provider_policy;
pub mod resource;
pub mod stored;

pub use error::{Error, Result};

#[cfg(test)]
mod tests {
    /// The files of this module, checked for transport types.
    const SOURCES: &[(&str, &str)] = &[
        ("mod.rs", include_str!("mod.rs")),
        ("change.rs", include_str!("change.rs")),
        ("error.rs", include_str!("error.rs")),
        ("names.rs", include_str!("names.rs")),
        ("paging.rs", include_str!("paging.rs")),
        ("provider_policy.rs", include_str!("provider_policy.rs")),
        ("resource.rs", include_str!("resource.rs")),
        ("stored.rs", include_str!("stored.rs")),
    ];

    #[test]
    fn ops_is_transport_free() {
        let banned = [
            ["ton", "ic"].concat(),
            ["tokenfleet", "_proto"].concat(),
            ["ax", "um"].concat(),
            ["pb", "::"].concat(),
            ["crate::", "admin"].concat(),
            ["crate::", "edge"].concat(),
            ["crate::", "token_broker"].concat(),
        ];
        for (file, text) in SOURCES {
            // Code only: the documentation may say what the module does not use.
            let code: String = text
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n");
            for word in &banned {
                assert!(
                    !code.contains(word.as_str()),
                    "ops/{file} names `{word}`: the operations layer must stay transport-free"
                );
            }
        }
    }
}
