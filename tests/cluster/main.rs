//! Multi-process tests: real drs-server processes on 127.0.0.1, killed and restarted.
//!
//! Every test starts its own local cluster (6 nodes unless it says otherwise, k = 4,
//! m = 2, 4 KiB blocks, 64 stripes) in a temporary directory through
//! [`common::TestCluster`], verifies data end to end byte for byte, and stops its
//! nodes when it ends. A failing test keeps its cluster directory and prints the tail
//! of every node's log.

// Helpers outside `#[test]` functions panic on purpose too: that is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/ansi.rs"]
mod ansi;
mod caches;
mod common;
mod deadclient;
mod diskfaults;
mod durability;
mod failures;
mod fsops;
mod hostile;
mod membership;
mod writes;
