//! The generic resource operations: one implementation of create, get, list, update (with a
//! field mask) and delete for every admin resource (tenants, providers, mailboxes, devices,
//! agents), with optimistic versions, reference checks, server-owned fields and audit.
//!
//! A resource is described by a [`Resource`] implementation that says only what varies: its key
//! and names, what a caller sends (`Input`: domain values as given, not yet validated, input-only
//! secrets in clear) and what the operations answer (`Output`: domain records with their version,
//! never a secret), the checks and server-owned fields of a create and an update, the records that must not refer to it when it
//! is deleted, and what follows a change. The steps and their order are here, once:
//!
//! - create: authorize → convert and validate everything → pure checks → the tenant exists →
//!   references, sealing, hashing → write if absent (ALREADY_EXISTS otherwise) → audit;
//! - update: authorize → names → mask → plan (secrets sealed once) → read, check the version,
//!   merge the masked fields into the stored form, convert, keep server-owned fields, check →
//!   compare-and-set on the read version, re-read and retry when the caller gave none → audit;
//! - delete: authorize → names → read, check the version → no referrers → delete → clean up →
//!   audit;
//! - get and list: authorize → names → read (list: the tenant exists, one page).
//!
//! Authorization is one decision per resource and access ([`Resource::target`]), taken before
//! anything is read, so another tenant's objects answer PERMISSION_DENIED whether or not they
//! exist.

use std::future::Future;

use time::OffsetDateTime;
use tokenfleet_domain::{Stamps, ValidationError};
use tokenfleet_store::{RecordKey, Scope};

use super::Error;
use super::change::{Change, audited, authorize_read};
use super::mask::UpdateMask;
use super::names::{object_path, shown, span_object};
use super::paging::{PageRequest, page_request};
use super::stored::{
    Reference, check_version, commit, create_new, delete_record, list_page, must_get,
    refuse_if_referenced, require_tenant, still_contended,
};
use crate::authz::{Access, Principal, Target, authorize};
use crate::records::{CAS_ATTEMPTS, StoredRecord, Versioned};
use crate::state::BrokerState;

/// Which object an operation concerns. `tenant` is empty for tenant records themselves.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Id {
    /// Tenant of the object (empty for tenants).
    pub tenant: String,
    /// Name of the object.
    pub name: String,
}

impl Id {
    /// An object inside a tenant.
    pub fn scoped(tenant: &str, name: &str) -> Self {
        Self {
            tenant: tenant.to_owned(),
            name: name.to_owned(),
        }
    }

    /// A global object (a tenant record).
    pub fn global(name: &str) -> Self {
        Self::scoped("", name)
    }
}

/// The audit actions of a resource.
#[derive(Debug, Clone, Copy)]
pub struct Actions {
    /// `provider.create`, …
    pub create: &'static str,
    /// `provider.update`, …
    pub update: &'static str,
    /// `provider.delete`, …
    pub delete: &'static str,
    /// `provider.get`, … (audited when refused)
    pub get: &'static str,
    /// `provider.list`, … (audited when refused)
    pub list: &'static str,
}

/// What varies between resources. The hooks have defaults for resources without such a step.
///
/// [`crate::resources`] implements it for each admin resource; the front ends call the operations
/// below with the concrete types, so the futures' `Send` is known there.
#[allow(async_fn_in_trait)]
pub trait Resource: Sync {
    /// The record as stored.
    type Record: StoredRecord + Clone;
    /// What a caller sends: the record's fields as given, before validation (input-only secrets
    /// in clear, enum values possibly unset). An update merges the fields its mask names into
    /// the stored record's input form ([`Resource::to_input`]) and validates the result.
    type Input: Send + Sync;
    /// What the operations answer: the record and its version as a front end shows it (never a
    /// secret).
    type Output: Send;
    /// What the conversion yields besides the record: input-only values (secrets in clear) that
    /// are sealed or hashed before they are stored.
    type Extra: Send;
    /// What an update works out once, before its read-modify-write loop, and keeps across
    /// retries (a secret sealed once, a password hashed once, what the change did).
    type Plan: Send + Default;

