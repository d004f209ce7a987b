//! The cluster map and placement.
//!
//! The map names the cluster, its epoch, its nodes and its volumes. Until a metadata
//! service serves it, it is the `cluster.toml` file that `drs-cli cluster up` writes;
//! its epoch travels in every frame so the map can later move to the metadata service
//! without a protocol change.
//!
//! Placement (report 5.1, RAID-5-like): a volume has an ordered node list of length
//! n >= k + m; position p (0..k data, k..k+m parity) of stripe s lives on node
//! `nodes[(s + p) mod n]`, so parity rotates over every node and no node holds two
//! blocks of one stripe.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::frame::MAX_PAYLOAD_LEN;
use crate::{NodeId, StripeId, VolumeId};

/// Smallest block size accepted.
pub const MIN_BLOCK_SIZE: u32 = 512;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MapError {
    #[error("cannot read cluster file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write cluster file {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cluster file {path} is not valid TOML: {message}{where_}")]
    Parse {
        path: PathBuf,
        message: String,
        /// " (line L, column C)" when known.
        where_: String,
    },
    #[error("cluster file {path}: {reason}")]
    InvalidFile { path: PathBuf, reason: String },
    #[error("cannot encode cluster map: {0}")]
    Encode(#[from] toml::ser::Error),
    #[error("invalid cluster map: {0}")]
    Invalid(String),
}

/// One storage node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEntry {
    pub id: NodeId,
    /// Where the node listens.
    pub addr: SocketAddr,
    /// For local clusters started by `drs-cli cluster up`: the node's data directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// What the metadata service last decided about the node (always `up` in a
    /// static cluster file).
    #[serde(default, skip_serializing_if = "MemberState::is_up")]
    pub state: MemberState,
    /// Which start of the node process the state is about: every start registers
    /// with the metadata service and gets a new incarnation (0: no service).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub incarnation: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// A node's state in the cluster map.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    /// Serving, with every block up to date.
    #[default]
    Up,
    /// Silent past the failure detector's timeout: clients do not wait on it.
    Down,
    /// Started again (or replaced): bringing its blocks up to date from their
    /// stripes. Takes updates, serves no reads.
    Recovering,
}

impl MemberState {
    pub fn is_up(&self) -> bool {
        *self == MemberState::Up
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            MemberState::Up => "up",
            MemberState::Down => "down",
            MemberState::Recovering => "recovering",
        }
    }
}

/// One replica of the metadata service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaReplica {
    /// Raft node id.
    pub id: u64,
    /// Where the replica listens for metadata requests.
    pub addr: SocketAddr,
    /// The storage node whose process hosts the replica, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<NodeId>,
    /// Added after the service was bootstrapped: the replica starts empty and waits
    /// for the leader to add it (it never offers the first map).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub join: bool,
}

/// One volume: `blocks` data blocks of `block_size` bytes, coded k + m.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeConfig {
    pub id: VolumeId,
    pub k: u8,
    pub m: u8,
    pub block_size: u32,
    /// Number of data blocks (a multiple of k).
    pub blocks: u64,
    /// A write is acknowledged only when at least this many members of the stripe hold
    /// it durably (and every live member does). k (default): the volume stays writable
    /// with m members down. k + 1: refuse writes rather than accept them with no
    /// redundancy left.
    pub min_write: u8,
    /// The m x k coefficient table of the code: `coefficients[j][i]` = c(j, i). Stored
    /// here so the data on disk never depends on a library's internals.
    pub coefficients: Vec<Vec<u8>>,
    /// The ordered node list for placement.
    pub nodes: Vec<NodeId>,
}

/// The cluster map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMap {
    /// Random at creation; every frame carries it, so a node never serves another cluster.
    #[serde(with = "hex_u64")]
    pub cluster_id: u64,
    /// Version of this map. Every frame carries the sender's epoch.
    pub epoch: u64,
    /// Empty in a client's locator file (only `meta`): the live map comes from the
    /// metadata service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeConfig>,
    /// The metadata service's replicas. Empty: the map is static (this file is the
    /// whole truth). Otherwise the service holds the live map, and this file's copy
    /// is where clients start.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub meta: Vec<MetaReplica>,
}

