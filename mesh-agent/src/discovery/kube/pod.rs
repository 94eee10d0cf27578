//! A Pod as discovery reads it. The watcher decodes the API's Pods into [`PodView`] (metadata,
//! the node, host network and service account, the phase and addresses), so everything else
//! (containers, volumes, scheduling, container statuses, conditions) is skipped while decoding
//! instead of being allocated and dropped; the view then becomes a [`PodRecord`], the little a
//! workload is made of, which is all the pod store keeps (issue #19: a large cluster's pods were
//! most of the agent's memory in Kubernetes mode).

use std::net::IpAddr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

use crate::discovery::{
    DATAPLANE_MODE_AMBIENT, DATAPLANE_MODE_LABEL, DATAPLANE_MODE_NONE, Workload,
};
use crate::names::{Addresses, Labels, Name, intern};

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

impl PodView {
    /// Whether the pod still has (or will have) running containers.
    fn alive(&self) -> bool {
        !matches!(
            self.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        )
    }

    /// Its addresses, at most one per family (the model's rule): `podIPs`, else `podIP`.
    fn addresses(&self) -> Addresses {
        let status = self.status.as_ref();
        let listed = status
            .and_then(|s| s.pod_ips.as_deref())
            .unwrap_or_default();
        let mut out = Addresses::new();
        for ip in listed.iter().filter_map(|i| i.ip.parse::<IpAddr>().ok()) {
            if !out.iter().any(|o| o.is_ipv4() == ip.is_ipv4()) {
                out.push(ip);
            }
        }
        if out.is_empty()
            && let Some(ip) = status
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|ip| ip.parse().ok())
        {
            out.push(ip);
        }
        out
    }
}

/// Whether a pod on `node` is one of `this_node`'s with an interface of its own, which the
/// agent finds on the host (by the uid it keeps for those pods only).
pub fn needs_locating(node: &str, host_network: bool, this_node: &str) -> bool {
    node == this_node && !host_network
}

/// What discovery keeps of a pod: what its workload is made of, with names and labels
/// shared (interned), and what settles two pods claiming one address. Pods that make no
/// workload (finished, unscheduled, no address yet) are not kept at all.
#[derive(Clone, Debug, PartialEq)]
pub struct PodRecord {
    /// Not interned: a pod's name is its own.
    pub name: Name,
    pub namespace: Name,
    pub node: Name,
    /// `default` when the pod names none.
    pub service_account: Name,
    /// Empty for a host-network pod.
    pub ips: Addresses,
    pub labels: Labels,
    pub host_network: bool,
    /// Being deleted (it loses an address conflict to a pod that is not).
    pub deleting: bool,
    /// Seconds since the epoch (0: unknown), as the API gives it; a `Time` would take 24 bytes.
    pub created: u32,
    /// For pods of this node only: the key the locator finds their interface by.
    pub uid: Option<Name>,
}

impl PodRecord {
    /// The record of `pod` as seen by the agent of `this_node`; None when it makes no workload
    /// (finished, not scheduled, or no address yet).
    pub fn of(pod: &PodView, this_node: &str) -> Option<Self> {
        let spec = pod.spec.as_ref()?;
        let node = spec.node_name.as_deref().filter(|_| pod.alive())?;
        let host_network = spec.host_network.unwrap_or(false);
        let ips = if host_network {
            Addresses::new()
        } else {
            pod.addresses()
        };
        if ips.is_empty() && !host_network {
            return None; // not started yet: no address, nothing to capture or reach
        }
        let meta = &pod.metadata;
        let service_account = spec
            .service_account_name
            .as_deref()
            .filter(|s| !s.is_empty())
            .unwrap_or("default");
        Some(Self {
            name: meta.name.as_deref().unwrap_or_default().into(),
            namespace: intern(meta.namespace.as_deref().unwrap_or_default()),
            node: intern(node),
            service_account: intern(service_account),
            ips,
            labels: pod.labels.clone(),
            host_network,
            deleting: meta.deletion_timestamp.is_some(),
            created: meta
                .creation_timestamp
                .as_ref()
                .map_or(0, |t| u32::try_from(t.0.as_second()).unwrap_or(0)),
            uid: meta
                .uid
                .as_deref()
                .filter(|_| needs_locating(node, host_network, this_node))
                .map(Name::from),
        })
    }

