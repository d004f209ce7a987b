//! Connections to nodes: a multiplexed TCP connection per node for data, many
//! requests in flight on it, each with a deadline, and a second one for heartbeats.
//!
//! Each node has a second, *control* connection for lease heartbeats: a data
//! connection can queue many MiB of updates (at the client, in the socket, and
//! behind a busy node's reader), and a heartbeat queued behind them could arrive
//! after the lease ran out, fencing a live client. Locks, unlocks and updates stay on
//! the data connection, whose arrival order the node's lock table relies on.
//!
//! A connection that fails marks its node down for a backoff (doubling from 50 ms up
//! to `reconnect_max`); requests in that window fail at once with `Unreachable`, so
//! reads go straight to the rest of the stripe instead of waiting on a dead node. A
//! node the cluster map says is down is sent heartbeats only (it may be alive and
//! hold this client's locks).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use drs_proto::{
    CancelReq, ClusterMap, Frame, FrameHeader, FrameKind, MemberState, NodeId, Request, Response,
};
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::error::CallError;

/// Requests in flight per connection before callers wait.
const MAX_IN_FLIGHT: usize = 512;
/// Frames queued for a connection's writer.
const SEND_QUEUE: usize = 256;
const BACKOFF_MIN: Duration = Duration::from_millis(50);
/// A node that let a request time out is *suspect* this long: its requests then wait
/// at most `SUSPECT_WAIT`, so a hung node costs each operation a short wait instead
/// of a whole request deadline. Any answer clears the suspicion.
const SUSPECT_FOR: Duration = Duration::from_secs(10);
const SUSPECT_WAIT: Duration = Duration::from_millis(500);
/// A request unanswered this long, on a connection that has answered nothing
/// meanwhile, makes the client ask the node's control connection whether the node is
/// alive (a `GetMap`, [`PROBE_WAIT`] to answer). A node that is not (SIGSTOPped, a
/// frozen VM) is *hung*: its requests wait at most [`HUNG_WAIT`] from then on, for
/// [`HUNG_FOR`] or until it answers again. So a hung node costs the requests in
/// flight about a second, instead of a whole request deadline (5 s by default),
/// before the metadata service declares it down. A busy node answers the probe on
/// its control connection, whatever is queued on the data one, and is waited for.
const PROBE_AFTER: Duration = Duration::from_millis(500);
const PROBE_WAIT: Duration = Duration::from_millis(500);
const HUNG_WAIT: Duration = Duration::from_millis(100);
const HUNG_FOR: Duration = Duration::from_secs(2);

/// Connection settings.
#[derive(Debug, Clone)]
pub struct ConnConfig {
    pub cluster_id: u64,
    /// The sender's cluster map epoch, stamped on every frame; shared by a client's
    /// connections and raised when it learns a newer map.
    pub epoch: Arc<AtomicU64>,
    pub connect_timeout: Duration,
    pub reconnect_max: Duration,
    /// The cluster key proved in each connection's handshake.
    pub key: drs_proto::ClusterKey,
}

type Waiter = oneshot::Sender<Result<Frame, CallError>>;

/// A live connection. Dropping it (its `NodeConn` dropped, or replaced after a
/// failure) closes the connection: the writer ends, which closes the socket for
/// writing, and the peer's close ends the reader.
struct Live {
    tx: mpsc::Sender<Frame>,
    waiters: Arc<Mutex<HashMap<u64, Waiter>>>,
    slots: Arc<Semaphore>,
    _closer: oneshot::Sender<()>,
}

impl Live {
    /// The reader closes `slots` when the connection ends.
    fn is_closed(&self) -> bool {
        self.slots.is_closed() || self.tx.is_closed()
    }
}

enum State {
    Idle,
    Up(Arc<Live>),
    Down {
        until: Instant,
        failures: u32,
        reason: String,
    },
}

