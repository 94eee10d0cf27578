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

/// One endpoint: its addresses that parse, and whether it is ready (`None`: not said).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointView {
    pub addresses: Addresses,
    pub ready: Option<bool>,
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
                .map(|e| EndpointView {
                    addresses: e.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
                    ready: e.conditions.and_then(|c| c.ready),
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
}
