//! The invariants of DESIGN-NOTES section 3 as the simulation checks them, and the
//! ledger they are checked against.
//!
//! The ledger is the simulation's omniscient record: every value each data block ever
//! had, by version (built from the updates as nodes apply them: version v's value is
//! its base's value with v's delta folded in), which update each version was given
//! to and which base it was built on, what each write meant to write, and each
//! node's view of each client's lease.
//!
//! Versions form a tree rather than a line: a version given out by a fenced client
//! that reached only some member is *void*, skipped by the next writer (whose update
//! names an older base), and never read again. So "a block at version w holds update
//! v" means v lies on w's *lineage* (w, its base, the base's base, ... down to 0).
//!
//! | check | when | what |
//! |---|---|---|
//! | [`World::check_i3_consistent_reconstruction`] | every decode | the value is the block's value at exactly the version the chosen replies reflect |
//! | [`World::check_i4_direct_update_admitted`] | every direct update a node admits | its owner holds the block's lock there, the client is not fenced there, and its lease there has not run out by more than the node's tick |
//! | [`World::check_i4_one_update_per_version`] | every apply | no version of a block is ever given to two different updates, each update applies on a version the block had, and each write's delta was made from the block's real value at its base (no lost update) |
//! | [`World::check_i4_single_holder`] | after every event | no two owners both hold a block: granted by every member they count as live, held there, not fenced there |
//! | [`World::check_i4_lock_kept_until_update`] | after every event | a holder that has not sent its update still has its lock at every member that granted it, unless that member fenced it |
//! | [`World::check_i3_rebuilt_block`] | every rebuild install | the block installed is the stripe's state at the versions it is installed with |
//! | [`World::check_i5_all_or_nothing`] | quiescence | every update is held (on the lineage of the block's version) by every member that must hold it, or by none; nothing is left pending; every acknowledged write is held (I2 for client faults) |
//! | [`World::check_i1_stripe_consistency`] | quiescence | parity == encode(data), versions agree, each data block holds the value its history gives |
//! | [`World::check_liveness`] | quiescence | no lock, unsettled update, settle or relay is left; every client finished |

use std::collections::{BTreeMap, BTreeSet};

use drs_client::select::Seen;
use drs_lockgroups::UpdateKey;

use crate::client::OpRecord;
use crate::scenario::{real, Config};
use crate::types::{BlockUpdate, Time};
use crate::world::World;

/// A broken invariant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub invariant: &'static str,
    pub detail: String,
    pub at: Time,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at t={} ms: {}", self.invariant, self.at, self.detail)
    }
}

/// What a write meant to do.
#[derive(Debug, Clone)]
pub(crate) struct Intent {
    pub stripe: u64,
    pub update: BlockUpdate,
    pub data: Vec<u8>,
}

pub(crate) struct Ledger {
    block: usize,
    /// (stripe, data index) -> value by version (version 0, zeros, is implicit).
    history: BTreeMap<(u64, u8), BTreeMap<u64, Vec<u8>>>,
    /// (stripe, data index, version) -> the update given that version.
    version_ids: BTreeMap<(u64, u8, u64), UpdateKey>,
    /// (stripe, data index, version) -> the version it was built on.
    bases: BTreeMap<(u64, u8, u64), u64>,
    pub intents: BTreeMap<UpdateKey, Intent>,
    /// Updates some node took (applied, or logged pending).
    pub taken: BTreeSet<UpdateKey>,
    /// (node, client) -> when the client's lease at the node runs out.
    lease_exp: BTreeMap<(usize, u64), Time>,
    pub ops: Vec<OpRecord>,
}

impl Ledger {
    pub fn new(cfg: &Config) -> Ledger {
        Ledger {
            block: cfg.block,
            history: BTreeMap::new(),
            version_ids: BTreeMap::new(),
            bases: BTreeMap::new(),
            intents: BTreeMap::new(),
            taken: BTreeSet::new(),
            lease_exp: BTreeMap::new(),
            ops: Vec::new(),
        }
    }

    pub fn intent(&mut self, update: BlockUpdate, stripe: u64, data: &[u8]) {
        self.intents.insert(
            update.id,
            Intent {
                stripe,
                update,
                data: data.to_vec(),
            },
        );
    }

    pub fn logged(&mut self, id: UpdateKey) {
        self.taken.insert(id);
    }

