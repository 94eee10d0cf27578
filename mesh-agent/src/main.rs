//! The `mesh-agent` binary: one executable, one subcommand per role.
use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use mesh_agent::{
    capture,
    ebpf::Datapath,
    node::{self, HandlerMode, NodeOptions},
};
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(
    name = "mesh-agent",
    version,
    about = "Sidecarless eBPF service mesh agent"
)]
struct Cli {
    /// Log format on stderr: human-readable text, or one JSON object per line (for log
    /// pipelines and tools).
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the per-node agent (capture, and for now a pass-through relay), or inspect/remove the
    /// kernel state it owns.
    Node(NodeArgs),
    /// The mesh certificate authority.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Inspect the embedded eBPF data path.
    Ebpf {
        #[command(subcommand)]
        command: EbpfCommand,
    },
}

#[derive(Subcommand, Debug)]
enum EbpfCommand {
    /// Load every program through this kernel's verifier and list programs and maps; attaches
    /// nothing. Exit status 0 means this kernel runs our data path.
    Check,
}

#[derive(Subcommand, Debug)]
enum CaCommand {
    /// Write a fresh self-signed ECDSA P-256 root (ca-cert.pem, ca-key.pem, root-cert.pem) to a
    /// directory; never overwrites. The layout is Istio's `cacerts`, which can be used instead.
    Init {
        /// Directory to create the files in.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = mesh_agent::identity::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// Validity of the root, days.
        #[arg(long, default_value_t = 3650)]
        validity_days: u64,
    },
}

#[derive(clap::Args, Debug)]
struct NodeArgs {
    /// Local-mode configuration file (node, namespaces, workloads); reloaded when it changes.
    #[arg(long, required_unless_present_any = ["explain_datapath", "uninstall"])]
    config: Option<PathBuf>,
    /// bpffs directory holding the pinned programs, maps and links.
    #[arg(long, default_value = capture::DEFAULT_BPFFS_DIR)]
    bpffs_dir: PathBuf,
    /// What to do with captured connections.
    #[arg(long, value_enum, default_value = "mesh")]
    handler: HandlerMode,
    /// Config file polling interval, milliseconds.
    #[arg(long, default_value_t = 500)]
    reload_interval_ms: u64,
    /// Splice same-node pod<->agent hops with sockmap (experimental: on this kernel a spliced
    /// socket's receive queue is bounded only by the global TCP memory limit, not by its buffer
    /// size, so a slow consumer lets a fast pod queue a lot; see docs/ARCHITECTURE.md).
    #[arg(long)]
    splice: bool,
    /// Threads carrying connections. One is the default: on a node the agent shares the cores
    /// with the pods it serves, and one thread never pays for cross-thread wake-ups (measured:
    /// docs/PERFORMANCE.md). The control loop (config, reconciliation) runs on its own thread.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    worker_threads: u16,
    /// Print every kernel object the capture owns on this node (pins, links, rules, routes), then exit.
    #[arg(long, conflicts_with = "uninstall")]
    explain_datapath: bool,
    /// Remove every kernel object the capture owns on this node, then exit.
    #[arg(long)]
    uninstall: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    // Log lines (access logs included) are written in batches by a background thread: a
    // connection task never waits for stderr (see mesh_agent::logging).
    let (writer, _flush_on_exit) = mesh_agent::logging::BatchedStderr::start();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    match cli.command {
        Command::Node(args) => node(args),
        Command::Ca {
            command:
                CaCommand::Init {
                    out,
                    trust_domain,
                    validity_days,
                },
        } => {
            mesh_agent::identity::LocalCa::init_dir(
                &out,
                &trust_domain,
                Duration::from_secs(validity_days * 86_400),
            )
            .with_context(|| format!("creating a CA in {}", out.display()))?;
            println!(
                "root CA for trust domain {trust_domain} written to {} (ca-key.pem is secret)",
                out.display()
            );
            Ok(())
        }
        Command::Ebpf {
            command: EbpfCommand::Check,
        } => ebpf_check(),
    }
}

fn ebpf_check() -> anyhow::Result<()> {
    let mut datapath = Datapath::load().context("loading the eBPF object")?;
    datapath
        .verify_all()
        .context("verifying the eBPF programs")?;
    for entry in datapath.describe() {
        println!("{:<8} {:<24} {}", entry.kind, entry.name, entry.detail);
    }
    println!("ok: the kernel accepted every program");
    Ok(())
}

fn node(args: NodeArgs) -> anyhow::Result<()> {
    if args.explain_datapath {
        print!("{}", node::explain(&args.bpffs_dir)?);
        return Ok(());
    }
    if args.uninstall {
        node::uninstall(&args.bpffs_dir)?;
        println!(
            "removed the capture's kernel objects ({})",
            args.bpffs_dir.display()
        );
        return Ok(());
    }
    let opts = NodeOptions {
        config: args.config.context("--config is required")?,
        bpffs_dir: args.bpffs_dir,
        handler: args.handler,
        reload_interval: Duration::from_millis(args.reload_interval_ms.max(50)),
        splice: args.splice,
    };
    node::tune_allocator();
    // `block_on` runs the control loop on this thread; connections run on the workers.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.worker_threads.into())
        .thread_name("mesh-data")
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(node::run(opts))
}
