//! The `scale` scenario in Kubernetes mode (issue #19): the same cluster as the local-mode
//! sizes (N pods on 500 other nodes, N/10 Services with one EndpointSlice each, 100 namespaces,
//! one AuthorizationPolicy per namespace, and the testbed's pod on this node), served by the
//! API server double; the agent lists, then watches. Per size: the time from the agent's start
//! to ready and from its last watcher's first list to ready, its RSS then, and the time to
//! apply one pod change and one EndpointSlice change made through the API (the agent's own
//! apply time, and API write → applied, which includes the 100 ms batching of events); then
//! the data path's request/response latency (1 KiB, pod to pod on this node through the
//! agent) quiet and while 100 pod changes per second arrive, 3 trials of each.
use std::{net::Ipv4Addr, path::Path, time::Duration, time::Instant};

use anyhow::{Context as _, Result};
use mesh_testbed::{Testbed, fakeapi::FakeApi};
use serde_json::{Value, json};

use super::{
    report::Results,
    scale::{NAME, Started, TimedChanges, record_times, start_agent, stop_agent},
    value,
};

const NAMESPACES: usize = 100;

/// (workloads, record path).
pub const SIZES: [(usize, &str); 4] = [
    (10_000, "kube_n10k"),
    (50_000, "kube_n50k"),
    (100_000, "kube_n100k"),
    (200_000, "kube_n200k"),
];

fn pod_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x0a80_0000u32 + u32::try_from(i).expect("small"))
}

fn pod(i: usize, version: &str) -> Value {
    let app = i / 10;
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("p{i}"), "namespace": format!("ns{}", app % NAMESPACES),
                     "labels": {"app": format!("a{app}"), "version": version}},
        "spec": {"nodeName": format!("node{}", 2 + i % 500),
                 "serviceAccountName": format!("sa{}", app % 50), "containers": []},
        "status": {"phase": "Running", "podIP": pod_ip(i).to_string(),
                   "podIPs": [{"ip": pod_ip(i).to_string()}]}
    })
}

fn slice(s: usize, n: usize, extra: Option<Ipv4Addr>) -> Value {
    let mut endpoints: Vec<Value> = (s * 10..(s * 10 + 10).min(n))
        .map(|i| json!({"addresses": [pod_ip(i).to_string()], "conditions": {"ready": true}}))
        .collect();
    endpoints.extend(
        extra.map(|ip| json!({"addresses": [ip.to_string()], "conditions": {"ready": true}})),
    );
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": format!("s{s}-abcde"), "namespace": format!("ns{}", s % NAMESPACES),
                     "labels": {"kubernetes.io/service-name": format!("s{s}")}},
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
    })
}

/// Fills `api` with the cluster of `n` remote pods and the testbed's pods on node1.
fn fill(api: &FakeApi, n: usize, local: &[(&str, Ipv4Addr)]) {
    for i in 0..NAMESPACES {
        api.apply(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": format!("ns{i}"), "labels": {"istio.io/dataplane-mode": "ambient"}}}));
        api.apply(json!({
            "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "allow-ns", "namespace": format!("ns{i}")},
            "spec": {"rules": [{"from": [{"source": {"namespaces": [format!("ns{i}"), format!("ns{}", (i + 1) % NAMESPACES)]}}]}]}
        }));
    }
    for (name, ip) in local {
        api.apply(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "ns0"},
            "spec": {"nodeName": "node1", "serviceAccountName": "local", "containers": []},
            "status": {"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]}
        }));
    }
    for i in 0..n {
        api.apply(pod(i, &format!("v{}", i % 3)));
    }
    for s in 0..n / 10 {
        let vip = Ipv4Addr::from(0x0ac8_0000u32 + u32::try_from(s).expect("small"));
        api.apply(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("s{s}"), "namespace": format!("ns{}", s % NAMESPACES)},
            "spec": {"clusterIP": vip.to_string(), "clusterIPs": [vip.to_string()],
                     "selector": {"app": format!("a{s}")},
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}
        }));
        api.apply(slice(s, n, None));
    }
}

/// What the Kubernetes-mode runs need.
pub struct Setup<'a> {
    pub tb: &'a Testbed,
    pub agent: &'a Path,
    pub probe: &'a Path,
    pub ca: &'a Path,
    pub work: &'a Path,
    pub sizes: &'a super::scale::Sizes,
    /// One-object changes timed per size.
    pub changes: usize,
}

