//! One metadata replica: [`MetaNode`] owns the Raft instance, the listener that serves
//! Raft traffic and client requests, and the failure detector.
//!
//! Leader-only requests (Propose, Read, Heartbeat, Watch, AddReplica, RemoveReplica) are
//! answered with `ForwardToLeader` elsewhere; [`MetaClient`] follows
//! the hint. Every wait is bounded: a request by the deadline its caller sent (capped),
//! a connection by an idle timeout, the number of connections by a semaphore.
//!
//! Failure detector (run by whichever replica leads): heartbeat arrival times are kept in
//! memory per node and incarnation, by every replica (nodes send heartbeats to all of
//! them). Every [`DETECTOR_TICK`], a node that is `Up` or `Recovering` and has not been
//! heard from for `down_after_ms` is proposed `MarkDown` at its current incarnation.
//! "Heard from" counts from the latest of: its last heartbeat at its current
//! incarnation (taken as leader or as follower), the moment this leader first saw that
//! incarnation, and two thirds of `down_after_ms` before this replica became leader. So
//! a node that dies with the leader is marked down about `down_after_ms` after its last
//! heartbeat (or a third of it after the election, if later), and every node has at
//! least a third of `down_after_ms` (two heartbeats) after an election to reach the
//! new leader.
//!
//! Mount sessions (run by whichever replica leads): a mount's heartbeat is an
//! `FsQuery::Session`; its arrival is kept in memory by the replica that answers it.
//! A session not heard from for `session_expiry_ms` (counting from no earlier than
//! this replica's election) is ended with `FsCommand::EndSession`: its opens are
//! closed and the blocks held for it freed. A mount stops using its block maps long
//! before that (see `drs_fuse::ops`), so the expiry must exceed that guard plus the
//! longest operation.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use drs_proto::map::ClusterMap;
use drs_proto::NodeId;
use futures::{SinkExt, StreamExt};
use openraft::error::{
    CheckIsLeaderError, ClientWriteError, ForwardToLeader, InitializeError, InstallSnapshotError,
    RaftError,
};
use openraft::{BasicNode, ChangeMembers, Membership, ServerState, SnapshotPolicy};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

use crate::client::{ClientConfig, MetaClient};
use crate::error::MetaError;
use crate::net::{
    self, decode_message, encode_message, HeartbeatAck, MetaStatus, NetworkFactory, Request,
    RequestEnvelope, Response, WireError,
};
use crate::state::{MetaCommand, MetaResponse, MetaState, NodeState, Proposal, Refusal, ReplicaId};
use crate::store;
use crate::Raft;

/// How often the leader's failure detector looks at the nodes.
pub const DETECTOR_TICK: Duration = Duration::from_millis(250);
/// How long a silent mount session lives by default (see [`MetaConfig::session_expiry_ms`]).
pub const DEFAULT_SESSION_EXPIRY: Duration = Duration::from_secs(90);
/// Longest a request may ask a replica to wait.
const MAX_REQUEST_WAIT: Duration = Duration::from_secs(60);
/// Longest a watch waits before answering with the current state.
const MAX_WATCH_WAIT: Duration = Duration::from_secs(30);
/// A connection with no request for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Time to write one response.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent connections served by one replica.
const MAX_CONNECTIONS: usize = 512;
/// How long `shutdown` waits for tasks and for the database to be released.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);

/// A replica's configuration.
#[derive(Debug, Clone)]
pub struct MetaConfig {
    /// This replica's Raft id (unique among the metadata replicas).
    pub id: ReplicaId,
    /// Where to listen (port 0: any; see [`MetaNode::local_addr`]).
    pub addr: SocketAddr,
    /// Where the database lives (created if missing).
    pub dir: PathBuf,
    /// Requests carrying another cluster id are refused.
    pub cluster_id: u64,
    /// Leader heartbeat (and AppendEntries timeout), ms.
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// A node silent for this long is marked down by the leader.
    pub down_after_ms: u64,
    /// A mount session silent for this long is ended by the leader.
    pub session_expiry_ms: u64,
    /// Build a snapshot (and purge the log) after this many applied entries. A
    /// snapshot copies the whole namespace (the state machine itself is persisted a
    /// changed record at a time), so this is not small.
    pub snapshot_after_logs: u64,
    /// Entries kept in the log behind the snapshot, for slow followers.
    pub logs_kept_after_snapshot: u64,
    /// Longest a proposal waits to be applied.
    pub propose_timeout_ms: u64,
    /// Persist the state machine every this many applied entries (the log
    /// holds the rest; see `StateMachine::set_persist_every`).
    pub sm_persist_every: u64,
    /// The cluster key every connection proves (open: none).
    pub key: drs_proto::ClusterKey,
    /// Encoded bytes of the namespace past which the leader refuses commands that
    /// grow it (`NoSpace`): a snapshot holds the whole namespace and must stay under
    /// [`crate::store::MAX_STATE_LEN`] (one a replica could not write would stop
    /// every replica), and every replica holds it in memory. Default
    /// [`NAMESPACE_LIMIT`].
    pub namespace_limit: usize,
}

/// The default [`MetaConfig::namespace_limit`]: 64 MiB encoded, about a million
/// small files. Every replica keeps the namespace in memory (a few times its encoded
/// size) and a snapshot is a copy of it, so this bounds a replica's memory.
pub const NAMESPACE_LIMIT: usize = 64 << 20;

/// Snapshots larger than a frame travel in chunks of this size.
const SNAPSHOT_CHUNK: usize = 4 << 20;

impl MetaConfig {
    /// A configuration with the default timings.
    pub fn new(id: ReplicaId, addr: SocketAddr, dir: PathBuf, cluster_id: u64) -> MetaConfig {
        MetaConfig {
            id,
            addr,
            dir,
            cluster_id,
            heartbeat_ms: 150,
            election_timeout_min_ms: 750,
            election_timeout_max_ms: 1500,
            down_after_ms: 3000,
            session_expiry_ms: DEFAULT_SESSION_EXPIRY.as_millis() as u64,
            snapshot_after_logs: 10_000,
            logs_kept_after_snapshot: 200,
            propose_timeout_ms: 5000,
            sm_persist_every: 256,
            key: drs_proto::ClusterKey::open(),
            namespace_limit: NAMESPACE_LIMIT,
        }
    }