/// The connection to one node.
pub struct NodeConn {
    pub node: NodeId,
    pub addr: SocketAddr,
    cfg: ConnConfig,
    state: Mutex<State>,
    connecting: tokio::sync::Mutex<()>,
    next_id: AtomicU64,
    suspect_until: Mutex<Option<Instant>>,
    /// The node's control connection, asked whether the node is alive when this one
    /// goes silent (none for a control connection itself, or one to another
    /// client's cache).
    probe: Option<Arc<NodeConn>>,
    /// When this connection last brought an answer.
    answered_at: Mutex<Option<Instant>>,
    /// Until when the node is taken as hung (its probe went unanswered).
    hung_until: Mutex<Option<Instant>>,
    /// One probe at a time.
    probing: tokio::sync::Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // No code panics while holding these locks; if one did, the data is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl NodeConn {
    pub fn new(node: NodeId, addr: SocketAddr, cfg: ConnConfig) -> NodeConn {
        NodeConn {
            node,
            addr,
            cfg,
            state: Mutex::new(State::Idle),
            connecting: tokio::sync::Mutex::new(()),
            next_id: AtomicU64::new(1),
            suspect_until: Mutex::new(None),
            probe: None,
            answered_at: Mutex::new(None),
            hung_until: Mutex::new(None),
            probing: tokio::sync::Mutex::new(()),
        }
    }

    /// A data connection that probes the node through `control` when it goes silent.
    pub fn with_probe(
        node: NodeId,
        addr: SocketAddr,
        cfg: ConnConfig,
        control: Arc<NodeConn>,
    ) -> NodeConn {
        NodeConn {
            probe: Some(control),
            ..NodeConn::new(node, addr, cfg)
        }
    }

    /// True while the node is taken as hung (it did not answer a probe).
    pub fn is_hung(&self) -> bool {
        lock(&self.hung_until).is_some_and(|t| Instant::now() < t)
    }

    /// Whether the node answers on its control connection. Called when a request has
    /// waited [`PROBE_AFTER`] on a connection that answered nothing meanwhile; one
    /// probe at a time (a caller finding one under way goes on waiting).
    ///
    /// Boxed: a request's wait may probe, and the probe is a request.
    fn probe_alive(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + '_>> {
        Box::pin(self.probe_alive_inner())
    }

    async fn probe_alive_inner(&self) -> bool {
        let Some(control) = &self.probe else {
            return true;
        };
        let Ok(_one) = self.probing.try_lock() else {
            return !self.is_hung();
        };
        if self.is_hung() {
            return false;
        }
        if lock(&self.answered_at).is_some_and(|t| t.elapsed() < PROBE_AFTER) {
            return true;
        }
        // `GetMap`: answered on arrival, whatever the epoch, at the cost of encoding
        // the map. The whole probe (a connection to open included) takes PROBE_WAIT
        // at most.
        let ask = async {
            let sent = control
                .send_with(&Request::GetMap, Bytes::new(), PROBE_WAIT, PROBE_WAIT)
                .await?;
            control.answer(sent).await
        };
        let alive = match tokio::time::timeout(PROBE_WAIT, ask).await {
            Ok(r) => !matches!(r, Err(CallError::Timeout(_) | CallError::Unreachable(_))),
            Err(_) => false,
        };
        if alive {
            *lock(&self.hung_until) = None;
        } else {
            tracing::debug!(
                node = self.node,
                "node does not answer on its control connection either: hung"
            );
            *lock(&self.hung_until) = Some(Instant::now() + HUNG_FOR);
            *lock(&self.suspect_until) = Some(Instant::now() + SUSPECT_FOR);
        }
        alive
    }

    /// True while the node is in its backoff after a failure.
    pub fn is_down(&self) -> bool {
        matches!(&*lock(&self.state), State::Down { until, .. } if Instant::now() < *until)
    }

    fn mark_down(&self, reason: String) {
        let mut st = lock(&self.state);
        let failures = match &*st {
            State::Down { failures, .. } => failures.saturating_add(1),
            _ => 0,
        };
        let backoff = BACKOFF_MIN
            .saturating_mul(1u32 << failures.min(10))
            .min(self.cfg.reconnect_max.max(BACKOFF_MIN));
        *st = State::Down {
            until: Instant::now() + backoff,
            failures,
            reason,
        };
    }

    /// The open connection, or the reason not to try one now; `None`: connect.
    fn current(&self) -> Option<Result<Arc<Live>, CallError>> {
        match &*lock(&self.state) {
            State::Up(l) if !l.is_closed() => Some(Ok(l.clone())),
            State::Down { until, reason, .. } if Instant::now() < *until => {
                Some(Err(CallError::Unreachable(reason.clone())))
            }
            _ => None,
        }
    }