mod hex_u64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{v:016x}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let s = String::deserialize(d)?;
        u64::from_str_radix(s.trim_start_matches("0x"), 16).map_err(serde::de::Error::custom)
    }
}

impl ClusterMap {
    /// Reads and validates a cluster file.
    pub fn load(path: &Path) -> Result<ClusterMap, MapError> {
        let text = std::fs::read_to_string(path).map_err(|source| MapError::Read {
            path: path.to_owned(),
            source,
        })?;
        let map: ClusterMap = toml::from_str(&text).map_err(|e| {
            // One line: the message and where, not the multi-line source excerpt.
            let where_ = e
                .span()
                .map(|span| {
                    let before = &text[..span.start.min(text.len())];
                    let line = before.matches('\n').count() + 1;
                    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                    format!(" (line {line}, column {column})")
                })
                .unwrap_or_default();
            MapError::Parse {
                path: path.to_owned(),
                message: e.message().trim().replace('\n', " "),
                where_,
            }
        })?;
        map.validate().map_err(|e| MapError::InvalidFile {
            path: path.to_owned(),
            reason: match e {
                MapError::Invalid(r) => r,
                other => other.to_string(),
            },
        })?;
        Ok(map)
    }

    /// The map as the TOML of a cluster file.
    pub fn to_toml(&self) -> Result<String, MapError> {
        Ok(toml::to_string_pretty(self)?)
    }

    /// A map from the TOML of a cluster file (as sent by a node), validated.
    pub fn from_toml(text: &str) -> Result<ClusterMap, MapError> {
        let map: ClusterMap = toml::from_str(text)
            .map_err(|e| MapError::Invalid(e.message().trim().replace('\n', " ")))?;
        map.validate()?;
        Ok(map)
    }

    /// Writes the map atomically (temporary file, then rename).
    pub fn save(&self, path: &Path) -> Result<(), MapError> {
        self.validate()?;
        let text = toml::to_string_pretty(self)?;
        let tmp = path.with_extension("toml.tmp");
        let write = |p: &Path| -> std::io::Result<()> {
            std::fs::write(p, &text)?;
            std::fs::rename(p, path)
        };
        write(&tmp).map_err(|source| MapError::Write {
            path: path.to_owned(),
            source,
        })
    }

    /// True for a client's locator file: the metadata service's addresses only.
    pub fn is_locator(&self) -> bool {
        self.volumes.is_empty() && self.nodes.is_empty() && !self.meta.is_empty()
    }

    /// The locator of this map's cluster: what a client needs to find the metadata
    /// service, which serves the rest.
    pub fn locator(&self) -> ClusterMap {
        ClusterMap {
            cluster_id: self.cluster_id,
            epoch: self.epoch,
            nodes: Vec::new(),
            volumes: Vec::new(),
            meta: self.meta.clone(),
        }
    }

    /// Checks the map is self-consistent.
    pub fn validate(&self) -> Result<(), MapError> {
        let bad = |s: String| Err(MapError::Invalid(s));
        let mut ids: Vec<NodeId> = self.nodes.iter().map(|n| n.id).collect();
        ids.sort_unstable();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            return bad("duplicate node id".into());
        }
        let mut vids: Vec<VolumeId> = self.volumes.iter().map(|v| v.id).collect();
        vids.sort_unstable();
        if vids.windows(2).any(|w| w[0] == w[1]) {
            return bad("duplicate volume id".into());
        }
        let mut mids: Vec<u64> = self.meta.iter().map(|r| r.id).collect();
        mids.sort_unstable();
        if mids.windows(2).any(|w| w[0] == w[1]) {
            return bad("duplicate metadata replica id".into());
        }
        for v in &self.volumes {
            v.validate()
                .map_err(|e| MapError::Invalid(format!("volume {}: {e}", v.id)))?;
            for n in &v.nodes {
                if self.node(*n).is_none() {
                    return bad(format!("volume {} places blocks on unknown node {n}", v.id));
                }
            }
        }
        Ok(())
    }

    pub fn node(&self, id: NodeId) -> Option<&NodeEntry> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// The node's state (`Down` for a node not in the map).
    pub fn node_state(&self, id: NodeId) -> MemberState {
        self.node(id).map_or(MemberState::Down, |n| n.state)
    }

    pub fn volume(&self, id: VolumeId) -> Option<&VolumeConfig> {
        self.volumes.iter().find(|v| v.id == id)
    }
}