    fn raft_config(&self) -> Result<openraft::Config, MetaError> {
        // Room beside the namespace in a snapshot: the remembered answers, the map.
        if self.namespace_limit > crate::store::MAX_STATE_LEN - (64 << 20) {
            return Err(MetaError::Config(format!(
                "namespace limit {} is more than a snapshot can hold",
                self.namespace_limit
            )));
        }
        let config = openraft::Config {
            cluster_name: format!("drs-{:016x}", self.cluster_id),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            // Per chunk, and the last one's answer waits for the whole install.
            install_snapshot_timeout: 30_000,
            snapshot_max_chunk_size: SNAPSHOT_CHUNK as u64,
            max_payload_entries: 256,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_after_logs.max(1)),
            max_in_snapshot_log_to_keep: self.logs_kept_after_snapshot,
            ..Default::default()
        };
        config
            .validate()
            .map_err(|e| MetaError::Config(e.to_string()))
    }
}

/// One metadata replica. Cheap to clone. Call [`MetaNode::shutdown`] to stop it: dropping
/// the handles does not stop its tasks.
#[derive(Clone)]
pub struct MetaNode {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: MetaConfig,
    local_addr: SocketAddr,
    raft: Raft,
    state_rx: watch::Receiver<Arc<MetaState>>,
    /// The file system state, shared with the state machine.
    fs: crate::fs::SharedFs,
    isolated: Arc<AtomicBool>,
    /// node -> (incarnation, arrival) of its latest heartbeat.
    heartbeats: Mutex<HashMap<NodeId, (u64, Instant)>>,
    /// mount session -> arrival of its latest heartbeat.
    sessions: Mutex<HashMap<crate::fs::SessionId, Instant>>,
    /// Sessions this leader decided to end: their heartbeats are answered
    /// `NoSession` from then on, so no mount learns it is alive while its
    /// `EndSession` is on its way.
    ending: Mutex<HashSet<crate::fs::SessionId>>,
    cancel: CancellationToken,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    db: Weak<redb::Database>,
    connections: Arc<Semaphore>,
    /// Refused handshakes logged at a bounded rate.
    refusals: drs_proto::RefusalGate,
    /// The namespace's size as the leader last measured it, for admission.
    room: Mutex<Room>,
    /// Snapshot chunks received (`InstallSnapshot`: snapshots larger than a frame).
    snapshot_chunks: std::sync::atomic::AtomicU64,
}

/// The leader's view of the namespace's encoded size: measured now and then (a walk
/// of the whole namespace), plus upper bounds of what admitted commands add: those
/// admitted since the measurement, and those that were still on their way when it
/// was taken (they may have been applied after it).
#[derive(Default)]
struct Room {
    measured: usize,
    at: Option<Instant>,
    /// Bounds of the commands admitted since the measurement.
    admitted: usize,
    /// Bounds of the commands on their way when the measurement was taken.
    carried: usize,
    /// Bounds of the commands admitted and not yet answered.
    in_flight: usize,
    /// Bounds of commands whose proposal failed or timed out: they may still be
    /// applied (a stalled commit), so they count for [`ROOM_UNSURE_FOR`].
    unsure: std::collections::VecDeque<(Instant, usize)>,
    /// A measurement is under way (one at a time).
    measuring: bool,
    /// How long the last measurement took.
    walk: Duration,
    /// The Raft term this leader measured in: a new term measures afresh, once what
    /// earlier leaders committed is applied here.
    term: u64,
    /// When a refusal was last logged.
    logged: Option<Instant>,
}

impl Room {
    fn total(&self, grows: usize) -> usize {
        let unsure: usize = self.unsure.iter().map(|(_, g)| *g).sum();
        self.measured
            .saturating_add(self.carried)
            .saturating_add(self.admitted)
            .saturating_add(unsure)
            .saturating_add(grows)
    }
}

/// How long the bound of a command whose proposal failed or timed out still counts.
const ROOM_UNSURE_FOR: Duration = Duration::from_secs(30);

/// Measure again once admitted commands may have added this much, or an eighth of
/// the room left at the last measurement if that is more (the bounds are generous: a
/// measurement gives back what they overstated). A measurement walks the whole
/// namespace, so far from the limit it runs seldom, and more often as room runs out.
const ROOM_MEASURE_AFTER: usize = 1 << 20;
/// Over the limit, measure again at most this often (the namespace may have shrunk),
/// or ten times as long as the last walk took if that is longer, so a stream of
/// refusals does not walk it for each.
const ROOM_REMEASURE_OVER: Duration = Duration::from_millis(100);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn parse_addr(node: &BasicNode) -> Option<SocketAddr> {
    node.addr.parse().ok()
}

fn voters(m: &Membership<u64, BasicNode>) -> BTreeMap<ReplicaId, SocketAddr> {
    m.voter_ids()
        .filter_map(|id| Some((id, m.get_node(&id).and_then(parse_addr)?)))
        .collect()
}

