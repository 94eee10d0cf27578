//! Indexes over a configuration's workloads and services, so that nothing asks "which of them
//! ..." with a scan: building the agent's state asks which workloads a Service selects once per
//! Service (a scan made start-up grow with services × workloads, issue #19), and applying a
//! change to one pod or Service ([`super::delta`]) must find its entry, the addresses and
//! interfaces it may collide with and the Services it may join in time independent of the
//! cluster's size. Built on first use; kept in step by [`super::delta`] when a config is
//! changed in place.
use std::{
    collections::HashMap,
    hash::{BuildHasher as _, Hash},
    net::IpAddr,
    sync::OnceLock,
};

use hashbrown::HashTable;

use super::local::{LocalConfig, Namespace, Service, Workload};
use crate::names::Name;

/// Cloning or comparing a config ignores its index (a clone builds its own on first use).
#[derive(Debug, Default)]
pub struct WorkloadIndex {
    inner: OnceLock<Box<Inner>>,
    /// Namespace name → position (enrolment and waypoint bindings read namespace labels once
    /// per workload). Namespaces are never changed in place.
    namespaces: OnceLock<HashMap<Name, u32>>,
}

/// Positions in the config's `workloads` and `services`.
#[derive(Debug)]
struct Inner {
    hasher: std::hash::RandomState,
    /// Hash of `(namespace, key, value)` → workloads with that label. Keyed by hash to keep the
    /// index small; a collision only adds candidates, which the full selector check removes.
    by_label: HashMap<u64, Vec<u32>>,
    /// Address → the (non host-network) workload that has it: its position and which of its
    /// addresses (8 bytes an entry, the address is read from the workload).
    by_ip: HashTable<(u32, u32)>,
    /// Workloads by `(namespace, name)`: only positions are stored, the key is read from the
    /// workload itself.
    by_key: HashTable<u32>,
    /// This node's pods' host interfaces.
    interfaces: HashMap<Name, u32>,
    services_by_key: HashTable<u32>,
    /// Hash of the namespace → its Services.
    services_by_namespace: HashMap<u64, Vec<u32>>,
    /// `(VIP, port)` → the Service serving it.
    vip_ports: HashMap<(IpAddr, u16), u32>,
    /// VIP → the Services having it (several, on different ports).
    vips: HashMap<IpAddr, Vec<u32>>,
}

impl Clone for WorkloadIndex {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl PartialEq for WorkloadIndex {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for WorkloadIndex {}

fn hash_of(hasher: &std::hash::RandomState, value: impl Hash) -> u64 {
    hasher.hash_one(value)
}

/// The address a `by_ip` entry stands for.
fn address_of(workloads: &[Workload], (p, n): (u32, u32)) -> Option<IpAddr> {
    workloads.get(p as usize)?.ips.get(n as usize).copied()
}

fn remove_from(list: &mut Vec<u32>, pos: u32) {
    if let Some(i) = list.iter().position(|&p| p == pos) {
        list.swap_remove(i);
    }
}

fn replace_in(list: &mut [u32], from: u32, to: u32) {
    if let Some(p) = list.iter_mut().find(|p| **p == from) {
        *p = to;
    }
}

fn pos(i: usize) -> u32 {
    u32::try_from(i).expect("fewer than 2^32 entries")
}

impl Inner {
    fn build(config: &LocalConfig) -> Self {
        let mut me = Self {
            hasher: std::hash::RandomState::new(),
            by_label: HashMap::new(),
            by_ip: HashTable::with_capacity(config.workloads.len()),
            by_key: HashTable::with_capacity(config.workloads.len()),
            interfaces: HashMap::new(),
            services_by_key: HashTable::with_capacity(config.services.len()),
            services_by_namespace: HashMap::new(),
            vip_ports: HashMap::with_capacity(config.services.len()),
            vips: HashMap::with_capacity(config.services.len()),
        };
        for i in 0..config.workloads.len() {
            me.add_workload(&config.node.name, &config.workloads, pos(i));
        }
        for i in 0..config.services.len() {
            me.add_service(&config.services, pos(i));
        }
        me
    }

    fn key_hash(&self, namespace: &str, name: &str) -> u64 {
        hash_of(&self.hasher, (namespace, name))
    }

