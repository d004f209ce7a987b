//! Every request and response, with the payload each one carries.
//!
//! A request frame holds a postcard-encoded [`Request`] in its control section and,
//! for the messages that carry block bytes, those bytes as the raw payload. A response
//! frame holds a [`Response`] the same way. One request gets exactly one response,
//! with the same request id, except [`Request::Cancel`], which gets none.
//!
//! | request | sent by | payload in | payload out | reply |
//! |---|---|---|---|---|
//! | `Ping` | client, tool, node | - | - | `Pong` |
//! | `GetMap` | client refused for a stale epoch; client probing a node | - | the map's TOML | `Map` |
//! | `Read` | client, scrub, rebuilding node | - | bytes read | `Read` |
//! | `Lock` (`read = true`: lock-and-read) | client | - | block (lock-and-read) | `Lock` |
//! | `Unlock` | client | - | - | `Unlocked` |
//! | `Update` (`unlock`: update-and-unlock) | client | delta | - | `Updated` |
//! | `Repair` | scrub, reading client, rebuilding node | whole block | - | `Repaired` |
//! | `List` | scrub, status, rebuilding node | - | - | `List` |
//! | `Cancel` | client | - | - | (none) |
//! | `Heartbeat` | client | - | - | `Alive` |
//! | `CachePut` / `CacheDrop` | client (cache group) | running total / - | - | `CacheStored` |
//! | `CacheGet` | cache-group member | - | copies | `CacheCopies` |
//! | `PeerRead` / `PeerWrite` / `PeerRelease` | client to client | - / bytes | bytes / - | `PeerData` / `PeerWritten` / `PeerReleased` |
//! | `PeerDurable` | holder to the clients that wrote through it | - | - | `PeerNoted` |

use serde::{Deserialize, Serialize};

use crate::{error::WireError, ClientId, NodeId, StripeId, Version, VolumeId};

/// A unique name for one update multicast: the same id at every member of the stripe.
/// Nodes use it to recognise a duplicate (a retry, or a relay) of an update they hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct UpdateId {
    pub client: ClientId,
    /// Increases with every update the client sends.
    pub seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Liveness and node facts.
    Ping,
    /// Read a byte range of the block a node holds for a stripe.
    Read(ReadReq),
    /// Lock data blocks of a stripe (every member records the lock); optionally return
    /// the block this node holds among them (lock-and-read, report 5.6).
    Lock(LockReq),
    /// Release locks, recording the last version the holder gave out for each block.
    Unlock(UnlockReq),
    /// Apply a delta (report 5.1, 5.3.1), then optionally unlock (update-and-unlock, 5.6).
    Update(UpdateReq),
    /// Install a whole block reconstructed elsewhere, at stated versions (5.7).
    Repair(RepairReq),
    /// List the blocks a node holds, with versions and state, a page at a time.
    List(ListReq),
    /// The requester no longer wants the answer to an earlier request (report 5.6).
    Cancel(CancelReq),
    /// A client's lease renewal, with the updates it knows every member holds.
    Heartbeat(HeartbeatReq),
    /// Client to cache-group member: keep this copy of a cached block's pending change
    /// (report 5.3.3, cache groups).
    CachePut(CachePutReq),
    /// Client to cache-group member: forget these blocks (they reached the nodes).
    CacheDrop(CacheDropReq),
    /// Cache-group member to cache-group member: the copies you keep for a client.
    CacheGet(CacheGetReq),
    /// Client to client (report 5.5): read a block through the holder's cache.
    PeerRead(PeerReadReq),
    /// Client to client: write a block through the holder's cache.
    PeerWrite(PeerWriteReq),
    /// Client to client: write back and release a block you hold, I need it.
    PeerRelease(PeerReleaseReq),
    /// The cluster map the node follows (answered whatever the sender's epoch: how a
    /// client refused for a stale epoch catches up when the metadata service cannot
    /// answer it).
    GetMap,
    /// Holder to a client that wrote through its cache (at the `reply_to` it gave):
    /// your changes to this block up to a ticket reached the nodes.
    PeerDurable(PeerDurableReq),
}

