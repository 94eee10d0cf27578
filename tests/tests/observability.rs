//! Metrics, access logs and the admin API end to end: a known number of connections and bytes
//! through the mesh must show up exactly in both agents' Istio TCP metrics (cross-node, same
//! node, denied), the exposition must parse, the admin API must answer on the node's localhost
//! and be out of reach of pods.
//!
//! Topology: two nodes with three pods each; pods 1 and 2 are enrolled (namespace `mesh`,
//! service account `sa-<pod>`, label `slot: "<index>"`), pod 3 is not.
mod support;

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use mesh_testbed::metrics::{scrape, value};
use mesh_testbed::{Pod, Testbed, TestbedSpec, can_run, http::http_get};
use support::{Agent, PodId, TempDir, pods};

const SPEC: TestbedSpec = TestbedSpec {
    nodes: 2,
    pods_per_node: 3,
};
const ENROLLED: [PodId; 4] = [(1, 1), (1, 2), (2, 1), (2, 2)];
/// Allowed everywhere.
const OPEN_PORT: u16 = 7200;
/// Denied from node1-pod1 to every `slot: "2"` pod by the test's DENY policy.
const DENIED_PORT: u16 = 7100;

/// A server in `pod`'s namespace on `port`: reads until EOF (n bytes), answers 2n+7 bytes, closes.
fn serve(pod: &Pod, port: u16) {
    let listener = pod
        .place
        .in_netns(move || std::net::TcpListener::bind(("::", port)))
        .unwrap()
        .unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut got = Vec::new();
                if s.read_to_end(&mut got).is_ok() {
                    let _ = s.write_all(&vec![b'r'; 2 * got.len() + 7]);
                }
            });
        }
    });
}

/// One connection from `from` to `to`:`port` sending `bytes`; the answer's length, or the error.
fn exchange(from: &Pod, to: &Pod, port: u16, bytes: usize) -> std::io::Result<usize> {
    let dst = SocketAddr::new(to.ipv4.into(), port);
    from.place
        .in_netns(move || -> std::io::Result<usize> {
            let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(&vec![b'q'; bytes])?;
            s.shutdown(std::net::Shutdown::Write)?;
            let mut answer = Vec::new();
            s.read_to_end(&mut answer)?;
            Ok(answer.len())
        })
        .unwrap()
}

fn principal(pod: &Pod) -> String {
    format!("spiffe://cluster.local/ns/mesh/sa/sa-{}", pod.name())
}

/// What one kind of connection must have produced on one agent.
struct Expect<'a> {
    node: usize,
    reporter: &'a str,
    from: &'a Pod,
    to: &'a Pod,
    security: &'a str,
    opened: f64,
    request: f64,
    response: f64,
    denied: f64,
}

fn labels<'a>(e: &'a Expect<'a>, src_p: &'a str, dst_p: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("reporter", e.reporter),
        ("source_workload", e.from.name()),
        ("source_workload_namespace", "mesh"),
        ("source_principal", src_p),
        ("destination_workload", e.to.name()),
        ("destination_workload_namespace", "mesh"),
        ("destination_principal", dst_p),
        ("request_protocol", "tcp"),
    ]
}

/// Checks one expectation; `Err` with what differs (the caller retries until the agents have
/// recorded every close).
fn check(tb: &Testbed, e: &Expect<'_>) -> Result<(), String> {
    let s = scrape(tb, e.node);
    let (sp, dp) = (principal(e.from), principal(e.to));
    let mut base = labels(e, &sp, &dp);
    base.push(("connection_security_policy", e.security));
    let mut ok_labels = base.clone();
    ok_labels.push(("response_flags", "-"));
    let mut deny_labels = base.clone();
    deny_labels.push(("response_flags", "DENY"));
    let got = [
        (
            "opened",
            value(&s, "istio_tcp_connections_opened", &ok_labels),
            e.opened,
        ),
        (
            "closed",
            value(&s, "istio_tcp_connections_closed", &ok_labels),
            e.opened,
        ),
        (
            "received bytes",
            value(&s, "istio_tcp_received_bytes", &ok_labels),
            e.request,
        ),
        (
            "sent bytes",
            value(&s, "istio_tcp_sent_bytes", &ok_labels),
            e.response,
        ),
        (
            "failed (DENY)",
            value(&s, "istio_tcp_connections_failed", &deny_labels),
            e.denied,
        ),
    ];
    let wrong: Vec<String> = got
        .iter()
        .filter(|(_, have, want)| have != want)
        .map(|(what, have, want)| format!("{what}: {have} (want {want})"))
        .collect();
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "node{} reporter={} {} -> {}: {}",
            e.node,
            e.reporter,
            e.from.name(),
            e.to.name(),
            wrong.join(", ")
        ))
    }
}