    /// A node renewed `client`'s lease to `until` (LockGroup::renew keeps the later).
    pub fn renewed(&mut self, node: usize, client: u64, until: Time) {
        let e = self.lease_exp.entry((node, client)).or_insert(0);
        *e = (*e).max(until);
    }

    /// The value data block `index` of `stripe` had at `version`, if it ever had
    /// that version.
    pub fn value(&self, stripe: u64, index: u8, version: u64) -> Option<Vec<u8>> {
        if version == 0 {
            return Some(vec![0; self.block]);
        }
        self.history.get(&(stripe, index))?.get(&version).cloned()
    }

    /// True when the block at version `at` holds update version `v`: `v` is on the
    /// lineage of `at` (`at`, its base, its base's base, ...).
    pub fn holds(&self, stripe: u64, index: u8, at: u64, v: u64) -> bool {
        let mut cur = at;
        while cur > v {
            match self.bases.get(&(stripe, index, cur)) {
                Some(b) => cur = *b,
                None => return false,
            }
        }
        cur == v
    }
}

impl World {
    /// Called by a node when it applies update `u` (block bytes now `block`).
    pub(crate) fn record_apply(
        &mut self,
        node: usize,
        stripe: u64,
        position: usize,
        u: BlockUpdate,
        delta: &[u8],
        block: &[u8],
    ) {
        self.ledger.taken.insert(u.id);
        self.check_i4_one_update_per_version(node, stripe, u, delta);
        if position == u.index as usize {
            let expect = self.ledger.value(stripe, u.index, u.version);
            if expect.as_deref() != Some(block) {
                self.fail(
                    "I3 consistent reconstruction (bytes are a function of versions)",
                    format!(
                        "n{node} holds {block:02x?} for s{stripe} b{} v{}, history says {expect:02x?}",
                        u.index, u.version
                    ),
                );
            }
        }
    }

    /// I4, its consequence for versions: a version of a block is given to one update
    /// only (two lock holders at once, or a new holder that does not learn the previous
    /// holder's version, would give it twice); an update applies on a version the
    /// block really had; and a write's delta is made from the block's real value at
    /// its base (else a write is lost). Also builds the block's history.
    pub(crate) fn check_i4_one_update_per_version(
        &mut self,
        node: usize,
        stripe: u64,
        u: BlockUpdate,
        delta: &[u8],
    ) {
        let key = (stripe, u.index, u.version);
        match self.ledger.version_ids.get(&key) {
            Some(other) if *other != u.id => {
                let other = *other;
                self.fail(
                    "I4 mutual exclusion (one update per version)",
                    format!(
                        "version {} of s{stripe} b{} was given to two updates: ({:#x},{}) and \
                         ({:#x},{}) (the second applied at n{node})",
                        u.version, u.index, other.0, other.1, u.id.0, u.id.1
                    ),
                );
                return;
            }
            Some(_) => {}
            None => {
                self.ledger.version_ids.insert(key, u.id);
            }
        }
        if self
            .ledger
            .history
            .get(&(stripe, u.index))
            .is_some_and(|h| h.contains_key(&u.version))
        {
            return;
        }
        let Some(mut value) = self.ledger.value(stripe, u.index, u.base) else {
            self.fail(
                "I3 consistent reconstruction (version order)",
                format!(
                    "n{node} applied s{stripe} b{} v{} on base v{}, a version no node ever applied",
                    u.index, u.version, u.base
                ),
            );
            return;
        };
        for (b, d) in value[u.offset..u.offset + u.len].iter_mut().zip(delta) {
            *b ^= d;
        }
        self.ledger
            .history
            .entry((stripe, u.index))
            .or_default()
            .insert(u.version, value.clone());
        self.ledger.bases.insert(key, u.base);
        if let Some(intent) = self.ledger.intents.get(&u.id) {
            if value[u.offset..u.offset + u.len] != intent.data[..] {
                let data = intent.data.clone();
                self.fail(
                    "I4 mutual exclusion (no lost update)",
                    format!(
                        "update ({:#x},{}) made s{stripe} b{} v{} = {value:02x?}, but its \
                         writer meant {data:02x?} at {}: its old bytes were not the value at \
                         its base v{}",
                        u.id.0, u.id.1, u.index, u.version, u.offset, u.base
                    ),
                );
            }
        }
    }

