//! Just enough packet parsing for the capture programs: Ethernet, IPv4/IPv6 and the TCP ports and
//! flags. Anything TCP-bearing we cannot parse completely is reported as such, so callers can fail
//! closed instead of letting it bypass the mesh.
use aya_ebpf::programs::TcContext;
use mesh_common::capture::v4_mapped;

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const IPPROTO_TCP: u8 = 6;
pub const IPV4_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
pub const TCP_HLEN: usize = 20;

pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// IPv6 extension headers that may precede TCP.
const IPV6_EXT_HEADERS: [u8; 6] = [0, 43, 44, 50, 51, 60];

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// A TCP segment's addressing, as read from the wire.
#[derive(Clone, Copy)]
pub struct TcpSegment {
    pub family: Family,
    /// Source and destination, 16 bytes (IPv4 v4-mapped).
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Ports in network byte order, as they sit in the header.
    pub sport_be: u16,
    pub dport_be: u16,
    pub flags: u8,
    /// Sequence number, host order.
    pub seq: u32,
    /// Offset of the TCP header from the start of the frame.
    pub l4_offset: usize,
}

impl TcpSegment {
    /// A connection-opening SYN (not a SYN-ACK, not a RST).
    pub fn is_pure_syn(&self) -> bool {
        self.flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN
    }

    /// IPv4 addresses from their v4-mapped form.
    pub fn src4(&self) -> [u8; 4] {
        [self.src[12], self.src[13], self.src[14], self.src[15]]
    }

    pub fn dst4(&self) -> [u8; 4] {
        [self.dst[12], self.dst[13], self.dst[14], self.dst[15]]
    }
}

pub enum Parsed {
    /// Not TCP (or not IP): the capture programs leave it alone.
    NotTcp,
    Tcp(TcpSegment),
    /// TCP, or possibly TCP, in a form we do not handle (fragments, extension headers, truncated).
    Unparseable,
}

/// The IP destination address (IPv4 v4-mapped) of any IPv4/IPv6 packet, parseable or not: what
/// the capture checks before letting a packet it could not parse go on.
#[inline(always)]
pub fn destination(ctx: &TcContext) -> Option<[u8; 16]> {
    match u16::from_be(ctx.skb.protocol() as u16) {
        ETH_P_IP => ctx.load::<[u8; 4]>(ETH_HLEN + 16).ok().map(v4_mapped),
        ETH_P_IPV6 => ctx.load::<[u8; 16]>(ETH_HLEN + 24).ok(),
        _ => None,
    }
}

#[inline(always)]
pub fn parse(ctx: &TcContext) -> Parsed {
    match u16::from_be(ctx.skb.protocol() as u16) {
        ETH_P_IP => parse_v4(ctx),
        ETH_P_IPV6 => parse_v6(ctx),
        _ => Parsed::NotTcp,
    }
}

#[inline(always)]
fn parse_v4(ctx: &TcContext) -> Parsed {
    let Ok(ver_ihl) = ctx.load::<u8>(ETH_HLEN) else {
        return Parsed::Unparseable;
    };
    let Ok(proto) = ctx.load::<u8>(ETH_HLEN + 9) else {
        return Parsed::Unparseable;
    };
    if proto != IPPROTO_TCP {
        return Parsed::NotTcp;
    }
    let Ok(frag) = ctx.load::<u16>(ETH_HLEN + 6) else {
        return Parsed::Unparseable;
    };
    // More-fragments set or a non-zero offset: ports may be missing or split; never guess.
    if u16::from_be(frag) & 0x3fff != 0 {
        return Parsed::Unparseable;
    }
    let ihl = ((ver_ihl & 0x0f) as usize) * 4;
    if ihl < IPV4_HLEN {
        return Parsed::Unparseable;
    }
    let (Ok(src), Ok(dst)) = (
        ctx.load::<[u8; 4]>(ETH_HLEN + 12),
        ctx.load::<[u8; 4]>(ETH_HLEN + 16),
    ) else {
        return Parsed::Unparseable;
    };
    tcp(
        ctx,
        Family::V4,
        v4_mapped(src),
        v4_mapped(dst),
        ETH_HLEN + ihl,
    )
}

#[inline(always)]
fn parse_v6(ctx: &TcContext) -> Parsed {
    let Ok(next) = ctx.load::<u8>(ETH_HLEN + 6) else {
        return Parsed::Unparseable;
    };
    if next != IPPROTO_TCP {
        // TCP hidden behind extension headers would otherwise slip past capture; no pod needs
        // them for TCP, so they are refused. Other protocols (ICMPv6, UDP) are not ours.
        return if IPV6_EXT_HEADERS.contains(&next) {
            ext_chain_carries_tcp(ctx)
        } else {
            Parsed::NotTcp
        };
    }
    let (Ok(src), Ok(dst)) = (
        ctx.load::<[u8; 16]>(ETH_HLEN + 8),
        ctx.load::<[u8; 16]>(ETH_HLEN + 24),
    ) else {
        return Parsed::Unparseable;
    };
    tcp(ctx, Family::V6, src, dst, ETH_HLEN + IPV6_HLEN)
}

/// Walks a few IPv6 extension headers: `Unparseable` if TCP (or something we cannot follow) is at
/// the end of the chain, `NotTcp` if another protocol is.
#[inline(always)]
fn ext_chain_carries_tcp(ctx: &TcContext) -> Parsed {
    let mut next = match ctx.load::<u8>(ETH_HLEN + 6) {
        Ok(n) => n,
        Err(_) => return Parsed::Unparseable,
    };
    let mut offset = ETH_HLEN + IPV6_HLEN;
    for _ in 0..4 {
        if next == IPPROTO_TCP {
            return Parsed::Unparseable;
        }
        // ESP: the upper layer is encrypted, it may be TCP.
        if next == 50 {
            return Parsed::Unparseable;
        }
        if !IPV6_EXT_HEADERS.contains(&next) {
            return Parsed::NotTcp;
        }
        let (Ok(n), Ok(len)) = (ctx.load::<u8>(offset), ctx.load::<u8>(offset + 1)) else {
            return Parsed::Unparseable;
        };
        // Every fragment's header names the upper protocol; a TCP fragment is refused above on
        // the next round.
        offset += match next {
            44 => 8,
            51 => (len as usize + 2) * 4,
            _ => (len as usize + 1) * 8,
        };
        next = n;
    }
    Parsed::Unparseable
}

#[inline(always)]
fn tcp(ctx: &TcContext, family: Family, src: [u8; 16], dst: [u8; 16], l4: usize) -> Parsed {
    let (Ok(sport_be), Ok(dport_be), Ok(seq), Ok(flags)) = (
        ctx.load::<u16>(l4),
        ctx.load::<u16>(l4 + 2),
        ctx.load::<u32>(l4 + 4),
        ctx.load::<u8>(l4 + 13),
    ) else {
        return Parsed::Unparseable;
    };
    Parsed::Tcp(TcpSegment {
        family,
        src,
        dst,
        sport_be,
        dport_be,
        flags,
        seq: u32::from_be(seq),
        l4_offset: l4,
    })
}
