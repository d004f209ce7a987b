//! A simulated storage node: the real [`LockGroup`] and [`UnsettledSet`], a model of
//! the block store (store/mod.rs), request admission and handling (node.rs), and the
//! all-or-nothing loop with lease expiry, settling and relays (aon.rs).
//!
//! Each function names the real code it follows (commit df21009 with the fixes of
//! sim/README.md, "Problems found"). Differences: one volume; whole-block reads in
//! `Current` mode only; one update per request; the store's writer takes one job at a
//! time (log + fsync + apply as one step of random length, with the update's deadline
//! checked when the job starts, as the real writer does at the start of a batch; its
//! other decisions are made when the job ends, which the real writer makes before
//! its fsync: the same order, since no lock is granted on a block while an update
//! of it is in the writer); the node's clock is the simulation's, which starts at 0
//! as the real node's uptime clock (`Node::now_ms`) does.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use drs_codec::Codec;
use drs_lockgroups::{Holder, LockGroup, Refused, Unsettled, UnsettledSet, UpdateKey};
use rand::Rng;

use crate::client::Purpose;
use crate::scenario::{real, Config};
use crate::types::{Addr, Applied, BlockUpdate, Ev, LockRead, Req, Resp, Time, WireErr};
use crate::world::World;

/// For some blocks of a slot: the versions known given out, and those a fenced lock
/// holder may have given out beyond them (a lock reply's `known` and `fenced`; as
/// store/mod.rs `Known`).
type Known = (Vec<(u8, u64)>, Vec<(u8, u64)>);

/// An update logged but not yet applicable (it waits for an earlier version).
#[derive(Debug, Clone)]
pub(crate) struct Pending {
    pub update: BlockUpdate,
    pub delta: Vec<u8>,
}

/// One block of the store (store/mod.rs `Slot`).
#[derive(Debug, Clone)]
pub(crate) struct Slot {
    pub position: usize,
    pub block: Vec<u8>,
    /// Applied versions per data index (a data slot tracks only its own).
    pub versions: Vec<u64>,
    /// Highest versions seen (applied, pending, or recorded by an unlock).
    pub known: Vec<u64>,
    /// Highest versions a lock holder fenced here may have given out unseen
    /// (`store.note_fenced`; reported in lock replies as `fenced`).
    pub fenced: Vec<u64>,
    /// Versions (index, from, to] a lock granted here told its owner to skip, with
    /// the owner while tentative (`None`: definite, the owner's update skipped them)
    /// (store/mod.rs `Skip`; not kept with `Variant::old_skip`).
    pub skipped: Vec<(u8, u64, u64, Option<u64>)>,
    pub pending: Vec<Pending>,
    pub recent: VecDeque<UpdateKey>,
    pub written: bool,
    /// Known to be up to date with its stripe (refuses `Current` reads otherwise).
    pub verified: bool,
    /// Since when the block has known of a version it has not applied.
    pub behind_since: Option<Time>,
}

impl Slot {
    pub fn tracked(&self, k: usize) -> std::ops::Range<usize> {
        if self.position < k {
            self.position..self.position + 1
        } else {
            0..k
        }
    }

    pub fn is_behind(&self, k: usize) -> bool {
        self.tracked(k).any(|i| self.known[i] > self.versions[i])
    }
}

#[derive(Debug, Clone)]
pub(crate) enum JobKind {
    Direct {
        owner: u64,
        unlock: Vec<(u8, u64)>,
        update: BlockUpdate,
        delta: Vec<u8>,
    },
    Relay {
        update: BlockUpdate,
        delta: Vec<u8>,
    },
    Install {
        versions: Vec<u64>,
        data: Vec<u8>,
    },
}

/// A store job: one block update, or one install.
#[derive(Debug, Clone)]
pub(crate) struct Job {
    pub stripe: u64,
    pub from: Addr,
    pub call: u64,
    pub deadline: Time,
    pub started: Time,
    pub kind: JobKind,
}

/// A read (or the read half of lock-and-read) waiting for pending updates.
#[derive(Debug, Clone)]
pub(crate) enum Waiter {
    LockRead {
        from: Addr,
        call: u64,
        stripe: u64,
        known: Vec<(u8, u64)>,
        fenced: Vec<(u8, u64)>,
        range: (usize, usize),
    },
    Read {
        from: Addr,
        call: u64,
        stripe: u64,
    },
}

/// A fenced client being settled (aon.rs `settle`).
#[derive(Debug, Clone)]
pub(crate) struct Settle {
    pub client: u64,
    pub until: Time,
    pub outstanding: usize,
}

/// One relay of one unsettled update to the recipients that have not confirmed it.
#[derive(Debug, Clone)]
pub(crate) struct RelayRun {
    pub key: UpdateKey,
    pub outstanding: usize,
    pub settle: Option<u64>,
}

pub struct Node {
    pub id: usize,
    /// The real lock table.
    pub locks: LockGroup,
    /// The real set of unsettled updates, with what is needed to pass them on.
    pub unsettled: UnsettledSet<(BlockUpdate, Vec<u8>)>,
    pub(crate) slots: BTreeMap<u64, Slot>,
    writer: VecDeque<Job>,
    current: Option<Job>,
    inflight: BTreeMap<u64, u32>,
    waiting: BTreeMap<u64, Waiter>,
    /// Relays waiting for a tentative skip of their version to be settled (node.rs
    /// `await_skips`); admitted, so they hold off locks.
    held: BTreeMap<u64, Job>,
    pub(crate) settles: BTreeMap<u64, Settle>,
    pub(crate) relays: BTreeMap<u64, RelayRun>,
    /// Every update id this node ever applied (the ledger of I5; the store itself
    /// remembers only the last few).
    pub(crate) applied_ids: BTreeSet<UpdateKey>,
    /// Store jobs started so far.
    jobs_started: u64,
    /// Rebuilds of stuck blocks and periodic verification (recover.rs).
    pub(crate) life: crate::recover::Life,
    /// The all-or-nothing loop's current sleep (a wake starts a new one).
    pub(crate) aon_serial: u64,
    /// `relay_now` was notified and the loop has not run since (notifications
    /// coalesce, as `Notify::notify_one` stores one permit).
    relay_now: bool,
}

