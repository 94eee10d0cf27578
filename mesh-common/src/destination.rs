//! Destinations a pod may never reach through the node (issue #15): the node's loopback and
//! unspecified addresses (`::` and `0.0.0.0` land on the node's own loopback when the agent
//! connects to them), multicast and broadcast (never a TCP peer), IPv6 link-local (on a pod's
//! link the only other host is the node), and the IPv4-mapped / IPv4-compatible IPv6 spellings
//! of any of these (RFC 4291: neither form belongs on the wire).
//!
//! One classifier for both sides: the tc program drops such segments before anything else
//! looks at them, and the agent refuses them again before any connect, so neither depends on
//! the other being right. Addresses are 16 bytes, IPv4 in the `::ffff:a.b.c.d` form the maps
//! use; `ipv6_packet` says whether the bytes came from an IPv6 header (where the mapped form is
//! itself a refusal) or from IPv4.

/// Why a destination is refused. Values are stable: they name counters and log lines.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forbidden {
    /// `0.0.0.0/8`, `::`: "this host", i.e. the node itself.
    Unspecified = 1,
    /// `127.0.0.0/8`, `::1`.
    Loopback = 2,
    /// `224.0.0.0/4`, `ff00::/8`, `255.255.255.255`, `240.0.0.0/4`.
    MulticastOrBroadcast = 3,
    /// `fe80::/10`: on a pod's link the only other host is the node.
    LinkLocal = 4,
    /// `::ffff:0:0/96` or `::/96` in an IPv6 header: IPv4 dressed as IPv6.
    V4InV6 = 5,
}

impl Forbidden {
    /// For logs and metric labels.
    pub const fn name(self) -> &'static str {
        match self {
            Forbidden::Unspecified => "unspecified",
            Forbidden::Loopback => "loopback",
            Forbidden::MulticastOrBroadcast => "multicast_or_broadcast",
            Forbidden::LinkLocal => "link_local",
            Forbidden::V4InV6 => "v4_in_v6",
        }
    }
}

/// The verdict for a destination address (see the module docs).
#[inline(always)]
pub fn forbidden_destination(dst: &[u8; 16], ipv6_packet: bool) -> Option<Forbidden> {
    let mapped = is_zero(dst, 10) && dst[10] == 0xff && dst[11] == 0xff;
    if !ipv6_packet {
        // IPv4 (carried mapped): judge the four address bytes.
        return forbidden_v4([dst[12], dst[13], dst[14], dst[15]]);
    }
    if is_zero(dst, 16) {
        return Some(Forbidden::Unspecified);
    }
    if is_zero(dst, 15) && dst[15] == 1 {
        return Some(Forbidden::Loopback);
    }
    if dst[0] == 0xff {
        return Some(Forbidden::MulticastOrBroadcast);
    }
    if dst[0] == 0xfe && dst[1] & 0xc0 == 0x80 {
        return Some(Forbidden::LinkLocal);
    }
    // `::ffff:a.b.c.d` (mapped) and `::a.b.c.d` (compatible, deprecated): the kernel treats
    // the mapped form as the IPv4 address on dual-stack sockets, so `::ffff:127.0.0.1` is the
    // node's loopback. Neither form is a legitimate destination on the wire.
    if mapped || is_zero(dst, 12) {
        return Some(Forbidden::V4InV6);
    }
    None
}

/// The IPv4 part of [`forbidden_destination`].
#[inline(always)]
pub fn forbidden_v4(a: [u8; 4]) -> Option<Forbidden> {
    match a[0] {
        0 => Some(Forbidden::Unspecified),
        127 => Some(Forbidden::Loopback),
        224..=255 => Some(Forbidden::MulticastOrBroadcast),
        _ => None,
    }
}

#[inline(always)]
fn is_zero(b: &[u8; 16], n: usize) -> bool {
    let mut i = 0;
    while i < n && i < 16 {
        if b[i] != 0 {
            return false;
        }
        i += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::net::{IpAddr, Ipv6Addr};

    use super::*;
    use crate::capture::v4_mapped;

    fn verdict(s: &str) -> Option<Forbidden> {
        match s.parse::<IpAddr>().unwrap() {
            IpAddr::V4(a) => forbidden_destination(&v4_mapped(a.octets()), false),
            IpAddr::V6(a) => forbidden_destination(&a.octets(), true),
        }
    }

    /// Every form the issue lists, and ordinary destinations that must pass.
    #[test]
    fn table() {
        use Forbidden::*;
        let cases: &[(&str, Option<Forbidden>)] = &[
            ("0.0.0.0", Some(Unspecified)),
            ("0.1.2.3", Some(Unspecified)),
            ("127.0.0.1", Some(Loopback)),
            ("127.255.255.254", Some(Loopback)),
            ("224.0.0.1", Some(MulticastOrBroadcast)),
            ("239.1.2.3", Some(MulticastOrBroadcast)),
            ("255.255.255.255", Some(MulticastOrBroadcast)),
            ("240.0.0.1", Some(MulticastOrBroadcast)),
            ("::", Some(Unspecified)),
            ("::1", Some(Loopback)),
            ("ff02::1", Some(MulticastOrBroadcast)),
            ("ff05::2", Some(MulticastOrBroadcast)),
            ("fe80::1", Some(LinkLocal)),
            ("febf::1", Some(LinkLocal)),
            ("::ffff:127.0.0.1", Some(V4InV6)),
            ("::ffff:10.0.0.1", Some(V4InV6)),
            ("::ffff:0.0.0.0", Some(V4InV6)),
            ("::127.0.0.1", Some(V4InV6)),
            ("::10.0.0.1", Some(V4InV6)),
            ("::2", Some(V4InV6)),
            // Ordinary destinations.
            ("10.244.1.2", None),
            ("10.96.0.1", None),
            ("169.254.169.254", None),
            ("192.168.1.1", None),
            ("223.255.255.255", None),
            ("1.1.1.1", None),
            ("fd00:244:1::2", None),
            ("2001:db8::1", None),
            ("fec0::1", None),
            ("64:ff9b::7f00:1", None),
        ];
        for (addr, want) in cases {
            assert_eq!(verdict(addr), *want, "{addr}");
        }
    }

    /// An IPv4 packet carries its address mapped; the mapping itself is not a refusal there.
    #[test]
    fn v4_packets_are_judged_on_their_four_bytes() {
        assert_eq!(
            forbidden_destination(&v4_mapped([10, 1, 2, 3]), false),
            None
        );
        let mapped = Ipv6Addr::from(v4_mapped([10, 1, 2, 3])).octets();
        assert_eq!(
            forbidden_destination(&mapped, true),
            Some(Forbidden::V4InV6)
        );
    }
}
