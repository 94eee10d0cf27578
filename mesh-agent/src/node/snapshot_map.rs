//! A hash map whose copies share what they have not changed, so the data path can read a
//! snapshot of the mesh without a lock while the update loop prepares the next one (issue #19).
//!
//! The map is split into a fixed number of shards, each an `Arc<HashMap>`. Cloning the map
//! copies the shard pointers only; changing a clone copies the one shard it changes (the first
//! time), so a delta of a few entries costs a few shards of copying, not the whole map, and the
//! snapshot readers hold stays as it was. A leaf: it knows nothing of the mesh.
use std::{
    borrow::Borrow,
    collections::HashMap,
    hash::{BuildHasher, Hash, RandomState},
    sync::Arc,
};

/// Shards per map. At 100,000 entries a shard holds about 200, so a one-entry change copies a
/// few KiB; an empty map costs its shard pointers (4 KiB), all sharing one empty shard.
const SHARDS: usize = 512;

/// A hash map with cheap copies: see the module documentation.
#[derive(Debug)]
pub struct SnapshotMap<K, V> {
    shards: Vec<Arc<HashMap<K, V>>>,
    hasher: RandomState,
}

impl<K, V> Clone for SnapshotMap<K, V> {
    /// Shares every shard: O(shards), whatever the number of entries.
    fn clone(&self) -> Self {
        Self {
            shards: self.shards.clone(),
            hasher: self.hasher.clone(),
        }
    }
}

impl<K, V> Default for SnapshotMap<K, V> {
    fn default() -> Self {
        // `RandomState::new` gives each state other keys: the shards' differ from `hasher`.
        let empty = Arc::new(HashMap::with_hasher(RandomState::new()));
        Self {
            shards: vec![empty; SHARDS],
            hasher: RandomState::new(),
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> SnapshotMap<K, V> {
    /// The shard of a key, by a hasher of its own: the shards' maps hash with other keys, so
    /// the entries of one shard do not all share their bucket or tag bits.
    fn shard<Q: Hash + ?Sized>(&self, key: &Q) -> usize {
        self.hasher.hash_one(key) as usize % SHARDS
    }

    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.shards[self.shard(key)].get(key)
    }

    /// Inserts, copying the key's shard first if another copy of the map shares it.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        let i = self.shard(&key);
        Arc::make_mut(&mut self.shards[i]).insert(key, value)
    }

    /// Removes, copying the key's shard only if it holds the key and another copy shares it.
    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let i = self.shard(key);
        let shard = &mut self.shards[i];
        if !shard.contains_key(key) {
            return None;
        }
        Arc::make_mut(shard).remove(key)
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.shards.iter().all(|s| s.is_empty())
    }

    /// Every entry, in no particular order (dumps and tests; the data path looks up by key).
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.shards.iter().flat_map(|s| s.iter())
    }

    /// Every value, in no particular order.
    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.iter().map(|(_, v)| v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_keeps_what_it_had_while_the_original_changes() {
        let mut map = SnapshotMap::default();
        for i in 0..10_000u32 {
            map.insert(i, i * 2);
        }
        let snapshot = map.clone();
        map.insert(7, 0);
        map.remove(&8);
        map.insert(20_000, 1);
        assert_eq!(snapshot.get(&7), Some(&14));
        assert_eq!(snapshot.get(&8), Some(&16));
        assert_eq!(snapshot.get(&20_000), None);
        assert_eq!(snapshot.len(), 10_000);
        assert_eq!(map.get(&7), Some(&0));
        assert_eq!(map.get(&8), None);
        assert_eq!(map.get(&20_000), Some(&1));
        assert_eq!(map.len(), 10_000);
        assert_eq!(map.remove(&123_456), None);
    }

    #[test]
    fn a_change_copies_only_the_shard_it_touches() {
        let mut map = SnapshotMap::default();
        for i in 0..10_000u32 {
            map.insert(i, i);
        }
        let snapshot = map.clone();
        map.insert(1, 2);
        let shared = map
            .shards
            .iter()
            .zip(&snapshot.shards)
            .filter(|(a, b)| Arc::ptr_eq(a, b))
            .count();
        assert_eq!(shared, SHARDS - 1);
        // Removing a key the map does not hold copies nothing.
        let before = map.clone();
        map.remove(&99_999);
        assert!(
            map.shards
                .iter()
                .zip(&before.shards)
                .all(|(a, b)| Arc::ptr_eq(a, b))
        );
    }

    #[test]
    fn entries_spread_over_the_shards() {
        let mut map = SnapshotMap::default();
        for i in 0..(SHARDS as u32 * 100) {
            map.insert(i, ());
        }
        let fullest = map.shards.iter().map(|s| s.len()).max().unwrap();
        // 100 on average: a shard with three times that would mean the shard choice is biased.
        assert!(fullest < 300, "fullest shard has {fullest} entries");
        assert_eq!(map.iter().count(), SHARDS * 100);
    }
}
