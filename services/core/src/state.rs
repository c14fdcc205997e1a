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
