//! `cargo xtask soak`: chaos and soak on a 2-node testbed in Kubernetes mode (issue #18).
//!
//! Thousands of long-lived connections and a steady churn of short ones run for `--minutes`
//! while the agents are upgraded (a successor beside the running agent), killed with SIGKILL
//! and restarted, the CA is stopped and started, workload certificates rotate on a short
//! lifetime, and a policy denying one port comes and goes. At the end:
//! - every connection that did not complete is explained by a fault on its path, as the
//!   failure model allows (`mesh_testbed::soak::verdict`); none was truncated or corrupted;
//! - the agents' RSS and descriptors are back within a fixed margin of the start;
//! - no packet of the applications' ports, and none of their payload, crossed the fabric.
//!
//! Not part of the normal test run: it takes `--minutes` plus about two.
mod faults;
mod report;

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use mesh_testbed::{
    Testbed, TestbedSpec,
    kubemesh::{self, KubeMesh},
    metrics,
    soak::{ClientPlan, ClientReport, now_ms},
};
use serde_json::{Value, json};

use crate::{ensure_setup, setup, workspace_root};
use faults::{Agents, Schedule};

#[derive(clap::Args, Debug)]
pub struct SoakArgs {
    /// How long the load runs, minutes (the faults are spread over it).
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// Long-lived connections held open at once, over both client pods.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Short connections a second, per client pod.
    #[arg(long, default_value_t = 25)]
    churn: u32,
    /// Lifetime of the workload certificates the CA grants, seconds (at least 60).
    #[arg(long, default_value_t = 60)]
    cert_ttl: u64,
    /// Seed of the load's lifetimes, pauses and targets.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Use the dev build instead of release (faster to build, slower to run).
    #[arg(long)]
    dev_build: bool,
    /// Write the full report (JSON) here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the summary (markdown) here.
    #[arg(long)]
    markdown: Option<PathBuf>,
}

/// The server port a policy denies from time to time; the other one is never denied.
pub const DENIED_PORT: u16 = 8081;
const OPEN_PORT: u16 = 8080;
/// How long after a fault ends a refusal or reset is still its doing (a policy change reaching
/// both agents, a restarted agent's first connections).
const GRACE_MS: u64 = 3000;
/// The margins the agents' resources must be back within at the end.
const FD_MARGIN: i64 = 64;
const RSS_MARGIN_MIB: f64 = 48.0;

pub fn run(args: SoakArgs) -> Result<()> {
    if !setup::is_root() {
        bail!("the soak builds network namespaces and loads eBPF: run it as root");
    }
    ensure!(
        args.cert_ttl >= 60,
        "--cert-ttl: the CA grants at least 60 s"
    );
    ensure!(args.minutes >= 1.0, "--minutes: at least 1");
    ensure_setup()?;
    let bin = crate::build_binaries(args.dev_build)?;
    let work = std::env::temp_dir().join(format!("mesh-soak-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let tb = Testbed::build(TestbedSpec {
        nodes: 2,
        pods_per_node: 2,
    })?;
    let outcome = soak(&tb, &bin, &work, &args);
    let torn = tb.teardown_verified().context("tearing the testbed down");
    let _ = std::fs::remove_dir_all(&work);
    let doc = outcome?;
    torn?;
    let markdown = report::markdown(&doc);
    println!("\n{markdown}");
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_string_pretty(&doc)? + "\n")
            .with_context(|| format!("writing {}", p.display()))?;
        println!("JSON written to {}", p.display());
    }
    if let Some(p) = &args.markdown {
        std::fs::write(p, &markdown).with_context(|| format!("writing {}", p.display()))?;
        println!("markdown written to {}", p.display());
    }
    let failures = doc["failures"].as_array().cloned().unwrap_or_default();
    if !failures.is_empty() {
        bail!("the soak failed: {}", Value::Array(failures));
    }
    println!("soak passed");
    Ok(())
}

