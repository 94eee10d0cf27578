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
    traffic::connect_from_port,
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
        let mut s = connect_from_port(&client.place, src, dst, Duration::from_secs(3))
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

/// Issue #15 item 7: when an agent dies, the applications on both ends of a live connection see
/// a reset, never a clean end of stream that would pass a truncated transfer off as complete.
#[test]
fn a_dying_agent_resets_live_connections_on_both_ends() {
    if !can_run("hostile pod: agent death", &["ip"]) {
        return;
    }
    let tb = Testbed::build(TestbedSpec {
        nodes: 2,
        pods_per_node: 1,
    })
    .unwrap();
    let ca = TempDir::with_ca(&tb.info().run);
    let enrolled = pods(&[(1, 1), (2, 1)]);
    let mut a1 = Agent::start_with_ca(&tb, 1, "mesh", &enrolled, Some(ca.path())).unwrap();
    let a2 = Agent::start_with_ca(&tb, 2, "mesh", &enrolled, Some(ca.path())).unwrap();
    let (client_pod, server_pod) = (tb.pod(1, 1), tb.pod(2, 1));
    let dst = sa(server_pod.ipv4, 9000);
    let listener = server_pod
        .place
        .in_netns(|| TcpListener::bind(dst))
        .unwrap()
        .unwrap();
    let mut client = client_pod
        .place
        .in_netns(|| TcpStream::connect_timeout(&dst, Duration::from_secs(5)))
        .unwrap()
        .unwrap();
    let (mut server, peer) = listener.accept().unwrap();
    assert_eq!(peer.ip(), IpAddr::from(client_pod.ipv4));
    // Live both ways through both agents.
    client.write_all(&[7u8; 1000]).unwrap();
    let mut buf = [0u8; 1000];
    server.read_exact(&mut buf).unwrap();
    server.write_all(&buf).unwrap();
    client.read_exact(&mut buf).unwrap();
    let captured = a1.counters().get(Counter::CapturedOutbound);
    assert!(captured >= 1, "the connection went through the agent");

    a1.kill().unwrap();
    for (end, s) in [("client", &mut client), ("server", &mut server)] {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let got = s.read(&mut buf);
        assert!(
            matches!(&got, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "the {end} saw {got:?} when the source agent died, not a reset"
        );
    }
    drop(a2);
    drop(a1);
    drop(ca);
    tb.teardown_verified().unwrap();
}

/// Issue #15 item 8: a pod that leaves the mesh right after many server-first connections (the
/// agent holding their tuples in TIME_WAIT) connects at once from colliding ports.
#[test]
fn a_pod_leaving_the_mesh_connects_at_once_from_ports_the_agent_held_in_time_wait() {
    if !can_run("hostile pod: leaving the mesh", &["ip", "ss"]) {
        return;
    }
    /// Server-first connections before leaving, and colliding ones after (the figures).
    const BEFORE: u16 = 5000;
    const N: u16 = 200;
    const FIRST_PORT: u16 = 46000;
    let tb = Testbed::build(TestbedSpec {
        nodes: 1,
        pods_per_node: 3,
    })
    .unwrap();
    // Pod 3 stays enrolled: un-enrolling every pod at once needs an explicit flag.
    let enrolled = pods(&[(1, 1), (1, 3)]);
    let mut agent = Agent::start(&tb, 1, "passthrough", &enrolled).unwrap();
    let (client, server) = (tb.pod(1, 1), tb.pod(1, 2));
    let dst = sa(server.ipv4, 9100);
    // A server that closes first, every time.
    let listener = server
        .place
        .in_netns(|| TcpListener::bind(dst))
        .unwrap()
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acceptor = {
        let stop = std::sync::Arc::clone(&stop);
        listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => drop(s),
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        })
    };
    let connect_on = |port: u16| {
        connect_from_port(
            &client.place,
            sa(client.ipv4, port),
            dst,
            Duration::from_secs(2),
        )
        .unwrap()
    };
    for port in FIRST_PORT..FIRST_PORT + BEFORE {
        let mut s = connect_on(port).unwrap_or_else(|e| panic!("port {port}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.read(&mut [0u8; 1]);
    }
    let time_wait = |place: &mesh_testbed::Place| {
        place
            .run("ss", &["-Htan", "state", "time-wait"])
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&format!("{}:", client.ipv4)))
            .count()
    };
    let held = time_wait(&tb.node(1).place);
    assert!(
        held >= usize::from(BEFORE) * 9 / 10,
        "the agent holds {held} TIME_WAIT sockets of the pod"
    );

    agent.set_enrolled(&tb, &pods(&[(1, 3)])).unwrap();
    let started = std::time::Instant::now();
    let failed: Vec<String> = (FIRST_PORT..FIRST_PORT + N)
        .filter_map(|port| connect_on(port).err().map(|e| format!("{port}: {e}")))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {N} connections from colliding ports failed after leaving the mesh: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    eprintln!(
        "{N} connections from colliding ports in {:?}",
        started.elapsed()
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    acceptor.join().unwrap();
    drop(agent);
    tb.teardown_verified().unwrap();
}

