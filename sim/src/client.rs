//! A simulated client: writes (drs-client write.rs), leases, heartbeats and
//! completion notices (lease.rs), background unlocks (backlog.rs), and degraded
//! reads decoded from the k replies `drs_client::select::choose` picks.
//!
//! Each write follows `write_stripe` for one block: lock at every member under a
//! fresh owner id (retry with a random, growing backoff while another owner holds
//! it or a member is still settling an update of it), base = the highest version any
//! member knows, next version = one past the base and past any version a member says
//! a fenced holder may have given out, old bytes at the base from lock-and-read (or
//! zeros, or decoded from the stripe under the lock), delta = old XOR new, one
//! update-and-unlock (carrying version and base) per member that granted,
//! acknowledgement rules and catch-up unlocks as `commit_stripe`. A request that
//! times out makes the member count as failed.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use drs_client::select::{choose_at_least, Seen};
use drs_codec::Codec;
use drs_lockgroups::UpdateKey;
use rand::Rng;

use crate::scenario::{real, ClientPlan, Hook, ScriptOp};
use crate::types::{Addr, BlockUpdate, Ev, LockRead, Req, Resp, Time, UnlockOrigin, WireErr};
use crate::world::World;

/// What an answer is for.
#[derive(Debug, Clone)]
pub(crate) enum Purpose {
    Lock {
        serial: u64,
        position: usize,
        completed: Vec<UpdateKey>,
    },
    Release {
        serial: u64,
        node: usize,
        stripe: u64,
        owner: u64,
        blocks: Vec<(u8, u64)>,
    },
    Commit {
        serial: u64,
        slot: usize,
    },
    Read {
        serial: u64,
        slot: usize,
    },
    Heartbeat {
        node: usize,
        sent: Time,
        completed: Vec<UpdateKey>,
    },
    Backlog {
        key: BacklogKey,
        blocks: Vec<(u8, u64)>,
        /// Sent before the lock of attempt `.0` at position `.1` (backlog.rs
        /// `deliver_unlocks`): that lock follows the answer.
        lock: Option<(u64, usize)>,
    },
    /// A node's relay (answered to the node).
    Relay {
        run: u64,
        position: u8,
    },
    /// A node's scrub reading the stripe.
    ScrubRead {
        serial: u64,
        position: usize,
    },
    /// A node's scrub looking for locks.
    ScrubList {
        serial: u64,
    },
    /// A node's scrub installing a rebuilt block.
    ScrubInstall {
        serial: u64,
    },
    /// A node's verify round listing the other nodes.
    VerifyList {
        serial: u64,
    },
}

/// lease.rs `NodeLease`.
#[derive(Debug, Default, Clone)]
struct NodeLease {
    held: BTreeSet<(u64, u64)>,
    confirmed_at: Option<Time>,
    last_heartbeat: Option<Time>,
    heartbeat_out: bool,
    completed: Vec<UpdateKey>,
}

#[derive(Debug, Clone)]
pub(crate) enum LockAns {
    Granted {
        known: Vec<(u8, u64)>,
        fenced: Vec<(u8, u64)>,
        read: Option<LockRead>,
    },
    Held,
    Fenced,
    Failed,
}

