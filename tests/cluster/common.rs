//! The harness: a [`TestCluster`] of real `drs-server` processes in a temporary
//! directory, and helpers to generate data, verify it byte for byte, scrub, and poke
//! at node data files.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use drs_client::{Client, ClientConfig, ClientError, ScrubOptions, ScrubReport};
use drs_local::{ClusterSpec, LocalCluster, NodeOptions, ServerCommand};
use drs_proto::{NodeId, NodeInfo, Request, Response, StripeId};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Block size of every test volume.
pub const BS: usize = 4096;

/// How a test cluster is built.
#[derive(Debug, Clone)]
pub struct Setup {
    pub nodes: usize,
    /// Data blocks (64 stripes of k = 4 by default).
    pub blocks: u64,
    pub min_write: Option<u8>,
    /// `--settle-ms` of restarted nodes. Small is safe only when no write is in flight
    /// while a node restarts.
    pub settle_ms: u64,
    pub stuck_ms: u64,
    pub client: ClientConfig,
    /// Metadata replicas (0: a static map, the default here, so these tests see the
    /// data path alone; `membership.rs` runs with the service).
    pub meta_replicas: usize,
    pub down_after_ms: u64,
    /// Start nodes with `--fault-signals` (SIGUSR1 / SIGUSR2 cut off / heal their
    /// metadata replicas).
    pub fault_signals: bool,
    /// `--scrub-every-s` of the nodes (0: no background scrubbing, the default here,
    /// so tests of other things count only their own repairs).
    pub scrub_every_s: u64,
    /// `--session-expiry-ms` of the nodes (`None`: their default).
    pub session_expiry_ms: Option<u64>,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            nodes: 6,
            blocks: 256,
            min_write: None,
            settle_ms: 300,
            stuck_ms: 1000,
            client: client_config(),
            meta_replicas: 0,
            down_after_ms: 3000,
            fault_signals: false,
            scrub_every_s: 0,
            session_expiry_ms: None,
        }
    }
}

/// Client settings for tests: short deadlines so failures show quickly (the hedge
/// delay stays the default).
pub fn client_config() -> ClientConfig {
    ClientConfig {
        request_timeout: Duration::from_secs(2),
        reconnect_max: Duration::from_millis(200),
        connect_timeout: Duration::from_millis(500),
        ..ClientConfig::default()
    }
}

fn server() -> ServerCommand {
    ServerCommand {
        program: PathBuf::from(env!("CARGO_BIN_EXE_drs-server")),
        prefix: vec![],
    }
}

/// A local cluster for one test. Dropping it stops every node (SIGTERM, then
/// SIGKILL); if the test is failing, the cluster directory is kept and the tail of
/// every node's log is printed.
pub struct TestCluster {
    pub local: LocalCluster,
    /// A client with [`client_config`] (or the setup's config).
    pub client: Client,
    name: String,
    dir: Option<tempfile::TempDir>,
}

impl TestCluster {
    /// A 6-node 4+2 cluster with the default setup, started and up.
    pub async fn start(name: &str) -> TestCluster {
        TestCluster::with(name, Setup::default()).await
    }

    /// A cluster built from `setup`, started (first start) and up.
    pub async fn with(name: &str, setup: Setup) -> TestCluster {
        let dir = tempfile::Builder::new()
            .prefix(&format!("drs-cluster-{name}-"))
            .tempdir()
            .expect("create a temporary directory");
        let spec = ClusterSpec {
            nodes: setup.nodes,
            k: 4,
            m: 2,
            block_size: BS as u32,
            blocks: setup.blocks,
            min_write: setup.min_write,
            meta_replicas: setup.meta_replicas,
        };
        let options = NodeOptions {
            settle_ms: setup.settle_ms,
            stuck_ms: setup.stuck_ms,
            // DRS_TEST_NODE_LOG: the nodes' RUST_LOG, for a closer look at a failure.
            log: std::env::var("DRS_TEST_NODE_LOG").unwrap_or_else(|_| "info".into()),
            down_after_ms: setup.down_after_ms,
            rebuild_rate_mib: 0.0,
            fault_signals: setup.fault_signals,
            scrub_every_s: setup.scrub_every_s,
            scrub_rate_mib: 0.0,
            metrics: false,
            session_expiry_ms: setup.session_expiry_ms,
            namespace_limit_mib: None,
        };
        let local = LocalCluster::create(dir.path(), &spec, server(), options)
            .expect("create the local cluster");
        let client = local.client(setup.client.clone()).expect("client");
        // Built before the nodes start, so a failing start still cleans up.
        let tc = TestCluster {
            local,
            client,
            name: name.to_string(),
            dir: Some(dir),
        };
        tc.local.start_all(true).expect("start the nodes");
        tc.wait_all_up().await;
        tc
    }

