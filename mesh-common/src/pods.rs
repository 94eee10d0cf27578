//! The enrolled-pod map: what the kernel knows about each pod, keyed by the ifindex of the pod's
//! host-side interface (the one thing a pod cannot forge about its packets).

/// Name of the hash map ifindex (u32) -> [`PodAddrs`].
pub const PODS_MAP: &str = "MESH_PODS";

/// Capacity of [`PODS_MAP`]: pods per node (Kubernetes' default limit is 110).
pub const MAX_PODS: u32 = 1024;

/// The pod has an IPv4 address in [`PodAddrs::ipv4`].
pub const POD_HAS_IPV4: u32 = 1;
/// The pod has an IPv6 address in [`PodAddrs::ipv6`].
pub const POD_HAS_IPV6: u32 = 1 << 1;

/// A pod's own addresses, in network byte order. Packets arriving from the pod's interface with
/// any other source address are spoofed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodAddrs {
    pub ipv4: [u8; 4],
    pub ipv6: [u8; 16],
    /// `POD_HAS_*` bits.
    pub flags: u32,
}

impl PodAddrs {
    pub const fn has_ipv4(&self) -> bool {
        self.flags & POD_HAS_IPV4 != 0
    }

    pub const fn has_ipv6(&self) -> bool {
        self.flags & POD_HAS_IPV6 != 0
    }
}

// SAFETY: repr(C), only integer arrays and a u32, no padding (4 + 16 + 4 bytes, align 4).
#[cfg(feature = "user")]
unsafe impl aya::Pod for PodAddrs {}
