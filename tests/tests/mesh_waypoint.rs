//! The waypoint end to end: node agents send a bound service's (and a bound pod's) traffic to
//! a `mesh-agent waypoint` over HBONE; the waypoint applies VirtualService / DestinationRule
//! routing and reaches the chosen pod over HBONE with its own identity. Real clients (curl,
//! h2load, an HTTP/2 gRPC-shaped client, a WebSocket upgrade, the probe protocol for TCP).
//!
//! Topology (two nodes, four pods each; namespace `mesh` is ambient):
//! - node 1: (1,1) client, (1,2) the waypoint (not captured: `dataplane-mode: none`),
//!   (1,3) a broken `reviews` pod (answers 503), (1,4) reviews v3, (1,5) the waypoint's
//!   replacement in a rollout
//! - node 2: (2,1) reviews v1, (2,2) reviews v2, (2,3) ratings (the pod itself bound to the
//!   waypoint), (2,4) an outsider (namespace `plain`, not in the mesh), (2,5) unused
//!
//! Service `reviews` (ports http 9080, grpc 9081, tcp 7000) carries `istio.io/use-waypoint`.
mod support;

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use mesh_testbed::{
    Background, Pod, Testbed, TestbedSpec, binaries, can_run,
    http::{Answer, http_get},
    probe::{Probe, ProbeServer},
};
use support::{
    Agent, PodId, TempDir,
    http::{grpc_call, websocket_echo},
    pods,
    sniffer::Sniffer,
};

const SPEC: TestbedSpec = TestbedSpec {
    nodes: 2,
    pods_per_node: 5,
};
/// The waypoint's pod, and the one that replaces it in the rollout.
const WAYPOINT_POD: PodId = (1, 2);
const NEW_WAYPOINT_POD: PodId = (1, 5);
const REVIEWS_VIP: &str = "10.96.0.10";
const REVIEWS_VIP6: &str = "fd00:96::10";
const ENROLLED_NODE1: [PodId; 3] = [(1, 1), (1, 3), (1, 4)];
const ENROLLED_NODE2: [PodId; 3] = [(2, 1), (2, 2), (2, 3)];

#[path = "mesh_waypoint/objects.rs"]
mod objects;
use objects::*;
#[path = "mesh_waypoint/rollout.rs"]
mod rollout;
use rollout::waypoint_rollout;

struct Rig {
    tb: Testbed,
    ca: TempDir,
    agents: Vec<Agent>,
    waypoint_config: std::path::PathBuf,
    waypoint: Option<Background>,
    /// The waypoint's pods as the configs list them, and whether each is terminating.
    waypoint_pods: Vec<(PodId, bool)>,
    apps: Vec<(PodId, Background)>,
    _probes: Vec<ProbeServer>,
}