fn eventually(tb: &Testbed, expectations: &[Expect<'_>]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let problems: Vec<String> = expectations
            .iter()
            .filter_map(|e| check(tb, e).err())
            .collect();
        if problems.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never matched:\n{}",
            problems.join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn scraped_counters_match_the_traffic_exactly_and_the_admin_api_stays_on_the_node() {
    if !can_run("observability", &["ip"]) {
        return;
    }
    let tb = Testbed::build(SPEC).unwrap();
    let ca = TempDir::with_ca(&tb.info().run);
    let deny = format!(
        "  - {{apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {{name: no-7100, namespace: mesh}}, spec: {{selector: {{matchLabels: {{slot: \"2\"}}}}, action: DENY, rules: [{{from: [{{source: {{principals: [\"cluster.local/ns/mesh/sa/sa-{}\"]}}}}], to: [{{operation: {{ports: [\"{DENIED_PORT}\"]}}}}]}}]}}}}\n",
        tb.pod(1, 1).name()
    );
    let enrolled = pods(&ENROLLED);
    let agents: Vec<Agent> = (1..=2)
        .map(|n| Agent::start_with_policies(&tb, n, &enrolled, ca.path(), &deny).unwrap())
        .collect();
    let p = |n, i| tb.pod(n, i);
    for (n, i) in [(2, 1), (2, 2), (1, 2)] {
        serve(p(n, i), OPEN_PORT);
        serve(p(n, i), DENIED_PORT);
    }

    // Readiness, once certificates are fetched.
    for node in 1..=2 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (status, body) = http_get(
                &tb.node(node).place,
                "127.0.0.1:15021".parse().unwrap(),
                "GET",
                "/healthz/ready",
            )
            .unwrap();
            if status.contains("200") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node{node} never ready: {status} {body}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    // Traffic with known sizes: request i carries 1000 + 37 i bytes, its answer twice that + 7.
    let sizes: Vec<usize> = (0..12).map(|i| 1000 + 37 * i).collect();
    let request: usize = sizes.iter().sum();
    let response: usize = sizes.iter().map(|b| 2 * b + 7).sum();
    for &b in &sizes {
        // Cross-node, allowed (HBONE).
        assert_eq!(exchange(p(1, 1), p(2, 1), OPEN_PORT, b).unwrap(), 2 * b + 7);
        // Same node, allowed.
        assert_eq!(exchange(p(1, 1), p(1, 2), OPEN_PORT, b).unwrap(), 2 * b + 7);
    }
    let denied = 5;
    for _ in 0..denied {
        // Cross-node and same node, denied by the DENY policy: no answer.
        assert!(!matches!(exchange(p(1, 1), p(2, 2), DENIED_PORT, 10), Ok(n) if n > 0));
        assert!(!matches!(exchange(p(1, 1), p(1, 2), DENIED_PORT, 10), Ok(n) if n > 0));
    }
    let (n, req, resp, d) = (
        sizes.len() as f64,
        request as f64,
        response as f64,
        denied as f64,
    );
    eventually(
        &tb,
        &[
            // Cross-node: node1 as source, node2 as destination, both mutual TLS.
            Expect {
                node: 1,
                reporter: "source",
                from: p(1, 1),
                to: p(2, 1),
                security: "mutual_tls",
                opened: n,
                request: req,
                response: resp,
                denied: 0.0,
            },
            Expect {
                node: 2,
                reporter: "destination",
                from: p(1, 1),
                to: p(2, 1),
                security: "mutual_tls",
                opened: n,
                request: req,
                response: resp,
                denied: 0.0,
            },
            // Same node: node1 reports both ways; the hop never leaves the node (no TLS).
            Expect {
                node: 1,
                reporter: "source",
                from: p(1, 1),
                to: p(1, 2),
                security: "unknown",
                opened: n,
                request: req,
                response: resp,
                denied: d,
            },
            Expect {
                node: 1,
                reporter: "destination",
                from: p(1, 1),
                to: p(1, 2),
                security: "unknown",
                opened: n,
                request: req,
                response: resp,
                denied: d,
            },
            // Denied across nodes: the destination refuses (401), the source sees the denial.
            Expect {
                node: 2,
                reporter: "destination",
                from: p(1, 1),
                to: p(2, 2),
                security: "mutual_tls",
                opened: 0.0,
                request: 0.0,
                response: 0.0,
                denied: d,
            },
            Expect {
                node: 1,
                reporter: "source",
                from: p(1, 1),
                to: p(2, 2),
                security: "mutual_tls",
                opened: 0.0,
                request: 0.0,
                response: 0.0,
                denied: d,
            },
        ],
    );
    // Node metrics are there and plausible.
    let s1 = scrape(&tb, 1);
    assert_eq!(value(&s1, "mesh_enrolled_pods", &[]), 2.0);
    assert!(
        value(&s1, "mesh_ebpf_events", &[("reason", "captured_outbound")]) >= 2.0 * n + 2.0 * d
    );
    assert!(
        value(
            &s1,
            "mesh_policy_decisions",
            &[("decision", "deny"), ("policy", "mesh/no-7100")]
        ) >= d
    );
    assert!(
        value(
            &s1,
            "mesh_certificate_expiry_seconds",
            &[("identity", &principal(p(1, 1)))]
        ) > 3600.0
    );
    assert_eq!(
        value(&s1, "istio_build", &[("component", "mesh-agent")]),
        1.0
    );
    assert!(value(&s1, "process_resident_memory_bytes", &[]) > 1e6);
    assert!(value(&s1, "mesh_bpf_map_capacity", &[("map", "MESH_FLOWS")]) > 0.0);

    // Every metric the Grafana dashboard queries is one the agent declares.
    let (_, raw) = http_get(
        &tb.node(1).place,
        "127.0.0.1:15020".parse().unwrap(),
        "GET",
        "/metrics",
    )
    .unwrap();
    let mut declared = std::collections::BTreeSet::new();
    for l in raw.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let mut it = l.split(' ');
        let (name, kind) = (it.next().unwrap_or(""), it.next().unwrap_or(""));
        declared.insert(name.to_owned());
        if kind == "counter" {
            declared.insert(format!("{name}_total"));
        }
    }
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../deploy/grafana/mesh-agent-node.json"),
        )
        .unwrap(),
    )
    .unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for token in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if ["istio_", "mesh_", "process_"]
                    .iter()
                    .any(|p| token.starts_with(p))
                {
                    assert!(
                        declared.contains(token),
                        "dashboard panel {:?} queries {token}, which the agent does not export",
                        panel["title"]
                    );
                }
            }
        }
    }

    // The admin API answers on the node's loopback ...
    let admin: SocketAddr = "127.0.0.1:15000".parse().unwrap();
    let node1 = &tb.node(1).place;
    let (status, dump) = http_get(node1, admin, "GET", "/config_dump").unwrap();
    assert!(status.contains("200"), "{status}");
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    let enrolled_pods: Vec<&str> = dump["enrolled"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["pod"].as_str().unwrap())
        .collect();
    assert_eq!(enrolled_pods.len(), 2, "{dump}");
    assert_eq!(dump["policies"]["authorizationPolicies"], 1);
    // How it runs: threads chosen by the cores (no --worker-threads), splicing as launched.
    let runtime = &dump["runtime"];
    assert!(
        runtime["workerThreads"].as_u64() >= Some(1)
            && runtime["workerThreadsReason"]
                .as_str()
                .is_some_and(|r| r.starts_with("auto: ")),
        "{runtime}"
    );
    let splice_word = if support::spliced() { "on: " } else { "off: " };
    assert!(
        runtime["splice"]
            .as_str()
            .is_some_and(|s| s.starts_with(splice_word)),
        "{runtime}"
    );
    let (_, certs) = http_get(node1, admin, "GET", "/certs").unwrap();
    assert!(certs.contains(&principal(p(1, 1))), "{certs}");
    let (status, body) = http_get(node1, admin, "POST", "/logging?level=debug").unwrap();
    assert!(
        status.contains("200") && body.contains("debug"),
        "{status} {body}"
    );
    let (_, body) = http_get(node1, admin, "GET", "/logging").unwrap();
    assert!(body.contains("debug"), "{body}");
    let (status, _) = http_get(node1, admin, "POST", "/logging?level=nonsense=[").unwrap();
    assert!(status.contains("400"), "a bad filter is refused: {status}");
    http_get(node1, admin, "POST", "/logging?level=info").unwrap();
    let (status, ebpf) = http_get(node1, admin, "GET", "/debug/ebpf").unwrap();
    assert!(
        status.contains("200") && ebpf.contains("mesh_tc_from_pod"),
        "{status}"
    );

    // The operator commands read the same endpoints.
    let bin = mesh_testbed::binaries::mesh_agent().unwrap();
    let status = node1.run(bin.to_str().unwrap(), &["status"]).unwrap();
    assert!(
        status.contains("READY")
            && status.contains(&format!("mesh/{}", p(1, 1).name()))
            && status.contains(&principal(p(1, 2)))
            && status.contains("worker threads ")
            && status.contains(&format!("splicing {splice_word}")),
        "{status}"
    );
    let top = node1
        .run(bin.to_str().unwrap(), &["metrics", "--top", "3"])
        .unwrap();
    assert!(
        top.contains(&format!("mesh/{}", p(2, 1).name())) && top.contains("enrolled pods"),
        "{top}"
    );

    // ... and nowhere a pod can reach, enrolled or not, by any of the node's addresses; while
    // the metrics port on the same addresses answers (the path itself works).
    let node = tb.node(1);
    for pod in [p(1, 1), p(1, 3)] {
        for ip in [
            std::net::IpAddr::from(node.ipv4),
            node.ipv6.into(),
            "169.254.1.1".parse().unwrap(),
        ] {
            let got = http_get(
                &pod.place,
                SocketAddr::new(ip, 15000),
                "GET",
                "/config_dump",
            );
            assert!(
                !matches!(&got, Ok((status, _)) if status.starts_with("HTTP/1")),
                "{} reached the admin API at {ip}: {got:?}",
                pod.name()
            );
        }
    }
    let (status, _) = http_get(
        &p(1, 3).place,
        SocketAddr::new(node.ipv4.into(), 15020),
        "GET",
        "/metrics",
    )
    .unwrap();
    assert!(status.contains("200"), "metrics from a pod: {status}");

    // The access log has one line per connection with identities and bytes.
    let mut agents = agents;
    let logs: Vec<String> = agents.iter_mut().map(|a| a.stop().unwrap()).collect();
    let complete = logs[0]
        .lines()
        .filter(|l| l.contains("connection complete"))
        .count();
    assert!(
        complete as f64 >= 4.0 * n,
        "node1 access log: {complete} lines"
    );
    assert!(
        logs[1].lines().any(|l| l.contains("connection complete")
            && l.contains(&principal(p(1, 1)))
            && l.contains("bytes_recv")),
        "node2's access log names the peer identity"
    );
    drop(agents);
    drop(ca);
    tb.teardown_verified().unwrap();
}
