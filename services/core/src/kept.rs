//! [`Kept`]: a bounded, process-local memory of values computed from their keys, shared by the
//! hot paths that would otherwise compute the same value on every call (the readings of agent
//! certificates, decoded records). Written here rather than taken from a cache crate because it
//! needs no eviction policy: its users key by exact bytes, so a kept value is always what
//! computing again would give, and when full it is emptied at once and refills with what is
//! still in use. Keys are hashed with foldhash (seeded at random per process): its users hash
//! a certificate's DER or a call's record keys on every request, where std's SipHash was ~1% of
//! the broker's CPU; the memory is bounded, so a crafted set of colliding keys costs at most
//! `max` entries' worth of probing before it is emptied.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Mutex, MutexGuard, PoisonError};

use foldhash::fast::RandomState;

type Map<K, V> = HashMap<K, V, RandomState>;

/// Up to `max` values by key; see the module documentation.
#[derive(Debug)]
pub struct Kept<K, V> {
    max: usize,
    map: Mutex<Option<Map<K, V>>>,
}

impl<K: Hash + Eq, V> Kept<K, V> {
    /// An empty memory of at most `max` values.
    pub const fn new(max: usize) -> Self {
        Self {
            max,
            map: Mutex::new(None),
        }
    }

    /// `read` of the value kept at `key`, if any.
    pub fn find<Q, R>(&self, key: &Q, read: impl FnOnce(&V) -> Option<R>) -> Option<R>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.lock().as_ref()?.get(key).and_then(read)
    }

    /// Keeps `value` at `key` (emptying the memory first when it is full).
    pub fn put(&self, key: K, value: V) {
        let mut map = self.lock();
        let map = map.get_or_insert_with(Map::default);
        if map.len() >= self.max {
            map.clear();
        }
        map.insert(key, value);
    }

    /// How many values are kept.
    pub fn len(&self) -> usize {
        self.lock().as_ref().map_or(0, Map::len)
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Changes the value kept at `key` (tests mark an entry to see it come back).
    #[cfg(test)]
    pub fn change<Q>(&self, key: &Q, change: impl FnOnce(&mut V))
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if let Some(value) = self.lock().as_mut().and_then(|m| m.get_mut(key)) {
            change(value);
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<Map<K, V>>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full memory empties at once and keeps the newest value.
    #[test]
    fn a_full_memory_starts_again_with_the_newest_value() {
        let kept: Kept<String, u32> = Kept::new(2);
        kept.put("a".into(), 1);
        kept.put("b".into(), 2);
        assert_eq!(kept.find("a", |v| Some(*v)), Some(1));
        kept.put("c".into(), 3);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept.find("a", |v| Some(*v)), None);
        assert_eq!(kept.find("c", |v| Some(*v)), Some(3));
    }
}
