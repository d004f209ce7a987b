//! The simulated world: one event queue, one clock, one random generator, the
//! network, the nodes and the clients; the run loop and the trace.

use std::collections::{BTreeMap, VecDeque};

use drs_codec::{Codec, Coefficients};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use drs_lockgroups::UpdateKey;

use crate::client::{Client, OpRecord, Purpose};
use crate::invariants::{Ledger, Violation};
use crate::node::Node;
use crate::scenario::{real, Config, GenOpts, Scenario};
use crate::types::{Addr, Body, Ev, Msg, Req, Resp, Time};

/// How a run reports.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOpts {
    /// Print every trace line to stderr as it happens.
    pub full_trace: bool,
}

/// Counters of one run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub events: u64,
    pub messages: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub writes_ok: u64,
    pub writes_failed: u64,
    pub lock_retries: u64,
    pub reads_ok: u64,
    pub reads_failed: u64,
    /// Decoded values checked against the block's history (I3).
    pub values_checked: u64,
    pub fenced: u64,
    pub client_fenced: u64,
    pub relays: u64,
    pub relays_applied: u64,
    pub stalls: u64,
    pub crashes: u64,
    pub pauses: u64,
    /// Times problem 4 happened (a backlog unlock released a retried lock).
    pub problem_4: u64,
    /// Lock requests a node refused with `Settling` (an update of the block not yet
    /// passed on).
    pub settling: u64,
    /// Updates that found their block at a version they skipped (a fenced client's
    /// void update held there): held pending until the block is rebuilt.
    pub divergent: u64,
    /// Updates some node took that no member holds at quiescence (void: a fenced
    /// client's, skipped by the next writer and discarded by a rebuild).
    pub void_updates: u64,
    pub end_ms: Time,
}

impl Stats {
    pub fn add(&mut self, o: &Stats) {
        self.events += o.events;
        self.messages += o.messages;
        self.lost += o.lost;
        self.duplicated += o.duplicated;
        self.writes_ok += o.writes_ok;
        self.writes_failed += o.writes_failed;
        self.lock_retries += o.lock_retries;
        self.reads_ok += o.reads_ok;
        self.reads_failed += o.reads_failed;
        self.values_checked += o.values_checked;
        self.fenced += o.fenced;
        self.client_fenced += o.client_fenced;
        self.relays += o.relays;
        self.relays_applied += o.relays_applied;
        self.stalls += o.stalls;
        self.crashes += o.crashes;
        self.pauses += o.pauses;
        self.problem_4 += o.problem_4;
        self.settling += o.settling;
        self.divergent += o.divergent;
        self.void_updates += o.void_updates;
        self.end_ms = self.end_ms.max(o.end_ms);
    }
}

/// The result of one run.
#[derive(Debug, Clone)]
pub struct Report {
    pub seed: u64,
    pub summary: String,
    pub violation: Option<Violation>,
    /// FNV-1a over every trace line: equal for equal runs.
    pub trace_hash: u64,
    /// The last trace lines (all of them with `full_trace`).
    pub tail: Vec<String>,
    pub stats: Stats,
    /// Every operation's outcome.
    pub ops: Vec<OpRecord>,
    /// For every update some node took: the nodes that applied it.
    pub applied: BTreeMap<UpdateKey, Vec<usize>>,
    /// Locks left at the end, over all nodes.
    pub locks_left: usize,
}

/// Trace lines kept for a failure report.
const TAIL: usize = 60;

struct Trace {
    full: bool,
    tail: VecDeque<String>,
    hash: u64,
}

impl Trace {
    fn push(&mut self, line: String) {
        for b in line.as_bytes().iter().chain(std::iter::once(&b'\n')) {
            self.hash ^= *b as u64;
            self.hash = self.hash.wrapping_mul(0x100_0000_01b3);
        }
        if self.full {
            eprintln!("{line}");
        }
        if self.tail.len() >= TAIL {
            self.tail.pop_front();
        }
        self.tail.push_back(line);
    }
}

