//! The mesh root in every namespace, as istiod's namespace controller does: pods (waypoints
//! first) mount ConfigMap `istio-ca-root-cert` to verify the CA and their peers.
use serde_json::{Value, json};

use super::waypoint::{MANAGED_BY, MANAGED_BY_LABEL};
use crate::identity::ca::ROOT_CERT_FILE;

/// Istio's name for it, so Istio manifests that mount it work unchanged.
pub const ROOT_CONFIGMAP: &str = "istio-ca-root-cert";

/// Namespaces that never get one (Kubernetes' own), as istiod skips them.
pub const SKIPPED_NAMESPACES: [&str; 3] = ["kube-system", "kube-public", "kube-node-lease"];

/// Whether `namespace` (active, not the CA's own, which `ca::root::publish` keeps) gets one.
pub fn wanted(namespace: &str, terminating: bool, ca_namespace: &str) -> bool {
    !terminating && namespace != ca_namespace && !SKIPPED_NAMESPACES.contains(&namespace)
}

/// The ConfigMap for `namespace`.
pub fn config_map(namespace: &str, roots_pem: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": ROOT_CONFIGMAP,
            "namespace": namespace,
            "labels": {MANAGED_BY_LABEL: MANAGED_BY, "istio.io/config": "true"},
        },
        "data": {ROOT_CERT_FILE: roots_pem},
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::ConfigMap;

    use super::*;

    #[test]
    fn every_user_namespace_but_not_kubernetes_own_nor_the_cas() {
        assert!(wanted("demo", false, "mesh-system"));
        assert!(!wanted("demo", true, "mesh-system"), "terminating");
        assert!(!wanted("mesh-system", false, "mesh-system"));
        assert!(!wanted("kube-system", false, "mesh-system"));
        let cm: ConfigMap = serde_json::from_value(config_map("demo", "PEM")).unwrap();
        assert_eq!(cm.data.unwrap()[ROOT_CERT_FILE], "PEM");
    }
}
