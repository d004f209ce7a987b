//! `bench timeline`: runs workloads against a fresh local cluster per run while a
//! scenario kills, stops, restarts or replaces nodes, samples throughput every
//! `--interval-ms`, and writes each run's CSV and charts plus a summary table.
//!
//! Every byte written is self-describing: each 4 KiB page carries its block, its page
//! number and a generation, and a body derived from the three. Every read checks the
//! pages it got, and at the end of each run the whole volume is read back and checked,
//! so a wrong, torn or misplaced page counts as an error in the run.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use drs_client::{Client, ClientConfig};
use drs_local::size::{human, parse_size};
use drs_local::{ClusterSpec, LocalCluster, NodeOptions, ServerCommand};
use drs_proto::NodeId;
use rand::Rng;

use crate::timeline::{Action, Event, EventKind, Sample, Scenario, Timeline, Workload};

/// Bytes of one self-describing page.
pub const PAGE: usize = 4096;
const MAGIC: &[u8; 4] = b"DRSP";
/// Longest one operation may take before it counts as failed (a hang is an error).
const OP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Parser, Debug, Clone)]
#[command(
    name = "bench timeline",
    about = "Throughput over time with nodes killed, stopped, restarted and replaced: CSV, SVG and PNG per run, and a summary table"
)]
pub struct TimelineOpts {
    /// Scenarios to run (repeat or comma-separate) [default: all].
    #[arg(long, value_enum, value_delimiter = ',')]
    pub scenario: Vec<Scenario>,
    /// Workloads to run (repeat or comma-separate) [default: all].
    #[arg(long, value_enum, value_delimiter = ',')]
    pub workload: Vec<Workload>,
    /// Seconds each run lasts [default: 24, 8 with --quick].
    #[arg(long)]
    pub seconds: Option<f64>,
    /// Sampling interval in milliseconds (100-1000).
    #[arg(long, default_value_t = 200)]
    pub interval_ms: u64,
    /// The volume's data (rounded up to whole MiB and stripes) [default: 128MiB,
    /// 32MiB with --quick].
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    #[arg(long, default_value = "64KiB", value_parser = parse_size)]
    pub block_size: u64,
    /// Concurrent workers, each with its own client.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    #[arg(long, default_value_t = 4)]
    pub k: u8,
    #[arg(long, default_value_t = 2)]
    pub m: u8,
    /// Also run every case on DRS with plain replication (k=1, m=2: 3 copies), as
    /// the storage-cost baseline, interleaved with the k+m runs (A B A B).
    #[arg(long)]
    pub replication: bool,
    /// File-system runs besides the library runs: fio (the job files of bench/fio/)
    /// on a DRS FUSE mount, beside a local directory and a bindfs passthrough mount
    /// of it (healthy runs only: they are the ceilings).
    #[arg(long)]
    pub fs: bool,
    /// With --fs: also a GlusterFS dispersed volume of the same k+m (Debian's
    /// glusterfs-server and glusterfs-client), its bricks killed like DRS nodes.
    #[arg(long)]
    pub gluster: bool,
    /// First install what the chosen runs need and is missing (fio, bindfs,
    /// GlusterFS, a font for the charts) with apt-get; needs root.
    #[arg(long)]
    pub install: bool,
    /// Where the CSV files, the charts and summary.md go.
    #[arg(long, default_value = "bench/results")]
    pub out: PathBuf,
    /// The clusters go in new directories under DIR (default: the temp directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Rebuild rate of replaced and restarted nodes in MiB/s (0: unlimited).
    #[arg(long, default_value_t = 0.0)]
    pub rebuild_rate_mib: f64,
    /// Short runs and a small volume.
    #[arg(long)]
    pub quick: bool,
    /// The node program (default: $DRS_SERVER_BIN, else this binary's `node-serve`).
    #[arg(long, value_name = "PATH")]
    pub server_bin: Option<PathBuf>,
}

/// How a system is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// DRS through the client library.
    Library,
    /// DRS through its FUSE mount, driven by fio.
    Fuse,
    /// A GlusterFS dispersed volume through its FUSE client, driven by fio.
    Gluster,
    /// bindfs over a local directory, driven by fio (a ceiling; no faults).
    Bindfs,
    /// A local directory, driven by fio (a ceiling; no faults).
    Local,
}

/// One system under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct System {
    pub backend: Backend,
    pub k: u8,
    pub m: u8,
}

impl System {
    pub fn name(&self) -> String {
        let drs = if self.k == 1 {
            format!("DRS 1+{} ({} copies)", self.m, self.m + 1)
        } else {
            format!("DRS {}+{}", self.k, self.m)
        };
        match self.backend {
            Backend::Library => drs,
            Backend::Fuse => format!("{drs} FUSE"),
            Backend::Gluster => format!("GlusterFS {}+{}", self.k, self.m),
            Backend::Bindfs => "bindfs over local".into(),
            Backend::Local => "local directory".into(),
        }
    }

    /// Whether the system has nodes to kill (the ceilings do not).
    pub fn has_nodes(&self) -> bool {
        !matches!(self.backend, Backend::Bindfs | Backend::Local)
    }

    pub fn nodes(&self) -> usize {
        (self.k + self.m) as usize
    }

