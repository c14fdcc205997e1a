//! Wakes the status streams of agents as soon as something is queued for them, on whichever
//! replica holds the stream: a push, not a poll. The queue itself stays in the store (records are
//! the truth); a wake is a notification on the store's channel [`CHANNEL`] (Redis pub/sub across
//! replicas, in memory on the embedded store), which each process's [`Listener`] turns into a
//! `Notify` of the registered stream. The same channel announces configuration changes of a
//! tenant, so a replica drops its configuration snapshot ([`super::config`]) before it
//! wakes the streams that will rebuild from it: one channel, one listener, messages in order.
//!
//! When the subscription (re)starts, messages may have been lost: the listener drops every
//! snapshot and wakes every stream it holds, which then look at the store.
//!
//! Streams register under (store instance, tenant, agent): two brokers in one process (tests)
//! with stores of their own do not wake each other's streams.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use tokenfleet_store::{Notice, Store};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::state::BrokerState;

/// The store notification channel of the fleet.
pub const CHANNEL: &str = "fleet";

type Key = (usize, String, String);

fn registry() -> &'static Mutex<HashMap<Key, Vec<Weak<Notify>>>> {
    static WAKERS: OnceLock<Mutex<HashMap<Key, Vec<Weak<Notify>>>>> = OnceLock::new();
    WAKERS.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The address of the store instance: identifies the broker within the process.
pub fn store_id(state: &BrokerState) -> usize {
    store_addr(&state.store)
}

fn store_addr(store: &Arc<dyn Store>) -> usize {
    Arc::as_ptr(store).cast::<()>().addr()
}

/// The notifier of the stream of agent `agent` of `tenant` held by this process, registered
/// until the returned `Arc` is dropped. A newer stream of the same agent takes over.
pub fn register(state: &BrokerState, tenant: &str, agent: &str) -> Arc<Notify> {
    register_at(store_id(state), tenant, agent)
}

/// Wakes the stream of agent `agent` of `tenant` on whichever replica holds it. Best effort: a
/// lost wake is caught up by the stream's next sweep or report.
pub async fn wake(state: &BrokerState, tenant: &str, agent: &str) {
    announce(state, &format!("wake {tenant}/{agent}")).await;
}

/// Announces that the configuration records of `tenant` changed: every replica drops its
/// snapshot of the tenant before it handles the wakes that follow.
pub async fn config_changed(state: &BrokerState, tenant: &str) {
    announce(state, &format!("config {tenant}")).await;
}

async fn announce(state: &BrokerState, message: &str) {
    if let Err(error) = state.store.publish(CHANNEL, message).await {
        tracing::warn!(%error, message, "fleet notification not published");
    }
}

/// The process's listener on [`CHANNEL`] for one store; stops when dropped.
#[derive(Debug)]
pub struct Listener(JoinHandle<()>);

impl Drop for Listener {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Listener {
    /// Subscribes to the store's fleet channel and starts handling its messages.
    pub fn start(store: &Arc<dyn Store>) -> Self {
        let id = store_addr(store);
        let mut notices = store.subscribe(CHANNEL);
        Self(tokio::spawn(async move {
            while let Some(notice) = notices.recv().await {
                handle(id, notice);
            }
        }))
    }
}

fn handle(store: usize, notice: Notice) {
    match notice {
        Notice::Subscribed => {
            super::config::forget_all(store);
            wake_all_at(store);
        }
        Notice::Message(message) => match message.split_once(' ') {
            Some(("wake", who)) => {
                if let Some((tenant, agent)) = who.split_once('/') {
                    wake_at(store, tenant, agent);
                }
            }
            Some(("config", tenant)) => super::config::forget(store, tenant),
            _ => tracing::debug!(message, "unknown fleet notification ignored"),
        },
    }
}

fn register_at(store: usize, tenant: &str, agent: &str) -> Arc<Notify> {
    let notify = Arc::new(Notify::new());
    let mut map = registry()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let streams = map
        .entry((store, tenant.to_owned(), agent.to_owned()))
        .or_default();
    streams.retain(|w| w.strong_count() > 0);
    streams.push(Arc::downgrade(&notify));
    // Agents that left keep an entry of dead references until the whole map is swept; sweeping
    // on every registration made 10,000 agents connecting at once quadratic. The map is swept
    // when it has doubled since the last sweep, so each registration pays O(1) amortized.
    if map.len() >= PRUNE_AT.load(Ordering::Relaxed) {
        map.retain(|_, streams| {
            streams.retain(|w| w.strong_count() > 0);
            !streams.is_empty()
        });
        PRUNE_AT.store((map.len() * 2).max(MIN_PRUNE_AT), Ordering::Relaxed);
    }
    notify
}

/// Registry size below which dead entries are never swept.
const MIN_PRUNE_AT: usize = 1024;

/// Registry size at which the next registration sweeps dead entries (only read and written with
/// the registry's lock held).
static PRUNE_AT: AtomicUsize = AtomicUsize::new(MIN_PRUNE_AT);

/// Wakes every stream of the agent this process holds (a newer one and the one it replaced,
/// which then finds it lost the presence marker); whether there was one.
fn wake_at(store: usize, tenant: &str, agent: &str) -> bool {
    let streams: Vec<Arc<Notify>> = registry()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(&(store, tenant.to_owned(), agent.to_owned()))
        .into_iter()
        .flatten()
        .filter_map(Weak::upgrade)
        .collect();
    for notify in &streams {
        notify.notify_one();
    }
    !streams.is_empty()
}

fn wake_all_at(store: usize) {
    let woken: Vec<Arc<Notify>> = registry()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .filter(|((s, _, _), _)| *s == store)
        .flat_map(|(_, streams)| streams.iter().filter_map(Weak::upgrade))
        .collect();
    for notify in woken {
        notify.notify_one();
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

    #[test]
    fn entries_of_agents_that_left_are_swept_as_the_registry_grows() {
        // A store id of this test's own: other tests register under theirs.
        let store = 0xdead_0001;
        let mine = |map: &HashMap<Key, Vec<Weak<Notify>>>| {
            map.keys().filter(|(s, _, _)| *s == store).count()
        };
        let live = register_at(store, "acme", "stays");
        for i in 0..5 * MIN_PRUNE_AT {
            // Each agent connects and leaves again (its stream dropped at once).
            drop(register_at(store, "acme", &format!("left-{i}")));
        }
        let map = registry()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let left = mine(&map);
        assert!(
            left < 3 * MIN_PRUNE_AT,
            "{left} entries for 1 live and {} departed agents: the dead are never swept",
            5 * MIN_PRUNE_AT
        );
        assert!(
            map.contains_key(&(store, "acme".to_owned(), "stays".to_owned())),
            "the live stream's entry was swept"
        );
        drop(map);
        assert!(wake_at(store, "acme", "stays"));
        drop(live);
    }
}
