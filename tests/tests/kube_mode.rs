//! The node agent in Kubernetes mode on the testbed: real agents (no --config) watch an API
//! server double whose pods are the testbed's pods, find each local pod on the host by its
//! route, capture the enrolled ones and carry their traffic through HBONE; a namespace label
//! flip enrols a running pod; enrolled pods carry the redirection annotation. The agents run
//! with exactly the capabilities the DaemonSet in deploy/ grants them, nothing more, and get
//! their workloads' certificates from `mesh-agent ca serve` (run as the CA Deployment runs it)
//! with projected-token authentication, as in a cluster. Their pods' cgroups are found by UID
//! under `--pod-cgroup-root` (the host's hierarchy, as the DaemonSet mounts it), so the
//! pod-side hops are spliced.
use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use mesh_agent::capture::PinnedMaps;
use mesh_common::Counter;
use mesh_testbed::{
    Background, Pod, Testbed, TestbedSpec, binaries, can_run,
    kubemesh::{self, KubeMesh, namespace, readiness},
    probe::{self, Probe, ProbeServer},
};
use serde_json::{Value, json};

const SPEC: TestbedSpec = TestbedSpec {
    nodes: 2,
    pods_per_node: 2,
};

/// Pod 1 of each node in `mesh` (enrolled by its namespace), pod 2 in `apps` (not yet).
fn pod(p: &Pod) -> Value {
    kubemesh::pod(p, if p.index == 1 { "mesh" } else { "apps" })
}

fn enrolled_ifindexes(maps: &PinnedMaps) -> BTreeSet<u32> {
    maps.pods()
        .map(|v| v.into_iter().map(|(i, _)| i).collect())
        .unwrap_or_default()
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn agents_in_kubernetes_mode_enrol_pods_found_on_the_host_and_follow_label_flips() {
    if !can_run("Kubernetes mode", &["ip", "setpriv"]) {
        return;
    }
    let tb = Testbed::build(SPEC).unwrap();
    let work = std::env::temp_dir().join(format!("mesh-kube-{}", tb.info().run));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&tb, &work)));
    let _ = std::fs::remove_dir_all(&work);
    tb.teardown_verified().unwrap();
    if let Err(p) = outcome {
        std::panic::resume_unwind(p);
    }
}

