//! The replicated metadata state and its commands, pure (no I/O).
//!
//! [`MetaState`] is what every metadata replica holds after applying the same log: the
//! cluster id, the epoch, every storage node's record (address, incarnation, state), the
//! volumes, and the addresses of the metadata replicas. [`MetaState::apply`] (commands)
//! and [`MetaState::set_replicas`] (Raft membership entries) are the only ways it
//! changes; both are deterministic, and every refusal is a typed
//! [`MetaResponse::Refused`], never a panic, so a bad command in the log cannot stop a
//! replica.
//!
//! The epoch is the version of [`MetaState::cluster_map`]: once bootstrapped it grows by
//! one each time a node record, the volume list or the replica list changes (Bootstrap
//! may jump it to the map's epoch), and never otherwise.
//!
//! Incarnations: a node's incarnation grows each time its process registers or it is
//! replaced, so a command or heartbeat naming an older incarnation (from a process that
//! has since restarted) is recognised as stale.
//!
//! Compatibility: commands are stored in the Raft log with postcard, which encodes the
//! variant index, so new variants (for example file-system namespace commands) must be
//! appended after the existing ones.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use drs_proto::map::{ClusterMap, MetaReplica, NodeEntry, VolumeConfig};
use drs_proto::{NodeId, VolumeId};
use serde::{Deserialize, Serialize};

/// A metadata replica's id (its Raft node id). Distinct from storage [`NodeId`]s.
pub type ReplicaId = u64;

/// What the metadata service believes about a storage node: `Up` (serving), `Down`
/// (silent past the failure detector's limit, or added and not registered yet) or
/// `Recovering` (registered or replaced, catching up; `MarkUp` ends it). The same type
/// as the data-path map's node state.
pub use drs_proto::map::MemberState as NodeState;

/// One storage node's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub addr: SocketAddr,
    /// Grows each time the node's process registers or the node is replaced.
    pub incarnation: u64,
    pub state: NodeState,
    /// The nonce of the registration that gave the current incarnation (0: none).
    pub register_nonce: u64,
    /// The node's data directory, for local clusters (carried over from the bootstrap
    /// map so that [`MetaState::cluster_map`] gives back what was bootstrapped).
    pub data_dir: Option<PathBuf>,
}

/// The replicated metadata state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaState {
    /// 0 until bootstrapped.
    pub cluster_id: u64,
    /// 0 until bootstrapped, then the version of the data-path view.
    pub epoch: u64,
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    pub volumes: Vec<VolumeConfig>,
    /// The metadata replicas (Raft voters) and their addresses, for clients. Maintained
    /// from the Raft membership (see [`MetaState::set_replicas`]), not by commands.
    pub replicas: BTreeMap<ReplicaId, SocketAddr>,
    /// Which storage node hosts which replica, as the bootstrap map said.
    pub replica_hosts: BTreeMap<ReplicaId, NodeId>,
}

/// What the Raft log carries: a command, and the nonce its proposer chose for it.
/// A proposer that retries (its leader died before answering) sends the same nonce,
/// so a command applied once is not applied again ([`Answered`]). Nonce 0: no such
/// check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    pub nonce: u64,
    pub cmd: MetaCommand,
}

/// The answers to the most recent proposals by nonce (at most [`Answered::MAX`], and
/// at most [`Answered::MAX_BYTES`] of them encoded), kept with the state machine (in
/// its snapshots, not in the state clients read): a retried proposal gets its first
/// answer again and changes nothing.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Answered {
    recent: std::collections::VecDeque<(u64, MetaResponse)>,
    /// Encoded bytes of `recent`, once counted (not stored: a function of `recent`,
    /// counted again after a load, so every replica evicts at the same point).
    #[serde(skip)]
    bytes: Option<usize>,
}

impl PartialEq for Answered {
    fn eq(&self, other: &Answered) -> bool {
        self.recent == other.recent
    }
}

impl Eq for Answered {}

fn answer_bytes(nonce: u64, r: &MetaResponse) -> usize {
    postcard::experimental::serialized_size(&(nonce, r)).unwrap_or(0)
}