    /// I3: a decoded block is exactly the block's value at the version the chosen
    /// replies reflect, a version the block really had; never a mix.
    pub(crate) fn check_i3_consistent_reconstruction(
        &mut self,
        stripe: u64,
        index: u8,
        versions: &[u64],
        value: &[u8],
        seen: &[Seen],
    ) {
        self.stats.values_checked += 1;
        let v = versions.get(index as usize).copied().unwrap_or(0);
        let expect = self.ledger.value(stripe, index, v);
        match expect {
            Some(e) if e == value => {}
            other => self.fail(
                "I3 consistent reconstruction",
                format!(
                    "decoded s{stripe} b{index} = {value:02x?} at versions {versions:?}; the block \
                     had {other:02x?} at v{v}; replies {seen:?}"
                ),
            ),
        }
    }

    /// I4 at admission: a node applies a direct update only from an owner that holds
    /// the block's lock there (checked by `LockGroup::may_update`, re-checked here from
    /// the lock table), for a client not fenced there, and never after the client's
    /// lease there ran out by more than one tick of the node's lease loop (so a client
    /// that wakes from a pause longer than its lease is refused).
    pub(crate) fn check_i4_direct_update_admitted(
        &mut self,
        node: usize,
        stripe: u64,
        u: &BlockUpdate,
        owner: u64,
    ) {
        let lg = &self.nodes[node].locks;
        let holds = lg
            .iter()
            .any(|(s, i, l)| s == stripe && i == u.index && l.owner == owner);
        let fenced = lg.is_fenced(u.id.0);
        if !holds || fenced {
            self.fail(
                "I4 mutual exclusion (direct update without the lock)",
                format!(
                    "n{node} admitted ({:#x},{}) for s{stripe} b{} from owner {owner:#x}: holds={holds} fenced={fenced}",
                    u.id.0, u.id.1, u.index
                ),
            );
            return;
        }
        let exp = self
            .ledger
            .lease_exp
            .get(&(node, u.id.0))
            .copied()
            .unwrap_or(0);
        if self.now > exp + real::NODE_TICK {
            self.fail(
                "I4 mutual exclusion (fencing)",
                format!(
                    "n{node} admitted ({:#x},{}) at {} though the client's lease there ran out at {exp}",
                    u.id.0, u.id.1, self.now
                ),
            );
        }
    }

    /// I4: no two owners hold one block at the same time. A client holds a block from
    /// the end of its lock phase until its update-and-unlock is answered, and counts
    /// only while every member that granted it still has its lock and has not fenced it.
    pub(crate) fn check_i4_single_holder(&mut self) {
        let mut holders: BTreeMap<(u64, u8), (usize, u64)> = BTreeMap::new();
        let mut clash = None;
        for (c, client) in self.clients.iter().enumerate() {
            let Some(w) = client.phase.write() else {
                continue;
            };
            if !w.holding {
                continue;
            }
            let held_everywhere = w.granted.iter().enumerate().all(|(p, g)| {
                if !*g {
                    return true;
                }
                let node = self.member(w.stripe, p);
                let lg = &self.nodes[node].locks;
                !lg.is_fenced(w.client)
                    && lg
                        .iter()
                        .any(|(s, i, l)| s == w.stripe && i == w.index && l.owner == w.owner)
            });
            if !held_everywhere {
                continue;
            }
            if let Some((c0, o0)) = holders.insert((w.stripe, w.index), (c, w.owner)) {
                clash = Some((w.stripe, w.index, c0, o0, c, w.owner));
            }
        }
        if let Some((s, i, c0, o0, c1, o1)) = clash {
            self.fail(
                "I4 mutual exclusion (single holder)",
                format!("c{c0} (owner {o0:#x}) and c{c1} (owner {o1:#x}) both hold s{s} b{i}"),
            );
        }
    }

