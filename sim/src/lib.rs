//! `drs-sim`: a deterministic, single-threaded discrete-event simulation of the DRS
//! write / lock / read / relay protocol, with the invariants of DESIGN-NOTES
//! checked as it runs.
//!
//! # What is modelled
//!
//! * **Nodes** ([`node`]): one volume of one or two stripes of k data + m parity
//!   blocks (k = 2..4, m = 1..2), placement rotating as in `Geometry::member`. Each
//!   node runs the *real* [`drs_lockgroups::LockGroup`] (locks, leases, fencing) and
//!   [`drs_lockgroups::UnsettledSet`] (updates whose delivery is unconfirmed), a model
//!   of the block store (bytes, per-index versions, known versions and fenced hints,
//!   updates applied only to the block at their base and held pending otherwise,
//!   duplicates recognised by update id, `StaleVersion` for older versions and for
//!   the versions a lock granted here with a `fenced` hint skipped), request
//!   admission as in `node.rs` (no lock over an update admitted and not yet answered,
//!   nor over one not yet passed on: `Settling`, which hurries the latter and wakes
//!   the relay loop; `may_update` for direct updates, relays bypass it,
//!   update-and-unlock releases after the update is durable, completion notices),
//!   lock-and-read and `Current` reads that wait for pending
//!   updates, and the all-or-nothing loop of `aon.rs` (every 100 ms, or at once when
//!   woken: fence clients whose lease ran out while holding locks there (a direct
//!   update renews the lease like a heartbeat), wait up to 2 s for their admitted updates, relay their unsettled
//!   updates, release their locks and note the versions they may have given out;
//!   relay every update unsettled for longer than `relay_after`; a recipient confirms
//!   with Ok or `StaleVersion`; an update passed on to every recipient is *offered*).
//! * **Clients** ([`client`]): scripts of writes and degraded reads. A write is
//!   `write_stripe` for one block (lock everywhere under a fresh owner, back off and
//!   retry while held or settling, base = highest known, next version = one past the
//!   highest known or fenced, old bytes at the base by lock-and-read / zeros /
//!   decoding under the lock (replies with the block older than the base left out,
//!   tried again for one request timeout), delta = old XOR new, update-and-unlock to every
//!   member that granted, `commit_stripe`'s acknowledgement rules, completion
//!   notices once every member that must hold the update acknowledged it, catch-up
//!   unlocks from a background backlog, delivered at a node before the same owner's
//!   next lock there); leases with heartbeats every lease/3, the
//!   `lease_ok` check before sending (at `min_write` of the members that granted), completion notices piggybacked or in
//!   heartbeats, a new identity when fenced. Degraded reads ask k..k+m-1 members and
//!   decode with the *real* `drs_client::select::choose_at_least` and the *real*
//!   [`drs_codec::Codec`] (8-byte blocks).
//! * **Faults** ([`scenario`]): per seed, message loss, duplication, reordering
//!   (random and occasionally long delays; channels FIFO or not), request timeouts
//!   (the client then counts the member as failed, as the real client does), log
//!   syncs that stall (by default for less than the request timeout), client
//!   crashes at random times or
//!   at named steps of a write, client pauses longer than the lease (the client then
//!   goes on and must be fenced).
//!
//! Everything random comes from one `StdRng` seeded with the seed, and every
//! collection iterated is ordered, so a seed always gives the same run: the trace
//! hash in [`Report`] is the proof.
//!
//! # What is not modelled
//!
//! Node crashes and restarts (the store's log replay, rejoin, rebuild and scrub are
//! other machinery; a node here never loses its memory, so the unsettled set is never
//! lost); cache groups and the client-client interface; `AsOf` reads (a degraded read
//! that finds no agreeing k replies fails instead of asking again); several blocks
//! per update; the cluster map and epochs; the store's batching (one job at a time,
//! with the same order of decisions), its undo buffers and checksums.
//!
//! # Invariants
//!
//! See [`invariants`]: I3 on every decode, I4 on every admission, apply and event, and
//! I5 (with I2 for acknowledged writes), I1 and liveness once the run has quiesced
//! (no new operations, no more faults, time advanced past leases and `relay_after`
//! several times).
//!
//! # Reproducing a seed
//!
//! `DRS_SIM_SEED=1234 cargo test -p drs-sim --test sim replay -- --nocapture` prints
//! the seed's whole trace and its verdict.

pub mod client;
pub mod invariants;
pub mod node;
pub mod recover;
pub mod scenario;
pub mod types;
pub mod world;

pub use client::OpRecord;
pub use invariants::Violation;
pub use scenario::{ClientPlan, Config, GenOpts, Hook, NetFaults, Scenario, ScriptOp, Variant};
pub use world::{run_scenario, run_seed, Report, RunOpts, Stats};
