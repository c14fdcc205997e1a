//! Reading and writing versioned records with the errors a caller sees: NOT_FOUND naming the
//! object, ABORTED with both versions on a lost compare-and-set, FAILED_PRECONDITION naming the
//! records that still refer to an object.

use tokenfleet_domain::{Agent, Device, Mailbox, Provider};
use tokenfleet_store::{Precondition, RecordKey, Scope, StoreError};

use super::Error;
use super::names::list;
use super::paging::{PageRequest, page_token};
use crate::records::{CAS_ATTEMPTS, Records, StoredRecord, Versioned};
use crate::state::BrokerState;

/// The typed records of the broker's store.
pub fn records(state: &BrokerState) -> Records<'_> {
    Records::new(state.store.as_ref())
}

/// Reads a record; NOT_FOUND with `what` (e.g. "provider `m365` in tenant `acme`") when missing.
pub async fn must_get<T: StoredRecord>(
    state: &BrokerState,
    key: &RecordKey,
    what: &str,
) -> Result<Versioned<T>, Error> {
    records(state)
        .get::<T>(key)
        .await?
        .ok_or_else(|| Error::NotFound(format!("{what} not found")))
}

/// NOT_FOUND unless the tenant exists.
pub async fn require_tenant(state: &BrokerState, tenant: &str) -> Result<(), Error> {
    must_get::<tokenfleet_domain::Tenant>(
        state,
        &crate::records::tenant_key(tenant),
        &format!("tenant `{tenant}`"),
    )
    .await
    .map(|_| ())
}

/// Checks the caller's `version` (0 = unconditional) against what was read.
pub fn check_version(what: &str, expected: u64, stored: u64) -> Result<(), Error> {
    if expected != 0 && expected != stored {
        return Err(Error::changed_concurrently(what, expected, stored));
    }
    Ok(())
}

/// Writes an updated record with compare-and-set on the version it was read at. `Ok(None)` means
/// someone else wrote first and the caller (who gave no version) should re-read and retry.
pub async fn commit<T: StoredRecord>(
    state: &BrokerState,
    what: &str,
    value: &T,
    read_version: u64,
    expected: u64,
    attempt: usize,
) -> Result<Option<u64>, Error> {
    match records(state)
        .put(value, Precondition::Version(read_version))
        .await
    {
        Ok(v) => Ok(Some(v)),
        Err(StoreError::Conflict { found, .. }) => {
            if expected == 0 && attempt + 1 < CAS_ATTEMPTS {
                Ok(None)
            } else {
                let expected = if expected == 0 {
                    read_version
                } else {
                    expected
                };
                Err(Error::changed_concurrently(what, expected, found))
            }
        }
        Err(StoreError::NotFound(_)) => Err(Error::NotFound(format!(
            "{what} not found (deleted concurrently)"
        ))),
        Err(e) => Err(e.into()),
    }
}

/// ABORTED after [`CAS_ATTEMPTS`] lost compare-and-sets of a caller who gave no version.
pub fn still_contended(what: &str) -> Error {
    Error::Aborted(format!("{what} was changed concurrently; retry"))
}

/// Creates a record that must not exist yet; ALREADY_EXISTS naming `what` otherwise.
pub async fn create_new<T: StoredRecord>(
    state: &BrokerState,
    value: &T,
    what: &str,
) -> Result<u64, Error> {
    match records(state).put(value, Precondition::Absent).await {
        Ok(v) => Ok(v),
        Err(StoreError::AlreadyExists(_)) => {
            Err(Error::AlreadyExists(format!("{what} already exists")))
        }
        Err(e) => Err(e.into()),
    }
}

/// Which records name an object, and in which field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Referrer {
    /// Devices hosted by the agent (`device.agent`).
    DeviceAgent,
    /// Devices whose user provider it is (`device.user_provider`).
    DeviceUserProvider,
    /// Devices that may send as the mailbox (admin, bulk or allowed mailboxes).
    DeviceMailbox,
    /// Mailboxes of the provider (`mailbox.provider`).
    MailboxProvider,
    /// Everything inside the tenant (providers, mailboxes, devices, agents), counted.
    TenantContents,
}