    /// I4: from the end of a client's lock phase until it sends its update-and-unlock,
    /// every member that granted keeps its lock, unless the member fenced the client
    /// (its lease ran out there). Otherwise another client can lock the block there
    /// while the first still counts on that member. Checked after every event, and
    /// by the client the moment it concludes it holds the lock.
    pub(crate) fn check_i4_lock_kept_until_update(&mut self) {
        let mut lost = None;
        for (c, client) in self.clients.iter().enumerate() {
            if matches!(client.phase, crate::client::Phase::Committing { .. }) {
                continue;
            }
            if let Some(w) = client
                .phase
                .write()
                .filter(|w| w.holding && w.update.is_none() && !w.lost_to_backlog)
            {
                if let Some(node) = self.granted_lock_lost(w) {
                    lost = Some((c, node, w.stripe, w.index, w.owner));
                }
            }
        }
        if let Some((c, node, s, i, owner)) = lost {
            self.report_lock_lost(c, node, s, i, owner);
        }
    }

    /// A member that granted `w`'s lock and no longer has it, though it did not fence
    /// the client.
    pub(crate) fn granted_lock_lost(&self, w: &crate::client::Write) -> Option<usize> {
        w.granted.iter().enumerate().find_map(|(p, g)| {
            let node = self.member(w.stripe, p);
            let lg = &self.nodes[node].locks;
            let kept = lg
                .iter()
                .any(|(s, i, l)| s == w.stripe && i == w.index && l.owner == w.owner);
            (*g && !kept && !lg.is_fenced(w.client)).then_some(node)
        })
    }

    pub(crate) fn report_lock_lost(&mut self, c: usize, node: usize, s: u64, i: u8, owner: u64) {
        self.fail(
            "I4 mutual exclusion (lock kept until the update)",
            format!(
                "c{c} holds s{s} b{i} (owner {owner:#x}) and has not sent its update, but \
                 n{node}, which granted it and has not fenced it, no longer has its lock"
            ),
        );
    }

    /// Problem 4 (sim/README.md, fixed): a client retries a lock under the same
    /// owner while an unlock of that owner from an earlier attempt waits in its
    /// backlog; when the backlog delivers it, it releases the lock the retry got.
    /// Found here, at the node, when a backlog unlock sent after the current
    /// attempt's lock request to this node (`UnlockOrigin::Backlog { after_lock }`)
    /// releases a lock of an owner whose write is still locking or holding. Counted;
    /// fatal with `Config::problem_4_fatal` (the default), else the write is excused
    /// from [`World::check_i4_lock_kept_until_update`] (so that check stays fatal for
    /// every other way of losing a lock).
    pub(crate) fn note_backlog_unlock(
        &mut self,
        node: usize,
        stripe: u64,
        owner: u64,
        blocks: &[(u8, u64)],
    ) {
        let held: Vec<u8> = self.nodes[node]
            .locks
            .iter()
            .filter(|(s, i, l)| {
                *s == stripe && l.owner == owner && blocks.iter().any(|b| b.0 == *i)
            })
            .map(|(_, i, _)| i)
            .collect();
        if held.is_empty() {
            return;
        }
        let mut hit = None;
        for (c, client) in self.clients.iter_mut().enumerate() {
            let live = matches!(client.phase, crate::client::Phase::Locking(_))
                || client
                    .phase
                    .write()
                    .is_some_and(|w| w.holding && w.update.is_none());
            if !live {
                continue;
            }
            if let Some(w) = client.phase.write_mut() {
                if w.owner == owner && w.stripe == stripe && held.contains(&w.index) {
                    w.lost_to_backlog = true;
                    hit = Some((c, w.index));
                }
            }
        }
        if let Some((c, i)) = hit {
            self.stats.problem_4 += 1;
            let detail = format!(
                "n{node}: c{c}'s backlog unlock of owner {owner:#x} (from an earlier attempt) \
                 releases the lock on s{stripe} b{i} that a retry of the same owner holds"
            );
            self.log(format!("PROBLEM 4: {detail}"));
            if self.cfg.problem_4_fatal {
                self.fail(
                    "I4 mutual exclusion (lock kept until the update; problem 4)",
                    detail,
                );
            }
        }
    }

    pub(crate) fn check_each_event(&mut self) {
        self.check_i4_single_holder();
        if self.violation.is_none() {
            self.check_i4_lock_kept_until_update();
        }
    }

