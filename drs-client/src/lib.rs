//! The DRS client library: the client side of the report's protocol (chapter 5).
//!
//! - **Read** ([`read`]): ask the block's node; after a short hedge delay or an error,
//!   ask the rest of the stripe and decode from the first k replies that reflect one
//!   state of the stripe ([`select`]); cancel the rest (report 5.3.1, 5.6).
//! - **Write** ([`mod@write`]): lock (lock-and-read where old bytes are needed), compute
//!   the delta old XOR new, send it to the data node and every parity node in
//!   parallel with update-and-unlock (5.3.1, 5.3.2, 5.6). A write is acknowledged once
//!   every live member of the stripe holds it durably and at least `min_write` do.
//! - **Leases** (`lease`): the client renews a lease at every node where it holds
//!   locks, and tells the members when every one of them holds an update, so they
//!   stop keeping it for relay (5.3.3).
//! - **Write-back cache** ([`cache`]): running-total deltas per block, flushed on
//!   demand (5.3.1); optionally copied to a cache group of nodes that write it back
//!   if the client dies (5.3.3), and served to other clients (`peer`, 5.5).
//! - **Scrub and repair** ([`scrub`]): check every stripe (checksums, versions, parity
//!   equations), repair what can be repaired (5.7).
//! - **Status** ([`status`]): nodes up or down, stripes healthy or degraded.
//! - **Cluster map**: a client follows the metadata service's map through a
//!   [`MapSource`] ([`Client::follow`]): nodes down in it get heartbeats only, and a
//!   request a node refuses as from a stale epoch is sent again once the client has
//!   the node's epoch.
//!
//! # Cancellation
//! Reads may be dropped at any point (the nodes are told to abandon them). A write,
//! a lock, an update-and-unlock, or an operation of a [`WriteBackCache`] that locks
//! or writes, whose future is dropped half-way (a caller's timeout), is not left
//! half-way: the rest of it runs to its end in a task of its own, and a lock nobody
//! waits for any more is then released. Its changes may or may not be on the nodes.
//! What must come after it waits for it: a lock of the same stripe and owner, a
//! [`Client::write`] of the same stripe, the cache's next operation on blocks
//! (PROTOCOL.md 9.7; a panic or the runtime shutting down cuts an operation short
//! all the same). A
//! [`write::LockedStripe`] the caller holds is a lock held until it is committed or
//! unlocked, or the client is dropped and its lease runs out.
//!
//! # Layout
//! [`conn`] owns connections; [`select`] is the pure choice of consistent replies;
//! [`error`] the typed errors.

mod backlog;
pub mod cache;
pub mod conn;
pub mod error;
#[cfg(test)]
mod fakenode;
pub mod fault;
mod finish;
mod lease;
mod peer;
pub mod read;
pub mod scrub;
pub mod select;
pub mod status;
pub mod write;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use drs_codec::{Codec, Coefficients};
use drs_proto::{
    ClientId, ClusterMap, Geometry, NodeId, Request, Response, VolumeConfig, VolumeId,
};

pub use cache::WriteBackCache;
pub use error::{CallError, ClientError};
pub use scrub::{ScrubOptions, ScrubReport};
pub use status::ClusterStatus;

/// Where a client learns newer cluster maps (the metadata service).
pub trait MapSource: Send + Sync + 'static {
    /// The map once its epoch exceeds `after`, or the current map after a bounded
    /// wait (a long poll).
    fn watch(
        &self,
        after: u64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<ClusterMap, String>> + Send + '_>>;
}

/// How long a request refused for a stale epoch waits for the followed source's
/// newer map before asking the node that refused it.
const STALE_EPOCH_WAIT: Duration = Duration::from_millis(300);
/// How many times one request is sent again after stale-epoch refusals.
const STALE_EPOCH_RETRIES: u32 = 8;
/// Connections to other clients' caches kept open.
const PEER_CONNS: usize = 16;