/// One write in progress.
#[derive(Debug, Clone)]
pub(crate) struct Write {
    pub stripe: u64,
    pub index: u8,
    pub offset: usize,
    pub data: Vec<u8>,
    /// The client's write number (for hooks).
    pub number: usize,
    pub owner: u64,
    /// The client identity the lock was taken under.
    pub client: u64,
    pub attempt: u32,
    pub started: Time,
    pub lock_sent: Time,
    /// Positions the current attempt's lock request was sent to.
    pub sent_to: Vec<bool>,
    pub answers: Vec<Option<LockAns>>,
    pub granted: Vec<bool>,
    /// The version the update is built on (its old bytes are the block at `base`).
    pub base: u64,
    /// The version the update gives the block.
    pub next: u64,
    pub old: Option<Vec<u8>>,
    pub old_tries: u32,
    /// The lock phase succeeded and the update-and-unlock has not been answered.
    pub holding: bool,
    /// A lock of this write was released by this client's own backlog (problem 4,
    /// tolerated when not fatal).
    pub lost_to_backlog: bool,
    pub update: Option<BlockUpdate>,
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum After {
    Retry,
    Fail(&'static str),
    Fenced(usize),
}

type ReadReply = Option<(Vec<u64>, Vec<u8>)>;
/// (node, stripe, lock owner): one entry of the unlock backlog.
type BacklogKey = (usize, u64, u64);

#[derive(Debug, Clone)]
pub(crate) enum Phase {
    Idle,
    Sleep,
    Done,
    Locking(Box<Write>),
    Releasing {
        w: Box<Write>,
        outstanding: usize,
        after: After,
    },
    Backoff(Box<Write>),
    OldRead {
        w: Box<Write>,
        replies: Vec<(usize, ReadReply)>,
        outstanding: usize,
    },
    OldReadSleep(Box<Write>),
    PausedBeforeSend(Box<Write>, Vec<u8>),
    Committing {
        w: Box<Write>,
        results: Vec<(usize, Option<Resp>)>,
        outstanding: usize,
    },
    Reading {
        stripe: u64,
        index: u8,
        replies: Vec<(usize, ReadReply)>,
        outstanding: usize,
    },
    /// Crashed at a hook in the middle of a write (kept for the I4 check).
    Dead(Box<Write>),
}

impl Phase {
    pub(crate) fn write_mut(&mut self) -> Option<&mut Write> {
        match self {
            Phase::Locking(w)
            | Phase::Backoff(w)
            | Phase::OldReadSleep(w)
            | Phase::PausedBeforeSend(w, _)
            | Phase::Dead(w) => Some(w),
            Phase::Releasing { w, .. } | Phase::OldRead { w, .. } | Phase::Committing { w, .. } => {
                Some(w)
            }
            _ => None,
        }
    }

    pub(crate) fn write(&self) -> Option<&Write> {
        match self {
            Phase::Locking(w)
            | Phase::Backoff(w)
            | Phase::OldReadSleep(w)
            | Phase::PausedBeforeSend(w, _)
            | Phase::Dead(w) => Some(w),
            Phase::Releasing { w, .. } | Phase::OldRead { w, .. } | Phase::Committing { w, .. } => {
                Some(w)
            }
            _ => None,
        }
    }
}

/// What became of one operation (for the targeted tests and the statistics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpRecord {
    pub client: usize,
    pub what: String,
    pub result: Result<(), String>,
    /// The update a write sent, if it got that far.
    pub update: Option<UpdateKey>,
    pub at: Time,
}

pub struct Client {
    pub idx: usize,
    pub plan: ClientPlan,
    /// The current client id (replaced when a node fences it).
    pub id: u64,
    seq: u64,
    pub alive: bool,
    pub paused_until: Option<Time>,
    script: VecDeque<ScriptOp>,
    writes_started: usize,
    leases: BTreeMap<usize, NodeLease>,
    hb_running: bool,
    backlog: BTreeMap<BacklogKey, Vec<(u8, u64)>>,
    backlog_out: BTreeSet<BacklogKey>,
    backlog_running: bool,
    /// Lock requests waiting for a backlog delivery already on its way to their node:
    /// (attempt serial, position).
    lock_after_backlog: BTreeMap<BacklogKey, (u64, usize)>,
    pub(crate) phase: Phase,
    serial: u64,
    pub(crate) ids: Vec<u64>,
}

impl Client {
    pub fn new(idx: usize, plan: ClientPlan) -> Client {
        let script = plan.script.iter().cloned().collect();
        Client {
            idx,
            plan,
            id: 0,
            seq: 1,
            alive: true,
            paused_until: None,
            script,
            writes_started: 0,
            leases: BTreeMap::new(),
            hb_running: false,
            backlog: BTreeMap::new(),
            backlog_out: BTreeSet::new(),
            backlog_running: false,
            lock_after_backlog: BTreeMap::new(),
            phase: Phase::Idle,
            serial: 0,
            ids: Vec::new(),
        }
    }

    /// Finished its script, or dead.
    pub fn done(&self) -> bool {
        !self.alive || matches!(self.phase, Phase::Done)
    }

    pub fn backlog_len(&self) -> usize {
        self.backlog.len()
    }

    pub fn phase_name(&self) -> &'static str {
        match self.phase {
            Phase::Idle => "idle",
            Phase::Sleep => "sleep",
            Phase::Done => "done",
            Phase::Locking(_) => "locking",
            Phase::Releasing { .. } => "releasing",
            Phase::Backoff(_) => "backoff",
            Phase::OldRead { .. } => "old-read",
            Phase::OldReadSleep(_) => "old-read-sleep",
            Phase::PausedBeforeSend(..) => "paused-before-send",
            Phase::Committing { .. } => "committing",
            Phase::Reading { .. } => "reading",
            Phase::Dead(_) => "dead",
        }
    }
}

impl World {
    fn new_serial(&mut self, c: usize) -> u64 {
        self.clients[c].serial += 1;
        self.clients[c].serial
    }

    fn wake_after(&mut self, c: usize, ms: Time) {
        let serial = self.new_serial(c);
        self.schedule(self.now + ms, Ev::ClientWake { client: c, serial });
    }

    fn hook(&self, c: usize, number: usize) -> Option<Hook> {
        self.clients[c]
            .plan
            .hooks
            .iter()
            .find(|(n, _)| *n == number)
            .map(|(_, h)| *h)
    }

    pub(crate) fn crash_client(&mut self, c: usize, why: &str) {
        if self.clients[c].alive {
            self.clients[c].alive = false;
            self.stats.crashes += 1;
            self.log(format!("c{c} CRASHES {why}"));
        }
    }

    pub(crate) fn client_wake(&mut self, c: usize, serial: u64) {
        if serial != self.clients[c].serial {
            return;
        }
        match std::mem::replace(&mut self.clients[c].phase, Phase::Idle) {
            Phase::Idle | Phase::Sleep => self.next_op(c),
            Phase::Backoff(w) => self.start_lock(c, w),
            Phase::OldReadSleep(w) => self.start_old_read(c, w),
            Phase::PausedBeforeSend(w, delta) => self.send_updates(c, w, delta),
            other => self.clients[c].phase = other,
        }
    }