impl Node {
    pub fn new(id: usize, cfg: &Config) -> Node {
        let n = cfg.width();
        let slots = (0..cfg.stripes)
            .map(|s| {
                let position = (id + n - (s as usize) % n) % n;
                (
                    s,
                    Slot {
                        position,
                        block: vec![0; cfg.block],
                        versions: vec![0; cfg.k],
                        known: vec![0; cfg.k],
                        fenced: vec![0; cfg.k],
                        skipped: Vec::new(),
                        pending: Vec::new(),
                        recent: VecDeque::new(),
                        written: false,
                        verified: true,
                        behind_since: None,
                    },
                )
            })
            .collect();
        Node {
            id,
            locks: LockGroup::new(),
            unsettled: UnsettledSet::new(real::UNSETTLED_BYTES),
            slots,
            writer: VecDeque::new(),
            current: None,
            inflight: BTreeMap::new(),
            waiting: BTreeMap::new(),
            held: BTreeMap::new(),
            settles: BTreeMap::new(),
            relays: BTreeMap::new(),
            applied_ids: BTreeSet::new(),
            jobs_started: 0,
            life: crate::recover::Life::default(),
            aon_serial: 0,
            relay_now: false,
        }
    }

    /// What is still in progress (the periodic verification aside): store jobs,
    /// settles, relays, reads waiting, direct updates admitted.
    pub fn busy(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.current.is_some() || !self.writer.is_empty() {
            out.push("store jobs");
        }
        if !self.settles.is_empty() {
            out.push("settles");
        }
        if !self.relays.is_empty() {
            out.push("relays");
        }
        if !self.waiting.is_empty() {
            out.push("waiting reads");
        }
        if !self.held.is_empty() {
            out.push("relays waiting for a skip");
        }
        if !self.inflight.is_empty() {
            out.push("admitted updates");
        }
        out
    }
}

/// The one call into [`LockGroup::lock`] (its signature is the part of the API most
/// likely to change).
fn lock_group_lock(
    lg: &mut LockGroup,
    stripe: u64,
    index: u8,
    owner: u64,
    client: u64,
    lease_ms: u64,
    now: u64,
) -> Result<(), Refused> {
    let who = Holder {
        owner,
        client,
        contact: None,
    };
    lg.lock(stripe, &[index], who, lease_ms, now)
}

pub(crate) fn describe_req(r: &Req) -> String {
    match r {
        Req::Lock {
            stripe,
            owner,
            client,
            index,
            read,
            completed,
            ..
        } => format!(
            "Lock s{stripe} b{index} owner={owner:#x} client={client:#x} read={} done={}",
            read.is_some(),
            completed.len()
        ),
        Req::Unlock {
            stripe,
            owner,
            blocks,
            origin,
        } => format!("Unlock s{stripe} owner={owner:#x} {blocks:?} ({origin:?})"),
        Req::Heartbeat {
            client, completed, ..
        } => format!("Heartbeat client={client:#x} done={}", completed.len()),
        Req::Update {
            stripe,
            position,
            owner,
            update,
            unlock,
            relay,
            ..
        } => format!(
            "{} s{stripe} p{position} id=({:#x},{}) b{} v{} base={} [{}..{}) owner={owner:#x} unlock={unlock:?}",
            if *relay { "RELAY" } else { "Update" },
            update.id.0,
            update.id.1,
            update.index,
            update.version,
            update.base,
            update.offset,
            update.offset + update.len
        ),
        Req::Read {
            stripe,
            position,
            applied,
        } => format!(
            "Read s{stripe} p{position}{}",
            if *applied { " (applied)" } else { "" }
        ),
        Req::List => "List".into(),
        Req::Repair {
            stripe,
            position,
            versions,
            data,
        } => format!("Repair s{stripe} p{position} at {versions:?} {data:02x?}"),
    }
}

pub(crate) fn describe_resp(r: &Resp) -> String {
    match r {
        Resp::Lock {
            known,
            fenced,
            read,
        } => format!(
            "Granted known={known:?} fenced={fenced:?} read={}",
            match read {
                None => "-".to_string(),
                Some(LockRead::Zero) => "zero".to_string(),
                Some(LockRead::Failed) => "failed".to_string(),
                Some(LockRead::Block { versions, .. }) => format!("{versions:?}"),
            }
        ),
        Resp::Unlocked => "Unlocked".into(),
        Resp::Alive => "Alive".into(),
        Resp::Updated(r) => format!("Updated {r:?}"),
        Resp::Read { versions, data } => format!("Read {versions:?} {data:02x?}"),
        Resp::List(v) => format!(
            "List {:?}",
            v.iter()
                .map(|s| (s.stripe, s.versions.clone(), s.locks.clone()))
                .collect::<Vec<_>>()
        ),
        Resp::Repaired(r) => format!("Repaired {r:?}"),
        Resp::Error(e) => format!("Error {e:?}"),
    }
}

impl World {
    pub(crate) fn slot(&self, n: usize, stripe: u64) -> &Slot {
        &self.nodes[n].slots[&stripe]
    }

    pub(crate) fn slot_mut(&mut self, n: usize, stripe: u64) -> &mut Slot {
        self.nodes[n]
            .slots
            .get_mut(&stripe)
            .unwrap_or_else(|| unreachable!("every node holds a block of every stripe"))
    }

