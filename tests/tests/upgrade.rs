//! Agent upgrades and crashes (issue #18): a new agent started beside the running one takes the
//! data path over without refusing a connection, the old one keeps the connections it owns
//! until they end and exits when told to; an agent killed with SIGKILL is replaced by a restarted
//! one while the capture fails closed (refusals, never plaintext on the fabric).
mod support;

use std::{
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};

use mesh_testbed::{
    Background, Place, TestbedSpec, binaries, can_run,
    probe::{Probe, ProbeServer},
    soak::{ClientPlan, MARKER},
};
use support::{Mesh, finish, pods, sniffer::Sniffer};

const SPEC: TestbedSpec = TestbedSpec {
    nodes: 2,
    pods_per_node: 2,
};
const ENROLLED: [(usize, usize); 4] = [(1, 1), (1, 2), (2, 1), (2, 2)];

/// How long the connections held across the upgrade live (the two minutes).
const HELD: Duration = Duration::from_secs(120);
/// Pace of the long transfer: 256 KiB every 100 ms (about 300 MiB in all).
const CHUNK: u64 = 256 << 10;
const CHUNK_EVERY: Duration = Duration::from_millis(100);
/// New connections per second in each connect loop.
const LOOP_RATE: &str = "20";

/// A load server (`once` port 9001: one 1 KiB exchange per connection) in `place`.
fn load_server(place: &Place) -> Background {
    let probe = binaries::mtb_probe().unwrap();
    let mut server = place
        .spawn(probe.to_str().unwrap(), &["load-server", "9000", "9001"])
        .unwrap();
    server.wait_listening(9001, Duration::from_secs(5)).unwrap();
    server
}

/// A paced connect loop from `from` to `to`:9001 for `secs`, in the pod (its cgroup too).
fn connect_loop(from: &Place, to: SocketAddr, secs: u64) -> Background {
    let probe = binaries::mtb_probe().unwrap();
    from.spawn(
        probe.to_str().unwrap(),
        &[
            "connect-loop",
            &SocketAddr::new(to.ip(), 9001).to_string(),
            LOOP_RATE,
            &secs.to_string(),
        ],
    )
    .unwrap()
}

/// The loop's report, after checking it saw no refusal and no failure at all.
fn loop_report(what: &str, bg: Background, secs: u64) -> serde_json::Value {
    let out = bg.wait(Duration::from_secs(secs + 60)).unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{what}: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    eprintln!("{what}: {report}");
    assert!(
        report["attempts"].as_u64().unwrap() > 100,
        "{what}: {report}"
    );
    assert_eq!(
        report["refused"], 0,
        "{what}: refusals during the upgrade: {report}"
    );
    assert_eq!(
        report["failed"], 0,
        "{what}: failures during the upgrade: {report}"
    );
    report
}

