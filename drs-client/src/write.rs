//! Writes: lock, old bytes, delta, update-and-unlock (report 5.3.1-5.3.3, 5.6;
//! DESIGN-NOTES R3, R6, R7, R11).
//!
//! 1. **Lock** the written data blocks at every member of the stripe, for a fresh
//!    owner id, renewing this client's lease there. The data node of each block also
//!    returns the range being written (lock-and-read). If any member says another
//!    owner holds a block, release what was granted, back off (randomised, growing)
//!    and retry until `lock_timeout`. Each block's update is built on the highest
//!    version any member knows (its *base*) and takes the block past that and past
//!    any version a fenced holder may have given out unseen (which is void).
//! 2. **Old bytes**: from lock-and-read; zeros for a block never written (version 0);
//!    or, if the data node is down, decoded from the rest of the stripe (still under
//!    the lock, so no other client changes the block meanwhile).
//! 3. **Delta**: old XOR new, over the written range only (sub-block deltas, 5.6).
//! 4. **Update-and-unlock** to every member that granted the lock, in parallel, one
//!    message each: the data node gets its block's update; each parity node gets every
//!    written block's update (the same deltas, which it scales itself); the other data
//!    nodes get an unlock. Each update names one data block, so any member holding it
//!    can pass it on to one that lacks it (all-or-nothing, see `docs/PROTOCOL.md`).
//! 5. **Keep**: a written block whose data node did not take its update has its
//!    only copies at the parity members, which keep it durably over a restart:
//!    named in `keep` if the data node did not grant, asked again by a relay naming
//!    it if it granted and failed (docs/PROTOCOL.md 9.2).
//! 6. **Acknowledge** when every member that granted the lock holds the updates
//!    durably and at least `min_write` members answered; otherwise fail with
//!    `NotDurable`. An update every member that must hold it (its data node and
//!    every parity node) acknowledged is *complete*; those members hear it with the
//!    client's next message to them. One that a member lacks is not: the members
//!    holding it pass it on themselves.
//!
//! A member that did not take its part (it was down, or failed) is told later, in the
//! background, the versions given out (an unlock with versions): it then knows it
//! missed an update and rebuilds the block from the stripe.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use drs_codec::Codec;
use drs_proto::{
    BlockUpdate, ClientId, LockRead, LockReq, NodeId, Request, Response, StripeId, UpdateId,
    UpdateReq, Version, WireError,
};
use futures::future::join_all;
use futures::stream::{self, StreamExt};
use rand::Rng;

/// How often a writer waiting for a block held in another client's cache asks that
/// cache to let it go (report 5.5).
const RELEASE_ASK_EVERY: Duration = Duration::from_millis(100);

use crate::backlog::OnItsWay;
use crate::error::{CallError, ClientError};
use crate::finish::{keep_in, Finish, Key, Leftover};
use crate::Client;

/// One block's part of a stripe write: `data` goes at `offset` of data block `index`.
#[derive(Debug, Clone)]
pub struct BlockWrite {
    pub index: usize,
    pub offset: usize,
    pub data: Bytes,
}

/// What lock-and-read gave for a block.
#[derive(Debug, Clone)]
enum Old {
    /// Bytes `[offset, offset + len)` of the block at the version before the one this
    /// write gives it.
    Range { offset: usize, data: Bytes },
    /// Never written: all zeros.
    Zero,
}

/// Locks held on some data blocks of a stripe.
#[derive(Debug, Clone)]
pub struct LockedStripe {
    pub stripe: StripeId,
    /// Who holds the locks: a fresh id per acquisition.
    pub owner: ClientId,
    /// The client identity the locks were taken under (its lease keeps them).
    pub client: ClientId,
    /// Which members granted the lock, by position.
    pub granted: Vec<bool>,
    /// (data index, the version the next update gives it).
    pub next: Vec<(u8, Version)>,
    /// (data index, the version the next update is built on: the block's bytes under
    /// the lock are at this version).
    pub base: Vec<(u8, Version)>,
    old: BTreeMap<u8, Old>,
    /// Update ids fixed in advance (a cache group holds copies under them).
    pub ids: BTreeMap<u8, UpdateId>,
}

impl LockedStripe {
    /// The version the next update gives block `index`.
    pub fn next_version(&self, index: usize) -> Option<Version> {
        self.next
            .iter()
            .find(|(i, _)| *i as usize == index)
            .map(|(_, v)| *v)
    }

    /// The version of block `index` under the lock (the next update's base).
    pub fn base_version(&self, index: usize) -> Option<Version> {
        self.base
            .iter()
            .find(|(i, _)| *i as usize == index)
            .map(|(_, v)| *v)
    }

    /// Members that granted the lock.
    pub fn live(&self) -> usize {
        self.granted.iter().filter(|g| **g).count()
    }