/// An outstanding request and what its answer is for.
#[derive(Debug, Clone)]
pub(crate) struct Call {
    pub from: Addr,
    pub to: usize,
    pub purpose: Purpose,
}

pub struct World {
    pub cfg: Config,
    pub seed: u64,
    pub now: Time,
    pub(crate) rng: StdRng,
    events: BTreeMap<(Time, u64), Ev>,
    ev_seq: u64,
    pub(crate) calls: BTreeMap<u64, Call>,
    next_call: u64,
    next_id: u64,
    chan_last: BTreeMap<(Addr, Addr), Time>,
    pub(crate) nodes: Vec<Node>,
    pub(crate) clients: Vec<Client>,
    pub(crate) codec: Codec,
    pub(crate) ledger: Ledger,
    /// Quiescence: no more loss, duplication, slow messages or disk stalls.
    pub(crate) reliable: bool,
    trace: Trace,
    pub violation: Option<Violation>,
    pub stats: Stats,
}

impl World {
    /// Builds the world of `scn`; `rng` goes on from where the scenario was drawn.
    pub fn new(scn: &Scenario, rng: StdRng, opts: RunOpts) -> Result<World, String> {
        let cfg = scn.cfg.clone();
        let coefficients = Coefficients::default_for(cfg.k, cfg.m).map_err(|e| e.to_string())?;
        let codec = Codec::new(coefficients);
        let n = cfg.width();
        let nodes = (0..n).map(|id| Node::new(id, &cfg)).collect();
        let clients = scn
            .clients
            .iter()
            .enumerate()
            .map(|(i, p)| Client::new(i, p.clone()))
            .collect();
        let ledger = Ledger::new(&cfg);
        let mut w = World {
            cfg,
            seed: scn.seed,
            now: 0,
            rng,
            events: BTreeMap::new(),
            ev_seq: 0,
            calls: BTreeMap::new(),
            next_call: 1,
            next_id: 1,
            chan_last: BTreeMap::new(),
            nodes,
            clients,
            codec,
            ledger,
            reliable: false,
            trace: Trace {
                full: opts.full_trace,
                tail: VecDeque::new(),
                hash: 0xcbf2_9ce4_8422_2325,
            },
            violation: None,
            stats: Stats::default(),
        };
        for node in 0..n {
            let phase = w.rng.gen_range(1..=real::NODE_TICK);
            w.schedule(phase, Ev::NodeTick { node, serial: 0 });
            w.schedule(phase, Ev::LifeTick(node));
        }
        for c in 0..w.clients.len() {
            let id = w.fresh_client_id();
            w.clients[c].id = id;
            let plan = w.clients[c].plan.clone();
            w.schedule(
                plan.start_ms,
                Ev::ClientWake {
                    client: c,
                    serial: 0,
                },
            );
            if let Some(t) = plan.crash_at {
                w.schedule(t, Ev::ClientCrash(c));
            }
            if let Some((t, ms)) = plan.pause {
                w.schedule(t, Ev::ClientPause { client: c, ms });
            }
        }
        Ok(w)
    }

    pub fn width(&self) -> usize {
        self.cfg.width()
    }

    /// Node holding position `p` of `stripe` (placement rotates, PROTOCOL.md 1).
    pub fn member(&self, stripe: u64, p: usize) -> usize {
        ((stripe as usize) + p) % self.width()
    }

    /// Position of `node` in `stripe`.
    pub fn position_of(&self, stripe: u64, node: usize) -> usize {
        let n = self.width();
        (node + n - (stripe as usize) % n) % n
    }

    pub(crate) fn fresh_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// A random client or owner id (as `rand::random::<u64>() | 1`).
    pub(crate) fn fresh_client_id(&mut self) -> u64 {
        self.rng.gen::<u64>() | 1
    }