#[test]
fn an_upgrade_refuses_nothing_and_drops_nothing() {
    if !can_run("agent upgrade side by side", &["ip"]) {
        return;
    }
    let Mesh {
        tb,
        ca,
        a1: old,
        a2,
    } = Mesh::start(SPEC, &ENROLLED);
    let servers: Vec<_> = tb
        .pods()
        .iter()
        .map(|p| ProbeServer::start(&p.place, &[8080]).unwrap())
        .collect();
    let loads: Vec<_> = tb.pods().iter().map(|p| load_server(&p.place)).collect();
    let p = |n, i| tb.pod(n, i);
    let dst = |n, i| SocketAddr::new(p(n, i).ip(false), 8080);
    let loop_secs = HELD.as_secs() + 10;

    // Connections the old agent owns: a long transfer out of node 1 (its outbound relay), an
    // idle connection into node 1 (its HBONE server), each for two minutes.
    let transfer = {
        let mut probe = Probe::connect(&p(1, 1).place, dst(2, 1), Duration::from_secs(5))
            .unwrap()
            .unwrap();
        probe.hello().unwrap();
        thread::spawn(move || {
            let started = Instant::now();
            let mut sent = 0;
            while started.elapsed() < HELD {
                probe.send(CHUNK).unwrap();
                sent += CHUNK;
                thread::sleep(CHUNK_EVERY);
            }
            probe.finish(sent).map(|()| sent)
        })
    };
    let idle = {
        let mut probe = Probe::connect(&p(2, 2).place, dst(1, 2), Duration::from_secs(5))
            .unwrap()
            .unwrap();
        probe.hello().unwrap();
        probe.send(1000).unwrap();
        thread::spawn(move || {
            thread::sleep(HELD);
            probe.finish(2000)
        })
    };
    // New connections throughout: out of node 1, into node 1, and on node 1.
    let loops = [
        (
            "node1 -> node2",
            connect_loop(&p(1, 1).place, dst(2, 2), loop_secs),
        ),
        (
            "node2 -> node1",
            connect_loop(&p(2, 1).place, dst(1, 1), loop_secs),
        ),
        (
            "node1 -> node1",
            connect_loop(&p(1, 2).place, dst(1, 1), loop_secs),
        ),
    ];
    thread::sleep(Duration::from_secs(5));

    // The new agent starts beside the old one and takes over.
    let (mut new, took) = old.start_successor(&tb).unwrap();
    eprintln!(
        "takeover: {:.0} ms from the new agent's start to its readiness",
        took.as_secs_f64() * 1e3
    );
    let mut old = old;
    assert!(
        old.running(),
        "the old agent keeps running after handing over"
    );
    // Only the new agent's program is on the pod's interface: the old agent let go of its
    // links, so they went when the new one replaced their pins.
    let veth = p(1, 1).host_veth.clone();
    let programs = tb
        .node(1)
        .place
        .in_netns(move || -> anyhow::Result<u32> {
            let ifindex = mesh_agent::ebpf::ifindex_of(&veth)?;
            mesh_testbed::bpf_test_run::tcx_ingress_programs(ifindex)
        })
        .unwrap()
        .unwrap();
    assert_eq!(programs, 1, "programs in the pod interface's tcx chain");
    // As the DaemonSet controller does once the new pod is ready.
    old.signal_stop().unwrap();
    thread::sleep(Duration::from_secs(10));
    assert!(
        old.running(),
        "the old agent must stay while its connections live"
    );
    // New connections are the new agent's, in both directions: its metrics count them. Into
    // node 1 that takes node 2's agent leaving the old agent's HBONE connection (GOAWAY).
    let scrape = mesh_testbed::metrics::scrape(&tb, 1);
    let from_node2 = p(2, 1).name();
    for (what, labels) in [
        ("out of node 1", vec![("reporter", "source")]),
        (
            "into node 1 from node 2",
            vec![("reporter", "destination"), ("source_workload", from_node2)],
        ),
    ] {
        let opened = mesh_testbed::metrics::sum(&scrape, "istio_tcp_connections_opened", &labels);
        assert!(
            opened > 0.0,
            "the new agent serves new connections {what} (opened {opened})"
        );
    }
    let sent = transfer
        .join()
        .unwrap()
        .expect("the long transfer completes intact");
    idle.join()
        .unwrap()
        .expect("the idle connection completes intact");
    eprintln!(
        "held across the upgrade: {} MiB transfer, one idle connection",
        sent >> 20
    );
    // Its last connections ended: the old agent exits by itself.
    let (status, log) = old.wait_exit(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "old agent: {status}\n{log}");
    assert!(log.contains("data path handed over"), "{log}");
    for (what, bg) in loops {
        loop_report(what, bg, loop_secs);
    }
    assert!(new.running(), "the new agent serves on");
    drop((servers, loads, new, a2));
    finish(tb, ca);
}

