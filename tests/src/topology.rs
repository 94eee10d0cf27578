//! The description of a built testbed: its places and addresses (also its on-disk manifest).
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use serde::{Deserialize, Serialize};

use crate::place::Place;

/// A node: one netns with an uplink to the fabric and one veth per pod.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Node {
    /// 1-based, as in its name.
    pub index: usize,
    pub place: Place,
    /// The uplink interface in the node's netns.
    pub uplink: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub pod_cidr_v4: String,
    pub pod_cidr_v6: String,
}

/// A pod: its own netns (interface `eth0`) joined to its node by a veth pair, its own cgroup.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Pod {
    /// 1-based index within its node.
    pub index: usize,
    /// Index of its node (1-based).
    pub node: usize,
    pub place: Place,
    /// The pod side of the veth pair (in the pod's netns).
    pub iface: String,
    /// The host side of the veth pair (in the node's netns).
    pub host_veth: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

impl Pod {
    pub fn name(&self) -> &str {
        &self.place.name
    }

    /// The UID the pod has in an API server double: its cgroup is named after it as kubelet
    /// names pods' cgroups (`pod<uid>`, cgroupfs driver).
    pub fn uid(&self) -> String {
        format!("00000000-0000-4000-8000-{:06}{:06}", self.node, self.index)
    }

    /// The pod's address in the requested family.
    pub fn ip(&self, v6: bool) -> IpAddr {
        if v6 {
            self.ipv6.into()
        } else {
            self.ipv4.into()
        }
    }
}

impl Node {
    pub fn name(&self) -> &str {
        &self.place.name
    }
}

/// Everything a testbed run created, written to its manifest before anything is created, so a
/// sweep or `testbed down` can find it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TestbedInfo {
    pub run: String,
    pub owner_pid: u32,
    pub fabric: Place,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    /// The run's cgroup directory (every place's cgroup is below it).
    pub cgroup_dir: PathBuf,
    /// A bpffs directory the run's users may pin into; removed at teardown.
    pub bpffs_dir: PathBuf,
    /// Inodes of the run's namespaces, to prove at teardown that they are gone.
    pub netns_inodes: Vec<u64>,
}
