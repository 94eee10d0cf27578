//! The `mesh-agent` binary: one executable, one subcommand per role.
use anyhow::Context as _;
use clap::{Parser, Subcommand};
use mesh_agent::ebpf::Datapath;
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(
    name = "mesh-agent",
    version,
    about = "Sidecarless eBPF service mesh agent"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
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

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
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