    /// node.rs `admit` + `run`: one request.
    pub(crate) fn node_handle(
        &mut self,
        n: usize,
        from: Addr,
        call: u64,
        deadline: Time,
        req: Req,
    ) {
        let now = self.now;
        let k = self.cfg.k;
        match req {
            Req::Lock {
                stripe,
                owner,
                client,
                index,
                read,
                lease_ms,
                completed,
            } => {
                self.node_complete(n, client, &completed);
                if let Some(e) = self.settling(n, stripe, index, owner) {
                    self.respond(n, from, call, Resp::Error(e));
                    return;
                }
                let granted = lock_group_lock(
                    &mut self.nodes[n].locks,
                    stripe,
                    index,
                    owner,
                    client,
                    lease_ms,
                    now,
                );
                match granted {
                    Err(Refused::Held {
                        index,
                        owner,
                        client,
                        ..
                    }) => {
                        let e = WireErr::Locked {
                            index,
                            holder: owner,
                            client,
                        };
                        self.respond(n, from, call, Resp::Error(e));
                    }
                    Err(Refused::Fenced) => {
                        self.respond(n, from, call, Resp::Error(WireErr::Fenced))
                    }
                    Err(Refused::NotLocked { .. }) => {
                        self.respond(n, from, call, Resp::Error(WireErr::NotLocked))
                    }
                    Ok(()) => {
                        self.ledger.renewed(n, client, now + lease_ms);
                        // store/mod.rs `note_granted`: the versions the reply tells the
                        // owner to skip are tentatively skipped here.
                        let (known, fenced) = self.known(n, stripe, index);
                        if !self.cfg.variant.old_skip {
                            for &(i, f) in &fenced {
                                let v = known.iter().find(|x| x.0 == i).map_or(0, |x| x.1);
                                let versions = self.slot(n, stripe).versions.clone();
                                let slot = self.slot_mut(n, stripe);
                                slot.skipped.retain(|&(j, _, to, o)| {
                                    to > versions[j as usize] && (j, o) != (i, Some(owner))
                                });
                                slot.skipped.push((i, v, f, Some(owner)));
                            }
                        }
                        let slot = self.slot(n, stripe);
                        let i = index as usize;
                        let mine = slot.position < k && slot.position == i;
                        match read.filter(|_| mine) {
                            None => {
                                let read = None;
                                let resp = Resp::Lock {
                                    known,
                                    fenced,
                                    read,
                                };
                                self.respond(n, from, call, resp)
                            }
                            Some(range) => {
                                let zero = !slot.written && slot.known.iter().all(|v| *v == 0);
                                if zero {
                                    let read = Some(LockRead::Zero);
                                    let resp = Resp::Lock {
                                        known,
                                        fenced,
                                        read,
                                    };
                                    self.respond(n, from, call, resp);
                                } else {
                                    let until = deadline.min(now + real::LOCK_READ_WAIT);
                                    let w = Waiter::LockRead {
                                        from,
                                        call,
                                        stripe,
                                        known,
                                        fenced,
                                        range,
                                    };
                                    self.wait_or_answer(n, w, until);
                                }
                            }
                        }
                    }
                }
            }
            Req::Unlock {
                stripe,
                owner,
                blocks,
                origin,
            } => {
                if origin == (crate::types::UnlockOrigin::Backlog { after_lock: true }) {
                    self.note_backlog_unlock(n, stripe, owner, &blocks);
                }
                self.node_release(n, stripe, owner, &blocks);
                self.respond(n, from, call, Resp::Unlocked);
            }
            Req::Heartbeat {
                client,
                lease_ms,
                completed,
            } => {
                self.node_complete(n, client, &completed);
                match self.nodes[n].locks.renew(client, lease_ms, now) {
                    Ok(()) => {
                        self.ledger.renewed(n, client, now + lease_ms);
                        self.respond(n, from, call, Resp::Alive);
                    }
                    Err(_) => self.respond(n, from, call, Resp::Error(WireErr::Fenced)),
                }
            }
            Req::Update {
                stripe,
                position,
                owner,
                update,
                delta,
                unlock,
                relay,
                completed,
            } => {
                debug_assert_eq!(self.slot(n, stripe).position, position as usize);
                let undecided = relay && self.skip_undecided(n, stripe, &update);
                let kind = if relay {
                    JobKind::Relay { update, delta }
                } else {
                    // admit_update: a direct update needs an unfenced client whose owner
                    // holds the block's lock here.
                    let client = update.id.0;
                    self.node_complete(n, client, &completed);
                    match self.nodes[n]
                        .locks
                        .may_update(stripe, update.index, owner, client)
                    {
                        Ok(()) => {}
                        Err(Refused::Fenced) => {
                            self.respond(n, from, call, Resp::Error(WireErr::Fenced));
                            return;
                        }
                        Err(_) => {
                            self.respond(n, from, call, Resp::Error(WireErr::NotLocked));
                            return;
                        }
                    }
                    self.check_i4_direct_update_admitted(n, stripe, &update, owner);
                    // The client was alive when it sent this: its lease runs on.
                    self.nodes[n].locks.touch(client, self.now);
                    *self.nodes[n].inflight.entry(client).or_default() += 1;
                    // store/mod.rs `note_owner_update`: its base says which versions
                    // its grant here really skipped.
                    let slot = self.slot_mut(n, stripe);
                    slot.skipped.retain_mut(|r| {
                        if r.0 != update.index || r.3 != Some(owner) {
                            return true;
                        }
                        r.3 = None;
                        r.1 = r.1.max(update.base);
                        r.1 < r.2
                    });
                    JobKind::Direct {
                        owner,
                        unlock,
                        update,
                        delta,
                    }
                };
                let job = Job {
                    stripe,
                    from,
                    call,
                    deadline,
                    started: 0,
                    kind,
                };
                if undecided {
                    // node.rs `await_skips`: wait for the owner of the lock that
                    // tentatively skipped its version, or the deadline.
                    let id = self.fresh_id();
                    self.nodes[n].held.insert(id, job);
                    self.schedule(deadline, Ev::HeldRelayExpire { node: n, hold: id });
                } else {
                    self.store_enqueue(n, job);
                }
                if !relay {
                    self.release_held_relays(n);
                }
            }
            Req::Read {
                stripe, applied, ..
            } => {
                if applied {
                    let slot = self.slot(n, stripe);
                    let resp = Resp::Read {
                        versions: slot.versions.clone(),
                        data: slot.block.clone(),
                    };
                    self.respond(n, from, call, resp);
                } else {
                    let w = Waiter::Read { from, call, stripe };
                    self.wait_or_answer(n, w, deadline);
                }
            }
            Req::List => {
                let views = self.list(n);
                self.respond(n, from, call, Resp::List(views));
            }
            Req::Repair {
                stripe,
                versions,
                data,
                ..
            } => {
                let job = Job {
                    stripe,
                    from,
                    call,
                    deadline,
                    started: 0,
                    kind: JobKind::Install { versions, data },
                };
                self.store_enqueue(n, job);
            }
        }
    }

