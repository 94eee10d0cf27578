//! Kubernetes mode by difference: what the watchers changed since the last round, as a
//! [`ConfigDelta`] of the pods and Services concerned (issue #19). A round needs a full build instead when
//! anything but pods, Services and EndpointSlices changed, a watcher listed again, a pod of
//! this node has no interface yet or changes the automatic uplinks, or a change would conflict
//! with the rest (two pods on one address, a VIP shared): the full build's rules settle those.
use std::collections::HashSet;

use super::{
    feed::Changes,
    host::PodLocator,
    pod_store::PodStore,
    record_store::ServiceStore,
    slice_store::SliceStore,
    snapshot::{SnapshotSettings, service_of, workload_of},
};
use crate::discovery::{ConfigDelta, LocalConfig, delta::Key};

/// The stores a delta is read from.
pub struct Stores<'a> {
    pub pods: &'a PodStore,
    pub services: &'a ServiceStore,
    pub slices: &'a SliceStore,
}

/// The delta that brings `published` up to date with `pods` and `services` changed (Services
/// named by themselves or by their EndpointSlices); `Err(why)` when only a full build can.
pub fn delta(
    settings: &SnapshotSettings,
    published: &LocalConfig,
    stores: &Stores,
    pods: &Changes,
    services: &Changes,
    locator: &dyn PodLocator,
    interfaces: &dyn Fn() -> Vec<String>,
) -> Result<ConfigDelta, &'static str> {
    if pods.all || services.all {
        return Err("listed again");
    }
    let mut delta = ConfigDelta::default();
    for (ns, name) in &pods.keys {
        let new = match stores.pods.get(ns, name, Some(published)) {
            Some(p) => {
                let (w, note) = workload_of(settings, &p, locator);
                if note.is_some() {
                    return Err("a pod to report");
                }
                w
            }
            None => None,
        };
        if published.workload_named(ns, name) != new.as_ref() {
            delta.workloads.insert((ns.clone(), name.clone()), new);
        }
    }
    // A pod that lost its address to another pod is not in the configuration: when a pod
    // holding or claiming such an address changes (lets go of it, or now ranks otherwise),
    // the full build's rules settle who has it.
    let lost = stores.pods.lost_addresses();
    if !lost.is_empty() {
        for ((ns, name), new) in &delta.workloads {
            let old = published.workload_named(ns, name);
            let touched = old.into_iter().chain(new).flat_map(|w| w.ips.iter());
            if touched.into_iter().any(|ip| lost.contains(ip)) {
                return Err("an address another pod lost");
            }
        }
    }
    if settings.uplinks.is_empty() && delta.touches_node(published, &settings.node_name) {
        // Automatic uplinks are the node's interfaces but its pods': as the full build
        // finds them, or a full build.
        let changed: HashSet<&Key> = delta.workloads.keys().collect();
        let pod_interfaces: HashSet<&str> = published
            .local_pods()
            .filter(|w| !changed.contains(&(w.namespace.to_string(), w.name.to_string())))
            .chain(delta.new_workloads())
            .filter_map(|w| w.host_interface.as_deref())
            .collect();
        let uplinks: Vec<String> = interfaces()
            .into_iter()
            .filter(|i| i != "lo" && !pod_interfaces.contains(i.as_str()))
            .collect();
        if uplinks != published.node.uplinks {
            return Err("the node's uplinks change");
        }
    }
    if !services.keys.is_empty() {
        let new_ips: HashSet<std::net::IpAddr> = delta
            .new_workloads()
            .flat_map(|w| w.ips.iter().copied())
            .collect();
        for key in &services.keys {
            let svc = stores.services.get(&key.0, &key.1);
            let mut notes = Vec::new();
            let new = svc.and_then(|svc| {
                let of_service = stores.slices.of(&key.0, &key.1);
                let is_pod_ip = |ip| {
                    new_ips.contains(&ip) || published.selection.ip_owner(published, ip).is_some()
                };
                service_of(&svc, &of_service, is_pod_ip, &mut notes)
            });
            if !notes.is_empty() {
                return Err("a Service to report");
            }
            // A VIP another Service has: the full build keeps one of them.
            if let Some(s) = &new
                && s.vips.iter().any(|vip| {
                    published
                        .selection
                        .vip_owners(published, *vip)
                        .into_iter()
                        .any(|i| {
                            let o = &published.services[i];
                            o.namespace != key.0 || o.name != key.1
                        })
                })
            {
                return Err("a shared VIP");
            }
            let old = published
                .selection
                .service(published, &key.0, &key.1)
                .map(|i| &published.services[i]);
            if old != new.as_ref() {
                delta.services.insert(key.clone(), new);
            }
        }
    }
    Ok(delta)
}
