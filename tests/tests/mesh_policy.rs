//! L4 policy end to end: Istio AuthorizationPolicy and PeerAuthentication objects in the agents'
//! config decide which connections reach enrolled pods — across nodes (HBONE), on one node, and
//! for plaintext from pods outside the mesh — and a policy change closes exactly the live
//! connections it now denies.
//!
//! Topology: two nodes with three pods each; pods 1 and 2 are enrolled (namespace `mesh`,
//! service account `sa-<pod>`, label `slot: "<index>"`), pod 3 is not (namespace `plain`).
mod support;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use mesh_testbed::{
    Pod, Testbed, TestbedSpec, can_run,
    probe::{Probe, ProbeServer},
};
use support::{Agent, PodId, TempDir, pods};

const SPEC: TestbedSpec = TestbedSpec {
    nodes: 2,
    pods_per_node: 3,
};
const ENROLLED: [PodId; 4] = [(1, 1), (1, 2), (2, 1), (2, 2)];

/// A testbed with a `mesh` agent per node, both with the same policies.
struct Rig {
    tb: Testbed,
    ca: TempDir,
    agents: Vec<Agent>,
    _servers: Vec<ProbeServer>,
}

impl Rig {
    /// `policies` writes the policy list once the testbed (names, addresses) exists.
    fn start(policies: impl FnOnce(&Testbed) -> String) -> Self {
        let tb = Testbed::build(SPEC).unwrap();
        let policies = policies(&tb);
        let policies = policies.as_str();
        let ca = TempDir::with_ca(&tb.info().run);
        let enrolled = pods(&ENROLLED);
        let agents = (1..=2)
            .map(|n| Agent::start_with_policies(&tb, n, &enrolled, ca.path(), policies).unwrap())
            .collect();
        let servers = tb
            .pods()
            .iter()
            .map(|p| ProbeServer::start(&p.place, &[8080, 9090]).unwrap())
            .collect();
        Rig {
            tb,
            ca,
            agents,
            _servers: servers,
        }
    }

    fn pod(&self, node: usize, index: usize) -> &Pod {
        self.tb.pod(node, index)
    }

    /// Gives both agents a new policy list.
    fn set_policies(&self, policies: &str) {
        for a in &self.agents {
            a.set_policies(&self.tb, &pods(&ENROLLED), policies)
                .unwrap();
        }
    }

    /// Stops the agents and returns their logs, then tears everything down.
    fn finish(mut self) -> Vec<String> {
        let logs = self.agents.iter_mut().map(|a| a.stop().unwrap()).collect();
        drop(self.agents);
        drop(self._servers);
        drop(self.ca);
        self.tb.teardown_verified().unwrap();
        logs
    }
}

/// Whether a connection from `from` to `to`:`port` reaches the server (it answers and a small
/// payload arrives intact). A denied connection is accepted by the capture and then reset.
fn reaches(from: &Pod, to: &Pod, port: u16, v6: bool) -> bool {
    let dst = SocketAddr::new(to.ip(v6), port);
    let Ok(mut p) = Probe::connect(&from.place, dst, Duration::from_secs(5)).unwrap() else {
        return false;
    };
    match p.hello() {
        // A policy change that lands mid-transfer revokes the connection (RST): not reached.
        // Paths that must stay open are asserted `true`, so a reset there still fails.
        Ok(h) if h["role"] == "server" => p.finish(4096).is_ok(),
        _ => false,
    }
}