/// The config of `node` (the waypoint reads node 1's): `bound` says whether the Service and the
/// ratings pod carry their `istio.io/use-waypoint` labels; `waypoints` are the pods labelled as
/// the waypoint's, and whether each is terminating (deleted, draining).
fn config(
    tb: &Testbed,
    node: usize,
    ca: &Path,
    waypoints: &[(PodId, bool)],
    bound: bool,
    objects: &str,
) -> String {
    let bind = if bound {
        "istio.io/use-waypoint: waypoint"
    } else {
        "bound: \"no\""
    };
    let mut y = format!(
        "node: {{name: node{node}, uplinks: [{}]}}\nca: {{dir: {}}}\nnamespaces:\n  - name: mesh\n    labels: {{istio.io/dataplane-mode: ambient}}\n  - name: plain\n",
        tb.node(node).uplink,
        ca.display()
    );
    y += &format!(
        "services:\n  - {{name: reviews, namespace: mesh, vips: [{REVIEWS_VIP}, \"{REVIEWS_VIP6}\"], labels: {{{bind}}}, selector: {{app: reviews}}, ports: [{{name: http, port: 9080, targetPort: 8080}}, {{name: grpc, port: 9081, targetPort: 8080}}, {{name: tcp-probe, port: 7000, targetPort: 9090}}]}}\n  - {{name: ratings, namespace: mesh, vips: [10.96.0.11], selector: {{app: ratings}}, ports: [{{name: http, port: 9080, targetPort: 8080}}]}}\n  - {{name: reviews-v2, namespace: mesh, vips: [10.96.0.12], selector: {{app: reviews, version: v2}}, ports: [{{name: http, port: 9080, targetPort: 8080}}]}}\nworkloads:\n"
    );
    let waypoint_roles = waypoints.iter().map(|&(id, _)| {
        (
            id,
            "mesh",
            "waypoint",
            "gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none"
                .to_owned(),
        )
    });
    let roles = [
        ((1, 1), "mesh", "sa-client", "app: productpage".into()),
        (
            (1, 3),
            "mesh",
            "sa-reviews",
            "app: reviews, version: v-broken, pool: retry".into(),
        ),
        (
            (1, 4),
            "mesh",
            "sa-reviews",
            "app: reviews, version: v3".into(),
        ),
        (
            (2, 1),
            "mesh",
            "sa-reviews",
            "app: reviews, version: v1, pool: retry".into(),
        ),
        (
            (2, 2),
            "mesh",
            "sa-reviews",
            "app: reviews, version: v2".into(),
        ),
        (
            (2, 3),
            "mesh",
            "sa-ratings",
            format!("app: ratings, {bind}"),
        ),
        ((2, 4), "plain", "default", "app: outsider".into()),
    ];
    for ((n, i), ns, sa, labels) in roles.into_iter().chain(waypoint_roles) {
        let pod = tb.pod(n, i);
        let terminating = waypoints.contains(&((n, i), true));
        y += &format!(
            "  - {{name: {}, namespace: {ns}, serviceAccount: {sa}, node: node{n}, ips: [{}, \"{}\"], hostInterface: {}, terminating: {terminating}, labels: {{{labels}}}}}\n",
            pod.name(),
            pod.ipv4,
            pod.ipv6,
            pod.host_veth,
        );
    }
    y + "policies:\n" + GATEWAY + DESTINATION_RULE + objects
}

impl Rig {
    fn start() -> Self {
        let tb = Testbed::build(SPEC).unwrap();
        let ca = TempDir::with_ca(&tb.info().run);
        let agents = [(1, &ENROLLED_NODE1[..]), (2, &ENROLLED_NODE2[..])]
            .into_iter()
            .map(|(n, enrolled)| {
                let yaml = config(&tb, n, ca.path(), &[(WAYPOINT_POD, false)], true, "");
                Agent::start_with_config(&tb, n, "mesh", &pods(enrolled), Some(ca.path()), &yaml)
                    .unwrap()
            })
            .collect();
        let waypoint_config =
            std::env::temp_dir().join(format!("mesh-e2e-{}-waypoint.yaml", tb.info().run));
        std::fs::write(
            &waypoint_config,
            config(&tb, 1, ca.path(), &[(WAYPOINT_POD, false)], true, ALL_TO_V1),
        )
        .unwrap();
        let probe = binaries::mtb_probe().unwrap();
        let probe = probe.to_str().unwrap();
        let apps = [
            ((1, 3), "reviews-broken", true),
            ((1, 4), "reviews-v3", false),
            ((2, 1), "reviews-v1", false),
            ((2, 2), "reviews-v2", false),
            ((2, 3), "ratings", false),
        ]
        .into_iter()
        .map(|((n, i), name, fail)| {
            let mut args = vec!["http-app", "8080", name];
            if fail {
                args.push("fail");
            }
            let mut p = tb.pod(n, i).place.spawn(probe, &args).unwrap();
            p.wait_listening(8080, Duration::from_secs(10)).unwrap();
            ((n, i), p)
        })
        .collect();
        let probes = [(2, 1), (2, 2), (1, 3), (1, 4)]
            .into_iter()
            .map(|(n, i)| ProbeServer::start(&tb.pod(n, i).place, &[9090]).unwrap())
            .collect();
        let mut rig = Rig {
            tb,
            ca,
            agents,
            waypoint_config,
            waypoint: None,
            waypoint_pods: vec![(WAYPOINT_POD, false)],
            apps,
            _probes: probes,
        };
        rig.waypoint = Some(rig.start_waypoint(WAYPOINT_POD));
        rig
    }