    fn add_workload(&mut self, node: &str, workloads: &[Workload], i: u32) {
        let w = &workloads[i as usize];
        let hasher = &self.hasher;
        self.by_key.insert_unique(
            hash_of(hasher, (w.namespace.as_str(), w.name.as_str())),
            i,
            |&p| {
                let o = &workloads[p as usize];
                hash_of(hasher, (o.namespace.as_str(), o.name.as_str()))
            },
        );
        if w.node == node
            && let Some(iface) = &w.host_interface
        {
            self.interfaces.entry(iface.clone()).or_insert(i);
        }
        if w.host_network {
            return;
        }
        for (k, v) in &w.labels {
            self.by_label
                .entry(hash_of(hasher, (w.namespace.as_str(), k, v)))
                .or_default()
                .push(i);
        }
        for (n, ip) in w.ips.iter().enumerate() {
            let h = hash_of(hasher, ip);
            if self.ip_entry(workloads, h, *ip).is_none() {
                self.by_ip.insert_unique(h, (i, pos(n)), |&e| {
                    address_of(workloads, e).map_or(0, |ip| hash_of(hasher, ip))
                });
            }
        }
    }

    /// The `by_ip` entry of `ip` (`h`: its hash).
    fn ip_entry(&self, workloads: &[Workload], h: u64, ip: IpAddr) -> Option<(u32, u32)> {
        self.by_ip
            .find(h, |&e| address_of(workloads, e) == Some(ip))
            .copied()
    }

    fn remove_workload(&mut self, workloads: &[Workload], i: u32) {
        let w = &workloads[i as usize];
        let h = self.key_hash(&w.namespace, &w.name);
        if let Ok(e) = self.by_key.find_entry(h, |&p| p == i) {
            e.remove();
        }
        if let Some(iface) = &w.host_interface
            && self.interfaces.get(iface) == Some(&i)
        {
            self.interfaces.remove(iface);
        }
        if w.host_network {
            return;
        }
        for (k, v) in &w.labels {
            let h = hash_of(&self.hasher, (w.namespace.as_str(), k, v));
            if let Some(list) = self.by_label.get_mut(&h) {
                remove_from(list, i);
                if list.is_empty() {
                    self.by_label.remove(&h);
                }
            }
        }
        for ip in &w.ips {
            let h = hash_of(&self.hasher, ip);
            if let Ok(e) = self
                .by_ip
                .find_entry(h, |&e| e.0 == i && address_of(workloads, e) == Some(*ip))
            {
                e.remove();
            }
        }
    }

    /// The workload now at `to` was at `from` (a removal moved the last one into its place).
    fn move_workload(&mut self, workloads: &[Workload], from: u32, to: u32) {
        let w = &workloads[to as usize];
        let h = self.key_hash(&w.namespace, &w.name);
        if let Some(p) = self.by_key.find_mut(h, |&p| p == from) {
            *p = to;
        }
        if let Some(iface) = &w.host_interface
            && let Some(p) = self.interfaces.get_mut(iface)
            && *p == from
        {
            *p = to;
        }
        if w.host_network {
            return;
        }
        for (k, v) in &w.labels {
            let h = hash_of(&self.hasher, (w.namespace.as_str(), k, v));
            if let Some(list) = self.by_label.get_mut(&h) {
                replace_in(list, from, to);
            }
        }
        for ip in &w.ips {
            let h = hash_of(&self.hasher, ip);
            // Entries of `from` compare against the workload now at `to` (the same one).
            if let Some(entry) = self.by_ip.find_mut(h, |&(p, n)| {
                p == from && workloads[to as usize].ips.get(n as usize) == Some(ip)
            }) {
                entry.0 = to;
            }
        }
    }

    fn add_service(&mut self, services: &[Service], i: u32) {
        let s = &services[i as usize];
        let hasher = &self.hasher;
        self.services_by_key.insert_unique(
            hash_of(hasher, (s.namespace.as_str(), s.name.as_str())),
            i,
            |&p| {
                let o = &services[p as usize];
                hash_of(hasher, (o.namespace.as_str(), o.name.as_str()))
            },
        );
        self.services_by_namespace
            .entry(hash_of(hasher, s.namespace.as_str()))
            .or_default()
            .push(i);
        for vip in &s.vips {
            self.vips.entry(*vip).or_default().push(i);
            for p in &s.ports {
                self.vip_ports.entry((*vip, p.port)).or_insert(i);
            }
        }
    }

