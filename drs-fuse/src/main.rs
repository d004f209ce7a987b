//! `drs-fuse mount --cluster FILE MOUNTPOINT`: mount a DRS cluster's file system.

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "drs-fuse",
    version,
    about = "Mount a DRS file system with FUSE"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Mount and serve until unmounted (fusermount3 -u MOUNTPOINT, SIGTERM or SIGINT).
    Mount(drs_fuse::cli::MountArgs),
}

fn main() {
    drs_fuse::cli::init_logging();
    let Cli { cmd } = Cli::parse();
    let res = match cmd {
        Cmd::Mount(a) => drs_fuse::mount(&a.config()),
    };
    if let Err(e) = res {
        eprintln!("drs-fuse: {e:#}");
        std::process::exit(1);
    }
}
