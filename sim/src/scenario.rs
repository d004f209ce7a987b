//! What one run simulates: geometry, timing, faults and the clients' scripts, all
//! drawn from the seed (or written by hand for the targeted tests).

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

use crate::types::Time;

/// Constants of the real code (drs-server/src/aon.rs, node.rs; drs-client lease.rs,
/// backlog.rs, write.rs).
pub mod real {
    use super::Time;
    /// aon.rs: how often leases and unsettled updates are looked at.
    pub const NODE_TICK: Time = 100;
    /// aon.rs: longest a fenced client's admitted updates are waited for.
    pub const INFLIGHT_WAIT: Time = 2000;
    /// node.rs: longest a lock-and-read waits for pending updates.
    pub const LOCK_READ_WAIT: Time = 2000;
    /// lease.rs: the heartbeat task's tick.
    pub const CLIENT_TICK: Time = 50;
    /// backlog.rs: a round of deferred unlocks.
    pub const BACKLOG_ROUND: Time = 250;
    /// store/mod.rs: update ids remembered per slot.
    pub const RECENT_IDS: usize = 32;
    /// write.rs: the pause between tries of decoding the old bytes from the stripe
    /// (they go on for one request timeout).
    pub const OLD_READ_SLEEP: Time = 50;
    /// recover.rs: how often stuck blocks are looked for.
    pub const STUCK_CHECK: Time = 1000;
    /// scrub.rs: attempts at reading a stripe that agrees.
    pub const SCRUB_ATTEMPTS: usize = 4;
    /// node.rs default: bytes of unsettled updates kept.
    pub const UNSETTLED_BYTES: usize = 256 << 20;
    /// aon.rs: times an unsettled update is passed on before it is given up.
    pub const RELAY_PASSES: u32 = 150;
}

/// Network faults. Each message is delivered after a random delay, or lost, or
/// delivered twice.
#[derive(Debug, Clone, PartialEq)]
pub struct NetFaults {
    /// Probability a message is lost.
    pub loss: f64,
    /// Probability a message is delivered twice (the copy with its own delay).
    pub dup: f64,
    /// Probability a message is slow (100..=slow_max ms): reorders it past others.
    pub slow: f64,
    pub slow_max: Time,
    /// Ordinary delay: 1..=max_delay ms.
    pub max_delay: Time,
    /// Keep each (sender, receiver) channel in order (as one TCP connection does).
    pub fifo: bool,
}

impl NetFaults {
    pub fn reliable() -> NetFaults {
        NetFaults {
            loss: 0.0,
            dup: 0.0,
            slow: 0.0,
            slow_max: 0,
            max_delay: 2,
            fifo: true,
        }
    }
}

/// Geometry and timing.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub k: usize,
    pub m: usize,
    pub stripes: u64,
    pub block: usize,
    /// Members that must grant a lock / take a write (`VolumeConfig::min_write`).
    pub min_write: usize,
    pub lease_ms: Time,
    pub relay_after_ms: Time,
    pub request_timeout_ms: Time,
    pub lock_timeout_ms: Time,
    /// A block that knows of a version it has not applied for this long is rebuilt.
    pub stuck_after_ms: Time,
    /// How often every block is compared with its stripe (and rebuilt if behind).
    pub verify_interval_ms: Time,
    pub net: NetFaults,
    /// Probability that a store job's log sync stalls for `stall_ms`.
    pub disk_stall: f64,
    pub stall_ms: Time,
    /// Store jobs whose log sync stalls for `stall_ms` for sure: (node, job number at
    /// that node, from 0). For targeted tests.
    pub stall_jobs: Vec<(usize, u64)>,
    /// Latest simulated time for the clients to finish before quiescence is forced.
    pub max_active_ms: Time,
    /// Put back the code as it was before a fix (see [`Variant`]).
    pub variant: Variant,
    /// Problem 4 (a client's backlog unlock releasing a lock its own owner holds
    /// again) breaks the run; otherwise it is counted and excused.
    pub problem_4_fatal: bool,
}

