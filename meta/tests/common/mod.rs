//! Helpers shared by the in-process cluster tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use drs_meta::{ClientConfig, MetaClient, MetaConfig, MetaNode, MetaState, Role};
use drs_proto::map::{ClusterMap, MemberState, NodeEntry, VolumeConfig};

pub const CLUSTER_ID: u64 = 0x0d25_a11c_e000_0001;

/// Cluster tests share two noisy cores: run them one at a time.
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,openraft=off".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A map of `nodes` storage nodes (addresses are never dialled) with one 4+2 volume on
/// nodes 0..6.
pub fn test_map(nodes: u32) -> ClusterMap {
    ClusterMap {
        cluster_id: CLUSTER_ID,
        epoch: 1,
        nodes: (0..nodes)
            .map(|i| NodeEntry {
                id: i,
                addr: node_addr(i),
                data_dir: None,
                state: MemberState::Up,
                incarnation: 0,
            })
            .collect(),
        volumes: vec![VolumeConfig {
            id: 1,
            k: 4,
            m: 2,
            block_size: 4096,
            blocks: 400,
            min_write: 4,
            coefficients: vec![vec![1; 4], vec![1, 2, 3, 4]],
            nodes: (0..6).collect(),
        }],
        meta: vec![],
    }
}

pub fn node_addr(i: u32) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 2], 20_000 + i as u16))
}

/// The key every test replica and client proves (tests of other keys make their own).
pub fn test_key() -> drs_proto::ClusterKey {
    drs_proto::ClusterKey::from_bytes([0x42; 32])
}

/// Faster timings than the defaults, still far from the noise of a loaded machine.
pub fn config(id: u64, dir: &std::path::Path) -> MetaConfig {
    let mut c = MetaConfig::new(
        id,
        "127.0.0.1:0".parse().unwrap(),
        dir.join(format!("replica-{id}")),
        CLUSTER_ID,
    );
    c.heartbeat_ms = 100;
    c.election_timeout_min_ms = 500;
    c.election_timeout_max_ms = 1000;
    // No heartbeats in most tests: keep the failure detector out of their way.
    c.down_after_ms = 3_600_000;
    c.propose_timeout_ms = 3000;
    c.key = test_key();
    c
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: BTreeMap<u64, MetaNode>,
    pub addrs: BTreeMap<u64, SocketAddr>,
    pub tweak: Arc<dyn Fn(&mut MetaConfig) + Send + Sync>,
}

impl Cluster {
    /// Starts replicas 1..=n and bootstraps them with `test_map(nodes)`.
    pub async fn start(
        n: u64,
        nodes: u32,
        tweak: impl Fn(&mut MetaConfig) + Send + Sync + 'static,
    ) -> Cluster {
        let mut c = Cluster {
            dir: tempfile::tempdir().unwrap(),
            nodes: BTreeMap::new(),
            addrs: BTreeMap::new(),
            tweak: Arc::new(tweak),
        };
        for id in 1..=n {
            c.start_replica(id, None).await;
        }
        let replicas = c.addrs.clone();
        c.nodes[&1]
            .initialize(replicas, test_map(nodes))
            .await
            .unwrap();
        c
    }

    /// Starts replicas 1..=n and initializes every one of them at once.
    pub async fn start_all_initializing(n: u64, nodes: u32) -> Cluster {
        let mut c = Cluster {
            dir: tempfile::tempdir().unwrap(),
            nodes: BTreeMap::new(),
            addrs: BTreeMap::new(),
            tweak: Arc::new(|_| {}),
        };
        for id in 1..=n {
            c.start_replica(id, None).await;
        }
        let inits = c.nodes.values().map(|node| {
            let (node, replicas) = (node.clone(), c.addrs.clone());
            async move { node.initialize(replicas, test_map(nodes)).await }
        });
        for r in futures::future::join_all(inits).await {
            r.unwrap();
        }
        c
    }

    pub fn config(&self, id: u64) -> MetaConfig {
        let mut cfg = config(id, self.dir.path());
        (self.tweak)(&mut cfg);
        cfg
    }

    /// Starts replica `id` (on its old address if it had one).
    pub async fn start_replica(&mut self, id: u64, addr: Option<SocketAddr>) -> MetaNode {
        let mut cfg = self.config(id);
        if let Some(a) = addr.or_else(|| self.addrs.get(&id).copied()) {
            cfg.addr = a;
        }
        let node = MetaNode::start(cfg).await.unwrap();
        self.addrs.insert(id, node.local_addr());
        self.nodes.insert(id, node.clone());
        node
    }

    pub async fn stop(&mut self, id: u64) {
        let node = self.nodes.remove(&id).unwrap();
        node.shutdown().await.unwrap();
    }

    pub fn client(&self) -> MetaClient {
        self.client_with(ClientConfig::default())
    }

    /// A client with `cfg` and the test key.
    pub fn client_with(&self, cfg: ClientConfig) -> MetaClient {
        let cfg = ClientConfig {
            key: test_key(),
            ..cfg
        };
        MetaClient::with_config(self.addrs.values().copied().collect(), CLUSTER_ID, cfg)
    }

    /// The id of the replica that leads with a majority of the running replicas agreeing.
    pub fn agreed_leader(&self) -> Option<u64> {
        let statuses: Vec<_> = self.nodes.values().map(|n| n.status()).collect();
        let leader = statuses.iter().find(|s| s.role == Role::Leader)?;
        let agree = statuses
            .iter()
            .filter(|s| s.leader == Some(leader.id))
            .count();
        (agree * 2 > leader.members.len()).then_some(leader.id)
    }

    pub async fn wait_leader(&self, within: Duration) -> u64 {
        let mut found = None;
        wait_until(within, "a leader", || {
            found = self.agreed_leader();
            found.is_some()
        })
        .await;
        found.unwrap()
    }

    pub fn state_of(&self, id: u64) -> Arc<MetaState> {
        self.nodes[&id].state().borrow().clone()
    }

    /// Waits until every running replica holds the same state; returns it.
    pub async fn wait_converged(&self, within: Duration) -> Arc<MetaState> {
        let mut last = None;
        wait_until(within, "replicas to converge", || {
            let states: Vec<_> = self.nodes.keys().map(|id| self.state_of(*id)).collect();
            let same = states.windows(2).all(|w| w[0] == w[1]);
            last = states.into_iter().next();
            same
        })
        .await;
        last.unwrap()
    }

    pub async fn shutdown(mut self) {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            self.stop(id).await;
        }
    }
}

/// Polls `f` every 20 ms; panics after `within`. Returns how long it took.
pub async fn wait_until(within: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    loop {
        if f() {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `Create` of regular file `name` in the root directory, owned by root.
pub fn create_file(name: &[u8], now: drs_meta::fs::Time) -> drs_meta::fs::FsCommand {
    drs_meta::fs::FsCommand::Create {
        parent: drs_meta::fs::ROOT,
        name: name.to_vec(),
        kind: drs_meta::fs::Kind::File,
        perm: 0o644,
        uid: 0,
        gid: 0,
        rdev: 0,
        target: Vec::new(),
        now,
    }
}

/// A `Format` of `blocks` 4 KiB data blocks, owned by root.
pub fn format(blocks: u64, now: drs_meta::fs::Time) -> drs_meta::fs::FsCommand {
    drs_meta::fs::FsCommand::Format {
        blocks,
        block_size: 4096,
        uid: 0,
        gid: 0,
        now,
    }
}
