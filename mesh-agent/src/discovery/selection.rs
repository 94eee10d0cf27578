//! Which workloads a Service selects, answered from an index instead of a scan: building the
//! agent's state asks it once per Service (and policy compilation once per local pod and
//! Service), so a scan made start-up grow with services × workloads (issue #19: 50,000
//! workloads took seconds). The index maps each `(namespace, label, value)` and each address to
//! the workloads that have it; a selector reads the shortest of its labels' lists and checks
//! the rest on those candidates only.
use std::{
    collections::HashMap,
    hash::{BuildHasher as _, Hash},
    net::IpAddr,
    sync::OnceLock,
};

use super::local::{Namespace, Service, Workload};

/// Built on first use from a config's workloads and namespaces (a config never changes once
/// built); cloning or comparing a config ignores it.
#[derive(Debug, Default)]
pub struct WorkloadIndex {
    workloads: OnceLock<Box<Inner>>,
    /// Namespace name → position (enrolment and waypoint bindings read namespace labels once
    /// per workload).
    namespaces: OnceLock<HashMap<String, u32>>,
}

#[derive(Debug)]
struct Inner {
    /// Hash of `(namespace, key, value)` → positions in `workloads`. Keyed by hash to keep the
    /// index small; a collision only adds candidates, which the full selector check removes.
    by_label: HashMap<u64, Vec<u32>>,
    by_ip: HashMap<IpAddr, u32>,
    hasher: std::hash::RandomState,
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

fn label_key(hasher: &std::hash::RandomState, namespace: &str, key: &str, value: &str) -> u64 {
    let mut h = hasher.build_hasher();
    (namespace, key, value).hash(&mut h);
    std::hash::Hasher::finish(&h)
}

impl Inner {
    fn build(workloads: &[Workload]) -> Self {
        let hasher = std::hash::RandomState::new();
        let mut by_label: HashMap<u64, Vec<u32>> = HashMap::new();
        let mut by_ip = HashMap::new();
        for (i, w) in workloads.iter().enumerate() {
            let i = u32::try_from(i).expect("fewer than 2^32 workloads");
            if w.host_network {
                continue;
            }
            for (k, v) in &w.labels {
                by_label
                    .entry(label_key(&hasher, &w.namespace, k, v))
                    .or_default()
                    .push(i);
            }
            for ip in &w.ips {
                by_ip.entry(*ip).or_insert(i);
            }
        }
        Self {
            by_label,
            by_ip,
            hasher,
        }
    }
}

impl WorkloadIndex {
    /// The namespace called `name` among `all` (the config's).
    pub fn namespace<'a>(&self, all: &'a [Namespace], name: &str) -> Option<&'a Namespace> {
        let index = self.namespaces.get_or_init(|| {
            let mut m = HashMap::with_capacity(all.len());
            for (i, ns) in all.iter().enumerate() {
                m.entry(ns.name.clone())
                    .or_insert(u32::try_from(i).expect("fewer than 2^32 namespaces"));
            }
            m
        });
        index.get(name).map(|&i| &all[i as usize])
    }

    /// The workloads `svc` selects, in config order: those at its explicit `endpoints`, else
    /// those of its namespace whose labels include its selector (none without a selector, as in
    /// Kubernetes). Host-network pods are never endpoints here.
    pub fn selected<'a>(&self, workloads: &'a [Workload], svc: &Service) -> Vec<&'a Workload> {
        let inner = self
            .workloads
            .get_or_init(|| Box::new(Inner::build(workloads)));
        let mut picked: Vec<u32> = match &svc.endpoints {
            Some(ips) => ips
                .iter()
                .filter_map(|ip| inner.by_ip.get(ip).copied())
                .collect(),
            None if svc.selector.is_empty() => return Vec::new(),
            None => {
                let lists = svc.selector.iter().map(|(k, v)| {
                    inner
                        .by_label
                        .get(&label_key(&inner.hasher, &svc.namespace, k, v))
                        .map_or(&[][..], Vec::as_slice)
                });
                let shortest = lists.min_by_key(|l| l.len()).unwrap_or(&[]);
                shortest
                    .iter()
                    .copied()
                    .filter(|&i| {
                        let w = &workloads[i as usize];
                        w.namespace == svc.namespace
                            && svc.selector.iter().all(|(k, v)| w.labels.get(k) == Some(v))
                    })
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