    pub(crate) fn schedule(&mut self, at: Time, ev: Ev) {
        self.ev_seq += 1;
        self.events.insert((at, self.ev_seq), ev);
    }

    pub(crate) fn log(&mut self, line: String) {
        let l = format!("{:>7} {line}", self.now);
        self.trace.push(l);
    }

    pub(crate) fn fail(&mut self, invariant: &'static str, detail: String) {
        if self.violation.is_none() {
            self.log(format!("VIOLATION {invariant}: {detail}"));
            self.violation = Some(Violation {
                invariant,
                detail,
                at: self.now,
            });
        }
    }

    /// Puts a message on the network: lost, delayed, or duplicated as the faults say.
    pub(crate) fn send(&mut self, msg: Msg) {
        self.stats.messages += 1;
        let net = if self.reliable {
            crate::scenario::NetFaults::reliable()
        } else {
            self.cfg.net.clone()
        };
        if net.loss > 0.0 && self.rng.gen_bool(net.loss) {
            self.stats.lost += 1;
            self.log(format!("lost {}->{} #{}", msg.from, msg.to, msg.call));
            return;
        }
        let copies = if net.dup > 0.0 && self.rng.gen_bool(net.dup) {
            self.stats.duplicated += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            let mut delay = self.rng.gen_range(1..=net.max_delay.max(1));
            if net.slow > 0.0 && self.rng.gen_bool(net.slow) {
                delay = self.rng.gen_range(100..=net.slow_max.max(100));
            }
            let mut at = self.now + delay;
            if net.fifo {
                let last = self.chan_last.entry((msg.from, msg.to)).or_insert(0);
                at = at.max(*last);
                *last = at;
            }
            self.schedule(at, Ev::Deliver(Box::new(msg.clone())));
        }
    }

    /// Sends a request from `from` to node `to` with the requester's timeout; the
    /// answer (or the timeout) goes to `purpose`.
    pub(crate) fn call(&mut self, from: Addr, to: usize, req: Req, purpose: Purpose) -> u64 {
        let id = self.next_call;
        self.next_call += 1;
        let deadline = self.now + self.cfg.request_timeout_ms;
        self.calls.insert(id, Call { from, to, purpose });
        self.send(Msg {
            from,
            to: Addr::Node(to),
            call: id,
            deadline,
            body: Body::Req(req),
        });
        self.schedule(deadline, Ev::CallTimeout { call: id });
        id
    }

    /// Answers request `call` from node `node` to `to`.
    pub(crate) fn respond(&mut self, node: usize, to: Addr, call: u64, resp: Resp) {
        self.send(Msg {
            from: Addr::Node(node),
            to,
            call,
            deadline: self.now,
            body: Body::Resp(resp),
        });
    }

    /// The client an event belongs to (deferred while it is paused, dropped once it
    /// crashed).
    fn client_of(&self, ev: &Ev) -> Option<usize> {
        match ev {
            Ev::Deliver(m) => match m.to {
                Addr::Client(c) => Some(c),
                Addr::Node(_) => None,
            },
            Ev::CallTimeout { call } => match self.calls.get(call).map(|c| c.from) {
                Some(Addr::Client(c)) => Some(c),
                _ => None,
            },
            Ev::ClientWake { client, .. } => Some(*client),
            Ev::ClientHbTick(c) | Ev::ClientBacklogTick(c) => Some(*c),
            _ => None,
        }
    }

