//! Compact strings for what a cluster repeats (issue #19). A cluster of 100,000 pods has a few
//! hundred namespaces, service accounts, nodes and label values: each is stored once and shared
//! ([`intern`]), and every string is a thin reference-counted pointer ([`Name`], 8 bytes), so
//! the agent's view of a remote workload costs hundreds of bytes rather than kilobytes. Labels
//! are a sorted slice ([`Labels`]) instead of a `BTreeMap`, whose smallest node holds room for
//! eleven entries.
use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    sync::{Arc, LazyLock, Mutex, PoisonError},
};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A shared, immutable string (8 bytes; cloning bumps a count).
pub type Name = arcstr::ArcStr;

/// A pod's addresses: one per family, so one or two; the first is kept inline (most pods are
/// single-stack), sparing an allocation per workload.
pub type Addresses = smallvec::SmallVec<[std::net::IpAddr; 1]>;

/// A pool of interned values. Entries nothing else holds any more are dropped whenever the
/// pool has doubled since the last sweep, so it stays within twice what is in use however long
/// the agent runs and however many distinct values pass through.
struct Pool<T> {
    values: HashSet<T>,
    sweep_at: usize,
}

const FIRST_SWEEP: usize = 1024;

impl<T: std::hash::Hash + Eq + Clone> Pool<T> {
    fn new() -> Mutex<Self> {
        Mutex::new(Self {
            values: HashSet::new(),
            sweep_at: FIRST_SWEEP,
        })
    }

    /// The pooled copy of `key`, made by `make` when there is none.
    fn get<Q>(&mut self, key: &Q, make: impl FnOnce(&Q) -> T, held: impl Fn(&T) -> bool) -> T
    where
        T: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        if let Some(found) = self.values.get(key) {
            return found.clone();
        }
        let value = make(key);
        self.values.insert(value.clone());
        if self.values.len() >= self.sweep_at {
            self.values.retain(&held);
            self.sweep_at = (self.values.len() * 2).max(FIRST_SWEEP);
        }
        value
    }
}

/// A pool of shared values of another kind (the node agent's identities: every workload of a
/// service account has the same one), swept as the string pool is.
pub struct Shared<T>(LazyLock<Mutex<Pool<Arc<T>>>>);

impl<T: std::hash::Hash + Eq + Clone> Shared<T> {
    pub const fn new() -> Self {
        Self(LazyLock::new(Pool::new))
    }

    /// The shared copy of `value`.
    pub fn share(&self, value: &T) -> Arc<T> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).get(
            value,
            |v: &T| Arc::new(v.clone()),
            |a: &Arc<T>| Arc::strong_count(a) > 1,
        )
    }
}

impl<T: std::hash::Hash + Eq + Clone> Default for Shared<T> {
    fn default() -> Self {
        Self::new()
    }
}

static NAMES: LazyLock<Mutex<Pool<Name>>> = LazyLock::new(Pool::new);

/// The shared copy of `s`: equal strings interned anywhere in the process share one allocation.
/// For values that repeat across workloads (namespaces, service accounts, nodes, label keys and
/// values); a pod's own name is unique and is not worth a pool entry ([`Name::from`]).
pub fn intern(s: &str) -> Name {
    if s.is_empty() {
        return Name::new();
    }
    NAMES.lock().unwrap_or_else(PoisonError::into_inner).get(
        s,
        |s: &str| Name::from(s),
        |n: &Name| Name::strong_count(n).is_none_or(|c| c > 1),
    )
}

/// How many strings the pool holds (tests and diagnostics).
pub fn pooled() -> usize {
    NAMES
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .values
        .len()
}

type LabelSet = Arc<[(Name, Name)]>;

static LABEL_SETS: LazyLock<Mutex<Pool<LabelSet>>> = LazyLock::new(Pool::new);

/// The shared copy of a sorted label set: the replicas of a Deployment carry the same labels.
fn intern_labels(all: &[(Name, Name)]) -> LabelSet {
    if all.is_empty() {
        static EMPTY: LazyLock<LabelSet> = LazyLock::new(|| Arc::from(Vec::new()));
        return Arc::clone(&EMPTY);
    }
    LABEL_SETS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(
            all,
            |l: &[(Name, Name)]| Arc::from(l),
            |l: &LabelSet| Arc::strong_count(l) > 1,
        )
}

