//! Changes to the part of a configuration that churns — workloads and Services — as a value:
//! diffed from two files (local mode) or gathered from watch events (Kubernetes mode), checked
//! against the configuration in force with the file's rules, and applied in place, so that one
//! pod's change costs time in proportion to it rather than to the cluster (issue #19).
//! Everything else (node, namespaces, policies and routes, mesh settings) changes rarely and
//! makes a full configuration.
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use super::local::{ConfigError, LocalConfig, Service, Workload};

/// `(namespace, name)`.
pub type Key = (String, String);

/// Workloads and Services added or replaced (`Some`) or removed (`None`), by name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigDelta {
    pub workloads: BTreeMap<Key, Option<Workload>>,
    pub services: BTreeMap<Key, Option<Service>>,
}

/// What a configuration source hands the agent.
#[derive(Debug)]
pub enum ConfigUpdate {
    /// A whole configuration (the first one, or one changing more than workloads and Services).
    Full(Box<LocalConfig>),
    Delta(ConfigDelta),
}

/// The earlier versions of what a delta changed or removed, so that state derived from the
/// configuration can be updated by difference too.
#[derive(Debug, Default)]
pub struct Replaced {
    pub workloads: Vec<Workload>,
    pub services: Vec<Service>,
}

fn key_of(namespace: &str, name: &str) -> Key {
    (namespace.to_owned(), name.to_owned())
}

/// Adds to `out` what turns `old` into `new` (both validated: names are unique).
fn diff<T: Clone + PartialEq>(
    old: &[T],
    new: &[T],
    key: impl Fn(&T) -> (&str, &str),
    out: &mut BTreeMap<Key, Option<T>>,
) {
    let mut before: HashMap<(&str, &str), &T> = old.iter().map(|t| (key(t), t)).collect();
    for t in new {
        let k = key(t);
        match before.remove(&k) {
            Some(o) if o == t => {}
            _ => {
                out.insert(key_of(k.0, k.1), Some(t.clone()));
            }
        }
    }
    for (k, _) in before {
        out.insert(key_of(k.0, k.1), None);
    }
}

impl ConfigDelta {
    /// What turns `old` into `new`, or `None` when they differ in more than workloads and
    /// Services.
    pub fn between(old: &LocalConfig, new: &LocalConfig) -> Option<Self> {
        if old.node != new.node
            || old.ca != new.ca
            || old.namespaces != new.namespaces
            || old.mesh != new.mesh
            || old.policies != new.policies
        {
            return None;
        }
        let mut delta = Self::default();
        diff(
            &old.workloads,
            &new.workloads,
            |w| (&w.namespace, &w.name),
            &mut delta.workloads,
        );
        diff(
            &old.services,
            &new.services,
            |s| (&s.namespace, &s.name),
            &mut delta.services,
        );
        Some(delta)
    }

    pub fn is_empty(&self) -> bool {
        self.workloads.is_empty() && self.services.is_empty()
    }

    /// `later` on top of this one.
    pub fn merge(&mut self, later: ConfigDelta) {
        self.workloads.extend(later.workloads);
        self.services.extend(later.services);
    }

    /// The workloads it adds or replaces.
    pub fn new_workloads(&self) -> impl Iterator<Item = &Workload> {
        self.workloads.values().flatten()
    }

    /// The Services it adds or replaces.
    pub fn new_services(&self) -> impl Iterator<Item = &Service> {
        self.services.values().flatten()
    }

    /// Whether it changes a pod of `node`, read against `config` as it is before the delta
    /// applies (a pod moving off the node counts).
    pub fn touches_node(&self, config: &LocalConfig, node: &str) -> bool {
        self.workloads.iter().any(|((ns, name), new)| {
            new.as_ref().is_some_and(|w| w.node == node)
                || config
                    .workload_named(ns, name)
                    .is_some_and(|w| w.node == node)
        })
    }
}

/// The configuration as it would be after a delta, asked entry by entry.
struct After<'a> {
    config: &'a LocalConfig,
    delta: &'a ConfigDelta,
    /// Addresses of the delta's (non host-network) workloads.
    ips: HashMap<IpAddr, &'a Key>,
}

impl After<'_> {
    /// The workload with address `ip` among those the delta does not change.
    fn kept_ip_owner(&self, ip: IpAddr) -> Option<Key> {
        let w = &self.config.workloads[self.config.selection.ip_owner(self.config, ip)?];
        let k = key_of(&w.namespace, &w.name);
        (!self.delta.workloads.contains_key(&k)).then_some(k)
    }

    /// The workload with address `ip` after the delta.
    fn ip_owner(&self, ip: IpAddr) -> Option<Key> {
        match self.ips.get(&ip) {
            Some(k) => Some((*k).clone()),
            None => self.kept_ip_owner(ip),
        }
    }

    /// Whether some Service has VIP `ip`.
    fn is_vip(&self, ip: IpAddr) -> bool {
        self.delta.new_services().any(|s| s.vips.contains(&ip))
            || self
                .config
                .selection
                .vip_owners(self.config, ip)
                .into_iter()
                .map(|i| &self.config.services[i])
                .any(|s| {
                    !self
                        .delta
                        .services
                        .contains_key(&key_of(&s.namespace, &s.name))
                })
    }

    /// The Service serving `vip:port` among those the delta does not change.
    fn kept_vip_port_owner(&self, vip: IpAddr, port: u16) -> Option<Key> {
        let s =
            &self.config.services[self
                .config
                .selection
                .vip_port_owner(self.config, vip, port)?];
        let k = key_of(&s.namespace, &s.name);
        (!self.delta.services.contains_key(&k)).then_some(k)
    }

    /// The pod of this node with host interface `iface` among those the delta does not change.
    fn kept_interface_owner(&self, iface: &str) -> Option<Key> {
        let w =
            &self.config.workloads[self.config.selection.interface_owner(self.config, iface)?];
        let k = key_of(&w.namespace, &w.name);
        (!self.delta.workloads.contains_key(&k)).then_some(k)
    }
}

