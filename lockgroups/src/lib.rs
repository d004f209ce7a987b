//! The lock group a storage node forms with the other members of its stripes
//! (report 5.3.2, 5.3.3; DESIGN-NOTES R6, R8, I4).
//!
//! Every member of a stripe keeps the same table for the stripe's data blocks: a lock
//! multicast goes to all members, and a client holds a block only when every live
//! member granted it. On top of the table, each node watches the *lease* of every
//! client holding a lock: a client renews it with each lock request, update and
//! heartbeat; when it runs out while the client holds locks there, the node *fences*
//! the client (refuses its requests from then on),
//! settles its updates in flight, and releases its locks, so a crashed client never
//! keeps a block locked, and a paused one that wakes up cannot write.
//!
//! This crate is the pure part: no I/O, no clock (callers pass milliseconds in), no
//! hidden randomness, so it can be tested exhaustively and driven by the protocol
//! simulation. A lock is owned by an *owner* (one id per lock acquisition) on behalf
//! of a *client* (the lease holder).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

/// Client ids as in the wire protocol.
pub type ClientId = u64;
/// Stripe ids as in the wire protocol.
pub type StripeId = u64;

/// Fenced clients remembered (the oldest are forgotten first).
const FENCED_MAX: usize = 100_000;

/// Who asks for a lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder {
    /// One id per lock acquisition.
    pub owner: ClientId,
    /// Whose lease keeps the lock.
    pub client: ClientId,
    /// Where other clients can reach the holder's cache (report 5.5), if anywhere.
    pub contact: Option<SocketAddr>,
}

/// One held lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lock {
    /// Who holds it: one id per lock acquisition.
    pub owner: ClientId,
    /// Whose lease keeps it.
    pub client: ClientId,
    pub contact: Option<SocketAddr>,
    /// When it was granted, in the caller's milliseconds.
    pub granted_ms: u64,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Another owner holds one of the blocks.
    Held {
        index: u8,
        owner: ClientId,
        client: ClientId,
        contact: Option<SocketAddr>,
    },
    /// The client's lease ran out while it held locks here: it is fenced for good.
    Fenced,
    /// An update whose owner does not hold the block's lock here.
    NotLocked { index: u8 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Lease {
    expires_ms: u64,
    lease_ms: u64,
}

/// A lock as seen from outside, with the time its client's lease has left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockView {
    pub index: u8,
    pub owner: ClientId,
    pub client: ClientId,
    pub lease_left_ms: u64,
}

/// Locks and leases at one node.
#[derive(Debug, Default, Clone)]
pub struct LockGroup {
    locks: BTreeMap<(StripeId, u8), Lock>,
    leases: BTreeMap<ClientId, Lease>,
    /// Fenced clients, with when they were fenced.
    fenced: BTreeMap<ClientId, u64>,
}

impl LockGroup {
    pub fn new() -> LockGroup {
        LockGroup::default()
    }

    /// Renews `client`'s lease to `now + lease_ms` (a heartbeat, or any lock request).
    pub fn renew(&mut self, client: ClientId, lease_ms: u64, now: u64) -> Result<(), Refused> {
        if self.fenced.contains_key(&client) {
            return Err(Refused::Fenced);
        }
        let l = self.leases.entry(client).or_insert(Lease {
            expires_ms: 0,
            lease_ms,
        });
        l.lease_ms = lease_ms;
        l.expires_ms = l.expires_ms.max(now.saturating_add(lease_ms));
        Ok(())
    }

    /// Extends `client`'s running lease by its own length from `now`: any request the
    /// client sent (an update, say) shows it was alive when it sent it, as a heartbeat
    /// does. Does nothing for a client without a lease here or a fenced one.
    pub fn touch(&mut self, client: ClientId, now: u64) {
        if let Some(l) = self.leases.get_mut(&client) {
            l.expires_ms = l.expires_ms.max(now.saturating_add(l.lease_ms));
        }
    }