    /// `namespace/name`, for reports.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Its workload, but for where this node's pods are found (the caller's business), and
    /// what to report about it. A label value the model rejects would reject the whole
    /// configuration, so it is treated as unset and reported.
    pub fn workload(&self) -> (Workload, Option<String>) {
        let mut labels = self.labels.clone();
        let mut note = None;
        if let Some(v) = self.labels.get(DATAPLANE_MODE_LABEL)
            && v != DATAPLANE_MODE_AMBIENT
            && v != DATAPLANE_MODE_NONE
        {
            note = Some(format!(
                "pod {}: unknown dataplane mode {v:?} ignored",
                self.key()
            ));
            labels.remove(DATAPLANE_MODE_LABEL);
        }
        let w = Workload {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            service_account: self.service_account.clone(),
            node: self.node.clone(),
            ips: self.ips.clone(),
            labels,
            host_network: self.host_network,
            terminating: self.deleting,
            host_interface: None,
            cgroup: None,
            created: self.created,
        };
        (w, note)
    }

    /// Its workload when that is a function of the record alone, so that the workload can
    /// stand in for it: not a pod of `this_node` with an interface to find, not being deleted
    /// (such pods are few and short-lived, so their records are simply kept), no label ignored.
    pub fn standalone_workload(&self, this_node: &str) -> Option<Workload> {
        if needs_locating(&self.node, self.host_network, this_node) || self.deleting {
            return None;
        }
        match self.workload() {
            (w, None) => Some(w),
            (_, Some(_)) => None,
        }
    }

    /// The record a workload was made of, for a pod whose record had a
    /// [`Self::standalone_workload`].
    pub fn from_workload(w: &Workload) -> Self {
        Self {
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            node: w.node.clone(),
            service_account: w.service_account.clone(),
            ips: w.ips.clone(),
            labels: w.labels.clone(),
            host_network: w.host_network,
            deleting: false,
            created: w.created,
            uid: None,
        }
    }
}

keyed_by_fields!(PodRecord);

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

    /// A remote pod costs its workload and nothing beside it: the creation time the workload
    /// carries for it sits in what was the struct's padding.
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn the_creation_time_costs_a_workload_nothing() {
        // Four names (32 bytes), the addresses (32), the labels (16), the cgroup path (16),
        // the interface (8) and a flag: 105 bytes, aligned to 112 with or without the u32.
        assert_eq!(std::mem::size_of::<Workload>(), 112);
    }

    fn view(node: Option<&str>, phase: &str, ips: &[&str], host_network: bool) -> PodView {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "n", "uid": "u1", "labels": {"app": "a"},
                         "deletionTimestamp": "2026-12-01T00:00:00Z"},
            "spec": {"nodeName": node, "hostNetwork": host_network, "serviceAccountName": ""},
            "status": {"phase": phase, "podIPs": ips.iter().map(|ip| serde_json::json!({"ip": ip})).collect::<Vec<_>>()}
        }))
        .unwrap()
    }

    /// A record keeps what the workload needs; pods that make no workload make no record.
    #[test]
    fn a_record_is_what_a_workload_is_made_of() {
        let r = PodRecord::of(
            &view(
                Some("node1"),
                "Running",
                &["10.0.0.1", "10.0.0.2", "fd00::1"],
                false,
            ),
            "node1",
        )
        .unwrap();
        assert_eq!((r.key().as_str(), r.node.as_str()), ("n/p", "node1"));
        assert_eq!(
            r.service_account, "default",
            "an empty service account is the default one"
        );
        let ips: Vec<String> = r.ips.iter().map(ToString::to_string).collect();
        assert_eq!(
            ips,
            ["10.0.0.1", "fd00::1"],
            "one address per family, the first"
        );
        assert_eq!(r.labels["app"], "a");
        assert!(r.deleting && r.created == 0);
        assert!(
            r.workload().0.terminating,
            "its workload says it is draining"
        );
        assert_eq!(
            r.uid.as_deref(),
            Some("u1"),
            "this node's pod keeps its uid"
        );
        let remote = PodRecord::of(
            &view(Some("node2"), "Running", &["10.0.0.1"], false),
            "node1",
        )
        .unwrap();
        assert_eq!(remote.uid, None, "another node's pod does not need its uid");
        assert!(!remote.ips.spilled(), "one address is kept inline");
        let host = PodRecord::of(&view(Some("node1"), "Running", &[], true), "node1").unwrap();
        assert!(host.host_network && host.ips.is_empty() && host.uid.is_none());
        for (node, phase, ips) in [
            (None, "Pending", &["10.0.0.1"][..]),
            (Some("node1"), "Succeeded", &["10.0.0.1"][..]),
            (Some("node1"), "Failed", &["10.0.0.1"][..]),
            (Some("node1"), "Pending", &[][..]),
            (Some("node1"), "Running", &["not-an-address"][..]),
        ] {
            assert_eq!(
                PodRecord::of(&view(node, phase, ips, false), "node1"),
                None,
                "{node:?} {phase} {ips:?}"
            );
        }
    }
}
