//! What every broker component shares: the store, the sealing keyring and the clock.

use std::sync::Arc;

use tokenfleet_domain::Clock;
use tokenfleet_seal::Keyring;
use tokenfleet_store::Store;

/// Shared broker state. Cheap to clone (all `Arc`s); replicas share nothing but the store.
#[derive(Debug, Clone)]
pub struct BrokerState {
    /// All persistent state.
    pub store: Arc<dyn Store>,
    /// Seals secrets before they reach the store.
    pub keyring: Arc<Keyring>,
    /// Time source (injected for tests).
    pub clock: Arc<dyn Clock>,
}

/// A state over an embedded store in `dir`, a fresh keyring and the system clock (for tests).
#[cfg(test)]
pub(crate) async fn for_tests(dir: &std::path::Path) -> BrokerState {
    let store = tokenfleet_store::embedded::EmbeddedStore::open(&dir.join("s.redb"))
        .await
        .expect("open the embedded store");
    let key = Keyring::generate_key_base64().expect("generate a key");
    BrokerState {
        store: Arc::new(store),
        keyring: Arc::new(Keyring::from_base64("k", [("k", key.as_str())]).expect("keyring")),
        clock: Arc::new(tokenfleet_domain::SystemClock),
    }
}
