//! From the API objects the watchers hold to the agent's state ([`LocalConfig`], the same model
//! as local mode): namespaces, pods as workloads, Services with their EndpointSlices, and the
//! Istio security objects as policies.
//!
//! Kubernetes state is never quite consistent (a terminating pod and its replacement can share an
//! address for a moment, a local pod's interface appears after its IP); objects that would make
//! the whole snapshot invalid are left out and reported, everything else applies.
use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
};

use k8s_openapi::api::core::v1::Namespace as K8sNamespace;
use kube::api::DynamicObject;

use super::{
    host::PodLocator,
    pod::PodRecord,
    service::ServiceRecord,
    slice_store::{ServiceKey, SliceRecord},
};
use crate::{
    discovery::{
        CaSection, Labels, LocalConfig, Name, Namespace, NodeSection, Service, ServicePort,
        Workload, intern, local::MeshSection,
    },
    policy::RawObject,
};

/// What the snapshot needs besides the objects.
#[derive(Clone, Debug)]
pub struct SnapshotSettings {
    pub node_name: String,
    pub trust_domain: String,
    pub root_namespace: String,
    /// Explicit uplinks; empty: every interface that is not a pod's and not loopback.
    pub uplinks: Vec<String>,
    /// Local CA files, if the agent signs its own workload certificates (no CA service).
    pub ca: Option<CaSection>,
}

/// The objects: as the reflector stores hold them (shared, not copied), and the records of
/// the pod and slice stores (copies, whose names, labels and endpoints' addresses are small or
/// shared).
#[derive(Default)]
pub struct Objects {
    pub namespaces: Vec<Arc<K8sNamespace>>,
    pub pods: Vec<PodRecord>,
    pub services: Vec<ServiceRecord>,
    /// Each Service's EndpointSlices.
    pub slices: HashMap<ServiceKey, Vec<SliceRecord>>,
    pub policies: Vec<Arc<DynamicObject>>,
}

/// A snapshot and what was left out of it.
pub struct Snapshot {
    pub config: LocalConfig,
    /// Local pods without a host interface yet, conflicting addresses, unusable objects.
    pub skipped: Vec<String>,
    /// The pods (positions in [`Objects::pods`]) left out because another pod won their
    /// address.
    pub lost_address: Vec<usize>,
}

/// A pod as a workload, and what to report about it (None: a pod of this node whose interface
/// is not found yet). Address conflicts between pods are the caller's business.
pub fn workload_of(
    settings: &SnapshotSettings,
    p: &PodRecord,
    locator: &dyn PodLocator,
) -> (Option<Workload>, Option<String>) {
    let (mut host_interface, mut cgroup) = (None, None);
    if super::pod::needs_locating(&p.node, p.host_network, &settings.node_name) {
        match locator.locate(p.uid.as_deref().unwrap_or(""), &p.ips) {
            Some(found) => {
                host_interface = Some(found.interface);
                cgroup = found.cgroup.map(std::path::PathBuf::into_boxed_path);
            }
            None => {
                let note = format!(
                    "pod {}: no host interface found for {:?} yet",
                    p.key(),
                    p.ips
                );
                return (None, Some(note));
            }
        }
    }
    let (mut w, note) = p.workload();
    w.host_interface = host_interface.map(Name::from);
    w.cgroup = cgroup;
    (Some(w), note)
}

