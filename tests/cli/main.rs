//! drs-cli tests: the real binary, its output and exit codes.
//!
//! Every test runs `drs-cli` (and the `drs-server` next to it, via `DRS_SERVER_BIN`) as
//! real processes against local clusters in temporary directories, with a deadline on
//! every command. A [`harness::Cluster`] guard brings its cluster down (and SIGKILLs
//! any process still mentioning its directory) however the test ends.
//!
//! A `cluster up` whose node lost its port to another process between the port being
//! chosen and the node binding it is retried (see [`harness::Cluster::start`]).

// Tests fail by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/ansi.rs"]
mod ansi;
mod harness;

mod auth;
mod block;
mod cachegroup;
mod cluster;
mod config;
mod crash;
mod demo;
mod errors;
mod fuse;
mod metrics;
mod nodes;
mod scrub;