    /// Grants all of `indices` to `owner` (on behalf of `client`, whose lease this
    /// renews), or none of them. A block `owner` already holds counts as granted (a
    /// retried lock request must not fail).
    pub fn lock(
        &mut self,
        stripe: StripeId,
        indices: &[u8],
        who: Holder,
        lease_ms: u64,
        now: u64,
    ) -> Result<(), Refused> {
        if self.fenced.contains_key(&who.client) {
            return Err(Refused::Fenced);
        }
        for &index in indices {
            if let Some(l) = self.locks.get(&(stripe, index)) {
                if l.owner != who.owner {
                    return Err(Refused::Held {
                        index,
                        owner: l.owner,
                        client: l.client,
                        contact: l.contact,
                    });
                }
            }
        }
        self.renew(who.client, lease_ms, now)?;
        for &index in indices {
            self.locks.entry((stripe, index)).or_insert(Lock {
                owner: who.owner,
                client: who.client,
                contact: who.contact,
                granted_ms: now,
            });
        }
        Ok(())
    }

    /// Releases those of `indices` that `owner` holds; returns how many it released.
    /// Releasing a block one does not hold changes nothing (an unlock that arrives
    /// twice, or after the lock moved on, is harmless).
    pub fn unlock(&mut self, stripe: StripeId, indices: &[u8], owner: ClientId) -> usize {
        let mut released = 0;
        for &index in indices {
            if self
                .locks
                .get(&(stripe, index))
                .is_some_and(|l| l.owner == owner)
            {
                self.locks.remove(&(stripe, index));
                released += 1;
            }
        }
        released
    }

    /// Whether an update of block `index` of `stripe` by `owner` for `client` may be
    /// applied: the client is not fenced and the owner holds the block's lock.
    /// (Relayed updates, passed on by another member, are not checked: a member
    /// already took them under a valid lock.)
    pub fn may_update(
        &self,
        stripe: StripeId,
        index: u8,
        owner: ClientId,
        client: ClientId,
    ) -> Result<(), Refused> {
        if self.fenced.contains_key(&client) {
            return Err(Refused::Fenced);
        }
        match self.locks.get(&(stripe, index)) {
            Some(l) if l.owner == owner => Ok(()),
            _ => Err(Refused::NotLocked { index }),
        }
    }

    /// True if `owner` holds block `index` of `stripe` (whatever its client's state).
    pub fn owns(&self, stripe: StripeId, index: u8, owner: ClientId) -> bool {
        self.locks
            .get(&(stripe, index))
            .is_some_and(|l| l.owner == owner)
    }

    pub fn is_fenced(&self, client: ClientId) -> bool {
        self.fenced.contains_key(&client)
    }

    /// For a node that finds it was paused from `since` for `pause_ms`, when no
    /// client could renew: every lease still running at `since` runs `pause_ms`
    /// longer. Leases that had run out before stay so; each pause extends a lease
    /// by its own length only, so a client that is gone still expires.
    pub fn forgive_pause(&mut self, since: u64, pause_ms: u64) {
        for l in self.leases.values_mut() {
            if l.expires_ms > since {
                l.expires_ms = l.expires_ms.saturating_add(pause_ms);
            }
        }
    }

    /// Clients whose lease ran out by `now`, oldest first.
    pub fn expired(&self, now: u64) -> Vec<ClientId> {
        let mut v: Vec<(u64, ClientId)> = self
            .leases
            .iter()
            .filter(|(_, l)| l.expires_ms <= now)
            .map(|(c, l)| (l.expires_ms, *c))
            .collect();
        v.sort_unstable();
        v.into_iter().map(|(_, c)| c).collect()
    }

    /// True if `client` holds any lock here.
    pub fn holds_any(&self, client: ClientId) -> bool {
        self.locks.values().any(|l| l.client == client)
    }

    /// Fences `client`: its lease is gone and every later request from it is refused.
    /// Its locks stay until [`LockGroup::release_client`] (after its updates in
    /// flight are settled).
    pub fn fence(&mut self, client: ClientId, now: u64) {
        self.leases.remove(&client);
        self.fenced.insert(client, now);
        while self.fenced.len() > FENCED_MAX {
            let oldest = self.fenced.iter().min_by_key(|(_, t)| **t).map(|(c, _)| *c);
            match oldest {
                Some(c) => {
                    self.fenced.remove(&c);
                }
                None => break,
            }
        }
    }

