//! Cache groups at a node (report 5.3.3, 5.5; DESIGN-NOTES R9, I2).
//!
//! A client with a cache group keeps a copy of every cached block's pending change
//! (its running total, with the lock it was made under: owner, version, update id,
//! granted members) at N nodes before it acknowledges a write. This module is one
//! member of such groups: it keeps the copies ([`Copies`]), newest `seq` winning, and
//! drops them when the client wrote them back itself.
//!
//! If the client's lease runs out here while copies remain, the members write the
//! cache back in its place ([`write_back`]): the first member of the group at once,
//! the next ones only later and only if the copies are still there. The writer first
//! gathers the copies of every reachable member and keeps the newest of each block,
//! then sends each block's update, marked `on_behalf`, under the client's own lock
//! and update id to the members that granted it, with update-and-unlock, and finally
//! tells every member to drop the copies. The stripes' nodes keep a fenced client's
//! locks while it has a cache group (for a bounded time) so that this write-back
//! happens before anyone else can lock the blocks. Writing back twice is harmless:
//! the update ids are the client's, so nodes take each one once.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use drs_client::{CallError, Client};
use drs_proto::{
    CacheCopies, CacheDropReq, CacheGetReq, CachePutReq, ClientId, NodeId, Request, Response,
    UnlockReq, UpdateReq, VolumeId, WireError,
};

use crate::node::Node;

/// How long each member after the first waits before writing back in its turn.
pub const TURN: Duration = Duration::from_secs(1);
/// How long the stripes' nodes keep a fenced client's locks for its cache group to
/// write its cache back (plus a [`TURN`] per member of the group) when no member of
/// the group that answers still keeps copies (the others do not answer).
pub const WRITE_BACK_WAIT: Duration = Duration::from_secs(5);
/// How long they keep them while a member that answers still keeps copies (it is
/// writing them back, or its turn has not come): a slow group loses nothing.
pub const WRITE_BACK_WAIT_HOLDING: Duration = Duration::from_secs(60);

/// The copies kept for one client.
#[derive(Debug, Default)]
struct ClientCopies {
    blocks: BTreeMap<(VolumeId, u64), (CachePutReq, Bytes)>,
}

/// Every client's copies at this node, bounded in bytes.
#[derive(Debug)]
pub struct Copies {
    clients: HashMap<ClientId, ClientCopies>,
    bytes: usize,
    max_bytes: usize,
}

impl Copies {
    pub fn new(max_bytes: usize) -> Copies {
        Copies {
            clients: HashMap::new(),
            bytes: 0,
            max_bytes,
        }
    }

    /// Keeps a copy (a newer one of the same block replaces the older).
    pub fn put(&mut self, req: CachePutReq, payload: Bytes) -> Result<(), WireError> {
        if payload.len() != req.update.len as usize {
            return Err(WireError::BadRange {
                offset: req.update.offset,
                len: payload.len() as u32,
                block_size: 0,
            });
        }
        let c = self.clients.entry(req.client).or_default();
        let key = (req.volume, req.lba);
        let old = c.blocks.get(&key).map(|(r, p)| (r.seq, p.len()));
        if old.is_some_and(|(seq, _)| seq >= req.seq) {
            // An older put arriving late.
            return Ok(());
        }
        let freed = old.map_or(0, |(_, n)| n);
        if self.bytes - freed + payload.len() > self.max_bytes {
            return Err(WireError::Busy);
        }
        self.bytes = self.bytes - freed + payload.len();
        c.blocks.insert(key, (req, payload));
        Ok(())
    }

    pub fn drop_blocks(&mut self, volume: VolumeId, client: ClientId, lbas: &[u64]) {
        if let Some(c) = self.clients.get_mut(&client) {
            for lba in lbas {
                if let Some((_, p)) = c.blocks.remove(&(volume, *lba)) {
                    self.bytes -= p.len();
                }
            }
            if c.blocks.is_empty() {
                self.clients.remove(&client);
            }
        }
    }

    /// The copies kept for `client` in `volume`.
    pub fn get(&self, volume: VolumeId, client: ClientId) -> Vec<(CachePutReq, Bytes)> {
        self.page(volume, client, 0, usize::MAX, usize::MAX).0
    }

