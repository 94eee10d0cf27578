//! The pod store overlaid on the configuration in force gives the configurations a store
//! keeping every record would (issue #19), for random sequences of pod events, re-lists and
//! discovery rounds (deltas where they apply, full builds otherwise), while keeping only the
//! records the configuration cannot stand in for.
use std::collections::{BTreeMap, HashSet};

use proptest::prelude::*;

use super::*;
use crate::discovery::kube::record_store::RecordStore;
use crate::discovery::kube::{
    Objects, ServiceStore, SliceStore, SnapshotSettings,
    feed::Changes,
    host::{Located, PodLocator},
    incremental, snapshot,
};

const NODE: &str = "node1";

/// Finds every pod of this node (its interface named after its uid).
struct EveryPod;

impl PodLocator for EveryPod {
    fn locate(&self, uid: &str, _: &[std::net::IpAddr]) -> Option<Located> {
        Some(Located {
            interface: format!("veth-{uid}"),
            cgroup: None,
        })
    }
}

fn settings() -> SnapshotSettings {
    SnapshotSettings {
        node_name: NODE.into(),
        trust_domain: "cluster.local".into(),
        root_namespace: "istio-system".into(),
        uplinks: vec!["eth0".into()],
        ca: None,
    }
}

/// A pod as the tests make it: its address, node (1 is this one), labels (2: a dataplane mode
/// the model rejects), whether host-network, being deleted, and its age.
#[derive(Clone, Copy, Debug)]
struct PodSpec {
    pod: u8,
    ip: u8,
    node: u8,
    label: u8,
    host_network: bool,
    deleting: bool,
    created: u8,
}

#[derive(Clone, Debug)]
enum Op {
    /// A pod created or changed.
    Put(PodSpec),
    /// A pod finished (Succeeded): no longer a workload.
    Finish {
        pod: u8,
    },
    Delete {
        pod: u8,
    },
    /// The watcher listed again, having missed the deletion of `missed`.
    Relist {
        missed: Vec<u8>,
    },
    /// A discovery round: a delta where one applies (`full`: a change beyond pods).
    Round {
        full: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..12u8, 0..8u8, 1..4u8, 0..3u8, prop::bool::weighted(0.1), prop::bool::weighted(0.15), 0..5u8)
            .prop_map(|(pod, ip, node, label, host_network, deleting, created)| Op::Put(PodSpec {
                pod, ip, node, label, host_network, deleting, created,
            })),
        1 => (0..12u8).prop_map(|pod| Op::Finish { pod }),
        2 => (0..12u8).prop_map(|pod| Op::Delete { pod }),
        1 => prop::collection::vec(0..12u8, 0..3).prop_map(|missed| Op::Relist { missed }),
        4 => prop::bool::weighted(0.2).prop_map(|full| Op::Round { full }),
    ]
}

fn view(spec: &PodSpec) -> PodView {
    let PodSpec {
        pod,
        ip,
        node,
        label,
        host_network,
        deleting,
        created,
    } = *spec;
    let mut labels = serde_json::json!({"app": format!("a{}", label % 2)});
    if label == 2 {
        labels["istio.io/dataplane-mode"] = serde_json::json!("bogus");
    }
    serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": format!("p{pod}"), "namespace": "n", "uid": format!("u{pod}"),
            "labels": labels,
            "creationTimestamp": format!("2026-12-01T00:00:{created:02}Z"),
            "deletionTimestamp": deleting.then_some("2026-12-01T00:01:00Z"),
        },
        "spec": {"nodeName": format!("node{node}"), "hostNetwork": host_network},
        "status": {"phase": "Running", "podIP": format!("10.0.0.{}", ip + 1)}
    }))
    .unwrap()
}

fn finished(pod: u8) -> PodView {
    let mut v = view(&PodSpec {
        pod,
        ip: 0,
        node: 2,
        label: 0,
        host_network: false,
        deleting: false,
        created: 0,
    });
    v.status.as_mut().unwrap().phase = Some("Succeeded".into());
    v
}