/// The request/response test's port on the server pod.
const RR_PORT: u16 = 7001;
/// Request/response trials (quiet, then during churn) and their length.
const RR_TRIALS: usize = 3;
const RR_SECS: u64 = 3;
/// Pod changes per second during the churn trials.
const CHURN_PER_S: u64 = 100;

impl Setup<'_> {
    /// Every size once.
    pub fn run(&self, results: &mut Results) -> Result<()> {
        let node1 = self.tb.node(1);
        let locals: Vec<(&str, Ipv4Addr)> = (1..=2)
            .map(|i| (self.tb.pod(1, i).name(), self.tb.pod(1, i).ipv4))
            .collect();
        let server = self.tb.pod(1, 2);
        let port = RR_PORT.to_string();
        let mut echo = server.place.spawn(
            self.probe.to_str().context("path")?,
            &["load-server", &port, "7002", "7003"],
        )?;
        echo.wait_listening(RR_PORT, Duration::from_secs(10))?;
        let sizes = SIZES.into_iter().filter(|(n, _)| self.sizes.wanted(*n));
        for (n, path) in sizes {
            // On node1's address: the agent reaches it from its namespace, uncaptured.
            let listener = node1
                .place
                .in_netns(|| std::net::TcpListener::bind((node1.ipv4, 0)))??;
            let api = FakeApi::start_on(listener);
            let filled = Instant::now();
            fill(&api, n, &locals);
            println!(
                "  scale      {path:<10} API double filled in {:.1} s",
                filled.elapsed().as_secs_f64()
            );
            let kc = api.write_kubeconfig(self.work);
            let bpffs = self.tb.bpffs_dir().join(format!("scale-{path}"));
            let outcome = self
                .once(&kc, &bpffs, &api, n)
                .with_context(|| format!("{n} workloads in Kubernetes mode"))?;
            self.record(path, &outcome, results);
        }
        let _ = echo.kill();
        Ok(())
    }

    fn record(&self, path: &'static str, outcome: &Outcome, results: &mut Results) {
        println!(
            "  scale      {path:<10} ready {:.2} s after start, {:.2} s after the last list, RSS {:.1} MiB, {:.1} MiB {:?} later",
            outcome.ready,
            outcome.after_list,
            outcome.rss,
            outcome.rss_settled,
            super::scale::SETTLE
        );
        results.add(NAME, "ready_s", path, value(outcome.ready));
        results.add(NAME, "ready_after_list_s", path, value(outcome.after_list));
        results.add(NAME, "rss_ready", path, value(outcome.rss));
        results.add(NAME, "rss_settled", path, value(outcome.rss_settled));
        record_times(
            results,
            path,
            [
                ("update_ms", &outcome.pod_apply_ms),
                ("update_service_ms", &outcome.service_apply_ms),
                ("update_api_ms", &outcome.api_ms),
            ],
        );
        for (test, trials) in [
            ("rr_1kib", &outcome.rr_quiet),
            ("rr_1kib_churn", &outcome.rr_churn),
        ] {
            for t in trials {
                results.add(NAME, test, path, *t);
            }
            let p50s: Vec<String> = trials.iter().map(|t| format!("{:.0}", t.value)).collect();
            println!("  scale      {path:<10} {test} p50 {} µs", p50s.join(" / "));
        }
    }

    /// The request/response test from pod 1 to pod 2 of node1.
    fn rr(&self) -> Result<super::report::Trial> {
        let dst = std::net::SocketAddr::new(self.tb.pod(1, 2).ipv4.into(), RR_PORT);
        let out = self.tb.pod(1, 1).place.run(
            self.probe.to_str().context("path")?,
            &["rr", &dst.to_string(), &RR_SECS.to_string()],
        )?;
        let v: Value =
            serde_json::from_str(out.trim()).with_context(|| format!("rr said {out:?}"))?;
        let p50 = v["p50_us"].as_f64().context("p50")?;
        Ok(super::report::Trial {
            value: p50,
            p50: Some(p50),
            p99: v["p99_us"].as_f64(),
        })
    }

    /// The request/response test while pods change at [`CHURN_PER_S`]; the changes made.
    fn rr_during_churn(
        &self,
        api: &FakeApi,
        n: usize,
        round: usize,
    ) -> Result<(super::report::Trial, usize)> {
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            let churn = scope.spawn(|| {
                let mut made = 0;
                let tick = Duration::from_micros(1_000_000 / CHURN_PER_S);
                let mut next = Instant::now();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    api.apply(pod(
                        (made * 104_729 + round) % n,
                        &format!("r{round}-{made}"),
                    ));
                    made += 1;
                    next += tick;
                    std::thread::sleep(next.saturating_duration_since(Instant::now()));
                }
                made
            });
            let rr = self.rr();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let made = churn.join().unwrap_or(0);
            Ok((rr?, made))
        })
    }
}

