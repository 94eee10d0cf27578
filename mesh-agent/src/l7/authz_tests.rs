//! Conformance table: AuthorizationPolicy at a waypoint, each case with Istio's answer (ambient
//! waypoints, Envoy RBAC semantics).
use http::HeaderValue;

use super::*;
use crate::{identity::SpiffeId, l7::binding::TrafficType, policy::model::normalize_path};

/// Policies of namespace `shop` (waypoint `waypoint`, Services `reviews` and `ratings` bound to
/// it) and of the root namespace.
const POLICIES: &str = r#"
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: viewer, namespace: shop}
  spec:
    targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
    action: ALLOW
    rules:
      - from: [{source: {principals: [cluster.local/ns/shop/sa/sleep]}}]
        to: [{operation: {methods: [GET, HEAD]}}]
      - from: [{source: {namespaces: [ops]}}]
      - when: [{key: "request.headers[x-token]", values: [abc, "pre*"]}]
      - to: [{operation: {hosts: ["Ratings.shop.svc.cluster.local"], methods: [POST]}}]
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: no-admin, namespace: shop}
  spec:
    targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
    action: DENY
    rules:
      - to: [{operation: {paths: ["/admin*"]}}]
      - to: [{operation: {notMethods: [GET, POST, HEAD]}}]
        from: [{source: {namespaces: [ops]}}]
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: reviews-jwt, namespace: shop}
  spec:
    targetRefs: [{kind: Service, group: "", name: reviews}]
    action: DENY
    rules:
      - from: [{source: {notRequestPrincipals: ["*"]}}]
        to: [{operation: {paths: ["/private/*"]}}]
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: other-ns, namespace: elsewhere}
  spec:
    targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
    action: DENY
    rules: [{}]
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: by-selector, namespace: shop}
  spec:
    selector: {matchLabels: {app: reviews}}
    action: DENY
    rules: [{}]
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: class-wide, namespace: istio-system}
  spec:
    targetRefs: [{kind: GatewayClass, group: gateway.networking.k8s.io, name: mesh-waypoint}]
    action: DENY
    rules:
      - when: [{key: "request.headers[x-evil]", values: ["*"]}]
"#;

fn waypoint() -> Waypoint {
    Waypoint {
        name: "waypoint".into(),
        namespace: "shop".into(),
        traffic: TrafficType::Service,
        class: "mesh-waypoint".into(),
    }
}

fn bound() -> Vec<(String, String)> {
    vec![
        ("shop".into(), "reviews".into()),
        ("shop".into(), "ratings".into()),
    ]
}

fn authz(extra: &str) -> (WaypointAuthz, Vec<String>) {
    let objects: Vec<RawObject> =
        serde_yaml::from_str(&format!("{POLICIES}{extra}")).expect("test YAML");
    WaypointAuthz::build(&objects, &waypoint(), &bound(), "istio-system")
}

/// One request: service, source (namespace, service account), method, path, host, headers.
struct Case {
    what: &'static str,
    service: &'static str,
    from: (&'static str, &'static str),
    method: &'static str,
    path: &'static str,
    headers: &'static [(&'static str, &'static str)],
    /// Istio's answer.
    allowed: bool,
}

/// A connection from `namespace/service account` to the reviews VIP.
fn attrs(ns: &str, sa: &str) -> ConnectionAttrs {
    ConnectionAttrs {
        source: Some(SpiffeId::new("cluster.local", ns, sa).unwrap()),
        source_ip: "10.0.0.7".parse().unwrap(),
        destination_ip: "10.96.0.1".parse().unwrap(),
        destination_port: 9080,
        service_host: None,
    }
}

fn check(a: &WaypointAuthz, c: &Case) -> Decision {
    let attrs = attrs(c.from.0, c.from.1);
    let mut headers = http::HeaderMap::new();
    for (k, v) in c.headers {
        headers.append(*k, HeaderValue::from_static(v));
    }
    let host = format!("{}.shop.svc.cluster.local", c.service);
    let path = normalize_path(c.path);
    let view = RequestView {
        method: c.method,
        path: &path,
        host: &host,
        headers: &headers,
    };
    a.decide(Some(("shop", c.service)), &attrs, Some(&view))
}