    /// `provider`, … (messages, field paths `provider.name`).
    const KIND: &'static str;
    /// `providers`, … (audit targets `tenants/acme/providers/m365`).
    const COLLECTION: &'static str;
    /// Audit actions.
    const ACTIONS: Actions;
    /// Whether records live inside a tenant (all but tenants).
    const SCOPED: bool = true;

    /// The object an input names.
    fn id(input: &Self::Input) -> Id;
    /// The version an input carries (0: unconditional).
    fn version(input: &Self::Input) -> u64;
    /// Where the record is stored.
    fn key(id: &Id) -> RecordKey;
    /// When the record was created (kept by updates).
    fn created(record: &Self::Record) -> OffsetDateTime;
    /// The input form of a stored record (what an update merges the caller's fields into).
    fn to_input(record: &Self::Record, version: u64) -> Self::Input;
    /// What the operations answer for a stored record (without reading anything else).
    fn output(record: &Self::Record, version: u64) -> Self::Output;
    /// Validates a whole input and converts it.
    fn from_input(
        input: &Self::Input,
        stamps: Stamps,
    ) -> Result<(Self::Record, Self::Extra), ValidationError>;
    /// Copies the fields `mask` names from `src` into `dst`.
    fn merge(dst: &mut Self::Input, src: &Self::Input, mask: &UpdateMask);

    /// What `access` to `id` is checked against. Inside a tenant: that tenant.
    fn target(id: &Id, _access: Access) -> Target<'_> {
        Target::Tenant(&id.tenant)
    }

    /// Checks of a new record that read nothing (run before the tenant is looked up).
    fn check_new(
        &self,
        _principal: &Principal,
        _record: &mut Self::Record,
        _extra: &Self::Extra,
    ) -> Result<(), Error> {
        Ok(())
    }

    /// References, sealing and hashing of a new record; returns the audit detail.
    async fn prepare_new(
        &self,
        _state: &BrokerState,
        _record: &mut Self::Record,
        _extra: Self::Extra,
    ) -> Result<String, Error> {
        Ok(String::new())
    }

    /// What an update works out before reading (input-only secrets, immutable fields).
    fn plan_update(
        &self,
        _state: &BrokerState,
        _input: &Self::Input,
        _mask: &UpdateMask,
    ) -> Result<Self::Plan, Error> {
        Ok(Self::Plan::default())
    }

    /// Checks the stored record against the plan before merging (immutable fields).
    fn check_stored(&self, _plan: &Self::Plan, _stored: &Self::Record) -> Result<(), Error> {
        Ok(())
    }

    /// Copies the server-owned fields (set by the broker, never by the caller) of `stored` into
    /// `next`.
    fn keep_server_owned(_stored: &Self::Record, _next: &mut Self::Record) {}

    /// Applies the plan to `next` and checks its references.
    async fn prepare_update(
        &self,
        _state: &BrokerState,
        _principal: &Principal,
        _plan: &mut Self::Plan,
        _stored: &Self::Record,
        _next: &mut Self::Record,
        _extra: Self::Extra,
    ) -> Result<(), Error> {
        Ok(())
    }

    /// The answer and the audit detail of a written update.
    async fn updated(
        &self,
        _state: &BrokerState,
        _plan: Self::Plan,
        next: &Self::Record,
        version: u64,
        mask: &UpdateMask,
    ) -> Result<(Self::Output, String), Error> {
        Ok((
            Self::output(next, version),
            format!("fields: {}", mask.describe()),
        ))
    }

    /// The records that keep an object from being deleted.
    const REFERENCES: &'static [Reference] = &[];

    /// Refuses a delete while other records refer to the object (FAILED_PRECONDITION naming
    /// them): by default the [`Resource::REFERENCES`], in order.
    async fn check_unreferenced(
        &self,
        state: &BrokerState,
        id: &Id,
        what: &str,
    ) -> Result<(), Error> {
        for reference in Self::REFERENCES {
            refuse_if_referenced(state, &id.tenant, &id.name, what, reference).await?;
        }
        Ok(())
    }

    /// Removes what belonged to a deleted object.
    async fn deleted(&self, _state: &BrokerState, _id: &Id) -> Result<(), Error> {
        Ok(())
    }

    /// One record as `Get` shows it.
    async fn view(
        &self,
        _state: &BrokerState,
        record: Versioned<Self::Record>,
    ) -> Result<Self::Output, Error> {
        Ok(Self::output(&record.value, record.version))
    }

    /// A page of records as `List` shows them.
    async fn view_page(
        &self,
        _state: &BrokerState,
        _scope: &Scope,
        _page: &PageRequest,
        items: &[Versioned<Self::Record>],
    ) -> Result<Vec<Self::Output>, Error> {
        Ok(items
            .iter()
            .map(|r| Self::output(&r.value, r.version))
            .collect())
    }

    /// After a successful create, update or delete in `tenant` (e.g. tell the agents).
    async fn changed(&self, _state: &BrokerState, _tenant: &str) {}
}

