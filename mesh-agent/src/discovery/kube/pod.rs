//! A Pod as discovery reads it: metadata, the node, host network and service account, the phase
//! and addresses. The watcher decodes the API's Pods into this type directly, so everything
//! else (containers, volumes, scheduling, container statuses, conditions) is skipped while
//! decoding instead of being allocated and dropped, and the store keeps a few hundred bytes per
//! pod rather than `k8s_openapi`'s full `Pod` (issue #19: a large cluster's pods were most of
//! the agent's memory in Kubernetes mode).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

use crate::names::Labels;

/// The fields of a Pod discovery uses. Its metadata is a view's (`super::MetaView`), with the
/// labels moved out into [`Labels`] (a `BTreeMap` node alone is half a kilobyte).
#[derive(Clone, Debug, Default)]
pub struct PodView {
    pub metadata: ObjectMeta,
    pub labels: Labels,
    pub spec: Option<PodViewSpec>,
    pub status: Option<PodViewStatus>,
}

impl<'de> Deserialize<'de> for PodView {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Raw {
            #[serde(default)]
            metadata: super::MetaView<Labels>,
            spec: Option<PodViewSpec>,
            status: Option<PodViewStatus>,
        }
        let Raw {
            metadata,
            spec,
            status,
        } = Raw::deserialize(d)?;
        let (metadata, labels) = metadata.split();
        Ok(Self {
            metadata,
            labels: labels.unwrap_or_default(),
            spec,
            status,
        })
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodViewSpec {
    pub node_name: Option<String>,
    pub host_network: Option<bool>,
    pub service_account_name: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodViewStatus {
    pub phase: Option<String>,
    #[serde(rename = "podIP")]
    pub pod_ip: Option<String>,
    #[serde(rename = "podIPs")]
    pub pod_ips: Option<Vec<PodViewIp>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct PodViewIp {
    #[serde(default)]
    pub ip: String,
}

namespaced_view!(PodView, "Pod", "", "v1", "pods");

#[cfg(test)]
mod tests {
    use super::*;

    /// What the API sends decodes into the view, keeping what discovery reads; the rest of a
    /// Pod is skipped.
    #[test]
    fn a_pod_decodes_into_what_discovery_reads() {
        let pod: PodView = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "n", "uid": "u1", "labels": {"app": "a"},
                         "annotations": {"x": "y"}, "creationTimestamp": "2026-12-01T00:00:00Z"},
            "spec": {"nodeName": "node1", "hostNetwork": false, "serviceAccountName": "sa",
                     "containers": [{"name": "c", "image": "i", "env": [{"name": "E", "value": "v"}]}],
                     "volumes": [{"name": "v", "emptyDir": {}}]},
            "status": {"phase": "Running", "podIP": "10.0.0.1",
                       "podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}],
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap();
        assert_eq!(pod.metadata.name.as_deref(), Some("p"));
        assert_eq!(pod.labels["app"], "a");
        assert!(pod.metadata.creation_timestamp.is_some());
        assert_eq!(pod.metadata.uid.as_deref(), Some("u1"));
        assert!(pod.metadata.annotations.is_none() && pod.metadata.labels.is_none());
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(
            (
                spec.node_name.as_deref(),
                spec.host_network,
                spec.service_account_name.as_deref()
            ),
            (Some("node1"), Some(false), Some("sa"))
        );
        let status = pod.status.as_ref().unwrap();
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert_eq!(status.pod_ip.as_deref(), Some("10.0.0.1"));
        let ips: Vec<&str> = status
            .pod_ips
            .iter()
            .flatten()
            .map(|i| i.ip.as_str())
            .collect();
        assert_eq!(ips, ["10.0.0.1", "fd00::1"]);
        // A pod that is not scheduled yet has no status and no node: still decodes.
        let pending: PodView =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "q"}, "spec": {}}))
                .unwrap();
        assert!(pending.status.is_none() && pending.spec.unwrap().node_name.is_none());
    }
}
