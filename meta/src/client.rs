//! [`MetaClient`]: talks to the metadata replicas from anywhere (storage nodes, tools).
//!
//! It sends leader-only requests to the replica it last found leading, follows
//! `ForwardToLeader` hints, otherwise tries the other replicas in turn with a short
//! backoff, and gives up at an overall deadline with a typed error
//! ([`MetaError::NoLeader`] when no leader answered) instead of hanging. It learns new
//! replica addresses from hints and from the states it reads. Connections are reused
//! through a small pool.
//!
//! A proposal that timed out may still have been applied; a retry carries the same
//! nonce, so the state machine answers it with the first answer instead of applying
//! it again (`Register` gets the same incarnation; see `state.rs`, `Answered`). Only
//! past the number of answers the state machine keeps would a retry apply again.
//! (`MarkUp`/`MarkDown` are answered `Unchanged` then, the others with a refusal such
//! as `NodeExists`.)

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drs_proto::NodeId;

use crate::error::MetaError;
use crate::net::{self, Conn, HeartbeatAck, MetaStatus, Request, Response, WireError};
use crate::state::{MetaCommand, MetaResponse, MetaState, Proposal, ReplicaId};

/// Replica addresses remembered at most.
const MAX_REPLICAS: usize = 16;
/// Idle connections kept.
const POOL_SIZE: usize = 8;

/// Timeouts of a [`MetaClient`].
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Overall time for one call, retries included (default 10 s).
    pub deadline: Duration,
    /// Time for one attempt at one replica (default 3 s).
    pub rpc_timeout: Duration,
    /// Time to open a connection (default 1 s).
    pub connect_timeout: Duration,
    /// How long a watch waits for a newer epoch before returning the current state
    /// (default 5 s).
    pub watch_wait: Duration,
    /// The cluster key proved on every connection (open: none).
    pub key: drs_proto::ClusterKey,
}

impl Default for ClientConfig {
    fn default() -> ClientConfig {
        ClientConfig {
            deadline: Duration::from_secs(10),
            rpc_timeout: Duration::from_secs(3),
            connect_timeout: Duration::from_secs(1),
            watch_wait: Duration::from_secs(5),
            key: drs_proto::ClusterKey::open(),
        }
    }
}

/// A client of the metadata service. Cheap to clone.
#[derive(Clone)]
pub struct MetaClient {
    inner: Arc<Inner>,
}