/// Polls `reaches` until it returns `want` (a policy change takes one reload interval).
fn wait_reaches(from: &Pod, to: &Pod, port: u16, want: bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while reaches(from, to, port, false) != want {
        assert!(
            Instant::now() < deadline,
            "{} -> {}:{port} never became {}",
            from.name(),
            to.name(),
            if want { "allowed" } else { "denied" }
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn policy(kind: &str, name: &str, namespace: &str, spec: &str) -> String {
    format!(
        "  - {{apiVersion: security.istio.io/v1, kind: {kind}, metadata: {{name: {name}, namespace: {namespace}}}, spec: {spec}}}\n"
    )
}

fn principal(pod: &Pod) -> String {
    format!("cluster.local/ns/mesh/sa/sa-{}", pod.name())
}

#[test]
fn authorization_policies_allow_and_deny_by_principal_namespace_port_and_ip_block() {
    if !can_run("L4 policy", &["ip"]) {
        return;
    }
    let policies = |tb: &Testbed| {
        let (p12, p11_v4, p13_v4) = (
            principal(tb.pod(1, 2)),
            tb.pod(1, 1).ipv4,
            tb.pod(1, 3).ipv4,
        );
        [
        // Slot-1 pods: only node1-pod2's identity on 8080, and plaintext from node1-pod3's
        // address.
        policy(
            "AuthorizationPolicy",
            "slot1-allow",
            "mesh",
            &format!(
                "{{selector: {{matchLabels: {{slot: \"1\"}}}}, rules: [{{from: [{{source: {{principals: [{p12}]}}}}], to: [{{operation: {{ports: [\"8080\"]}}}}]}}, {{from: [{{source: {{ipBlocks: [{p13_v4}/32]}}}}]}}]}}"
            ),
        ),
        // Slot-2 pods: anything from namespace mesh, except node1-pod1's address, never 9090.
        policy(
            "AuthorizationPolicy",
            "slot2-allow",
            "mesh",
            "{selector: {matchLabels: {slot: \"2\"}}, rules: [{from: [{source: {namespaces: [mesh]}}]}]}",
        ),
        policy(
            "AuthorizationPolicy",
            "slot2-deny",
            "mesh",
            &format!(
                "{{selector: {{matchLabels: {{slot: \"2\"}}}}, action: DENY, rules: [{{from: [{{source: {{ipBlocks: [{p11_v4}]}}}}]}}, {{to: [{{operation: {{ports: [\"9090\"]}}}}]}}]}}"
            ),
        ),
        ]
        .concat()
    };
    let rig = Rig::start(policies);
    let policies = policies(&rig.tb);
    let p = |n, i| rig.pod(n, i);

    // By principal, across nodes (both families) and on one node.
    assert!(reaches(p(1, 2), p(2, 1), 8080, false), "allowed principal");
    assert!(
        reaches(p(1, 2), p(2, 1), 8080, true),
        "allowed principal, IPv6"
    );
    assert!(!reaches(p(1, 1), p(2, 1), 8080, false), "other principal");
    assert!(
        !reaches(p(2, 2), p(1, 1), 8080, false),
        "other principal, reverse direction"
    );
    assert!(
        !reaches(p(2, 2), p(2, 1), 8080, false),
        "other principal, same node"
    );
    // By port.
    assert!(!reaches(p(1, 2), p(2, 1), 9090, false), "port not allowed");
    assert!(!reaches(p(1, 2), p(2, 2), 9090, false), "port denied");
    // By IP block: plaintext from an allowed address, and a DENY by address.
    assert!(
        reaches(p(1, 3), p(2, 1), 8080, false),
        "plaintext from an allowed block"
    );
    assert!(
        !reaches(p(2, 3), p(2, 1), 8080, false),
        "plaintext from another address"
    );
    assert!(!reaches(p(1, 1), p(2, 2), 8080, false), "address denied");
    // By namespace: the mesh namespace is allowed; plaintext has no namespace.
    assert!(reaches(p(1, 2), p(2, 2), 8080, false), "namespace allowed");
    assert!(
        reaches(p(2, 1), p(1, 2), 8080, false),
        "namespace allowed, reverse"
    );
    assert!(
        !reaches(p(1, 3), p(2, 2), 8080, false),
        "plaintext has no namespace"
    );

    // A malformed policy: rejected with an error naming it and the field; the workloads it
    // selects (slot 2) fail closed; the rest of the config (slot 1) still applies.
    let broken = [
        policies.replace("slot2-allow", "slot2-allow-old"),
        policy(
            "AuthorizationPolicy",
            "bad-cidr",
            "mesh",
            "{selector: {matchLabels: {slot: \"2\"}}, rules: [{from: [{source: {ipBlocks: [10.0.0.0/33]}}]}]}",
        ),
    ]
    .concat();
    rig.set_policies(&broken);
    wait_reaches(p(1, 2), p(2, 2), 8080, false);
    assert!(reaches(p(1, 2), p(2, 1), 8080, false), "slot 1 unaffected");
    assert!(
        !reaches(p(1, 1), p(2, 1), 8080, false),
        "slot 1 policy still applies"
    );

    let logs = rig.finish();
    let want = "AuthorizationPolicy mesh/bad-cidr: spec.rules[0].from[0].source.ipBlocks[0]";
    assert!(
        logs[1].contains(want),
        "node2 log names the object and field:\n{}",
        logs[1]
    );
    assert!(logs[1].contains("reason=\"invalid_policy\"") || logs[1].contains("invalid_policy"));
    assert!(
        logs[1].contains("no_allow_matched"),
        "denials are logged with their reason"
    );
}

#[test]
fn strict_refuses_plaintext_and_permissive_accepts_it() {
    if !can_run("L4 policy", &["ip"]) {
        return;
    }
    let policies = [
        policy(
            "PeerAuthentication",
            "default",
            "istio-system",
            "{mtls: {mode: STRICT}}",
        ),
        policy(
            "PeerAuthentication",
            "slot2",
            "mesh",
            "{selector: {matchLabels: {slot: \"2\"}}, mtls: {mode: PERMISSIVE}}",
        ),
    ]
    .concat();
    let rig = Rig::start(|_| policies);
    let p = |n, i| rig.pod(n, i);
    for v6 in [false, true] {
        // Non-mesh pods (slot 3) send plaintext: refused by STRICT, accepted by PERMISSIVE.
        assert!(!reaches(p(1, 3), p(2, 1), 8080, v6), "STRICT, cross-node");
        assert!(!reaches(p(2, 3), p(2, 1), 8080, v6), "STRICT, same node");
        assert!(
            reaches(p(1, 3), p(2, 2), 8080, v6),
            "PERMISSIVE, cross-node"
        );
        // Mesh traffic (mutual TLS) is accepted by both.
        assert!(reaches(p(1, 1), p(2, 1), 8080, v6), "mTLS to STRICT");
        assert!(reaches(p(2, 2), p(2, 1), 8080, v6), "same node to STRICT");
    }
    // Making it PERMISSIVE everywhere lets the plaintext in.
    rig.set_policies(&policy(
        "PeerAuthentication",
        "default",
        "istio-system",
        "{mtls: {mode: PERMISSIVE}}",
    ));
    wait_reaches(p(1, 3), p(2, 1), 8080, true);
    let logs = rig.finish();
    assert!(
        logs[1].contains("mtls_strict"),
        "refusals are logged:\n{}",
        logs[1]
    );
}

#[test]
fn a_new_policy_closes_the_live_connections_it_denies_and_no_others() {
    if !can_run("L4 policy", &["ip"]) {
        return;
    }
    let rig = Rig::start(|_| String::new());
    let p = |n, i| rig.pod(n, i);
    let open = |from: &Pod, to: &Pod| {
        let dst = SocketAddr::new(to.ipv4.into(), 8080);
        let mut c = Probe::connect(&from.place, dst, Duration::from_secs(5))
            .unwrap()
            .unwrap();
        assert_eq!(c.hello().unwrap()["role"], "server");
        c.send(1 << 20).unwrap();
        c
    };
    // To node2-pod1: over HBONE from node1-pod1 (to be denied) and node1-pod2 (not), on the
    // same node from node2-pod2 (to be denied), plaintext from node1-pod3 (to be refused by
    // STRICT); to node2-pod2: plaintext from node2-pod3 (not affected).
    let mut doomed = [
        open(p(1, 1), p(2, 1)),
        open(p(2, 2), p(2, 1)),
        open(p(1, 3), p(2, 1)),
    ];
    let mut kept = [open(p(1, 2), p(2, 1)), open(p(2, 3), p(2, 2))];

    let deny = [
        policy(
            "AuthorizationPolicy",
            "deny-two",
            "mesh",
            &format!(
                "{{selector: {{matchLabels: {{slot: \"1\"}}}}, action: DENY, rules: [{{from: [{{source: {{principals: [{}, {}]}}}}]}}]}}",
                principal(p(1, 1)),
                principal(p(2, 2))
            ),
        ),
        policy(
            "PeerAuthentication",
            "slot1-strict",
            "mesh",
            "{selector: {matchLabels: {slot: \"1\"}}, mtls: {mode: STRICT}}",
        ),
    ]
    .concat();
    rig.set_policies(&deny);
    let deadline = Instant::now() + Duration::from_secs(10);
    for (i, c) in doomed.iter_mut().enumerate() {
        let mut closed = false;
        while !closed && Instant::now() < deadline {
            // Keep sending: a reset shows up on the next write or read.
            closed = c.send(4096).is_err() || c.closed_within(Duration::from_millis(100)).unwrap();
        }
        assert!(
            closed,
            "connection {i} to {} was not closed by the new policy",
            c.dst
        );
    }
    // The others keep flowing and finish intact.
    for c in &mut kept {
        assert!(
            !c.closed_within(Duration::from_millis(200)).unwrap(),
            "{} closed",
            c.dst
        );
        c.send(1 << 20).unwrap();
    }
    for c in kept {
        c.finish(4 << 20).unwrap();
    }
    // New connections follow the new policy too.
    assert!(!reaches(p(1, 1), p(2, 1), 8080, false));
    assert!(reaches(p(1, 2), p(2, 1), 8080, false));
    let logs = rig.finish();
    assert!(
        logs[1].contains("policy change closes live connection"),
        "revocations are logged:\n{}",
        logs[1]
    );
}
