//! A node catching up on updates it missed without a crash (drs-server recover.rs
//! `lifecycle` after start, with the scrub of drs-client scrub.rs): a member that did
//! not grant a lock gets no update, only the versions given out (a catch-up unlock);
//! its block is then *stuck* and rebuilt from the stripe after `stuck_after`; and
//! every `verify_interval` each block is compared with the other members' and
//! rebuilt if behind (or rolled forward if ahead).
//!
//! The node does one thing at a time here, as the real loop awaits each step: a
//! queue of jobs, of which a scrub and a listing wait for answers.

use std::collections::{BTreeSet, VecDeque};

use drs_client::select::{self, Seen};

use crate::client::Purpose;
use crate::scenario::real;
use crate::types::{Addr, Ev, Req, Resp, SlotView, Time};
use crate::world::World;

#[derive(Debug, Clone)]
pub(crate) enum LifeJob {
    Scrub(u64),
    ForgetUnseen(u64),
    VerifyList,
    VerifySlot { stripe: u64, theirs: Vec<SlotView> },
    SetVerified(u64, bool),
    Recheck { stripe: u64, target: Vec<u64> },
}

type Got = Option<(Vec<u64>, Vec<u8>)>;

#[derive(Debug, Clone)]
pub(crate) struct Plan {
    versions: Vec<u64>,
    lagging: Vec<u8>,
    /// (position, bytes) of k agreeing blocks to decode from.
    sources: Vec<(usize, Vec<u8>)>,
    /// Positions to rebuild.
    fixes: Vec<usize>,
}

#[derive(Debug, Clone)]
pub(crate) enum ScrubPhase {
    Reading {
        replies: Vec<Got>,
        outstanding: usize,
    },
    Listing {
        plan: Plan,
        locked: BTreeSet<u8>,
        outstanding: usize,
    },
    Installing {
        outstanding: usize,
    },
    Sleeping,
}

#[derive(Debug, Clone)]
pub(crate) struct ScrubRun {
    stripe: u64,
    attempt: usize,
    phase: ScrubPhase,
}

#[derive(Debug, Clone)]
pub(crate) enum Running {
    Scrub(ScrubRun),
    List {
        views: Vec<SlotView>,
        outstanding: usize,
    },
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Life {
    jobs: VecDeque<LifeJob>,
    running: Option<Running>,
    serial: u64,
    last_stuck: Time,
    last_verify: Time,
}

impl Life {
    pub fn idle(&self) -> bool {
        self.jobs.is_empty() && self.running.is_none()
    }
}

impl World {
    /// The lifecycle loop's turn (run with the node's 100 ms tick): stuck blocks every
    /// second, all blocks every `verify_interval`.
    pub(crate) fn life_tick(&mut self, n: usize) {
        if !self.nodes[n].life.idle() {
            return;
        }
        let now = self.now;
        if now.saturating_sub(self.nodes[n].life.last_stuck) >= real::STUCK_CHECK {
            self.nodes[n].life.last_stuck = now;
            let stuck_after = self.cfg.stuck_after_ms;
            let stuck: Vec<u64> = self.nodes[n]
                .slots
                .iter()
                .filter(|(_, s)| s.behind_since.is_some_and(|t| now - t > stuck_after))
                .map(|(s, _)| *s)
                .collect();
            for s in stuck {
                self.log(format!(
                    "n{n}: s{s} missed an update; rebuilding it from the stripe"
                ));
                let life = &mut self.nodes[n].life;
                life.jobs.push_back(LifeJob::Scrub(s));
                life.jobs.push_back(LifeJob::ForgetUnseen(s));
            }
        }
        if self.nodes[n].life.jobs.is_empty()
            && now.saturating_sub(self.nodes[n].life.last_verify) >= self.cfg.verify_interval_ms
        {
            self.nodes[n].life.last_verify = now;
            self.nodes[n].life.jobs.push_back(LifeJob::VerifyList);
        }
        self.life_run(n);
    }