    /// The copies kept for `client` in `volume` of blocks from `from_lba` on, in block
    /// order, as many as fit in `payload` bytes of copies and `ctrl` bytes of their
    /// encoded requests (at least one), and the block the next page starts at.
    pub fn page(
        &self,
        volume: VolumeId,
        client: ClientId,
        from_lba: u64,
        payload: usize,
        ctrl: usize,
    ) -> (Vec<(CachePutReq, Bytes)>, Option<u64>) {
        let Some(c) = self.clients.get(&client) else {
            return (Vec::new(), None);
        };
        let range = || c.blocks.range((volume, from_lba)..=(volume, u64::MAX));
        let fit = drs_proto::frame::fitting(range().map(|(_, (r, _))| r), ctrl);
        let (mut out, mut bytes) = (Vec::new(), 0usize);
        for ((_, lba), (r, p)) in range() {
            bytes = bytes.saturating_add(p.len());
            if !out.is_empty() && (bytes > payload || out.len() == fit) {
                return (out, Some(*lba));
            }
            out.push((r.clone(), p.clone()));
        }
        (out, None)
    }

    pub fn holds(&self, client: ClientId) -> bool {
        self.clients.contains_key(&client)
    }

    /// The group the client named with its copies here.
    pub fn group(&self, client: ClientId) -> Vec<NodeId> {
        self.clients
            .get(&client)
            .and_then(|c| c.blocks.values().next())
            .map(|(r, _)| r.group.clone())
            .unwrap_or_default()
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Answers the cache-group requests.
pub fn handle(node: &Node, req: Request, payload: Bytes) -> Result<(Response, Bytes), WireError> {
    match req {
        Request::CachePut(r) => {
            // Keeping copies for a client keeps its lease alive here.
            let now = node.now_ms();
            if let Some(v) = node.volumes.get(&r.volume) {
                lock(&v.locks)
                    .renew(r.client, r.lease_ms as u64, now)
                    .map_err(|_| WireError::Fenced { client: r.client })?;
            } else {
                return Err(WireError::UnknownVolume { volume: r.volume });
            }
            lock(&node.copies).put(r, payload)?;
            Ok((Response::CacheStored, Bytes::new()))
        }
        Request::CacheDrop(r) => {
            lock(&node.copies).drop_blocks(r.volume, r.client, &r.lbas);
            Ok((Response::CacheStored, Bytes::new()))
        }
        Request::CacheGet(r) => {
            let (copies, next) = lock(&node.copies).page(
                r.volume,
                r.client,
                r.from_lba,
                PAGE_BYTES,
                drs_proto::frame::CTRL_PAGE_BUDGET,
            );
            let mut out = BytesMut::new();
            for (_, p) in &copies {
                out.extend_from_slice(p);
            }
            Ok((
                Response::CacheCopies(CacheCopies {
                    copies: copies.into_iter().map(|(r, _)| r).collect(),
                    next,
                }),
                out.freeze(),
            ))
        }
        _ => Err(WireError::Invalid {
            what: drs_proto::error::InvalidReason::Unexpected,
        }),
    }
}

/// Bytes of copies in one `CacheGet` page (well within a frame's payload).
const PAGE_BYTES: usize = 4 << 20;

/// Every copy `member` keeps for `client` in `vid`, page by page: as many as came
/// whole (a page that did not come, or came short, ends the gathering there, logged).
async fn fetch_copies(
    peer: &Client,
    member: NodeId,
    vid: VolumeId,
    client: ClientId,
) -> Vec<(CachePutReq, Bytes)> {
    let mut out = Vec::new();
    let mut from_lba = 0;
    loop {
        let req = Request::CacheGet(CacheGetReq {
            volume: vid,
            client,
            from_lba,
        });
        let (c, payload) = match peer.call(member, &req, Bytes::new()).await {
            Ok((Response::CacheCopies(c), payload)) => (c, payload),
            other => {
                tracing::warn!(
                    client,
                    node = member,
                    from_lba,
                    ?other,
                    "gathering a cache group member's copies stopped"
                );
                return out;
            }
        };
        let mut at = 0;
        for r in c.copies {
            let n = r.update.len as usize;
            if at + n > payload.len() {
                tracing::warn!(
                    client,
                    node = member,
                    lba = r.lba,
                    "a cache group member's copies came short"
                );
                return out;
            }
            let p = payload.slice(at..at + n);
            at += n;
            out.push((r, p));
        }
        match c.next {
            Some(n) if n > from_lba => from_lba = n,
            _ => return out,
        }
    }
}

/// Where a dead client's cache group is with writing its cache back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupProgress {
    /// Every member answers that it keeps no copy for the client: the group wrote
    /// the cache back, or had nothing of it.
    Done,
    /// A member that answers still keeps copies: it writes them back in its turn.
    Holding,
    /// No member that answers keeps a copy, but some do not answer.
    Unreachable,
}

/// Asks every member of `group` whether it keeps copies for `client` in `vid`.
pub async fn group_progress(
    peer: &Client,
    vid: VolumeId,
    client: ClientId,
    group: &[NodeId],
) -> GroupProgress {
    // The first page is empty only when there is no copy at all.
    let req = Request::CacheGet(CacheGetReq {
        volume: vid,
        client,
        from_lba: 0,
    });
    let mut silent = false;
    for member in group {
        match peer.call(*member, &req, Bytes::new()).await {
            Ok((Response::CacheCopies(c), _)) if c.copies.is_empty() => {}
            Ok((Response::CacheCopies(_), _)) => return GroupProgress::Holding,
            _ => silent = true,
        }
    }
    if silent {
        GroupProgress::Unreachable
    } else {
        GroupProgress::Done
    }
}

/// Writes a dead client's cache back (see the module docs).
pub async fn write_back(node: &Node, peer: &Client, vid: VolumeId, client: ClientId) {
    let group = lock(&node.copies).group(client);
    let rank = group
        .iter()
        .position(|n| *n == node.cfg.node)
        .unwrap_or(group.len());
    if rank > 0 {
        tokio::time::sleep(TURN * rank as u32).await;
    }
    let mine = lock(&node.copies).get(vid, client);
    if mine.is_empty() {
        return; // An earlier member wrote it back.
    }
    // The newest copy of each block, over every reachable member.
    let mut newest: BTreeMap<u64, (CachePutReq, Bytes)> = BTreeMap::new();
    let mut consider = |r: CachePutReq, p: Bytes| {
        if newest.get(&r.lba).is_none_or(|(o, _)| o.seq < r.seq) {
            newest.insert(r.lba, (r, p));
        }
    };
    for (r, p) in mine {
        consider(r, p);
    }
    for member in group.iter().filter(|n| **n != node.cfg.node) {
        for (r, p) in fetch_copies(peer, *member, vid, client).await {
            consider(r, p);
        }
    }
    let Some(vol) = node.volumes.get(&vid) else {
        return;
    };
    let geo = vol.store.geometry().clone();
    // A block is done once a member took its update (relays bring it to the rest) or
    // every member that answered no longer holds the lock (the client's own
    // write-back got there first); only a block no member answered for is left to
    // the next member of the group.
    let mut done = Vec::new();
    let mut took = 0u64;
    for (lba, (r, delta)) in newest {
        let sends = r.granted.iter().map(|&p| {
            let target = geo.member(r.stripe, p as usize);
            let carries = (p as usize) >= geo.k || p == r.update.index;
            let req = if carries {
                Request::Update(UpdateReq {
                    volume: vid,
                    stripe: r.stripe,
                    position: p,
                    owner: r.owner,
                    updates: vec![r.update],
                    unlock: r.unlock.clone(),
                    relay: false,
                    on_behalf: true,
                    completed: Vec::new(),
                    // The block's data node did not grant: the parity members keep it.
                    keep: if (p as usize) >= geo.k && !r.granted.contains(&r.update.index) {
                        vec![r.update.index]
                    } else {
                        Vec::new()
                    },
                })
            } else {
                Request::Unlock(UnlockReq {
                    volume: vid,
                    stripe: r.stripe,
                    owner: r.owner,
                    blocks: r.unlock.clone(),
                })
            };
            let payload = if carries { delta.clone() } else { Bytes::new() };
            async move { (target, peer.call(target, &req, payload).await) }
        });
        let (mut answered, mut applied) = (false, false);
        for (target, res) in futures::future::join_all(sends).await {
            match res {
                Ok((Response::Updated(u), _)) if u.results.iter().all(|x| x.is_ok()) => {
                    answered = true;
                    applied = true;
                }
                Ok((Response::Unlocked, _)) => answered = true,
                Err(CallError::Remote(e)) => {
                    answered = true;
                    tracing::debug!(client, lba, node = target, error = %e, "a member refused a cache write-back (its lock is gone)");
                }
                other => {
                    tracing::warn!(
                        client,
                        lba,
                        node = target,
                        ?other,
                        "cache write-back to a member failed"
                    );
                }
            }
        }
        took += u64::from(applied);
        if answered {
            done.push(lba);
        }
    }
    node.aon.written_back.fetch_add(took, Ordering::Relaxed);
    tracing::info!(
        client,
        blocks = took,
        "wrote a dead client's cache back for it"
    );
    let written = done;
    for member in &group {
        // In requests that fit a frame's control section (an lba takes at most 10
        // bytes).
        for lbas in written.chunks(DROP_PER_REQUEST) {
            let req = Request::CacheDrop(CacheDropReq {
                volume: vid,
                client,
                lbas: lbas.to_vec(),
            });
            if let Err(e) = peer.call(*member, &req, Bytes::new()).await {
                tracing::debug!(client, node = *member, error = %e, "dropping written-back copies failed");
            }
        }
    }
}

/// Blocks named in one `CacheDrop`.
const DROP_PER_REQUEST: usize = 4096;

#[cfg(test)]
mod tests {
    use super::*;
    use drs_proto::{BlockUpdate, UpdateId};