    /// One lock covering the blocks of several locks of one owner on the same stripe
    /// (a member counts as granting if it granted any of them: releasing a lock one
    /// does not hold is harmless).
    pub fn merge<'a>(
        stripe: StripeId,
        owner: ClientId,
        parts: impl IntoIterator<Item = &'a LockedStripe>,
    ) -> LockedStripe {
        let mut out = LockedStripe {
            stripe,
            owner,
            client: 0,
            granted: Vec::new(),
            next: Vec::new(),
            base: Vec::new(),
            old: BTreeMap::new(),
            ids: BTreeMap::new(),
        };
        for p in parts {
            debug_assert_eq!((p.stripe, p.owner), (stripe, owner));
            out.client = p.client;
            if out.granted.len() < p.granted.len() {
                out.granted.resize(p.granted.len(), false);
            }
            for (g, pg) in out.granted.iter_mut().zip(&p.granted) {
                *g |= *pg;
            }
            out.next.extend(p.next.iter().copied());
            out.base.extend(p.base.iter().copied());
            out.old.extend(p.old.iter().map(|(k, v)| (*k, v.clone())));
            out.ids.extend(p.ids.iter().map(|(k, v)| (*k, *v)));
        }
        out
    }
}

/// One member's answer to a lock request.
enum LockAnswer {
    Granted {
        known: Vec<(u8, Version)>,
        fenced: Vec<(u8, Version)>,
        read: Option<LockRead>,
        payload: Bytes,
    },
    Held {
        index: u8,
        client: u64,
        contact: Option<std::net::SocketAddr>,
        /// `Settling`: an update of the block is being passed on, no lock held.
        settling: bool,
    },
    Failed(CallError),
}

/// How to lock.
#[derive(Debug, Clone)]
pub struct LockOpts {
    /// The lock owner (one per acquisition).
    pub owner: ClientId,
    /// Where this client's cache answers other clients (client-client interface).
    pub contact: Option<std::net::SocketAddr>,
    /// The nodes keeping copies of this client's cache (cache group).
    pub cache_group: Vec<drs_proto::NodeId>,
    /// Wait (up to `lock_timeout`) for another holder; otherwise fail at once with
    /// `Locked`, naming the holder's contact if it has one.
    pub wait: bool,
}

impl Default for LockOpts {
    fn default() -> Self {
        LockOpts {
            owner: rand::random(),
            contact: None,
            cache_group: Vec::new(),
            wait: true,
        }
    }
}

impl Client {
    /// Writes `data` at `offset` of data block `lba` (within one block).
    pub async fn write(&self, lba: u64, offset: usize, data: &[u8]) -> Result<(), ClientError> {
        self.check_lba(lba)?;
        self.check_range(offset, data.len())?;
        let (stripe, index) = self.inner.geo.locate(lba);
        self.write_stripe(
            stripe,
            vec![BlockWrite {
                index,
                offset,
                data: Bytes::copy_from_slice(data),
            }],
        )
        .await
    }

    /// Writes whole data blocks starting at `lba`; a short last block is zero-padded.
    /// Stripes are written concurrently, up to `stripes_in_flight` at once, and each
    /// member of a stripe gets one message for all the stripe's blocks.
    pub async fn write_blocks(&self, lba: u64, data: &[u8]) -> Result<(), ClientError> {
        let bs = self.inner.geo.block_size;
        let count = data.len().div_ceil(bs) as u64;
        if count == 0 {
            return Ok(());
        }
        self.check_lba(lba)?;
        self.check_lba(lba + count - 1)?;
        let mut by_stripe: BTreeMap<StripeId, Vec<BlockWrite>> = BTreeMap::new();
        for (n, chunk) in data.chunks(bs).enumerate() {
            let (stripe, index) = self.inner.geo.locate(lba + n as u64);
            let mut block = vec![0u8; bs];
            block[..chunk.len()].copy_from_slice(chunk);
            by_stripe.entry(stripe).or_default().push(BlockWrite {
                index,
                offset: 0,
                data: Bytes::from(block),
            });
        }
        let results: Vec<Result<(), ClientError>> = stream::iter(by_stripe)
            .map(|(stripe, writes)| self.write_stripe(stripe, writes))
            .buffer_unordered(self.inner.cfg.stripes_in_flight.max(1))
            .collect()
            .await;
        results.into_iter().collect()
    }

    /// Writes to several blocks of one stripe under one lock. Dropped before it is
    /// done, the write still runs to its end (committed, or its locks released) in a
    /// task of its own, and the next write of the stripe waits for it (`finish`).
    pub async fn write_stripe(
        &self,
        stripe: StripeId,
        writes: Vec<BlockWrite>,
    ) -> Result<(), ClientError> {
        let this = self.clone();
        let work = async move { this.write_stripe_now(stripe, writes).await };
        let key = Key::Writes(stripe);
        crate::finish::ordered(self, &self.inner.given_up, key, work, None).await
    }

