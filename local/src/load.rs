//! A self-verifying load: concurrent writers and readers, used by `drs-cli load`,
//! the tests and the benchmarks.
//!
//! Every block written holds a header naming itself (block number, writer, a global
//! write sequence) and a checksum over the rest, which is a pseudo-random pattern of
//! those three numbers. So any read can be checked on its own: a block that does not
//! match its own header (a mix of two writes, bytes that were never written, a torn
//! block) is a verification failure.
//!
//! The run keeps a [`History`] of the writes it started and the ones acknowledged
//! (and can append it to a journal file, so that it survives the process being
//! killed). A block read back at the end is stale if it holds a write that was
//! acknowledged before another acknowledged write of the block started, or no
//! acknowledged write at all while there was one.
//!
//! With a cache ([`LoadCache`]) each client writes through a write-back cache that
//! serves the others (client-client interface), optionally with a cache group, and
//! flushes it every few writes; reads go through [`WriteBackCache::read_latest`].

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use drs_client::cache::CacheConfig;
use drs_client::{Client, ClientError, WriteBackCache};
use rand::{Rng, RngCore, SeedableRng};

const MAGIC: u32 = u32::from_le_bytes(*b"DRSL");
/// Header: magic u32, lba u64, writer u64, gseq u64, crc u32.
pub const HEADER: usize = 32;

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Concurrent clients (each its own `Client`, its own id and lease).
    pub clients: usize,
    pub duration: Duration,
    /// Fraction of operations that are writes.
    pub write_ratio: f64,
    /// Blocks used: `first..first + count`.
    pub first: u64,
    pub count: u64,
    /// Read everything back at the end and check no acknowledged write was lost.
    pub verify: bool,
    pub seed: u64,
    /// Write through write-back caches.
    pub cache: Option<LoadCache>,
    /// Append every write started and acknowledged to this file.
    pub journal: Option<PathBuf>,
}

/// How the clients cache.
#[derive(Debug, Clone)]
pub struct LoadCache {
    /// Nodes of each client's cache group (0: none).
    pub group: usize,
    /// Each client flushes its cache after this many of its writes.
    pub flush_every: u64,
}

/// What happened.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    pub writes: u64,
    pub reads: u64,
    pub write_errors: u64,
    pub read_errors: u64,
    pub bytes_written: u64,
    pub bytes_read: u64,
    pub elapsed: Duration,
    /// Reads (during the run or at the end) that did not verify, with why.
    pub failures: Vec<String>,
    /// The first few errors, for the user.
    pub errors: Vec<String>,
}