/// What is remembered instead of a `Map`'s answer longer than [`Answered::LARGE`] bytes: an
/// empty block list, which no `Map` answers (it maps at least one block). A retry of
/// it is applied again: a `Map` of blocks it already mapped maps nothing new and
/// answers the same list.
fn marker_for(r: &MetaResponse, bytes: usize) -> Option<MetaResponse> {
    match r {
        MetaResponse::Fs(Ok(crate::fs::FsReply::Mapped(_))) if bytes > Answered::LARGE => {
            Some(MetaResponse::Fs(Ok(crate::fs::FsReply::Mapped(Vec::new()))))
        }
        _ => None,
    }
}

fn is_reapply_marker(r: &MetaResponse) -> bool {
    matches!(r, MetaResponse::Fs(Ok(crate::fs::FsReply::Mapped(m))) if m.is_empty())
}

impl Answered {
    /// Proposals remembered. Retries come within seconds of the first try, while
    /// proposals are a few per second at most.
    pub const MAX: usize = 4096;
    /// Encoded bytes of the answers remembered. They are stored in the state
    /// machine's head record, rewritten at every persist; a `Map` answer lists up to
    /// [`crate::fs::MAP_MAX`] blocks (some 45 KiB), so 4096 of them would make some
    /// 180 MiB. Such answers are remembered as a marker (see [`Answered::LARGE`]), so
    /// this bound only guards against answers that grow in the future.
    pub const MAX_BYTES: usize = 2 << 20;
    /// A `Map` answer longer than this is remembered as a marker that has its retry
    /// applied again (idempotent for a `Map`), not whole.
    pub const LARGE: usize = 256;

    /// Applies `p` to `state` unless its nonce was answered already; the answer.
    pub fn apply(&mut self, state: &mut MetaState, p: &Proposal) -> MetaResponse {
        self.apply_with(p.nonce, || state.apply(&p.cmd))
    }

    /// Runs `apply` unless `nonce` was answered already; the answer.
    pub fn apply_with(&mut self, nonce: u64, apply: impl FnOnce() -> MetaResponse) -> MetaResponse {
        if nonce == 0 {
            return apply();
        }
        if let Some((_, r)) = self.recent.iter().find(|(n, _)| *n == nonce) {
            if is_reapply_marker(r) {
                return apply();
            }
            return r.clone();
        }
        let r = apply();
        let mut bytes = match self.bytes {
            Some(b) => b,
            None => self.recent.iter().map(|(n, r)| answer_bytes(*n, r)).sum(),
        };
        let whole = answer_bytes(nonce, &r);
        let kept = match marker_for(&r, whole) {
            Some(marker) => {
                bytes += answer_bytes(nonce, &marker);
                marker
            }
            None => {
                bytes += whole;
                r.clone()
            }
        };
        self.recent.push_back((nonce, kept));
        while self.recent.len() > Self::MAX || (bytes > Self::MAX_BYTES && self.recent.len() > 1) {
            if let Some((n, old)) = self.recent.pop_front() {
                bytes = bytes.saturating_sub(answer_bytes(n, &old));
            }
        }
        self.bytes = Some(bytes);
        r
    }

    pub fn len(&self) -> usize {
        self.recent.len()
    }

    pub fn is_empty(&self) -> bool {
        self.recent.is_empty()
    }
}

/// A change to the metadata state, proposed through Raft.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum MetaCommand {
    /// First map of the cluster; only when nothing is bootstrapped yet. Every node starts
    /// `Up` with incarnation 1 (the map's node states and incarnations are ignored); the
    /// map's replica list only contributes which node hosts which replica (the replicas
    /// themselves come from the Raft membership).
    Bootstrap {
        #[serde(with = "map_as_json")]
        map: ClusterMap,
    },
    /// A node process is starting: incarnation + 1, `Recovering`. Refused for an unknown
    /// node or an address other than the registered one (use `Replace` to move a node).
    /// `nonce` names one registration (its retries carry the same one): a retry of a
    /// registration already applied, whose answer was lost, gets the same incarnation
    /// instead of another (0: no such check).
    Register {
        node: NodeId,
        addr: SocketAddr,
        nonce: u64,
    },
    /// `Recovering` -> `Up`, if `incarnation` is the current one.
    MarkUp { node: NodeId, incarnation: u64 },
    /// `Up`/`Recovering` -> `Down`, if `incarnation` is the current one.
    MarkDown { node: NodeId, incarnation: u64 },
    /// The node now lives at `addr` (a new machine or disk): incarnation + 1, `Recovering`.
    Replace { node: NodeId, addr: SocketAddr },
    /// A new node, `Down` (incarnation 0) until it registers.
    AddNode { node: NodeId, addr: SocketAddr },
    /// Forget a node; refused while a volume places blocks on it.
    RemoveNode { node: NodeId },
    /// A change to the file system namespace (applied to [`crate::fs::FsState`], not to
    /// this state; the epoch does not change).
    Fs(crate::fs::FsCommand),
}

