//! Per-reason data-path counters.
//!
//! The eBPF programs bump one slot of a per-CPU array per event; the agent sums the CPUs. Slots are
//! append-only: a slot's meaning never changes, so a newer agent can read the maps an older one pinned.

/// One slot of the `MESH_COUNTERS` per-CPU array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// IPv4 packets seen by the tc observer program.
    ObservedIpv4Packets = 0,
    /// IPv6 packets seen by the tc observer program.
    ObservedIpv6Packets = 1,
    /// Non-IP frames (ARP, ...) seen by the tc observer program.
    ObservedOtherPackets = 2,
    /// Bytes (skb length, L2 included) seen by the tc observer program.
    ObservedBytes = 3,
    /// Packets from an enrolled pod's interface that passed the source-address check.
    FromPodAccepted = 4,
    /// Packets from an enrolled pod's interface whose source address is not the pod's: dropped.
    DroppedSpoofed = 5,
}

impl Counter {
    /// Every counter, in slot order.
    pub const ALL: [Counter; 6] = [
        Counter::ObservedIpv4Packets,
        Counter::ObservedIpv6Packets,
        Counter::ObservedOtherPackets,
        Counter::ObservedBytes,
        Counter::FromPodAccepted,
        Counter::DroppedSpoofed,
    ];

    /// Number of slots the map is created with; leaves room to add counters without resizing.
    pub const SLOTS: u32 = 64;

    /// The slot index in the per-CPU array.
    pub const fn slot(self) -> u32 {
        self as u32
    }

    /// Stable snake_case name, used in metrics labels and debug output.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::ObservedIpv4Packets => "observed_ipv4_packets",
            Counter::ObservedIpv6Packets => "observed_ipv6_packets",
            Counter::ObservedOtherPackets => "observed_other_packets",
            Counter::ObservedBytes => "observed_bytes",
            Counter::FromPodAccepted => "from_pod_accepted",
            Counter::DroppedSpoofed => "dropped_spoofed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_dense_unique_and_fit_the_map() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(c.slot() as usize, i, "{} is out of order", c.name());
            assert!(c.slot() < Counter::SLOTS);
        }
    }
}