/// The items of a [`Resource`] implementation that only name things: the record and input
/// types, kind, collection and audit actions, how an input names its object and carries its
/// version, the record's key and creation time.
///
/// - `scoped "device" in "devices": Device, input DeviceInput, key device_key`: an object inside
///   a tenant whose input has `tenant`, `name` and `version` fields;
/// - `scoped versioned "agent" in "agents": Agent, from from_input, key agent_key`: the input and
///   the output are the record with its version ([`Versioned`]), validated by `from_input(record,
///   stamps)`, without input-only values;
/// - `global versioned …`: the same for global records (tenants), keyed by name alone.
#[macro_export]
macro_rules! resource_names {
    (@common $kind:literal, $collection:literal, $record:ty, $input:ty) => {
        type Record = $record;
        type Input = $input;
        const KIND: &'static str = $kind;
        const COLLECTION: &'static str = $collection;
        const ACTIONS: $crate::ops::resource::Actions = $crate::ops::resource::Actions {
            create: concat!($kind, ".create"),
            update: concat!($kind, ".update"),
            delete: concat!($kind, ".delete"),
            get: concat!($kind, ".get"),
            list: concat!($kind, ".list"),
        };
        fn version(input: &$input) -> u64 {
            input.version
        }
        fn created(record: &$record) -> time::OffsetDateTime {
            record.stamps.created
        }
    };
    (@versioned $record:ty, $from:path) => {
        type Output = $crate::records::Versioned<$record>;
        type Extra = ();
        fn to_input(record: &$record, version: u64) -> $crate::records::Versioned<$record> {
            Self::output(record, version)
        }
        fn output(record: &$record, version: u64) -> $crate::records::Versioned<$record> {
            $crate::records::Versioned {
                version,
                value: record.clone(),
            }
        }
        fn from_input(
            input: &$crate::records::Versioned<$record>,
            stamps: tokenfleet_domain::Stamps,
        ) -> tokenfleet_domain::Valid<($record, ())> {
            Ok(($from(&input.value, stamps)?, ()))
        }
    };
    (scoped $kind:literal in $collection:literal: $record:ty, input $input:ty, key $key:path) => {
        $crate::resource_names!(@common $kind, $collection, $record, $input);
        fn id(input: &$input) -> $crate::ops::resource::Id {
            $crate::ops::resource::Id::scoped(&input.tenant, &input.name)
        }
        fn key(id: &$crate::ops::resource::Id) -> tokenfleet_store::RecordKey {
            $key(&id.tenant, &id.name)
        }
    };
    (scoped versioned $kind:literal in $collection:literal: $record:ty, from $from:path, key $key:path) => {
        $crate::resource_names!(@common $kind, $collection, $record, $crate::records::Versioned<$record>);
        $crate::resource_names!(@versioned $record, $from);
        fn id(input: &$crate::records::Versioned<$record>) -> $crate::ops::resource::Id {
            $crate::ops::resource::Id::scoped(&input.value.tenant, &input.value.name)
        }
        fn key(id: &$crate::ops::resource::Id) -> tokenfleet_store::RecordKey {
            $key(&id.tenant, &id.name)
        }
    };
    (global versioned $kind:literal in $collection:literal: $record:ty, from $from:path, key $key:path) => {
        $crate::resource_names!(@common $kind, $collection, $record, $crate::records::Versioned<$record>);
        $crate::resource_names!(@versioned $record, $from);
        const SCOPED: bool = false;
        fn id(input: &$crate::records::Versioned<$record>) -> $crate::ops::resource::Id {
            $crate::ops::resource::Id::global(&input.value.name)
        }
        fn key(id: &$crate::ops::resource::Id) -> tokenfleet_store::RecordKey {
            $key(&id.name)
        }
    };
}
pub use crate::resource_names;