impl MetaNode {
    /// Opens the database under `cfg.dir`, starts Raft and listens on `cfg.addr`.
    pub async fn start(cfg: MetaConfig) -> Result<MetaNode, MetaError> {
        let raft_config = cfg.raft_config()?;
        std::fs::create_dir_all(&cfg.dir).map_err(|source| MetaError::Dir {
            path: cfg.dir.clone(),
            source,
        })?;
        let dir = cfg.dir.clone();
        let (log, mut sm) = tokio::task::spawn_blocking(move || store::open(&dir))
            .await
            .map_err(|e| MetaError::Start(e.to_string()))??;
        sm.set_persist_every(cfg.sm_persist_every);
        let state_rx = sm.subscribe();
        let fs = sm.fs();
        let db = log.db_weak();
        let listener = TcpListener::bind(cfg.addr)
            .await
            .map_err(|source| MetaError::Bind {
                addr: cfg.addr,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| MetaError::Bind {
            addr: cfg.addr,
            source,
        })?;
        let isolated = Arc::new(AtomicBool::new(false));
        let network = NetworkFactory::new(cfg.cluster_id, cfg.key.clone(), isolated.clone());
        let raft = Raft::new(cfg.id, Arc::new(raft_config), network, log, sm)
            .await
            .map_err(|e| MetaError::Start(e.to_string()))?;
        tracing::info!(replica = cfg.id, addr = %local_addr, dir = %cfg.dir.display(), "metadata replica started");
        let inner = Arc::new(Inner {
            cfg,
            local_addr,
            raft,
            state_rx,
            fs,
            isolated,
            heartbeats: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            ending: Mutex::new(HashSet::new()),
            cancel: CancellationToken::new(),
            tasks: Mutex::new(Vec::new()),
            db,
            connections: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            refusals: Default::default(),
            room: Mutex::new(Room::default()),
            snapshot_chunks: Default::default(),
        });
        let serve = tokio::spawn(serve(inner.clone(), listener));
        let detector = tokio::spawn(failure_detector(inner.clone()));
        let reaper = tokio::spawn(session_reaper(inner.clone()));
        lock(&inner.tasks).extend([serve, detector, reaper]);
        Ok(MetaNode { inner })
    }

    pub fn id(&self) -> ReplicaId {
        self.inner.cfg.id
    }

    /// The address this replica listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// The Raft handle (for diagnostics and tests).
    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// First bootstrap of the group, idempotent: initializes Raft with `replicas` (unless
    /// this replica already belongs to a group), then has the leader apply
    /// `Bootstrap { map }` (unless the state is already bootstrapped). May be called on
    /// one replica or on all of them with the same arguments; the others must be
    /// started. Waits up to about 15 s for a leader.
    pub async fn initialize(
        &self,
        replicas: BTreeMap<ReplicaId, SocketAddr>,
        map: ClusterMap,
    ) -> Result<(), MetaError> {
        let cfg = &self.inner.cfg;
        if !replicas.contains_key(&cfg.id) {
            return Err(MetaError::Config(format!(
                "replica {} is not in the replica set {:?}",
                cfg.id,
                replicas.keys().collect::<Vec<_>>()
            )));
        }
        if map.cluster_id != cfg.cluster_id {
            return Err(MetaError::WrongCluster {
                ours: cfg.cluster_id,
                theirs: map.cluster_id,
            });
        }
        map.validate()
            .map_err(|e| MetaError::Bootstrap(e.to_string()))?;
        let members: BTreeMap<u64, BasicNode> = replicas
            .iter()
            .map(|(id, addr)| (*id, BasicNode::new(addr)))
            .collect();
        match self.inner.raft.initialize(members).await {
            Ok(()) => tracing::info!(replica = cfg.id, ?replicas, "raft group initialized"),
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {
                tracing::debug!(replica = cfg.id, "raft group already initialized")
            }
            Err(e) => return Err(MetaError::Raft(e.to_string())),
        }
        if self.inner.state_rx.borrow().is_bootstrapped() {
            return Ok(());
        }
        let client = MetaClient::with_config(
            replicas.values().copied().collect(),
            cfg.cluster_id,
            ClientConfig {
                deadline: Duration::from_secs(15),
                key: cfg.key.clone(),
                ..ClientConfig::default()
            },
        );
        match client.propose(MetaCommand::Bootstrap { map }).await? {
            MetaResponse::Refused(Refusal::AlreadyBootstrapped { cluster_id })
                if cluster_id == cfg.cluster_id =>
            {
                Ok(())
            }
            MetaResponse::Refused(r) => Err(MetaError::Bootstrap(r.to_string())),
            _ => Ok(()),
        }
    }

    /// This replica's own view (no consensus).
    pub fn status(&self) -> MetaStatus {
        self.inner.status()
    }

    /// Snapshot chunks this replica received: snapshots larger than a frame come in
    /// chunks, smaller ones whole.
    pub fn snapshot_chunks_received(&self) -> u64 {
        self.inner.snapshot_chunks.load(Ordering::Relaxed)
    }

    /// The file system namespace as applied on this replica (not a linearizable
    /// read: see `MetaClient::fs_query`).
    pub fn fs(&self) -> crate::fs::SharedFs {
        self.inner.fs.share()
    }

    /// The applied state, updated after every applied batch.
    pub fn state(&self) -> watch::Receiver<Arc<MetaState>> {
        self.inner.state_rx.clone()
    }

    /// Whether this replica currently believes it leads.
    pub fn is_leader(&self) -> bool {
        self.inner.is_leader()
    }

    /// Proposes a command here; only the leader accepts (others answer
    /// [`MetaError::ForwardToLeader`]). Waits up to `propose_timeout_ms`.
    pub async fn propose(&self, cmd: MetaCommand) -> Result<MetaResponse, MetaError> {
        let wait = Duration::from_millis(self.inner.cfg.propose_timeout_ms);
        self.inner.propose(Proposal { nonce: 0, cmd }, wait).await
    }

    /// Fault injection for tests: while set, this replica sends no Raft RPC and drops
    /// every Raft request it receives unanswered. Client requests are still served.
    pub fn set_isolated(&self, isolated: bool) {
        tracing::info!(replica = self.inner.cfg.id, isolated, "isolation switch");
        self.inner.isolated.store(isolated, Ordering::Relaxed);
    }

    /// Stops serving, shuts Raft down and waits (bounded) until the database file is
    /// released, so the same directory can be opened again.
    pub async fn shutdown(&self) -> Result<(), MetaError> {
        let inner = &self.inner;
        inner.cancel.cancel();
        let raft_res = tokio::time::timeout(SHUTDOWN_WAIT, inner.raft.shutdown()).await;
        let tasks: Vec<JoinHandle<()>> = lock(&inner.tasks).drain(..).collect();
        for t in tasks {
            let _ = tokio::time::timeout(SHUTDOWN_WAIT, t).await;
        }
        let started = Instant::now();
        while inner.db.strong_count() > 0 && started.elapsed() < SHUTDOWN_WAIT {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::info!(replica = inner.cfg.id, "metadata replica stopped");
        match raft_res {
            Err(_) => Err(MetaError::Timeout("raft shutdown".into())),
            Ok(Err(e)) => Err(MetaError::Raft(e.to_string())),
            Ok(Ok(())) if inner.db.strong_count() > 0 => Err(MetaError::Timeout(
                "database still in use after shutdown".into(),
            )),
            Ok(Ok(())) => Ok(()),
        }
    }
}

impl Inner {
    fn is_leader(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.state == ServerState::Leader && m.current_leader == Some(self.cfg.id)
    }

    /// Leader, and a quorum acknowledged it within the shortest election timeout: a
    /// leader cut off from the others (which may have elected another) stops taking
    /// heartbeats, so nodes move on to the leader whose failure detector counts.
    fn leads_with_quorum(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow();
        let alone = m.membership_config.membership().voter_ids().count() <= 1;
        m.state == ServerState::Leader
            && m.current_leader == Some(self.cfg.id)
            && (alone
                || m.millis_since_quorum_ack
                    .is_some_and(|ms| ms <= self.cfg.election_timeout_min_ms))
    }

    /// The term this replica leads in with a quorum (see
    /// [`Inner::leads_with_quorum`]), if it does.
    fn leading_term(&self) -> Option<u64> {
        let term = {
            let m = self.raft.metrics();
            let m = m.borrow();
            (m.state == ServerState::Leader && m.current_leader == Some(self.cfg.id))
                .then_some(m.current_term)
        };
        term.filter(|_| self.leads_with_quorum())
    }

    fn addr_of(&self, id: ReplicaId) -> Option<SocketAddr> {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.membership_config
            .membership()
            .get_node(&id)
            .and_then(parse_addr)
    }

    fn forward(&self, f: Option<ForwardToLeader<u64, BasicNode>>) -> MetaError {
        let (id, node) = match f {
            Some(f) => (f.leader_id, f.leader_node),
            None => (self.raft.metrics().borrow().current_leader, None),
        };
        // A replica that believes it leads but cannot act has no useful hint.
        let id = id.filter(|id| *id != self.cfg.id);
        MetaError::ForwardToLeader {
            leader: id.map(|id| {
                let addr = node
                    .as_ref()
                    .and_then(parse_addr)
                    .or_else(|| self.addr_of(id));
                (id, addr)
            }),
        }
    }

    fn status(&self) -> MetaStatus {
        let m = self.raft.metrics();
        let m = m.borrow();
        let membership = m.membership_config.membership();
        let members = voters(membership);
        let learners = membership
            .learner_ids()
            .filter_map(|id| Some((id, membership.get_node(&id).and_then(parse_addr)?)))
            .collect();
        MetaStatus {
            id: self.cfg.id,
            role: m.state.into(),
            leader: m.current_leader,
            term: m.current_term,
            last_applied: m.last_applied.map_or(0, |l| l.index),
            epoch: self.state_rx.borrow().epoch,
            members,
            learners,
        }
    }

    /// Whether a command that grows the namespace by at most `grows` bytes fits under
    /// [`MetaConfig::namespace_limit`]; admitted ones are counted until the next
    /// measurement. Admission, not the deterministic apply, decides this, so replicas
    /// never disagree about a command: every one in the log is applied.
    fn room_for(&self, grows: usize) -> bool {
        let limit = self.cfg.namespace_limit;
        // (admitted before the walk, on its way at the walk) when this call measures.
        let measure = {
            let mut room = lock(&self.room);
            while room
                .unsure
                .front()
                .is_some_and(|(t, _)| t.elapsed() >= ROOM_UNSURE_FOR)
            {
                room.unsure.pop_front();
            }
            let age = room.at.map(|t| t.elapsed());
            let left = limit.saturating_sub(room.measured.saturating_add(room.carried));
            // Over the limit, not more than a tenth of the time walking.
            let again = ROOM_REMEASURE_OVER.max(room.walk * 10);
            let stale = age.is_none()
                || room.admitted >= ROOM_MEASURE_AFTER.max(left / 8)
                || (room.total(grows) > limit && age.is_none_or(|a| a >= again));
            if stale && !room.measuring {
                room.measuring = true;
                Some((room.admitted, room.in_flight))
            } else {
                None
            }
        };
        if let Some((before, on_the_way)) = measure {
            // The walk holds the namespace's read lock (the state machine's applies
            // wait for it), not the admission lock; until it ends the old numbers
            // count, with everything admitted meanwhile.
            let started = Instant::now();
            let measured = self.fs.read().encoded_len();
            let mut room = lock(&self.room);
            room.walk = started.elapsed();
            room.measured = measured;
            // What was admitted before the walk is in it, unless it was still on its
            // way (it may have been applied after the walk read it).
            room.admitted = room.admitted.saturating_sub(before);
            room.carried = on_the_way;
            room.at = Some(Instant::now());
            room.measuring = false;
        }
        let mut room = lock(&self.room);
        if room.total(grows) > limit {
            if room
                .logged
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
            {
                room.logged = Some(Instant::now());
                tracing::warn!(
                    bytes = room.measured,
                    limit,
                    "the namespace is at its size limit: commands that grow it are refused (ENOSPC)"
                );
            }
            return false;
        }
        room.admitted = room.admitted.saturating_add(grows);
        room.in_flight = room.in_flight.saturating_add(grows);
        true
    }

    async fn propose(&self, p: Proposal, wait: Duration) -> Result<MetaResponse, MetaError> {
        // Only the leader admits (a follower's `client_write` forwards to it).
        let grows = match &p.cmd {
            MetaCommand::Fs(c) if self.is_leader() => c.grows_by(&self.fs.read()),
            _ => None,
        };
        if let Some(g) = grows {
            // A new term: what earlier leaders committed is applied here (a
            // linearizable read waits for this leader's first entry) before the
            // namespace is measured in it.
            let term = self.raft.metrics().borrow().current_term;
            if lock(&self.room).term != term {
                self.read(wait).await?;
                let mut room = lock(&self.room);
                if room.term != term {
                    *room = Room {
                        term,
                        ..Room::default()
                    };
                }
            }
            if !self.room_for(g) {
                return Ok(MetaResponse::Fs(Err(crate::fs::FsError::NoSpace)));
            }
        }
        let written = tokio::time::timeout(wait, self.raft.client_write(p)).await;
        if let Some(g) = grows {
            let mut room = lock(&self.room);
            room.in_flight = room.in_flight.saturating_sub(g);
            if !matches!(written, Ok(Ok(_))) {
                // It may still be applied: keep counting it for a while.
                room.unsure.push_back((Instant::now(), g));
            }
        }
        match written {
            Err(_) => Err(MetaError::Timeout(format!(
                "proposal not applied within {} ms",
                wait.as_millis()
            ))),
            Ok(Ok(resp)) => Ok(resp.data),
            Ok(Err(e)) => Err(self.write_error(e)),
        }
    }

    fn write_error(&self, e: RaftError<u64, ClientWriteError<u64, BasicNode>>) -> MetaError {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => self.forward(Some(f)),
            RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
                MetaError::Membership(e.to_string())
            }
            RaftError::Fatal(openraft::error::Fatal::Stopped) => MetaError::ShuttingDown,
            RaftError::Fatal(f) => MetaError::Raft(f.to_string()),
        }
    }