    /// The nodes a scenario acts on: `n` of them, spread over the cluster.
    pub fn victims(&self, n: usize) -> Vec<NodeId> {
        let nodes = self.nodes();
        let n = n.clamp(1, self.m as usize);
        (0..n)
            .map(|i| ((1 + i * (nodes / n)) % nodes) as NodeId)
            .collect()
    }
}

/// The settled plan of a `bench timeline` invocation.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub runs: Vec<(System, Scenario, Workload)>,
    pub duration: Duration,
    pub interval: Duration,
    pub size: u64,
    pub bs: usize,
}

impl Plan {
    pub fn new(o: &TimelineOpts) -> anyhow::Result<Plan> {
        let bs = usize::try_from(o.block_size).context("block size too large")?;
        if bs < PAGE || bs % PAGE != 0 || bs > 1 << 20 || (1 << 20) % bs != 0 {
            bail!("--block-size must be a power of two between 4KiB and 1MiB");
        }
        if o.k == 0 || o.m == 0 {
            bail!("--k and --m must be at least 1");
        }
        let secs = o.seconds.unwrap_or(if o.quick { 8.0 } else { 24.0 });
        if !(2.0..=3600.0).contains(&secs) {
            bail!("--seconds must be between 2 and 3600");
        }
        if !(100..=1000).contains(&o.interval_ms) {
            bail!("--interval-ms must be between 100 and 1000");
        }
        if o.concurrency == 0 || o.concurrency > 256 {
            bail!("--concurrency must be between 1 and 256");
        }
        if o.gluster && !o.fs {
            bail!("--gluster is a file-system peer: add --fs");
        }
        if o.fs && !crate::fio::available() {
            bail!("--fs needs fio (Debian: apt-get install fio)");
        }
        if o.gluster && !crate::gluster::available() {
            bail!("--gluster needs glusterd, gluster and glusterfs (Debian: apt-get install glusterfs-server glusterfs-client)");
        }
        let sys = |backend, k, m| System { backend, k, m };
        let mut systems = vec![sys(Backend::Library, o.k, o.m)];
        if o.fs {
            systems.push(sys(Backend::Fuse, o.k, o.m));
        }
        if o.replication && o.k != 1 {
            systems.push(sys(Backend::Library, 1, 2));
            if o.fs {
                systems.push(sys(Backend::Fuse, 1, 2));
            }
        }
        if o.gluster {
            systems.push(sys(Backend::Gluster, o.k, o.m));
        }
        if o.fs {
            if crate::fuse::bindfs_installed() {
                systems.push(sys(Backend::Bindfs, o.k, o.m));
            }
            systems.push(sys(Backend::Local, o.k, o.m));
        }
        // Whole MiB and whole stripes of every system; with --fs, whole MiB for each
        // fio job's file (half the volume in all).
        let mut unit: u64 = 1 << 20;
        for s in &systems {
            unit = lcm(unit, s.k as u64 * bs as u64);
        }
        if o.fs {
            unit = lcm(unit, 2 * o.concurrency as u64 * (1 << 20));
        }
        let want = o.size.unwrap_or(if o.quick { 32 << 20 } else { 128 << 20 });
        let size = want.max(1).div_ceil(unit) * unit;
        let scenarios = if o.scenario.is_empty() {
            Scenario::ALL.to_vec()
        } else {
            o.scenario.clone()
        };
        let workloads = if o.workload.is_empty() {
            Workload::ALL.to_vec()
        } else {
            o.workload.clone()
        };
        let mut runs = Vec::new();
        for &sc in &scenarios {
            for &w in &workloads {
                // Interleaved: A B A B, so drift does not favour either system.
                for &sys in &systems {
                    if sys.has_nodes() || sc == Scenario::Healthy {
                        runs.push((sys, sc, w));
                    }
                }
            }
        }
        Ok(Plan {
            runs,
            duration: Duration::from_secs_f64(secs),
            interval: Duration::from_millis(o.interval_ms),
            size,
            bs,
        })
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn lcm(a: u64, b: u64) -> u64 {
    a / gcd(a, b) * b
}

/// Fills one page with its self-describing contents.
pub fn fill_page(buf: &mut [u8], lba: u64, page: u32, gen: u64) {
    buf[..4].copy_from_slice(MAGIC);
    buf[4..12].copy_from_slice(&lba.to_le_bytes());
    buf[12..16].copy_from_slice(&page.to_le_bytes());
    buf[16..24].copy_from_slice(&gen.to_le_bytes());
    let mut x = seed(lba, page, gen);
    for chunk in buf[24..].chunks_mut(8) {
        // xorshift64
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

fn seed(lba: u64, page: u32, gen: u64) -> u64 {
    let s = lba
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add((page as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9))
        .wrapping_add(gen.wrapping_mul(0x94d0_49bb_1331_11eb));
    s | 1
}

/// Checks that a page read at (`lba`, `page`) is a whole page written there by this
/// harness; returns its generation.
pub fn check_page(buf: &[u8], lba: u64, page: u32) -> Result<u64, String> {
    if buf.len() != PAGE {
        return Err(format!("block {lba} page {page}: {} bytes", buf.len()));
    }
    if &buf[..4] != MAGIC {
        return Err(format!("block {lba} page {page}: no page header"));
    }
    let word = |r: std::ops::Range<usize>| {
        let mut b = [0u8; 8];
        b[..r.len()].copy_from_slice(&buf[r]);
        u64::from_le_bytes(b)
    };
    let (got_lba, got_page, gen) = (word(4..12), word(12..16) as u32, word(16..24));
    if (got_lba, got_page) != (lba, page) {
        return Err(format!(
            "block {lba} page {page}: holds block {got_lba} page {got_page}"
        ));
    }
    let mut want = vec![0u8; PAGE];
    fill_page(&mut want, lba, page, gen);
    if want[..] != buf[..] {
        return Err(format!(
            "block {lba} page {page}: torn or wrong bytes (generation {gen})"
        ));
    }
    Ok(gen)
}

/// Checks every page of `data`, which starts at block `lba`.
fn check_blocks(data: &[u8], lba: u64, bs: usize) -> Result<(), String> {
    for (i, p) in data.chunks(PAGE).enumerate() {
        let off = i * PAGE;
        check_page(p, lba + (off / bs) as u64, ((off % bs) / PAGE) as u32)?;
    }
    Ok(())
}

/// Checks the blocks a `read_blocks(lba, ..)` returned, each where it is.
fn check_read(blocks: &[bytes::Bytes], lba: u64, bs: usize) -> Result<(), String> {
    for (j, b) in blocks.iter().enumerate() {
        check_blocks(b, lba + j as u64, bs)?;
    }
    Ok(())
}

/// `len` bytes of pages from block `lba` on, all of generation `gen`.
fn pages(lba: u64, len: usize, bs: usize, gen: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    for (i, p) in buf.chunks_mut(PAGE).enumerate() {
        let off = i * PAGE;
        fill_page(p, lba + (off / bs) as u64, ((off % bs) / PAGE) as u32, gen);
    }
    buf
}

#[derive(Default)]
struct Counters {
    bytes: AtomicU64,
    ops: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Counters {
    fn failed(&self, e: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut f) = self.first_error.lock() {
            f.get_or_insert(e);
        }
    }
}

/// One worker's loop until `stop`.
/// For a write refused because a block stayed locked: who holds the locks of its
/// stripe at each member, beside this client's own id.
async fn explain(client: &Client, e: &drs_client::ClientError) -> String {
    let drs_client::ClientError::Locked { lba, .. } = e else {
        return String::new();
    };
    let geo = client.geometry();
    let (stripe, _) = geo.locate(*lba);
    let mut out = format!(" [this client {:#018x}; stripe {stripe}:", client.id());
    for (p, node) in geo.members(stripe).into_iter().enumerate() {
        let locks = match client.list_node(node).await {
            Some((_, slots)) => slots
                .iter()
                .find(|s| s.stripe == stripe)
                .map(|s| format!("{:?}", s.locks))
                .unwrap_or_else(|| "no slot".into()),
            None => "no answer".into(),
        };
        out.push_str(&format!(" position {p} node {node}: {locks};"));
    }
    out.push(']');
    out
}

async fn worker(
    client: Client,
    workload: Workload,
    worker: usize,
    workers: usize,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
) {
    let bs = client.block_size();
    let blocks = client.blocks();
    let chunk_blocks = ((1 << 20) / bs) as u64;
    // Sequential workers each take their own range of whole MiB.
    let chunks = blocks / chunk_blocks;
    let per = (chunks / workers as u64).max(1);
    let first = (worker as u64 * per) % chunks.max(1);
    let mut next = 0u64;
    let mut gen = 1u64 + ((worker as u64) << 40);
    let mut rng = rand::rngs::StdRng::from_entropy();
    while !stop.load(Ordering::Relaxed) {
        let read = match workload {
            Workload::SeqRead | Workload::RandRead => true,
            Workload::SeqWrite | Workload::RandWrite => false,
            Workload::Mixed => rng.gen_bool(0.7),
        };
        let op = async {
            match workload {
                Workload::SeqWrite | Workload::SeqRead => {
                    let lba = (first + next % per) * chunk_blocks;
                    next += 1;
                    if read {
                        let got = client
                            .read_blocks(lba, chunk_blocks)
                            .await
                            .map_err(|e| format!("read of blocks {lba}..: {e}"))?;
                        check_read(&got, lba, bs)?;
                    } else {
                        gen += 1;
                        let data = pages(lba, 1 << 20, bs, gen);
                        if let Err(e) = client.write_blocks(lba, &data).await {
                            let why = explain(&client, &e).await;
                            return Err(format!("write of blocks {lba}..: {e}{why}"));
                        }
                    }
                    Ok::<usize, String>(1 << 20)
                }
                _ => {
                    let lba = rng.gen_range(0..blocks);
                    let page = rng.gen_range(0..bs / PAGE);
                    if read {
                        let got = client
                            .read(lba, page * PAGE, PAGE)
                            .await
                            .map_err(|e| format!("read of block {lba}: {e}"))?;
                        check_page(&got, lba, page as u32)?;
                    } else {
                        gen += 1;
                        let mut p = vec![0u8; PAGE];
                        fill_page(&mut p, lba, page as u32, gen);
                        if let Err(e) = client.write(lba, page * PAGE, &p).await {
                            let why = explain(&client, &e).await;
                            return Err(format!("write of block {lba}: {e}{why}"));
                        }
                    }
                    Ok(PAGE)
                }
            }
        };
        match tokio::time::timeout(OP_TIMEOUT, op).await {
            Ok(Ok(n)) => {
                counters.bytes.fetch_add(n as u64, Ordering::Relaxed);
                counters.ops.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(e)) => {
                counters.failed(e);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(_) => counters.failed(format!("an operation took over {OP_TIMEOUT:?}")),
        }
    }
}

/// Stops the nodes however the run ends.
struct Teardown {
    local: Arc<LocalCluster>,
}

impl Drop for Teardown {
    fn drop(&mut self) {
        // Node processes are found by their pid files, so this stops a replacement
        // started through another handle too.
        let _ = self.local.down(Duration::from_secs(10));
    }
}

/// Removes a run's directory however the run ends.
struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What the scenario acts on.
enum Target {
    Drs {
        local: Arc<LocalCluster>,
        server: ServerCommand,
        options: NodeOptions,
    },
    Gluster(crate::gluster::Gluster),
    /// The ceilings: nothing to act on.
    Nothing,
}

/// What drives the load.
enum Driver {
    Library {
        workers: Vec<tokio::task::JoinHandle<()>>,
        counters: Arc<Counters>,
        stop: Arc<AtomicBool>,
    },
    Fio(crate::fio::Running),
}

type Note = Arc<dyn Fn(EventKind, String) + Send + Sync>;

/// Carries out one planned action, noting events; waits for a recovery in the
/// background.
async fn act(
    target: &mut Target,
    dir: &Path,
    action: Action,
    victims: Vec<NodeId>,
    note: &Note,
    background: &mut Vec<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<()> {
    let names = victims
        .iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let what = match target {
        Target::Gluster(_) => "brick",
        _ => "node",
    };
    let label = format!("{} {what} {names}", action.label());
    match target {
        Target::Nothing => {}
        Target::Drs {
            local,
            server,
            options,
        } => match action {
            Action::Kill | Action::Stop | Action::Cont => {
                for &v in &victims {
                    match action {
                        Action::Kill => local.kill(v)?,
                        Action::Stop => local.stop(v)?,
                        _ => local.cont(v)?,
                    }
                }
                let kind = if action == Action::Cont {
                    EventKind::Recovery
                } else {
                    EventKind::Fault
                };
                note(kind, label);
            }
            Action::Restart => {
                for &v in &victims {
                    local.start(v, false)?;
                }
                note(EventKind::Mark, label);
                let local = local.clone();
                let note = note.clone();
                background.push(tokio::spawn(async move {
                    match local.wait_up(&victims, Duration::from_secs(600)).await {
                        Ok(()) => note(EventKind::Recovery, format!("node {names} up")),
                        Err(e) => note(EventKind::Mark, format!("node {names} not up: {e}")),
                    }
                }));
            }
            Action::Replace => {
                let mut again = LocalCluster::open(
                    &dir.join("cluster").join("cluster.toml"),
                    server.clone(),
                    options.clone(),
                )?;
                let victim = victims[0];
                again.replace(victim, None).await?;
                note(EventKind::Mark, format!("{label} by an empty node"));
                let note = note.clone();
                background.push(tokio::spawn(async move {
                    match again.wait_up(&[victim], Duration::from_secs(600)).await {
                        Ok(()) => note(EventKind::Recovery, format!("node {names} rebuilt")),
                        Err(e) => note(EventKind::Mark, format!("node {names} not up: {e}")),
                    }
                }));
            }
        },
        Target::Gluster(g) => {
            use nix::sys::signal::Signal;
            match action {
                Action::Kill | Action::Stop | Action::Cont => {
                    let sig = match action {
                        Action::Kill => Signal::SIGKILL,
                        Action::Stop => Signal::SIGSTOP,
                        _ => Signal::SIGCONT,
                    };
                    for &v in &victims {
                        g.signal(v as usize, sig)?;
                    }
                    let kind = if action == Action::Cont {
                        EventKind::Recovery
                    } else {
                        EventKind::Fault
                    };
                    note(kind, label);
                }
                Action::Restart | Action::Replace => {
                    if action == Action::Restart {
                        g.restart()?;
                        note(EventKind::Mark, label);
                    } else {
                        g.replace(victims[0] as usize)?;
                        note(EventKind::Mark, format!("{label} by an empty brick"));
                    }
                    let note = note.clone();
                    background.push(tokio::spawn(async move {
                        let healed = tokio::task::spawn_blocking(|| {
                            crate::gluster::Gluster::wait_healed(Duration::from_secs(600))
                        })
                        .await;
                        match healed {
                            Ok(Ok(())) => {
                                note(EventKind::Recovery, format!("brick {names} healed"))
                            }
                            Ok(Err(e)) => note(EventKind::Mark, format!("brick {names}: {e}")),
                            Err(e) => note(EventKind::Mark, format!("brick {names}: {e}")),
                        }
                    }));
                }
            }
        }
    }
    Ok(())
}

/// Runs one (system, scenario, workload) case on a fresh system under `dir`.
pub async fn run_one(
    plan: &Plan,
    opts: &TimelineOpts,
    server: ServerCommand,
    dir: &Path,
    case: (System, Scenario, Workload),
) -> anyhow::Result<Timeline> {
    let (system, scenario, workload) = case;
    std::fs::create_dir_all(dir)?;
    // Declared first, dropped last: the directory goes however the run ends.
    let _remove = RemoveDir(dir.to_path_buf());
    // Stops the nodes (after the mounts and the peer below are gone).
    let mut teardown = None;
    let mut target = Target::Nothing;
    // Mounts are dropped (unmounted) before the nodes stop.
    let mut mounts = Vec::new();
    let cfg = ClientConfig::default();
    let bs = plan.bs;
    let mib_blocks = ((1 << 20) / bs) as u64;
    let total_mib = plan.size >> 20;
    let mut fs_dir = None;
    match system.backend {
        Backend::Library | Backend::Fuse => {
            let cluster = dir.join("cluster");
            let spec = ClusterSpec {
                nodes: system.nodes(),
                k: system.k,
                m: system.m,
                block_size: u32::try_from(plan.bs).context("block size")?,
                blocks: plan.size / plan.bs as u64,
                min_write: None,
                meta_replicas: drs_local::default_meta_replicas(system.nodes(), system.m),
            };
            let options = NodeOptions {
                settle_ms: 500,
                rebuild_rate_mib: opts.rebuild_rate_mib,
                ..NodeOptions::default()
            };
            let local = Arc::new(
                LocalCluster::create(&cluster, &spec, server.clone(), options.clone())
                    .context("create the local cluster")?,
            );
            teardown = Some(Teardown {
                local: Arc::clone(&local),
            });
            local.start_all(true)?;
            local
                .wait_up(&local.node_ids(), Duration::from_secs(60))
                .await
                .context("start the nodes")?;
            if system.backend == Backend::Fuse {
                let mnt = dir.join("mnt");
                let m = crate::fuse::Mount::drs(
                    &cluster.join("cluster.toml"),
                    &mnt,
                    &dir.join("mount.log"),
                    false,
                )?;
                fs_dir = Some(m.path.clone());
                mounts.push(m);
            } else {
                // Every page written once, so every read finds self-describing bytes.
                let fill = local.client(cfg.clone())?;
                futures::stream::iter(0..total_mib)
                    .map(|i| {
                        let fill = &fill;
                        async move {
                            let lba = i * mib_blocks;
                            fill.write_blocks(lba, &pages(lba, 1 << 20, bs, 0))
                                .await
                                .with_context(|| format!("fill blocks {lba}.."))
                        }
                    })
                    .buffer_unordered(4)
                    .collect::<Vec<_>>()
                    .await
                    .into_iter()
                    .collect::<anyhow::Result<Vec<()>>>()?;
            }
            target = Target::Drs {
                local,
                server: server.clone(),
                options,
            };
        }
        Backend::Gluster => {
            let g = crate::gluster::Gluster::start(&dir.join("gluster"), system.k, system.m)?;
            fs_dir = Some(g.mount.clone());
            target = Target::Gluster(g);
        }
        Backend::Bindfs => {
            let local = dir.join("local");
            std::fs::create_dir_all(&local)?;
            let m = crate::fuse::Mount::bindfs(&local, &dir.join("mnt"))?
                .context("bindfs is not installed")?;
            fs_dir = Some(m.path.clone());
            mounts.push(m);
        }
        Backend::Local => {
            let local = dir.join("local");
            std::fs::create_dir_all(&local)?;
            fs_dir = Some(local);
        }
    }
    let counters = Arc::new(Counters::default());
    let driver = match &fs_dir {
        Some(d) => {
            let job = crate::fio::Job {
                workload,
                dir: d.clone(),
                size: plan.size / 2 / opts.concurrency as u64,
                jobs: opts.concurrency,
                seconds: plan.duration.as_secs_f64(),
            };
            job.layout()?;
            Driver::Fio(job.start(&dir.join("fio-logs"), plan.interval)?)
        }
        None => {
            let Target::Drs { local, .. } = &target else {
                bail!("a library run needs a DRS cluster");
            };
            let stop = Arc::new(AtomicBool::new(false));
            let mut workers = Vec::new();
            for w in 0..opts.concurrency {
                let c = local.client(cfg.clone())?;
                workers.push(tokio::spawn(worker(
                    c,
                    workload,
                    w,
                    opts.concurrency,
                    counters.clone(),
                    stop.clone(),
                )));
            }
            Driver::Library {
                workers,
                counters: counters.clone(),
                stop,
            }
        }
    };
    let load_start = crate::report::loadavg_1m();
    let events: Arc<Mutex<Vec<Event>>> = Arc::default();
    let start = match &driver {
        Driver::Fio(r) => r.started,
        Driver::Library { .. } => Instant::now(),
    };
    let note: Note = {
        let events = events.clone();
        Arc::new(move |kind: EventKind, label: String| {
            if let Ok(mut e) = events.lock() {
                e.push(Event {
                    t: start.elapsed().as_secs_f64(),
                    kind,
                    label,
                });
            }
        })
    };
    let mut actions = scenario.plan(plan.duration, system.m as usize);
    actions.reverse();
    let mut samples = Vec::new();
    let mut last = (0u64, 0u64, 0u64);
    let mut last_t = 0.0;
    let bar = indicatif::ProgressBar::new(plan.duration.as_millis() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(format!(
        "{} {} {}",
        system.name(),
        scenario.name(),
        workload.name()
    ));
    let mut background = Vec::new();
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::from_std(start) + plan.interval,
        plan.interval,
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = start.elapsed();
        let t = now.as_secs_f64();
        bar.set_position(now.as_millis() as u64);
        if let Driver::Library { counters, .. } = &driver {
            let cur = (
                counters.bytes.load(Ordering::Relaxed),
                counters.ops.load(Ordering::Relaxed),
                counters.errors.load(Ordering::Relaxed),
            );
            let s = Sample {
                t,
                dt: t - last_t,
                bytes: cur.0 - last.0,
                ops: cur.1 - last.1,
                errors: cur.2 - last.2,
            };
            last = cur;
            last_t = t;
            bar.set_message(format!(
                "{:.1} {}, {} errors",
                s.value(workload.unit()),
                workload.unit().label(),
                cur.2
            ));
            samples.push(s);
        }
        while actions.last().is_some_and(|(at, _, _)| *at <= now) {
            let Some((_, action, n)) = actions.pop() else {
                break;
            };
            act(
                &mut target,
                dir,
                action,
                system.victims(n),
                &note,
                &mut background,
            )
            .await?;
        }
        if now >= plan.duration {
            break;
        }
    }
    let mut first_error = None;
    match driver {
        Driver::Library { workers, stop, .. } => {
            stop.store(true, Ordering::Relaxed);
            for w in workers {
                let _ = w.await;
            }
            // Operations that were under way at the end and failed count too.
            let tail = counters.errors.load(Ordering::Relaxed) - last.2;
            if let Some(s) = samples.last_mut() {
                s.errors += tail;
            }
        }
        Driver::Fio(run) => {
            let limit = Duration::from_secs(120);
            let outcome = tokio::task::spawn_blocking(move || run.finish(limit)).await??;
            samples = outcome.samples;
            if let Some(s) = samples.last_mut() {
                s.errors += outcome.errors;
            }
            first_error = outcome.first_error;
        }
    }
    bar.finish_and_clear();
    // A recovery not finished within the run is noted as such, not waited for.
    for b in &background {
        b.abort();
    }
    let load_end = crate::report::loadavg_1m();
    if let (Target::Drs { local, .. }, None) = (&target, &fs_dir) {
        // Everything read back and checked, with the scenario's nodes still down.
        let check = local.client(cfg)?;
        let mut bad = 0u64;
        for i in 0..total_mib {
            let lba = i * mib_blocks;
            let res = match check.read_blocks(lba, mib_blocks).await {
                Ok(got) => check_read(&got, lba, bs),
                Err(e) => Err(format!("final read of blocks {lba}..: {e}")),
            };
            if let Err(e) = res {
                bad += 1;
                counters.failed(format!("final check: {e}"));
            }
        }
        if let Some(s) = samples.last_mut() {
            s.errors += bad;
        }
        first_error = counters.first_error.lock().ok().and_then(|e| e.clone());
    }
    drop(mounts);
    drop(target);
    drop(teardown);
    let mut events = events.lock().map(|e| e.clone()).unwrap_or_default();
    events.sort_by(|a, b| a.t.total_cmp(&b.t));
    let t = Timeline {
        scenario,
        workload,
        system: system.name(),
        samples,
        events,
        load: (load_start, load_end),
        first_error,
        // What a replaced node (brick) holds: its share of the data written.
        rebuilt_bytes: (scenario == Scenario::Replace).then(|| {
            let written = if fs_dir.is_some() {
                plan.size / 2
            } else {
                plan.size
            };
            written / system.k as u64
        }),
    };
    if t.total_errors() > 0 {
        // The logs of a run that failed are kept beside its chart.
        let to = opts.out.join(format!("{}-logs", t.stem()));
        if let Err(e) = keep_logs(dir, &to) {
            eprintln!("keeping the logs of {}: {e:#}", t.stem());
        }
    }
    Ok(t)
}

/// Copies the log files under `from` (node logs, the mount's, fio's and
/// GlusterFS's) to `to`, keeping their relative paths.
fn keep_logs(from: &Path, to: &Path) -> anyhow::Result<()> {
    let mut dirs = vec![from.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d)?.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().to_string();
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() && !name.starts_with("mnt") && !name.starts_with("brick") {
                dirs.push(path);
            } else if ft.is_file()
                && (name == "log" || name.ends_with(".log") || name.starts_with("fio."))
            {
                let rel = path.strip_prefix(from).unwrap_or(&path);
                let dst = to.join(rel);
                if let Some(parent) = dst.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                std::fs::copy(&path, &dst).with_context(|| format!("copy {}", path.display()))?;
            }
        }
    }
    Ok(())
}

/// `bench timeline`: every case of the plan, then the summary.
pub fn main(args: &[std::ffi::OsString]) -> anyhow::Result<()> {
    let opts = TimelineOpts::parse_from(
        std::iter::once(std::ffi::OsString::from("bench timeline")).chain(args.iter().cloned()),
    );
    if opts.install {
        install(&opts)?;
    }
    let plan = Plan::new(&opts)?;
    let server = crate::server_command(opts.server_bin.as_ref())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    std::fs::create_dir_all(&opts.out).with_context(|| format!("create {}", opts.out.display()))?;
    let base = opts.dir.clone().unwrap_or_else(std::env::temp_dir);
    println!("DRS bench timeline: {}", crate::machine());
    println!(
        "{} runs of {:.0} s, sampled every {} ms; {} volume, {} blocks, {} workers; results in {}",
        plan.runs.len(),
        plan.duration.as_secs_f64(),
        plan.interval.as_millis(),
        human(plan.size),
        human(plan.bs as u64),
        opts.concurrency,
        opts.out.display()
    );
    let mut done = Vec::new();
    let mut failed = 0;
    for (i, case) in plan.runs.iter().enumerate() {
        let dir = base.join(format!(
            "drs-timeline-{}-{i}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let t = rt.block_on(run_one(&plan, &opts, server.clone(), &dir, *case))?;
        let stem = t.stem();
        let csv = opts.out.join(format!("{stem}.csv"));
        std::fs::write(&csv, t.csv()).with_context(|| format!("write {}", csv.display()))?;
        crate::chart::draw(&t, &opts.out.join(format!("{stem}.svg")))?;
        crate::chart::draw(&t, &opts.out.join(format!("{stem}.png")))?;
        let p = t.phases();
        println!(
            "[{}/{}] {} {} {}: before {:.1}, during {}, after {} {}; {} errors{}",
            i + 1,
            plan.runs.len(),
            t.system,
            t.scenario.name(),
            t.workload.name(),
            p.before,
            p.during.map_or("-".into(), |v| format!("{v:.1}")),
            p.after.map_or("-".into(), |v| format!("{v:.1}")),
            t.unit().label(),
            t.total_errors(),
            t.first_error
                .as_ref()
                .map_or(String::new(), |e| format!(" (first: {e})"))
        );
        if t.total_errors() > 0 {
            failed += 1;
        }
        done.push(t);
    }
    let names: Vec<String> = {
        let mut v: Vec<String> = Vec::new();
        for (sys, _, _) in &plan.runs {
            if !v.contains(&sys.name()) {
                v.push(sys.name());
            }
        }
        v
    };
    let named = |backend, k, m| System { backend, k, m }.name();
    let (k, m) = (opts.k, opts.m);
    let fuse = named(Backend::Fuse, k, m);
    let pairs: Vec<(String, String)> = [
        (fuse.clone(), named(Backend::Gluster, k, m)),
        (fuse.clone(), named(Backend::Bindfs, k, m)),
        (fuse.clone(), named(Backend::Local, k, m)),
        (fuse.clone(), named(Backend::Library, k, m)),
        (named(Backend::Library, k, m), named(Backend::Library, 1, 2)),
        (fuse, named(Backend::Fuse, 1, 2)),
    ]
    .into_iter()
    .filter(|(a, b)| a != b && names.contains(a) && names.contains(b))
    .collect();
    // The disk's rate: the local directory's healthy 1 MiB sequential read.
    let disk = done
        .iter()
        .find(|t| {
            t.system == named(Backend::Local, k, m)
                && t.scenario == Scenario::Healthy
                && t.workload == Workload::SeqRead
        })
        .and_then(|t| t.headline())
        .map(|mib| (mib, k));
    let summary = format!(
        "# DRS timeline summary\n\nMachine: {}\n\nRuns of {:.0} s sampled every {} ms, {} volume, {} blocks, {} workers. Throughput in the unit of each row; the phases are split at the fault and recovery events (the interval holding an event belongs to neither side).\n\n{}\n## Ratios\n\nA / B of the same scenario and workload: the mean before the fault for healthy runs, during it otherwise; and each rebuild beside the local directory's 1 MiB sequential read / (k + 1), when the run has it.\n\n{}",
        crate::machine(),
        plan.duration.as_secs_f64(),
        plan.interval.as_millis(),
        human(plan.size),
        human(plan.bs as u64),
        opts.concurrency,
        crate::timeline::summary(&done),
        crate::timeline::ratios(&done, &pairs, disk)
    );
    let path = opts.out.join("summary.md");
    std::fs::write(&path, &summary).with_context(|| format!("write {}", path.display()))?;
    println!("\n{}", crate::timeline::summary(&done));
    if failed > 0 {
        bail!("{failed} runs had failed operations or wrong bytes");
    }
    Ok(())
}

/// `apt-get install` of what the chosen runs need and is missing.
fn install(o: &TimelineOpts) -> anyhow::Result<()> {
    let mut want = Vec::new();
    if !Path::new("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf").exists() {
        want.push("fonts-dejavu-core");
    }
    if o.fs && !crate::fio::available() {
        want.push("fio");
    }
    if o.fs && !crate::fuse::bindfs_installed() {
        want.push("bindfs");
    }
    if o.gluster && !crate::gluster::available() {
        want.extend(["glusterfs-server", "glusterfs-client"]);
    }
    if want.is_empty() {
        return Ok(());
    }
    println!("installing {}", want.join(" "));
    let st = std::process::Command::new("apt-get")
        .args(["install", "-y", "-qq"])
        .args(&want)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("run apt-get")?;
    if !st.success() {
        bail!("apt-get install {} failed ({st})", want.join(" "));
    }
    Ok(())
}

use futures::StreamExt as _;
use rand::SeedableRng as _;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_check_and_catch_damage() {
        let bs = 16384;
        let data = pages(8, 2 * bs, bs, 7);
        assert_eq!(check_blocks(&data, 8, bs), Ok(()));
        assert_eq!(check_page(&data[PAGE..2 * PAGE], 8, 1), Ok(7));
        // Blocks as a read returns them, each checked where it is.
        let (b0, b1) = (
            bytes::Bytes::copy_from_slice(&data[..bs]),
            bytes::Bytes::copy_from_slice(&data[bs..]),
        );
        assert_eq!(check_read(&[b0.clone(), b1.clone()], 8, bs), Ok(()));
        assert!(check_read(&[b1, b0], 8, bs)
            .unwrap_err()
            .contains("holds block 9"));
        // A page of another block.
        assert!(check_blocks(&data, 9, bs)
            .unwrap_err()
            .contains("holds block 8"));
        // A torn page: half of one generation, half of another.
        let mut torn = data.clone();
        let other = pages(8, PAGE, bs, 8);
        torn[PAGE / 2..PAGE].copy_from_slice(&other[PAGE / 2..PAGE]);
        assert!(check_blocks(&torn, 8, bs).unwrap_err().contains("torn"));
        // Zeros (never written).
        assert!(check_page(&[0u8; PAGE], 0, 0)
            .unwrap_err()
            .contains("header"));
    }

    #[test]
    fn failed_runs_keep_their_logs_only() {
        let root = std::env::temp_dir().join(format!("drs-keep-logs-{}", std::process::id()));
        let run = root.join("run");
        for d in ["cluster/node-0/data", "mnt", "fio-logs"] {
            std::fs::create_dir_all(run.join(d)).unwrap();
        }
        for (f, text) in [
            ("cluster/node-0/log", "node"),
            ("cluster/node-0/data/blocks", "data"),
            ("mount.log", "mount"),
            ("mnt/file.log", "inside the mount"),
            ("fio-logs/fio.stderr", "fio"),
            ("fio-logs/fio_bw.1.log", "250, 1, 0, 0, 0"),
        ] {
            std::fs::write(run.join(f), text).unwrap();
        }
        let kept = root.join("kept");
        keep_logs(&run, &kept).unwrap();
        let read = |f: &str| std::fs::read_to_string(kept.join(f)).ok();
        assert_eq!(read("cluster/node-0/log").as_deref(), Some("node"));
        assert_eq!(read("mount.log").as_deref(), Some("mount"));
        assert_eq!(read("fio-logs/fio.stderr").as_deref(), Some("fio"));
        assert!(read("fio-logs/fio_bw.1.log").is_some());
        assert_eq!(read("cluster/node-0/data/blocks"), None);
        assert_eq!(read("mnt/file.log"), None, "never into a mount");
        std::fs::remove_dir_all(&root).unwrap();
    }

    fn opts(args: &[&str]) -> TimelineOpts {
        TimelineOpts::parse_from(std::iter::once("bench timeline").chain(args.iter().copied()))
    }

    #[test]
    fn plans_interleave_systems_and_round_sizes() {
        let p = Plan::new(&opts(&[
            "--scenario",
            "kill-1,healthy",
            "--workload",
            "seq-write",
            "--replication",
            "--size",
            "3MiB",
            "--quick",
        ]))
        .unwrap();
        let a = System {
            backend: Backend::Library,
            k: 4,
            m: 2,
        };
        let b = System { k: 1, ..a };
        assert_eq!(
            p.runs,
            vec![
                (a, Scenario::Kill1, Workload::SeqWrite),
                (b, Scenario::Kill1, Workload::SeqWrite),
                (a, Scenario::Healthy, Workload::SeqWrite),
                (b, Scenario::Healthy, Workload::SeqWrite),
            ]
        );
        assert_eq!(p.size, 3 << 20);
        assert_eq!(p.duration, Duration::from_secs(8));
        let all = Plan::new(&opts(&[])).unwrap();
        assert_eq!(all.runs.len(), 30);
        assert!(Plan::new(&opts(&["--interval-ms", "50"])).is_err());
        assert!(Plan::new(&opts(&["--block-size", "6KiB"])).is_err());
    }

    #[test]
    fn victims_are_spread_and_bounded_by_m() {
        let s = System {
            backend: Backend::Fuse,
            k: 4,
            m: 2,
        };
        assert_eq!(s.name(), "DRS 4+2 FUSE");
        assert_eq!(s.victims(1), vec![1]);
        assert_eq!(s.victims(2), vec![1, 4]);
        assert_eq!(s.victims(5), vec![1, 4]);
        let r = System {
            backend: Backend::Library,
            k: 1,
            m: 2,
        };
        assert_eq!(r.victims(2), vec![1, 2]);
        assert_eq!(r.name(), "DRS 1+2 (3 copies)");
    }
}
