//! `cargo xtask bench`: the mesh against plain TCP on the same testbed, in the same run.
//!
//! A 2-node × 3-pod testbed, one release-built agent per node with production defaults, and two
//! scenarios: `cross_node` (node1-pod1 → node2-pod1) and `same_node` (node1-pod1 → node1-pod2).
//! Each trial measures every test on the `plain` path (the same pods, not enrolled) and then on
//! the `mesh` path (enrolled), so slow drifts of the machine hit both alike; a full run also
//! measures the mesh path with the agents in other configurations (`agents.rs`: splicing off,
//! two worker threads), each its own path in the results. Figures: iperf3
//! throughput with 1 and 16 streams, 1 KiB request/response latency (HDR histogram), new
//! connections per second at concurrency 1 and 8, agent CPU per 1,000 req/s at a fixed rate,
//! and the agents' RSS idle and under load (from /proc). A third scenario, `l7` (see `l7.rs`),
//! adds a `waypoint` path: HTTP through a `mesh-agent waypoint`.
mod agents;
mod handoff;
mod l7;
mod measurements;
mod report;
mod sampler;
mod scale;
mod scale_kube;

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use mesh_testbed::{Background, Testbed, TestbedSpec};
use serde_json::{Value, json};

use crate::{cmd, ensure_setup, setup, workspace_root};
use report::{Results, Trial};
use sampler::AgentProcess;
pub use sampler::rss_mib_of;

const RR_PORT: u16 = 7001;
/// Connection-rate servers, one port per path: the tuples of one path's closed connections
/// (TIME_WAIT in the server pod) must not meet the other path's new connections, see
/// docs/PERFORMANCE.md "Connection rate".
const ONCE_PORT_PLAIN: u16 = 7002;
const ONCE_PORT_MESH: u16 = 7003;
const IPERF_PORT: u16 = 5201;

/// Options of `cargo xtask bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// 3 trials of 2 s per test (a smoke run) instead of 5 trials of 5 s.
    #[arg(long)]
    quick: bool,
    /// Write the results as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the targets table as markdown.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Record CPU profiles of both agents (perf record -g) during the first mesh trial's
    /// cross-node tests into this directory: throughput and request/response in
    /// `cross_node_mesh.perf.data`, the connection-rate tests in `cross_node_connrate.perf.data`.
    #[arg(long)]
    perf: Option<PathBuf>,
    /// Keep the agents' logs in this directory.
    #[arg(long)]
    logs: Option<PathBuf>,
    /// Agent configurations the mesh path is measured in (repeatable): `default` (production
    /// defaults: splicing on, worker threads auto), `splice-off` (`--splice=off`), `threads-2`
    /// (`--worker-threads 2`). Default: all of them, or `default` alone with `--quick`.
    /// Switching between them restarts the agents.
    #[arg(long = "variant", value_parser = ["default", "splice-off", "threads-2"])]
    variants: Vec<String>,
    /// Use the dev-profile binaries (`cargo xtask test` has just built them; mesh-agent is
    /// compiled at opt-level 2 there, its dependencies are not) instead of a release build:
    /// CI's smoke run proves the harness without a second full build. The header says
    /// `build: dev`; such figures are not comparable with release runs.
    #[arg(long)]
    dev_build: bool,
    /// Only these scenarios (cross_node, same_node, l7; or scale alone: one agent, configs of
    /// 10k-200k workloads, not run by default).
    #[arg(long = "scenario", value_parser = ["cross_node", "same_node", "l7", "scale"])]
    scenarios: Vec<String>,
    /// With `--scenario scale`: only these workload counts (comma-separated, of 10000, 50000,
    /// 100000, 200000), in both modes; the empty baseline always runs. For a look at one size
    /// (a profile, an allocator); full runs leave it out.
    #[arg(long, value_delimiter = ',')]
    scale_sizes: Vec<usize>,
    /// Trials per figure (default 5, 3 with `--quick`): e.g. `--quick --trials 20` for issue
    /// #17's 20 consecutive trials without a failure (every failed tool run is listed).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100))]
    trials: Option<u32>,
    /// Run this mesh-agent binary instead of the one just built: `cargo xtask code-order`
    /// drives an instrumented build through the bench this way. The header names it; such
    /// figures are not comparable with release runs.
    #[arg(long)]
    pub agent_bin: Option<PathBuf>,
}