    /// The node's blocks, their versions, and the locks on their stripes.
    pub(crate) fn list(&self, n: usize) -> Vec<crate::types::SlotView> {
        let node = &self.nodes[n];
        node.slots
            .iter()
            .map(|(s, slot)| crate::types::SlotView {
                stripe: *s,
                position: slot.position,
                versions: slot.versions.clone(),
                verified: slot.verified,
                locks: node
                    .locks
                    .iter()
                    .filter(|(ls, _, _)| ls == s)
                    .map(|(_, i, _)| i)
                    .collect(),
            })
            .collect()
    }

    /// Keeps `behind_since` up to date after the slot's versions or known versions
    /// changed.
    pub(crate) fn touch_behind(&mut self, n: usize, stripe: u64) {
        let (k, now) = (self.cfg.k, self.now);
        let slot = self.slot_mut(n, stripe);
        if slot.is_behind(k) {
            slot.behind_since.get_or_insert(now);
        } else {
            slot.behind_since = None;
        }
    }

    /// node.rs `complete`: the client says every member holds these.
    fn node_complete(&mut self, n: usize, client: u64, ids: &[UpdateKey]) {
        let keys: Vec<UpdateKey> = ids.iter().filter(|i| i.0 == client).copied().collect();
        if !keys.is_empty() {
            self.nodes[n].unsettled.complete(&keys);
        }
    }

    /// node.rs `release`: unlock, and record the versions given out.
    fn node_release(&mut self, n: usize, stripe: u64, owner: u64, blocks: &[(u8, u64)]) {
        let indices: Vec<u8> = blocks.iter().map(|(i, _)| *i).collect();
        let released = self.nodes[n].locks.unlock(stripe, &indices, owner);
        if released > 0 {
            self.log(format!(
                "n{n} released s{stripe} {indices:?} of owner {owner:#x}"
            ));
        }
        let k = self.cfg.k;
        let slot = self.slot_mut(n, stripe);
        let tracked = slot.tracked(k);
        for &(i, v) in blocks {
            let i = i as usize;
            if tracked.contains(&i) {
                slot.known[i] = slot.known[i].max(v);
            }
        }
        // store/mod.rs `note_lock_gone`: the lock went without an update here, so
        // its tentative skips end.
        slot.skipped
            .retain(|&(j, _, _, o)| o != Some(owner) || !blocks.iter().any(|&(i, _)| i == j));
        self.touch_behind(n, stripe);
        self.release_held_relays(n);
    }

    /// store/mod.rs `known`: for a tracked index, the version known given out, and
    /// the one a fenced holder may have given out beyond it.
    fn known(&self, n: usize, stripe: u64, index: u8) -> Known {
        let slot = self.slot(n, stripe);
        let i = index as usize;
        if !slot.tracked(self.cfg.k).contains(&i) {
            return (Vec::new(), Vec::new());
        }
        let known = vec![(index, slot.known[i])];
        let fenced = if slot.fenced[i] > slot.known[i] {
            vec![(index, slot.fenced[i])]
        } else {
            Vec::new()
        };
        (known, fenced)
    }

    /// store/mod.rs `note_fenced`: the holder of these locks was fenced, not
    /// unlocked; it may have given out the next version of each block unseen: one
    /// past the known, applied and earlier fenced versions (a holder granted with a
    /// hint skipped past it).
    fn note_fenced(&mut self, n: usize, stripe: u64, indices: &[u8]) {
        let k = self.cfg.k;
        let past_hint = !self.cfg.variant.old_hint;
        let slot = self.slot_mut(n, stripe);
        let tracked = slot.tracked(k);
        for &i in indices {
            let i = i as usize;
            if tracked.contains(&i) {
                let mut past = slot.known[i].max(slot.versions[i]) + 1;
                if past_hint {
                    past = past.max(slot.fenced[i] + 1);
                }
                slot.fenced[i] = slot.fenced[i].max(past);
            }
        }
    }

