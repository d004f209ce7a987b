//! The metadata transport over TCP: the frame format, every metadata message, and the
//! openraft network client.
//!
//! ```text
//!  0       4          8        12
//!  +-------+----------+--------+-------------------+
//!  | magic | len u32  | crc32  | payload (postcard) |
//!  +-------+----------+--------+-------------------+
//! ```
//! `magic` is `DRSM`; `len` (little-endian) is the payload length, checked against
//! [`MAX_FRAME_LEN`] as soon as the header is in, before any buffer is reserved for the
//! body; `crc32` (IEEE, little-endian) covers the payload. A bad frame ends the
//! connection.
//!
//! Every connection opens with the handshake of [`drs_proto::auth`] (purpose `Meta`),
//! in which both ends prove the cluster key; every frame after it travels in an
//! authenticated record ([`SealedMeta`]).
//!
//! A connection carries one request at a time: the caller sends a [`RequestEnvelope`]
//! (cluster id, the time it will wait, the [`Request`]) and reads one [`Response`]. Raft
//! traffic (AppendEntries, Vote, and snapshots: whole in one message when they fit a
//! frame, else in InstallSnapshot chunks of `snapshot_max_chunk_size`) and
//! client requests (Propose, Read, Status, Heartbeat, Watch, AddReplica, RemoveReplica,
//! FsQuery)
//! share the format; a replica serves both on one port.
//!
//! Fault injection: a replica's isolation flag (see `MetaNode::set_isolated`) makes
//! [`PeerClient`] fail every Raft RPC and makes the server drop Raft requests unanswered,
//! so a replica can be cut off from the others in-process while still answering clients.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Cursor;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use openraft::error::{
    Fatal, InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError,
    ReplicationClosed, StreamingError, Unreachable,
};
use openraft::network::{Backoff, RPCOption};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, RaftNetwork, RaftNetworkFactory, Snapshot, SnapshotMeta, Vote};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio_util::codec::{Decoder, Encoder, Framed};

use crate::error::MetaError;
use crate::state::{MetaResponse, MetaState, NodeRecord, Proposal, ReplicaId};
use crate::TypeConfig;
use drs_proto::NodeId;

/// "DRSM": the first four bytes of every metadata frame.
pub const MAGIC: [u8; 4] = *b"DRSM";
/// magic + length + checksum.
pub const HEADER_LEN: usize = 12;
/// Largest payload of one frame.
pub const MAX_FRAME_LEN: usize = 16 << 20;

/// Why bytes are not a valid frame or message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    #[error("bad magic {0:02x?}")]
    BadMagic(Vec<u8>),
    #[error("frame of {len} bytes exceeds the limit of {MAX_FRAME_LEN}")]
    TooLarge { len: usize },
    #[error("checksum mismatch: header says {expected:#010x}, payload hashes to {actual:#010x}")]
    Checksum { expected: u32, actual: u32 },
    #[error("malformed message: {0}")]
    Decode(postcard::Error),
    #[error("cannot encode message: {0}")]
    Encode(postcard::Error),
    #[error("{0}")]
    Auth(#[from] drs_proto::auth::AuthError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Metadata frames in authenticated records.
pub type SealedMeta = drs_proto::SealedCodec<MetaCodec>;

/// The metadata codec over an authenticated session.
pub fn sealed(session: drs_proto::Session) -> SealedMeta {
    session.codec(MetaCodec, HEADER_LEN + MAX_FRAME_LEN)
}

/// A connection's time to finish the handshake, at a replica.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Appends one frame holding `payload` to `dst`.
pub fn encode_frame(payload: &[u8], dst: &mut BytesMut) -> Result<(), FrameError> {
    if payload.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge { len: payload.len() });
    }
    let len =
        u32::try_from(payload.len()).map_err(|_| FrameError::TooLarge { len: payload.len() })?;
    dst.reserve(HEADER_LEN + payload.len());
    dst.put_slice(&MAGIC);
    dst.put_u32_le(len);
    dst.put_u32_le(crc32fast::hash(payload));
    dst.put_slice(payload);
    Ok(())
}