    async fn live(&self) -> Result<Arc<Live>, CallError> {
        if let Some(r) = self.current() {
            return r;
        }
        let _guard = self.connecting.lock().await;
        // Someone else may have connected (or failed) while we waited.
        if let Some(r) = self.current() {
            return r;
        }
        match self.open().await {
            Ok((stream, session)) => {
                let live = Arc::new(spawn_connection(stream, session, self.node));
                *lock(&self.state) = State::Up(live.clone());
                Ok(live)
            }
            Err(e) => {
                self.mark_down(e.to_string());
                Err(e)
            }
        }
    }

    /// Connects and runs the handshake, both within the connect timeout. A node that
    /// accepts the connection but does not answer the handshake (hung) is a
    /// `Timeout`, as it would be for a request.
    async fn open(&self) -> Result<(TcpStream, drs_proto::Session), CallError> {
        let started = Instant::now();
        let deadline = tokio::time::Instant::from_std(started + self.cfg.connect_timeout);
        let mut stream =
            match tokio::time::timeout_at(deadline, TcpStream::connect(self.addr)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    return Err(CallError::Unreachable(format!(
                        "connect to {}: {e}",
                        self.addr
                    )))
                }
                Err(_) => {
                    return Err(CallError::Unreachable(format!(
                        "connect to {}: timed out",
                        self.addr
                    )))
                }
            };
        let _ = stream.set_nodelay(true);
        let handshake = drs_proto::auth::connect(
            &mut stream,
            &self.cfg.key,
            self.cfg.cluster_id,
            drs_proto::Purpose::Data,
        );
        match tokio::time::timeout_at(deadline, handshake).await {
            Ok(Ok(session)) => Ok((stream, session)),
            Ok(Err(e @ drs_proto::auth::AuthError::Io(_))) => Err(CallError::Unreachable(format!(
                "handshake with {}: {e}",
                self.addr
            ))),
            Ok(Err(e)) => Err(CallError::Auth(format!(
                "handshake with {}: {e}",
                self.addr
            ))),
            Err(_) => Err(CallError::Timeout(
                u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            )),
        }
    }

    /// True while the node is suspect (it recently let a request time out).
    pub fn is_suspect(&self) -> bool {
        lock(&self.suspect_until).is_some_and(|t| Instant::now() < t)
    }

    /// Sends `req` with `payload` and waits up to `timeout` (less for a suspect or
    /// hung node) for the answer. The node is given the whole `timeout` whatever
    /// this client waits: a node only slow goes on with the request (and a cancel
    /// withdraws a read the client stopped waiting for).
    pub async fn call(
        &self,
        req: &Request,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<(Response, Bytes), CallError> {
        let r = match self.send(req, payload, timeout).await {
            Ok(sent) => self.answer(sent).await,
            Err(e) => Err(e),
        };
        self.note_outcome(&r);
        r
    }

    /// A request's outcome makes the node suspect (a timeout) or clears that.
    fn note_outcome<T>(&self, r: &Result<T, CallError>) {
        match r {
            Err(CallError::Timeout(_)) => {
                *lock(&self.suspect_until) = Some(Instant::now() + SUSPECT_FOR)
            }
            Ok(_) | Err(CallError::Remote(_)) => *lock(&self.suspect_until) = None,
            Err(_) => {}
        }
    }

    /// The first half of [`NodeConn::call`]: hands the request to the connection
    /// (connecting first if needed). Requests sent one after the other reach the
    /// node in that order, whenever their answers are awaited.
    async fn send(
        &self,
        req: &Request,
        payload: Bytes,
        budget: Duration,
    ) -> Result<Sent, CallError> {
        let timeout = if self.is_hung() {
            budget.min(HUNG_WAIT)
        } else if self.is_suspect() {
            budget.min(SUSPECT_WAIT)
        } else {
            budget
        };
        self.send_with(req, payload, budget, timeout).await
    }

    /// [`NodeConn::send`]: the node is told it has `budget`; this client waits
    /// `timeout`.
    async fn send_with(
        &self,
        req: &Request,
        payload: Bytes,
        budget: Duration,
        timeout: Duration,
    ) -> Result<Sent, CallError> {
        let deadline = Instant::now() + timeout;
        let live = self.live().await?;
        let permit = tokio::time::timeout_at(deadline.into(), live.slots.clone().acquire_owned())
            .await
            .map_err(|_| CallError::Timeout(timeout.as_millis() as u64))?;
        let Ok(permit) = permit else {
            self.mark_down("connection closed".into());
            return Err(CallError::Unreachable("connection closed".into()));
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let header = FrameHeader {
            kind: FrameKind::Request,
            cluster_id: self.cfg.cluster_id,
            epoch: self.cfg.epoch.load(Ordering::Acquire),
            request_id: id,
            deadline_ms: budget.as_millis().min(u32::MAX as u128) as u32,
        };
        let frame =
            Frame::new(header, req, payload).map_err(|e| CallError::Protocol(e.to_string()))?;
        let (tx, rx) = oneshot::channel();
        lock(&live.waiters).insert(id, tx);
        // Withdraws the request if the caller stops waiting before it is handed over.
        let mut guard = CancelOnDrop {
            conn: self,
            live: Some(live.clone()),
            id,
        };
        let sent = tokio::time::timeout_at(deadline.into(), live.tx.send(frame)).await;
        guard.disarm();
        if !matches!(sent, Ok(Ok(()))) {
            lock(&live.waiters).remove(&id);
            self.mark_down("connection closed".into());
            return Err(match sent {
                Err(_) => CallError::Timeout(timeout.as_millis() as u64),
                _ => CallError::Unreachable("connection closed".into()),
            });
        }
        Ok(Sent {
            live,
            rx,
            permit,
            id,
            deadline,
            timeout,
        })
    }

    /// The second half of [`NodeConn::call`]: waits for the answer to a sent
    /// request; past PROBE_AFTER of silence, asks whether the node is alive at all,
    /// and waits only a moment more if not.
    async fn answer(&self, sent: Sent) -> Result<(Response, Bytes), CallError> {
        let Sent {
            live,
            mut rx,
            permit,
            id,
            mut deadline,
            timeout,
        } = sent;
        // If the caller stops waiting (a hedged read that got its answer elsewhere),
        // the guard withdraws the request and tells the node.
        let mut guard = CancelOnDrop {
            conn: self,
            live: Some(live),
            id,
        };
        let answer = loop {
            let check = (Instant::now() + PROBE_AFTER).min(deadline);
            match tokio::time::timeout_at(check.into(), &mut rx).await {
                Ok(a) => break Ok(a),
                Err(_) if Instant::now() >= deadline => break Err(()),
                Err(_) => {
                    let silent =
                        !lock(&self.answered_at).is_some_and(|t| t.elapsed() < PROBE_AFTER);
                    if silent && !self.probe_alive().await {
                        deadline = deadline.min(Instant::now() + HUNG_WAIT);
                    }
                }
            }
        };
        drop(permit);
        if matches!(answer, Ok(Ok(Ok(_)))) {
            *lock(&self.answered_at) = Some(Instant::now());
            *lock(&self.hung_until) = None;
        }
        if answer.is_ok() {
            guard.disarm();
        }
        let frame = match answer {
            Ok(Ok(Ok(frame))) => frame,
            Ok(Ok(Err(e))) => {
                if let CallError::Unreachable(reason) = &e {
                    self.mark_down(reason.clone());
                }
                return Err(e);
            }
            Ok(Err(_)) => {
                self.mark_down("connection closed".into());
                return Err(CallError::Unreachable("connection closed".into()));
            }
            Err(()) => return Err(CallError::Timeout(timeout.as_millis() as u64)),
        };
        let resp: Response = frame
            .decode_ctrl()
            .map_err(|e| CallError::Protocol(e.to_string()))?;
        match resp {
            Response::Error(e) => Err(CallError::Remote(e)),
            r => Ok((r, frame.payload)),
        }
    }

    /// Tells the node we no longer want request `id` (report 5.6); best effort.
    fn cancel(&self, live: &Live, id: u64) {
        let header = FrameHeader {
            kind: FrameKind::Request,
            cluster_id: self.cfg.cluster_id,
            epoch: self.cfg.epoch.load(Ordering::Acquire),
            request_id: self.next_id.fetch_add(1, Ordering::Relaxed),
            deadline_ms: 1000,
        };
        if let Ok(frame) = Frame::new(
            header,
            &Request::Cancel(CancelReq { request_id: id }),
            Bytes::new(),
        ) {
            let _ = live.tx.try_send(frame);
        }
    }
}

/// A request handed to its connection, its answer not yet awaited. Dropped without
/// [`InFlight::answer`], its waiter goes when the answer comes or the connection ends.
struct Sent {
    live: Arc<Live>,
    rx: oneshot::Receiver<Result<Frame, CallError>>,
    permit: tokio::sync::OwnedSemaphorePermit,
    id: u64,
    deadline: Instant,
    timeout: Duration,
}

/// A request sent by [`Pool::send`]: its place in the connection's order is taken;
/// its answer can be awaited elsewhere (a spawned task, say).
pub struct InFlight {
    conn: Arc<NodeConn>,
    sent: Sent,
}

impl InFlight {
    /// Waits for the answer, as [`NodeConn::call`] would have.
    pub async fn answer(self) -> Result<(Response, Bytes), CallError> {
        let r = self.conn.answer(self.sent).await;
        self.conn.note_outcome(&r);
        r
    }
}

/// Withdraws an in-flight request when dropped before its answer arrived.
struct CancelOnDrop<'a> {
    conn: &'a NodeConn,
    live: Option<Arc<Live>>,
    id: u64,
}

