//! `mesh_tc_observe`: a tc (tcx) program that counts the frames crossing an interface by family and
//! size, and never changes their fate. The agent uses it to prove the data path is attached where it
//! thinks it is, and as the smallest program that exercises load, attach, pin and detach.
use aya_ebpf::{bindings::TC_ACT_UNSPEC, macros::classifier, programs::TcContext};
use mesh_common::Counter;

use crate::counters;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;

#[classifier]
pub fn mesh_tc_observe(ctx: TcContext) -> i32 {
    // skb->protocol is the ethertype in network byte order.
    let ethertype = u16::from_be(ctx.skb.protocol() as u16);
    let family = match ethertype {
        ETH_P_IP => Counter::ObservedIpv4Packets,
        ETH_P_IPV6 => Counter::ObservedIpv6Packets,
        _ => Counter::ObservedOtherPackets,
    };
    counters::add(family, 1);
    counters::add(Counter::ObservedBytes, u64::from(ctx.len()));
    // TC_ACT_UNSPEC is TCX_NEXT: hand the packet to the next program (or the stack) unchanged.
    TC_ACT_UNSPEC
}
