//! The enrolment maps: which host interfaces belong to enrolled pods (and with which addresses),
//! and which local pod addresses the capture programs must watch.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use aya::maps::{HashMap, MapData};
use mesh_common::{
    POD_HAS_IPV4, POD_HAS_IPV6, PODS_MAP, PodAddrs, PodIpEntry,
    capture::{POD_IP_ENROLLED, POD_IPS_MAP, v4_mapped},
};

use super::{Datapath, DatapathError, TcAttachment, TcHook, programs::TC_FROM_POD};

/// The [`PodAddrs`] value for a pod with these addresses.
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

/// The pod's addresses as `IpAddr`s.
pub fn addrs_of(pod: &PodAddrs) -> Vec<IpAddr> {
    let mut out = Vec::new();
    if pod.has_ipv4() {
        out.push(IpAddr::V4(Ipv4Addr::from(pod.ipv4)));
    }
    if pod.has_ipv6() {
        out.push(IpAddr::V6(Ipv6Addr::from(pod.ipv6)));
    }
    out
}

/// The 16-byte key form of an address (IPv4 v4-mapped), as the capture maps use it.
pub fn ip_key(ip: IpAddr) -> [u8; 16] {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The address a 16-byte key stands for.
pub fn ip_from_key(key: [u8; 16]) -> IpAddr {
    Ipv6Addr::from(key).to_canonical()
}

/// A pod enrolled by [`Datapath::enroll_pod`]: its interface and the attached program.
#[derive(Debug)]
pub struct Enrollment {
    ifindex: u32,
    addrs: PodAddrs,
    attachment: TcAttachment,
}

impl Enrollment {
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    pub fn iface(&self) -> &str {
        self.attachment.iface()
    }
}

impl Datapath {
    /// Enrols the pod behind host interface `iface` (in the calling thread's network namespace):
    /// records its addresses and attaches `mesh_tc_from_pod` to the interface's ingress. From now
    /// on the pod's spoofed packets are dropped and its new TCP connections are captured.
    pub fn enroll_pod(
        &mut self,
        iface: &str,
        addrs: PodAddrs,
        pin: Option<&Path>,
    ) -> Result<Enrollment, DatapathError> {
        let ifindex = ifindex_of(iface)?;
        self.set_pod(ifindex, addrs)?;
        match self.attach_tc(TC_FROM_POD, iface, TcHook::Ingress, pin) {
            Ok(attachment) => Ok(Enrollment {
                ifindex,
                addrs,
                attachment,
            }),
            Err(e) => {
                let _ = self.remove_pod(ifindex, &addrs);
                Err(e)
            }
        }
    }

    /// Reverses [`Datapath::enroll_pod`]. Always detaches, even if the map update fails.
    pub fn unenroll_pod(&mut self, enrollment: Enrollment) -> Result<(), DatapathError> {
        let removed = self.remove_pod(enrollment.ifindex, &enrollment.addrs);
        let detached = enrollment.attachment.detach();
        removed.and(detached)
    }

    /// Records an enrolled pod: its interface in `MESH_PODS`, its addresses in `MESH_POD_IPS`.
    pub fn set_pod(&mut self, ifindex: u32, addrs: PodAddrs) -> Result<(), DatapathError> {
        self.pods_map()?
            .insert(ifindex, addrs, 0)
            .map_err(map_err(PODS_MAP))?;
        let entry = PodIpEntry {
            ifindex,
            flags: POD_IP_ENROLLED,
        };
        for ip in addrs_of(&addrs) {
            self.set_pod_ip(ip, entry)?;
        }
        Ok(())
    }

    /// Forgets an enrolled pod entirely (both maps).
    pub fn remove_pod(&mut self, ifindex: u32, addrs: &PodAddrs) -> Result<(), DatapathError> {
        let removed = remove_ignoring_absent(self.pods_map()?.remove(&ifindex), PODS_MAP);
        for ip in addrs_of(addrs) {
            self.remove_pod_ip(ip)?;
        }
        removed
    }

    /// Removes only the `MESH_PODS` entry for `ifindex`.
    pub fn remove_pod_iface(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        remove_ignoring_absent(self.pods_map()?.remove(&ifindex), PODS_MAP)
    }

    pub fn set_pod_ip(&mut self, ip: IpAddr, entry: PodIpEntry) -> Result<(), DatapathError> {
        self.pod_ips_map()?
            .insert(ip_key(ip), entry, 0)
            .map_err(map_err(POD_IPS_MAP))
    }

    pub fn remove_pod_ip(&mut self, ip: IpAddr) -> Result<(), DatapathError> {
        remove_ignoring_absent(self.pod_ips_map()?.remove(&ip_key(ip)), POD_IPS_MAP)
    }

    /// Every `MESH_PODS` entry (ifindex, addresses).
    pub fn pods(&mut self) -> Result<Vec<(u32, PodAddrs)>, DatapathError> {
        let map = self.pods_map()?;
        map.iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(PODS_MAP))
    }

    /// Every `MESH_POD_IPS` entry.
    pub fn pod_ips(&mut self) -> Result<Vec<(IpAddr, PodIpEntry)>, DatapathError> {
        let map = self.pod_ips_map()?;
        map.iter()
            .map(|r| r.map(|(k, v)| (ip_from_key(k), v)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(POD_IPS_MAP))
    }

    fn pods_map(&mut self) -> Result<HashMap<&mut MapData, u32, PodAddrs>, DatapathError> {
        let map = self
            .ebpf_mut()
            .map_mut(PODS_MAP)
            .ok_or(DatapathError::MissingMap(PODS_MAP))?;
        HashMap::try_from(map).map_err(map_err(PODS_MAP))
    }

    fn pod_ips_map(
        &mut self,
    ) -> Result<HashMap<&mut MapData, [u8; 16], PodIpEntry>, DatapathError> {
        let map = self
            .ebpf_mut()
            .map_mut(POD_IPS_MAP)
            .ok_or(DatapathError::MissingMap(POD_IPS_MAP))?;
        HashMap::try_from(map).map_err(map_err(POD_IPS_MAP))
    }
}

/// The ifindex of `iface` in the calling thread's network namespace.
pub fn ifindex_of(iface: &str) -> Result<u32, DatapathError> {
    nix::net::if_::if_nametoindex(iface).map_err(|source| DatapathError::NoInterface {
        iface: iface.to_owned(),
        source,
    })
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

/// Removing what is already gone is success: reconciliation is idempotent.
fn remove_ignoring_absent(
    result: Result<(), aya::maps::MapError>,
    name: &'static str,
) -> Result<(), DatapathError> {
    match result {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(source) => Err(DatapathError::Map { name, source }),
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
        assert_eq!(
            addrs_of(&a),
            vec![IpAddr::V4(Ipv4Addr::new(10, 240, 1, 11))]
        );
    }

    #[test]
    fn map_keys_use_the_v4_mapped_form_and_round_trip() {
        let v4: IpAddr = "10.240.1.11".parse().unwrap();
        let v6: IpAddr = "fd00:240:1::11".parse().unwrap();
        assert_eq!(ip_key(v4)[10..], [0xff, 0xff, 10, 240, 1, 11]);
        assert_eq!(ip_from_key(ip_key(v4)), v4);
        assert_eq!(ip_from_key(ip_key(v6)), v6);
        // A v4-mapped IPv6 address (as a dual-stack socket reports it) is the same key.
        let mapped: IpAddr = "::ffff:10.240.1.11".parse().unwrap();
        assert_eq!(ip_key(mapped), ip_key(v4));
    }
}
