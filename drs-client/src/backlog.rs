//! Unlocks on their way, and those that could not be delivered, kept and retried in
//! the background.
//!
//! A release does not wait for the members' answers: its unlocks are queued here as
//! *on their way*, handed to each member's connection, and answered in a background
//! task ([`Client::release`]). One a member does not acknowledge stays queued.
//!
//! A member that did not answer a lock may still grant it later (it was slow or
//! paused), and a member that missed an update must learn the versions given out so it
//! knows it is behind (it then rebuilds the block instead of serving stale bytes). So
//! every unlock or update-and-unlock a member did not acknowledge is queued here, per
//! (node, stripe, lock owner), merged (highest version per block), and sent again whenever the
//! node is not in its reconnect backoff, until it is acknowledged or has waited
//! `GIVE_UP`. The queue is bounded; beyond `MAX_ENTRIES` the oldest are dropped
//! (with a warning): the node's periodic comparison with its stripes still finds
//! missed updates, only later.
//!
//! An unlock names the lock owner, and an owner may lock the same blocks again: a
//! write retries its lock attempts under one owner, and a cache uses one owner for
//! all its locks. So an unlock still queued for (node, stripe, owner) must reach the
//! node *before* that owner's next lock there, or it would release the new lock.
//! [`Client::deliver_unlocks`] does that before every lock request: it waits for a
//! delivery already on its way, and sends what is queued; the lock is sent (on the
//! same connection, so the node takes them in that order) only once the node has
//! answered it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use drs_proto::{ClientId, NodeId, Request, StripeId, UnlockReq, Version};

use crate::error::CallError;
use crate::Client;

const MAX_ENTRIES: usize = 100_000;
const GIVE_UP: Duration = Duration::from_secs(600);
const ROUND: Duration = Duration::from_millis(250);

/// (node, stripe, lock owner).
type Key = (NodeId, StripeId, ClientId);

struct Entry {
    blocks: Vec<(u8, Version)>,
    since: Instant,
}

#[derive(Default)]
struct Queue {
    entries: BTreeMap<Key, Entry>,
    /// Entries whose delivery is on its way (sent, not answered).
    sending: BTreeSet<Key>,
}

#[derive(Default)]
pub(crate) struct Backlog {
    queue: Mutex<Queue>,
    running: AtomicBool,
    /// Woken whenever a delivery on its way ends.
    ended: tokio::sync::Notify,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An unlock on its way (see [`Client::begin_unlock`]): dropped, it ends the
/// delivery, as acknowledged if `delivered` was set, else left queued. So a release
/// dropped half-way (an operation's timeout) leaves no key marked on its way for ever.
pub(crate) struct OnItsWay {
    pub(crate) client: Client,
    pub(crate) key: Key,
    pub(crate) blocks: Vec<(u8, Version)>,
    pub(crate) delivered: bool,
}

impl Drop for OnItsWay {
    fn drop(&mut self) {
        self.client
            .end_unlock(self.key, &self.blocks, self.delivered);
    }
}

/// Merges `blocks` into the entry for `key` (highest version per block); beyond
/// `MAX_ENTRIES`, the oldest entry is dropped.
fn merge(q: &mut Queue, key: Key, blocks: &[(u8, Version)]) {
    let e = &mut q.entries;
    let entry = e.entry(key).or_insert_with(|| Entry {
        blocks: Vec::new(),
        since: Instant::now(),
    });
    for &(i, v) in blocks {
        match entry.blocks.iter_mut().find(|(j, _)| *j == i) {
            Some(b) => b.1 = b.1.max(v),
            None => entry.blocks.push((i, v)),
        }
    }
    while e.len() > MAX_ENTRIES {
        let oldest = e
            .iter()
            .filter(|(k, _)| **k != key)
            .min_by_key(|(_, v)| v.since)
            .map(|(k, _)| *k);
        if let Some(k) = oldest {
            tracing::warn!(
                node = k.0,
                stripe = k.1,
                "unlock backlog full; dropping the oldest entry"
            );
            e.remove(&k);
        }
    }
}

impl Backlog {
    pub(crate) fn len(&self) -> usize {
        lock(&self.queue).entries.len()
    }
}

impl Client {
    /// The `Unlock` of `owner`'s locks on `blocks` of `stripe`, recording the
    /// versions given out.
    pub(crate) fn unlock_request(
        &self,
        stripe: StripeId,
        owner: ClientId,
        blocks: Vec<(u8, Version)>,
    ) -> Request {
        Request::Unlock(UnlockReq {
            volume: self.inner.volume.id,
            stripe,
            owner,
            blocks,
        })
    }

