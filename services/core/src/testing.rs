//! What the core's unit tests share: a broker state over a fresh embedded store, callers of each
//! role, and a tenant to put objects in. Test builds only.

use std::sync::Arc;

use time::OffsetDateTime;
use tokenfleet_domain::{Role, Stamps, SystemClock, Tenant};
use tokenfleet_store::Precondition;

use crate::authz::Principal;
use crate::records::Records;
use crate::state::BrokerState;

/// A broker state over a new embedded store in `dir`, with a fresh sealing key.
pub async fn state(dir: &std::path::Path) -> BrokerState {
    let store = tokenfleet_store::embedded::EmbeddedStore::open(&dir.join("s.redb"))
        .await
        .unwrap();
    let key = tokenfleet_seal::Keyring::generate_key_base64().unwrap();
    BrokerState {
        store: Arc::new(store),
        keyring: Arc::new(
            tokenfleet_seal::Keyring::from_base64("k", [("k", key.as_str())]).unwrap(),
        ),
        clock: Arc::new(SystemClock),
    }
}

/// A caller with `role`, bound to `tenant` when given.
pub fn principal(role: Role, tenant: Option<&str>) -> Principal {
    Principal {
        key_id: "k1".into(),
        role,
        tenant: tenant.map(str::to_owned),
    }
}

/// Stores tenant `name` directly (no operation, no audit).
pub async fn put_tenant(state: &BrokerState, name: &str) {
    let tenant = Tenant {
        name: name.into(),
        display_name: String::new(),
        stamps: Stamps::new(OffsetDateTime::UNIX_EPOCH),
    };
    Records::new(state.store.as_ref())
        .put(&tenant, Precondition::Absent)
        .await
        .unwrap();
}
