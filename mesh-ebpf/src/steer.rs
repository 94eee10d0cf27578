//! Steering a TCP segment to an agent socket in the node's network namespace.
//!
//! Two cases. A segment of a connection a local socket already owns (an agent socket accepted
//! earlier, or the agent's transparent socket towards a pod) only needs the routing mark: the node
//! then delivers it locally and TCP's own lookup finds the socket. A connection-opening SYN is
//! assigned to the agent's IP_TRANSPARENT listener with `bpf_sk_assign`; the socket TCP creates
//! for it keeps the original destination as its local address, which is how the agent learns it.
//! The listener is taken from `MESH_LISTENERS` (filled by the newest ready agent), not looked up
//! by port: two agents can listen side by side during an upgrade.
use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC, bpf_sock, bpf_sock_tuple},
    helpers::{bpf_map_lookup_elem, bpf_sk_assign, bpf_sk_release, bpf_skc_lookup_tcp},
    programs::TcContext,
};
use mesh_common::{
    Counter, FlowInfo, FlowKey, FlowKind,
    capture::{MARK_DELIVER_LOCAL, listener_slot},
};

use crate::{
    counters,
    maps::{MESH_CAPTURED, MESH_FLOWS, MESH_LISTENERS},
    packet::{Family, TCP_ACK, TCP_RST, TCP_SYN, TcpSegment},
};

/// Lookup in the namespace of the device the packet is on (`BPF_F_CURRENT_NETNS`).
const CURRENT_NETNS: u64 = u64::MAX;
const TCP_LISTEN: u32 = 10;
const TCP_TIME_WAIT: u32 = 6;

#[repr(C)]
struct Tuple4 {
    saddr: [u8; 4],
    daddr: [u8; 4],
    sport: u16,
    dport: u16,
}

#[repr(C)]
struct Tuple6 {
    saddr: [u8; 16],
    daddr: [u8; 16],
    sport: u16,
    dport: u16,
}

/// Sets the bit that the agent's policy-routing rule turns into local delivery.
#[inline(always)]
pub fn mark_local(ctx: &TcContext) {
    // SAFETY: reading a field of the valid context.
    let mark = unsafe { (*ctx.skb.skb).mark };
    ctx.set_mark(mark | MARK_DELIVER_LOCAL);
}

/// Who holds a segment's exact 4-tuple in the node's namespace.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum LocalSocket {
    /// Nobody (or only a listener, which never counts: matching a host service's wildcard
    /// listener here would deliver pod traffic to it).
    None,
    /// A live socket (established or handshaking): the segment is its.
    Live,
    /// A socket in TIME_WAIT. It gets none of the segment's later packets: the tuple of a
    /// finished agent connection can be reused within the TIME_WAIT period by a new connection
    /// that is not the agent's (a pod that just left the mesh, a bystander), and the old socket
    /// would swallow its SYN-ACK (found by the benchmark's plain-after-mesh trials). The only
    /// segments a TIME_WAIT socket legitimately gets are late retransmissions of a finished
    /// connection; the pod answers those (with a reset at worst), which harms nothing. A new
    /// SYN meeting it is captured through the kernel's own TIME_WAIT handling, see
    /// [`assign_to_listener`].
    TimeWait,
}

/// Who holds the segment's 4-tuple.
#[inline(always)]
pub fn local_socket(ctx: &TcContext, seg: &TcpSegment) -> LocalSocket {
    // SAFETY: the tuple lives on our stack for the call; the returned socket is released below.
    let sk = unsafe { lookup(ctx, seg) };
    if sk.is_null() {
        return LocalSocket::None;
    }
    // SAFETY: non-null socket pointer from the lookup helper; `state` is readable on sock_common.
    let state = unsafe { (*sk).state };
    unsafe { bpf_sk_release(sk as *mut _) };
    match state {
        TCP_LISTEN => LocalSocket::None,
        TCP_TIME_WAIT => LocalSocket::TimeWait,
        _ => LocalSocket::Live,
    }
}