/// The result of applying a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum MetaResponse {
    /// The state changed; `epoch` is the new epoch.
    Applied { epoch: u64 },
    /// Nothing to do (for example marking down a node that is already down).
    Unchanged { epoch: u64 },
    /// `Register`: the node's new incarnation.
    Registered { incarnation: u64, epoch: u64 },
    /// The command was refused; the state did not change.
    Refused(Refusal),
    /// The answer to a file system command.
    Fs(Result<crate::fs::FsReply, crate::fs::FsError>),
}

impl MetaResponse {
    /// The epoch after the command, unless it was refused.
    pub fn epoch(&self) -> Option<u64> {
        match self {
            MetaResponse::Applied { epoch }
            | MetaResponse::Unchanged { epoch }
            | MetaResponse::Registered { epoch, .. } => Some(*epoch),
            MetaResponse::Refused(_) | MetaResponse::Fs(_) => None,
        }
    }

    pub fn refusal(&self) -> Option<&Refusal> {
        match self {
            MetaResponse::Refused(r) => Some(r),
            _ => None,
        }
    }
}

/// Why a command was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    #[error("the cluster is not bootstrapped")]
    NotBootstrapped,
    #[error("the cluster is already bootstrapped (cluster id {cluster_id:016x})")]
    AlreadyBootstrapped { cluster_id: u64 },
    #[error("invalid cluster map: {0}")]
    InvalidMap(String),
    #[error("unknown node {0}")]
    UnknownNode(NodeId),
    #[error("node {0} already exists")]
    NodeExists(NodeId),
    #[error("node {node} is registered at {registered}, not {given} (use replace to move it)")]
    AddressMismatch {
        node: NodeId,
        registered: SocketAddr,
        given: SocketAddr,
    },
    #[error("address {addr} is already used by node {node}")]
    AddressInUse { addr: SocketAddr, node: NodeId },
    #[error("node {node} is at incarnation {current}, not {given}")]
    StaleIncarnation {
        node: NodeId,
        current: u64,
        given: u64,
    },
    #[error("node {node} is {}, not recovering (it must register again)", state.as_str())]
    NotRecovering { node: NodeId, state: NodeState },
    #[error("node {node} is in the placement of volume {volume}")]
    NodeInUse { node: NodeId, volume: VolumeId },
}

impl MetaState {
    /// Whether a map was bootstrapped.
    pub fn is_bootstrapped(&self) -> bool {
        self.epoch > 0
    }

    /// Applies one command. Deterministic: the same commands from the same state give
    /// the same state and responses on every replica.
    pub fn apply(&mut self, cmd: &MetaCommand) -> MetaResponse {
        match self.check(cmd) {
            Err(refusal) => MetaResponse::Refused(refusal),
            Ok(()) => self.apply_checked(cmd),
        }
    }

