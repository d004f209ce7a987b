//! `drs-cli demo`: the whole promise in one run, on this machine.
//!
//! Starts a 6-node 4+2 cluster in a temporary directory, writes random data, reads it
//! back, SIGKILLs m = 2 nodes, reads everything back again (degraded) and verifies it
//! byte for byte, overwrites part of it while the nodes are dead, restarts them (they
//! rebuild what they missed), verifies everything once more, scrubs, and shuts down.

use crate::out::say;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use drs_client::{Client, ClientConfig, ScrubOptions};
use drs_local::{ClusterSpec, LocalCluster, NodeOptions};
use rand::{RngCore, SeedableRng};

use drs_local::size::{human, parse_size};

/// Bytes written or read per client call.
const CHUNK: usize = 16 << 20;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// How much random data to write.
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    pub size: u64,
    /// Block size.
    #[arg(long, default_value = "64KiB", value_parser = parse_size)]
    pub block_size: u64,
    /// Directory for the cluster (default: a new one under the temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Keep the cluster directory afterwards.
    #[arg(long)]
    pub keep: bool,
    /// Seed of the random data (default: random).
    #[arg(long)]
    pub seed: Option<u64>,
}

/// Stops the cluster (and removes its directory) however the demo ends.
struct Teardown<'a> {
    local: &'a LocalCluster,
    remove: bool,
}

impl Drop for Teardown<'_> {
    fn drop(&mut self) {
        let _ = self.local.down(Duration::from_secs(10));
        if self.remove {
            let _ = std::fs::remove_dir_all(&self.local.dir);
        }
    }
}

/// The random bytes of chunk `i` for `seed`.
fn chunk_data(seed: u64, i: usize, len: usize) -> Vec<u8> {
    let mut rng =
        rand::rngs::StdRng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i as u64);
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

struct Row {
    phase: String,
    bytes: u64,
    secs: f64,
}

impl Row {
    fn mib_s(&self) -> f64 {
        self.bytes as f64 / 1048576.0 / self.secs.max(1e-9)
    }
}

