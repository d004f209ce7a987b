//! Local clusters: every node a `drs-server` process on 127.0.0.1, each with its own
//! data directory under one cluster directory.
//!
//! ```text
//! DIR/cluster.toml          the cluster map (what clients need)
//! DIR/node-<id>/data/       the node's data directory
//! DIR/node-<id>/log         its stderr and stdout (appended)
//! DIR/node-<id>/pid         its process id while it runs
//! ```
//! Used by `drs-cli cluster ...`, `drs-cli node ...`, `drs-cli demo`, the benchmarks
//! and the multi-process tests, so all of them start nodes the same way.

pub mod load;
pub mod meta;
pub mod size;

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use drs_client::{Client, ClientConfig};
use drs_proto::{
    ClusterKey, ClusterMap, MemberState, MetaReplica, NodeEntry, NodeId, VolumeConfig,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Map(#[from] drs_proto::MapError),
    #[error("invalid cluster settings: {0}")]
    Invalid(String),
    #[error("{0} already holds a cluster; use another directory or run `drs-cli cluster down --dir {0}` and remove it")]
    Exists(String),
    #[error("node {0} is not in the cluster")]
    UnknownNode(NodeId),
    #[error("node {0} is not running")]
    NotRunning(NodeId),
    #[error("node {node} is already running (pid {pid})")]
    Running { node: NodeId, pid: u32 },
    #[error("cannot start node {node} with {program}")]
    Spawn {
        node: NodeId,
        program: String,
        source: std::io::Error,
    },
    #[error("signal to node {node} (pid {pid})")]
    Signal {
        node: NodeId,
        pid: u32,
        source: nix::Error,
    },
    #[error("nodes not up after {waited_s} s: {detail}")]
    NotUp { waited_s: u64, detail: String },
    #[error(transparent)]
    Client(#[from] drs_client::ClientError),
    #[error("metadata service: {0}")]
    Meta(String),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> LocalError + 'a {
    move |source| LocalError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// How to start a node process: a program and the arguments that come before the
/// node's own options.
#[derive(Debug, Clone)]
pub struct ServerCommand {
    pub program: PathBuf,
    pub prefix: Vec<String>,
}

impl ServerCommand {
    /// `$DRS_SERVER_BIN`, or `drs-server` next to the running executable (or next to
    /// its `deps/` directory, for test binaries), or `drs-server` on the PATH.
    pub fn locate() -> Option<ServerCommand> {
        let plain = |p: PathBuf| ServerCommand {
            program: p,
            prefix: Vec::new(),
        };
        if let Some(p) = std::env::var_os("DRS_SERVER_BIN") {
            return Some(plain(PathBuf::from(p)));
        }
        if let Ok(exe) = std::env::current_exe() {
            let mut dir = exe.parent().map(Path::to_path_buf);
            for _ in 0..2 {
                let Some(d) = dir else { break };
                let cand = d.join("drs-server");
                if cand.is_file() {
                    return Some(plain(cand));
                }
                dir = d.parent().map(Path::to_path_buf);
            }
        }
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("drs-server"))
                .find(|p| p.is_file())
                .map(plain)
        })
    }
}

/// Settings of a new local cluster.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub nodes: usize,
    pub k: u8,
    pub m: u8,
    pub block_size: u32,
    /// Data blocks; rounded up to a multiple of k.
    pub blocks: u64,
    /// Default k.
    pub min_write: Option<u8>,
    /// Metadata replicas, hosted by the first nodes (0: a static cluster map, no
    /// failure detection).
    pub meta_replicas: usize,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        ClusterSpec {
            nodes: 6,
            k: 4,
            m: 2,
            block_size: 64 * 1024,
            blocks: 4096,
            min_write: None,
            meta_replicas: default_meta_replicas(6, 2),
        }
    }
}

/// The default number of metadata replicas: enough to outlive m failed nodes
/// (2m + 1, as the metadata service needs a majority), at most one per node, odd.
pub fn default_meta_replicas(nodes: usize, m: u8) -> usize {
    let want = 2 * m as usize + 1;
    let n = want.min(nodes);
    if n.is_multiple_of(2) {
        n - 1
    } else {
        n
    }
}