    /// Queues an unlock of `blocks` at `node` for background delivery.
    pub(crate) fn defer_unlock(
        &self,
        node: NodeId,
        stripe: StripeId,
        owner: ClientId,
        blocks: Vec<(u8, Version)>,
    ) {
        merge(
            &mut lock(&self.inner.backlog.queue),
            (node, stripe, owner),
            &blocks,
        );
        self.start_draining();
    }

    fn start_draining(&self) {
        let backlog = &self.inner.backlog;
        if !backlog.running.swap(true, Ordering::AcqRel) {
            // Outside a runtime (a guard dropped as the program ends) there is no one
            // to drain: the next caller inside one starts it.
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    let me = self.clone();
                    rt.spawn(async move { me.drain_backlog().await });
                }
                Err(_) => backlog.running.store(false, Ordering::Release),
            }
        }
    }

    /// Queues an unlock that the caller is about to send itself, marked as on its
    /// way, and returns what to send: `blocks` merged with anything queued for the
    /// key. None if another delivery for the key is on its way: the blocks are
    /// merged into the entry, which that one leaves queued, and the caller sends
    /// nothing.
    pub(crate) fn begin_unlock(
        &self,
        key: Key,
        blocks: &[(u8, Version)],
    ) -> Option<Vec<(u8, Version)>> {
        let mut q = lock(&self.inner.backlog.queue);
        merge(&mut q, key, blocks);
        if q.sending.insert(key) {
            // `merge` never drops the entry it merged into.
            let blocks = q.entries.get(&key).map(|e| e.blocks.clone());
            if blocks.is_none() {
                q.sending.remove(&key);
            }
            return blocks;
        }
        drop(q);
        self.start_draining();
        None
    }

    /// A delivery of `blocks` on its way ended (`delivered`: the node acknowledged
    /// it). Removes the entry unless something newer was merged in meanwhile; one
    /// not delivered stays queued for the background.
    pub(crate) fn end_unlock(&self, key: Key, blocks: &[(u8, Version)], delivered: bool) {
        let (node, stripe, owner) = key;
        if delivered {
            self.note_unlocked(node, stripe, owner);
        }
        let backlog = &self.inner.backlog;
        let left = {
            let mut q = lock(&backlog.queue);
            q.sending.remove(&key);
            if delivered && q.entries.get(&key).is_some_and(|x| x.blocks == blocks) {
                q.entries.remove(&key);
            }
            q.entries.contains_key(&key)
        };
        backlog.ended.notify_waiters();
        if left {
            self.start_draining();
        }
    }

    /// Nodes with unlocks still to deliver (the client keeps its lease there alive).
    pub(crate) fn backlog_nodes(&self) -> BTreeSet<NodeId> {
        lock(&self.inner.backlog.queue)
            .entries
            .keys()
            .map(|k| k.0)
            .collect()
    }

    /// Delivers the unlocks still queued for `owner`'s locks on `stripe` at `node`,
    /// and waits for one already on its way; called before that owner locks there
    /// again. An error: they could not be delivered now (they stay queued), and the
    /// lock must not be sent to that node.
    pub(crate) async fn deliver_unlocks(
        &self,
        node: NodeId,
        stripe: StripeId,
        owner: ClientId,
    ) -> Result<(), CallError> {
        let backlog = &self.inner.backlog;
        let key = (node, stripe, owner);
        // A delivery on its way ends within a request's time.
        let patience = Instant::now() + self.inner.cfg.request_timeout + ROUND;
        loop {
            // Registered before looking, so an end between the look and the wait
            // is not missed.
            let ended = backlog.ended.notified();
            let blocks = {
                let mut q = lock(&backlog.queue);
                if q.sending.contains(&key) {
                    None
                } else {
                    match q.entries.get(&key) {
                        None => return Ok(()),
                        Some(e) => {
                            let blocks = e.blocks.clone();
                            q.sending.insert(key);
                            Some(blocks)
                        }
                    }
                }
            };
            let Some(blocks) = blocks else {
                if Instant::now() >= patience {
                    return Err(CallError::Unreachable(
                        "an earlier unlock of this lock owner is still on its way".into(),
                    ));
                }
                let _ = tokio::time::timeout_at(patience.into(), ended).await;
                continue;
            };
            let r = self.send_unlock(key, blocks).await;
            r?;
        }
    }

    /// Sends one queued unlock (marked as on its way by the caller); removes it once
    /// answered, unless something newer was merged in meanwhile.
    async fn send_unlock(&self, key: Key, blocks: Vec<(u8, Version)>) -> Result<(), CallError> {
        let (node, stripe, owner) = key;
        let req = self.unlock_request(stripe, owner, blocks.clone());
        let r = self.call(node, &req, Bytes::new()).await.map(|_| ());
        self.end_unlock(key, &blocks, r.is_ok());
        r
    }

    /// Undelivered unlocks waiting in the background.
    pub fn pending_unlocks(&self) -> usize {
        self.inner.backlog.len()
    }

    /// Waits up to `max` for the background unlocks to be delivered; a program about
    /// to exit calls this so it leaves no lock behind at a node that was slow to
    /// answer. Returns how many are still undelivered.
    pub async fn settle_unlocks(&self, max: Duration) -> usize {
        let until = Instant::now() + max;
        loop {
            let left = self.pending_unlocks();
            if left == 0 || Instant::now() >= until {
                return left;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn drain_backlog(&self) {
        let backlog = &self.inner.backlog;
        loop {
            tokio::time::sleep(ROUND).await;
            let now = Instant::now();
            let due: Vec<Key> = {
                let mut q = lock(&backlog.queue);
                let Queue { entries, sending } = &mut *q;
                entries.retain(|k, v| {
                    // Not one on its way: its sender removes it when answered.
                    let keep = now.duration_since(v.since) < GIVE_UP || sending.contains(k);
                    if !keep {
                        tracing::warn!(node = k.0, stripe = k.1, "giving up delivering an unlock");
                    }
                    keep
                });
                entries
                    .keys()
                    .filter(|k| !self.is_down(k.0) && !sending.contains(k))
                    .copied()
                    .collect()
            };
            for key in due {
                let blocks = {
                    let mut q = lock(&backlog.queue);
                    // A lock of the same owner may have delivered it meanwhile.
                    let Some(e) = q.entries.get(&key) else {
                        continue;
                    };
                    if q.sending.contains(&key) {
                        continue;
                    }
                    let blocks = e.blocks.clone();
                    q.sending.insert(key);
                    blocks
                };
                let _ = self.send_unlock(key, blocks).await;
            }
            let q = lock(&backlog.queue);
            if q.entries.is_empty() {
                backlog.running.store(false, Ordering::Release);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Against fake nodes ([`crate::fakenode`]).

    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::fakenode::{self, lock};
    use crate::ClientConfig;

    #[tokio::test]
    async fn a_queued_unlock_reaches_the_node_before_the_same_owners_next_lock() {
        // A release unlock of owner O at node 2 got no answer and is queued. O locks
        // the stripe again (a retry, or a cache locking another block of it). The
        // queued unlock must not release the new lock when the backlog delivers it.
        let (map, fakes) = fakenode::cluster(false).await;
        let client = Client::new(map, 1, ClientConfig::default()).unwrap();
        let owner = 0x0E;
        let node = client.geometry().member(0, 2);
        client.defer_unlock(node, 0, owner, vec![(0, 0)]);
        let locked = client.lock_stripe(0, &[(0, 0, 0)], owner).await.unwrap();
        assert_eq!(locked.live(), 3);
        // Past several rounds of the backlog.
        tokio::time::sleep(ROUND * 3).await;
        assert_eq!(client.pending_unlocks(), 0);
        for (p, f) in fakes.iter().enumerate() {
            assert_eq!(
                lock(&f.table).get(&(0, 0)),
                Some(&owner),
                "the lock at position {p} was released by the queued unlock"
            );
        }
        client.unlock_stripe(&locked).await;
        assert_eq!(client.settle_unlocks(Duration::from_secs(5)).await, 0);
        assert!(fakes.iter().all(|f| lock(&f.table).is_empty()));
    }

    #[tokio::test]
    async fn a_release_does_not_wait_for_the_answers() {
        // Node 2 stops answering unlocks (it answers the rest, so it is not taken as
        // hung): an unlock that waited for its answer would take the whole request
        // timeout.
        let (map, fakes) = fakenode::cluster(false).await;
        let cfg = ClientConfig {
            request_timeout: Duration::from_secs(6),
            ..ClientConfig::default()
        };
        let client = Client::new(map, 1, cfg).unwrap();
        let owner = 0x0F;
        let locked = client.lock_stripe(0, &[(0, 0, 0)], owner).await.unwrap();
        let slow = client.geometry().member(0, 2) as usize;
        fakes[slow].drop_unlocks.store(true, Ordering::Relaxed);
        tokio::time::timeout(Duration::from_secs(2), client.unlock_stripe(&locked))
            .await
            .expect("the release waited for a member's answer");
        // The others answer in the background; node 2's unlock stays queued until
        // it is acknowledged.
        tokio::time::sleep(ROUND).await;
        assert_eq!(client.pending_unlocks(), 1);
        for (n, f) in fakes.iter().enumerate() {
            assert_eq!(lock(&f.table).is_empty(), n != slow, "node {n}");
        }
        fakes[slow].drop_unlocks.store(false, Ordering::Relaxed);
        assert_eq!(client.settle_unlocks(Duration::from_secs(10)).await, 0);
        assert!(lock(&fakes[slow].table).is_empty());
    }

    #[tokio::test]
    async fn a_release_dropped_half_way_leaves_its_unlocks_to_the_backlog() {
        // A release given up before its unlocks were handed over (an operation's
        // timeout): they must still be delivered, not left marked on their way.
        let (map, fakes) = fakenode::cluster(false).await;
        let holder = Client::new(map.clone(), 1, ClientConfig::default()).unwrap();
        let owner = 0x11;
        let locked = holder.lock_stripe(0, &[(0, 0, 0)], owner).await.unwrap();
        // A second client of the owner has no connection yet: its first poll waits
        // for the connections, and the release is dropped there.
        let other = Client::new(map, 1, ClientConfig::default()).unwrap();
        assert!(futures::FutureExt::now_or_never(other.unlock_stripe(&locked)).is_none());
        assert_eq!(other.pending_unlocks(), 3);
        assert_eq!(other.settle_unlocks(Duration::from_secs(5)).await, 0);
        assert!(fakes.iter().all(|f| lock(&f.table).is_empty()));
    }

    #[tokio::test]
    async fn the_same_owner_locks_again_right_after_a_release() {
        // The unlocks' answers are still on their way when the owner locks the
        // same blocks again: the new lock must hold at every member afterwards.
        let (map, fakes) = fakenode::cluster(false).await;
        let client = Client::new(map, 1, ClientConfig::default()).unwrap();
        let owner = 0x10;
        for _ in 0..20 {
            let locked = client.lock_stripe(0, &[(0, 0, 0)], owner).await.unwrap();
            client.unlock_stripe(&locked).await;
        }
        let locked = client.lock_stripe(0, &[(0, 0, 0)], owner).await.unwrap();
        assert_eq!(locked.live(), 3);
        assert_eq!(client.settle_unlocks(Duration::from_secs(5)).await, 0);
        for (p, f) in fakes.iter().enumerate() {
            assert_eq!(lock(&f.table).get(&(0, 0)), Some(&owner), "position {p}");
        }
    }
}
