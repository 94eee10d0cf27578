//! `cargo xtask`: the project's automation. Every command a README tells a person to run is here.
mod bench;
mod cluster;
mod cmd;
mod code_order;
mod demo;
mod demo_l7;
mod fuzz;
mod setup;
mod soak;
mod testbed;

use std::{env, path::PathBuf, process::Command};

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "mesh-agent project automation")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (nightly rust-src, bpf-linker, Debian packages).
    /// Idempotent: a second run changes nothing.
    Setup,
    /// Build the workspace (runs setup first if anything is missing).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// THE test command: setup if needed, lints, then every unit and end-to-end test
    /// (privileged ones too when run as root).
    Test {
        /// Skip `cargo fmt --check` and `cargo clippy`.
        #[arg(long)]
        no_lint: bool,
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(last = true)]
        cargo_test_args: Vec<String>,
    },
    /// The mesh end to end on a 2-node testbed with real clients (as root); tears it all down.
    Demo,
    /// Benchmarks: the mesh against plain TCP on the same testbed, in the same run (as root).
    Bench(bench::BenchArgs),
    /// Leave a named network-namespace mini-cluster running to poke at, inspect it, remove it.
    Testbed {
        #[command(subcommand)]
        command: testbed::TestbedCmd,
    },
    /// Build the container image (docker build -f deploy/Dockerfile); needs Docker.
    Image {
        #[arg(long, default_value = cluster::IMAGE)]
        tag: String,
        /// Print the command instead of running it.
        #[arg(long)]
        dry_run: bool,
    },
    /// A kind cluster with the mesh on it (needs Docker, kind, kubectl).
    Kind {
        #[command(subcommand)]
        command: cluster::ClusterCmd,
    },
    /// Record which of the agent's functions run (an instrumented build through one quick
    /// bench trial, as root) into mesh-agent/code-order.txt, the order release builds lay
    /// code out in: fewer code pages resident per agent.
    CodeOrder(code_order::CodeOrderArgs),
    /// Fuzz the agent's parsers of untrusted input (cargo-fuzz, nightly): each target for
    /// `--seconds` (10 minutes by default), with a summary of executions.
    Fuzz(fuzz::FuzzArgs),
    /// Chaos and soak (as root): thousands of long-lived connections and steady churn on a
    /// 2-node testbed for `--minutes` while agents are upgraded, killed and restarted, the CA
    /// stopped and started, certificates rotated and policies changed; checks every connection,
    /// the agents' memory and descriptors, and the fabric for plaintext.
    Soak(soak::SoakArgs),
    /// A minikube cluster with the mesh on it (needs Docker, minikube, kubectl).
    Minikube {
        #[command(subcommand)]
        command: cluster::ClusterCmd,
    },
}

fn main() -> Result<()> {
    if env::var_os(code_order::WRAPPER_ENV).is_some() {
        return code_order::rustc_wrapper();
    }
    add_cargo_bin_to_path();
    match Cli::parse().command {
        Cmd::Setup => {
            let report = setup::run()?;
            if report.actions.is_empty() {
                println!("setup: nothing to do");
            } else {
                println!("setup: done: {}", report.actions.join("; "));
            }
            Ok(())
        }
        Cmd::Build { release } => {
            ensure_setup()?;
            let mut cargo = cargo(&["build"]);
            if release {
                cargo.arg("--release");
            }
            cmd::run(&mut cargo)
        }
        Cmd::Test {
            no_lint,
            cargo_test_args,
        } => test(no_lint, &cargo_test_args),
        Cmd::Testbed { command } => testbed::run(command),
        Cmd::Demo => demo::run(),
        Cmd::Bench(args) => bench::run(args),
        Cmd::Fuzz(args) => fuzz::run(args),
        Cmd::CodeOrder(args) => code_order::run(args),
        Cmd::Soak(args) => soak::run(args),
        Cmd::Image { tag, dry_run } => cluster::image(&tag, dry_run),
        Cmd::Kind { command } => cluster::run(cluster::Flavor::Kind, command),
        Cmd::Minikube { command } => cluster::run(cluster::Flavor::Minikube, command),
    }
}

fn test(no_lint: bool, extra: &[String]) -> Result<()> {
    ensure_setup()?;
    if !no_lint {
        println!("• lint");
        cmd::run(&mut cargo(&["fmt", "--all", "--", "--check"]))?;
        cmd::run(&mut cargo(&[
            "clippy",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    println!("• build (end-to-end tests run the real binaries)");
    cmd::run(&mut cargo(&["build", "--bins"]))?;
    println!("• test");
    if !setup::is_root() {
        println!("  (not root: privileged end-to-end tests will print why they skip)");
    }
    let mut test = cargo(&["test"]);
    if !extra.is_empty() {
        test.args(extra);
        return cmd::run(&mut test);
    }
    cmd::run(&mut test)?;
    // Splicing is on by default, so the run above covered it; these suites once more without,
    // for kernels where it is off (or `--splice=off`).
    println!("• test again with the agents' --splice=off (capture and mesh suites)");
    let mut off = cargo(&[
        "test",
        "-p",
        "mesh-testbed",
        "--test",
        "capture_flows",
        "--test",
        "mesh_hbone",
    ]);
    off.env("MESH_TEST_SPLICE", "off");
    cmd::run(&mut off)
}

/// Runs setup when a quick check finds anything missing, so `test`/`build` work on a fresh clone.
fn ensure_setup() -> Result<()> {
    if setup::looks_complete() {
        println!("✓ setup complete (cargo xtask setup: nothing to do)");
        return Ok(());
    }
    println!("• running setup");
    setup::run().map(drop)
}

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_owned()
}

/// Builds every binary (release, or dev with `dev_build`) for the bench and the soak; the
/// directory they are in.
fn build_binaries(dev_build: bool) -> Result<PathBuf> {
    if dev_build {
        println!("• build (dev profile, --dev-build)");
        cmd::run(&mut cargo(&["build", "--bins"]))?;
        Ok(workspace_root().join("target/debug"))
    } else {
        println!("• build (release)");
        cmd::run(&mut cargo(&[
            "build",
            "--release",
            "-p",
            "mesh-testbed",
            "--bins",
        ]))?;
        // The agent last and on its own, exactly as deploy/Dockerfile builds it: a workspace
        // build resolves its dependencies' features together with the test crates', which
        // renames its symbols and so misses mesh-agent/code-order.txt (`cargo xtask
        // code-order`).
        cmd::run(&mut release_agent_build())?;
        Ok(workspace_root().join("target/release"))
    }
}

/// `cargo build` of the release agent alone, as deploy/Dockerfile runs it: the build whose
/// symbol names mesh-agent/code-order.txt holds.
fn release_agent_build() -> Command {
    cargo(&[
        "build",
        "--release",
        "-p",
        "mesh-agent",
        "--bin",
        "mesh-agent",
    ])
}

fn cargo(args: &[&str]) -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args(args).current_dir(workspace_root());
    cmd
}

/// bpf-linker lives in $CARGO_HOME/bin, which a minimal (CI) environment may not have on PATH.
fn add_cargo_bin_to_path() {
    let bin = setup::cargo_home().join("bin");
    let path = env::var_os("PATH").unwrap_or_default();
    if !env::split_paths(&path).any(|p| p == bin) {
        let joined = env::join_paths(std::iter::once(bin).chain(env::split_paths(&path)))
            .expect("PATH entries contain no separator");
        // SAFETY: single-threaded at this point; no other thread reads the environment.
        unsafe { env::set_var("PATH", joined) };
    }
}
