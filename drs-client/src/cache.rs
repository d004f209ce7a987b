//! The write-back cache (report 5.3.1), with its cache group (5.3.3) and the
//! client-client interface (5.5).
//!
//! A client may change a cached block any number of times and send the sum of the
//! changes (the running-total delta) once. A block enters the cache locked
//! (lock-and-read), so no other client changes it while it is cached; every write
//! changes the cached bytes and XORs old XOR new into the block's running total;
//! [`WriteBackCache::flush`] sends each dirty stripe's totals with update-and-unlock
//! and empties the cache. When more than `max_dirty` blocks are dirty, the cache
//! flushes itself.
//!
//! **Cache group** (`group` = N > 0): before a write returns, the block's running
//! total, with the lock it is held under and the update id it will be written back
//! with, is stored at N nodes. If this process dies, its lease runs out and those
//! nodes write the cache back in its place, under its locks, which the stripes' nodes
//! keep for them; so a write that returned survives a crash of the client even if it
//! was never flushed. Without a group, unflushed changes die with the process.
//!
//! **Client-client interface** (`serve`): the cache listens on a loopback address
//! given with every lock it takes. Another client that finds one of these blocks
//! locked reads and writes it through this cache, or asks it to write the block back
//! and let it go; a cache that finds a block locked by such a cache does the same
//! (writes are forwarded; `flush` then asks the holders to write them back).
//!
//! A flush that fails leaves its stripes' changes applied or not (the volume is
//! consistent either way) and drops them from the cache; the caller gets the error.
//!
//! A change written through another client's cache is the holder's to write back.
//! The writer's `flush` asks every holder it wrote through to write back and let go,
//! and fails with [`ClientError::ForwardedLost`] if a holder does not answer (it
//! died, and its cache with it) or answers that a write-back holding one of its
//! changes (by ticket) failed there (remembered for [`PEER_LOST_KEEP`]). A holder
//! tells the writers that serve when a write-back carried their changes
//! (`PeerDurable`), and they no longer ask it about them. A holder
//! whose lease is not confirmed at `min_write` of a block's members, or that was
//! fenced, serves that block to nobody: it answers as if it did not hold it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use drs_codec::Codec;
use drs_proto::{
    BlockUpdate, CacheDropReq, CachePutReq, ClientId, NodeId, Request, Response, StripeId,
    UpdateId, WireError,
};
use futures::future::join_all;
use futures::FutureExt;
use tokio::sync::{watch, Mutex};

use crate::error::{CallError, ClientError};
use crate::write::{LockOpts, LockedStripe};
use crate::Client;

/// How long a holder remembers that a write-back holding other clients' changes
/// failed. Each forwarded write gets a ticket (increasing); a writer's flush names
/// the first ticket of its writes to the block since its last flush, and is told of
/// a failure that lost that one or a later one: a writer whose changes were all
/// written back may be told too if another's later change was lost (too often at
/// worst, never too rarely, within this time).
pub const PEER_LOST_KEEP: Duration = Duration::from_secs(600);
/// Blocks remembered so at most (the oldest are forgotten first).
const PEER_LOST_MAX: usize = 65_536;
/// How long a forwarded block found lost is also reported to flushes that were
/// waiting while it was found (longer than any wait for the holders' answers).
const RECENT_LOSSES_KEEP: Duration = Duration::from_secs(60);
/// The writers of one cached block that serve: contact -> first and latest ticket.
type Writers = BTreeMap<SocketAddr, (u64, u64)>;

/// Notices on their way, which every flush running meanwhile waits for.
type Notices = futures::future::Shared<futures::future::BoxFuture<'static, ()>>;

/// A notice owed to a writer: (its contact, block, its first and latest ticket in
/// the copy written back).
type Notice = (SocketAddr, u64, (u64, u64));

/// How long a cache leaves a block it let go on request before it takes it again
/// (the asking writer's lock request is on its way).
const YIELD: Duration = Duration::from_millis(100);

/// How a cache works.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Dirty blocks before the cache flushes itself.
    pub max_dirty: usize,
    /// Nodes keeping copies of the cache (a cache group); 0: none.
    pub group: usize,
    /// Serve other clients through this cache (client-client interface).
    pub serve: bool,
    /// Where the cache listens for other clients when it serves them (default
    /// 127.0.0.1, a free port): clients on other machines reach it only at an
    /// address they can route to. It is given to them as it is (in lock answers),
    /// so an unspecified address (0.0.0.0) is refused.
    pub serve_on: SocketAddr,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_dirty: 1024,
            group: 0,
            serve: false,
            serve_on: SocketAddr::from(([127, 0, 0, 1], 0)),
        }
    }
}

/// The tickets of a client's writes to one block through one holder instance since
/// it last asked. Kept one by one up to [`TICKETS_KEPT`]; past that only the smallest
/// and the largest, standing for every ticket between (a notice then clears them
/// only if it covers the whole range).
#[derive(Debug, Clone)]
struct Tickets {
    instance: u64,
    kept: BTreeSet<u64>,
    /// `kept` holds only the ends of a range.
    coarse: bool,
}

/// Tickets kept one by one per block and holder.
const TICKETS_KEPT: usize = 1024;

impl Tickets {
    fn new(ticket: u64, instance: u64) -> Tickets {
        Tickets {
            instance,
            kept: [ticket].into_iter().collect(),
            coarse: false,
        }
    }

    fn add(&mut self, ticket: u64) {
        self.kept.insert(ticket);
        if self.coarse || self.kept.len() > TICKETS_KEPT {
            self.coarse = true;
            self.kept = self
                .kept
                .first()
                .into_iter()
                .chain(self.kept.last())
                .copied()
                .collect();
        }
    }

    fn first(&self) -> Option<u64> {
        self.kept.first().copied()
    }

