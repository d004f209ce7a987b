//! `drs-cli load`: concurrent self-verifying writers and readers.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use drs_local::load::{self, LoadCache, LoadSpec};
use drs_local::size::human;

use crate::out::say;

#[derive(Args, Debug)]
pub struct LoadArgs {
    /// Concurrent clients (each its own identity and lease).
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Fraction of operations that write (the rest read and check what they read).
    #[arg(long, default_value_t = 0.5)]
    pub write_ratio: f64,
    /// First block used.
    #[arg(long, default_value_t = 0)]
    pub first: u64,
    /// Blocks used (default: the whole volume).
    #[arg(long)]
    pub blocks: Option<u64>,
    /// At the end, read every block back and check no acknowledged write was lost.
    #[arg(long)]
    pub verify: bool,
    /// Seed of the random choices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Write through write-back caches that serve each other (client-client
    /// interface), each flushed every `--flush-every` writes.
    #[arg(long)]
    pub cache: bool,
    /// Keep each cache's unflushed changes at this many nodes, so they survive the
    /// process being killed (implies `--cache`).
    #[arg(long, value_name = "NODES")]
    pub cache_group: Option<usize>,
    /// Writes of a client between flushes of its cache.
    #[arg(long, default_value_t = 16)]
    pub flush_every: u64,
    /// Append every write started and acknowledged to this file (`S|A writer seq
    /// block micros`), to check the volume against after the process is killed.
    #[arg(long, value_name = "FILE")]
    pub journal: Option<PathBuf>,
    /// Run nothing: check every block of the range against a journal written by an
    /// earlier run (one that may have been killed), and exit 1 on a stale block.
    #[arg(long, value_name = "FILE", conflicts_with = "journal")]
    pub check_journal: Option<PathBuf>,
}

pub async fn run(cluster: &Path, a: LoadArgs) -> anyhow::Result<i32> {
    let first = crate::client(cluster).await?;
    let volume_blocks = first.blocks();
    if a.first >= volume_blocks {
        anyhow::bail!(
            "block {} is out of range (the volume has {volume_blocks} blocks)",
            a.first
        );
    }
    let count = a
        .blocks
        .unwrap_or(volume_blocks - a.first)
        .min(volume_blocks - a.first);
    if let Some(path) = &a.check_journal {
        let history = load::History::from_journal(path)
            .with_context(|| format!("cannot read the journal {}", path.display()))?;
        let failures = load::verify_all(&first, a.first, count, &history).await;
        say!(
            "checked blocks {}..{} against {} acknowledged writes",
            a.first,
            a.first + count,
            history.acked()
        );
        return Ok(report_failures(&failures, "every block checked"));
    }
    let mut clients = vec![first];
    for _ in 1..a.clients.max(1) {
        clients.push(crate::client(cluster).await?);
    }
    let spec = LoadSpec {
        clients: a.clients.max(1),
        duration: Duration::from_secs_f64(a.duration.max(0.0)),
        write_ratio: a.write_ratio,
        first: a.first,
        count,
        verify: a.verify,
        seed: a.seed,
        cache: (a.cache || a.cache_group.is_some()).then(|| LoadCache {
            group: a.cache_group.unwrap_or(0),
            flush_every: a.flush_every,
        }),
        journal: a.journal,
    };
    let r = load::run(clients.clone(), &spec).await;
    for c in &clients {
        c.settle_unlocks(Duration::from_secs(5)).await;
    }
    say!(
        "load: {} clients, {:.1} s: {} writes, {} reads ({:.0} ops/s, {}/s); {} write errors, {} read errors",
        spec.clients,
        r.elapsed.as_secs_f64(),
        r.writes,
        r.reads,
        r.ops_per_sec(),
        human(r.mib_per_sec() as u64 * 1048576),
        r.write_errors,
        r.read_errors
    );
    for e in &r.errors {
        say!("  error: {e}");
    }
    Ok(report_failures(
        &r.failures,
        if spec.verify {
            "every block checked"
        } else {
            "reads checked"
        },
    ))
}

/// Prints the verdict; the exit code.
fn report_failures(failures: &[String], what: &str) -> i32 {
    if failures.is_empty() {
        say!("verification: {what} (no failure)");
        0
    } else {
        say!("VERIFICATION FAILED: {} failure(s)", failures.len());
        for f in failures.iter().take(20) {
            say!("  {f}");
        }
        1
    }
}