    fn life_run(&mut self, n: usize) {
        while self.nodes[n].life.running.is_none() {
            let Some(job) = self.nodes[n].life.jobs.pop_front() else {
                return;
            };
            match job {
                LifeJob::Scrub(s) => self.scrub_start(n, s, 0),
                LifeJob::ForgetUnseen(s) => self.forget_unseen(n, s),
                LifeJob::VerifyList => {
                    let serial = self.life_serial(n);
                    let others: Vec<usize> = (0..self.width()).filter(|o| *o != n).collect();
                    for &o in &others {
                        self.call(Addr::Node(n), o, Req::List, Purpose::VerifyList { serial });
                    }
                    self.nodes[n].life.running = Some(Running::List {
                        views: Vec::new(),
                        outstanding: others.len(),
                    });
                }
                LifeJob::VerifySlot { stripe, theirs } => self.verify_slot(n, stripe, theirs),
                LifeJob::SetVerified(s, v) => self.slot_mut(n, s).verified = v,
                LifeJob::Recheck { stripe, target } => {
                    if self.up_to_date(n, stripe, &target) {
                        self.slot_mut(n, stripe).verified = true;
                    }
                }
            }
        }
    }

    fn life_serial(&mut self, n: usize) -> u64 {
        self.nodes[n].life.serial += 1;
        self.nodes[n].life.serial
    }

    fn life_done(&mut self, n: usize) {
        self.nodes[n].life.running = None;
        self.life_run(n);
    }

    /// store/mod.rs `forget_unseen`: versions heard of (from unlocks) that a rebuild
    /// found nowhere are forgotten, so the block stops waiting for them.
    fn forget_unseen(&mut self, n: usize, stripe: u64) {
        let k = self.cfg.k;
        let slot = self.slot_mut(n, stripe);
        let mut known = slot.versions.clone();
        for p in &slot.pending {
            let i = p.update.index as usize;
            known[i] = known[i].max(p.update.version);
        }
        for i in slot.tracked(k) {
            slot.known[i] = known[i];
        }
        self.touch_behind(n, stripe);
        self.recheck_waiters(n);
    }

    /// recover.rs `verify_slot`.
    fn verify_slot(&mut self, n: usize, stripe: u64, theirs: Vec<SlotView>) {
        let k = self.cfg.k;
        if theirs.len() < self.cfg.m {
            return;
        }
        let seen: Vec<Seen> = theirs
            .iter()
            .map(|s| Seen {
                position: s.position,
                versions: s.versions.clone(),
            })
            .collect();
        let target = select::newest(k, &seen);
        let slot = self.slot(n, stripe);
        let tracked = slot.tracked(k);
        let in_flight = theirs
            .iter()
            .any(|t| t.locks.iter().any(|i| tracked.contains(&(*i as usize))));
        if !slot.verified && in_flight {
            return;
        }
        let ahead = tracked.clone().any(|i| slot.versions[i] > target[i]);
        let up_to_date = tracked.clone().all(|i| slot.versions[i] >= target[i]);
        let mut jobs = Vec::new();
        if ahead && !in_flight {
            jobs.push(LifeJob::Scrub(stripe));
        }
        if !up_to_date {
            self.log(format!(
                "n{n}: s{stripe} is behind the stripe ({target:?}); rebuilding"
            ));
            jobs.push(LifeJob::SetVerified(stripe, false));
            jobs.push(LifeJob::Scrub(stripe));
            jobs.push(LifeJob::Recheck { stripe, target });
        } else {
            jobs.push(LifeJob::SetVerified(stripe, true));
        }
        for j in jobs.into_iter().rev() {
            self.nodes[n].life.jobs.push_front(j);
        }
    }

    fn up_to_date(&self, n: usize, stripe: u64, target: &[u64]) -> bool {
        let slot = self.slot(n, stripe);
        slot.tracked(self.cfg.k)
            .all(|i| slot.versions[i] >= target[i])
    }

    // ----- scrub of one stripe (drs-client scrub.rs `scrub_stripe`, repairing) -----

    fn scrub_start(&mut self, n: usize, stripe: u64, attempt: usize) {
        let serial = self.life_serial(n);
        let width = self.width();
        for p in 0..width {
            let to = self.member(stripe, p);
            let req = Req::Read {
                stripe,
                position: p as u8,
                applied: true,
            };
            self.call(
                Addr::Node(n),
                to,
                req,
                Purpose::ScrubRead {
                    serial,
                    position: p,
                },
            );
        }
        self.nodes[n].life.running = Some(Running::Scrub(ScrubRun {
            stripe,
            attempt,
            phase: ScrubPhase::Reading {
                replies: vec![None; width],
                outstanding: width,
            },
        }));
    }

    fn scrub_sleep(&mut self, n: usize, ms: Time) {
        let serial = self.life_serial(n);
        if let Some(Running::Scrub(r)) = &mut self.nodes[n].life.running {
            r.phase = ScrubPhase::Sleeping;
        }
        self.schedule(self.now + ms, Ev::NodeWake { node: n, serial });
    }