/// Takes one frame's payload from the front of `src` if it is complete. `Ok(None)`: more
/// bytes are needed. The magic is checked as soon as its bytes arrive and the length as
/// soon as the header is complete, before anything is reserved for the body.
pub fn decode_frame(src: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
    let seen = src.len().min(MAGIC.len());
    if src[..seen] != MAGIC[..seen] {
        return Err(FrameError::BadMagic(src[..seen].to_vec()));
    }
    if src.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = u32::from_le_bytes([src[4], src[5], src[6], src[7]]) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge { len });
    }
    let expected = u32::from_le_bytes([src[8], src[9], src[10], src[11]]);
    if src.len() < HEADER_LEN + len {
        src.reserve(HEADER_LEN + len - src.len());
        return Ok(None);
    }
    src.advance(HEADER_LEN);
    let payload = src.split_to(len).freeze();
    let actual = crc32fast::hash(&payload);
    if actual != expected {
        return Err(FrameError::Checksum { expected, actual });
    }
    Ok(Some(payload))
}

/// Encodes a message as a frame payload (postcard), refusing one over the frame limit.
pub fn encode_message<M: Serialize>(msg: &M) -> Result<Bytes, FrameError> {
    let bytes = postcard::to_stdvec(msg).map_err(FrameError::Encode)?;
    if bytes.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge { len: bytes.len() });
    }
    Ok(Bytes::from(bytes))
}

/// Decodes a frame payload.
pub fn decode_message<M: DeserializeOwned>(payload: &[u8]) -> Result<M, FrameError> {
    postcard::from_bytes(payload).map_err(FrameError::Decode)
}

/// The `tokio-util` codec for metadata frames: items are payloads.
#[derive(Debug, Default, Clone, Copy)]
pub struct MetaCodec;

impl Decoder for MetaCodec {
    type Item = Bytes;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        decode_frame(src)
    }
}

impl Encoder<Bytes> for MetaCodec {
    type Error = FrameError;

    fn encode(&mut self, item: Bytes, dst: &mut BytesMut) -> Result<(), FrameError> {
        encode_frame(&item, dst)
    }
}

/// Every request carries the cluster id (a replica refuses other clusters) and how long
/// the caller will wait, so the replica answers (or gives up) before that.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RequestEnvelope {
    pub cluster_id: u64,
    pub deadline_ms: u32,
    pub body: Request,
}

/// A whole snapshot in one message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FullSnapshot {
    pub vote: Vote<u64>,
    pub meta: SnapshotMeta<u64, BasicNode>,
    pub data: Vec<u8>,
}

/// Every request a metadata replica serves.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    /// Raft: replicate entries / heartbeat.
    AppendEntries(Box<AppendEntriesRequest<TypeConfig>>),
    /// Raft: request a vote.
    Vote(VoteRequest<u64>),
    /// Raft: one chunk of a snapshot (openraft's chunked transfer), for snapshots
    /// that do not fit one frame.
    InstallSnapshot(Box<InstallSnapshotRequest<TypeConfig>>),
    /// Raft: a whole snapshot that fits one frame.
    FullSnapshot(Box<FullSnapshot>),
    /// Leader: append a command and answer once it is applied.
    /// A command, with the nonce its retries share.
    Propose(Proposal),
    /// Leader: a linearizable read of the whole state.
    Read,
    /// Any replica: its own view (no consensus).
    Status,
    /// Leader: a storage node is alive at this incarnation (for the failure detector).
    Heartbeat { node: NodeId, incarnation: u64 },
    /// Leader: answer once the applied epoch exceeds `after_epoch`, or after `wait_ms`
    /// (bounded by the replica) with the current state; the answer is a linearizable read.
    Watch { after_epoch: u64, wait_ms: u32 },
    /// Leader: add a metadata replica (as a learner, then a voter).
    AddReplica { id: ReplicaId, addr: SocketAddr },
    /// Leader: remove a metadata replica from the membership.
    RemoveReplica { id: ReplicaId },
    /// Leader: a linearizable read of the file system namespace.
    FsQuery(crate::fs::FsQuery),
}

impl Request {
    /// Whether this is Raft traffic between replicas.
    pub fn is_raft(&self) -> bool {
        matches!(
            self,
            Request::AppendEntries(_)
                | Request::Vote(_)
                | Request::InstallSnapshot(_)
                | Request::FullSnapshot(_)
        )
    }
}

/// A replica's role, from openraft's server state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Leader,
    Follower,
    Candidate,
    Learner,
    Shutdown,
}

impl From<openraft::ServerState> for Role {
    fn from(s: openraft::ServerState) -> Role {
        match s {
            openraft::ServerState::Leader => Role::Leader,
            openraft::ServerState::Follower => Role::Follower,
            openraft::ServerState::Candidate => Role::Candidate,
            openraft::ServerState::Learner => Role::Learner,
            openraft::ServerState::Shutdown => Role::Shutdown,
        }
    }
}

