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

/// The address of the store instance: identifies the broker within the process.
fn store_id(state: &BrokerState) -> usize {
    Arc::as_ptr(&state.store).cast::<()>().addr()
}

/// The notifier of the stream of agent `agent` of `tenant` held by this process, registered
/// until the returned `Arc` is dropped. A newer stream of the same agent takes over.
pub fn register(state: &BrokerState, tenant: &str, agent: &str) -> Arc<Notify> {
    register_at(store_id(state), tenant, agent)
}

/// Wakes the stream of agent `agent` of `tenant` if this process holds it.
pub fn wake(state: &BrokerState, tenant: &str, agent: &str) {
    wake_at(store_id(state), tenant, agent);
}

fn register_at(store: usize, tenant: &str, agent: &str) -> Arc<Notify> {
    let notify = Arc::new(Notify::new());
    let mut map = registry()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    map.retain(|_, w| w.strong_count() > 0);
    map.insert(
        (store, tenant.to_owned(), agent.to_owned()),
        Arc::downgrade(&notify),
    );
    notify
}

fn wake_at(store: usize, tenant: &str, agent: &str) -> bool {
    let notify = registry()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(&(store, tenant.to_owned(), agent.to_owned()))
        .and_then(Weak::upgrade);
    match notify {
        Some(notify) => {
            notify.notify_one();
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn only_the_registered_stream_of_this_broker_is_woken() {
        let woken = register_at(1, "acme", "site-a");
        assert!(!wake_at(2, "acme", "site-a"), "another broker's stream");
        assert!(!wake_at(1, "acme", "site-b"), "another agent");
        assert!(wake_at(1, "acme", "site-a"));
        tokio::time::timeout(Duration::from_secs(1), woken.notified())
            .await
            .unwrap();
        // A newer stream takes over; a closed one is forgotten.
        let newer = register_at(1, "acme", "site-a");
        drop(woken);
        assert!(wake_at(1, "acme", "site-a"));
        tokio::time::timeout(Duration::from_secs(1), newer.notified())
            .await
            .unwrap();
        drop(newer);
        assert!(!wake_at(1, "acme", "site-a"));
    }
}
