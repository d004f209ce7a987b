//! [`ClientError`]: everything a client operation can fail with, each variant saying
//! what the user needs to know (which block, which stripe, how many nodes it needs).

use drs_proto::{ClientId, NodeId, StripeId, WireError};

#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("block {lba} is out of range (the volume has {blocks} blocks)")]
    OutOfRange { lba: u64, blocks: u64 },
    #[error("block {position} of stripe {stripe} is out of range (the volume has {stripes} stripes of {width} blocks)")]
    NoSuchBlock {
        stripe: StripeId,
        position: usize,
        stripes: u64,
        width: usize,
    },
    #[error("byte range {offset}+{len} does not fit a block of {block_size} bytes")]
    BadRange {
        offset: usize,
        len: usize,
        block_size: usize,
    },
    #[error("stripe {stripe} is unavailable: {have} of its {width} nodes answered consistently, {need} are needed{detail}")]
    Unavailable {
        stripe: StripeId,
        have: usize,
        need: usize,
        width: usize,
        detail: String,
        /// Some members only said "not now" (recovering, busy, timed out): the same
        /// read may work a little later.
        transient: bool,
    },
    #[error("write to stripe {stripe} refused: only {live} of its nodes are live, the volume needs {need} (min_write){detail}")]
    NotEnoughNodes {
        stripe: StripeId,
        live: usize,
        need: usize,
        detail: String,
    },
    #[error("write to stripe {stripe} not durable: {acked} nodes acknowledged it, the volume needs {need} (min_write)")]
    NotDurable {
        stripe: StripeId,
        acked: usize,
        need: usize,
    },
    #[error(
        "block {lba} is locked by client {holder:#018x} at node {node}{} (waited {waited_ms} ms)",
        settling_note(settling)
    )]
    Locked {
        lba: u64,
        holder: ClientId,
        /// The member that refused the lock last.
        node: NodeId,
        /// The refusal was `Settling`: an update of the block (by `holder`) is still
        /// being passed on between the members, not a lock held.
        settling: bool,
        waited_ms: u64,
        /// Where the holder's cache can be reached (client-client interface).
        contact: Option<std::net::SocketAddr>,
    },
    #[error("node {node} fenced this client: its lease expired while it held locks (it continues as a new client; this operation's outcome is unknown)")]
    Fenced { node: NodeId },
    #[error("this client's lease at node {node} may have expired (the client was stalled); the write was not sent")]
    LeaseExpired { node: NodeId },
    #[error("a change to block {lba} written through the cache of the client at {contact} may not have reached the storage nodes: {detail}")]
    ForwardedLost {
        lba: u64,
        contact: std::net::SocketAddr,
        detail: String,
    },
    #[error("volume {0} is not in the cluster map")]
    UnknownVolume(u32),
    #[error("invalid coefficient table: {0}")]
    Codec(#[from] drs_codec::CodecError),
    #[error("node {node}: {error}")]
    Node { node: NodeId, error: WireError },
    #[error("node {node}: {error}")]
    Call { node: NodeId, error: CallError },
}

/// Why one request to one node failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    /// The node answered with an error.
    #[error("{0}")]
    Remote(WireError),
    /// No connection: refused, reset, or recently failed (retried after a backoff).
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// No answer within the deadline.
    #[error("no answer within {0} ms")]
    Timeout(u64),
    /// The handshake failed: the node (or this client) does not hold the cluster key,
    /// or belongs to another cluster. Treated as unreachable; says why.
    #[error("{0}")]
    Auth(String),
    /// The node answered with something that is not a valid answer to the request.
    #[error("protocol violation: {0}")]
    Protocol(String),
}

impl CallError {
    /// True when the node is not (currently) reachable, as opposed to having answered.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            CallError::Unreachable(_) | CallError::Timeout(_) | CallError::Auth(_)
        )
    }
}

/// The words [`ClientError::Locked`] adds when its refusal was `Settling`.
fn settling_note(settling: &bool) -> &'static str {
    if *settling {
        " (an update of it is still being passed on between the members)"
    } else {
        ""
    }
}
