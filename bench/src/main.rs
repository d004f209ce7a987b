//! `bench`: DRS throughput on this machine, every number beside a baseline measured
//! in the same run.
//!
//! ```text
//! cargo run --release -p bench -- [--size 256MiB] [--block-size 64KiB] [--dir DIR] [--quick]
//! ```
//! 1. codec encode (k=4, m=2, in memory) vs memcpy of the same data bytes;
//! 2. sequential `write_blocks` vs write + fdatasync to a local file, scaled by k/(k+m);
//! 3. sequential `read_blocks` vs reading the local file (both from the page cache);
//! 4. the same read with 1 and then 2 nodes SIGKILLed vs the healthy read;
//! 5. random 4 KiB `write` with N tasks vs pwrite + fdatasync with N threads;
//! 6. lock + unlock of a block vs a ping round trip, p50 and p99;
//! 7. the self-verifying load through caches with a cache group vs writing directly;
//! 8. SIGKILL of a client holding a lock until the lock is free vs its lease.
//!
//! ... and, after the metadata rows (9-11):
//! 12. 1 MiB sequential write + fsync through the FUSE mount vs 1 MiB `write_blocks`
//!     calls through the library (target >= 0.7), beside a local directory and a
//!     bindfs passthrough mount of it (if bindfs is installed);
//! 13. 1 MiB sequential reads through a fresh FUSE mount vs 1 MiB `read_blocks`
//!     calls (target >= 0.7), with the same neighbours.
//!
//! The nodes are separate processes on 127.0.0.1 (a 6-node 4+2 local cluster in a new
//! directory, torn down however the run ends). They run `--server-bin`, else
//! `$DRS_SERVER_BIN`, else this very binary (`bench node-serve`, the same node code as
//! `drs-server`), so a plain `cargo run --release -p bench` never runs a stale server.
//! See README.md.

mod chart;
mod clients;
mod drs;
mod fio;
mod fuse;
mod gluster;
mod local_file;
mod memory;
mod report;
mod timeline;
mod timeline_run;

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use drs_client::{Client, ClientConfig};
use drs_local::{ClusterSpec, LocalCluster, NodeOptions, ServerCommand};
use drs_proto::{NodeId, NodeStats, Request, Response};
use rand::RngCore;

use drs_local::size::{human, parse_size};
use report::{mib_per_s, per_s, percentile, Row, Unit};

const K: usize = 4;
const M: usize = 2;
const NODES: usize = 6;
/// The nodes SIGKILLed in row 4: first one, then both.
const VICTIMS: [NodeId; 2] = [1, 4];
/// Bytes per random write of row 5.
const IO: usize = 4096;

#[derive(Parser, Debug)]
#[command(
    name = "bench",
    about = "DRS throughput on this machine, each number beside a baseline measured in the same run"
)]
struct Opts {
    /// Data written and read in rows 2-4 (rounded up to whole stripes) [default:
    /// 256MiB, 32MiB with --quick].
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Block size of the volume and of the in-memory encode.
    #[arg(long, default_value = "64KiB", value_parser = parse_size)]
    block_size: u64,
    /// Bytes per write_blocks / read_blocks call, and per local write + fdatasync and
    /// read (rounded down to whole stripes) [default: 16MiB, 4MiB with --quick].
    #[arg(long, value_parser = parse_size)]
    chunk: Option<u64>,
    /// The cluster directory and the local baseline file go in a new directory under
    /// DIR (default: the temporary directory). Both are on DIR's filesystem.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Small sizes and short phases: the whole run takes well under 30 s.
    #[arg(long)]
    quick: bool,
    /// Concurrent tasks (DRS) and threads (local file) of the random 4 KiB writes.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Seconds each side of the random-write row runs [default: 15, 2 with --quick].
    #[arg(long)]
    seconds: Option<f64>,
    /// Passes over the data in each read row [default: 5, 1 with --quick].
    #[arg(long)]
    passes: Option<usize>,
    /// ClientConfig::stripes_in_flight [default: the library's default].
    #[arg(long)]
    stripes_in_flight: Option<usize>,
    /// The node program (default: $DRS_SERVER_BIN, else this binary's `node-serve`).
    #[arg(long, value_name = "PATH")]
    server_bin: Option<PathBuf>,
    /// All random-write tasks share one Client instead of one Client each (their
    /// writes to one block must still exclude each other).
    #[arg(long)]
    shared_client: bool,
    /// Keep the cluster directory afterwards (the nodes are stopped either way).
    #[arg(long)]
    keep: bool,
}

/// The run's sizes, settled from the options.
#[derive(Debug, Clone, PartialEq)]
struct Plan {
    bs: usize,
    size: usize,
    chunk: usize,
    encode_total: u64,
    encode_working_set: usize,
    random: Duration,
    /// Passes over the data of each read row.
    passes: usize,
}

impl Plan {
    fn new(o: &Opts) -> anyhow::Result<Plan> {
        let bs = usize::try_from(o.block_size).context("block size too large")?;
        if bs < IO || bs % IO != 0 {
            bail!("--block-size must be a multiple of {IO}");
        }
        let stripe = K * bs;
        let want = o.size.unwrap_or(if o.quick { 32 << 20 } else { 256 << 20 });
        let want = usize::try_from(want).context("size too large")?;
        if want == 0 {
            bail!("--size must be more than 0");
        }
        let size = want.div_ceil(stripe) * stripe;
        let chunk = o.chunk.unwrap_or(if o.quick { 4 << 20 } else { 16 << 20 });
        let chunk = usize::try_from(chunk).context("chunk too large")?;
        let chunk = (chunk / stripe).max(1) * stripe;
        let chunk = chunk.min(size);
        let secs = o.seconds.unwrap_or(if o.quick { 2.0 } else { 15.0 });
        if !(secs > 0.0 && secs < 86_400.0) {
            bail!("--seconds must be between 0 and a day");
        }
        Ok(Plan {
            bs,
            size,
            chunk,
            encode_total: if o.quick { 1 << 30 } else { 4 << 30 },
            encode_working_set: 64 << 20,
            random: Duration::from_secs_f64(secs),
            passes: o.passes.unwrap_or(if o.quick { 1 } else { 5 }).max(1),
        })
    }
}