fn invalid(field: String, message: String) -> ConfigError {
    ConfigError::Invalid {
        path: "<update>".to_owned(),
        field,
        message,
    }
}

impl LocalConfig {
    /// The workload `namespace/name`, found through the selection index.
    pub fn workload_named(&self, namespace: &str, name: &str) -> Option<&Workload> {
        self.selection
            .workload(self, namespace, name)
            .map(|i| &self.workloads[i])
    }

    /// Whether `delta` may be applied: the file's rules for the entries it changes and between
    /// them and the rest, so that applying it gives a configuration a full check accepts.
    pub fn check_delta(&self, delta: &ConfigDelta) -> Result<(), ConfigError> {
        let mut after = After {
            config: self,
            delta,
            ips: HashMap::new(),
        };
        let mut interfaces: HashMap<&str, &Key> = HashMap::new();
        for (key, w) in &delta.workloads {
            let Some(w) = w else { continue };
            let at = |f: &str| format!("workloads ({}/{}).{f}", key.0, key.1);
            if (w.namespace.as_str(), w.name.as_str()) != (key.0.as_str(), key.1.as_str()) {
                return Err(invalid(at("name"), "does not match its key".into()));
            }
            self.check_workload(w, &at)?;
            if !w.host_network {
                for ip in &w.ips {
                    if let Some(other) = after.ips.insert(*ip, key) {
                        return Err(invalid(
                            at("ips"),
                            format!("{ip} is also used by {}/{}", other.0, other.1),
                        ));
                    }
                }
            }
            if w.node == self.node.name
                && let Some(iface) = &w.host_interface
                && let Some(other) = interfaces.insert(iface, key)
            {
                return Err(invalid(
                    at("hostInterface"),
                    format!("{iface} is also the interface of {}/{}", other.0, other.1),
                ));
            }
        }
        for (key, w) in &delta.workloads {
            let Some(w) = w else { continue };
            let at = |f: &str| format!("workloads ({}/{}).{f}", key.0, key.1);
            if !w.host_network {
                for ip in &w.ips {
                    if let Some(other) = after.kept_ip_owner(*ip) {
                        return Err(invalid(
                            at("ips"),
                            format!("{ip} is also used by {}/{}", other.0, other.1),
                        ));
                    }
                    if after.is_vip(*ip) {
                        return Err(invalid(
                            at("ips"),
                            format!("{ip} is also a service's virtual IP"),
                        ));
                    }
                }
            }
            if w.node == self.node.name
                && let Some(iface) = &w.host_interface
                && let Some(other) = after.kept_interface_owner(iface)
            {
                return Err(invalid(
                    at("hostInterface"),
                    format!("{iface} is also the interface of {}/{}", other.0, other.1),
                ));
            }
        }
        let mut vip_ports: HashMap<(IpAddr, u16), &Key> = HashMap::new();
        for (key, svc) in &delta.services {
            let Some(svc) = svc else { continue };
            let at = |f: &str| format!("services ({}/{}).{f}", key.0, key.1);
            if (svc.namespace.as_str(), svc.name.as_str()) != (key.0.as_str(), key.1.as_str()) {
                return Err(invalid(at("name"), "does not match its key".into()));
            }
            self.check_service(svc, &at)?;
            for vip in &svc.vips {
                if let Some(owner) = after.ip_owner(*vip) {
                    return Err(invalid(
                        at("vips"),
                        format!(
                            "{vip} is also the address of workload {}/{}",
                            owner.0, owner.1
                        ),
                    ));
                }
                for p in &svc.ports {
                    let other = vip_ports
                        .insert((*vip, p.port), key)
                        .cloned()
                        .or_else(|| after.kept_vip_port_owner(*vip, p.port));
                    if let Some(other) = other {
                        return Err(invalid(
                            at("ports"),
                            format!("{vip}:{} is also served by {}/{}", p.port, other.0, other.1),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Applies `delta` in place, keeping the selection index in step; what it replaced.
    /// Call [`Self::check_delta`] first.
    pub fn apply(&mut self, delta: &ConfigDelta) -> Replaced {
        self.selection.ensure(self);
        let mut replaced = Replaced::default();
        let LocalConfig {
            node,
            workloads,
            services,
            selection,
            ..
        } = self;
        // Every entry the delta names leaves first, then the new versions come in: an address
        // or interface handed from one entry to another is never briefly owned by both.
        for (namespace, name) in delta.workloads.keys() {
            replaced
                .workloads
                .extend(selection.remove_workload(workloads, namespace, name));
        }
        for w in delta.new_workloads() {
            selection.add_workload(&node.name, workloads, w.clone());
        }
        for (namespace, name) in delta.services.keys() {
            replaced
                .services
                .extend(selection.remove_service(services, namespace, name));
        }
        for s in delta.new_services() {
            selection.add_service(services, s.clone());
        }
        replaced
    }
}