    /// A waypoint process in pod `id` (which the config must list as one), listening.
    fn start_waypoint(&self, (n, i): PodId) -> Background {
        let bin = binaries::mesh_agent().unwrap();
        let pod = self.tb.pod(n, i);
        let mut p = pod
            .place
            .spawn(
                bin.to_str().unwrap(),
                &[
                    "waypoint",
                    "--config",
                    self.waypoint_config.to_str().unwrap(),
                    "--gateway",
                    "mesh/waypoint",
                    "--pod",
                    pod.name(),
                    "--reload-interval-ms",
                    "100",
                    "--drain-accept-seconds",
                    "1",
                ],
            )
            .unwrap();
        if let Err(e) = p.wait_listening(15008, Duration::from_secs(20)) {
            let out = p.kill().unwrap();
            panic!("{e:#}\nwaypoint: {}", String::from_utf8_lossy(&out.stderr));
        }
        p
    }

    /// Node `node`'s config with the waypoint pods of the moment.
    fn config(&self, node: usize, bound: bool, objects: &str) -> String {
        config(
            &self.tb,
            node,
            self.ca.path(),
            &self.waypoint_pods,
            bound,
            objects,
        )
    }

    /// New routing objects for the waypoint; waits until it serves them (`probe` answers
    /// `want`).
    fn set_routes(&self, objects: &str, check: impl Fn() -> bool) {
        std::fs::write(&self.waypoint_config, self.config(1, true, objects)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !check() {
            assert!(
                Instant::now() < deadline,
                "the waypoint did not take the new routes"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn pod(&self, n: usize, i: usize) -> &Pod {
        self.tb.pod(n, i)
    }

    /// Stops everything; returns the waypoint's log and each app's stdout.
    fn finish(mut self) -> (String, Vec<(PodId, String)>) {
        let wp = self
            .waypoint
            .take()
            .map(|w| {
                String::from_utf8_lossy(&w.terminate(Duration::from_secs(5)).unwrap().stderr)
                    .into_owned()
            })
            .unwrap_or_default();
        let apps = std::mem::take(&mut self.apps)
            .into_iter()
            .map(|(id, p)| {
                let out = p.terminate(Duration::from_secs(5)).unwrap();
                (id, String::from_utf8_lossy(&out.stdout).into_owned())
            })
            .collect();
        for a in &mut self.agents {
            a.stop().unwrap();
        }
        let _ = std::fs::remove_file(&self.waypoint_config);
        drop(self._probes);
        drop(self.ca);
        self.tb.teardown_verified().unwrap();
        (wp, apps)
    }
}

/// curl from `pod` (see [`mesh_testbed::http::curl`]).
fn curl(pod: &Pod, url: &str, extra: &[&str]) -> Answer {
    mesh_testbed::http::curl(pod, url, extra).unwrap()
}

fn reviews(path: &str) -> String {
    format!("http://{REVIEWS_VIP}:9080{path}")
}

/// The waypoint's request counter for `labels`.
fn waypoint_requests(tb: &Testbed, labels: &[(&str, &str)]) -> f64 {
    let (status, body) = http_get(
        &tb.pod(1, 2).place,
        "127.0.0.1:15020".parse().unwrap(),
        "GET",
        "/metrics",
    )
    .unwrap();
    assert!(status.contains("200"), "waypoint /metrics: {status}");
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).unwrap();
    mesh_testbed::metrics::sum(&scrape, "istio_requests", labels)
}

#[test]
fn waypoint_routes_shifts_faults_retries_breaks_mirrors_and_is_never_bypassed() {
    if !can_run("waypoint", &["ip", "curl", "h2load", "tcpdump"]) {
        return;
    }
    let mut rig = Rig::start();
    let client_pod = rig.pod(1, 1).clone();
    let client = &client_pod;
    let waypoint_ip = rig.pod(WAYPOINT_POD.0, WAYPOINT_POD.1).ipv4;
    // Sniffers: the LAN between the nodes and the waypoint pod's own link.
    let sniff_fabric = Sniffer::start(&rig.tb.info().fabric, "br0");
    let sniff_waypoint = Sniffer::start(&rig.pod(1, 2).place, "any");

    // 1. All to v1, over IPv4 and IPv6; the server sees the waypoint as its client.
    for _ in 0..10 {
        let a = curl(client, &reviews("/"), &[]);
        assert_eq!(a.status, 200, "{a:?}");
        assert_eq!(a.served_by(), "reviews-v1", "{a:?}");
        assert!(a.body.contains(&format!("saw {waypoint_ip}")), "{a:?}");
    }
    let a = curl(client, &format!("http://[{REVIEWS_VIP6}]:9080/"), &[]);
    assert_eq!((a.status, a.served_by()), (200, "reviews-v1"), "{a:?}");

    // 2. The feature set (a config change while serving).
    rig.set_routes(FEATURES, || {
        curl(client, &reviews("/"), &["-H", "end-user: jason"])
            .body
            .starts_with("reviews-v3")
    });
    // 80/20 canary over 100 requests (binomial: 80 ± 4; the bounds are ±3.5 σ).
    let mut v1 = 0;
    for _ in 0..100 {
        let a = curl(client, &reviews("/"), &[]);
        assert_eq!(a.status, 200, "{a:?}");
        match a.served_by() {
            "reviews-v1" => v1 += 1,
            "reviews-v2" => {}
            other => panic!("canary answered by {other}: {a:?}"),
        }
        assert!(
            a.body.contains("x-route: canary"),
            "request header set: {a:?}"
        );
        assert!(
            a.head.to_ascii_lowercase().contains("x-mesh: waypoint"),
            "{a:?}"
        );
    }
    assert!((66..=94).contains(&v1), "v1 got {v1} of 100 (want ~80)");
    // Header route.
    for _ in 0..5 {
        let a = curl(client, &reviews("/"), &["-H", "end-user: jason"]);
        assert_eq!((a.status, a.served_by()), (200, "reviews-v3"), "{a:?}");
    }
    // Injected delay.
    let a = curl(client, &reviews("/fault-delay"), &[]);
    assert_eq!(a.status, 200, "{a:?}");
    assert!(a.secs >= 1.0, "delayed {:.3} s", a.secs);
    // Injected abort to half.
    let aborted = (0..40)
        .filter(|_| {
            let a = curl(client, &reviews("/fault-abort"), &[]);
            assert!(a.status == 200 || a.status == 500, "{a:?}");
            a.status == 500
        })
        .count();
    assert!(
        (8..=32).contains(&aborted),
        "{aborted} of 40 aborted (want ~20)"
    );
    // Timeout: the upstream takes 2 s, the route allows 0.3 s.
    let a = curl(client, &reviews("/timeout"), &[]);
    assert_eq!(a.status, 504, "{a:?}");
    assert!(a.secs < 1.5, "timed out after {:.3} s", a.secs);
    // Retries: the subset holds a broken pod and v1; without retries some fail.
    let failed_without = (0..10)
        .filter(|_| curl(client, &reviews("/noretry"), &[]).status == 503)
        .count();
    assert!(
        failed_without >= 3,
        "the broken pod answered only {failed_without} of 10"
    );
    for _ in 0..20 {
        let a = curl(client, &reviews("/retry"), &[]);
        assert_eq!((a.status, a.served_by()), (200, "reviews-v1"), "{a:?}");
    }
    // Mirror: v1 answers, v3 gets a copy (checked in its log at the end).
    for _ in 0..3 {
        let a = curl(client, &reviews("/mirror"), &[]);
        assert_eq!((a.status, a.served_by()), (200, "reviews-v1"), "{a:?}");
    }
    // Circuit breaker: one connection, one pending request; 8 concurrent clients overflow.
    let out = client
        .place
        .output(
            "h2load",
            &["-n", "64", "-c", "8", "-m", "1", &reviews("/slow")],
        )
        .unwrap();
    let h2load = String::from_utf8_lossy(&out.stdout).into_owned();
    let codes = h2load
        .lines()
        .find(|l| l.starts_with("status codes:"))
        .unwrap_or_else(|| panic!("h2load: {h2load}"));
    let count = |what: &str| -> u64 {
        codes
            .split(',')
            .find(|p| p.contains(what))
            .and_then(|p| {
                p.split_whitespace()
                    .rev()
                    .nth(1)
                    .and_then(|n| n.parse().ok())
            })
            .unwrap_or(0)
    };
    assert!(count("2xx") > 0 && count("5xx") > 0, "{codes}");

    // 3. HTTP/2: h2c through curl, and a gRPC call with its trailers.
    let a = curl(
        client,
        &reviews("/"),
        &["--http2-prior-knowledge", "-H", "end-user: jason"],
    );
    assert_eq!((a.status, a.served_by()), (200, "reviews-v3"), "{a:?}");
    let vip_grpc = format!("{REVIEWS_VIP}:9081").parse().unwrap();
    let g = grpc_call(client, vip_grpc, "reviews:9081", "/reviews.Reviews/Get");
    assert_eq!(g.status, 200, "{g:?}");
    assert_eq!(
        g.grpc_status.as_deref(),
        Some("0"),
        "grpc-status trailer: {g:?}"
    );
    assert!(g.served_by.is_some_and(|s| s.starts_with("reviews-")));
    assert_eq!(g.headers["x-grpc-route"], "get", "the GRPCRoute applied");

    // 4. WebSocket upgrade passed through.
    let (head, echo) = websocket_echo(
        client,
        format!("{REVIEWS_VIP}:9080").parse().unwrap(),
        "reviews",
    );
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(echo, "ping-through-the-waypoint");

    // 5. A TCP port is carried as L4 through the waypoint, where its tcp[] route sends it
    //    (v3, every time).
    for _ in 0..3 {
        let hello = client
            .place
            .in_netns(|| {
                let mut p = Probe::connect_here(
                    format!("{REVIEWS_VIP}:7000").parse().unwrap(),
                    Duration::from_secs(5),
                )
                .unwrap();
                let hello = p.hello().unwrap();
                p.finish(1 << 20).unwrap();
                hello
            })
            .unwrap();
        let peer: SocketAddr = hello["peer"].as_str().unwrap().parse().unwrap();
        assert_eq!(
            peer.ip(),
            IpAddr::V4(waypoint_ip),
            "the TCP server sees the waypoint"
        );
        let local: SocketAddr = hello["local"].as_str().unwrap().parse().unwrap();
        assert_eq!(local.ip(), IpAddr::V4(rig.pod(1, 4).ipv4), "tcp[] → v3");
    }
    // A CORS preflight from an allowed origin is answered by the waypoint itself.
    let a = curl(
        client,
        &reviews("/"),
        &[
            "-X",
            "OPTIONS",
            "-H",
            "Origin: https://app.example",
            "-H",
            "Access-Control-Request-Method: GET",
        ],
    );
    assert_eq!(a.status, 200, "{a:?}");
    assert!(
        a.head
            .to_ascii_lowercase()
            .contains("access-control-allow-origin: https://app.example"),
        "{a:?}"
    );
    assert!(a.body.is_empty(), "not forwarded to the app: {a:?}");

    // 6. A pod bound to the waypoint itself (workload-addressed).
    let ratings = rig.pod(2, 3).ipv4;
    let a = curl(client, &format!("http://{ratings}:8080/"), &[]);
    assert_eq!((a.status, a.served_by()), (200, "ratings"), "{a:?}");
    assert!(a.body.contains(&format!("saw {waypoint_ip}")), "{a:?}");
    let a = curl(client, "http://10.96.0.11:9080/", &[]);
    assert_eq!((a.status, a.served_by()), (200, "ratings"), "{a:?}");

    // 7. The waypoint's telemetry.
    let principal = "spiffe://cluster.local/ns/mesh/sa/sa-client";
    let svc = "reviews.mesh.svc.cluster.local";
    let ok = waypoint_requests(
        &rig.tb,
        &[
            ("reporter", "waypoint"),
            ("destination_service", svc),
            ("source_principal", principal),
            ("response_code", "200"),
        ],
    );
    assert!(ok >= 100.0, "istio_requests_total 200s: {ok}");
    for flag in ["FI", "UT", "UO", "DI"] {
        let n = waypoint_requests(&rig.tb, &[("response_flags", flag)]);
        assert!(n > 0.0, "no request counted with flag {flag}");
    }

    // 8. No plaintext on the LAN or on the waypoint's link.
    for (what, s) in [("fabric", sniff_fabric), ("waypoint link", sniff_waypoint)] {
        let text = s.stop();
        for secret in ["x-route", "reviews-v1 saw", "end-user", "ping-through"] {
            assert!(
                !text.contains(secret),
                "{secret:?} in plaintext on the {what}"
            );
        }
    }

    // 9. The destination's policy sees the waypoint's identity: allowing only the client
    //    (not the waypoint) at reviews v1 refuses the waypoint's connection there.
    let only_client = "
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: only-client, namespace: mesh}
  spec:
    selector: {matchLabels: {version: v1}}
    action: ALLOW
    rules: [{from: [{source: {principals: [cluster.local/ns/mesh/sa/sa-client]}}]}]
";
    rig.agents[1]
        .rewrite_config(&rig.config(2, true, only_client))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let a = curl(client, &reviews("/mirror"), &[]);
        if a.status == 503 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "v1 still serves the waypoint: {a:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    rig.agents[1]
        .rewrite_config(&rig.config(2, true, ""))
        .unwrap();

    // 10. Bypass refusal: node 1's agent without the bindings sends straight to the pods; node
    //     2's agent refuses what should have come through the waypoint.
    rig.agents[0]
        .rewrite_config(&rig.config(1, false, ""))
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let before = mesh_testbed::metrics::sum(
        &mesh_testbed::metrics::scrape(&rig.tb, 2),
        "mesh_policy_decisions",
        &[("reason", "waypoint_bypassed")],
    );
    let a = curl(client, &format!("http://{ratings}:8080/"), &[]);
    assert_ne!(
        a.status, 200,
        "a bound pod reached around its waypoint: {a:?}"
    );
    // The VIP's endpoints on node 2 refuse (the source agent then tries its next endpoint);
    // those on node 1 belong to the misconfigured agent itself, which no other node can
    // protect.
    for _ in 0..8 {
        let a = curl(client, &reviews("/"), &[]);
        assert!(
            !matches!(a.served_by(), "reviews-v1" | "reviews-v2"),
            "node 2's pods served around the waypoint: {a:?}"
        );
    }
    let outsider = curl(rig.pod(2, 4), &format!("http://{ratings}:8080/"), &[]);
    assert_ne!(
        outsider.status, 200,
        "plaintext reached a waypoint-bound pod: {outsider:?}"
    );
    let after = mesh_testbed::metrics::sum(
        &mesh_testbed::metrics::scrape(&rig.tb, 2),
        "mesh_policy_decisions",
        &[("reason", "waypoint_bypassed")],
    );
    assert!(
        after >= before + 3.0,
        "bypass refusals counted: {before} -> {after}"
    );
    rig.agents[0]
        .rewrite_config(&rig.config(1, true, ""))
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));