    /// I5: after quiescence every update is held by every member that must hold it
    /// (its data node and every parity node: the version of its block there has the
    /// update's version on its lineage, by applying it or by a rebuild that installed
    /// a state including it), or by none (a fenced client's void update, skipped by
    /// the next writer); nothing is left pending; and the version an update was taken
    /// with went to that update (else it was taken somewhere and then lost). And I2
    /// for client faults: an update whose write was acknowledged is held, not void.
    pub(crate) fn check_i5_all_or_nothing(&mut self) {
        let n = self.width();
        let k = self.cfg.k;
        for node in 0..n {
            for (stripe, slot) in &self.nodes[node].slots {
                if let Some(p) = slot.pending.first() {
                    let detail = format!(
                        "n{node} still holds ({:#x},{}) s{stripe} b{} v{} base v{} pending (block at {:?})",
                        p.update.id.0,
                        p.update.id.1,
                        p.update.index,
                        p.update.version,
                        p.update.base,
                        slot.versions
                    );
                    self.fail("I5 all-or-nothing (left pending)", detail);
                    return;
                }
            }
        }
        let acked: BTreeSet<UpdateKey> = self
            .ledger
            .ops
            .iter()
            .filter(|o| o.result.is_ok())
            .filter_map(|o| o.update)
            .collect();
        let ids: BTreeSet<UpdateKey> = self.ledger.taken.union(&acked).copied().collect();
        for id in ids {
            let Some(intent) = self.ledger.intents.get(&id).cloned() else {
                continue;
            };
            let (s, i, v) = (intent.stripe, intent.update.index, intent.update.version);
            match self.ledger.version_ids.get(&(s, i, v)) {
                Some(other) if *other != id => {
                    let other = *other;
                    self.fail(
                        "I4 mutual exclusion (one update per version)",
                        format!(
                            "update ({:#x},{}) was taken for s{s} b{i} v{v}, but v{v} went to \
                             ({:#x},{}): the first is lost",
                            id.0, id.1, other.0, other.1
                        ),
                    );
                    return;
                }
                // Applied somewhere, or taken and never applied (void): the lineages
                // below tell which members hold it.
                _ => {}
            }
            let must: BTreeSet<usize> = std::iter::once(i as usize)
                .chain(k..n)
                .map(|p| self.member(s, p))
                .collect();
            let have: BTreeSet<usize> = must
                .iter()
                .copied()
                .filter(|node| {
                    let at = self.nodes[*node].slots[&s].versions[i as usize];
                    self.ledger.holds(s, i, at, v)
                })
                .collect();
            if !have.is_empty() && have != must {
                self.fail(
                    "I5 all-or-nothing",
                    format!(
                        "update ({:#x},{}) s{s} b{i} v{v} is held at nodes {have:?}, must be at {must:?}",
                        id.0, id.1
                    ),
                );
                return;
            }
            if have.is_empty() {
                if acked.contains(&id) {
                    self.fail(
                        "I2 no lost acknowledged write",
                        format!(
                            "update ({:#x},{}) s{s} b{i} v{v} base v{} was acknowledged to its \
                             writer, but no member holds it",
                            id.0, id.1, intent.update.base
                        ),
                    );
                    return;
                }
                self.stats.void_updates += 1;
                self.log(format!(
                    "update ({:#x},{}) s{s} b{i} v{v} is void: taken by some node, held by none",
                    id.0, id.1
                ));
            }
        }
    }

    /// I3 for rebuilds: a block a scrub installs is exactly the stripe's state at the
    /// versions it is installed with (a data block's value then, or the parity of
    /// the data blocks' values then).
    pub(crate) fn check_i3_rebuilt_block(
        &mut self,
        node: usize,
        stripe: u64,
        position: usize,
        versions: &[u64],
        data: &[u8],
    ) {
        let k = self.cfg.k;
        let value = |i: usize| self.ledger.value(stripe, i as u8, versions[i]);
        let expect = if position < k {
            value(position)
        } else {
            let datas: Option<Vec<Vec<u8>>> = (0..k).map(value).collect();
            datas.and_then(|d| {
                let refs: Vec<&[u8]> = d.iter().map(|x| x.as_slice()).collect();
                let mut parity = vec![vec![0u8; self.cfg.block]; self.cfg.m];
                let mut outs: Vec<&mut [u8]> =
                    parity.iter_mut().map(|b| b.as_mut_slice()).collect();
                self.codec.encode(&refs, &mut outs).ok()?;
                parity.into_iter().nth(position - k)
            })
        };
        if expect.as_deref() != Some(data) {
            self.fail(
                "I3 consistent reconstruction (rebuild)",
                format!(
                    "n{node} is given {data:02x?} for s{stripe} p{position} at {versions:?}; \
                     the stripe had {expect:02x?} then"
                ),
            );
        }
    }

