//! Messages and events of the simulation.
//!
//! The messages mirror `drs-proto`'s requests and responses, reduced to what the
//! write/lock/read/relay protocol needs (one volume, whole-block reads, one block per
//! update). Block bytes travel as plain vectors.

use drs_lockgroups::UpdateKey;

/// Simulated milliseconds.
pub type Time = u64;

/// Who sends or receives a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Addr {
    Node(usize),
    Client(usize),
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Node(n) => write!(f, "n{n}"),
            Addr::Client(c) => write!(f, "c{c}"),
        }
    }
}

/// One block update, as `drs_proto::BlockUpdate`: update `id` takes data block `index`
/// from version `base` to `version` by XOR-ing a delta into `[offset, offset + len)`.
/// It applies to the block at exactly `base` (usually `version - 1`; lower when the
/// versions in between were possibly given out by a fenced client and are skipped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockUpdate {
    pub id: UpdateKey,
    pub index: u8,
    pub version: u64,
    pub base: u64,
    pub offset: usize,
    pub len: usize,
}

/// Requests (client to node, or node to node for relays).
#[derive(Debug, Clone)]
pub enum Req {
    /// Lock (and, for the written block's data node, lock-and-read of a range).
    Lock {
        stripe: u64,
        owner: u64,
        client: u64,
        index: u8,
        read: Option<(usize, usize)>,
        lease_ms: u64,
        completed: Vec<UpdateKey>,
    },
    Unlock {
        stripe: u64,
        owner: u64,
        blocks: Vec<(u8, u64)>,
        /// Which client path sent it (simulation bookkeeping, not on the wire).
        origin: UnlockOrigin,
    },
    Heartbeat {
        client: u64,
        lease_ms: u64,
        completed: Vec<UpdateKey>,
    },
    /// Update (direct, possibly with unlock) or relay.
    Update {
        stripe: u64,
        position: u8,
        owner: u64,
        update: BlockUpdate,
        delta: Vec<u8>,
        unlock: Vec<(u8, u64)>,
        relay: bool,
        completed: Vec<UpdateKey>,
    },
    /// A whole-block read: `Current` (clients: waits for pending updates, refused
    /// while the block is unverified) or `Applied` (scrub: whatever is applied).
    Read {
        stripe: u64,
        position: u8,
        applied: bool,
    },
    /// The node's blocks with their versions and the locks held on their stripes.
    List,
    /// Install a whole block at `versions` (scrub repair, rebuild).
    Repair {
        stripe: u64,
        position: u8,
        versions: Vec<u64>,
        data: Vec<u8>,
    },
}

/// Where an unlock comes from in the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnlockOrigin {
    /// `release` after a failed lock phase.
    Release,
    /// The unlock-only part of update-and-unlock (data nodes of other blocks).
    Commit,
    /// The background backlog (a catch-up unlock, or a release that got no answer),
    /// or its delivery before the same owner's next lock at the node. `after_lock`:
    /// sent after the lock request of the owner's current attempt went to that node
    /// (so, on an ordered channel, it arrives after that lock).
    Backlog { after_lock: bool },
}

/// One block in a `List` answer (`drs_proto::SlotInfo`).
#[derive(Debug, Clone)]
pub struct SlotView {
    pub stripe: u64,
    pub position: usize,
    pub versions: Vec<u64>,
    pub verified: bool,
    /// Data indices of the stripe locked at the node.
    pub locks: Vec<u8>,
}

/// Errors, as the subset of `drs_proto::WireError` the protocol reacts to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireErr {
    Locked {
        index: u8,
        holder: u64,
        client: u64,
    },
    /// The block has an update this node took and has not yet passed on to every
    /// member lacking it: no lock is granted on it until then.
    Settling {
        index: u8,
        client: u64,
    },
    Fenced,
    NotLocked,
    StaleVersion {
        current: u64,
        got: u64,
    },
    /// The request's deadline passed at the node.
    Timeout,
    /// The block is not verified (it is being rebuilt).
    Recovering,
    /// A repair would take the block back (it is ahead of the versions).
    VersionUnavailable,
}

/// What lock-and-read gave.
#[derive(Debug, Clone)]
pub enum LockRead {
    Block { versions: Vec<u64>, data: Vec<u8> },
    Zero,
    Failed,
}

/// A store's answer to one update (`drs_proto::Applied`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub applied: bool,
    pub duplicate: bool,
}

#[derive(Debug, Clone)]
pub enum Resp {
    Lock {
        known: Vec<(u8, u64)>,
        /// Versions a fenced holder may have given out beyond `known`.
        fenced: Vec<(u8, u64)>,
        read: Option<LockRead>,
    },
    Unlocked,
    Alive,
    Updated(Result<Applied, WireErr>),
    Read {
        versions: Vec<u64>,
        data: Vec<u8>,
    },
    List(Vec<SlotView>),
    Repaired(Result<bool, WireErr>),
    Error(WireErr),
}

#[derive(Debug, Clone)]
pub enum Body {
    Req(Req),
    Resp(Resp),
}

/// A message on the simulated network. `call` pairs a response with its request;
/// `deadline` is the requester's time budget (the frame's `deadline_ms`).
#[derive(Debug, Clone)]
pub struct Msg {
    pub from: Addr,
    pub to: Addr,
    pub call: u64,
    pub deadline: Time,
    pub body: Body,
}

/// Everything that happens, in time order.
#[derive(Debug, Clone)]
pub enum Ev {
    Deliver(Box<Msg>),
    /// The requester stops waiting for `call`.
    CallTimeout {
        call: u64,
    },
    /// The all-or-nothing loop of a node (aon.rs `run`, every TICK); ignored if
    /// `serial` is old (the loop was woken early and started a new sleep).
    NodeTick {
        node: usize,
        serial: u64,
    },
    /// `relay_now.notify_one()`: the all-or-nothing loop wakes at once.
    NodeRelayNow(usize),
    /// The lifecycle loop of a node (recover.rs `lifecycle`, every 100 ms).
    LifeTick(usize),
    /// A node's store writer finished its current job (log + fsync + apply).
    StoreDone(usize),
    /// A settle of a fenced client polls for its admitted updates.
    SettlePoll {
        node: usize,
        settle: u64,
    },
    /// A read (or lock-and-read) waiting for pending updates gives up.
    WaitExpire {
        node: usize,
        wait: u64,
    },
    /// A relay waiting for a tentative skip to be settled reaches its deadline.
    HeldRelayExpire {
        node: usize,
        hold: u64,
    },
    /// A client's sleep, backoff or think time ended (ignored if `serial` is old).
    ClientWake {
        client: usize,
        serial: u64,
    },
    /// A node's scrub sleeps between attempts.
    NodeWake {
        node: usize,
        serial: u64,
    },
    /// The client's heartbeat task ticks.
    ClientHbTick(usize),
    /// The client's unlock backlog drains a round.
    ClientBacklogTick(usize),
    /// The client process dies.
    ClientCrash(usize),
    /// The client process is stopped for `ms`.
    ClientPause {
        client: usize,
        ms: Time,
    },
}