    /// Forgets a client whose lease ran out while it held nothing here (it is not
    /// fenced: it may come back and lock again).
    pub fn forget(&mut self, client: ClientId) {
        self.leases.remove(&client);
    }

    /// Releases every lock `client` holds; returns them as (stripe, index).
    pub fn release_client(&mut self, client: ClientId) -> Vec<(StripeId, u8)> {
        let gone: Vec<(StripeId, u8)> = self
            .locks
            .iter()
            .filter(|(_, l)| l.client == client)
            .map(|(k, _)| *k)
            .collect();
        for k in &gone {
            self.locks.remove(k);
        }
        gone
    }

    /// The locks held on a stripe, by index, with their clients' lease left at `now`.
    pub fn holders(&self, stripe: StripeId, now: u64) -> Vec<LockView> {
        self.locks
            .range((stripe, 0)..=(stripe, u8::MAX))
            .map(|((_, index), l)| LockView {
                index: *index,
                owner: l.owner,
                client: l.client,
                lease_left_ms: self
                    .leases
                    .get(&l.client)
                    .map_or(0, |e| e.expires_ms.saturating_sub(now)),
            })
            .collect()
    }

    /// Every lock, in (stripe, index) order.
    pub fn iter(&self) -> impl Iterator<Item = (StripeId, u8, Lock)> + '_ {
        self.locks.iter().map(|((s, i), l)| (*s, *i, *l))
    }

    pub fn len(&self) -> usize {
        self.locks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.locks.is_empty()
    }

    /// Clients with a live lease.
    pub fn clients(&self) -> BTreeSet<ClientId> {
        self.leases.keys().copied().collect()
    }
}

/// An update's name: (client, client sequence), as in the wire protocol.
pub type UpdateKey = (ClientId, u64);

/// An update a node took that some member of its stripe may still lack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsettled<T> {
    pub stripe: StripeId,
    /// The data block it changes.
    pub index: u8,
    /// Positions in the stripe that must hold it, other than this node's.
    pub recipients: Vec<u8>,
    /// Recipients known to hold it.
    pub confirmed: BTreeSet<u8>,
    /// When it was taken, or last passed on (the caller's milliseconds).
    pub since_ms: u64,
    /// What is needed to pass it on (the update and its delta).
    pub payload: T,
    /// Bytes the payload holds, for the budget.
    pub size: usize,
}

/// The updates a node took whose delivery to every member of their stripe is not
/// known yet (all-or-nothing, report 5.3.3). The client says when every member
/// acknowledged an update (it is *complete*); until then the node keeps what it needs
/// to pass the update on, and passes it on itself if the client is late or gone.
/// Bounded by bytes: beyond the budget the oldest entries are given up (the caller
/// then falls back to re-checking their stripes).
#[derive(Debug, Clone)]
pub struct UnsettledSet<T> {
    entries: BTreeMap<UpdateKey, Unsettled<T>>,
    /// The entries of each block: (stripe, index) -> keys.
    by_block: BTreeMap<(StripeId, u8), BTreeSet<UpdateKey>>,
    /// Entries already passed on to every recipient that had not confirmed them.
    offered: BTreeSet<UpdateKey>,
    /// Entries someone waits for (a lock refused with `Settling`): due at once,
    /// whatever their time, until passed on again.
    hurried: BTreeSet<UpdateKey>,
    /// Times each entry was passed on ([`UnsettledSet::touch`]).
    passes: BTreeMap<UpdateKey, u32>,
    /// Entries never worn out ([`UnsettledSet::pin`]).
    pinned: BTreeSet<UpdateKey>,
    bytes: usize,
    max_bytes: usize,
}

impl<T> UnsettledSet<T> {
    pub fn new(max_bytes: usize) -> UnsettledSet<T> {
        UnsettledSet {
            entries: BTreeMap::new(),
            by_block: BTreeMap::new(),
            offered: BTreeSet::new(),
            hurried: BTreeSet::new(),
            passes: BTreeMap::new(),
            pinned: BTreeSet::new(),
            bytes: 0,
            max_bytes,
        }
    }

