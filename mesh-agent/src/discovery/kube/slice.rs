//! An EndpointSlice as discovery reads it: the Service it belongs to, its ports, and each
//! endpoint's addresses (parsed) and readiness. The watcher decodes slices into this type, so
//! an endpoint costs its addresses rather than `k8s_openapi`'s `Endpoint` with its strings,
//! target reference, zone and hints (issue #19: a cluster has one endpoint per pod).
use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

use crate::names::Addresses;

/// The label naming the Service a slice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The fields of an EndpointSlice discovery uses. Its metadata is a view's (`super::MetaView`)
/// with, of the labels, only [`SERVICE_NAME_LABEL`].
#[derive(Clone, Debug, Default)]
pub struct EndpointSliceView {
    pub metadata: ObjectMeta,
    pub endpoints: Vec<EndpointView>,
    pub ports: Vec<SlicePort>,
}

/// One endpoint: its addresses that parse and its conditions (`None`: not said).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointView {
    pub addresses: Addresses,
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
}

impl EndpointView {
    /// Takes new connections: ready, or not saying (the API's meaning of an absent condition).
    pub fn is_ready(&self) -> bool {
        self.ready != Some(false)
    }

    /// Terminating yet still serving: what kube-proxy falls back to when a Service has no
    /// ready endpoint (KEP-1669). An absent `serving` is `ready`'s value, as the API says.
    pub fn is_serving_terminating(&self) -> bool {
        self.terminating == Some(true) && self.serving.or(self.ready) != Some(false)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct SlicePort {
    pub name: Option<String>,
    pub port: Option<i32>,
}

impl<'de> Deserialize<'de> for EndpointSliceView {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize, Default)]
        #[serde(default)]
        struct Conditions {
            ready: Option<bool>,
            serving: Option<bool>,
            terminating: Option<bool>,
        }
        #[derive(Deserialize)]
        struct Endpoint<'a> {
            #[serde(default, borrow)]
            addresses: Vec<Cow<'a, str>>,
            #[serde(default)]
            conditions: Option<Conditions>,
        }
        #[derive(Deserialize)]
        struct Raw<'a> {
            #[serde(default)]
            metadata: super::MetaView<std::collections::BTreeMap<String, String>>,
            #[serde(default, borrow)]
            endpoints: Option<Vec<Endpoint<'a>>>,
            #[serde(default)]
            ports: Option<Vec<SlicePort>>,
        }
        let raw = Raw::deserialize(d)?;
        let (mut metadata, labels) = raw.metadata.split();
        metadata.labels = labels
            .and_then(|mut l| l.remove_entry(SERVICE_NAME_LABEL))
            .map(|kv| [kv].into());
        Ok(Self {
            metadata,
            endpoints: raw
                .endpoints
                .unwrap_or_default()
                .into_iter()
                .map(|e| {
                    let c = e.conditions.unwrap_or_default();
                    EndpointView {
                        addresses: e.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
                        ready: c.ready,
                        serving: c.serving,
                        terminating: c.terminating,
                    }
                })
                .collect(),
            ports: raw.ports.unwrap_or_default(),
        })
    }
}

impl EndpointSliceView {
    /// The Service it belongs to, `(namespace, name)`.
    pub fn service(&self) -> Option<(String, String)> {
        Some((
            self.metadata.namespace.clone()?,
            self.metadata
                .labels
                .as_ref()?
                .get(SERVICE_NAME_LABEL)?
                .clone(),
        ))
    }
}

namespaced_view!(
    EndpointSliceView,
    "EndpointSlice",
    "discovery.k8s.io",
    "v1",
    "endpointslices"
);

#[cfg(test)]
mod tests {
    use super::*;

    /// What the API sends decodes into the view: addresses parsed, readiness kept, the
    /// Service named; the rest skipped, and an address that does not parse left out.
    #[test]
    fn a_slice_decodes_into_what_discovery_reads() {
        let s: EndpointSliceView = serde_json::from_value(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": "web-abcde", "namespace": "shop", "uid": "u", "resourceVersion": "7",
                         "labels": {"kubernetes.io/service-name": "web", "endpointslice.kubernetes.io/managed-by": "x"},
                         "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "web", "uid": "s"}]},
            "endpoints": [
                {"addresses": ["10.0.0.1"], "conditions": {"ready": true, "serving": true},
                 "nodeName": "n1", "zone": "z", "targetRef": {"kind": "Pod", "name": "p1", "namespace": "shop"}},
                {"addresses": ["10.0.0.2", "not-an-ip"], "conditions": {"ready": false}},
                {"addresses": ["10.0.0.3"]}
            ],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP", "appProtocol": "http"}]
        }))
        .unwrap();
        assert_eq!(s.service(), Some(("shop".into(), "web".into())));
        assert_eq!(s.metadata.labels.as_ref().map(|l| l.len()), Some(1));
        assert_eq!(s.metadata.resource_version.as_deref(), Some("7"));
        let eps: Vec<(Vec<String>, Option<bool>)> = s
            .endpoints
            .iter()
            .map(|e| {
                (
                    e.addresses.iter().map(ToString::to_string).collect(),
                    e.ready,
                )
            })
            .collect();
        assert_eq!(
            eps,
            [
                (vec!["10.0.0.1".to_owned()], Some(true)),
                (vec!["10.0.0.2".to_owned()], Some(false)),
                (vec!["10.0.0.3".to_owned()], None),
            ]
        );
        assert_eq!(
            (s.ports[0].name.as_deref(), s.ports[0].port),
            (Some("http"), Some(8080))
        );
        // A slice with no endpoints or ports (a Service without pods) still decodes.
        let empty: EndpointSliceView = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "e", "namespace": "n"}, "addressType": "IPv4", "endpoints": null
        }))
        .unwrap();
        assert!(empty.endpoints.is_empty() && empty.ports.is_empty() && empty.service().is_none());
    }

    /// Which endpoints take new connections, by their conditions, as kube-proxy reads them
    /// (KEP-1669; an absent condition: `ready` and `serving` true, `terminating` false, and an
    /// absent `serving` taken from `ready`). Each row: ready, serving, terminating → ready,
    /// serving while terminating.
    #[test]
    fn endpoint_conditions_are_read_as_kube_proxy_reads_them() {
        type Row = (Option<bool>, Option<bool>, Option<bool>, bool, bool);
        let table: [Row; 8] = [
            (None, None, None, true, false), // nothing said: ready
            (Some(true), Some(true), Some(false), true, false), // a running pod
            (Some(false), Some(false), Some(false), false, false), // failing its probe
            (Some(false), None, None, false, false), // old API server, not ready
            (Some(false), Some(true), Some(true), false, true), // draining, still serving
            (Some(false), Some(false), Some(true), false, false), // draining, stopped serving
            (Some(false), None, Some(true), false, false), // serving unsaid: ready's false
            (None, None, Some(true), true, true), // only terminating said
        ];
        for (ready, serving, terminating, is_ready, fallback) in table {
            let e = EndpointView {
                addresses: Default::default(),
                ready,
                serving,
                terminating,
            };
            let row = format!("ready {ready:?} serving {serving:?} terminating {terminating:?}");
            assert_eq!(e.is_ready(), is_ready, "{row}: ready");
            assert_eq!(e.is_serving_terminating(), fallback, "{row}: fallback");
        }
        let decoded: EndpointSliceView = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "s", "namespace": "n"},
            "endpoints": [{"addresses": ["10.0.0.1"],
                           "conditions": {"ready": false, "serving": true, "terminating": true}}]
        }))
        .unwrap();
        assert!(decoded.endpoints[0].is_serving_terminating());
    }
}