impl Request {
    /// The request's kind, for logs and metrics.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Request::Ping => "ping",
            Request::Read(_) => "read",
            Request::Lock(_) => "lock",
            Request::Unlock(_) => "unlock",
            Request::Update(_) => "update",
            Request::Repair(_) => "repair",
            Request::List(_) => "list",
            Request::Cancel(_) => "cancel",
            Request::Heartbeat(_) => "heartbeat",
            Request::CachePut(_) => "cache_put",
            Request::CacheDrop(_) => "cache_drop",
            Request::CacheGet(_) => "cache_get",
            Request::PeerRead(_) => "peer_read",
            Request::PeerWrite(_) => "peer_write",
            Request::PeerRelease(_) => "peer_release",
            Request::PeerDurable(_) => "peer_durable",
            Request::GetMap => "get_map",
        }
    }
}

/// A cached block's pending change, as a cache-group member keeps it: enough to write
/// it back for the client with the client's own lock (the lock's owner, the version
/// the update takes the block to, the update's id, the members that granted).
/// Payload: the running total (old XOR new) over `[offset, offset + len)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachePutReq {
    pub volume: VolumeId,
    pub client: ClientId,
    pub lba: u64,
    pub stripe: StripeId,
    pub update: BlockUpdate,
    /// The lock owner.
    pub owner: ClientId,
    /// Positions in the stripe that granted the lock.
    pub granted: Vec<u8>,
    /// Versions to record when unlocking (as in an update-and-unlock).
    pub unlock: Vec<(u8, Version)>,
    /// Grows with every put of this block by this client; the newest copy wins.
    pub seq: u64,
    /// The other members of the client's cache group (to gather the newest copies).
    pub group: Vec<NodeId>,
    /// The client's lease: the member writes the copies back when it runs out.
    pub lease_ms: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheDropReq {
    pub volume: VolumeId,
    pub client: ClientId,
    pub lbas: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheGetReq {
    pub volume: VolumeId,
    pub client: ClientId,
    /// The first block of the page: copies of blocks from this one on, in block order.
    pub from_lba: u64,
}

/// The copies a cache-group member keeps for a client; each payload follows in the
/// response payload, one after the other (`update.len` bytes each).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheCopies {
    pub copies: Vec<CachePutReq>,
    /// Where the next page starts, if there is one (a page holds what fits in a frame).
    pub next: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerReadReq {
    pub volume: VolumeId,
    pub lba: u64,
    pub offset: u32,
    pub len: u32,
}

/// Payload: the bytes to write at `offset`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerWriteReq {
    pub volume: VolumeId,
    pub lba: u64,
    pub offset: u32,
    /// Answer only once the change reached the storage nodes (the holder writes the
    /// block back first).
    pub durable: bool,
    /// Where the writer serves other clients, if it does: the holder tells it there
    /// when a write-back carried the change (`PeerDurable`).
    pub reply_to: Option<std::net::SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerDurableReq {
    pub volume: VolumeId,
    pub lba: u64,
    /// The holder's contact, as the writer reached it.
    pub holder: std::net::SocketAddr,
    /// The holder's instance (`PeerWritten::instance`).
    pub instance: u64,
    /// The writer's changes through this holder to the block with tickets from
    /// `from` to `through` reached the nodes (one cached copy of the block, written
    /// back whole; an earlier copy's changes are not vouched for).
    pub from: u64,
    pub through: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerReleaseReq {
    pub volume: VolumeId,
    pub lba: u64,
    /// The first ticket (`PeerWritten::ticket`) of the asker's writes to the block
    /// through this holder since it last asked: the holder answers with an error if
    /// a write-back of the block that held that one or a later one failed.
    /// `u64::MAX`: the asker wrote nothing through it (it only wants the block).
    pub since: u64,
    /// The holder's instance that gave those tickets (`PeerWritten::instance`): a
    /// cache listening on the same address now is another one, and fails the
    /// request (what the earlier one held died with it). Ignored with no tickets.
    pub instance: u64,
}

/// Renews `client`'s lease at the node (report 5.3.3: the lock group watches the
/// processes holding locks). Sent every third of the lease while the client holds
/// locks at the node, and to deliver completion notices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatReq {
    pub client: ClientId,
    pub lease_ms: u32,
    /// Updates of this client every member has acknowledged.
    pub completed: Vec<UpdateId>,
}

/// How a read treats pending updates and unverified blocks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReadMode {
    /// A client read. The node first waits (within the deadline) until every update it
    /// has logged for the block is applied, so a read after an acknowledged write sees
    /// it. Refused with `Recovering` while the node has not verified the block.
    Current,
    /// Whatever the node has applied, verified or not. The reply's versions say exactly
    /// which state that is; used to reconstruct and to check (scrub, rebuild).
    Applied,
    /// The block as of exactly these versions (length k): the node waits for missing
    /// updates within the deadline and undoes newer ones it still holds in memory, or
    /// answers `VersionUnavailable`.
    AsOf(Vec<Version>),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadReq {
    pub volume: VolumeId,
    pub stripe: StripeId,
    /// Position in the stripe: 0..k data, k..k+m parity. Must be the node's own.
    pub position: u8,
    pub offset: u32,
    pub len: u32,
    pub mode: ReadMode,
}

/// Payload: the `len` bytes read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadReply {
    /// The versions the returned bytes reflect, one per data index (length k). A data
    /// node tracks only its own index (the others are 0); a parity node tracks all.
    pub versions: Vec<Version>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockReq {
    pub volume: VolumeId,
    pub stripe: StripeId,
    /// The lock owner: a fresh id for each lock acquisition, so two operations of one
    /// client exclude each other like two clients do. Asking again with the same owner
    /// is granted (a retried request must not fail).
    pub owner: ClientId,
    /// Data indices (0..k) to lock. All or none are granted.
    pub indices: Vec<u8>,
    /// Lock-and-read: if this node is the data node of one of `indices`, also return
    /// this byte range `(offset, len)` of its block.
    pub read: Option<(u32, u32)>,
    /// The client on whose behalf `owner` locks: the request renews its lease.
    pub client: ClientId,
    /// How long the lease lasts without a heartbeat.
    pub lease_ms: u32,
    /// Updates of this client every member has acknowledged: the node may forget them.
    pub completed: Vec<UpdateId>,
    /// Where other clients can reach this client's cache (client-client interface,
    /// report 5.5); told to whoever finds the block locked.
    pub contact: Option<std::net::SocketAddr>,
    /// The nodes keeping copies of this client's cache (cache group, report 5.3.3):
    /// when its lease runs out, the node keeps its locks until they wrote it back.
    pub cache_group: Vec<NodeId>,
}

/// What lock-and-read returned for the node's own block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockRead {
    /// Payload: the requested range of the block, at these versions (length k).
    Block { versions: Vec<Version> },
    /// The block was never written: it is all zeros (payload empty).
    Zero,
    /// The lock is granted but the block could not be returned (e.g. corrupt, or the
    /// node is recovering): the client must reconstruct it.
    Failed(WireError),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockReply {
    /// For each locked index this node tracks: the highest version it knows was given
    /// out (applied, logged, or recorded by an unlock). The next update to the block
    /// is built on the maximum over all members (its `base`).
    pub known: Vec<(u8, Version)>,
    /// For each locked index whose last holder here was fenced (its lease ran out)
    /// rather than unlocking: the highest version that holder may have given out
    /// without this node learning of it. The next update skips past it, so that an
    /// update of a dead client that survives only on a node that was down can never
    /// share a version with a later one (see `BlockUpdate::base`).
    pub fenced: Vec<(u8, Version)>,
    pub read: Option<LockRead>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnlockReq {
    pub volume: VolumeId,
    pub stripe: StripeId,
    /// The owner the locks were granted to.
    pub owner: ClientId,
    /// (data index, last version the holder gave out for it; 0 if none).
    pub blocks: Vec<(u8, Version)>,
}

/// One update: the delta of one data block (report 5.1, 5.3.1). An update names one
/// data block so that any member holding it can pass it on to a member that lacks it
/// (all-or-nothing, report 5.3.3): the data node and every parity node receive the
/// same bytes, the data node XORs them in, parity node j scales them by c(j, index)
/// and XORs that in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockUpdate {
    pub id: UpdateId,
    /// The data block (0..k).
    pub index: u8,
    /// The version this update takes the block to.
    pub version: Version,
    /// The version of the block the delta was computed against: the update applies
    /// to the block at exactly this version (usually `version - 1`; lower when the
    /// versions in between were given out by a fenced client and never reached any
    /// live member, so they are void). A member holding a version between the two
    /// holds a void update and must rebuild the block from the stripe.
    pub base: Version,
    /// The changed range `[offset, offset + len)` of the block.
    pub offset: u32,
    pub len: u32,
}

/// Payload: the deltas of `updates`, one after the other (`len` bytes each).
/// A write of several blocks of a stripe sends each member one `UpdateReq` with the
/// updates it must apply: the data node its own block's, each parity node all of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateReq {
    pub volume: VolumeId,
    pub stripe: StripeId,
    /// The receiving node's position in the stripe.
    pub position: u8,
    /// The lock owner the updates are made under (the node checks it holds the blocks'
    /// locks, unless `relay`).
    pub owner: ClientId,
    pub updates: Vec<BlockUpdate>,
    /// Update-and-unlock (report 5.6): once the updates are logged, release these
    /// blocks' locks held by `owner`, recording the versions given out, exactly as an
    /// [`UnlockReq`] would. Empty: no unlock.
    pub unlock: Vec<(u8, Version)>,
    /// Sent by a member passing on updates it holds (all-or-nothing relay), not by
    /// their client: applied without a lock (a member took them under one), never
    /// unlocks anything.
    pub relay: bool,
    /// Sent by a cache-group member writing back a fenced client's cache: accepted
    /// while the client's lock is still held here, though the client is fenced.
    pub on_behalf: bool,
    /// Updates of this client every member has acknowledged: the node may forget them.
    pub completed: Vec<UpdateId>,
    /// Data indices of `updates` whose data node did not take part in the write (it
    /// did not grant the lock, or granted and did not take its update: then a relay
    /// from the client names it). A parity node keeps such an update, with its
    /// delta, durably until a member lacking it confirms it, and passes it on after
    /// a restart: the parity members may hold its only copies (docs/PROTOCOL.md 9.2).
    pub keep: Vec<u8>,
}

