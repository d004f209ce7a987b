//! A storage node: its stores, its lock tables, and the handling of every request.
//!
//! [`Node::handle`] is the one `match` over [`Request`]: each arm checks what the
//! request may do and calls the store or the lock table. Transport lives in
//! [`crate::rpc`]; recovery in [`crate::recover`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use drs_lockgroups::{Holder, LockGroup, Refused, UnsettledSet};
use drs_proto::error::InvalidReason;
use drs_proto::{
    BlockUpdate, ClientId, ClusterMap, FrameHeader, Geometry, HeartbeatReq, ListReply, LockInfo,
    LockRead, LockReply, LockReq, NodeId, NodeInfo, NodeState, NodeStats, ReadMode, ReadReply,
    RepairReply, Request, Response, StripeId, UnlockReq, UpdateId, UpdateReply, UpdateReq, Version,
    VolumeId, WireError,
};

use crate::store::{Known, ReadOutcome, StoreConfig, VolumeStore};

/// Longest a lock-and-read waits for the block's pending updates before granting the
/// lock without the bytes (the client then decodes them from the stripe).
const LOCK_READ_WAIT: Duration = Duration::from_secs(2);
/// Most entries in one listing page.
const LIST_MAX: u32 = 4096;
/// How often the pause watcher (`recover::watch_for_pauses`) wakes up.
pub const PAUSE_TICK: Duration = Duration::from_millis(100);

/// Settings of a node process.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub node: NodeId,
    pub data_dir: PathBuf,
    /// How long after start the node waits before comparing its blocks with its
    /// stripes: longer than the clients' reconnect backoff, so no new write skips it
    /// (see docs/PROTOCOL.md, "Rejoining").
    pub settle: Duration,
    /// A block that knows of an update it has not applied for this long is rebuilt.
    pub stuck_after: Duration,
    /// How often every block is compared with its stripe again (zero: never).
    pub verify_interval: Duration,
    /// A gap this long between the node's own timer ticks means it was paused: it
    /// re-verifies every block (clients may have written around it meanwhile).
    pub pause_threshold: Duration,
    pub checkpoint_bytes: u64,
    pub max_pending: usize,
    pub undo_bytes: usize,
    /// Connections served at once.
    pub max_connections: usize,
    /// An update this node took is passed on to the members that may lack it when its
    /// client has not said within this long that every member holds it.
    pub relay_after: Duration,
    /// Bytes of updates kept for passing on (beyond, the oldest stripes are re-checked
    /// by a scrub instead).
    pub unsettled_bytes: usize,
    /// With a metadata service: a node silent this long is marked down (used by the
    /// replica this node may host, and for the node's heartbeat rate).
    pub meta_down_after: Duration,
    /// With a metadata service: a mount session silent this long is ended (by the
    /// replica this node may host).
    pub session_expiry: Duration,
    /// With a metadata service: encoded bytes of file system namespace past which
    /// the replica this node may host refuses, as leader, to let it grow.
    pub namespace_limit: usize,
    /// Bytes per second a rejoining or replacing node rebuilds at most (0: no limit).
    pub rebuild_rate: u64,
    /// Fault injection for tests: SIGUSR1 cuts the metadata replica this node hosts
    /// off from the other replicas (Raft traffic both ways), SIGUSR2 heals it.
    pub fault_signals: bool,
    /// Where to serve Prometheus metrics (`GET /metrics`), if anywhere.
    pub metrics: Option<std::net::SocketAddr>,
    /// Time between the starts of two background scrub passes (zero: never scrub).
    pub scrub_every: Duration,
    /// Bytes per second the background scrubber reads at most (0: no limit).
    pub scrub_rate: u64,
    /// The cluster key every connection to and from this node proves (open: none).
    pub key: drs_proto::ClusterKey,
}

impl NodeConfig {
    pub fn new(node: NodeId, data_dir: PathBuf) -> NodeConfig {
        NodeConfig {
            node,
            data_dir,
            settle: Duration::from_millis(1500),
            stuck_after: Duration::from_secs(5),
            verify_interval: Duration::from_secs(30),
            pause_threshold: Duration::from_secs(1),
            checkpoint_bytes: 64 << 20,
            max_pending: 4096,
            undo_bytes: 64 << 20,
            max_connections: 2048,
            relay_after: Duration::from_secs(2),
            unsettled_bytes: 256 << 20,
            meta_down_after: Duration::from_secs(3),
            session_expiry: drs_meta::DEFAULT_SESSION_EXPIRY,
            namespace_limit: drs_meta::NAMESPACE_LIMIT,
            rebuild_rate: 0,
            fault_signals: false,
            metrics: None,
            scrub_every: Duration::from_secs(24 * 3600),
            scrub_rate: 8 << 20,
            key: drs_proto::ClusterKey::open(),
        }
    }
}

#[derive(Default)]
struct LockStats {
    granted: AtomicU64,
    denied: AtomicU64,
}

/// One volume at this node.
pub struct Volume {
    pub store: Arc<VolumeStore>,
    /// The lock group: locks, leases, fenced clients.
    pub locks: Mutex<LockGroup>,
    /// Updates taken here that some member may still lack, with their deltas.
    pub unsettled: Mutex<UnsettledSet<(BlockUpdate, Bytes)>>,
    /// Updates admitted here and not answered yet, per block. Taken before `locks`
    /// by both a lock grant and an update's admission, so each sees the other whole.
    pub admitted: Mutex<InFlight>,
}

/// Updates of each block a node admitted (direct or relayed) and has not answered:
/// in its writer's queue, or being logged. No lock on the block is granted while
/// there are any (`Settling`): the grant's reply would not count their versions
/// (they are neither known nor durable yet), so the next writer could reuse a
/// version one of them is about to take, or skip it while it is applied.
#[derive(Debug, Default)]
pub struct InFlight {
    blocks: HashMap<(StripeId, u8), Vec<ClientId>>,
}

impl InFlight {
    fn add(&mut self, stripe: StripeId, index: u8, client: ClientId) {
        self.blocks.entry((stripe, index)).or_default().push(client);
    }

    fn remove(&mut self, stripe: StripeId, index: u8, client: ClientId) {
        if let Some(v) = self.blocks.get_mut(&(stripe, index)) {
            if let Some(at) = v.iter().position(|c| *c == client) {
                v.swap_remove(at);
            }
            if v.is_empty() {
                self.blocks.remove(&(stripe, index));
            }
        }
    }

    /// The client of an update of the block admitted and not answered, if any.
    pub fn any(&self, stripe: StripeId, index: u8) -> Option<ClientId> {
        self.blocks
            .get(&(stripe, index))
            .and_then(|v| v.first().copied())
    }

    /// Blocks with updates admitted and not answered.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
}

/// Ends an admitted update's stay in [`Volume::admitted`] when its answer is ready
/// (or its task ends some other way).
struct Answered<'a> {
    volume: &'a Volume,
    stripe: StripeId,
    blocks: Vec<(u8, ClientId)>,
}

impl Drop for Answered<'_> {
    fn drop(&mut self) {
        let mut f = lock(&self.volume.admitted);
        for &(index, client) in &self.blocks {
            f.remove(self.stripe, index, client);
        }
    }
}

