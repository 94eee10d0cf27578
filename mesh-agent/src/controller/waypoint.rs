//! What the controller makes for a waypoint Gateway, as istiod does for `istio-waypoint`: a
//! ServiceAccount, a Deployment running `mesh-agent waypoint` and a Service, each named after
//! the Gateway, in its namespace, owned by it (so deleting the Gateway deletes them), plus the
//! Gateway's status. Pure functions: the reconciler in `mod.rs` applies what these return.
use std::collections::BTreeMap;

use kube::api::DynamicObject;
use serde_json::{Value, json};

use crate::l7::binding::{GATEWAY_NAME_LABEL, WAYPOINT_CLASSES};

/// Every object the controller makes carries this label (and only those: what is not ours is
/// never changed or deleted).
pub const MANAGED_BY_LABEL: &str = "mesh-agent.io/managed-by";
pub const MANAGED_BY: &str = "mesh-agent-controller";
/// The ClusterRole the waypoints' watches need (shipped in deploy/base) and the one binding the
/// controller keeps listing every waypoint's ServiceAccount.
pub const WAYPOINT_CLUSTER_ROLE: &str = "mesh-waypoint";
pub const WAYPOINT_ROLE_BINDING: &str = "mesh-waypoints";

/// The GatewayClass of our waypoints and its controller name (Istio's `istio-waypoint` class is
/// served too, but created by istiod where Istio is installed).
pub const WAYPOINT_CLASS: &str = "mesh-waypoint";
pub const CONTROLLER_NAME: &str = "mesh-agent.io/waypoint-controller";

/// How long a waypoint pod being replaced keeps serving what it has open (`--drain-seconds`);
/// its grace period is a minute longer, so the kubelet never cuts a drain short.
const WAYPOINT_DRAIN_SECONDS: u64 = 3600;

/// The GatewayClass, created at start as istiod creates `istio-waypoint`.
pub fn gateway_class() -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "GatewayClass",
        "metadata": {"name": WAYPOINT_CLASS, "labels": {MANAGED_BY_LABEL: MANAGED_BY}},
        "spec": {
            "controllerName": CONTROLLER_NAME,
            "description": "A mesh-agent waypoint (L7 for what is bound with istio.io/use-waypoint), provisioned by the mesh CA.",
        },
    })
}

/// How waypoint pods are made, from `mesh-agent ca serve`'s flags and its own pod.
#[derive(Clone, Debug, PartialEq)]
pub struct WaypointTemplate {
    pub image: String,
    /// Copied from the control plane's own container (`Never` for a kind-loaded image).
    pub image_pull_policy: Option<String>,
    /// The mesh CA as pods reach it (`https://mesh-ca.<ns>.svc:15012`).
    pub ca_address: String,
    pub trust_domain: String,
}

/// A Gateway of one of our waypoint classes, as far as provisioning needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct WaypointGateway {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub generation: Option<i64>,
    /// `spec.infrastructure.labels` / `.annotations`: copied onto what is made (Gateway API).
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

/// `Some` for a Gateway of a waypoint class (`Err` names what is wrong with it), `None` for
/// any other Gateway (not ours to provision).
pub fn waypoint_gateway(obj: &DynamicObject) -> Option<Result<WaypointGateway, String>> {
    let class = obj.data["spec"]["gatewayClassName"].as_str().unwrap_or("");
    if !WAYPOINT_CLASSES.contains(&class) || obj.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let name = obj.metadata.name.clone().unwrap_or_default();
    let namespace = obj.metadata.namespace.clone().unwrap_or_default();
    Some(parse(obj, name, namespace))
}

fn parse(obj: &DynamicObject, name: String, namespace: String) -> Result<WaypointGateway, String> {
    let Some(uid) = obj.metadata.uid.clone() else {
        return Err("metadata.uid is missing".into());
    };
    // A Service name is a DNS-1035 label: the Gateway's name becomes one.
    let label_ok = name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-');
    if !label_ok {
        return Err(format!(
            "metadata.name {name:?}: a waypoint's Service is named after its Gateway, so the name must be a DNS label (a-z, 0-9, '-', starting with a letter, at most 63 characters)"
        ));
    }
    let string_map = |field: &str| -> Result<BTreeMap<String, String>, String> {
        match &obj.data["spec"]["infrastructure"][field] {
            Value::Null => Ok(BTreeMap::new()),
            v => serde_json::from_value(v.clone())
                .map_err(|e| format!("spec.infrastructure.{field}: {e}")),
        }
    };
    Ok(WaypointGateway {
        uid,
        generation: obj.metadata.generation,
        labels: string_map("labels")?,
        annotations: string_map("annotations")?,
        namespace,
        name,
    })
}