    /// A linearizable read: confirms leadership with a quorum and waits until the state
    /// machine has applied everything committed before the read.
    async fn read(&self, wait: Duration) -> Result<Arc<MetaState>, MetaError> {
        match tokio::time::timeout(wait, self.raft.ensure_linearizable()).await {
            Err(_) => Err(MetaError::Timeout(format!(
                "leadership not confirmed within {} ms",
                wait.as_millis()
            ))),
            Ok(Ok(_)) => Ok(self.state_rx.borrow().clone()),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => {
                Err(self.forward(Some(f)))
            }
            Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q)))) => {
                Err(MetaError::NoQuorum(q.to_string()))
            }
            Ok(Err(RaftError::Fatal(openraft::error::Fatal::Stopped))) => {
                Err(MetaError::ShuttingDown)
            }
            Ok(Err(RaftError::Fatal(f))) => Err(MetaError::Raft(f.to_string())),
        }
    }

    async fn watch(
        &self,
        after_epoch: u64,
        wait: Duration,
        deadline: Duration,
    ) -> Result<Arc<MetaState>, MetaError> {
        if !self.is_leader() {
            return Err(self.forward(None));
        }
        let started = Instant::now();
        // Keep time for the linearizable read that follows.
        let wait = wait
            .min(MAX_WATCH_WAIT)
            .min(deadline.saturating_sub(Duration::from_millis(500)));
        let mut rx = self.state_rx.clone();
        let _ = tokio::time::timeout(wait, rx.wait_for(|s| s.epoch > after_epoch)).await;
        let left = deadline
            .saturating_sub(started.elapsed())
            .max(Duration::from_millis(100));
        self.read(left).await
    }

    fn heartbeat(&self, node: NodeId, incarnation: u64) -> Result<HeartbeatAck, MetaError> {
        // Kept by every replica, leading or not: one that becomes leader counts a
        // node's silence from its last heartbeat, not from its own election.
        let state = self.state_rx.borrow().clone();
        let record = state.nodes.get(&node).cloned();
        if record.is_some() {
            let mut hb = lock(&self.heartbeats);
            let newer = hb.get(&node).is_none_or(|(inc, _)| *inc <= incarnation);
            if newer {
                hb.insert(node, (incarnation, Instant::now()));
            }
        }
        if !self.leads_with_quorum() {
            return Err(self.forward(None));
        }
        Ok(HeartbeatAck {
            epoch: state.epoch,
            record,
        })
    }

    /// Runs a membership change, retrying while another one is in progress.
    async fn change_membership(
        &self,
        change: ChangeMembers<u64, BasicNode>,
        until: Instant,
    ) -> Result<BTreeMap<ReplicaId, SocketAddr>, MetaError> {
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let res =
                tokio::time::timeout(left, self.raft.change_membership(change.clone(), false))
                    .await
                    .map_err(|_| MetaError::Timeout("membership change".into()))?;
            match res {
                Ok(resp) => {
                    return Ok(match resp.membership {
                        Some(m) => voters(&m),
                        None => self.status().members,
                    })
                }
                Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                    openraft::error::ChangeMembershipError::InProgress(_),
                ))) if Instant::now() + Duration::from_millis(100) < until => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(self.write_error(e)),
            }
        }
    }

    /// Whether replica `id` is a voter, and whether it is in the membership at all.
    fn membership_of(&self, id: ReplicaId) -> (bool, bool) {
        let m = self.raft.metrics();
        let m = m.borrow();
        let membership = m.membership_config.membership();
        (
            membership.voter_ids().any(|v| v == id),
            membership.get_node(&id).is_some(),
        )
    }

    async fn add_replica(
        &self,
        id: ReplicaId,
        addr: SocketAddr,
        deadline: Duration,
    ) -> Result<BTreeMap<ReplicaId, SocketAddr>, MetaError> {
        if !self.is_leader() {
            return Err(self.forward(None));
        }
        let until = Instant::now() + deadline;
        let (is_voter, is_node) = self.membership_of(id);
        if is_voter {
            return Ok(self.status().members);
        }
        if is_node {
            // An addition that failed halfway left a learner: it is resumed only at the
            // address it was begun with (openraft keeps a known node's address).
            if let Some(known) = self.status().learners.get(&id).filter(|a| **a != addr) {
                return Err(MetaError::Membership(format!(
                    "replica {id} is already a learner at {known}, not {addr}; remove it first"
                )));
            }
        }
        // Blocks until the learner has caught up (bounded by the deadline). Run again
        // for a learner left by an earlier attempt too: it may still be behind, and a
        // voter that is far behind would stall commits while the leader streams it
        // the log.
        loop {
            let res = tokio::time::timeout(
                until.saturating_duration_since(Instant::now()),
                self.raft.add_learner(id, BasicNode::new(addr), true),
            )
            .await
            .map_err(|_| MetaError::Timeout(format!("replica {id} did not catch up")))?;
            match res {
                Ok(_) => break,
                Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                    openraft::error::ChangeMembershipError::InProgress(_),
                ))) if Instant::now() + Duration::from_millis(100) < until => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(self.write_error(e)),
            }
        }
        // openraft's wait ends within `replication_lag_threshold` (thousands of
        // entries) of the log, so it passes a learner that has nothing: wait until it
        // holds every entry this leader has now (or this replica stops leading).
        let target = self.raft.metrics().borrow().last_log_index;
        let waited = self
            .raft
            .wait(Some(until.saturating_duration_since(Instant::now())))
            .metrics(
                |m| match &m.replication {
                    None => true,
                    _ if m.membership_config.membership().get_node(&id).is_none() => true,
                    Some(r) => r
                        .get(&id)
                        .is_some_and(|matched| matched.map(|l| l.index) >= target),
                },
                "the new learner to hold the log",
            )
            .await;
        match waited {
            Ok(m) if m.replication.is_none() => return Err(self.forward(None)),
            Ok(m) if m.membership_config.membership().get_node(&id).is_none() => {
                return Err(MetaError::Membership(format!(
                    "replica {id} was removed while it caught up"
                )))
            }
            Ok(_) => {}
            Err(_) => {
                return Err(MetaError::Timeout(format!(
                    "replica {id} did not catch up (it stays a learner; run the addition again)"
                )))
            }
        }
        tracing::info!(replica = id, %addr, resumed = is_node, "learner caught up");
        let ids: BTreeSet<u64> = [id].into_iter().collect();
        let members = self
            .change_membership(ChangeMembers::AddVoterIds(ids), until)
            .await?;
        tracing::info!(replica = id, ?members, "replica added");
        Ok(members)
    }

    async fn remove_replica(
        &self,
        id: ReplicaId,
        deadline: Duration,
    ) -> Result<BTreeMap<ReplicaId, SocketAddr>, MetaError> {
        if !self.is_leader() {
            return Err(self.forward(None));
        }
        let until = Instant::now() + deadline;
        let (is_voter, is_node) = self.membership_of(id);
        let ids: BTreeSet<u64> = [id].into_iter().collect();
        let members = if is_voter {
            self.change_membership(ChangeMembers::RemoveVoters(ids), until)
                .await?
        } else if is_node {
            self.change_membership(ChangeMembers::RemoveNodes(ids), until)
                .await?
        } else {
            self.status().members
        };
        tracing::info!(replica = id, ?members, "replica removed");
        Ok(members)
    }

    /// Answers one request; `None` drops the connection unanswered (isolation).
    async fn handle(&self, env: RequestEnvelope) -> Option<Response> {
        if env.cluster_id != self.cfg.cluster_id {
            return Some(Response::Error(WireError::WrongCluster {
                expected: self.cfg.cluster_id,
                got: env.cluster_id,
            }));
        }
        let is_raft = env.body.is_raft();
        if is_raft && self.isolated.load(Ordering::Relaxed) {
            return None;
        }
        let deadline = Duration::from_millis(u64::from(env.deadline_ms))
            .clamp(Duration::from_millis(50), MAX_REQUEST_WAIT);
        // Each handler bounds its own waits by `deadline`; this is the backstop.
        let resp = tokio::time::timeout(
            deadline + Duration::from_secs(1),
            self.dispatch(env.body, deadline),
        )
        .await
        .unwrap_or_else(|_| {
            Response::Error(WireError::Timeout(format!(
                "no answer within {} ms",
                deadline.as_millis()
            )))
        });
        if is_raft && self.isolated.load(Ordering::Relaxed) {
            return None;
        }
        Some(resp)
    }

    async fn dispatch(&self, body: Request, deadline: Duration) -> Response {
        let fatal = |e: RaftError<u64>| Response::Error(WireError::Raft(e.to_string()));
        match body {
            Request::AppendEntries(rpc) => match self.raft.append_entries(*rpc).await {
                Ok(r) => Response::AppendEntries(r),
                Err(e) => fatal(e),
            },
            Request::Vote(rpc) => match self.raft.vote(rpc).await {
                Ok(r) => Response::Vote(r),
                Err(e) => fatal(e),
            },
            // A chunk past what a snapshot may hold would grow the receiving buffer
            // without bound (openraft writes it at its offset).
            Request::InstallSnapshot(rpc)
                if rpc.offset.saturating_add(rpc.data.len() as u64)
                    > crate::store::MAX_STATE_LEN as u64 =>
            {
                Response::Error(WireError::Raft(format!(
                    "snapshot chunk at {} of {} bytes passes the {} bytes a snapshot may hold",
                    rpc.offset,
                    rpc.data.len(),
                    crate::store::MAX_STATE_LEN
                )))
            }
            Request::InstallSnapshot(rpc) => {
                self.snapshot_chunks.fetch_add(1, Ordering::Relaxed);
                match self.raft.install_snapshot(*rpc).await {
                    Ok(r) => Response::InstallSnapshot(r),
                    Err(RaftError::APIError(InstallSnapshotError::SnapshotMismatch(m))) => {
                        Response::Error(WireError::SnapshotMismatch(m))
                    }
                    Err(e) => Response::Error(WireError::Raft(e.to_string())),
                }
            }
            Request::FullSnapshot(fs) => {
                let (vote, snapshot) = net::into_snapshot(*fs);
                match self.raft.install_full_snapshot(vote, snapshot).await {
                    Ok(r) => Response::Snapshot(r),
                    Err(e) => Response::Error(WireError::Raft(e.to_string())),
                }
            }
            Request::Propose(cmd) => {
                let wait = deadline.min(Duration::from_millis(self.cfg.propose_timeout_ms));
                match self.propose(cmd, wait).await {
                    Ok(r) => Response::Proposed(r),
                    Err(e) => Response::Error(e.to_wire()),
                }
            }
            Request::Read => match self.read(deadline).await {
                Ok(s) => Response::State(Box::new((*s).clone())),
                Err(e) => Response::Error(e.to_wire()),
            },
            Request::Status => Response::Status(Box::new(self.status())),
            Request::Heartbeat { node, incarnation } => match self.heartbeat(node, incarnation) {
                Ok(ack) => Response::HeartbeatAck(ack),
                Err(e) => Response::Error(e.to_wire()),
            },
            Request::Watch {
                after_epoch,
                wait_ms,
            } => {
                let wait = Duration::from_millis(u64::from(wait_ms));
                match self.watch(after_epoch, wait, deadline).await {
                    Ok(s) => Response::State(Box::new((*s).clone())),
                    Err(e) => Response::Error(e.to_wire()),
                }
            }
            Request::AddReplica { id, addr } => match self.add_replica(id, addr, deadline).await {
                Ok(m) => Response::Members(m),
                Err(e) => Response::Error(e.to_wire()),
            },
            Request::RemoveReplica { id } => match self.remove_replica(id, deadline).await {
                Ok(m) => Response::Members(m),
                Err(e) => Response::Error(e.to_wire()),
            },
            Request::FsQuery(q) => match self.read(deadline).await {
                Ok(_) if matches!(q, crate::fs::FsQuery::Session { .. }) => {
                    let r = self.fs.read().query(&q);
                    match (&r, &q) {
                        (Ok(_), crate::fs::FsQuery::Session { session }) => {
                            // Under the lock the reaper decides under: a session is
                            // either heard now or already being ended.
                            let mut heard = lock(&self.sessions);
                            if lock(&self.ending).contains(session) {
                                Response::Fs(Err(crate::fs::FsError::NoSession))
                            } else {
                                heard.insert(*session, Instant::now());
                                Response::Fs(r)
                            }
                        }
                        _ => Response::Fs(r),
                    }
                }
                Ok(_) => Response::Fs(self.fs.read().query(&q)),
                Err(e) => Response::Error(e.to_wire()),
            },
        }
    }
}

