//! Which waypoint, if any, traffic to a service or a pod goes through — Istio ambient's rules:
//! `istio.io/use-waypoint` (and `istio.io/use-waypoint-namespace`) on the pod or the Service,
//! else on its namespace; `none` opts out; the waypoint is a Gateway of class `mesh-waypoint`
//! (or `istio-waypoint`) whose `istio.io/waypoint-for` label says which traffic it takes.
use std::collections::BTreeMap;

use crate::{
    discovery::{Labels, LocalConfig, Service, Workload},
    l7::api::{ConfigError, ObjectContext, gateway::GATEWAY_API_VERSIONS},
    policy::RawObject,
};

pub const USE_WAYPOINT_LABEL: &str = "istio.io/use-waypoint";
pub const USE_WAYPOINT_NAMESPACE_LABEL: &str = "istio.io/use-waypoint-namespace";
pub const WAYPOINT_FOR_LABEL: &str = "istio.io/waypoint-for";
/// Gateway classes that make a Gateway a waypoint (ours and Istio's).
pub const WAYPOINT_CLASSES: [&str; 2] = ["mesh-waypoint", "istio-waypoint"];

/// Which traffic a waypoint takes (`istio.io/waypoint-for`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrafficType {
    /// Traffic addressed to a service (its VIP or hostname): the default.
    Service,
    /// Traffic addressed to a pod's own IP.
    Workload,
    All,
    None,
}

impl TrafficType {
    fn takes(self, kind: Addressed) -> bool {
        matches!(
            (self, kind),
            (Self::All, _)
                | (Self::Service, Addressed::Service)
                | (Self::Workload, Addressed::Workload)
        )
    }
}

/// How the client addressed the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Addressed {
    Service,
    Workload,
}

/// A waypoint: a Gateway of a waypoint class.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waypoint {
    pub name: String,
    pub namespace: String,
    pub traffic: TrafficType,
    /// `spec.gatewayClassName` (policies may attach to the class).
    pub class: String,
}

/// The waypoint a binding names.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WaypointRef {
    pub name: String,
    pub namespace: String,
}

/// Where traffic to one destination goes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Binding {
    /// Straight to the destination (no waypoint, opted out, or the waypoint does not take this
    /// kind of traffic).
    Direct,
    Waypoint(WaypointRef),
    /// Bound to a waypoint that does not exist: refuse (fail closed), never bypass.
    Missing(WaypointRef),
}

/// The waypoints of a config, by `namespace/name`.
#[derive(Clone, Debug, Default)]
pub struct Waypoints {
    by_key: BTreeMap<(String, String), Waypoint>,
}

impl Waypoints {
    /// Every Gateway of a waypoint class among `objects`; other Gateways are not waypoints and
    /// are skipped silently, malformed waypoints are reported.
    pub fn build(objects: &[RawObject]) -> (Self, Vec<ConfigError>) {
        let mut errors = Vec::new();
        let mut by_key = BTreeMap::new();
        for obj in objects.iter().filter(|o| o.kind == "Gateway") {
            match waypoint(obj) {
                Ok(Some(w)) => {
                    by_key.insert((w.namespace.clone(), w.name.clone()), w);
                }
                Ok(None) => {}
                Err(e) => errors.push(e),
            }
        }
        (Self { by_key }, errors)
    }

    pub fn get(&self, r: &WaypointRef) -> Option<&Waypoint> {
        self.by_key.get(&(r.namespace.clone(), r.name.clone()))
    }

    /// The binding of traffic addressed as `kind` to an object (`labels` of the Service or the
    /// pod, in `namespace` with `namespace_labels`). The object's own label wins over its
    /// namespace's, `none` included.
    pub fn bind(
        &self,
        kind: Addressed,
        labels: &Labels,
        namespace: &str,
        namespace_labels: &Labels,
    ) -> Binding {
        let chosen = [labels, namespace_labels]
            .into_iter()
            .find_map(|l| l.get(USE_WAYPOINT_LABEL).map(|name| (l, name)));
        let Some((source, name)) = chosen else {
            return Binding::Direct;
        };
        if name == "none" || name.is_empty() {
            return Binding::Direct;
        }
        let r = WaypointRef {
            name: name.to_string(),
            namespace: source
                .get(USE_WAYPOINT_NAMESPACE_LABEL)
                .map_or_else(|| namespace.to_owned(), ToString::to_string),
        };
        match self.get(&r) {
            None => Binding::Missing(r),
            Some(w) if w.traffic.takes(kind) => Binding::Waypoint(r),
            Some(_) => Binding::Direct,
        }
    }
}