/// The node.
pub struct Node {
    pub cfg: NodeConfig,
    /// The map the node started with: cluster id, volumes, placement.
    pub map: ClusterMap,
    /// The newest cluster map epoch the node knows (raised by the metadata service's
    /// watch): requests from an older epoch are refused.
    epoch: AtomicU64,
    /// The newest cluster map the node knows, served to clients that are behind.
    live_map: std::sync::RwLock<Arc<ClusterMap>>,
    pub incarnation: u64,
    pub volumes: HashMap<VolumeId, Volume>,
    started: Instant,
    lock_stats: LockStats,
    /// Times the process found it had been paused.
    pub pauses: AtomicU64,
    /// When the pause watcher last ran on time (`now_ms`; `u64::MAX` while no watcher
    /// runs): see [`Node::may_have_been_paused`].
    pub pause_tick: AtomicU64,
    /// The incarnation the metadata service gave this start (0: not registered).
    pub registered: AtomicU64,
    /// The registration under which recovery last verified every block (0: none
    /// yet): the membership loop reports the node up only for this incarnation, so a
    /// pass that ran while the node was unregistered (written around) never counts.
    pub verified_for: AtomicU64,
    /// Told when recovery has verified every block, so the membership loop reports
    /// the node up at once rather than at its next look.
    pub all_verified: tokio::sync::Notify,
    /// Direct updates admitted and not yet answered, per client (fencing waits for
    /// them before settling the client's updates).
    inflight: Mutex<HashMap<ClientId, u32>>,
    pub aon: AonStats,
    /// What the background scrubber did.
    pub scrub: crate::scrubber::ScrubStats,
    /// Time from a request's arrival to its answer, by request kind.
    pub latencies: drs_metrics::Latencies,
    /// Refused handshakes logged at a bounded rate.
    pub refusals: drs_proto::RefusalGate,
    /// Clients that keep a cache group (from their lock requests): when their lease
    /// runs out, their locks stay until the group wrote their cache back.
    pub cache_groups: Mutex<HashMap<ClientId, Vec<NodeId>>>,
    /// Cache copies this node keeps for clients (as a member of their cache group).
    pub copies: Mutex<crate::cachegroup::Copies>,
    /// Wakes the all-or-nothing loop: a lock waits for an update to be passed on.
    pub relay_now: tokio::sync::Notify,
}