    pub(crate) fn node_wake(&mut self, n: usize, serial: u64) {
        if serial != self.nodes[n].life.serial {
            return;
        }
        if let Some(Running::Scrub(r)) = self.nodes[n].life.running.clone() {
            self.scrub_start(n, r.stripe, r.attempt + 1);
        }
    }

    fn scrub_read_done(&mut self, n: usize, stripe: u64, attempt: usize, replies: Vec<Got>) {
        let k = self.cfg.k;
        let last = attempt + 1 == real::SCRUB_ATTEMPTS;
        let got: Vec<(usize, Vec<u64>, Vec<u8>)> = replies
            .into_iter()
            .enumerate()
            .filter_map(|(p, r)| r.map(|(v, d)| (p, v, d)))
            .collect();
        let seen: Vec<Seen> = got
            .iter()
            .map(|g| Seen {
                position: g.0,
                versions: g.1.clone(),
            })
            .collect();
        let Some(choice) = select::choose(k, &seen) else {
            if got.len() >= k && !last {
                self.scrub_sleep(n, 10 << attempt);
            } else {
                self.log(format!("n{n}: scrub of s{stripe}: no k blocks agree"));
                self.life_done(n);
            }
            return;
        };
        let v = choice.versions.clone();
        let agree: Vec<usize> = (0..got.len())
            .filter(|&i| select::agrees(k, &seen[i], &v))
            .collect();
        let tracked = |p: usize| if p < k { p..p + 1 } else { 0..k };
        let behind: Vec<usize> = (0..got.len())
            .filter(|&i| !agree.contains(&i) && tracked(got[i].0).all(|j| got[i].1[j] <= v[j]))
            .collect();
        if agree.len() + behind.len() < got.len() && !last {
            self.scrub_sleep(n, 10 << attempt);
            return;
        }
        // The parity equations among the agreeing blocks (I1).
        let present: Vec<(usize, &[u8])> = choice
            .chosen
            .iter()
            .map(|&i| (got[i].0, &got[i].2[..]))
            .collect();
        let others: Vec<usize> = agree
            .iter()
            .copied()
            .filter(|i| !choice.chosen.contains(i))
            .collect();
        let wanted: Vec<usize> = others.iter().map(|&i| got[i].0).collect();
        let consistent = match self.codec.reconstruct(&present, &wanted) {
            Ok(blocks) => blocks
                .iter()
                .zip(&others)
                .all(|(b, &i)| b[..] == got[i].2[..]),
            Err(_) => false,
        };
        if !consistent {
            self.fail(
                "I1 stripe consistency (found by a scrub)",
                format!("n{n}: s{stripe}: blocks that agree on versions {v:?} do not satisfy the parity equations: {got:02x?}"),
            );
            return;
        }
        let lagging: Vec<u8> = behind
            .iter()
            .flat_map(|&i| {
                tracked(got[i].0)
                    .filter(|&j| got[i].1[j] < v[j])
                    .map(|j| j as u8)
                    .collect::<Vec<_>>()
            })
            .collect();
        let sources: Vec<(usize, Vec<u8>)> = agree
            .iter()
            .take(k)
            .map(|&i| (got[i].0, got[i].2.clone()))
            .collect();
        let plan = Plan {
            versions: v,
            lagging,
            sources,
            fixes: behind.iter().map(|&i| got[i].0).collect(),
        };
        if plan.lagging.is_empty() {
            self.scrub_fix(n, stripe, plan);
            return;
        }
        // A member behind on a block locked somewhere is most likely waiting for an
        // update in flight: look at the locks first.
        let serial = self.life_serial(n);
        let width = self.width();
        for p in 0..width {
            let to = self.member(stripe, p);
            self.call(Addr::Node(n), to, Req::List, Purpose::ScrubList { serial });
        }
        if let Some(Running::Scrub(r)) = &mut self.nodes[n].life.running {
            r.phase = ScrubPhase::Listing {
                plan,
                locked: BTreeSet::new(),
                outstanding: width,
            };
        }
    }