    /// Every refusal, decided before anything changes.
    fn check(&self, cmd: &MetaCommand) -> Result<(), Refusal> {
        if let MetaCommand::Bootstrap { map } = cmd {
            if self.is_bootstrapped() {
                return Err(Refusal::AlreadyBootstrapped {
                    cluster_id: self.cluster_id,
                });
            }
            map.validate()
                .map_err(|e| Refusal::InvalidMap(e.to_string()))?;
            return Ok(());
        }
        if !self.is_bootstrapped() {
            return Err(Refusal::NotBootstrapped);
        }
        match cmd {
            MetaCommand::Bootstrap { .. } | MetaCommand::Fs(_) => Ok(()),
            MetaCommand::Register { node, addr, .. } => {
                let rec = self.record(*node)?;
                if rec.addr != *addr {
                    return Err(Refusal::AddressMismatch {
                        node: *node,
                        registered: rec.addr,
                        given: *addr,
                    });
                }
                Ok(())
            }
            MetaCommand::MarkUp { node, incarnation } => {
                let rec = self.current(*node, *incarnation)?;
                match rec.state {
                    NodeState::Recovering | NodeState::Up => Ok(()),
                    state => Err(Refusal::NotRecovering { node: *node, state }),
                }
            }
            MetaCommand::MarkDown { node, incarnation } => {
                self.current(*node, *incarnation).map(|_| ())
            }
            MetaCommand::Replace { node, addr } => {
                self.record(*node)?;
                self.address_free(*addr, *node)
            }
            MetaCommand::AddNode { node, addr } => {
                if self.nodes.contains_key(node) {
                    return Err(Refusal::NodeExists(*node));
                }
                self.address_free(*addr, *node)
            }
            MetaCommand::RemoveNode { node } => {
                self.record(*node)?;
                match self.volumes.iter().find(|v| v.nodes.contains(node)) {
                    Some(v) => Err(Refusal::NodeInUse {
                        node: *node,
                        volume: v.id,
                    }),
                    None => Ok(()),
                }
            }
        }
    }

    fn apply_checked(&mut self, cmd: &MetaCommand) -> MetaResponse {
        match cmd {
            MetaCommand::Bootstrap { map } => {
                self.cluster_id = map.cluster_id;
                self.epoch = map.epoch.max(self.epoch.saturating_add(1));
                self.nodes = map
                    .nodes
                    .iter()
                    .map(|n| {
                        let rec = NodeRecord {
                            addr: n.addr,
                            incarnation: 1,
                            state: NodeState::Up,
                            register_nonce: 0,
                            data_dir: n.data_dir.clone(),
                        };
                        (n.id, rec)
                    })
                    .collect();
                self.volumes = map.volumes.clone();
                self.replica_hosts = map
                    .meta
                    .iter()
                    .filter_map(|r| Some((r.id, r.host?)))
                    .collect();
                MetaResponse::Applied { epoch: self.epoch }
            }
            MetaCommand::Register { node, nonce, .. } => {
                let again = self
                    .nodes
                    .get(node)
                    .filter(|rec| *nonce != 0 && rec.register_nonce == *nonce);
                if let Some(rec) = again {
                    return MetaResponse::Registered {
                        incarnation: rec.incarnation,
                        epoch: self.epoch,
                    };
                }
                let incarnation = self.update(*node, |rec| {
                    rec.incarnation = rec.incarnation.saturating_add(1);
                    rec.state = NodeState::Recovering;
                    rec.register_nonce = *nonce;
                    rec.incarnation
                });
                MetaResponse::Registered {
                    incarnation,
                    epoch: self.epoch,
                }
            }
            MetaCommand::MarkUp { node, .. } => self.set_state(*node, NodeState::Up),
            MetaCommand::MarkDown { node, .. } => self.set_state(*node, NodeState::Down),
            MetaCommand::Replace { node, addr } => {
                self.update(*node, |rec| {
                    rec.addr = *addr;
                    rec.incarnation = rec.incarnation.saturating_add(1);
                    rec.state = NodeState::Recovering;
                });
                MetaResponse::Applied { epoch: self.epoch }
            }
            MetaCommand::AddNode { node, addr } => {
                self.nodes.insert(
                    *node,
                    NodeRecord {
                        addr: *addr,
                        incarnation: 0,
                        state: NodeState::Down,
                        register_nonce: 0,
                        data_dir: None,
                    },
                );
                self.bump();
                MetaResponse::Applied { epoch: self.epoch }
            }
            MetaCommand::RemoveNode { node } => {
                self.nodes.remove(node);
                self.bump();
                MetaResponse::Applied { epoch: self.epoch }
            }
            // The state machine applies these to its file system state instead.
            MetaCommand::Fs(_) => MetaResponse::Fs(Err(crate::fs::FsError::NotFormatted)),
        }
    }