impl CancelOnDrop<'_> {
    fn disarm(&mut self) {
        self.live = None;
    }
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(live) = self.live.take() {
            if lock(&live.waiters).remove(&self.id).is_some() {
                self.conn.cancel(&live, self.id);
            }
        }
    }
}

fn spawn_connection(stream: TcpStream, session: drs_proto::Session, node: NodeId) -> Live {
    let (rd, wr) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Frame>(SEND_QUEUE);
    let waiters: Arc<Mutex<HashMap<u64, Waiter>>> = Arc::default();
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));

    let mut sink = FramedWrite::new(wr, session.clone().frames());
    let (closer, mut closed) = oneshot::channel::<()>();
    tokio::spawn(async move {
        loop {
            let frame = tokio::select! {
                f = rx.recv() => match f {
                    Some(f) => f,
                    None => return,
                },
                _ = &mut closed => return,
            };
            if sink.feed(frame).await.is_err() {
                return;
            }
            while let Ok(frame) = rx.try_recv() {
                if sink.feed(frame).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    });

    let w = waiters.clone();
    let s = slots.clone();
    let tx_reader = tx.clone();
    tokio::spawn(async move {
        let mut frames = FramedRead::new(rd, session.frames());
        let reason = loop {
            match frames.next().await {
                Some(Ok(frame)) => {
                    if frame.header.kind != FrameKind::Response {
                        break "node sent a request frame".to_string();
                    }
                    let waiter = lock(&w).remove(&frame.header.request_id);
                    if let Some(waiter) = waiter {
                        let _ = waiter.send(Ok(frame));
                    }
                }
                Some(Err(drs_proto::FrameError::Io(e))) => {
                    break format!("connection to node {node} lost: {e}")
                }
                Some(Err(e)) => break format!("bad frame from node {node}: {e}"),
                None => break "connection closed by node".to_string(),
            }
        };
        tracing::debug!(node, %reason, "connection ended");
        s.close();
        drop(tx_reader);
        let all: Vec<Waiter> = lock(&w).drain().map(|(_, v)| v).collect();
        for waiter in all {
            let _ = waiter.send(Err(CallError::Unreachable(reason.clone())));
        }
    });
    Live {
        tx,
        waiters,
        slots,
        _closer: closer,
    }
}

/// Which of a node's connections a request travels on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Locks, unlocks, updates, reads: everything whose order matters.
    Data,
    /// Lease heartbeats, which must never wait behind data.
    Control,
}