    fn next_op(&mut self, c: usize) {
        match self.clients[c].script.pop_front() {
            None => {
                self.clients[c].phase = Phase::Done;
                self.log(format!("c{c} script done"));
            }
            Some(ScriptOp::Sleep(ms)) => {
                self.clients[c].phase = Phase::Sleep;
                self.wake_after(c, ms);
            }
            Some(ScriptOp::Write {
                stripe,
                index,
                offset,
                data,
            }) => {
                let number = self.clients[c].writes_started;
                self.clients[c].writes_started += 1;
                let owner = self.fresh_client_id();
                self.log(format!(
                    "c{c} WRITE #{number} s{stripe} b{index} [{offset}..{}) = {data:02x?} owner={owner:#x}",
                    offset + data.len()
                ));
                let w = Write {
                    stripe,
                    index,
                    offset,
                    data,
                    number,
                    owner,
                    client: 0,
                    attempt: 0,
                    started: self.now,
                    lock_sent: 0,
                    sent_to: Vec::new(),
                    answers: Vec::new(),
                    granted: Vec::new(),
                    base: 0,
                    next: 0,
                    old: None,
                    old_tries: 0,
                    holding: false,
                    lost_to_backlog: false,
                    update: None,
                };
                self.start_lock(c, Box::new(w));
            }
            Some(ScriptOp::Read { stripe, index, ask }) => {
                self.log(format!(
                    "c{c} READ s{stripe} b{index} from positions {ask:?}"
                ));
                let serial = self.new_serial(c);
                let mut replies = Vec::new();
                for (slot, &p) in ask.iter().enumerate() {
                    let node = self.member(stripe, p);
                    let req = Req::Read {
                        stripe,
                        position: p as u8,
                        applied: false,
                    };
                    replies.push((p, None));
                    self.call(Addr::Client(c), node, req, Purpose::Read { serial, slot });
                }
                let outstanding = replies.len();
                self.clients[c].phase = Phase::Reading {
                    stripe,
                    index,
                    replies,
                    outstanding,
                };
            }
        }
    }

    fn finish_op(
        &mut self,
        c: usize,
        what: String,
        result: Result<(), String>,
        update: Option<UpdateKey>,
    ) {
        match (&result, what.starts_with("write")) {
            (Ok(()), true) => self.stats.writes_ok += 1,
            (Err(_), true) => self.stats.writes_failed += 1,
            (Ok(()), false) => self.stats.reads_ok += 1,
            (Err(_), false) => self.stats.reads_failed += 1,
        }
        self.log(format!("c{c} {what} -> {result:?}"));
        self.ledger.ops.push(OpRecord {
            client: c,
            what,
            result,
            update,
            at: self.now,
        });
        self.clients[c].phase = Phase::Idle;
        let think = self.clients[c].plan.think_ms;
        let ms = if think == 0 {
            0
        } else {
            self.rng.gen_range(0..=think)
        };
        self.wake_after(c, ms);
    }

    fn write_name(w: &Write) -> String {
        format!("write #{} s{} b{}", w.number, w.stripe, w.index)
    }

    // ----- lock (write.rs lock_stripe) -----

    fn start_lock(&mut self, c: usize, mut w: Box<Write>) {
        let n = self.width();
        w.client = self.clients[c].id;
        w.lock_sent = self.now;
        w.answers = vec![None; n];
        w.sent_to = vec![false; n];
        let serial = self.new_serial(c);
        self.clients[c].phase = Phase::Locking(w);
        for p in 0..n {
            self.lock_member(c, serial, p);
        }
    }

    /// write.rs `lock_member`: the unlocks of the same owner queued for the node go
    /// first (backlog.rs `deliver_unlocks`: wait for one on its way, send what is
    /// queued, and lock only once it is answered), then the lock request.
    fn lock_member(&mut self, c: usize, serial: u64, p: usize) {
        if serial != self.clients[c].serial {
            return;
        }
        let Phase::Locking(w) = &self.clients[c].phase else {
            return;
        };
        let (stripe, owner, client, index) = (w.stripe, w.owner, w.client, w.index);
        let read = (p == index as usize).then_some((w.offset, w.data.len()));
        let node = self.member(stripe, p);
        if !self.cfg.variant.old_backlog {
            let key = (node, stripe, owner);
            if self.clients[c].backlog_out.contains(&key) {
                self.clients[c].lock_after_backlog.insert(key, (serial, p));
                return;
            }
            if let Some(blocks) = self.clients[c].backlog.get(&key).cloned() {
                self.clients[c].backlog_out.insert(key);
                let req = Req::Unlock {
                    stripe,
                    owner,
                    blocks: blocks.clone(),
                    origin: UnlockOrigin::Backlog { after_lock: false },
                };
                let purpose = Purpose::Backlog {
                    key,
                    blocks,
                    lock: Some((serial, p)),
                };
                self.call(Addr::Client(c), node, req, purpose);
                return;
            }
        }
        let completed = self.take_completed(c, node);
        let req = Req::Lock {
            stripe,
            owner,
            client,
            index,
            read,
            lease_ms: self.cfg.lease_ms,
            completed: completed.clone(),
        };
        let purpose = Purpose::Lock {
            serial,
            position: p,
            completed,
        };
        if let Phase::Locking(w) = &mut self.clients[c].phase {
            w.sent_to[p] = true;
        }
        self.call(Addr::Client(c), node, req, purpose);
    }

