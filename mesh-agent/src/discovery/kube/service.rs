//! A Service as discovery reads it: its cluster IPs, ports, selector and labels. The watcher
//! decodes Services into [`ServiceView`], skipping the rest of `k8s_openapi`'s `Service` (its
//! annotations, status and a spec of some thirty optional fields), and the store keeps a
//! [`ServiceRecord`]: parsed addresses, the ports, and shared [`Labels`] (issue #19: a cluster
//! has a Service per few pods).

use std::net::IpAddr;

use k8s_openapi::{
    api::core::v1::ServicePort,
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use serde::Deserialize;

use crate::names::{Addresses, Labels, Name, intern};

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

/// What discovery keeps of a Service.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceRecord {
    pub name: Name,
    pub namespace: Name,
    /// `clusterIPs` (else `clusterIP`) that parse: none for a headless or ExternalName one.
    pub ips: Addresses,
    pub ports: Box<[PortRecord]>,
    pub selector: Labels,
    pub labels: Labels,
}

/// One of a Service's ports.
#[derive(Clone, Debug, PartialEq)]
pub struct PortRecord {
    pub name: Option<Name>,
    pub port: i32,
    pub target_port: Option<IntOrString>,
    /// TCP (the protocol when none is said).
    pub tcp: bool,
    pub app_protocol: Option<Name>,
}

impl ServiceRecord {
    /// The record of `svc` (None without a spec: nothing to serve).
    pub fn of(svc: &ServiceView) -> Option<Self> {
        let spec = svc.spec.as_ref()?;
        let listed = spec.cluster_ips.as_deref().unwrap_or_default();
        let single = spec.cluster_ip.as_slice();
        let ips = if listed.is_empty() { single } else { listed }
            .iter()
            .filter_map(|ip| ip.parse::<IpAddr>().ok())
            .collect();
        let ports = spec
            .ports
            .iter()
            .flatten()
            .map(|p| PortRecord {
                name: p.name.as_deref().map(intern),
                port: p.port,
                target_port: p.target_port.clone(),
                tcp: p.protocol.as_deref().unwrap_or("TCP") == "TCP",
                app_protocol: p.app_protocol.as_deref().map(intern),
            })
            .collect();
        Some(Self {
            name: svc.metadata.name.as_deref().unwrap_or_default().into(),
            namespace: intern(svc.metadata.namespace.as_deref().unwrap_or_default()),
            ips,
            ports,
            selector: spec.selector.clone().unwrap_or_default(),
            labels: svc.labels.clone(),
        })
    }
}

keyed_by_fields!(ServiceRecord);

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
        let record = ServiceRecord::of(&svc).unwrap();
        assert_eq!(record.ips.len(), 2);
        assert!(record.selector.has("tier", "web") && record.labels.has("app", "a"));
        let port = &record.ports[0];
        assert_eq!(
            (
                port.name.as_deref(),
                port.port,
                port.tcp,
                port.app_protocol.as_deref()
            ),
            (Some("http"), 80, true, Some("http"))
        );
        assert_eq!(port.target_port, Some(IntOrString::String("web".into())));
        // An ExternalName Service has no selector, IPs or ports: still decodes.
        let external: ServiceView = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "x"}, "spec": {"type": "ExternalName", "externalName": "e.org"}
        }))
        .unwrap();
        let record = ServiceRecord::of(&external).unwrap();
        assert!(record.ips.is_empty() && record.ports.is_empty() && record.selector.is_empty());
        assert!(external.spec.unwrap().selector.is_none());
    }
}
