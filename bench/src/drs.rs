//! The DRS side of rows 2 to 5, through the client library.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use drs_client::Client;
use rand::Rng;

/// Writes `data` from block 0 on, `chunk` bytes per `write_blocks` call (a multiple
/// of a stripe's data, so every stripe is written whole). Returns the time taken.
pub async fn sequential_write(
    client: &Client,
    data: &[u8],
    chunk: usize,
) -> anyhow::Result<Duration> {
    let bs = client.block_size();
    let t = Instant::now();
    for (i, c) in data.chunks(chunk).enumerate() {
        let lba = (i * chunk / bs) as u64;
        client
            .write_blocks(lba, c)
            .await
            .with_context(|| format!("write_blocks of chunk {i} (block {lba})"))?;
    }
    Ok(t.elapsed())
}

/// What a sequential read did.
pub struct ReadResult {
    /// Time spent in `read_blocks` calls (retries included).
    pub took: Duration,
    /// `read_blocks` calls that failed (each was retried).
    pub failed: u64,
    pub first_error: Option<String>,
}

/// Tries of one `read_blocks` call before the bench gives up.
const READ_TRIES: usize = 3;

/// Reads everything back `passes` times, `chunk` bytes per `read_blocks` call, and
/// checks it equals `want`. Only the reads are timed. A failed call is counted and
/// retried (up to [`READ_TRIES`] tries), so that a read error is reported instead of
/// ending the run.
pub async fn sequential_read(
    client: &Client,
    want: &[u8],
    chunk: usize,
    passes: usize,
    phase: &str,
) -> anyhow::Result<ReadResult> {
    let mut out = ReadResult {
        took: Duration::ZERO,
        failed: 0,
        first_error: None,
    };
    for _ in 0..passes.max(1) {
        for (i, w) in want.chunks(chunk).enumerate() {
            read_chunk(client, i, chunk, w, phase, &mut out).await?;
        }
    }
    Ok(out)
}

/// Reads `want` over and over, as [`sequential_read`] does, until `stop` is set;
/// returns also when each chunk's read ended and its bytes, so that a caller can
/// count what was read within a window.
pub async fn read_until(
    client: &Client,
    want: &[u8],
    chunk: usize,
    stop: &std::sync::atomic::AtomicBool,
    phase: &str,
) -> anyhow::Result<(ReadResult, Vec<(Instant, u64)>)> {
    let mut out = ReadResult {
        took: Duration::ZERO,
        failed: 0,
        first_error: None,
    };
    let mut done = Vec::new();
    while !stop.load(std::sync::atomic::Ordering::Acquire) {
        for (i, w) in want.chunks(chunk).enumerate() {
            if stop.load(std::sync::atomic::Ordering::Acquire) {
                break;
            }
            read_chunk(client, i, chunk, w, phase, &mut out).await?;
            done.push((Instant::now(), w.len() as u64));
        }
    }
    Ok((out, done))
}

/// Reads chunk `i` (`w`, of `chunk`-byte chunks from block 0) with retries, checks
/// it, and adds its time and failures to `out`.
async fn read_chunk(
    client: &Client,
    i: usize,
    chunk: usize,
    w: &[u8],
    phase: &str,
    out: &mut ReadResult,
) -> anyhow::Result<()> {
    let bs = client.block_size();
    let lba = (i * chunk / bs) as u64;
    let mut tries = 0;
    let blocks = loop {
        tries += 1;
        let t = Instant::now();
        let r = client.read_blocks(lba, w.len().div_ceil(bs) as u64).await;
        out.took += t.elapsed();
        match r {
            Ok(b) => break b,
            Err(e) => {
                let msg = format!("read_blocks of chunk {i} (block {lba}): {e}");
                if tries >= READ_TRIES {
                    bail!("{phase}: {msg} ({tries} tries)");
                }
                out.failed += 1;
                out.first_error.get_or_insert(msg);
            }
        }
    };
    for (j, (got, exp)) in blocks.iter().zip(w.chunks(bs)).enumerate() {
        if got.get(..exp.len()) != Some(exp) {
            bail!(
                "{phase}: block {} differs from what was written",
                lba + j as u64
            );
        }
    }
    Ok(())
}

/// What a random-overwrite run did.
pub struct RandomResult {
    pub ops: u64,
    pub elapsed: Duration,
    /// Every successful operation's latency, sorted.
    pub latencies: Vec<Duration>,
    /// Writes that failed, and the first failure.
    pub failed: u64,
    pub first_error: Option<String>,
}

/// One task per client in `clients`; each overwrites `io` bytes at a random
/// `io`-aligned offset of a random block in `0..blocks` (`client.write`), until
/// `duration` has passed. Failed writes are counted, not retried.
pub async fn random_overwrite(
    clients: Vec<Client>,
    blocks: u64,
    io: usize,
    duration: Duration,
) -> anyhow::Result<RandomResult> {
    let start = Instant::now();
    let deadline = start + duration;
    let handles: Vec<_> = clients
        .into_iter()
        .map(|client| {
            tokio::spawn(async move {
                let slots = (client.block_size() / io).max(1);
                let mut lat = Vec::new();
                let mut failed = 0u64;
                let mut first_error = None;
                let mut buf = vec![0u8; io];
                while Instant::now() < deadline {
                    let (lba, off) = {
                        let mut rng = rand::thread_rng();
                        rng.fill(&mut buf[..]);
                        (rng.gen_range(0..blocks), rng.gen_range(0..slots) * io)
                    };
                    let t = Instant::now();
                    match client.write(lba, off, &buf).await {
                        Ok(()) => lat.push(t.elapsed()),
                        Err(e) => {
                            failed += 1;
                            first_error.get_or_insert_with(|| {
                                format!("write of {io} bytes at block {lba} + {off}: {e}")
                            });
                        }
                    }
                }
                (lat, failed, first_error)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut failed = 0;
    let mut first_error = None;
    for h in handles {
        let (lat, f, e) = h.await.context("a random-overwrite task panicked")?;
        latencies.extend(lat);
        failed += f;
        first_error = first_error.or(e);
    }
    let elapsed = start.elapsed();
    latencies.sort_unstable();
    Ok(RandomResult {
        ops: latencies.len() as u64,
        elapsed,
        latencies,
        failed,
        first_error,
    })
}

/// Checks every stripe (checksums, versions, parity equations) without repairing;
/// returns a line for the report, and whether the stripes are all consistent.
pub async fn check_consistency(client: &Client) -> (String, bool) {
    let opts = drs_client::ScrubOptions {
        repair: false,
        ..drs_client::ScrubOptions::default()
    };
    let r = client.scrub(&opts, &|_, _| {}).await;
    let clean = r.found.is_empty() && r.unrecoverable.is_empty() && r.degraded.is_empty();
    let mut line = format!(
        "scrub (no repair): {} stripes, {} healthy, {} wrong, {} unrecoverable, {} not checked",
        r.stripes,
        r.healthy,
        r.found.len(),
        r.unrecoverable.len(),
        r.degraded.len()
    );
    if let Some(f) = r
        .found
        .first()
        .or(r.unrecoverable.first())
        .or(r.degraded.first())
    {
        line.push_str(&format!("; first: {f}"));
    }
    (line, clean)
}