    fn put(lba: u64, seq: u64, len: u32) -> CachePutReq {
        CachePutReq {
            volume: 1,
            client: 9,
            lba,
            stripe: lba / 4,
            update: BlockUpdate {
                id: UpdateId { client: 9, seq },
                index: (lba % 4) as u8,
                version: 2,
                base: 1,
                offset: 0,
                len,
            },
            owner: 90,
            granted: vec![0, 1, 2, 3, 4, 5],
            unlock: vec![((lba % 4) as u8, 2)],
            seq,
            group: vec![1, 2],
            lease_ms: 1000,
        }
    }

    #[test]
    fn newest_copy_wins_and_drop_forgets() {
        let mut c = Copies::new(100);
        c.put(put(5, 2, 4), Bytes::from_static(b"bbbb")).unwrap();
        c.put(put(5, 1, 4), Bytes::from_static(b"aaaa")).unwrap();
        let got = c.get(1, 9);
        assert_eq!(got.len(), 1);
        assert_eq!(
            got[0].1,
            Bytes::from_static(b"bbbb"),
            "an older put arriving late changes nothing"
        );
        assert_eq!(c.group(9), vec![1, 2]);
        c.drop_blocks(1, 9, &[5]);
        assert!(!c.holds(9));
        assert!(
            c.put(put(6, 1, 4), Bytes::from(vec![0; 200])).is_err(),
            "the payload must match the update"
        );
    }

