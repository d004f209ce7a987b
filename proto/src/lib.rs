//! The DRS wire protocol, in one place.
//!
//! Everything that crosses a socket between a client and a storage node, or between
//! two nodes, is defined here, and nothing else is: no sockets, no tasks, no business
//! logic (the handshake helpers run on a stream the caller opened).
//!
//! # Layout
//! - [`auth`]: the cluster key, the handshake that opens every connection (node and
//!   metadata alike) and the authenticated records (keyed BLAKE3, per-connection keys,
//!   implicit sequence numbers) that carry every frame after it.
//! - [`frame`]: the fixed 48-byte frame header (magic, protocol version, cluster id,
//!   epoch, request id, deadline, lengths, checksum), its validation before any
//!   allocation, and a `tokio-util` codec.
//! - [`msg`]: every request and response. Control fields are serialized with postcard;
//!   block bytes travel after them as a raw payload, never inside serde.
//! - [`error`]: [`WireError`], the stable, typed error a node returns.
//! - [`map`]: the cluster map (nodes, volumes, epoch) and the placement of stripes on
//!   nodes, shared by nodes, clients and tools.
//!
//! docs/PROTOCOL.md describes each message, who sends it, what each side persists and
//! why the invariants hold.

pub mod auth;
pub mod error;
pub mod frame;
pub mod map;
pub mod msg;

pub use auth::{ClusterKey, Purpose, RefusalGate, SealedCodec, Session};
pub use error::WireError;
pub use frame::{Frame, FrameCodec, FrameError, FrameHeader, FrameKind};
pub use map::{ClusterMap, Geometry, MapError, MemberState, MetaReplica, NodeEntry, VolumeConfig};
pub use msg::*;

/// Identifies one client process for locks and update ids. Chosen at random by the
/// client at start-up (64 bits, so collisions are negligible).
pub type ClientId = u64;
/// A node's id in the cluster map.
pub type NodeId = u32;
/// A volume's id in the cluster map.
pub type VolumeId = u32;
/// A stripe's index within a volume.
pub type StripeId = u64;
/// A per-block sequence number: the number of updates applied to a data block.
pub type Version = u64;