/// Client settings. Every wait has a deadline.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// How long a read waits for the block's own node before asking the rest of the
    /// stripe (report 5.6).
    pub hedge_delay: Duration,
    /// Deadline of one request to one node.
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// Longest backoff before reconnecting to a node that failed.
    pub reconnect_max: Duration,
    /// How long a write keeps retrying a lock held by another client.
    pub lock_timeout: Duration,
    /// Stripes written or read concurrently by the multi-block operations.
    pub stripes_in_flight: usize,
    /// How long the nodes keep this client's locks without hearing from it; it
    /// heartbeats every third of it while it holds locks (report 5.3.3).
    pub lease: Duration,
    /// The cluster key this client proves on every connection (open: none). Read it
    /// with [`drs_proto::ClusterKey::for_cluster_file`].
    pub key: drs_proto::ClusterKey,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            hedge_delay: Duration::from_millis(20),
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
            reconnect_max: Duration::from_secs(1),
            lock_timeout: Duration::from_secs(10),
            stripes_in_flight: 16,
            lease: Duration::from_secs(3),
            key: drs_proto::ClusterKey::open(),
        }
    }
}

/// Counters of what the client did, for tools and tests.
#[derive(Debug, Default)]
pub struct ClientStats {
    pub reads: AtomicU64,
    /// Reads that asked the rest of the stripe.
    pub degraded_reads: AtomicU64,
    /// Blocks decoded from other blocks.
    pub reconstructions: AtomicU64,
    pub writes: AtomicU64,
    pub lock_retries: AtomicU64,
    /// Blocks found corrupt or stale and sent for repair.
    pub repairs: AtomicU64,
}

/// A client of one volume. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    /// The latest cluster map this client knows (see [`Client::set_map`]).
    map: std::sync::RwLock<Arc<ClusterMap>>,
    volume: VolumeConfig,
    geo: Geometry,
    codec: Codec,
    pool: conn::Pool,
    /// This client's identity for leases and update ids; replaced if a node fences it.
    id: AtomicU64,
    seq: AtomicU64,
    cfg: ClientConfig,
    stats: ClientStats,
    backlog: backlog::Backlog,
    /// Locks, commits and writes whose callers stopped waiting, still running.
    given_up: Arc<finish::GivenUp<finish::Key>>,
    leases: lease::Leases,
    /// The epoch of `map`, for waiters (see [`Client::call`]).
    epoch_seen: tokio::sync::watch::Sender<u64>,
    /// Whether a [`MapSource`] is followed.
    following: std::sync::atomic::AtomicBool,
    /// Connections to other clients' caches (client-client interface), by contact.
    peers: std::sync::Mutex<std::collections::HashMap<std::net::SocketAddr, Arc<conn::NodeConn>>>,
}

impl Client {
    /// A client of `volume` in `map`. Connections are made on first use.
    pub fn new(
        map: ClusterMap,
        volume: VolumeId,
        cfg: ClientConfig,
    ) -> Result<Client, ClientError> {
        let vol = map
            .volume(volume)
            .cloned()
            .ok_or(ClientError::UnknownVolume(volume))?;
        let geo = vol.geometry();
        let codec = Codec::new(Coefficients::from_rows(
            geo.k,
            geo.m,
            vol.coefficients.clone(),
        )?);
        let conn_cfg = conn::ConnConfig {
            cluster_id: map.cluster_id,
            epoch: Arc::new(AtomicU64::new(map.epoch)),
            connect_timeout: cfg.connect_timeout,
            reconnect_max: cfg.reconnect_max,
            key: cfg.key.clone(),
        };
        let pool = conn::Pool::new(map.nodes.iter().map(|n| (n.id, n.addr)), conn_cfg);
        pool.update(&map);
        let id = rand::random::<u64>() | 1;
        let epoch_seen = tokio::sync::watch::Sender::new(map.epoch);
        Ok(Client {
            inner: Arc::new(Inner {
                map: std::sync::RwLock::new(Arc::new(map)),
                volume: vol,
                geo,
                codec,
                pool,
                id: AtomicU64::new(id),
                seq: AtomicU64::new(1),
                cfg,
                stats: ClientStats::default(),
                backlog: backlog::Backlog::default(),
                given_up: Arc::default(),
                leases: lease::Leases::default(),
                epoch_seen,
                following: std::sync::atomic::AtomicBool::new(false),
                peers: std::sync::Mutex::new(std::collections::HashMap::new()),
            }),
        })
    }

