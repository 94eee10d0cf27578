//! Routes attached to the waypoint itself (an HTTPRoute or GRPCRoute whose `parentRefs` name
//! this waypoint's Gateway): they apply to the Services bound to the waypoint that their
//! `hostnames` name — every bound Service when they name none. Before compiling, such a
//! parent is rewritten into those Services, so the route compiler knows only Service parents.
//! Parents naming other Gateways (an ingress's) are left to them.
use serde_yaml::{Mapping, Value};

use crate::{
    l7::{binding::WaypointRef, route::compile::qualify},
    policy::RawObject,
};

/// A Service bound to this waypoint, `(name, namespace)`.
pub type BoundService = (String, String);

/// `policies` with every route parent naming `me` replaced by the bound Services it applies to.
pub fn attach(policies: &[RawObject], me: &WaypointRef, bound: &[BoundService]) -> Vec<RawObject> {
    policies
        .iter()
        .map(|o| {
            if o.kind == "HTTPRoute" || o.kind == "GRPCRoute" {
                rewrite(o, me, bound)
            } else {
                o.clone()
            }
        })
        .collect()
}

fn rewrite(route: &RawObject, me: &WaypointRef, bound: &[BoundService]) -> RawObject {
    let Some(refs) = route.spec.get("parentRefs").and_then(Value::as_sequence) else {
        return route.clone();
    };
    let ns = route.metadata.namespace.as_str();
    let names_me = |r: &Value| {
        let text = |k: &str| r.get(k).and_then(Value::as_str);
        text("group").unwrap_or("gateway.networking.k8s.io") == "gateway.networking.k8s.io"
            && text("kind").unwrap_or("Gateway") == "Gateway"
            && text("name") == Some(me.name.as_str())
            && text("namespace").unwrap_or(ns) == me.namespace
    };
    if !refs.iter().any(names_me) {
        return route.clone();
    }
    let hostnames: Vec<String> = route
        .spec
        .get("hostnames")
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(str::to_ascii_lowercase)
        .collect();
    let mut out: Vec<Value> = refs.iter().filter(|r| !names_me(r)).cloned().collect();
    for (name, namespace) in bound {
        if hostnames.is_empty() || hostnames.iter().any(|h| names(h, name, namespace, ns)) {
            let mut r = Mapping::new();
            r.insert("group".into(), "".into());
            r.insert("kind".into(), "Service".into());
            r.insert("name".into(), name.as_str().into());
            r.insert("namespace".into(), namespace.as_str().into());
            out.push(Value::Mapping(r));
        }
    }
    let mut route = route.clone();
    if let Some(spec) = route.spec.as_mapping_mut() {
        spec.insert("parentRefs".into(), Value::Sequence(out));
    }
    route
}

/// Whether `hostname` (as a route in `route_ns` writes it: short, `name.ns`, the FQDN, or a
/// `*.` wildcard) names Service `name` in `namespace`.
fn names(hostname: &str, name: &str, namespace: &str, route_ns: &str) -> bool {
    let fqdn = qualify(name, namespace);
    if let Some(suffix) = hostname.strip_prefix("*.") {
        return fqdn.ends_with(&format!(".{suffix}"));
    }
    hostname == fqdn
        || (!hostname.contains('.') && namespace == route_ns && hostname == name)
        || hostname == format!("{name}.{namespace}")
        || hostname == format!("{name}.{namespace}.svc")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(parents: &str, hostnames: &str) -> RawObject {
        serde_yaml::from_str(&format!(
            "{{apiVersion: gateway.networking.k8s.io/v1, kind: HTTPRoute, metadata: {{name: r, namespace: mesh}}, spec: {{parentRefs: {parents}, hostnames: {hostnames}, rules: [{{backendRefs: [{{name: reviews, port: 9080}}]}}]}}}}"
        ))
        .unwrap()
    }

    fn parents(o: &RawObject) -> Vec<String> {
        o.spec["parentRefs"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|r| {
                format!(
                    "{}/{}/{}",
                    r.get("kind").and_then(Value::as_str).unwrap_or("Gateway"),
                    r.get("namespace").and_then(Value::as_str).unwrap_or("-"),
                    r["name"].as_str().unwrap()
                )
            })
            .collect()
    }

    const ME: fn() -> WaypointRef = || WaypointRef {
        name: "waypoint".into(),
        namespace: "mesh".into(),
    };

    fn bound() -> Vec<BoundService> {
        vec![
            ("reviews".into(), "mesh".into()),
            ("ratings".into(), "mesh".into()),
            ("details".into(), "other".into()),
        ]
    }

    /// (parentRefs, hostnames) → the parents the route compiler sees.
    #[test]
    fn routes_attached_to_the_waypoint_apply_to_its_bound_services() {
        let cases: [(&str, &str, &[&str]); 7] = [
            // No hostnames: every Service bound to the waypoint.
            (
                "[{name: waypoint}]",
                "[]",
                &[
                    "Service/mesh/reviews",
                    "Service/mesh/ratings",
                    "Service/other/details",
                ],
            ),
            // Hostnames pick among them: short name (the route's namespace), FQDN, wildcard.
            ("[{name: waypoint}]", "[reviews]", &["Service/mesh/reviews"]),
            (
                "[{name: waypoint}]",
                "[details.other.svc.cluster.local]",
                &["Service/other/details"],
            ),
            (
                "[{name: waypoint}]",
                "['*.mesh.svc.cluster.local']",
                &["Service/mesh/reviews", "Service/mesh/ratings"],
            ),
            // A short name is in the route's namespace only.
            ("[{name: waypoint}]", "[details]", &[]),
            // Another Gateway (an ingress) is left as it is; Service parents are kept.
            (
                "[{name: ingress}, {group: '', kind: Service, name: reviews}]",
                "[]",
                &["Gateway/-/ingress", "Service/-/reviews"],
            ),
            // A waypoint of the same name elsewhere is not this one.
            (
                "[{name: waypoint, namespace: other}]",
                "[]",
                &["Gateway/other/waypoint"],
            ),
        ];
        for (refs, hostnames, want) in cases {
            let out = attach(&[route(refs, hostnames)], &ME(), &bound());
            assert_eq!(parents(&out[0]), want, "{refs} {hostnames}");
        }
    }
}
