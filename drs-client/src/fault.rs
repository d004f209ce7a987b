//! Fault injection for tests: this process kills (SIGKILL) or stops (SIGSTOP) itself
//! at a named step of the write protocol, as if signalled from outside at exactly
//! that moment.
//!
//! Set `DRS_FAULT_CRASH=STEP[:N]` to die, or `DRS_FAULT_STOP=STEP[:N]` to stop, the
//! Nth time (default 1) the client reaches STEP: `after-lock`, `after-old-data`,
//! `before-send` (the lease was checked, nothing sent yet), `after-data` (the data
//! node took the update), `after-parity-J` (J of the m parity nodes took it,
//! J = 0..m), `before-unlock` (every update sent, the other data nodes' unlocks not
//! yet). While one is set, a write's messages go to one member at a time, in that
//! order. Unset (the normal case), none of this does anything.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// A step of a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    AfterLock,
    AfterOldData,
    BeforeSend,
    AfterData,
    /// After this many parity nodes took the update.
    AfterParity(usize),
    BeforeUnlock,
}

impl Step {
    fn name(&self) -> String {
        match self {
            Step::AfterLock => "after-lock".into(),
            Step::AfterOldData => "after-old-data".into(),
            Step::BeforeSend => "before-send".into(),
            Step::AfterData => "after-data".into(),
            Step::AfterParity(j) => format!("after-parity-{j}"),
            Step::BeforeUnlock => "before-unlock".into(),
        }
    }
}

struct Plan {
    step: String,
    nth: u64,
    seen: AtomicU64,
    signal: nix::sys::signal::Signal,
}

fn plan() -> Option<&'static Plan> {
    static PLAN: OnceLock<Option<Plan>> = OnceLock::new();
    PLAN.get_or_init(|| {
        use nix::sys::signal::Signal;
        let (v, signal) = match std::env::var("DRS_FAULT_CRASH") {
            Ok(v) => (v, Signal::SIGKILL),
            Err(_) => (std::env::var("DRS_FAULT_STOP").ok()?, Signal::SIGSTOP),
        };
        let (step, nth) = match v.split_once(':') {
            Some((s, n)) => (s.to_string(), n.parse().unwrap_or(1)),
            None => (v, 1),
        };
        Some(Plan {
            step,
            nth: nth.max(1),
            seen: AtomicU64::new(0),
            signal,
        })
    })
    .as_ref()
}

/// True when a crash or a stop is planned.
pub fn active() -> bool {
    plan().is_some()
}

/// The client reached `step`: die (or stop) here if planned.
pub fn at(step: Step) {
    let Some(p) = plan() else { return };
    if step.name() == p.step && p.seen.fetch_add(1, Ordering::AcqRel) + 1 == p.nth {
        eprintln!("fault injection: {} at {}", p.signal, p.step);
        let _ = nix::sys::signal::raise(p.signal);
    }
}
