//! The no-mesh baseline and the testbed's own guarantees: dual-stack pod↔pod TCP across nodes and
//! on one node with a real client, and teardown that leaves nothing behind (on success, on panic,
//! and for runs whose owner died).
use std::{fs, panic, process::Command};

use mesh_testbed::{
    HostNetSnapshot, Testbed, TestbedSpec, can_run,
    naming::RunId,
    netns, sweep_stale,
    traffic::{checked_send, iperf3_send, pattern_digest},
};

const TWO_BY_TWO: TestbedSpec = TestbedSpec {
    nodes: 2,
    pods_per_node: 2,
};

#[test]
fn dual_stack_pod_to_pod_tcp_cross_node_and_same_node_then_nothing_left() {
    if !can_run("testbed baseline", &["ip", "iperf3"]) {
        return;
    }
    let host_before = HostNetSnapshot::take().unwrap();
    let tb = Testbed::build(TWO_BY_TWO).unwrap();
    let client = tb.pod(1, 1);
    let cases = [("cross-node", tb.pod(2, 1)), ("same-node", tb.pod(1, 2))];
    for (what, server) in cases {
        for v6 in [false, true] {
            let bytes = 4 << 20;
            // A real client: iperf3.
            let t = iperf3_send(&client.place, &server.place, server.ip(v6), 5201, bytes)
                .unwrap_or_else(|e| panic!("{what} v6={v6}: {e:#}"));
            // iperf3 -n may overshoot by one block (128 KiB for TCP); exactness is checked below.
            let block = 128 << 10;
            assert!(
                (bytes..=bytes + block).contains(&t.bytes_sent),
                "{what} v6={v6}: iperf3 sent {}",
                t.bytes_sent
            );
            assert_eq!(t.local, client.ip(v6), "{what} v6={v6}");
            assert_eq!(t.remote, server.ip(v6), "{what} v6={v6}");
            // Exact bytes, intact, and no NAT: the server sees the client pod's own address.
            let addr = (server.ip(v6), 7000).into();
            let got = checked_send(&client.place, &server.place, addr, bytes)
                .unwrap_or_else(|e| panic!("{what} v6={v6}: {e:#}"));
            assert_eq!(got.bytes, bytes, "{what} v6={v6}");
            assert_eq!(got.digest, pattern_digest(bytes), "{what} v6={v6}");
            assert_eq!(got.peer.ip(), client.ip(v6), "{what} v6={v6}");
        }
    }
    assert_eq!(
        tb.info().netns_inodes.len(),
        1 + 2 + 4,
        "fabric + nodes + pods"
    );
    tb.teardown_verified().unwrap();
    let added = HostNetSnapshot::take().unwrap().added_since(&host_before);
    assert!(added.is_empty(), "host network changed: {added:#?}");
}

#[test]
fn processes_join_their_place_and_closures_run_in_its_netns() {
    if !can_run("testbed places", &["ip", "sleep"]) {
        return;
    }
    let tb = Testbed::build(TestbedSpec {
        nodes: 1,
        pods_per_node: 1,
    })
    .unwrap();
    let pod = tb.pod(1, 1);
    // Binding the pod's address only works inside the pod's namespace.
    let bound = pod
        .place
        .in_netns(|| std::net::TcpListener::bind((pod.ipv4, 0)).map(|l| l.local_addr()))
        .unwrap();
    assert!(bound.is_ok(), "bind in pod netns: {bound:?}");
    assert!(std::net::TcpListener::bind((pod.ipv4, 0)).is_err());
    // A spawned process is in the pod's cgroup and netns.
    let sleeper = pod.place.spawn("sleep", &["30"]).unwrap();
    let cgroup = fs::read_to_string(format!("/proc/{}/cgroup", sleeper.pid())).unwrap();
    // Below the run's directory, where kubelet's cgroupfs driver would put it.
    let run_dir = tb
        .info()
        .cgroup_dir
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let want = format!("{run_dir}/node{}-kubepods/pod{}", pod.node, pod.uid());
    let member = cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("");
    assert!(
        member.ends_with(&want) && pod.place.cgroup.ends_with(member.trim_start_matches('/')),
        "cgroup of spawned process: {cgroup}"
    );
    let ns = fs::read_link(format!("/proc/{}/ns/net", sleeper.pid())).unwrap();
    let inode = netns::inode(&pod.place.netns).unwrap();
    assert_eq!(ns.to_string_lossy(), format!("net:[{inode}]"));
    // Teardown kills what is still running in the run's cgroups.
    let pid = sleeper.pid();
    std::mem::forget(sleeper);
    tb.teardown_verified().unwrap();
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid));
}

