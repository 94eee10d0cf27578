//! `MESH_NODE_ADDRS`: the node's own addresses, for `mesh_tc_from_pod`, which leaves a pod's
//! connections to them to the node's stack (the node's services then see the pod's own
//! address) and drops those for the agent's own ports.
use std::{collections::BTreeSet, net::IpAddr};

use aya::maps::{HashMap, MapData};
use mesh_common::capture::NODE_ADDRS_MAP;

use super::{Datapath, DatapathError, enrollment::ip_key, ip_from_key};

/// What a [`Datapath::sync_node_addrs`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct NodeAddrsChange {
    pub added: Vec<IpAddr>,
    pub removed: Vec<IpAddr>,
}

impl Datapath {
    /// Makes `MESH_NODE_ADDRS` hold exactly `want`.
    pub fn sync_node_addrs(
        &mut self,
        want: &BTreeSet<IpAddr>,
    ) -> Result<NodeAddrsChange, DatapathError> {
        let mut map = self.node_addrs_map()?;
        let have: BTreeSet<IpAddr> = map
            .keys()
            .map(|k| k.map(ip_from_key))
            .collect::<Result<_, _>>()
            .map_err(|source| DatapathError::Map {
                name: NODE_ADDRS_MAP,
                source,
            })?;
        let mut change = NodeAddrsChange::default();
        for ip in want.difference(&have) {
            map.insert(ip_key(*ip), 0, 0)
                .map_err(|source| DatapathError::Map {
                    name: NODE_ADDRS_MAP,
                    source,
                })?;
            change.added.push(*ip);
        }
        for ip in have.difference(want) {
            match map.remove(&ip_key(*ip)) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => change.removed.push(*ip),
                Err(source) => {
                    return Err(DatapathError::Map {
                        name: NODE_ADDRS_MAP,
                        source,
                    });
                }
            }
        }
        Ok(change)
    }

    fn node_addrs_map(&mut self) -> Result<HashMap<&mut MapData, [u8; 16], u32>, DatapathError> {
        let map = self
            .ebpf_mut()
            .map_mut(NODE_ADDRS_MAP)
            .ok_or(DatapathError::MissingMap(NODE_ADDRS_MAP))?;
        HashMap::try_from(map).map_err(|source| DatapathError::Map {
            name: NODE_ADDRS_MAP,
            source,
        })
    }
}

/// Every address of every interface in the calling thread's network namespace (the node's),
/// IPv4-mapped IPv6 spelled as IPv4.
pub fn node_addresses() -> std::io::Result<BTreeSet<IpAddr>> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(std::io::Error::from)?;
    Ok(addrs
        .filter_map(|a| {
            let sa = a.address?;
            if let Some(v4) = sa.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                sa.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .map(|ip| ip.to_canonical())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever namespace the test runs in has a loopback with 127.0.0.1 (when it is up).
    #[test]
    fn lists_this_namespaces_addresses() {
        let addrs = node_addresses().unwrap();
        let lo_up = std::fs::read_to_string("/sys/class/net/lo/operstate")
            .map(|s| s.trim() != "down")
            .unwrap_or(false);
        if lo_up {
            assert!(
                addrs.contains(&"127.0.0.1".parse::<IpAddr>().unwrap()),
                "{addrs:?}"
            );
        }
    }
}
