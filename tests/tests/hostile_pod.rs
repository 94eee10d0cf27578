//! Issue #15, as a hostile pod tries it (CAP_NET_RAW, hand-made frames): the node's loopback,
//! "this host" and agent ports are out of reach by every spelling; connections to the node's
//! own addresses keep the pod's address; and a reused tuple the agent holds in TIME_WAIT does
//! not swallow HBONE SYNs.
mod support;

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use mesh_common::Counter;
use mesh_testbed::{
    Testbed, TestbedSpec, can_run,
    rawtcp::{RawTcp, TCP_ACK, TCP_SYN, mac_of},
};
use support::{Agent, TempDir, pods};

const NO_REPLY: Duration = Duration::from_millis(400);

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

#[test]
fn no_spelling_of_the_nodes_loopback_or_agent_ports_is_reachable_from_a_pod() {
    if !can_run("hostile pod: forbidden destinations", &["ip"]) {
        return;
    }
    let tb = Testbed::build(TestbedSpec {
        nodes: 1,
        pods_per_node: 2,
    })
    .unwrap();
    let ca = TempDir::with_ca(&tb.info().run);
    let enrolled = pods(&[(1, 1), (1, 2)]);
    let agent = Agent::start_with_ca(&tb, 1, "mesh", &enrolled, Some(ca.path())).unwrap();
    let (pod, other, node) = (tb.pod(1, 1), tb.pod(1, 2), tb.node(1));
    let gateway_mac = mac_of(&node.place, &pod.host_veth).unwrap();
    let raw = RawTcp::open(&pod.place, &pod.iface, gateway_mac).unwrap();
    let mut sport = 41000;
    let mut probe = |dst: SocketAddr| {
        sport += 1;
        let src = sa(pod.ip(dst.is_ipv6()), sport);
        raw.send_syn(src, dst).unwrap();
        raw.reply(src, dst, NO_REPLY)
    };

    // The frames are real: a SYN to another pod is captured and answered by the agent.
    for v6 in [false, true] {
        let dst = sa(other.ip(v6), 8080);
        let flags = probe(dst);
        assert_eq!(
            flags.map(|f| f & (TCP_SYN | TCP_ACK)),
            Some(TCP_SYN | TCP_ACK),
            "control SYN to {dst}"
        );
    }

    let forbidden: Vec<SocketAddr> = [
        "0.0.0.0:15000",
        "0.0.0.0:22",
        "127.0.0.1:15000",
        "127.0.0.1:15020",
        "127.1.2.3:15000",
        "224.0.0.1:80",
        "255.255.255.255:80",
        "[::]:15000",
        "[::]:15020",
        "[::1]:15000",
        "[::ffff:127.0.0.1]:15000",
        "[::ffff:0.0.0.0]:15000",
        "[::127.0.0.1]:15000",
        "[ff02::1]:80",
        // The gateway's link-local address is the node's own.
        "[fe80::1]:15000",
        "[fe80::1]:15020",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect();
    let before = agent.counters();
    for dst in &forbidden {
        assert_eq!(probe(*dst), None, "a SYN to {dst} was answered");
    }
    let after = agent.counters();
    assert_eq!(
        after.get(Counter::DroppedForbiddenDestination)
            - before.get(Counter::DroppedForbiddenDestination),
        forbidden.len() as u64,
        "every forbidden SYN is dropped and counted by the capture"
    );

    // The node's own addresses on the agent's ports.
    let node_addrs: [IpAddr; 3] = [
        node.ipv4.into(),
        node.ipv6.into(),
        mesh_testbed::addressing::GATEWAY_V4.into(),
    ];
    let agent_ports = [15000, 15001, 15006, 15008];
    let before = agent.counters();
    for ip in node_addrs {
        for port in agent_ports {
            let dst = sa(ip, port);
            assert_eq!(probe(dst), None, "a SYN to the node's {dst} was answered");
        }
    }
    let after = agent.counters();
    assert_eq!(
        after.get(Counter::DroppedAgentPort) - before.get(Counter::DroppedAgentPort),
        (node_addrs.len() * agent_ports.len()) as u64
    );
    // Nothing reached the agent's listeners on the pod's behalf.
    assert_eq!(
        after.get(Counter::CapturedOutbound),
        before.get(Counter::CapturedOutbound)
    );

    drop(raw);
    drop(agent);
    drop(ca);
    tb.teardown_verified().unwrap();
}

#[test]
fn connections_from_a_pod_to_the_node_keep_the_pods_address() {
    if !can_run("hostile pod: pod to node", &["ip"]) {
        return;
    }
    let tb = Testbed::build(TestbedSpec {
        nodes: 1,
        pods_per_node: 2,
    })
    .unwrap();
    let ca = TempDir::with_ca(&tb.info().run);
    // Pod 1 enrolled, pod 2 not: both must look like themselves to the node.
    let enrolled = pods(&[(1, 1)]);
    let agent = Agent::start_with_ca(&tb, 1, "mesh", &enrolled, Some(ca.path())).unwrap();
    let node = tb.node(1);
    // A host service on every address of the node (dual stack).
    let listener = node
        .place
        .in_netns(|| TcpListener::bind("[::]:7777"))
        .unwrap()
        .unwrap();
    listener.set_nonblocking(false).unwrap();
    let before = agent.counters();
    let mut connections = 0;
    for pod in [tb.pod(1, 1), tb.pod(1, 2)] {
        for (ip, v6) in [
            (IpAddr::from(node.ipv4), false),
            (node.ipv6.into(), true),
            (mesh_testbed::addressing::GATEWAY_V4.into(), false),
        ] {
            let dst = sa(ip, 7777);
            let mut client = pod
                .place
                .in_netns(|| TcpStream::connect_timeout(&dst, Duration::from_secs(3)))
                .unwrap()
                .unwrap_or_else(|e| panic!("{} -> {dst}: {e}", pod.name()));
            let (mut server, peer) = listener.accept().unwrap();
            assert_eq!(
                peer.ip().to_canonical(),
                pod.ip(v6),
                "{} -> {dst}: the node saw the connection from {peer}",
                pod.name()
            );
            client.write_all(b"ping").unwrap();
            let mut buf = [0u8; 4];
            server.read_exact(&mut buf).unwrap();
            assert_eq!(&buf, b"ping");
            connections += usize::from(pod.index == 1);
        }
    }
    let after = agent.counters();
    assert!(
        after.get(Counter::PassedToNode) - before.get(Counter::PassedToNode) >= connections as u64,
        "the enrolled pod's SYNs to the node were left to the node's stack"
    );
    drop(agent);
    drop(ca);
    tb.teardown_verified().unwrap();
}

#[test]
fn hbone_syns_reusing_a_tuple_the_agent_holds_in_time_wait_connect() {
    if !can_run("hostile pod: TIME_WAIT on 15008", &["ip", "ss"]) {
        return;
    }
    let tb = Testbed::build(TestbedSpec {
        nodes: 2,
        pods_per_node: 1,
    })
    .unwrap();
    let ca = TempDir::with_ca(&tb.info().run);
    let enrolled = pods(&[(1, 1)]);
    let agent = Agent::start_with_ca(&tb, 1, "mesh", &enrolled, Some(ca.path())).unwrap();
    // A peer outside the mesh (node 2 has no agent) dialling the enrolled pod's HBONE port from
    // one fixed source port, as a remote agent's port allocator may.
    let client = &tb.pod(2, 1);
    let server_pod = tb.pod(1, 1);
    let dst = sa(server_pod.ipv4, 15008);
    let src = sa(client.ipv4, 43210);
    let before = agent.counters();
    for attempt in 1..=3 {
        let mut s = client
            .place
            .in_netns(|| -> std::io::Result<TcpStream> {
                let sock =
                    socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                sock.set_reuse_address(true)?;
                sock.bind(&src.into())?;
                sock.connect_timeout(&dst.into(), Duration::from_secs(3))?;
                Ok(sock.into())
            })
            .unwrap()
            .unwrap_or_else(|e| panic!("attempt {attempt}: {src} -> {dst}: {e}"));
        // Not TLS: the agent gives up on the handshake and closes first, so it is the side
        // left holding the tuple in TIME_WAIT.
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
        drop(s);
        let tuple = format!("{}:15008", server_pod.ipv4);
        let peer = format!("{}:{}", client.ipv4, src.port());
        let held = (0..50).any(|_| {
            let ss = tb
                .node(1)
                .place
                .run("ss", &["-Htan", "state", "time-wait"])
                .unwrap_or_default();
            if ss.lines().any(|l| l.contains(&tuple) && l.contains(&peer)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
            false
        });
        assert!(
            held,
            "attempt {attempt}: the agent holds no TIME_WAIT for {peer} -> {tuple}"
        );
    }
    let after = agent.counters();
    assert!(
        after.get(Counter::CapturedOverTimeWait) - before.get(Counter::CapturedOverTimeWait) >= 2,
        "attempts 2 and 3 met the TIME_WAIT socket"
    );
    assert_eq!(
        after.get(Counter::DroppedNoListener),
        before.get(Counter::DroppedNoListener)
    );
    drop(agent);
    drop(ca);
    tb.teardown_verified().unwrap();
}
