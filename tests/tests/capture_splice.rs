//! Same-node splicing (DESIGN.md §4 flow 6): the pod<->agent hop of a captured connection moves
//! its bytes socket to socket with sockmap, bypassing the TCP/IP stack, and loses or reorders
//! nothing — checked with 1 GiB through a real client process in the pod's cgroup, the pod's own
//! TCP segment counters, and the data path's splice counters — and holds no more than its bound
//! when the reader stops: the writer blocks, and the bytes arrive intact once it reads again.
mod support;

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::Stdio,
    time::Duration,
};

use mesh_common::{
    Counter,
    capture::{MAX_SK_MSG_BYTES, SPLICE_QUEUE_BYTES},
};
use mesh_testbed::{
    Place, Testbed, TestbedSpec, binaries, can_run,
    probe::{self, Probe},
};
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

/// `mtb-probe send` as a process in `place`.
fn send_from(place: &Place, dst: SocketAddr, bytes: u64) -> serde_json::Value {
    probe::send_process(place, dst, bytes).unwrap()
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
        let (spliced, deferred) = (
            d.get(Counter::SplicedBytes),
            d.get(Counter::SpliceDeferredBytes),
        );
        // Every byte went one way or the other.
        assert!(spliced + deferred >= bytes, "v6={v6} {d:?}");
        // A send takes TCP only once the agent is a whole bound behind on spliced bytes, so the
        // first bound's worth (less the one message that did not fit) is always spliced. How
        // much more depends on how often the agent falls that far behind: a speed figure, which
        // `cargo xtask bench` reports as `splice_share` (CI saw 89.5% here).
        assert!(
            spliced >= (SPLICE_QUEUE_BYTES - MAX_SK_MSG_BYTES).min(bytes),
            "v6={v6} {d:?}"
        );
        assert_eq!(d.get(Counter::SpliceFallbacks), 0, "v6={v6} {d:?}");
        // Through TCP these bytes would take at least bytes/64KiB segments (16,384 for 1 GiB even
        // with the largest GSO segments); spliced, only the handshake, the FIN and the deferred
        // sends remain (counted per MSS, ≥ 1,000 bytes here).
        assert!(
            segs < 100 + deferred / 1000,
            "v6={v6}: the pod sent {segs} TCP segments for {bytes} bytes ({deferred} deferred)"
        );
        eprintln!(
            "v6={v6}: {bytes} bytes in {:.2}s, {:.1}% spliced, pod sent {segs} TCP segments",
            got["seconds"].as_f64().unwrap(),
            100.0 * spliced as f64 / (spliced + deferred) as f64
        );
    }
    drop(agent);
    tb.teardown_verified().unwrap();
}

/// A probe server as a process in `place`, listening.
fn probe_server(place: &Place, port: u16) -> mesh_testbed::place::Background {
    probe::serve_process(place, port).unwrap()
}

#[test]
fn delivery_hop_to_an_enrolled_pod_is_spliced() {
    if !can_run("sockmap splicing (delivery)", &["ip"]) {
        return;
    }
    let tb = Testbed::build(SPEC).unwrap();
    let agent = Agent::start(&tb, 1, "passthrough", &pods(&[(1, 1)])).unwrap();
    let (server, client) = (tb.pod(1, 1), tb.pod(1, 2));
    let srv = probe_server(&server.place, 8080);
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
    // agent -> pod: the payload; pod -> agent: the server's two lines. The agent writes faster
    // than the probe server reads, so part of it waits its turn on TCP (the bound at work).
    let (spliced, deferred) = (
        d.get(Counter::SplicedBytes),
        d.get(Counter::SpliceDeferredBytes),
    );
    assert!(spliced + deferred >= bytes, "{d:?}");
    assert!(spliced > 0, "{d:?}");
    drop((srv, agent));
    tb.teardown_verified().unwrap();
}

/// The largest value of a `min default max` sysctl such as `tcp_rmem`, in `place`.
fn sysctl_max(place: &Place, name: &str) -> u64 {
    let text = place
        .run("cat", &[&format!("/proc/sys/net/ipv4/{name}")])
        .unwrap();
    text.split_whitespace().last().unwrap().parse().unwrap()
}