/// One update's outcome at a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// True when applied; false when logged durably but waiting for an earlier version
    /// (it is applied as soon as that arrives).
    pub applied: bool,
    /// True when the node already held this update (a retry or a relay); nothing was
    /// done twice.
    pub duplicate: bool,
}

/// One outcome per update of the request, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateReply {
    pub results: Vec<Result<Applied, WireError>>,
}

/// Payload: the whole block, as of `versions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairReq {
    pub volume: VolumeId,
    pub stripe: StripeId,
    pub position: u8,
    /// The versions the payload reflects (length k).
    pub versions: Vec<Version>,
    /// Install even when the node's versions equal `versions` and its checksum is good
    /// (scrub found the parity equations violated and located this block as wrong).
    pub force: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairReply {
    /// False when the node was already at or past `versions` with a good block.
    pub installed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListReq {
    pub volume: VolumeId,
    pub from_stripe: StripeId,
    /// Most entries to return (the node may return fewer).
    pub max: u32,
}

/// A node's view of one of its blocks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotInfo {
    pub stripe: StripeId,
    pub position: u8,
    /// Applied versions (length k, as in [`ReadReply`]).
    pub versions: Vec<Version>,
    /// Highest versions the node knows were given out (>= `versions`).
    pub known: Vec<Version>,
    pub state: SlotState,
    /// Locks held on the stripe's data blocks.
    pub locks: Vec<LockInfo>,
    /// Data blocks with updates this node took and has not yet seen reach every
    /// member that must hold them: it passes them on itself (all-or-nothing relays).
    pub unsettled: Vec<u8>,
    /// Data blocks with updates logged here and not yet applied (waiting for an
    /// earlier version).
    pub pending: Vec<u8>,
}