/// The label Istio puts on a waypoint's pods (and its Service selects): the Gateway's name.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

/// A config's bindings, as the node agent (where to send) and the waypoint (what it serves)
/// both need them.
impl Waypoints {
    /// The waypoints of `config` (its `policies:` list holds the Gateways).
    pub fn of_config(config: &LocalConfig) -> (Self, Vec<ConfigError>) {
        Self::build(&config.policies)
    }

    /// Where traffic to `svc`'s VIPs goes.
    pub fn of_service(&self, config: &LocalConfig, svc: &Service) -> Binding {
        self.bind(
            Addressed::Service,
            &svc.labels,
            &svc.namespace,
            namespace_labels(config, &svc.namespace),
        )
    }

    /// Where traffic addressed to pod `w`'s own IPs goes.
    pub fn of_workload(&self, config: &LocalConfig, w: &Workload) -> Binding {
        self.bind(
            Addressed::Workload,
            &w.labels,
            &w.namespace,
            namespace_labels(config, &w.namespace),
        )
    }

    /// The pods of waypoint `r` (labelled with its name in its namespace, as istiod labels
    /// the Deployment it creates), terminating ones included: their identities stay the
    /// waypoint's while they drain.
    pub fn pods<'a>(config: &'a LocalConfig, r: &WaypointRef) -> Vec<&'a Workload> {
        config
            .selection
            .labelled(config, &r.namespace, GATEWAY_NAME_LABEL, &r.name)
    }

    /// The pods of waypoint `r` new connections go to: those not terminating, or, when every
    /// pod is, all of them (a draining waypoint still serves; Kubernetes' terminating
    /// endpoints fallback does the same for Services).
    pub fn serving_pods<'a>(config: &'a LocalConfig, r: &WaypointRef) -> Vec<&'a Workload> {
        crate::discovery::local::serving(Self::pods(config, r))
    }
}

fn namespace_labels<'a>(config: &'a LocalConfig, namespace: &str) -> &'a Labels {
    static EMPTY: std::sync::LazyLock<Labels> = std::sync::LazyLock::new(Labels::new);
    config.namespace(namespace).map_or(&EMPTY, |n| &n.labels)
}

