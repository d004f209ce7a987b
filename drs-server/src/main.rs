//! `drs-server`: one DRS storage node.
//!
//! ```text
//! drs-server --cluster cluster.toml --node 3 [--data-dir DIR] [--listen ADDR] [--settle-ms MS]
//! ```
//! Logs go to stderr (`RUST_LOG` sets the level, default `info`). SIGTERM or SIGINT
//! stop it cleanly (after a checkpoint); SIGKILL is safe too (the log is replayed).

use clap::Parser;

fn main() {
    if let Err(e) = drs_server::cli::serve(drs_server::cli::ServeArgs::parse()) {
        eprintln!("drs-server: {e:#}");
        std::process::exit(1);
    }
}