/// Changes to the modelled protocol. `Variant::default()` is the real code; each
/// switch puts back the code as it was before a problem the simulation found was
/// fixed (sim/README.md, "Problems found"), so the targeted tests can show that
/// their scenarios still catch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Variant {
    /// `old-completion`: write.rs `commit_stripe` sends completion notices when
    /// every member that *granted the lock* acknowledged the write, leaving a member
    /// that must hold the update and did not grant to a later rebuild (problem
    /// "completion with members that did not grant"). The real code sends them once
    /// every member that must hold the update (its data node and every parity node)
    /// acknowledged it.
    pub old_completion: bool,
    /// `old-skip`: a node that granted a lock whose reply carried a `fenced` hint
    /// does not refuse updates with the versions the hint told the owner to skip
    /// (problem "void relay").
    pub old_skip: bool,
    /// `old-hint`: `note_fenced` records one past the known and applied versions,
    /// ignoring an earlier hint (problem "fenced hint").
    pub old_hint: bool,
    /// `old-hurry`: `hurry` sets an unsettled update's time to 0, which `due` takes
    /// only once the node's uptime reaches `relay_after` (problem "early hurry").
    pub old_hurry: bool,
    /// `old-settling`: `Settling` covers only unsettled updates (durable ones), not
    /// updates admitted and still in the writer (problem "update outlives its
    /// lock").
    pub old_settling: bool,
    /// `old-backlog`: a client sends a lock without first delivering the unlocks of
    /// the same owner its backlog holds for that node (problem "a backlog unlock
    /// releases a retried lock").
    pub old_backlog: bool,
}

impl Variant {
    /// From `DRS_SIM_VARIANT` (comma-separated names: `old-completion`, `old-skip`,
    /// `old-hint`, `old-hurry`, `old-settling`, `old-backlog`; `old` for all of
    /// them), for experiments.
    pub fn from_env() -> Variant {
        let v = std::env::var("DRS_SIM_VARIANT").unwrap_or_default();
        Variant::from_names(&v)
    }

    /// From comma-separated names (see [`Variant::from_env`]).
    pub fn from_names(v: &str) -> Variant {
        let has = |name: &str| v.split(',').any(|x| x.trim() == name || x.trim() == "old");
        Variant {
            old_completion: has("old-completion"),
            old_skip: has("old-skip"),
            old_hint: has("old-hint"),
            old_hurry: has("old-hurry"),
            old_settling: has("old-settling"),
            old_backlog: has("old-backlog"),
        }
    }
}

impl Config {
    pub fn width(&self) -> usize {
        self.k + self.m
    }

    /// A small, fault-free configuration (the targeted tests change what they need).
    pub fn quiet(k: usize, m: usize) -> Config {
        Config {
            k,
            m,
            stripes: 1,
            block: 8,
            min_write: k,
            lease_ms: 1000,
            relay_after_ms: 500,
            request_timeout_ms: 300,
            lock_timeout_ms: 3000,
            stuck_after_ms: 1000,
            verify_interval_ms: 5000,
            net: NetFaults::reliable(),
            disk_stall: 0.0,
            stall_ms: 2500,
            stall_jobs: Vec::new(),
            max_active_ms: 120_000,
            variant: Variant::default(),
            problem_4_fatal: true,
        }
    }
}

/// One step of a client's script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScriptOp {
    /// Write `data` at `offset` of data block `index` of `stripe` (lock, old bytes,
    /// delta, update-and-unlock).
    Write {
        stripe: u64,
        index: u8,
        offset: usize,
        data: Vec<u8>,
    },
    /// A degraded read of data block `index`: ask the members at `ask` (positions),
    /// decode from k replies that `select::choose` picks.
    Read {
        stripe: u64,
        index: u8,
        ask: Vec<usize>,
    },
    Sleep(Time),
}

/// A fault at a named step of one write (as drs-client's `fault::Step`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// Crash once the lock is held everywhere it was granted.
    CrashAfterLock,
    /// Crash once the old bytes are known (before the lease check and the send).
    CrashAfterOldBytes,
    /// Crash after sending the first `n` messages of update-and-unlock (the data node
    /// first, then parity nodes, then the other data nodes).
    CrashAfterSending(usize),
    /// Stop for this long after the lease check, just before sending.
    PauseBeforeSend(Time),
}