fn waypoint(obj: &RawObject) -> Result<Option<Waypoint>, ConfigError> {
    let ctx = ObjectContext { obj };
    ctx.check_version(&GATEWAY_API_VERSIONS)?;
    let class = obj
        .spec
        .get("gatewayClassName")
        .and_then(serde_yaml::Value::as_str)
        .unwrap_or_default();
    if !WAYPOINT_CLASSES.contains(&class) {
        return Ok(None);
    }
    let traffic = match obj
        .metadata
        .labels
        .get(WAYPOINT_FOR_LABEL)
        .map(String::as_str)
    {
        None | Some("service") => TrafficType::Service,
        Some("workload") => TrafficType::Workload,
        Some("all") => TrafficType::All,
        Some("none") => TrafficType::None,
        Some(other) => {
            return Err(ctx.err(
                format!("metadata.labels.{WAYPOINT_FOR_LABEL}"),
                format!("{other:?}: service, workload, all or none"),
            ));
        }
    };
    let hbone = obj
        .spec
        .get("listeners")
        .and_then(serde_yaml::Value::as_sequence)
        .is_some_and(|ls| {
            ls.iter().any(|l| {
                l.get("protocol").and_then(serde_yaml::Value::as_str) == Some("HBONE")
                    && l.get("port").and_then(serde_yaml::Value::as_u64) == Some(15008)
            })
        });
    if !hbone {
        return Err(ctx.err(
            "spec.listeners",
            "a waypoint needs a listener with protocol HBONE on port 15008",
        ));
    }
    Ok(Some(Waypoint {
        name: obj.metadata.name.clone(),
        namespace: obj.metadata.namespace.clone(),
        traffic,
        class: class.to_owned(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rollout: the old pod terminating beside the new one gets no new connections; alone
    /// (every pod terminating) it still does, as Kubernetes' terminating endpoints do.
    #[test]
    fn new_connections_skip_a_terminating_waypoint_pod_unless_all_are() {
        let config = |old_terminating: bool, new_terminating: bool| {
            LocalConfig::parse(&format!(
                "node: {{name: n1}}\nnamespaces: [{{name: ns}}]\nworkloads:\n\
                 - {{name: wp-old, namespace: ns, node: n2, ips: [10.0.0.1], terminating: {old_terminating}, labels: {{{GATEWAY_NAME_LABEL}: wp}}}}\n\
                 - {{name: wp-new, namespace: ns, node: n2, ips: [10.0.0.2], terminating: {new_terminating}, labels: {{{GATEWAY_NAME_LABEL}: wp}}}}\n"
            ))
            .unwrap()
        };
        let r = WaypointRef {
            name: "wp".into(),
            namespace: "ns".into(),
        };
        let names = |c: &LocalConfig, serving: bool| {
            let pods = if serving {
                Waypoints::serving_pods(c, &r)
            } else {
                Waypoints::pods(c, &r)
            };
            let mut names: Vec<String> = pods.iter().map(|p| p.name.to_string()).collect();
            names.sort();
            names
        };
        let both = ["wp-new", "wp-old"];
        let c = config(false, false);
        assert_eq!(names(&c, true), both);
        let c = config(true, false);
        assert_eq!(names(&c, true), ["wp-new"]);
        assert_eq!(
            names(&c, false),
            both,
            "identities: both pods are the waypoint's"
        );
        let c = config(true, true);
        assert_eq!(names(&c, true), both, "all draining: they still serve");
    }

    fn gateway(name: &str, ns: &str, class: &str, waypoint_for: Option<&str>) -> RawObject {
        let labels = waypoint_for.map_or(String::new(), |f| {
            format!("labels: {{{WAYPOINT_FOR_LABEL}: {f}}}")
        });
        serde_yaml::from_str(&format!(
            "{{apiVersion: gateway.networking.k8s.io/v1, kind: Gateway, metadata: {{name: {name}, namespace: {ns}, {labels}}}, spec: {{gatewayClassName: {class}, listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]}}}}"
        ))
        .unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    fn wp(name: &str, ns: &str) -> WaypointRef {
        WaypointRef {
            name: name.into(),
            namespace: ns.into(),
        }
    }

    /// What Istio does, how the traffic was addressed, the object's labels, its namespace's
    /// labels, the binding.
    type Case = (
        &'static str,
        Addressed,
        BTreeMap<String, String>,
        BTreeMap<String, String>,
        Binding,
    );

    /// Istio ambient's binding rules, case by case: (what Istio does, kind, object labels,
    /// namespace labels, expected binding).
    #[test]
    fn bindings_as_istio_ambient_decides_them() {
        let objects = vec![
            gateway("waypoint", "bookinfo", "mesh-waypoint", None),
            gateway("istio-wp", "bookinfo", "istio-waypoint", Some("all")),
            gateway("pods-only", "bookinfo", "mesh-waypoint", Some("workload")),
            gateway("nothing", "bookinfo", "mesh-waypoint", Some("none")),
            gateway("shared", "infra", "mesh-waypoint", Some("all")),
            gateway("ingress", "bookinfo", "mesh-gateway", None),
        ];
        let (w, errors) = Waypoints::build(&objects);
        assert!(errors.is_empty(), "{errors:?}");
        let ns_bound = labels(&[(USE_WAYPOINT_LABEL, "waypoint")]);
        let none = labels(&[]);
        use Addressed::{Service as S, Workload as W};
        let cases: Vec<Case> = vec![
            (
                "no label anywhere: direct",
                S,
                none.clone(),
                none.clone(),
                Binding::Direct,
            ),
            (
                "namespace label binds its services",
                S,
                none.clone(),
                ns_bound.clone(),
                Binding::Waypoint(wp("waypoint", "bookinfo")),
            ),
            (
                "a service-only waypoint (the default) does not take pod-addressed traffic",
                W,
                none.clone(),
                ns_bound.clone(),
                Binding::Direct,
            ),
            (
                "the service's own label wins over the namespace's",
                S,
                labels(&[(USE_WAYPOINT_LABEL, "istio-wp")]),
                ns_bound.clone(),
                Binding::Waypoint(wp("istio-wp", "bookinfo")),
            ),
            (
                "none on the service opts it out of the namespace's waypoint",
                S,
                labels(&[(USE_WAYPOINT_LABEL, "none")]),
                ns_bound.clone(),
                Binding::Direct,
            ),
            (
                "istio-waypoint class counts as a waypoint; all takes pod traffic",
                W,
                labels(&[(USE_WAYPOINT_LABEL, "istio-wp")]),
                none.clone(),
                Binding::Waypoint(wp("istio-wp", "bookinfo")),
            ),
            (
                "waypoint-for workload takes pod-addressed traffic",
                W,
                labels(&[(USE_WAYPOINT_LABEL, "pods-only")]),
                none.clone(),
                Binding::Waypoint(wp("pods-only", "bookinfo")),
            ),
            (
                "waypoint-for workload does not take service traffic",
                S,
                labels(&[(USE_WAYPOINT_LABEL, "pods-only")]),
                none.clone(),
                Binding::Direct,
            ),
            (
                "waypoint-for none takes nothing",
                S,
                labels(&[(USE_WAYPOINT_LABEL, "nothing")]),
                none.clone(),
                Binding::Direct,
            ),
            (
                "use-waypoint-namespace points to another namespace",
                S,
                labels(&[
                    (USE_WAYPOINT_LABEL, "shared"),
                    (USE_WAYPOINT_NAMESPACE_LABEL, "infra"),
                ]),
                none.clone(),
                Binding::Waypoint(wp("shared", "infra")),
            ),
            (
                "without use-waypoint-namespace the object's namespace is meant",
                S,
                labels(&[(USE_WAYPOINT_LABEL, "shared")]),
                none.clone(),
                Binding::Missing(wp("shared", "bookinfo")),
            ),
            (
                "the namespace's use-waypoint-namespace goes with its label",
                S,
                none.clone(),
                labels(&[
                    (USE_WAYPOINT_LABEL, "shared"),
                    (USE_WAYPOINT_NAMESPACE_LABEL, "infra"),
                ]),
                Binding::Waypoint(wp("shared", "infra")),
            ),
            (
                "a missing waypoint fails closed",
                S,
                labels(&[(USE_WAYPOINT_LABEL, "gone")]),
                none.clone(),
                Binding::Missing(wp("gone", "bookinfo")),
            ),
            (
                "a Gateway of another class is not a waypoint",
                S,
                labels(&[(USE_WAYPOINT_LABEL, "ingress")]),
                none.clone(),
                Binding::Missing(wp("ingress", "bookinfo")),
            ),
            (
                "a pod's own label wins over its namespace's",
                W,
                labels(&[(USE_WAYPOINT_LABEL, "pods-only")]),
                ns_bound.clone(),
                Binding::Waypoint(wp("pods-only", "bookinfo")),
            ),
            (
                "none on the pod opts it out",
                W,
                labels(&[(USE_WAYPOINT_LABEL, "none")]),
                labels(&[(USE_WAYPOINT_LABEL, "istio-wp")]),
                Binding::Direct,
            ),
        ];
        for (istio, kind, obj, ns, want) in cases {
            let (obj, ns) = (Labels::from(&obj), Labels::from(&ns));
            assert_eq!(w.bind(kind, &obj, "bookinfo", &ns), want, "{istio}");
        }
    }

    #[test]
    fn malformed_waypoints_are_reported() {
        let mut bad_for = gateway("w", "ns", "mesh-waypoint", Some("sometimes"));
        let (_, errors) = Waypoints::build(std::slice::from_ref(&bad_for));
        assert!(
            errors[0].to_string().contains("istio.io/waypoint-for"),
            "{errors:?}"
        );
        bad_for.metadata.labels.clear();
        bad_for.spec = serde_yaml::from_str("{gatewayClassName: mesh-waypoint, listeners: [{name: http, port: 80, protocol: HTTP}]}").unwrap();
        let (w, errors) = Waypoints::build(&[bad_for]);
        assert!(
            errors[0].to_string().contains("spec.listeners"),
            "{errors:?}"
        );
        assert!(
            w.get(&wp("w", "ns")).is_none(),
            "a rejected waypoint is not used"
        );
    }
}
