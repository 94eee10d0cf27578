//! `cargo xtask testbed up|status|down|exec`: a named mini-cluster left running for a person.
use anyhow::{Context as _, Result, bail};
use clap::Subcommand;
use mesh_testbed::{Place, Testbed, TestbedSpec, netns};

use crate::setup;

#[derive(Subcommand)]
pub enum TestbedCmd {
    /// Build a named testbed and leave it running.
    Up {
        #[arg(long, default_value = "dev")]
        name: String,
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        #[arg(long, default_value_t = 2)]
        pods: usize,
    },
    /// Show named testbeds (all, or one) with their places and addresses.
    Status { name: Option<String> },
    /// Remove a named testbed (or every named one with --all) and check nothing is left.
    Down {
        #[arg(default_value = "dev", conflicts_with = "all")]
        name: String,
        #[arg(long)]
        all: bool,
    },
    /// Run a command inside a place (fabric, node1, node1-pod1...) of a named testbed, joining its
    /// netns and cgroup: `cargo xtask testbed exec dev node1-pod1 -- ip addr`.
    Exec {
        name: String,
        place: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

pub fn run(command: TestbedCmd) -> Result<()> {
    if !setup::is_root() {
        bail!("the testbed creates network namespaces and cgroups: run as root");
    }
    match command {
        TestbedCmd::Up { name, nodes, pods } => {
            let tb = Testbed::build_named(
                &name,
                TestbedSpec {
                    nodes,
                    pods_per_node: pods,
                },
            )?;
            println!("testbed {name} is up ({nodes} nodes x {pods} pods, dual stack)\n");
            print(&tb);
            println!("\nremove it with: cargo xtask testbed down {name}");
            Ok(())
        }
        TestbedCmd::Status { name } => {
            let names = match name {
                Some(n) => vec![n],
                None => Testbed::list_named(),
            };
            if names.is_empty() {
                println!("no named testbeds (cargo xtask testbed up creates one)");
            }
            for name in names {
                print(&Testbed::open_named(&name)?);
                println!();
            }
            Ok(())
        }
        TestbedCmd::Down { name, all } => {
            let names = if all {
                Testbed::list_named()
            } else {
                vec![name]
            };
            for name in names {
                Testbed::open_named(&name)?.teardown_verified()?;
                println!("testbed {name} removed; nothing left behind");
            }
            Ok(())
        }
        TestbedCmd::Exec {
            name,
            place,
            command,
        } => {
            let tb = Testbed::open_named(&name)?;
            let target = tb.places().find(|p| p.name == place).with_context(|| {
                let names: Vec<&str> = tb.places().map(|p| p.name.as_str()).collect();
                format!(
                    "testbed {name} has no place {place:?}; it has {}",
                    names.join(", ")
                )
            })?;
            let status = target
                .command(&command[0])?
                .args(&command[1..])
                .status()
                .with_context(|| format!("running {:?} in {place}", command[0]))?;
            std::process::exit(status.code().unwrap_or(1));
        }
    }
}

fn print(tb: &Testbed) {
    let info = tb.info();
    println!("testbed {} (owner pid {})", info.run, info.owner_pid);
    println!(
        "  {:<12} {:<15} {:<16} {:<18} netns",
        "place", "interface", "IPv4", "IPv6"
    );
    let state = |p: &Place| {
        if netns::path(&p.netns).exists() {
            p.netns.clone()
        } else {
            format!("{} (MISSING)", p.netns)
        }
    };
    println!(
        "  {:<12} {:<15} {:<16} {:<18} {}",
        "fabric",
        "br0",
        "-",
        "-",
        state(&info.fabric)
    );
    for node in &info.nodes {
        println!(
            "  {:<12} {:<15} {:<16} {:<18} {}",
            node.name(),
            node.uplink,
            node.ipv4,
            node.ipv6,
            state(&node.place)
        );
        for pod in info.pods.iter().filter(|p| p.node == node.index) {
            println!(
                "  {:<12} {:<15} {:<16} {:<18} {}",
                pod.name(),
                format!("{}@{}", pod.iface, pod.host_veth),
                pod.ipv4,
                pod.ipv6,
                state(&pod.place)
            );
        }
    }
    println!("\n  enter a place (joins its netns and cgroup):");
    for place in tb.places() {
        println!(
            "    cargo xtask testbed exec {} {} -- bash",
            info.run, place.name
        );
    }
    if let Some(pod) = info.pods.first() {
        println!("  or by hand, e.g.: {}", pod.place.enter_hint());
    }
}
