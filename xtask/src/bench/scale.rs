//! The `scale` scenario (issue #19): one node agent in local mode whose config lists N remote
//! workloads (10 per app, 100 namespaces, 50 service accounts), N/10 Services selecting them
//! and one AuthorizationPolicy per namespace, beside the testbed's own pod. Per size: the time
//! from starting the agent to its readiness endpoint answering 200 (config parsed, state
//! built, capture reconciled), its RSS then, and the RSS per workload over the empty config's.
//! Not part of the default scenarios (it builds configs of up to ~30 MB).
use std::{fmt::Write as _, path::Path, time::Duration, time::Instant};

use anyhow::{Context as _, Result, bail};
use mesh_testbed::{
    Testbed, TestbedSpec,
    http::http_get,
    metrics,
    place::{Background, Place},
};

use super::{Binaries, report::Results, sampler::rss_mib_of, throwaway_ca, value};
use crate::cmd;

pub const NAME: &str = "scale";
const NAMESPACES: usize = 100;
const READY_TIMEOUT: Duration = Duration::from_secs(180);

/// (workloads, record path); the empty config is the baseline of `bytes_per_workload`.
const SIZES: [(usize, &str); 5] = [
    (0, "n0"),
    (10_000, "n10k"),
    (50_000, "n50k"),
    (100_000, "n100k"),
    (200_000, "n200k"),
];

/// Which sizes a run measures: all, those up to 50k (`--quick`), or those named.
pub struct Sizes {
    pub quick: bool,
    named: Vec<usize>,
}

impl Sizes {
    pub fn new(quick: bool, named: &[usize]) -> Result<Self> {
        let known = |n: &usize| SIZES.iter().any(|(s, _)| s == n);
        if let Some(n) = named.iter().find(|n| !known(n)) {
            anyhow::bail!("--scale-sizes: {n} is not one of 10000, 50000, 100000, 200000");
        }
        Ok(Self {
            quick,
            named: named.to_vec(),
        })
    }

    /// Whether to measure `n` workloads (0: the baseline, always).
    pub fn wanted(&self, n: usize) -> bool {
        n == 0
            || if self.named.is_empty() {
                !self.quick || n <= 50_000
            } else {
                self.named.contains(&n)
            }
    }
}

/// What the changes made so far altered: pods relabelled (`version`), Services re-targeted.
#[derive(Default)]
pub struct Changed {
    versions: std::collections::HashMap<usize, String>,
    target_ports: std::collections::HashMap<usize, u16>,
}

/// The config of node `node1` with `n` remote workloads, as `changed` left them.
pub fn config(n: usize, uplink: &str, ca: &Path, local_pod: &str, changed: &Changed) -> String {
    let mut y = format!(
        "node: {{name: node1, uplinks: [{uplink}]}}\nmesh: {{allowUnenrollAll: true}}\nca: {{dir: {}}}\nnamespaces:\n",
        ca.display()
    );
    for i in 0..NAMESPACES {
        let _ = writeln!(
            y,
            "  - {{name: ns{i}, labels: {{istio.io/dataplane-mode: ambient}}}}"
        );
    }
    y += "workloads:\n";
    y += local_pod;
    for i in 0..n {
        let app = i / 10;
        let ip = 0x0a80_0000u32 + u32::try_from(i).expect("small");
        let version = changed
            .versions
            .get(&i)
            .cloned()
            .unwrap_or_else(|| format!("v{}", i % 3));
        let _ = writeln!(
            y,
            "  - {{name: p{i}, namespace: ns{}, serviceAccount: sa{}, node: node{}, ips: [{}], labels: {{app: a{app}, version: {version}}}}}",
            app % NAMESPACES,
            app % 50,
            2 + i % 500,
            std::net::Ipv4Addr::from(ip),
        );
    }
    y += "services:\n";
    for s in 0..n / 10 {
        let vip = 0x0ac8_0000u32 + u32::try_from(s).expect("small");
        let _ = writeln!(
            y,
            "  - {{name: s{s}, namespace: ns{}, vips: [{}], selector: {{app: a{s}}}, ports: [{{name: http, port: 80, targetPort: {}}}]}}",
            s % NAMESPACES,
            std::net::Ipv4Addr::from(vip),
            changed.target_ports.get(&s).copied().unwrap_or(8080)
        );
    }
    y += "policies:\n";
    for i in 0..NAMESPACES {
        let _ = writeln!(
            y,
            "  - {{apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {{name: allow-ns, namespace: ns{i}}}, spec: {{rules: [{{from: [{{source: {{namespaces: [ns{i}, ns{}]}}}}]}}]}}}}",
            (i + 1) % NAMESPACES
        );
    }
    y
}