#[test]
fn after_sigkill_a_restarted_agent_serves_again_and_nothing_leaks_in_plaintext() {
    if !can_run("agent crash and restart", &["ip", "tcpdump"]) {
        return;
    }
    let Mesh {
        tb,
        ca,
        a1: mut agent,
        a2,
    } = Mesh::start(SPEC, &ENROLLED);
    let _servers: Vec<_> = tb
        .pods()
        .iter()
        .map(|p| ProbeServer::start(&p.place, &[8080]).unwrap())
        .collect();
    let client = &tb.pod(1, 1).place;
    let dst = SocketAddr::new(tb.pod(2, 1).ip(false), 8080);
    // Connections busy both ways through node 1 when its agent dies: out of pod 1.1, and into
    // pod 1.2. What the pods send before they see the agent's reset (and what was in flight)
    // has no socket left to go to, and must not leave the node as it is.
    let probe = binaries::mtb_probe().unwrap();
    let probe = probe.to_str().unwrap();
    let echo: Vec<Background> = [(2, 1), (1, 2)]
        .iter()
        .map(|&(n, p)| {
            let mut s = tb
                .pod(n, p)
                .place
                .spawn(probe, &["soak-server", "8090"])
                .unwrap();
            s.wait_listening(8090, Duration::from_secs(5)).unwrap();
            s
        })
        .collect();
    let busy: Vec<Background> = [((1, 1), (2, 1)), ((2, 2), (1, 2))]
        .iter()
        .map(|&(from, to)| {
            let plan = ClientPlan {
                targets: vec![SocketAddr::new(tb.pod(to.0, to.1).ip(false), 8090)],
                connections: 4,
                lifetime_ms: (20_000, 20_000),
                interval_ms: (0, 2),
                chunk: 8 << 10,
                churn_per_sec: 0,
                duration_ms: 4_000,
                ramp_ms: 50,
                stall_ms: 10_000,
                seed: 7,
            };
            let plan = serde_json::to_string(&plan).unwrap();
            tb.pod(from.0, from.1)
                .place
                .spawn(probe, &["soak-client", &plan])
                .unwrap()
        })
        .collect();
    // Everything but HBONE: the applications' own ports must not show up at all.
    let sniffer = Sniffer::start_filtered(&tb.info().fabric, "br0", "tcp and not port 15008");
    thread::sleep(Duration::from_millis(1000));
    agent.kill().unwrap();
    // While no agent runs, the pod's connections are refused (fail closed), never sent as is.
    for _ in 0..5 {
        match Probe::connect(client, dst, Duration::from_secs(2)).unwrap() {
            Ok(p) => {
                let r = p.finish_with_marker("PLAINTEXT-WHILE-DOWN", 4096);
                assert!(r.is_err(), "a connection was served with no agent running");
            }
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}"),
        }
    }
    // The restart: from exec to the first connection served through the mesh.
    let started = Instant::now();
    agent.restart(&tb, &pods(&ENROLLED)).unwrap();
    let served = loop {
        if let Ok(Ok(mut p)) = Probe::connect(client, dst, Duration::from_secs(2))
            && p.hello().is_ok()
            && p.finish_with_marker("MESH-AFTER-RESTART", 4096).is_ok()
        {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "never served again"
        );
        thread::sleep(Duration::from_millis(5));
    };
    eprintln!(
        "restart after SIGKILL: first connection served {:.0} ms after the new agent's exec",
        served.as_secs_f64() * 1e3
    );
    for client in busy {
        let out = client.wait(Duration::from_secs(30)).unwrap();
        let report: mesh_testbed::soak::ClientReport = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
        // The kill met them busy: they carried bytes, and it ended them.
        assert!(
            report.bytes > 0 && !report.not_completed.is_empty(),
            "the busy connections were not busy when the agent died: {report:?}"
        );
    }
    drop(echo);
    let seen = sniffer.stop();
    let marker = String::from_utf8_lossy(MARKER);
    assert!(
        !seen.contains(&*marker),
        "bytes of connections the killed agent held crossed the fabric in plaintext:\n{seen}"
    );
    assert!(
        !seen.contains("PLAINTEXT-WHILE-DOWN"),
        "plaintext on the fabric:\n{seen}"
    );
    assert!(
        !seen.contains("MESH-AFTER-RESTART"),
        "plaintext on the fabric:\n{seen}"
    );
    drop((agent, a2));
    finish(tb, ca);
}
