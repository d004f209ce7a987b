//! The service's error type: what a caller of [`MetaNode`](crate::MetaNode) or
//! [`MetaClient`](crate::MetaClient) can get back.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::net::{FrameError, WireError};
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetaError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("metadata store: {0}")]
    Store(#[from] StoreError),
    #[error("cannot create directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start raft: {0}")]
    Start(String),
    #[error("no metadata leader found within {waited_ms} ms (last error: {last})")]
    NoLeader { waited_ms: u64, last: String },
    #[error("this replica is not the leader (leader: {leader:?})")]
    ForwardToLeader {
        leader: Option<(u64, Option<SocketAddr>)>,
    },
    #[error("timed out: {0}")]
    Timeout(String),
    /// The replica could not read the request: one of a later version than it.
    #[error("request not understood by the replica (of an earlier version?): {0}")]
    BadRequest(String),
    #[error("the leader cannot reach a quorum: {0}")]
    NoQuorum(String),
    #[error("membership change refused: {0}")]
    Membership(String),
    #[error("cluster id mismatch: this side has {ours:016x}, the peer {theirs:016x}")]
    WrongCluster { ours: u64, theirs: u64 },
    #[error("bootstrap refused: {0}")]
    Bootstrap(String),
    #[error("frame: {0}")]
    Frame(#[from] FrameError),
    #[error("i/o with {addr}: {source}")]
    Io {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("handshake with {addr}: {error}")]
    Auth {
        addr: SocketAddr,
        error: drs_proto::auth::AuthError,
    },
    #[error("peer {addr} answered with an unexpected message: {what}")]
    Protocol { addr: SocketAddr, what: String },
    #[error("remote error: {0}")]
    Remote(String),
    #[error("raft: {0}")]
    Raft(String),
    #[error("the metadata replica is shutting down")]
    ShuttingDown,
}

impl MetaError {
    /// The error as it travels back to a remote caller.
    pub(crate) fn to_wire(&self) -> WireError {
        match self {
            MetaError::ForwardToLeader { leader } => WireError::ForwardToLeader { leader: *leader },
            MetaError::Timeout(s) => WireError::Timeout(s.clone()),
            MetaError::NoQuorum(s) => WireError::NoQuorum(s.clone()),
            MetaError::Membership(s) => WireError::Membership(s.clone()),
            MetaError::Bootstrap(s) => WireError::Bootstrap(s.clone()),
            MetaError::ShuttingDown => WireError::ShuttingDown,
            MetaError::WrongCluster { ours, theirs } => WireError::WrongCluster {
                expected: *ours,
                got: *theirs,
            },
            other => WireError::Internal(other.to_string()),
        }
    }

    /// The error a remote replica sent back, as seen by the caller.
    pub(crate) fn from_wire(e: WireError) -> MetaError {
        match e {
            WireError::ForwardToLeader { leader } => MetaError::ForwardToLeader { leader },
            WireError::Timeout(s) => MetaError::Timeout(s),
            WireError::NoQuorum(s) => MetaError::NoQuorum(s),
            WireError::Membership(s) => MetaError::Membership(s),
            WireError::Bootstrap(s) => MetaError::Bootstrap(s),
            WireError::ShuttingDown => MetaError::ShuttingDown,
            WireError::WrongCluster { expected, got } => MetaError::WrongCluster {
                ours: got,
                theirs: expected,
            },
            WireError::BadRequest(s) => MetaError::BadRequest(s),
            other => MetaError::Remote(other.to_string()),
        }
    }
}