    fn lock_answer(
        &mut self,
        c: usize,
        node: usize,
        position: usize,
        completed: Vec<UpdateKey>,
        resp: Option<Resp>,
    ) {
        let (stripe, owner, sent) = match &self.clients[c].phase {
            Phase::Locking(w) => (w.stripe, w.owner, w.lock_sent),
            _ => return,
        };
        let ans = match resp {
            Some(Resp::Lock {
                known,
                fenced,
                read,
            }) => {
                self.note_locked(c, node, stripe, owner, sent);
                LockAns::Granted {
                    known,
                    fenced,
                    read,
                }
            }
            Some(Resp::Error(WireErr::Locked { .. })) => LockAns::Held,
            // An update of the block is being passed on between the members: as good
            // as held for a moment.
            Some(Resp::Error(WireErr::Settling { .. })) => LockAns::Held,
            Some(Resp::Error(WireErr::Fenced)) => LockAns::Fenced,
            Some(_) => {
                self.return_completed(c, node, completed);
                LockAns::Failed
            }
            None => {
                self.return_completed(c, node, completed);
                LockAns::Failed
            }
        };
        let all = match &mut self.clients[c].phase {
            Phase::Locking(w) => {
                w.answers[position] = Some(ans);
                w.answers.iter().all(|a| a.is_some())
            }
            _ => false,
        };
        if all {
            if let Phase::Locking(w) = std::mem::replace(&mut self.clients[c].phase, Phase::Idle) {
                self.lock_decide(c, w);
            }
        }
    }

    fn lock_decide(&mut self, c: usize, mut w: Box<Write>) {
        let answers: Vec<LockAns> = w.answers.iter().flatten().cloned().collect();
        if let Some(p) = answers.iter().position(|a| matches!(a, LockAns::Fenced)) {
            let node = self.member(w.stripe, p);
            self.start_release(c, w, After::Fenced(node));
            return;
        }
        if answers.iter().any(|a| matches!(a, LockAns::Held)) {
            self.start_release(c, w, After::Retry);
            return;
        }
        let granted: Vec<bool> = answers
            .iter()
            .map(|a| matches!(a, LockAns::Granted { .. }))
            .collect();
        let live = granted.iter().filter(|g| **g).count();
        if live < self.cfg.min_write {
            self.start_release(c, w, After::Fail("NotEnoughNodes"));
            return;
        }
        // The base: the highest version any member knows was given out. The next
        // version: past the base and past anything a fenced holder may have given out
        // without any member here learning of it.
        let mut base = 0;
        let mut next = 0;
        for a in &answers {
            if let LockAns::Granted { known, fenced, .. } = a {
                for (i, v) in known {
                    if *i == w.index {
                        base = base.max(*v);
                    }
                }
                for (i, v) in known.iter().chain(fenced) {
                    if *i == w.index {
                        next = next.max(*v);
                    }
                }
            }
        }
        next += 1;
        let want = base;
        let i = w.index as usize;
        let mut old = None;
        if let Some(LockAns::Granted { read: Some(r), .. }) = answers.get(i) {
            match r {
                LockRead::Block { versions, data } if versions.get(i) == Some(&want) => {
                    old = Some(data.clone());
                }
                LockRead::Zero if want == 0 => old = Some(vec![0; w.data.len()]),
                _ => {}
            }
        }
        if want == 0 && old.is_none() {
            old = Some(vec![0; w.data.len()]);
        }
        w.granted = granted;
        w.base = base;
        w.next = next;
        w.old = old;
        w.holding = true;
        self.log(format!(
            "c{c} holds s{} b{} owner={:#x} granted={:?} base=v{base} next=v{next}",
            w.stripe, w.index, w.owner, w.granted
        ));
        if !w.lost_to_backlog {
            if let Some(node) = self.granted_lock_lost(&w) {
                self.report_lock_lost(c, node, w.stripe, w.index, w.owner);
            }
        }
        if self.hook(c, w.number) == Some(Hook::CrashAfterLock) {
            self.clients[c].phase = Phase::Dead(w);
            self.crash_client(c, "after lock");
            return;
        }
        if w.old.is_some() {
            self.after_old(c, w);
        } else {
            self.start_old_read(c, w);
        }
    }

    /// write.rs `release`: unlock at every member; members that do not answer get
    /// it again from the backlog.
    fn start_release(&mut self, c: usize, mut w: Box<Write>, after: After) {
        w.holding = false;
        // This attempt's locks are being given up: none of them is counted on now.
        w.sent_to.iter_mut().for_each(|s| *s = false);
        let n = self.width();
        let serial = self.new_serial(c);
        let blocks = vec![(w.index, 0)];
        for p in 0..n {
            let node = self.member(w.stripe, p);
            let req = Req::Unlock {
                stripe: w.stripe,
                owner: w.owner,
                blocks: blocks.clone(),
                origin: UnlockOrigin::Release,
            };
            let purpose = Purpose::Release {
                serial,
                node,
                stripe: w.stripe,
                owner: w.owner,
                blocks: blocks.clone(),
            };
            self.call(Addr::Client(c), node, req, purpose);
        }
        self.clients[c].phase = Phase::Releasing {
            w,
            outstanding: n,
            after,
        };
    }

