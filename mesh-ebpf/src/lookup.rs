//! `mesh_sk_lookup`: the node namespace's programmable socket lookup, for captured SYNs the
//! kernel looks up itself.
//!
//! The tc programs normally assign a captured SYN to the agent's listener (`bpf_sk_assign`). One
//! SYN cannot be handled that way: one whose 4-tuple an agent socket still holds in TIME_WAIT
//! (the agent closed its side first last time, and the pod reused its port — the pod's own port
//! allocator cannot see the agent's sockets). TCP would drop the assigned SYN because its
//! request socket cannot be hashed next to the TIME_WAIT one. The tc program only marks such a
//! SYN; TCP's TIME_WAIT handling accepts it as a new connection, retires the old socket and looks
//! for a listener — and that lookup runs this program, which answers with the agent's listener
//! for the flow the tc program recorded.
//!
//! Every other listener lookup in the namespace (host services, anything without a flow record)
//! is left to the kernel: a flow record exists only for a SYN our tc programs captured.
use core::ptr::read_volatile;

use aya_ebpf::{bindings::sk_action::SK_PASS, macros::sk_lookup, programs::SkLookupContext};
use mesh_common::{
    Counter, FlowKey,
    capture::{listener_slot, v4_mapped},
};

use crate::{
    counters,
    maps::{MESH_FLOWS, MESH_LISTENERS},
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const IPPROTO_TCP: u32 = 6;

#[sk_lookup]
pub fn mesh_sk_lookup(ctx: SkLookupContext) -> u32 {
    let l = ctx.lookup;
    // Every field is loaded whole and up front, straight from the context: the verifier refuses
    // loads through a context pointer the compiler has moved, which it does when loads sit in
    // different branches.
    // SAFETY: the context pointer is valid for the duration of the program.
    let (protocol, family, remote_ip4, local_ip4, remote_port, local_port) = unsafe {
        (
            read_volatile(&raw const (*l).protocol),
            read_volatile(&raw const (*l).family),
            read_volatile(&raw const (*l).remote_ip4),
            read_volatile(&raw const (*l).local_ip4),
            // A 16-bit field in network order, which the kernel lets us load as such.
            read_volatile(&raw const (*l).remote_port),
            read_volatile(&raw const (*l).local_port),
        )
    };
    // SAFETY: as above.
    let (remote_ip6, local_ip6) = unsafe {
        (
            [
                read_volatile(&raw const (*l).remote_ip6[0]),
                read_volatile(&raw const (*l).remote_ip6[1]),
                read_volatile(&raw const (*l).remote_ip6[2]),
                read_volatile(&raw const (*l).remote_ip6[3]),
            ],
            [
                read_volatile(&raw const (*l).local_ip6[0]),
                read_volatile(&raw const (*l).local_ip6[1]),
                read_volatile(&raw const (*l).local_ip6[2]),
                read_volatile(&raw const (*l).local_ip6[3]),
            ],
        )
    };
    if protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    let (src, dst, ipv6) = match family {
        // Addresses are in network byte order: their in-memory bytes are the address.
        AF_INET => (
            v4_mapped(remote_ip4.to_ne_bytes()),
            v4_mapped(local_ip4.to_ne_bytes()),
            false,
        ),
        AF_INET6 => (ip6(remote_ip6), ip6(local_ip6), true),
        _ => return SK_PASS,
    };
    let key = FlowKey {
        src,
        dst,
        sport: u16::from_be(remote_port),
        dport: local_port as u16,
    };
    // SAFETY: read-only lookup, value copied out.
    let Some(info) = (unsafe { MESH_FLOWS.get(&key) }).copied() else {
        return SK_PASS;
    };
    if MESH_LISTENERS
        .redirect_sk_lookup(&ctx, listener_slot(info.kind, ipv6), 0)
        .is_ok()
    {
        counters::add(Counter::SkLookupAssigned, 1);
    }
    // With a socket assigned the kernel takes it; without, its own lookup continues.
    SK_PASS
}

#[inline(always)]
fn ip6(words: [u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = words[i].to_ne_bytes();
        out[i * 4] = b[0];
        out[i * 4 + 1] = b[1];
        out[i * 4 + 2] = b[2];
        out[i * 4 + 3] = b[3];
        i += 1;
    }
    out
}
