//! Fuzzing the capture's packet parsing in the kernel (issue #18): generated frames are run
//! through the agent's own pinned `mesh_tc_from_pod` with `BPF_PROG_TEST_RUN`, as if an enrolled
//! pod sent them, and each verdict is checked against what the frame's bytes say
//! (`support::pktgen`): a spoofed or unparseable packet from an enrolled pod never passes, a
//! parseable one of the pod's own is never dropped.
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

#[test]
fn generated_frames_from_an_enrolled_pod_get_the_verdict_their_bytes_call_for() {
    if !can_run("eBPF packet fuzzing", &["ip"]) {
        return;
    }
    let tb = Testbed::build(SPEC).unwrap();
    let enrolled = pods(&[(1, 1)]);
    let agent = Agent::start(&tb, 1, "passthrough", &enrolled).unwrap();
    let ifindex = *agent.ifindexes(&tb, &enrolled).unwrap().first().unwrap();
    let p = tb.pod(1, 1);
    let pod = pktgen::Pod {
        ipv4: p.ipv4,
        ipv6: match p.ip(true) {
            std::net::IpAddr::V6(a) => a,
            other => panic!("{other}"),
        },
    };
    let prog = PinnedProgram::open(&agent.bpffs().join("progs/mesh_tc_from_pod")).unwrap();
    let frames = env_u64("MESH_EBPF_FUZZ_FRAMES").unwrap_or(1_000_000);
    let seed = env_u64("MESH_EBPF_FUZZ_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    let started = Instant::now();
    // The program reads the interface from the context and looks sockets up in its namespace:
    // run it from the node's.
    let (tally, wrong) = tb
        .node(1)
        .place
        .in_netns(move || {
            let mut rng = pktgen::Rng::new(seed);
            let mut tally: BTreeMap<String, u64> = BTreeMap::new();
            let mut wrong = Vec::new();
            for i in 0..frames {
                let (frame, expect) = pktgen::frame(&mut rng, &pod);
                let Some(verdict) = prog.run_tc(&frame, ifindex).unwrap() else {
                    *tally
                        .entry("not run: the kernel's harness refuses the frame".into())
                        .or_default() += 1;
                    continue;
                };
                let dropped = verdict == TC_ACT_SHOT;
                let ok = match expect {
                    Expect::Drop(_) => dropped,
                    Expect::Pass => !dropped,
                    Expect::Either => true,
                };
                let key = match expect {
                    Expect::Drop(why) => format!("drop: {why}"),
                    Expect::Pass => "pass".to_owned(),
                    Expect::Either => "either".to_owned(),
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
        .unwrap();
    eprintln!(
        "{frames} frames (seed {seed}) in {:.1} s: {tally:?}",
        started.elapsed().as_secs_f64()
    );
    assert!(
        wrong.is_empty(),
        "seed {seed}: verdicts that break the capture's invariants:\n{}",
        wrong.join("\n")
    );
    // The generator must have exercised every kind of refusal and plenty of passes.
    for kind in [
        "pass",
        "drop: spoofed IPv4 source",
        "drop: spoofed IPv6 source",
        "drop: spoofed ARP sender",
        "drop: VLAN tag",
        "drop: IPv4 fragment",
        "drop: TCP header truncated",
        "drop: forbidden destination",
        "drop: TCP (or ESP) behind IPv6 extension headers",
    ] {
        assert!(
            tally.get(kind).copied().unwrap_or(0) > frames / 1000,
            "too few frames of kind {kind:?}: {tally:?}"
        );
    }
    drop(agent);
    tb.teardown_verified().unwrap();
}
