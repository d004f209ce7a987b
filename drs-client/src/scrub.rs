//! Scrub and repair (report 5.7; DESIGN-NOTES I1, I6, R12).
//!
//! For each stripe: read every member's whole block with its versions; find the
//! newest state k of them agree on; then
//! - a block that failed its stored checksum (`Corrupt`) or reflects an older state
//!   (`Stale`, a node that missed updates) is decoded from the agreeing blocks and
//!   installed at that state (a repair the node accepts only if it is not ahead);
//! - among agreeing blocks the parity equations must hold (I1). If they do not, and
//!   at least k + 2 blocks agree, each block in turn is left out: if exactly one
//!   choice makes the rest consistent, that block is wrong and is rewritten (forced);
//!   otherwise the stripe is reported unrecoverable;
//! - a member that did not answer makes the stripe `degraded` (checked as far as the
//!   others allow).
//!
//! - a member *ahead* of every state k members agree on, through every retry, holds
//!   updates no decode reproduces: every node of the stripe crashed while they were
//!   in flight, losing the set of updates each node keeps to pass on. With repair,
//!   the stripe is settled under its locks (`Client::void_ahead`): a data member
//!   ahead keeps its own bytes (rolled forward), and updates only parity members
//!   held are *voided*, every member taking the newest versions.
//!
//! Scrub takes no locks, but to void: replies that disagree because an update is in
//! flight are read again; repairs are conditional on versions at the node.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use drs_proto::{
    ListReq, NodeId, ReadMode, RepairReq, Request, Response, SlotInfo, StripeId, Version, WireError,
};
use futures::future::join_all;
use futures::stream::{self, StreamExt};

use crate::error::{CallError, ClientError};
use crate::select::{self, Seen};
use crate::Client;

/// What to do and how fast.
#[derive(Debug, Clone)]
pub struct ScrubOptions {
    /// Repair what can be repaired (otherwise only report).
    pub repair: bool,
    /// Stripes checked at once.
    pub concurrency: usize,
    /// Upper bound on bytes read per second (all members together); none: no limit.
    pub rate_bytes_per_sec: Option<u64>,
}

impl Default for ScrubOptions {
    fn default() -> Self {
        ScrubOptions {
            repair: true,
            concurrency: 8,
            rate_bytes_per_sec: None,
        }
    }
}

/// What was wrong with a block or a stripe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The block failed its stored checksum.
    Corrupt,
    /// The block reflects an older state than the rest of the stripe.
    Stale,
    /// Checksums and versions were fine but the parity equations did not hold, and
    /// this block was located as the wrong one.
    Mismatch,
    /// The parity equations did not hold and the wrong block could not be located.
    Inconsistent,
    /// The member did not answer.
    Unreachable(String),
    /// Fewer than k blocks agree: the stripe cannot be decoded now.
    TooFewBlocks { have: usize, need: usize },
    /// Updates kept changing the stripe while it was read.
    Busy,
    /// A repair was needed but failed.
    RepairFailed(String),
    /// The block held updates that no k members agree on and that no member could
    /// pass on any more (never acknowledged): they were voided.
    Voided,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub stripe: StripeId,
    pub position: Option<usize>,
    pub node: Option<NodeId>,
    pub problem: Problem,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stripe {}", self.stripe)?;
        if let (Some(p), Some(n)) = (self.position, self.node) {
            write!(f, " position {p} (node {n})")?;
        }
        match &self.problem {
            Problem::Corrupt => write!(f, ": block failed its checksum"),
            Problem::Stale => write!(f, ": block was behind the stripe (missed updates)"),
            Problem::Mismatch => write!(f, ": block disagreed with the parity equations"),
            Problem::Inconsistent => write!(
                f,
                ": parity equations fail and the wrong block cannot be located"
            ),
            Problem::Unreachable(e) => write!(f, ": not checked, member unreachable ({e})"),
            Problem::TooFewBlocks { have, need } => write!(
                f,
                ": only {have} consistent blocks, {need} needed to decode"
            ),
            Problem::Busy => write!(f, ": kept changing under concurrent updates; not checked"),
            Problem::RepairFailed(e) => write!(f, ": repair failed ({e})"),
            Problem::Voided => write!(
                f,
                ": held updates no other member had; never acknowledged, voided"
            ),
        }
    }
}

