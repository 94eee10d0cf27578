//! `mesh_tc_to_pods`: tcx ingress of every other way into the node — its uplinks and the host-side
//! interfaces of pods that are not enrolled. Only TCP addressed to an enrolled pod of this node is
//! touched:
//!
//! - segments of connections a local agent socket owns go to that socket (replies to the agent's
//!   transparent connections, later segments of captured inbound connections);
//! - a SYN to port 15008 goes to the HBONE listener, any other SYN to the inbound plaintext
//!   listener (where PeerAuthentication decides); with the agent down it is dropped (fail closed;
//!   the client's retransmission succeeds once the agent is back);
//! - segments of connections older than the enrolment pass, but not those of a connection the
//!   agent held that no socket holds any more (the agent was killed or closed it first): they
//!   are dropped rather than handed to the pod uncaptured;
//! - a pod that was un-enrolled stays in the address map as "draining": its connections the agent
//!   already owns keep reaching the agent, its new ones are not captured.
//!
//! Host-originated traffic (kubelet probes, host-network pods, the agent itself) never crosses an
//! ingress hook, so it is never captured.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::classifier,
    programs::TcContext,
};
use mesh_common::{
    Counter, FlowKind,
    capture::{POD_IP_ENROLLED, PORT_INBOUND_HBONE},
};

use crate::{
    counters,
    maps::MESH_POD_IPS,
    packet::{self, Parsed},
    steer,
};

#[classifier]
pub fn mesh_tc_to_pods(ctx: TcContext) -> i32 {
    let seg = match packet::parse(&ctx) {
        Parsed::NotTcp => return TC_ACT_UNSPEC,
        // TCP (or maybe TCP) we cannot follow: towards an enrolled pod it would slip past the
        // capture, so it is dropped; to anyone else it is none of our business.
        Parsed::Unparseable => {
            let to_enrolled = packet::destination(&ctx)
                // SAFETY: read-only map lookup.
                .is_some_and(|dst| unsafe { MESH_POD_IPS.get(&dst) }.is_some());
            if to_enrolled {
                counters::add(Counter::DroppedUnparseable, 1);
                return TC_ACT_SHOT as i32;
            }
            return TC_ACT_UNSPEC;
        }
        Parsed::Tcp(seg) => seg,
    };
    // SAFETY: read-only map lookups, values copied out.
    let to_pod = unsafe { MESH_POD_IPS.get(&seg.dst) }.copied();
    // A draining pod's own packets (this program now sits on its interface) may still belong to
    // connections the agent owns.
    let from_pod = to_pod.is_none() && unsafe { MESH_POD_IPS.get(&seg.src) }.is_some();
    if to_pod.is_none() && !from_pod {
        return TC_ACT_UNSPEC;
    }
    let holder = steer::local_socket(&ctx, &seg);
    if holder == steer::LocalSocket::Live {
        steer::remember_if_answering_agent(&seg);
        steer::mark_local(&ctx);
        counters::add(Counter::SteeredToSocket, 1);
        return TC_ACT_OK as i32;
    }
    let enrolled = to_pod.is_some_and(|p| p.flags & POD_IP_ENROLLED != 0);
    if !seg.is_pure_syn() {
        return steer::unheld_segment(&seg);
    }
    if !enrolled {
        // A draining pod's new connection, or one to it: not captured, and none of the agent's.
        steer::forget_held(&seg);
        counters::add(Counter::PassedUncaptured, 1);
        return TC_ACT_UNSPEC;
    }
    let (kind, counter) = if u16::from_be(seg.dport_be) == PORT_INBOUND_HBONE {
        (FlowKind::InboundHbone, Counter::CapturedInboundHbone)
    } else {
        (
            FlowKind::InboundPlaintext,
            Counter::CapturedInboundPlaintext,
        )
    };
    // SAFETY: valid context pointer.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let time_wait = holder == steer::LocalSocket::TimeWait;
    if steer::assign_to_listener(&ctx, &seg, kind, ifindex, time_wait) {
        counters::add(counter, 1);
        if time_wait {
            counters::add(Counter::CapturedOverTimeWait, 1);
        }
        TC_ACT_OK as i32
    } else {
        counters::add(Counter::DroppedNoListener, 1);
        TC_ACT_SHOT as i32
    }
}