    /// node.rs `grant`, its first checks, unless the owner already holds the lock
    /// here: no lock on a block with an update (direct or relayed) admitted and not
    /// yet answered, that is, still in the node's writer (`Volume::admitted`); nor
    /// with an update this node took and has not yet passed on to every member
    /// lacking it, which is hurried, with the all-or-nothing loop woken. The refusal
    /// is `Settling`.
    fn settling(&mut self, n: usize, stripe: u64, index: u8, owner: u64) -> Option<WireErr> {
        if self.nodes[n].locks.owns(stripe, index, owner) {
            return None;
        }
        if !self.cfg.variant.old_settling {
            let node = &self.nodes[n];
            let admitted = node
                .current
                .iter()
                .chain(&node.writer)
                .chain(node.held.values())
                .find_map(|j| match &j.kind {
                    JobKind::Direct { update, .. } | JobKind::Relay { update, .. }
                        if j.stripe == stripe && update.index == index =>
                    {
                        Some(update.id)
                    }
                    _ => None,
                });
            if let Some((client, seq)) = admitted {
                self.stats.settling += 1;
                self.log(format!(
                    "n{n} refuses the lock on s{stripe} b{index}: ({client:#x},{seq}) is admitted \
                     and not yet answered (Settling)"
                ));
                return Some(WireErr::Settling { index, client });
            }
        }
        let waiting = self.nodes[n].unsettled.unoffered(stripe, index);
        let &(client, seq) = waiting.first()?;
        for key in &waiting {
            if self.cfg.variant.old_hurry {
                // The old `hurry`: the entry's time set to 0, due only once the
                // node's uptime reaches `relay_after`.
                self.nodes[n].unsettled.touch(key, 0);
            } else {
                self.nodes[n].unsettled.hurry(key);
            }
        }
        self.relay_now(n);
        self.stats.settling += 1;
        self.log(format!(
            "n{n} refuses the lock on s{stripe} b{index}: ({client:#x},{seq}) is not yet passed \
             on (Settling; {} waiting)",
            waiting.len()
        ));
        Some(WireErr::Settling { index, client })
    }

    /// `relay_now.notify_one()`: wakes the all-or-nothing loop at once.
    fn relay_now(&mut self, n: usize) {
        if !self.nodes[n].relay_now {
            self.nodes[n].relay_now = true;
            self.schedule(self.now, Ev::NodeRelayNow(n));
        }
    }

    /// A `Current` read: answered at once unless the block knows of updates it has not
    /// applied (read_waiting), then when they are applied or at `until`.
    fn wait_or_answer(&mut self, n: usize, w: Waiter, until: Time) {
        if let Some(w) = self.try_answer(n, w) {
            let id = self.fresh_id();
            self.nodes[n].waiting.insert(id, w);
            self.schedule(until, Ev::WaitExpire { node: n, wait: id });
        }
    }

    /// Answers a waiting read if it can be; gives it back otherwise.
    fn try_answer(&mut self, n: usize, w: Waiter) -> Option<Waiter> {
        let stripe = match &w {
            Waiter::LockRead { stripe, .. } | Waiter::Read { stripe, .. } => *stripe,
        };
        let slot = self.slot(n, stripe);
        if !slot.verified {
            match w {
                Waiter::LockRead {
                    from,
                    call,
                    known,
                    fenced,
                    ..
                } => {
                    let read = Some(LockRead::Failed);
                    let resp = Resp::Lock {
                        known,
                        fenced,
                        read,
                    };
                    self.respond(n, from, call, resp);
                }
                Waiter::Read { from, call, .. } => {
                    self.respond(n, from, call, Resp::Error(WireErr::Recovering));
                }
            }
            return None;
        }
        if slot.is_behind(self.cfg.k) {
            return Some(w);
        }
        let (versions, block) = (slot.versions.clone(), slot.block.clone());
        match w {
            Waiter::LockRead {
                from,
                call,
                known,
                fenced,
                range,
                ..
            } => {
                let data = block[range.0..range.0 + range.1].to_vec();
                let read = Some(LockRead::Block { versions, data });
                let resp = Resp::Lock {
                    known,
                    fenced,
                    read,
                };
                self.respond(n, from, call, resp);
            }
            Waiter::Read { from, call, .. } => {
                self.respond(
                    n,
                    from,
                    call,
                    Resp::Read {
                        versions,
                        data: block,
                    },
                );
            }
        }
        None
    }

    pub(crate) fn recheck_waiters(&mut self, n: usize) {
        let ids: Vec<u64> = self.nodes[n].waiting.keys().copied().collect();
        for id in ids {
            if let Some(w) = self.nodes[n].waiting.remove(&id) {
                if let Some(w) = self.try_answer(n, w) {
                    self.nodes[n].waiting.insert(id, w);
                }
            }
        }
    }

    pub(crate) fn wait_expire(&mut self, n: usize, wait: u64) {
        match self.nodes[n].waiting.remove(&wait) {
            Some(Waiter::LockRead {
                from,
                call,
                known,
                fenced,
                ..
            }) => {
                let read = Some(LockRead::Failed);
                let resp = Resp::Lock {
                    known,
                    fenced,
                    read,
                };
                self.respond(n, from, call, resp);
            }
            Some(Waiter::Read { from, call, .. }) => {
                self.respond(n, from, call, Resp::Error(WireErr::Timeout));
            }
            None => {}
        }
    }

    /// store/mod.rs `skip_undecided`: a lock granted here tentatively skipped the
    /// update's version.
    fn skip_undecided(&self, n: usize, stripe: u64, u: &BlockUpdate) -> bool {
        !self.cfg.variant.old_skip
            && self
                .slot(n, stripe)
                .skipped
                .iter()
                .any(|&(j, from, to, o)| {
                    o.is_some() && j == u.index && u.version > from && u.version <= to
                })
    }

    /// Held relays whose version is no longer tentatively skipped go on to the
    /// writer.
    fn release_held_relays(&mut self, n: usize) {
        let ids: Vec<u64> = self.nodes[n].held.keys().copied().collect();
        for id in ids {
            let go = match self.nodes[n].held.get(&id) {
                Some(Job {
                    stripe,
                    kind: JobKind::Relay { update, .. },
                    ..
                }) => !self.skip_undecided(n, *stripe, update),
                _ => true,
            };
            if go {
                if let Some(job) = self.nodes[n].held.remove(&id) {
                    self.store_enqueue(n, job);
                }
            }
        }
    }

