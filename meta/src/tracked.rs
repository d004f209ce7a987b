//! [`Tracked`]: an ordered map that remembers which keys changed since they were last
//! taken, so the store writes only the changed records of the namespace (one per
//! inode, one per free run) instead of the whole of it.
//!
//! Reads go through `Deref` to the inner `BTreeMap`. There is no `DerefMut`: every
//! change goes through [`Tracked::get_mut`], [`Tracked::insert`], [`Tracked::remove`]
//! or [`Tracked::replace`], which note the key, so a change cannot be made without
//! being noted. A key noted and then removed is noted still: the store deletes its
//! record. The notes are not part of the value: they are neither serialized (the map
//! encodes exactly as a `BTreeMap`) nor compared.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Deref;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An ordered map with a set of the keys changed since [`Tracked::take_changed`].
#[derive(Debug, Clone)]
pub struct Tracked<K, V> {
    map: BTreeMap<K, V>,
    changed: BTreeSet<K>,
}

impl<K: Ord + Clone, V> Tracked<K, V> {
    /// A mutable reference to a value; the key is noted as changed.
    pub fn get_mut(&mut self, k: &K) -> Option<&mut V> {
        let v = self.map.get_mut(k)?;
        self.changed.insert(k.clone());
        Some(v)
    }

    pub fn insert(&mut self, k: K, v: V) -> Option<V> {
        self.changed.insert(k.clone());
        self.map.insert(k, v)
    }

    pub fn remove(&mut self, k: &K) -> Option<V> {
        let v = self.map.remove(k)?;
        self.changed.insert(k.clone());
        Some(v)
    }

    /// Replaces every entry; the keys of both the old and the new entries are noted.
    pub fn replace(&mut self, map: BTreeMap<K, V>) {
        let old = std::mem::replace(&mut self.map, map);
        self.changed.extend(old.into_keys());
        self.changed.extend(self.map.keys().cloned());
    }

    /// The keys changed since the last call (each key once; a key whose entry is gone
    /// is among them).
    pub fn take_changed(&mut self) -> BTreeSet<K> {
        std::mem::take(&mut self.changed)
    }

    /// Whether a change is noted.
    pub fn has_changes(&self) -> bool {
        !self.changed.is_empty()
    }
}

impl<K, V> Default for Tracked<K, V> {
    fn default() -> Self {
        Tracked {
            map: BTreeMap::new(),
            changed: BTreeSet::new(),
        }
    }
}

impl<K, V> From<BTreeMap<K, V>> for Tracked<K, V> {
    /// A map as loaded: nothing noted.
    fn from(map: BTreeMap<K, V>) -> Self {
        Tracked {
            map,
            changed: BTreeSet::new(),
        }
    }
}

impl<K, V> Deref for Tracked<K, V> {
    type Target = BTreeMap<K, V>;
    fn deref(&self) -> &BTreeMap<K, V> {
        &self.map
    }
}

impl<'a, K, V> IntoIterator for &'a Tracked<K, V> {
    type Item = (&'a K, &'a V);
    type IntoIter = std::collections::btree_map::Iter<'a, K, V>;
    fn into_iter(self) -> Self::IntoIter {
        self.map.iter()
    }
}

impl<K: PartialEq, V: PartialEq> PartialEq for Tracked<K, V> {
    fn eq(&self, other: &Self) -> bool {
        self.map == other.map
    }
}

impl<K: Eq, V: Eq> Eq for Tracked<K, V> {}

impl<K: Serialize, V: Serialize> Serialize for Tracked<K, V> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.map.serialize(s)
    }
}

impl<'de, K: Deserialize<'de> + Ord, V: Deserialize<'de>> Deserialize<'de> for Tracked<K, V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        BTreeMap::deserialize(d).map(Tracked::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_change_is_noted_and_taken_once() {
        let mut t: Tracked<u64, u64> = BTreeMap::from([(1, 10), (2, 20)]).into();
        assert!(!t.has_changes());
        *t.get_mut(&1).expect("present") += 1;
        assert!(t.get_mut(&9).is_none());
        t.insert(3, 30);
        t.remove(&2);
        assert!(t.remove(&8).is_none());
        assert_eq!(t.take_changed(), BTreeSet::from([1, 2, 3]));
        assert!(t.take_changed().is_empty());
        assert_eq!(*t, BTreeMap::from([(1, 11), (3, 30)]));
        t.replace(BTreeMap::from([(5, 50)]));
        assert_eq!(t.take_changed(), BTreeSet::from([1, 3, 5]));
    }

    #[test]
    fn it_encodes_and_compares_as_its_map() {
        let map = BTreeMap::from([(1u64, 7u64), (4, 9)]);
        let mut t = Tracked::from(map.clone());
        t.insert(4, 9);
        let bytes = postcard::to_stdvec(&t).expect("encodes");
        assert_eq!(bytes, postcard::to_stdvec(&map).expect("encodes"));
        let back: Tracked<u64, u64> = postcard::from_bytes(&bytes).expect("decodes");
        assert!(!back.has_changes());
        assert_eq!(back, t);
    }
}
