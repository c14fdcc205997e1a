//! tokenfleet's core: the broker's operations without a transport. It holds the state every
//! operation shares ([`state`]), the typed records over the store ([`records`]), authorization
//! ([`authz`]), the audit log and its listing ([`audit`]), the operations kit and the generic
//! resources ([`ops`]), the five admin resources in domain types ([`resources`]; a mailbox with
//! its grant's token state is [`resources::mailboxes::MailboxView`] wherever one is shown), API
//! keys and who may manage them ([`api_keys`]), consent links ([`consent_links`]), the token
//! lifecycle, consent, issuance and the operator's token operations ([`tokens`],
//! [`tokens::operator`]), the agent CA, enrollment codes and agent revocation ([`identity`]),
//! fleet state — agent configuration, device reports, commands to agents, connection tests
//! ([`fleet`]) —, operator alerts ([`alerts`]) and re-sealing ([`reseal`]).
//!
//! Operations take a caller ([`authz::Principal`], or an agent's [`identity::AgentId`]) and typed
//! input, authorize, do the work, audit, and return typed results or the one error type
//! [`ops::Error`]. The edges that put a transport in front of them — the gRPC services, the HTTP
//! listener and the web console of `tokenfleet-broker` — only decode, call and encode (the
//! console calls the operations with domain values); each maps [`ops::Error`] to its status
//! codes once. The unit tests share one kit (a state over a fresh store, callers, a tenant:
//! `testing`, test builds only).
//!
//! Dependency direction: `tokenfleet-domain`, `-seal`, `-store` and `-providers` are below this
//! crate; `tokenfleet-broker` is above it. This crate never depends on tonic, prost, the proto
//! crate or axum (its HTTP client, reqwest, is for calling out); the unit test
//! `tests::core_is_transport_free` reads `Cargo.lock` and fails when one of them becomes a
//! dependency, directly or through another crate.

pub mod state;

// Instrumentation: one handle the composition root registers and hands down.
pub mod metrics;

// Records, authorization and audit: what every operation uses.
pub mod audit;
pub mod authz;
pub mod kept;
pub mod records;
pub mod reseal;
pub mod schedule;

// The operations kit (one error type, names, paging, versioned writes, generic resources).
pub mod ops;

// API keys and the per-agent rate limit.
pub mod api_keys;
pub mod rate_limit;

// Agent identity (CA, enrollment codes, client-certificate checks).
pub mod identity;

// Token lifecycle, consent, issuance; operator alerts.
pub mod alerts;
pub mod tokens;

// Consent links the mailbox owner opens (operator side and owner side).
pub mod consent_links;

// The admin resources (tenants, providers, mailboxes, devices, agents), domain-typed end to end.
pub mod resources;

// Fleet state: agent configuration, device reports, commands to agents, connection tests.
pub mod fleet;

// What the unit tests share (a state over a fresh store, callers, a tenant).
#[cfg(test)]
pub(crate) mod testing;

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    /// Crates that carry a transport; none may be a dependency of this crate.
    /// (An HTTP client is not a transport of the broker: alerts and providers call out with
    /// reqwest, which brings hyper and http along.)
    const TRANSPORTS: &[&str] = &["tonic", "prost", "tokenfleet-proto", "axum", "axum-core"];

    /// Every package `root` depends on (normal dependencies, transitively), from `Cargo.lock`.
    fn closure(lock: &str, root: &str) -> BTreeSet<String> {
        let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for package in lock.split("[[package]]").skip(1) {
            let mut name = None;
            let mut list = Vec::new();
            let mut in_deps = false;
            for line in package.lines() {
                let line = line.trim();
                if let Some(n) = line.strip_prefix("name = ") {
                    name = Some(n.trim_matches('"').to_owned());
                } else if line.starts_with("dependencies = [") {
                    in_deps = true;
                } else if in_deps && line == "]" {
                    in_deps = false;
                } else if in_deps {
                    // `"name"` or `"name version"` or `"name version (source)"`.
                    let entry = line.trim_end_matches(',').trim_matches('"');
                    list.push(entry.split(' ').next().unwrap_or(entry).to_owned());
                }
            }
            if let Some(name) = name {
                deps.entry(name).or_default().extend(list);
            }
        }
        let mut seen = BTreeSet::new();
        let mut todo = vec![root.to_owned()];
        while let Some(next) = todo.pop() {
            for dep in deps.get(&next).into_iter().flatten() {
                if seen.insert(dep.clone()) {
                    todo.push(dep.clone());
                }
            }
        }
        seen
    }

    /// Cargo.lock lists every dependency kind together; dev-dependencies of this crate are not
    /// in its library, so only the `[dependencies]` table of the manifest seeds the walk.
    fn normal_dependencies(manifest: &str) -> Vec<String> {
        let table = manifest
            .split("\n[dependencies]\n")
            .nth(1)
            .expect("Cargo.toml has a [dependencies] table");
        let table = table.split("\n[").next().unwrap_or(table);
        table
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
            .filter_map(|l| l.split(['.', '=', ' ']).next())
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn core_is_transport_free() {
        let lock = include_str!("../../../Cargo.lock");
        let manifest = include_str!("../Cargo.toml");
        let direct = normal_dependencies(manifest);
        assert!(
            direct.iter().any(|d| d == "tokenfleet-store"),
            "the manifest parser found {direct:?}"
        );
        let mut all = BTreeSet::new();
        for dep in &direct {
            all.insert(dep.clone());
            all.extend(closure(lock, dep));
        }
        let found: Vec<_> = TRANSPORTS.iter().filter(|t| all.contains(**t)).collect();
        assert!(
            found.is_empty(),
            "tokenfleet-core depends on transport crates {found:?}; keep them in the broker's edge"
        );
    }

    #[test]
    fn the_check_sees_a_transport_when_there_is_one() {
        // The broker depends on tonic; the same walk must find it there, or the check above
        // could pass by finding nothing at all.
        let lock = include_str!("../../../Cargo.lock");
        let found = closure(lock, "tokenfleet-broker");
        assert!(found.contains("tonic") && found.contains("tokenfleet-core"));
    }
}