/// A lock held at a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    pub index: u8,
    /// The lock owner (one per lock acquisition).
    pub owner: ClientId,
    /// The client whose lease keeps the lock.
    pub client: ClientId,
    /// What is left of that lease at this node.
    pub lease_left_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SlotState {
    /// Verified and checksum not known to be bad.
    Ok,
    /// Failed its checksum when last read; waiting for repair.
    Corrupt,
    /// The node restarted and has not yet compared this block with its stripe.
    Unverified,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListReply {
    pub slots: Vec<SlotInfo>,
    /// Where the next page starts, if there is one.
    pub next: Option<StripeId>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelReq {
    pub request_id: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Pong(NodeInfo),
    /// The lease was renewed; it lasts this long from the node's receipt.
    Alive {
        lease_ms: u32,
    },
    /// A cache copy was stored or dropped.
    CacheStored,
    /// Copies kept for a client.
    CacheCopies(CacheCopies),
    /// A peer read: `held` false means the block is not in that cache any more (read
    /// it from the nodes); otherwise the payload holds the bytes.
    PeerData {
        held: bool,
    },
    /// A peer write was taken into the holder's cache (`held`), and, if `durable`,
    /// written back to the nodes.
    PeerWritten {
        held: bool,
        durable: bool,
        /// Numbers the holder's forwarded writes, in order (0 when not held).
        ticket: u64,
        /// Random per cache: names the holder the ticket is from.
        instance: u64,
    },
    /// A peer release: the block was written back and unlocked (or was not held).
    PeerReleased {
        held: bool,
    },
    Read(ReadReply),
    Lock(LockReply),
    Unlocked,
    Updated(UpdateReply),
    Repaired(RepairReply),
    List(ListReply),
    Error(WireError),
    /// The node's cluster map, as the TOML of a cluster file, in the payload (a map
    /// of a few hundred nodes would not fit the control section).
    Map,
    /// A `PeerDurable` was taken note of.
    PeerNoted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    /// Restarted; comparing its blocks with their stripes and rebuilding stale ones.
    Recovering { verified: u64, total: u64 },
    /// Every block verified.
    Up,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStats {
    pub reads: u64,
    pub bytes_read: u64,
    pub updates: u64,
    pub bytes_updated: u64,
    pub locks_granted: u64,
    pub locks_denied: u64,
    pub corrupt_found: u64,
    pub repairs_installed: u64,
    pub rebuilt: u64,
    pub pending_updates: u64,
    pub wal_bytes: u64,
    pub fsyncs: u64,
    /// Times the node found it had been paused (and re-verified its blocks).
    pub pauses: u64,
    /// Clients fenced here because their lease ran out while they held locks.
    pub fenced: u64,
    /// Updates passed on to members that lacked them (all-or-nothing relays).
    pub relayed: u64,
    /// Cached blocks this node wrote back for dead clients (as a cache group member).
    pub written_back: u64,
    /// Background scrub passes completed.
    pub scrub_passes: u64,
    /// Blocks the background scrubber checked, over all passes.
    pub scrub_checked: u64,
    /// Blocks the background scrubber found corrupt (also in `corrupt_found`).
    pub scrub_found: u64,
    /// Corrupt blocks the background scrubber rebuilt (also in `repairs_installed`).
    pub scrub_repaired: u64,
    /// Blocks checked in the pass under way, of `scrub_total` (0 between passes).
    pub scrub_position: u64,
    pub scrub_total: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub node: NodeId,
    /// Changes at every restart of the node (Circus incarnation numbers, sections 13-15).
    pub incarnation: u64,
    pub epoch: u64,
    pub state: NodeState,
    pub stats: NodeStats,
    /// The incarnation the metadata service gave this start of the node when it
    /// registered (0: not registered yet, or no metadata service). The node is up in
    /// the cluster when the map's record has this incarnation and says up.
    pub registered: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Request> {
        vec![
            Request::Ping,
            Request::Read(ReadReq {
                volume: 1,
                stripe: 7,
                position: 2,
                offset: 0,
                len: 65536,
                mode: ReadMode::AsOf(vec![1, 2, 3, 4]),
            }),
            Request::Lock(LockReq {
                volume: 1,
                stripe: 9,
                owner: 5,
                indices: vec![0, 3],
                read: Some((0, 4096)),
                client: 8,
                lease_ms: 3000,
                completed: vec![UpdateId { client: 8, seq: 1 }],
                contact: Some("127.0.0.1:4000".parse().unwrap()),
                cache_group: vec![1, 2],
            }),
            Request::Unlock(UnlockReq {
                volume: 1,
                stripe: 9,
                owner: 5,
                blocks: vec![(0, 4)],
            }),
            Request::Update(UpdateReq {
                volume: 1,
                stripe: 9,
                position: 4,
                owner: 6,
                updates: vec![
                    BlockUpdate {
                        id: UpdateId { client: 5, seq: 77 },
                        index: 0,
                        version: 4,
                        base: 3,
                        offset: 512,
                        len: 10,
                    },
                    BlockUpdate {
                        id: UpdateId { client: 5, seq: 78 },
                        index: 1,
                        version: 2,
                        base: 1,
                        offset: 0,
                        len: 5,
                    },
                ],
                unlock: vec![(0, 4), (1, 2)],
                relay: false,
                on_behalf: true,
                completed: vec![],
                keep: Vec::new(),
            }),
            Request::Heartbeat(HeartbeatReq {
                client: 5,
                lease_ms: 3000,
                completed: vec![UpdateId { client: 5, seq: 1 }],
            }),
            Request::Repair(RepairReq {
                volume: 1,
                stripe: 2,
                position: 5,
                versions: vec![0; 4],
                force: true,
            }),
            Request::List(ListReq {
                volume: 1,
                from_stripe: 100,
                max: 500,
            }),
            Request::Cancel(CancelReq { request_id: 3 }),
            Request::CachePut(cache_put()),
            Request::CacheDrop(CacheDropReq {
                volume: 1,
                client: 5,
                lbas: vec![3, 9],
            }),
            Request::CacheGet(CacheGetReq {
                volume: 1,
                client: 5,
                from_lba: 7,
            }),
            Request::PeerRead(PeerReadReq {
                volume: 1,
                lba: 3,
                offset: 8,
                len: 16,
            }),
            Request::PeerWrite(PeerWriteReq {
                volume: 1,
                lba: 3,
                offset: 8,
                durable: true,
                reply_to: Some("127.0.0.1:7000".parse().unwrap()),
            }),
            Request::PeerRelease(PeerReleaseReq {
                volume: 1,
                lba: 3,
                since: 9,
                instance: 11,
            }),
            Request::PeerDurable(PeerDurableReq {
                volume: 1,
                lba: 3,
                holder: "[::1]:7001".parse().unwrap(),
                instance: 11,
                from: 10,
                through: 12,
            }),
        ]
    }

    fn cache_put() -> CachePutReq {
        CachePutReq {
            volume: 1,
            client: 5,
            lba: 3,
            stripe: 0,
            update: BlockUpdate {
                id: UpdateId { client: 5, seq: 2 },
                index: 3,
                version: 7,
                base: 5,
                offset: 0,
                len: 4,
            },
            owner: 6,
            granted: vec![0, 1, 2, 3, 4, 5],
            unlock: vec![(3, 7)],
            seq: 11,
            group: vec![1, 2],
            lease_ms: 3000,
        }
    }

    #[test]
    fn requests_round_trip() {
        for r in samples() {
            let bytes = postcard::to_stdvec(&r).unwrap();
            let back: Request = postcard::from_bytes(&bytes).unwrap();
            assert_eq!(r, back);
        }
    }

    #[test]
    fn responses_round_trip() {
        let rs = vec![
            Response::Pong(NodeInfo {
                node: 3,
                incarnation: 9,
                epoch: 1,
                registered: 4,
                state: NodeState::Recovering {
                    verified: 1,
                    total: 2,
                },
                stats: NodeStats {
                    reads: 5,
                    ..Default::default()
                },
            }),
            Response::Lock(LockReply {
                known: vec![(1, 8)],
                fenced: vec![(1, 9)],
                read: Some(LockRead::Failed(WireError::Corrupt {
                    stripe: 1,
                    position: 1,
                })),
            }),
            Response::Error(WireError::Settling {
                stripe: 3,
                index: 1,
                client: 77,
            }),
            Response::Error(WireError::Locked {
                stripe: 1,
                index: 0,
                holder: 99,
                client: 98,
                contact: None,
            }),
            Response::CacheStored,
            Response::CacheCopies(CacheCopies {
                copies: vec![cache_put()],
                next: Some(9),
            }),
            Response::PeerData { held: true },
            Response::PeerWritten {
                held: true,
                durable: false,
                ticket: 7,
                instance: 11,
            },
            Response::PeerReleased { held: false },
            Response::PeerNoted,
            Response::Updated(UpdateReply {
                results: vec![
                    Ok(Applied {
                        applied: true,
                        duplicate: false,
                    }),
                    Err(WireError::Fenced { client: 3 }),
                ],
            }),
            Response::Alive { lease_ms: 3000 },
            Response::List(ListReply {
                slots: vec![SlotInfo {
                    stripe: 1,
                    position: 0,
                    versions: vec![1, 0],
                    known: vec![2, 0],
                    state: SlotState::Unverified,
                    locks: vec![LockInfo {
                        index: 0,
                        owner: 7,
                        client: 6,
                        lease_left_ms: 1200,
                    }],
                    unsettled: vec![1],
                    pending: vec![0],
                }],
                next: Some(2),
            }),
        ];
        for r in rs {
            let bytes = postcard::to_stdvec(&r).unwrap();
            let back: Response = postcard::from_bytes(&bytes).unwrap();
            assert_eq!(r, back);
        }
    }

    proptest::proptest! {
        #[test]
        fn decoding_garbage_never_panics(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = postcard::from_bytes::<Request>(&data);
            let _ = postcard::from_bytes::<Response>(&data);
        }
    }
}
