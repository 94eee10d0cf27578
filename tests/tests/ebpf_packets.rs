//! Fuzzing the capture's packet parsing in the kernel (issue #18): generated frames are run
//! through the agent's own pinned programs with `BPF_PROG_TEST_RUN` and each verdict is checked
//! against what the frame's bytes say (`support::pktgen`):
//! - `mesh_tc_from_pod`, as if an enrolled pod sent them: a spoofed or unparseable packet from
//!   an enrolled pod never passes, a parseable one of the pod's own is never dropped;
//! - `mesh_tc_to_pods`, as if they arrived on another pod's interface: unparseable TCP towards
//!   the enrolled pod never passes, nothing else is dropped.
//!
//! `MESH_EBPF_FUZZ_FRAMES` sets how many frames (default 1,000,000, about 2 s);
//! `MESH_EBPF_FUZZ_SEED` replays a run (the seed is printed).
mod support;

use std::{collections::BTreeMap, time::Instant};

use mesh_testbed::{
    Testbed, TestbedSpec,
    bpf_test_run::{PinnedProgram, TC_ACT_SHOT},
    can_run,
};
use support::{
    Agent,
    pktgen::{self, Expect},
    pods,
};

const SPEC: TestbedSpec = TestbedSpec {
    nodes: 1,
    pods_per_node: 2,
};

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Verdicts by expectation, and the first frames whose verdict broke it.
type Outcome = (BTreeMap<String, u64>, Vec<String>);

/// Runs `frames` generated frames through `prog` on interface `ifindex`, from `place`'s
/// network namespace (the program reads the interface from the context and looks sockets up
/// in its namespace).
fn fuzz(
    place: &mesh_testbed::Place,
    prog: PinnedProgram,
    ifindex: u32,
    frames: u64,
    seed: u64,
    generate: impl Fn(&mut pktgen::Rng) -> (Vec<u8>, Expect) + Send + 'static,
) -> Outcome {
    place
        .in_netns(move || {
            let mut rng = pktgen::Rng::new(seed);
            let mut tally: BTreeMap<String, u64> = BTreeMap::new();
            let mut wrong = Vec::new();
            for i in 0..frames {
                let (frame, expect) = generate(&mut rng);
                let Some(verdict) = prog.run_tc(&frame, ifindex).unwrap() else {
                    *tally
                        .entry("not run: the kernel's harness refuses the frame".into())
                        .or_default() += 1;
                    continue;
                };
                let dropped = verdict == TC_ACT_SHOT;
                let (ok, key) = match expect {
                    Expect::Drop(why) => (dropped, format!("drop: {why}")),
                    Expect::Pass => (!dropped, "pass".to_owned()),
                    Expect::Either => (true, "either".to_owned()),
                };
                *tally.entry(key).or_default() += 1;
                if !ok && wrong.len() < 10 {
                    wrong.push(format!(
                        "frame {i}: expected {expect:?}, program answered {verdict}: {}",
                        frame.iter().map(|b| format!("{b:02x}")).collect::<String>()
                    ));
                }
            }
            (tally, wrong)
        })
        .unwrap()
}

/// Fails on any broken verdict, or when the generator missed one of `kinds` (fewer than one
/// frame in a thousand).
fn check(program: &str, (tally, wrong): Outcome, frames: u64, seed: u64, kinds: &[&str]) {
    eprintln!("{program}: {frames} frames (seed {seed}): {tally:?}");
    assert!(
        wrong.is_empty(),
        "{program}, seed {seed}: verdicts that break the capture's invariants:\n{}",
        wrong.join("\n")
    );
    for kind in kinds {
        assert!(
            tally.get(*kind).copied().unwrap_or(0) > frames / 1000,
            "{program}: too few frames of kind {kind:?}: {tally:?}"
        );
    }
}