    fn last(&self) -> Option<u64> {
        self.kept.last().copied()
    }

    /// The holder answered for every ticket up to `upto`.
    fn forget_through(&mut self, upto: u64) {
        let lo = self.first().unwrap_or(0);
        let rest = match upto.checked_add(1) {
            Some(next) => self.kept.split_off(&next),
            None => BTreeSet::new(),
        };
        self.kept = match (self.coarse, rest.last()) {
            // A range: what is left of it starts after `upto`, and never before
            // where it started.
            (true, Some(&hi)) => [lo.max(upto + 1), hi].into_iter().collect(),
            _ => rest,
        };
    }

    /// The holder wrote back one copy of the block holding the tickets from `from`
    /// to `through` (every ticket of the block in that span was in that copy).
    fn written_back(&mut self, from: u64, through: u64) {
        if !self.coarse {
            self.kept.retain(|t| *t < from || *t > through);
        } else if self.first().is_some_and(|lo| from <= lo) {
            self.forget_through(through);
        }
    }

    fn is_empty(&self) -> bool {
        self.kept.is_empty()
    }
}

struct CachedBlock {
    /// Current bytes of the block.
    data: Vec<u8>,
    /// old XOR current, since the block entered the cache.
    total: Vec<u8>,
    /// Range of `total` that may be nonzero.
    dirty: Option<(usize, usize)>,
    lock: LockedStripe,
}

/// A write-back cache over a [`Client`]. Cheap to clone; operations are serialized.
/// An operation whose caller stops waiting still runs to its end (see the crate's
/// notes on cancellation).
#[derive(Clone)]
pub struct WriteBackCache {
    inner: Arc<CacheInner>,
}

pub(crate) struct CacheInner {
    client: Client,
    cfg: CacheConfig,
    /// The owner of every lock this cache holds (one operation at a time runs on a
    /// cache, so its own locks never need to exclude each other).
    owner: ClientId,
    group: Vec<NodeId>,
    contact: Option<SocketAddr>,
    // Held across awaits on purpose: one operation at a time keeps lock, cache and
    // flush order simple.
    entries: Mutex<BTreeMap<u64, CachedBlock>>,
    /// Blocks written through another client's cache, not yet known to be written
    /// back: (contact, block) -> the smallest and the largest ticket of such writes
    /// since, and the holder's instance that gave them.
    forwarded: std::sync::Mutex<BTreeMap<(SocketAddr, u64), Tickets>>,
    /// Random: names this cache to the clients that write through it (a cache that
    /// later listens on the same address is another one).
    instance: u64,
    /// Held while the holders of forwarded writes are asked: a flush running at the
    /// same time waits, and is also told of the losses found meanwhile
    /// (`recent_losses`).
    asking: Mutex<()>,
    /// Forwarded blocks found lost, and when (kept [`RECENT_LOSSES_KEEP`]).
    recent_losses: std::sync::Mutex<Vec<(u64, Instant, ClientError)>>,
    put_seq: AtomicU64,
    /// Blocks this cache let go because another client asked (`PeerRelease`), and
    /// when: it waits [`YIELD`] before it takes one again, so the asker gets in.
    yielded: std::sync::Mutex<BTreeMap<u64, Instant>>,
    /// Numbers the changes other clients write here (`PeerWrite`): their tickets.
    peer_tickets: AtomicU64,
    /// Blocks changed by other clients since their last write-back here, with the
    /// ticket of the latest such change.
    peer_written: std::sync::Mutex<BTreeMap<u64, u64>>,
    /// Of those changes, the ones whose writers serve other clients: block ->
    /// writer's contact -> its first and latest ticket in the cached copy. They are
    /// told when a write-back carried them (`PeerDurable`).
    peer_writers: std::sync::Mutex<BTreeMap<u64, Writers>>,
    /// Notices to writers on their way (`PeerDurable`), sent apart from the cache's
    /// lock; `flush` waits for them, so a holder that exits after its flush has told
    /// its writers.
    notices: std::sync::Mutex<Vec<Notices>>,
    /// Blocks whose write-back failed, or that were discarded, while they held other
    /// clients' changes: the latest ticket lost, and when (see [`PEER_LOST_KEEP`]).
    peer_lost: std::sync::Mutex<BTreeMap<u64, (u64, Instant)>>,
    /// Operations whose callers stopped waiting, still running: the next operation
    /// waits for them.
    given_up: Arc<crate::finish::GivenUp<()>>,
    /// Dropping it stops the peer endpoint.
    _stop: watch::Sender<()>,
}

