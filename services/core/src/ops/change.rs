//! Audited changes: every change an operation makes (and every refused attempt, reads included)
//! is recorded in the audit log with its outcome, in the stream of the tenant it concerns.

use std::future::Future;

use tokenfleet_domain::AuditEvent;
use tokenfleet_store::Scope;

use super::Error;
use super::names::{object_path, shown};
use crate::audit;
use crate::authz::{Access, Principal, Target, authorize};
use crate::state::BrokerState;

/// What an audited change (or refused read) concerns.
#[derive(Debug, Clone)]
pub struct Change {
    /// `provider.create`, ...
    pub action: &'static str,
    /// `tenants/acme/providers/m365`, ...
    pub target: String,
    /// Tenant of the object; empty for global objects (tenant records themselves).
    pub tenant: String,
}

impl Change {
    /// A change of object `name` in `collection` of `tenant` (target
    /// `tenants/<tenant>/<collection>/<name>`, in the tenant's stream).
    pub fn of_object(action: &'static str, tenant: &str, collection: &str, name: &str) -> Self {
        Self {
            action,
            target: object_path(tenant, collection, name),
            tenant: tenant.to_owned(),
        }
    }

    /// A read or change of `collection` of `tenant` as a whole (target
    /// `tenants/<tenant>/<collection>`; `<collection>` of the global scope when `tenant` is
    /// empty).
    pub fn of_collection(action: &'static str, tenant: &str, collection: &str) -> Self {
        let target = if tenant.is_empty() {
            collection.to_owned()
        } else {
            format!("tenants/{}/{collection}", shown(tenant))
        };
        Self {
            action,
            target,
            tenant: tenant.to_owned(),
        }
    }
}

/// Runs a change and records its outcome (success, refusal or failure) in the audit log.
/// The change's future returns the result and a detail line for the audit event.
pub async fn audited<T>(
    state: &BrokerState,
    principal: &Principal,
    change: Change,
    run: impl Future<Output = Result<(T, String), Error>>,
) -> Result<T, Error> {
    let outcome = run.await;
    let recorded = match &outcome {
        Ok((_, detail)) => Ok(detail.as_str()),
        Err(err) => Err(err),
    };
    record(state, principal, change, recorded).await;
    outcome.map(|(value, _)| value)
}

/// Checks that `principal` may read `target` ([`authorize`]); a refused read is audited as a
/// refused change is (`read` names it: `mailbox.get`, `tenants/acme/mailboxes/scan`; built only
/// then), so a key probing another tenant's objects shows in the log as one trying to change
/// them does. Allowed reads are not audited.
pub async fn authorize_read(
    state: &BrokerState,
    principal: &Principal,
    read: impl FnOnce() -> Change,
    target: Target<'_>,
) -> Result<(), Error> {
    refusal_audited(
        state,
        principal,
        read,
        authorize(principal, target, Access::Read),
    )
    .await
}

/// `checked` (the answer of an authorization check), its refusal audited as [`authorize_read`]
/// does, for reads whose rule is not [`authorize`]'s.
pub async fn refusal_audited(
    state: &BrokerState,
    principal: &Principal,
    read: impl FnOnce() -> Change,
    checked: Result<(), Error>,
) -> Result<(), Error> {
    if let Err(err) = &checked {
        record(state, principal, read(), Err(err)).await;
    }
    checked
}

/// Records what became of `change`: `Ok(detail)` or the error.
async fn record(
    state: &BrokerState,
    principal: &Principal,
    change: Change,
    outcome: Result<&str, &Error>,
) {
    let (result, detail) = match outcome {
        Ok(detail) => ("ok", detail.to_owned()),
        Err(err) => (err.result(), crate::audit::detail(err.to_string())),
    };
    // A tenant's stream gets what happened in it, as far as the caller is allowed to look at the
    // tenant; attempts on other tenants go to the global stream, so a caller cannot write into a
    // foreign tenant's log.
    let scope = if change.tenant.is_empty()
        || tokenfleet_domain::name("tenant", &change.tenant).is_err()
        || !principal.may_access_tenant(&change.tenant, Access::Read)
    {
        Scope::Global
    } else {
        Scope::Tenant(change.tenant.clone())
    };
    match outcome {
        Ok(_) => tracing::info!(action = change.action, target = %change.target, "admin change"),
        Err(err) => tracing::info!(
            action = change.action,
            target = %change.target,
            code = err.result(),
            message = %err,
            "admin change refused"
        ),
    }
    let event = AuditEvent {
        time: state.clock.now(),
        actor: principal.actor(),
        action: change.action.to_owned(),
        target: change.target,
        tenant: shown(&change.tenant),
        result: result.to_owned(),
        detail,
    };
    audit::record(state, &scope, event).await;
}
