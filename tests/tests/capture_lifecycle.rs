//! The capture over time: enrolling, un-enrolling and re-enrolling a running pod changes only new
//! connections; a killed agent leaves captured pods refused (never leaked); a restarted agent
//! adopts the pinned state without duplicates; `--uninstall` removes every kernel object.
mod support;

use std::{net::SocketAddr, path::Path, time::Duration};

use mesh_common::Counter;
use mesh_testbed::{
    Testbed, TestbedSpec, can_run,
    probe::{Probe, ProbeServer},
};
use support::{Agent, pod_key, pods};

const SPEC: TestbedSpec = TestbedSpec {
    nodes: 2,
    pods_per_node: 2,
};
const TIMEOUT: Duration = Duration::from_secs(5);

#[test]
fn enrol_unenrol_reenrol_changes_only_new_connections() {
    if !can_run("capture enrolment lifecycle", &["ip"]) {
        return;
    }
    let tb = Testbed::build(SPEC).unwrap();
    let (pod, server) = (tb.pod(1, 1), tb.pod(2, 2));
    let _srv = ProbeServer::start(&server.place, &[8080]).unwrap();
    let mut agent = Agent::start(&tb, 1, "report", &pods(&[])).unwrap();
    let phase = std::cell::Cell::new("not enrolled");
    let open = |v6: bool| {
        let dst = SocketAddr::new(server.ip(v6), 8080);
        let mut p = Probe::connect(&pod.place, dst, TIMEOUT)
            .unwrap()
            .unwrap_or_else(|e| panic!("{}: connect to {dst}: {e}", phase.get()));
        let hello = p
            .hello()
            .unwrap_or_else(|e| panic!("{}: {dst}: {e:#}", phase.get()));
        (p, hello)
    };
    let who = |hello: &serde_json::Value| {
        if hello["role"] == "server" {
            "direct"
        } else {
            assert_eq!(hello["pod"], pod_key(pod, true), "{hello}");
            "captured"
        }
    };

    // Not enrolled: direct.
    let before: Vec<_> = [false, true].map(open).into_iter().collect();
    for (_, h) in &before {
        assert_eq!(who(h), "direct");
    }
    // Enrolled: new connections are captured, the older ones still flow directly.
    agent.set_enrolled(&tb, &pods(&[(1, 1)])).unwrap();
    phase.set("enrolled");
    let during: Vec<_> = [false, true].map(open).into_iter().collect();
    for (_, h) in &during {
        assert_eq!(who(h), "captured");
    }
    // Un-enrolled: new connections are direct again; the captured ones keep working through the
    // agent (the pod drains).
    agent.set_enrolled(&tb, &pods(&[])).unwrap();
    phase.set("un-enrolled");
    let after: Vec<_> = [false, true].map(open).into_iter().collect();
    for (_, h) in &after {
        assert_eq!(who(h), "direct");
    }
    // Re-enrolled: captured again; the connections made while un-enrolled stay direct.
    agent.set_enrolled(&tb, &pods(&[(1, 1)])).unwrap();
    phase.set("re-enrolled");
    let again: Vec<_> = [false, true].map(open).into_iter().collect();
    for (_, h) in &again {
        assert_eq!(who(h), "captured");
    }
    // Every connection, from every phase, still carries data end to end to whoever answered it.
    for (p, _) in before.into_iter().chain(during).chain(after).chain(again) {
        p.finish(512 << 10).unwrap();
    }
    drop((agent, _srv));
    tb.teardown_verified().unwrap();
}