    /// Runs one event; false when none is left.
    fn step(&mut self) -> bool {
        let Some(((t, _), ev)) = self.events.pop_first() else {
            return false;
        };
        self.now = t;
        self.stats.events += 1;
        if let Some(c) = self.client_of(&ev) {
            if !self.clients[c].alive {
                if let Ev::CallTimeout { call } = ev {
                    self.calls.remove(&call);
                }
                return true;
            }
            if let Some(until) = self.clients[c].paused_until {
                if until > self.now {
                    self.schedule(until, ev);
                    return true;
                }
                self.clients[c].paused_until = None;
                self.log(format!("c{c} resumes"));
            }
        }
        match ev {
            Ev::Deliver(msg) => self.deliver(*msg),
            Ev::CallTimeout { call } => {
                if let Some(c) = self.calls.remove(&call) {
                    self.log(format!("{} timeout #{call} (to n{})", c.from, c.to));
                    self.answer(c, None);
                }
            }
            Ev::NodeTick { node, serial } => self.node_tick(node, serial),
            Ev::NodeRelayNow(n) => self.node_relay_now(n),
            Ev::LifeTick(n) => {
                self.life_tick(n);
                self.schedule(self.now + real::NODE_TICK, Ev::LifeTick(n));
            }
            Ev::StoreDone(n) => self.store_done(n),
            Ev::SettlePoll { node, settle } => self.settle_poll(node, settle),
            Ev::WaitExpire { node, wait } => self.wait_expire(node, wait),
            Ev::HeldRelayExpire { node, hold } => self.held_relay_expire(node, hold),
            Ev::NodeWake { node, serial } => self.node_wake(node, serial),
            Ev::ClientWake { client, serial } => self.client_wake(client, serial),
            Ev::ClientHbTick(c) => self.hb_tick(c),
            Ev::ClientBacklogTick(c) => self.backlog_tick(c),
            Ev::ClientCrash(c) => {
                if self.clients[c].alive {
                    self.clients[c].alive = false;
                    self.stats.crashes += 1;
                    self.log(format!("c{c} CRASHES (id {:#x})", self.clients[c].id));
                }
            }
            Ev::ClientPause { client, ms } => self.pause_client(client, ms),
        }
        if self.violation.is_none() {
            self.check_each_event();
        }
        true
    }

    pub(crate) fn pause_client(&mut self, c: usize, ms: Time) {
        if !self.clients[c].alive {
            return;
        }
        let until = self.now + ms;
        let cur = self.clients[c].paused_until.unwrap_or(0);
        self.clients[c].paused_until = Some(cur.max(until));
        self.stats.pauses += 1;
        self.log(format!("c{c} PAUSED for {ms} ms"));
    }

    fn deliver(&mut self, msg: Msg) {
        match (msg.to, msg.body) {
            (Addr::Node(n), Body::Req(req)) => {
                self.log(format!(
                    "{}->n{n} #{} {}",
                    msg.from,
                    msg.call,
                    crate::node::describe_req(&req)
                ));
                self.node_handle(n, msg.from, msg.call, msg.deadline, req);
            }
            (to, Body::Resp(resp)) => {
                self.log(format!(
                    "{}->{to} #{} {}",
                    msg.from,
                    msg.call,
                    crate::node::describe_resp(&resp)
                ));
                // Late answers (after a timeout) and duplicates find no call.
                if let Some(c) = self.calls.remove(&msg.call) {
                    self.answer(c, Some(resp));
                }
            }
            (Addr::Client(c), Body::Req(_)) => {
                self.log(format!("c{c}: unexpected request"));
            }
        }
    }

    /// An answer (None: the call timed out) goes to whoever asked.
    fn answer(&mut self, call: Call, resp: Option<Resp>) {
        match call.from {
            Addr::Client(c) => self.client_answer(c, call.to, call.purpose, resp),
            Addr::Node(n) => self.node_answer(n, call.to, call.purpose, resp),
        }
    }