/// The configuration built whole from `pods`, and the pods it left out.
fn build(pods: Vec<PodRecord>) -> (LocalConfig, Vec<PodRecord>) {
    let objects = Objects {
        pods,
        ..Objects::default()
    };
    let snap = snapshot::build(&settings(), &objects, &EveryPod, &[]);
    let lost = snap
        .lost_address
        .iter()
        .map(|&at| objects.pods[at].clone())
        .collect();
    (snap.config, lost)
}

fn contents(c: &LocalConfig) -> Vec<String> {
    let mut out: Vec<String> = c.workloads.iter().map(|w| format!("{w:?}")).collect();
    out.sort();
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn the_overlay_builds_what_every_record_builds(ops in prop::collection::vec(op(), 1..60)) {
        let store = PodStore::for_node(NODE);
        // The reference: every record kept, as before the overlay.
        let every = RecordStore::<PodView, PodRecord>::new(|v| PodRecord::of(v, NODE));
        let (services, slices) = (ServiceStore::services(), SliceStore::default());
        let mut pods: BTreeMap<u8, PodView> = BTreeMap::new();
        let mut config: Option<LocalConfig> = None;
        let mut changed: HashSet<(String, String)> = HashSet::new();
        let mut relisted = false;
        let event = |e: Event<PodView>| {
            store.apply(&e);
            every.apply(&e);
        };
        let list = |pods: &BTreeMap<u8, PodView>| {
            event(Event::Init);
            for v in pods.values() {
                event(Event::InitApply(v.clone()));
            }
            event(Event::InitDone);
        };
        list(&pods);
        for op in ops {
            match op {
                Op::Put(spec) => {
                    let v = view(&spec);
                    pods.insert(spec.pod, v.clone());
                    event(Event::Apply(v));
                    changed.insert(("n".into(), format!("p{}", spec.pod)));
                }
                Op::Finish { pod } => {
                    pods.remove(&pod);
                    event(Event::Apply(finished(pod)));
                    changed.insert(("n".into(), format!("p{pod}")));
                }
                Op::Delete { pod } => {
                    if let Some(v) = pods.remove(&pod) {
                        event(Event::Delete(v));
                        changed.insert(("n".into(), format!("p{pod}")));
                    }
                }
                Op::Relist { missed } => {
                    for pod in missed {
                        pods.remove(&pod);
                    }
                    list(&pods);
                    relisted = true;
                }
                Op::Round { full } => {
                    // What the discovery loop does: settle against the configuration in
                    // force, then a delta of what changed, or a full build.
                    if let Some(c) = &config {
                        store.settle(c);
                    }
                    let keys = std::mem::take(&mut changed);
                    let delta = match &config {
                        Some(c) if !full && !relisted => incremental::delta(
                            &settings(),
                            c,
                            &incremental::Stores { pods: &store, services: &services, slices: &slices },
                            &Changes { all: false, keys },
                            &Changes::default(),
                            &EveryPod,
                            &Vec::new,
                        )
                        .ok()
                        .filter(|d| c.check_delta(d).is_ok()),
                        _ => None,
                    };
                    match (delta, config.as_mut()) {
                        (Some(d), Some(c)) => {
                            c.apply(&d);
                        }
                        _ => {
                            let (built, lost) = build(store.state(config.as_ref()));
                            store.lost_address(&lost);
                            config = Some(built);
                            relisted = false;
                        }
                    }
                    let c = config.as_ref().unwrap();
                    let (expected, _) = build(every.state());
                    prop_assert_eq!(contents(c), contents(&expected));
                    // Settled with nothing pending, only what the configuration cannot say
                    // is kept.
                    store.settle(c);
                    let needed = every
                        .state()
                        .iter()
                        .filter(|r| {
                            r.standalone_workload(NODE).is_none_or(|standalone| {
                                c.workload_named(&r.namespace, &r.name) != Some(&standalone)
                            })
                        })
                        .count();
                    prop_assert_eq!(store.kept(), needed);
                }
            }
        }
    }
}