    // 11. An HTTPRoute attached to the waypoint itself applies to the bound Service it names
    //     (`hostnames`), as a Service-attached one would.
    rig.set_routes(ATTACHED_TO_WAYPOINT, || {
        curl(client, &reviews("/"), &[])
            .head
            .to_ascii_lowercase()
            .contains("x-attached: waypoint")
    });
    let a = curl(client, &reviews("/"), &[]);
    assert_eq!((a.status, a.served_by()), (200, "reviews-v2"), "{a:?}");

    // 12. AuthorizationPolicy attached to the waypoint, checked per request: GET from the
    //     client only; /admin denied even behind a dot segment.
    let viewer = format!("{ALL_TO_V1}{VIEWER}");
    rig.set_routes(&viewer, || {
        curl(client, &reviews("/"), &["-X", "POST"]).status == 403
    });
    let a = curl(client, &reviews("/"), &["-X", "POST"]);
    assert_eq!(
        (a.status, a.body.as_str()),
        (403, "RBAC: access denied"),
        "{a:?}"
    );
    assert_eq!(curl(client, &reviews("/"), &[]).status, 200);
    let a = curl(client, &reviews("/x/../admin"), &["--path-as-is"]);
    assert_eq!(a.status, 403, "{a:?}");

    // 13. A config change does not drop a request in flight.
    let slow = {
        let place = client.place.clone();
        std::thread::spawn(move || {
            let out = place
                .output(
                    "curl",
                    &[
                        "-s",
                        "-o",
                        "/dev/null",
                        "-w",
                        "%{http_code}",
                        "-m",
                        "8",
                        &reviews("/delay/1500"),
                    ],
                )
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    rig.set_routes(ALL_TO_V1, || {
        curl(client, &reviews("/"), &["-H", "end-user: jason"]).served_by() == "reviews-v1"
    });
    assert_eq!(
        slow.join().unwrap(),
        "200",
        "the in-flight request survived the reload"
    );

    // 14. A rollout of the waypoint (a Deployment's: the new pod ready first, then the old one
    //     signalled while the agents still list it) refuses nothing and cuts nothing.
    let old_log = waypoint_rollout(&mut rig);

    // 15. The waypoint gone: clients get errors, nothing reaches the pods around it.
    let log = rig.waypoint.take().unwrap().kill().unwrap();
    let wp_log = String::from_utf8_lossy(&old_log.stderr).into_owned()
        + &String::from_utf8_lossy(&log.stderr);
    let a = curl(client, &reviews("/after-kill"), &[]);
    assert_ne!(a.status, 200, "served without the waypoint: {a:?}");
    let a = curl(client, &format!("http://{ratings}:8080/after-kill"), &[]);
    assert_ne!(a.status, 200, "served without the waypoint: {a:?}");

    let (_, apps) = rig.finish();
    let log_of = |id: PodId| {
        apps.iter()
            .find(|(p, _)| *p == id)
            .map(|(_, l)| l.clone())
            .unwrap()
    };
    let v3 = log_of((1, 4));
    let mirrored = v3
        .lines()
        .filter(|l| l.contains("GET /mirror") && l.contains("-shadow"))
        .count();
    assert!(mirrored >= 3, "the mirror's log:\n{v3}");
    for (_, l) in &apps {
        assert!(
            !l.contains("/after-kill"),
            "a request bypassed the dead waypoint: {l}"
        );
    }
    assert!(wp_log.contains("waypoint serving"), "{wp_log}");
    assert!(
        wp_log.contains("rbac_access_denied_matched_policy[mesh/no-admin]"),
        "the denial's access log: {wp_log}"
    );
}
