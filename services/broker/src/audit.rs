//! The audit log: one bounded stream (`audit`) per scope holding JSON [`AuditEvent`]s. Changes
//! to a tenant's objects go to that tenant's stream; tenant records, API keys, and attempts a
//! caller was not allowed to make in a tenant go to the global stream.
//!
//! The change an event describes has already happened when the event is written, so a failed
//! audit write cannot undo it; it is logged at error level instead of being dropped silently.

use tokenfleet_domain::AuditEvent;
use tokenfleet_store::{RecordKey, Scope, StoreError, StoreResult};

use crate::state::BrokerState;

/// Name of the audit stream in every scope.
pub const STREAM: &str = "audit";
/// Entries kept per scope; older ones are dropped.
pub const MAX_LEN: usize = 100_000;

/// Appends `event` to the audit stream of `scope`; returns the entry id.
pub async fn append(state: &BrokerState, scope: &Scope, event: &AuditEvent) -> StoreResult<String> {
    let data = serde_json::to_vec(event).map_err(|e| StoreError::Corrupt {
        key: format!("{scope}/{STREAM}"),
        problem: format!("cannot encode audit event: {e}"),
    })?;
    state.store.append(scope, STREAM, data, MAX_LEN).await
}

/// Appends `event`, logging (at error level) instead of returning a failure.
pub async fn record(state: &BrokerState, scope: &Scope, event: AuditEvent) {
    if let Err(error) = append(state, scope, &event).await {
        tracing::error!(
            %error,
            %scope,
            actor = %event.actor,
            action = %event.action,
            target = %event.target,
            result = %event.result,
            "audit event could not be written; the change itself took effect"
        );
    }
}

/// Up to `limit` events of `scope`, newest first, older than the entry `before`.
pub async fn list(
    state: &BrokerState,
    scope: &Scope,
    before: Option<&str>,
    limit: usize,
) -> StoreResult<Vec<(String, AuditEvent)>> {
    let entries = state.store.read_back(scope, STREAM, before, limit).await?;
    entries
        .into_iter()
        .map(|entry| {
            let event = serde_json::from_slice(&entry.data).map_err(|e| StoreError::Corrupt {
                key: RecordKey {
                    scope: scope.clone(),
                    collection: STREAM,
                    id: entry.id.clone(),
                }
                .to_string(),
                problem: format!("not a valid audit event: {e}"),
            })?;
            Ok((entry.id, event))
        })
        .collect()
}

/// The `result` string of an outcome: `ok`, or the gRPC code in snake case
/// (`permission_denied`, `invalid_argument`, ...).
pub fn result_of(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}