    fn scrub_fix(&mut self, n: usize, stripe: u64, plan: Plan) {
        if plan.fixes.is_empty() {
            self.life_done(n);
            return;
        }
        let serial = self.life_serial(n);
        let present: Vec<(usize, &[u8])> = plan.sources.iter().map(|(p, d)| (*p, &d[..])).collect();
        let mut sent = 0;
        for &p in &plan.fixes {
            let Ok(mut b) = self.codec.reconstruct(&present, &[p]) else {
                continue;
            };
            let data = b.pop().unwrap_or_default();
            let to = self.member(stripe, p);
            let req = Req::Repair {
                stripe,
                position: p as u8,
                versions: plan.versions.clone(),
                data,
            };
            self.call(Addr::Node(n), to, req, Purpose::ScrubInstall { serial });
            sent += 1;
        }
        if sent == 0 {
            self.life_done(n);
            return;
        }
        if let Some(Running::Scrub(r)) = &mut self.nodes[n].life.running {
            r.phase = ScrubPhase::Installing { outstanding: sent };
        }
    }

    /// Answers to the lifecycle's requests.
    pub(crate) fn life_answer(
        &mut self,
        n: usize,
        _to: usize,
        purpose: Purpose,
        resp: Option<Resp>,
    ) {
        let current = self.nodes[n].life.serial;
        match purpose {
            Purpose::VerifyList { serial } if serial == current => {
                let done = match &mut self.nodes[n].life.running {
                    Some(Running::List { views, outstanding }) => {
                        if let Some(Resp::List(v)) = resp {
                            views.extend(v);
                        }
                        *outstanding -= 1;
                        *outstanding == 0
                    }
                    _ => false,
                };
                if done {
                    if let Some(Running::List { views, .. }) = self.nodes[n].life.running.take() {
                        let stripes: Vec<u64> = self.nodes[n].slots.keys().copied().collect();
                        for s in stripes.into_iter().rev() {
                            let theirs = views.iter().filter(|v| v.stripe == s).cloned().collect();
                            self.nodes[n]
                                .life
                                .jobs
                                .push_front(LifeJob::VerifySlot { stripe: s, theirs });
                        }
                    }
                    self.life_run(n);
                }
            }
            Purpose::ScrubRead { serial, position } if serial == current => {
                let done = match &mut self.nodes[n].life.running {
                    Some(Running::Scrub(ScrubRun {
                        phase:
                            ScrubPhase::Reading {
                                replies,
                                outstanding,
                            },
                        ..
                    })) => {
                        if let Some(Resp::Read { versions, data }) = resp {
                            replies[position] = Some((versions, data));
                        }
                        *outstanding -= 1;
                        *outstanding == 0
                    }
                    _ => false,
                };
                if done {
                    if let Some(Running::Scrub(r)) = self.nodes[n].life.running.clone() {
                        if let ScrubPhase::Reading { replies, .. } = r.phase {
                            self.scrub_read_done(n, r.stripe, r.attempt, replies);
                        }
                    }
                }
            }
            Purpose::ScrubList { serial } if serial == current => {
                let done = match &mut self.nodes[n].life.running {
                    Some(Running::Scrub(ScrubRun {
                        stripe,
                        phase:
                            ScrubPhase::Listing {
                                locked,
                                outstanding,
                                ..
                            },
                        ..
                    })) => {
                        if let Some(Resp::List(v)) = resp {
                            for s in v.iter().filter(|s| s.stripe == *stripe) {
                                locked.extend(s.locks.iter().copied());
                            }
                        }
                        *outstanding -= 1;
                        *outstanding == 0
                    }
                    _ => false,
                };
                if done {
                    if let Some(Running::Scrub(r)) = self.nodes[n].life.running.clone() {
                        if let ScrubPhase::Listing { plan, locked, .. } = r.phase {
                            let last = r.attempt + 1 == real::SCRUB_ATTEMPTS;
                            if plan.lagging.iter().any(|i| locked.contains(i)) {
                                if last {
                                    self.log(format!("n{n}: scrub of s{} found it busy", r.stripe));
                                    self.life_done(n);
                                } else {
                                    self.scrub_sleep(n, 20 << r.attempt);
                                }
                            } else {
                                self.scrub_fix(n, r.stripe, plan);
                            }
                        }
                    }
                }
            }
            Purpose::ScrubInstall { serial } if serial == current => {
                let done = match &mut self.nodes[n].life.running {
                    Some(Running::Scrub(ScrubRun {
                        phase: ScrubPhase::Installing { outstanding },
                        ..
                    })) => {
                        *outstanding -= 1;
                        *outstanding == 0
                    }
                    _ => false,
                };
                if done {
                    self.life_done(n);
                }
            }
            _ => {}
        }
    }
}
