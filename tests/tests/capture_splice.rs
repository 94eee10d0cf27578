//! Same-node splicing (DESIGN.md §4 flow 6): the pod<->agent hop of a captured connection moves
//! its bytes socket to socket with sockmap, bypassing the TCP/IP stack, and loses or reorders
//! nothing — checked with 1 GiB through a real client process in the pod's cgroup, the pod's own
//! TCP segment counters, and the data path's splice counters.
mod support;

use std::{net::SocketAddr, time::Duration};

use mesh_common::Counter;
use mesh_testbed::{Place, Testbed, TestbedSpec, binaries, can_run, probe::Probe};
use support::{Agent, pods};

const SPEC: TestbedSpec = TestbedSpec {
    nodes: 2,
    pods_per_node: 2,
};

/// TCP segments the place's network stack has sent (`Tcp: OutSegs` of /proc/net/snmp).
fn out_segs(place: &Place) -> u64 {
    let snmp = place.run("cat", &["/proc/net/snmp"]).unwrap();
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next().unwrap(), tcp.next().unwrap());
    let i = names
        .split_whitespace()
        .position(|n| n == "OutSegs")
        .unwrap();
    values.split_whitespace().nth(i).unwrap().parse().unwrap()
}

/// Runs `mtb-probe send` as a process in `place` (so in its cgroup, where sock_ops sees it).
fn send_from(place: &Place, dst: SocketAddr, bytes: u64) -> serde_json::Value {
    let probe = binaries::mtb_probe().unwrap();
    let out = place
        .output(
            probe.to_str().unwrap(),
            &["send", &dst.to_string(), &bytes.to_string()],
        )
        .unwrap();
    assert!(
        out.status.success(),
        "mtb-probe send {dst}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn outbound_hop_is_spliced_and_carries_a_gibibyte_intact() {
    if !can_run("sockmap splicing", &["ip"]) {
        return;
    }
    let tb = Testbed::build(SPEC).unwrap();
    let agent = Agent::start(&tb, 1, "report", &pods(&[(1, 1)])).unwrap();
    let pod = tb.pod(1, 1);
    for (v6, bytes) in [(false, 1u64 << 30), (true, 64 << 20)] {
        let dst = SocketAddr::new(tb.pod(2, 1).ip(v6), 8080);
        let (segs, before) = (out_segs(&pod.place), agent.counters());
        // The agent's report handler digests every byte it receives; mtb-probe fails unless the
        // digest and count match what it sent.
        let got = send_from(&pod.place, dst, bytes);
        assert_eq!(got["hello"]["listener"], "outbound", "{got}");
        let d = agent.counters().since(&before);
        let segs = out_segs(&pod.place) - segs;
        assert!(d.get(Counter::SplicedBytes) >= bytes, "v6={v6} {d:?}");
        assert_eq!(d.get(Counter::SpliceFallbacks), 0, "v6={v6} {d:?}");
        // Through TCP these bytes would take at least bytes/64KiB segments (16,384 for 1 GiB even
        // with the largest GSO segments); spliced, only the handshake and FIN remain.
        assert!(
            segs < 100,
            "v6={v6}: the pod sent {segs} TCP segments for {bytes} bytes"
        );
        eprintln!(
            "v6={v6}: {bytes} bytes spliced in {:.2}s, pod sent {segs} TCP segments",
            got["seconds"].as_f64().unwrap()
        );
    }
    drop(agent);
    tb.teardown_verified().unwrap();
}

#[test]
fn delivery_hop_to_an_enrolled_pod_is_spliced() {
    if !can_run("sockmap splicing (delivery)", &["ip"]) {
        return;
    }
    let tb = Testbed::build(SPEC).unwrap();
    let agent = Agent::start(&tb, 1, "passthrough", &pods(&[(1, 1)])).unwrap();
    let (server, client) = (tb.pod(1, 1), tb.pod(1, 2));
    // The server runs as a process in the enrolled pod's cgroup.
    let probe = binaries::mtb_probe().unwrap();
    let mut srv = server
        .place
        .spawn(probe.to_str().unwrap(), &["serve", "8080"])
        .unwrap();
    srv.wait_listening(8080, Duration::from_secs(10)).unwrap();
    let before = agent.counters();
    let bytes = 64u64 << 20;
    let dst = SocketAddr::new(server.ipv4.into(), 8080);
    let mut p = Probe::connect(&client.place, dst, Duration::from_secs(5))
        .unwrap()
        .unwrap();
    let hello = p.hello().unwrap();
    assert_eq!(hello["role"], "server", "{hello}");
    p.finish(bytes).unwrap();
    let d = agent.counters().since(&before);
    assert_eq!(d.get(Counter::CapturedInboundPlaintext), 1, "{d:?}");
    // agent -> pod: the payload; pod -> agent: the server's two lines.
    assert!(d.get(Counter::SplicedBytes) >= bytes, "{d:?}");
    drop((srv, agent));
    tb.teardown_verified().unwrap();
}
