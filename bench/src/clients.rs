//! Rows 6-8: the cost of the machinery for crash-faulty clients.
//!
//! 6. lock + unlock of one block (a round of parallel requests to the stripe's
//!    members, then the unlocks handed to their connections) vs a plain ping round
//!    trip to one of them, p50 and p99; a ping of all the members at once is shown
//!    beside them;
//! 7. the self-verifying load with write-back caches kept at a cache group of 2 nodes
//!    vs the same load writing directly;
//! 8. the time from SIGKILL of a client holding a lock until every member freed it vs
//!    the client's lease.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use drs_client::{Client, ClientConfig};
use drs_local::load::{self, LoadCache, LoadReport, LoadSpec};
use drs_local::LocalCluster;
use drs_proto::{ClusterMap, Request};

/// Latencies of row 6, each sorted.
pub struct LockTimes {
    /// Lock + unlock: until `unlock_stripe` returned.
    pub locks: Vec<Duration>,
    /// A ping of one member.
    pub pings: Vec<Duration>,
    /// A ping of every member of the stripe at once.
    pub fanned: Vec<Duration>,
}

/// Round trips of row 6. Each round starts once the last round's unlocks were
/// answered, so no measurement shares the machine with another's background work.
pub async fn lock_vs_ping(client: &Client, rounds: usize) -> anyhow::Result<LockTimes> {
    let geo = client.geometry().clone();
    let mut locks = Vec::with_capacity(rounds);
    let mut pings = Vec::with_capacity(rounds);
    let mut fanned = Vec::with_capacity(rounds);
    for r in 0..rounds {
        // Not `settle_unlocks`: its 50 ms polls would let every thread fall asleep.
        let until = Instant::now() + Duration::from_secs(5);
        while client.pending_unlocks() > 0 {
            if Instant::now() >= until {
                bail!("unlocks of the last round still unanswered after 5 s");
            }
            tokio::task::yield_now().await;
        }
        let stripe = (r as u64) % geo.stripes();
        let node = geo.member(stripe, 0);
        let t = Instant::now();
        client
            .call(node, &Request::Ping, bytes::Bytes::new())
            .await
            .context("ping")?;
        pings.push(t.elapsed());
        let t = Instant::now();
        let all = geo
            .members(stripe)
            .into_iter()
            .map(|n| client.call(n, &Request::Ping, bytes::Bytes::new()));
        for r in futures::future::join_all(all).await {
            r.context("ping")?;
        }
        fanned.push(t.elapsed());
        let t = Instant::now();
        let held = client
            .lock_stripe(stripe, &[(0, 0, 0)], rand::random())
            .await
            .context("lock")?;
        client.unlock_stripe(&held).await;
        locks.push(t.elapsed());
    }
    locks.sort();
    pings.sort();
    fanned.sort();
    Ok(LockTimes {
        locks,
        pings,
        fanned,
    })
}

/// Row 7: the load with caches and a group of 2, then writing directly.
pub async fn load_cached_vs_direct(
    local: &LocalCluster,
    blocks: u64,
    duration: Duration,
) -> anyhow::Result<(LoadReport, LoadReport)> {
    let clients = 4;
    let count = blocks.min(1024);
    // The load checks every block it reads names itself: clear what earlier rows wrote.
    let first = local.client(ClientConfig::default())?;
    let zeros = vec![0u8; count as usize * first.block_size()];
    first
        .write_blocks(0, &zeros)
        .await
        .context("clear the load's blocks")?;
    let spec = |cache| LoadSpec {
        clients,
        duration,
        write_ratio: 0.5,
        first: 0,
        count,
        verify: true,
        seed: 7,
        cache,
        journal: None,
    };
    let make = || -> anyhow::Result<Vec<Client>> {
        (0..clients)
            .map(|_| local.client(ClientConfig::default()).map_err(Into::into))
            .collect()
    };
    let cached = load::run(
        make()?,
        &spec(Some(LoadCache {
            group: 2,
            flush_every: 16,
        })),
    )
    .await;
    let direct = load::run(make()?, &spec(None)).await;
    for (what, r) in [("cached", &cached), ("direct", &direct)] {
        if !r.failures.is_empty() || r.write_errors + r.read_errors > 0 {
            bail!(
                "the {what} load failed: {:?} {:?}",
                r.failures.first(),
                r.errors.first()
            );
        }
    }
    Ok((cached, direct))
}

/// `bench client-hold CLUSTER_FILE LEASE_MS`: lock block 0 of stripe 0, say `held`,
/// and keep the lock (heartbeats and all) until killed.
pub fn hold(args: &[std::ffi::OsString]) -> anyhow::Result<()> {
    let (Some(file), Some(lease)) = (args.first(), args.get(1)) else {
        bail!("usage: bench client-hold CLUSTER_FILE LEASE_MS");
    };
    let lease: u64 = lease
        .to_str()
        .and_then(|s| s.parse().ok())
        .context("LEASE_MS must be a number")?;
    let map = ClusterMap::load(Path::new(file)).context("read the cluster file")?;
    let key = drs_proto::ClusterKey::for_cluster_file(Path::new(file))?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let cfg = ClientConfig {
            lease: Duration::from_millis(lease),
            key,
            ..ClientConfig::default()
        };
        let client = Client::new(map, 1, cfg)?;
        let _held = client
            .lock_stripe(0, &[(0, 0, 0)], rand::random())
            .await
            .context("lock")?;
        println!("held");
        std::future::pending::<()>().await;
        Ok(())
    })
}

/// Row 8: SIGKILL a client holding a lock (this binary's `client-hold`); the time
/// until no member holds a lock any more. Median of `runs`.
pub async fn locks_freed_after_kill(
    client: &Client,
    cluster_file: &Path,
    lease: Duration,
    runs: usize,
) -> anyhow::Result<Duration> {
    let exe = std::env::current_exe().context("find the bench executable")?;
    let mut took = Vec::new();
    for _ in 0..runs.max(1) {
        let mut child = Command::new(&exe)
            .arg("client-hold")
            .arg(cluster_file)
            .arg(lease.as_millis().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start a client")?;
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            let _ = BufReader::new(out).read_line(&mut line);
        }
        if line.trim() != "held" {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the client did not take its lock");
        }
        child.kill().context("SIGKILL the client")?;
        let _ = child.wait();
        let killed = Instant::now();
        loop {
            if client.status().await.locks.is_empty() {
                break;
            }
            if killed.elapsed() > lease * 10 + Duration::from_secs(10) {
                bail!("the killed client's lock is still held");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        took.push(killed.elapsed());
    }
    took.sort();
    Ok(took[took.len() / 2])
}