/// A Service with its EndpointSlices (None: headless, ExternalName, no usable TCP port);
/// VIPs that are a pod's address (`is_pod_ip`) are left out.
pub fn service_of(
    svc: &ServiceRecord,
    slices: &[SliceRecord],
    is_pod_ip: impl Fn(IpAddr) -> bool,
    skipped: &mut Vec<String>,
) -> Option<Service> {
    let (name, namespace) = (&svc.name, &svc.namespace);
    let vips: Vec<IpAddr> = svc
        .ips
        .iter()
        .copied()
        .filter(|ip| !is_pod_ip(*ip))
        .collect();
    if vips.is_empty() {
        return None; // headless or ExternalName: nothing to capture by VIP
    }
    let mut ports = Vec::new();
    for p in &svc.ports {
        if !p.tcp {
            continue;
        }
        let Ok(port) = u16::try_from(p.port) else {
            continue;
        };
        use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
        let target = match &p.target_port {
            None => Some(port),
            Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
            // A named target port is the number the endpoints publish under the service
            // port's name.
            Some(IntOrString::String(_)) => slices
                .iter()
                .flat_map(|s| s.ports.iter())
                .find(|ep| ep.name.as_deref() == p.name.as_deref())
                .and_then(|ep| ep.port)
                .and_then(|n| u16::try_from(n).ok()),
        };
        match target {
            Some(t) if t != 0 && port != 0 => ports.push(ServicePort {
                port,
                target_port: Some(t),
                protocol: crate::l7::protocol::declared(
                    p.app_protocol.as_deref(),
                    p.name.as_deref(),
                ),
            }),
            _ => skipped.push(format!(
                "service {namespace}/{name}: port {port} has no usable target port"
            )),
        }
    }
    if ports.is_empty() {
        return None;
    }
    // Ready endpoints; when there is none, those terminating but still serving (kube-proxy's
    // rule, KEP-1669): a Service whose every pod drains keeps answering.
    let mut endpoints: BTreeSet<IpAddr> = slices
        .iter()
        .flat_map(|s| s.ready.iter().copied())
        .collect();
    if endpoints.is_empty() {
        endpoints = slices
            .iter()
            .flat_map(|s| s.terminating.iter().copied())
            .collect();
    }
    Some(Service {
        name: name.clone(),
        namespace: namespace.clone(),
        vips,
        ports,
        selector: svc.selector.clone(),
        endpoints: Some(endpoints.into_iter().collect()),
        labels: svc.labels.clone(),
    })
}

