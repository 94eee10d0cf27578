//! The demo's L7 act, modelled on Istio's traffic-management tutorial: a three-version
//! `reviews` service (plus a broken pod) behind a `mesh-agent waypoint`, a client pod sending
//! real curl requests, and one VirtualService / DestinationRule change per step — all to v1,
//! an 80/20 shift, a header route for `end-user: jason`, an injected delay, an injected 500,
//! a timeout, retries recovering from the broken pod, a circuit breaker tripping under h2load,
//! and mirroring seen in the mirror's log. Every step checks its outcome.
use std::{path::Path, time::Duration};

use anyhow::{Context as _, Result, ensure};
use mesh_testbed::{Background, Pod, Testbed, http::curl};

use crate::demo::step;

/// Roles of the pods the act adds (index ≥ 4 on their node): `(node, index)`, name, labels.
pub const ROLES: [((usize, usize), &str, &str); 5] = [
    (
        (1, 4),
        "waypoint",
        "gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none",
    ),
    ((1, 5), "reviews-v3", "app: reviews, version: v3"),
    (
        (2, 4),
        "reviews-v1",
        "app: reviews, version: v1, pool: retry",
    ),
    ((2, 5), "reviews-v2", "app: reviews, version: v2"),
    (
        (2, 6),
        "reviews-broken",
        "app: reviews, version: broken, pool: retry",
    ),
];

/// The `reviews` Service's address.
pub const VIP: &str = "10.96.0.20";

/// The role of pod `(node, index)`, if the act gives it one.
pub fn role(pod: (usize, usize)) -> Option<(&'static str, &'static str)> {
    ROLES
        .iter()
        .find(|(id, _, _)| *id == pod)
        .map(|(_, name, labels)| (*name, *labels))
}

/// The Service and the waypoint's Gateway (every node's config has them).
pub fn config_tail() -> String {
    format!(
        "services:\n  - {{name: reviews, namespace: demo, vips: [{VIP}], selector: {{app: reviews}}, labels: {{istio.io/use-waypoint: waypoint}}, ports: [{{name: http, port: 9080, targetPort: 8080}}]}}\npolicies:\n  - apiVersion: gateway.networking.k8s.io/v1\n    kind: Gateway\n    metadata: {{name: waypoint, namespace: demo}}\n    spec: {{gatewayClassName: mesh-waypoint, listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]}}\n  - apiVersion: networking.istio.io/v1\n    kind: DestinationRule\n    metadata: {{name: reviews, namespace: demo}}\n    spec:\n      host: reviews\n      subsets:\n        - {{name: v1, labels: {{version: v1}}}}\n        - {{name: v2, labels: {{version: v2}}}}\n        - {{name: v3, labels: {{version: v3}}}}\n        - {{name: retry, labels: {{pool: retry}}}}\n        - name: guarded\n          labels: {{version: v1}}\n          trafficPolicy: {{connectionPool: {{tcp: {{maxConnections: 1}}, http: {{http1MaxPendingRequests: 1, http2MaxRequests: 1}}}}}}\n"
    )
}

/// A VirtualService for `reviews` with these `http` rules (YAML list items, indented 6).
fn virtual_service(rules: &str) -> String {
    format!(
        "  - apiVersion: networking.istio.io/v1\n    kind: VirtualService\n    metadata: {{name: reviews, namespace: demo}}\n    spec:\n      hosts: [reviews]\n      http:\n{rules}"
    )
}

struct Act<'a> {
    client: &'a Pod,
    /// The waypoint's config: node 1's config plus the current VirtualService.
    config: std::path::PathBuf,
    base: String,
}