/// Copies what a failed soak leaves to read — the fabric capture, the CA's and every agent's
/// log — out of the scratch directory (removed at the end) into `target/soak-evidence/<pid>`.
fn keep_evidence(pcap: &Path, ca_log: &str, agent_logs: &[faults::AgentLog]) -> Result<PathBuf> {
    let dir = workspace_root()
        .join("target/soak-evidence")
        .join(std::process::id().to_string());
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::copy(pcap, dir.join("fabric.pcap")).context("keeping the fabric capture")?;
    std::fs::write(dir.join("ca.log"), ca_log)?;
    for (i, (who, log)) in agent_logs.iter().enumerate() {
        let name = format!(
            "{:02}-{}.log",
            i + 1,
            who.replace(['(', ')'], "").replace(' ', "-")
        );
        std::fs::write(dir.join(name), log)?;
    }
    Ok(dir)
}

/// The data path's counters on node `n` that say how the capture failed closed over the run
/// (pinned, so they span every agent the node had): `{reason: count}`.
fn datapath_events(tb: &Testbed, n: usize) -> Value {
    const REASONS: [&str; 5] = [
        "dropped_orphaned",
        "refused_no_listener",
        "dropped_no_listener",
        "passed_uncaptured",
        "dropped_spoofed",
    ];
    match metrics::scrape_place(&tb.node(n).place) {
        Ok(scrape) => REASONS
            .iter()
            .map(|r| {
                let v = metrics::value(&scrape, "mesh_ebpf_events", &[("reason", r)]);
                ((*r).to_owned(), json!(v))
            })
            .collect(),
        Err(e) => json!({ "error": format!("{e:#}") }),
    }
}