struct Inner {
    cluster_id: u64,
    creds: net::Credentials,
    cfg: ClientConfig,
    replicas: Mutex<Vec<SocketAddr>>,
    leader: Mutex<Option<SocketAddr>>,
    pool: Mutex<Vec<Conn>>,
    /// Proposals sent (each a Raft commit once applied), retries not counted.
    proposals: std::sync::atomic::AtomicU64,
    queries: std::sync::atomic::AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl MetaClient {
    /// A client of the metadata service that `map` names (None for a static map,
    /// which names no replicas), proving `key`.
    pub fn for_map(map: &drs_proto::ClusterMap, key: &drs_proto::ClusterKey) -> Option<MetaClient> {
        if map.meta.is_empty() {
            return None;
        }
        Some(MetaClient::with_config(
            map.meta.iter().map(|r| r.addr).collect(),
            map.cluster_id,
            ClientConfig {
                key: key.clone(),
                ..ClientConfig::default()
            },
        ))
    }

    /// A client of the replicas at `replica_addrs` (any subset that includes a live one
    /// is enough) of cluster `cluster_id`, with the default timeouts.
    pub fn new(replica_addrs: Vec<SocketAddr>, cluster_id: u64) -> MetaClient {
        MetaClient::with_config(replica_addrs, cluster_id, ClientConfig::default())
    }

    pub fn with_config(
        replica_addrs: Vec<SocketAddr>,
        cluster_id: u64,
        cfg: ClientConfig,
    ) -> MetaClient {
        let mut replicas = Vec::new();
        for a in replica_addrs {
            if !replicas.contains(&a) && replicas.len() < MAX_REPLICAS {
                replicas.push(a);
            }
        }
        MetaClient {
            inner: Arc::new(Inner {
                cluster_id,
                creds: net::Credentials {
                    key: cfg.key.clone(),
                    cluster_id,
                },
                cfg,
                replicas: Mutex::new(replicas),
                leader: Mutex::new(None),
                pool: Mutex::new(Vec::new()),
                proposals: std::sync::atomic::AtomicU64::new(0),
                queries: std::sync::atomic::AtomicU64::new(0),
            }),
        }
    }

    /// The same client with another overall deadline.
    pub fn with_deadline(&self, deadline: Duration) -> MetaClient {
        let mut cfg = self.inner.cfg.clone();
        cfg.deadline = deadline;
        MetaClient::with_config(self.replicas(), self.inner.cluster_id, cfg)
    }

    /// The replica addresses this client knows.
    pub fn replicas(&self) -> Vec<SocketAddr> {
        lock(&self.inner.replicas).clone()
    }

    /// The replica last found leading.
    pub fn leader_hint(&self) -> Option<SocketAddr> {
        *lock(&self.inner.leader)
    }

    /// Applies a command through the leader; returns its response (refusals included).
    /// Every try (another replica, a new leader) carries the same nonce, so a command
    /// whose first try was applied and its answer lost is not applied again: the retry
    /// gets the first answer.
    pub async fn propose(&self, cmd: MetaCommand) -> Result<MetaResponse, MetaError> {
        self.inner
            .proposals
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let timeout = self.inner.cfg.rpc_timeout;
        let nonce = rand::random::<u64>().max(1);
        match self
            .request(Request::Propose(Proposal { nonce, cmd }), timeout)
            .await?
        {
            (Response::Proposed(r), _) => Ok(r),
            (other, addr) => Err(unexpected(addr, &other)),
        }
    }

    /// How many proposals this client (and its clones) has made, each a Raft
    /// commit (a retry of one is not counted again).
    pub fn proposals(&self) -> u64 {
        self.inner
            .proposals
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many file system queries this client (and its clones) has made, each
    /// a linearizable read at the leader (a retry of one is not counted again).
    pub fn queries(&self) -> u64 {
        self.inner
            .queries
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Applies a file system command through the leader; its answer.
    pub async fn fs(
        &self,
        cmd: crate::fs::FsCommand,
    ) -> Result<Result<crate::fs::FsReply, crate::fs::FsError>, MetaError> {
        match self.propose(MetaCommand::Fs(cmd)).await? {
            MetaResponse::Fs(r) => Ok(r),
            other => Err(MetaError::Protocol {
                addr: self
                    .leader_hint()
                    .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))),
                what: format!("a file system command answered {other:?}"),
            }),
        }
    }

    /// A linearizable read of the file system namespace at the leader.
    pub async fn fs_query(
        &self,
        q: crate::fs::FsQuery,
    ) -> Result<Result<crate::fs::FsReply, crate::fs::FsError>, MetaError> {
        self.inner
            .queries
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let timeout = self.inner.cfg.rpc_timeout;
        match self.request(Request::FsQuery(q), timeout).await? {
            (Response::Fs(r), _) => Ok(r),
            (other, addr) => Err(unexpected(addr, &other)),
        }
    }

    /// The whole state, read linearizably at the leader.
    pub async fn read(&self) -> Result<MetaState, MetaError> {
        let timeout = self.inner.cfg.rpc_timeout;
        match self.request(Request::Read, timeout).await? {
            (Response::State(s), _) => {
                self.learn(s.replicas.values().copied());
                Ok(*s)
            }
            (other, addr) => Err(unexpected(addr, &other)),
        }
    }

    /// One replica's own status (no retries, no leader needed).
    pub async fn status_of(&self, addr: SocketAddr) -> Result<MetaStatus, MetaError> {
        let timeout = self.inner.cfg.rpc_timeout;
        match self.call(addr, Request::Status, timeout).await? {
            Response::Status(s) => Ok(*s),
            Response::Error(e) => Err(MetaError::from_wire(e)),
            other => Err(unexpected(addr, &other)),
        }
    }