    fn remove_service(&mut self, services: &[Service], i: u32) {
        let s = &services[i as usize];
        let h = self.key_hash(&s.namespace, &s.name);
        if let Ok(e) = self.services_by_key.find_entry(h, |&p| p == i) {
            e.remove();
        }
        let h = hash_of(&self.hasher, s.namespace.as_str());
        if let Some(list) = self.services_by_namespace.get_mut(&h) {
            remove_from(list, i);
            if list.is_empty() {
                self.services_by_namespace.remove(&h);
            }
        }
        for vip in &s.vips {
            if let Some(list) = self.vips.get_mut(vip) {
                remove_from(list, i);
                if list.is_empty() {
                    self.vips.remove(vip);
                }
            }
            for p in &s.ports {
                if self.vip_ports.get(&(*vip, p.port)) == Some(&i) {
                    self.vip_ports.remove(&(*vip, p.port));
                }
            }
        }
    }

    fn move_service(&mut self, services: &[Service], from: u32, to: u32) {
        let s = &services[to as usize];
        let h = self.key_hash(&s.namespace, &s.name);
        if let Some(p) = self.services_by_key.find_mut(h, |&p| p == from) {
            *p = to;
        }
        let h = hash_of(&self.hasher, s.namespace.as_str());
        if let Some(list) = self.services_by_namespace.get_mut(&h) {
            replace_in(list, from, to);
        }
        for vip in &s.vips {
            if let Some(list) = self.vips.get_mut(vip) {
                replace_in(list, from, to);
            }
            for p in &s.ports {
                if let Some(owner) = self.vip_ports.get_mut(&(*vip, p.port))
                    && *owner == from
                {
                    *owner = to;
                }
            }
        }
    }
}

impl WorkloadIndex {
    fn inner(&self, config: &LocalConfig) -> &Inner {
        self.inner.get_or_init(|| Box::new(Inner::build(config)))
    }

    /// The namespace called `name` among `all` (the config's).
    pub fn namespace<'a>(&self, all: &'a [Namespace], name: &str) -> Option<&'a Namespace> {
        let index = self.namespaces.get_or_init(|| {
            let mut m = HashMap::with_capacity(all.len());
            for (i, ns) in all.iter().enumerate() {
                m.entry(ns.name.clone()).or_insert(pos(i));
            }
            m
        });
        index.get(name).map(|&i| &all[i as usize])
    }