/// One client's plan.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientPlan {
    pub start_ms: Time,
    pub script: Vec<ScriptOp>,
    /// Think time between operations: 0..=think_ms.
    pub think_ms: Time,
    /// The process dies at this time.
    pub crash_at: Option<Time>,
    /// The process is stopped at `.0` for `.1` ms.
    pub pause: Option<(Time, Time)>,
    /// Faults at named steps, by write number (0 = the client's first write).
    pub hooks: Vec<(usize, Hook)>,
}

impl ClientPlan {
    pub fn new(start_ms: Time, script: Vec<ScriptOp>) -> ClientPlan {
        ClientPlan {
            start_ms,
            script,
            think_ms: 0,
            crash_at: None,
            pause: None,
            hooks: Vec::new(),
        }
    }
}

/// Everything one run needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    pub seed: u64,
    pub cfg: Config,
    pub clients: Vec<ClientPlan>,
}

fn pick<T: Copy>(rng: &mut StdRng, xs: &[T]) -> T {
    xs[rng.gen_range(0..xs.len())]
}

/// How random scenarios are drawn. The default leaves out the regions where the real
/// code breaks invariants or the model's assumptions (sim/README.md, "Problems
/// found"); the switches put them back. Every seed draws the same numbers either way: the switches only change
/// how some of them are used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GenOpts {
    /// Let `min_write` be below the stripe width (writes then go on without members
    /// that did not grant the lock). Off: `min_write` = k + m.
    pub min_write_below_width: bool,
    /// Let log-sync stalls outlast the request timeout and the lease plus the
    /// settle's wait (6 s): only then can a fenced client's update land after the
    /// next writer skipped its version. Off: stalls are shorter than the request
    /// timeout (and than the lease plus the settle's wait).
    pub long_stalls: bool,
    /// Let half the seeds reorder messages within one sender-receiver channel (a TCP
    /// connection never does; the protocol relies on lock and unlock arriving in
    /// order). Off: every channel is FIFO; messages to different nodes still overtake
    /// each other.
    pub reorder_within_channel: bool,
    /// Count problem 4 (a backlog unlock releasing a lock its own owner holds again)
    /// instead of letting it break the run. Off: it breaks the run.
    pub problem_4_counted: bool,
    pub variant: Variant,
}

impl GenOpts {
    /// From `DRS_SIM_MIN_WRITE=any`, `DRS_SIM_LONG_STALLS=1`, `DRS_SIM_REORDER=1`,
    /// `DRS_SIM_FULL=1` (all three), `DRS_SIM_PROBLEM4=count`, and
    /// `DRS_SIM_VARIANT`.
    pub fn from_env() -> GenOpts {
        let set = |name: &str, value: &str| std::env::var(name).is_ok_and(|v| v == value);
        let full = set("DRS_SIM_FULL", "1");
        GenOpts {
            min_write_below_width: full || set("DRS_SIM_MIN_WRITE", "any"),
            long_stalls: full || set("DRS_SIM_LONG_STALLS", "1"),
            reorder_within_channel: full || set("DRS_SIM_REORDER", "1"),
            problem_4_counted: set("DRS_SIM_PROBLEM4", "count"),
            variant: Variant::from_env(),
        }
    }
}