/// Issue #15 item 7: a connection started while the destination's agent is down (its SYNs are
/// dropped: fail closed) goes through within a second of the agent's return, not after the
/// kernel's SYN back-off.
#[test]
fn a_connection_started_while_the_peer_agent_is_down_goes_through_soon_after_it_returns() {
    if !can_run("hostile pod: peer agent restart", &["ip"]) {
        return;
    }
    let tb = Testbed::build(TestbedSpec {
        nodes: 2,
        pods_per_node: 1,
    })
    .unwrap();
    let ca = TempDir::with_ca(&tb.info().run);
    let enrolled = pods(&[(1, 1), (2, 1)]);
    let a1 = Agent::start_with_ca(&tb, 1, "mesh", &enrolled, Some(ca.path())).unwrap();
    let mut a2 = Agent::start_with_ca(&tb, 2, "mesh", &enrolled, Some(ca.path())).unwrap();
    let (client_pod, server_pod) = (tb.pod(1, 1), tb.pod(2, 1));
    let dst = sa(server_pod.ipv4, 9000);
    let listener = server_pod
        .place
        .in_netns(|| TcpListener::bind(dst))
        .unwrap()
        .unwrap();
    let echo = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut b = [0u8; 5];
        s.read_exact(&mut b).unwrap();
        s.write_all(&b).unwrap();
    });
    a2.kill().unwrap();
    let place = client_pod.place.clone();
    let started = std::time::Instant::now();
    let client = std::thread::spawn(move || {
        let mut s = place
            .in_netns(|| TcpStream::connect_timeout(&dst, Duration::from_secs(5)))
            .unwrap()
            .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(b"hello").unwrap();
        let mut b = [0u8; 5];
        s.read_exact(&mut b).map(|()| std::time::Instant::now())
    });
    // The agent comes back after the kernel's linear SYN retries (`tcp_syn_linear_timeouts`,
    // 4 by default: SYNs at 0, 1, 2, 3, 4 s) have given way to its back-off (6, 10, 18 s): on
    // its own the dial would wait until 10 s.
    std::thread::sleep(Duration::from_millis(6200).saturating_sub(started.elapsed()));
    a2.restart(&tb, &enrolled).unwrap();
    let back = std::time::Instant::now();
    let done = client.join().unwrap().expect("the connection went through");
    let waited = done.saturating_duration_since(back);
    eprintln!(
        "agent back {:?} after the first dial; connected {waited:?} later",
        back - started
    );
    assert!(
        back - started < Duration::from_millis(9500),
        "the restart took too long for this test to tell anything"
    );
    assert!(
        waited < Duration::from_millis(1500),
        "the connection waited {waited:?} after the destination's agent was back"
    );
    echo.join().unwrap();
    drop(a1);
    drop(a2);
    drop(ca);
    tb.teardown_verified().unwrap();
}
