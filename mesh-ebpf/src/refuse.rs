//! Turning a SYN into the RST+ACK its destination would send when nothing listens, and bouncing it
//! straight back out of the interface it came in on. Used when the agent is down: a captured pod's
//! new connection must fail fast ("connection refused"), never leave the node uncaptured.
use aya_ebpf::{
    bindings::TC_ACT_REDIRECT,
    helpers::{bpf_csum_diff, bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};

use crate::packet::{
    ETH_HLEN, Family, IPPROTO_TCP, IPV4_HLEN, IPV6_HLEN, TCP_ACK, TCP_HLEN, TCP_RST, TcpSegment,
};

/// Rewrites the SYN in `ctx` into a RST+ACK from its destination and redirects it to the egress of
/// `ifindex`. `None` if the frame could not be rewritten (the caller then drops it).
#[inline(always)]
pub fn refuse_syn(ctx: &TcContext, seg: &TcpSegment, ifindex: u32) -> Option<i32> {
    // Only the plain layouts: IPv4 without options, IPv6 without extension headers.
    let l3_len = match seg.family {
        Family::V4 => IPV4_HLEN,
        Family::V6 => IPV6_HLEN,
    };
    if seg.l4_offset != ETH_HLEN + l3_len {
        return None;
    }
    // Ethernet: back to the sender.
    let macs = ctx.load::<[u8; 12]>(0).ok()?;
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&macs[6..]);
    swapped[6..].copy_from_slice(&macs[..6]);
    ctx.store(0, &swapped, 0).ok()?;

    let mut tcp = [0u8; TCP_HLEN];
    tcp[0..2].copy_from_slice(&seg.dport_be.to_ne_bytes());
    tcp[2..4].copy_from_slice(&seg.sport_be.to_ne_bytes());
    // seq 0; ack = the SYN's sequence number + 1.
    tcp[8..12].copy_from_slice(&seg.seq.wrapping_add(1).to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = TCP_RST | TCP_ACK;

    match seg.family {
        Family::V4 => {
            let (src, dst) = (seg.dst4(), seg.src4());
            let mut ip = [0u8; IPV4_HLEN];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&((IPV4_HLEN + TCP_HLEN) as u16).to_be_bytes());
            ip[6] = 0x40; // don't fragment
            ip[8] = 64;
            ip[9] = IPPROTO_TCP;
            ip[12..16].copy_from_slice(&src);
            ip[16..20].copy_from_slice(&dst);
            let ip_check = fold(sum(&mut ip)?);
            ip[10..12].copy_from_slice(&ip_check.to_ne_bytes());

            let mut pseudo = [0u8; 12 + TCP_HLEN];
            pseudo[0..4].copy_from_slice(&src);
            pseudo[4..8].copy_from_slice(&dst);
            pseudo[9] = IPPROTO_TCP;
            pseudo[10..12].copy_from_slice(&(TCP_HLEN as u16).to_be_bytes());
            pseudo[12..].copy_from_slice(&tcp);
            let check = fold(sum(&mut pseudo)?);
            tcp[16..18].copy_from_slice(&check.to_ne_bytes());

            ctx.store(ETH_HLEN, &ip, 0).ok()?;
            ctx.store(ETH_HLEN + IPV4_HLEN, &tcp, 0).ok()?;
        }
        Family::V6 => {
            let mut ip = [0u8; IPV6_HLEN];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&(TCP_HLEN as u16).to_be_bytes());
            ip[6] = IPPROTO_TCP;
            ip[7] = 64;
            ip[8..24].copy_from_slice(&seg.dst);
            ip[24..40].copy_from_slice(&seg.src);

            let mut pseudo = [0u8; 40 + TCP_HLEN];
            pseudo[0..16].copy_from_slice(&seg.dst);
            pseudo[16..32].copy_from_slice(&seg.src);
            pseudo[34..36].copy_from_slice(&(TCP_HLEN as u16).to_be_bytes());
            pseudo[39] = IPPROTO_TCP;
            pseudo[40..].copy_from_slice(&tcp);
            let check = fold(sum(&mut pseudo)?);
            tcp[16..18].copy_from_slice(&check.to_ne_bytes());

            ctx.store(ETH_HLEN, &ip, 0).ok()?;
            ctx.store(ETH_HLEN + IPV6_HLEN, &tcp, 0).ok()?;
        }
    }
    // Drop the SYN's options and any payload.
    // SAFETY: valid context pointer.
    let trimmed =
        unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_HLEN + l3_len + TCP_HLEN) as u32, 0) };
    if trimmed != 0 {
        return None;
    }
    // SAFETY: plain helper call; the verdict below tells tc to act on it.
    let redirected = unsafe { bpf_redirect(ifindex, 0) };
    (redirected == TC_ACT_REDIRECT as i64).then_some(TC_ACT_REDIRECT as i32)
}

/// One's-complement sum of `buf` (length a multiple of 4) by the kernel's `bpf_csum_diff`.
#[inline(always)]
fn sum<const N: usize>(buf: &mut [u8; N]) -> Option<u32> {
    // SAFETY: `buf` is a stack buffer of N bytes; the helper only reads it.
    let s = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            buf.as_mut_ptr() as *mut u32,
            N as u32,
            0,
        )
    };
    (s >= 0).then_some(s as u32)
}

/// Folds a 32-bit one's-complement sum into the 16-bit checksum field (same byte order as summed).
#[inline(always)]
fn fold(mut s: u32) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}