    fn after_release(&mut self, c: usize, mut w: Box<Write>, after: After) {
        match after {
            After::Retry => {
                if self.now >= w.started + self.cfg.lock_timeout_ms {
                    let name = Self::write_name(&w);
                    self.finish_op(c, name, Err("Locked".into()), None);
                    return;
                }
                self.stats.lock_retries += 1;
                let cap = 2u64 << w.attempt.min(6);
                let ms = self.rng.gen_range(1..=cap);
                w.attempt += 1;
                self.clients[c].phase = Phase::Backoff(w);
                self.wake_after(c, ms);
            }
            After::Fail(why) => {
                let name = Self::write_name(&w);
                self.finish_op(c, name, Err(why.into()), w.update.map(|u| u.id));
            }
            After::Fenced(node) => {
                self.fenced(c, node);
                let name = Self::write_name(&w);
                self.finish_op(c, name, Err("Fenced".into()), None);
            }
        }
    }

    // ----- old bytes decoded from the stripe (write.rs old_bytes) -----

    fn start_old_read(&mut self, c: usize, w: Box<Write>) {
        let n = self.width();
        let serial = self.new_serial(c);
        let mut replies = Vec::new();
        for p in 0..n {
            let node = self.member(w.stripe, p);
            replies.push((p, None));
            let req = Req::Read {
                stripe: w.stripe,
                position: p as u8,
                applied: false,
            };
            self.call(
                Addr::Client(c),
                node,
                req,
                Purpose::Read { serial, slot: p },
            );
        }
        self.clients[c].phase = Phase::OldRead {
            w,
            replies,
            outstanding: n,
        };
    }

    fn old_read_decide(&mut self, c: usize, mut w: Box<Write>, replies: Vec<(usize, ReadReply)>) {
        let want = w.base;
        let i = w.index as usize;
        match self.decode(c, w.stripe, w.index, want, &replies) {
            Some((versions, value)) if versions.get(i) == Some(&want) => {
                w.old = Some(value[w.offset..w.offset + w.data.len()].to_vec());
                self.after_old(c, w);
            }
            // No k replies agree on the block at the base yet (an update of it is
            // being relayed): try again, for one request timeout in all.
            _ => {
                w.old_tries += 1;
                let tries = (self.cfg.request_timeout_ms / real::OLD_READ_SLEEP).max(1);
                if u64::from(w.old_tries) < tries {
                    self.clients[c].phase = Phase::OldReadSleep(w);
                    self.wake_after(c, real::OLD_READ_SLEEP);
                } else {
                    self.start_release(c, w, After::Fail("Unavailable"));
                }
            }
        }
    }

    fn after_old(&mut self, c: usize, w: Box<Write>) {
        if self.hook(c, w.number) == Some(Hook::CrashAfterOldBytes) {
            self.clients[c].phase = Phase::Dead(w);
            self.crash_client(c, "after old bytes");
            return;
        }
        let Some(old) = w.old.clone() else {
            self.start_release(c, w, After::Fail("no old bytes"));
            return;
        };
        let mut delta = old;
        let r = Codec::xor_into(&w.data, &mut delta);
        debug_assert!(r.is_ok());
        // commit_stripe: a stalled client must not send under a lease that may be gone:
        // min_write of the members that granted must have confirmed it recently.
        let n = self.width();
        let confirmed = (0..n)
            .filter(|&p| w.granted[p] && self.lease_ok(c, self.member(w.stripe, p)))
            .count();
        if confirmed < self.cfg.min_write {
            self.start_release(c, w, After::Fail("LeaseExpired"));
            return;
        }
        if let Some(Hook::PauseBeforeSend(ms)) = self.hook(c, w.number) {
            self.clients[c].phase = Phase::PausedBeforeSend(w, delta);
            self.pause_client(c, ms);
            self.wake_after(c, 0);
            return;
        }
        self.send_updates(c, w, delta);
    }

    // ----- update-and-unlock (write.rs commit_stripe) -----

    fn send_updates(&mut self, c: usize, mut w: Box<Write>, delta: Vec<u8>) {
        let k = self.cfg.k;
        let n = self.width();
        let seq = self.clients[c].seq;
        self.clients[c].seq += 1;
        let u = BlockUpdate {
            id: (w.client, seq),
            index: w.index,
            version: w.next,
            base: w.base,
            offset: w.offset,
            len: w.data.len(),
        };
        w.update = Some(u);
        self.ledger.intent(u, w.stripe, &w.data);
        // The versions given out: only for the blocks updated (here always the one
        // block locked).
        let unlock = vec![(w.index, w.next)];
        let i = w.index as usize;
        let order: Vec<usize> = std::iter::once(i)
            .chain(k..n)
            .chain((0..k).filter(|p| *p != i))
            .filter(|p| w.granted[*p])
            .collect();
        let limit = match self.hook(c, w.number) {
            Some(Hook::CrashAfterSending(j)) => Some(j),
            _ => None,
        };
        let serial = self.new_serial(c);
        let mut results = Vec::new();
        for (slot, &p) in order.iter().enumerate() {
            if limit.is_some_and(|j| slot >= j) {
                break;
            }
            let node = self.member(w.stripe, p);
            let req = if p >= k || p == i {
                Req::Update {
                    stripe: w.stripe,
                    position: p as u8,
                    owner: w.owner,
                    update: u,
                    delta: delta.clone(),
                    unlock: unlock.clone(),
                    relay: false,
                    completed: self.take_completed(c, node),
                }
            } else {
                Req::Unlock {
                    stripe: w.stripe,
                    owner: w.owner,
                    blocks: unlock.clone(),
                    origin: UnlockOrigin::Commit,
                }
            };
            results.push((p, None));
            self.call(Addr::Client(c), node, req, Purpose::Commit { serial, slot });
        }
        if let Some(j) = limit {
            self.clients[c].phase = Phase::Dead(w);
            self.crash_client(c, &format!("after sending {j} update-and-unlock messages"));
            return;
        }
        let outstanding = results.len();
        self.clients[c].phase = Phase::Committing {
            w,
            results,
            outstanding,
        };
    }