pub async fn run(a: DemoArgs) -> anyhow::Result<()> {
    let bs = usize::try_from(a.block_size).context("block size too large")?;
    let size = usize::try_from(a.size).context("size too large")?;
    if size == 0 {
        bail!("--size must be more than 0");
    }
    let seed = a.seed.unwrap_or_else(rand::random);
    let dir = a.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!(
            "drs-demo-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ))
    });
    let spec = ClusterSpec {
        nodes: 6,
        k: 4,
        m: 2,
        block_size: u32::try_from(bs).context("block size too large")?,
        blocks: size.div_ceil(bs) as u64,
        min_write: None,
        ..ClusterSpec::default()
    };
    // No write is in flight while nodes restart here, so a short settle is safe.
    let options = NodeOptions {
        settle_ms: 1500,
        ..NodeOptions::default()
    };
    let local = LocalCluster::create(&dir, &spec, crate::server_command()?, options)?;
    let _teardown = Teardown {
        local: &local,
        remove: !a.keep,
    };
    say!(
        "DRS demo: 6 nodes, 4+2 Reed-Solomon, {} blocks, {} of random data (seed {seed})",
        human(bs as u64),
        human(size as u64)
    );
    say!("cluster directory: {}", local.dir.display());
    local.start_all(true)?;
    local
        .wait_up(&local.node_ids(), Duration::from_secs(30))
        .await
        .context("start the nodes")?;
    let client = local.client(ClientConfig::default())?;
    let chunks = size.div_ceil(CHUNK);
    let chunk_len = |i: usize| CHUNK.min(size - i * CHUNK);
    let mut rows = Vec::new();
    let mut seeds = vec![seed; chunks];

    let t = Instant::now();
    for (i, s) in seeds.iter().enumerate() {
        let data = chunk_data(*s, i, chunk_len(i));
        client
            .write_blocks((i * CHUNK / bs) as u64, &data)
            .await
            .with_context(|| format!("write chunk {i}"))?;
    }
    rows.push(Row {
        phase: "write (healthy)".into(),
        bytes: size as u64,
        secs: t.elapsed().as_secs_f64(),
    });
    say!("wrote {}", human(size as u64));

    rows.push(verify(&client, &seeds, size, bs, "read (healthy)").await?);
    say!("read back and verified every byte");

    let victims = [1u32, 4u32];
    for v in victims {
        local.kill(v)?;
    }
    say!("SIGKILLed nodes {} and {}", victims[0], victims[1]);
    rows.push(verify(&client, &seeds, size, bs, "read (2 nodes killed)").await?);
    say!("read back with 2 nodes dead and verified every byte");

    let over = chunks.div_ceil(8);
    let seed2 = seed.wrapping_add(1);
    let t = Instant::now();
    let mut over_bytes = 0;
    for (i, s) in seeds.iter_mut().enumerate().take(over) {
        *s = seed2;
        let data = chunk_data(seed2, i, chunk_len(i));
        client
            .write_blocks((i * CHUNK / bs) as u64, &data)
            .await
            .with_context(|| format!("overwrite chunk {i} with 2 nodes dead"))?;
        over_bytes += data.len() as u64;
    }
    rows.push(Row {
        phase: "overwrite (2 nodes killed)".into(),
        bytes: over_bytes,
        secs: t.elapsed().as_secs_f64(),
    });
    say!("overwrote {} with 2 nodes dead", human(over_bytes));

    let t = Instant::now();
    for v in victims {
        local.start(v, false)?;
    }
    local
        .wait_up(&victims, Duration::from_secs(120))
        .await
        .context("restart the killed nodes")?;
    say!(
        "restarted nodes {} and {}: they rebuilt what they missed in {:.1} s",
        victims[0],
        victims[1],
        t.elapsed().as_secs_f64()
    );

    rows.push(verify(&client, &seeds, size, bs, "read (after restart)").await?);
    say!("read back and verified every byte");

    let t = Instant::now();
    let report = crate::scrub::scrub_with_progress(&client, &ScrubOptions::default()).await;
    rows.push(Row {
        phase: "scrub".into(),
        bytes: report.bytes_read,
        secs: t.elapsed().as_secs_f64(),
    });
    crate::scrub::print_report(&report);
    if !report.unrecoverable.is_empty() || !report.degraded.is_empty() {
        bail!("scrub did not find the cluster clean");
    }

    say!("");
    say!(
        "{:<28} {:>10} {:>9} {:>10}",
        "phase",
        "MiB",
        "seconds",
        "MiB/s"
    );
    for r in &rows {
        say!(
            "{:<28} {:>10.1} {:>9.2} {:>10.1}",
            r.phase,
            r.bytes as f64 / 1048576.0,
            r.secs,
            r.mib_s()
        );
    }
    if let (Some(h), Some(d)) = (
        rows.iter().find(|r| r.phase == "read (healthy)"),
        rows.iter().find(|r| r.phase == "read (2 nodes killed)"),
    ) {
        say!("degraded read / healthy read: {:.2}", d.mib_s() / h.mib_s());
    }
    say!("demo passed: no byte lost");
    Ok(())
}

/// Reads everything back and compares it with what was written.
async fn verify(
    client: &Client,
    seeds: &[u64],
    size: usize,
    bs: usize,
    phase: &str,
) -> anyhow::Result<Row> {
    let t = Instant::now();
    for (i, seed) in seeds.iter().enumerate() {
        let len = CHUNK.min(size - i * CHUNK);
        let lba = (i * CHUNK / bs) as u64;
        let blocks = client
            .read_blocks(lba, len.div_ceil(bs) as u64)
            .await
            .with_context(|| format!("{phase}: read chunk {i}"))?;
        let want = chunk_data(*seed, i, len);
        for (j, b) in blocks.iter().enumerate() {
            let lo = j * bs;
            let hi = (lo + bs).min(len);
            if b[..hi - lo] != want[lo..hi] {
                bail!(
                    "{phase}: block {} differs from what was written",
                    lba + j as u64
                );
            }
        }
    }
    Ok(Row {
        phase: phase.into(),
        bytes: size as u64,
        secs: t.elapsed().as_secs_f64(),
    })
}
