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
use mesh_testbed::{Background, Pod, Testbed, TestbedSpec, metrics};
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

impl Rig<'_> {
    fn pod(&self, id: (usize, usize)) -> &Pod {
        self.tb.pod(id.0, id.1)
    }

    /// Rewrites both agents' configs for `path` and waits until the capture follows.
    fn set_path(&self, path: BenchPath, ca: &Path) -> Result<()> {
        for a in &self.agents {
            std::fs::write(&a.config, config_yaml(self.tb, a.node, ca, path))?;
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        for a in &self.agents {
            let want = match path {
                BenchPath::Plain => 0,
                BenchPath::Mesh(_) => MESH_PODS.iter().filter(|p| p.0 == a.node).count(),
            };
            while a.enrolled_links() != want {
                ensure!(
                    Instant::now() < deadline,
                    "node{}: enrolment did not follow the config",
                    a.node
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        // Let the un-enrolled pods' draining and the reload settle.
        std::thread::sleep(Duration::from_millis(500));
        Ok(())
    }

    fn client_json(&self, s: &Scenario, args: &[&str]) -> Result<Value> {
        let out = self
            .pod(s.client)
            .place
            .run(self.probe.to_str().context("path")?, args)
            .with_context(|| format!("{} {}", s.name, args.join(" ")))?;
        serde_json::from_str(out.trim()).with_context(|| format!("load tool said {out:?}"))
    }

    fn server_addr(&self, s: &Scenario, port: u16) -> String {
        std::net::SocketAddr::new(self.pod(s.server).ipv4.into(), port).to_string()
    }

    fn rr(&self, s: &Scenario, secs: f64) -> Result<Value> {
        self.client_json(s, &["rr", &self.server_addr(s, RR_PORT), &secs.to_string()])
    }

    /// The request/response test while a scraper in each node fetches its agent's /metrics
    /// back to back on a kept-alive connection: (rr result, scrapes per second, both agents).
    fn rr_while_scraping(&self, s: &Scenario) -> Result<(Value, f64)> {
        let stop = std::sync::atomic::AtomicBool::new(false);
        let started = Instant::now();
        let (rr, scrapes) = std::thread::scope(|scope| {
            let scrapers: Vec<_> = (1..=2)
                .map(|node| {
                    let (place, stop) = (&self.tb.node(node).place, &stop);
                    scope.spawn(move || {
                        place
                            .in_netns(|| scrape_loop(stop).unwrap_or(0))
                            .unwrap_or(0)
                    })
                })
                .collect();
            let rr = self.rr(s, self.secs);
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let scrapes: u64 = scrapers.into_iter().map(|h| h.join().unwrap_or(0)).sum();
            (rr, scrapes)
        });
        Ok((rr?, scrapes as f64 / started.elapsed().as_secs_f64()))
    }

    /// (spliced, deferred) bytes of both nodes' data paths so far (`mesh_ebpf_events`, pinned
    /// counters); None if an agent does not answer.
    fn splice_bytes(&self) -> Option<(f64, f64)> {
        let mut total = (0.0, 0.0);
        for node in 1..=2 {
            let scrape = metrics::scrape_place(&self.tb.node(node).place).ok()?;
            let events =
                |reason| metrics::value(&scrape, "mesh_ebpf_events", &[("reason", reason)]);
            total.0 += events("spliced_bytes");
            total.1 += events("splice_deferred_bytes");
        }
        Some(total)
    }

    fn iperf3(&self, s: &Scenario, streams: u32) -> Result<f64> {
        let (client, server) = (self.pod(s.client), self.pod(s.server));
        let port = IPERF_PORT.to_string();
        let mut srv = server.place.spawn("iperf3", &["-s", "-1", "-p", &port])?;
        srv.wait_listening(IPERF_PORT, Duration::from_secs(10))?;
        let out = client.place.run(
            "iperf3",
            &[
                "-c",
                &server.ipv4.to_string(),
                "-p",
                &port,
                "-t",
                &self.secs.to_string(),
                "-P",
                &streams.to_string(),
                "-J",
            ],
        )?;
        let _ = srv.wait(Duration::from_secs(10));
        let v: Value = serde_json::from_str(&out).context("iperf3 -J output")?;
        if let Some(e) = v.get("error").and_then(Value::as_str) {
            bail!("iperf3: {e}");
        }
        let bps = v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .context("iperf3 reported no received rate")?;
        Ok(bps / 1e9)
    }

    /// `perf record` of both agents into `DIR/<file>` until [`stop_perf`] (first default mesh
    /// trial of cross_node only).
    fn start_perf(
        &self,
        s: &Scenario,
        path: BenchPath,
        results: &Results,
        file: &str,
    ) -> Result<Option<std::process::Child>> {
        let Some(dir) = &self.perf else {
            return Ok(None);
        };
        let first = !results
            .trials
            .contains_key(&(s.name.to_owned(), "rss_load", path.name()));
        if !path.is_default_mesh() || s.name != "cross_node" || !first {
            return Ok(None);
        }
        std::fs::create_dir_all(dir)?;
        let pids: Vec<String> = self.agents.iter().map(|a| a.pid().to_string()).collect();
        let out = dir.join(file);
        let child = std::process::Command::new("perf")
            .args(["record", "-g", "-F", "999", "-p", &pids.join(","), "-o"])
            .arg(&out)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting perf record")?;
        println!("  perf: recording both agents into {}", out.display());
        Ok(Some(child))
    }

    /// Every test of one scenario on one path, adding one trial each.
    fn scenario(&self, s: &Scenario, path: BenchPath, results: &mut Results) -> Result<()> {
        let perf = self.start_perf(s, path, results, "cross_node_mesh.perf.data")?;
        let p = path.name();
        let secs = self.secs.to_string();
        let idle = self
            .agents
            .iter()
            .map(AgentProcess::rss_mib)
            .fold(0.0, f64::max);
        results.add(s.name, "rss_idle", p, value(idle));
        let sampler = sampler::RssSampler::start(&self.agents);

        let mut throughput = |test: &'static str, streams: u32| match self.iperf3(s, streams) {
            Ok(t) => {
                results.add(s.name, test, p, value(t));
                t
            }
            Err(e) => {
                results.fail(s.name, test, p, format!("{e:#}"));
                f64::NAN
            }
        };
        let splice_before = self.splice_bytes();
        let t1 = throughput("throughput_1", 1);
        let t16 = throughput("throughput_16", 16);
        if let (BenchPath::Mesh(_), Some((s0, d0)), Some((s1, d1))) =
            (path, splice_before, self.splice_bytes())
        {
            // The share of the bulk bytes the pod<->agent hops moved socket to socket; the rest
            // took TCP because the reading side was a bound behind (docs/ARCHITECTURE.md
            // "Splicing"). A speed figure, so it is measured here and not asserted in tests.
            let (spliced, deferred) = (s1 - s0, d1 - d0);
            if spliced + deferred > 0.0 {
                results.add(
                    s.name,
                    "splice_share",
                    p,
                    value(100.0 * spliced / (spliced + deferred)),
                );
            }
        }

        let rr = self.rr(s, self.secs)?;
        stop_perf(perf);
        let (p50, p99) = (
            rr["p50_us"].as_f64().context("p50")?,
            rr["p99_us"].as_f64().context("p99")?,
        );
        results.add(
            s.name,
            "rr_1kib",
            p,
            Trial {
                value: p50,
                p50: Some(p50),
                p99: Some(p99),
            },
        );
        if path.is_default_mesh() {
            let (rr, scrapes) = self.rr_while_scraping(s)?;
            let (p50, p99) = (
                rr["p50_us"].as_f64().context("p50")?,
                rr["p99_us"].as_f64().context("p99")?,
            );
            results.add(
                s.name,
                "rr_1kib_scraped",
                p,
                Trial {
                    value: p50,
                    p50: Some(p50),
                    p99: Some(p99),
                },
            );
            results.add(s.name, "scrapes_per_s", p, value(scrapes));
        }
        let once = match path {
            BenchPath::Plain => ONCE_PORT_PLAIN,
            BenchPath::Mesh(_) => ONCE_PORT_MESH,
        };
        let perf = self.start_perf(s, path, results, "cross_node_connrate.perf.data")?;
        for (test, conc) in [("connrate_c1", "1"), ("connrate_c8", "8")] {
            let v = self.client_json(s, &["connrate", &self.server_addr(s, once), conc, &secs])?;
            results.add(
                s.name,
                test,
                p,
                value(v["per_second"].as_f64().context("rate")?),
            );
        }
        stop_perf(perf);

        let before: Vec<f64> = self
            .agents
            .iter()
            .map(AgentProcess::cpu_seconds)
            .collect::<Result<_>>()?;
        let paced =
            self.client_json(s, &["paced", &self.server_addr(s, RR_PORT), "1000", &secs])?;
        let after: Vec<f64> = self
            .agents
            .iter()
            .map(AgentProcess::cpu_seconds)
            .collect::<Result<_>>()?;
        let (rps, wall) = (
            paced["achieved_rps"].as_f64().context("rps")?,
            paced["seconds"].as_f64().context("seconds")?,
        );
        let cpu: f64 = after.iter().zip(&before).map(|(a, b)| a - b).sum();
        results.add(
            s.name,
            "cpu_per_1k_rps",
            p,
            value(cpu / wall / (rps / 1000.0)),
        );

        results.add(s.name, "rss_load", p, value(sampler.stop()));
        println!(
            "  {:<10} {:<5} 1 stream {t1:.2} Gbit/s · 16 streams {t16:.2} Gbit/s · rr p50 {p50:.0} µs p99 {p99:.0} µs",
            s.name, p
        );
        Ok(())
    }
}

/// Ends a recording [`Rig::start_perf`] started (perf writes its file on SIGINT).
fn stop_perf(perf: Option<std::process::Child>) {
    if let Some(mut child) = perf {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let _ = child.wait();
    }
}

/// GET /metrics over one kept-alive connection (as Prometheus scrapes) to the agent of the
/// calling thread's network namespace, until `stop`; the number of complete scrapes.
fn scrape_loop(stop: &std::sync::atomic::AtomicBool) -> std::io::Result<u64> {
    use std::io::{BufRead as _, Read as _, Write as _};
    let mut n = 0;
    let s = std::net::TcpStream::connect(("127.0.0.1", 15020))?;
    let mut reader = std::io::BufReader::new(s.try_clone()?);
    let mut writer = s;
    let mut body = Vec::new();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        writer.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")?;
        let mut length = None;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some(v) = line
                .split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            {
                length = v.1.trim().parse::<usize>().ok();
            }
        }
        let length = length.ok_or_else(|| std::io::Error::other("no content-length"))?;
        body.resize(length, 0);
        reader.read_exact(&mut body)?;
        n += 1;
    }
    Ok(n)
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
