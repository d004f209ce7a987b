//! The DRS metadata service: the cluster map with epochs, replicated with Raft.
//!
//! Three or five metadata replicas run inside storage-node processes. They keep one
//! [`MetaState`] (nodes with incarnations and states, volumes, the epoch) replicated by
//! [openraft](https://docs.rs/openraft) (consensus is entirely openraft's; this crate
//! supplies storage, transport and the state machine), and the leader runs a failure
//! detector that marks silent storage nodes down.
//!
//! # Layout
//! - [`state`]: the state and its commands, pure; `MetaState::apply` is the state machine.
//! - [`fs`]: the file system namespace and block allocation, pure; replicated in the
//!   same log (`MetaCommand::Fs`), read with `MetaClient::fs_query`.
//! - [`acl`]: POSIX ACLs in the kernel's format and their rules with the mode, pure.
//! - [`locks`]: the mounts' POSIX byte-range locks, pure; part of the namespace's state.
//! - [`store`]: openraft's log and state-machine storage on one redb database.
//! - [`net`]: the TCP transport: the frame format, every metadata message, and the
//!   openraft network client (with the isolation switch for tests).
//! - [`service`]: [`MetaNode`], one replica: Raft, the listener and request handling, the
//!   failure detector.
//! - [`client`]: [`MetaClient`], which finds the leader and retries until a deadline.
//! - [`error`]: the error type, [`MetaError`].
//!
//! # Use
//! A storage-node process hosting a replica: [`MetaNode::start`] with a [`MetaConfig`]
//! (its directory holds the database; restarting from it recovers everything), then, on
//! first start, [`MetaNode::initialize`] with the replica set and the cluster map (safe
//! to call on every replica, and again). [`MetaNode::state`] follows the applied state;
//! [`MetaNode::shutdown`] stops it. Anyone else (storage nodes, tools):
//! [`MetaClient::new`] with some replica addresses, then `propose` commands
//! ([`MetaCommand`]), `read` (linearizable), `watch` for epoch changes, and `heartbeat`
//! every second or so per live storage node (the leader marks a node silent for
//! `down_after_ms` down).

pub mod acl;
pub mod client;
pub mod error;
pub mod fs;
pub mod locks;
pub mod net;
pub mod service;
pub mod state;
pub mod store;
pub mod tracked;

use std::io::Cursor;

pub use client::{ClientConfig, MetaClient};
pub use error::MetaError;
pub use net::{HeartbeatAck, MetaStatus, Role};
pub use service::{MetaConfig, MetaNode, DEFAULT_SESSION_EXPIRY, NAMESPACE_LIMIT};
pub use state::{
    Answered, MetaCommand, MetaResponse, MetaState, NodeRecord, NodeState, Proposal, Refusal,
    ReplicaId,
};

openraft::declare_raft_types!(
    /// The openraft type configuration of the metadata service.
    pub TypeConfig:
        D = Proposal,
        R = MetaResponse,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The Raft handle of one replica.
pub type Raft = openraft::Raft<TypeConfig>;