    /// I1: when nothing is in flight, every parity block is the encoding of the data
    /// blocks, every member agrees on the versions, and each data block holds its
    /// history's value at its version (one of the values written to it, or zeros).
    pub(crate) fn check_i1_stripe_consistency(&mut self) {
        let k = self.cfg.k;
        let m = self.cfg.m;
        for s in 0..self.cfg.stripes {
            let mut data = Vec::new();
            let mut versions = Vec::new();
            for p in 0..k {
                let node = self.member(s, p);
                let slot = &self.nodes[node].slots[&s];
                data.push(slot.block.clone());
                versions.push(slot.versions[p]);
            }
            for (p, d) in data.iter().enumerate() {
                let expect = self.ledger.value(s, p as u8, versions[p]);
                if expect.as_ref() != Some(d) {
                    self.fail(
                        "I1 stripe consistency (data value)",
                        format!(
                            "s{s} b{p} at v{} holds {d:02x?}, its history has {expect:02x?}",
                            versions[p]
                        ),
                    );
                    return;
                }
            }
            let refs: Vec<&[u8]> = data.iter().map(|d| d.as_slice()).collect();
            let mut parity = vec![vec![0u8; self.cfg.block]; m];
            {
                let mut outs: Vec<&mut [u8]> =
                    parity.iter_mut().map(|b| b.as_mut_slice()).collect();
                if let Err(e) = self.codec.encode(&refs, &mut outs) {
                    self.fail("I1 stripe consistency", format!("encode failed: {e}"));
                    return;
                }
            }
            for (j, expect) in parity.iter().enumerate() {
                let node = self.member(s, k + j);
                let slot = &self.nodes[node].slots[&s];
                if slot.versions != versions {
                    let detail = format!(
                        "s{s}: parity p{} (n{node}) is at {:?}, the data blocks at {versions:?}",
                        k + j,
                        slot.versions
                    );
                    self.fail("I1 stripe consistency (versions)", detail);
                    return;
                }
                if slot.block != *expect {
                    let detail = format!(
                        "s{s}: parity p{} (n{node}) = {:02x?}, encode(data) = {expect:02x?} (versions {versions:?})",
                        k + j,
                        slot.block,
                    );
                    self.fail("I1 stripe consistency", detail);
                    return;
                }
            }
        }
    }

    /// After quiescence nothing is left hanging: no lock (a crashed or paused
    /// client's locks are released once its lease ran out), no unsettled update
    /// (completed or relayed), no settle or relay in progress, every client finished.
    pub(crate) fn check_liveness(&mut self) {
        for node in 0..self.width() {
            let nd = &self.nodes[node];
            if !nd.locks.is_empty() {
                let locks: Vec<String> = nd
                    .locks
                    .iter()
                    .map(|(s, i, l)| {
                        format!("s{s} b{i} owner={:#x} client={:#x}", l.owner, l.client)
                    })
                    .collect();
                self.fail(
                    "liveness (locks freed)",
                    format!("n{node} still holds {locks:?}"),
                );
                return;
            }
            if !nd.unsettled.is_empty() {
                let detail = format!("n{node} still has {} unsettled updates", nd.unsettled.len());
                self.fail("liveness (updates settled)", detail);
                return;
            }
            let busy = nd.busy();
            if !busy.is_empty() {
                self.fail("liveness", format!("n{node} is still busy with {busy:?}"));
                return;
            }
        }
        for c in 0..self.clients.len() {
            let cl = &self.clients[c];
            if !cl.done() {
                let detail = format!("c{c} is still {}", cl.phase_name());
                self.fail("liveness (clients finish)", detail);
                return;
            }
            if cl.alive && cl.backlog_len() > 0 {
                let detail = format!("c{c} still has {} undelivered unlocks", cl.backlog_len());
                self.fail("liveness (unlocks delivered)", detail);
                return;
            }
        }
    }

    /// The checks at quiescence, in order.
    pub(crate) fn check_quiescent(&mut self) {
        self.check_i5_all_or_nothing();
        if self.violation.is_none() {
            self.check_i1_stripe_consistency();
        }
        if self.violation.is_none() {
            self.check_liveness();
        }
    }
}