/// Builds the snapshot. `interfaces` lists the node's interfaces (for automatic uplinks).
pub fn build(
    settings: &SnapshotSettings,
    objects: &Objects,
    locator: &dyn PodLocator,
    interfaces: &[String],
) -> Snapshot {
    let mut skipped = Vec::new();
    let namespaces: Vec<Namespace> = objects
        .namespaces
        .iter()
        .filter_map(|n| {
            Some(Namespace {
                name: intern(n.metadata.name.as_deref()?),
                labels: n
                    .metadata
                    .labels
                    .as_ref()
                    .map(Labels::from)
                    .unwrap_or_default(),
            })
        })
        .collect();

    // Pods. Where two live pods claim one address (a terminating pod and its successor), the
    // one not being deleted wins, then the newer one, then the first by name (whatever order
    // the stores hand them in).
    let mut pods: Vec<(usize, &PodRecord)> = objects.pods.iter().enumerate().collect();
    pods.sort_by(|(_, a), (_, b)| {
        (!b.deleting, b.created)
            .cmp(&(!a.deleting, a.created))
            .then_with(|| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)))
    });
    let mut owner: HashMap<IpAddr, String> = HashMap::new();
    let mut workloads = Vec::new();
    let mut lost_address = Vec::new();
    for (at, p) in pods {
        let (w, note) = workload_of(settings, p, locator);
        skipped.extend(note);
        let Some(w) = w else { continue };
        if let Some(other) = w.ips.iter().find_map(|ip| owner.get(ip)) {
            skipped.push(format!("pod {}: its address is also {other}'s", p.key()));
            lost_address.push(at);
            continue;
        }
        for ip in &w.ips {
            owner.insert(*ip, p.key());
        }
        workloads.push(w);
    }
    workloads.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    workloads.shrink_to_fit();

    // Services and their endpoints.
    let mut services = Vec::new();
    for svc in &objects.services {
        let key = (svc.namespace.clone(), svc.name.clone());
        let slices = objects.slices.get(&key).map_or(&[][..], Vec::as_slice);
        services.extend(service_of(
            svc,
            slices,
            |ip| owner.contains_key(&ip),
            &mut skipped,
        ));
    }
    // Two Services never share a VIP in a cluster; keep the first of a duplicate anyway.
    let mut seen = BTreeSet::new();
    services.retain(|s| s.vips.iter().all(|v| seen.insert(*v)));

    // Policies, as the local file would carry them.
    let mut policies = Vec::new();
    for obj in &objects.policies {
        let Some(types) = &obj.types else { continue };
        let spec = obj
            .data
            .get("spec")
            .cloned()
            .unwrap_or(serde_json::Value::Null);
        let spec = match serde_yaml::to_value(&spec) {
            Ok(v) => v,
            Err(_) => continue,
        };
        policies.push(RawObject {
            api_version: types.api_version.clone(),
            kind: types.kind.clone(),
            metadata: crate::policy::crd::ObjectMeta {
                name: obj.metadata.name.clone().unwrap_or_default(),
                namespace: obj.metadata.namespace.clone().unwrap_or_default(),
                creation_timestamp: obj
                    .metadata
                    .creation_timestamp
                    .as_ref()
                    .map(|t| t.0.to_string()),
                labels: obj.metadata.labels.clone().unwrap_or_default(),
            },
            spec,
        });
    }
    policies.sort_by(|a, b| {
        (&a.kind, &a.metadata.namespace, &a.metadata.name).cmp(&(
            &b.kind,
            &b.metadata.namespace,
            &b.metadata.name,
        ))
    });

    let uplinks = if settings.uplinks.is_empty() {
        let pod_ifaces: BTreeSet<&str> = workloads
            .iter()
            .filter_map(|w| w.host_interface.as_deref())
            .collect();
        interfaces
            .iter()
            .filter(|i| *i != "lo" && !pod_ifaces.contains(i.as_str()))
            .cloned()
            .collect()
    } else {
        settings.uplinks.clone()
    };
    Snapshot {
        config: LocalConfig {
            node: NodeSection {
                name: settings.node_name.clone(),
                uplinks,
                trust_domain: settings.trust_domain.clone(),
            },
            ca: settings.ca.clone(),
            namespaces,
            workloads,
            services,
            mesh: MeshSection {
                root_namespace: settings.root_namespace.clone(),
                ..MeshSection::default()
            },
            policies,
            selection: Default::default(),
        },
        skipped,
        lost_address,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::kube::service::PortRecord;

    fn record(name: &str, ready: &[&str], terminating: &[&str]) -> SliceRecord {
        let ips = |list: &[&str]| list.iter().map(|a| a.parse().unwrap()).collect();
        SliceRecord {
            name: name.into(),
            ready: ips(ready),
            terminating: ips(terminating),
            ports: Box::default(),
        }
    }

    /// A Service's endpoints: the ready ones of all its slices; only when there is none, the
    /// terminating ones that still serve (kube-proxy's fallback, so a Service whose every pod
    /// drains still answers, and one with a replacement sends nothing new to the old pods).
    #[test]
    fn terminating_endpoints_serve_only_when_none_is_ready() {
        let svc = ServiceRecord {
            name: "web".into(),
            namespace: "n".into(),
            ips: ["10.96.0.1".parse().unwrap()].into_iter().collect(),
            ports: [PortRecord {
                name: None,
                port: 80,
                target_port: None,
                tcp: true,
                app_protocol: None,
            }]
            .into(),
            selector: Default::default(),
            labels: Default::default(),
        };
        let endpoints = |slices: &[SliceRecord]| -> Vec<String> {
            let service = service_of(&svc, slices, |_| false, &mut Vec::new()).unwrap();
            let ips = service.endpoints.unwrap();
            ips.iter().map(ToString::to_string).collect()
        };
        // A rollout: the new pod is ready in one slice, the old one drains in another.
        let rollout = [
            record("web-1", &[], &["10.0.0.1"]),
            record("web-2", &["10.0.0.2"], &[]),
        ];
        assert_eq!(endpoints(&rollout), ["10.0.0.2"]);
        // Every pod drains: they still serve.
        let draining = [record("web-1", &[], &["10.0.0.1", "10.0.0.3"])];
        assert_eq!(endpoints(&draining), ["10.0.0.1", "10.0.0.3"]);
        // None at all.
        assert!(endpoints(&[record("web-1", &[], &[])]).is_empty());
    }
}