impl VolumeConfig {
    pub fn validate(&self) -> Result<(), String> {
        let (k, m) = (self.k as usize, self.m as usize);
        if k == 0 || m == 0 {
            return Err(format!("k={k} m={m}: both must be at least 1"));
        }
        if k + m > self.nodes.len() {
            return Err(format!(
                "k+m={} needs at least that many nodes, the volume lists {}",
                k + m,
                self.nodes.len()
            ));
        }
        let mut ns = self.nodes.clone();
        ns.sort_unstable();
        if ns.windows(2).any(|w| w[0] == w[1]) {
            return Err("a node appears twice in the placement list".into());
        }
        if self.block_size < MIN_BLOCK_SIZE
            || self.block_size as usize > MAX_PAYLOAD_LEN
            || !self.block_size.is_multiple_of(MIN_BLOCK_SIZE)
        {
            return Err(format!(
                "block size {} must be a multiple of {MIN_BLOCK_SIZE} between {MIN_BLOCK_SIZE} and {MAX_PAYLOAD_LEN}",
                self.block_size
            ));
        }
        if self.blocks == 0 || !self.blocks.is_multiple_of(k as u64) {
            return Err(format!(
                "blocks={} must be a positive multiple of k={k}",
                self.blocks
            ));
        }
        if (self.min_write as usize) < k || self.min_write as usize > k + m {
            return Err(format!(
                "min_write={} must be between k={k} and k+m={}",
                self.min_write,
                k + m
            ));
        }
        if self.coefficients.len() != m || self.coefficients.iter().any(|r| r.len() != k) {
            return Err(format!("coefficient table must be {m} rows of {k}"));
        }
        Ok(())
    }

    pub fn geometry(&self) -> Geometry {
        Geometry {
            k: self.k as usize,
            m: self.m as usize,
            block_size: self.block_size as usize,
            blocks: self.blocks,
            nodes: self.nodes.clone(),
        }
    }
}

/// Indices of the version vector a block at `position` tracks, for a k-data stripe.
pub fn tracked(k: usize, position: usize) -> std::ops::Range<usize> {
    if position < k {
        position..position + 1
    } else {
        0..k
    }
}

/// Arithmetic of a volume: blocks, stripes and placement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Geometry {
    pub k: usize,
    pub m: usize,
    pub block_size: usize,
    pub blocks: u64,
    pub nodes: Vec<NodeId>,
}

impl Geometry {
    /// Members per stripe.
    pub fn width(&self) -> usize {
        self.k + self.m
    }

    pub fn stripes(&self) -> u64 {
        self.blocks / self.k as u64
    }

    /// (stripe, data index) of a data block.
    pub fn locate(&self, lba: u64) -> (StripeId, usize) {
        (lba / self.k as u64, (lba % self.k as u64) as usize)
    }

    /// The data block at a stripe's data index.
    pub fn lba(&self, stripe: StripeId, index: usize) -> u64 {
        stripe * self.k as u64 + index as u64
    }

    /// The node holding position `position` of `stripe`.
    pub fn member(&self, stripe: StripeId, position: usize) -> NodeId {
        let n = self.nodes.len() as u64;
        self.nodes[((stripe % n + position as u64) % n) as usize]
    }

    /// Indices of the version vector the block at `position` tracks: a data block its
    /// own index, a parity block all k.
    pub fn tracked(&self, position: usize) -> std::ops::Range<usize> {
        tracked(self.k, position)
    }

    /// The stripe's members in position order (k data, then m parity).
    pub fn members(&self, stripe: StripeId) -> Vec<NodeId> {
        (0..self.width()).map(|p| self.member(stripe, p)).collect()
    }