    /// Long poll: the state once its epoch exceeds `after_epoch`, or the current state
    /// after the configured watch wait. Check the returned epoch.
    pub async fn watch(&self, after_epoch: u64) -> Result<MetaState, MetaError> {
        let cfg = &self.inner.cfg;
        let wait_ms = u32::try_from(cfg.watch_wait.as_millis()).unwrap_or(u32::MAX);
        let req = Request::Watch {
            after_epoch,
            wait_ms,
        };
        match self.request(req, cfg.watch_wait + cfg.rpc_timeout).await? {
            (Response::State(s), _) => {
                self.learn(s.replicas.values().copied());
                Ok(*s)
            }
            (other, addr) => Err(unexpected(addr, &other)),
        }
    }

    /// Tells the leader's failure detector that `node` is alive at `incarnation`.
    pub async fn heartbeat(
        &self,
        node: NodeId,
        incarnation: u64,
    ) -> Result<HeartbeatAck, MetaError> {
        let timeout = self.inner.cfg.rpc_timeout;
        let req = Request::Heartbeat { node, incarnation };
        match self.request(req, timeout).await? {
            (Response::HeartbeatAck(a), _) => Ok(a),
            (other, addr) => Err(unexpected(addr, &other)),
        }
    }

    /// Sends `node`'s heartbeat to each replica of `replicas` (the current map's) at
    /// once, each given at most `timeout` (a slow replica delays none of the others).
    /// A follower keeps it, so a replica that becomes leader knows which nodes were
    /// alive just before; the leader's answer is returned if it came.
    /// [`MetaClient::heartbeat`] still goes to the leader as well, following its hints.
    pub async fn heartbeat_every_replica(
        &self,
        replicas: &[SocketAddr],
        node: NodeId,
        incarnation: u64,
        timeout: Duration,
    ) -> Option<HeartbeatAck> {
        let req = Request::Heartbeat { node, incarnation };
        let calls = replicas
            .iter()
            .take(MAX_REPLICAS)
            .map(|addr| self.call(*addr, req.clone(), timeout));
        futures::future::join_all(calls)
            .await
            .into_iter()
            .find_map(|r| match r {
                Ok(Response::HeartbeatAck(a)) => Some(a),
                _ => None,
            })
    }

    /// Adds metadata replica `id` at `addr` (started, with an empty directory): first as
    /// a learner that catches up, then as a voter. Returns the voters.
    pub async fn add_replica(
        &self,
        id: ReplicaId,
        addr: SocketAddr,
    ) -> Result<BTreeMap<ReplicaId, SocketAddr>, MetaError> {
        self.learn([addr]);
        let timeout = self.inner.cfg.deadline;
        match self
            .request(Request::AddReplica { id, addr }, timeout)
            .await?
        {
            (Response::Members(m), _) => {
                self.learn(m.values().copied());
                Ok(m)
            }
            (other, addr) => Err(unexpected(addr, &other)),
        }
    }

    /// Removes metadata replica `id` from the group. Returns the voters.
    pub async fn remove_replica(
        &self,
        id: ReplicaId,
    ) -> Result<BTreeMap<ReplicaId, SocketAddr>, MetaError> {
        let timeout = self.inner.cfg.deadline;
        match self.request(Request::RemoveReplica { id }, timeout).await? {
            (Response::Members(m), _) => Ok(m),
            (other, addr) => Err(unexpected(addr, &other)),
        }
    }

    fn learn(&self, addrs: impl IntoIterator<Item = SocketAddr>) {
        let mut replicas = lock(&self.inner.replicas);
        for a in addrs {
            if !replicas.contains(&a) && replicas.len() < MAX_REPLICAS {
                replicas.push(a);
            }
        }
    }

