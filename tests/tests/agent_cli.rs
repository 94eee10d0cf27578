//! The real `mesh-agent` binary, run inside a testbed node: `ebpf check` loads every program
//! through the kernel verifier and reports them.
use mesh_testbed::{Testbed, TestbedSpec, binaries, can_run};

#[test]
fn ebpf_check_verifies_every_program_inside_a_node() {
    if !can_run("mesh-agent ebpf check", &["ip"]) {
        return;
    }
    let agent = binaries::mesh_agent().unwrap();
    let tb = Testbed::build(TestbedSpec {
        nodes: 1,
        pods_per_node: 0,
    })
    .unwrap();
    let out = tb
        .node(1)
        .place
        .run(agent.to_str().unwrap(), &["ebpf", "check"])
        .unwrap();
    for program in ["mesh_tc_observe", "mesh_tc_from_pod"] {
        assert!(
            out.lines()
                .any(|l| l.contains(program) && l.contains("verified")),
            "{program} not verified:\n{out}"
        );
    }
    for map in ["MESH_COUNTERS", "MESH_PODS"] {
        assert!(out.contains(map), "{map} missing:\n{out}");
    }
    assert!(
        out.contains("ok: the kernel accepted every program"),
        "{out}"
    );
    tb.teardown_verified().unwrap();
}