    /// Records an update taken at `now`. Returns the entries given up to stay within
    /// the budget (oldest first).
    pub fn add(&mut self, key: UpdateKey, entry: Unsettled<T>) -> Vec<(UpdateKey, Unsettled<T>)> {
        self.remove(&key);
        self.bytes += entry.size;
        self.by_block
            .entry((entry.stripe, entry.index))
            .or_default()
            .insert(key);
        self.entries.insert(key, entry);
        let mut dropped = Vec::new();
        while self.bytes > self.max_bytes && self.entries.len() > 1 {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.since_ms)
                .map(|(k, _)| *k);
            match oldest.and_then(|k| self.remove(&k).map(|e| (k, e))) {
                Some(x) => dropped.push(x),
                None => break,
            }
        }
        dropped
    }

    /// The client says every member holds these.
    pub fn complete(&mut self, keys: &[UpdateKey]) {
        for k in keys {
            self.remove(k);
        }
    }

    /// `position` holds `key`; returns true when every recipient does (the entry is
    /// then gone).
    pub fn confirm(&mut self, key: &UpdateKey, position: u8) -> bool {
        let done = match self.entries.get_mut(key) {
            Some(e) => {
                e.confirmed.insert(position);
                e.recipients.iter().all(|r| e.confirmed.contains(r))
            }
            None => return true,
        };
        if done {
            self.remove(key);
        }
        done
    }

    /// Every hurried entry, whatever `now` is, then the entries taken (or last passed
    /// on) at least `after_ms` before `now`: someone waits for the hurried ones, so a
    /// caller that passes on only the first few never leaves them behind a backlog.
    pub fn due(&self, now: u64, after_ms: u64) -> Vec<UpdateKey> {
        let late = self
            .entries
            .iter()
            .filter(|(k, e)| {
                !self.hurried.contains(k) && e.since_ms.saturating_add(after_ms) <= now
            })
            .map(|(k, _)| *k);
        self.hurried.iter().copied().chain(late).collect()
    }

    /// Entries of `client`.
    pub fn of_client(&self, client: ClientId) -> Vec<UpdateKey> {
        self.entries
            .range((client, 0)..=(client, u64::MAX))
            .map(|(k, _)| *k)
            .collect()
    }

    /// Marks an entry as just passed on (so it is due again only `after_ms` later,
    /// unless it is hurried again).
    pub fn touch(&mut self, key: &UpdateKey, now: u64) {
        if let Some(e) = self.entries.get_mut(key) {
            e.since_ms = now;
            self.hurried.remove(key);
            *self.passes.entry(*key).or_default() += 1;
        }
    }

    /// Gives up the entries passed on `max_passes` times that some recipient still
    /// has not confirmed (it stayed unreachable): they are removed and returned. A
    /// member that was away that long catches up by comparing its blocks with the
    /// stripe (rejoin, periodic verification), not by relays.
    pub fn worn_out(&mut self, max_passes: u32) -> Vec<(UpdateKey, Unsettled<T>)> {
        let worn: Vec<UpdateKey> = self
            .passes
            .iter()
            .filter(|(k, n)| **n >= max_passes && !self.pinned.contains(k))
            .map(|(k, _)| *k)
            .collect();
        worn.into_iter()
            .filter_map(|k| self.remove(&k).map(|e| (k, e)))
            .collect()
    }

    pub fn get(&self, key: &UpdateKey) -> Option<&Unsettled<T>> {
        self.entries.get(key)
    }

    pub fn remove(&mut self, key: &UpdateKey) -> Option<Unsettled<T>> {
        let e = self.entries.remove(key)?;
        self.bytes -= e.size;
        self.offered.remove(key);
        self.hurried.remove(key);
        self.passes.remove(key);
        self.pinned.remove(key);
        if let Some(keys) = self.by_block.get_mut(&(e.stripe, e.index)) {
            keys.remove(key);
            if keys.is_empty() {
                self.by_block.remove(&(e.stripe, e.index));
            }
        }
        Some(e)
    }

    /// The data blocks of `stripe` with entries, ascending.
    pub fn indices(&self, stripe: StripeId) -> Vec<u8> {
        self.by_block
            .range((stripe, 0)..=(stripe, u8::MAX))
            .filter(|(_, keys)| !keys.is_empty())
            .map(|((_, i), _)| *i)
            .collect()
    }

    /// Entries of block `index` of `stripe` not yet passed on to every recipient
    /// lacking them. A node grants no lock on the block while there are any: the next
    /// writer must build on updates every live member has, or will have without the
    /// node that took them.
    pub fn unoffered(&self, stripe: StripeId, index: u8) -> Vec<UpdateKey> {
        self.by_block
            .get(&(stripe, index))
            .map(|keys| {
                keys.iter()
                    .filter(|k| !self.offered.contains(k))
                    .copied()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Exempts an entry from [`UnsettledSet::worn_out`]: it may be the only copy
    /// of an acknowledged update (its data node did not take it), so it is passed
    /// on until a recipient confirms it however long that takes. It still counts
    /// against the byte budget.
    pub fn pin(&mut self, key: &UpdateKey) {
        if self.entries.contains_key(key) {
            self.pinned.insert(*key);
        }
    }

    /// Makes an entry due at once (someone waits for it): [`UnsettledSet::due`]
    /// returns it from now on, however long the caller's clock has run, until it is
    /// passed on ([`UnsettledSet::touch`]).
    pub fn hurry(&mut self, key: &UpdateKey) {
        if self.entries.contains_key(key) {
            self.hurried.insert(*key);
        }
    }

    /// The entry was passed on to every recipient that had not confirmed it (whether
    /// or not they answered).
    pub fn mark_offered(&mut self, key: &UpdateKey) {
        if self.entries.contains_key(key) {
            self.offered.insert(*key);
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LEASE: u64 = 1000;

    fn h(owner: ClientId, client: ClientId) -> Holder {
        Holder {
            owner,
            client,
            contact: None,
        }
    }

    #[test]
    fn grant_deny_release() {
        let mut t = LockGroup::new();
        assert_eq!(t.lock(1, &[0, 2], h(10, 1), LEASE, 5), Ok(()));
        assert_eq!(
            t.lock(1, &[2, 3], h(11, 2), LEASE, 6),
            Err(Refused::Held {
                index: 2,
                owner: 10,
                client: 1,
                contact: None
            })
        );
        assert!(
            t.holders(1, 6).iter().all(|v| v.index != 3),
            "all or none: 3 was not granted"
        );
        assert_eq!(
            t.lock(1, &[0], h(10, 1), LEASE, 7),
            Ok(()),
            "re-entrant for the owner"
        );
        assert_eq!(
            t.lock(1, &[0], h(12, 1), LEASE, 7),
            Err(Refused::Held {
                index: 0,
                owner: 10,
                client: 1,
                contact: None
            }),
            "not for another owner of the same client"
        );
        assert_eq!(t.unlock(1, &[0, 2], 11), 0, "only the owner releases");
        assert_eq!(t.unlock(1, &[0, 2], 10), 2);
        assert!(t.is_empty());
        assert_eq!(t.lock(1, &[2, 3], h(11, 2), LEASE, 8), Ok(()));
    }

    #[test]
    fn a_paused_node_extends_running_leases_by_the_pause() {
        let mut t = LockGroup::new();
        t.lock(1, &[0], h(10, 1), LEASE, 0).unwrap();
        t.lock(2, &[1], h(20, 2), LEASE, 500).unwrap();
        t.lock(3, &[2], h(30, 3), LEASE, 0).unwrap();
        t.renew(3, LEASE, 0).unwrap();
        // The node is paused from 1200 to 4200. Client 3's lease (to 1000) ran out
        // before the pause; client 1's runs to 1300, client 2's to 1500.
        t.renew(1, LEASE, 300).unwrap();
        assert_eq!(t.expired(4200), vec![3, 1, 2]);
        t.forgive_pause(1200, 3000);
        assert_eq!(
            t.expired(4200),
            vec![3],
            "only the lease that ran out before"
        );
        assert_eq!(t.expired(4299), vec![3]);
        assert_eq!(t.expired(4300), vec![3, 1]);
        assert_eq!(t.expired(4500), vec![3, 1, 2]);
        // Repeated pauses extend by their own length only: a gone client expires.
        t.forgive_pause(4400, 50);
        assert_eq!(t.expired(4600), vec![3, 1, 2]);
    }

    #[test]
    fn any_request_of_a_client_extends_its_lease() {
        let mut t = LockGroup::new();
        t.lock(1, &[0], h(10, 1), LEASE, 0).unwrap();
        t.touch(1, 800);
        assert!(
            t.expired(1000).is_empty(),
            "an update at 800 keeps it to 1800"
        );
        assert_eq!(t.expired(1800), vec![1]);
        // Never shortens, never creates a lease, and a fenced client stays fenced.
        t.touch(1, 100);
        assert_eq!(t.expired(1800), vec![1]);
        t.touch(7, 500);
        assert!(!t.clients().contains(&7));
        t.fence(1, 1800);
        t.touch(1, 1900);
        assert!(t.is_fenced(1));
        assert!(t.expired(5000).is_empty());
    }

    #[test]
    fn leases_expire_fence_and_release() {
        let mut t = LockGroup::new();
        t.lock(1, &[0], h(10, 1), LEASE, 0).unwrap();
        t.lock(2, &[1], h(20, 2), LEASE, 0).unwrap();
        t.renew(2, LEASE, 900).unwrap();
        assert!(t.expired(999).is_empty());
        assert_eq!(t.expired(1000), vec![1]);
        assert_eq!(t.may_update(1, 0, 10, 1), Ok(()));
        t.fence(1, 1000);
        assert_eq!(
            t.may_update(1, 0, 10, 1),
            Err(Refused::Fenced),
            "fenced before release: updates refused"
        );
        assert_eq!(t.lock(3, &[0], h(11, 1), LEASE, 1001), Err(Refused::Fenced));
        assert_eq!(t.renew(1, LEASE, 1001), Err(Refused::Fenced));
        assert_eq!(t.release_client(1), vec![(1, 0)]);
        assert_eq!(
            t.lock(1, &[0], h(30, 3), LEASE, 1002),
            Ok(()),
            "the block is free for others"
        );
        assert_eq!(t.expired(1900), vec![2]);
        assert_eq!(t.may_update(2, 1, 20, 2), Ok(()));
        assert_eq!(
            t.may_update(2, 1, 21, 2),
            Err(Refused::NotLocked { index: 1 })
        );
    }

    fn unsettled(stripe: StripeId, since_ms: u64, size: usize) -> Unsettled<()> {
        Unsettled {
            stripe,
            index: 0,
            recipients: vec![4, 5],
            confirmed: BTreeSet::new(),
            since_ms,
            payload: (),
            size,
        }
    }

    #[test]
    fn unsettled_updates_complete_confirm_and_stay_in_budget() {
        let mut u = UnsettledSet::new(100);
        assert!(u.add((1, 1), unsettled(7, 0, 40)).is_empty());
        assert!(u.add((1, 2), unsettled(8, 10, 40)).is_empty());
        assert!(u.add((2, 1), unsettled(9, 20, 10)).is_empty());
        assert_eq!(u.of_client(1), vec![(1, 1), (1, 2)]);
        assert_eq!(u.due(15, 5), vec![(1, 1), (1, 2)]);
        u.touch(&(1, 1), 15);
        assert_eq!(u.due(15, 5), vec![(1, 2)]);
        assert!(!u.confirm(&(1, 2), 4));
        assert!(u.confirm(&(1, 2), 5), "all recipients hold it");
        assert!(u.get(&(1, 2)).is_none());
        u.complete(&[(2, 1)]);
        assert_eq!(u.len(), 1);
        assert_eq!(u.bytes(), 40);
        // Over budget: the oldest goes.
        let dropped = u.add((3, 1), unsettled(10, 30, 70));
        assert_eq!(
            dropped.iter().map(|d| d.0).collect::<Vec<_>>(),
            vec![(1, 1)]
        );
        assert_eq!(u.bytes(), 70);
    }

    #[test]
    fn a_block_with_an_unoffered_update_is_reported_until_it_is_passed_on() {
        let mut u = UnsettledSet::new(1000);
        u.add((1, 1), unsettled(7, 50, 10));
        u.add((1, 2), unsettled(7, 60, 10));
        u.add((2, 1), unsettled(8, 70, 10));
        assert_eq!(u.unoffered(7, 0), vec![(1, 1), (1, 2)]);
        assert!(u.unoffered(7, 1).is_empty(), "another block");
        assert!(u.due(100, 100).is_empty());
        u.hurry(&(1, 1));
        assert_eq!(u.due(100, 100), vec![(1, 1)], "hurried: due at once");
        u.mark_offered(&(1, 1));
        assert_eq!(u.unoffered(7, 0), vec![(1, 2)]);
        u.complete(&[(1, 2)]);
        assert!(u.unoffered(7, 0).is_empty());
        // Offered entries stay until confirmed or completed, and leave no trace.
        assert_eq!(u.len(), 2);
        assert!(!u.confirm(&(1, 1), 4) && u.confirm(&(1, 1), 5));
        u.complete(&[(2, 1)]);
        assert!(u.is_empty() && u.unoffered(7, 0).is_empty() && u.unoffered(8, 0).is_empty());
        // Re-adding after an offer starts unoffered again.
        u.add((3, 1), unsettled(9, 0, 10));
        u.mark_offered(&(3, 1));
        u.add((3, 1), unsettled(9, 0, 10));
        assert_eq!(u.unoffered(9, 0), vec![(3, 1)]);
    }

    #[test]
    fn hurried_entries_come_before_a_backlog_of_due_ones() {
        // A caller passes on only the first few due entries per round. One a writer
        // waits for, late in key order behind many entries due by age, comes first.
        let mut u = UnsettledSet::new(1 << 20);
        for seq in 0..100 {
            u.add((1, seq), unsettled(7, 0, 10));
        }
        u.add((2, 1), unsettled(8, 5000, 10));
        u.hurry(&(2, 1));
        let due = u.due(5000, 2000);
        assert_eq!(due.len(), 101);
        assert_eq!(due[0], (2, 1), "the hurried entry first");
        assert_eq!(&due[1..3], &[(1, 0), (1, 1)], "then the rest in key order");
    }

    #[test]
    fn a_hurried_entry_is_due_at_once_even_early_in_the_callers_clock() {
        // The caller's clock is a node's uptime: 60 ms after start, well inside the
        // first `after_ms` (2 s).
        let mut u = UnsettledSet::new(1000);
        u.add((1, 1), unsettled(7, 50, 10));
        u.add((1, 2), unsettled(7, 55, 10));
        assert!(u.due(60, 2000).is_empty());
        u.hurry(&(1, 1));
        u.hurry(&(9, 9));
        assert_eq!(u.due(60, 2000), vec![(1, 1)], "hurried: due at once");
        assert_eq!(u.due(60, 2000), vec![(1, 1)], "until passed on");
        u.touch(&(1, 1), 61);
        assert!(
            u.due(62, 2000).is_empty(),
            "passed on: due only after_ms later"
        );
        assert_eq!(u.due(2061, 2000), vec![(1, 1), (1, 2)]);
        // Passed on twice (and never confirmed): worn out at two passes.
        assert!(u.worn_out(2).is_empty());
        u.touch(&(1, 1), 2061);
        assert_eq!(
            u.worn_out(2).into_iter().map(|w| w.0).collect::<Vec<_>>(),
            vec![(1, 1)]
        );
        assert!(u.get(&(1, 1)).is_none() && u.worn_out(1).is_empty());
        // A pinned entry (a kept update) is never worn out; removed, it is unpinned.
        u.pin(&(1, 2));
        for t in 0..5 {
            u.touch(&(1, 2), 3000 + t);
        }
        assert!(u.worn_out(2).is_empty(), "pinned");
        u.complete(&[(1, 2)]);
        u.add((1, 2), unsettled(7, 55, 10));
        u.touch(&(1, 2), 5000);
        assert_eq!(
            u.worn_out(1).len(),
            1,
            "a new entry under the key is not pinned"
        );
        u.add((1, 1), unsettled(7, 50, 10));
        // Hurried again, then completed: nothing is left of it.
        u.hurry(&(1, 1));
        u.complete(&[(1, 1)]);
        assert!(u.due(62, 2000).is_empty());
        u.add((1, 1), unsettled(7, 70, 10));
        assert!(u.due(80, 2000).is_empty(), "a new entry is not hurried");
    }

    #[test]
    fn an_idle_client_is_forgotten_not_fenced() {
        let mut t = LockGroup::new();
        t.renew(5, LEASE, 0).unwrap();
        assert_eq!(t.expired(LEASE), vec![5]);
        assert!(!t.holds_any(5));
        t.forget(5);
        assert!(t.expired(10 * LEASE).is_empty());
        assert_eq!(t.lock(1, &[0], h(50, 5), LEASE, 10 * LEASE), Ok(()));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Lock(StripeId, Vec<u8>, ClientId),
        Unlock(StripeId, Vec<u8>, ClientId),
        Tick(u64),
        Heartbeat(ClientId),
    }

    fn op() -> impl Strategy<Value = Op> {
        let idx = proptest::collection::vec(0u8..4, 1..4);
        prop_oneof![
            (0u64..3, idx.clone(), 0u64..4).prop_map(|(s, i, c)| Op::Lock(s, i, c)),
            (0u64..3, idx, 0u64..4).prop_map(|(s, i, c)| Op::Unlock(s, i, c)),
            (1u64..700).prop_map(Op::Tick),
            (0u64..4).prop_map(Op::Heartbeat),
        ]
    }

    proptest! {
        /// Against a model, with leases: a lock is granted iff no block is held by
        /// another owner and the client is not fenced; at most one owner per block;
        /// a fenced client never gets a lock or an update through again; an expired
        /// client's locks are gone once released.
        #[test]
        fn matches_model(ops in proptest::collection::vec(op(), 0..200)) {
            let mut t = LockGroup::new();
            let mut model: BTreeMap<(StripeId, u8), (ClientId, ClientId)> = BTreeMap::new();
            let mut fenced: BTreeSet<ClientId> = BTreeSet::new();
            let mut now = 0u64;
            // One owner per client per stripe in this model: owner = client * 10 + stripe.
            for op in ops {
                match op {
                    Op::Lock(s, idx, c) => {
                        let owner = c * 10 + s;
                        let free = idx.iter().all(|i| model.get(&(s, *i)).is_none_or(|h| h.0 == owner));
                        let got = t.lock(s, &idx, h(owner, c), LEASE, now);
                        prop_assert_eq!(got.is_ok(), free && !fenced.contains(&c));
                        if got.is_ok() {
                            for i in idx { model.insert((s, i), (owner, c)); }
                        }
                    }
                    Op::Unlock(s, idx, c) => {
                        let owner = c * 10 + s;
                        let mut n = 0;
                        for i in &idx {
                            if model.get(&(s, *i)).is_some_and(|h| h.0 == owner) { model.remove(&(s, *i)); n += 1; }
                        }
                        prop_assert_eq!(t.unlock(s, &idx, owner), n);
                    }
                    Op::Heartbeat(c) => {
                        prop_assert_eq!(t.renew(c, LEASE, now).is_ok(), !fenced.contains(&c));
                    }
                    Op::Tick(d) => {
                        now += d;
                        for c in t.expired(now) {
                            if t.holds_any(c) {
                                t.fence(c, now);
                                fenced.insert(c);
                                t.release_client(c);
                                model.retain(|_, h| h.1 != c);
                            } else {
                                t.forget(c);
                            }
                        }
                    }
                }
                let actual: BTreeMap<(StripeId, u8), (ClientId, ClientId)> = t.iter().map(|(s, i, l)| ((s, i), (l.owner, l.client))).collect();
                prop_assert_eq!(&actual, &model);
                for c in &fenced {
                    prop_assert!(t.lock(99, &[0], h(999, *c), LEASE, now).is_err());
                }
            }
        }
    }
}