    /// A held relay's deadline passed: `Timeout` (its sender passes it on again).
    pub(crate) fn held_relay_expire(&mut self, n: usize, hold: u64) {
        if let Some(job) = self.nodes[n].held.remove(&hold) {
            self.respond(n, job.from, job.call, Resp::Error(WireErr::Timeout));
        }
    }

    fn store_enqueue(&mut self, n: usize, job: Job) {
        self.nodes[n].writer.push_back(job);
        if self.nodes[n].current.is_none() {
            self.store_start(n);
        }
    }

    /// The writer takes the next job: log, fsync (random, sometimes stalling), apply.
    fn store_start(&mut self, n: usize) {
        let Some(mut job) = self.nodes[n].writer.pop_front() else {
            return;
        };
        job.started = self.now;
        let nth = self.nodes[n].jobs_started;
        self.nodes[n].jobs_started += 1;
        let planned = self.cfg.stall_jobs.contains(&(n, nth));
        let stall = planned
            || (!self.reliable
                && self.cfg.disk_stall > 0.0
                && self.rng.gen_bool(self.cfg.disk_stall));
        let delay = if stall {
            self.stats.stalls += 1;
            self.log(format!(
                "n{n} STALLS its log sync for {} ms",
                self.cfg.stall_ms
            ));
            self.cfg.stall_ms
        } else {
            self.rng.gen_range(0..=2)
        };
        self.nodes[n].current = Some(job);
        self.schedule(self.now + delay, Ev::StoreDone(n));
    }

    /// The current job is durable: publish it and answer (node.rs `apply_updates`).
    pub(crate) fn store_done(&mut self, n: usize) {
        let Some(job) = self.nodes[n].current.take() else {
            return;
        };
        let late = job.started > job.deadline;
        let (from, call, stripe) = (job.from, job.call, job.stripe);
        match job.kind {
            JobKind::Direct {
                owner,
                unlock,
                update: u,
                delta,
            } => {
                let res = if late {
                    Err(WireErr::Timeout)
                } else {
                    self.store_update(n, stripe, u, &delta)
                };
                if res.is_ok() {
                    if !matches!(
                        res,
                        Ok(Applied {
                            duplicate: true,
                            ..
                        })
                    ) && !self.nodes[n]
                        .locks
                        .iter()
                        .any(|(s, i, l)| s == stripe && i == u.index && l.owner == owner)
                    {
                        self.log(format!(
                            "n{n} NOTE: update ({:#x},{}) took effect after its owner's lock was \
                             released here",
                            u.id.0, u.id.1
                        ));
                    }
                    let k = self.cfg.k;
                    let width = self.width();
                    let position = self.slot(n, stripe).position;
                    let recipients: Vec<u8> = std::iter::once(u.index as usize)
                        .chain(k..width)
                        .filter(|p| *p != position)
                        .map(|p| p as u8)
                        .collect();
                    let entry = Unsettled {
                        stripe,
                        index: u.index,
                        recipients,
                        confirmed: BTreeSet::new(),
                        since_ms: self.now,
                        size: delta.len(),
                        payload: (u, delta),
                    };
                    let gone = self.nodes[n].unsettled.add(u.id, entry);
                    if !gone.is_empty() {
                        self.log(format!("n{n} gave up {} unsettled updates", gone.len()));
                    }
                }
                if !unlock.is_empty() {
                    self.node_release(n, stripe, owner, &unlock);
                }
                let client = u.id.0;
                if let Some(c) = self.nodes[n].inflight.get_mut(&client) {
                    *c = c.saturating_sub(1);
                    if *c == 0 {
                        self.nodes[n].inflight.remove(&client);
                    }
                }
                self.respond(n, from, call, Resp::Updated(res));
            }
            JobKind::Relay { update, delta } => {
                let res = if late {
                    Err(WireErr::Timeout)
                } else {
                    self.store_update(n, stripe, update, &delta)
                };
                if matches!(
                    res,
                    Ok(Applied {
                        duplicate: false,
                        ..
                    })
                ) {
                    self.stats.relays_applied += 1;
                }
                self.respond(n, from, call, Resp::Updated(res));
            }
            JobKind::Install { versions, data } => {
                let res = self.store_install(n, stripe, versions, data);
                self.respond(n, from, call, Resp::Repaired(res));
            }
        }
        self.recheck_waiters(n);
        self.store_start(n);
    }

    /// store/mod.rs `Writer::install`: a whole block at `versions`, unless that would
    /// take the block back; pending updates it already reflects are dropped, the rest
    /// applied on top.
    fn store_install(
        &mut self,
        n: usize,
        stripe: u64,
        versions: Vec<u64>,
        data: Vec<u8>,
    ) -> Result<bool, WireErr> {
        let k = self.cfg.k;
        let slot = self.slot(n, stripe);
        let tracked = slot.tracked(k);
        let behind = tracked.clone().any(|i| slot.versions[i] < versions[i]);
        let ahead = tracked.clone().any(|i| slot.versions[i] > versions[i]);
        if ahead {
            return Err(WireErr::VersionUnavailable);
        }
        if !behind {
            return Ok(false);
        }
        let position = slot.position;
        self.check_i3_rebuilt_block(n, stripe, position, &versions, &data);
        let slot = self.slot_mut(n, stripe);
        for i in tracked.clone() {
            slot.versions[i] = versions[i];
            slot.known[i] = slot.known[i].max(versions[i]);
        }
        slot.block = data;
        slot.written = true;
        let vs = slot.versions.clone();
        slot.pending
            .retain(|p| p.update.version > vs[p.update.index as usize]);
        self.log(format!("n{n} INSTALLS s{stripe} p{position} at {vs:?}"));
        self.drain_pending(n, stripe);
        self.touch_behind(n, stripe);
        Ok(true)
    }