async fn serve(inner: Arc<Inner>, listener: TcpListener) {
    // A burst of refusals shorter than a second has no later line to count it.
    let reporter = inner.clone();
    let reporting = tokio::spawn(async move {
        let stop = reporter.cancel.cancelled();
        reporter
            .refusals
            .report_overdue(stop, |kind, n| {
                tracing::warn!(
                    kind,
                    not_logged = n,
                    "metadata handshakes refused and not logged"
                );
            })
            .await;
    });
    // Shutdown waits for it with the others.
    lock(&inner.tasks).push(reporting);
    loop {
        let accepted = tokio::select! {
            _ = inner.cancel.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Ok(permit) = inner.connections.clone().try_acquire_owned() else {
                    tracing::warn!(%peer, "too many connections, refusing one");
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let inner = inner.clone();
                tokio::spawn(async move {
                    serve_conn(&inner, stream, peer).await;
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_conn(inner: &Inner, mut stream: TcpStream, peer: SocketAddr) {
    let handshake = drs_proto::auth::accept_within(
        &mut stream,
        &inner.cfg.key,
        inner.cfg.cluster_id,
        drs_proto::Purpose::Meta,
        net::HANDSHAKE_TIMEOUT,
    );
    let session = tokio::select! {
        _ = inner.cancel.cancelled() => return,
        r = handshake => match r {
            Ok(s) => s,
            Err(e) => {
                if let Some(skipped) = inner.refusals.admit(e.kind()) {
                    tracing::warn!(%peer, error = %e, not_logged = skipped, "metadata handshake refused; closing the connection");
                }
                return;
            }
        },
    };
    let mut framed = Framed::new(stream, net::sealed(session));
    loop {
        let next = tokio::select! {
            _ = inner.cancel.cancelled() => return,
            r = tokio::time::timeout(IDLE_TIMEOUT, framed.next()) => r,
        };
        let payload = match next {
            Err(_) | Ok(None) => return,
            Ok(Some(Err(e))) => {
                tracing::debug!(%peer, error = %e, "bad frame, closing connection");
                return;
            }
            Ok(Some(Ok(p))) => p,
        };
        let resp = match decode_message::<RequestEnvelope>(&payload) {
            Ok(env) => {
                let handled = tokio::select! {
                    _ = inner.cancel.cancelled() => return,
                    r = inner.handle(env) => r,
                };
                match handled {
                    Some(r) => r,
                    None => return,
                }
            }
            Err(e) => Response::Error(WireError::BadRequest(e.to_string())),
        };
        let bytes = match encode_message(&resp) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "cannot encode response");
                match encode_message(&Response::Error(WireError::Internal(e.to_string()))) {
                    Ok(b) => b,
                    Err(_) => return,
                }
            }
        };
        match tokio::time::timeout(WRITE_TIMEOUT, framed.send(bytes)).await {
            Ok(Ok(())) => {}
            _ => return,
        }
    }
}

async fn failure_detector(inner: Arc<Inner>) {
    let down_after = Duration::from_millis(inner.cfg.down_after_ms);
    let mut tick = tokio::time::interval(DETECTOR_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // (term, when this replica was first seen leading in it)
    let mut leading: Option<(u64, Instant)> = None;
    // node -> (incarnation, when first seen) while leading
    let mut seen: HashMap<NodeId, (u64, Instant)> = HashMap::new();
    // node -> (incarnation, when proposed): not proposed again for a second
    let mut proposed: HashMap<NodeId, (u64, Instant)> = HashMap::new();
    let repropose_after = Duration::from_secs(1);
    loop {
        tokio::select! {
            _ = inner.cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        // A leader cut off from its quorum cannot take heartbeats (they are refused
        // until it has one again): it starts counting afresh once it has, so nodes
        // are not marked down for the silence of its own outage.
        let Some(term) = inner.leading_term() else {
            if leading.take().is_some() {
                tracing::info!(
                    replica = inner.cfg.id,
                    "no quorum: failure detector disarmed"
                );
            }
            continue;
        };
        let now = Instant::now();
        let (since, new_term) = match leading {
            Some((t, since)) if t == term => (since, false),
            _ => {
                tracing::info!(
                    replica = inner.cfg.id,
                    term,
                    "leading: failure detector armed"
                );
                leading = Some((term, now));
                seen.clear();
                (now, true)
            }
        };
        // Nodes heartbeat every replica (every sixth of `down_after`), so this one
        // heard them while it followed, and a node that died with the old leader is
        // marked down `down_after` after its last heartbeat. But what it heard may be
        // old (it may have been cut off from some nodes), so every node gets a third
        // of `down_after` (two heartbeats) from the election to reach it: silence
        // counts from no earlier than `since - 2/3 down_after`.
        let floor = since
            .checked_sub(down_after - down_after / 3)
            .unwrap_or(since);
        let state = inner.state_rx.borrow().clone();
        seen.retain(|n, _| state.nodes.contains_key(n));
        proposed.retain(|_, (_, at)| now.duration_since(*at) < repropose_after);
        lock(&inner.heartbeats).retain(|n, _| state.nodes.contains_key(n));
        let mut suspects = Vec::new();
        for (node, rec) in &state.nodes {
            if rec.state == NodeState::Down {
                continue;
            }
            let first = seen
                .entry(*node)
                .or_insert((rec.incarnation, if new_term { floor } else { now }));
            if first.0 != rec.incarnation {
                *first = (rec.incarnation, now);
            }
            let heard = lock(&inner.heartbeats)
                .get(node)
                .filter(|(inc, _)| *inc == rec.incarnation)
                .map(|(_, at)| *at);
            let last = [Some(floor), Some(first.1), heard]
                .into_iter()
                .flatten()
                .max()
                .unwrap_or(floor);
            let silent = now.saturating_duration_since(last);
            let already = proposed
                .get(node)
                .is_some_and(|(inc, _)| *inc == rec.incarnation);
            if silent >= down_after && !already {
                suspects.push((*node, rec.incarnation, silent));
            }
        }
        for (node, incarnation, silent) in suspects {
            proposed.insert(node, (incarnation, now));
            tracing::warn!(
                node,
                incarnation,
                silent_ms = silent.as_millis() as u64,
                "node silent, marking it down"
            );
            let cmd = MetaCommand::MarkDown { node, incarnation };
            let res = tokio::select! {
                _ = inner.cancel.cancelled() => return,
                r = inner.propose(Proposal { nonce: 0, cmd }, Duration::from_secs(2)) => r,
            };
            match res {
                Ok(MetaResponse::Applied { epoch }) => {
                    tracing::info!(node, incarnation, epoch, "node marked down")
                }
                Ok(other) => tracing::debug!(node, ?other, "mark down not applied"),
                Err(e) => tracing::warn!(node, error = %e, "cannot mark node down"),
            }
        }
    }
}

/// Ends the mount sessions silent for `session_expiry_ms` while this replica leads
/// (see the module documentation).
async fn session_reaper(inner: Arc<Inner>) {
    let expiry = Duration::from_millis(inner.cfg.session_expiry_ms);
    let mut tick = tokio::time::interval(DETECTOR_TICK * 4);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // (term, when this replica was first seen leading in it)
    let mut leading: Option<(u64, Instant)> = None;
    let mut proposed: HashMap<crate::fs::SessionId, Instant> = HashMap::new();
    // session -> when this leader first saw it (a new one counts from there)
    let mut seen: HashMap<crate::fs::SessionId, Instant> = HashMap::new();
    loop {
        tokio::select! {
            _ = inner.cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(term) = inner.leading_term() else {
            leading = None;
            continue;
        };
        let now = Instant::now();
        let since = match leading {
            Some((t, since)) if t == term => since,
            _ => {
                leading = Some((term, now));
                seen.clear();
                now
            }
        };
        let live: Vec<crate::fs::SessionId> = inner.fs.read().sessions().keys().copied().collect();
        let expired: Vec<(crate::fs::SessionId, Duration)> = {
            let mut heard = lock(&inner.sessions);
            heard.retain(|s, _| live.contains(s));
            seen.retain(|s, _| live.contains(s));
            let expired: Vec<(crate::fs::SessionId, Duration)> = live
                .iter()
                .filter_map(|s| {
                    let first = *seen.entry(*s).or_insert(now);
                    let last = heard.get(s).copied().unwrap_or(since).max(since).max(first);
                    let silent = now.saturating_duration_since(last);
                    (silent >= expiry).then_some((*s, silent))
                })
                .collect();
            // Decided under the heartbeats' lock: none is answered from now on.
            let mut ending = lock(&inner.ending);
            ending.retain(|s| live.contains(s));
            ending.extend(expired.iter().map(|(s, _)| *s));
            expired
        };
        proposed
            .retain(|s, at| live.contains(s) && now.duration_since(*at) < Duration::from_secs(5));
        for (session, silent) in expired {
            if proposed.contains_key(&session) {
                continue;
            }
            proposed.insert(session, now);
            tracing::warn!(
                session,
                silent_ms = silent.as_millis() as u64,
                "mount session silent, ending it"
            );
            let cmd = MetaCommand::Fs(crate::fs::FsCommand::EndSession { session });
            let res = tokio::select! {
                _ = inner.cancel.cancelled() => return,
                r = inner.propose(Proposal { nonce: 0, cmd }, Duration::from_secs(2)) => r,
            };
            if let Err(e) = res {
                tracing::warn!(session, error = %e, "cannot end a mount session");
            }
        }
    }
}