impl BenchArgs {
    /// One quick trial of the default scenarios with `agent`: a workload, not a measurement
    /// (`cargo xtask code-order`).
    pub fn for_workload(agent: PathBuf) -> Self {
        Self {
            quick: true,
            json: None,
            markdown: None,
            perf: None,
            logs: None,
            variants: Vec::new(),
            dev_build: false,
            scenarios: Vec::new(),
            scale_sizes: Vec::new(),
            trials: Some(1),
            agent_bin: Some(agent),
        }
    }

    /// Trials per figure.
    fn trials(&self) -> u32 {
        self.trials.unwrap_or(if self.quick { 3 } else { 5 })
    }

    /// The agent variants to measure, in order.
    fn variants(&self) -> Vec<&'static agents::Variant> {
        if self.variants.is_empty() {
            return if self.quick {
                vec![agents::DEFAULT]
            } else {
                agents::VARIANTS.iter().collect()
            };
        }
        self.variants
            .iter()
            .filter_map(|n| agents::variant(n))
            .collect()
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum BenchPath {
    Plain,
    /// Enrolled, through agents in this configuration.
    Mesh(&'static agents::Variant),
}

impl BenchPath {
    fn name(self) -> &'static str {
        match self {
            Self::Plain => "plain",
            Self::Mesh(v) => v.path,
        }
    }

    /// The mesh path with production defaults.
    fn is_default_mesh(self) -> bool {
        self == Self::Mesh(agents::DEFAULT)
    }
}

/// A client pod and a server pod.
struct Scenario {
    name: &'static str,
    client: (usize, usize),
    server: (usize, usize),
}

const SCENARIOS: [Scenario; 2] = [
    Scenario {
        name: "cross_node",
        client: (1, 1),
        server: (2, 1),
    },
    Scenario {
        name: "same_node",
        client: (1, 1),
        server: (1, 2),
    },
];

/// Pods enrolled on the mesh path: every client and server above.
const MESH_PODS: [(usize, usize); 3] = [(1, 1), (1, 2), (2, 1)];

pub fn run(args: BenchArgs) -> Result<()> {
    if !setup::is_root() {
        bail!("the benchmark builds network namespaces and loads eBPF: run it as root");
    }
    let started = Instant::now();
    ensure_setup()?;
    let dir = crate::build_binaries(args.dev_build)?;
    let bin = Binaries {
        agent: args
            .agent_bin
            .clone()
            .unwrap_or_else(|| dir.join("mesh-agent")),
        probe: dir.join("mtb-probe"),
    };
    let header = machine_header(&args)?;
    println!("• machine: {header}");
    let work = std::env::temp_dir().join(format!("mesh-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let scale = args.scenarios.iter().any(|n| n == scale::NAME);
    ensure!(
        !scale || args.scenarios.len() == 1,
        "--scenario scale runs alone (one agent, no traffic)"
    );
    let outcome = std::fs::create_dir_all(&work)
        .context("work directory")
        .and_then(|()| {
            if scale {
                let sizes = scale::Sizes::new(args.quick, &args.scale_sizes)?;
                return scale::run(&bin, &work, &sizes);
            }
            let tb = Testbed::build(TestbedSpec {
                nodes: 2,
                pods_per_node: 3,
            })?;
            let outcome = bench(&tb, &bin, &work, &args);
            tb.teardown_verified().context("tearing the testbed down")?;
            outcome
        });
    let _ = std::fs::remove_dir_all(&work);
    let results = outcome?;
    let doc = json!({
        "header": header,
        "records": results.records(),
        "failures": results.failure_records(),
    });
    let markdown = if scale {
        scale::markdown(&results)
    } else {
        results.markdown(&header)
    };
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
    println!("bench finished in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn machine_header(args: &BenchArgs) -> Result<Value> {
    let quick = args.quick;
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu_model = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|r| r.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let out = |prog: &str, args: &[&str]| {
        std::process::Command::new(prog)
            .args(args)
            .current_dir(workspace_root())
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    Ok(json!({
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": out("uname", &["-r"]),
        "cpu_model": cpu_model,
        "loadavg_start": read("/proc/loadavg").split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        "commit": out("git", &["rev-parse", "--short=12", "HEAD"]),
        "dirty": !out("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty(),
        "date": out("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        "mode": if quick { "quick" } else { "full" },
        "trials": args.trials(),
        "seconds_per_test": if quick { 2 } else { 5 },
        "variants": args.variants().iter().map(|v| json!({"path": v.path, "agent_args": v.args, "what": v.what})).collect::<Vec<_>>(),
        "build": if args.dev_build { "dev" } else { "release" },
        "agent_bin": args.agent_bin,
        "handoff": handoff::measure().context("measuring hand-offs")?,
    }))
}

/// Everything running on the testbed.
struct Rig<'a> {
    tb: &'a Testbed,
    probe: PathBuf,
    agents: Vec<AgentProcess>,
    /// The configuration `agents` run in.
    variant: &'static agents::Variant,
    agent_bin: PathBuf,
    work: PathBuf,
    logs: Option<PathBuf>,
    servers: Vec<Background>,
    secs: f64,
    perf: Option<PathBuf>,
}

/// The binaries a run uses.
pub struct Binaries {
    pub agent: PathBuf,
    pub probe: PathBuf,
}

fn bench(tb: &Testbed, bin: &Binaries, work: &Path, args: &BenchArgs) -> Result<Results> {
    let (agent, probe) = (bin.agent.clone(), bin.probe.clone());
    let ca = throwaway_ca(&agent, work)?;
    for node in 1..=2 {
        std::fs::write(
            agents::config_path(work, node),
            config_yaml(tb, node, &ca, BenchPath::Plain),
        )?;
    }
    let variants = args.variants();
    let first = variants.first().copied().unwrap_or(agents::DEFAULT);
    let running = agents::start(tb, &agent, work, first)?;
    let mut servers = Vec::new();
    for s in &SCENARIOS {
        let pod = tb.pod(s.server.0, s.server.1);
        let mut p = pod.place.spawn(
            probe.to_str().context("path")?,
            &[
                "load-server",
                &RR_PORT.to_string(),
                &ONCE_PORT_PLAIN.to_string(),
                &ONCE_PORT_MESH.to_string(),
            ],
        )?;
        p.wait_listening(RR_PORT, Duration::from_secs(10))?;
        servers.push(p);
    }
    let run_l7 = args.scenarios.is_empty() || args.scenarios.iter().any(|n| n == l7::NAME);
    let mut waypoint_pid = None;
    if run_l7 {
        let started = l7::start(tb, bin, &running[0].config)?;
        waypoint_pid = started.last().map(Background::pid);
        servers.extend(started);
    }
    let mut rig = Rig {
        tb,
        probe,
        agents: running,
        variant: first,
        agent_bin: agent,
        work: work.to_owned(),
        logs: args.logs.clone(),
        servers,
        secs: if args.quick { 2.0 } else { 5.0 },
        perf: args.perf.clone(),
    };
    let scenarios: Vec<&Scenario> = SCENARIOS
        .iter()
        .filter(|s| args.scenarios.is_empty() || args.scenarios.iter().any(|n| n == s.name))
        .collect();
    let outcome = measure(
        &mut rig,
        &scenarios,
        &variants,
        waypoint_pid,
        &ca,
        args.trials(),
    );
    let running = std::mem::take(&mut rig.agents);
    agents::stop(running, rig.variant, args.logs.as_deref())?;
    // SIGTERM, not the kill of a drop: the waypoint exits as in production (and an
    // instrumented one writes its profile, `cargo xtask code-order`) after its 5 s of
    // accepting while it drains.
    for server in std::mem::take(&mut rig.servers) {
        let _ = server.terminate(Duration::from_secs(15));
    }
    outcome
}

/// The warm-up and every trial: per trial the plain path, then the mesh path in each variant.
fn measure(
    rig: &mut Rig<'_>,
    scenarios: &[&Scenario],
    variants: &[&'static agents::Variant],
    waypoint: Option<u32>,
    ca: &Path,
    trials: u32,
) -> Result<Results> {
    rig.warm_up(scenarios, ca)?;
    let mut results = Results::default();
    for trial in 1..=trials {
        let paths =
            std::iter::once(BenchPath::Plain).chain(variants.iter().map(|v| BenchPath::Mesh(v)));
        for path in paths {
            if let BenchPath::Mesh(v) = path {
                rig.switch_agents(v, scenarios, ca)?;
            }
            rig.set_path(path, ca)?;
            println!("• trial {trial}/{trials}, {} path", path.name());
            for s in scenarios {
                rig.scenario(s, path, &mut results)?;
            }
            // The waypoint sits behind the production-default agents only.
            if let Some(pid) = waypoint {
                match path {
                    BenchPath::Plain => rig.l7("plain", pid, &mut results)?,
                    p if p.is_default_mesh() => {
                        rig.l7("mesh", pid, &mut results)?;
                        rig.l7("waypoint", pid, &mut results)?;
                    }
                    BenchPath::Mesh(_) => {}
                }
            }
        }
    }
    Ok(results)
}

impl Rig<'_> {
    /// On the mesh path, a short request/response per scenario: certificates issued, pools
    /// and caches as in steady state.
    fn warm_up(&self, scenarios: &[&Scenario], ca: &Path) -> Result<()> {
        self.set_path(BenchPath::Mesh(self.variant), ca)?;
        for s in scenarios {
            self.rr(s, 1.0)?;
        }
        Ok(())
    }

    /// Restarts both agents in `variant` (and warms them up) unless they already run in it.
    fn switch_agents(
        &mut self,
        variant: &'static agents::Variant,
        scenarios: &[&Scenario],
        ca: &Path,
    ) -> Result<()> {
        if self.variant == variant {
            return Ok(());
        }
        let old = std::mem::take(&mut self.agents);
        agents::stop(old, self.variant, self.logs.as_deref())?;
        println!("• agents restarted: {}", variant.what);
        self.agents = agents::start(self.tb, &self.agent_bin, &self.work, variant)?;
        self.variant = variant;
        self.warm_up(scenarios, ca)
    }
}

/// A throwaway mesh CA in `work/ca` (the agents sign their workloads' certificates with it).
fn throwaway_ca(agent: &Path, work: &Path) -> Result<PathBuf> {
    let ca = work.join("ca");
    cmd::run(
        std::process::Command::new(agent)
            .args(["ca", "init", "--out"])
            .arg(&ca),
    )?;
    Ok(ca)
}

fn value(v: f64) -> Trial {
    Trial {
        value: v,
        p50: None,
        p99: None,
    }
}

/// Every pod in namespace `bench`; on the mesh path the scenario pods carry Istio's enrolment
/// label, on the plain path no pod does. Pods' cgroups are given: an agent that splices
/// splices the hops of pods whose cgroup it knows.
fn config_yaml(tb: &Testbed, node: usize, ca: &Path, path: BenchPath) -> String {
    let enrolled: BTreeSet<(usize, usize)> = match path {
        BenchPath::Plain => BTreeSet::new(),
        BenchPath::Mesh(_) => MESH_PODS.into_iter().collect(),
    };
    let mut y = format!(
        // The plain path un-enrols every pod on purpose.
        "node: {{name: node{node}, uplinks: [{}]}}\nmesh: {{allowUnenrollAll: true}}\nca: {{dir: {}}}\nnamespaces:\n  - {{name: bench}}\nworkloads:\n",
        tb.node(node).uplink,
        ca.display()
    );
    for p in tb.pods() {
        let labels: Vec<&str> = [
            if enrolled.contains(&(p.node, p.index)) {
                "istio.io/dataplane-mode: ambient"
            } else {
                ""
            },
            l7::labels((p.node, p.index)),
        ]
        .into_iter()
        .filter(|l| !l.is_empty())
        .collect();
        let label = if labels.is_empty() {
            String::new()
        } else {
            format!(", labels: {{{}}}", labels.join(", "))
        };
        let cgroup = format!(", cgroup: {}", p.place.cgroup.display());
        y += &format!(
            "  - {{name: {}, namespace: bench, serviceAccount: sa-{}, node: node{}, ips: [{}, \"{}\"], hostInterface: {}{cgroup}{label}}}\n",
            p.name(),
            p.name(),
            p.node,
            p.ipv4,
            p.ipv6,
            p.host_veth,
        );
    }
    y + &l7::config_tail()
}