/// One replica's own view of itself and the group (no consensus involved).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaStatus {
    pub id: ReplicaId,
    pub role: Role,
    pub leader: Option<ReplicaId>,
    pub term: u64,
    /// Index of the last applied log entry (0: nothing applied).
    pub last_applied: u64,
    /// The applied state's epoch.
    pub epoch: u64,
    /// The voters of the membership this replica knows, with their addresses.
    pub members: BTreeMap<ReplicaId, SocketAddr>,
    /// Non-voting replicas (being added).
    pub learners: BTreeMap<ReplicaId, SocketAddr>,
}

/// The leader's answer to a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatAck {
    /// The leader's applied epoch.
    pub epoch: u64,
    /// The node's record as the leader has it: a node that finds itself `Down` or at
    /// another incarnation must register again.
    pub record: Option<NodeRecord>,
}

/// Every response.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub enum Response {
    AppendEntries(AppendEntriesResponse<u64>),
    Vote(VoteResponse<u64>),
    InstallSnapshot(InstallSnapshotResponse<u64>),
    Snapshot(SnapshotResponse<u64>),
    Proposed(MetaResponse),
    State(Box<MetaState>),
    Status(Box<MetaStatus>),
    HeartbeatAck(HeartbeatAck),
    /// The voters after a membership change.
    Members(BTreeMap<ReplicaId, SocketAddr>),
    Error(WireError),
    /// The answer to `FsQuery`.
    Fs(Result<crate::fs::FsReply, crate::fs::FsError>),
}

/// An error a replica answers with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// Not the leader; the leader it knows of, with its address when known.
    #[error("not the leader (leader: {leader:?})")]
    ForwardToLeader {
        leader: Option<(ReplicaId, Option<SocketAddr>)>,
    },
    #[error("cluster id mismatch: replica has {expected:016x}, request {got:016x}")]
    WrongCluster { expected: u64, got: u64 },
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("no quorum: {0}")]
    NoQuorum(String),
    #[error("membership change refused: {0}")]
    Membership(String),
    #[error("bootstrap refused: {0}")]
    Bootstrap(String),
    #[error("the replica is shutting down")]
    ShuttingDown,
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("raft: {0}")]
    Raft(String),
    #[error("internal: {0}")]
    Internal(String),
    /// An `InstallSnapshot` chunk of another snapshot, or at another offset, than
    /// the one being received: the sender starts that snapshot over from offset 0.
    #[error("{0}")]
    SnapshotMismatch(openraft::error::SnapshotMismatch),
}

/// One client connection: one request at a time.
pub(crate) struct Conn {
    pub(crate) addr: SocketAddr,
    framed: Framed<TcpStream, SealedMeta>,
}

/// What a connection proves in its handshake.
#[derive(Debug, Clone)]
pub(crate) struct Credentials {
    pub(crate) key: drs_proto::ClusterKey,
    pub(crate) cluster_id: u64,
}

impl Conn {
    /// Connects and runs the handshake, both within `timeout`.
    pub(crate) async fn connect(
        addr: SocketAddr,
        timeout: Duration,
        creds: &Credentials,
    ) -> Result<Conn, MetaError> {
        let open = async {
            let mut stream = TcpStream::connect(addr)
                .await
                .map_err(|source| MetaError::Io { addr, source })?;
            stream
                .set_nodelay(true)
                .map_err(|source| MetaError::Io { addr, source })?;
            let session = drs_proto::auth::connect(
                &mut stream,
                &creds.key,
                creds.cluster_id,
                drs_proto::Purpose::Meta,
            )
            .await
            .map_err(|error| match error {
                drs_proto::auth::AuthError::Io(e) => MetaError::Io {
                    addr,
                    source: std::io::Error::other(e),
                },
                error => MetaError::Auth { addr, error },
            })?;
            Ok(Conn {
                addr,
                framed: Framed::new(stream, sealed(session)),
            })
        };
        tokio::time::timeout(timeout, open)
            .await
            .map_err(|_| MetaError::Timeout(format!("connecting to {addr}")))?
    }