impl Act<'_> {
    /// Applies a VirtualService (as `kubectl apply` would) and gives the waypoint a moment.
    fn apply(&self, what: &str, rules: &str) -> Result<()> {
        println!("  $ apply VirtualService reviews: {what}");
        std::fs::write(
            &self.config,
            format!("{}{}", self.base, virtual_service(rules)),
        )?;
        std::thread::sleep(Duration::from_millis(400));
        Ok(())
    }

    /// `curl` through the VIP: (status, who answered, seconds).
    fn curl(&self, path: &str, extra: &[&str]) -> Result<(u16, String, f64)> {
        let a = curl(self.client, &format!("http://{VIP}:9080{path}"), extra)?;
        Ok((a.status, a.served_by().to_owned(), a.secs))
    }

    /// `n` requests: how many each answer (`<who> <status>`) got.
    fn tally(&self, n: usize, path: &str, extra: &[&str]) -> Result<Vec<(String, usize)>> {
        let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
        for _ in 0..n {
            let (status, who, _) = self.curl(path, extra)?;
            let key = if status == 200 {
                who
            } else {
                format!("HTTP {status}")
            };
            *counts.entry(key).or_default() += 1;
        }
        let v: Vec<(String, usize)> = counts.into_iter().collect();
        println!(
            "    {n} × curl http://{VIP}:9080{path} {} → {}",
            extra.join(" "),
            v.iter()
                .map(|(k, c)| format!("{k}: {c}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok(v)
    }
}

fn count(v: &[(String, usize)], key: &str) -> usize {
    v.iter().find(|(k, _)| k == key).map_or(0, |(_, c)| *c)
}

/// Starts `mesh-agent waypoint` for `gateway` (`namespace/name`) in `pod` with `config`, and
/// waits until it serves HBONE (the demo and the benchmark run it the same way).
pub fn spawn_waypoint(pod: &Pod, agent: &Path, config: &Path, gateway: &str) -> Result<Background> {
    let mut waypoint = pod.place.spawn(
        agent.to_str().context("path")?,
        &[
            "waypoint",
            "--config",
            config.to_str().context("path")?,
            "--gateway",
            gateway,
            "--reload-interval-ms",
            "100",
        ],
    )?;
    waypoint
        .wait_listening(15008, Duration::from_secs(20))
        .context("the waypoint")?;
    Ok(waypoint)
}

/// Runs the act; `node1_config` is node 1's agent config (the waypoint starts from it).
pub fn run(
    tb: &Testbed,
    agent: &Path,
    probe: &Path,
    work: &Path,
    node1_config: &str,
) -> Result<()> {
    step("L7: reviews v1/v2/v3 behind a waypoint (the traffic-management tutorial)");
    let mut apps: Vec<(&str, Background)> = Vec::new();
    for ((n, i), name, _) in ROLES.iter().filter(|r| r.1 != "waypoint") {
        let mut args = vec!["http-app", "8080", name];
        if *name == "reviews-broken" {
            args.push("fail");
        }
        let mut p = tb
            .pod(*n, *i)
            .place
            .spawn(probe.to_str().context("path")?, &args)?;
        p.wait_listening(8080, Duration::from_secs(10))?;
        apps.push((name, p));
    }
    let base = node1_config.to_owned();
    let act = Act {
        client: tb.pod(1, 1),
        config: work.join("waypoint.yaml"),
        base,
    };
    act.apply(
        "all to v1",
        "        - route: [{destination: {host: reviews, subset: v1}}]\n",
    )?;
    let waypoint = spawn_waypoint(tb.pod(1, 4), agent, &act.config, "demo/waypoint")?;
    println!(
        "  waypoint up in node1-pod4 (HBONE 15008); Service reviews carries istio.io/use-waypoint=waypoint"
    );

    let v = act.tally(10, "/", &[])?;
    ensure!(count(&v, "reviews-v1") == 10, "all to v1: {v:?}");

    act.apply(
        "80% v1, 20% v2",
        "        - route:\n            - {destination: {host: reviews, subset: v1}, weight: 80}\n            - {destination: {host: reviews, subset: v2}, weight: 20}\n",
    )?;
    let v = act.tally(100, "/", &[])?;
    let v1 = count(&v, "reviews-v1");
    ensure!(
        (66..=94).contains(&v1) && v1 + count(&v, "reviews-v2") == 100,
        "80/20: {v:?}"
    );

    act.apply(
        "end-user jason to v3, the rest to v1",
        "        - match: [{headers: {end-user: {exact: jason}}}]\n          route: [{destination: {host: reviews, subset: v3}}]\n        - route: [{destination: {host: reviews, subset: v1}}]\n",
    )?;
    let v = act.tally(5, "/", &["-H", "end-user: jason"])?;
    ensure!(count(&v, "reviews-v3") == 5, "jason: {v:?}");
    let v = act.tally(5, "/", &[])?;
    ensure!(count(&v, "reviews-v1") == 5, "others: {v:?}");

    act.apply(
        "a 2 s delay for everyone",
        "        - fault: {delay: {fixedDelay: 2s, percentage: {value: 100}}}\n          route: [{destination: {host: reviews, subset: v1}}]\n",
    )?;
    let (status, who, secs) = act.curl("/", &[])?;
    println!("    curl → HTTP {status} from {who} after {secs:.2} s");
    ensure!(status == 200 && secs >= 2.0, "delay: {status} after {secs}");

    act.apply(
        "HTTP 500 to half the requests",
        "        - fault: {abort: {httpStatus: 500, percentage: {value: 50}}}\n          route: [{destination: {host: reviews, subset: v1}}]\n",
    )?;
    let v = act.tally(40, "/", &[])?;
    let aborted = count(&v, "HTTP 500");
    ensure!((8..=32).contains(&aborted), "abort: {v:?}");

    act.apply(
        "a 0.5 s timeout in front of a 2 s answer",
        "        - timeout: 0.5s\n          rewrite: {uri: /delay/2000}\n          route: [{destination: {host: reviews, subset: v1}}]\n",
    )?;
    let (status, _, secs) = act.curl("/", &[])?;
    println!("    curl → HTTP {status} after {secs:.2} s");
    ensure!(
        status == 504 && secs < 1.5,
        "timeout: {status} after {secs}"
    );

    act.apply(
        "subset `retry` (v1 and a broken pod), no retries",
        "        - retries: {attempts: 0}\n          route: [{destination: {host: reviews, subset: retry}}]\n",
    )?;
    let v = act.tally(10, "/", &[])?;
    ensure!(count(&v, "HTTP 503") >= 3, "the broken pod: {v:?}");
    act.apply(
        "the same with retries: {attempts: 3, retryOn: 5xx}",
        "        - retries: {attempts: 3, retryOn: 5xx}\n          route: [{destination: {host: reviews, subset: retry}}]\n",
    )?;
    let v = act.tally(10, "/", &[])?;
    ensure!(count(&v, "reviews-v1") == 10, "retries: {v:?}");

    act.apply(
        "subset `guarded`: 1 connection, 1 pending request (circuit breaker); 200 ms answers",
        "        - rewrite: {uri: /delay/200}\n          route: [{destination: {host: reviews, subset: guarded}}]\n",
    )?;
    let out = act.client.place.output(
        "h2load",
        &[
            "-n",
            "60",
            "-c",
            "6",
            "-m",
            "1",
            &format!("http://{VIP}:9080/"),
        ],
    )?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let codes = text
        .lines()
        .find(|l| l.starts_with("status codes:"))
        .with_context(|| format!("h2load said: {text}"))?;
    println!("    h2load -n 60 -c 6 → {codes}");
    ensure!(
        !codes.contains(" 0 5xx") && !codes.starts_with("status codes: 0 2xx"),
        "the breaker should both serve and overflow: {codes}"
    );

    act.apply(
        "v1, mirrored to v3",
        "        - route: [{destination: {host: reviews, subset: v1}}]\n          mirror: {host: reviews, subset: v3}\n          mirrorPercentage: {value: 100}\n",
    )?;
    let v = act.tally(3, "/mirrored", &[])?;
    ensure!(count(&v, "reviews-v1") == 3, "mirror: {v:?}");
    std::thread::sleep(Duration::from_millis(300));

    step("L7: the waypoint's view (istio_requests_total, reporter=waypoint) and the mirror's log");
    let metrics = tb
        .pod(1, 4)
        .place
        .run("curl", &["-s", "http://127.0.0.1:15020/metrics"])?;
    let mut rows: Vec<String> = metrics
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .map(|l| {
            let pick = |k: &str| {
                l.split(&format!("{k}=\""))
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                    .unwrap_or("?")
                    .to_owned()
            };
            format!(
                "{:<16} code {:<4} flags {:<4} {:>5}",
                pick("destination_workload"),
                pick("response_code"),
                pick("response_flags"),
                l.rsplit(' ').next().unwrap_or("?")
            )
        })
        .collect();
    rows.sort();
    for r in &rows {
        println!("    {r}");
    }
    for flag in ["DI", "FI", "UT", "UO"] {
        ensure!(
            rows.iter().any(|r| r.contains(&format!("flags {flag}"))),
            "no request with flag {flag} in the waypoint's metrics"
        );
    }
    let _ = waypoint.kill();
    let mut mirrored = 0;
    for (name, p) in apps {
        let log =
            String::from_utf8_lossy(&p.terminate(Duration::from_secs(5))?.stdout).into_owned();
        if name == "reviews-v3" {
            for l in log.lines().filter(|l| l.contains("/mirrored")) {
                println!("    reviews-v3 log: {l}");
                mirrored += 1;
            }
        }
    }
    ensure!(mirrored == 3, "the mirror saw {mirrored} copies, not 3");
    println!(
        "  ✓ routing, shifting, faults, timeouts, retries, circuit breaking and mirroring through the waypoint"
    );
    Ok(())
}