/// Connections to every node of a cluster map.
pub struct Pool {
    members: RwLock<Members>,
    cfg: ConnConfig,
}

#[derive(Default)]
struct Members {
    conns: HashMap<NodeId, Arc<NodeConn>>,
    /// The control connections (heartbeats), opened on first use.
    control: HashMap<NodeId, Arc<NodeConn>>,
    /// Nodes the cluster map says are down: sent heartbeats only, so a dead node
    /// costs next to nothing once the metadata service noticed it.
    down: HashSet<NodeId>,
}

impl Members {
    /// New connections to `node` at `addr`: the data one probes through the control
    /// one.
    fn connect(&mut self, node: NodeId, addr: SocketAddr, cfg: &ConnConfig) {
        let control = Arc::new(NodeConn::new(node, addr, cfg.clone()));
        let data = NodeConn::with_probe(node, addr, cfg.clone(), control.clone());
        self.conns.insert(node, Arc::new(data));
        self.control.insert(node, control);
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

impl Pool {
    pub fn new(nodes: impl IntoIterator<Item = (NodeId, SocketAddr)>, cfg: ConnConfig) -> Pool {
        let mut members = Members::default();
        for (id, addr) in nodes {
            members.connect(id, addr, &cfg);
        }
        Pool {
            members: RwLock::new(members),
            cfg,
        }
    }

    /// The epoch stamped on this pool's frames.
    pub fn epoch(&self) -> Arc<AtomicU64> {
        self.cfg.epoch.clone()
    }

    /// Follows a new cluster map: its epoch, new addresses (a replaced node) and which
    /// nodes are down.
    pub fn update(&self, map: &ClusterMap) {
        let mut guard = self.members.write().unwrap_or_else(|e| e.into_inner());
        let m = &mut *guard;
        for n in &map.nodes {
            let moved = m.conns.get(&n.id).is_none_or(|c| c.addr != n.addr);
            if moved {
                m.connect(n.id, n.addr, &self.cfg);
            }
        }
        m.conns.retain(|id, _| map.node(*id).is_some());
        m.control.retain(|id, _| map.node(*id).is_some());
        m.down = map
            .nodes
            .iter()
            .filter(|n| n.state == MemberState::Down)
            .map(|n| n.id)
            .collect();
        self.cfg.epoch.fetch_max(map.epoch, Ordering::AcqRel);
    }

    pub fn get(&self, node: NodeId) -> Option<Arc<NodeConn>> {
        read(&self.members).conns.get(&node).cloned()
    }

    /// Calls `node` on `lane`, failing with `Unreachable` for a node not in the map or,
    /// on the data lane, down in it. The control lane (heartbeats) still reaches a
    /// node declared down: one declared down while alive (paused, cut off) may hold
    /// this client's locks, and without heartbeats its lease there runs out and it
    /// fences a live client when it comes back.
    pub async fn call(
        &self,
        node: NodeId,
        lane: Lane,
        req: &Request,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<(Response, Bytes), CallError> {
        self.data_conn(node, lane)?
            .call(req, payload, timeout)
            .await
    }

    /// `node`'s connection on `lane`; none for a node not in the map or, on the data
    /// lane, down in it.
    fn data_conn(&self, node: NodeId, lane: Lane) -> Result<Arc<NodeConn>, CallError> {
        let m = read(&self.members);
        if lane == Lane::Data && m.down.contains(&node) {
            return Err(CallError::Unreachable(format!(
                "node {node} is down in the cluster map"
            )));
        }
        let conn = match lane {
            Lane::Data => m.conns.get(&node),
            Lane::Control => m.control.get(&node),
        };
        conn.cloned()
            .ok_or_else(|| CallError::Unreachable(format!("node {node} is not in the cluster map")))
    }

    /// Hands a request to `node`'s data connection and returns once it is queued
    /// there, before its answer: a request sent later on the same lane reaches the
    /// node after it. Fails as [`Pool::call`] does.
    pub async fn send(
        &self,
        node: NodeId,
        req: &Request,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<InFlight, CallError> {
        let conn = self.data_conn(node, Lane::Data)?;
        let sent = conn.send(req, payload, timeout).await;
        if let Err(e) = &sent {
            conn.note_outcome::<()>(&Err(e.clone()));
        }
        Ok(InFlight { conn, sent: sent? })
    }

    /// True while `node` is down in the map, in its reconnect backoff, or hung (it
    /// did not answer a probe).
    pub fn is_down(&self, node: NodeId) -> bool {
        let m = read(&self.members);
        m.down.contains(&node)
            || m.conns
                .get(&node)
                .is_none_or(|c| c.is_down() || c.is_hung())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use tokio::io::AsyncReadExt;

    const CLUSTER: u64 = 0xC4;

    /// Goal: a connection goes away with its `NodeConn` (connections to other
    /// clients' caches are made and dropped; a leak held the peer's slots for ever).
    ///
    /// Method: a server that completes the handshake, answers one Ping, then waits
    /// for the end of the stream; the client calls once and drops its `NodeConn`: the
    /// server must see the end within 2 s.
    #[tokio::test]
    async fn dropping_a_node_conn_closes_its_connection() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let key = drs_proto::ClusterKey::open();
            let session =
                drs_proto::auth::accept(&mut sock, &key, CLUSTER, drs_proto::Purpose::Data)
                    .await
                    .unwrap();
            let mut framed = tokio_util::codec::Framed::new(sock, session.frames());
            let f = framed.next().await.unwrap().unwrap();
            let h = FrameHeader {
                kind: FrameKind::Response,
                deadline_ms: 0,
                ..f.header
            };
            let pong = Response::Error(drs_proto::WireError::Busy);
            framed
                .send(Frame::new(h, &pong, Bytes::new()).unwrap())
                .await
                .unwrap();
            let mut sock = framed.into_inner();
            let mut rest = Vec::new();
            tokio::time::timeout(Duration::from_secs(2), sock.read_to_end(&mut rest))
                .await
                .is_ok()
        });
        let conn = NodeConn::new(
            7,
            addr,
            ConnConfig {
                cluster_id: CLUSTER,
                epoch: Arc::new(AtomicU64::new(1)),
                connect_timeout: Duration::from_secs(2),
                reconnect_max: Duration::from_secs(1),
                key: drs_proto::ClusterKey::open(),
            },
        );
        let r = conn
            .call(&Request::Ping, Bytes::new(), Duration::from_secs(2))
            .await;
        assert!(matches!(r, Err(CallError::Remote(_))), "{r:?}");
        drop(conn);
        assert!(
            server.await.unwrap(),
            "the connection stayed open after its NodeConn was dropped"
        );
    }

    fn cfg(cluster_id: u64) -> ConnConfig {
        ConnConfig {
            cluster_id,
            epoch: Arc::new(AtomicU64::new(1)),
            connect_timeout: Duration::from_secs(2),
            reconnect_max: Duration::from_secs(1),
            key: drs_proto::ClusterKey::open(),
        }
    }

    /// A node that completes handshakes and reads requests; it answers `GetMap` (with
    /// `Busy`: any answer shows it is alive) only if `alive`, and nothing else ever.
    async fn unanswering_node(alive: bool) -> SocketAddr {
        crate::fakenode::serve(move |req| match req {
            Request::GetMap if alive => {
                crate::fakenode::Reply::Answer(Response::Error(drs_proto::WireError::Busy))
            }
            _ => crate::fakenode::Reply::Ignore,
        })
        .await
    }

    /// Goal: a hung node (it answers nothing, not even on its control connection)
    /// costs a request about a second, not its whole deadline; a node that is only
    /// slow to answer a request, but answers the probe, is waited for.
    ///
    /// Method: a 6 s request to each kind of node, through a data connection that
    /// probes through a control one. The hung node's must fail as a timeout within
    /// 3 s (probe after 0.5 s, 0.5 s for its answer, 0.1 s more), and the node is then
    /// hung: the next request waits 0.1 s at most. The slow node's must wait past 5 s.
    #[tokio::test]
    async fn a_hung_node_is_found_by_a_probe_and_a_slow_one_is_waited_for() {
        let read = Request::Read(drs_proto::ReadReq {
            volume: 1,
            stripe: 0,
            position: 0,
            offset: 0,
            len: 16,
            mode: drs_proto::ReadMode::Current,
        });
        for alive in [false, true] {
            let addr = unanswering_node(alive).await;
            let control = Arc::new(NodeConn::new(7, addr, cfg(crate::fakenode::CLUSTER)));
            let conn = NodeConn::with_probe(7, addr, cfg(crate::fakenode::CLUSTER), control);
            let started = Instant::now();
            let r = conn.call(&read, Bytes::new(), Duration::from_secs(6)).await;
            let took = started.elapsed();
            assert!(matches!(r, Err(CallError::Timeout(_))), "{r:?}");
            if alive {
                assert!(
                    took >= Duration::from_secs(5),
                    "a live node was cut short: {took:?}"
                );
                assert!(!conn.is_hung());
            } else {
                assert!(took < Duration::from_secs(3), "a hung node cost {took:?}");
                assert!(conn.is_hung());
                let started = Instant::now();
                let r = conn.call(&read, Bytes::new(), Duration::from_secs(6)).await;
                assert!(matches!(r, Err(CallError::Timeout(_))), "{r:?}");
                assert!(started.elapsed() < Duration::from_secs(1));
            }
        }
    }
}