/// Options passed to every node started.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// `--settle-ms` for restarts (a first start of a new cluster uses 0).
    pub settle_ms: u64,
    /// `--stuck-ms`.
    pub stuck_ms: u64,
    /// `RUST_LOG` for the node.
    pub log: String,
    /// `--down-after-ms`: silence after which the metadata service marks a node down.
    pub down_after_ms: u64,
    /// `--rebuild-rate-mib`: MiB/s a rejoining or replacing node rebuilds at most
    /// (0: no limit).
    pub rebuild_rate_mib: f64,
    /// `--fault-signals`: SIGUSR1 / SIGUSR2 cut off / heal a node's metadata replica
    /// (partition tests only).
    pub fault_signals: bool,
    /// `--scrub-every-s`: seconds between background scrub passes (0: never).
    pub scrub_every_s: u64,
    /// `--scrub-rate-mib`: MiB/s the background scrubber reads at most (0: no limit).
    pub scrub_rate_mib: f64,
    /// Each node serves Prometheus metrics on a port of 127.0.0.1 chosen at its
    /// first start and kept in `node-<id>/metrics-addr` (see
    /// [`LocalCluster::metrics_addr`]).
    pub metrics: bool,
    /// `--session-expiry-ms`: silence after which the metadata service ends a
    /// mount's session (`None`: the node's default).
    pub session_expiry_ms: Option<u64>,
    /// `--namespace-limit-mib`: encoded size of the file system namespace past which
    /// it no longer grows (`None`: the node's default).
    pub namespace_limit_mib: Option<u64>,
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            settle_ms: 1500,
            stuck_ms: 5000,
            log: "info".into(),
            down_after_ms: 3000,
            rebuild_rate_mib: 0.0,
            fault_signals: false,
            scrub_every_s: 86400,
            scrub_rate_mib: 8.0,
            metrics: false,
            session_expiry_ms: None,
            namespace_limit_mib: None,
        }
    }
}

/// A local cluster.
pub struct LocalCluster {
    pub dir: PathBuf,
    pub map_path: PathBuf,
    pub map: ClusterMap,
    /// The cluster key (in `cluster.key` beside the cluster file), proved by every
    /// connection.
    pub key: ClusterKey,
    server: ServerCommand,
    pub options: NodeOptions,
    /// Processes this program started (reaped when they exit).
    children: Mutex<HashMap<NodeId, Child>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Free TCP ports on 127.0.0.1. They are drawn at random below Linux's ephemeral range
/// (32768 and up, where the kernel picks ports for outgoing connections and for
/// "port 0") and checked by binding them, so another program is unlikely to take one
/// between now and the node binding it.
fn free_ports(n: usize) -> Result<Vec<u16>, LocalError> {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    let mut ports = Vec::with_capacity(n);
    for _ in 0..n * 200 {
        if ports.len() == n {
            break;
        }
        let p: u16 = rng.gen_range(10_000..32_000);
        if !ports.contains(&p) && std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            ports.push(p);
        }
    }
    if ports.len() < n {
        return Err(LocalError::Invalid(format!(
            "could not find {n} free ports on 127.0.0.1"
        )));
    }
    Ok(ports)
}

/// Writes the cluster file and, with a metadata service, the client locator beside
/// it (`client.toml`: what a client needs to find the service, which serves the rest).
fn save_maps(map: &ClusterMap, map_path: &Path) -> Result<(), LocalError> {
    map.save(map_path)?;
    if !map.meta.is_empty() {
        let locator = map_path.with_file_name(CLIENT_FILE);
        map.locator().save(&locator)?;
    }
    Ok(())
}

/// `addr`, or a free port on 127.0.0.1.
fn addr_or_free(addr: Option<std::net::SocketAddr>) -> Result<std::net::SocketAddr, LocalError> {
    match addr {
        Some(a) => Ok(a),
        None => Ok(std::net::SocketAddr::from((
            [127, 0, 0, 1],
            free_ports(1)?[0],
        ))),
    }
}