    /// Replaces the replica list (the voters of a Raft membership entry, applied in log
    /// order). The replicas are part of the cluster map, so a change bumps the epoch once
    /// the cluster is bootstrapped.
    pub fn set_replicas(&mut self, replicas: BTreeMap<ReplicaId, SocketAddr>) {
        if self.replicas == replicas {
            return;
        }
        self.replicas = replicas;
        if self.is_bootstrapped() {
            self.bump();
        }
    }

    /// The data-path cluster map, at this state's epoch.
    pub fn cluster_map(&self) -> ClusterMap {
        ClusterMap {
            cluster_id: self.cluster_id,
            epoch: self.epoch,
            nodes: self
                .nodes
                .iter()
                .map(|(id, rec)| NodeEntry {
                    id: *id,
                    addr: rec.addr,
                    data_dir: rec.data_dir.clone(),
                    state: rec.state,
                    incarnation: rec.incarnation,
                })
                .collect(),
            volumes: self.volumes.clone(),
            meta: self
                .replicas
                .iter()
                .map(|(id, addr)| MetaReplica {
                    id: *id,
                    addr: *addr,
                    host: self.replica_hosts.get(id).copied(),
                    join: false,
                })
                .collect(),
        }
    }

    /// Nodes in a given state.
    pub fn nodes_in(&self, state: NodeState) -> impl Iterator<Item = (NodeId, &NodeRecord)> {
        self.nodes
            .iter()
            .filter(move |(_, r)| r.state == state)
            .map(|(id, r)| (*id, r))
    }

    fn record(&self, node: NodeId) -> Result<&NodeRecord, Refusal> {
        self.nodes.get(&node).ok_or(Refusal::UnknownNode(node))
    }

    fn current(&self, node: NodeId, incarnation: u64) -> Result<&NodeRecord, Refusal> {
        let rec = self.record(node)?;
        if rec.incarnation != incarnation {
            return Err(Refusal::StaleIncarnation {
                node,
                current: rec.incarnation,
                given: incarnation,
            });
        }
        Ok(rec)
    }

    fn address_free(&self, addr: SocketAddr, node: NodeId) -> Result<(), Refusal> {
        match self
            .nodes
            .iter()
            .find(|(id, r)| **id != node && r.addr == addr)
        {
            Some((other, _)) => Err(Refusal::AddressInUse { addr, node: *other }),
            None => Ok(()),
        }
    }

    fn set_state(&mut self, node: NodeId, state: NodeState) -> MetaResponse {
        let changed = self.nodes.get_mut(&node).is_some_and(|rec| {
            let changed = rec.state != state;
            rec.state = state;
            changed
        });
        if changed {
            self.bump();
            MetaResponse::Applied { epoch: self.epoch }
        } else {
            MetaResponse::Unchanged { epoch: self.epoch }
        }
    }

    /// Changes an existing record (checked before) and bumps the epoch.
    fn update<T: Default>(&mut self, node: NodeId, f: impl FnOnce(&mut NodeRecord) -> T) -> T {
        let out = self.nodes.get_mut(&node).map(f).unwrap_or_default();
        self.bump();
        out
    }

    fn bump(&mut self) {
        self.epoch = self.epoch.saturating_add(1);
    }
}

/// The cluster map as it travels in a command: JSON text inside the postcard record.
/// `drs_proto`'s map is shaped for TOML (fields skipped when empty, defaults), which a
/// non-self-describing format like postcard cannot carry, and JSON keeps the stored log
/// readable when the map gains fields.
mod map_as_json {
    use drs_proto::map::ClusterMap;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(map: &ClusterMap, s: S) -> Result<S::Ok, S::Error> {
        let text = serde_json::to_string(map).map_err(serde::ser::Error::custom)?;
        text.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ClusterMap, D::Error> {
        let text = String::deserialize(d)?;
        serde_json::from_str(&text).map_err(serde::de::Error::custom)
    }
}
