//! Anti-spoofing on an enrolled pod's interface: packets with the pod's own source address pass,
//! packets with any other source are dropped and counted; un-enrolling restores the old
//! behaviour, and a non-enrolled pod is never touched.
use std::{
    net::{IpAddr, SocketAddr, TcpListener},
    time::Duration,
};

use mesh_agent::ebpf::{Datapath, pod_addrs};
use mesh_common::Counter;
use mesh_testbed::{
    Testbed, TestbedSpec, can_run,
    traffic::{checked_send, connect_from},
};

#[test]
fn enrolled_pod_cannot_send_from_an_address_that_is_not_its_own() {
    if !can_run("eBPF anti-spoofing", &["ip"]) {
        return;
    }
    let tb = Testbed::build(TestbedSpec {
        nodes: 1,
        pods_per_node: 3,
    })
    .unwrap();
    let (pod, server, bystander) = (tb.pod(1, 1), tb.pod(1, 2), tb.pod(1, 3));
    let node = &tb.node(1).place;
    // Extra addresses on the pod, routed back to it by the node: without anti-spoofing, a
    // connection from them succeeds, so a failure below can only be the data path's doing.
    let spoofed: [IpAddr; 2] = [
        "10.240.1.99".parse().unwrap(),
        "fd00:240:1::99".parse().unwrap(),
    ];
    for (addr, len) in [(spoofed[0], 32), (spoofed[1], 128)] {
        let a = format!("{addr}/{len}");
        pod.place
            .run("ip", &["addr", "add", &a, "dev", "eth0", "nodad"])
            .unwrap();
        node.run("ip", &["route", "add", &a, "dev", &pod.host_veth])
            .unwrap();
    }
    let listeners: Vec<(SocketAddr, TcpListener)> = [server.ip(false), server.ip(true)]
        .into_iter()
        .map(|ip| {
            let addr = SocketAddr::new(ip, 7010);
            let l = server
                .place
                .in_netns(|| TcpListener::bind(addr))
                .unwrap()
                .unwrap();
            (addr, l)
        })
        .collect();
    let try_spoofed = |family: usize| {
        connect_from(
            &pod.place,
            spoofed[family],
            listeners[family].0,
            Duration::from_millis(700),
        )
        .unwrap()
    };
    for family in 0..2 {
        assert!(
            try_spoofed(family).is_ok(),
            "before enrolment, spoofed source {family} connects"
        );
    }

    let mut datapath = Datapath::load().unwrap();
    let enrollment = node
        .in_netns(|| {
            datapath.enroll_pod(
                &pod.host_veth,
                pod_addrs(Some(pod.ipv4), Some(pod.ipv6)),
                None,
            )
        })
        .unwrap()
        .expect("enrol");

    let before = datapath.counters().unwrap();
    for family in 0..2 {
        let err = try_spoofed(family).expect_err("spoofed SYN must be dropped");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    }
    let spoofing = datapath.counters().unwrap().since(&before);
    assert!(spoofing.get(Counter::DroppedSpoofed) >= 2, "{spoofing:?}");

    // The pod's own addresses pass the check (IPv6 neighbour discovery from link-local too) and
    // reach the capture, which, with no agent listening, refuses the connection with a RST:
    // refused, not timed out, so the source check let them through.
    let before = datapath.counters().unwrap();
    for v6 in [false, true] {
        let err = connect_from(
            &pod.place,
            pod.ip(v6),
            (server.ip(v6), 7011).into(),
            Duration::from_secs(3),
        )
        .unwrap()
        .expect_err("no agent: the captured connection is refused");
        assert_eq!(
            err.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "v6={v6}: {err}"
        );
    }
    let own = datapath.counters().unwrap().since(&before);
    assert_eq!(own.get(Counter::RefusedNoListener), 2, "{own:?}");
    // A pod that is not enrolled is not looked at at all.
    checked_send(
        &bystander.place,
        &server.place,
        (server.ipv4, 7012).into(),
        1 << 16,
    )
    .unwrap();
    let legit = datapath.counters().unwrap().since(&before);
    assert_eq!(legit.get(Counter::CapturedOutbound), 0, "{legit:?}");
    assert_eq!(legit.get(Counter::DroppedSpoofed), 0, "{legit:?}");
    assert!(legit.get(Counter::FromPodAccepted) > 0, "{legit:?}");

    datapath.unenroll_pod(enrollment).unwrap();
    let before = datapath.counters().unwrap();
    for family in 0..2 {
        assert!(
            try_spoofed(family).is_ok(),
            "after un-enrolment, source {family} connects again"
        );
    }
    assert_eq!(
        datapath.counters().unwrap(),
        before,
        "nothing runs after un-enrolment"
    );

    drop((datapath, listeners));
    tb.teardown_verified().unwrap();
}