    async fn write_stripe_now(
        &self,
        stripe: StripeId,
        writes: Vec<BlockWrite>,
    ) -> Result<(), ClientError> {
        let reads: Vec<(u8, usize, usize)> = writes
            .iter()
            .map(|w| (w.index as u8, w.offset, w.data.len()))
            .collect();
        let locked = self.lock_now(stripe, &reads, &LockOpts::default()).await?;
        let mut deltas = Vec::with_capacity(writes.len());
        for w in &writes {
            match self
                .old_bytes(&locked, w.index, w.offset, w.data.len())
                .await
            {
                Ok(old) => {
                    let mut d = old.to_vec();
                    // Lengths are equal by construction.
                    let _ = Codec::xor_into(&w.data, &mut d);
                    deltas.push((w.index, w.offset, Bytes::from(d)));
                }
                Err(e) => {
                    self.unlock_stripe(&locked).await;
                    return Err(e);
                }
            }
        }
        crate::fault::at(crate::fault::Step::AfterOldData);
        self.commit_now(&locked, deltas).await?;
        self.inner
            .stats
            .writes
            .fetch_add(writes.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Locks data blocks of `stripe` at every member for `owner`, waiting for other
    /// holders up to `lock_timeout`. `blocks` lists (data index, offset, len): the data
    /// node of each also returns that range of its block (lock-and-read).
    pub async fn lock_stripe(
        &self,
        stripe: StripeId,
        blocks: &[(u8, usize, usize)],
        owner: ClientId,
    ) -> Result<LockedStripe, ClientError> {
        self.lock_stripe_with(
            stripe,
            blocks,
            &LockOpts {
                owner,
                ..LockOpts::default()
            },
        )
        .await
    }

    /// [`Client::lock_stripe`] with every option. Dropped before it is done, the
    /// lock still runs to its end in a task of its own, which then releases what it
    /// got; a later lock of the same stripe and owner waits for that (`finish`).
    pub async fn lock_stripe_with(
        &self,
        stripe: StripeId,
        blocks: &[(u8, usize, usize)],
        opts: &LockOpts,
    ) -> Result<LockedStripe, ClientError> {
        let key = Key::Owner(stripe, opts.owner);
        let (this, blocks, opts) = (self.clone(), blocks.to_vec(), opts.clone());
        let work = async move { this.lock_now(stripe, &blocks, &opts).await };
        let unused: Leftover<Result<LockedStripe, ClientError>> = |client, locked| {
            Box::pin(async move {
                if let Ok(locked) = locked {
                    client.unlock_stripe(&locked).await
                }
            })
        };
        crate::finish::ordered(self, &self.inner.given_up, key, work, Some(unused)).await
    }

    async fn lock_now(
        &self,
        stripe: StripeId,
        blocks: &[(u8, usize, usize)],
        opts: &LockOpts,
    ) -> Result<LockedStripe, ClientError> {
        let owner = opts.owner;
        let mut asked_release = Vec::new();
        let geo = &self.inner.geo;
        let indices: Vec<u8> = blocks.iter().map(|b| b.0).collect();
        let started = Instant::now();
        let deadline = started + self.inner.cfg.lock_timeout;
        let need = self.inner.volume.min_write as usize;
        let mut attempt: u32 = 0;
        loop {
            let client = self.id();
            let sent = Instant::now();
            // Each grant starts the client's heartbeats to that member at once: a slow
            // member must not let the others' leases run out meanwhile.
            let answers = join_all((0..geo.width()).map(|p| async move {
                let a = self.lock_member(stripe, p, blocks, opts, client).await;
                if let LockAnswer::Granted { .. } = a {
                    self.note_locked(geo.member(stripe, p), stripe, owner, sent);
                }
                a
            }))
            .await;
            if let Some(node) = answers.iter().enumerate().find_map(|(p, a)| match a {
                LockAnswer::Failed(CallError::Remote(WireError::Fenced { .. })) => {
                    Some(geo.member(stripe, p))
                }
                _ => None,
            }) {
                self.release(stripe, &indices, owner).await;
                self.fenced(node);
                return Err(ClientError::Fenced { node });
            }
            let held = answers.iter().enumerate().find_map(|(p, a)| match a {
                LockAnswer::Held {
                    index,
                    client,
                    contact,
                    settling,
                } => Some((*index, *client, *contact, geo.member(stripe, p), *settling)),
                _ => None,
            });
            let granted: Vec<bool> = answers
                .iter()
                .map(|a| matches!(a, LockAnswer::Granted { .. }))
                .collect();
            if let Some((index, holder, contact, node, settling)) = held {
                self.release(stripe, &indices, owner).await;
                let lba = geo.lba(stripe, index as usize);
                if !opts.wait || Instant::now() >= deadline {
                    return Err(ClientError::Locked {
                        lba,
                        holder,
                        node,
                        settling,
                        waited_ms: started.elapsed().as_millis() as u64,
                        contact,
                    });
                }
                // A holder caching the block can be asked to write it back and let
                // go (report 5.5), so a second client is never starved: asked again
                // each time it is found holding the block, at most every
                // `RELEASE_ASK_EVERY` (it may take the block again for its next
                // write). A holder that let go is raced at once, without a backoff.
                self.inner
                    .stats
                    .lock_retries
                    .fetch_add(1, Ordering::Relaxed);
                if let Some(c) = contact {
                    let due = asked_release
                        .iter()
                        .find(|(a, _)| *a == c)
                        .is_none_or(|(_, at): &(_, Instant)| at.elapsed() >= RELEASE_ASK_EVERY);
                    if due {
                        asked_release.retain(|(a, _)| *a != c);
                        asked_release.push((c, Instant::now()));
                        if let Ok(true) =
                            crate::peer::ask_release(self, c, lba, (u64::MAX, 0)).await
                        {
                            attempt += 1;
                            continue;
                        }
                    }
                }
                let cap = 2u64 << attempt.min(6);
                let ms = rand::thread_rng().gen_range(1..=cap);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                attempt += 1;
                continue;
            }
            let live = granted.iter().filter(|g| **g).count();
            if live < need {
                self.release(stripe, &indices, owner).await;
                let detail = answers
                    .iter()
                    .enumerate()
                    .filter_map(|(p, a)| match a {
                        LockAnswer::Failed(e) => {
                            Some(format!("node {}: {e}", geo.member(stripe, p)))
                        }
                        _ => None,
                    })
                    .collect::<Vec<_>>()
                    .join("; ");
                return Err(ClientError::NotEnoughNodes {
                    stripe,
                    live,
                    need,
                    detail: format!(" ({detail})"),
                });
            }
            // The base: the highest version any member knows was given out. The next
            // version: past the base and past anything a fenced holder may have given
            // out without any member here learning of it.
            let mut base: Vec<(u8, Version)> = indices.iter().map(|i| (*i, 0)).collect();
            let mut next = base.clone();
            for a in &answers {
                if let LockAnswer::Granted { known, fenced, .. } = a {
                    for (i, v) in known {
                        if let Some(e) = base.iter_mut().find(|(j, _)| j == i) {
                            e.1 = e.1.max(*v);
                        }
                    }
                    for (i, v) in known.iter().chain(fenced) {
                        if let Some(e) = next.iter_mut().find(|(j, _)| j == i) {
                            e.1 = e.1.max(*v);
                        }
                    }
                }
            }
            for e in next.iter_mut() {
                e.1 += 1;
            }
            let mut old = BTreeMap::new();
            for &i in &indices {
                let want = base
                    .iter()
                    .find(|(j, _)| *j == i)
                    .map(|(_, v)| *v)
                    .unwrap_or(0);
                if let Some(LockAnswer::Granted {
                    read: Some(r),
                    payload,
                    ..
                }) = answers.get(i as usize)
                {
                    let offset = blocks.iter().find(|b| b.0 == i).map(|b| b.1).unwrap_or(0);
                    match r {
                        LockRead::Block { versions } if versions.get(i as usize) == Some(&want) => {
                            old.insert(
                                i,
                                Old::Range {
                                    offset,
                                    data: payload.clone(),
                                },
                            );
                        }
                        LockRead::Zero if want == 0 => {
                            old.insert(i, Old::Zero);
                        }
                        _ => {}
                    }
                }
                // Version 0 everywhere: never written, all zeros.
                if want == 0 {
                    old.entry(i).or_insert(Old::Zero);
                }
            }
            crate::fault::at(crate::fault::Step::AfterLock);
            return Ok(LockedStripe {
                stripe,
                owner,
                client,
                granted,
                next,
                base,
                old,
                ids: BTreeMap::new(),
            });
        }
    }

    async fn lock_member(
        &self,
        stripe: StripeId,
        position: usize,
        blocks: &[(u8, usize, usize)],
        opts: &LockOpts,
        client: ClientId,
    ) -> LockAnswer {
        let owner = opts.owner;
        let node = self.inner.geo.member(stripe, position);
        // An unlock of this owner still queued for the node (a release that got no
        // answer, a catch-up) must reach it first, or it would release this lock.
        if let Err(e) = self.deliver_unlocks(node, stripe, owner).await {
            return LockAnswer::Failed(e);
        }
        let completed = self.take_completed(node);
        let req = Request::Lock(LockReq {
            volume: self.inner.volume.id,
            stripe,
            owner,
            indices: blocks.iter().map(|b| b.0).collect(),
            // Nothing to read: the lock alone (every member answers it at once).
            read: blocks
                .iter()
                .find(|b| b.0 as usize == position && b.2 > 0)
                .map(|b| (b.1 as u32, b.2 as u32)),
            client,
            lease_ms: self.lease_ms(),
            completed: completed.clone(),
            contact: opts.contact,
            cache_group: opts.cache_group.clone(),
        });
        match self.call(node, &req, Bytes::new()).await {
            Ok((Response::Lock(r), payload)) => LockAnswer::Granted {
                known: r.known,
                fenced: r.fenced,
                read: r.read,
                payload,
            },
            Ok((other, _)) => {
                self.return_completed(node, completed);
                LockAnswer::Failed(CallError::Protocol(format!("lock answered with {other:?}")))
            }
            Err(CallError::Remote(WireError::Locked {
                index,
                holder,
                client,
                contact,
                ..
            })) => {
                tracing::trace!(stripe, node, index, holder, client, "lock held");
                LockAnswer::Held {
                    index,
                    client,
                    contact,
                    settling: false,
                }
            }
            // An update of the block is being passed on between the members: as good
            // as held for a moment.
            Err(CallError::Remote(WireError::Settling { index, client, .. })) => {
                tracing::trace!(stripe, node, index, client, "lock refused: settling");
                LockAnswer::Held {
                    index,
                    client,
                    contact: None,
                    settling: true,
                }
            }
            Err(e) => {
                if e.is_unreachable() {
                    self.return_completed(node, completed);
                }
                LockAnswer::Failed(e)
            }
        }
    }

    /// The whole block `index` as it is under the lock.
    pub async fn old_block(
        &self,
        locked: &LockedStripe,
        index: usize,
    ) -> Result<Bytes, ClientError> {
        self.old_bytes(locked, index, 0, self.inner.geo.block_size)
            .await
    }

    /// The bytes `[offset, offset + len)` of block `index` before this write.
    pub(crate) async fn old_bytes(
        &self,
        locked: &LockedStripe,
        index: usize,
        offset: usize,
        len: usize,
    ) -> Result<Bytes, ClientError> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        match locked.old.get(&(index as u8)) {
            Some(Old::Range { offset: o, data })
                if *o <= offset && offset + len <= o + data.len() =>
            {
                return Ok(data.slice(offset - o..offset - o + len))
            }
            Some(Old::Zero) => return Ok(Bytes::from(vec![0u8; len])),
            _ => {}
        }
        // The data node could not give it: decode it from the stripe. We hold the
        // lock, so the block's version is our base. A member an update of it has not
        // reached yet (the update is being relayed) answers with an older version:
        // those replies are not decoded, and the read waits for the others.
        // All of it within one request deadline: the stripe stays locked meanwhile.
        let want = locked.base_version(index).unwrap_or(0);
        let until = Instant::now() + self.inner.cfg.request_timeout;
        let mut last = None;
        while Instant::now() < until {
            let read = self.read_range_at(locked.stripe, index, offset, len, want);
            match tokio::time::timeout_at(until.into(), read).await {
                Ok(Ok((versions, data))) if versions.get(index) == Some(&want) => return Ok(data),
                Ok(Ok((versions, _))) => last = Some(versions),
                Ok(Err(e)) => return Err(e),
                Err(_) => break,
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(ClientError::Unavailable {
            stripe: locked.stripe,
            have: 0,
            need: self.inner.geo.k,
            width: self.inner.geo.width(),
            detail: match last {
                Some(v) => format!(
                    " (block {index} should be at version {want}, the stripe shows {v:?})"
                ),
                None => format!(
                    " (block {index} should be at version {want}; no {} members agreed on it within {:?})",
                    self.inner.geo.k, self.inner.cfg.request_timeout
                ),
            },
            transient: true,
        })
    }

    /// Sends the deltas with update-and-unlock to every member that granted the lock
    /// and waits for the acknowledgements. `deltas` holds (data index, offset,
    /// old XOR new). Dropped before it is done, it still runs to its end in a task of
    /// its own, and a later lock of the same stripe and owner waits for that
    /// (`finish`).
    pub async fn commit_stripe(
        &self,
        locked: &LockedStripe,
        deltas: Vec<(usize, usize, Bytes)>,
    ) -> Result<(), ClientError> {
        let (this, lock) = (self.clone(), locked.clone());
        let work = async move { this.commit_now(&lock, deltas).await };
        // Not after steps of this owner given up on: a lock of it may wait for a
        // holder that waits for this commit.
        let kept = keep_in(
            &self.inner.given_up,
            Key::Owner(locked.stripe, locked.owner),
        );
        Finish::new(self, Box::pin(work), None, Some(kept))
            .run()
            .await
    }

    async fn commit_now(
        &self,
        locked: &LockedStripe,
        deltas: Vec<(usize, usize, Bytes)>,
    ) -> Result<(), ClientError> {
        let geo = &self.inner.geo;
        let k = geo.k;
        let stripe = locked.stripe;
        // A stalled client must not send updates under a lease that may be gone: at
        // least `min_write` members that granted the lock must have confirmed the
        // lease recently. A member that has not (it is hung, say: its heartbeats go
        // unanswered) still gets its part: it checks the lock itself when it takes
        // it, and one that misses it learns from the unlock, as when any member
        // fails its part. The members with a confirmed lease still hold the lock, so
        // no other writer can get in meanwhile.
        let stale: Vec<NodeId> = (0..geo.width())
            .filter(|&p| locked.granted[p])
            .map(|p| geo.member(stripe, p))
            .filter(|n| !self.lease_ok(*n))
            .collect();
        let confirmed = locked.granted.iter().filter(|g| **g).count() - stale.len();
        if let Some(&node) = stale.first() {
            if confirmed < self.inner.volume.min_write as usize {
                self.unlock_stripe(locked).await;
                return Err(ClientError::LeaseExpired { node });
            }
            tracing::debug!(
                stripe,
                node,
                "lease not confirmed at a member: it must check its lock itself"
            );
        }
        crate::fault::at(crate::fault::Step::BeforeSend);
        // The versions given out: only the blocks updated (a locked block left as it
        // was gives out nothing).
        let unlock: Vec<(u8, Version)> = locked
            .next
            .iter()
            .map(|&(i, v)| {
                let updated = deltas.iter().any(|(j, _, _)| *j == i as usize);
                (i, if updated { v } else { 0 })
            })
            .collect();
        let updates: Vec<(BlockUpdate, Bytes)> = deltas
            .iter()
            .map(|(i, o, d)| {
                let id = locked.ids.get(&(*i as u8)).copied();
                let u = BlockUpdate {
                    id: id.unwrap_or(UpdateId {
                        client: locked.client,
                        seq: self.next_update_seq(),
                    }),
                    index: *i as u8,
                    version: locked.next_version(*i).unwrap_or(1),
                    base: locked.base_version(*i).unwrap_or(0),
                    offset: *o as u32,
                    len: d.len() as u32,
                };
                (u, d.clone())
            })
            .collect();
        // One message per member that granted the lock: written data nodes first,
        // then parity nodes, then the other data nodes (the order matters only when
        // a test stops the client between two of them).
        let mut parts = Vec::with_capacity(geo.width());
        let order = (0..k)
            .filter(|p| updates.iter().any(|(u, _)| u.index as usize == *p))
            .chain(k..geo.width())
            .chain((0..k).filter(|p| !updates.iter().any(|(u, _)| u.index as usize == *p)));
        for p in order.filter(|p| locked.granted[*p]) {
            let node = geo.member(stripe, p);
            let mine: Vec<&(BlockUpdate, Bytes)> = updates
                .iter()
                .filter(|(u, _)| p >= k || u.index as usize == p)
                .collect();
            let (req, payload) = if mine.is_empty() {
                let req = self.unlock_request(stripe, locked.owner, unlock.clone());
                (req, Bytes::new())
            } else {
                let mut payload = BytesMut::with_capacity(mine.iter().map(|(_, d)| d.len()).sum());
                for (_, d) in &mine {
                    payload.extend_from_slice(d);
                }
                let req = Request::Update(UpdateReq {
                    volume: self.inner.volume.id,
                    stripe,
                    position: p as u8,
                    owner: locked.owner,
                    updates: mine.iter().map(|(u, _)| *u).collect(),
                    unlock: unlock.clone(),
                    relay: false,
                    on_behalf: false,
                    completed: self.take_completed(node),
                    // A block whose data node did not grant: the parity members'
                    // copies may be its only ones, kept until every member has it.
                    keep: if p >= k {
                        mine.iter()
                            .map(|(u, _)| u.index)
                            .filter(|i| !locked.granted[*i as usize])
                            .collect()
                    } else {
                        Vec::new()
                    },
                });
                (req, payload.freeze())
            };
            let ids: Vec<UpdateId> = mine.iter().map(|(u, _)| u.id).collect();
            parts.push((p, node, ids, req, payload));
        }
        let results = if crate::fault::active() {
            // One member at a time, with the named steps in between.
            let mut out = Vec::with_capacity(parts.len());
            let mut parity_done = 0;
            for (p, node, ids, req, payload) in parts {
                if p >= k {
                    crate::fault::at(crate::fault::Step::AfterParity(parity_done));
                } else if !matches!(req, Request::Update(_)) {
                    crate::fault::at(crate::fault::Step::AfterParity(parity_done));
                    crate::fault::at(crate::fault::Step::BeforeUnlock);
                }
                let r = self.call(node, &req, payload).await;
                if p < k && matches!(req, Request::Update(_)) {
                    crate::fault::at(crate::fault::Step::AfterData);
                }
                if p >= k {
                    parity_done += 1;
                }
                out.push((p, node, ids, r));
            }
            out
        } else {
            join_all(
                parts
                    .into_iter()
                    .map(|(p, node, ids, req, payload)| async move {
                        let r = self.call(node, &req, payload).await;
                        (p, node, ids, r)
                    }),
            )
            .await
        };
        let mut acked = 0;
        let mut failed: Vec<NodeId> = (0..geo.width())
            .filter(|p| !locked.granted[*p])
            .map(|p| geo.member(stripe, p))
            .collect();
        let mut conflict = None;
        let mut fenced = None;
        // Data indices whose update some member took: only those versions are real.
        let mut taken: Vec<u8> = Vec::new();
        // (position, update) for each update a member holds durably.
        let mut held: Vec<(usize, UpdateId)> = Vec::new();
        for (p, node, ids, r) in results {
            match r {
                Ok((Response::Updated(rep), _)) => {
                    let mut all_ok = rep.results.len() == ids.len();
                    for (j, res) in rep.results.iter().enumerate() {
                        match res {
                            Ok(_) => {
                                if let Some((u, _)) =
                                    updates.iter().find(|(u, _)| Some(&u.id) == ids.get(j))
                                {
                                    taken.push(u.index);
                                    held.push((p, u.id));
                                }
                            }
                            Err(e @ WireError::StaleVersion { .. }) => {
                                conflict = Some((p, e.clone()));
                                all_ok = false;
                            }
                            Err(WireError::Fenced { .. }) => {
                                fenced = Some(node);
                                all_ok = false;
                            }
                            Err(_) => all_ok = false,
                        }
                    }
                    if all_ok {
                        acked += 1;
                        self.note_unlocked(node, stripe, locked.owner);
                    } else {
                        failed.push(node);
                    }
                }
                Ok((Response::Unlocked, _)) => {
                    acked += 1;
                    self.note_unlocked(node, stripe, locked.owner);
                }
                Ok((other, _)) => {
                    tracing::warn!(
                        stripe,
                        position = p,
                        ?other,
                        "unexpected answer to an update"
                    );
                    failed.push(node);
                }
                Err(CallError::Remote(WireError::Fenced { .. })) => {
                    fenced = Some(node);
                }
                Err(e) => {
                    tracing::debug!(stripe, position = p, error = %e, "member did not take its part of the write");
                    failed.push(node);
                }
            }
        }
        // A written block whose data node granted the lock but did not take its
        // update: the parity members that took it hold its only copies, and did not
        // keep them durably (no `keep` was asked for). Ask them now, with a relay
        // naming it in `keep` (a duplicate where it is held); the write is
        // acknowledged only if one of them keeps it.
        // Only for a write that is otherwise acknowledged: a failed one's updates
        // are left to the relays (or voided).
        let need = self.inner.volume.min_write as usize;
        let mut unkept = 0;
        for (u, d) in updates.iter().filter(|(u, _)| {
            let i = u.index as usize;
            acked >= need && locked.granted[i] && !held.contains(&(i, u.id))
        }) {
            let holders: Vec<usize> = held
                .iter()
                .filter(|(p, id)| *p >= k && *id == u.id)
                .map(|(p, _)| *p)
                .collect();
            let asks = holders.into_iter().map(|p| {
                let req = Request::Update(UpdateReq {
                    volume: self.inner.volume.id,
                    stripe,
                    position: p as u8,
                    owner: 0,
                    updates: vec![*u],
                    unlock: Vec::new(),
                    relay: true,
                    on_behalf: false,
                    completed: Vec::new(),
                    keep: vec![u.index],
                });
                let node = geo.member(stripe, p);
                let payload = d.clone();
                async move { self.call(node, &req, payload).await }
            });
            let kept = join_all(asks)
                .await
                .into_iter()
                .filter(|r| {
                    matches!(r, Ok((Response::Updated(rep), _))
                        if rep.results.first().is_some_and(|x| x.is_ok()))
                })
                .count();
            if kept == 0 {
                unkept += 1;
            }
        }
        let ids: Vec<(u8, UpdateId)> = updates.iter().map(|(u, _)| (u.index, u.id)).collect();
        let mut notices: BTreeMap<NodeId, Vec<UpdateId>> = BTreeMap::new();
        for (p, id) in completions(k, geo.width(), &ids, &held) {
            notices.entry(geo.member(stripe, p)).or_default().push(id);
        }
        for (node, ids) in notices {
            self.note_complete(node, ids);
        }
        // Members that missed their part learn the versions (and lose any lock they
        // granted) when the unlock reaches them; a version nobody took is not passed
        // on (it would make them wait for an update that does not exist).
        let missed: Vec<(u8, Version)> = unlock
            .iter()
            .map(|&(i, v)| (i, if taken.contains(&i) { v } else { 0 }))
            .collect();
        for node in failed {
            self.defer_unlock(node, stripe, locked.owner, missed.clone());
        }
        if let Some(node) = fenced {
            self.fenced(node);
            return Err(ClientError::Fenced { node });
        }
        if let Some((p, e)) = conflict {
            return Err(ClientError::Node {
                node: geo.member(stripe, p),
                error: e,
            });
        }
        if acked < need || unkept > 0 {
            return Err(ClientError::NotDurable {
                stripe,
                acked,
                need,
            });
        }
        Ok(())
    }

    /// Releases locks without an update. Returns once the unlocks are on their way
    /// (see `release`); [`Client::settle_unlocks`] waits for their answers.
    pub async fn unlock_stripe(&self, locked: &LockedStripe) {
        let indices: Vec<u8> = locked.next.iter().map(|(i, _)| *i).collect();
        self.release(locked.stripe, &indices, locked.owner).await;
    }

    /// Unlocks `indices` at every member (one that did not answer the lock may still
    /// grant it late). Returns once each member's unlock is queued on its
    /// connection, or left in the backlog (its connection could not take it, or
    /// another unlock of the same owner there is on its way and takes it in): either
    /// way, it reaches the member before this owner's next lock there. The answers
    /// are awaited in the background; an unlock a member does not acknowledge stays
    /// in the backlog.
    async fn release(&self, stripe: StripeId, indices: &[u8], owner: ClientId) {
        let blocks: Vec<(u8, Version)> = indices.iter().map(|i| (*i, 0)).collect();
        let timeout = self.inner.cfg.request_timeout;
        let sends = self.inner.geo.members(stripe).into_iter().map(|node| {
            let key = (node, stripe, owner);
            let blocks = &blocks;
            async move {
                let blocks = self.begin_unlock(key, blocks)?;
                let req = self.unlock_request(stripe, owner, blocks.clone());
                // Ends the delivery if this future is dropped, or the send fails.
                let way = OnItsWay {
                    client: self.clone(),
                    key,
                    blocks,
                    delivered: false,
                };
                let sent = self
                    .inner
                    .pool
                    .send(node, &req, Bytes::new(), timeout)
                    .await;
                sent.ok().map(|sent| (way, sent))
            }
        });
        let sent: Vec<_> = join_all(sends).await.into_iter().flatten().collect();
        if sent.is_empty() {
            return;
        }
        tokio::spawn(join_all(sent.into_iter().map(
            |(mut way, sent)| async move {
                let r = sent.answer().await;
                way.delivered = r.is_ok();
                let (client, (node, stripe, owner)) = (way.client.clone(), way.key);
                drop(way);
                // A node with a newer map: deliver it at once, with the map.
                if let Err(CallError::Remote(WireError::StaleEpoch { .. })) = r {
                    let _ = client.deliver_unlocks(node, stripe, owner).await;
                }
            },
        )));
    }
}

/// The completion notices of a write, as (position, update) for each member to tell.
/// `updates` lists the write's updates as (data index, id); `held`, which position
/// acknowledged which update. An update every member that must hold it (its data
/// node and every parity node) acknowledged is complete: they may forget their
/// copies. One that a member lacks (it did not grant the lock, or failed its part)
/// is not: the members holding it pass it on to that member themselves
/// (PROTOCOL.md 9.2). Telling them it is complete would leave that member to a
/// rebuild, which fails when too few members hold the newest state.
fn completions(
    k: usize,
    width: usize,
    updates: &[(u8, UpdateId)],
    held: &[(usize, UpdateId)],
) -> Vec<(usize, UpdateId)> {
    let mut out = Vec::new();
    for &(index, id) in updates {
        let must = || std::iter::once(index as usize).chain(k..width);
        if must().all(|p| held.contains(&(p, id))) {
            out.extend(must().map(|p| (p, id)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_update_is_complete_only_when_every_member_that_must_hold_it_has_it() {
        // 3 + 2: data nodes at 0..3, parity nodes at 3 and 4. Blocks 0 and 2 written.
        let (k, width) = (3, 5);
        let a = UpdateId { client: 7, seq: 1 };
        let b = UpdateId { client: 7, seq: 2 };
        let ups = [(0, a), (2, b)];
        let all = [(0, a), (2, b), (3, a), (3, b), (4, a), (4, b)];
        let mut got = completions(k, width, &ups, &all);
        got.sort_by_key(|(p, id)| (id.seq, *p));
        assert_eq!(got, vec![(0, a), (3, a), (4, a), (2, b), (3, b), (4, b)]);
        // Parity node 4 did not grant the lock (min_write below the width): nothing
        // is complete, so the holders pass both updates on to it.
        let no4: Vec<_> = all.iter().copied().filter(|(p, _)| *p != 4).collect();
        assert!(completions(k, width, &ups, &no4).is_empty());
        // The data node of block 2 failed its part: only block 0's update is complete
        // (the data node of block 1 holds neither and is not told anything).
        let no2: Vec<_> = all.iter().copied().filter(|x| *x != (2, b)).collect();
        assert_eq!(
            completions(k, width, &ups, &no2),
            vec![(0, a), (3, a), (4, a)]
        );
    }
}