/// Counters of the all-or-nothing machinery.
#[derive(Default)]
pub struct AonStats {
    pub fenced: AtomicU64,
    pub relayed: AtomicU64,
    /// Cached blocks written back for dead clients.
    pub written_back: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Node {
    /// Opens the node's stores (replaying their logs) for every volume that places
    /// blocks on it.
    pub fn open(cfg: NodeConfig, map: ClusterMap) -> anyhow::Result<Node> {
        use anyhow::Context;
        std::fs::create_dir_all(&cfg.data_dir)
            .with_context(|| format!("create data directory {}", cfg.data_dir.display()))?;
        let incarnation = bump_incarnation(&cfg.data_dir)?;
        let mut volumes = HashMap::new();
        for v in map.volumes.iter().filter(|v| v.nodes.contains(&cfg.node)) {
            let store = VolumeStore::open(StoreConfig {
                dir: cfg.data_dir.join(format!("volume-{}", v.id)),
                node: cfg.node,
                cluster_id: map.cluster_id,
                volume: v.clone(),
                checkpoint_bytes: cfg.checkpoint_bytes,
                max_pending: cfg.max_pending,
                undo_bytes: cfg.undo_bytes,
            })
            .with_context(|| format!("open volume {}", v.id))?;
            // Updates kept over a restart (`UpdateReq::keep`) are passed on at once.
            let mut unsettled = UnsettledSet::new(cfg.unsettled_bytes);
            let geo = store.geometry().clone();
            for kept in store.kept() {
                let Some(position) = geo.position_of(kept.stripe, cfg.node) else {
                    continue;
                };
                let key = (kept.update.id.client, kept.update.id.seq);
                let entry = unsettled_entry(
                    &geo,
                    kept.stripe,
                    position as u8,
                    kept.update,
                    kept.delta,
                    0,
                );
                for (_, gone) in unsettled.add(key, entry) {
                    tracing::warn!(stripe = gone.stripe, "too many unsettled updates kept; one was given up (a scrub of its stripe settles it)");
                }
                unsettled.pin(&key);
                unsettled.hurry(&key);
            }
            volumes.insert(
                v.id,
                Volume {
                    store,
                    locks: Mutex::new(LockGroup::new()),
                    unsettled: Mutex::new(unsettled),
                    admitted: Mutex::new(InFlight::default()),
                },
            );
        }
        Ok(Node {
            cfg,
            epoch: AtomicU64::new(map.epoch),
            live_map: std::sync::RwLock::new(Arc::new(map.clone())),
            map,
            incarnation,
            volumes,
            started: Instant::now(),
            lock_stats: LockStats::default(),
            pauses: AtomicU64::new(0),
            pause_tick: AtomicU64::new(u64::MAX),
            registered: AtomicU64::new(0),
            verified_for: AtomicU64::new(0),
            all_verified: tokio::sync::Notify::new(),
            inflight: Mutex::new(HashMap::new()),
            aon: AonStats::default(),
            scrub: Default::default(),
            latencies: drs_metrics::latencies(),
            refusals: Default::default(),
            cache_groups: Mutex::new(HashMap::new()),
            copies: Mutex::new(crate::cachegroup::Copies::new(64 << 20)),
            relay_now: tokio::sync::Notify::new(),
        })
    }

    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Whether the pause watcher (`recover::watch_for_pauses`) is overdue: the process
    /// may just have come back from a pause (SIGSTOP, a frozen VM) that the watcher has
    /// not counted yet. Clients may have written around the node meanwhile, so no
    /// `Current` read is served until the watcher has marked every block unverified.
    pub fn may_have_been_paused(&self) -> bool {
        let tick = self.pause_tick.load(Ordering::Acquire);
        tick != u64::MAX
            && self.now_ms().saturating_sub(tick)
                > (PAUSE_TICK + self.cfg.pause_threshold).as_millis() as u64
    }

    /// [`read_waiting`] for a client: a `Current` read is refused (`Recovering`) when
    /// the process may have been paused before or while it read.
    async fn read_for_client(
        &self,
        store: &Arc<VolumeStore>,
        r: (StripeId, u8, u32, u32),
        mode: ReadMode,
        deadline: Instant,
    ) -> Result<(Vec<Version>, Bytes), WireError> {
        let (stripe, position, offset, len) = r;
        let current = matches!(mode, ReadMode::Current);
        let pauses = self.pauses.load(Ordering::Acquire);
        let paused =
            || self.may_have_been_paused() || self.pauses.load(Ordering::Acquire) != pauses;
        if current && paused() {
            return Err(WireError::Recovering { stripe });
        }
        let out = read_waiting(store, stripe, position, offset, len, mode, deadline).await?;
        if current && paused() {
            return Err(WireError::Recovering { stripe });
        }
        Ok(out)
    }

    fn volume(&self, id: VolumeId) -> Result<&Volume, WireError> {
        self.volumes
            .get(&id)
            .ok_or(WireError::UnknownVolume { volume: id })
    }

    /// (verified, total) blocks over all volumes.
    pub fn verified(&self) -> (u64, u64) {
        self.volumes
            .values()
            .map(|v| v.store.verified_count())
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    }

    pub fn info(&self) -> NodeInfo {
        let (verified, total) = self.verified();
        let state = if verified == total {
            NodeState::Up
        } else {
            NodeState::Recovering { verified, total }
        };
        let mut stats = NodeStats {
            locks_granted: self.lock_stats.granted.load(Ordering::Relaxed),
            locks_denied: self.lock_stats.denied.load(Ordering::Relaxed),
            pauses: self.pauses.load(Ordering::Relaxed),
            fenced: self.aon.fenced.load(Ordering::Relaxed),
            relayed: self.aon.relayed.load(Ordering::Relaxed),
            written_back: self.aon.written_back.load(Ordering::Relaxed),
            scrub_passes: self.scrub.passes.load(Ordering::Relaxed),
            scrub_checked: self.scrub.checked.load(Ordering::Relaxed),
            scrub_found: self.scrub.found.load(Ordering::Relaxed),
            scrub_repaired: self.scrub.repaired.load(Ordering::Relaxed),
            scrub_position: self.scrub.position.load(Ordering::Relaxed),
            scrub_total: self.scrub.total.load(Ordering::Relaxed),
            ..Default::default()
        };
        for v in self.volumes.values() {
            let s = &v.store.stats;
            stats.reads += s.reads.load(Ordering::Relaxed);
            stats.bytes_read += s.bytes_read.load(Ordering::Relaxed);
            stats.updates += s.updates.load(Ordering::Relaxed);
            stats.bytes_updated += s.bytes_updated.load(Ordering::Relaxed);
            stats.corrupt_found += s.corrupt_found.load(Ordering::Relaxed);
            stats.repairs_installed += s.repairs_installed.load(Ordering::Relaxed);
            stats.pending_updates += s.pending.load(Ordering::Relaxed);
            stats.wal_bytes += s.wal_bytes.load(Ordering::Relaxed);
            stats.fsyncs += s.fsyncs.load(Ordering::Relaxed);
        }
        NodeInfo {
            node: self.cfg.node,
            incarnation: self.incarnation,
            epoch: self.epoch(),
            state,
            stats,
            registered: self.registered.load(Ordering::Acquire),
        }
    }

    /// The newest cluster map epoch the node knows.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Raises the node's epoch (never lowers it).
    pub fn raise_epoch(&self, epoch: u64) {
        self.epoch.fetch_max(epoch, Ordering::AcqRel);
    }

    /// Takes a newer cluster map (from the metadata service); an older one is ignored.
    pub fn set_live_map(&self, map: ClusterMap) {
        let mut cur = self.live_map.write().unwrap_or_else(|e| e.into_inner());
        if map.cluster_id == cur.cluster_id && map.epoch > cur.epoch {
            self.raise_epoch(map.epoch);
            *cur = Arc::new(map);
        }
    }

    /// The answer to `GetMap`: the map's TOML goes in the payload.
    fn map_answer(&self) -> (Response, Bytes) {
        match self.live_map().to_toml() {
            Ok(toml) if toml.len() <= drs_proto::frame::MAX_PAYLOAD_LEN => {
                (Response::Map, Bytes::from(toml))
            }
            Ok(toml) => (
                Response::Error(WireError::Io {
                    kind: format!("cluster map of {} bytes does not fit a frame", toml.len()),
                }),
                Bytes::new(),
            ),
            Err(e) => (
                Response::Error(WireError::Io {
                    kind: format!("cluster map: {e}"),
                }),
                Bytes::new(),
            ),
        }
    }

    /// The newest cluster map the node knows.
    pub fn live_map(&self) -> Arc<ClusterMap> {
        self.live_map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The part of a request that must happen in arrival order on its connection,
    /// done before the request runs concurrently with the others: frame checks, and
    /// the lock table (a client's lock and later unlock of a block must be applied in
    /// the order it sent them, report 5.3.2).
    pub fn admit(&self, header: &FrameHeader, req: Request) -> Admitted {
        if header.cluster_id != self.map.cluster_id {
            return Admitted::Answer(Response::Error(WireError::WrongCluster {
                expected: self.map.cluster_id,
            }));
        }
        // An older epoch may not know a node is down or replaced: the sender must
        // learn the new map first. A newer one only means this node has not heard yet.
        let epoch = self.epoch();
        // Answered whatever the epoch (its payload needs the concurrent path).
        if let Request::GetMap = req {
            return Admitted::Run(req);
        }
        // A heartbeat only says the client is alive, whatever map it has: refusing it
        // for a stale epoch would let the lease of a live client run out while it
        // catches up with the map (its data requests are refused meanwhile).
        if header.epoch < epoch && !matches!(req, Request::Heartbeat(_)) {
            return Admitted::Answer(Response::Error(WireError::StaleEpoch {
                node_epoch: epoch,
                request_epoch: header.epoch,
            }));
        }
        match req {
            Request::Lock(r) => {
                self.complete(r.client, &r.completed);
                match self.grant(&r) {
                    // Most members read nothing: answered at once, with no task.
                    Ok((known, fenced)) if self.lock_read_range(&r).is_none() => {
                        Admitted::Answer(Response::Lock(LockReply {
                            known,
                            fenced,
                            read: None,
                        }))
                    }
                    Ok(known) => Admitted::Locked(r, known),
                    Err(e) => Admitted::Answer(Response::Error(e)),
                }
            }
            Request::Unlock(r) => Admitted::Answer(match self.unlock(r) {
                Ok(()) => Response::Unlocked,
                Err(e) => Response::Error(e),
            }),
            Request::Heartbeat(h) => Admitted::Answer(self.heartbeat(&h)),
            Request::Ping => Admitted::Answer(Response::Pong(self.info())),
            Request::Update(r) => match self.admit_update(&r) {
                Ok(()) => Admitted::Run(Request::Update(r)),
                Err(e) => Admitted::Answer(Response::Error(e)),
            },
            other => Admitted::Run(other),
        }
    }

    /// Answers one request (both stages). `deadline` is when the requester stops
    /// waiting.
    pub async fn handle(
        &self,
        header: &FrameHeader,
        req: Request,
        payload: Bytes,
        deadline: Instant,
    ) -> (Response, Bytes) {
        let admitted = self.admit(header, req);
        self.run(admitted, payload, deadline).await
    }

    /// The second stage of a request, after [`Node::admit`].
    pub async fn run(
        &self,
        admitted: Admitted,
        payload: Bytes,
        deadline: Instant,
    ) -> (Response, Bytes) {
        let req = match admitted {
            Admitted::Answer(r) => return (r, Bytes::new()),
            Admitted::Locked(r, known) => {
                return self.lock_read(r, known, deadline).await.unwrap_or_else(err)
            }
            Admitted::Run(req) => req,
        };
        let res = match req {
            Request::Ping => Ok((Response::Pong(self.info()), Bytes::new())),
            Request::GetMap => Ok(self.map_answer()),
            Request::Read(r) => {
                let (store, mode) = match self.volume(r.volume) {
                    Ok(v) => (v.store.clone(), r.mode),
                    Err(e) => return err(e),
                };
                self.read_for_client(
                    &store,
                    (r.stripe, r.position, r.offset, r.len),
                    mode,
                    deadline,
                )
                .await
                .map(|(versions, data)| (Response::Read(ReadReply { versions }), data))
            }
            Request::Update(r) => self.update(r, payload, deadline).await,
            Request::Repair(r) => match self.volume(r.volume) {
                Ok(v) => v
                    .store
                    .install(r.stripe, r.position, r.versions, payload, r.force)
                    .await
                    .map(|installed| (Response::Repaired(RepairReply { installed }), Bytes::new())),
                Err(e) => Err(e),
            },
            Request::List(r) => self.volume(r.volume).map(|v| {
                let now = self.now_ms();
                let (mut slots, next) =
                    v.store
                        .list(r.from_stripe, r.max.min(LIST_MAX) as usize, |s| {
                            lock(&v.locks)
                                .holders(s, now)
                                .into_iter()
                                .map(|h| LockInfo {
                                    index: h.index,
                                    owner: h.owner,
                                    client: h.client,
                                    lease_left_ms: h.lease_left_ms,
                                })
                                .collect()
                        });
                {
                    let unsettled = lock(&v.unsettled);
                    for s in &mut slots {
                        s.unsettled = unsettled.indices(s.stripe);
                    }
                }
                // An idle block's entry takes some 17 bytes (more with locks), so a
                // page of `LIST_MAX` entries does not always fit a frame.
                let next = fit_page(&mut slots, next, drs_proto::frame::CTRL_PAGE_BUDGET);
                (Response::List(ListReply { slots, next }), Bytes::new())
            }),
            r @ (Request::CachePut(_) | Request::CacheDrop(_) | Request::CacheGet(_)) => {
                crate::cachegroup::handle(self, r, payload)
            }
            // Admitted in the first stage; cancels are handled by the connection; peer
            // requests are for clients, not nodes.
            Request::Lock(_)
            | Request::Unlock(_)
            | Request::Cancel(_)
            | Request::Heartbeat(_)
            | Request::PeerRead(_)
            | Request::PeerWrite(_)
            | Request::PeerRelease(_)
            | Request::PeerDurable(_) => Err(WireError::Invalid {
                what: InvalidReason::Unexpected,
            }),
        };
        res.unwrap_or_else(err)
    }

    fn check_indices(&self, v: &Volume, indices: &[u8]) -> Result<(), WireError> {
        let k = v.store.geometry().k;
        if indices.is_empty() {
            return Err(WireError::Invalid {
                what: InvalidReason::NoBlocks,
            });
        }
        let mut seen = vec![false; k];
        for &i in indices {
            let i = i as usize;
            if i >= k {
                return Err(WireError::Invalid {
                    what: InvalidReason::IndexOutOfRange,
                });
            }
            if std::mem::replace(&mut seen[i], true) {
                return Err(WireError::Invalid {
                    what: InvalidReason::DuplicateIndex,
                });
            }
        }
        Ok(())
    }

    fn member(&self, v: &Volume, stripe: StripeId) -> Result<u8, WireError> {
        let geo = v.store.geometry();
        if stripe >= geo.stripes() {
            return Err(WireError::StripeOutOfRange {
                stripe,
                stripes: geo.stripes(),
            });
        }
        v.store.position(stripe).ok_or(WireError::NotMember {
            node: self.cfg.node,
            stripe,
            position: u8::MAX,
        })
    }

    /// Lock, report 5.3.2: grants all of the request's blocks to its owner or none;
    /// returns the versions known for them.
    fn grant(&self, r: &LockReq) -> Result<Known, WireError> {
        let v = self.volume(r.volume)?;
        self.member(v, r.stripe)?;
        self.check_indices(v, &r.indices)?;
        // Held until the grant is recorded: an update admitted meanwhile is seen here,
        // or comes after the grant (and meets the versions it skipped).
        let admitted = lock(&v.admitted);
        // No lock on a block with an update this node took and has not yet passed on
        // to every member lacking it: the next writer must build only on updates that
        // every live member has or will have, even if this node dies now (report
        // 5.3.3). The update is passed on at once; the writer retries.
        let already = {
            let g = lock(&v.locks);
            r.indices.iter().all(|i| g.owns(r.stripe, *i, r.owner))
        };
        if !already {
            // Nor while an update of the block is admitted and not answered: its
            // version is not known here yet (it becomes known, and unsettled, once
            // durable), so the next writer would be told too low a version. Its client
            // may even have released the lock meanwhile (a catch-up unlock sent when
            // this node did not answer in time).
            if let Some((index, client)) = r
                .indices
                .iter()
                .find_map(|i| admitted.any(r.stripe, *i).map(|c| (*i, c)))
            {
                self.lock_stats.denied.fetch_add(1, Ordering::Relaxed);
                return Err(WireError::Settling {
                    stripe: r.stripe,
                    index,
                    client,
                });
            }
            let mut unsettled = lock(&v.unsettled);
            let map = self.live_map();
            let geo = v.store.geometry();
            let waiting: Vec<(u8, drs_lockgroups::UpdateKey)> = r
                .indices
                .iter()
                .flat_map(|i| {
                    unsettled
                        .unoffered(r.stripe, *i)
                        .into_iter()
                        .map(|k| (*i, k))
                })
                .filter(|(_, k)| {
                    unsettled.get(k).is_some_and(|e| {
                        e.recipients.iter().any(|p| {
                            !e.confirmed.contains(p)
                                && map.node_state(geo.member(r.stripe, *p as usize)).is_up()
                        })
                    })
                })
                .collect();
            // An update that only members the map does not say are up still lack
            // needs no pass before the lock: a pass would not wait for them either
            // (aon.rs), and they compare every block with its stripe before they are
            // up. Under sustained writes with m members down, waiting for the pass
            // left writers refused for seconds behind thousands of such updates.
            // Decided at each grant against the map of the moment: once such a
            // member is up again, the pass is waited for.
            if let Some(&(index, (client, _))) = waiting.first() {
                for (_, k) in &waiting {
                    unsettled.hurry(k);
                }
                drop(unsettled);
                self.relay_now.notify_one();
                self.lock_stats.denied.fetch_add(1, Ordering::Relaxed);
                return Err(WireError::Settling {
                    stripe: r.stripe,
                    index,
                    client,
                });
            }
        }
        let who = Holder {
            owner: r.owner,
            client: r.client,
            contact: r.contact,
        };
        let granted =
            lock(&v.locks).lock(r.stripe, &r.indices, who, r.lease_ms as u64, self.now_ms());
        if granted.is_ok() && !r.cache_group.is_empty() {
            lock(&self.cache_groups).insert(r.client, r.cache_group.clone());
        }
        match granted {
            Ok(()) => {}
            Err(Refused::Held {
                index,
                owner,
                client,
                contact,
            }) => {
                self.lock_stats.denied.fetch_add(1, Ordering::Relaxed);
                return Err(WireError::Locked {
                    stripe: r.stripe,
                    index,
                    holder: owner,
                    client,
                    contact,
                });
            }
            Err(Refused::Fenced) => return Err(WireError::Fenced { client: r.client }),
            Err(Refused::NotLocked { index }) => {
                return Err(WireError::NotLocked {
                    stripe: r.stripe,
                    index,
                })
            }
        }
        self.lock_stats.granted.fetch_add(1, Ordering::Relaxed);
        // The versions the reply tells the owner to skip are refused here from now on.
        let known = v.store.note_granted(r.stripe, &r.indices, r.owner);
        drop(admitted);
        Ok(known)
    }

    /// The read half of lock-and-read (report 5.6), after the lock was granted.
    /// The range of its own block this member returns with a lock it granted: only
    /// the data node of a locked block that the lock asks to read.
    fn lock_read_range(&self, r: &LockReq) -> Option<(u32, u32)> {
        let v = self.volume(r.volume).ok()?;
        let position = self.member(v, r.stripe).ok()?;
        let mine = (position as usize) < v.store.geometry().k && r.indices.contains(&position);
        r.read.filter(|_| mine)
    }

    async fn lock_read(
        &self,
        r: LockReq,
        (known, fenced): Known,
        deadline: Instant,
    ) -> Result<(Response, Bytes), WireError> {
        let v = self.volume(r.volume)?;
        let position = self.member(v, r.stripe)?;
        let Some((offset, len)) = self.lock_read_range(&r) else {
            return Ok((
                Response::Lock(LockReply {
                    known,
                    fenced,
                    read: None,
                }),
                Bytes::new(),
            ));
        };
        if v.store.is_zero(r.stripe) {
            return Ok((
                Response::Lock(LockReply {
                    known,
                    fenced,
                    read: Some(LockRead::Zero),
                }),
                Bytes::new(),
            ));
        }
        let wait_until = deadline.min(Instant::now() + LOCK_READ_WAIT);
        let (read, data) = match self
            .read_for_client(
                &v.store,
                (r.stripe, position, offset, len),
                ReadMode::Current,
                wait_until,
            )
            .await
        {
            Ok((versions, data)) => (LockRead::Block { versions }, data),
            Err(e) => (LockRead::Failed(e), Bytes::new()),
        };
        Ok((
            Response::Lock(LockReply {
                known,
                fenced,
                read: Some(read),
            }),
            data,
        ))
    }

    fn unlock(&self, r: UnlockReq) -> Result<(), WireError> {
        let v = self.volume(r.volume)?;
        self.member(v, r.stripe)?;
        self.release(v, r.stripe, r.owner, &r.blocks);
        Ok(())
    }

    /// Releases `client`'s locks on `blocks` and records the versions it gave out: a
    /// node that missed one of its updates learns here that it is behind (and stops
    /// serving the block until it has rebuilt it). A version no member ever received
    /// (the write failed everywhere) is forgotten again after a rebuild finds nothing.
    fn release(&self, v: &Volume, stripe: StripeId, owner: u64, blocks: &[(u8, Version)]) {
        let indices: Vec<u8> = blocks.iter().map(|(i, _)| *i).collect();
        lock(&v.locks).unlock(stripe, &indices, owner);
        v.store.record_known(stripe, blocks);
        v.store.note_lock_gone(stripe, &indices, Some(owner));
    }

    /// Renews a client's lease (report 5.3.3) and takes its completion notices.
    fn heartbeat(&self, h: &HeartbeatReq) -> Response {
        self.complete(h.client, &h.completed);
        let now = self.now_ms();
        for v in self.volumes.values() {
            if lock(&v.locks)
                .renew(h.client, h.lease_ms as u64, now)
                .is_err()
            {
                return Response::Error(WireError::Fenced { client: h.client });
            }
        }
        Response::Alive {
            lease_ms: h.lease_ms,
        }
    }

    /// The client says every member holds these updates: forget them.
    fn complete(&self, client: ClientId, ids: &[UpdateId]) {
        if ids.is_empty() {
            return;
        }
        let keys: Vec<(ClientId, u64)> = ids
            .iter()
            .filter(|i| i.client == client)
            .map(|i| (i.client, i.seq))
            .collect();
        for v in self.volumes.values() {
            lock(&v.unsettled).complete(&keys);
        }
    }

    /// First stage of an update, in arrival order with locks and unlocks: a direct
    /// update must come from an unfenced client whose owner holds each block's lock.
    fn admit_update(&self, r: &UpdateReq) -> Result<(), WireError> {
        let v = self.volume(r.volume)?;
        self.member(v, r.stripe)?;
        if r.updates.is_empty() {
            return Err(WireError::Invalid {
                what: InvalidReason::NoBlocks,
            });
        }
        // Held until the update is registered as admitted: a lock granted meanwhile
        // would not see it.
        let mut admitted = lock(&v.admitted);
        if r.relay {
            for u in &r.updates {
                admitted.add(r.stripe, u.index, u.id.client);
            }
            return Ok(());
        }
        let Some(client) = r.updates.first().map(|u| u.id.client) else {
            return Ok(());
        };
        self.complete(client, &r.completed);
        {
            let mut group = lock(&v.locks);
            for u in &r.updates {
                // A cache-group member writing back for a fenced client: the client's
                // lock must still be here (the node keeps it for the write-back).
                if r.on_behalf {
                    if !group.owns(r.stripe, u.index, r.owner) {
                        return Err(WireError::NotLocked {
                            stripe: r.stripe,
                            index: u.index,
                        });
                    }
                    continue;
                }
                match group.may_update(r.stripe, u.index, r.owner, u.id.client) {
                    Ok(()) => {}
                    Err(Refused::Fenced) => {
                        return Err(WireError::Fenced {
                            client: u.id.client,
                        })
                    }
                    Err(_) => {
                        return Err(WireError::NotLocked {
                            stripe: r.stripe,
                            index: u.index,
                        })
                    }
                }
            }
            // The client was alive when it sent this: its lease runs on, even if its
            // heartbeats are late (report 5.3.3).
            if !r.on_behalf {
                group.touch(client, self.now_ms());
            }
        }
        for u in &r.updates {
            admitted.add(r.stripe, u.index, u.id.client);
            // Its base says which versions its grant here really skipped.
            v.store
                .note_owner_update(r.stripe, u.index, r.owner, u.base);
        }
        *lock(&self.inflight).entry(client).or_default() += 1;
        Ok(())
    }

    /// Direct updates of `client` admitted and not answered yet.
    pub fn inflight(&self, client: ClientId) -> u32 {
        lock(&self.inflight).get(&client).copied().unwrap_or(0)
    }

    /// Update (and update-and-unlock), report 5.3.1 and 5.6; or a relay from another
    /// member (5.3.3). Each block update is logged and applied on its own; a direct
    /// one is kept until the client says every member holds it.
    async fn update(
        &self,
        r: UpdateReq,
        payload: Bytes,
        deadline: Instant,
    ) -> Result<(Response, Bytes), WireError> {
        let client = r.updates.first().map(|u| u.id.client).unwrap_or_default();
        let _answered = self.volumes.get(&r.volume).map(|volume| Answered {
            volume,
            stripe: r.stripe,
            blocks: r.updates.iter().map(|u| (u.index, u.id.client)).collect(),
        });
        let res = if r.relay {
            match self.await_skips(&r, deadline).await {
                Ok(()) => self.apply_updates(&r, payload, deadline).await,
                Err(e) => Err(e),
            }
        } else {
            self.apply_updates(&r, payload, deadline).await
        };
        if !r.relay {
            let mut inflight = lock(&self.inflight);
            if let Some(n) = inflight.get_mut(&client) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    inflight.remove(&client);
                }
            }
        }
        res
    }