/// Hands a SYN to the agent listener registered for `kind` (and the segment's family), marks it
/// for local delivery and records the flow. `false` when no agent listener is registered (the
/// agent is down).
///
/// Normally the SYN is assigned to the listener here (`bpf_sk_assign`). When an agent socket in
/// TIME_WAIT still holds the tuple (`time_wait`: the agent closed first last time and the pod
/// reused its port), an assigned SYN would be dropped by TCP, whose request socket cannot be
/// hashed next to the TIME_WAIT one, so the pod would retry for a minute. Such a SYN is only
/// marked: the kernel's TIME_WAIT handling then retires the old socket and looks up a listener,
/// which `mesh_sk_lookup` answers from the flow record written here and the same map.
#[inline(always)]
pub fn assign_to_listener(
    ctx: &TcContext,
    seg: &TcpSegment,
    kind: FlowKind,
    ifindex: u32,
    time_wait: bool,
) -> bool {
    let slot = listener_slot(kind as u32, matches!(seg.family, Family::V6));
    // SAFETY: a sockmap lookup returns a referenced socket (or null), released below. The map
    // pointer is the map definition itself (`SockMap` is a transparent wrapper around it).
    let sk = unsafe {
        bpf_map_lookup_elem(
            core::ptr::addr_of!(MESH_LISTENERS) as *mut _,
            core::ptr::addr_of!(slot).cast(),
        )
    } as *mut bpf_sock;
    if sk.is_null() {
        return false;
    }
    let assigned =
        time_wait || unsafe { bpf_sk_assign(ctx.skb.skb as *mut _, sk as *mut _, 0) } == 0;
    // SAFETY: every socket reference from a lookup is released exactly once.
    unsafe { bpf_sk_release(sk as *mut _) };
    if !assigned {
        return false;
    }
    let key = flow_key(seg);
    let info = FlowInfo {
        ifindex,
        kind: kind as u32,
    };
    // A full LRU map evicts its oldest entry; the insert itself cannot fail for lack of room.
    let _ = MESH_FLOWS.insert(&key, &info, 0);
    let _ = MESH_CAPTURED.insert(&key, &1, 0);
    mark_local(ctx);
    true
}

/// The segment's connection as `MESH_FLOWS` and `MESH_CAPTURED` key it (ports host order).
#[inline(always)]
fn flow_key(seg: &TcpSegment) -> FlowKey {
    FlowKey {
        src: seg.src,
        dst: seg.dst,
        sport: u16::from_be(seg.sport_be),
        dport: u16::from_be(seg.dport_be),
    }
}

/// Called for a segment a live local socket holds: a SYN-ACK there answers an agent's own
/// connection (to a pod, or out of the node in a pod's name), which from now on is one the
/// agent holds. Captured SYNs are remembered by [`assign_to_listener`].
#[inline(always)]
pub fn remember_if_answering_agent(seg: &TcpSegment) {
    if seg.flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN | TCP_ACK {
        let _ = MESH_CAPTURED.insert(&flow_key(seg), &1, 0);
    }
}

/// The verdict on a segment that opens nothing (not a pure SYN) and that no live socket holds.
/// Of a connection the agent held (it was killed, or closed the connection first), it is
/// dropped: passed uncaptured, it would carry the application's bytes in plaintext. Otherwise
/// it belongs to a connection older than the enrolment, which passes untouched.
#[inline(always)]
pub fn unheld_segment(seg: &TcpSegment) -> i32 {
    // SAFETY: read-only map lookup.
    if unsafe { MESH_CAPTURED.get(&flow_key(seg)) }.is_some() {
        counters::add(Counter::DroppedOrphaned, 1);
        return TC_ACT_SHOT as i32;
    }
    counters::add(Counter::PassedUncaptured, 1);
    TC_ACT_UNSPEC
}

/// A new connection that is not captured (a draining pod's, one to the node itself) may reuse
/// the tuple of one the agent held: its later segments, both ways, are its own, not an
/// orphan's. Both orientations go (its SYN's, and its replies', which an agent's own connection
/// with the same tuple left behind).
#[inline(always)]
pub fn forget_held(seg: &TcpSegment) {
    let key = flow_key(seg);
    let _ = MESH_CAPTURED.remove(&key);
    let reply = FlowKey {
        src: key.dst,
        dst: key.src,
        sport: key.dport,
        dport: key.sport,
    };
    let _ = MESH_CAPTURED.remove(&reply);
}

/// `bpf_skc_lookup_tcp` (any socket state) for the segment's exact 4-tuple in the current
/// namespace.
#[inline(always)]
unsafe fn lookup(ctx: &TcContext, seg: &TcpSegment) -> *mut bpf_sock {
    let skb = ctx.skb.skb as *mut _;
    match seg.family {
        Family::V4 => {
            let mut t = Tuple4 {
                saddr: seg.src4(),
                daddr: seg.dst4(),
                sport: seg.sport_be,
                dport: seg.dport_be,
            };
            let tuple = &mut t as *mut Tuple4 as *mut bpf_sock_tuple;
            let size = core::mem::size_of::<Tuple4>() as u32;
            unsafe { bpf_skc_lookup_tcp(skb, tuple, size, CURRENT_NETNS, 0) }
        }
        Family::V6 => {
            let mut t = Tuple6 {
                saddr: seg.src,
                daddr: seg.dst,
                sport: seg.sport_be,
                dport: seg.dport_be,
            };
            let tuple = &mut t as *mut Tuple6 as *mut bpf_sock_tuple;
            let size = core::mem::size_of::<Tuple6>() as u32;
            unsafe { bpf_skc_lookup_tcp(skb, tuple, size, CURRENT_NETNS, 0) }
        }
    }
}