const SLEEP: (&str, &str) = ("shop", "sleep");
const OPS: (&str, &str) = ("ops", "tool");
const STRANGER: (&str, &str) = ("shop", "stranger");

#[rustfmt::skip]
const CASES: &[Case] = &[
    Case { what: "ALLOW principal + GET: allowed", service: "reviews", from: SLEEP, method: "GET", path: "/", headers: &[], allowed: true },
    Case { what: "ALLOW principal + GET: POST is not", service: "reviews", from: SLEEP, method: "POST", path: "/", headers: &[], allowed: false },
    Case { what: "ALLOW: another principal matches no rule", service: "reviews", from: STRANGER, method: "GET", path: "/", headers: &[], allowed: false },
    Case { what: "ALLOW by namespace: any method", service: "reviews", from: OPS, method: "POST", path: "/", headers: &[], allowed: true },
    Case { what: "ALLOW when header value exact", service: "reviews", from: STRANGER, method: "PUT", path: "/", headers: &[("x-token", "abc")], allowed: true },
    Case { what: "ALLOW when header value prefix", service: "reviews", from: STRANGER, method: "PUT", path: "/", headers: &[("x-token", "prefixed")], allowed: true },
    Case { what: "ALLOW when header: another value", service: "reviews", from: STRANGER, method: "PUT", path: "/", headers: &[("x-token", "nope")], allowed: false },
    Case { what: "ALLOW when header: repeated values are joined with commas", service: "reviews", from: STRANGER, method: "PUT", path: "/", headers: &[("x-token", "abc"), ("x-token", "def")], allowed: false },
    Case { what: "ALLOW hosts match case-insensitively", service: "ratings", from: STRANGER, method: "POST", path: "/", headers: &[], allowed: true },
    Case { what: "ALLOW hosts: another host", service: "reviews", from: STRANGER, method: "POST", path: "/", headers: &[], allowed: false },
    Case { what: "DENY paths prefix beats an ALLOW", service: "reviews", from: SLEEP, method: "GET", path: "/admin/users", headers: &[], allowed: false },
    Case { what: "DENY paths: dot segments are removed first", service: "reviews", from: SLEEP, method: "GET", path: "/public/../admin", headers: &[], allowed: false },
    Case { what: "DENY paths: another path passes", service: "reviews", from: SLEEP, method: "GET", path: "/public", headers: &[], allowed: true },
    Case { what: "DENY notMethods from a namespace", service: "reviews", from: OPS, method: "DELETE", path: "/", headers: &[], allowed: false },
    Case { what: "DENY notMethods: a listed method passes", service: "reviews", from: OPS, method: "GET", path: "/", headers: &[], allowed: true },
    Case { what: "Service policy: no JWT, so notRequestPrincipals * matches and /private is denied", service: "reviews", from: SLEEP, method: "GET", path: "/private/x", headers: &[], allowed: false },
    Case { what: "Service policy applies to its Service only", service: "ratings", from: SLEEP, method: "GET", path: "/private/x", headers: &[], allowed: true },
    Case { what: "GatewayClass policy from the root namespace applies", service: "ratings", from: SLEEP, method: "GET", path: "/", headers: &[("x-evil", "1")], allowed: false },
];