    fn commit_decide(&mut self, c: usize, mut w: Box<Write>, results: Vec<(usize, Option<Resp>)>) {
        let Some(u) = w.update else {
            return;
        };
        let n = self.width();
        let mut acked = 0;
        let mut failed: Vec<usize> = (0..n)
            .filter(|p| !w.granted[*p])
            .map(|p| self.member(w.stripe, p))
            .collect();
        let mut conflict = false;
        let mut fenced = None;
        let mut taken = false;
        let mut complete = true;
        let mut holders = Vec::new();
        // Positions that hold the update durably.
        let mut held = Vec::new();
        for (p, r) in results {
            let node = self.member(w.stripe, p);
            match r {
                Some(Resp::Updated(res)) => {
                    let all_ok = match res {
                        Ok(_) => {
                            taken = true;
                            held.push(p);
                            true
                        }
                        Err(WireErr::StaleVersion { .. }) => {
                            conflict = true;
                            false
                        }
                        Err(WireErr::Fenced) => {
                            fenced = Some(node);
                            false
                        }
                        Err(_) => false,
                    };
                    if all_ok {
                        acked += 1;
                        self.note_unlocked(c, node, w.stripe, w.owner);
                        holders.push(node);
                    } else {
                        complete = false;
                        failed.push(node);
                    }
                }
                Some(Resp::Unlocked) => {
                    acked += 1;
                    self.note_unlocked(c, node, w.stripe, w.owner);
                }
                Some(Resp::Error(WireErr::Fenced)) => {
                    fenced = Some(node);
                    complete = false;
                }
                _ => {
                    complete = false;
                    failed.push(node);
                }
            }
        }
        // write.rs `completions`: complete once every member that must hold the
        // update (its data node and every parity node) acknowledged it; those
        // members are told. `Variant::old_completion`: once every member that
        // granted the lock acknowledged everything; the holders are told.
        if self.cfg.variant.old_completion {
            if complete {
                for node in holders {
                    self.note_complete(c, node, vec![u.id]);
                }
            }
        } else {
            let must: Vec<usize> = std::iter::once(w.index as usize)
                .chain(self.cfg.k..n)
                .collect();
            if must.iter().all(|p| held.contains(p)) {
                for p in must {
                    let node = self.member(w.stripe, p);
                    self.note_complete(c, node, vec![u.id]);
                }
            }
        }
        let missed = vec![(w.index, if taken { w.next } else { 0 })];
        for node in failed {
            self.defer_unlock(c, node, w.stripe, w.owner, missed.clone());
        }
        w.holding = false;
        let name = Self::write_name(&w);
        let result = if let Some(node) = fenced {
            self.fenced(c, node);
            Err("Fenced".to_string())
        } else if conflict {
            Err("StaleVersion".to_string())
        } else if acked < self.cfg.min_write {
            Err(format!("NotDurable (acked {acked})"))
        } else {
            Ok(())
        };
        self.finish_op(c, name, result, Some(u.id));
    }

    // ----- reads -----

    /// Decodes data block `index` from the k replies `select::choose_at_least` picks
    /// (with block `index` at `at_least` or newer), and checks the value against the
    /// block's history (I3).
    fn decode(
        &mut self,
        c: usize,
        stripe: u64,
        index: u8,
        at_least: u64,
        replies: &[(usize, ReadReply)],
    ) -> Option<(Vec<u64>, Vec<u8>)> {
        let mut seen = Vec::new();
        let mut datas: Vec<&[u8]> = Vec::new();
        for (p, r) in replies {
            if let Some((versions, data)) = r {
                seen.push(Seen {
                    position: *p,
                    versions: versions.clone(),
                });
                datas.push(data);
            }
        }
        let choice = choose_at_least(self.cfg.k, &seen, index as usize, at_least)?;
        let present: Vec<(usize, &[u8])> = choice
            .chosen
            .iter()
            .map(|&j| (seen[j].position, datas[j]))
            .collect();
        let out = self.codec.reconstruct(&present, &[index as usize]).ok()?;
        let value = out.into_iter().next()?;
        let positions: Vec<usize> = present.iter().map(|(p, _)| *p).collect();
        self.log(format!(
            "c{c} decoded s{stripe} b{index} from positions {positions:?} at {:?}: {value:02x?}",
            choice.versions
        ));
        self.check_i3_consistent_reconstruction(stripe, index, &choice.versions, &value, &seen);
        Some((choice.versions, value))
    }

    fn read_decide(&mut self, c: usize, stripe: u64, index: u8, replies: Vec<(usize, ReadReply)>) {
        let what = format!("read s{stripe} b{index}");
        let result = match self.decode(c, stripe, index, 0, &replies) {
            Some(_) => Ok(()),
            None => Err("Unavailable (no k replies agree)".to_string()),
        };
        self.finish_op(c, what, result, None);
    }

