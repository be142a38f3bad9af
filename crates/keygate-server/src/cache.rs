//! A cache in which invalidation always wins over a concurrent refill.
//!
//! The race it closes: a request misses the cache and reads the store; meanwhile an admin change
//! commits and invalidates the entry; then the request writes what it read, now stale (say `VALID` for
//! a key just revoked), which would live until the TTL. Here a filler takes a *ticket* (the epoch)
//! before it reads the store and inserts only if no invalidation happened since. Invalidation bumps the
//! epoch and removes entries under a write lock; a fill checks the ticket and inserts under a read lock,
//! so the two never interleave. Reads of the cache take no lock at all: this is off the hot path's
//! cache-hit route, and fills and invalidations are rare.

use std::hash::Hash;
use std::sync::RwLock;

use moka::sync::Cache;

pub struct GuardedCache<K, V> {
    cache: Cache<K, V>,
    epoch: RwLock<u64>,
}

/// Proof of when a filler started reading the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket(u64);

impl<K, V> GuardedCache<K, V>
where
    K: Hash + Eq + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    pub fn new(cache: Cache<K, V>) -> Self {
        GuardedCache { cache, epoch: RwLock::new(0) }
    }

    pub fn get(&self, k: &K) -> Option<V> {
        self.cache.get(k)
    }

    pub fn contains_key(&self, k: &K) -> bool {
        self.cache.contains_key(k)
    }

    /// Take this before reading the store for a fill.
    pub fn ticket(&self) -> Ticket {
        Ticket(*self.epoch.read().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Inserts unless an invalidation happened after `ticket` was taken. Returns whether it inserted.
    pub fn insert_if_current(&self, ticket: Ticket, k: K, v: V) -> bool {
        let epoch = self.epoch.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        if *epoch != ticket.0 {
            return false;
        }
        self.cache.insert(k, v);
        true
    }

    /// Inserts a value this node has just written (nothing older can be invalidated for it).
    pub fn insert_new(&self, k: K, v: V) {
        self.cache.insert(k, v);
    }

    /// Removes these entries; fills that started earlier will not put them back.
    pub fn invalidate<'a>(&self, keys: impl IntoIterator<Item = &'a K>)
    where
        K: 'a,
    {
        let mut epoch = self.epoch.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        *epoch += 1;
        for k in keys {
            // Only entries that exist: every invalidation is work queued inside the cache, and bulk
            // imports pass many keys that were never cached.
            if self.cache.contains_key(k) {
                self.cache.invalidate(k);
            }
        }
    }

    /// Removes every entry; fills that started earlier will not put theirs back.
    pub fn invalidate_all(&self) {
        let mut epoch = self.epoch.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        *epoch += 1;
        self.cache.invalidate_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fill_that_started_before_an_invalidation_is_dropped() {
        let c: GuardedCache<u32, &str> = GuardedCache::new(Cache::new(10));
        let stale = c.ticket();
        c.invalidate([&1]);
        assert!(!c.insert_if_current(stale, 1, "stale VALID"));
        assert_eq!(c.get(&1), None);
        let fresh = c.ticket();
        assert!(c.insert_if_current(fresh, 1, "REVOKED"));
        assert_eq!(c.get(&1), Some("REVOKED"));
        let before_all = c.ticket();
        c.invalidate_all();
        assert!(!c.insert_if_current(before_all, 2, "x"));
        assert_eq!(c.get(&1), None);
    }
}