#[test]
fn generated_frames_get_the_verdict_their_bytes_call_for() {
    if !can_run("eBPF packet fuzzing", &["ip"]) {
        return;
    }
    let tb = Testbed::build(SPEC).unwrap();
    let enrolled = pods(&[(1, 1)]);
    let agent = Agent::start(&tb, 1, "passthrough", &enrolled).unwrap();
    let enrolled_if = *agent.ifindexes(&tb, &enrolled).unwrap().first().unwrap();
    let bystander_if = *agent
        .ifindexes(&tb, &pods(&[(1, 2)]))
        .unwrap()
        .first()
        .unwrap();
    let p = tb.pod(1, 1);
    let pod = || pktgen::Pod {
        ipv4: p.ipv4,
        ipv6: match p.ip(true) {
            std::net::IpAddr::V6(a) => a,
            other => panic!("{other}"),
        },
    };
    let frames = env_u64("MESH_EBPF_FUZZ_FRAMES").unwrap_or(1_000_000);
    let seed = env_u64("MESH_EBPF_FUZZ_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    let progs = agent.bpffs().join("progs");
    let place = &tb.node(1).place;
    let started = Instant::now();

    let from = pod();
    let outcome = fuzz(
        place,
        PinnedProgram::open(&progs.join("mesh_tc_from_pod")).unwrap(),
        enrolled_if,
        frames,
        seed,
        move |rng| pktgen::frame(rng, &from),
    );
    check(
        "mesh_tc_from_pod",
        outcome,
        frames,
        seed,
        &[
            "pass",
            "drop: spoofed IPv4 source",
            "drop: spoofed IPv6 source",
            "drop: spoofed ARP sender",
            "drop: VLAN tag",
            "drop: IPv4 fragment",
            "drop: TCP header truncated",
            "drop: forbidden destination",
            "drop: TCP (or ESP) behind IPv6 extension headers",
        ],
    );

    let to = pod();
    let outcome = fuzz(
        place,
        PinnedProgram::open(&progs.join("mesh_tc_to_pods")).unwrap(),
        bystander_if,
        frames,
        seed,
        move |rng| {
            let f = pktgen::frame_to(rng, &to);
            let e = pktgen::judge_inbound(&f, &to);
            (f, e)
        },
    );
    check(
        "mesh_tc_to_pods",
        outcome,
        frames,
        seed,
        &["pass", "drop: unparseable TCP to the enrolled pod"],
    );
    eprintln!("both programs in {:.1} s", started.elapsed().as_secs_f64());
    drop(agent);
    tb.teardown_verified().unwrap();
}

/// An IPv4 TCP segment (ACK|PSH, `payload` after the header) from `src` to `dst`, as a pod
/// would put it on its interface.
fn tcp_segment(
    src: std::net::SocketAddrV4,
    dst: std::net::SocketAddrV4,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = vec![0u8; 14];
    f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 2]);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let total = (20 + 20 + payload.len()) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[6] = 0x40; // DF, no fragment offset
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src.ip().octets());
    ip[16..20].copy_from_slice(&dst.ip().octets());
    let sum = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum::<u32>();
    let sum = (sum & 0xffff) + (sum >> 16);
    ip[10..12].copy_from_slice(&(!((sum & 0xffff) + (sum >> 16)) as u16).to_be_bytes());
    f.extend_from_slice(&ip);
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&src.port().to_be_bytes());
    tcp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&1000u32.to_be_bytes());
    tcp[8..12].copy_from_slice(&2000u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x18; // ACK|PSH
    tcp[14..16].copy_from_slice(&512u16.to_be_bytes());
    f.extend_from_slice(&tcp);
    f.extend_from_slice(payload);
    f
}

/// Segments of a connection the agent held, once no socket holds it (the agent closed it, or
/// died), are dropped: passed on as "older than the enrolment" they would carry the pod's bytes
/// out in plaintext (the soak saw that after SIGKILLs). A segment of a connection the agent
/// never held still passes.
#[test]
fn segments_of_a_connection_the_agent_held_are_dropped_once_no_socket_holds_it() {
    if !can_run("eBPF orphaned segments", &["ip"]) {
        return;
    }
    let tb = Testbed::build(SPEC).unwrap();
    let enrolled = pods(&[(1, 1)]);
    let agent = Agent::start(&tb, 1, "passthrough", &enrolled).unwrap();
    let enrolled_if = *agent.ifindexes(&tb, &enrolled).unwrap().first().unwrap();
    let (client, server) = (tb.pod(1, 1), tb.pod(1, 2));
    let dst = std::net::SocketAddrV4::new(server.ipv4, 9200);
    let listener = server
        .place
        .in_netns(move || std::net::TcpListener::bind(dst))
        .unwrap()
        .unwrap();
    // One captured connection, exchanged over and closed by both ends.
    let src = client
        .place
        .in_netns(move || -> std::io::Result<std::net::SocketAddr> {
            use std::io::{Read as _, Write as _};
            let mut s = std::net::TcpStream::connect(dst)?;
            let (mut accepted, _) = listener.accept()?;
            s.write_all(b"hello")?;
            let mut buf = [0u8; 5];
            accepted.read_exact(&mut buf)?;
            let local = s.local_addr()?;
            drop(accepted);
            drop(s);
            Ok(local)
        })
        .unwrap()
        .unwrap();
    let std::net::SocketAddr::V4(src) = src else {
        panic!("{src}")
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    let prog = PinnedProgram::open(&agent.bpffs().join("progs").join("mesh_tc_from_pod")).unwrap();
    let payload = b"MESH-SOAK-PLAIN: late bytes";
    let (held, never) = tb
        .node(1)
        .place
        .in_netns(move || {
            let late = tcp_segment(src, dst, payload);
            let other = std::net::SocketAddrV4::new(*src.ip(), src.port().wrapping_add(1));
            let unrelated = tcp_segment(other, dst, payload);
            (
                prog.run_tc(&late, enrolled_if).unwrap(),
                prog.run_tc(&unrelated, enrolled_if).unwrap(),
            )
        })
        .unwrap();
    assert_eq!(
        held,
        Some(TC_ACT_SHOT),
        "a late segment of the connection the agent held passed"
    );
    assert!(
        never.is_some_and(|v| v != TC_ACT_SHOT),
        "a segment of a connection the agent never held was dropped: {never:?}"
    );
    drop(agent);
    tb.teardown_verified().unwrap();
}
