//! Wakes the status streams this process holds as soon as a command is queued for their agent,
//! instead of at their next command poll. The queue itself stays in the store (so a command
//! queued on any replica reaches the replica holding the stream at its next poll); this only
//! shortens the way when the stream is held here, which is always the case with the embedded
//! store (one node).
//!
//! Streams register under (store instance, tenant, agent): two brokers in one process (tests)
//! with stores of their own do not wake each other's streams.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use tokio::sync::Notify;

use crate::state::BrokerState;

type Key = (usize, String, String);

fn registry() -> &'static Mutex<HashMap<Key, Weak<Notify>>> {
    static WAKERS: OnceLock<Mutex<HashMap<Key, Weak<Notify>>>> = OnceLock::new();
    WAKERS.get_or_init(|| Mutex::new(HashMap::new()))
}

fn key(state: &BrokerState, tenant: &str, agent: &str) -> Key {
    // The address of the store instance identifies the broker within the process.
    let store = Arc::as_ptr(&state.store).cast::<()>().addr();
    (store, tenant.to_owned(), agent.to_owned())
}

/// The notifier of the stream of agent `agent` of `tenant` held by this process, registered
/// until the returned `Arc` is dropped. A newer stream of the same agent takes over.
pub fn register(state: &BrokerState, tenant: &str, agent: &str) -> Arc<Notify> {
    let notify = Arc::new(Notify::new());
    let mut map = registry()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    map.retain(|_, w| w.strong_count() > 0);
    map.insert(key(state, tenant, agent), Arc::downgrade(&notify));
    notify
}

/// Wakes the stream of agent `agent` of `tenant` if this process holds it.
pub fn wake(state: &BrokerState, tenant: &str, agent: &str) {
    let notify = registry()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(&key(state, tenant, agent))
        .and_then(Weak::upgrade);
    if let Some(notify) = notify {
        notify.notify_one();
    }
}