/// `provider `m365` in tenant `acme``, `tenant `acme``: how messages name the object.
pub fn what<R: Resource>(id: &Id) -> String {
    if R::SCOPED {
        format!(
            "{} `{}` in tenant `{}`",
            R::KIND,
            shown(&id.name),
            shown(&id.tenant)
        )
    } else {
        format!("{} `{}`", R::KIND, shown(&id.name))
    }
}

fn change<R: Resource>(action: &'static str, id: &Id) -> Change {
    let target = if R::SCOPED {
        object_path(&id.tenant, R::COLLECTION, &id.name)
    } else {
        format!("{}/{}", R::COLLECTION, shown(&id.name))
    };
    Change {
        action,
        target,
        tenant: id.tenant.clone(),
    }
}

fn span<R: Resource>(id: &Id) {
    if R::SCOPED {
        span_object(&id.tenant, &id.name);
    } else {
        span_object(&id.name, "");
    }
}

/// Validates the names of `id`; field names `{prefix}tenant`, `{prefix}name`.
fn check_id<R: Resource>(id: &Id, prefix: &str) -> Result<(), Error> {
    if R::SCOPED {
        tokenfleet_domain::name(&format!("{prefix}tenant"), &id.tenant)?;
    }
    tokenfleet_domain::name(&format!("{prefix}name"), &id.name)?;
    Ok(())
}

/// Runs an audited change and, when it succeeded, the resource's follow-up.
async fn change_of<R: Resource, T>(
    resource: &R,
    state: &BrokerState,
    principal: &Principal,
    action: &'static str,
    id: &Id,
    run: impl Future<Output = Result<(T, String), Error>>,
) -> Result<T, Error> {
    let out = audited(state, principal, change::<R>(action, id), run).await?;
    resource.changed(state, &id.tenant).await;
    Ok(out)
}

/// Creates a record from `input`.
pub async fn create<R: Resource>(
    resource: &R,
    state: &BrokerState,
    principal: &Principal,
    input: R::Input,
) -> Result<R::Output, Error> {
    let id = R::id(&input);
    span::<R>(&id);
    change_of(resource, state, principal, R::ACTIONS.create, &id, async {
        authorize(principal, R::target(&id, Access::Write), Access::Write)?;
        let (mut record, extra) = R::from_input(&input, Stamps::new(state.clock.now()))?;
        resource.check_new(principal, &mut record, &extra)?;
        if R::SCOPED {
            require_tenant(state, &id.tenant).await?;
        }
        let detail = resource.prepare_new(state, &mut record, extra).await?;
        let version = create_new(state, &record, &what::<R>(&id)).await?;
        Ok((R::output(&record, version), detail))
    })
    .await
}

