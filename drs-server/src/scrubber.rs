//! The background scrubber (FTR 5.7; DESIGN-NOTES I6): reads every block this node
//! holds, at a bounded rate, and compares it with the checksum stored with it.
//!
//! A block that fails (flipped bits, a stale copy rolled back under the node whose
//! bytes no longer match the checksum written with the newer ones, a data file cut
//! short) is marked corrupt, so clients read around it from then on, and rebuilt here
//! from the rest of its stripe. Passes start every `scrub_every` (the first soon after
//! start: at most [`FIRST_PASS_AFTER`]); each pass logs what it found, and the node's
//! stats count passes, blocks checked, corrupt blocks found and blocks repaired, and
//! show the position of the pass under way. A block the scrubber could not rebuild
//! (too many members down) stays marked; the next pass, a client read or `drs-cli
//! scrub` repairs it later.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use drs_client::Client;
use drs_proto::{StripeId, VolumeId};
use tokio::sync::watch;

use crate::node::Node;
use crate::recover::Pace;
use crate::store::{Check, VolumeStore};

/// The first pass starts this long after the node starts, at most.
pub const FIRST_PASS_AFTER: Duration = Duration::from_secs(300);

/// What the scrubber did, for the node's stats.
#[derive(Default)]
pub struct ScrubStats {
    /// Passes completed.
    pub passes: AtomicU64,
    /// Blocks checked, over all passes.
    pub checked: AtomicU64,
    /// Blocks the scrubber found corrupt.
    pub found: AtomicU64,
    /// Corrupt blocks the scrubber rebuilt.
    pub repaired: AtomicU64,
    /// Blocks checked so far in the pass under way (0 between passes).
    pub position: AtomicU64,
    /// Blocks in one pass.
    pub total: AtomicU64,
}

/// One pass's findings.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PassReport {
    pub checked: u64,
    pub found: u64,
    pub repaired: u64,
    /// Corrupt blocks left for later (their stripe could not be decoded now).
    pub left: u64,
    /// Blocks the disk would not read at all.
    pub errors: u64,
}

/// Runs passes until shutdown. Returns at once when scrubbing is off.
pub async fn run(
    node: Arc<Node>,
    peers: HashMap<VolumeId, Client>,
    mut shutdown: watch::Receiver<bool>,
) {
    let every = node.cfg.scrub_every;
    if every.is_zero() {
        tracing::info!("background scrubbing is off");
        return;
    }
    let pace = Pace::new(node.cfg.scrub_rate);
    let mut start = Instant::now() + every.min(FIRST_PASS_AFTER);
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(start.into()) => {}
            _ = shutdown.changed() => return,
        }
        let began = Instant::now();
        let Some(report) = pass(&node, &peers, &pace, &mut shutdown).await else {
            return;
        };
        node.scrub.passes.fetch_add(1, Ordering::Relaxed);
        node.scrub.position.store(0, Ordering::Relaxed);
        let secs = began.elapsed().as_secs_f64();
        if report.found > 0 || report.left > 0 || report.errors > 0 {
            tracing::warn!(
                checked = report.checked,
                corrupt = report.found,
                repaired = report.repaired,
                left = report.left,
                unreadable = report.errors,
                secs,
                "scrub pass done: corruption found"
            );
        } else {
            tracing::info!(checked = report.checked, secs, "scrub pass done: clean");
        }
        start = (began + every).max(Instant::now());
    }
}

/// One pass over every volume; None on shutdown.
async fn pass(
    node: &Arc<Node>,
    peers: &HashMap<VolumeId, Client>,
    pace: &Pace,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<PassReport> {
    let total: u64 = node
        .volumes
        .values()
        .map(|v| v.store.geometry().stripes())
        .sum();
    node.scrub.total.store(total, Ordering::Relaxed);
    let mut report = PassReport::default();
    for (vid, vol) in &node.volumes {
        let Some(client) = peers.get(vid) else {
            continue;
        };
        let store = &vol.store;
        let bs = store.geometry().block_size as u64;
        for stripe in 0..store.geometry().stripes() {
            tokio::select! {
                _ = pace.take(bs) => {}
                _ = shutdown.changed() => return None,
            }
            node.scrub.position.fetch_add(1, Ordering::Relaxed);
            let check = {
                let store = store.clone();
                match tokio::task::spawn_blocking(move || store.check(stripe)).await {
                    Ok(c) => c,
                    Err(e) => Check::Error(e.to_string()),
                }
            };
            match check {
                Check::NotMember | Check::Unverified => continue,
                Check::Clean => {}
                Check::Error(e) => {
                    tracing::warn!(volume = vid, stripe, error = %e, "scrub: block unreadable");
                    report.errors += 1;
                }
                Check::Corrupt { found } => {
                    if found {
                        report.found += 1;
                        node.scrub.found.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            volume = vid,
                            stripe,
                            "scrub: block failed its checksum; rebuilding it from the stripe"
                        );
                    }
                    if repair(store, client, stripe).await {
                        report.repaired += 1;
                        node.scrub.repaired.fetch_add(1, Ordering::Relaxed);
                    } else {
                        report.left += 1;
                    }
                }
            }
            report.checked += 1;
            node.scrub.checked.fetch_add(1, Ordering::Relaxed);
        }
    }
    Some(report)
}

/// Decodes this node's block of `stripe` from the other members and installs it.
async fn repair(store: &Arc<VolumeStore>, client: &Client, stripe: StripeId) -> bool {
    let Some(position) = store.position(stripe) else {
        return false;
    };
    match client.reconstruct(stripe, position as usize).await {
        Ok((versions, data)) => {
            match store.install(stripe, position, versions, data, false).await {
                Ok(installed) => installed,
                Err(e) => {
                    tracing::warn!(stripe, error = %e, "scrub: installing a rebuilt block failed");
                    false
                }
            }
        }
        Err(e) => {
            tracing::warn!(stripe, error = %e, "scrub: the stripe cannot be decoded now; the block stays marked for repair");
            false
        }
    }
}