    /// An answer (None: timed out) to one of the client's requests.
    pub(crate) fn client_answer(
        &mut self,
        c: usize,
        node: usize,
        purpose: Purpose,
        resp: Option<Resp>,
    ) {
        let current = self.clients[c].serial;
        match purpose {
            Purpose::Lock {
                serial,
                position,
                completed,
            } if serial == current => self.lock_answer(c, node, position, completed, resp),
            Purpose::Release {
                serial,
                node,
                stripe,
                owner,
                blocks,
            } => {
                if matches!(resp, Some(Resp::Unlocked)) {
                    self.note_unlocked(c, node, stripe, owner);
                } else {
                    self.defer_unlock(c, node, stripe, owner, blocks);
                }
                if serial != current {
                    return;
                }
                let done = match &mut self.clients[c].phase {
                    Phase::Releasing { outstanding, .. } => {
                        *outstanding -= 1;
                        *outstanding == 0
                    }
                    _ => false,
                };
                if done {
                    if let Phase::Releasing { w, after, .. } =
                        std::mem::replace(&mut self.clients[c].phase, Phase::Idle)
                    {
                        self.after_release(c, w, after);
                    }
                }
            }
            Purpose::Commit { serial, slot } => {
                if serial != current {
                    return;
                }
                let done = match &mut self.clients[c].phase {
                    Phase::Committing {
                        results,
                        outstanding,
                        ..
                    } => {
                        results[slot].1 = resp;
                        *outstanding -= 1;
                        *outstanding == 0
                    }
                    _ => false,
                };
                if done {
                    if let Phase::Committing { w, results, .. } =
                        std::mem::replace(&mut self.clients[c].phase, Phase::Idle)
                    {
                        self.commit_decide(c, w, results);
                    }
                }
            }
            Purpose::Read { serial, slot } => {
                if serial != current {
                    return;
                }
                let reply = match resp {
                    Some(Resp::Read { versions, data }) => Some((versions, data)),
                    _ => None,
                };
                let done = match &mut self.clients[c].phase {
                    Phase::Reading {
                        replies,
                        outstanding,
                        ..
                    }
                    | Phase::OldRead {
                        replies,
                        outstanding,
                        ..
                    } => {
                        replies[slot].1 = reply;
                        *outstanding -= 1;
                        *outstanding == 0
                    }
                    _ => false,
                };
                if done {
                    match std::mem::replace(&mut self.clients[c].phase, Phase::Idle) {
                        Phase::Reading {
                            stripe,
                            index,
                            replies,
                            ..
                        } => self.read_decide(c, stripe, index, replies),
                        Phase::OldRead { w, replies, .. } => self.old_read_decide(c, w, replies),
                        other => self.clients[c].phase = other,
                    }
                }
            }
            Purpose::Heartbeat {
                node,
                sent,
                completed,
            } => self.hb_answer(c, node, sent, completed, resp),
            Purpose::Backlog { key, blocks, lock } => {
                self.backlog_answer(c, key, blocks, resp, lock)
            }
            _ => {}
        }
    }

    // ----- leases, heartbeats, completion notices (lease.rs) -----

    fn take_completed(&mut self, c: usize, node: usize) -> Vec<UpdateKey> {
        self.clients[c]
            .leases
            .get_mut(&node)
            .map(|n| std::mem::take(&mut n.completed))
            .unwrap_or_default()
    }

    fn return_completed(&mut self, c: usize, node: usize, ids: Vec<UpdateKey>) {
        if !ids.is_empty() {
            self.note_complete(c, node, ids);
        }
    }

    fn note_locked(&mut self, c: usize, node: usize, stripe: u64, owner: u64, sent: Time) {
        let n = self.clients[c].leases.entry(node).or_default();
        n.held.insert((stripe, owner));
        n.confirmed_at = Some(n.confirmed_at.map_or(sent, |t| t.max(sent)));
        self.ensure_heartbeats(c);
    }

    fn note_unlocked(&mut self, c: usize, node: usize, stripe: u64, owner: u64) {
        if let Some(n) = self.clients[c].leases.get_mut(&node) {
            n.held.remove(&(stripe, owner));
        }
    }

    fn note_complete(&mut self, c: usize, node: usize, ids: Vec<UpdateKey>) {
        self.clients[c]
            .leases
            .entry(node)
            .or_default()
            .completed
            .extend(ids);
        self.ensure_heartbeats(c);
    }

    /// The lease at `node` has at least a third of its length left.
    fn lease_ok(&self, c: usize, node: usize) -> bool {
        let lease = self.cfg.lease_ms;
        self.clients[c]
            .leases
            .get(&node)
            .and_then(|n| n.confirmed_at)
            .is_some_and(|t| (self.now - t) * 3 < lease * 2)
    }

    /// A node said this client is fenced: go on under a new identity.
    fn fenced(&mut self, c: usize, by: usize) {
        let old = self.clients[c].id;
        let new = self.fresh_client_id();
        self.clients[c].id = new;
        self.clients[c].ids.push(old);
        self.clients[c].leases.clear();
        self.stats.client_fenced += 1;
        self.log(format!("c{c} fenced by n{by}: id {old:#x} -> {new:#x}"));
    }

    fn ensure_heartbeats(&mut self, c: usize) {
        if !self.clients[c].hb_running {
            self.clients[c].hb_running = true;
            self.schedule(self.now + real::CLIENT_TICK, Ev::ClientHbTick(c));
        }
    }