    /// A relayed update with a version that a lock granted here tentatively skipped
    /// waits until the lock's owner settled it: by its update (the relayed one is
    /// then applied, or refused as void) or by its lock going without one. The owner
    /// holds the lock, so it does either soon; past the deadline the relay is
    /// answered `Timeout`, and its sender passes it on again later.
    async fn await_skips(&self, r: &UpdateReq, deadline: Instant) -> Result<(), WireError> {
        let v = self.volume(r.volume)?;
        loop {
            let mut changed = v.store.applied();
            if !r
                .updates
                .iter()
                .any(|u| v.store.skip_undecided(r.stripe, u.index, u.version))
            {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline.into(), changed.changed())
                .await
                .is_err()
            {
                return Err(WireError::Timeout);
            }
        }
    }

    async fn apply_updates(
        &self,
        r: &UpdateReq,
        payload: Bytes,
        deadline: Instant,
    ) -> Result<(Response, Bytes), WireError> {
        let v = self.volume(r.volume)?;
        if !r.unlock.is_empty() {
            self.check_indices(v, &r.unlock.iter().map(|(i, _)| *i).collect::<Vec<_>>())?;
        }
        let total: usize = r.updates.iter().map(|u| u.len as usize).sum();
        if total != payload.len() {
            return Err(WireError::BadRange {
                offset: 0,
                len: payload.len() as u32,
                block_size: v.store.geometry().block_size as u32,
            });
        }
        let mut at = 0;
        let mut parts = Vec::with_capacity(r.updates.len());
        for u in &r.updates {
            parts.push((*u, payload.slice(at..at + u.len as usize)));
            at += u.len as usize;
        }
        let parity = r.position as usize >= v.store.geometry().k;
        let results = futures::future::join_all(parts.iter().map(|(u, d)| {
            // Kept: the block's data node did not take part (`UpdateReq::keep`).
            let keep = parity && r.keep.contains(&u.index);
            v.store
                .update(r.stripe, r.position, *u, d.clone(), keep, deadline)
        }))
        .await;
        if r.relay && parity && !r.keep.is_empty() {
            // A client asking for an update it sent to be kept (its data node failed
            // its part): kept here while this node still passes it on.
            let mut unsettled = lock(&v.unsettled);
            for ((u, _), res) in parts.iter().zip(&results) {
                let key = (u.id.client, u.id.seq);
                if res.is_ok() && r.keep.contains(&u.index) && unsettled.get(&key).is_some() {
                    unsettled.pin(&key);
                    v.store.adopt_kept(&[u.id]);
                }
            }
        }
        if !r.relay {
            let geo = v.store.geometry();
            let now = self.now_ms();
            let mut unsettled = lock(&v.unsettled);
            for ((u, d), res) in parts.iter().zip(&results) {
                if res.is_ok() {
                    let entry = unsettled_entry(geo, r.stripe, r.position, *u, d.clone(), now);
                    let key = (u.id.client, u.id.seq);
                    for (_, gone) in unsettled.add(key, entry) {
                        tracing::warn!(stripe = gone.stripe, "too many unsettled updates kept; one was given up (a scrub of its stripe settles it)");
                    }
                    if parity && r.keep.contains(&u.index) {
                        unsettled.pin(&key);
                        v.store.adopt_kept(&[u.id]);
                    }
                }
            }
            drop(unsettled);
            if !r.unlock.is_empty() {
                self.release(v, r.stripe, r.owner, &r.unlock);
            }
        }
        Ok((Response::Updated(UpdateReply { results }), Bytes::new()))
    }
}