/// Stops the nodes (and removes the directory) however the run ends.
struct Teardown {
    local: Arc<LocalCluster>,
    dir: PathBuf,
    remove: bool,
}

impl Drop for Teardown {
    fn drop(&mut self) {
        let _ = self.local.down(Duration::from_secs(10));
        if self.remove {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn main() {
    let args: Vec<OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "node-serve") {
        // A node of the cluster this binary started (see `server_command`).
        let node_args = std::iter::once(OsString::from("drs-server")).chain(args[2..].to_vec());
        let serve = <drs_server::cli::ServeArgs as Parser>::parse_from(node_args);
        if let Err(e) = drs_server::cli::serve(serve) {
            eprintln!("drs-server: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    if args.get(1).is_some_and(|a| a == "fuse-mount") {
        // The file system rows' mount (see `fuse::Mount::drs`).
        let (Some(cluster), Some(path)) = (args.get(2), args.get(3)) else {
            eprintln!("bench fuse-mount: CLUSTER_FILE MOUNTPOINT [write_through]");
            std::process::exit(2);
        };
        let cfg = drs_fuse::MountConfig {
            cluster: PathBuf::from(cluster),
            mountpoint: PathBuf::from(path),
            allow_other: false,
            op_timeout: Duration::from_secs(30),
            threads: 4,
            writeback_cache: false,
            noatime: false,
            write_through: args.get(4).is_some_and(|a| a == "write_through"),
            metrics: None,
        };
        if let Err(e) = drs_fuse::mount(&cfg) {
            eprintln!("bench fuse-mount: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    if args.get(1).is_some_and(|a| a == "timeline") {
        // Throughput over time with faults (see `timeline_run`). With RUST_LOG set, the
        // workers' clients log to stderr (why an operation failed or waited).
        if std::env::var_os("RUST_LOG").is_some() {
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_writer(std::io::stderr)
                .init();
        }
        if let Err(e) = timeline_run::main(&args[2..]) {
            eprintln!("bench timeline: error: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    if args.get(1).is_some_and(|a| a == "client-hold") {
        // A client row 8 SIGKILLs.
        if let Err(e) = clients::hold(&args[2..]) {
            eprintln!("bench client-hold: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    let opts = Opts::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench: error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = run(opts, &rt) {
        eprintln!("bench: error: {e:#}");
        std::process::exit(1);
    }
}

/// How the nodes are started: `--server-bin`, `$DRS_SERVER_BIN`, or this binary.
fn server_command(explicit: Option<&PathBuf>) -> anyhow::Result<ServerCommand> {
    if let Some(p) = explicit {
        if !p.is_file() {
            bail!("--server-bin {}: no such file", p.display());
        }
        return Ok(ServerCommand {
            program: p.clone(),
            prefix: Vec::new(),
        });
    }
    if std::env::var_os("DRS_SERVER_BIN").is_some() {
        return ServerCommand::locate().context("DRS_SERVER_BIN is set but unusable");
    }
    let exe = std::env::current_exe().context("find the bench executable")?;
    Ok(ServerCommand {
        program: exe,
        prefix: vec!["node-serve".into()],
    })
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get().to_string())
        .unwrap_or_else(|_| "?".into());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .as_deref()
        .and_then(report::cpu_model)
        .unwrap_or_else(|| "unknown CPU".into());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("{}, {cpus} CPUs (nproc), {model}", report::utc_date(now))
}

fn run(opts: Opts, rt: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    let started = Instant::now();
    // Clients made here follow the metadata service from tasks on this runtime.
    let _in_runtime = rt.enter();
    let plan = Plan::new(&opts)?;
    let server = server_command(opts.server_bin.as_ref())?;
    let Plan {
        bs, size, chunk, ..
    } = plan;
    println!("DRS bench: {}", machine());
    println!("load average before: {}", report::loadavg());
    println!(
        "{NODES} nodes, {K}+{M}, {} blocks, {} of data in {} calls; nodes run {}{}",
        human(bs as u64),
        human(size as u64),
        human(chunk as u64),
        server.program.display(),
        if server.prefix.is_empty() {
            String::new()
        } else {
            format!(" {}", server.prefix.join(" "))
        }
    );
    let mut rows = Vec::new();
    let mut warnings: Vec<String> = Vec::new();

    // Row 1, before any node runs.
    let e = memory::encode_vs_memcpy(K, M, bs, plan.encode_working_set, plan.encode_total, 3)?;
    let row = Row {
        name: format!("encode {K}+{M}, {} blocks", human(bs as u64)),
        unit: Unit::MiBs,
        drs: mib_per_s(e.bytes, e.encode),
        baseline_name: "memcpy".into(),
        baseline: mib_per_s(e.bytes, e.memcpy),
        scale: 1.0,
        target: Some(0.5),
    };
    println!(
        "[1] encode: {} of data in {:.3} s ({:.0} MiB/s); memcpy {:.3} s ({:.0} MiB/s); best of 3, working set {}",
        human(e.bytes),
        e.encode.as_secs_f64(),
        row.drs,
        e.memcpy.as_secs_f64(),
        row.baseline,
        human(plan.encode_working_set as u64)
    );
    rows.push(row);

    let base = opts.dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!(
        "drs-bench-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let spec = ClusterSpec {
        nodes: NODES,
        k: K as u8,
        m: M as u8,
        block_size: u32::try_from(bs).context("block size too large")?,
        blocks: (size / bs) as u64,
        min_write: None,
        ..ClusterSpec::default()
    };
    // Nodes restart only between phases, with no write in flight: a short settle is
    // safe.
    let options = NodeOptions {
        settle_ms: 500,
        ..NodeOptions::default()
    };
    let local = Arc::new(
        LocalCluster::create(&dir.join("cluster"), &spec, server, options)
            .context("create the local cluster")?,
    );
    let _teardown = Teardown {
        local: Arc::clone(&local),
        dir: dir.clone(),
        remove: !opts.keep,
    };
    {
        // Ctrl-C and SIGTERM reach only this process (the nodes have their own
        // process group).
        let local = Arc::clone(&local);
        let dir = dir.clone();
        let keep = opts.keep;
        rt.spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let Ok(mut term) = signal(SignalKind::terminate()) else {
                return;
            };
            let stop = tokio::select! {
                r = tokio::signal::ctrl_c() => r.is_ok(),
                r = term.recv() => r.is_some(),
            };
            if stop {
                eprintln!("bench: interrupted; stopping the nodes");
                let _ = local.down(Duration::from_secs(5));
                if !keep {
                    let _ = std::fs::remove_dir_all(&dir);
                }
                std::process::exit(130);
            }
        });
    }
    println!("directory: {}", dir.display());
    local.start_all(true)?;
    rt.block_on(local.wait_up(&local.node_ids(), Duration::from_secs(30)))
        .context("start the nodes")?;
    let mut cfg = ClientConfig::default();
    if let Some(n) = opts.stripes_in_flight {
        cfg.stripes_in_flight = n.max(1);
    }
    let client = local.client(cfg.clone())?;
    let ids = local.node_ids();

    let mut data = vec![0u8; size];
    rand::thread_rng().fill_bytes(&mut data);
    let file = dir.join("local-baseline.dat");

    // Row 2.
    let cpu = Cpu::now(&local);
    let local_w = local_file::sequential_write(&file, &data, chunk)?;
    let local_cpu = cpu.since(&local);
    let before = rt.block_on(node_stats(&client, &ids));
    let cpu = Cpu::now(&local);
    let drs_w = rt.block_on(drs::sequential_write(&client, &data, chunk))?;
    let drs_cpu = cpu.since(&local);
    let after = rt.block_on(node_stats(&client, &ids));
    let scale = K as f64 / (K + M) as f64;
    let row = Row {
        name: "sequential write".into(),
        unit: Unit::MiBs,
        drs: mib_per_s(size as u64, drs_w),
        baseline_name: format!("local write+fdatasync x {K}/{}", K + M),
        baseline: mib_per_s(size as u64, local_w),
        scale,
        target: Some(0.6),
    };
    println!(
        "[2] write: DRS {:.2} s ({:.1} MiB/s); local file {:.2} s ({:.1} MiB/s, x {K}/{} = {:.1}); nodes: {}",
        drs_w.as_secs_f64(),
        row.drs,
        local_w.as_secs_f64(),
        row.baseline,
        K + M,
        row.compared(),
        stats_delta(&before, &after)
    );
    println!("    DRS {drs_cpu}\n    local {local_cpu}");
    rows.push(row);

    // Row 3.
    let passes = plan.passes;
    let read_bytes = (size * passes) as u64;
    let cpu = Cpu::now(&local);
    let healthy_r = rt.block_on(drs::sequential_read(
        &client,
        &data,
        chunk,
        passes,
        "healthy read",
    ))?;
    let healthy = healthy_r.took;
    let drs_cpu = cpu.since(&local);
    let cpu = Cpu::now(&local);
    let local_r = local_file::sequential_read(&file, &data, chunk, passes)?;
    let local_cpu = cpu.since(&local);
    let healthy_mibs = mib_per_s(read_bytes, healthy);
    let row = Row {
        name: "sequential read".into(),
        unit: Unit::MiBs,
        drs: healthy_mibs,
        baseline_name: "local file read (page cache)".into(),
        baseline: mib_per_s(read_bytes, local_r),
        scale: 1.0,
        target: None,
    };
    println!(
        "[3] read, {passes} pass(es): DRS {:.2} s ({:.1} MiB/s); local file {:.2} s ({:.1} MiB/s)",
        healthy.as_secs_f64(),
        row.drs,
        local_r.as_secs_f64(),
        row.baseline
    );
    println!("    DRS {drs_cpu} (includes verifying)\n    local {local_cpu} (includes verifying)");
    read_failures(&healthy_r, &row.name, &mut warnings);
    rows.push(row);

    // Row 4.
    for (n, victim) in VICTIMS.iter().enumerate() {
        local.kill(*victim)?;
        let killed = &VICTIMS[..=n];
        let s0 = client_stats(&client);
        let cpu = Cpu::now(&local);
        let r = rt.block_on(drs::sequential_read(
            &client,
            &data,
            chunk,
            passes,
            &format!("read with {} nodes killed", n + 1),
        ))?;
        let t = r.took;
        let drs_cpu = cpu.since(&local);
        let s1 = client_stats(&client);
        let row = Row {
            name: format!(
                "degraded read, {} node{} killed",
                n + 1,
                if n == 0 { "" } else { "s" }
            ),
            unit: Unit::MiBs,
            drs: mib_per_s(read_bytes, t),
            baseline_name: "healthy DRS read".into(),
            baseline: healthy_mibs,
            scale: 1.0,
            target: Some(0.5),
        };
        println!(
            "[4] read with node{} {killed:?} SIGKILLed: {:.2} s ({:.1} MiB/s); {} of {} block reads degraded, {} decoded",
            if n == 0 { "" } else { "s" },
            t.as_secs_f64(),
            row.drs,
            s1.0 - s0.0,
            read_bytes / bs as u64,
            s1.1 - s0.1
        );
        println!("    DRS {drs_cpu} (includes verifying)");
        read_failures(&r, &row.name, &mut warnings);
        rows.push(row);
    }
    let t = Instant::now();
    for v in VICTIMS {
        local.start(v, false)?;
    }
    rt.block_on(local.wait_up(&VICTIMS, Duration::from_secs(120)))
        .context("restart the killed nodes")?;
    println!(
        "    restarted nodes {VICTIMS:?}: up again in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // Row 5.
    let blocks = (size / bs) as u64;
    let cpu = Cpu::now(&local);
    let lr = local_file::random_write(&file, blocks, bs, IO, opts.concurrency, plan.random)?;
    let local_cpu = cpu.since(&local);
    // Each task is its own client, or with --shared-client they all share one (locks
    // are owned per write, so they still exclude each other).
    let clients: Vec<Client> = if opts.shared_client {
        vec![client.clone(); opts.concurrency.max(1)]
    } else {
        (0..opts.concurrency.max(1))
            .map(|_| local.client(cfg.clone()))
            .collect::<Result<_, _>>()?
    };
    let lock_retries = |cs: &[Client]| -> u64 {
        let mut seen = std::collections::HashSet::new();
        cs.iter()
            .filter(|c| seen.insert(c.id()))
            .map(|c| {
                c.stats()
                    .lock_retries
                    .load(std::sync::atomic::Ordering::Relaxed)
            })
            .sum()
    };
    let retries0 = lock_retries(&clients);
    let before = rt.block_on(node_stats(&client, &ids));
    let cpu = Cpu::now(&local);
    let dr = rt.block_on(drs::random_overwrite(
        clients.clone(),
        blocks,
        IO,
        plan.random,
    ))?;
    let drs_cpu = cpu.since(&local);
    let after = rt.block_on(node_stats(&client, &ids));
    let retries = lock_retries(&clients) - retries0;
    let row = Row {
        name: format!(
            "random {} KiB overwrite, {} tasks",
            IO / 1024,
            opts.concurrency
        ),
        unit: Unit::Iops,
        drs: per_s(dr.ops, dr.elapsed),
        baseline_name: "local pwrite+fdatasync".into(),
        baseline: per_s(lr.ops, lr.elapsed),
        scale: 1.0,
        target: None,
    };
    println!(
        "[5] random {} KiB writes: DRS {} in {:.1} s ({:.0} IOPS; latency p50 {:.2} ms, p99 {:.2} ms; {retries} lock retries); local {} in {:.1} s ({:.0} IOPS); nodes: {}",
        IO / 1024,
        dr.ops,
        dr.elapsed.as_secs_f64(),
        row.drs,
        ms(percentile(&dr.latencies, 50.0)),
        ms(percentile(&dr.latencies, 99.0)),
        lr.ops,
        lr.elapsed.as_secs_f64(),
        row.baseline,
        stats_delta(&before, &after)
    );
    println!("    DRS {drs_cpu}\n    local {local_cpu}");
    rows.push(row);
    if dr.failed > 0 {
        println!(
            "    {} DRS writes FAILED; first: {}",
            dr.failed,
            dr.first_error.as_deref().unwrap_or("?")
        );
    }
    // The numbers mean little if the writes left the stripes inconsistent.
    let (line, clean) = rt.block_on(drs::check_consistency(&client));
    println!("    {line}");
    if dr.failed > 0 || !clean {
        bail!("the random-write phase failed or left the volume inconsistent (see above)");
    }

    // Row 6.
    let clients::LockTimes {
        locks,
        pings,
        fanned,
    } = rt.block_on(clients::lock_vs_ping(&client, 1000))?;
    for pct in [50.0, 99.0] {
        rows.push(Row {
            name: format!("lock + unlock of a block (p{pct:.0})"),
            unit: Unit::Ms,
            drs: ms(percentile(&locks, pct)),
            baseline_name: "ping round trip".into(),
            baseline: ms(percentile(&pings, pct)),
            scale: 1.0,
            // At most 3 times the ping.
            target: Some(1.0 / 3.0),
        });
    }
    println!(
        "[6] lock + unlock (a round to the {} members, then the unlocks sent): p50 {:.3} ms, p99 {:.3} ms; ping of one member: p50 {:.3} ms, p99 {:.3} ms; ping of all {} at once: p50 {:.3} ms, p99 {:.3} ms ({} each)",
        K + M,
        ms(percentile(&locks, 50.0)),
        ms(percentile(&locks, 99.0)),
        ms(percentile(&pings, 50.0)),
        ms(percentile(&pings, 99.0)),
        K + M,
        ms(percentile(&fanned, 50.0)),
        ms(percentile(&fanned, 99.0)),
        locks.len()
    );

    // Row 7.
    let (cached, direct) =
        rt.block_on(clients::load_cached_vs_direct(&local, blocks, plan.random))?;
    let row = Row {
        name: "load, 4 clients, cache group of 2".into(),
        unit: Unit::Iops,
        drs: cached.ops_per_sec(),
        baseline_name: "the same load writing directly".into(),
        baseline: direct.ops_per_sec(),
        scale: 1.0,
        target: None,
    };
    println!(
        "[7] load (4 clients, half writes, {} blocks, verified): cached with a group of 2, flushed every 16 writes: {} ops in {:.1} s ({:.0}/s); direct: {} ops ({:.0}/s)",
        blocks.min(1024),
        cached.writes + cached.reads,
        cached.elapsed.as_secs_f64(),
        row.drs,
        direct.writes + direct.reads,
        row.baseline
    );
    rows.push(row);

    // Row 8.
    let lease = Duration::from_secs(1);
    let freed = rt.block_on(clients::locks_freed_after_kill(
        &client,
        &dir.join("cluster").join("cluster.toml"),
        lease,
        3,
    ))?;
    let row = Row {
        name: "SIGKILLed client's lock freed after".into(),
        unit: Unit::Ms,
        drs: ms(freed),
        baseline_name: "its lease".into(),
        baseline: ms(lease),
        scale: 1.0,
        target: Some(0.5),
    };
    println!(
        "[8] a client holding a lock SIGKILLed: free at every member after {:.0} ms (median of 3; lease {:.0} ms)",
        row.drs, row.baseline
    );
    rows.push(row);

    // Rows 9 and 10: a node replaced by an empty one under a foreground read. The
    // random writes of row 5 changed the data: write the known bytes again first.
    rt.block_on(drs::sequential_write(&client, &data, chunk))?;
    let victim = *ids.last().context("no nodes")?;
    let map_path = dir.join("cluster").join("cluster.toml");
    let mut again = LocalCluster::open(
        &map_path,
        server_command(opts.server_bin.as_ref())?,
        local.options.clone(),
    )?;
    let meta =
        drs_meta::MetaClient::for_map(&local.map, &local.key).context("no metadata service")?;
    let reader = local.client(cfg.clone())?;
    let t0 = Instant::now();
    let new_addr = rt.block_on(again.replace(victim, None))?;
    let cpu = Cpu::now(&again);
    // The foreground reads from the replacement until the node is up; row 10 counts
    // what it read while the rebuild ran (after the settle wait).
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let fg = {
        let (data, stop) = (data.clone(), Arc::clone(&stop));
        rt.spawn(
            async move { drs::read_until(&reader, &data, chunk, &stop, "during rebuild").await },
        )
    };
    // The rebuild's start: when the new node first reports a block verified (it
    // registers, waits for the other members to learn its epoch, and settles first).
    let prober = local.client(cfg.clone())?;
    let mut first_progress: Option<Duration> = None;
    let rebuilt = rt.block_on(async {
        loop {
            if first_progress.is_none() {
                if let Ok((Response::Pong(info), _)) = prober
                    .call(victim, &Request::Ping, Default::default())
                    .await
                {
                    if let drs_proto::NodeState::Recovering { verified, .. } = info.state {
                        if verified > 0 {
                            first_progress = Some(t0.elapsed());
                        }
                    }
                }
            }
            if let Ok(st) = meta.read().await {
                if st
                    .nodes
                    .get(&victim)
                    .is_some_and(|r| r.addr == new_addr && r.state == drs_meta::NodeState::Up)
                {
                    return Ok(t0.elapsed());
                }
            }
            if t0.elapsed() > Duration::from_secs(600) {
                anyhow::bail!("the replacement of node {victim} was not up within 600 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })?;
    stop.store(true, std::sync::atomic::Ordering::Release);
    let rebuild_cpu = cpu.since(&again);
    let (fg, fg_done) = rt.block_on(fg)??;
    read_failures(&fg, "read during a rebuild", &mut warnings);
    let fresh = local.client(cfg.clone())?;
    let restored = rt.block_on(async {
        for _ in 0..50 {
            if let Some(s) = node_stats(&fresh, &[victim]).await.first() {
                return Ok(s.repairs_installed * bs as u64);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!("the replacement of node {victim} does not answer")
    })?;
    // What comes before the rebuild (registration, the epoch wait, the settle) is
    // not rebuild time: it starts at the first block verified or, if the node was
    // never seen rebuilding, after the settle.
    let settle = Duration::from_millis(local.options.settle_ms);
    let rebuild_from = first_progress.unwrap_or(settle).min(rebuilt);
    let rebuild_time = rebuilt
        .saturating_sub(rebuild_from)
        .max(Duration::from_millis(1));
    let row = Row {
        name: "rebuild of a replaced node".into(),
        unit: Unit::MiBs,
        drs: mib_per_s(restored, rebuild_time),
        baseline_name: format!("local file read / (k+1) = /{}", K + 1),
        baseline: mib_per_s(read_bytes, local_r),
        scale: 1.0 / (K + 1) as f64,
        target: Some(0.5),
    };
    println!(
        "[9] node {victim} replaced by an empty node: {} rebuilt in {:.2} s, from {:.2} s after the replacement ({}) until it was up ({:.1} MiB/s); local read {:.1} MiB/s / {}",
        human(restored),
        rebuild_time.as_secs_f64(),
        rebuild_from.as_secs_f64(),
        if first_progress.is_some() { "its first block verified" } else { "the settle" },
        row.drs,
        row.baseline,
        K + 1
    );
    println!(
        "    from the replacement until it is up (the foreground read included): {rebuild_cpu}"
    );
    rows.push(row);
    let window = (t0 + rebuild_from, t0 + rebuilt);
    let fg_bytes: u64 = fg_done
        .iter()
        .filter(|(at, _)| *at > window.0 && *at <= window.1)
        .map(|(_, n)| n)
        .sum();
    let row = Row {
        name: "sequential read during the rebuild".into(),
        unit: Unit::MiBs,
        drs: mib_per_s(fg_bytes, rebuild_time),
        baseline_name: "healthy sequential read".into(),
        baseline: healthy_mibs,
        scale: 1.0,
        target: Some(0.5),
    };
    println!(
        "[10] reads from the replacement until the node was up: {} read during the {:.2} s of the rebuild ({:.1} MiB/s; healthy {:.1} MiB/s)",
        human(fg_bytes),
        rebuild_time.as_secs_f64(),
        row.drs,
        row.baseline
    );
    rows.push(row);

    // Rows 12 and 13: the file system, healthy.
    rt.block_on(local.wait_up(&ids, Duration::from_secs(60)))
        .context("nodes up before the file system rows")?;
    fuse_rows(&local, &client, &data, &dir, rt, &mut rows)?;

    // Row 11: a SIGKILLed node marked down in the clients' map; first a node that
    // does not host the metadata leader, then the one that does (a new leader must
    // be elected before anyone can mark it down). Five replicas on six nodes keep a
    // quorum with both gone.
    let down_after = Duration::from_millis(local.options.down_after_ms);
    let watcher = local.client(cfg.clone())?;
    let leader_host = rt.block_on(async {
        for r in &local.map.meta {
            if let Ok(st) = meta.status_of(r.addr).await {
                let leader = st.leader?;
                return local.map.meta.iter().find(|r| r.id == leader)?.host;
            }
        }
        None
    });
    let plain = ids
        .iter()
        .copied()
        .find(|id| Some(*id) != leader_host)
        .context("no node")?;
    let mut victims = vec![(
        plain,
        "not the metadata leader's host",
        "SIGKILLed node down in clients' map after",
    )];
    if let Some(l) = leader_host {
        victims.push((
            l,
            "the metadata leader's host",
            "SIGKILLed leader host down in map after",
        ));
    }
    for (victim, what, name) in victims {
        local.kill(victim)?;
        let t0 = Instant::now();
        let routed = rt.block_on(async {
            while watcher.map().node_state(victim) != drs_proto::MemberState::Down {
                if t0.elapsed() > Duration::from_secs(60) {
                    anyhow::bail!(
                        "node {victim} never marked down in the client's map (epoch {}, {:?})",
                        watcher.map().epoch,
                        watcher
                            .map()
                            .nodes
                            .iter()
                            .map(|n| (n.id, n.state))
                            .collect::<Vec<_>>()
                    );
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok(t0.elapsed())
        })?;
        let row = Row {
            name: name.into(),
            unit: Unit::Ms,
            drs: ms(routed),
            baseline_name: "the failure detector's timeout".into(),
            baseline: ms(down_after),
            scale: 1.0,
            target: Some(0.67),
        };
        println!(
            "[11] node {victim} ({what}) SIGKILLed: down in a client's map after {:.0} ms (timeout {:.0} ms); from then on no request waits on it",
            row.drs, row.baseline
        );
        rows.push(row);
    }

    println!(
        "load average after: {}; bench ran {:.0} s",
        report::loadavg(),
        started.elapsed().as_secs_f64()
    );
    println!();
    print!("{}", report::format_table(&rows));
    let missed: Vec<&str> = rows
        .iter()
        .filter(|r| r.met() == Some(false))
        .map(|r| r.name.as_str())
        .collect();
    if missed.is_empty() {
        println!("all targets met");
    } else {
        println!("targets missed: {}", missed.join(", "));
    }
    for w in &warnings {
        println!("warning: {w}");
    }
    Ok(())
}

/// Rows 12 and 13: 1 MiB sequential write and read of half the volume through the FUSE
/// mount, through the library, in a local directory and through bindfs over it. Row
/// 14: [`SMALL_WRITES_BYTES`] in 4 KiB writes through a mount, with its write-back
/// cache and with `-o write_through`. Row 15: [`SMALL_FILES`] small files created
/// and read back, on a mount and in the local directory. Row 16: [`LOCK_ROUNDS`]
/// byte-range locks and unlocks, beside chmods.
/// Bytes row 14 writes in 4 KiB writes.
const SMALL_WRITES_BYTES: usize = 4 << 20;
/// Files row 15 creates and reads back, and the bytes of each.
const SMALL_FILES: usize = 200;
const SMALL_FILE_BYTES: usize = 4096;
/// Rounds of row 16: a byte-range lock and its unlock, and a chmod.
const LOCK_ROUNDS: usize = 100;

fn fuse_rows(
    local: &LocalCluster,
    client: &Client,
    data: &[u8],
    dir: &std::path::Path,
    rt: &tokio::runtime::Runtime,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    // Half the volume: the file system needs no more room than it has.
    let stripe = K * client.block_size();
    let len = (data.len() / 2 / stripe).max(1) * stripe;
    let data = &data[..len.min(data.len())];
    let bytes = data.len() as u64;
    let plain = dir.join("plain");
    std::fs::create_dir_all(&plain)?;
    let local_w = fuse::sequential_write(&plain.join("f"), data)?;
    fuse::drop_cache(&plain.join("f"))?;
    let local_r = fuse::sequential_read(&plain.join("f"), data)?;
    let bind = fuse::Mount::bindfs(&plain, &dir.join("bindfs"))?;
    let bind_wr = match &bind {
        Some(b) => {
            let w = fuse::sequential_write(&b.path.join("g"), data)?;
            fuse::drop_cache(&plain.join("g"))?;
            let r = fuse::sequential_read(&b.path.join("g"), data)?;
            Some((w, r))
        }
        None => None,
    };
    drop(bind);
    // The library's side just before the mount's, each after a sync: neither pays
    // for the local rows' dirty pages still going to the same disk.
    nix::unistd::sync();
    let lib_w = rt.block_on(drs::sequential_write(client, data, fuse::IO))?;
    let lib_r = rt.block_on(drs::sequential_read(
        client,
        data,
        fuse::IO,
        1,
        "1 MiB read",
    ))?;
    nix::unistd::sync();
    // Each mount is new: nothing of a file in its page cache.
    let mount = |write_through: bool| {
        fuse::Mount::drs(
            &local.map_path,
            &dir.join("mnt"),
            &dir.join("mnt.log"),
            write_through,
        )
    };
    let fuse_w = fuse::sequential_write(&mount(false)?.path.join("big"), data)?;
    let fuse_r = fuse::sequential_read(&mount(false)?.path.join("big"), data)?;
    // Row 14: 4 KiB writes, each mount's file read back and checked.
    let small = &data[..SMALL_WRITES_BYTES.min(data.len())];
    let small_write = |write_through: bool, name: &str| -> anyhow::Result<Duration> {
        let m = mount(write_through)?;
        let took = fuse::sequential_write_in(&m.path.join(name), small, 4096)?;
        fuse::sequential_read(&m.path.join(name), small)?;
        Ok(took)
    };
    let cached_w = small_write(false, "small")?;
    let through_w = small_write(true, "small-through")?;
    // Row 15: small files, each a create, a write and a close (a session's open and
    // close registered with the metadata service), then read back.
    let content = &data[..SMALL_FILE_BYTES.min(data.len())];
    let files_drs = {
        // Each small file takes a whole block: the earlier rows' files go first.
        let m = mount(false)?;
        for f in ["big", "small", "small-through"] {
            std::fs::remove_file(m.path.join(f)).with_context(|| format!("remove {f}"))?;
        }
        fuse::small_files(&m.path.join("small-files"), SMALL_FILES, content)?
    };
    let files_local = fuse::small_files(&plain.join("small-files"), SMALL_FILES, content)?;
    // Row 16: a byte-range lock and its unlock, beside a chmod (one metadata
    // commit) on the same mount, and both on the local directory.
    let locks_drs = fuse::lock_rounds(&mount(false)?.path.join("locked"), LOCK_ROUNDS)?;
    let locks_local = fuse::lock_rounds(&plain.join("locked"), LOCK_ROUNDS)?;
    let show = |d: Duration| mib_per_s(bytes, d);
    let others = |w: bool| {
        let (l, b) = if w {
            (local_w, bind_wr.map(|x| x.0))
        } else {
            (local_r, bind_wr.map(|x| x.1))
        };
        format!(
            "local directory {:.1} MiB/s, bindfs over it {}",
            show(l),
            b.map(|b| format!("{:.1} MiB/s", show(b)))
                .unwrap_or_else(|| "not installed (apt-get install bindfs)".into())
        )
    };
    let row = Row {
        name: "FUSE sequential write 1 MiB".into(),
        unit: Unit::MiBs,
        drs: show(fuse_w),
        baseline_name: "library write_blocks 1 MiB".into(),
        baseline: show(lib_w),
        scale: 1.0,
        target: Some(0.7),
    };
    println!(
        "[12] write {} in 1 MiB writes + fsync: FUSE {:.1} MiB/s, library {:.1} MiB/s; {}",
        human(bytes),
        row.drs,
        row.baseline,
        others(true)
    );
    rows.push(row);
    let row = Row {
        name: "FUSE sequential read 1 MiB".into(),
        unit: Unit::MiBs,
        drs: show(fuse_r),
        baseline_name: "library read_blocks 1 MiB".into(),
        baseline: show(lib_r.took),
        scale: 1.0,
        target: Some(0.7),
    };
    println!(
        "[13] read it in 1 MiB reads: FUSE (fresh mount) {:.1} MiB/s, library {:.1} MiB/s; {} (page cache dropped)",
        row.drs,
        row.baseline,
        others(false)
    );
    rows.push(row);
    let small_bytes = small.len() as u64;
    let row = Row {
        name: "FUSE 4 KiB writes, write-back cache".into(),
        unit: Unit::MiBs,
        drs: mib_per_s(small_bytes, cached_w),
        baseline_name: "the same, -o write_through".into(),
        baseline: mib_per_s(small_bytes, through_w),
        scale: 1.0,
        target: Some(2.0),
    };
    println!(
        "[14] write {} in 4 KiB writes + fsync: FUSE {:.2} MiB/s, with -o write_through {:.2} MiB/s",
        human(small_bytes),
        row.drs,
        row.baseline,
    );
    rows.push(row);
    let per_s = |d: Duration| SMALL_FILES as f64 / d.as_secs_f64().max(1e-9);
    let row = Row {
        name: "FUSE small files created".into(),
        unit: Unit::Files,
        drs: per_s(files_drs.0),
        baseline_name: "local directory".into(),
        baseline: per_s(files_local.0),
        scale: 1.0,
        target: None,
    };
    println!(
        "[15] {SMALL_FILES} files of {} created, written and closed: FUSE {:.0} files/s, local directory {:.0} files/s; read back: FUSE {:.0} files/s, local {:.0} files/s",
        human(content.len() as u64),
        row.drs,
        row.baseline,
        per_s(files_drs.1),
        per_s(files_local.1),
    );
    rows.push(row);
    let p50 = |v: &[Duration]| ms(percentile(v, 50.0));
    let p99 = |v: &[Duration]| ms(percentile(v, 99.0));
    let row = Row {
        name: "FUSE lock + unlock (p50)".into(),
        unit: Unit::Ms,
        drs: p50(&locks_drs.0),
        baseline_name: "FUSE chmod (one metadata commit)".into(),
        baseline: p50(&locks_drs.1),
        scale: 1.0,
        target: None,
    };
    println!(
        "[16] fcntl write lock + unlock of a file, {LOCK_ROUNDS} times: FUSE p50 {:.2} ms, p99 {:.2} ms; chmod on the mount p50 {:.2} ms, p99 {:.2} ms; local directory: lock + unlock p50 {:.3} ms, chmod p50 {:.3} ms",
        row.drs,
        p99(&locks_drs.0),
        row.baseline,
        p99(&locks_drs.1),
        p50(&locks_local.0),
        p50(&locks_local.1),
    );
    rows.push(row);
    Ok(())
}

/// CPU seconds so far: (this process, the running nodes), each (user, system), and
/// the whole machine's busy and total jiffies.
struct Cpu {
    bench: (f64, f64),
    nodes: (f64, f64),
    machine: (u64, u64),
    at: Instant,
}

impl Cpu {
    fn now(local: &LocalCluster) -> Cpu {
        let bench = report::cpu_secs(std::process::id());
        let nodes = local
            .node_ids()
            .into_iter()
            .filter_map(|id| local.pid(id))
            .map(report::cpu_secs)
            .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
        Cpu {
            bench,
            nodes,
            machine: report::machine_jiffies(),
            at: Instant::now(),
        }
    }

    /// Where the CPU went since `self`.
    fn since(&self, local: &LocalCluster) -> String {
        let now = Cpu::now(local);
        let d = |a: (f64, f64), b: (f64, f64)| ((b.0 - a.0).max(0.0), (b.1 - a.1).max(0.0));
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        report::cpu_line(
            d(self.bench, now.bench),
            d(self.nodes, now.nodes),
            now.at.duration_since(self.at).as_secs_f64(),
            cpus,
            report::ratio(
                now.machine.0.saturating_sub(self.machine.0) as f64,
                now.machine.1.saturating_sub(self.machine.1) as f64,
            ),
        )
    }
}

/// Says so (now, and in `warnings` for the end) when read_blocks calls of `row`
/// failed and had to be retried.
fn read_failures(r: &drs::ReadResult, row: &str, warnings: &mut Vec<String>) {
    if r.failed > 0 {
        let w = format!(
            "{row}: {} read_blocks call(s) FAILED and were retried (time included); first: {}",
            r.failed,
            r.first_error.as_deref().unwrap_or("?")
        );
        println!("    {w}");
        warnings.push(w);
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// (degraded reads, reconstructions) so far.
fn client_stats(c: &Client) -> (u64, u64) {
    use std::sync::atomic::Ordering::Relaxed;
    let s = c.stats();
    (
        s.degraded_reads.load(Relaxed),
        s.reconstructions.load(Relaxed),
    )
}

/// Every answering node's counters.
async fn node_stats(client: &Client, ids: &[NodeId]) -> Vec<NodeStats> {
    let mut out = Vec::new();
    for &id in ids {
        if let Ok((Response::Pong(info), _)) =
            client.call(id, &Request::Ping, Default::default()).await
        {
            out.push(info.stats);
        }
    }
    out
}

/// What the nodes did between two snapshots (summed over nodes).
fn stats_delta(before: &[NodeStats], after: &[NodeStats]) -> String {
    let sum = |v: &[NodeStats], f: fn(&NodeStats) -> u64| v.iter().map(f).sum::<u64>();
    let d = |f: fn(&NodeStats) -> u64| sum(after, f).saturating_sub(sum(before, f));
    format!(
        "{} updates, {} of deltas, {} fsyncs, {} locks granted, {} denied",
        d(|s| s.updates),
        human(d(|s| s.bytes_updated)),
        d(|s| s.fsyncs),
        d(|s| s.locks_granted),
        d(|s| s.locks_denied)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(args: &[&str]) -> Opts {
        Opts::parse_from(std::iter::once("bench").chain(args.iter().copied()))
    }

    #[test]
    fn default_plan() {
        let p = Plan::new(&opts(&[])).unwrap();
        assert_eq!(p.bs, 64 << 10);
        assert_eq!(p.size, 256 << 20);
        assert_eq!(p.chunk, 16 << 20);
        assert_eq!(p.random, Duration::from_secs(15));
        assert_eq!(p.passes, 5);
    }

    #[test]
    fn quick_plan_is_small() {
        let p = Plan::new(&opts(&["--quick"])).unwrap();
        assert_eq!(p.size, 32 << 20);
        assert_eq!(p.chunk, 4 << 20);
        assert_eq!(p.random, Duration::from_secs(2));
        assert_eq!(p.passes, 1);
        let p = Plan::new(&opts(&["--quick", "--size", "1GiB"])).unwrap();
        assert_eq!(p.size, 1 << 30);
    }

    #[test]
    fn sizes_round_to_whole_stripes() {
        // 4 x 64 KiB = 256 KiB stripes.
        let p = Plan::new(&opts(&["--size", "1MiB", "--chunk", "300KiB"])).unwrap();
        assert_eq!(p.size, 1 << 20);
        assert_eq!(p.chunk, 256 << 10);
        let p = Plan::new(&opts(&["--size", "100KiB", "--chunk", "16MiB"])).unwrap();
        assert_eq!(p.size, 256 << 10);
        assert_eq!(p.chunk, 256 << 10);
        let p = Plan::new(&opts(&["--size", "1MiB", "--chunk", "1"])).unwrap();
        assert_eq!(p.chunk, 256 << 10);
        let p = Plan::new(&opts(&["--block-size", "4KiB", "--size", "20KiB"])).unwrap();
        assert_eq!((p.bs, p.size), (4096, 32 << 10));
    }

    #[test]
    fn bad_plans() {
        assert!(Plan::new(&opts(&["--size", "0"])).is_err());
        assert!(Plan::new(&opts(&["--block-size", "1000"])).is_err());
        assert!(Plan::new(&opts(&["--seconds", "0"])).is_err());
        assert!(Opts::try_parse_from(["bench", "--size", "lots"]).is_err());
    }

    #[test]
    fn stats_are_summed_over_nodes() {
        let s = |updates, fsyncs| NodeStats {
            updates,
            fsyncs,
            ..NodeStats::default()
        };
        let d = stats_delta(&[s(1, 2), s(3, 4)], &[s(11, 12), s(13, 24)]);
        assert!(d.starts_with("20 updates, 0 B of deltas, 30 fsyncs"), "{d}");
    }
}
