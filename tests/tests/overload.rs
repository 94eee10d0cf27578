//! Overload: a non-mesh pod floods an enrolled pod's HBONE port with idle connections (no TLS
//! ClientHello ever comes) while other pods' traffic must still be served, and the agent must
//! keep its file descriptors (issue 15, item 2); the same pod floods it with TLS handshakes
//! (issue 18); and the metrics port gets an idle flood of its own. A well-behaved meshed
//! client's latency and connection rate are reported quiet and under each flood.
//!
//! Node 1's agent runs with RLIMIT_NOFILE 1024 soft / 4096 hard (prlimit): the agent must raise
//! the soft limit to the hard one, and a 20,000-connection flood is five times what it could
//! hold even then, so without admission control the limit is reached within a second and stays
//! reached for the 10 s TLS timeouts; with the host's limit the test would need hundreds of
//! thousands of connections to show the same.
mod support;

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::SocketAddr,
    process::{Child, ChildStdin, ChildStdout, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use mesh_testbed::metrics::{scrape, sum};
use mesh_testbed::{
    Place, Testbed, TestbedSpec, binaries, can_run,
    probe::{Probe, ProbeServer},
};
use support::{Agent, TempDir, pods};

const SPEC: TestbedSpec = TestbedSpec {
    nodes: 2,
    pods_per_node: 3,
};
/// Pods 1 and 2 of each node are enrolled, pod 3 is not.
const ENROLLED: [(usize, usize); 4] = [(1, 1), (1, 2), (2, 1), (2, 2)];
/// Node 1's agent's open-files limit: (soft, hard).
const NOFILE: (u64, u64) = (1024, 4096);
/// Idle connections in the flood, split over processes (a test process may hold 20,000
/// descriptors at most here, and cannot raise its hard limit).
const FLOOD: usize = 20_000;
const FLOODERS: usize = 2;
/// The agent's per-source cap on HBONE handshakes in flight (node/admission.rs).
const HANDSHAKES_PER_SOURCE: u64 = 64;

/// `mtb-probe hold` in a pod: idle connections held until its stdin closes.
struct Flooder {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Flooder {
    fn start(place: &Place, dst: SocketAddr, count: usize) -> Result<Self> {
        let probe = binaries::mtb_probe()?;
        let mut child = place
            .command(probe)?
            .args(["hold", &dst.to_string(), &count.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting mtb-probe hold")?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().context("stdout")?);
        Ok(Self {
            child,
            stdin,
            stdout,
        })
    }

    fn line(&mut self) -> Result<serde_json::Value> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("mtb-probe hold ended early");
        }
        Ok(serde_json::from_str(&line)?)
    }

    /// The TCP states of the held sockets, by name.
    fn states(&mut self) -> Result<serde_json::Value> {
        writeln!(self.stdin.as_mut().context("closed")?)?;
        self.line()
    }

    /// Closes every held connection (the process exits at EOF).
    fn close(mut self) -> Result<()> {
        drop(self.stdin.take());
        let status = self.child.wait()?;
        anyhow::ensure!(status.success(), "mtb-probe hold: {status}");
        Ok(())
    }
}

impl Drop for Flooder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn count(states: &serde_json::Value, state: &str) -> u64 {
    states[state].as_u64().unwrap_or(0)
}

/// Payload with a marker through `client -> dst`, checked end to end by the probe protocol.
fn send_marked(client: &Place, dst: SocketAddr, marker: &str) -> Result<()> {
    let mut p = Probe::connect(client, dst, Duration::from_secs(5))??;
    let hello = p.hello()?;
    anyhow::ensure!(hello["role"] == "server", "{hello}");
    p.finish_with_marker(marker, 64 << 10)
}

#[test]
fn an_idle_flood_on_15008_leaves_other_traffic_served() {
    if !can_run("overload", &["ip", "prlimit"]) {
        return;
    }
    let tb = Testbed::build(SPEC).unwrap();
    let ca = TempDir::with_ca(&tb.info().run);
    let enrolled = pods(&ENROLLED);
    let a1 = Agent::start_with_nofile(&tb, 1, &enrolled, ca.path(), NOFILE).unwrap();
    let a2 = Agent::start_with_ca(&tb, 2, "mesh", &enrolled, Some(ca.path())).unwrap();
    let _servers: Vec<_> = [(1, 2), (2, 2)]
        .iter()
        .map(|&(n, i)| ProbeServer::start(&tb.pod(n, i).place, &[8080]).unwrap())
        .collect();
    let p = |n, i| tb.pod(n, i);
    let target = SocketAddr::new(p(1, 2).ipv4.into(), 8080);
    let remote = SocketAddr::new(p(2, 2).ipv4.into(), 8080);
    // Before: inbound HBONE into node 1 and outbound from node 1 both work; the pooled HBONE
    // connections they leave are part of the baseline.
    send_marked(&p(2, 1).place, target, "WARM-IN").unwrap();
    send_marked(&p(1, 1).place, remote, "WARM-OUT").unwrap();
    let load_server = start_load_server(&tb);
    let (rr_quiet, conn_quiet) = well_behaved(&tb, "2");
    let baseline = a1.fd_count();

    let overflows_before = listen_overflows(&tb);
    // The flood: idle connections from the non-mesh pod 1-3 to pod 1-2's :15008.
    let hbone = SocketAddr::new(p(1, 2).ipv4.into(), 15008);
    let started = Instant::now();
    let mut flooders: Vec<Flooder> = (0..FLOODERS)
        .map(|_| Flooder::start(&p(1, 3).place, hbone, FLOOD / FLOODERS).unwrap())
        .collect();
    let mut opened = 0;
    for f in &mut flooders {
        let l = f.line().unwrap();
        opened += l["opened"].as_u64().unwrap();
    }
    assert_eq!(opened, FLOOD as u64, "the flood could not open its sockets");
    eprintln!(
        "{FLOOD} connects issued in {:.2}s",
        started.elapsed().as_secs_f64()
    );
    // Let the agent take in what it will (a refused connection is reset as soon as the agent
    // accepts it, so the flood settles once the backlog is drained — seconds on a loaded
    // machine; if connections are held instead, it does not settle at all).
    let mut max_fds = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = serde_json::Value::Null;
    while Instant::now() < deadline {
        max_fds = max_fds.max(a1.fd_count());
        let all: Vec<_> = flooders.iter_mut().map(|f| f.states().unwrap()).collect();
        let connecting: u64 = all.iter().map(|s| count(s, "connecting")).sum();
        let established: u64 = all.iter().map(|s| count(s, "established")).sum();
        last = serde_json::json!(all);
        if connecting == 0 && established <= 2 * HANDSHAKES_PER_SOURCE {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "flood states after {:.2}s: {last}; agent fds {} (baseline {baseline})",
        started.elapsed().as_secs_f64(),
        a1.fd_count()
    );

    // While the flood is held: an enrolled pod of node 2 reaches pod 1-2 through HBONE, and pod
    // 1-1's outbound connection is captured and carried, data intact.
    let inbound = send_marked(&p(2, 1).place, target, "DURING-IN");
    let outbound = send_marked(&p(1, 1).place, remote, "DURING-OUT");
    // A well-behaved client's latency and connection rate, quiet and under the flood: reported.
    let (rr_flood, conn_flood) = well_behaved(&tb, "2");
    eprintln!(
        "well-behaved client, quiet: rr {rr_quiet}, connections {conn_quiet}\n\
         during the idle flood: rr {rr_flood}, connections {conn_flood}"
    );
    assert!(
        rr_flood["requests"].as_u64().unwrap() > 0 && conn_flood["errors"] == 0,
        "the well-behaved client was not served during the flood: {rr_flood} {conn_flood}"
    );
    max_fds = max_fds.max(a1.fd_count());
    assert!(
        inbound.is_ok() && outbound.is_ok(),
        "traffic during the flood: inbound HBONE {inbound:?}, outbound {outbound:?}; agent fds {max_fds} of {}",
        NOFILE.1
    );

    // The agent kept its descriptors: the flood holds at most the per-source handshakes, well
    // inside the inbound budget (three quarters of the limit).
    assert!(
        max_fds < (NOFILE.1 * 3 / 4) as usize,
        "agent fds reached {max_fds} (limit {})",
        NOFILE.1
    );
    assert!(
        max_fds <= baseline + HANDSHAKES_PER_SOURCE as usize + 32,
        "agent fds {max_fds}, baseline {baseline}"
    );
    let states: Vec<_> = flooders.iter_mut().map(|f| f.states().unwrap()).collect();
    let reset: u64 = states.iter().map(|s| count(s, "reset")).sum();
    let held: u64 = states
        .iter()
        .map(|s| count(s, "established") + count(s, "close_wait"))
        .sum();
    let m = scrape(&tb, 1);
    let refused = sum(
        &m,
        "mesh_connections_refused",
        &[
            ("listener", "inbound_hbone"),
            ("reason", "handshake_per_source"),
        ],
    ) as u64;
    // A burst faster than the agent accepts overflows the listener's accept queue: the kernel
    // drops those handshakes' last ACK, the client believes it is connected, and its next
    // segment meets no socket and is answered with a reset the agent never saw. The kernel
    // counts each (TcpExtListenOverflows in node 1's namespace).
    let overflows = listen_overflows(&tb) - overflows_before;
    eprintln!(
        "flood: {reset} reset, {held} held; agent counted {refused} refusals, the kernel {overflows} accept-queue overflows"
    );
    // Every reset the flood saw is a counted refusal, and nearly the whole flood was refused:
    // at most the per-source handshakes were kept (twice, if a 10 s TLS timeout passed).
    assert!(
        refused + overflows >= reset,
        "{refused} refusals counted and {overflows} overflows, {reset} resets seen"
    );
    assert!(
        reset >= FLOOD as u64 - 2 * HANDSHAKES_PER_SOURCE,
        "only {reset} of {FLOOD} reset: {states:?}"
    );
    assert!(
        sum(&m, "mesh_hbone_handshakes_in_flight", &[]) <= HANDSHAKES_PER_SOURCE as f64,
        "handshakes in flight above the per-source cap"
    );
    // The agent raised its soft limit to the hard one.
    assert_eq!(sum(&m, "process_max_fds", &[]), NOFILE.1 as f64);
    assert_eq!(sum(&m, "mesh_fd_limit", &[]), NOFILE.1 as f64);
    assert_eq!(sum(&m, "mesh_inbound_fd_budget", &[]), 3072.0);

    // Closing the flood gives everything back.
    for f in flooders {
        f.close().unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (fds, inflight) = (
            a1.fd_count(),
            sum(&scrape(&tb, 1), "mesh_hbone_handshakes_in_flight", &[]),
        );
        if fds <= baseline + 4 && inflight == 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after the flood: agent fds {fds} (baseline {baseline}), handshakes {inflight}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    send_marked(&p(2, 1).place, target, "AFTER-IN").unwrap();
    drop((a1, a2, _servers, load_server));
    drop(ca);
    tb.teardown_verified().unwrap();
}

/// The agent's bounds on each HTTP endpoint (admin/limits.rs).
const ENDPOINT_PER_SOURCE: u64 = 16;
const ENDPOINT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// A pod that is not in the mesh opens 200 idle connections to the node's metrics port (which
/// listens on every address so Prometheus can scrape it): the agent keeps its per-source
/// share, resets and counts the rest, closes the kept ones when no request header comes in
/// time, and goes on answering the node's own scrapes and readiness probes throughout.
#[test]
fn an_idle_flood_on_the_metrics_port_is_capped_and_timed_out() {
    if !can_run("overload", &["ip"]) {
        return;
    }
    let tb = Testbed::build(TestbedSpec {
        nodes: 1,
        pods_per_node: 2,
    })
    .unwrap();
    let ca = TempDir::with_ca(&tb.info().run);
    let agent = Agent::start_with_ca(&tb, 1, "mesh", &pods(&[(1, 1)]), Some(ca.path())).unwrap();
    let baseline = agent.fd_count();
    let metrics_port = SocketAddr::new(tb.node(1).ipv4.into(), 15020);
    let mut flood = Flooder::start(&tb.pod(1, 2).place, metrics_port, 200).unwrap();
    let opened = flood.line().unwrap();
    assert_eq!(opened["opened"], 200, "{opened}");
    // Wait until the agent has accepted every connection (the admin thread runs at nice 19;
    // a connection still in its accept queue looks established from the pod's side).
    let deadline = Instant::now() + Duration::from_secs(8);
    let states = loop {
        let states = flood.states().unwrap();
        if count(&states, "reset") >= 200 - ENDPOINT_PER_SOURCE || Instant::now() > deadline {
            break states;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        count(&states, "established"),
        ENDPOINT_PER_SOURCE,
        "{states}"
    );
    assert_eq!(
        count(&states, "reset"),
        200 - ENDPOINT_PER_SOURCE,
        "{states}"
    );
    // The node's own scrape and readiness probe are served while the flood is held.
    let m = scrape(&tb, 1);
    let refused = sum(
        &m,
        "mesh_connections_refused",
        &[("listener", "metrics"), ("reason", "endpoint_per_source")],
    );
    assert_eq!(refused, (200 - ENDPOINT_PER_SOURCE) as f64);
    let (status, _) = mesh_testbed::http::http_get(
        &tb.node(1).place,
        "127.0.0.1:15021".parse().unwrap(),
        "GET",
        "/healthz/ready",
    )
    .unwrap();
    assert!(
        status.contains("200"),
        "readiness during the flood: {status}"
    );
    // No header ever comes: the agent closes the kept connections after its header timeout.
    let deadline = Instant::now() + ENDPOINT_HEADER_TIMEOUT + Duration::from_secs(5);
    loop {
        let states = flood.states().unwrap();
        if count(&states, "established") == 0 {
            assert_eq!(
                count(&states, "close_wait"),
                ENDPOINT_PER_SOURCE,
                "{states}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still held after the header timeout: {states}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    flood.close().unwrap();
    // Everything given back: a new connection from the same pod is admitted and served.
    let (status, _) =
        mesh_testbed::http::http_get(&tb.pod(1, 2).place, metrics_port, "GET", "/metrics").unwrap();
    assert!(status.contains("200"), "after the flood: {status}");
    let fds = agent.fd_count();
    assert!(fds <= baseline + 4, "agent fds {fds}, baseline {baseline}");
    drop(agent);
    drop(ca);
    tb.teardown_verified().unwrap();
}

/// TcpExtListenOverflows of node 1's network namespace (read from a thread inside it).
fn listen_overflows(tb: &Testbed) -> u64 {
    tb.node(1)
        .place
        .in_netns(|| {
            let text = std::fs::read_to_string("/proc/thread-self/net/netstat").unwrap();
            let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
            let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
            names
                .split_whitespace()
                .zip(values.split_whitespace())
                .find(|(n, _)| *n == "ListenOverflows")
                .map_or(0, |(_, v)| v.parse().unwrap())
        })
        .unwrap()
}

/// The benchmark servers in pod 1-2 that [`well_behaved`] measures against: request/response
/// on 9000, one exchange per connection on 9001.
fn start_load_server(tb: &Testbed) -> mesh_testbed::Background {
    let probe = binaries::mtb_probe().unwrap();
    let mut server = tb
        .pod(1, 2)
        .place
        .spawn(probe.to_str().unwrap(), &["load-server", "9000", "9001"])
        .unwrap();
    server.wait_listening(9001, Duration::from_secs(5)).unwrap();
    server
}

/// 1 KiB request/response latency and new-connection rate from pod 2-1 to pod 1-2 through
/// the mesh (HBONE into node 1), over `secs` each.
fn well_behaved(tb: &Testbed, secs: &str) -> (serde_json::Value, serde_json::Value) {
    let probe = binaries::mtb_probe().unwrap();
    let probe = probe.to_str().unwrap();
    let dst = |port: u16| SocketAddr::new(tb.pod(1, 2).ipv4.into(), port).to_string();
    let place = &tb.pod(2, 1).place;
    let rr = place.run(probe, &["rr", &dst(9000), secs]).unwrap();
    let conn = place
        .run(probe, &["connrate", &dst(9001), "4", secs])
        .unwrap();
    (
        serde_json::from_str(&rr).unwrap(),
        serde_json::from_str(&conn).unwrap(),
    )
}

/// A pod that is not in the mesh runs full TLS handshakes against an enrolled pod's HBONE
/// port as fast as 16 threads can (no client certificate: the agent does its key exchange and
/// signature, then refuses), while a meshed client on the other node keeps talking to that pod
/// and opening new connections to it. The client is served throughout (its latency and
/// connection rate, quiet and under the flood, are reported, not asserted), and every refused
/// handshake is counted.
#[test]
fn a_tls_handshake_flood_leaves_a_well_behaved_client_served() {
    if !can_run("overload", &["ip"]) {
        return;
    }
    let tb = Testbed::build(SPEC).unwrap();
    let ca = TempDir::with_ca(&tb.info().run);
    let enrolled = pods(&ENROLLED);
    let a1 = Agent::start_with_ca(&tb, 1, "mesh", &enrolled, Some(ca.path())).unwrap();
    let a2 = Agent::start_with_ca(&tb, 2, "mesh", &enrolled, Some(ca.path())).unwrap();
    let probe = binaries::mtb_probe().unwrap();
    let probe = probe.to_str().unwrap();
    let server = start_load_server(&tb);
    let (rr_quiet, conn_quiet) = well_behaved(&tb, "3");

    let hbone = SocketAddr::new(tb.pod(1, 2).ipv4.into(), 15008).to_string();
    let flood = tb
        .pod(1, 3)
        .place
        .spawn(probe, &["tls-flood", &hbone, "16", "10"])
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let (rr_flood, conn_flood) = well_behaved(&tb, "3");
    let out = flood.wait(Duration::from_secs(30)).unwrap();
    let flooded: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("tls-flood: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    eprintln!(
        "TLS flood: {flooded}\nwell-behaved client, quiet: rr {rr_quiet}, connections {conn_quiet}\n\
         during the flood: rr {rr_flood}, connections {conn_flood}"
    );
    let signed = flooded["server_signed"].as_u64().unwrap();
    assert!(
        signed > 0,
        "the flood did not get the agent to sign: {flooded}"
    );
    assert!(
        rr_flood["requests"].as_u64().unwrap() > 0,
        "no request/response during the flood: {rr_flood}"
    );
    assert!(
        conn_flood["connections"].as_u64().unwrap() > 0 && conn_flood["errors"] == 0,
        "new connections failed during the flood: {conn_flood}"
    );
    // Every handshake the agent signed for ended refused, and counted (each attempt that got
    // that far; the last ones may be counted a moment after the flood ends).
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        let refused = sum(
            &scrape(&tb, 1),
            "mesh_hbone_server_refusals",
            &[("reason", "tls_handshake_error")],
        ) as u64;
        if refused >= signed || Instant::now() > deadline {
            break refused;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        refused >= signed,
        "{signed} handshakes signed, {refused} refusals counted"
    );
    drop(server);
    drop((a1, a2));
    drop(ca);
    tb.teardown_verified().unwrap();
}

/// The memory cap: an agent above it (here 1 MiB, so from the start) refuses every new
/// connection, out of its node's pods and into them over HBONE, each counted by listener with
/// reason `memory` and logged, and `status` says what the cap is; the other node's agent, with
/// room, serves on. (That connections admitted before the cap was crossed are kept is checked
/// where admission is decided, in node/admission.rs.)
#[test]
fn above_its_memory_cap_an_agent_refuses_new_connections_counted_and_logged() {
    if !can_run("memory cap", &["ip"]) {
        return;
    }
    let tb = Testbed::build(SPEC).unwrap();
    let ca = TempDir::with_ca(&tb.info().run);
    let enrolled = pods(&ENROLLED);
    let mut a1 =
        Agent::start_with_flags(&tb, 1, &enrolled, ca.path(), &["--max-memory-mib", "1"]).unwrap();
    let a2 = Agent::start_with_ca(&tb, 2, "mesh", &enrolled, Some(ca.path())).unwrap();
    let _servers: Vec<_> = tb
        .pods()
        .iter()
        .map(|p| ProbeServer::start(&p.place, &[8080]).unwrap())
        .collect();
    let dst = |n, i| SocketAddr::new(tb.pod(n, i).ipv4.into(), 8080);
    let served = |from: (usize, usize), to: SocketAddr| {
        Probe::connect(&tb.pod(from.0, from.1).place, to, Duration::from_secs(5))
            .unwrap()
            .map_err(anyhow::Error::from)
            .and_then(|mut p| p.hello().and_then(|_| p.finish(4096)))
            .is_ok()
    };
    assert!(
        !served((1, 1), dst(2, 1)),
        "out of node 1: served above the cap"
    );
    assert!(
        !served((2, 1), dst(1, 1)),
        "into node 1: served above the cap"
    );
    assert!(served((2, 1), dst(2, 2)), "node 2 has room and serves");
    let m = scrape(&tb, 1);
    for listener in ["outbound", "inbound_hbone"] {
        let refused = sum(
            &m,
            "mesh_connections_refused",
            &[("listener", listener), ("reason", "memory")],
        );
        assert!(refused >= 1.0, "{listener}: {refused} refusals for memory");
    }
    let status = tb
        .node(1)
        .place
        .run(
            binaries::mesh_agent().unwrap().to_str().unwrap(),
            &["status"],
        )
        .unwrap();
    assert!(
        status.contains("memory cap 1 MiB (--max-memory-mib)"),
        "{status}"
    );
    let log = a1.stop().unwrap();
    assert!(
        log.contains("refusing connection") && log.contains("memory is above its cap"),
        "{log}"
    );
    drop(a2);
    tb.teardown_verified().unwrap();
}