    /// Sends one encoded envelope and reads the response. On any error the connection
    /// must be dropped (its stream position is unknown).
    pub(crate) async fn call(
        &mut self,
        envelope: Bytes,
        timeout: Duration,
    ) -> Result<Response, MetaError> {
        let addr = self.addr;
        let exchange = async {
            self.framed.send(envelope).await?;
            match self.framed.next().await {
                Some(frame) => decode_message::<Response>(&frame?),
                None => Err(FrameError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed",
                ))),
            }
        };
        match tokio::time::timeout(timeout, exchange).await {
            Err(_) => Err(MetaError::Timeout(format!("no answer from {addr}"))),
            Ok(Err(FrameError::Io(source))) => Err(MetaError::Io { addr, source }),
            Ok(Err(e)) => Err(MetaError::Frame(e)),
            Ok(Ok(resp)) => Ok(resp),
        }
    }
}

/// Encodes a request envelope.
pub(crate) fn envelope(
    cluster_id: u64,
    deadline: Duration,
    body: Request,
) -> Result<Bytes, FrameError> {
    let deadline_ms = u32::try_from(deadline.as_millis()).unwrap_or(u32::MAX);
    encode_message(&RequestEnvelope {
        cluster_id,
        deadline_ms,
        body,
    })
}

/// Creates the per-peer Raft clients of one replica.
pub struct NetworkFactory {
    creds: Credentials,
    isolated: Arc<AtomicBool>,
}