    /// The position `node` holds in `stripe`, if it is a member.
    pub fn position_of(&self, stripe: StripeId, node: NodeId) -> Option<usize> {
        let n = self.nodes.len() as u64;
        let idx = self.nodes.iter().position(|x| *x == node)? as u64;
        let p = ((idx + n - stripe % n) % n) as usize;
        (p < self.width()).then_some(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume(n: u32) -> VolumeConfig {
        VolumeConfig {
            id: 1,
            k: 4,
            m: 2,
            block_size: 65536,
            blocks: 400,
            min_write: 4,
            coefficients: vec![vec![1; 4], vec![1, 2, 3, 4]],
            nodes: (0..n).collect(),
        }
    }

    #[test]
    fn placement_is_a_rotation_and_position_of_inverts_it() {
        for n in [6u32, 7, 9] {
            let g = volume(n).geometry();
            for s in 0..50 {
                let ms = g.members(s);
                let mut sorted = ms.clone();
                sorted.sort_unstable();
                sorted.dedup();
                assert_eq!(sorted.len(), 6, "distinct members");
                for (p, node) in ms.iter().enumerate() {
                    assert_eq!(g.position_of(s, *node), Some(p));
                }
                for node in 0..n {
                    if !ms.contains(&node) {
                        assert_eq!(g.position_of(s, node), None);
                    }
                }
            }
            // parity spreads over every node
            let mut parity_nodes: Vec<NodeId> = (0..n as u64).map(|s| g.member(s, 5)).collect();
            parity_nodes.sort_unstable();
            parity_nodes.dedup();
            assert_eq!(parity_nodes.len(), n as usize);
        }
    }

    #[test]
    fn locate_and_lba_invert() {
        let g = volume(6).geometry();
        for lba in 0..400 {
            let (s, i) = g.locate(lba);
            assert_eq!(g.lba(s, i), lba);
        }
        assert_eq!(g.stripes(), 100);
    }

    #[test]
    fn validation_catches_bad_volumes() {
        assert!(volume(6).validate().is_ok());
        assert!(volume(5).validate().is_err());
        let mut v = volume(6);
        v.blocks = 401;
        assert!(v.validate().is_err());
        let mut v = volume(6);
        v.min_write = 3;
        assert!(v.validate().is_err());
        let mut v = volume(6);
        v.block_size = 1000;
        assert!(v.validate().is_err());
        let mut v = volume(6);
        v.coefficients.pop();
        assert!(v.validate().is_err());
    }

    #[test]
    fn toml_round_trip() {
        let map = ClusterMap {
            cluster_id: u64::MAX - 5,
            epoch: 1,
            nodes: (0..6)
                .map(|i| NodeEntry {
                    id: i,
                    addr: format!("127.0.0.1:{}", 7000 + i).parse().unwrap(),
                    data_dir: Some(format!("/tmp/n{i}").into()),
                    state: if i == 2 {
                        MemberState::Down
                    } else {
                        MemberState::Up
                    },
                    incarnation: i as u64,
                })
                .collect(),
            volumes: vec![volume(6)],
            meta: vec![MetaReplica {
                id: 1,
                addr: "127.0.0.1:9000".parse().unwrap(),
                host: Some(0),
                join: false,
            }],
        };
        let dir = std::env::temp_dir().join(format!("drs-proto-map-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cluster.toml");
        map.save(&path).unwrap();
        assert_eq!(ClusterMap::load(&path).unwrap(), map);
        assert_eq!(ClusterMap::from_toml(&map.to_toml().unwrap()).unwrap(), map);
        assert!(ClusterMap::from_toml("epoch = 1").is_err());
        // A locator: the metadata service's addresses only.
        let loc = map.locator();
        assert!(loc.is_locator() && !map.is_locator());
        let text = loc.to_toml().unwrap();
        assert!(
            !text.contains("nodes") && !text.contains("volumes"),
            "{text}"
        );
        assert_eq!(ClusterMap::from_toml(&text).unwrap(), loc);
        std::fs::write(&path, "nonsense = [").unwrap();
        assert!(matches!(
            ClusterMap::load(&path),
            Err(MapError::Parse { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