/// The bound (docs/ARCHITECTURE.md "Splicing"): both hops of a same-node connection spliced, the
/// server stops reading. The client must block after at most what the buffers on the way may
/// hold — for each hop the splice queue bound plus TCP's own send and receive buffers, plus the
/// agent's relay buffer — never because memory ran out; and each spliced socket's queue must stay
/// within the bound. Without the bound the writer never blocks: a 256 MiB write went straight
/// into the reader's queue (or failed with ENOMEM).
#[test]
fn a_reader_that_stops_blocks_the_writer_within_the_bound() {
    if !can_run("sockmap splicing (bound)", &["ip"]) {
        return;
    }
    let tb = Testbed::build(SPEC).unwrap();
    let agent = Agent::start(&tb, 1, "passthrough", &pods(&[(1, 1), (1, 2)])).unwrap();
    let (server, client) = (tb.pod(1, 1), tb.pod(1, 2));
    let probe = binaries::mtb_probe().unwrap();
    let probe = probe.to_str().unwrap();
    let hold = 8;
    let mut sink = server
        .place
        .spawn(probe, &["sink", "8090", &hold.to_string()])
        .unwrap();
    sink.wait_listening(8090, Duration::from_secs(10)).unwrap();
    let before = agent.counters();
    let total: u64 = 256 << 20;
    let dst = SocketAddr::new(server.ipv4.into(), 8090);
    let mut writer = client
        .place
        .command(probe)
        .unwrap()
        .args(["stall-send", &dst.to_string(), &total.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(writer.stdout.take().unwrap()).lines();
    let first: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    let stalled_at = first["stalled_at"]
        .as_u64()
        .unwrap_or_else(|| panic!("the writer never blocked: {first}"));
    // While the writer is blocked: what each spliced socket holds unread.
    let queues = agent.maps().splice_queues().unwrap();
    let most_queued = queues
        .iter()
        .map(|q| q.spliced_sent - q.spliced_read)
        .max()
        .unwrap_or(0);
    let (wmem, rmem) = (
        sysctl_max(&client.place, "tcp_wmem"),
        sysctl_max(&client.place, "tcp_rmem"),
    );
    let relay = 4 << 20;
    let allowed = 2 * (SPLICE_QUEUE_BYTES + wmem + rmem) + relay;
    eprintln!(
        "writer blocked after {stalled_at} bytes (allowed {allowed}); largest splice queue \
         {most_queued} bytes over {} sockets",
        queues.len()
    );
    assert!(
        most_queued <= SPLICE_QUEUE_BYTES,
        "a spliced socket holds {most_queued} unread bytes: {queues:?}"
    );
    assert!(
        stalled_at <= allowed,
        "the writer got {stalled_at} bytes in against a stopped reader (allowed {allowed})"
    );
    // The reader resumes after `hold` seconds: everything arrives, in order.
    let done: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(done["sent"], total, "{done}");
    let out = sink.wait(Duration::from_secs(120)).unwrap();
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["bytes"], total, "{got}");
    assert_eq!(got["intact"], true, "{got}");
    assert!(writer.wait().unwrap().success());
    let d = agent.counters().since(&before);
    assert!(d.get(Counter::SplicedBytes) > 0, "{d:?}");
    assert!(d.get(Counter::SpliceDeferredBytes) > 0, "{d:?}");
    drop(agent);
    tb.teardown_verified().unwrap();
}

/// Entries of the splice maps in the agent's pinned `maps` directory: (sockets, queues).
fn splice_entries(agent: &Agent) -> (u64, u64) {
    use mesh_common::capture::{SPLICE_QUEUE_MAP, SPLICE_SOCKETS_MAP};
    let occupancy = agent.maps().occupancy(10_000);
    let entries = |name: &str| {
        occupancy
            .iter()
            .find(|m| m.name == name)
            .map_or(0, |m| m.entries)
    };
    (entries(SPLICE_SOCKETS_MAP), entries(SPLICE_QUEUE_MAP))
}

/// Writes one entry into a pinned map with bpftool (hex bytes, as the kernel stores them).
fn map_update(map: &std::path::Path, key: &[u8], value: &[u8]) {
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>();
    let mut args = vec!["map".to_owned(), "update".into(), "pinned".into()];
    args.push(map.display().to_string());
    args.push("key".into());
    args.push("hex".into());
    args.extend(hex(key));
    args.push("value".into());
    args.push("hex".into());
    args.extend(hex(value));
    let out = std::process::Command::new("bpftool")
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Splice entries leave with their socket: at `TCP_CLOSE` when a sock_ops program sees it, or by
/// the agent's sweep when none did (a pod that left the capture, an agent restarted with
/// `--splice=off`). The sweep is given such leftovers (written as they would be left) and must
/// remove them — and nothing of a live connection.
#[test]
fn splice_entries_leave_with_their_socket() {
    if !can_run("sockmap splicing (entries)", &["ip", "bpftool"]) {
        return;
    }
    use mesh_agent::capture::splice_sweep::SpliceSweeper;
    use mesh_common::capture::{SPLICE_QUEUE_MAP, SPLICE_SOCKETS_MAP};
    let tb = Testbed::build(SPEC).unwrap();
    let agent = Agent::start(&tb, 1, "passthrough", &pods(&[(1, 1)])).unwrap();
    let (server, client) = (tb.pod(1, 1), tb.pod(1, 2));
    let srv = probe_server(&server.place, 8080);
    let dst = SocketAddr::new(server.ipv4.into(), 8080);
    let mut p = Probe::connect(&client.place, dst, Duration::from_secs(5))
        .unwrap()
        .unwrap();
    p.hello().unwrap();
    // The agent's delivery socket and the server's socket joined.
    assert_eq!(splice_entries(&agent), (2, 2));
    // What a socket that closed unseen leaves: its entry (a key no longer in the sockhash) and
    // its queue.
    let maps = agent.bpffs.join("maps");
    let gone_address = 0xffff_8880_dead_0000u64.to_ne_bytes();
    let mut gone_key = [0u8; 40];
    gone_key[..36].fill(0x5a);
    gone_key[36] = 1; // side: pod
    map_update(&maps.join(SPLICE_SOCKETS_MAP), &gone_key, &gone_address);
    map_update(&maps.join(SPLICE_QUEUE_MAP), &gone_address, &[0u8; 40]);
    assert_eq!(splice_entries(&agent), (3, 3));
    let mut sweeper = SpliceSweeper::default();
    let first = sweeper.sweep(&maps).unwrap();
    let second = sweeper.sweep(&maps).unwrap();
    // The queue goes on the second look (a joining socket has its queue before its entry).
    assert_eq!((first.sockets, first.queues), (1, 0), "{first:?}");
    assert_eq!((second.sockets, second.queues), (0, 1), "{second:?}");
    assert_eq!(
        splice_entries(&agent),
        (2, 2),
        "the sweep took a live socket's entries"
    );
    // The connection ends: both sockets are seen closing.
    p.finish(1 << 20).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while splice_entries(&agent) != (0, 0) {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            splice_entries(&agent)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop((srv, agent));
    tb.teardown_verified().unwrap();
}