impl WaypointGateway {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    fn meta(&self, kind_labels: &[(&str, &str)]) -> Value {
        let mut labels: BTreeMap<String, String> = self.labels.clone();
        labels.insert(GATEWAY_NAME_LABEL.into(), self.name.clone());
        labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY.into());
        for (k, v) in kind_labels {
            labels.insert((*k).into(), (*v).into());
        }
        json!({
            "name": self.name,
            "namespace": self.namespace,
            "labels": labels,
            "annotations": self.annotations,
            "ownerReferences": [{
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "Gateway",
                "name": self.name,
                "uid": self.uid,
            }],
        })
    }

    /// The ServiceAccount: the waypoint's identity is `ns/<namespace>/sa/<gateway name>`.
    pub fn service_account(&self) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": self.meta(&[]),
        })
    }

    /// The Service: HBONE (15008) for the node agents, metrics for Prometheus.
    pub fn service(&self) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": self.meta(&[]),
            "spec": {
                "selector": {GATEWAY_NAME_LABEL: self.name},
                "ports": [
                    {"name": "mesh", "port": 15008, "targetPort": 15008, "protocol": "TCP", "appProtocol": "all"},
                    {"name": "http-metrics", "port": 15020, "targetPort": 15020, "protocol": "TCP"},
                ],
            },
        })
    }

    /// The Deployment running `mesh-agent waypoint --gateway=<ns>/<name>` (Kubernetes mode),
    /// with a projected token for the CA and the root ConfigMap the controller publishes in
    /// every namespace. The pod is not captured (`istio.io/dataplane-mode: none`): it speaks
    /// HBONE itself.
    pub fn deployment(&self, t: &WaypointTemplate) -> Value {
        let mut pod_labels: BTreeMap<String, String> = self.labels.clone();
        pod_labels.insert(GATEWAY_NAME_LABEL.into(), self.name.clone());
        pod_labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY.into());
        pod_labels.insert("istio.io/dataplane-mode".into(), "none".into());
        let mut pod_annotations: BTreeMap<String, String> = self.annotations.clone();
        pod_annotations.insert("prometheus.io/scrape".into(), "true".into());
        pod_annotations.insert("prometheus.io/port".into(), "15020".into());
        pod_annotations.insert("prometheus.io/path".into(), "/metrics".into());
        let mut container = json!({
            "name": "waypoint",
            "image": t.image,
            "args": [
                "waypoint",
                format!("--gateway={}/{}", self.namespace, self.name),
                format!("--ca-address={}", t.ca_address),
                format!("--trust-domain={}", t.trust_domain),
                "--log-format=json",
                format!("--drain-seconds={WAYPOINT_DRAIN_SECONDS}"),
            ],
            "env": [
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "RUST_LOG", "value": "info"},
            ],
            "ports": [
                {"name": "hbone", "containerPort": 15008, "protocol": "TCP"},
                {"name": "http-metrics", "containerPort": 15020, "protocol": "TCP"},
                {"name": "readiness", "containerPort": 15021, "protocol": "TCP"},
            ],
            "readinessProbe": {
                "httpGet": {"path": "/healthz/ready", "port": 15021},
                "periodSeconds": 5,
            },
            "resources": {
                "requests": {"cpu": "100m", "memory": "32Mi"},
                "limits": {"memory": "256Mi"},
            },
            "securityContext": {
                "runAsNonRoot": true,
                "runAsUser": 65532,
                "allowPrivilegeEscalation": false,
                "readOnlyRootFilesystem": true,
                "capabilities": {"drop": ["ALL"]},
            },
            "volumeMounts": [
                {"name": "istio-ca-root-cert", "mountPath": "/var/run/secrets/istio", "readOnly": true},
                {"name": "istio-ca-token", "mountPath": "/var/run/secrets/tokens", "readOnly": true},
            ],
        });
        if let Some(policy) = &t.image_pull_policy {
            container["imagePullPolicy"] = json!(policy);
        }
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": self.meta(&[]),
            "spec": {
                "replicas": 1,
                // The new pod is ready before the old one is told to go (and the old one then
                // refuses nothing and cuts nothing: waypoint::drain).
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
                "selector": {"matchLabels": {GATEWAY_NAME_LABEL: self.name}},
                "template": {
                    "metadata": {"labels": pod_labels, "annotations": pod_annotations},
                    "spec": {
                        "serviceAccountName": self.name,
                        "terminationGracePeriodSeconds": WAYPOINT_DRAIN_SECONDS + 60,
                        "containers": [container],
                        "volumes": [
                            {"name": "istio-ca-root-cert", "configMap": {"name": super::root_cert::ROOT_CONFIGMAP}},
                            {"name": "istio-ca-token", "projected": {"sources": [{"serviceAccountToken": {
                                "audience": "istio-ca", "expirationSeconds": 43200, "path": "istio-ca-token",
                            }}]}},
                        ],
                    },
                },
            },
        })
    }

    /// The three namespaced objects, in creation order.
    pub fn objects(&self, t: &WaypointTemplate) -> Vec<Value> {
        vec![self.service_account(), self.service(), self.deployment(t)]
    }
}