    pub(crate) fn hb_tick(&mut self, c: usize) {
        let now = self.now;
        let third = self.cfg.lease_ms / 3;
        let backlog: BTreeSet<usize> = self.clients[c].backlog.keys().map(|k| k.0).collect();
        let mut due = Vec::new();
        for (node, n) in self.clients[c].leases.iter_mut() {
            let keep_alive = !n.held.is_empty() || backlog.contains(node);
            let stale = n.last_heartbeat.is_none_or(|t| now - t >= third);
            if !n.heartbeat_out && ((keep_alive && stale) || !n.completed.is_empty()) {
                n.last_heartbeat = Some(now);
                n.heartbeat_out = true;
                due.push((*node, std::mem::take(&mut n.completed)));
            }
        }
        for (node, completed) in due {
            let req = Req::Heartbeat {
                client: self.clients[c].id,
                lease_ms: self.cfg.lease_ms,
                completed: completed.clone(),
            };
            let purpose = Purpose::Heartbeat {
                node,
                sent: now,
                completed,
            };
            self.call(Addr::Client(c), node, req, purpose);
        }
        let idle = self.clients[c]
            .leases
            .iter()
            .all(|(id, n)| n.held.is_empty() && n.completed.is_empty() && !backlog.contains(id));
        if idle {
            self.clients[c].hb_running = false;
        } else {
            self.schedule(now + real::CLIENT_TICK, Ev::ClientHbTick(c));
        }
    }

    fn hb_answer(
        &mut self,
        c: usize,
        node: usize,
        sent: Time,
        completed: Vec<UpdateKey>,
        resp: Option<Resp>,
    ) {
        if let Some(n) = self.clients[c].leases.get_mut(&node) {
            n.heartbeat_out = false;
            if matches!(resp, Some(Resp::Alive)) {
                n.confirmed_at = Some(n.confirmed_at.map_or(sent, |t| t.max(sent)));
            }
        }
        match resp {
            Some(Resp::Alive) => {}
            Some(Resp::Error(WireErr::Fenced)) => self.fenced(c, node),
            _ => self.return_completed(c, node, completed),
        }
    }

    // ----- background unlocks (backlog.rs) -----

    fn defer_unlock(
        &mut self,
        c: usize,
        node: usize,
        stripe: u64,
        owner: u64,
        blocks: Vec<(u8, u64)>,
    ) {
        let entry = self.clients[c]
            .backlog
            .entry((node, stripe, owner))
            .or_default();
        for (i, v) in blocks {
            match entry.iter_mut().find(|(j, _)| *j == i) {
                Some(b) => b.1 = b.1.max(v),
                None => entry.push((i, v)),
            }
        }
        if !self.clients[c].backlog_running {
            self.clients[c].backlog_running = true;
            self.schedule(self.now + real::BACKLOG_ROUND, Ev::ClientBacklogTick(c));
        }
    }

    pub(crate) fn backlog_tick(&mut self, c: usize) {
        let due: Vec<(BacklogKey, Vec<(u8, u64)>)> = self.clients[c]
            .backlog
            .iter()
            .filter(|(k, _)| !self.clients[c].backlog_out.contains(k))
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        for (key, blocks) in due {
            self.clients[c].backlog_out.insert(key);
            // Whether the lock of the owner's current attempt already went to that
            // node (problem 4 bookkeeping, not on the wire).
            let position = self.slot(key.0, key.1).position;
            let after_lock = self.clients[c].phase.write().is_some_and(|w| {
                w.owner == key.2
                    && w.stripe == key.1
                    && w.update.is_none()
                    && w.sent_to.get(position).copied().unwrap_or(false)
            });
            let req = Req::Unlock {
                stripe: key.1,
                owner: key.2,
                blocks: blocks.clone(),
                origin: UnlockOrigin::Backlog { after_lock },
            };
            self.call(
                Addr::Client(c),
                key.0,
                req,
                Purpose::Backlog {
                    key,
                    blocks,
                    lock: None,
                },
            );
        }
        if self.clients[c].backlog.is_empty() && self.clients[c].backlog_out.is_empty() {
            self.clients[c].backlog_running = false;
        } else {
            self.schedule(self.now + real::BACKLOG_ROUND, Ev::ClientBacklogTick(c));
        }
    }

    fn backlog_answer(
        &mut self,
        c: usize,
        key: BacklogKey,
        blocks: Vec<(u8, u64)>,
        resp: Option<Resp>,
        lock: Option<(u64, usize)>,
    ) {
        self.clients[c].backlog_out.remove(&key);
        let delivered = matches!(resp, Some(r) if !matches!(r, Resp::Error(_)));
        if delivered {
            self.note_unlocked(c, key.0, key.1, key.2);
            if self.clients[c].backlog.get(&key) == Some(&blocks) {
                self.clients[c].backlog.remove(&key);
            }
        }
        // A lock waiting for this delivery: on (again) if it went through, else the
        // member counts as failed for this attempt.
        if let Some((serial, p)) = lock {
            if delivered {
                self.lock_member(c, serial, p);
            } else if serial == self.clients[c].serial {
                self.lock_answer(c, key.0, p, Vec::new(), None);
            }
        }
        if let Some((serial, p)) = self.clients[c].lock_after_backlog.remove(&key) {
            self.lock_member(c, serial, p);
        }
    }
}