/// The link pins of agent instances (not the splice's tracing link, which agents share).
fn links_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("links"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| !name.contains("-trace-"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn instance_of(link: &str) -> &str {
    link.rsplit('-').next().unwrap()
}

#[test]
fn killed_agent_refuses_captured_pods_and_restart_adopts_state_without_duplicates() {
    if !can_run("capture across agent restarts", &["ip"]) {
        return;
    }
    let tb = Testbed::build(SPEC).unwrap();
    let enrolled = pods(&[(1, 1)]);
    let mut agent = Agent::start(&tb, 1, "report", &enrolled).unwrap();
    let (pod, bystander, remote) = (tb.pod(1, 1), tb.pod(1, 2), tb.pod(2, 1));
    let _srv = ProbeServer::start(&remote.place, &[8080]).unwrap();
    let _srv2 = ProbeServer::start(&pod.place, &[8080]).unwrap();
    let first_links = links_in(agent.bpffs());
    // from_pod on the enrolled pod, to_pods on the other pod and on the uplink, sock_ops on the
    // pod's and the agent's cgroups, sk_lookup on the node's namespace.
    assert_eq!(first_links.len(), 6, "{first_links:?}");
    let rules = |v: &str| {
        tb.node(1)
            .place
            .run("ip", &[v, "rule", "show", "pref", "2000"])
            .unwrap()
            .lines()
            .count()
    };
    assert_eq!((rules("-4"), rules("-6")), (1, 1));

    // A second agent on the same data path takes it over only once it is ready (an upgrade,
    // see upgrade.rs): one whose configuration cannot work (the default `mesh` handler with no
    // CA) exits without touching anything.
    let second = tb
        .node(1)
        .place
        .output(
            mesh_testbed::binaries::mesh_agent()
                .unwrap()
                .to_str()
                .unwrap(),
            &[
                "node",
                "--config",
                agent.config.to_str().unwrap(),
                "--bpffs-dir",
                agent.bpffs().to_str().unwrap(),
            ],
        )
        .unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        !second.status.success() && stderr.contains("needs a CA"),
        "{stderr}"
    );
    assert_eq!(links_in(agent.bpffs()), first_links);

    let killed_log = agent.kill().unwrap();
    let before = agent.counters();
    for v6 in [false, true] {
        // Outbound from the captured pod: refused at once, never sent out uncaptured.
        let err = Probe::connect(&pod.place, SocketAddr::new(remote.ip(v6), 8080), TIMEOUT)
            .unwrap()
            .err()
            .expect("no agent: refused");
        assert_eq!(
            err.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "{err}\n{killed_log}"
        );
        // Inbound to it: dropped (fail closed), never delivered around the agent.
        let err = Probe::connect(
            &bystander.place,
            SocketAddr::new(pod.ip(v6), 8080),
            Duration::from_millis(700),
        )
        .unwrap()
        .err()
        .expect("no agent: inbound dropped");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    }
    let down = agent.counters().since(&before);
    assert_eq!(down.get(Counter::RefusedNoListener), 2, "{down:?}");
    assert!(down.get(Counter::DroppedNoListener) >= 2, "{down:?}");
    // The dead agent's attachments are still in place (that is what refused the connections).
    assert_eq!(links_in(agent.bpffs()), first_links);

    agent.restart(&tb, &enrolled).unwrap();
    for v6 in [false, true] {
        let mut p = Probe::connect(&pod.place, SocketAddr::new(remote.ip(v6), 8080), TIMEOUT)
            .unwrap()
            .unwrap();
        let hello = p.hello().unwrap();
        assert_eq!(hello["listener"], "outbound", "{hello}");
        p.finish(1000).unwrap();
    }
    // Same objects, one of each, all owned by the new instance; maps adopted, not duplicated.
    let second_links = links_in(agent.bpffs());
    assert_eq!(second_links.len(), 6, "{second_links:?}");
    let new_instance = instance_of(&second_links[0]);
    assert!(second_links.iter().all(|l| instance_of(l) == new_instance));
    assert_ne!(new_instance, instance_of(&first_links[0]));
    assert_eq!((rules("-4"), rules("-6")), (1, 1));
    let maps = std::fs::read_dir(agent.bpffs().join("maps"))
        .unwrap()
        .count();
    assert_eq!(maps, mesh_agent::ebpf::MAPS.len());
    assert!(
        agent.counters().get(Counter::RefusedNoListener) >= 2,
        "counters survive the restart (pinned map adopted)"
    );
    let explain = agent.explain(&tb).unwrap();
    assert!(
        explain.contains("mesh_tc_from_pod") && explain.contains("fwmark 0x2000/0x2000"),
        "{explain}"
    );

    // --uninstall after the agent stops: nothing of ours is left, and traffic flows uncaptured.
    agent.kill().unwrap();
    agent.uninstall(&tb).unwrap();
    assert!(!agent.bpffs().exists());
    assert_eq!((rules("-4"), rules("-6")), (0, 0));
    let mut p = Probe::connect(
        &pod.place,
        SocketAddr::new(remote.ipv4.into(), 8080),
        TIMEOUT,
    )
    .unwrap()
    .unwrap();
    assert_eq!(p.hello().unwrap()["role"], "server");
    p.finish(10).unwrap();
    let explain = agent.explain(&tb).unwrap();
    assert!(
        explain.contains("nothing pinned") && explain.contains("no rule or route"),
        "{explain}"
    );
    drop((agent, _srv, _srv2));
    tb.teardown_verified().unwrap();
}
