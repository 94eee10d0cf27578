//! `mesh_tc_from_pod`: tcx ingress of an enrolled pod's host-side interface, i.e. every frame the
//! pod sends.
//!
//! 1. Anti-spoofing: the interface is the pod's identity (a pod cannot choose which veth its
//!    packets arrive on); a packet whose source address is not the pod's own is dropped and
//!    counted, so everything after may trust the source address of what passes.
//! 2. TCP to a destination no pod may reach through the node (its loopback, `::`/`0.0.0.0`,
//!    multicast, IPv6 link-local, IPv4-in-IPv6 forms: [`mesh_common::destination`]) is dropped
//!    and counted, whatever the agent would do with it.
//! 3. TCP of a connection a local agent socket owns (the pod's replies to the agent's transparent
//!    connections, later segments of captured connections) is delivered to that socket.
//! 4. A SYN to one of the node's own addresses is the node's business: on an agent port (admin,
//!    capture listeners) it is dropped, otherwise it is left to the node's stack uncaptured, so
//!    the node's services see the pod's own address (never the node's, which host services may
//!    trust).
//! 5. Any other new connection (SYN) goes to the outbound listener, with the interface recorded in the
//!    flow table as the source identity; if the agent is down the SYN is answered with a RST.
//! 6. Other TCP passes untouched (connections older than the enrolment), except segments of a
//!    connection the agent held that no socket holds any more (the agent was killed, or closed
//!    it first): those are dropped, so a captured connection's bytes never leave in plaintext.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::classifier,
    programs::TcContext,
};
use mesh_common::{Counter, FlowKind, PodAddrs, capture::is_agent_port, forbidden_destination};

use crate::{
    counters,
    maps::{MESH_NODE_ADDRS, MESH_PODS},
    packet::{self, ETH_HLEN, ETH_P_IP, ETH_P_IPV6, Family, IPV6_HLEN, Parsed},
    refuse, steer,
};

const ETH_P_ARP: u16 = 0x0806;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const ETH_P_QINQ: u16 = 0x9100;
const IPPROTO_ICMPV6: u8 = 58;
const IPV6_HOP_BY_HOP: u8 = 0;
/// Offsets from the start of the L3 header.
const IPV4_SRC: usize = 12;
const IPV6_NEXT_HEADER: usize = 6;
const IPV6_SRC: usize = 8;
/// ARP for IPv4 over Ethernet: the sender protocol address.
const ARP_SENDER_IP: usize = 14;

#[classifier]
pub fn mesh_tc_from_pod(ctx: TcContext) -> i32 {
    // SAFETY: the context pointer is valid for the duration of the program.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: read-only use of a value copied out of the map.
    let Some(pod) = (unsafe { MESH_PODS.get(&ifindex) }).copied() else {
        return TC_ACT_UNSPEC;
    };
    if !source_is_pods(&ctx, &pod) {
        counters::add(Counter::DroppedSpoofed, 1);
        return TC_ACT_SHOT as i32;
    }
    counters::add(Counter::FromPodAccepted, 1);
    let seg = match packet::parse(&ctx) {
        Parsed::NotTcp => return TC_ACT_UNSPEC,
        Parsed::Unparseable => {
            counters::add(Counter::DroppedUnparseable, 1);
            return TC_ACT_SHOT as i32;
        }
        Parsed::Tcp(seg) => seg,
    };
    if forbidden_destination(&seg.dst, seg.family == Family::V6).is_some() {
        counters::add(Counter::DroppedForbiddenDestination, 1);
        return TC_ACT_SHOT as i32;
    }
    let holder = steer::local_socket(&ctx, &seg);
    if holder == steer::LocalSocket::Live {
        steer::remember_if_answering_agent(&seg);
        steer::mark_local(&ctx);
        counters::add(Counter::SteeredToSocket, 1);
        return TC_ACT_OK as i32;
    }
    if !seg.is_pure_syn() {
        return steer::unheld_segment(&seg);
    }
    // SAFETY: read-only map lookup.
    if unsafe { MESH_NODE_ADDRS.get(&seg.dst) }.is_some() {
        if is_agent_port(u16::from_be(seg.dport_be)) {
            counters::add(Counter::DroppedAgentPort, 1);
            return TC_ACT_SHOT as i32;
        }
        steer::forget_held(&seg);
        counters::add(Counter::PassedToNode, 1);
        return TC_ACT_UNSPEC;
    }
    let time_wait = holder == steer::LocalSocket::TimeWait;
    if steer::assign_to_listener(&ctx, &seg, FlowKind::Outbound, ifindex, time_wait) {
        counters::add(Counter::CapturedOutbound, 1);
        if time_wait {
            counters::add(Counter::CapturedOverTimeWait, 1);
        }
        return TC_ACT_OK as i32;
    }
    counters::add(Counter::RefusedNoListener, 1);
    refuse::refuse_syn(&ctx, &seg, ifindex).unwrap_or(TC_ACT_SHOT as i32)
}

/// Whether the frame's source address belongs to the pod. Unreadable (truncated) IP/ARP headers
/// count as spoofed: from an enrolled pod we only pass what we could check.
#[inline(always)]
fn source_is_pods(ctx: &TcContext, pod: &PodAddrs) -> bool {
    // SAFETY: reading a field of the valid context.
    if unsafe { (*ctx.skb.skb).vlan_present } != 0 {
        // A pod has no business tagging frames; a (double) tag could hide IP from our checks.
        return false;
    }
    match u16::from_be(ctx.skb.protocol() as u16) {
        ETH_P_IP => pod.has_ipv4() && ctx.load::<[u8; 4]>(ETH_HLEN + IPV4_SRC) == Ok(pod.ipv4),
        ETH_P_ARP => {
            pod.has_ipv4() && ctx.load::<[u8; 4]>(ETH_HLEN + ARP_SENDER_IP) == Ok(pod.ipv4)
        }
        ETH_P_IPV6 => {
            let Ok(src) = ctx.load::<[u8; 16]>(ETH_HLEN + IPV6_SRC) else {
                return false;
            };
            if pod.has_ipv6() && src == pod.ipv6 {
                return true;
            }
            // Neighbour discovery, DAD and MLD use link-local or unspecified sources; those are
            // only meaningful on the link (the node never forwards them), and only for ICMPv6,
            // directly or behind MLD's hop-by-hop (router alert) header.
            let link_local = src[0] == 0xfe && src[1] & 0xc0 == 0x80;
            let unspecified = src == [0u8; 16];
            let next = ctx.load::<u8>(ETH_HLEN + IPV6_NEXT_HEADER);
            (link_local || unspecified)
                && (next == Ok(IPPROTO_ICMPV6)
                    || (next == Ok(IPV6_HOP_BY_HOP)
                        && ctx.load::<u8>(ETH_HLEN + IPV6_HLEN) == Ok(IPPROTO_ICMPV6)))
        }
        // VLAN tags (802.1Q, 802.1ad, QinQ): see above.
        ETH_P_8021Q | ETH_P_8021AD | ETH_P_QINQ => false,
        // Other ethertypes never leave the link (nodes route only IP): not ours to judge.
        _ => true,
    }
}