/// One resource sample of every agent process of a node.
fn sample(pids: &[u32]) -> Value {
    let rss: f64 = pids.iter().map(|&p| crate::bench::rss_mib_of(p)).sum();
    let fds: usize = pids.iter().map(|&p| fd_count(p)).sum();
    json!({"agents": pids.len(), "rss_mib": (rss * 10.0).round() / 10.0, "fds": fds})
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn soak(tb: &Testbed, bin: &Path, work: &Path, args: &SoakArgs) -> Result<Value> {
    let agent_bin = bin.join("mesh-agent");
    let probe = bin.join("mtb-probe");
    let probe = probe.to_str().context("path")?;
    let km = KubeMesh::new(tb, work, &agent_bin)?;
    km.api.apply(kubemesh::namespace("mesh", true));
    for p in tb.pods() {
        km.api.apply(kubemesh::pod(p, "mesh"));
    }
    let ttl = args.cert_ttl.to_string();
    let ca_args = ["--max-ttl-seconds", ttl.as_str()];
    let ca = km.start_ca(&ca_args)?;
    println!("• agents (Kubernetes mode, the DaemonSet's capabilities)");
    let mut agents = Agents::start(&km)?;
    agents.wait_ready(&km, Duration::from_secs(30))?;

    // Servers in pod 2 of each node, clients in pod 1, all enrolled (namespace `mesh`).
    let mut servers = Vec::new();
    for n in 1..=2 {
        let mut s = tb.pod(n, 2).place.spawn(
            probe,
            &[
                "soak-server",
                &OPEN_PORT.to_string(),
                &DENIED_PORT.to_string(),
            ],
        )?;
        s.wait_listening(DENIED_PORT, Duration::from_secs(10))?;
        servers.push(s);
    }
    std::thread::sleep(Duration::from_secs(2));
    let start_resources: Vec<Value> = (1..=2).map(|n| sample(&agents.pids(n))).collect();
    println!("• idle agents: {}", Value::Array(start_resources.clone()));

    let pcap = work.join("fabric.pcap");
    let sniffer = tb.fabric().spawn(
        "tcpdump",
        &[
            "-i",
            "br0",
            "-n",
            "-U",
            "-s",
            "0",
            "-w",
            pcap.to_str().context("path")?,
            "tcp and not port 15008",
        ],
    )?;
    std::thread::sleep(Duration::from_millis(500));

    let duration = Duration::from_secs_f64(args.minutes * 60.0);
    let per_client = args.connections.div_ceil(2);
    let mut clients = Vec::new();
    for n in 1..=2 {
        let targets = (1..=2)
            .flat_map(|m| {
                let ip = tb.pod(m, 2).ipv4;
                [OPEN_PORT, DENIED_PORT].map(|port| std::net::SocketAddr::new(ip.into(), port))
            })
            .collect();
        let plan = ClientPlan {
            targets,
            connections: per_client,
            lifetime_ms: (60_000, 240_000),
            interval_ms: (2_000, 10_000),
            chunk: 1024,
            churn_per_sec: args.churn,
            duration_ms: duration.as_millis() as u64,
            ramp_ms: 30_000,
            stall_ms: 30_000,
            seed: args.seed.wrapping_mul(1000) + n as u64,
        };
        let plan = serde_json::to_string(&plan)?;
        clients.push(tb.pod(n, 1).place.spawn(probe, &["soak-client", &plan])?);
    }
    let soak_start = now_ms();
    println!(
        "• load: {} long-lived connections ({per_client} per client pod), {} short ones a second, for {:.1} min",
        per_client * 2,
        args.churn * 2,
        args.minutes
    );

    // Resource curve, every 5 s, in the background.
    let pids = Arc::new(Mutex::new(agents.all_pids()));
    let curve = Arc::new(Mutex::new(Vec::<Value>::new()));
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (pids, curve, sampling) = (pids.clone(), curve.clone(), sampling.clone());
        std::thread::spawn(move || {
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                let now = pids.lock().map(|p| p.clone()).unwrap_or_default();
                let per_node: Vec<Value> = (1..=2)
                    .map(|n| {
                        let mine: Vec<u32> = now
                            .iter()
                            .filter(|(m, _)| *m == n)
                            .map(|(_, p)| *p)
                            .collect();
                        sample(&mine)
                    })
                    .collect();
                let t = (now_ms().saturating_sub(soak_start)) / 1000;
                if let Ok(mut c) = curve.lock() {
                    c.push(json!({"t_s": t, "nodes": per_node}));
                }
                std::thread::sleep(Duration::from_secs(5));
            }
        })
    };

    let mut schedule = Schedule::new(duration, soak_start, ca, ca_args.map(str::to_owned));
    let events = schedule.run(&km, &mut agents, &pids)?;

    // The clients end by themselves once their connections have.
    let mut reports = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        let out = c
            .wait(Duration::from_secs(180))
            .with_context(|| format!("soak client {}", i + 1))?;
        let report: ClientReport = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "soak client {}: {}",
                i + 1,
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        reports.push(report);
    }
    println!("• load over; waiting for the agents that handed over to leave");
    let leftovers = agents.wait_drained(Duration::from_secs(120));
    *pids.lock().map_err(|_| anyhow::anyhow!("poisoned"))? = agents.all_pids();
    std::thread::sleep(Duration::from_secs(10));
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let _ = sampler.join();
    let end_resources: Vec<Value> = (1..=2).map(|n| sample(&agents.pids(n))).collect();

    let datapath: Vec<Value> = (1..=2).map(|n| datapath_events(tb, n)).collect();
    let capture = sniffer.terminate(Duration::from_secs(10))?;
    let plaintext = faults::plaintext(&pcap, &[OPEN_PORT, DENIED_PORT], soak_start)
        .context(String::from_utf8_lossy(&capture.stderr).into_owned())?;
    let (ca_log, agent_logs) = schedule.finish(agents)?;
    drop(servers);
    drop(km);

    let mut doc = report::assemble(report::Inputs {
        args,
        tb,
        reports: &reports,
        faults: &events.faults,
        events: &events.log,
        grace_ms: GRACE_MS,
        start_resources: &start_resources,
        end_resources: &end_resources,
        curve: &curve.lock().map(|c| c.clone()).unwrap_or_default(),
        plaintext: &plaintext,
        datapath: &datapath,
        ca_log: &ca_log,
        agent_logs: &agent_logs,
    });
    let mut failures = report::judge(&doc, FD_MARGIN, RSS_MARGIN_MIB);
    failures.extend(leftovers);
    if !failures.is_empty() {
        let kept = keep_evidence(&pcap, &ca_log, &agent_logs)?;
        println!(
            "• the soak failed: capture and logs kept in {}",
            kept.display()
        );
        doc["evidence"] = json!(kept);
    }
    doc["failures"] = json!(failures);
    Ok(doc)
}
