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
    /// SYNs from an enrolled pod handed to the outbound listener (15001).
    CapturedOutbound = 6,
    /// SYNs to an enrolled pod handed to the inbound plaintext listener (15006).
    CapturedInboundPlaintext = 7,
    /// SYNs to `<enrolled pod>:15008` handed to the HBONE listener.
    CapturedInboundHbone = 8,
    /// Packets of an already-captured connection steered to the agent socket that owns it.
    SteeredToSocket = 9,
    /// Outbound SYNs refused with a RST because the agent's listener is gone (agent down).
    RefusedNoListener = 10,
    /// Inbound SYNs to an enrolled pod dropped because the agent's listener is gone.
    DroppedNoListener = 11,
    /// TCP packets of enrolled pods left alone: connections that predate enrolment.
    PassedUncaptured = 12,
    /// TCP we could not parse safely (IP fragments, IPv6 extension headers): dropped, fail closed.
    DroppedUnparseable = 13,
    /// sendmsg calls redirected socket-to-socket by sk_msg (same-node splice).
    SplicedMessages = 14,
    /// Bytes moved socket-to-socket by sk_msg instead of the TCP/IP stack.
    SplicedBytes = 15,
    /// Sockets whose peer was not spliceable at a send (not joined yet, or gone): left on TCP for
    /// good, since bytes the splice cannot account for must never be overtaken.
    SpliceFallbacks = 16,
    /// New SYNs whose 4-tuple is still held by an agent socket in TIME_WAIT (the agent closed
    /// first last time, the pod reused its port): handed to the kernel's TIME_WAIT handling,
    /// which asks `mesh_sk_lookup` for the listener instead of dropping the SYN.
    CapturedOverTimeWait = 17,
    /// Listener lookups `mesh_sk_lookup` answered with an agent listener (captured flows only).
    SkLookupAssigned = 18,
    /// TCP from an enrolled pod to a destination no pod may reach through the node (loopback,
    /// unspecified, multicast/broadcast, IPv6 link-local, IPv4-in-IPv6 forms): dropped.
    DroppedForbiddenDestination = 19,
    /// SYNs from an enrolled pod to one of the node's own addresses on an agent port
    /// (admin, capture listeners): dropped.
    DroppedAgentPort = 20,
    /// SYNs from an enrolled pod to one of the node's own addresses: left to the node's stack
    /// (not captured), so the node's services see the pod's own address.
    PassedToNode = 21,
    /// Sends on a spliced socket that took the TCP path because the peer's splice queue was at
    /// its bound or TCP bytes sent earlier were still unread (backpressure, see splice.rs).
    SpliceDeferredMessages = 22,
    /// Bytes of those sends.
    SpliceDeferredBytes = 23,
    /// Segments of a connection the agent held (see `MESH_CAPTURED`) that no live socket holds
    /// any more — the agent was killed, or closed it first: dropped, never passed uncaptured.
    DroppedOrphaned = 24,
}

impl Counter {
    /// Every counter, in slot order.
    pub const ALL: [Counter; 25] = [
        Counter::ObservedIpv4Packets,
        Counter::ObservedIpv6Packets,
        Counter::ObservedOtherPackets,
        Counter::ObservedBytes,
        Counter::FromPodAccepted,
        Counter::DroppedSpoofed,
        Counter::CapturedOutbound,
        Counter::CapturedInboundPlaintext,
        Counter::CapturedInboundHbone,
        Counter::SteeredToSocket,
        Counter::RefusedNoListener,
        Counter::DroppedNoListener,
        Counter::PassedUncaptured,
        Counter::DroppedUnparseable,
        Counter::SplicedMessages,
        Counter::SplicedBytes,
        Counter::SpliceFallbacks,
        Counter::CapturedOverTimeWait,
        Counter::SkLookupAssigned,
        Counter::DroppedForbiddenDestination,
        Counter::DroppedAgentPort,
        Counter::PassedToNode,
        Counter::SpliceDeferredMessages,
        Counter::SpliceDeferredBytes,
        Counter::DroppedOrphaned,
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
            Counter::CapturedOutbound => "captured_outbound",
            Counter::CapturedInboundPlaintext => "captured_inbound_plaintext",
            Counter::CapturedInboundHbone => "captured_inbound_hbone",
            Counter::SteeredToSocket => "steered_to_socket",
            Counter::RefusedNoListener => "refused_no_listener",
            Counter::DroppedNoListener => "dropped_no_listener",
            Counter::PassedUncaptured => "passed_uncaptured",
            Counter::DroppedUnparseable => "dropped_unparseable",
            Counter::SplicedMessages => "spliced_messages",
            Counter::SplicedBytes => "spliced_bytes",
            Counter::SpliceFallbacks => "splice_fallbacks",
            Counter::CapturedOverTimeWait => "captured_over_time_wait",
            Counter::SkLookupAssigned => "sk_lookup_assigned",
            Counter::DroppedForbiddenDestination => "dropped_forbidden_destination",
            Counter::DroppedAgentPort => "dropped_agent_port",
            Counter::PassedToNode => "passed_to_node",
            Counter::SpliceDeferredMessages => "splice_deferred_messages",
            Counter::SpliceDeferredBytes => "splice_deferred_bytes",
            Counter::DroppedOrphaned => "dropped_orphaned",
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