    /// A new client (its own connections and client id).
    pub fn new_client(&self, cfg: ClientConfig) -> Client {
        self.local.client(cfg).expect("client")
    }

    pub fn ids(&self) -> Vec<NodeId> {
        self.local.node_ids()
    }

    /// SIGKILL.
    pub fn kill(&self, id: NodeId) {
        self.local
            .kill(id)
            .unwrap_or_else(|e| panic!("kill node {id}: {e}"));
    }

    /// SIGTERM, then waits (up to 10 s) until the node has exited (it checkpoints).
    pub async fn terminate(&self, id: NodeId) {
        self.local
            .signal(id, nix::sys::signal::Signal::SIGTERM)
            .unwrap_or_else(|e| panic!("SIGTERM node {id}: {e}"));
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while self.local.pid(id).is_some() {
            assert!(
                std::time::Instant::now() < until,
                "node {id} ignored SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Restarts a node that is not running (with the settle wait).
    pub fn restart(&self, id: NodeId) {
        self.local
            .start(id, false)
            .unwrap_or_else(|e| panic!("restart node {id}: {e}"));
    }

    pub async fn wait_up(&self, ids: &[NodeId]) {
        if let Err(e) = self.local.wait_up(ids, Duration::from_secs(60)).await {
            panic!("nodes {ids:?} not up: {e}");
        }
    }

    pub async fn wait_all_up(&self) {
        self.wait_up(&self.ids()).await;
    }

    /// SIGSTOP, then waits until every thread of the node is stopped (the signal is
    /// delivered asynchronously; a node may answer a request meanwhile).
    pub async fn stop(&self, id: NodeId) {
        let pid = self.local.pid(id).expect("node runs");
        self.local
            .stop(id)
            .unwrap_or_else(|e| panic!("stop node {id}: {e}"));
        let stopped = || -> bool {
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                return false;
            };
            tasks.flatten().all(|t| {
                std::fs::read_to_string(t.path().join("stat")).is_ok_and(|s| {
                    s.rsplit_once(')')
                        .is_some_and(|(_, rest)| rest.trim_start().starts_with(['T', 't']))
                })
            })
        };
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while !stopped() {
            assert!(std::time::Instant::now() < until, "node {id} did not stop");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A node's own report (Ping).
    pub async fn info(&self, id: NodeId) -> NodeInfo {
        // A node the map still calls down (it resumed, and has not registered again
        // yet) is not called: wait for the map to say otherwise.
        let until = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match self
                .client
                .call(id, &Request::Ping, Default::default())
                .await
            {
                Ok((Response::Pong(info), _)) => return info,
                Err(e)
                    if e.to_string().contains("down in the cluster map")
                        && std::time::Instant::now() < until =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                other => panic!("ping node {id}: {other:?}"),
            }
        }
    }

    /// The data file of a node.
    pub fn block_file(&self, id: NodeId) -> PathBuf {
        self.local
            .dir
            .join(format!("node-{id}"))
            .join("data")
            .join("volume-1")
            .join("blocks.dat")
    }

    /// The bytes a node's data file holds for `stripe` (whatever position it holds).
    pub fn slot_bytes(&self, id: NodeId, stripe: StripeId) -> Vec<u8> {
        let f = std::fs::File::open(self.block_file(id)).expect("open blocks.dat");
        let mut buf = vec![0u8; BS];
        f.read_exact_at(&mut buf, stripe * BS as u64)
            .expect("read blocks.dat");
        buf
    }

    /// Inverts `len` bytes at `offset` of the block a node holds for `stripe`, behind
    /// the node's back (bit rot).
    pub fn corrupt(&self, id: NodeId, stripe: StripeId, offset: usize, len: usize) {
        let path = self.block_file(id);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open blocks.dat");
        let at = stripe * BS as u64 + offset as u64;
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, at).expect("read blocks.dat");
        for b in &mut buf {
            *b ^= 0xff;
        }
        f.write_all_at(&buf, at).expect("write blocks.dat");
        f.sync_all().expect("sync blocks.dat");
    }

    fn log_tail(&self, id: NodeId, lines: usize) -> String {
        let text = std::fs::read_to_string(self.local.log_path(id)).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let failing = std::thread::panicking();
        if failing {
            eprintln!(
                "=== test cluster `{}` failed; its directory is kept: {}",
                self.name,
                self.local.dir.display()
            );
            for id in self.ids() {
                eprintln!(
                    "--- node {id}: last 30 lines of {} ---\n{}",
                    self.local.log_path(id).display(),
                    self.log_tail(id, 30)
                );
            }
        }
        if let Err(e) = self.local.down(Duration::from_secs(5)) {
            eprintln!("stopping test cluster `{}`: {e}", self.name);
        }
        if failing {
            if let Some(d) = self.dir.take() {
                let _ = d.keep();
            }
        }
    }
}

/// Deterministic pseudo-random bytes.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    v
}

/// `count` random blocks.
pub fn random_blocks(seed: u64, count: u64) -> Vec<Vec<u8>> {
    (0..count)
        .map(|i| bytes(seed.wrapping_mul(1_000_003).wrapping_add(i), BS))
        .collect()
}

/// Writes `blocks` at lba 0 onwards (one `write_blocks` call).
pub async fn write_all(client: &Client, blocks: &[Vec<u8>]) {
    let flat: Vec<u8> = blocks.concat();
    tokio::time::timeout(Duration::from_secs(60), client.write_blocks(0, &flat))
        .await
        .expect("writing every block hung")
        .expect("write every block");
}

/// Reads every block of `expected` and compares byte for byte.
pub async fn verify(client: &Client, expected: &[Vec<u8>], what: &str) {
    let got = tokio::time::timeout(
        Duration::from_secs(60),
        client.read_blocks(0, expected.len() as u64),
    )
    .await
    .unwrap_or_else(|_| panic!("{what}: reading every block hung"));
    let got = match got {
        Ok(g) => g,
        Err(e) => {
            let detail = match &e {
                ClientError::Unavailable { stripe, .. } => describe_stripe(client, *stripe).await,
                _ => String::new(),
            };
            panic!("{what}: reading every block failed: {e}\n{detail}");
        }
    };
    let bad: Vec<String> = got
        .iter()
        .zip(expected)
        .enumerate()
        .filter(|(_, (g, e))| g[..] != e[..])
        .map(|(lba, (g, e))| describe_diff(lba as u64, g, e))
        .collect();
    assert!(
        bad.is_empty(),
        "{what}: {} of {} blocks differ: {}",
        bad.len(),
        expected.len(),
        bad.iter().take(5).cloned().collect::<Vec<_>>().join("; ")
    );
}

/// Each member's listing of a stripe (versions, known versions, state, locks), for
/// failure messages.
pub async fn describe_stripe(client: &Client, stripe: StripeId) -> String {
    let mut out = Vec::new();
    for (p, node) in client.geometry().members(stripe).into_iter().enumerate() {
        let line = match client.list_node(node).await {
            Some((_, slots)) => match slots.iter().find(|s| s.stripe == stripe) {
                Some(s) => format!(
                    "position {p} node {node}: versions {:?} known {:?} {:?} locks {:?}",
                    s.versions, s.known, s.state, s.locks
                ),
                None => format!("position {p} node {node}: no slot"),
            },
            None => format!("position {p} node {node}: no answer"),
        };
        out.push(line);
    }
    format!("stripe {stripe}:\n  {}", out.join("\n  "))
}

/// Waits (bounded) until `clients` have delivered every queued unlock and no node
/// knows of a version of one of its blocks that it has not applied. After a write
/// that failed everywhere, nodes told of its version by the queued unlock refuse to
/// serve the block until their stuck-block rebuild forgets the version (see
/// `writes::failed_write_leaves_block_readable`); tests that make writes fail wait
/// for that here before reading.
pub async fn wait_quiet(tc: &TestCluster, clients: &[Client]) {
    let until = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let queued: usize = clients.iter().map(|c| c.pending_unlocks()).sum();
        let mut behind = Vec::new();
        for id in tc.ids() {
            let Some((_, slots)) = tc.client.list_node(id).await else {
                behind.push(format!("node {id} does not answer"));
                continue;
            };
            for s in slots {
                let k = s.versions.len();
                let p = s.position as usize;
                let tracked = if p < k { p..p + 1 } else { 0..k };
                if tracked.into_iter().any(|i| s.known[i] > s.versions[i]) {
                    behind.push(format!("node {id} stripe {}", s.stripe));
                }
            }
        }
        if queued == 0 && behind.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < until,
            "not quiet after 30 s: {queued} unlocks queued, behind: {behind:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads a whole block; on failure, panics with the stripe's listing at each member.
pub async fn read_ok(client: &Client, lba: u64, what: &str) -> bytes::Bytes {
    let r = tokio::time::timeout(Duration::from_secs(30), client.read_block(lba))
        .await
        .unwrap_or_else(|_| panic!("{what}: read of block {lba} hung"));
    match r {
        Ok(b) => b,
        Err(e) => {
            let (stripe, _) = client.geometry().locate(lba);
            let detail = describe_stripe(client, stripe).await;
            panic!("{what}: read of block {lba} failed: {e}\n{detail}");
        }
    }
}

/// Where a block differs from what was expected.
pub fn describe_diff(lba: u64, got: &[u8], want: &[u8]) -> String {
    if got.len() != want.len() {
        return format!("block {lba}: {} bytes, expected {}", got.len(), want.len());
    }
    let first = got.iter().zip(want).position(|(a, b)| a != b);
    let count = got.iter().zip(want).filter(|(a, b)| a != b).count();
    match first {
        Some(i) => format!("block {lba}: {count} bytes differ, first at {i}"),
        None => format!("block {lba}: equal"),
    }
}

/// A full scrub with repair, bounded in time.
pub async fn scrub(client: &Client) -> ScrubReport {
    tokio::time::timeout(
        Duration::from_secs(120),
        client.scrub(&ScrubOptions::default(), &|_, _| {}),
    )
    .await
    .expect("scrub hung")
}

pub fn describe_report(r: &ScrubReport) -> String {
    let list = |v: &[drs_client::scrub::Finding]| {
        v.iter()
            .take(8)
            .map(|f| f.to_string())
            .collect::<Vec<_>>()
            .join("; ")
    };
    format!(
        "{} stripes, {} healthy; repaired {} [{}]; found {} [{}]; degraded {} [{}]; unrecoverable {} [{}]",
        r.stripes,
        r.healthy,
        r.repaired.len(),
        list(&r.repaired),
        r.found.len(),
        list(&r.found),
        r.degraded.len(),
        list(&r.degraded),
        r.unrecoverable.len(),
        list(&r.unrecoverable)
    )
}

/// Scrubs and asserts nothing was found wrong, degraded or repaired.
pub async fn assert_scrub_clean(client: &Client, what: &str) {
    let r = scrub(client).await;
    assert!(
        r.is_clean(),
        "{what}: scrub not clean: {}",
        describe_report(&r)
    );
    assert_eq!(r.stripes, client.geometry().stripes(), "{what}");
}

pub fn degraded_reads(client: &Client) -> u64 {
    client.stats().degraded_reads.load(Ordering::Relaxed)
}