/// Every size, `trials` times each.
pub fn run(bin: &Binaries, work: &Path, sizes: &Sizes) -> Result<Results> {
    let tb = Testbed::build(TestbedSpec {
        nodes: 1,
        // The second pod serves the request/response test during churn (Kubernetes mode).
        pods_per_node: 2,
    })?;
    let outcome = measure(&tb, bin, work, sizes);
    tb.teardown_verified().context("tearing the testbed down")?;
    outcome
}

fn measure(tb: &Testbed, bin: &Binaries, work: &Path, wanted: &Sizes) -> Result<Results> {
    let quick = wanted.quick;
    let agent = &bin.agent;
    let ca = throwaway_ca(agent, work)?;
    let pod = tb.pod(1, 1);
    let local_pod = format!(
        "  - {{name: {}, namespace: ns0, serviceAccount: local, node: node1, ips: [{}], hostInterface: {}}}\n",
        pod.name(),
        pod.ipv4,
        pod.host_veth
    );
    let sizes: Vec<(usize, &'static str)> = SIZES
        .into_iter()
        .filter(|(n, _)| wanted.wanted(*n))
        .collect();
    let trials = if quick { 1 } else { 3 };
    let changes = if quick { CHANGES_QUICK } else { CHANGES };
    let mut results = Results::default();
    for (n, path) in sizes {
        let file = work.join(format!("scale-{path}.yaml"));
        let write = |changed: &Changed| -> Result<()> {
            // Whole or not at all: the agent never reads a half-written file.
            let tmp = file.with_extension("tmp");
            std::fs::write(
                &tmp,
                config(n, &tb.node(1).uplink, &ca, &local_pod, changed),
            )?;
            std::fs::rename(&tmp, &file)?;
            Ok(())
        };
        write(&Changed::default())?;
        for trial in 1..=trials {
            let bpffs = tb.bpffs_dir().join(format!("scale-{path}-{trial}"));
            // Changes on the first trial only (each one rewrites the whole file).
            let churn = if trial == 1 && n > 0 { changes } else { 0 };
            let outcome = start_once(tb, agent, &file, &bpffs, n, churn, &write)
                .with_context(|| format!("{n} workloads, trial {trial}"))?;
            println!(
                "  scale      {path:<6} ready {:.2} s, RSS {:.1} MiB, {:.1} MiB {SETTLE:?} later",
                outcome.ready, outcome.rss, outcome.rss_settled
            );
            results.add(NAME, "ready_s", path, value(outcome.ready));
            results.add(NAME, "rss_ready", path, value(outcome.rss));
            results.add(NAME, "rss_settled", path, value(outcome.rss_settled));
            record_times(
                &mut results,
                path,
                [
                    ("update_ms", &outcome.pod_apply_ms),
                    ("update_service_ms", &outcome.service_apply_ms),
                    ("update_file_ms", &outcome.file_ms),
                ],
            );
        }
        let _ = std::fs::remove_file(&file);
    }
    let kube = super::scale_kube::Setup {
        tb,
        agent,
        probe: &bin.probe,
        ca: &ca,
        work,
        sizes: wanted,
        changes,
    };
    kube.run(&mut results)?;
    for (rss, per) in [
        ("rss_ready", "bytes_per_workload"),
        ("rss_settled", "bytes_per_workload_settled"),
    ] {
        let base = results.median(NAME, rss, "n0").unwrap_or(0.0);
        let all = SIZES.into_iter().chain(super::scale_kube::SIZES);
        for (n, path) in all.filter(|(n, _)| *n > 0) {
            if let Some(at) = results.median(NAME, rss, path) {
                let bytes = (at - base) * 1024.0 * 1024.0 / n as f64;
                results.add(NAME, per, path, value(bytes));
            }
        }
    }
    Ok(results)
}

/// Changes per size (alternately one pod relabelled and one Service re-targeted).
const CHANGES: usize = 100;
const CHANGES_QUICK: usize = 10;

/// One agent run.
struct Outcome {
    ready: f64,
    rss: f64,
    rss_settled: f64,
    /// The agent's own time to apply each change (`apply_us` of its log), by kind of change.
    pod_apply_ms: Vec<f64>,
    service_apply_ms: Vec<f64>,
    /// From the file's replacement to the change applied (read, parse, diff, apply; the
    /// metrics endpoint is polled every millisecond).
    file_ms: Vec<f64>,
}

/// The median as the value, with p50 and p99 (None without samples).
pub fn percentiles(ms: &[f64]) -> Option<super::report::Trial> {
    if ms.is_empty() {
        return None;
    }
    let mut v = ms.to_vec();
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    Some(super::report::Trial {
        value: at(0.5),
        p50: Some(at(0.5)),
        p99: Some(at(0.99)),
    })
}

/// `mesh_config_reloads{outcome="applied"}` of the agent in `place`.
pub fn applied_count(place: &mesh_testbed::place::Place) -> Option<u64> {
    let scrape = metrics::scrape_place(place).ok()?;
    Some(metrics::value(&scrape, "mesh_config_reloads", &[("outcome", "applied")]) as u64)
}

/// The `apply_us` of each "configuration applied" line of a log, with its kind.
pub fn applied_lines(log: &str) -> Vec<(String, f64)> {
    log.lines()
        .filter(|l| l.contains("configuration applied"))
        .filter_map(|l| {
            let field = |name: &str| {
                let at = l.find(&format!("{name}="))? + name.len() + 1;
                let rest = &l[at..];
                Some(
                    rest[..rest.find(' ').unwrap_or(rest.len())]
                        .trim_matches('"')
                        .to_owned(),
                )
            };
            Some((
                field("kind")?,
                field("apply_us")?.parse::<f64>().ok()? / 1000.0,
            ))
        })
        .collect()
}

/// Records each test's samples (ms) as p50 and p99.
pub fn record_times(
    results: &mut Results,
    path: &'static str,
    tests: [(&'static str, &Vec<f64>); 3],
) {
    for (test, ms) in tests {
        if let Some(t) = percentiles(ms) {
            println!(
                "  scale      {path:<10} {test} p50 {:.3} ms, p99 {:.3} ms over {}",
                t.p50.unwrap_or(f64::NAN),
                t.p99.unwrap_or(f64::NAN),
                ms.len()
            );
            results.add(NAME, test, path, t);
        }
    }
}

/// Stops an agent started by [`start_agent`] and removes its data path; its log.
pub fn stop_agent(p: Background, agent: &Path, bpffs: &Path) -> Result<String> {
    let out = p.terminate(Duration::from_secs(10))?;
    cmd::run(
        std::process::Command::new(agent)
            .args(["node", "--uninstall", "--bpffs-dir"])
            .arg(bpffs),
    )?;
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

/// An agent started and ready.
pub struct Started {
    pub p: Background,
    /// Seconds from the start to the readiness endpoint's 200.
    pub ready: f64,
    /// Its RSS then, MiB.
    pub rss: f64,
    /// Its RSS [`SETTLE`] later, MiB: what it keeps once what it built with is given back.
    pub rss_settled: f64,
}

/// How long after ready the RSS is read again: past the agent's memory trim (every 2 s) and
/// the discovery's first settle (Kubernetes mode drops the pod records the configuration now
/// stands in for).
pub const SETTLE: Duration = Duration::from_secs(3);

/// Starts `agent args` in `place` and waits for it to be ready.
pub fn start_agent(place: &Place, agent: &Path, args: &[&str]) -> Result<Started> {
    let started = Instant::now();
    let p = place.spawn(agent.to_str().context("path")?, args)?;
    loop {
        let answer = http_get(
            place,
            "127.0.0.1:15021".parse().expect("literal"),
            "GET",
            "/healthz/ready",
        );
        if answer.is_ok_and(|(status, _)| status.contains(" 200")) {
            let ready = started.elapsed().as_secs_f64();
            let rss = rss_mib_of(p.pid());
            std::thread::sleep(SETTLE);
            let rss_settled = rss_mib_of(p.pid());
            return Ok(Started {
                p,
                ready,
                rss,
                rss_settled,
            });
        }
        if started.elapsed() > READY_TIMEOUT {
            let out = p.kill()?;
            bail!(
                "not ready after {READY_TIMEOUT:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One-entry changes made one at a time, each waited for until the agent counts it applied.
pub struct TimedChanges {
    applied: u64,
    /// The agent's `configuration applied` lines before the first change.
    first: usize,
    /// Per change: a pod's (true) or a Service's.
    pods: Vec<bool>,
    /// Per change: from making it to the agent counting it, ms.
    pub e2e_ms: Vec<f64>,
}

impl TimedChanges {
    pub fn new(place: &Place) -> Result<Self> {
        let applied = applied_count(place).context("reading the agent's metrics")?;
        Ok(Self {
            applied,
            // The agent logs one `configuration applied` line per change it counts.
            first: usize::try_from(applied).context("count")?,
            pods: Vec::new(),
            e2e_ms: Vec::new(),
        })
    }

    /// Makes one change (`make`) and waits until it is applied.
    pub fn make(
        &mut self,
        place: &Place,
        pod: bool,
        make: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        let t0 = Instant::now();
        make()?;
        while applied_count(place).is_none_or(|c| c <= self.applied) {
            if t0.elapsed() > READY_TIMEOUT {
                bail!(
                    "change {} not applied after {READY_TIMEOUT:?}",
                    self.pods.len()
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        self.applied += 1;
        self.pods.push(pod);
        self.e2e_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        Ok(())
    }

    /// The agent's own apply time of each change, from its `log`: (pods', Services'), ms. A
    /// change applied other than by difference fails the run.
    pub fn apply_times(&self, log: &str) -> Result<(Vec<f64>, Vec<f64>)> {
        let lines = applied_lines(log);
        let (first, n) = (self.first, self.pods.len());
        let lines = lines.get(first..first + n).with_context(|| {
            format!(
                "{} `configuration applied` lines, {first} + {n} expected",
                lines.len()
            )
        })?;
        if let Some((kind, _)) = lines.iter().find(|(k, _)| k != "delta") {
            bail!("a one-entry change was applied as {kind:?}, not as a delta");
        }
        let (mut pods, mut services) = (Vec::new(), Vec::new());
        for ((_, ms), pod) in lines.iter().zip(&self.pods) {
            if *pod {
                pods.push(*ms)
            } else {
                services.push(*ms)
            }
        }
        Ok((pods, services))
    }
}

/// Starts the agent on `file`; the time until ready and its RSS then; then `changes` changes
/// written by `write`, each waited for.
fn start_once(
    tb: &Testbed,
    agent: &Path,
    file: &Path,
    bpffs: &Path,
    n: usize,
    changes: usize,
    write: &dyn Fn(&Changed) -> Result<()>,
) -> Result<Outcome> {
    let place = &tb.node(1).place;
    let args = [
        "node",
        "--config",
        file.to_str().context("path")?,
        "--bpffs-dir",
        bpffs.to_str().context("path")?,
    ];
    let Started {
        p,
        ready,
        rss,
        rss_settled,
    } = start_agent(place, agent, &args)?;
    let mut changed = Changed::default();
    let mut timed = TimedChanges::new(place)?;
    for i in 0..changes {
        // Spread over the cluster: a different pod or Service each time.
        let pick = (i * 7919) % n;
        let pod = i % 2 == 0;
        if pod {
            changed.versions.insert(pick, format!("c{i}"));
        } else {
            changed
                .target_ports
                .insert(pick / 10, 9000 + u16::try_from(i).expect("small"));
        }
        timed.make(place, pod, || write(&changed))?;
    }
    let log = stop_agent(p, agent, bpffs)?;
    let (pod_apply_ms, service_apply_ms) = timed.apply_times(&log)?;
    let file_ms = timed.e2e_ms;
    Ok(Outcome {
        ready,
        rss,
        rss_settled,
        pod_apply_ms,
        service_apply_ms,
        file_ms,
    })
}

/// The scenario's table: one row per size.
pub fn markdown(results: &Results) -> String {
    let mut out = String::from(
        "\n| mode, workloads / services | ready | RSS when ready / 3 s later | bytes per workload (ready / 3 s later) | pod change applied p50 / p99 | Service change p50 / p99 | file or API write → applied p50 / p99 |\n|---|---|---|---|---|---|---|\n",
    );
    for (n, path) in SIZES.into_iter().chain(super::scale_kube::SIZES) {
        let Some(ready) = results.median(NAME, "ready_s", path) else {
            continue;
        };
        let ready = match results.median(NAME, "ready_after_list_s", path) {
            Some(after) => format!("{ready:.2} s ({after:.2} s after the list)"),
            None => format!("{ready:.2} s"),
        };
        let rss = results.median(NAME, "rss_ready", path).unwrap_or(f64::NAN);
        let rss_settled = results
            .median(NAME, "rss_settled", path)
            .unwrap_or(f64::NAN);
        let bytes = |test: &str| {
            results
                .median(NAME, test, path)
                .map_or("—".to_owned(), |b| format!("{b:.0} B"))
        };
        let per = format!(
            "{} / {}",
            bytes("bytes_per_workload"),
            bytes("bytes_per_workload_settled")
        );
        let pct = |test: &str| match (
            results.percentile(NAME, test, path, false),
            results.percentile(NAME, test, path, true),
        ) {
            (Some(p50), Some(p99)) => format!("{p50:.2} / {p99:.2} ms"),
            _ => "—".to_owned(),
        };
        let _ = writeln!(
            out,
            "| {} {n} / {} | {ready} | {rss:.1} / {rss_settled:.1} MiB | {per} | {} | {} | {} |",
            if path.starts_with("kube") {
                "Kubernetes"
            } else {
                "file"
            },
            n / 10,
            pct("update_ms"),
            pct("update_service_ms"),
            pct(if path.starts_with("kube") {
                "update_api_ms"
            } else {
                "update_file_ms"
            }),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_run_what_was_asked_and_always_the_baseline() {
        let all = Sizes::new(false, &[]).unwrap();
        assert!(all.wanted(0) && all.wanted(200_000));
        let quick = Sizes::new(true, &[]).unwrap();
        assert!(quick.wanted(50_000) && !quick.wanted(100_000));
        let one = Sizes::new(true, &[100_000]).unwrap();
        assert!(one.wanted(0) && one.wanted(100_000) && !one.wanted(10_000));
        let err = Sizes::new(false, &[12_345]).err().unwrap().to_string();
        assert!(err.contains("12345"), "{err}");
    }

    #[test]
    fn the_generated_config_has_what_it_says() {
        let y = config(30, "eth9", Path::new("/ca"), "", &Changed::default());
        assert_eq!(y.matches("name: p").count(), 30);
        assert_eq!(y.matches("selector: {app: a").count(), 3);
        assert_eq!(y.matches("kind: AuthorizationPolicy").count(), NAMESPACES);
        assert!(y.contains("uplinks: [eth9]"));
        let mut changed = Changed::default();
        changed.versions.insert(7, "c0".into());
        changed.target_ports.insert(1, 9001);
        let y = config(30, "eth9", Path::new("/ca"), "", &changed);
        assert!(y.contains("name: p7, ") && y.contains("version: c0}"));
        assert!(y.contains("name: s1, ") && y.contains("targetPort: 9001}"));
        assert_eq!(y.matches("targetPort: 8080").count(), 2);
    }

    #[test]
    fn the_agents_apply_lines_are_read() {
        let log = "2026-12-02T13:00:00Z  INFO mesh_agent::node::update: configuration applied kind=\"delta\" workloads=1 services=0 apply_us=412\n\
                   2026-12-02T13:00:01Z  INFO mesh_agent::node: something else apply_us=9\n\
                   2026-12-02T13:00:02Z  INFO mesh_agent::node::update: configuration applied kind=\"full\" workloads=3 services=1 apply_us=15000\n";
        assert_eq!(
            applied_lines(log),
            [("delta".to_owned(), 0.412), ("full".to_owned(), 15.0)]
        );
    }
}
