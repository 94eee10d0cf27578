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