fn slock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl WriteBackCache {
    /// A cache with no group and no peer endpoint.
    pub fn new(client: Client, max_dirty: usize) -> WriteBackCache {
        let (stop, _) = watch::channel(());
        let cfg = CacheConfig {
            max_dirty,
            ..CacheConfig::default()
        };
        WriteBackCache {
            inner: Arc::new(CacheInner::new(client, cfg, Vec::new(), None, stop)),
        }
    }

    /// A cache as `cfg` says: with a cache group of that many nodes (the first that
    /// answer, in id order), and serving other clients on `cfg.serve_on`.
    pub async fn with_config(
        client: Client,
        cfg: CacheConfig,
    ) -> Result<WriteBackCache, ClientError> {
        let mut group = Vec::new();
        if cfg.group > 0 {
            for n in client.map().nodes.iter().map(|n| n.id) {
                if group.len() == cfg.group {
                    break;
                }
                if client.call(n, &Request::Ping, Bytes::new()).await.is_ok() {
                    group.push(n);
                }
            }
            if group.len() < cfg.group {
                return Err(ClientError::NotEnoughNodes {
                    stripe: 0,
                    live: group.len(),
                    need: cfg.group,
                    detail: " (for the cache group)".into(),
                });
            }
        }
        if cfg.serve && cfg.serve_on.ip().is_unspecified() {
            // The address is given to other clients as the contact: it must be one
            // they can reach.
            return Err(ClientError::Call {
                node: u32::MAX,
                error: CallError::Unreachable(format!(
                    "cannot serve peers on {}: give the address other clients reach",
                    cfg.serve_on
                )),
            });
        }
        let (stop, stop_rx) = watch::channel(());
        let listener = if cfg.serve {
            Some(
                tokio::net::TcpListener::bind(cfg.serve_on)
                    .await
                    .map_err(|e| ClientError::Call {
                        node: u32::MAX,
                        error: CallError::Unreachable(format!(
                            "cannot listen for peers on {}: {e}",
                            cfg.serve_on
                        )),
                    })?,
            )
        } else {
            None
        };
        let contact = listener.as_ref().and_then(|l| l.local_addr().ok());
        let inner = Arc::new(CacheInner::new(client, cfg, group, contact, stop));
        if let Some(l) = listener {
            tokio::spawn(crate::peer::serve(l, Arc::downgrade(&inner), stop_rx));
        }
        Ok(WriteBackCache { inner })
    }

    /// Where other clients reach this cache, if it serves them.
    pub fn contact(&self) -> Option<SocketAddr> {
        self.inner.contact
    }

    /// The nodes of its cache group.
    pub fn group(&self) -> &[NodeId] {
        &self.inner.group
    }

    /// Writes `data` at `offset` of block `lba` into the cache (or, if another
    /// client's cache holds the block, into that cache).
    pub async fn write(&self, lba: u64, offset: usize, data: &[u8]) -> Result<(), ClientError> {
        let (inner, data) = (self.inner.clone(), data.to_vec());
        self.to_end(async move { inner.write(lba, offset, &data).await })
            .await
    }

    /// Runs a cache operation to its end even if the caller stops waiting (it may
    /// hold locks, and blocks out of the cache, half-way), after the operations
    /// given up on before it (`finish`).
    async fn to_end<O: Send + 'static>(
        &self,
        op: impl std::future::Future<Output = O> + Send + 'static,
    ) -> O {
        let inner = &self.inner;
        crate::finish::ordered(&inner.client, &inner.given_up, (), op, None).await
    }

    /// Writes `data` at `offset` of block `lba` and returns once the change reached
    /// the storage nodes: a block cached here is written back at once; one held in
    /// another client's cache is written through that cache, which writes it back
    /// before it answers (report 5.5); otherwise it is written directly.
    pub async fn write_durable(
        &self,
        lba: u64,
        offset: usize,
        data: &[u8],
    ) -> Result<(), ClientError> {
        let (this, data) = (self.clone(), data.to_vec());
        self.to_end(async move { this.write_durable_now(lba, offset, &data).await })
            .await
    }

    async fn write_durable_now(
        &self,
        lba: u64,
        offset: usize,
        data: &[u8],
    ) -> Result<(), ClientError> {
        let inner = &self.inner;
        let c = &inner.client;
        c.check_lba(lba)?;
        c.check_range(offset, data.len())?;
        {
            let mut entries = inner.entries.lock().await;
            if entries.contains_key(&lba) {
                inner.apply(&mut entries, lba, offset, data).await?;
                return inner.flush_lbas(&mut entries, &[lba]).await;
            }
        }
        let (stripe, index) = c.geometry().locate(lba);
        let opts = LockOpts {
            owner: rand::random(),
            wait: false,
            ..LockOpts::default()
        };
        let probe = c
            .lock_stripe_with(stripe, &[(index as u8, offset, 0)], &opts)
            .await;
        match probe {
            Ok(lock) => c.unlock_stripe(&lock).await,
            Err(ClientError::Locked {
                contact: Some(contact),
                ..
            }) => {
                if let Ok(Some((true, _))) =
                    crate::peer::write(c, contact, (lba, offset), data, true, None).await
                {
                    return Ok(());
                }
            }
            Err(_) => {}
        }
        c.write(lba, offset, data).await
    }

    /// Reads from the cache, or from the volume when the block is not cached here.
    pub async fn read(&self, lba: u64, offset: usize, len: usize) -> Result<Bytes, ClientError> {
        // After a write given up on: it lands first (nothing to finish here).
        self.inner.given_up.wait(()).await;
        match self.cached(lba, offset, len).await? {
            Some(b) => Ok(b),
            None => self.inner.client.read(lba, offset, len).await,
        }
    }

    /// The bytes of a block cached here, after checking the range.
    async fn cached(
        &self,
        lba: u64,
        offset: usize,
        len: usize,
    ) -> Result<Option<Bytes>, ClientError> {
        let c = &self.inner.client;
        c.check_lba(lba)?;
        c.check_range(offset, len)?;
        let entries = self.inner.entries.lock().await;
        Ok(entries
            .get(&lba)
            .map(|e| Bytes::copy_from_slice(&e.data[offset..offset + len])))
    }

    /// Reads the newest bytes of a block: from this cache, or through the cache of
    /// the client that holds it (report 5.5), or from the volume.
    pub async fn read_latest(
        &self,
        lba: u64,
        offset: usize,
        len: usize,
    ) -> Result<Bytes, ClientError> {
        let this = self.clone();
        self.to_end(async move { this.read_latest_now(lba, offset, len).await })
            .await
    }

    async fn read_latest_now(
        &self,
        lba: u64,
        offset: usize,
        len: usize,
    ) -> Result<Bytes, ClientError> {
        if let Some(b) = self.cached(lba, offset, len).await? {
            return Ok(b);
        }
        let c = &self.inner.client;
        let (stripe, index) = c.geometry().locate(lba);
        let opts = LockOpts {
            owner: rand::random(),
            wait: false,
            ..LockOpts::default()
        };
        match c
            .lock_stripe_with(stripe, &[(index as u8, offset, len)], &opts)
            .await
        {
            Ok(lock) => {
                let r = c.old_bytes(&lock, index, offset, len).await;
                c.unlock_stripe(&lock).await;
                r
            }
            Err(ClientError::Locked {
                contact: Some(contact),
                ..
            }) => match crate::peer::read(c, contact, lba, offset, len).await {
                Ok(Some(b)) => Ok(b),
                _ => c.read(lba, offset, len).await,
            },
            Err(_) => c.read(lba, offset, len).await,
        }
    }

    /// Sends every dirty block's running total and releases every lock; asks the
    /// holders of blocks written through their caches to write them back.
    pub async fn flush(&self) -> Result<(), ClientError> {
        let this = self.clone();
        self.to_end(async move { this.flush_now().await }).await
    }

    async fn flush_now(&self) -> Result<(), ClientError> {
        let began = Instant::now();
        let mut entries = self.inner.entries.lock().await;
        let all: Vec<u64> = entries.keys().copied().collect();
        let res = self.inner.flush_lbas(&mut entries, &all).await;
        drop(entries);
        self.inner.notices_sent().await;
        let lost = self.inner.ask_holders(began, |_| true).await;
        res?;
        match lost.into_iter().next() {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }

    /// Writes back (and unlocks) those of `lbas` cached here, and asks the holders of
    /// those written through other caches to write them back; the rest of the cache
    /// stays. As with [`WriteBackCache::flush`], a block whose write-back failed is
    /// dropped from the cache; the error comes with the blocks of the stripes that
    /// failed (their changes may or may not have landed) and the forwarded blocks
    /// that may be lost.
    pub async fn flush_blocks(&self, lbas: &[u64]) -> Result<(), (ClientError, Vec<u64>)> {
        let (this, lbas) = (self.clone(), lbas.to_vec());
        self.to_end(async move { this.flush_blocks_now(&lbas).await })
            .await
    }

    async fn flush_blocks_now(&self, lbas: &[u64]) -> Result<(), (ClientError, Vec<u64>)> {
        let began = Instant::now();
        let mut entries = self.inner.entries.lock().await;
        let mut failed = Vec::new();
        let res = self
            .inner
            .flush_lbas_noting(&mut entries, lbas, &mut failed)
            .await;
        drop(entries);
        self.inner.notices_sent().await;
        let wanted: BTreeSet<u64> = lbas.iter().copied().collect();
        let lost = self
            .inner
            .ask_holders(began, |lba| wanted.contains(&lba))
            .await;
        let mut first = res.err();
        for (lba, e) in lost {
            failed.push(lba);
            first.get_or_insert(e);
        }
        match first {
            Some(e) => Err((e, failed)),
            None => Ok(()),
        }
    }

    /// Drops those of `lbas` cached here without writing them back (their changes
    /// are lost) and releases their locks: for blocks that are no longer the
    /// writer's to write.
    pub async fn discard_blocks(&self, lbas: &[u64]) {
        let (this, lbas) = (self.clone(), lbas.to_vec());
        self.to_end(async move { this.discard_blocks_now(&lbas).await })
            .await
    }

    async fn discard_blocks_now(&self, lbas: &[u64]) {
        let mut entries = self.inner.entries.lock().await;
        for lba in lbas {
            if let Some(e) = entries.get_mut(lba) {
                e.dirty = None;
            }
        }
        let _ = self.inner.note_written_back(lbas, false);
        // Nothing is sent but the unlocks; an unlock that fails is left to the lease.
        if let Err(e) = self.inner.flush_lbas(&mut entries, lbas).await {
            tracing::warn!(?lbas, error = %e, "releasing discarded blocks failed");
        }
    }

    /// Blocks held in the cache.
    pub async fn len(&self) -> usize {
        self.inner.entries.lock().await.len()
    }

    pub async fn is_empty(&self) -> bool {
        self.inner.entries.lock().await.is_empty()
    }
}

