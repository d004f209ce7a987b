//! [`WireError`]: what a node answers instead of a result. Stable and typed: clients
//! match on it, so a variant never changes meaning, and none carries free text that a
//! program would have to parse.

use serde::{Deserialize, Serialize};

use crate::{ClientId, NodeId, StripeId, Version, VolumeId};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The frame names another cluster.
    #[error("wrong cluster: this node belongs to cluster {expected:#018x}")]
    WrongCluster { expected: u64 },
    /// The sender's cluster-map epoch differs from the node's.
    #[error("stale epoch: the node is at epoch {node_epoch}, the request at {request_epoch}")]
    StaleEpoch { node_epoch: u64, request_epoch: u64 },
    /// The node holds no such volume.
    #[error("unknown volume {volume}")]
    UnknownVolume { volume: VolumeId },
    /// The node is not the member of that stripe at that position.
    #[error("node {node} does not hold position {position} of stripe {stripe}")]
    NotMember {
        node: NodeId,
        stripe: StripeId,
        position: u8,
    },
    /// The stripe index is beyond the volume.
    #[error("stripe {stripe} out of range (volume has {stripes} stripes)")]
    StripeOutOfRange { stripe: StripeId, stripes: u64 },
    /// A byte range that does not fit in a block, or a payload of the wrong length.
    #[error(
        "bad range: offset {offset} + length {len} does not fit a block of {block_size} bytes"
    )]
    BadRange {
        offset: u32,
        len: u32,
        block_size: u32,
    },
    /// The control section could not be decoded as a request.
    #[error("malformed request")]
    Malformed,
    /// A request whose fields contradict each other (e.g. an update naming no block).
    #[error("invalid request: {what}")]
    Invalid { what: InvalidReason },
    /// The stored block failed its checksum; it is treated as an erasure and reported
    /// for repair. Its bytes are never returned.
    #[error("stripe {stripe} position {position}: stored block failed its checksum")]
    Corrupt { stripe: StripeId, position: u8 },
    /// The node restarted and has not yet confirmed this block is up to date.
    #[error("stripe {stripe}: the node is recovering and has not verified this block yet")]
    Recovering { stripe: StripeId },
    /// An update with a sequence number the node already applied, under another update id.
    #[error("stale version: block {index} of stripe {stripe} is at version {current}, update carries {got}")]
    StaleVersion {
        stripe: StripeId,
        index: u8,
        current: Version,
        got: Version,
    },
    /// A repair or as-of read for versions the node cannot provide.
    #[error(
        "stripe {stripe}: versions {wanted:?} are not available here (node holds {current:?})"
    )]
    VersionUnavailable {
        stripe: StripeId,
        wanted: Vec<Version>,
        current: Vec<Version>,
    },
    /// The client's lease ran out while it held locks at this node: it is fenced, and
    /// the node refuses its requests from now on (it must start again as a new client).
    #[error("client {client:#018x} is fenced: its lease expired while it held locks")]
    Fenced { client: ClientId },
    /// A direct update whose owner does not hold the block's lock at this node.
    #[error("block {index} of stripe {stripe} is not locked by the update's owner here")]
    NotLocked { stripe: StripeId, index: u8 },
    /// The lock is held by another owner (`holder`), on behalf of `client`, which
    /// may be reached at `contact` (client-client interface, report 5.5).
    #[error("block {index} of stripe {stripe} is locked by client {client:#018x}")]
    Locked {
        stripe: StripeId,
        index: u8,
        holder: ClientId,
        client: ClientId,
        contact: Option<std::net::SocketAddr>,
    },
    /// The block has an update of `client` this node took and has not yet passed on
    /// to every member lacking it; no lock is granted on it until then (it is being
    /// passed on now). Try again shortly.
    #[error("block {index} of stripe {stripe} has an update of client {client:#018x} still being settled")]
    Settling {
        stripe: StripeId,
        index: u8,
        client: ClientId,
    },
    /// The request's deadline passed before the node could answer.
    #[error("deadline exceeded at the node")]
    Timeout,
    /// Too much work queued; try again later.
    #[error("node busy")]
    Busy,
    /// The node's disk is full.
    #[error("no space left on the node's disk")]
    NoSpace,
    /// A disk error at the node.
    #[error("i/o error at the node ({kind})")]
    Io { kind: String },
    /// The node is shutting down.
    #[error("node shutting down")]
    ShuttingDown,
}

/// Why a request was [`WireError::Invalid`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum InvalidReason {
    /// An update or lock that names no block.
    NoBlocks,
    /// A data index >= k.
    IndexOutOfRange,
    /// A data node was sent an update for another data block, or a combined update.
    WrongRole,
    /// The same data index twice in one request.
    DuplicateIndex,
    /// A version vector of the wrong length.
    VersionLength,
    /// A sequence number of zero (versions start at 1).
    ZeroVersion,
    /// An update whose base is not below its version.
    BadBase,
    /// A request a node does not accept in this direction.
    Unexpected,
}

impl std::fmt::Display for InvalidReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            InvalidReason::NoBlocks => "names no block",
            InvalidReason::IndexOutOfRange => "data index out of range",
            InvalidReason::WrongRole => "update does not match the node's role in the stripe",
            InvalidReason::DuplicateIndex => "duplicate data index",
            InvalidReason::VersionLength => "version vector of the wrong length",
            InvalidReason::ZeroVersion => "sequence number zero",
            InvalidReason::BadBase => "update base not below its version",
            InvalidReason::Unexpected => "unexpected request",
        };
        f.write_str(s)
    }
}

impl WireError {
    /// True when the same request may succeed if retried later or elsewhere (the data
    /// is fine, the node is not ready); false when retrying cannot help.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            WireError::Recovering { .. }
                | WireError::Timeout
                | WireError::Busy
                | WireError::ShuttingDown
                | WireError::Locked { .. }
                | WireError::Settling { .. }
        )
    }
}