    /// Sends a leader-only request until a replica answers it, or the deadline (the
    /// configured one, stretched to one whole attempt for long polls).
    async fn request(
        &self,
        body: Request,
        per_try: Duration,
    ) -> Result<(Response, SocketAddr), MetaError> {
        let cfg = &self.inner.cfg;
        let started = Instant::now();
        let overall = match body {
            Request::Watch { .. } => cfg.deadline.max(per_try),
            _ => cfg.deadline,
        };
        let deadline = started + overall;
        let mut last = String::from("no replica tried");
        let mut next = 0usize;
        let mut failures_in_row = 0usize;
        let mut refused = std::collections::HashSet::new();
        loop {
            let now = Instant::now();
            if now >= deadline {
                let waited_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                return Err(MetaError::NoLeader { waited_ms, last });
            }
            let replicas = self.replicas();
            if replicas.is_empty() {
                return Err(MetaError::Config("no metadata replica address".into()));
            }
            let hinted = lock(&self.inner.leader).take();
            let target = match hinted {
                Some(a) => a,
                None => {
                    let a = replicas[next % replicas.len()];
                    next = next.wrapping_add(1);
                    a
                }
            };
            let timeout = per_try.min(deadline - now);
            match self.call(target, body.clone(), timeout).await {
                Ok(Response::Error(e)) => {
                    last = format!("{target}: {e}");
                    match e {
                        WireError::ForwardToLeader {
                            leader: Some((_, Some(addr))),
                        } if addr != target => {
                            self.learn([addr]);
                            *lock(&self.inner.leader) = Some(addr);
                        }
                        WireError::ForwardToLeader { .. }
                        | WireError::Timeout(_)
                        | WireError::NoQuorum(_)
                        | WireError::ShuttingDown
                        | WireError::Raft(_)
                        | WireError::Internal(_) => {}
                        other => return Err(MetaError::from_wire(other)),
                    }
                    failures_in_row += 1;
                }
                Ok(resp) => {
                    *lock(&self.inner.leader) = Some(target);
                    return Ok((resp, target));
                }
                // A refused handshake (another key, another cluster) will not pass
                // on a retry at that replica; given up once every replica refused.
                Err(e @ MetaError::Auth { .. }) => {
                    refused.insert(target);
                    if replicas.iter().all(|r| refused.contains(r)) {
                        return Err(e);
                    }
                    last = format!("{target}: {e}");
                    failures_in_row += 1;
                }
                Err(e) => {
                    last = format!("{target}: {e}");
                    failures_in_row += 1;
                }
            }
            // After a round of failures, wait a little (an election may be running).
            if failures_in_row >= replicas.len() {
                failures_in_row = 0;
                let pause = Duration::from_millis(100 + rand::random::<u64>() % 150);
                let left = deadline.saturating_duration_since(Instant::now());
                tokio::time::sleep(pause.min(left)).await;
            }
        }
    }

    /// One request to one replica, over a pooled connection.
    async fn call(
        &self,
        addr: SocketAddr,
        body: Request,
        timeout: Duration,
    ) -> Result<Response, MetaError> {
        let cfg = &self.inner.cfg;
        // The replica gets a little less time than we wait, so it answers first.
        let server_wait = timeout
            .saturating_sub(Duration::from_millis(200))
            .max(timeout / 2);
        let bytes = net::envelope(self.inner.cluster_id, server_wait, body)?;
        let pooled = {
            let mut pool = lock(&self.inner.pool);
            pool.iter()
                .position(|c| c.addr == addr)
                .map(|i| pool.swap_remove(i))
        };
        let started = Instant::now();
        let (conn, resp) = match pooled {
            Some(mut c) => match c.call(bytes.clone(), timeout).await {
                Ok(r) => (c, r),
                // The replica closed the idle connection (or restarted) before reading
                // the request: try once on a new one.
                Err(MetaError::Io { .. }) => {
                    let left = timeout.saturating_sub(started.elapsed());
                    let mut c =
                        Conn::connect(addr, cfg.connect_timeout.min(left), &self.inner.creds)
                            .await?;
                    let r = c.call(bytes, left).await?;
                    (c, r)
                }
                Err(e) => return Err(e),
            },
            None => {
                let mut c =
                    Conn::connect(addr, cfg.connect_timeout.min(timeout), &self.inner.creds)
                        .await?;
                let r = c.call(bytes, timeout).await?;
                (c, r)
            }
        };
        let mut pool = lock(&self.inner.pool);
        if pool.len() < POOL_SIZE {
            pool.push(conn);
        } else {
            drop(pool);
            drop(conn);
        }
        Ok(resp)
    }
}

fn unexpected(addr: SocketAddr, resp: &Response) -> MetaError {
    match resp {
        Response::Error(e) => MetaError::from_wire(e.clone()),
        other => MetaError::Protocol {
            addr,
            what: format!("{other:?}"),
        },
    }
}