/// Serde: a string read into the pool.
pub fn interned<'de, D: Deserializer<'de>>(d: D) -> Result<Name, D::Error> {
    Ok(intern(&<std::borrow::Cow<'de, str>>::deserialize(d)?))
}

/// Labels (or a selector): sorted by key, keys unique, keys and values interned, and the set
/// itself interned, so pods with the same labels share one. Reads like the `BTreeMap` it
/// replaces (`get`, `iter`, `contains_key`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Labels(LabelSet);

impl Default for Labels {
    fn default() -> Self {
        Self(intern_labels(&[]))
    }
}

impl Labels {
    pub fn new() -> Self {
        Self::default()
    }

    fn of(all: Vec<(Name, Name)>) -> Self {
        Self(intern_labels(&all))
    }

    fn find(&self, key: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| k.as_str().cmp(key))
    }

    pub fn get(&self, key: &str) -> Option<&Name> {
        self.find(key).ok().map(|i| &self.0[i].1)
    }

    /// Whether `key` is set to `value` (one term of a selector).
    pub fn has(&self, key: &str, value: &str) -> bool {
        self.get(key).is_some_and(|v| v == value)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.find(key).is_ok()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// In key order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&Name, &Name)> + Clone {
        self.0.iter().map(|(k, v)| (k, v))
    }

    pub fn keys(&self) -> impl Iterator<Item = &Name> {
        self.0.iter().map(|(k, _)| k)
    }

    /// Sets `key` (rare: labels are built whole; this copies the slice).
    pub fn insert(&mut self, key: &str, value: &str) -> Option<Name> {
        let mut all = self.0.to_vec();
        let old = match all.binary_search_by(|(k, _)| k.as_str().cmp(key)) {
            Ok(i) => Some(std::mem::replace(&mut all[i].1, intern(value))),
            Err(i) => {
                all.insert(i, (intern(key), intern(value)));
                None
            }
        };
        *self = Self::of(all);
        old
    }

    /// Removes `key` (rare; copies the slice).
    pub fn remove(&mut self, key: &str) -> Option<Name> {
        let i = self.find(key).ok()?;
        let mut all = self.0.to_vec();
        let (_, v) = all.remove(i);
        *self = Self::of(all);
        Some(v)
    }
}

impl<K: AsRef<str>, V: AsRef<str>> FromIterator<(K, V)> for Labels {
    /// Keys and values are interned; of a repeated key the last value wins (as in a map).
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut all: Vec<(Name, Name)> = iter
            .into_iter()
            .map(|(k, v)| (intern(k.as_ref()), intern(v.as_ref())))
            .collect();
        // Stable: equal keys keep their order, so the last one written survives the dedup.
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all.reverse();
        all.dedup_by(|later, earlier| later.0 == earlier.0);
        all.reverse();
        Self::of(all)
    }
}

impl From<&BTreeMap<String, String>> for Labels {
    fn from(map: &BTreeMap<String, String>) -> Self {
        map.iter().collect()
    }
}

impl From<BTreeMap<String, String>> for Labels {
    fn from(map: BTreeMap<String, String>) -> Self {
        Self::from(&map)
    }
}

impl<'a> IntoIterator for &'a Labels {
    type Item = (&'a Name, &'a Name);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (Name, Name)>,
        fn(&'a (Name, Name)) -> (&'a Name, &'a Name),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

impl std::ops::Index<&str> for Labels {
    type Output = Name;

    /// Panics when `key` is not set, as a map's index does.
    fn index(&self, key: &str) -> &Name {
        self.get(key)
            .unwrap_or_else(|| panic!("label {key:?} is not set"))
    }
}

impl fmt::Debug for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Serialize for Labels {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Labels {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Through a map: a repeated key keeps its last value, as the `BTreeMap` did.
        let map =
            BTreeMap::<std::borrow::Cow<'de, str>, std::borrow::Cow<'de, str>>::deserialize(d)?;
        Ok(map.iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_strings_share_one_allocation() {
        let a = intern("names-test-shared");
        let b = intern(&String::from("names-test-shared"));
        assert!(Name::ptr_eq(&a, &b));
        assert!(intern("").is_empty());
        let l1: Labels = [("names-test", "a"), ("names-test-2", "b")]
            .into_iter()
            .collect();
        let l2: Labels = [("names-test-2", "b"), ("names-test", "a")]
            .into_iter()
            .collect();
        assert!(Arc::ptr_eq(&l1.0, &l2.0), "equal label sets are shared");
    }

    #[test]
    fn the_pool_forgets_what_nothing_holds() {
        // Unique strings nothing keeps: the pool must not grow with them.
        for i in 0..10 * FIRST_SWEEP {
            let _ = intern(&format!("names-test-transient-{i}"));
        }
        let kept = intern("names-test-kept");
        for i in 0..10 * FIRST_SWEEP {
            let _ = intern(&format!("names-test-transient-again-{i}"));
        }
        // Other tests intern concurrently; bounded by the sweep rule, far below 20k.
        assert!(pooled() < 4 * FIRST_SWEEP, "{} pooled", pooled());
        assert!(Name::ptr_eq(&kept, &intern("names-test-kept")));
    }

    #[test]
    fn labels_read_like_a_map() {
        let l: Labels = [("b", "2"), ("a", "1"), ("b", "3")].into_iter().collect();
        assert_eq!(l.len(), 2);
        assert_eq!(l.get("a").map(Name::as_str), Some("1"));
        assert_eq!(
            l.get("b").map(Name::as_str),
            Some("3"),
            "the last value wins"
        );
        assert!(l.contains_key("a") && !l.contains_key("c"));
        let keys: Vec<&str> = l.keys().map(Name::as_str).collect();
        assert_eq!(keys, ["a", "b"]);
        let mut m = l.clone();
        assert_eq!(m.insert("c", "4"), None);
        assert_eq!(m.insert("a", "5").as_deref(), Some("1"));
        assert_eq!(m.remove("b").as_deref(), Some("3"));
        assert_eq!(format!("{m:?}"), r#"{"a": "5", "c": "4"}"#);
        let map: BTreeMap<String, String> =
            [("a".into(), "1".into()), ("b".into(), "3".into())].into();
        assert_eq!(Labels::from(&map), l);
    }

    #[test]
    fn labels_from_yaml_read_as_a_map_did() {
        let l: Labels = serde_yaml::from_str("{version: v1, app: web}").unwrap();
        assert_eq!(l.get("app").map(Name::as_str), Some("web"));
        assert_eq!(l.keys().next().map(Name::as_str), Some("app"));
        let twice: Labels = serde_yaml::from_str("{app: a, app: b}").unwrap();
        assert_eq!(twice.get("app").map(Name::as_str), Some("b"));
        assert!(serde_yaml::from_str::<Labels>("[1, 2]").is_err());
    }
}