    /// store/mod.rs `Writer::update`: duplicates by id, stale versions; applied to the
    /// block at exactly its base, held pending otherwise.
    fn store_update(
        &mut self,
        n: usize,
        stripe: u64,
        u: BlockUpdate,
        delta: &[u8],
    ) -> Result<Applied, WireErr> {
        let slot = self.slot_mut(n, stripe);
        let is_pending = slot.pending.iter().any(|p| p.update.id == u.id);
        if slot.recent.contains(&u.id) || is_pending {
            return Ok(Applied {
                applied: !is_pending,
                duplicate: true,
            });
        }
        let i = u.index as usize;
        let cur = slot.versions[i];
        if u.version <= cur {
            return Err(WireErr::StaleVersion {
                current: cur,
                got: u.version,
            });
        }
        let skipped = slot.skipped.iter().any(|&(j, from, to, o)| {
            o.is_none() && j == u.index && u.version > from && u.version <= to
        });
        if skipped && !self.cfg.variant.old_skip {
            self.log(format!(
                "n{n} refuses ({:#x},{}) v{}: a lock granted here skipped it",
                u.id.0, u.id.1, u.version
            ));
            return Err(WireErr::StaleVersion {
                current: cur,
                got: u.version,
            });
        }
        let slot = self.slot_mut(n, stripe);
        slot.known[i] = slot.known[i].max(u.version);
        if cur > u.base {
            // The block holds a version the writer did not build on (given out by a
            // fenced client, skipped by the others): the update waits, the block is
            // behind, and the stuck-block rebuild replaces it with the stripe's.
            self.stats.divergent += 1;
            self.log(format!(
                "n{n} s{stripe} b{} holds v{cur}, which ({:#x},{}) v{} skipped (base v{}); \
                 it will be rebuilt",
                u.index, u.id.0, u.id.1, u.version, u.base
            ));
        }
        if u.base != cur {
            let slot = self.slot_mut(n, stripe);
            slot.pending.push(Pending {
                update: u,
                delta: delta.to_vec(),
            });
            self.ledger.logged(u.id);
            self.log(format!(
                "n{n} holds ({:#x},{}) v{} base v{} pending (at v{cur})",
                u.id.0, u.id.1, u.version, u.base
            ));
            self.touch_behind(n, stripe);
            return Ok(Applied {
                applied: false,
                duplicate: false,
            });
        }
        self.apply(n, stripe, u, delta);
        self.drain_pending(n, stripe);
        self.touch_behind(n, stripe);
        Ok(Applied {
            applied: true,
            duplicate: false,
        })
    }

    fn drain_pending(&mut self, n: usize, stripe: u64) {
        loop {
            let slot = self.slot_mut(n, stripe);
            let vs = slot.versions.clone();
            let Some(idx) = slot
                .pending
                .iter()
                .position(|p| p.update.base == vs[p.update.index as usize])
            else {
                return;
            };
            let p = slot.pending.remove(idx);
            self.apply(n, stripe, p.update, &p.delta);
        }
    }

    /// store/mod.rs `Writer::apply`: the delta itself (data) or scaled by c(j, i)
    /// (parity j), then the block's version.
    fn apply(&mut self, n: usize, stripe: u64, u: BlockUpdate, delta: &[u8]) {
        let k = self.cfg.k;
        let position = self.slot(n, stripe).position;
        let coefficient = (position >= k).then(|| {
            self.codec
                .coefficients()
                .get(position - k, u.index as usize)
        });
        let slot = self.slot_mut(n, stripe);
        let range = u.offset..u.offset + u.len;
        let r = match coefficient {
            None => Codec::xor_into(delta, &mut slot.block[range]),
            Some(c) => Codec::mul_xor(c, delta, &mut slot.block[range]),
        };
        debug_assert!(r.is_ok());
        slot.versions[u.index as usize] = u.version;
        slot.written = true;
        if slot.recent.len() >= real::RECENT_IDS {
            slot.recent.pop_front();
        }
        slot.recent.push_back(u.id);
        let block = slot.block.clone();
        self.nodes[n].applied_ids.insert(u.id);
        self.log(format!(
            "n{n} APPLIES ({:#x},{}) s{stripe} b{} v{} at p{position}",
            u.id.0, u.id.1, u.index, u.version
        ));
        self.record_apply(n, stripe, position, u, delta, &block);
    }

    /// aon.rs `run`: the loop's sleep ended.
    pub(crate) fn node_tick(&mut self, n: usize, serial: u64) {
        if serial != self.nodes[n].aon_serial {
            return;
        }
        self.aon_round(n);
        self.schedule(self.now + real::NODE_TICK, Ev::NodeTick { node: n, serial });
    }

    /// aon.rs `run`: `relay_now` woke the loop; it runs a round and sleeps a whole
    /// tick again.
    pub(crate) fn node_relay_now(&mut self, n: usize) {
        self.nodes[n].relay_now = false;
        self.aon_round(n);
        self.nodes[n].aon_serial += 1;
        let serial = self.nodes[n].aon_serial;
        self.schedule(self.now + real::NODE_TICK, Ev::NodeTick { node: n, serial });
    }