/// The one ClusterRoleBinding granting every waypoint's ServiceAccount the read-only watches
/// (`mesh-waypoint`). Cluster-scoped, so no namespaced owner can collect it: the controller
/// rewrites its subjects from the current Gateways.
pub fn role_binding(gateways: &[WaypointGateway]) -> Value {
    let mut subjects: Vec<Value> = gateways
        .iter()
        .map(|g| json!({"kind": "ServiceAccount", "name": g.name, "namespace": g.namespace}))
        .collect();
    subjects.sort_by_key(|s| (s["namespace"].to_string(), s["name"].to_string()));
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {
            "name": WAYPOINT_ROLE_BINDING,
            "labels": {MANAGED_BY_LABEL: MANAGED_BY},
        },
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": WAYPOINT_CLUSTER_ROLE,
        },
        "subjects": subjects,
    })
}

/// What the Gateway's status says: Accepted, and Programmed once a waypoint pod is available
/// (or why not); the Service's cluster IP as its address (what `kubectl get gateway` shows).
#[derive(Clone, Debug, PartialEq)]
pub struct GatewayStatus {
    pub programmed: Result<(), (&'static str, String)>,
    pub address: Option<String>,
}

impl GatewayStatus {
    /// The `status` stanza; `now` is the transition time of conditions that changed.
    pub fn to_json(&self, generation: Option<i64>, now: &str) -> Value {
        let (status, reason, message) = match &self.programmed {
            Ok(()) => ("True", "Programmed", "a waypoint pod is ready".to_owned()),
            Err((reason, message)) => ("False", *reason, message.clone()),
        };
        let condition = |t: &str, s: &str, r: &str, m: &str| {
            json!({"type": t, "status": s, "reason": r, "message": m,
                   "observedGeneration": generation, "lastTransitionTime": now})
        };
        json!({
            "conditions": [
                condition("Accepted", "True", "Accepted", "provisioned by mesh-agent"),
                condition("Programmed", status, reason, &message),
            ],
            "addresses": self.address.iter().map(|a| json!({"type": "IPAddress", "value": a})).collect::<Vec<_>>(),
        })
    }

    /// Whether `observed` (the Gateway's current status) already says this, times aside.
    pub fn matches(&self, observed: &Value, generation: Option<i64>) -> bool {
        let want = self.to_json(generation, "");
        let strip = |v: &Value| -> Value {
            let mut v = v.clone();
            if let Some(cs) = v["conditions"].as_array_mut() {
                for c in cs {
                    if let Some(m) = c.as_object_mut() {
                        m.remove("lastTransitionTime");
                    }
                }
            }
            v
        };
        strip(observed)["conditions"] == strip(&want)["conditions"]
            && observed["addresses"] == want["addresses"]
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::{
            apps::v1::Deployment,
            core::v1::{Service, ServiceAccount},
            rbac::v1::ClusterRoleBinding,
        },
        apimachinery::pkg::util::intstr::IntOrString,
    };

    use super::*;

    fn gateway(yaml: &str) -> DynamicObject {
        serde_yaml::from_str(yaml).unwrap()
    }

    const WAYPOINT: &str = "
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: demo, uid: u-1, generation: 2}
spec:
  gatewayClassName: mesh-waypoint
  infrastructure: {labels: {team: a}, annotations: {note: x}}
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
";

    fn template() -> WaypointTemplate {
        WaypointTemplate {
            image: "mesh-agent:dev".into(),
            image_pull_policy: Some("Never".into()),
            ca_address: "https://mesh-ca.mesh-system.svc:15012".into(),
            trust_domain: "cluster.local".into(),
        }
    }

    #[test]
    fn only_waypoint_classes_are_provisioned() {
        assert!(waypoint_gateway(&gateway(WAYPOINT)).is_some());
        let istio = WAYPOINT.replace("mesh-waypoint", "istio-waypoint");
        assert!(waypoint_gateway(&gateway(&istio)).is_some());
        let ingress = WAYPOINT.replace("mesh-waypoint", "nginx");
        assert!(waypoint_gateway(&gateway(&ingress)).is_none());
        let deleting = WAYPOINT.replace(
            "uid: u-1,",
            "uid: u-1, deletionTimestamp: '2026-12-01T00:00:00Z',",
        );
        assert!(waypoint_gateway(&gateway(&deleting)).is_none());
    }