impl LoadReport {
    pub fn ops_per_sec(&self) -> f64 {
        (self.writes + self.reads) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn mib_per_sec(&self) -> f64 {
        (self.bytes_written + self.bytes_read) as f64
            / 1048576.0
            / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// One write's identity: (writer, global sequence).
type WriteKey = (u64, u64);

/// The writes of a run: which were started, which acknowledged and when (in
/// microseconds of the system clock, so journals of several processes compare).
#[derive(Debug, Clone, Default)]
pub struct History {
    started: HashMap<WriteKey, u64>,
    acked_at: HashMap<WriteKey, u64>,
    /// Per block: the latest start of an acknowledged write, and that write.
    latest_acked: HashMap<u64, (u64, WriteKey)>,
}

impl History {
    pub fn start(&mut self, key: WriteKey, at_us: u64) {
        self.started.insert(key, at_us);
    }

    pub fn ack(&mut self, lba: u64, key: WriteKey, at_us: u64) {
        self.acked_at.insert(key, at_us);
        let start = self.started.get(&key).copied().unwrap_or(0);
        let e = self.latest_acked.entry(lba).or_insert((start, key));
        if start >= e.0 {
            *e = (start, key);
        }
    }

    /// Acknowledged writes.
    pub fn acked(&self) -> usize {
        self.acked_at.len()
    }

    /// Checks what block `lba` holds at the end against the history.
    pub fn check(&self, lba: u64, seen: Seen) -> Result<(), String> {
        let Some(&(latest_start, latest)) = self.latest_acked.get(&lba) else {
            return Ok(()); // No acknowledged write: anything well-formed will do.
        };
        match seen {
            Seen::Zero => Err(format!(
                "block {lba}: zeros, but write {} was acknowledged",
                latest.1
            )),
            Seen::Write { writer, gseq } => {
                let key = (writer, gseq);
                if !self.started.contains_key(&key) {
                    return Err(format!("block {lba}: holds a write this run never made (writer {writer:x}, write {gseq}), but write {} was acknowledged", latest.1));
                }
                match self.acked_at.get(&key) {
                    Some(&end) if end < latest_start => Err(format!(
                        "block {lba}: holds write {gseq}, acknowledged before write {} started (and that one was acknowledged too)",
                        latest.1
                    )),
                    _ => Ok(()),
                }
            }
        }
    }

    /// Reads a journal written by [`Journal`]; a torn last line is ignored.
    pub fn from_journal(path: &Path) -> std::io::Result<History> {
        let f = std::fs::File::open(path)?;
        let mut h = History::default();
        for line in std::io::BufReader::new(f).lines() {
            let line = line?;
            let mut it = line.split_ascii_whitespace();
            let kind = it.next();
            let nums: Vec<u64> = it.filter_map(|x| x.parse().ok()).collect();
            let [writer, gseq, lba, at] = nums[..] else {
                continue;
            };
            match kind {
                Some("S") => h.start((writer, gseq), at),
                Some("A") => h.ack(lba, (writer, gseq), at),
                _ => {}
            }
        }
        Ok(h)
    }
}

/// Microseconds of the system clock.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// An append-only record of a run's writes: `S writer gseq lba micros` when a write
/// starts, `A ...` when it is acknowledged. Each line is handed to the kernel at once,
/// so it survives the process being killed.
struct Journal {
    file: Mutex<std::fs::File>,
}

impl Journal {
    fn create(path: &Path) -> std::io::Result<Journal> {
        Ok(Journal {
            file: Mutex::new(std::fs::File::create(path)?),
        })
    }

    fn record(&self, kind: char, lba: u64, (writer, gseq): WriteKey, at: u64) {
        let line = format!("{kind} {writer} {gseq} {lba} {at}\n");
        if let Err(e) = lock(&self.file).write_all(line.as_bytes()) {
            tracing::warn!(error = %e, "cannot append to the load journal");
        }
    }
}

/// What the run records: the history (when it verifies) and the journal.
struct Recorder {
    history: Option<Mutex<History>>,
    journal: Option<Journal>,
}

impl Recorder {
    fn start(&self, lba: u64, key: WriteKey) {
        let at = now_us();
        if let Some(h) = &self.history {
            lock(h).start(key, at);
        }
        if let Some(j) = &self.journal {
            j.record('S', lba, key, at);
        }
    }

    fn ack(&self, lba: u64, key: WriteKey) {
        let at = now_us();
        if let Some(h) = &self.history {
            lock(h).ack(lba, key, at);
        }
        if let Some(j) = &self.journal {
            j.record('A', lba, key, at);
        }
    }
}

/// How one load client writes and reads.
#[derive(Clone)]
enum Io {
    Direct(Client),
    Cached(WriteBackCache, Client),
}

impl Io {
    fn client(&self) -> &Client {
        match self {
            Io::Direct(c) | Io::Cached(_, c) => c,
        }
    }

    async fn write(&self, lba: u64, data: &[u8]) -> Result<(), ClientError> {
        match self {
            Io::Direct(c) => c.write(lba, 0, data).await,
            Io::Cached(cache, _) => cache.write(lba, 0, data).await,
        }
    }

    async fn read(&self, lba: u64) -> Result<Bytes, ClientError> {
        match self {
            Io::Direct(c) => c.read_block(lba).await,
            Io::Cached(cache, c) => cache.read_latest(lba, 0, c.block_size()).await,
        }
    }

    async fn flush(&self) -> Result<(), ClientError> {
        match self {
            Io::Direct(_) => Ok(()),
            Io::Cached(cache, _) => cache.flush().await,
        }
    }
}

/// The block written for (`lba`, `writer`, `gseq`).
pub fn make_block(bs: usize, lba: u64, writer: u64, gseq: u64) -> Vec<u8> {
    let mut b = vec![0u8; bs];
    let mut rng =
        rand::rngs::StdRng::seed_from_u64(lba ^ writer.rotate_left(17) ^ gseq.rotate_left(41));
    rng.fill_bytes(&mut b[HEADER..]);
    b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    b[4..12].copy_from_slice(&lba.to_le_bytes());
    b[12..20].copy_from_slice(&writer.to_le_bytes());
    b[20..28].copy_from_slice(&gseq.to_le_bytes());
    let crc = crc32(&b[HEADER..]);
    b[28..32].copy_from_slice(&crc.to_le_bytes());
    b
}

fn crc32(b: &[u8]) -> u32 {
    crc32fast::hash(b)
}

/// What a block read back says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Never written (all zeros).
    Zero,
    /// A whole write: its writer and global sequence.
    Write { writer: u64, gseq: u64 },
}

/// Checks a block read back as block `lba`.
pub fn check_block(lba: u64, b: &[u8]) -> Result<Seen, String> {
    if b.iter().all(|x| *x == 0) {
        return Ok(Seen::Zero);
    }
    if b.len() < HEADER {
        return Err(format!("block {lba}: shorter than a header"));
    }
    let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
    let magic = u32::from_le_bytes(b[0..4].try_into().unwrap_or([0; 4]));
    if magic != MAGIC {
        return Err(format!(
            "block {lba}: no load header (bytes never written by the load, or mixed)"
        ));
    }
    let (own, writer, gseq) = (u64_at(4), u64_at(12), u64_at(20));
    if own != lba {
        return Err(format!("block {lba}: holds the bytes of block {own}"));
    }
    let want = make_block(b.len(), lba, writer, gseq);
    if want[..] != b[..] {
        return Err(format!("block {lba}: header says writer {writer:x} write {gseq}, the rest does not match it (a mix of writes?)"));
    }
    Ok(Seen::Write { writer, gseq })
}

/// Runs the load against `clients` (one per concurrent client).
pub async fn run(clients: Vec<Client>, spec: &LoadSpec) -> LoadReport {
    let mut report = LoadReport::default();
    let journal = match &spec.journal {
        Some(p) => match Journal::create(p) {
            Ok(j) => Some(j),
            Err(e) => {
                report
                    .errors
                    .push(format!("cannot create the journal {}: {e}", p.display()));
                report.failures.push("no journal".into());
                return report;
            }
        },
        None => None,
    };
    let rec = Arc::new(Recorder {
        history: spec.verify.then(|| Mutex::new(History::default())),
        journal,
    });
    let mut ios = Vec::with_capacity(clients.len());
    for c in &clients {
        match &spec.cache {
            None => ios.push(Io::Direct(c.clone())),
            Some(lc) => {
                let cfg = CacheConfig {
                    max_dirty: 1024,
                    group: lc.group,
                    serve: true,
                    ..CacheConfig::default()
                };
                match WriteBackCache::with_config(c.clone(), cfg).await {
                    Ok(cache) => ios.push(Io::Cached(cache, c.clone())),
                    Err(e) => {
                        report.errors.push(format!("cannot start a cache: {e}"));
                        report.failures.push("no cache".into());
                        return report;
                    }
                }
            }
        }
    }
    let flush_every = spec.cache.as_ref().map_or(0, |c| c.flush_every.max(1));
    let gseq = Arc::new(AtomicU64::new(1));
    let report = Arc::new(Mutex::new(report));
    let start = Instant::now();
    let until = start + spec.duration;
    let tasks: Vec<_> = ios
        .iter()
        .enumerate()
        .map(|(n, io)| {
            let (io, gseq, rec, report) = (io.clone(), gseq.clone(), rec.clone(), report.clone());
            let spec = spec.clone();
            tokio::spawn(async move {
                let mut rng =
                    rand::rngs::StdRng::seed_from_u64(spec.seed.wrapping_add(n as u64 * 7919));
                let bs = io.client().block_size();
                let mut unflushed = 0;
                while Instant::now() < until {
                    let lba = spec.first + rng.gen_range(0..spec.count.max(1));
                    if rng.gen_bool(spec.write_ratio.clamp(0.0, 1.0)) {
                        let key = (io.client().id(), gseq.fetch_add(1, Ordering::Relaxed));
                        let block = make_block(bs, lba, key.0, key.1);
                        rec.start(lba, key);
                        let r = io.write(lba, &block).await;
                        if r.is_ok() {
                            rec.ack(lba, key);
                        }
                        {
                            let mut rep = lock(&report);
                            match r {
                                Ok(()) => {
                                    rep.writes += 1;
                                    rep.bytes_written += bs as u64;
                                }
                                Err(e) => {
                                    rep.write_errors += 1;
                                    note_error(&mut rep, &e);
                                }
                            }
                        }
                        unflushed += 1;
                        if flush_every > 0 && unflushed >= flush_every {
                            unflushed = 0;
                            if let Err(e) = io.flush().await {
                                let mut rep = lock(&report);
                                rep.write_errors += 1;
                                note_error(&mut rep, &e);
                            }
                        }
                    } else {
                        let r = io.read(lba).await;
                        let mut rep = lock(&report);
                        match r {
                            Ok(b) => {
                                rep.reads += 1;
                                rep.bytes_read += b.len() as u64;
                                if let Err(f) = check_block(lba, &b) {
                                    rep.failures.push(f);
                                }
                            }
                            Err(e) => {
                                rep.read_errors += 1;
                                note_error(&mut rep, &e);
                            }
                        }
                    }
                }
                if let Err(e) = io.flush().await {
                    let mut rep = lock(&report);
                    rep.write_errors += 1;
                    note_error(&mut rep, &e);
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = start.elapsed();
    if let (Some(c), Some(h)) = (clients.first(), &rec.history) {
        let h = lock(h).clone();
        let got = verify_all(c, spec.first, spec.count, &h).await;
        lock(&report).failures.extend(got);
    }
    let mut out = lock(&report).clone();
    out.elapsed = elapsed;
    out
}

/// Reads every block of the range and checks it verifies and is not stale against
/// `history` ([`History::check`]). Returns the failures.
pub async fn verify_all(c: &Client, first: u64, count: u64, history: &History) -> Vec<String> {
    let mut failures = Vec::new();
    for lba in first..first + count {
        match c.read_block(lba).await {
            Ok(b) => {
                if let Err(f) = check_block(lba, &b).and_then(|seen| history.check(lba, seen)) {
                    failures.push(f);
                }
            }
            Err(e) => failures.push(format!("block {lba}: final read failed: {e}")),
        }
    }
    failures
}

fn note_error(rep: &mut LoadReport, e: &ClientError) {
    if rep.errors.len() < 10 {
        rep.errors.push(e.to_string());
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A block's bytes, as the load writes them, ready to send.
pub fn block_bytes(bs: usize, lba: u64, writer: u64, gseq: u64) -> Bytes {
    Bytes::from(make_block(bs, lba, writer, gseq))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_verify_and_mixes_do_not() {
        let a = make_block(4096, 7, 1, 10);
        let b = make_block(4096, 7, 2, 11);
        assert_eq!(
            check_block(7, &a),
            Ok(Seen::Write {
                writer: 1,
                gseq: 10
            })
        );
        assert_eq!(check_block(7, &vec![0; 4096]), Ok(Seen::Zero));
        assert!(check_block(8, &a).is_err(), "another block's bytes");
        let mut mix = a.clone();
        mix[2048..].copy_from_slice(&b[2048..]);
        assert!(
            check_block(7, &mix).is_err(),
            "half of one write, half of another"
        );
        let mut flip = a;
        flip[100] ^= 1;
        assert!(check_block(7, &flip).is_err());
    }

    #[test]
    fn history_tells_stale_blocks() {
        let mut h = History::default();
        // Write (1, 1) acknowledged at 20; write (2, 2) started at 30, acknowledged at 40.
        h.start((1, 1), 10);
        h.ack(5, (1, 1), 20);
        h.start((2, 2), 30);
        h.ack(5, (2, 2), 40);
        let w = |writer, gseq| Seen::Write { writer, gseq };
        assert!(h.check(5, w(2, 2)).is_ok());
        assert!(
            h.check(5, w(1, 1)).is_err(),
            "older than an acknowledged write"
        );
        assert!(h.check(5, Seen::Zero).is_err());
        assert!(h.check(5, w(9, 2)).is_err(), "a write of another run");
        // Overlapping writes: either may be last.
        h.start((1, 3), 10);
        h.start((2, 4), 11);
        h.ack(6, (2, 4), 20);
        h.ack(6, (1, 3), 21);
        assert!(h.check(6, w(1, 3)).is_ok());
        assert!(h.check(6, w(2, 4)).is_ok());
        // A write started, never acknowledged, may or may not have landed.
        h.start((1, 5), 10);
        assert!(h.check(7, Seen::Zero).is_ok());
        h.start((1, 6), 50);
        assert!(h.check(6, w(1, 6)).is_ok());
        assert!(
            h.check(8, w(7, 7)).is_ok(),
            "no acknowledged write: anything well-formed"
        );
    }

    #[test]
    fn journal_round_trips_and_ignores_a_torn_line() {
        let dir = std::env::temp_dir().join(format!("drs-journal-{}", std::process::id()));
        let j = Journal::create(&dir).unwrap();
        j.record('S', 5, (1, 1), 10);
        j.record('A', 5, (1, 1), 20);
        j.record('S', 5, (2, 2), 30);
        j.record('A', 5, (2, 2), 40);
        drop(j);
        let mut f = std::fs::OpenOptions::new().append(true).open(&dir).unwrap();
        f.write_all(b"A 3 3 5").unwrap();
        drop(f);
        let h = History::from_journal(&dir).unwrap();
        let _ = std::fs::remove_file(&dir);
        assert_eq!(h.acked(), 2);
        assert!(h.check(5, Seen::Write { writer: 1, gseq: 1 }).is_err());
        assert!(h.check(5, Seen::Write { writer: 2, gseq: 2 }).is_ok());
    }
}