#[test]
fn waypoint_authorization_conformance_table() {
    let (a, errors) = authz("");
    assert!(errors.is_empty(), "{errors:?}");
    let mut failed = Vec::new();
    for c in CASES {
        let d = check(&a, c);
        if d.allowed != c.allowed {
            failed.push(format!("{}: got {d:?}", c.what));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
fn policies_of_other_namespaces_selectors_and_unbound_services_are_not_the_waypoints() {
    // `other-ns` (a DENY-all naming a Gateway `waypoint` of another namespace) and
    // `by-selector` (a DENY-all for pods) would deny everything if they applied.
    let (a, _) = authz("");
    let ok = Case {
        what: "",
        service: "ratings",
        from: SLEEP,
        method: "GET",
        path: "/",
        headers: &[],
        allowed: true,
    };
    assert!(check(&a, &ok).allowed);
    // The same class-wide policy outside the root namespace does not apply.
    let (a, _) = authz(
        r#"
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: not-root, namespace: shop}
  spec:
    targetRefs: [{kind: GatewayClass, group: gateway.networking.k8s.io, name: mesh-waypoint}]
    action: DENY
    rules: [{}]
"#,
    );
    assert!(check(&a, &ok).allowed);
    // Nothing attached at all: everything is allowed and the check is skipped.
    let none = WaypointAuthz::build(&[], &waypoint(), &bound(), "istio-system").0;
    assert!(none.is_empty());
}

#[test]
fn a_rejected_policy_denies_what_it_targets_and_says_why() {
    let (a, errors) = authz(
        r#"
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: templated, namespace: shop}
  spec:
    targetRefs: [{kind: Service, name: ratings}]
    rules: [{to: [{operation: {paths: ["/api/{*}/x"]}}]}]
"#,
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains("shop/templated") && e.contains("path templates")),
        "{errors:?}"
    );
    let c = Case {
        what: "",
        service: "ratings",
        from: SLEEP,
        method: "GET",
        path: "/",
        headers: &[],
        allowed: false,
    };
    let d = check(&a, &c);
    assert_eq!(
        (d.allowed, d.reason, d.policy.as_deref()),
        (
            false,
            crate::policy::Reason::InvalidPolicy,
            Some("shop/templated")
        )
    );
    // Reviews, which the broken policy does not target, is served as before.
    let c = Case {
        service: "reviews",
        allowed: true,
        ..c
    };
    assert!(check(&a, &c).allowed);
}

#[test]
fn opaque_tcp_is_checked_at_l4_and_allow_rules_needing_the_request_never_match() {
    let ratings = Some(("shop", "ratings"));
    // Istio: a DENY rule's HTTP fields are dropped for TCP (it denies more): `no-admin`'s
    // `paths: /admin*` rule then matches every connection.
    let (a, _) = authz("");
    let d = a.decide(ratings, &attrs("ops", "tool"), None);
    assert_eq!(
        (d.allowed, d.reason, d.policy.as_deref()),
        (
            false,
            crate::policy::Reason::DenyMatched,
            Some("shop/no-admin")
        )
    );
    // Without it: `ops` is allowed by an L4-only rule; sleep's rule needs a method, which TCP
    // has not (the rule never matches).
    let objects: Vec<RawObject> = serde_yaml::from_str::<Vec<RawObject>>(POLICIES)
        .unwrap()
        .into_iter()
        .filter(|o| o.metadata.name == "viewer")
        .collect();
    let a = WaypointAuthz::build(&objects, &waypoint(), &bound(), "istio-system").0;
    assert!(a.decide(ratings, &attrs("ops", "tool"), None).allowed);
    let d = a.decide(ratings, &attrs("shop", "sleep"), None);
    assert_eq!(
        (d.allowed, d.reason),
        (false, crate::policy::Reason::L7Unenforceable)
    );
}

#[test]
fn denials_are_envoys_answers() {
    let r = denied(false);
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = denied(true);
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["grpc-status"], "7");
}

#[test]
fn paths_are_normalised_as_istio_base() {
    for (raw, want) in [
        ("/a/./b", "/a/b"),
        ("/a/b/../c", "/a/c"),
        ("/../admin", "/admin"),
        ("/a/b/..", "/a/"),
        ("/", "/"),
        ("", "/"),
        ("/a//b", "/a//b"),
    ] {
        assert_eq!(normalize_path(raw), want, "{raw}");
    }
}
