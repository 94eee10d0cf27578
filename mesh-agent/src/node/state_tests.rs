//! The mesh state updated by difference equals the state rebuilt from scratch, for random
//! sequences of changes to workloads and Services (issue #19): same configuration, same
//! answers from the selection index, same workloads by address and Services by VIP, and a
//! delta is refused exactly when the configuration it would make is invalid.
use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::{
    discovery::{ServicePort, delta::Key},
    names::{Labels, intern},
};

const BASE: &str = r#"
node: {name: n1}
namespaces:
  - {name: a, labels: {istio.io/dataplane-mode: ambient}}
  - {name: b}
  - {name: c, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: wp}}
policies:
  - apiVersion: gateway.networking.k8s.io/v1
    kind: Gateway
    metadata: {name: wp, namespace: c, labels: {istio.io/waypoint-for: all}}
    spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
"#;

const NAMESPACES: [&str; 3] = ["a", "b", "c"];

/// One change, drawn from small pools so that names, addresses, interfaces and VIPs collide.
#[derive(Clone, Debug)]
enum Op {
    PutWorkload {
        name: u8,
        ns: u8,
        node: u8,
        v4: u8,
        v6: Option<u8>,
        app: u8,
        waypoint_pod: bool,
        host_network: bool,
        iface: u8,
    },
    RemoveWorkload {
        name: u8,
        ns: u8,
    },
    PutService {
        name: u8,
        ns: u8,
        vip: u8,
        port: u8,
        selector: u8,
        explicit: bool,
    },
    RemoveService {
        name: u8,
        ns: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..8u8, 0..3u8, 0..3u8, 1..8u8, proptest::option::of(1..4u8), 0..3u8, proptest::bool::weighted(0.1), proptest::bool::weighted(0.1), 0..4u8)
            .prop_map(|(name, ns, node, v4, v6, app, waypoint_pod, host_network, iface)| Op::PutWorkload {
                name, ns, node, v4, v6, app, waypoint_pod, host_network, iface,
            }),
        2 => (0..8u8, 0..3u8).prop_map(|(name, ns)| Op::RemoveWorkload { name, ns }),
        2 => (0..4u8, 0..3u8, 0..4u8, 0..2u8, 0..4u8, proptest::bool::weighted(0.2))
            .prop_map(|(name, ns, vip, port, selector, explicit)| Op::PutService {
                name, ns, vip, port, selector, explicit,
            }),
        1 => (0..4u8, 0..3u8).prop_map(|(name, ns)| Op::RemoveService { name, ns }),
    ]
}

fn key(name: String, ns: u8) -> Key {
    (NAMESPACES[ns as usize].to_owned(), name)
}

fn delta_of(ops: &[Op]) -> ConfigDelta {
    let mut d = ConfigDelta::default();
    for op in ops {
        match op.clone() {
            Op::PutWorkload {
                name,
                ns,
                node,
                v4,
                v6,
                app,
                waypoint_pod,
                host_network,
                iface,
            } => {
                let k = key(format!("p{name}"), ns);
                let mut labels = BTreeMap::from([("app".to_owned(), format!("x{app}"))]);
                if waypoint_pod {
                    labels.insert(GATEWAY_NAME_LABEL.into(), "wp".into());
                }
                let node = format!("n{}", node + 1);
                let mut ips = Vec::new();
                if !host_network {
                    ips.push(format!("10.0.0.{v4}").parse().unwrap());
                    ips.extend(v6.map(|v| format!("fd00::{v}").parse::<IpAddr>().unwrap()));
                }
                let w = Workload {
                    name: k.1.as_str().into(),
                    namespace: intern(&k.0),
                    service_account: intern("sa"),
                    host_interface: (node == "n1").then(|| format!("veth{iface}").into()),
                    node: intern(&node),
                    ips: ips.into(),
                    labels: labels.into(),
                    host_network,
                    terminating: false,
                    cgroup: None,
                    created: 0,
                };
                d.workloads.insert(k, Some(w));
            }
            Op::RemoveWorkload { name, ns } => {
                d.workloads.insert(key(format!("p{name}"), ns), None);
            }
            Op::PutService {
                name,
                ns,
                vip,
                port,
                selector,
                explicit,
            } => {
                let k = key(format!("s{name}"), ns);
                // VIP 3 is also a pod address (10.0.0.3): refused while that pod exists.
                let vip = if vip == 3 {
                    "10.0.0.3".into()
                } else {
                    format!("10.96.0.{vip}")
                };
                let s = Service {
                    name: k.1.as_str().into(),
                    namespace: intern(&k.0),
                    vips: vec![vip.parse().unwrap()],
                    ports: vec![ServicePort {
                        port: [80, 443][port as usize],
                        target_port: Some(8080),
                        protocol: None,
                    }],
                    selector: match selector {
                        0 => Labels::new(),
                        n => [("app", format!("x{}", n - 1))].into_iter().collect(),
                    },
                    endpoints: explicit
                        .then(|| vec!["10.0.0.1".parse().unwrap(), "10.0.0.4".parse().unwrap()]),
                    labels: Labels::new(),
                };
                d.services.insert(k, Some(s));
            }
            Op::RemoveService { name, ns } => {
                d.services.insert(key(format!("s{name}"), ns), None);
            }
        }
    }
    d
}