impl CacheInner {
    /// An empty cache with a fresh owner and instance.
    fn new(
        client: Client,
        cfg: CacheConfig,
        group: Vec<NodeId>,
        contact: Option<SocketAddr>,
        stop: watch::Sender<()>,
    ) -> CacheInner {
        CacheInner {
            client,
            cfg: CacheConfig {
                max_dirty: cfg.max_dirty.max(1),
                ..cfg
            },
            owner: rand::random(),
            group,
            contact,
            entries: Mutex::new(BTreeMap::new()),
            forwarded: Default::default(),
            put_seq: AtomicU64::new(1),
            yielded: Default::default(),
            peer_tickets: AtomicU64::new(1),
            asking: Mutex::new(()),
            recent_losses: Default::default(),
            instance: rand::random(),
            peer_written: Default::default(),
            peer_writers: Default::default(),
            notices: Default::default(),
            peer_lost: Default::default(),
            given_up: Arc::default(),
            _stop: stop,
        }
    }

    pub(crate) fn cluster_id(&self) -> u64 {
        self.client.map().cluster_id
    }

    /// The key peers prove to this cache (the client's own).
    pub(crate) fn key(&self) -> &drs_proto::ClusterKey {
        &self.client.config().key
    }

    fn lock_opts(&self, wait: bool) -> LockOpts {
        LockOpts {
            owner: self.owner,
            contact: self.contact,
            cache_group: self.group.clone(),
            wait,
        }
    }