impl Scenario {
    /// The scenario of `seed`. `rng` continues to drive the run.
    pub fn random(seed: u64, rng: &mut StdRng, opts: GenOpts) -> Scenario {
        let k = rng.gen_range(2..=4);
        let m = rng.gen_range(1..=2);
        let n = k + m;
        // Lock sets of min_write members must intersect (2 min_write > n), see
        // PROTOCOL.md section 9, I4: with k <= m and unreachable members two clients
        // can both hold a block by design.
        let choices: Vec<usize> = (k..=n).filter(|w| 2 * w > n).collect();
        let drawn = pick(rng, &choices);
        let min_write = if opts.min_write_below_width { drawn } else { n };
        let lease_ms = pick(rng, &[600, 1000, 3000]);
        let relay_after_ms = pick(rng, &[300, 1000, 2000]);
        let request_timeout_ms = pick(rng, &[300, 1000, 5000]);
        let lock_timeout_ms = pick(rng, &[3000, 10_000]);
        let net = NetFaults {
            loss: pick(rng, &[0.0, 0.01, 0.03, 0.08]),
            dup: pick(rng, &[0.0, 0.0, 0.02, 0.05]),
            slow: pick(rng, &[0.0, 0.02, 0.05]),
            slow_max: pick(rng, &[300, 2000]),
            max_delay: pick(rng, &[1, 5, 20]),
            fifo: rng.gen_bool(0.5) || !opts.reorder_within_channel,
        };
        let disk_stall = if rng.gen_bool(0.1) { 0.02 } else { 0.0 };
        let cfg = Config {
            k,
            m,
            stripes: if rng.gen_bool(0.3) { 2 } else { 1 },
            block: 8,
            min_write,
            lease_ms,
            relay_after_ms,
            request_timeout_ms,
            lock_timeout_ms,
            stuck_after_ms: pick(rng, &[1000, 5000]),
            verify_interval_ms: pick(rng, &[5000, 30_000]),
            net,
            disk_stall,
            stall_ms: {
                let drawn = pick(rng, &[2500, 6000]);
                if opts.long_stalls {
                    drawn
                } else {
                    (request_timeout_ms * 4 / 5).min(2500)
                }
            },
            stall_jobs: Vec::new(),
            max_active_ms: 600_000,
            variant: opts.variant,
            problem_4_fatal: !opts.problem_4_counted,
        };
        let nclients = rng.gen_range(2..=3);
        let mut clients = Vec::new();
        for _ in 0..nclients {
            let start_ms = rng.gen_range(0..200);
            let ops = rng.gen_range(3..=6);
            let mut script = Vec::new();
            let mut writes = 0;
            for _ in 0..ops {
                let stripe = rng.gen_range(0..cfg.stripes);
                let index = rng.gen_range(0..k) as u8;
                if rng.gen_bool(0.7) {
                    let len = if rng.gen_bool(0.5) {
                        cfg.block
                    } else {
                        rng.gen_range(1..=cfg.block)
                    };
                    let offset = rng.gen_range(0..=cfg.block - len);
                    let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                    script.push(ScriptOp::Write {
                        stripe,
                        index,
                        offset,
                        data,
                    });
                    writes += 1;
                } else {
                    let size = rng.gen_range(k..=n - 1);
                    let mut all: Vec<usize> = (0..n).collect();
                    all.shuffle(rng);
                    all.truncate(size);
                    all.sort_unstable();
                    script.push(ScriptOp::Read {
                        stripe,
                        index,
                        ask: all,
                    });
                }
                if rng.gen_bool(0.2) {
                    script.push(ScriptOp::Sleep(rng.gen_range(0..=lease_ms * 2)));
                }
            }
            let mut plan = ClientPlan::new(start_ms, script);
            plan.think_ms = pick(rng, &[0, 20, 200]);
            if rng.gen_bool(0.2) {
                plan.crash_at = Some(start_ms + rng.gen_range(0..3000));
            }
            if rng.gen_bool(0.2) {
                let at = start_ms + rng.gen_range(0..3000);
                let ms = lease_ms + rng.gen_range(lease_ms / 5..=lease_ms * 2);
                plan.pause = Some((at, ms));
            }
            if writes > 0 && rng.gen_bool(0.25) {
                let w = rng.gen_range(0..writes);
                let hook = match rng.gen_range(0..4) {
                    0 => Hook::CrashAfterLock,
                    1 => Hook::CrashAfterOldBytes,
                    2 => Hook::CrashAfterSending(rng.gen_range(1..n)),
                    _ => Hook::PauseBeforeSend(lease_ms + rng.gen_range(200..=lease_ms * 2)),
                };
                plan.hooks.push((w, hook));
            }
            clients.push(plan);
        }
        Scenario { seed, cfg, clients }
    }
}