/// Proposes a change of the cluster map; a refusal is an error naming `what`.
async fn propose(
    meta: &drs_meta::MetaClient,
    cmd: drs_meta::MetaCommand,
    what: &str,
) -> Result<(), LocalError> {
    let reply = meta
        .propose(cmd)
        .await
        .map_err(|e| LocalError::Meta(format!("{what}: {e}")))?;
    match reply.refusal() {
        Some(r) => Err(LocalError::Meta(format!("{what}: {r:?}"))),
        None => Ok(()),
    }
}

/// The client locator's file name, beside the cluster file.
pub const CLIENT_FILE: &str = "client.toml";

impl LocalCluster {
    /// Writes a new cluster file (and node directories) in `dir`.
    pub fn create(
        dir: &Path,
        spec: &ClusterSpec,
        server: ServerCommand,
        options: NodeOptions,
    ) -> Result<LocalCluster, LocalError> {
        let map_path = dir.join("cluster.toml");
        if map_path.exists() {
            return Err(LocalError::Exists(dir.display().to_string()));
        }
        let (k, m) = (spec.k as usize, spec.m as usize);
        if spec.nodes < k + m {
            return Err(LocalError::Invalid(format!(
                "{} nodes cannot hold stripes of k+m = {}",
                spec.nodes,
                k + m
            )));
        }
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        let dir = dir.canonicalize().map_err(io("resolve", dir))?;
        let coefficients = drs_codec::Coefficients::default_for(k, m)
            .map_err(|e| LocalError::Invalid(e.to_string()))?
            .rows()
            .to_vec();
        if spec.meta_replicas > spec.nodes {
            return Err(LocalError::Invalid(format!(
                "{} metadata replicas need as many nodes to host them, the cluster has {}",
                spec.meta_replicas, spec.nodes
            )));
        }
        let mut ports = free_ports(spec.nodes + spec.meta_replicas)?;
        let meta_ports = ports.split_off(spec.nodes);
        let nodes: Vec<NodeEntry> = ports
            .iter()
            .enumerate()
            .map(|(i, port)| NodeEntry {
                id: i as NodeId,
                addr: std::net::SocketAddr::from(([127, 0, 0, 1], *port)),
                data_dir: Some(dir.join(format!("node-{i}")).join("data")),
                state: MemberState::Up,
                incarnation: 0,
            })
            .collect();
        let blocks = spec.blocks.max(1).div_ceil(spec.k as u64) * spec.k as u64;
        let map = ClusterMap {
            cluster_id: rand::random::<u64>(),
            epoch: 1,
            volumes: vec![VolumeConfig {
                id: 1,
                k: spec.k,
                m: spec.m,
                block_size: spec.block_size,
                blocks,
                min_write: spec.min_write.unwrap_or(spec.k),
                coefficients,
                nodes: nodes.iter().map(|n| n.id).collect(),
            }],
            nodes,
            meta: meta_ports
                .iter()
                .enumerate()
                .map(|(i, port)| MetaReplica {
                    id: i as u64 + 1,
                    addr: std::net::SocketAddr::from(([127, 0, 0, 1], *port)),
                    host: Some(i as NodeId),
                    join: false,
                })
                .collect(),
        };
        map.validate()?;
        for n in &map.nodes {
            let nd = dir.join(format!("node-{}", n.id));
            std::fs::create_dir_all(&nd).map_err(io("create", &nd))?;
        }
        let key = ClusterKey::generate();
        key.save(&ClusterKey::path_for(&map_path))
            .map_err(|e| LocalError::Invalid(e.to_string()))?;
        save_maps(&map, &map_path)?;
        Ok(LocalCluster {
            dir,
            map_path,
            map,
            key,
            server,
            options,
            children: Mutex::new(HashMap::new()),
        })
    }

    /// Opens the local cluster whose cluster file is `map_path`.
    pub fn open(
        map_path: &Path,
        server: ServerCommand,
        options: NodeOptions,
    ) -> Result<LocalCluster, LocalError> {
        let map = ClusterMap::load(map_path)?;
        let key = ClusterKey::for_cluster_file(map_path)
            .map_err(|e| LocalError::Invalid(e.to_string()))?;
        let dir = map_path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Ok(LocalCluster {
            dir,
            map_path: map_path.to_owned(),
            map,
            key,
            server,
            options,
            children: Mutex::new(HashMap::new()),
        })
    }