/// The unsettled entry of an update this node (at `position`) took: to be passed on
/// to everyone who must hold it, its data node and every parity node.
fn unsettled_entry(
    geo: &Geometry,
    stripe: StripeId,
    position: u8,
    u: BlockUpdate,
    delta: Bytes,
    now_ms: u64,
) -> drs_lockgroups::Unsettled<(BlockUpdate, Bytes)> {
    let recipients: Vec<u8> = std::iter::once(u.index)
        .chain((geo.k..geo.width()).map(|p| p as u8))
        .filter(|p| *p != position)
        .collect();
    drs_lockgroups::Unsettled {
        stripe,
        index: u.index,
        recipients,
        confirmed: Default::default(),
        since_ms: now_ms,
        size: delta.len(),
        payload: (u, delta),
    }
}

/// A request after its in-order first stage.
pub enum Admitted {
    /// Already answered (an error, or an unlock).
    Answer(Response),
    /// A lock that was granted; lock-and-read may still have to read.
    Locked(LockReq, Known),
    /// Everything else, to run concurrently.
    Run(Request),
}

fn err(e: WireError) -> (Response, Bytes) {
    (Response::Error(e), Bytes::new())
}

/// Cuts a listing page to the entries whose encoding fits in `budget` bytes (at
/// least one, so a listing always moves on), and returns where the next page starts.
fn fit_page(
    slots: &mut Vec<drs_proto::SlotInfo>,
    next: Option<StripeId>,
    budget: usize,
) -> Option<StripeId> {
    let n = drs_proto::frame::fitting(slots.iter(), budget);
    match slots.get(n) {
        Some(rest) => {
            let rest = rest.stripe;
            slots.truncate(n);
            Some(rest)
        }
        None => next,
    }
}