    /// Locks block `lba` for the cache and reads it.
    ///
    /// Called with `entries` held, too: its lock waits for the cache owner's steps
    /// given up on (`finish`), and none can be, since every cache operation runs to
    /// its end. Never put one of the cache's own steps under a timeout.
    async fn acquire(&self, lba: u64, wait: bool) -> Result<CachedBlock, ClientError> {
        let c = &self.client;
        let (stripe, index) = c.geometry().locate(lba);
        let bs = c.block_size();
        let lock = c
            .lock_stripe_with(stripe, &[(index as u8, 0, bs)], &self.lock_opts(wait))
            .await?;
        match c.old_block(&lock, index).await {
            Ok(old) => Ok(CachedBlock {
                data: old.to_vec(),
                total: vec![0; bs],
                dirty: None,
                lock,
            }),
            Err(e) => {
                c.unlock_stripe(&lock).await;
                Err(e)
            }
        }
    }

    async fn write(&self, lba: u64, offset: usize, data: &[u8]) -> Result<(), ClientError> {
        self.client.check_lba(lba)?;
        self.client.check_range(offset, data.len())?;
        let wait = slock(&self.yielded)
            .get(&lba)
            .map(|at| YIELD.saturating_sub(at.elapsed()));
        if let Some(wait) = wait.filter(|w| !w.is_zero()) {
            tokio::time::sleep(wait).await;
        }
        let mut entries = self.entries.lock().await;
        // (Not `entry()`: the map is let go of while waiting for another client.)
        let cached = entries.contains_key(&lba);
        if !cached {
            match self.acquire(lba, false).await {
                Ok(b) => {
                    entries.insert(lba, b);
                }
                Err(ClientError::Locked { contact, .. }) => {
                    // Not while waiting: other clients may need this cache meanwhile.
                    drop(entries);
                    if let Some(contact) = contact {
                        // Held by another client's cache: write through it (report 5.5).
                        let r = crate::peer::write(
                            &self.client,
                            contact,
                            (lba, offset),
                            data,
                            false,
                            self.contact,
                        );
                        if let Ok(Some((_, (ticket, instance)))) = r.await {
                            let mut f = slock(&self.forwarded);
                            match f.get_mut(&(contact, lba)) {
                                Some(t) if t.instance == instance => t.add(ticket),
                                // Another instance answers there now: what the one
                                // before held is still to be asked about (and fails).
                                Some(_) => {}
                                None => {
                                    f.insert((contact, lba), Tickets::new(ticket, instance));
                                }
                            }
                            return Ok(());
                        }
                        // It let go meanwhile, or cannot be reached: lock it ourselves.
                    }
                    let b = self.acquire(lba, true).await?;
                    entries = self.entries.lock().await;
                    // Another operation of this cache may have taken it meanwhile (under
                    // the same owner, so the lock is the same one).
                    entries.entry(lba).or_insert(b);
                }
                Err(e) => return Err(e),
            }
        }
        self.apply(&mut entries, lba, offset, data).await?;
        let dirty = entries.values().filter(|e| e.dirty.is_some()).count();
        if dirty > self.cfg.max_dirty {
            let all: Vec<u64> = entries.keys().copied().collect();
            self.flush_lbas(&mut entries, &all).await?;
        }
        Ok(())
    }

    /// Changes a cached block; with a cache group, its copies first.
    async fn apply(
        &self,
        entries: &mut BTreeMap<u64, CachedBlock>,
        lba: u64,
        offset: usize,
        data: &[u8],
    ) -> Result<(), ClientError> {
        let Some(e) = entries.get_mut(&lba) else {
            return Ok(());
        };
        let end = offset + data.len();
        // total ^= old ^ new, then old := new.
        let mut total = e.total.clone();
        let _ = Codec::xor_into(&e.data[offset..end], &mut total[offset..end]);
        let _ = Codec::xor_into(data, &mut total[offset..end]);
        let dirty = match e.dirty {
            None => (offset, end),
            Some((a, b)) => (a.min(offset), b.max(end)),
        };
        if !self.group.is_empty() {
            let index = self.client.geometry().locate(lba).1;
            let id = UpdateId {
                client: e.lock.client,
                seq: self.client.next_update_seq(),
            };
            self.put_copies(lba, &e.lock, index, id, dirty, &total)
                .await?;
            e.lock.ids.insert(index as u8, id);
        }
        e.total = total;
        e.data[offset..end].copy_from_slice(data);
        e.dirty = Some(dirty);
        Ok(())
    }

    /// Stores a block's pending change at every member of the cache group.
    async fn put_copies(
        &self,
        lba: u64,
        lock: &LockedStripe,
        index: usize,
        id: UpdateId,
        (a, b): (usize, usize),
        total: &[u8],
    ) -> Result<(), ClientError> {
        let version = lock.next_version(index).unwrap_or(1);
        let base = lock.base_version(index).unwrap_or(0);
        let req = Request::CachePut(CachePutReq {
            volume: self.client.volume().id,
            client: lock.client,
            lba,
            stripe: lock.stripe,
            update: BlockUpdate {
                id,
                index: index as u8,
                version,
                base,
                offset: a as u32,
                len: (b - a) as u32,
            },
            owner: lock.owner,
            granted: lock
                .granted
                .iter()
                .enumerate()
                .filter(|(_, g)| **g)
                .map(|(p, _)| p as u8)
                .collect(),
            unlock: lock.next.clone(),
            seq: self.put_seq.fetch_add(1, Ordering::Relaxed),
            group: self.group.clone(),
            lease_ms: self.client.lease_ms(),
        });
        let payload = Bytes::copy_from_slice(&total[a..b]);
        let results = join_all(self.group.iter().map(|n| {
            let (req, payload) = (req.clone(), payload.clone());
            async move { (*n, self.client.call(*n, &req, payload).await) }
        }))
        .await;
        for (node, r) in results {
            match r {
                Ok((Response::CacheStored, _)) => self.client.note_copies(node, lba, true),
                Err(CallError::Remote(WireError::Fenced { .. })) => {
                    self.client.fenced(node);
                    return Err(ClientError::Fenced { node });
                }
                Ok((other, _)) => {
                    return Err(ClientError::Call {
                        node,
                        error: CallError::Protocol(format!("cache put answered with {other:?}")),
                    })
                }
                Err(error) => return Err(ClientError::Call { node, error }),
            }
        }
        Ok(())
    }