    /// The workloads `svc` selects, in config order: those at its explicit `endpoints`, else
    /// those of its namespace whose labels include its selector (none without a selector, as in
    /// Kubernetes). Host-network pods are never endpoints here.
    pub fn selected<'a>(&self, config: &'a LocalConfig, svc: &Service) -> Vec<&'a Workload> {
        let inner = self.inner(config);
        let workloads = &config.workloads;
        let mut picked: Vec<u32> = match &svc.endpoints {
            Some(ips) => ips
                .iter()
                .filter_map(|ip| {
                    inner
                        .ip_entry(workloads, hash_of(&inner.hasher, ip), *ip)
                        .map(|(p, _)| p)
                })
                .collect(),
            None if svc.selector.is_empty() => return Vec::new(),
            None => {
                let lists = svc.selector.iter().map(|(k, v)| {
                    inner
                        .by_label
                        .get(&hash_of(&inner.hasher, (svc.namespace.as_str(), k, v)))
                        .map_or(&[][..], Vec::as_slice)
                });
                let shortest = lists.min_by_key(|l| l.len()).unwrap_or(&[]);
                shortest
                    .iter()
                    .copied()
                    .filter(|&i| selects(svc, &workloads[i as usize]))
                    .collect()
            }
        };
        picked.sort_unstable();
        picked.dedup();
        picked
            .into_iter()
            .map(|i| &workloads[i as usize])
            .filter(|w| !w.host_network)
            .collect()
    }

    /// The (non host-network) workloads of `namespace` labelled `key: value`, in config order.
    pub fn labelled<'a>(
        &self,
        config: &'a LocalConfig,
        namespace: &str,
        key: &str,
        value: &str,
    ) -> Vec<&'a Workload> {
        let inner = self.inner(config);
        let mut picked: Vec<u32> = inner
            .by_label
            .get(&hash_of(&inner.hasher, (namespace, key, value)))
            .map_or(&[][..], Vec::as_slice)
            .iter()
            .copied()
            .filter(|&i| {
                let w = &config.workloads[i as usize];
                w.namespace == namespace && w.labels.get(key).is_some_and(|v| v == value)
            })
            .collect();
        picked.sort_unstable();
        picked
            .into_iter()
            .map(|i| &config.workloads[i as usize])
            .collect()
    }

    /// The position of workload `namespace/name`.
    pub fn workload(&self, config: &LocalConfig, namespace: &str, name: &str) -> Option<usize> {
        self.ensure(config);
        self.position(&config.workloads, namespace, name)
    }

    /// The position of Service `namespace/name`.
    pub fn service(&self, config: &LocalConfig, namespace: &str, name: &str) -> Option<usize> {
        self.ensure(config);
        self.service_position(&config.services, namespace, name)
    }

    /// The (non host-network) workload with address `ip`.
    pub fn ip_owner(&self, config: &LocalConfig, ip: IpAddr) -> Option<usize> {
        let inner = self.inner(config);
        inner
            .ip_entry(&config.workloads, hash_of(&inner.hasher, ip), ip)
            .map(|(p, _)| p as usize)
    }

    /// This node's pod with host interface `iface`.
    pub fn interface_owner(&self, config: &LocalConfig, iface: &str) -> Option<usize> {
        self.inner(config)
            .interfaces
            .get(iface)
            .map(|&p| p as usize)
    }

    /// The Service serving `vip:port`.
    pub fn vip_port_owner(&self, config: &LocalConfig, vip: IpAddr, port: u16) -> Option<usize> {
        self.inner(config)
            .vip_ports
            .get(&(vip, port))
            .map(|&p| p as usize)
    }

    /// The Services with VIP `ip`.
    pub fn vip_owners(&self, config: &LocalConfig, ip: IpAddr) -> Vec<usize> {
        self.inner(config)
            .vips
            .get(&ip)
            .map(|l| l.iter().map(|&p| p as usize).collect())
            .unwrap_or_default()
    }

    /// The Services of namespace `namespace`.
    pub fn services_in(&self, config: &LocalConfig, namespace: &str) -> Vec<usize> {
        let inner = self.inner(config);
        inner
            .services_by_namespace
            .get(&hash_of(&inner.hasher, namespace))
            .map(|l| {
                l.iter()
                    .map(|&p| p as usize)
                    .filter(|&p| config.services[p].namespace == namespace)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Builds the index now, so that changes in place keep it in step instead of leaving a
    /// scan to the next reader.
    pub fn ensure(&self, config: &LocalConfig) {
        self.inner(config);
    }

    /// Adds workload `w`, whose name is not in the config ([`LocalConfig::apply`] removes every
    /// entry a change names before adding their new versions).
    pub fn add_workload(&mut self, node: &str, workloads: &mut Vec<Workload>, w: Workload) {
        debug_assert!(self.position(workloads, &w.namespace, &w.name).is_none());
        workloads.push(w);
        if let Some(inner) = self.inner.get_mut() {
            inner.add_workload(node, workloads, pos(workloads.len() - 1));
        }
    }

    /// Removes workload `namespace/name`; the removed one.
    pub fn remove_workload(
        &mut self,
        workloads: &mut Vec<Workload>,
        namespace: &str,
        name: &str,
    ) -> Option<Workload> {
        let i = self.position(workloads, namespace, name)?;
        let last = workloads.len() - 1;
        if let Some(inner) = self.inner.get_mut() {
            inner.remove_workload(workloads, pos(i));
        }
        let old = workloads.swap_remove(i);
        if i != last
            && let Some(inner) = self.inner.get_mut()
        {
            inner.move_workload(workloads, pos(last), pos(i));
        }
        Some(old)
    }

    /// Adds Service `s`, whose name is not in the config (as [`Self::add_workload`]).
    pub fn add_service(&mut self, services: &mut Vec<Service>, s: Service) {
        debug_assert!(
            self.service_position(services, &s.namespace, &s.name)
                .is_none()
        );
        services.push(s);
        if let Some(inner) = self.inner.get_mut() {
            inner.add_service(services, pos(services.len() - 1));
        }
    }

    /// Removes Service `namespace/name`; the removed one.
    pub fn remove_service(
        &mut self,
        services: &mut Vec<Service>,
        namespace: &str,
        name: &str,
    ) -> Option<Service> {
        let i = self.service_position(services, namespace, name)?;
        let last = services.len() - 1;
        if let Some(inner) = self.inner.get_mut() {
            inner.remove_service(services, pos(i));
        }
        let old = services.swap_remove(i);
        if i != last
            && let Some(inner) = self.inner.get_mut()
        {
            inner.move_service(services, pos(last), pos(i));
        }
        Some(old)
    }

    /// Where workload `namespace/name` is (a scan when the index was never built).
    fn position(&self, workloads: &[Workload], namespace: &str, name: &str) -> Option<usize> {
        let hit = |w: &Workload| w.namespace == namespace && w.name == name;
        match self.inner.get() {
            Some(inner) => inner
                .by_key
                .find(inner.key_hash(namespace, name), |&p| {
                    hit(&workloads[p as usize])
                })
                .map(|&p| p as usize),
            None => workloads.iter().position(hit),
        }
    }

    fn service_position(&self, services: &[Service], namespace: &str, name: &str) -> Option<usize> {
        let hit = |s: &Service| s.namespace == namespace && s.name == name;
        match self.inner.get() {
            Some(inner) => inner
                .services_by_key
                .find(inner.key_hash(namespace, name), |&p| {
                    hit(&services[p as usize])
                })
                .map(|&p| p as usize),
            None => services.iter().position(hit),
        }
    }
}

/// Whether `svc` (by selector) selects `w`.
pub fn selects(svc: &Service, w: &Workload) -> bool {
    !svc.selector.is_empty()
        && w.namespace == svc.namespace
        && svc.selector.iter().all(|(k, v)| w.labels.get(k) == Some(v))
}

#[cfg(test)]
mod tests {
    use crate::discovery::LocalConfig;

    /// The index answers what a scan of every workload answers.
    #[test]
    fn the_index_selects_what_a_scan_selects() {
        let mut y = String::from(
            "node: {name: n1}\nnamespaces: [{name: a}, {name: b}]\nworkloads:\n  - {name: host, namespace: a, node: n1, ips: [192.168.0.9], hostNetwork: true, labels: {app: x}}\n",
        );
        for i in 0..60 {
            let ns = if i % 2 == 0 { "a" } else { "b" };
            y += &format!(
                "  - {{name: p{i}, namespace: {ns}, node: n2, ips: [10.0.0.{i}], labels: {{app: x{}, tier: t{}}}}}\n",
                i % 5,
                i % 3
            );
        }
        y += "services:\n";
        let selectors = [
            "{app: x1}",
            "{app: x1, tier: t2}",
            "{tier: t0}",
            "{app: x}",
            "{}",
        ];
        for (i, sel) in selectors.iter().enumerate() {
            for ns in ["a", "b"] {
                y += &format!(
                    "  - {{name: s{i}, namespace: {ns}, vips: [10.96.{i}.{}], selector: {sel}, ports: [{{port: 80}}]}}\n",
                    if ns == "a" { 1 } else { 2 }
                );
            }
        }
        y += "  - {name: explicit, namespace: a, vips: [10.96.9.1], endpoints: [10.0.0.3, 10.0.0.8, 10.9.9.9], ports: [{port: 80}]}\n";
        let c = LocalConfig::parse(&y).unwrap();
        for svc in &c.services {
            let scan: Vec<&str> = c
                .workloads
                .iter()
                .filter(|w| {
                    !w.host_network
                        && match &svc.endpoints {
                            Some(ips) => w.ips.iter().any(|ip| ips.contains(ip)),
                            None => {
                                !svc.selector.is_empty()
                                    && w.namespace == svc.namespace
                                    && svc.selector.iter().all(|(k, v)| w.labels.get(k) == Some(v))
                            }
                        }
                })
                .map(|w| w.name.as_str())
                .collect();
            let indexed: Vec<&str> = c.endpoints_of(svc).map(|w| w.name.as_str()).collect();
            assert_eq!(indexed, scan, "{}/{}", svc.namespace, svc.name);
        }
        // Non-trivial: the two-label selector narrows, the explicit list finds its two pods.
        let names = |name: &str, ns: &str| {
            let s = c
                .services
                .iter()
                .find(|s| s.name == name && s.namespace == ns)
                .unwrap();
            c.endpoints_of(s).count()
        };
        assert_eq!(names("s1", "b"), 2);
        assert_eq!(names("explicit", "a"), 2);
        assert_eq!(names("s4", "a"), 0, "no selector, no endpoints");
    }
}