/// Reads one record.
pub async fn get<R: Resource>(
    resource: &R,
    state: &BrokerState,
    principal: &Principal,
    id: Id,
) -> Result<R::Output, Error> {
    span::<R>(&id);
    let read = || change::<R>(R::ACTIONS.get, &id);
    authorize_read(state, principal, read, R::target(&id, Access::Read)).await?;
    check_id::<R>(&id, "")?;
    let stored = must_get::<R::Record>(state, &R::key(&id), &what::<R>(&id)).await?;
    resource.view(state, stored).await
}

/// Lists one page of the records of `tenant`; returns them and the next page token.
pub async fn list<R: Resource>(
    resource: &R,
    state: &BrokerState,
    principal: &Principal,
    tenant: &str,
    page_size: i32,
    page_token: &str,
) -> Result<(Vec<R::Output>, String), Error> {
    span_object(tenant, "");
    let id = Id::scoped(tenant, "");
    let read = || Change::of_collection(R::ACTIONS.list, tenant, R::COLLECTION);
    authorize_read(state, principal, read, R::target(&id, Access::Read)).await?;
    tokenfleet_domain::name("tenant", tenant)?;
    let page = page_request(page_size, page_token)?;
    require_tenant(state, tenant).await?;
    let scope = Scope::Tenant(tenant.to_owned());
    let (items, next) = list_page::<R::Record>(state, &scope, &page).await?;
    let out = resource.view_page(state, &scope, &page, &items).await?;
    Ok((out, next))
}

/// Changes the fields of `input` that `mask` names (all mutable fields for an empty mask), on
/// the version `input` carries (0: whatever is stored, retried on a concurrent write).
pub async fn update<R: Resource>(
    resource: &R,
    state: &BrokerState,
    principal: &Principal,
    input: R::Input,
    mask: Result<UpdateMask, ValidationError>,
) -> Result<R::Output, Error> {
    let id = R::id(&input);
    span::<R>(&id);
    change_of(resource, state, principal, R::ACTIONS.update, &id, async {
        authorize(principal, R::target(&id, Access::Write), Access::Write)?;
        check_id::<R>(&id, &format!("{}.", R::KIND))?;
        let mask = mask?;
        let what = what::<R>(&id);
        let key = R::key(&id);
        let expected = R::version(&input);
        let mut plan = resource.plan_update(state, &input, &mask)?;
        for attempt in 0..CAS_ATTEMPTS {
            let stored = must_get::<R::Record>(state, &key, &what).await?;
            check_version(&what, expected, stored.version)?;
            resource.check_stored(&plan, &stored.value)?;
            let mut merged = R::to_input(&stored.value, stored.version);
            R::merge(&mut merged, &input, &mask);
            let stamps = Stamps {
                created: R::created(&stored.value),
                updated: state.clock.now(),
            };
            let (mut next, extra) = R::from_input(&merged, stamps)?;
            R::keep_server_owned(&stored.value, &mut next);
            resource
                .prepare_update(state, principal, &mut plan, &stored.value, &mut next, extra)
                .await?;
            if let Some(v) = commit(state, &what, &next, stored.version, expected, attempt).await? {
                return resource.updated(state, plan, &next, v, &mask).await;
            }
        }
        Err(still_contended(&what))
    })
    .await
}

/// Deletes a record (on `version` when non-zero) that nothing refers to any more.
pub async fn delete<R: Resource>(
    resource: &R,
    state: &BrokerState,
    principal: &Principal,
    id: Id,
    version: u64,
) -> Result<(), Error> {
    span::<R>(&id);
    change_of(resource, state, principal, R::ACTIONS.delete, &id, async {
        authorize(principal, R::target(&id, Access::Write), Access::Write)?;
        check_id::<R>(&id, "")?;
        let what = what::<R>(&id);
        let key = R::key(&id);
        let stored = must_get::<R::Record>(state, &key, &what).await?;
        check_version(&what, version, stored.version)?;
        resource.check_unreferenced(state, &id, &what).await?;
        delete_record(state, &key, &what, version).await?;
        resource.deleted(state, &id).await?;
        Ok(((), String::new()))
    })
    .await
}