struct Outcome {
    ready: f64,
    after_list: f64,
    rss: f64,
    rss_settled: f64,
    pod_apply_ms: Vec<f64>,
    service_apply_ms: Vec<f64>,
    /// API write → applied (the discovery batches events for 100 ms first).
    api_ms: Vec<f64>,
    rr_quiet: Vec<super::report::Trial>,
    rr_churn: Vec<super::report::Trial>,
}

/// Seconds since midnight of an RFC 3339 timestamp at the start of a log line.
fn line_time(line: &str) -> Option<f64> {
    let t = line.split_whitespace().next()?;
    let clock = t.split('T').nth(1)?.trim_end_matches('Z');
    let mut parts = clock.split(':');
    let (h, m, s) = (parts.next()?, parts.next()?, parts.next()?);
    Some(h.parse::<f64>().ok()? * 3600.0 + m.parse::<f64>().ok()? * 60.0 + s.parse::<f64>().ok()?)
}

impl Setup<'_> {
    /// One agent on a cluster of `n` pods: start, changes, request/response.
    fn once(&self, kubeconfig: &Path, bpffs: &Path, api: &FakeApi, n: usize) -> Result<Outcome> {
        let (tb, agent, ca, changes) = (self.tb, self.agent, self.ca, self.changes);
        let place = &tb.node(1).place;
        let args = [
            "node",
            "--kubeconfig",
            kubeconfig.to_str().context("path")?,
            "--node-name",
            "node1",
            "--ca-dir",
            ca.to_str().context("path")?,
            "--uplink",
            &tb.node(1).uplink,
            "--bpffs-dir",
            bpffs.to_str().context("path")?,
        ];
        let Started {
            p,
            ready,
            rss,
            rss_settled,
        } = start_agent(place, agent, &args)?;
        let mut timed = TimedChanges::new(place)?;
        for i in 0..changes {
            let pick = (i * 7919) % n;
            let pod_change = i % 2 == 0;
            timed.make(place, pod_change, || {
                if pod_change {
                    api.apply(pod(pick, &format!("c{i}")));
                } else {
                    // One more endpoint (an address outside the pods'), as a scale-up adds.
                    let extra = Ipv4Addr::new(10, 250, 0, u8::try_from(i % 250).expect("small"));
                    api.apply(slice(pick / 10, n, Some(extra)));
                }
                Ok(())
            })?;
        }
        let (mut rr_quiet, mut rr_churn) = (Vec::new(), Vec::new());
        for round in 0..RR_TRIALS {
            rr_quiet.push(self.rr()?);
            let (rr, made) = self.rr_during_churn(api, n, round)?;
            println!(
                "    churn trial {}: {made} pod changes in {RR_SECS} s",
                round + 1
            );
            rr_churn.push(rr);
        }
        let log = stop_agent(p, agent, bpffs)?;
        let last_list = log
            .lines()
            .filter(|l| l.contains(" listed"))
            .filter_map(line_time)
            .fold(f64::NAN, f64::max);
        let ready_at = log
            .lines()
            .find(|l| l.contains("node agent ready"))
            .and_then(line_time)
            .context("no `node agent ready` line in the agent's log")?;
        // Whole builds: the first, and any later (each costs in proportion to the cluster).
        for l in log.lines().filter(|l| l.contains("built whole")) {
            println!("    {}", l.trim());
        }
        let (pod_apply_ms, service_apply_ms) = timed.apply_times(&log)?;
        let api_ms = timed.e2e_ms;
        Ok(Outcome {
            ready,
            after_list: ready_at - last_list,
            rss,
            rss_settled,
            pod_apply_ms,
            service_apply_ms,
            api_ms,
            rr_quiet,
            rr_churn,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_times_are_read() {
        let t = line_time("2026-12-02T13:00:01.250000Z  INFO mesh_agent: listed").unwrap();
        assert!((t - (13.0 * 3600.0 + 1.25)).abs() < 1e-9);
    }

    #[test]
    fn a_slice_lists_its_services_pods() {
        let s = slice(2, 25, None);
        assert_eq!(s["endpoints"].as_array().unwrap().len(), 5);
        assert_eq!(s["metadata"]["labels"]["kubernetes.io/service-name"], "s2");
    }
}