/// `delta` applied the plain way: the lists edited as a file would be.
fn rewritten(config: &LocalConfig, delta: &ConfigDelta) -> LocalConfig {
    let mut c = config.clone();
    for ((ns, name), change) in &delta.workloads {
        c.workloads
            .retain(|w| w.namespace != *ns || w.name != *name);
        c.workloads.extend(change.clone());
    }
    for ((ns, name), change) in &delta.services {
        c.services.retain(|s| s.namespace != *ns || s.name != *name);
        c.services.extend(change.clone());
    }
    c
}

/// Everything the data path reads, in a comparable form.
fn summary(state: &MeshState) -> Vec<String> {
    let route = |r: &Option<Arc<WaypointRoute>>| match r.as_deref() {
        None => "direct".to_owned(),
        Some(WaypointRoute::Missing { waypoint }) => format!("missing {waypoint}"),
        Some(WaypointRoute::Via { waypoint, pods, .. }) => {
            let mut pods: Vec<String> = pods.iter().map(|(ip, id)| format!("{ip}={id}")).collect();
            pods.sort();
            format!("via {waypoint} {pods:?}")
        }
    };
    let mut out: Vec<String> = state
        .by_ip
        .iter()
        .map(|(ip, w)| {
            format!(
                "{ip} {} {} {} {} {} {} {}",
                w.key(),
                w.identity,
                w.node,
                w.enrolled,
                w.canonical_service,
                w.canonical_revision,
                route(&w.waypoint)
            )
        })
        .chain(state.services.iter().map(|((vip, port), s)| {
            let mut eps = s.endpoints.clone();
            eps.sort();
            format!(
                "{vip}:{port} {} {} {eps:?} {}",
                s.key,
                s.target_port,
                route(&s.waypoint)
            )
        }))
        .collect();
    out.sort();
    out
}

/// The lists as sets, and what the index answers.
fn contents(c: &LocalConfig) -> Vec<String> {
    let mut out: Vec<String> = c
        .workloads
        .iter()
        .map(|w| format!("{w:?}"))
        .chain(c.services.iter().map(|s| {
            let mut eps: Vec<String> = c.endpoints_of(s).map(|w| w.name.to_string()).collect();
            eps.sort();
            format!("{s:?} selects {eps:?}")
        }))
        .collect();
    out.sort();
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn applied_in_place_equals_rebuilt(steps in proptest::collection::vec(proptest::collection::vec(op(), 1..4), 1..25)) {
        let mut incremental = LocalConfig::parse(BASE).unwrap();
        let mut state = MeshState::from_config(&incremental);
        let mut plain = incremental.clone();
        for ops in &steps {
            let delta = delta_of(ops);
            let candidate = rewritten(&plain, &delta);
            let valid = LocalConfig::parse_checked(candidate.clone());
            let checked = incremental.check_delta(&delta);
            prop_assert_eq!(valid.is_ok(), checked.is_ok(),
                "full check {:?} vs delta check {:?} for {:?}", valid.err(), checked.err(), ops);
            if checked.is_err() {
                continue;
            }
            // The plain diff finds the same change (less what changes nothing).
            let diffed = ConfigDelta::between(&plain, &candidate).unwrap();
            prop_assert!(diffed.workloads.keys().all(|k| delta.workloads.contains_key(k)));
            let replaced = incremental.apply(&delta);
            if !state.apply(&incremental, &delta, &replaced) {
                state = MeshState::from_config(&incremental);
            }
            plain = candidate;
            prop_assert_eq!(contents(&incremental), contents(&plain));
            prop_assert_eq!(summary(&state), summary(&MeshState::from_config(&plain)));
        }
    }
}

#[test]
fn a_delta_is_checked_against_the_rest() {
    let mut c = LocalConfig::parse(BASE).unwrap();
    let put = |name: u8, v4: u8, iface: u8| Op::PutWorkload {
        name,
        ns: 0,
        node: 0,
        v4,
        v6: None,
        app: 0,
        waypoint_pod: false,
        host_network: false,
        iface,
    };
    let d = delta_of(&[put(1, 1, 1)]);
    c.check_delta(&d).unwrap();
    c.apply(&d);
    // Another pod on the same address, or the same interface: refused, naming both.
    let e = c.check_delta(&delta_of(&[put(2, 1, 2)])).unwrap_err();
    assert!(
        e.to_string().contains("10.0.0.1 is also used by a/p1"),
        "{e}"
    );
    let e = c.check_delta(&delta_of(&[put(2, 2, 1)])).unwrap_err();
    assert!(
        e.to_string()
            .contains("veth1 is also the interface of a/p1"),
        "{e}"
    );
    // The same pod moving to a new address in one delta with another taking its old one: fine.
    c.check_delta(&delta_of(&[put(1, 5, 1), put(2, 1, 2)]))
        .unwrap();
}
