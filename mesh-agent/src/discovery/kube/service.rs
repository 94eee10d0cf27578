//! A Service as discovery reads it: its cluster IPs, ports, selector and labels. The watcher
//! decodes Services into this type, so the store keeps these instead of `k8s_openapi`'s full
//! `Service` (its annotations, status and a spec of some thirty optional fields), and the
//! selector and labels are shared [`Labels`] (issue #19: a cluster has a Service per few pods).

use k8s_openapi::{api::core::v1::ServicePort, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use serde::Deserialize;

use crate::names::Labels;

/// The fields of a Service discovery uses; its metadata is a view's (`super::MetaView`), with
/// the labels moved out into [`Labels`].
#[derive(Clone, Debug, Default)]
pub struct ServiceView {
    pub metadata: ObjectMeta,
    pub labels: Labels,
    pub spec: Option<ServiceViewSpec>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ServiceViewSpec {
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    #[serde(rename = "clusterIPs")]
    pub cluster_ips: Option<Vec<String>>,
    pub ports: Option<Vec<ServicePort>>,
    pub selector: Option<Labels>,
}

impl<'de> Deserialize<'de> for ServiceView {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Raw {
            #[serde(default)]
            metadata: super::MetaView<Labels>,
            spec: Option<ServiceViewSpec>,
        }
        let Raw { metadata, spec } = Raw::deserialize(d)?;
        let (metadata, labels) = metadata.split();
        Ok(Self {
            metadata,
            labels: labels.unwrap_or_default(),
            spec,
        })
    }
}

namespaced_view!(ServiceView, "Service", "", "v1", "services");

#[cfg(test)]
mod tests {
    use super::*;

    /// What the API sends decodes into the view, keeping what discovery reads.
    #[test]
    fn a_service_decodes_into_what_discovery_reads() {
        let svc: ServiceView = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "s", "namespace": "n", "labels": {"app": "a"},
                         "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}},
            "spec": {"clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.1", "fd00::1"],
                     "type": "ClusterIP", "sessionAffinity": "None", "ipFamilies": ["IPv4", "IPv6"],
                     "selector": {"app": "a", "tier": "web"},
                     "ports": [{"name": "http", "port": 80, "targetPort": "web", "protocol": "TCP",
                                "appProtocol": "http"}]},
            "status": {"loadBalancer": {}}
        }))
        .unwrap();
        assert_eq!(svc.metadata.name.as_deref(), Some("s"));
        assert_eq!(svc.labels["app"], "a");
        assert!(svc.metadata.annotations.is_none() && svc.metadata.labels.is_none());
        let spec = svc.spec.as_ref().unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.1"));
        assert_eq!(spec.cluster_ips.as_ref().unwrap().len(), 2);
        let selector = spec.selector.as_ref().unwrap();
        assert!(selector.has("app", "a") && selector.has("tier", "web"));
        let port = &spec.ports.as_ref().unwrap()[0];
        assert_eq!(
            (port.port, port.app_protocol.as_deref()),
            (80, Some("http"))
        );
        // An ExternalName Service has no selector, IPs or ports: still decodes.
        let external: ServiceView = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "x"}, "spec": {"type": "ExternalName", "externalName": "e.org"}
        }))
        .unwrap();
        assert!(external.spec.unwrap().selector.is_none());
    }
}
