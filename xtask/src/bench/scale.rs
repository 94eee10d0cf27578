//! The `scale` scenario (issue #19): one node agent in local mode whose config lists N remote
//! workloads (10 per app, 100 namespaces, 50 service accounts), N/10 Services selecting them
//! and one AuthorizationPolicy per namespace, beside the testbed's own pod. Per size: the time
//! from starting the agent to its readiness endpoint answering 200 (config parsed, state
//! built, capture reconciled), its RSS then, and the RSS per workload over the empty config's.
//! Not part of the default scenarios (it builds configs of up to ~30 MB).
use std::{fmt::Write as _, path::Path, time::Duration, time::Instant};

use anyhow::{Context as _, Result, bail};
use mesh_testbed::{Testbed, TestbedSpec, http::http_get};

use super::{report::Results, sampler::rss_mib_of, throwaway_ca, value};
use crate::cmd;

pub const NAME: &str = "scale";
const NAMESPACES: usize = 100;
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// (workloads, record path); the empty config is the baseline of `bytes_per_workload`.
const SIZES: [(usize, &str); 5] = [
    (0, "n0"),
    (10_000, "n10k"),
    (50_000, "n50k"),
    (100_000, "n100k"),
    (200_000, "n200k"),
];

/// The config of node `node1` with `n` remote workloads.
pub fn config(n: usize, uplink: &str, ca: &Path, local_pod: &str) -> String {
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
        let _ = writeln!(
            y,
            "  - {{name: p{i}, namespace: ns{}, serviceAccount: sa{}, node: node{}, ips: [{}], labels: {{app: a{app}, version: v{}}}}}",
            app % NAMESPACES,
            app % 50,
            2 + i % 500,
            std::net::Ipv4Addr::from(ip),
            i % 3
        );
    }
    y += "services:\n";
    for s in 0..n / 10 {
        let vip = 0x0ac8_0000u32 + u32::try_from(s).expect("small");
        let _ = writeln!(
            y,
            "  - {{name: s{s}, namespace: ns{}, vips: [{}], selector: {{app: a{s}}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}",
            s % NAMESPACES,
            std::net::Ipv4Addr::from(vip)
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
pub fn run(bin: &Path, work: &Path, quick: bool) -> Result<Results> {
    let tb = Testbed::build(TestbedSpec {
        nodes: 1,
        pods_per_node: 1,
    })?;
    let outcome = measure(&tb, bin, work, quick);
    tb.teardown_verified().context("tearing the testbed down")?;
    outcome
}

fn measure(tb: &Testbed, bin: &Path, work: &Path, quick: bool) -> Result<Results> {
    let agent = bin.join("mesh-agent");
    let ca = throwaway_ca(&agent, work)?;
    let pod = tb.pod(1, 1);
    let local_pod = format!(
        "  - {{name: {}, namespace: ns0, serviceAccount: local, node: node1, ips: [{}], hostInterface: {}}}\n",
        pod.name(),
        pod.ipv4,
        pod.host_veth
    );
    let sizes: Vec<(usize, &'static str)> = SIZES
        .into_iter()
        .filter(|(n, _)| !quick || *n <= 50_000)
        .collect();
    let trials = if quick { 1 } else { 3 };
    let mut results = Results::default();
    for (n, path) in sizes {
        let file = work.join(format!("scale-{path}.yaml"));
        std::fs::write(&file, config(n, &tb.node(1).uplink, &ca, &local_pod))?;
        for trial in 1..=trials {
            let bpffs = tb.bpffs_dir().join(format!("scale-{path}-{trial}"));
            let (ready, rss) = start_once(tb, &agent, &file, &bpffs)
                .with_context(|| format!("{n} workloads, trial {trial}"))?;
            println!("  scale      {path:<6} ready {ready:.2} s, RSS {rss:.1} MiB");
            results.add(NAME, "ready_s", path, value(ready));
            results.add(NAME, "rss_ready", path, value(rss));
        }
        let _ = std::fs::remove_file(&file);
    }
    let base = results.median(NAME, "rss_ready", "n0").unwrap_or(0.0);
    for (n, path) in SIZES.into_iter().filter(|(n, _)| *n > 0) {
        if let Some(rss) = results.median(NAME, "rss_ready", path) {
            let per = (rss - base) * 1024.0 * 1024.0 / n as f64;
            results.add(NAME, "bytes_per_workload", path, value(per));
        }
    }
    Ok(results)
}

/// Starts the agent on `file`; seconds until ready, and its RSS (MiB) then.
fn start_once(tb: &Testbed, agent: &Path, file: &Path, bpffs: &Path) -> Result<(f64, f64)> {
    let place = &tb.node(1).place;
    let started = Instant::now();
    let p = place.spawn(
        agent.to_str().context("path")?,
        &[
            "node",
            "--config",
            file.to_str().context("path")?,
            "--bpffs-dir",
            bpffs.to_str().context("path")?,
        ],
    )?;
    let ready = loop {
        let answer = http_get(
            place,
            "127.0.0.1:15021".parse().expect("literal"),
            "GET",
            "/healthz/ready",
        );
        if answer.is_ok_and(|(status, _)| status.contains(" 200")) {
            break started.elapsed().as_secs_f64();
        }
        if started.elapsed() > READY_TIMEOUT {
            let out = p.kill()?;
            bail!(
                "not ready after {READY_TIMEOUT:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let rss = rss_mib_of(p.pid());
    p.terminate(Duration::from_secs(10))?;
    cmd::run(
        std::process::Command::new(agent)
            .args(["node", "--uninstall", "--bpffs-dir"])
            .arg(bpffs),
    )?;
    Ok((ready, rss))
}

/// The scenario's table: one row per size.
pub fn markdown(results: &Results) -> String {
    let mut out = String::from(
        "\n| workloads / services | ready | RSS when ready | bytes per workload |\n|---|---|---|---|\n",
    );
    for (n, path) in SIZES {
        let Some(ready) = results.median(NAME, "ready_s", path) else {
            continue;
        };
        let rss = results.median(NAME, "rss_ready", path).unwrap_or(f64::NAN);
        let per = results
            .median(NAME, "bytes_per_workload", path)
            .map_or("—".to_owned(), |b| format!("{b:.0} B"));
        let _ = writeln!(
            out,
            "| {n} / {} | {ready:.2} s | {rss:.1} MiB | {per} |",
            n / 10
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generated_config_has_what_it_says() {
        let y = config(30, "eth9", Path::new("/ca"), "");
        assert_eq!(y.matches("name: p").count(), 30);
        assert_eq!(y.matches("selector: {app: a").count(), 3);
        assert_eq!(y.matches("kind: AuthorizationPolicy").count(), NAMESPACES);
        assert!(y.contains("uplinks: [eth9]"));
    }
}
