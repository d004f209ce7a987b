//! `drs-cli`: start local clusters, read and write blocks, show status, kill and
//! restart nodes, scrub, and run the demo.
//!
//! Every failure is one line on stderr and a non-zero exit.

mod block;
mod cluster;
mod demo;
mod load;
mod locks;
mod out;
mod replace;
mod scrub;
mod status;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use drs_client::{Client, ClientConfig};
use drs_local::{LocalCluster, NodeOptions, ServerCommand};
use drs_proto::ClusterMap;
use out::say;

#[derive(Parser, Debug)]
#[command(
    name = "drs-cli",
    version,
    about = "DRS: erasure-coded distributed block storage"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Start or stop a local cluster of node processes on 127.0.0.1.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Nodes up or down, stripes healthy or degraded. Exits 0 when every node is up
    /// and every stripe healthy, 2 when not (degraded, recovering, or nodes down),
    /// 1 on error.
    Status {
        #[command(flatten)]
        c: ClusterArg,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Read or write data blocks.
    #[command(subcommand)]
    Block(BlockCmd),
    /// Run concurrent self-verifying writers and readers; print throughput and any
    /// verification failure (exit 1 if there is one).
    Load {
        #[command(flatten)]
        c: ClusterArg,
        #[command(flatten)]
        a: load::LoadArgs,
    },
    /// The locks held right now: block, holder, and the holder's lease left.
    Locks {
        #[command(flatten)]
        c: ClusterArg,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Kill, stop, continue or start a node of a local cluster.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Add or remove replicas of the metadata service (Raft membership changes).
    #[command(subcommand)]
    Meta(MetaCmd),
    /// Check every stripe (checksums, versions, parity equations) and repair what can
    /// be repaired. Exits non-zero if anything is unrecoverable.
    Scrub {
        #[command(flatten)]
        c: ClusterArg,
        /// Only report; repair nothing.
        #[arg(long)]
        no_repair: bool,
        /// Read at most this many MiB per second.
        #[arg(long)]
        rate: Option<f64>,
        /// Stripes checked at once.
        #[arg(long, default_value_t = 8)]
        parallel: usize,
    },
    /// Start a local cluster, write random data, SIGKILL m nodes, read it back and
    /// verify it, restart the nodes, scrub, and shut down.
    Demo(demo::DemoArgs),
    /// Mount the cluster's file system with FUSE (as `drs-fuse mount`) and serve it
    /// until unmounted (fusermount3 -u MOUNTPOINT, SIGTERM or SIGINT).
    Mount(drs_fuse::cli::MountArgs),
    /// Run a storage node in this process (how `drs-cli` starts nodes unless
    /// `DRS_SERVER_BIN` names a `drs-server`).
    #[command(hide = true)]
    NodeServe(drs_server::cli::ServeArgs),
}

#[derive(Args, Debug, Clone)]
struct ClusterArg {
    /// The cluster file.
    #[arg(long, value_name = "FILE")]
    cluster: PathBuf,
}

#[derive(Subcommand, Debug)]
enum ClusterCmd {
    /// Create a cluster in DIR and start its nodes; writes DIR/cluster.toml.
    Up(cluster::UpArgs),
    /// Stop every node of the cluster in DIR.
    Down {
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum BlockCmd {
    /// Write data (stdin, or -i FILE) at block LBA; more than one block of data fills
    /// consecutive blocks, a short last block is zero-padded.
    Write {
        #[command(flatten)]
        c: ClusterArg,
        lba: u64,
        #[arg(short = 'i', long = "input", value_name = "FILE")]
        input: Option<PathBuf>,
    },
    /// Read COUNT blocks from LBA to stdout (or -o FILE).
    Read {
        #[command(flatten)]
        c: ClusterArg,
        lba: u64,
        #[arg(long, default_value_t = 1)]
        count: u64,
        #[arg(short = 'o', long = "output", value_name = "FILE")]
        output: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum NodeCmd {
    /// SIGKILL the node.
    Kill(NodeArg),
    /// SIGSTOP the node (it hangs).
    Stop(NodeArg),
    /// SIGCONT a stopped node.
    Cont(NodeArg),
    /// Start a node that is not running (it rejoins and rebuilds what it missed).
    Start(NodeArg),
    /// Add a node (new id; needs the metadata service): it joins the map and holds
    /// no blocks until a volume places some on it.
    Add {
        #[command(flatten)]
        c: ClusterArg,
        id: u32,
        /// Its address (default: a free port on 127.0.0.1).
        #[arg(long)]
        addr: Option<std::net::SocketAddr>,
    },
    /// Remove a node that holds no blocks (refused while a volume places blocks on it;
    /// use `replace` for those).
    Remove(NodeArg),
    /// Replace a node with a new, empty one that rebuilds all of its blocks from their
    /// stripes (needs the metadata service); shows progress until it is up.
    Replace(ReplaceArgs),
}

#[derive(Subcommand, Debug)]
enum MetaCmd {
    /// Add a replica hosted by node NODE (restarted to host it); it catches up as a
    /// learner, then votes.
    Add {
        #[command(flatten)]
        c: ClusterArg,
        /// The storage node that hosts the new replica.
        #[arg(long)]
        node: u32,
    },
    /// Remove replica ID from the group (its host restarts without it).
    Remove {
        #[command(flatten)]
        c: ClusterArg,
        id: u64,
    },
}

#[derive(Args, Debug)]
struct ReplaceArgs {
    #[command(flatten)]
    c: ClusterArg,
    /// The node id.
    id: u32,
    /// The new node's address (default: a free port on 127.0.0.1).
    #[arg(long)]
    addr: Option<std::net::SocketAddr>,
    /// Rebuild at most this many MiB per second (0: no limit), so foreground reads
    /// and writes keep their share.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Return once the new node is started, without waiting for its rebuild.
    #[arg(long)]
    no_wait: bool,
}

#[derive(Args, Debug)]
struct NodeArg {
    #[command(flatten)]
    c: ClusterArg,
    /// The node id.
    id: u32,
}

fn main() {
    let cli = Cli::parse();
    if let Cmd::NodeServe(args) = cli.cmd {
        if let Err(e) = drs_server::cli::serve(args) {
            eprintln!("drs-server: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    if let Cmd::Mount(args) = cli.cmd {
        drs_fuse::cli::init_logging();
        if let Err(e) = drs_fuse::mount(&args.config()) {
            eprintln!("drs-cli: error: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("drs-cli: error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    match rt.block_on(run(cli.cmd)) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("drs-cli: error: {e:#}");
            std::process::exit(1);
        }
    }
}

async fn run(cmd: Cmd) -> anyhow::Result<i32> {
    match cmd {
        Cmd::Cluster(ClusterCmd::Up(a)) => cluster::up(a).await.map(|_| 0),
        Cmd::Cluster(ClusterCmd::Down { dir }) => cluster::down(&dir).map(|_| 0),
        Cmd::Status { c, json } => status::run(&c.cluster, json).await,
        Cmd::Locks { c, json } => locks::run(&c.cluster, json).await,
        Cmd::Load { c, a } => load::run(&c.cluster, a).await,
        Cmd::Block(BlockCmd::Write { c, lba, input }) => {
            block::write(&c.cluster, lba, input.as_deref())
                .await
                .map(|_| 0)
        }
        Cmd::Block(BlockCmd::Read {
            c,
            lba,
            count,
            output,
        }) => block::read(&c.cluster, lba, count, output.as_deref())
            .await
            .map(|_| 0),
        Cmd::Meta(MetaCmd::Add { c, node }) => {
            let mut local = open_local(&c.cluster)?;
            let id = local
                .meta_add(node)
                .await
                .with_context(|| format!("add a metadata replica at node {node}"))?;
            say!("metadata replica {id} added, hosted by node {node}");
            Ok(0)
        }
        Cmd::Meta(MetaCmd::Remove { c, id }) => {
            let mut local = open_local(&c.cluster)?;
            local
                .meta_remove(id)
                .await
                .with_context(|| format!("remove metadata replica {id}"))?;
            say!("metadata replica {id} removed");
            Ok(0)
        }
        Cmd::Node(NodeCmd::Replace(a)) => replace::run(a).await.map(|_| 0),
        Cmd::Node(NodeCmd::Add { c, id, addr }) => {
            let mut local = open_local(&c.cluster)?;
            let addr = local
                .add_node(id, addr)
                .await
                .with_context(|| format!("add node {id}"))?;
            say!(
                "node {id} added at {addr}; log: {}",
                local.log_path(id).display()
            );
            Ok(0)
        }
        Cmd::Node(NodeCmd::Remove(a)) => {
            let mut local = open_local(&a.c.cluster)?;
            local
                .remove_node(a.id)
                .await
                .with_context(|| format!("remove node {}", a.id))?;
            say!("node {} removed", a.id);
            Ok(0)
        }
        Cmd::Node(cmd) => node(cmd).map(|_| 0),
        Cmd::Scrub {
            c,
            no_repair,
            rate,
            parallel,
        } => scrub::run(&c.cluster, !no_repair, rate, parallel).await,
        Cmd::Demo(a) => demo::run(a).await.map(|_| 0),
        Cmd::NodeServe(_) | Cmd::Mount(_) => Ok(0),
    }
}

/// How this program starts nodes: `$DRS_SERVER_BIN` if set, otherwise itself
/// (`drs-cli node-serve`), which runs the same node code, so nodes always speak the
/// same protocol version as the client (a `drs-server` left over from an older build
/// next to this one is never picked up by accident).
fn server_command() -> anyhow::Result<ServerCommand> {
    if std::env::var_os("DRS_SERVER_BIN").is_some() {
        return ServerCommand::locate().context("DRS_SERVER_BIN is set but unusable");
    }
    let exe = std::env::current_exe().context("find the drs-cli executable")?;
    Ok(ServerCommand {
        program: exe,
        prefix: vec!["node-serve".into()],
    })
}

fn open_local(cluster: &Path) -> anyhow::Result<LocalCluster> {
    LocalCluster::open(cluster, server_command()?, NodeOptions::default())
        .with_context(|| format!("open cluster {}", cluster.display()))
}

/// A client of the cluster's volume, from a cluster file or a client locator
/// (`client.toml`: the metadata service's addresses only).
async fn client(cluster: &Path) -> anyhow::Result<Client> {
    let map = ClusterMap::load(cluster)?;
    let key = drs_proto::ClusterKey::for_cluster_file(cluster)?;
    let map = drs_local::meta::resolve(map, &key)
        .await
        .map_err(anyhow::Error::msg)?;
    let vid = map
        .volumes
        .first()
        .map(|v| v.id)
        .context("the cluster file defines no volume")?;
    let cfg = ClientConfig {
        key,
        ..client_config()
    };
    Ok(drs_local::meta::client(map, vid, cfg)?)
}

/// Client settings; `DRS_LEASE_MS` sets the lease (how soon nodes free a dead
/// client's locks; default 3000).
fn client_config() -> ClientConfig {
    let mut cfg = ClientConfig::default();
    if let Some(ms) = std::env::var("DRS_LEASE_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        cfg.lease = Duration::from_millis(ms.max(100));
    }
    cfg
}

fn node(cmd: NodeCmd) -> anyhow::Result<()> {
    let (arg, what) = match &cmd {
        NodeCmd::Kill(a) => (a, "kill"),
        NodeCmd::Stop(a) => (a, "stop"),
        NodeCmd::Cont(a) => (a, "continue"),
        NodeCmd::Start(a) => (a, "start"),
        NodeCmd::Replace(_) | NodeCmd::Add { .. } | NodeCmd::Remove(_) => {
            anyhow::bail!("node replace, add and remove run on their own")
        }
    };
    let local = open_local(&arg.c.cluster)?;
    let res = match &cmd {
        NodeCmd::Kill(a) => local.kill(a.id),
        NodeCmd::Stop(a) => local.stop(a.id),
        NodeCmd::Cont(a) => local.cont(a.id),
        NodeCmd::Start(a) => local.start(a.id, false).map(|_| ()),
        NodeCmd::Replace(_) | NodeCmd::Add { .. } | NodeCmd::Remove(_) => Ok(()),
    };
    res.with_context(|| format!("{what} node {}", arg.id))?;
    if let NodeCmd::Start(a) = &cmd {
        say!(
            "node {} started; it serves reads once it has verified its blocks (after {:.1} s or more); log: {}",
            a.id,
            Duration::from_millis(local.options.settle_ms).as_secs_f64(),
            local.log_path(a.id).display()
        );
    }
    Ok(())
}
