//! Enrolling a pod in the kernel data path: its addresses go into `MESH_PODS` under its host
//! interface's ifindex, and `mesh_tc_from_pod` is attached to that interface.
use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
};

use aya::maps::{HashMap, MapData};
use mesh_common::{POD_HAS_IPV4, POD_HAS_IPV6, PODS_MAP, PodAddrs};

use super::{Datapath, DatapathError, TcAttachment, TcHook, programs::TC_FROM_POD};

/// The kernel-side addresses record for a pod.
pub fn pod_addrs(ipv4: Option<Ipv4Addr>, ipv6: Option<Ipv6Addr>) -> PodAddrs {
    let mut addrs = PodAddrs::default();
    if let Some(v4) = ipv4 {
        addrs.ipv4 = v4.octets();
        addrs.flags |= POD_HAS_IPV4;
    }
    if let Some(v6) = ipv6 {
        addrs.ipv6 = v6.octets();
        addrs.flags |= POD_HAS_IPV6;
    }
    addrs
}

/// A pod enrolled through [`Datapath::enroll_pod`]; give it back to [`Datapath::unenroll_pod`].
#[derive(Debug)]
pub struct Enrollment {
    ifindex: u32,
    attachment: TcAttachment,
}

impl Enrollment {
    /// The ifindex of the pod's host interface (the key in `MESH_PODS`).
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    pub fn iface(&self) -> &str {
        self.attachment.iface()
    }
}

impl Datapath {
    /// Enrolls the pod behind host interface `iface` (resolved in the calling thread's netns) with
    /// its own addresses: from now on its packets with any other source address are dropped.
    pub fn enroll_pod(
        &mut self,
        iface: &str,
        addrs: PodAddrs,
        pin: Option<&Path>,
    ) -> Result<Enrollment, DatapathError> {
        let ifindex =
            nix::net::if_::if_nametoindex(iface).map_err(|source| DatapathError::NoInterface {
                iface: iface.to_owned(),
                source,
            })?;
        self.pods_map()?
            .insert(ifindex, addrs, 0)
            .map_err(map_err)?;
        match self.attach_tc(TC_FROM_POD, iface, TcHook::Ingress, pin) {
            Ok(attachment) => Ok(Enrollment {
                ifindex,
                attachment,
            }),
            Err(e) => {
                let _ = self.pods_map()?.remove(&ifindex);
                Err(e)
            }
        }
    }

    /// Un-enrolls: the map entry goes first (the program then passes the pod's packets
    /// untouched), then the program is detached — always, even if the map update failed, so no
    /// pinned link outlives the enrolment. The first error is returned.
    pub fn unenroll_pod(&mut self, enrollment: Enrollment) -> Result<(), DatapathError> {
        let removed = self
            .pods_map()
            .and_then(|mut map| map.remove(&enrollment.ifindex).map_err(map_err));
        let detached = enrollment.attachment.detach();
        removed.and(detached)
    }

    fn pods_map(&mut self) -> Result<HashMap<&mut MapData, u32, PodAddrs>, DatapathError> {
        let map = self
            .ebpf_mut()
            .map_mut(PODS_MAP)
            .ok_or(DatapathError::MissingMap(PODS_MAP))?;
        HashMap::try_from(map).map_err(map_err)
    }
}

fn map_err(source: aya::maps::MapError) -> DatapathError {
    DatapathError::Map {
        name: PODS_MAP,
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_stored_in_network_order_with_family_flags() {
        let a = pod_addrs(Some(Ipv4Addr::new(10, 240, 1, 11)), None);
        assert_eq!(a.ipv4, [10, 240, 1, 11]);
        assert!(a.has_ipv4() && !a.has_ipv6());
        let b = pod_addrs(None, Some("fd00:240:1::11".parse().unwrap()));
        assert_eq!(b.ipv6[0..2], [0xfd, 0x00]);
        assert_eq!(b.ipv6[15], 0x11);
        assert!(b.has_ipv6() && !b.has_ipv4());
    }
}