fn run(tb: &Testbed, work: &Path) {
    // The API server double listens on node1's uplink address: both agents reach it over the
    // testbed's LAN, from their own namespaces (their own traffic is never captured).
    let bin = binaries::mesh_agent().unwrap();
    let km = KubeMesh::new(tb, work, &bin).unwrap();
    let api = &km.api;
    for ns in [namespace("mesh", true), namespace("apps", false)] {
        api.apply(ns);
    }
    for p in tb.pods() {
        api.apply(pod(p));
    }
    let ca = km.start_ca(&[]).unwrap();
    // The agents start while the CA is down (it published its root first, as in a cluster).
    let first_ca_run = ca.terminate(Duration::from_secs(10)).unwrap();
    // With only the capabilities the DaemonSet grants (deploy/base/node-agent.yaml): if the
    // data path needed more, the agent would fail here.
    let mut agents: Vec<Background> = (1..=2).map(|n| km.start_agent(n, &[]).unwrap()).collect();
    // Not ready without certificates; ready once the CA is back, with no configuration change
    // (the agents keep asking).
    for n in 1..=2 {
        wait_for(
            &format!("node{n} to be unready for want of certificates"),
            || {
                let (status, body) = readiness(tb, n);
                status.contains("503") && body.contains("certificates")
            },
        );
    }
    let ca = km.start_ca(&[]).unwrap();
    for n in 1..=2 {
        wait_for(&format!("node{n} to be ready once the CA is back"), || {
            readiness(tb, n).0.contains("200")
        });
    }
    let maps: Vec<PinnedMaps> = (1..=2)
        .map(|n| PinnedMaps::new(&tb.bpffs_dir().join(format!("agent-node{n}/maps"))))
        .collect();
    let ifindex = |p: &Pod| {
        tb.node(p.node)
            .place
            .in_netns(|| mesh_agent::ebpf::ifindex_of(&p.host_veth))
            .unwrap()
            .unwrap()
    };
    // Pod 1 of each node is enrolled (namespace label), found by its route: its host veth.
    for n in 1..=2 {
        let want = BTreeSet::from([ifindex(tb.pod(n, 1))]);
        wait_for(&format!("node{n} to enrol its pod 1"), || {
            enrolled_ifindexes(&maps[n - 1]) == want
        });
    }

    // Traffic between them goes through HBONE.
    let _servers: Vec<_> = tb
        .pods()
        .iter()
        .map(|p| ProbeServer::start(&p.place, &[8080]).unwrap())
        .collect();
    let before = (maps[0].counters().unwrap(), maps[1].counters().unwrap());
    let dst = SocketAddr::new(tb.pod(2, 1).ipv4.into(), 8080);
    let mut probe = Probe::connect(&tb.pod(1, 1).place, dst, Duration::from_secs(5))
        .unwrap()
        .unwrap();
    let hello = probe.hello().unwrap();
    assert_eq!(hello["role"], "server", "{hello}");
    assert_eq!(
        hello["peer"]
            .as_str()
            .unwrap()
            .parse::<SocketAddr>()
            .unwrap()
            .ip(),
        tb.pod(1, 1).ipv4
    );
    probe.finish(64 << 10).unwrap();
    let after = maps[1].counters().unwrap().since(&before.1);
    assert!(after.get(Counter::CapturedInboundHbone) >= 1, "{after:?}");

    // Processes in the pods (in their cgroups, where sock_ops sees their sockets; the probe
    // above runs in the test's own process): the pod-side hop at each end is spliced, each
    // pod's cgroup found by its UID. Every byte went one way or the other, part of it in the
    // kernel; mtb-probe checks the digest.
    let server = probe::serve_process(&tb.pod(2, 1).place, 8090).unwrap();
    let before = (maps[0].counters().unwrap(), maps[1].counters().unwrap());
    let bytes = 16u64 << 20;
    let bulk_dst = SocketAddr::new(tb.pod(2, 1).ipv4.into(), 8090);
    probe::send_process(&tb.pod(1, 1).place, bulk_dst, bytes).unwrap();
    let status = tb
        .node(1)
        .place
        .run(bin.to_str().unwrap(), &["status"])
        .unwrap();
    for (hop, d) in [
        (
            "client pod -> agent 1",
            maps[0].counters().unwrap().since(&before.0),
        ),
        (
            "agent 2 -> server pod",
            maps[1].counters().unwrap().since(&before.1),
        ),
    ] {
        let (spliced, deferred) = (
            d.get(Counter::SplicedBytes),
            d.get(Counter::SpliceDeferredBytes),
        );
        assert!(spliced + deferred >= bytes, "{hop}: {d:?}\n{status}");
        assert!(spliced > 0, "{hop}: {d:?}\n{status}");
    }
    drop(server);
    assert!(
        status.contains("splicing on: ") && status.contains("(1 of 1 enrolled pods)"),
        "{status}"
    );
    // Both ends' certificates came from the mesh CA, asked by each node's agent for its pod,
    // after a TokenReview of the agent's token.
    assert!(
        api.requests()
            .iter()
            .any(|r| r.method == "POST" && r.path.ends_with("/tokenreviews")),
        "the CA never reviewed a token"
    );

    // The enrolled pods carry the redirection annotation; the others do not.
    let annotated = |p: &Pod| {
        let ns = if p.index == 1 { "mesh" } else { "apps" };
        api.get("pods", ns, p.name()).unwrap()["metadata"]["annotations"]["ambient.istio.io/redirection"]
            == json!("enabled")
    };
    wait_for("the annotation on node1-pod1", || annotated(tb.pod(1, 1)));
    assert!(!annotated(tb.pod(1, 2)));

    // Labelling `apps` enrols the running pods 2 without a restart.
    api.apply(namespace("apps", true));
    for n in 1..=2 {
        let want = BTreeSet::from([ifindex(tb.pod(n, 1)), ifindex(tb.pod(n, 2))]);
        wait_for(
            &format!("node{n} to enrol pod 2 after the label flip"),
            || enrolled_ifindexes(&maps[n - 1]) == want,
        );
    }
    wait_for("the annotation on node1-pod2", || annotated(tb.pod(1, 2)));

    // Graceful termination: a SIGTERM'd agent turns unready at once, keeps carrying a live
    // connection to its end (the client half-closes after the signal), then exits.
    let mut live = Probe::connect(&tb.pod(1, 1).place, dst, Duration::from_secs(5))
        .unwrap()
        .unwrap();
    live.hello().unwrap();
    live.send(256 << 10).unwrap();
    let node2 = agents.pop().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(node2.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    wait_for("node2 to report draining", || {
        let (status, body) = readiness(tb, 2);
        status.contains("503") && body.contains("draining")
    });
    std::thread::sleep(Duration::from_millis(500));
    live.send(256 << 10).unwrap();
    live.finish(1 << 20).unwrap();
    let out = node2.wait(Duration::from_secs(4)).unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("draining"), "{log}");
    assert!(!log.contains("drain time over"), "{log}");
    // Everything the capture was asked to do on the node applied (uplinks found in the node's
    // own namespace, every enrolled pod's interface attached).
    assert!(!log.contains("capture reconciliation"), "{log}");

    // Stopping the agents removes their annotations (node2's went with its drain above).
    for a in agents {
        let out = a.terminate(Duration::from_secs(15)).unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(!log.contains("panicked"), "{log}");
        assert!(!log.contains("capture reconciliation"), "{log}");
        // One reconciliation per configuration that changed (first state, enrolments, the
        // label flip, annotations arriving), not a loop over the same one.
        let reconciled = log.matches("capture reconciled").count();
        assert!(reconciled < 30, "{reconciled} reconciliations");
    }
    for p in tb.pods() {
        assert!(
            !annotated(p),
            "{} still annotated after the agent stopped",
            p.name()
        );
    }
    let out = ca.terminate(Duration::from_secs(10)).unwrap();
    let log = String::from_utf8_lossy(&first_ca_run.stderr).into_owned()
        + &String::from_utf8_lossy(&out.stderr);
    for n in 1..=2 {
        let issued = format!("spiffe://cluster.local/ns/mesh/sa/sa-node{n}-pod1");
        assert!(
            log.lines().any(|l| l.contains("certificate issued")
                && l.contains("mesh-system/mesh-agent")
                && l.contains(&issued)),
            "the CA did not issue {issued} to the node agent:\n{log}"
        );
    }
    assert!(!log.contains("refused"), "{log}");
    drop(km);
}