    #[test]
    fn pages_keep_to_their_volume_and_budgets() {
        let mut c = Copies::new(1000);
        for lba in 0..10 {
            c.put(put(lba, 1, 10), Bytes::from(vec![lba as u8; 10]))
                .unwrap();
        }
        let mut other = put(3, 1, 10);
        other.volume = 2;
        c.put(other, Bytes::from(vec![9; 10])).unwrap();
        // 25 bytes of copies a page: two copies.
        let (page, next) = c.page(1, 9, 4, 25, usize::MAX);
        assert_eq!(page.iter().map(|(r, _)| r.lba).collect::<Vec<_>>(), [4, 5]);
        assert_eq!(next, Some(6));
        let (page, next) = c.page(1, 9, 8, 25, usize::MAX);
        assert_eq!(page.len(), 2);
        assert_eq!(next, None, "the other volume's copy is not a next page");
        // A budget below one copy still moves on.
        let (page, next) = c.page(1, 9, 0, 1, 1);
        assert_eq!((page.len(), next), (1, Some(1)));
        let (page, _) = c.page(2, 9, 0, usize::MAX, usize::MAX);
        assert_eq!(page.len(), 1);
        assert_eq!(page[0].1, Bytes::from(vec![9; 10]));
    }

    #[test]
    fn the_budget_is_kept() {
        let mut c = Copies::new(10);
        c.put(put(1, 1, 8), Bytes::from(vec![1; 8])).unwrap();
        assert_eq!(
            c.put(put(2, 1, 8), Bytes::from(vec![1; 8])),
            Err(WireError::Busy)
        );
        c.put(put(1, 2, 4), Bytes::from(vec![2; 4])).unwrap();
        c.put(put(2, 1, 4), Bytes::from(vec![1; 4])).unwrap();
    }
}