impl NetworkFactory {
    pub fn new(
        cluster_id: u64,
        key: drs_proto::ClusterKey,
        isolated: Arc<AtomicBool>,
    ) -> NetworkFactory {
        NetworkFactory {
            creds: Credentials { key, cluster_id },
            isolated,
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> PeerClient {
        PeerClient {
            target,
            addr: node.addr.clone(),
            creds: self.creds.clone(),
            isolated: self.isolated.clone(),
            conn: None,
        }
    }
}

/// The Raft client for one peer, keeping one connection (dropped after any error, or
/// when openraft cancels a call half-way).
pub struct PeerClient {
    target: u64,
    addr: String,
    creds: Credentials,
    isolated: Arc<AtomicBool>,
    conn: Option<Conn>,
}

/// Why a Raft RPC failed, before mapping to openraft's error types.
enum PeerError {
    /// Not sent, no connection, or the connection failed: openraft backs off (a short,
    /// fixed [`PeerClient::backoff`]) and retries.
    Unreachable(MetaError),
    /// The request is too large for one frame.
    TooLarge,
}

impl PeerClient {
    async fn rpc(&mut self, body: Request, ttl: Duration) -> Result<Response, PeerError> {
        if self.isolated.load(Ordering::Relaxed) {
            return Err(PeerError::Unreachable(MetaError::Remote(
                "this replica is isolated".into(),
            )));
        }
        let addr: SocketAddr = self.addr.parse().map_err(|_| {
            PeerError::Unreachable(MetaError::Config(format!(
                "replica {} has an invalid address {:?}",
                self.target, self.addr
            )))
        })?;
        let bytes = match envelope(self.creds.cluster_id, ttl, body) {
            Ok(b) => b,
            Err(FrameError::TooLarge { .. }) => return Err(PeerError::TooLarge),
            Err(e) => return Err(PeerError::Unreachable(e.into())),
        };
        let started = std::time::Instant::now();
        let (conn, resp) = match self.conn.take() {
            Some(mut c) => match c.call(bytes.clone(), ttl).await {
                Ok(r) => (c, r),
                // The peer closed the idle connection (or restarted): once more on a new one.
                Err(MetaError::Io { .. }) => {
                    let left = ttl.saturating_sub(started.elapsed());
                    let mut c = Conn::connect(addr, left, &self.creds)
                        .await
                        .map_err(PeerError::Unreachable)?;
                    let r = c.call(bytes, left).await.map_err(PeerError::Unreachable)?;
                    (c, r)
                }
                Err(e) => return Err(PeerError::Unreachable(e)),
            },
            None => {
                let mut c = Conn::connect(addr, ttl, &self.creds)
                    .await
                    .map_err(PeerError::Unreachable)?;
                let r = c.call(bytes, ttl).await.map_err(PeerError::Unreachable)?;
                (c, r)
            }
        };
        if self.isolated.load(Ordering::Relaxed) {
            return Err(PeerError::Unreachable(MetaError::Remote(
                "this replica is isolated".into(),
            )));
        }
        self.conn = Some(conn);
        match resp {
            // For `install_snapshot` to hand to openraft as what it is.
            Response::Error(WireError::SnapshotMismatch(m)) => {
                Ok(Response::Error(WireError::SnapshotMismatch(m)))
            }
            Response::Error(e) => Err(PeerError::Unreachable(MetaError::from_wire(e))),
            other => Ok(other),
        }
    }

    fn unexpected(&self, resp: &Response) -> MetaError {
        let addr = self
            .addr
            .parse()
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
        MetaError::Protocol {
            addr,
            what: format!("{resp:?}"),
        }
    }
}

fn rpc_error<E: std::error::Error>(
    e: PeerError,
    entries: usize,
) -> RPCError<u64, BasicNode, RaftError<u64, E>> {
    match e {
        PeerError::Unreachable(e) => RPCError::Unreachable(Unreachable::new(&e)),
        PeerError::TooLarge => RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(
            (entries as u64 / 2).max(1),
        )),
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        let entries = rpc.entries.len();
        match self
            .rpc(Request::AppendEntries(Box::new(rpc)), option.hard_ttl())
            .await
        {
            Ok(Response::AppendEntries(r)) => Ok(r),
            Ok(other) => Err(RPCError::Network(NetworkError::new(
                &self.unexpected(&other),
            ))),
            Err(e) => Err(rpc_error(e, entries)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        match self
            .rpc(Request::InstallSnapshot(Box::new(rpc)), option.hard_ttl())
            .await
        {
            Ok(Response::InstallSnapshot(r)) => Ok(r),
            // Openraft's sender resets its offset on this one (any other error is
            // retried at the same offset, five times, then the whole send).
            Ok(Response::Error(WireError::SnapshotMismatch(m))) => {
                Err(RPCError::RemoteError(openraft::error::RemoteError::new(
                    self.target,
                    RaftError::APIError(InstallSnapshotError::SnapshotMismatch(m)),
                )))
            }
            Ok(other) => Err(RPCError::Network(NetworkError::new(
                &self.unexpected(&other),
            ))),
            Err(e) => Err(rpc_error(e, 1)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        match self.rpc(Request::Vote(rpc), option.hard_ttl()).await {
            Ok(Response::Vote(r)) => Ok(r),
            Ok(other) => Err(RPCError::Network(NetworkError::new(
                &self.unexpected(&other),
            ))),
            Err(e) => Err(rpc_error(e, 1)),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote<u64>,
        snapshot: Snapshot<TypeConfig>,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<u64>, StreamingError<TypeConfig, Fatal<u64>>> {
        if snapshot.snapshot.get_ref().len() > MAX_WHOLE_SNAPSHOT {
            use openraft::network::snapshot_transport::{Chunked, SnapshotTransport};
            return Chunked::send_snapshot(self, vote, snapshot, cancel, option).await;
        }
        let req = Request::FullSnapshot(Box::new(FullSnapshot {
            vote,
            meta: snapshot.meta,
            data: snapshot.snapshot.into_inner(),
        }));
        // A whole snapshot may take longer than one heartbeat-sized RPC.
        let ttl = option.hard_ttl().max(Duration::from_secs(10));
        let res = tokio::select! {
            closed = cancel => return Err(StreamingError::Closed(closed)),
            res = self.rpc(req, ttl) => res,
        };
        match res {
            Ok(Response::Snapshot(r)) => Ok(r),
            Ok(other) => Err(StreamingError::Network(NetworkError::new(
                &self.unexpected(&other),
            ))),
            Err(PeerError::Unreachable(e)) => {
                Err(StreamingError::Unreachable(Unreachable::new(&e)))
            }
            Err(PeerError::TooLarge) => Err(StreamingError::Unreachable(Unreachable::new(
                &MetaError::Frame(FrameError::TooLarge {
                    len: MAX_FRAME_LEN + 1,
                }),
            ))),
        }
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(std::iter::repeat(Duration::from_millis(200)))
    }
}

/// Largest snapshot sent whole in one [`FullSnapshot`]; a larger one goes in chunks
/// (openraft's `snapshot_max_chunk_size`, well under a frame).
const MAX_WHOLE_SNAPSHOT: usize = MAX_FRAME_LEN - (64 << 10);

/// Builds the snapshot openraft installs from a received [`FullSnapshot`].
pub(crate) fn into_snapshot(fs: FullSnapshot) -> (Vote<u64>, Snapshot<TypeConfig>) {
    (
        fs.vote,
        Snapshot {
            meta: fs.meta,
            snapshot: Box::new(Cursor::new(fs.data)),
        },
    )
}