/// A store read that waits (until `deadline`) for pending updates it must see.
pub async fn read_waiting(
    store: &Arc<VolumeStore>,
    stripe: StripeId,
    position: u8,
    offset: u32,
    len: u32,
    mode: ReadMode,
    deadline: Instant,
) -> Result<(Vec<Version>, Bytes), WireError> {
    loop {
        let mut applied = store.applied();
        let s = store.clone();
        let m = mode.clone();
        let out = tokio::task::spawn_blocking(move || s.read(stripe, position, offset, len, &m))
            .await
            .map_err(|_| WireError::ShuttingDown)??;
        match out {
            ReadOutcome::Done { versions, data } => return Ok((versions, data)),
            ReadOutcome::Wait => {
                if tokio::time::timeout_at(deadline.into(), applied.changed())
                    .await
                    .is_err()
                {
                    return Err(WireError::Timeout);
                }
            }
        }
    }
}

/// Reads, increments and durably stores the node's incarnation number.
fn bump_incarnation(dir: &std::path::Path) -> anyhow::Result<u64> {
    use anyhow::Context;
    let path = dir.join("incarnation");
    let prev = match std::fs::read_to_string(&path) {
        Ok(s) => s
            .trim()
            .parse::<u64>()
            .with_context(|| format!("{} is not a number", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    };
    let next = prev + 1;
    crate::store::headers::write_atomic(&path, next.to_string().as_bytes())
        .with_context(|| format!("write {}", path.display()))?;
    Ok(next)
}

#[cfg(test)]
mod tests {
    //! The lock grant against updates in flight and versions it skipped, driven
    //! message by message through [`Node::admit`] and [`Node::run`] (so an update can
    //! be admitted and left unanswered for as long as a test likes).

    use drs_proto::{FrameKind, HeartbeatReq, LockReq, UpdateReq};

    use super::*;

    const CLUSTER: u64 = 0xC2;

    /// Node 0 of a 2 + 1 volume: the data node of block 0 of stripe 0.
    fn node(dir: &std::path::Path) -> Node {
        let map = crate::rpc_tests::map_2_1(CLUSTER, "127.0.0.1:9".parse().unwrap());
        let n = Node::open(NodeConfig::new(0, dir.to_owned()), map).unwrap();
        n.volumes[&1].store.set_verified(0, true);
        n
    }

    fn header() -> FrameHeader {
        FrameHeader {
            kind: FrameKind::Request,
            cluster_id: CLUSTER,
            epoch: 1,
            request_id: 1,
            deadline_ms: 5000,
        }
    }

    fn lock_req(owner: u64, client: u64) -> Request {
        Request::Lock(LockReq {
            volume: 1,
            stripe: 0,
            owner,
            indices: vec![0],
            read: None,
            client,
            lease_ms: 60_000,
            completed: vec![],
            contact: None,
            cache_group: vec![],
        })
    }

    /// Version `version` (on `base`) of block 0 by `client`, update id seq 1.
    fn update(
        owner: u64,
        client: u64,
        (base, version): (Version, Version),
        relay: bool,
    ) -> Request {
        Request::Update(UpdateReq {
            volume: 1,
            stripe: 0,
            position: 0,
            owner,
            updates: vec![BlockUpdate {
                id: UpdateId { client, seq: 1 },
                index: 0,
                version,
                base,
                offset: 0,
                len: 1,
            }],
            unlock: vec![],
            relay,
            on_behalf: false,
            completed: vec![],
            keep: Vec::new(),
        })
    }

    fn deadline() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    /// Admits and runs a request; its answer.
    async fn ask(n: &Node, req: Request) -> Response {
        n.handle(&header(), req, Bytes::from_static(b"x"), deadline())
            .await
            .0
    }

    fn granted(a: Admitted) -> LockReply {
        match a {
            Admitted::Locked(_, (known, fenced)) => LockReply {
                known,
                fenced,
                read: None,
            },
            Admitted::Answer(Response::Lock(r)) => r,
            Admitted::Answer(r) => panic!("lock refused: {r:?}"),
            Admitted::Run(_) => panic!("a lock to run"),
        }
    }

    fn refused(a: Admitted) -> WireError {
        match a {
            Admitted::Answer(Response::Error(e)) => e,
            Admitted::Locked(..) | Admitted::Answer(Response::Lock(_)) => panic!("lock granted"),
            _ => panic!("not an error"),
        }
    }

    fn applied(r: &Response) -> Result<drs_proto::Applied, WireError> {
        match r {
            Response::Updated(u) => u.results[0].clone(),
            Response::Error(e) => Err(e.clone()),
            other => panic!("unexpected answer {other:?}"),
        }
    }

    #[tokio::test]
    async fn no_lock_while_an_update_of_the_block_is_admitted_and_unanswered() {
        // Client A's update is admitted (A holds the lock) and stays in the writer
        // (its log sync stalls). A, whose request timed out, counts this node as
        // failed, saw no member take the update, and releases its lock with a
        // catch-up unlock of version 0. B must not be granted the lock and told
        // version 0 while A's version 1 is about to be applied here.
        let dir = tempfile::tempdir().unwrap();
        let n = node(dir.path());
        let (a, b) = (0xA, 0xB);
        granted(n.admit(&header(), lock_req(0xA0, a)));
        let admitted = n.admit(&header(), update(0xA0, a, (0, 1), false));
        assert!(matches!(admitted, Admitted::Run(_)));
        let unlock = Request::Unlock(drs_proto::UnlockReq {
            volume: 1,
            stripe: 0,
            owner: 0xA0,
            blocks: vec![(0, 0)],
        });
        assert!(matches!(ask(&n, unlock).await, Response::Unlocked));
        assert!(matches!(
            refused(n.admit(&header(), lock_req(0xB0, b))),
            WireError::Settling {
                index: 0,
                client: 0xA,
                ..
            }
        ));
        // The update is answered: it is durable and unsettled here (no completion
        // notice yet), so the lock still waits, until A says every member holds it.
        let (r, _) = n.run(admitted, Bytes::from_static(b"x"), deadline()).await;
        assert_eq!(applied(&r).map(|x| x.applied), Ok(true));
        assert!(matches!(
            refused(n.admit(&header(), lock_req(0xB0, b))),
            WireError::Settling { .. }
        ));
        let hb = Request::Heartbeat(HeartbeatReq {
            client: a,
            lease_ms: 60_000,
            completed: vec![UpdateId { client: a, seq: 1 }],
        });
        assert!(matches!(ask(&n, hb).await, Response::Alive { .. }));
        let reply = granted(n.admit(&header(), lock_req(0xB0, b)));
        assert_eq!(reply.known, vec![(0, 1)], "B builds on A's version 1");
        assert!(n.volumes[&1].admitted.lock().unwrap().is_empty());
    }

    /// An update a member lacks holds locks on its block until it was passed on
    /// (`Settling`). When the only members lacking it are down in the map, nothing is
    /// waited for: a pass would not wait for them either, and under sustained writes
    /// with m members down, writers were refused for seconds behind thousands of
    /// such updates.
    #[tokio::test]
    async fn an_update_only_down_members_lack_does_not_hold_the_next_lock() {
        let dir = tempfile::tempdir().unwrap();
        let n = node(dir.path());
        let (a, b) = (0xA, 0xB);
        granted(n.admit(&header(), lock_req(0xA0, a)));
        let mut up = update(0xA0, a, (0, 1), false);
        if let Request::Update(u) = &mut up {
            u.unlock = vec![(0, 1)];
        }
        assert_eq!(applied(&ask(&n, up).await).map(|x| x.applied), Ok(true));
        // The parity node (node 2) lacks it and is up: B waits for the pass.
        assert!(matches!(
            refused(n.admit(&header(), lock_req(0xB0, b))),
            WireError::Settling { client: 0xA, .. }
        ));
        // Node 2 is declared down.
        let mut map = n.live_map().as_ref().clone();
        map.epoch += 1;
        map.nodes[2].state = drs_proto::MemberState::Down;
        n.set_live_map(map);
        let mut h = header();
        h.epoch = n.epoch();
        let reply = granted(n.admit(&h, lock_req(0xB0, b)));
        assert_eq!(reply.known, vec![(0, 1)], "B builds on A's version 1");
        // The update stays unsettled here, to be passed on when node 2 is back.
        assert_eq!(n.volumes[&1].unsettled.lock().unwrap().len(), 1);
        let unlock = Request::Unlock(drs_proto::UnlockReq {
            volume: 1,
            stripe: 0,
            owner: 0xB0,
            blocks: vec![(0, 0)],
        });
        assert!(matches!(
            n.handle(&h, unlock, Bytes::new(), deadline()).await.0,
            Response::Unlocked
        ));
        // Node 2 is up again: the next lock waits for the pass once more.
        let mut map = n.live_map().as_ref().clone();
        map.epoch += 1;
        map.nodes[2].state = drs_proto::MemberState::Up;
        n.set_live_map(map);
        h.epoch = n.epoch();
        assert!(matches!(
            refused(n.admit(&h, lock_req(0xC0, 0xC))),
            WireError::Settling { client: 0xA, .. }
        ));
    }

    #[tokio::test]
    async fn no_lock_while_a_relay_of_the_block_is_admitted_and_unanswered() {
        // A relay being logged here is neither known nor refused yet: a grant now
        // would report too low a version, or skip one about to be applied.
        let dir = tempfile::tempdir().unwrap();
        let n = node(dir.path());
        let admitted = n.admit(&header(), update(0, 0xA, (0, 1), true));
        assert!(matches!(admitted, Admitted::Run(_)));
        assert!(matches!(
            refused(n.admit(&header(), lock_req(0xB0, 0xB))),
            WireError::Settling { .. }
        ));
        let (r, _) = n.run(admitted, Bytes::from_static(b"x"), deadline()).await;
        assert_eq!(applied(&r).map(|x| x.applied), Ok(true));
        let reply = granted(n.admit(&header(), lock_req(0xB0, 0xB)));
        assert_eq!(reply.known, vec![(0, 1)]);
    }

    /// Client A holds the lock on block 0 here and is fenced (its lease ran out); it
    /// may have given out version 1 to a member whose log sync stalled. B is granted
    /// the lock with that hint.
    fn fenced_a_then_b_granted(n: &Node, a: u64, b: u64) {
        granted(n.admit(&header(), lock_req(0xA0, a)));
        let v = &n.volumes[&1];
        let mut g = v.locks.lock().unwrap();
        g.fence(a, n.now_ms());
        assert_eq!(g.release_client(a), vec![(0, 0)]);
        drop(g);
        v.store.note_fenced(0, &[0]);
        v.store.note_lock_gone(0, &[0], None);
        let reply = granted(n.admit(&header(), lock_req(0xB0, b)));
        assert_eq!((reply.known, reply.fenced), (vec![(0, 0)], vec![(0, 1)]));
    }

    async fn version_here(n: &Node) -> Vec<Version> {
        let store = &n.volumes[&1].store;
        read_waiting(store, 0, 0, 0, 1, ReadMode::Current, deadline())
            .await
            .unwrap()
            .0
    }

    #[tokio::test]
    async fn a_relay_of_a_version_a_granted_lock_skipped_is_refused() {
        // A's version 1, relayed by the stalled member when its stall ends, arrives
        // before B's update: it waits for it. B's update is built on 0, so version 1
        // is void: the relay is refused (its sender counts that as held, and drops
        // it), and B's update applies. Applied, version 1 would hold B's update
        // pending here for ever.
        let dir = tempfile::tempdir().unwrap();
        let n = node(dir.path());
        let (a, b) = (0xA, 0xB);
        fenced_a_then_b_granted(&n, a, b);
        let relay = n.admit(&header(), update(0, a, (0, 1), true));
        assert!(matches!(relay, Admitted::Run(_)));
        let mine = Request::Update(UpdateReq {
            unlock: vec![(0, 2)],
            ..match update(0xB0, b, (0, 2), false) {
                Request::Update(u) => u,
                _ => unreachable!(),
            }
        });
        let (relayed, updated) = tokio::join!(
            async { n.run(relay, Bytes::from_static(b"x"), deadline()).await.0 },
            async {
                // B paused before sending: the relay waits meanwhile.
                tokio::time::sleep(Duration::from_millis(100)).await;
                ask(&n, mine).await
            }
        );
        assert!(
            matches!(
                applied(&relayed),
                Err(WireError::StaleVersion {
                    current: _,
                    got: 1,
                    ..
                })
            ),
            "{relayed:?}"
        );
        assert_eq!(applied(&updated).map(|x| x.applied), Ok(true));
        assert_eq!(version_here(&n).await, vec![2, 0]);
    }

    #[tokio::test]
    async fn a_relay_raced_by_a_failed_lock_attempt_is_applied() {
        // The relay of A's version 1 arrives while B's lock attempt holds the grant
        // here; that attempt fails at another member (the stalled member answers
        // `Settling`: it is passing version 1 on) and B releases it. B skipped
        // nothing: version 1 is applied here, and B's next attempt builds on it.
        let dir = tempfile::tempdir().unwrap();
        let n = node(dir.path());
        let (a, b) = (0xA, 0xB);
        fenced_a_then_b_granted(&n, a, b);
        let relay = n.admit(&header(), update(0, a, (0, 1), true));
        let release = Request::Unlock(drs_proto::UnlockReq {
            volume: 1,
            stripe: 0,
            owner: 0xB0,
            blocks: vec![(0, 0)],
        });
        let (relayed, released) = tokio::join!(
            async { n.run(relay, Bytes::from_static(b"x"), deadline()).await.0 },
            async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                ask(&n, release).await
            }
        );
        assert!(matches!(released, Response::Unlocked));
        assert_eq!(applied(&relayed).map(|x| x.applied), Ok(true));
        let reply = granted(n.admit(&header(), lock_req(0xB0, b)));
        assert_eq!((reply.known, reply.fenced), (vec![(0, 1)], vec![]));
        assert_eq!(version_here(&n).await, vec![1, 0]);
    }

    /// A process back from a pause may run requests that queued meanwhile before its
    /// pause watcher notices the pause. While the watcher is overdue, no `Current` read
    /// is served (clients may have written around the node); `Applied` reads, which
    /// carry their versions for the reader to check, still are.
    #[tokio::test]
    async fn no_current_read_while_the_pause_watcher_is_overdue() {
        let dir = tempfile::tempdir().unwrap();
        let n = node(dir.path());
        let read = |mode| {
            Request::Read(drs_proto::ReadReq {
                volume: 1,
                stripe: 0,
                position: 0,
                offset: 0,
                len: 16,
                mode,
            })
        };
        let ask = |mode| {
            let admitted = n.admit(&header(), read(mode));
            async { n.run(admitted, Bytes::new(), deadline()).await.0 }
        };
        let served = |r: &Response| matches!(r, Response::Read(_));
        // No watcher runs (as here, in a unit test): reads are served.
        assert!(served(&ask(ReadMode::Current).await));
        // The watcher ran on time.
        n.pause_tick.store(n.now_ms(), Ordering::Release);
        assert!(served(&ask(ReadMode::Current).await));
        assert!(!n.may_have_been_paused());
        // It has not run since, for longer than a pause it would count.
        tokio::time::sleep(PAUSE_TICK + n.cfg.pause_threshold + Duration::from_millis(50)).await;
        assert!(n.may_have_been_paused());
        assert_eq!(
            ask(ReadMode::Current).await,
            Response::Error(WireError::Recovering { stripe: 0 })
        );
        assert!(served(&ask(ReadMode::Applied).await));
        // Back on time: served again.
        n.pause_tick.store(n.now_ms(), Ordering::Release);
        assert!(served(&ask(ReadMode::Current).await));
    }
}