    /// This client's identity (it changes if a node fences the client).
    pub fn id(&self) -> ClientId {
        self.inner.id.load(Ordering::Acquire)
    }

    /// The latest cluster map this client knows.
    pub fn map(&self) -> Arc<ClusterMap> {
        self.inner
            .map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Follows a newer cluster map (from the metadata service): its epoch goes on every
    /// later frame, nodes down in it get heartbeats only, a replaced node is reached at
    /// its new address. An older or equal epoch, or another cluster's map, is ignored;
    /// true if the map was taken.
    pub fn set_map(&self, map: ClusterMap) -> bool {
        let mut cur = self.inner.map.write().unwrap_or_else(|e| e.into_inner());
        if map.cluster_id != cur.cluster_id || map.epoch <= cur.epoch {
            return false;
        }
        self.inner.pool.update(&map);
        let epoch = map.epoch;
        *cur = Arc::new(map);
        drop(cur);
        self.inner.epoch_seen.send_replace(epoch);
        true
    }

    /// Follows the maps of `source` from now on (a background task on the current
    /// tokio runtime that ends when the last clone of this client is dropped).
    pub fn follow(&self, source: Arc<dyn MapSource>) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("no async runtime: the cluster map will not be followed");
            return;
        };
        self.inner.following.store(true, Ordering::Release);
        let weak = Arc::downgrade(&self.inner);
        rt.spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let Some(epoch) = weak.upgrade().map(|i| *i.epoch_seen.borrow()) else {
                    return;
                };
                match source.watch(epoch).await {
                    Ok(map) => {
                        backoff = Duration::from_millis(100);
                        let Some(inner) = weak.upgrade() else { return };
                        Client { inner }.set_map(map);
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "cluster map watch failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                }
            }
        });
    }

    pub fn volume(&self) -> &VolumeConfig {
        &self.inner.volume
    }

    pub fn geometry(&self) -> &Geometry {
        &self.inner.geo
    }

    pub fn codec(&self) -> &Codec {
        &self.inner.codec
    }

    /// The connection to the cache of another client at `contact` (kept for the next
    /// call; at most [`PEER_CONNS`] are kept).
    pub(crate) fn peer_conn(&self, contact: std::net::SocketAddr) -> Arc<conn::NodeConn> {
        let mut peers = self.inner.peers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = peers.get(&contact) {
            return c.clone();
        }
        if peers.len() >= PEER_CONNS {
            // Dropping a connection closes it; any one will do.
            if let Some(k) = peers.keys().next().copied() {
                peers.remove(&k);
            }
        }
        let cfg = conn::ConnConfig {
            cluster_id: self.map().cluster_id,
            epoch: self.epoch_handle(),
            connect_timeout: self.inner.cfg.connect_timeout,
            reconnect_max: self.inner.cfg.reconnect_max,
            key: self.inner.cfg.key.clone(),
        };
        let c = Arc::new(conn::NodeConn::new(u32::MAX, contact, cfg));
        peers.insert(contact, c.clone());
        c
    }

    pub fn config(&self) -> &ClientConfig {
        &self.inner.cfg
    }

    pub fn stats(&self) -> &ClientStats {
        &self.inner.stats
    }

    pub fn block_size(&self) -> usize {
        self.inner.geo.block_size
    }

    pub fn blocks(&self) -> u64 {
        self.inner.geo.blocks
    }

    fn next_update_seq(&self) -> u64 {
        self.inner.seq.fetch_add(1, Ordering::Relaxed)
    }

    /// One request to one node with the default deadline.
    pub async fn call(
        &self,
        node: NodeId,
        req: &Request,
        payload: Bytes,
    ) -> Result<(Response, Bytes), CallError> {
        self.call_on(node, conn::Lane::Data, req, payload).await
    }

    /// [`Client::call`] on one of the node's connections.
    pub(crate) async fn call_on(
        &self,
        node: NodeId,
        lane: conn::Lane,
        req: &Request,
        payload: Bytes,
    ) -> Result<(Response, Bytes), CallError> {
        let timeout = self.inner.cfg.request_timeout;
        let mut retries = 0;
        loop {
            let r = self
                .inner
                .pool
                .call(node, lane, req, payload.clone(), timeout)
                .await;
            match r {
                // The node refused the request on arrival, before doing anything: once
                // this client has the node's map, the same request can go again (a
                // few times: epochs may follow each other quickly).
                Err(CallError::Remote(drs_proto::WireError::StaleEpoch { node_epoch, .. }))
                    if retries < STALE_EPOCH_RETRIES =>
                {
                    retries += 1;
                    if !self.catch_up(node, lane, node_epoch).await {
                        return r;
                    }
                }
                r => return r,
            }
        }
    }

    /// Brings this client's map to `epoch` at least: from the followed source if it
    /// answers quickly, else from `node`, which refused this client for a stale
    /// epoch (so it works with the metadata service down too). True if caught up.
    async fn catch_up(&self, node: NodeId, lane: conn::Lane, epoch: u64) -> bool {
        let mut seen = self.inner.epoch_seen.subscribe();
        if self.inner.following.load(Ordering::Acquire) {
            let from_source =
                tokio::time::timeout(STALE_EPOCH_WAIT, seen.wait_for(|e| *e >= epoch)).await;
            if matches!(from_source, Ok(Ok(_))) {
                return true;
            }
        }
        let timeout = self.inner.cfg.request_timeout;
        match self
            .inner
            .pool
            .call(node, lane, &Request::GetMap, Bytes::new(), timeout)
            .await
        {
            Ok((Response::Map, toml)) => {
                match std::str::from_utf8(&toml)
                    .map_err(|e| e.to_string())
                    .and_then(|t| ClusterMap::from_toml(t).map_err(|e| e.to_string()))
                {
                    Ok(map) => {
                        self.set_map(map);
                    }
                    Err(e) => tracing::warn!(node, error = %e, "node sent an invalid cluster map"),
                }
            }
            Ok((other, _)) => tracing::warn!(node, ?other, "unexpected answer to GetMap"),
            Err(e) => tracing::debug!(node, error = %e, "GetMap failed"),
        }
        *self.inner.epoch_seen.borrow() >= epoch
    }

    /// The epoch stamped on this client's frames.
    pub(crate) fn epoch_handle(&self) -> Arc<AtomicU64> {
        self.inner.pool.epoch()
    }

    /// True while `node` is down in the cluster map, in its reconnect backoff, or hung
    /// (it answered no probe).
    pub fn is_down(&self, node: NodeId) -> bool {
        self.inner.pool.is_down(node)
    }

    fn check_lba(&self, lba: u64) -> Result<(), ClientError> {
        if lba >= self.inner.geo.blocks {
            return Err(ClientError::OutOfRange {
                lba,
                blocks: self.inner.geo.blocks,
            });
        }
        Ok(())
    }

    fn check_range(&self, offset: usize, len: usize) -> Result<(), ClientError> {
        let bs = self.inner.geo.block_size;
        if offset.checked_add(len).is_none_or(|end| end > bs) {
            return Err(ClientError::BadRange {
                offset,
                len,
                block_size: bs,
            });
        }
        Ok(())
    }
}
