//! The agent loads a mesh-ebpf program, attaches it (tcx) to a pod's host-side veth inside a
//! testbed node, the program runs on real traffic (its per-CPU counters move), and detaching it —
//! pin included — stops it cleanly.
use mesh_agent::ebpf::{Datapath, TcHook};
use mesh_common::Counter;
use mesh_testbed::{
    Testbed, TestbedSpec, can_run,
    traffic::{checked_send, pattern_digest},
};

#[test]
fn observer_program_loads_attaches_counts_and_detaches() {
    if !can_run("eBPF observer", &["ip", "bpftool"]) {
        return;
    }
    let tb = Testbed::build(TestbedSpec {
        nodes: 1,
        pods_per_node: 2,
    })
    .unwrap();
    let (client, server) = (tb.pod(1, 1), tb.pod(1, 2));
    let node = tb.node(1);

    let mut datapath = Datapath::load().expect("kernel accepts the object");
    let pin = tb.bpffs_dir().join("observe_veth_pod1_ingress");
    // Interface names resolve in the calling thread's netns: attach from inside the node.
    let attachment = node
        .place
        .in_netns(|| datapath.attach_tc_observer(&client.host_veth, TcHook::Ingress, Some(&pin)))
        .unwrap()
        .expect("attach to the pod's host veth");
    assert!(pin.exists(), "link pinned at {}", pin.display());

    let before = datapath.counters().unwrap();
    let bytes: u64 = 2 << 20;
    for v6 in [false, true] {
        let addr = (server.ip(v6), 7001).into();
        let got = checked_send(&client.place, &server.place, addr, bytes).unwrap();
        assert_eq!(
            got.digest,
            pattern_digest(bytes),
            "v6={v6}: program must not alter traffic"
        );
    }
    let seen = datapath.counters().unwrap().since(&before);
    // Ingress of the client's host veth sees everything the client pod sends: both payloads
    // (plus headers) in IPv4 and IPv6 packets.
    assert!(
        seen.get(Counter::ObservedBytes) >= 2 * bytes,
        "bytes counted: {seen:?}"
    );
    assert!(seen.get(Counter::ObservedIpv4Packets) > 0, "{seen:?}");
    assert!(seen.get(Counter::ObservedIpv6Packets) > 0, "{seen:?}");

    attachment.detach().expect("detach");
    assert!(!pin.exists(), "pin removed by detach");
    let after_detach = datapath.counters().unwrap();
    let addr = (server.ipv4, 7002).into();
    checked_send(&client.place, &server.place, addr, bytes).unwrap();
    assert_eq!(
        datapath.counters().unwrap(),
        after_detach,
        "a detached program must not run"
    );

    // Leave a pinned link behind on purpose: teardown must remove the pin, which releases the
    // link and with it the last reference to the program.
    let pin2 = tb.bpffs_dir().join("left_for_teardown");
    let left = node
        .place
        .in_netns(|| datapath.attach_tc_observer(&client.host_veth, TcHook::Egress, Some(&pin2)))
        .unwrap()
        .unwrap();
    drop((left, datapath));
    assert!(
        program_loaded("mesh_tc_observe"),
        "the pin keeps the program"
    );
    tb.teardown_verified().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while program_loaded("mesh_tc_observe") && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        !program_loaded("mesh_tc_observe"),
        "teardown left the pinned program loaded"
    );
}

/// Whether the kernel has a program with this name loaded (`bpftool prog show name`).
fn program_loaded(name: &str) -> bool {
    std::process::Command::new("bpftool")
        .args(["prog", "show", "name", name])
        .output()
        .is_ok_and(|o| o.status.success() && !o.stdout.is_empty())
}