    #[test]
    fn a_name_that_cannot_name_a_service_is_refused_with_the_field() {
        let bad = WAYPOINT.replace("name: waypoint,", "name: 1waypoint,");
        let err = waypoint_gateway(&gateway(&bad)).unwrap().unwrap_err();
        assert!(err.starts_with("metadata.name \"1waypoint\""), "{err}");
        let bad = WAYPOINT.replace("labels: {team: a}", "labels: {team: [a]}");
        let err = waypoint_gateway(&gateway(&bad)).unwrap().unwrap_err();
        assert!(err.starts_with("spec.infrastructure.labels"), "{err}");
    }

    #[test]
    fn the_objects_are_valid_kubernetes_objects_owned_by_the_gateway() {
        let gw = waypoint_gateway(&gateway(WAYPOINT)).unwrap().unwrap();
        let objects = gw.objects(&template());
        let sa: ServiceAccount = serde_json::from_value(objects[0].clone()).unwrap();
        let svc: Service = serde_json::from_value(objects[1].clone()).unwrap();
        let deploy: Deployment = serde_json::from_value(objects[2].clone()).unwrap();
        for meta in [&sa.metadata, &svc.metadata, &deploy.metadata] {
            assert_eq!(meta.name.as_deref(), Some("waypoint"));
            assert_eq!(meta.namespace.as_deref(), Some("demo"));
            let owner = &meta.owner_references.as_ref().unwrap()[0];
            assert_eq!(
                (owner.kind.as_str(), owner.uid.as_str()),
                ("Gateway", "u-1")
            );
            let labels = meta.labels.as_ref().unwrap();
            assert_eq!(labels[MANAGED_BY_LABEL], MANAGED_BY);
            assert_eq!(labels["team"], "a", "infrastructure labels are copied");
            assert_eq!(meta.annotations.as_ref().unwrap()["note"], "x");
        }
        let spec = deploy.spec.unwrap();
        let pod = spec.template.spec.unwrap();
        assert_eq!(pod.service_account_name.as_deref(), Some("waypoint"));
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("mesh-agent:dev"));
        assert_eq!(c.image_pull_policy.as_deref(), Some("Never"));
        let args = c.args.clone().unwrap();
        assert!(
            args.contains(&"--gateway=demo/waypoint".to_owned()),
            "{args:?}"
        );
        // A rollout: the new pod first, the old one drains for as long as the kubelet waits.
        assert!(
            args.contains(&"--drain-seconds=3600".to_owned()),
            "{args:?}"
        );
        assert_eq!(pod.termination_grace_period_seconds, Some(3660));
        let rolling = spec.strategy.unwrap().rolling_update.unwrap();
        assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(0)));
        assert_eq!(rolling.max_surge, Some(IntOrString::Int(1)));
        let pod_labels = spec.template.metadata.unwrap().labels.unwrap();
        assert_eq!(pod_labels[GATEWAY_NAME_LABEL], "waypoint");
        assert_eq!(pod_labels["istio.io/dataplane-mode"], "none");
        assert_eq!(
            spec.selector.match_labels.unwrap()[GATEWAY_NAME_LABEL],
            "waypoint"
        );
        let ports = svc.spec.unwrap().ports.unwrap();
        assert_eq!(ports[0].port, 15008);
    }

    #[test]
    fn one_binding_lists_every_waypoint_account() {
        let a = waypoint_gateway(&gateway(WAYPOINT)).unwrap().unwrap();
        let b = WaypointGateway {
            namespace: "alpha".into(),
            ..a.clone()
        };
        let crb: ClusterRoleBinding = serde_json::from_value(role_binding(&[a, b])).unwrap();
        let subjects = crb.subjects.unwrap();
        let names: Vec<_> = subjects
            .iter()
            .map(|s| format!("{}/{}", s.namespace.as_deref().unwrap(), s.name))
            .collect();
        assert_eq!(names, ["alpha/waypoint", "demo/waypoint"]);
        assert_eq!(crb.role_ref.name, WAYPOINT_CLUSTER_ROLE);
    }

    #[test]
    fn status_changes_only_when_its_meaning_changes() {
        let ready = GatewayStatus {
            programmed: Ok(()),
            address: Some("10.96.0.9".into()),
        };
        let written = ready.to_json(Some(2), "2026-12-01T00:00:00Z");
        assert!(ready.matches(&written, Some(2)));
        assert!(
            !ready.matches(&written, Some(3)),
            "a new generation is reported"
        );
        let pending = GatewayStatus {
            programmed: Err(("Pending", "no waypoint pod is ready yet".into())),
            address: Some("10.96.0.9".into()),
        };
        assert!(!pending.matches(&written, Some(2)));
        assert_eq!(written["conditions"][1]["status"], "True");
        assert_eq!(written["addresses"][0]["value"], "10.96.0.9");
    }
}