/// Totals of a scrub.
#[derive(Debug, Clone, Default)]
pub struct ScrubReport {
    pub stripes: u64,
    pub healthy: u64,
    pub bytes_read: u64,
    /// Blocks found wrong and repaired.
    pub repaired: Vec<Finding>,
    /// Blocks found wrong and left alone (scrub without repair).
    pub found: Vec<Finding>,
    /// Stripes that could not be fully checked: a member down, or too busy.
    pub degraded: Vec<Finding>,
    /// Data that cannot be recovered, or repairs that failed.
    pub unrecoverable: Vec<Finding>,
}

impl ScrubReport {
    pub fn is_clean(&self) -> bool {
        self.repaired.is_empty()
            && self.found.is_empty()
            && self.degraded.is_empty()
            && self.unrecoverable.is_empty()
    }

    /// Stripes that could not be fully checked (one finding per unreachable member).
    pub fn degraded_stripes(&self) -> usize {
        let mut s: Vec<StripeId> = self.degraded.iter().map(|f| f.stripe).collect();
        s.dedup();
        s.len()
    }

    fn absorb(&mut self, s: StripeScrub) {
        self.stripes += 1;
        self.bytes_read += s.bytes;
        if s.findings.is_empty() {
            self.healthy += 1;
        }
        for (f, kind) in s.findings {
            match kind {
                Kind::Repaired => self.repaired.push(f),
                Kind::Found => self.found.push(f),
                Kind::Degraded => self.degraded.push(f),
                Kind::Unrecoverable => self.unrecoverable.push(f),
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Repaired,
    Found,
    Degraded,
    Unrecoverable,
}

#[derive(Debug, Default)]
struct StripeScrub {
    findings: Vec<(Finding, Kind)>,
    bytes: u64,
}

struct Got {
    position: usize,
    versions: Vec<Version>,
    data: Bytes,
}

impl Got {
    /// What the selector needs of each reply.
    fn seen(got: &[Got]) -> Vec<Seen> {
        got.iter()
            .map(|g| Seen {
                position: g.position,
                versions: g.versions.clone(),
            })
            .collect()
    }
}

impl Client {
    /// Scrubs every stripe of the volume. `progress(done, total)` is called as stripes
    /// finish.
    pub async fn scrub(
        &self,
        opts: &ScrubOptions,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> ScrubReport {
        let total = self.inner.geo.stripes();
        let started = Instant::now();
        let stripe_bytes = (self.inner.geo.width() * self.inner.geo.block_size) as u64;
        let mut report = ScrubReport::default();
        let mut results = stream::iter(0..total)
            .map(|s| async move {
                if let Some(rate) = opts.rate_bytes_per_sec.filter(|r| *r > 0) {
                    // Stripe s may start once s stripes' worth of bytes fit the rate.
                    let due = Duration::from_secs_f64((s * stripe_bytes) as f64 / rate as f64);
                    tokio::time::sleep_until((started + due).into()).await;
                }
                self.scrub_stripe(s, opts.repair).await
            })
            .buffer_unordered(opts.concurrency.max(1));
        let mut done = 0;
        while let Some(r) = results.next().await {
            report.absorb(r);
            done += 1;
            progress(done, total);
        }
        report.repaired.sort_by_key(|f| (f.stripe, f.position));
        report.found.sort_by_key(|f| (f.stripe, f.position));
        report.degraded.sort_by_key(|f| (f.stripe, f.position));
        report.unrecoverable.sort_by_key(|f| (f.stripe, f.position));
        report
    }

    /// Checks one stripe and repairs it; returns what was found.
    pub async fn scrub_one(&self, stripe: StripeId, repair: bool) -> Vec<Finding> {
        self.scrub_stripe(stripe, repair)
            .await
            .findings
            .into_iter()
            .map(|(f, _)| f)
            .collect()
    }

    /// Reconstructs the block at `position` of `stripe` from the others and installs
    /// it there (after a read found it corrupt).
    pub async fn repair_position(
        &self,
        stripe: StripeId,
        position: usize,
    ) -> Result<(), ClientError> {
        let s = self.scrub_stripe(stripe, true).await;
        match s
            .findings
            .iter()
            .find(|(f, k)| *k == Kind::Unrecoverable && f.position.is_none_or(|p| p == position))
        {
            Some((f, _)) => Err(ClientError::Unavailable {
                stripe,
                have: 0,
                need: self.inner.geo.k,
                width: self.inner.geo.width(),
                detail: format!(" ({f})"),
                transient: false,
            }),
            None => Ok(()),
        }
    }

    async fn scrub_stripe(&self, stripe: StripeId, repair: bool) -> StripeScrub {
        let geo = &self.inner.geo;
        let (k, width, bs) = (geo.k, geo.width(), geo.block_size);
        let finding =
            |position: Option<usize>, problem: Problem| self.finding(stripe, position, problem);
        let mut out = StripeScrub::default();
        const ATTEMPTS: usize = 4;
        for attempt in 0..ATTEMPTS {
            let last = attempt + 1 == ATTEMPTS;
            let answers =
                join_all((0..width).map(|p| self.read_member(stripe, p, 0, bs, ReadMode::Applied)))
                    .await;
            let mut got = Vec::new();
            let mut corrupt = Vec::new();
            let mut missing = Vec::new();
            for (p, a) in answers.into_iter().enumerate() {
                match a {
                    Ok((versions, data)) => got.push(Got {
                        position: p,
                        versions,
                        data,
                    }),
                    Err(CallError::Remote(WireError::Corrupt { .. })) => corrupt.push(p),
                    Err(e) => missing.push((p, e)),
                }
            }
            out.bytes += (got.len() * bs) as u64;
            let seen = Got::seen(&got);
            let Some(choice) = select::choose(k, &seen) else {
                if got.len() >= k && !last {
                    tokio::time::sleep(Duration::from_millis(10 << attempt)).await;
                    continue;
                }
                let problem = if got.len() >= k {
                    Problem::Busy
                } else {
                    Problem::TooFewBlocks {
                        have: got.len(),
                        need: k,
                    }
                };
                let kind = if got.len() >= k {
                    Kind::Degraded
                } else {
                    Kind::Unrecoverable
                };
                out.findings.push((finding(None, problem), kind));
                return out;
            };
            let v = choice.versions.clone();
            let agree: Vec<usize> = (0..got.len())
                .filter(|&i| select::agrees(k, &seen[i], &v))
                .collect();
            let behind: Vec<usize> = (0..got.len())
                .filter(|&i| {
                    !agree.contains(&i)
                        && drs_proto::map::tracked(k, got[i].position)
                            .all(|j| got[i].versions[j] <= v[j])
                })
                .collect();
            if agree.len() + behind.len() < got.len() {
                if !last {
                    // Someone is ahead of the chosen state: an update is in flight.
                    tokio::time::sleep(Duration::from_millis(10 << attempt)).await;
                    continue;
                }
                if repair {
                    // Still ahead: void what no decode can reproduce, if nothing
                    // is in flight.
                    out.findings.extend(self.void_ahead(stripe).await);
                    return out;
                }
            }
            // A member behind on a block that is locked somewhere is most likely just
            // waiting for an update in flight: look again later rather than repair.
            let lagging: Vec<u8> = behind
                .iter()
                .flat_map(|&i| {
                    drs_proto::map::tracked(k, got[i].position)
                        .filter(|&j| got[i].versions[j] < v[j])
                        .map(|j| j as u8)
                        .collect::<Vec<_>>()
                })
                .collect();
            if !lagging.is_empty()
                && self
                    .locked_indices(stripe)
                    .await
                    .iter()
                    .any(|i| lagging.contains(i))
            {
                if last {
                    out.findings
                        .push((finding(None, Problem::Busy), Kind::Degraded));
                    return out;
                }
                tokio::time::sleep(Duration::from_millis(20 << attempt)).await;
                continue;
            }
            let present: Vec<(usize, &[u8])> = choice
                .chosen
                .iter()
                .map(|&i| (got[i].position, &got[i].data[..]))
                .collect();

            // Parity equations among the agreeing blocks.
            let others: Vec<usize> = agree
                .iter()
                .copied()
                .filter(|i| !choice.chosen.contains(i))
                .collect();
            let consistent = |present: &[(usize, &[u8])], check: &[usize]| -> bool {
                let wanted: Vec<usize> = check.iter().map(|&i| got[i].position).collect();
                match self.inner.codec.reconstruct(present, &wanted) {
                    Ok(blocks) => blocks
                        .iter()
                        .zip(check)
                        .all(|(b, &i)| b[..] == got[i].data[..]),
                    Err(_) => false,
                }
            };
            let mut fixes: Vec<(usize, Problem, bool)> = Vec::new(); // (position, why, force)
            if !consistent(&present, &others) {
                let mut culprits = Vec::new();
                if agree.len() >= k + 2 {
                    for &x in &agree {
                        let rest: Vec<usize> = agree.iter().copied().filter(|&i| i != x).collect();
                        let pres: Vec<(usize, &[u8])> = rest[..k]
                            .iter()
                            .map(|&i| (got[i].position, &got[i].data[..]))
                            .collect();
                        if consistent(&pres, &rest[k..]) {
                            culprits.push(x);
                        }
                    }
                }
                if let [x] = culprits[..] {
                    fixes.push((got[x].position, Problem::Mismatch, true));
                } else {
                    out.findings
                        .push((finding(None, Problem::Inconsistent), Kind::Unrecoverable));
                    return out;
                }
            }
            for &p in &corrupt {
                fixes.push((p, Problem::Corrupt, false));
            }
            for &i in &behind {
                fixes.push((got[i].position, Problem::Stale, false));
            }
            // A located wrong block must not be a source of the decode.
            let sources: Vec<(usize, &[u8])> = {
                let bad: Vec<usize> = fixes.iter().map(|f| f.0).collect();
                agree
                    .iter()
                    .filter(|&&i| !bad.contains(&got[i].position))
                    .take(k)
                    .map(|&i| (got[i].position, &got[i].data[..]))
                    .collect()
            };
            for (p, problem, force) in fixes {
                if !repair {
                    out.findings.push((finding(Some(p), problem), Kind::Found));
                    continue;
                }
                let res = match self.inner.codec.reconstruct(&sources, &[p]) {
                    Ok(mut b) => {
                        let data = Bytes::from(b.pop().unwrap_or_default());
                        self.install(stripe, p, v.clone(), data, force).await
                    }
                    Err(e) => Err(CallError::Protocol(e.to_string())),
                };
                match res {
                    Ok(true) => {
                        self.inner.stats.repairs.fetch_add(1, Ordering::Relaxed);
                        out.findings
                            .push((finding(Some(p), problem), Kind::Repaired));
                    }
                    // It had caught up meanwhile (an update was in flight).
                    Ok(false) => {}
                    // The member moved past the state we read (an update arrived):
                    // nothing is wrong, the stripe was just busy.
                    Err(CallError::Remote(WireError::VersionUnavailable { .. })) => out
                        .findings
                        .push((finding(Some(p), Problem::Busy), Kind::Degraded)),
                    Err(e) => out.findings.push((
                        finding(Some(p), Problem::RepairFailed(format!("{problem:?}: {e}"))),
                        Kind::Unrecoverable,
                    )),
                }
            }
            for (p, e) in missing {
                out.findings.push((
                    finding(Some(p), Problem::Unreachable(e.to_string())),
                    Kind::Degraded,
                ));
            }
            return out;
        }
        out
    }

    async fn install(
        &self,
        stripe: StripeId,
        position: usize,
        versions: Vec<Version>,
        data: Bytes,
        force: bool,
    ) -> Result<bool, CallError> {
        let node = self.inner.geo.member(stripe, position);
        let req = Request::Repair(RepairReq {
            volume: self.inner.volume.id,
            stripe,
            position: position as u8,
            versions,
            force,
        });
        match self.call(node, &req, data).await? {
            (Response::Repaired(r), _) => Ok(r.installed),
            (other, _) => Err(CallError::Protocol(format!(
                "repair answered with {other:?}"
            ))),
        }
    }

    /// Data indices of `stripe` locked at any member.
    async fn locked_indices(&self, stripe: StripeId) -> Vec<u8> {
        self.stripe_slots(stripe)
            .await
            .iter()
            .flatten()
            .flat_map(|slot| slot.locks.iter().map(|l| l.index))
            .collect()
    }

    fn finding(&self, stripe: StripeId, position: Option<usize>, problem: Problem) -> Finding {
        Finding {
            stripe,
            position,
            node: position.map(|p| self.inner.geo.member(stripe, p)),
            problem,
        }
    }

    /// Each member's listing of its block of `stripe`, by position (`None`: no
    /// answer).
    async fn stripe_slots(&self, stripe: StripeId) -> Vec<Option<SlotInfo>> {
        let req = Request::List(ListReq {
            volume: self.inner.volume.id,
            from_stripe: stripe,
            max: 1,
        });
        let calls = self.inner.geo.members(stripe).into_iter().map(|node| {
            let req = req.clone();
            async move { self.call(node, &req, Bytes::new()).await }
        });
        join_all(calls)
            .await
            .into_iter()
            .map(|r| match r {
                Ok((Response::List(l), _)) => l.slots.into_iter().find(|s| s.stripe == stripe),
                _ => None,
            })
            .collect()
    }

    /// Settles a stripe where members are ahead of every state k members agree on.
    ///
    /// Under locks on every data block of the stripe at every member (so no write is
    /// in flight), and only if every member answers, none is corrupt, none holds an
    /// update it may still pass on (unsettled) or has logged and not applied
    /// (pending), and no other owner holds a lock: read every member again and take
    /// the newest state V that k of them agree on. The content installed is the
    /// stripe at V, except that each data block whose own member is ahead keeps that
    /// member's bytes (its updates are rolled forward: a data member's block is its
    /// own truth), with the parity blocks encoded from those data blocks. It is
    /// installed with the newest versions W any member holds: the updates only a
    /// parity member held, which no decode can reproduce, are *voided*. It goes first
    /// to the members ahead of V (so no reader finds a member with the old bytes and
    /// one with the new agreeing on W), then to the rest. Versions never go back, so
    /// a later write takes each block past W as usual.
    async fn void_ahead(&self, stripe: StripeId) -> Vec<(Finding, Kind)> {
        // Its locks are held from here to the end: run to it (`finish`).
        let this = self.clone();
        crate::finish::to_end(self, async move { this.void_ahead_now(stripe).await }).await
    }

    async fn void_ahead_now(&self, stripe: StripeId) -> Vec<(Finding, Kind)> {
        let k = self.inner.geo.k;
        let busy = || vec![(self.finding(stripe, None, Problem::Busy), Kind::Degraded)];
        let blocks: Vec<(u8, usize, usize)> = (0..k).map(|i| (i as u8, 0, 0)).collect();
        let owner = rand::random();
        let locked = match self
            .lock_stripe_with(
                stripe,
                &blocks,
                &crate::write::LockOpts {
                    owner,
                    ..Default::default()
                },
            )
            .await
        {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(stripe, error = %e, "locking a stripe to void updates failed");
                return busy();
            }
        };
        let out = self.void_locked(stripe, owner).await;
        self.unlock_stripe(&locked).await;
        out.unwrap_or_else(busy)
    }

    /// [`Client::void_ahead`] once the locks are held; `None` when it must wait.
    async fn void_locked(&self, stripe: StripeId, owner: u64) -> Option<Vec<(Finding, Kind)>> {
        let geo = &self.inner.geo;
        let (k, width, bs) = (geo.k, geo.width(), geo.block_size);
        let slots = self.stripe_slots(stripe).await;
        let settled = |s: &Option<SlotInfo>| {
            s.as_ref().is_some_and(|s| {
                s.unsettled.is_empty()
                    && s.pending.is_empty()
                    && s.state != drs_proto::SlotState::Corrupt
                    && s.locks.iter().all(|l| l.owner == owner)
            })
        };
        if !slots.iter().all(settled) {
            return None;
        }
        let answers =
            join_all((0..width).map(|p| self.read_member(stripe, p, 0, bs, ReadMode::Applied)))
                .await;
        let mut got = Vec::with_capacity(width);
        for (p, a) in answers.into_iter().enumerate() {
            let (versions, data) = a.ok()?;
            got.push(Got {
                position: p,
                versions,
                data,
            });
        }
        let seen = Got::seen(&got);
        let choice = select::choose(k, &seen)?;
        let v = choice.versions;
        let newest = select::newest(k, &seen);
        let ahead: Vec<usize> = got
            .iter()
            .filter(|g| drs_proto::map::tracked(k, g.position).any(|j| g.versions[j] > v[j]))
            .map(|g| g.position)
            .collect();
        tracing::debug!(
            stripe,
            seen = ?seen.iter().map(|s| (s.position, s.versions.clone(), digest(&got[s.position].data))).collect::<Vec<_>>(),
            chosen = ?choice.chosen,
            v = ?v,
            newest = ?newest,
            ?ahead,
            "settling a stripe with members ahead"
        );
        if ahead.is_empty() {
            // Settled meanwhile (a relay arrived): the next scrub finds it in order.
            return Some(Vec::new());
        }
        let sources: Vec<(usize, &[u8])> = choice
            .chosen
            .iter()
            .map(|&i| (got[i].position, &got[i].data[..]))
            .collect();
        let data_positions: Vec<usize> = (0..k).collect();
        let mut content = self
            .inner
            .codec
            .reconstruct(&sources, &data_positions)
            .ok()?;
        // Data members ahead keep their own bytes.
        let mut rolled = Vec::new();
        for g in got.iter().filter(|g| g.position < k) {
            if g.versions[g.position] > v[g.position] {
                content[g.position] = g.data.to_vec();
                rolled.push(g.position);
            }
        }
        let mut parity = vec![vec![0u8; bs]; width - k];
        {
            let data: Vec<&[u8]> = content.iter().map(|b| &b[..]).collect();
            let mut out: Vec<&mut [u8]> = parity.iter_mut().map(|b| &mut b[..]).collect();
            self.inner.codec.encode(&data, &mut out).ok()?;
        }
        content.extend(parity);
        let differs = |p: usize| -> bool {
            drs_proto::map::tracked(k, p).any(|j| got[p].versions[j] != newest[j])
                || got[p].data[..] != content[p][..]
        };
        let order: Vec<usize> = ahead
            .iter()
            .copied()
            .chain((0..width).filter(|p| !ahead.contains(p)))
            .filter(|&p| differs(p))
            .collect();
        tracing::debug!(
            stripe,
            ?rolled,
            ?order,
            content = ?content.iter().map(|c| digest(c)).collect::<Vec<_>>(),
            "settled content"
        );
        let mut out = Vec::new();
        for p in order {
            let data = Bytes::from(content[p].clone());
            let problem = if p < k && rolled.contains(&p) {
                // Its own bytes stay; only versions another member gave out move.
                Problem::Stale
            } else if ahead.contains(&p) {
                Problem::Voided
            } else {
                Problem::Stale
            };
            match self.install(stripe, p, newest.clone(), data, true).await {
                Ok(_) => {
                    self.inner.stats.repairs.fetch_add(1, Ordering::Relaxed);
                    if problem == Problem::Voided {
                        tracing::warn!(
                            stripe,
                            position = p,
                            "voided updates no k members can reproduce"
                        );
                    }
                    out.push((self.finding(stripe, Some(p), problem), Kind::Repaired));
                }
                Err(e) => {
                    // Stop at the first failure: the members ahead go first, so what
                    // is installed so far never lets a reader mix the two contents.
                    out.push((
                        self.finding(
                            stripe,
                            Some(p),
                            Problem::RepairFailed(format!("{problem:?}: {e}")),
                        ),
                        Kind::Degraded,
                    ));
                    break;
                }
            }
        }
        Some(out)
    }
}

/// A short fingerprint of a block, for debug logs.
fn digest(b: &[u8]) -> u32 {
    b.iter().fold(0x811c_9dc5u32, |h, &x| {
        (h ^ x as u32).wrapping_mul(0x0100_0193)
    })
}