fn is_zombie(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
}

#[test]
fn a_panicking_test_still_tears_down() {
    if !can_run("testbed teardown on panic", &["ip"]) {
        return;
    }
    let mut info = None;
    let result = panic::catch_unwind(panic::AssertUnwindSafe(|| {
        let tb = Testbed::build(TestbedSpec {
            nodes: 2,
            pods_per_node: 1,
        })
        .unwrap();
        info = Some(tb.info().clone());
        panic!("deliberate failure inside a test");
    }));
    assert!(result.is_err());
    let info = info.expect("testbed was built before the panic");
    assert_eq!(Testbed::leftovers(&info), Vec::<String>::new());
}

#[test]
fn runs_of_dead_processes_are_swept_and_live_or_named_runs_are_not() {
    if !can_run("testbed sweep", &["ip", "true"]) {
        return;
    }
    let cgroup_root = mesh_testbed::cgroup::cgroup2_root().unwrap();
    // A pid that existed and is gone: a finished child of ours.
    let mut child = Command::new("true").spawn().unwrap();
    let dead_pid = child.id();
    child.wait().unwrap();
    let dead = RunId::Ephemeral {
        pid: dead_pid,
        seq: 0,
    };
    let live = RunId::ephemeral();
    let named = RunId::named("sweeptest").unwrap();
    // Plain `ip netns add`: a parallel test's sweep may remove the stale run at any moment, which
    // is fine for the assertions below but must not make these steps fail.
    let make = |run: &RunId| {
        let _ = Command::new("ip")
            .args(["netns", "add", &run.netns_name("node1")])
            .status();
        let _ = fs::create_dir_all(run.cgroup_dir(&cgroup_root).join("node1"));
        let _ = fs::create_dir_all(run.bpffs_dir());
        let _ = fs::create_dir_all("/run/mesh-testbed");
        let _ = fs::write(run.manifest_path(), "{}");
    };
    for run in [&dead, &live, &named] {
        make(run);
    }
    assert!(dead.is_stale() && !live.is_stale() && !named.is_stale());
    sweep_stale();
    let exists = |run: &RunId| {
        [
            !netns::names_with_prefix(&run.netns_prefix()).is_empty(),
            run.cgroup_dir(&cgroup_root).exists(),
            run.bpffs_dir().exists(),
            run.manifest_path().exists(),
        ]
    };
    assert_eq!(
        exists(&dead),
        [false; 4],
        "netns, cgroup, bpffs, manifest of the dead run"
    );
    assert_eq!(exists(&live), [true; 4], "a live run must survive a sweep");
    assert_eq!(
        exists(&named),
        [true; 4],
        "a named run must survive a sweep"
    );
    for run in [&live, &named] {
        let _ = Command::new("ip")
            .args(["netns", "delete", &run.netns_name("node1")])
            .status();
        mesh_testbed::cgroup::remove_tree(&run.cgroup_dir(&cgroup_root)).unwrap();
        fs::remove_dir_all(run.bpffs_dir()).unwrap();
        fs::remove_file(run.manifest_path()).unwrap();
    }
}

#[test]
fn a_chatty_background_process_never_blocks_on_its_output() {
    if !can_run("testbed background output", &["ip", "sh", "head"]) {
        return;
    }
    let tb = Testbed::build(TestbedSpec {
        nodes: 1,
        pods_per_node: 0,
    })
    .unwrap();
    // 8 MiB on stdout (far beyond a 64 KiB pipe) then a marker on stderr: finishes only if the
    // output is drained while the process runs.
    let chatty = tb
        .node(1)
        .place
        .spawn("sh", &["-c", "head -c 8388608 /dev/zero; echo done >&2"])
        .unwrap();
    let out = chatty.wait(std::time::Duration::from_secs(20)).unwrap();
    assert!(out.status.success());
    assert_eq!(
        out.stdout.len(),
        mesh_testbed::place::OUTPUT_TAIL,
        "keeps the tail"
    );
    assert_eq!(String::from_utf8_lossy(&out.stderr).trim(), "done");
}
