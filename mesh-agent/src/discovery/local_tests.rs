//! Tests of the local-mode configuration file.
use super::*;

const GOOD: &str = r#"
node: {name: n1, uplinks: [eth0]}
namespaces:
  - name: mesh
    labels: {istio.io/dataplane-mode: ambient}
  - name: plain
workloads:
  - {name: a, namespace: mesh, node: n1, ips: [10.0.0.1, "fd00::1"], hostInterface: veth-a}
  - {name: b, namespace: mesh, node: n1, ips: [10.0.0.2], hostInterface: veth-b,
     labels: {istio.io/dataplane-mode: none}}
  - {name: c, namespace: plain, node: n1, ips: [10.0.0.3], hostInterface: veth-c,
     labels: {istio.io/dataplane-mode: ambient}}
  - {name: d, namespace: plain, node: n1, ips: [10.0.0.4], hostInterface: veth-d}
  - {name: h, namespace: mesh, node: n1, ips: [], hostNetwork: true}
  - {name: r, namespace: mesh, node: n2, ips: [10.0.1.1]}
"#;

#[test]
fn enrolment_follows_istio_labels() {
    let c = LocalConfig::parse(GOOD).unwrap();
    let enrolled: Vec<_> = c
        .workloads
        .iter()
        .filter(|w| c.is_enrolled(w))
        .map(|w| w.name.as_str())
        .collect();
    // namespace label enrols a; pod label none opts b out; pod label enrols c in a plain
    // namespace; d is plain; host-network h never; r is enrolled but on another node.
    assert_eq!(enrolled, ["a", "c", "r"]);
    assert_eq!(c.local_pods().count(), 4);
}