    /// Runs the scenario to quiescence and checks every invariant.
    pub fn run(mut self) -> Report {
        let mut quiet_until: Option<Time> = None;
        loop {
            if self.violation.is_some() {
                break;
            }
            if quiet_until.is_none()
                && (self.clients.iter().all(|c| c.done()) || self.now > self.cfg.max_active_ms)
            {
                if self.now > self.cfg.max_active_ms {
                    self.fail(
                        "liveness",
                        format!(
                            "clients still busy after {} ms: {:?}",
                            self.cfg.max_active_ms,
                            self.clients
                                .iter()
                                .map(|c| c.phase_name())
                                .collect::<Vec<_>>()
                        ),
                    );
                    break;
                }
                let span = 4 * (self.cfg.lease_ms + self.cfg.relay_after_ms + real::NODE_TICK)
                    + 2 * real::INFLIGHT_WAIT
                    + 3 * self.cfg.request_timeout_ms
                    + self.cfg.net.slow_max
                    + self.cfg.stall_ms
                    + 4 * real::BACKLOG_ROUND
                    + 2 * (self.cfg.verify_interval_ms + self.cfg.stuck_after_ms)
                    + 4 * real::STUCK_CHECK;
                self.reliable = true;
                quiet_until = Some(self.now + span);
                self.log(format!(
                    "QUIESCE: no new operations, no faults; running to {}",
                    self.now + span
                ));
            }
            if let Some(end) = quiet_until {
                match self.events.first_key_value() {
                    Some(((t, _), _)) if *t <= end => {}
                    _ => break,
                }
            }
            if !self.step() {
                break;
            }
        }
        if self.violation.is_none() {
            self.check_quiescent();
        }
        self.stats.end_ms = self.now;
        let summary = self.summary();
        let applied = self
            .ledger
            .taken
            .iter()
            .map(|id| {
                let at = (0..self.width())
                    .filter(|n| self.nodes[*n].applied_ids.contains(id))
                    .collect();
                (*id, at)
            })
            .collect();
        Report {
            seed: self.seed,
            summary,
            violation: self.violation.clone(),
            trace_hash: self.trace.hash,
            tail: self.trace.tail.iter().cloned().collect(),
            stats: self.stats.clone(),
            ops: std::mem::take(&mut self.ledger.ops),
            applied,
            locks_left: self.nodes.iter().map(|n| n.locks.len()).sum(),
        }
    }

    fn summary(&self) -> String {
        let c = &self.cfg;
        format!(
            "k={} m={} stripes={} min_write={} clients={} lease={} relay_after={} \
             timeout={} stuck_after={} verify_every={} loss={} dup={} slow={} fifo={} stall={}x{}ms{}",
            c.k,
            c.m,
            c.stripes,
            c.min_write,
            self.clients.len(),
            c.lease_ms,
            c.relay_after_ms,
            c.request_timeout_ms,
            c.stuck_after_ms,
            c.verify_interval_ms,
            c.net.loss,
            c.net.dup,
            c.net.slow,
            c.net.fifo,
            c.disk_stall,
            c.stall_ms,
            if c.variant == crate::scenario::Variant::default() {
                String::new()
            } else {
                format!(" variant={:?}", c.variant)
            }
        )
    }
}

/// Runs seed `seed`: draws its scenario, simulates it, checks the invariants.
pub fn run_seed(seed: u64, gen: GenOpts, opts: RunOpts) -> Report {
    let mut rng = StdRng::seed_from_u64(seed);
    let scn = Scenario::random(seed, &mut rng, gen);
    run_scenario(&scn, rng, opts)
}

/// Runs a given scenario (targeted tests), with the random generator of its seed.
pub fn run_scenario(scn: &Scenario, rng: StdRng, opts: RunOpts) -> Report {
    match World::new(scn, rng, opts) {
        Ok(w) => w.run(),
        Err(e) => Report {
            seed: scn.seed,
            summary: String::new(),
            violation: Some(Violation {
                invariant: "setup",
                detail: e,
                at: 0,
            }),
            trace_hash: 0,
            tail: Vec::new(),
            stats: Stats::default(),
            ops: Vec::new(),
            applied: BTreeMap::new(),
            locks_left: 0,
        },
    }
}