    /// aon.rs `run`, one round: expired leases, then overdue unsettled updates.
    fn aon_round(&mut self, n: usize) {
        let now = self.now;
        let expired = self.nodes[n].locks.expired(now);
        for c in expired {
            // Fenced only with locks held here; unsettled updates of an idle client
            // are passed on at once (hurried), without fencing it.
            let holds = self.nodes[n].locks.holds_any(c);
            if holds {
                self.nodes[n].locks.fence(c, now);
                self.stats.fenced += 1;
                self.log(format!(
                    "n{n} FENCES client {c:#x} (lease expired); settling"
                ));
                let id = self.fresh_id();
                self.nodes[n].settles.insert(
                    id,
                    Settle {
                        client: c,
                        until: now + real::INFLIGHT_WAIT,
                        outstanding: 0,
                    },
                );
                self.settle_poll(n, id);
            } else {
                self.nodes[n].locks.forget(c);
                for key in self.nodes[n].unsettled.of_client(c) {
                    self.nodes[n].unsettled.hurry(&key);
                }
            }
        }
        let worn = self.nodes[n].unsettled.worn_out(real::RELAY_PASSES);
        if !worn.is_empty() {
            self.log(format!(
                "n{n} gave up {} unsettled updates passed on {} times",
                worn.len(),
                real::RELAY_PASSES
            ));
        }
        let due = self.nodes[n].unsettled.due(now, self.cfg.relay_after_ms);
        for key in due {
            self.nodes[n].unsettled.touch(&key, now);
            self.relay(n, key, None);
        }
    }

    /// aon.rs `settle`: wait for the client's admitted updates, relay its unsettled
    /// ones, then release its locks.
    pub(crate) fn settle_poll(&mut self, n: usize, settle: u64) {
        let Some(s) = self.nodes[n].settles.get(&settle).cloned() else {
            return;
        };
        let inflight = self.nodes[n].inflight.get(&s.client).copied().unwrap_or(0);
        if inflight > 0 && self.now < s.until {
            self.schedule(self.now + 10, Ev::SettlePoll { node: n, settle });
            return;
        }
        let keys = self.nodes[n].unsettled.of_client(s.client);
        let mut started = 0;
        for key in keys {
            if self.relay(n, key, Some(settle)) {
                started += 1;
            }
        }
        if started == 0 {
            self.finish_settle(n, settle);
        } else if let Some(s) = self.nodes[n].settles.get_mut(&settle) {
            s.outstanding = started;
        }
    }

    fn finish_settle(&mut self, n: usize, settle: u64) {
        if let Some(s) = self.nodes[n].settles.remove(&settle) {
            let released = self.nodes[n].locks.release_client(s.client);
            let mut by_stripe: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
            for (stripe, index) in &released {
                by_stripe.entry(*stripe).or_default().push(*index);
            }
            for (stripe, indices) in &by_stripe {
                self.note_fenced(n, *stripe, indices);
                // store/mod.rs `note_lock_gone`: without an update here.
                let slot = self.slot_mut(n, *stripe);
                slot.skipped
                    .retain(|&(j, _, _, o)| o.is_none() || !indices.contains(&j));
            }
            self.release_held_relays(n);
            self.log(format!(
                "n{n} settled fenced client {:#x}; released {released:?} (fenced hints noted)",
                s.client
            ));
        }
    }

    /// aon.rs `relay`: pass an unsettled update on to every recipient that has not
    /// confirmed it. Returns whether anything was sent (an answer will come back).
    fn relay(&mut self, n: usize, key: UpdateKey, settle: Option<u64>) -> bool {
        let Some(e) = self.nodes[n].unsettled.get(&key).cloned() else {
            return false;
        };
        let todo: Vec<u8> = e
            .recipients
            .iter()
            .copied()
            .filter(|p| !e.confirmed.contains(p))
            .collect();
        if todo.is_empty() {
            self.nodes[n].unsettled.mark_offered(&key);
            return false;
        }
        let run = self.fresh_id();
        self.nodes[n].relays.insert(
            run,
            RelayRun {
                key,
                outstanding: todo.len(),
                settle,
            },
        );
        let (update, delta) = e.payload;
        for position in todo {
            self.stats.relays += 1;
            let to = self.member(e.stripe, position as usize);
            let req = Req::Update {
                stripe: e.stripe,
                position,
                owner: 0,
                update,
                delta: delta.clone(),
                unlock: Vec::new(),
                relay: true,
                completed: Vec::new(),
            };
            self.call(Addr::Node(n), to, req, Purpose::Relay { run, position });
        }
        true
    }

    /// An answer to a relay: Ok (applied or duplicate) or StaleVersion confirms.
    pub(crate) fn node_answer(
        &mut self,
        n: usize,
        to: usize,
        purpose: Purpose,
        resp: Option<Resp>,
    ) {
        let Purpose::Relay { run, position } = purpose else {
            self.life_answer(n, to, purpose, resp);
            return;
        };
        let held = matches!(
            resp,
            Some(Resp::Updated(Ok(_)))
                | Some(Resp::Updated(Err(WireErr::StaleVersion { .. })))
                | Some(Resp::Error(WireErr::StaleVersion { .. }))
        );
        let Some(r) = self.nodes[n].relays.get_mut(&run) else {
            return;
        };
        r.outstanding -= 1;
        let (key, done, settle) = (r.key, r.outstanding == 0, r.settle);
        if held {
            self.nodes[n].unsettled.confirm(&key, position);
        }
        if done {
            // Every member lacking it was offered it (whether or not it answered).
            self.nodes[n].unsettled.mark_offered(&key);
            self.nodes[n].relays.remove(&run);
            if let Some(s) = settle {
                let finished = match self.nodes[n].settles.get_mut(&s) {
                    Some(st) => {
                        st.outstanding = st.outstanding.saturating_sub(1);
                        st.outstanding == 0
                    }
                    None => false,
                };
                if finished {
                    self.finish_settle(n, s);
                }
            }
        }
    }
}