#[test]
fn errors_name_the_line_or_the_field() {
    let e = LocalConfig::parse("node: {name: n1}\nworkloads:\n  - {name: a, namespace: x, node: n1, ips: [10.0.0.300], hostInterface: v}\n")
            .unwrap_err()
            .to_string();
    assert!(e.contains("line 3"), "{e}");
    let e = LocalConfig::parse("node: {name: n1, colour: red}\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("colour"), "{e}");
    let e = LocalConfig::parse(
        "node: {name: n1}\nworkloads:\n  - {name: a, namespace: x, node: n1, ips: [10.0.0.1]}\n",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("workloads[0] (x/a).hostInterface"), "{e}");
    let e = LocalConfig::parse("node: {name: n1}\nworkloads:\n  - {name: a, namespace: x, node: n2, ips: [10.0.0.1]}\n  - {name: b, namespace: x, node: n2, ips: [10.0.0.1]}\n")
            .unwrap_err()
            .to_string();
    assert!(e.contains("10.0.0.1 is also used by x/a"), "{e}");
    let e = LocalConfig::parse("node: {name: n1}\nworkloads:\n  - {name: a, namespace: x, node: n1, ips: [10.0.0.1], hostInterface: v}\n  - {name: b, namespace: x, node: n1, ips: [10.0.0.2], hostInterface: v}\n")
            .unwrap_err()
            .to_string();
    assert!(e.contains("v is also the interface of x/a"), "{e}");
    let e = LocalConfig::parse("node: {name: n1}\nworkloads:\n  - {name: a, namespace: x, node: n2, ips: [10.0.0.1], labels: {istio.io/dataplane-mode: sidecar}}\n")
            .unwrap_err()
            .to_string();
    assert!(e.contains("labels.istio.io/dataplane-mode"), "{e}");
}

#[test]
fn services_select_by_namespace_and_labels_and_reject_clashes() {
    let base = "node: {name: n1}\nworkloads:\n  - {name: a, namespace: x, node: n2, ips: [10.0.0.1], labels: {app: web}}\n  - {name: b, namespace: y, node: n2, ips: [10.0.0.2], labels: {app: web}}\n";
    let c = LocalConfig::parse(&format!(
            "{base}services:\n  - {{name: web, namespace: x, vips: [10.96.0.1], ports: [{{port: 80, targetPort: 8080}}], selector: {{app: web}}}}\n"
        ))
        .unwrap();
    let eps: Vec<_> = c
        .endpoints_of(&c.services[0])
        .map(|w| w.name.as_str())
        .collect();
    assert_eq!(eps, ["a"], "same namespace only");
    let e = LocalConfig::parse(&format!(
        "{base}services:\n  - {{name: s, namespace: x, vips: [10.0.0.1], ports: [{{port: 80}}]}}\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("services[0] (x/s).vips") && e.contains("x/a"),
        "{e}"
    );
    let e = LocalConfig::parse(&format!(
            "{base}services:\n  - {{name: s, namespace: x, vips: [10.96.0.1], ports: [{{port: 80}}]}}\n  - {{name: t, namespace: x, vips: [10.96.0.1], ports: [{{port: 80}}]}}\n"
        ))
        .unwrap_err()
        .to_string();
    assert!(e.contains("10.96.0.1:80 is also served by x/s"), "{e}");
}

#[test]
fn service_ports_declare_their_protocol_and_services_keep_labels() {
    use crate::l7::protocol::Protocol;
    let c = LocalConfig::parse("node: {name: n1}\nservices:\n  - {name: web, namespace: x, vips: [10.96.0.1], labels: {istio.io/use-waypoint: waypoint}, ports: [{port: 80, name: http-web}, {port: 81, appProtocol: grpc, name: tcp-x}, {port: 82, name: web}]}\n").unwrap();
    let s = &c.services[0];
    let protocols: Vec<_> = s.ports.iter().map(|p| p.protocol).collect();
    assert_eq!(
        protocols,
        [Some(Protocol::Http), Some(Protocol::Grpc), None]
    );
    assert_eq!(s.labels["istio.io/use-waypoint"], "waypoint");
    let e = LocalConfig::parse("node: {name: n1}\nservices:\n  - {name: web, namespace: x, vips: [10.96.0.1], ports: [{port: 80, nmae: http}]}\n")
            .unwrap_err()
            .to_string();
    assert!(e.contains("nmae"), "{e}");
}

#[test]
fn policies_are_checked_one_by_one() {
    let base = "node: {name: n1}\nnamespaces: [{name: x, labels: {istio.io/dataplane-mode: ambient}}]\nworkloads:\n  - {name: a, namespace: x, node: n1, ips: [10.0.0.1], hostInterface: v, labels: {app: a}}\n";
    // A malformed policy does not reject the file: it is reported by the policy set, and
    // only the workloads it selects fail closed.
    let c = LocalConfig::parse(&format!(
            "{base}mesh: {{rootNamespace: root}}\npolicies:\n  - {{apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {{name: bad, namespace: x}}, spec: {{action: NOPE}}}}\n  - {{apiVersion: security.istio.io/v1, kind: PeerAuthentication, metadata: {{name: strict, namespace: root}}, spec: {{mtls: {{mode: STRICT}}}}}}\n"
        ))
        .unwrap();
    assert_eq!(c.mesh.root_namespace, "root");
    let set = c.compile_policies();
    assert_eq!(set.errors.len(), 1, "{:?}", set.errors);
    assert!(
        set.errors[0]
            .to_string()
            .contains("AuthorizationPolicy x/bad: spec.action")
    );
    assert_eq!(set.peer_authentications, 1);
    let w = set.workload("10.0.0.1".parse().unwrap()).unwrap();
    assert_eq!(w.invalid.len(), 1);
    assert_eq!(
        w.mtls.mode,
        crate::policy::MtlsMode::Strict,
        "mesh-wide from the custom root"
    );
    // Objects that cannot even be named reject the file.
    let e = LocalConfig::parse(&format!(
            "{base}policies:\n  - {{apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {{name: p}}}}\n"
        ))
        .unwrap_err()
        .to_string();
    assert!(e.contains("policies[0].metadata.namespace"), "{e}");
    let e = LocalConfig::parse(&format!(
            "{base}policies:\n  - {{kind: AuthorizationPolicy, metadata: {{name: p, namespace: x}}}}\n  - {{kind: AuthorizationPolicy, metadata: {{name: p, namespace: x}}}}\n"
        ))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("policies[1].metadata.name") && e.contains("listed twice"),
        "{e}"
    );
}

#[test]
fn policies_attached_to_a_waypoint_bound_service_are_the_waypoints() {
    // Two Services select pod `a`; `bound` uses a waypoint. A DENY-all attached to each:
    // the node enforces the unbound one's only (Istio: the waypoint enforces the other).
    let deny = |svc: &str| {
        format!(
            "  - {{apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {{name: deny-{svc}, namespace: x}}, spec: {{targetRefs: [{{kind: Service, name: {svc}}}], action: DENY, rules: [{{}}]}}}}\n"
        )
    };
    let c = LocalConfig::parse(&format!(
            "node: {{name: n1}}\nnamespaces: [{{name: x, labels: {{istio.io/dataplane-mode: ambient}}}}]\nworkloads:\n  - {{name: a, namespace: x, node: n1, ips: [10.0.0.1], hostInterface: v, labels: {{app: a}}}}\nservices:\n  - {{name: bound, namespace: x, vips: [10.96.0.1], selector: {{app: a}}, labels: {{istio.io/use-waypoint: wp}}, ports: [{{port: 80}}]}}\n  - {{name: plain, namespace: x, vips: [10.96.0.2], selector: {{app: a}}, ports: [{{port: 80}}]}}\npolicies:\n  - {{apiVersion: gateway.networking.k8s.io/v1, kind: Gateway, metadata: {{name: wp, namespace: x}}, spec: {{gatewayClassName: mesh-waypoint, listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]}}}}\n{}{}",
            deny("bound"),
            deny("plain")
        ))
        .unwrap();
    let set = c.compile_policies();
    let w = set.workload("10.0.0.1".parse().unwrap()).unwrap();
    let denies: Vec<&str> = w.deny.iter().map(|p| &*p.name).collect();
    assert_eq!(denies, ["x/deny-plain"]);
}

#[test]
fn a_reload_that_unenrols_everything_must_say_so() {
    let path = Path::new("/etc/mesh/node.yaml");
    let current = LocalConfig::parse(GOOD).unwrap();
    // What a file truncated after its workloads looks like.
    let empty = LocalConfig::parse("node: {name: n1, uplinks: [eth0]}\n").unwrap();
    let e = empty
        .check_reload(&current.enrolled_local(), path)
        .unwrap_err();
    assert_eq!(e.reason(), "unenrolls_all");
    let msg = e.to_string();
    assert!(
        msg.contains("/etc/mesh/node.yaml")
            && msg.contains("mesh/a, plain/c")
            && msg.contains("allowUnenrollAll"),
        "{msg}"
    );
    // Un-enrolling some (one is left) is an ordinary change.
    let one_left = GOOD.replace("labels: {istio.io/dataplane-mode: ambient}}", "}");
    let one_left = LocalConfig::parse(&one_left).unwrap();
    assert_eq!(
        one_left
            .local_pods()
            .filter(|w| one_left.is_enrolled(w))
            .count(),
        1
    );
    one_left
        .check_reload(&current.enrolled_local(), path)
        .unwrap();
    // Said explicitly, it goes ahead.
    let meant =
        LocalConfig::parse("node: {name: n1, uplinks: [eth0]}\nmesh: {allowUnenrollAll: true}\n")
            .unwrap();
    assert!(meant.mesh.allow_unenroll_all);
    meant.check_reload(&current.enrolled_local(), path).unwrap();
    // Nothing enrolled before: nothing to protect (the first configuration too).
    empty.check_reload(&empty.enrolled_local(), path).unwrap();
    // The flag is validated like the other fields.
    let e = LocalConfig::parse("node: {name: n1}\nmesh: {allowUnenrollAll: maybe}\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("allowUnenrollAll") || e.contains("line 2"),
        "{e}"
    );
}

/// A Service's endpoint addresses leave out its terminating pods while one is not (a rollout
/// sends new connections to the replacement only), and keep them when all are (the
/// Service still answers), as Kubernetes' ready / serving-terminating endpoints do.
#[test]
fn terminating_pods_get_new_connections_only_when_no_other_pod_serves() {
    let config = |old: bool, new: bool| {
        LocalConfig::parse(&format!(
            "node: {{name: n1}}\nworkloads:\n  \
             - {{name: old, namespace: x, node: n2, ips: [10.0.0.1], terminating: {old}, labels: {{app: web}}}}\n  \
             - {{name: new, namespace: x, node: n2, ips: [10.0.0.2], terminating: {new}, labels: {{app: web}}}}\n\
             services:\n  - {{name: web, namespace: x, vips: [10.96.0.1], ports: [{{port: 80}}], selector: {{app: web}}}}\n"
        ))
        .unwrap()
    };
    let ips = |c: &LocalConfig| -> Vec<String> {
        c.endpoint_ips(&c.services[0])
            .iter()
            .map(ToString::to_string)
            .collect()
    };
    assert_eq!(ips(&config(false, false)), ["10.0.0.1", "10.0.0.2"]);
    assert_eq!(ips(&config(true, false)), ["10.0.0.2"], "rollout");
    assert_eq!(
        ips(&config(true, true)),
        ["10.0.0.1", "10.0.0.2"],
        "all drain"
    );
    // The selection itself still lists both: their connections are served as any pod's.
    let c = config(true, false);
    assert_eq!(c.endpoints_of(&c.services[0]).count(), 2);
}