/// A reference that keeps an object from being deleted, with the words of the refusal:
/// `"{what} {blocked} {names}; {fix}"`.
#[derive(Debug, Clone, Copy)]
pub struct Reference {
    /// Who refers.
    pub by: Referrer,
    /// `is still used by devices`, …
    pub blocked: &'static str,
    /// `change or delete them first`, …
    pub fix: &'static str,
}

impl Reference {
    /// A reference by `by`, refused with `"{what} {blocked} {names}; {fix}"`.
    pub const fn new(by: Referrer, blocked: &'static str, fix: &'static str) -> Self {
        Self { by, blocked, fix }
    }
}

/// Refuses to delete `what` (named `name` in `tenant`) while records still refer to it: answers
/// FAILED_PRECONDITION naming them (or, for a tenant, how many of each kind it holds).
pub async fn refuse_if_referenced(
    state: &BrokerState,
    tenant: &str,
    name: &str,
    what: &str,
    reference: &Reference,
) -> Result<(), Error> {
    let scope = Scope::Tenant(tenant.to_owned());
    let r = records(state);
    let referring: Vec<String> = match reference.by {
        Referrer::TenantContents => {
            let scope = Scope::Tenant(name.to_owned());
            let counts = [
                ("provider", "providers", r.count::<Provider>(&scope).await?),
                ("mailbox", "mailboxes", r.count::<Mailbox>(&scope).await?),
                ("device", "devices", r.count::<Device>(&scope).await?),
                ("agent", "agents", r.count::<Agent>(&scope).await?),
            ];
            counts
                .into_iter()
                .filter(|(_, _, n)| *n > 0)
                .map(|(one, many, n)| match n {
                    1 => format!("1 {one}"),
                    n => format!("{n} {many}"),
                })
                .collect()
        }
        Referrer::MailboxProvider => {
            let all = r.list_all::<Mailbox>(&scope).await?;
            all.into_iter()
                .filter(|m| m.value.provider == name)
                .map(|m| format!("`{}`", m.value.name))
                .collect()
        }
        Referrer::DeviceAgent | Referrer::DeviceUserProvider | Referrer::DeviceMailbox => {
            let all = r.list_all::<Device>(&scope).await?;
            all.into_iter()
                .filter(|d| match reference.by {
                    Referrer::DeviceAgent => d.value.agent == name,
                    Referrer::DeviceUserProvider => d.value.user_provider == name,
                    _ => d.value.referenced_mailboxes().any(|m| m == name),
                })
                .map(|d| format!("`{}`", d.value.name))
                .collect()
        }
    };
    if referring.is_empty() {
        return Ok(());
    }
    Err(Error::FailedPrecondition(format!(
        "{what} {} {}; {}",
        reference.blocked,
        list(referring.iter().map(String::as_str)),
        reference.fix
    )))
}

/// Deletes a record, conditionally on `version` when non-zero.
pub async fn delete_record(
    state: &BrokerState,
    key: &RecordKey,
    what: &str,
    version: u64,
) -> Result<(), Error> {
    let pre = if version == 0 {
        Precondition::Exists
    } else {
        Precondition::Version(version)
    };
    match records(state).delete(key, pre).await {
        Ok(true) => Ok(()),
        Ok(false) | Err(StoreError::NotFound(_)) => {
            Err(Error::NotFound(format!("{what} not found")))
        }
        Err(StoreError::Conflict {
            expected, found, ..
        }) => Err(Error::changed_concurrently(what, expected, found)),
        Err(e) => Err(e.into()),
    }
}

/// Lists one page of `T` in `scope`; returns the records and the next page token.
pub async fn list_page<T: StoredRecord>(
    state: &BrokerState,
    scope: &Scope,
    page: &PageRequest,
) -> Result<(Vec<Versioned<T>>, String), Error> {
    let mut items = records(state)
        .list::<T>(scope, page.cursor.as_deref(), page.size + 1)
        .await?;
    let next = if items.len() > page.size {
        items.truncate(page.size);
        items
            .last()
            .map(|v| page_token(&v.value.key().id))
            .unwrap_or_default()
    } else {
        String::new()
    };
    Ok((items, next))
}