    /// Writes back (and unlocks) the given cached blocks, grouped by stripe.
    async fn flush_lbas(
        &self,
        entries: &mut BTreeMap<u64, CachedBlock>,
        lbas: &[u64],
    ) -> Result<(), ClientError> {
        self.flush_lbas_noting(entries, lbas, &mut Vec::new()).await
    }

    /// [`CacheInner::flush_lbas`], adding the blocks of every stripe whose
    /// write-back failed to `failed`.
    async fn flush_lbas_noting(
        &self,
        entries: &mut BTreeMap<u64, CachedBlock>,
        lbas: &[u64],
        failed: &mut Vec<u64>,
    ) -> Result<(), ClientError> {
        let client = &self.client;
        let mut by_stripe: BTreeMap<StripeId, Vec<u64>> = BTreeMap::new();
        for lba in lbas.iter().filter(|l| entries.contains_key(l)) {
            by_stripe
                .entry(client.geometry().locate(*lba).0)
                .or_default()
                .push(*lba);
        }
        let mut first_err = None;
        for (stripe, lbas) in by_stripe {
            let group: Vec<(u64, CachedBlock)> = lbas
                .iter()
                .filter_map(|l| entries.remove(l).map(|e| (*l, e)))
                .collect();
            let lock = LockedStripe::merge(stripe, self.owner, group.iter().map(|(_, e)| &e.lock));
            let deltas: Vec<(usize, usize, Bytes)> = group
                .iter()
                .filter_map(|(lba, e)| {
                    let (a, b) = e.dirty?;
                    Some((
                        client.geometry().locate(*lba).1,
                        a,
                        Bytes::copy_from_slice(&e.total[a..b]),
                    ))
                })
                .collect();
            // The blocks are out of the cache now: if this future is dropped before
            // the write-back ends (a panic unwinds; an operation given up on runs to
            // its end instead), the changes other clients wrote through them are
            // counted as lost, not left to look written back.
            let mut cut_short = CutShort {
                cache: self,
                lbas: Some(&lbas),
            };
            let res = if deltas.is_empty() {
                client.unlock_stripe(&lock).await;
                Ok(())
            } else {
                client.commit_stripe(&lock, deltas).await
            };
            let notices = self.note_written_back(&lbas, res.is_ok());
            cut_short.lbas = None;
            if !self.group.is_empty() {
                let ids: BTreeSet<ClientId> = group.iter().map(|(_, e)| e.lock.client).collect();
                for id in ids {
                    self.drop_copies(id, &lbas).await;
                }
            }
            self.tell_writers(notices);
            if let Err(e) = res {
                // The update may have reached some members and not others, and the
                // locks were released with it: the cached copies are no longer the
                // ones the volume is built on, so they are dropped, not retried.
                tracing::warn!(stripe, ?lbas, error = %e, "write-back failed; cached changes dropped");
                failed.extend_from_slice(&lbas);
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Asks the holders of the blocks written through their caches (those `pick`
    /// selects) to write them back and let go: the blocks whose changes may be lost,
    /// each with its error. A flush running at the same time waits for these answers;
    /// losses found since `began` (when the calling flush began) by another flush
    /// are the caller's too.
    async fn ask_holders(
        &self,
        began: Instant,
        pick: impl Fn(u64) -> bool,
    ) -> Vec<(u64, ClientError)> {
        let _asking = self.asking.lock().await;
        // Losses another flush found while this one waited count here too.
        let mut lost: Vec<(u64, ClientError)> = {
            let mut recent = slock(&self.recent_losses);
            recent.retain(|(_, at, _)| at.elapsed() < RECENT_LOSSES_KEEP);
            recent
                .iter()
                .filter(|(lba, at, _)| *at >= began && pick(*lba))
                .map(|(lba, _, e)| (*lba, e.clone()))
                .collect()
        };
        // (holder's contact, block): (first ticket, latest ticket, instance).
        type Asked = ((SocketAddr, u64), (u64, u64, u64));
        let asked: Vec<Asked> = slock(&self.forwarded)
            .iter()
            .filter(|((_, lba), _)| pick(*lba))
            .filter_map(|(k, t)| Some((*k, (t.first()?, t.last()?, t.instance))))
            .collect();
        for ((contact, lba), (since, upto, instance)) in asked {
            // The holder writes the block back before it answers.
            let r = crate::peer::ask_release(&self.client, contact, lba, (since, instance)).await;
            {
                // Writes forwarded while it was asked stay to be asked about.
                let mut f = slock(&self.forwarded);
                // Only the tickets of the instance asked: another one's (the entry
                // dropped and taken anew meanwhile) count from 1 again.
                if let Some(t) = f
                    .get_mut(&(contact, lba))
                    .filter(|t| t.instance == instance)
                {
                    t.forget_through(upto);
                    if t.is_empty() {
                        f.remove(&(contact, lba));
                    }
                }
            }
            if let Err(e) = r {
                tracing::warn!(lba, %contact, error = %e, "a change written through another cache may be lost");
                let e = ClientError::ForwardedLost {
                    lba,
                    contact,
                    detail: e.to_string(),
                };
                {
                    let mut recent = slock(&self.recent_losses);
                    recent.push((lba, Instant::now(), e.clone()));
                    if recent.len() > PEER_LOST_MAX {
                        recent.remove(0);
                    }
                }
                lost.push((lba, e));
            }
        }
        lost
    }

    /// `lbas` were written back (`ok`) or their changes dropped: those that held
    /// other clients' changes are remembered as lost, up to their latest ticket, if
    /// not `ok`. If `ok`, returns the notices owed to the writers that serve:
    /// (writer's contact, block, its first and latest ticket in the copy).
    fn note_written_back(&self, lbas: &[u64], ok: bool) -> Vec<Notice> {
        let notices: Vec<Notice> = {
            let mut writers = slock(&self.peer_writers);
            lbas.iter()
                .filter_map(|l| writers.remove(l).map(|w| (*l, w)))
                .flat_map(|(l, w)| w.into_iter().map(move |(to, t)| (to, l, t)))
                .filter(|_| ok)
                .collect()
        };
        let held: Vec<(u64, u64)> = {
            let mut written = slock(&self.peer_written);
            lbas.iter()
                .filter_map(|l| written.remove(l).map(|t| (*l, t)))
                .collect()
        };
        if ok || held.is_empty() {
            return notices;
        }
        let now = Instant::now();
        let mut lost = slock(&self.peer_lost);
        lost.retain(|_, (_, at)| now.duration_since(*at) < PEER_LOST_KEEP);
        for (lba, ticket) in held {
            tracing::warn!(
                lba,
                "a write-back holding other clients' changes failed; they will be told"
            );
            let e = lost.entry(lba).or_insert((ticket, now));
            *e = (e.0.max(ticket), now);
        }
        while lost.len() > PEER_LOST_MAX {
            let oldest = lost.iter().min_by_key(|(_, (_, at))| *at).map(|(l, _)| *l);
            match oldest {
                Some(l) => lost.remove(&l),
                None => break,
            };
        }
        notices
    }

    /// Sends the notices [`CacheInner::note_written_back`] returned, each in a task
    /// of its own: not under the cache's lock, which a writer busy with a request
    /// to this cache may be waiting for. [`CacheInner::notices_sent`] waits for them.
    fn tell_writers(&self, notices: Vec<Notice>) {
        let (Some(holder), false) = (self.contact, notices.is_empty()) else {
            return;
        };
        let volume = self.client.volume().id;
        let mut sent = slock(&self.notices);
        sent.retain(|n| n.clone().now_or_never().is_none());
        for (to, lba, (from, through)) in notices {
            let req = drs_proto::PeerDurableReq {
                volume,
                lba,
                holder,
                instance: self.instance,
                from,
                through,
            };
            let client = self.client.clone();
            let task = tokio::spawn(async move {
                if let Err(e) = crate::peer::tell_durable(&client, to, req).await {
                    tracing::debug!(lba, %to, error = %e, "a writer was not told its change is on the nodes");
                }
            });
            sent.push(task.map(|_| ()).boxed().shared());
        }
    }

    /// Waits until the notices sent so far (by any flush) reached their writers or
    /// failed; each is bounded.
    async fn notices_sent(&self) {
        let sent: Vec<Notices> = slock(&self.notices).clone();
        join_all(sent).await;
    }

    /// A write-back of `lba` holding another client's change with ticket `since` or
    /// a later one failed recently here.
    fn peer_change_lost(&self, lba: u64, since: u64) -> bool {
        slock(&self.peer_lost)
            .get(&lba)
            .is_some_and(|(ticket, at)| *ticket >= since && at.elapsed() < PEER_LOST_KEEP)
    }

    /// The lock a cached block is held under still stands: this client was not fenced
    /// since it took it, and `min_write` of the members that granted it confirmed the
    /// lease recently. Otherwise another client may hold the block by now, and the
    /// cached bytes are served to nobody else.
    fn lock_stands(&self, lock: &LockedStripe) -> bool {
        if lock.client != self.client.id() {
            return false;
        }
        let geo = self.client.geometry();
        let confirmed = (0..geo.width())
            .filter(|&p| lock.granted.get(p).copied().unwrap_or(false))
            .filter(|&p| self.client.lease_ok(geo.member(lock.stripe, p)))
            .count();
        confirmed >= self.client.volume().min_write as usize
    }

    /// Tells the cache group the copies of `lbas`, kept under client identity
    /// `client`, are no longer needed.
    async fn drop_copies(&self, client: ClientId, lbas: &[u64]) {
        let req = Request::CacheDrop(CacheDropReq {
            volume: self.client.volume().id,
            client,
            lbas: lbas.to_vec(),
        });
        for n in &self.group {
            if self.client.call(*n, &req, Bytes::new()).await.is_ok() {
                for lba in lbas {
                    self.client.note_copies(*n, *lba, false);
                }
            }
        }
    }

    /// Answers another client (report 5.5).
    pub(crate) async fn serve_peer(
        &self,
        req: Request,
        payload: Bytes,
    ) -> Result<(Response, Bytes), WireError> {
        match req {
            Request::PeerRead(r) => {
                let entries = self.entries.lock().await;
                let (o, n) = (r.offset as usize, r.len as usize);
                match entries.get(&r.lba) {
                    Some(e) if o + n <= e.data.len() && self.lock_stands(&e.lock) => Ok((
                        Response::PeerData { held: true },
                        Bytes::copy_from_slice(&e.data[o..o + n]),
                    )),
                    _ => Ok((Response::PeerData { held: false }, Bytes::new())),
                }
            }
            Request::PeerWrite(r) => {
                let mut entries = self.entries.lock().await;
                let stands = entries
                    .get(&r.lba)
                    .is_some_and(|e| self.lock_stands(&e.lock));
                if !stands {
                    return Ok((
                        Response::PeerWritten {
                            held: false,
                            durable: false,
                            ticket: 0,
                            instance: self.instance,
                        },
                        Bytes::new(),
                    ));
                }
                let bs = self.client.block_size();
                if r.offset as usize + payload.len() > bs {
                    return Err(WireError::BadRange {
                        offset: r.offset,
                        len: payload.len() as u32,
                        block_size: bs as u32,
                    });
                }
                self.apply(&mut entries, r.lba, r.offset as usize, &payload)
                    .await
                    .map_err(|_| WireError::Busy)?;
                let ticket = self.peer_tickets.fetch_add(1, Ordering::Relaxed);
                slock(&self.peer_written).insert(r.lba, ticket);
                if let Some(to) = r.reply_to {
                    let mut writers = slock(&self.peer_writers);
                    let (_, latest) = writers
                        .entry(r.lba)
                        .or_default()
                        .entry(to)
                        .or_insert((ticket, ticket));
                    *latest = (*latest).max(ticket);
                }
                if r.durable {
                    self.flush_lbas(&mut entries, &[r.lba])
                        .await
                        .map_err(|_| WireError::Busy)?;
                }
                Ok((
                    Response::PeerWritten {
                        held: true,
                        durable: r.durable,
                        ticket,
                        instance: self.instance,
                    },
                    Bytes::new(),
                ))
            }
            Request::PeerRelease(r) => {
                let mut entries = self.entries.lock().await;
                let held = entries.contains_key(&r.lba);
                let flushed = if held {
                    {
                        let now = Instant::now();
                        let mut yielded = slock(&self.yielded);
                        yielded.retain(|_, at| now.duration_since(*at) < YIELD);
                        yielded.insert(r.lba, now);
                    }
                    self.flush_lbas(&mut entries, &[r.lba]).await
                } else {
                    Ok(())
                };
                if r.since != u64::MAX && r.instance != self.instance {
                    return Err(WireError::Io {
                        kind:
                            "the cache that took the writes is gone (another one listens here now)"
                                .into(),
                    });
                }
                if self.peer_change_lost(r.lba, r.since) {
                    return Err(WireError::Io {
                        kind: "a write-back of the block holding changes of other clients failed or was cut short"
                            .into(),
                    });
                }
                flushed.map_err(|_| WireError::Busy)?;
                Ok((Response::PeerReleased { held }, Bytes::new()))
            }
            Request::PeerDurable(r) => {
                // This client's changes from `from` to `through` through that holder
                // instance are on the nodes: the flush need not ask about them. Any
                // before `from` were in an earlier copy of the block, and still are
                // to be asked about.
                let mut f = slock(&self.forwarded);
                let key = (r.holder, r.lba);
                if let Some(t) = f.get_mut(&key) {
                    if r.volume == self.client.volume().id && t.instance == r.instance {
                        t.written_back(r.from, r.through);
                        if t.is_empty() {
                            f.remove(&key);
                        }
                    }
                }
                Ok((Response::PeerNoted, Bytes::new()))
            }
            _ => Err(WireError::Invalid {
                what: drs_proto::error::InvalidReason::Unexpected,
            }),
        }
    }
}

/// Blocks taken out of the cache for a write-back that has not ended; on drop (the
/// write-back was cut short), the other clients' changes in them are counted as lost
/// ([`CacheInner::note_written_back`]), so a writer that asks is told so.
struct CutShort<'a> {
    cache: &'a CacheInner,
    lbas: Option<&'a [u64]>,
}

impl Drop for CutShort<'_> {
    fn drop(&mut self) {
        if let Some(lbas) = self.lbas.take() {
            tracing::warn!(
                ?lbas,
                "a write-back was cut short; its blocks' changes may or may not be on the nodes"
            );
            let _ = self.cache.note_written_back(lbas, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Tickets, TICKETS_KEPT};

    fn kept(t: &Tickets) -> Vec<u64> {
        t.kept.iter().copied().collect()
    }

    #[test]
    fn a_notice_clears_only_the_tickets_of_its_copy() {
        // Tickets 1 and 3 in one copy of the block, 5 in the next.
        let mut t = Tickets::new(1, 9);
        t.add(3);
        t.add(5);
        // The first copy's notice arrives after the writer wrote into the next one.
        t.written_back(1, 3);
        assert_eq!(kept(&t), [5]);
        t.written_back(5, 5);
        assert!(t.is_empty());

        // A notice for a later copy leaves an earlier ticket (maybe lost) to ask about.
        let mut t = Tickets::new(2, 9);
        t.add(7);
        t.written_back(6, 8);
        assert_eq!(kept(&t), [2]);

        // The holder answered up to 4; 6 came while it was asked.
        let mut t = Tickets::new(2, 9);
        t.add(4);
        t.add(6);
        t.forget_through(4);
        assert_eq!(kept(&t), [6]);
        t.forget_through(u64::MAX);
        assert!(t.is_empty());
    }

    #[test]
    fn past_the_limit_tickets_are_a_range() {
        let mut t = Tickets::new(10, 9);
        for i in 1..=TICKETS_KEPT as u64 {
            t.add(10 + 2 * i);
        }
        let hi = 10 + 2 * TICKETS_KEPT as u64;
        assert!(t.coarse);
        assert_eq!(kept(&t), [10, hi]);
        // A notice that does not start at or before the range's start clears nothing.
        t.written_back(11, hi);
        assert_eq!(kept(&t), [10, hi]);
        // One that does clears what it covers; the rest stays a range.
        t.written_back(10, 100);
        assert_eq!(kept(&t), [101, hi]);
        t.add(hi + 5);
        assert_eq!(kept(&t), [101, hi + 5]);
        // A late notice for tickets before the range does not widen it downward.
        t.written_back(50, 60);
        t.forget_through(60);
        assert_eq!(kept(&t), [101, hi + 5]);
        t.forget_through(hi + 5);
        assert!(t.is_empty());
    }
}