    fn node_dir(&self, id: NodeId) -> PathBuf {
        self.dir.join(format!("node-{id}"))
    }

    pub fn log_path(&self, id: NodeId) -> PathBuf {
        self.node_dir(id).join("log")
    }

    fn pid_path(&self, id: NodeId) -> PathBuf {
        self.node_dir(id).join("pid")
    }

    pub fn node_ids(&self) -> Vec<NodeId> {
        self.map.nodes.iter().map(|n| n.id).collect()
    }

    /// The process id of a running node, if it runs.
    pub fn pid(&self, id: NodeId) -> Option<u32> {
        if let Some(child) = lock(&self.children).get_mut(&id) {
            if matches!(child.try_wait(), Ok(None)) {
                return Some(child.id());
            }
        }
        let pid: u32 = std::fs::read_to_string(self.pid_path(id))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        alive(pid).then_some(pid)
    }

    /// Starts every node that is not running. `first_start` skips the settle wait
    /// (a new cluster has no data anyone could have written while a node was down).
    pub fn start_all(&self, first_start: bool) -> Result<(), LocalError> {
        for id in self.node_ids() {
            if self.pid(id).is_none() {
                self.start(id, first_start)?;
            }
        }
        Ok(())
    }

    /// Starts (or restarts) one node.
    /// Where node `id` serves its metrics: kept in `node-<id>/metrics-addr`, chosen
    /// (a free port on 127.0.0.1) the first time.
    pub fn metrics_addr(&self, id: NodeId) -> Result<std::net::SocketAddr, LocalError> {
        let path = self.node_dir(id).join("metrics-addr");
        if let Some(a) = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| t.trim().parse().ok())
        {
            return Ok(a);
        }
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_ports(1)?[0]));
        std::fs::write(&path, format!("{addr}\n")).map_err(io("write", &path))?;
        Ok(addr)
    }

    pub fn start(&self, id: NodeId, first_start: bool) -> Result<u32, LocalError> {
        if self.map.node(id).is_none() {
            return Err(LocalError::UnknownNode(id));
        }
        let metrics = if self.options.metrics {
            Some(self.metrics_addr(id)?)
        } else {
            None
        };
        if let Some(pid) = self.pid(id) {
            return Err(LocalError::Running { node: id, pid });
        }
        let log_path = self.log_path(id);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io("open", &log_path))?;
        let log2 = log.try_clone().map_err(io("open", &log_path))?;
        let settle = if first_start {
            0
        } else {
            self.options.settle_ms
        };
        let mut cmd = Command::new(&self.server.program);
        cmd.args(&self.server.prefix)
            .arg("--cluster")
            .arg(&self.map_path)
            .arg("--node")
            .arg(id.to_string())
            .arg("--settle-ms")
            .arg(settle.to_string())
            .arg("--stuck-ms")
            .arg(self.options.stuck_ms.to_string())
            .arg("--down-after-ms")
            .arg(self.options.down_after_ms.to_string())
            .arg("--rebuild-rate-mib")
            .arg(self.options.rebuild_rate_mib.to_string())
            .arg("--scrub-every-s")
            .arg(self.options.scrub_every_s.to_string())
            .arg("--scrub-rate-mib")
            .arg(self.options.scrub_rate_mib.to_string())
            .args(
                metrics
                    .iter()
                    .flat_map(|a| ["--metrics".to_string(), a.to_string()]),
            )
            .args(self.options.fault_signals.then_some("--fault-signals"))
            .args(
                self.options
                    .session_expiry_ms
                    .iter()
                    .flat_map(|ms| ["--session-expiry-ms".to_string(), ms.to_string()]),
            )
            .args(
                self.options
                    .namespace_limit_mib
                    .iter()
                    .flat_map(|mib| ["--namespace-limit-mib".to_string(), mib.to_string()]),
            )
            .env("RUST_LOG", &self.options.log)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        // Its own process group: a Ctrl-C at the terminal does not reach the nodes.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().map_err(|source| LocalError::Spawn {
            node: id,
            program: self.server.program.display().to_string(),
            source,
        })?;
        let pid = child.id();
        let pp = self.pid_path(id);
        std::fs::write(&pp, pid.to_string()).map_err(io("write", &pp))?;
        lock(&self.children).insert(id, child);
        Ok(pid)
    }

    /// The metadata service, which `what` needs.
    fn meta_service(&self, what: &str) -> Result<drs_meta::MetaClient, LocalError> {
        drs_meta::MetaClient::for_map(&self.map, &self.key).ok_or_else(|| {
            LocalError::Invalid(format!(
                "{what} needs the metadata service (cluster up --meta N)"
            ))
        })
    }

    /// Replaces node `id` with a new, empty one (FTR 2.10): the old process, if it
    /// still runs, is SIGKILLed; its block data is moved aside to `data.replaced-N`
    /// (the metadata replica it may host keeps its directory); the metadata service
    /// records the node's new address and a new incarnation (recovering); the cluster
    /// file is rewritten; the new process starts empty and rebuilds every block from
    /// its stripes, at most `options.rebuild_rate_mib`. Returns the new address.
    pub async fn replace(
        &mut self,
        id: NodeId,
        addr: Option<std::net::SocketAddr>,
    ) -> Result<std::net::SocketAddr, LocalError> {
        let meta = self.meta_service("node replacement")?;
        let old = self
            .map
            .node(id)
            .cloned()
            .ok_or(LocalError::UnknownNode(id))?;
        let addr = addr_or_free(addr)?;
        if self.pid(id).is_some() {
            self.kill(id)?;
            let until = Instant::now() + Duration::from_secs(10);
            while self.pid(id).is_some() && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        propose(
            &meta,
            drs_meta::MetaCommand::Replace { node: id, addr },
            &format!("replace node {id}"),
        )
        .await?;
        if let Some(data) = &old.data_dir {
            if data.exists() {
                let mut n = 1;
                let aside = loop {
                    let p = data.with_extension(format!("replaced-{n}"));
                    if !p.exists() {
                        break p;
                    }
                    n += 1;
                };
                std::fs::rename(data, &aside).map_err(io("move aside", data))?;
                std::fs::create_dir_all(data).map_err(io("create", data))?;
                let replica = aside.join("meta");
                if replica.exists() {
                    let to = data.join("meta");
                    std::fs::rename(&replica, &to).map_err(io("move", &replica))?;
                }
            }
        }
        for n in self.map.nodes.iter_mut().filter(|n| n.id == id) {
            n.addr = addr;
        }
        save_maps(&self.map, &self.map_path)?;
        self.start(id, false)?;
        Ok(addr)
    }

    /// Adds a node (a new id, a new address) to the cluster and starts it: it joins
    /// the metadata service's map and holds no blocks until a volume places some on
    /// it. Returns its address.
    pub async fn add_node(
        &mut self,
        id: NodeId,
        addr: Option<std::net::SocketAddr>,
    ) -> Result<std::net::SocketAddr, LocalError> {
        let meta = self.meta_service("adding a node")?;
        if self.map.node(id).is_some() {
            return Err(LocalError::Invalid(format!(
                "node {id} is already in the cluster"
            )));
        }
        let addr = addr_or_free(addr)?;
        propose(
            &meta,
            drs_meta::MetaCommand::AddNode { node: id, addr },
            &format!("add node {id}"),
        )
        .await?;
        let data = self.node_dir(id).join("data");
        std::fs::create_dir_all(&data).map_err(io("create", &data))?;
        self.map.nodes.push(NodeEntry {
            id,
            addr,
            data_dir: Some(data),
            state: MemberState::Up,
            incarnation: 0,
        });
        save_maps(&self.map, &self.map_path)?;
        self.start(id, true)?;
        Ok(addr)
    }

    /// Removes a node that holds no blocks (no volume places any on it) from the
    /// metadata service's map and the cluster file, stopping its process.
    pub async fn remove_node(&mut self, id: NodeId) -> Result<(), LocalError> {
        let meta = self.meta_service("removing a node")?;
        if self.map.node(id).is_none() {
            return Err(LocalError::UnknownNode(id));
        }
        propose(
            &meta,
            drs_meta::MetaCommand::RemoveNode { node: id },
            &format!("remove node {id}"),
        )
        .await?;
        if self.pid(id).is_some() {
            self.kill(id)?;
        }
        self.map.nodes.retain(|n| n.id != id);
        save_maps(&self.map, &self.map_path)?;
        Ok(())
    }

    /// Restarts a running node gracefully (SIGTERM, wait, start), e.g. so that it
    /// starts or stops hosting a metadata replica.
    async fn restart_gracefully(&self, id: NodeId) -> Result<(), LocalError> {
        self.stop_gracefully(id).await?;
        self.start(id, false)?;
        Ok(())
    }

    /// Stops a node with SIGTERM (SIGKILL after 20 s) and waits until it is gone.
    async fn stop_gracefully(&self, id: NodeId) -> Result<(), LocalError> {
        if self.pid(id).is_some() {
            self.signal(id, Signal::SIGTERM)?;
            let until = Instant::now() + Duration::from_secs(20);
            while self.pid(id).is_some() {
                if Instant::now() > until {
                    self.kill(id)?;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }

    /// Adds a metadata replica hosted by node `host`: the cluster file names it, the
    /// node restarts to host it, and the leader adds it (first as a learner that
    /// catches up, then as a voter). Returns its id.
    ///
    /// If the file already names a replica at `host`, that one is added (again): an
    /// earlier `meta add` that failed after saving the file (the learner did not
    /// catch up in time, say) is finished, and one that succeeded changes nothing.
    pub async fn meta_add(&mut self, host: NodeId) -> Result<u64, LocalError> {
        let meta = self.meta_service("adding a metadata replica")?;
        if self.map.node(host).is_none() {
            return Err(LocalError::UnknownNode(host));
        }
        if let Some(r) = self.map.meta.iter().find(|r| r.host == Some(host)).cloned() {
            if self.pid(host).is_none() {
                self.start(host, false)?;
            }
            meta.add_replica(r.id, r.addr).await.map_err(|e| {
                LocalError::Meta(format!("add replica {} at {}: {e}", r.id, r.addr))
            })?;
            return Ok(r.id);
        }
        let id = self.map.meta.iter().map(|r| r.id).max().unwrap_or(0) + 1;
        let addr = addr_or_free(None)?;
        self.map.meta.push(MetaReplica {
            id,
            addr,
            host: Some(host),
            join: true,
        });
        save_maps(&self.map, &self.map_path)?;
        self.restart_gracefully(host).await?;
        meta.add_replica(id, addr)
            .await
            .map_err(|e| LocalError::Meta(format!("add replica {id} at {addr}: {e}")))?;
        Ok(id)
    }

    /// Removes metadata replica `id` from the group, then from the cluster file, and
    /// restarts its host so it stops serving it (its directory is deleted).
    pub async fn meta_remove(&mut self, id: u64) -> Result<(), LocalError> {
        let meta = drs_meta::MetaClient::for_map(&self.map, &self.key)
            .ok_or_else(|| LocalError::Invalid("the cluster has no metadata service".into()))?;
        let r = self
            .map
            .meta
            .iter()
            .find(|r| r.id == id)
            .cloned()
            .ok_or_else(|| LocalError::Invalid(format!("no metadata replica {id}")))?;
        if self.map.meta.len() <= 1 {
            return Err(LocalError::Invalid(
                "cannot remove the last metadata replica".into(),
            ));
        }
        meta.remove_replica(id)
            .await
            .map_err(|e| LocalError::Meta(format!("remove replica {id}: {e}")))?;
        self.map.meta.retain(|m| m.id != id);
        save_maps(&self.map, &self.map_path)?;
        if let Some(host) = r.host {
            self.stop_gracefully(host).await?;
            if let Some(data) = self.map.node(host).and_then(|n| n.data_dir.clone()) {
                let dir = data.join("meta");
                if dir.exists() {
                    std::fs::remove_dir_all(&dir).map_err(io("remove", &dir))?;
                }
            }
            self.start(host, false)?;
        }
        Ok(())
    }

    /// Sends a signal to a running node.
    pub fn signal(&self, id: NodeId, sig: Signal) -> Result<(), LocalError> {
        if self.map.node(id).is_none() {
            return Err(LocalError::UnknownNode(id));
        }
        let pid = self.pid(id).ok_or(LocalError::NotRunning(id))?;
        kill(Pid::from_raw(pid as i32), sig).map_err(|source| LocalError::Signal {
            node: id,
            pid,
            source,
        })?;
        if sig == Signal::SIGKILL && !self.wait_gone(id, pid, Duration::from_secs(10)) {
            return Err(LocalError::Invalid(format!(
                "node {id} (pid {pid}) did not die after SIGKILL"
            )));
        }
        Ok(())
    }

    /// SIGKILL: the node dies at once, mid-write or not.
    pub fn kill(&self, id: NodeId) -> Result<(), LocalError> {
        self.signal(id, Signal::SIGKILL)
    }

    /// SIGSTOP: the node hangs (its connections stay open, nothing is answered).
    pub fn stop(&self, id: NodeId) -> Result<(), LocalError> {
        self.signal(id, Signal::SIGSTOP)
    }

    /// SIGCONT after a stop.
    pub fn cont(&self, id: NodeId) -> Result<(), LocalError> {
        self.signal(id, Signal::SIGCONT)
    }

    /// Waits up to `max` for process `pid` of node `id` to be gone (reaping it if this
    /// program started it); removes its pid file once it is. True if it is gone.
    fn wait_gone(&self, id: NodeId, pid: u32, max: Duration) -> bool {
        let until = Instant::now() + max;
        loop {
            let gone = {
                let mut ch = lock(&self.children);
                match ch.get_mut(&id).map(|c| (c.id(), c.try_wait())) {
                    Some((cpid, Ok(Some(_)) | Err(_))) if cpid == pid => {
                        ch.remove(&id);
                        true
                    }
                    Some((cpid, Ok(None))) if cpid == pid => false,
                    _ => !alive(pid),
                }
            };
            if gone {
                let _ = std::fs::remove_file(self.pid_path(id));
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops every node: SIGTERM (a clean stop with a checkpoint), then SIGKILL for any
    /// still running after `grace`. Stopped (SIGSTOP) nodes are continued first.
    /// Returns once every node process is gone.
    pub fn down(&self, grace: Duration) -> Result<(), LocalError> {
        let running: Vec<(NodeId, u32)> = self
            .node_ids()
            .into_iter()
            .filter_map(|id| self.pid(id).map(|p| (id, p)))
            .collect();
        for (_, pid) in &running {
            let p = Pid::from_raw(*pid as i32);
            let _ = kill(p, Signal::SIGCONT);
            let _ = kill(p, Signal::SIGTERM);
        }
        let until = Instant::now() + grace;
        let mut stuck = Vec::new();
        for (id, pid) in running {
            let left = until.saturating_duration_since(Instant::now());
            if !self.wait_gone(id, pid, left) {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                if !self.wait_gone(id, pid, Duration::from_secs(10)) {
                    stuck.push(format!("node {id} (pid {pid})"));
                }
            }
        }
        if !stuck.is_empty() {
            return Err(LocalError::Invalid(format!(
                "still running after SIGKILL: {}",
                stuck.join(", ")
            )));
        }
        Ok(())
    }

    /// The last line a node logged (why it stopped, usually), shortened.
    pub fn last_words(&self, id: NodeId) -> String {
        let text = std::fs::read_to_string(self.log_path(id)).unwrap_or_default();
        let line = text
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no log output");
        let line = line.trim();
        match line.char_indices().nth(300) {
            Some((i, _)) => format!("{}...", &line[..i]),
            None => line.to_string(),
        }
    }

    /// Removes what `create` wrote (the cluster file and the nodes' data), keeping
    /// the logs; for a cluster whose first start failed.
    pub fn remove(&self) -> Result<(), LocalError> {
        for n in &self.map.nodes {
            if let Some(d) = &n.data_dir {
                if d.exists() {
                    std::fs::remove_dir_all(d).map_err(io("remove", d))?;
                }
            }
        }
        std::fs::remove_file(&self.map_path).map_err(io("remove", &self.map_path))
    }

    /// A client of the cluster's volume.
    pub fn client(&self, cfg: ClientConfig) -> Result<Client, LocalError> {
        let vid = self.map.volumes.first().map(|v| v.id).unwrap_or(1);
        let cfg = ClientConfig {
            key: self.key.clone(),
            ..cfg
        };
        Ok(meta::client(self.map.clone(), vid, cfg)?)
    }

    /// With a metadata service: why the nodes in `ids` are not all up in its map
    /// (None when they are, or without a service).
    /// With a metadata service: what keeps the nodes `registered` (id and the
    /// incarnation each got when it registered this start) from being up in the map
    /// (None: nothing). A node is up in the map only once its record has the
    /// incarnation of this start: the first map of a new cluster says every node is
    /// up before any has registered.
    async fn waiting_in_map(&self, registered: &[(NodeId, u64)]) -> Option<String> {
        let meta = drs_meta::MetaClient::for_map(&self.map, &self.key)?
            .with_deadline(Duration::from_secs(2));
        match meta.read().await {
            Ok(state) => {
                let map = state.cluster_map();
                let not_up: Vec<String> = registered
                    .iter()
                    .filter_map(|&(id, inc)| {
                        let entry = map.node(id);
                        match entry {
                            _ if inc == 0 => Some(format!("node {id}: not registered yet")),
                            Some(e) if e.state == MemberState::Up && e.incarnation == inc => None,
                            Some(e) if e.incarnation != inc => Some(format!(
                                "node {id}: the map has incarnation {}, the node registered {inc}",
                                e.incarnation
                            )),
                            _ => Some(format!(
                                "node {id}: {} in the map",
                                map.node_state(id).as_str()
                            )),
                        }
                    })
                    .collect();
                (!not_up.is_empty()).then(|| not_up.join("; "))
            }
            Err(e) => Some(format!("metadata service: {e}")),
        }
    }

    /// Waits until every node in `ids` answers and reports itself up (and, with a
    /// metadata service, is up in its map).
    pub async fn wait_up(&self, ids: &[NodeId], timeout: Duration) -> Result<(), LocalError> {
        let client = self.client(ClientConfig {
            request_timeout: Duration::from_secs(1),
            reconnect_max: Duration::from_millis(100),
            ..ClientConfig::default()
        })?;
        let start = Instant::now();
        loop {
            let mut waiting = Vec::new();
            let mut registered = Vec::new();
            for &id in ids {
                let r = client
                    .call(id, &drs_proto::Request::Ping, Default::default())
                    .await;
                match r {
                    Ok((drs_proto::Response::Pong(info), _))
                        if info.state == drs_proto::NodeState::Up =>
                    {
                        registered.push((id, info.registered));
                    }
                    Ok((drs_proto::Response::Pong(info), _)) => {
                        waiting.push(format!("node {id}: {:?}", info.state))
                    }
                    Ok(_) => waiting.push(format!("node {id}: unexpected answer")),
                    Err(e) => {
                        if self.pid(id).is_none() {
                            return Err(LocalError::NotUp {
                                waited_s: start.elapsed().as_secs(),
                                detail: format!(
                                    "node {id} exited ({}); log: {}",
                                    self.last_words(id),
                                    self.log_path(id).display()
                                ),
                            });
                        }
                        waiting.push(format!("node {id}: {e}"))
                    }
                }
            }
            if waiting.is_empty() {
                match self.waiting_in_map(&registered).await {
                    None => return Ok(()),
                    Some(w) => waiting.push(w),
                }
            }
            if start.elapsed() >= timeout {
                return Err(LocalError::NotUp {
                    waited_s: timeout.as_secs(),
                    detail: waiting.join("; "),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// True if process `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    kill(Pid::from_raw(pid as i32), None).is_ok() && !is_zombie(pid as i32)
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        // Reap children that already exited; running ones are left running (a
        // `cluster up` outlives the command that started it).
        for (_, c) in lock(&self.children).iter_mut() {
            let _ = c.try_wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::default_meta_replicas;

    #[test]
    fn metadata_replicas_outlive_m_nodes() {
        // 2m + 1, at most one per node, always odd (an even group tolerates no more).
        assert_eq!(default_meta_replicas(6, 2), 5);
        assert_eq!(default_meta_replicas(6, 1), 3);
        assert_eq!(default_meta_replicas(4, 2), 3);
        assert_eq!(default_meta_replicas(3, 1), 3);
        assert_eq!(default_meta_replicas(2, 1), 1);
        assert_eq!(default_meta_replicas(12, 3), 7);
    }
}
