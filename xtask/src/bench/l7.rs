//! The `l7` scenario: HTTP/1.1 keep-alive requests for a 1 KiB answer from the L7 test
//! application on node2-pod1 to node1-pod1, on three paths in the same trial: `plain` (not
//! enrolled), `mesh` (L4 mesh, pod address) and `waypoint` (the Service's VIP, bound to a
//! `mesh-agent waypoint` in node1-pod3). Figures: requests/s at 16 connections (wrk), latency
//! p50/p99 at a fixed 1,000 req/s (the probe's paced HTTP client), the CPU per 1,000 req/s of
//! the waypoint process alone (of both agents on the mesh path) and the waypoint's RSS under
//! load.
use std::{path::Path, time::Duration};

use anyhow::{Context as _, Result};
use mesh_testbed::{Background, Testbed};

use super::{
    Binaries, Rig,
    report::{Results, Trial},
    sampler::{RssSampler, cpu_seconds_of, rss_mib_of},
    value,
};

pub const NAME: &str = "l7";
pub const CLIENT: (usize, usize) = (1, 1);
pub const SERVER: (usize, usize) = (2, 1);
/// The waypoint's pod (never enrolled).
pub const WAYPOINT: (usize, usize) = (1, 3);
pub const APP_PORT: u16 = 8080;
pub const VIP: &str = "10.96.0.50";
const PATH: &str = "/bytes/1024";

/// Labels the scenario adds to a pod in the config.
pub fn labels(pod: (usize, usize)) -> &'static str {
    match pod {
        SERVER => "app: l7",
        WAYPOINT => {
            "gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none"
        }
        _ => "",
    }
}

/// The Service bound to the waypoint and the waypoint's Gateway, for every node's config.
pub fn config_tail() -> String {
    format!(
        "services:\n  - {{name: l7, namespace: bench, vips: [{VIP}], selector: {{app: l7}}, labels: {{istio.io/use-waypoint: waypoint}}, ports: [{{name: http, port: 80, targetPort: {APP_PORT}}}]}}\npolicies:\n  - apiVersion: gateway.networking.k8s.io/v1\n    kind: Gateway\n    metadata: {{name: waypoint, namespace: bench}}\n    spec: {{gatewayClassName: mesh-waypoint, listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]}}\n"
    )
}

/// Starts the application and the waypoint (reading node 1's config).
pub fn start(tb: &Testbed, bin: &Binaries, node1_config: &Path) -> Result<Vec<Background>> {
    let probe = &bin.probe;
    let server = tb.pod(SERVER.0, SERVER.1);
    let mut app = server.place.spawn(
        probe.to_str().context("path")?,
        &["http-app", &APP_PORT.to_string(), "l7"],
    )?;
    app.wait_listening(APP_PORT, Duration::from_secs(10))?;
    let waypoint = crate::demo_l7::spawn_waypoint(
        tb.pod(WAYPOINT.0, WAYPOINT.1),
        &bin.agent,
        node1_config,
        "bench/waypoint",
    )?;
    Ok(vec![app, waypoint])
}

impl Rig<'_> {
    /// Every L7 test on `path` (`plain`, `mesh` or `waypoint`), adding one trial each.
    pub fn l7(&self, path: &'static str, waypoint_pid: u32, results: &mut Results) -> Result<()> {
        let server = self.tb.pod(SERVER.0, SERVER.1);
        let (target, host) = match path {
            "waypoint" => (format!("{VIP}:80"), "l7.bench.svc.cluster.local".to_owned()),
            _ => (
                format!("{}:{APP_PORT}", server.ipv4),
                server.ipv4.to_string(),
            ),
        };
        let client = &self.tb.pod(CLIENT.0, CLIENT.1).place;
        let secs = self.secs;
        let sampler = RssSampler::start_pids(vec![waypoint_pid]);
        let wrk = client.run(
            "wrk",
            &[
                "-t1",
                "-c16",
                &format!("-d{}s", secs.max(1.0) as u64),
                &format!("http://{target}{PATH}"),
            ],
        );
        let rss = sampler.stop();
        match wrk.and_then(|o| parse_wrk(&o)) {
            Ok(rps) => results.add(NAME, "http_rps_c16", path, value(rps)),
            Err(e) => results.fail(NAME, "http_rps_c16", path, format!("{e:#}")),
        }
        if path == "waypoint" {
            results.add(NAME, "rss_load", path, value(rss));
        }
        // The CPU of whoever carries this path: the waypoint alone, or both agents (mesh).
        let pids: Vec<u32> = match path {
            "waypoint" => vec![waypoint_pid],
            "mesh" => self.agents.iter().map(|a| a.pid()).collect(),
            _ => Vec::new(),
        };
        let cpu = |pids: &[u32]| -> Result<f64> { pids.iter().map(|p| cpu_seconds_of(*p)).sum() };
        let before = cpu(&pids)?;
        let paced = client.run(
            self.probe.to_str().context("path")?,
            &[
                "http-paced",
                &target,
                &host,
                PATH,
                "1000",
                &secs.to_string(),
            ],
        );
        let paced: serde_json::Value = match paced
            .context("http-paced")
            .and_then(|o| serde_json::from_str(o.trim()).context("http-paced output"))
        {
            Ok(v) => v,
            Err(e) => {
                results.fail(NAME, "http_rr_1kib", path, format!("{e:#}"));
                return Ok(());
            }
        };
        let after = cpu(&pids)?;
        let latency = Trial::latency(&paced)?;
        results.add(NAME, "http_rr_1kib", path, latency);
        let (rps, wall) = (
            paced["achieved_rps"].as_f64().context("rps")?,
            paced["seconds"].as_f64().context("seconds")?,
        );
        if !pids.is_empty() && rps > 0.0 {
            results.add(
                NAME,
                "http_cpu_per_1k_rps",
                path,
                value((after - before) / wall / (rps / 1000.0)),
            );
        }
        let errors = paced["errors"].as_u64().unwrap_or(0);
        println!(
            "  l7         {path:<8} p50 {:.0} µs p99 {:.0} µs at {rps:.0} req/s ({errors} errors) · waypoint RSS {:.1} MiB",
            latency.value,
            latency.p99.unwrap_or_default(),
            rss_mib_of(waypoint_pid)
        );
        Ok(())
    }
}

/// `Requests/sec:` from wrk's report.
fn parse_wrk(out: &str) -> Result<f64> {
    let errors = out
        .lines()
        .find(|l| l.trim_start().starts_with("Non-2xx or 3xx responses:"));
    anyhow::ensure!(
        errors.is_none(),
        "wrk: {}",
        errors.unwrap_or_default().trim()
    );
    out.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk's output: {out}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_reports_are_read_and_errors_are_not_figures() {
        let ok = "Running 2s test @ http://10.96.0.50:80/bytes/1024\n  1 threads and 16 connections\nRequests/sec:  12345.67\nTransfer/sec:      13.1MB\n";
        assert_eq!(parse_wrk(ok).unwrap(), 12345.67);
        let bad = format!("{ok}  Non-2xx or 3xx responses: 12\n");
        assert!(parse_wrk(&bad).is_err());
        assert!(parse_wrk("nothing").is_err());
    }
}
