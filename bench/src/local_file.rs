//! Baselines on one local file in the cluster's filesystem: the same bytes, the same
//! call sizes and the same durability as the DRS calls they are compared with.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rand::Rng;

/// Writes `data` to a new file at `path`, `chunk` bytes per write, each followed by
/// fdatasync (as each DRS call returns only when its blocks are durable). Returns the
/// time taken.
pub fn sequential_write(path: &Path, data: &[u8], chunk: usize) -> anyhow::Result<Duration> {
    let mut f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    let t = Instant::now();
    for c in data.chunks(chunk.max(1)) {
        f.write_all(c).context("write the local file")?;
        f.sync_data().context("fdatasync the local file")?;
    }
    Ok(t.elapsed())
}

/// Reads the file back `passes` times, `chunk` bytes per read, and checks it holds
/// `want`. Only the reads are timed.
pub fn sequential_read(
    path: &Path,
    want: &[u8],
    chunk: usize,
    passes: usize,
) -> anyhow::Result<Duration> {
    let mut buf = vec![0u8; chunk.max(1)];
    let mut took = Duration::ZERO;
    for _ in 0..passes.max(1) {
        let mut f = File::open(path).with_context(|| format!("open {}", path.display()))?;
        for (i, w) in want.chunks(chunk.max(1)).enumerate() {
            let t = Instant::now();
            f.read_exact(&mut buf[..w.len()])
                .context("read the local file")?;
            took += t.elapsed();
            if buf[..w.len()] != *w {
                bail!("local file chunk {i} differs from what was written");
            }
        }
    }
    Ok(took)
}

/// What a random-write run did.
pub struct RandomResult {
    pub ops: u64,
    pub elapsed: Duration,
}

/// `threads` threads each do pwrite of `io` bytes at a random `io`-aligned offset of
/// a random block (of `bs` bytes, `blocks` of them) of the file, then fdatasync, until
/// `duration` has passed (each thread writes at least once).
pub fn random_write(
    path: &Path,
    blocks: u64,
    bs: usize,
    io: usize,
    threads: usize,
    duration: Duration,
) -> anyhow::Result<RandomResult> {
    let f = Arc::new(
        OpenOptions::new()
            .write(true)
            .open(path)
            .with_context(|| format!("open {}", path.display()))?,
    );
    let ops = Arc::new(AtomicU64::new(0));
    let slots = (bs / io).max(1) as u64;
    let start = Instant::now();
    let deadline = start + duration;
    let handles: Vec<_> = (0..threads.max(1))
        .map(|_| {
            let f = Arc::clone(&f);
            let ops = Arc::clone(&ops);
            std::thread::spawn(move || -> std::io::Result<()> {
                let mut rng = rand::thread_rng();
                let mut buf = vec![0u8; io];
                // At least one write each, then until the deadline.
                loop {
                    rng.fill(&mut buf[..]);
                    let pos =
                        rng.gen_range(0..blocks) * bs as u64 + rng.gen_range(0..slots) * io as u64;
                    f.write_all_at(&buf, pos)?;
                    f.sync_data()?;
                    ops.fetch_add(1, Ordering::Relaxed);
                    if Instant::now() >= deadline {
                        return Ok(());
                    }
                }
            })
        })
        .collect();
    for h in handles {
        match h.join() {
            Ok(r) => r.context("random write to the local file")?,
            Err(_) => bail!("a local random-write thread panicked"),
        }
    }
    Ok(RandomResult {
        ops: ops.load(Ordering::Relaxed),
        elapsed: start.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!(
            "bench-test-{}-{:08x}-{name}",
            std::process::id(),
            rand::random::<u32>()
        ))
    }

    #[test]
    fn write_read_and_random_write_round_trip() {
        let p = temp_path("seq");
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        sequential_write(&p, &data, 30_000).unwrap();
        sequential_read(&p, &data, 30_000, 2).unwrap();
        let mut other = data.clone();
        other[99_999] ^= 1;
        assert!(sequential_read(&p, &other, 30_000, 1).is_err());
        let r = random_write(&p, 10, 8192, 4096, 2, Duration::from_millis(20)).unwrap();
        assert!(r.ops >= 2, "each thread writes at least once");
        // Random writes stay inside the blocks.
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 100_000);
        let _ = std::fs::remove_file(&p);
    }
}
