//! Generated frames for fuzzing the capture's packet parsing (`mesh_tc_from_pod`) through
//! `BPF_PROG_TEST_RUN`, each with what the program must do with it, worked out here from the
//! frame's bytes — independently of the program's own parser:
//! - **must drop**: a source that is not the pod's (spoofed), a VLAN tag, an IP/ARP header too
//!   short to check, TCP we cannot parse safely (IPv4 fragments, a bad IHL, TCP behind IPv6
//!   extension headers, a truncated TCP header), TCP to a destination no pod may reach through
//!   the node;
//! - **must pass**: anything else from the pod's own address (parseable TCP, UDP, ICMP, ARP,
//!   ethertypes that never leave the link);
//! - **either**: IPv6 extension-header chains that end in something other than TCP (the
//!   program follows a few headers only, and refuses what it cannot follow); and a parseable
//!   SYN, because under `BPF_PROG_TEST_RUN` `bpf_sk_assign` cannot work (it needs a real tc
//!   ingress), so every SYN takes the agent-down path, where dropping a SYN it cannot turn
//!   into a RST is as good a refusal as the RST.
//!
//! [`frame_to`] and [`judge_inbound`] do the same for `mesh_tc_to_pods` (uplinks and other pods'
//! interfaces): TCP towards the enrolled pod that cannot be parsed safely must be dropped (it
//! would reach the pod around the capture); everything else passes, SYNs to the pod excepted
//! (captured — or, in the harness, dropped as with no agent).
//!
//! Shapes are biased towards the edges (the pod's address off by one bit, truncation inside a
//! header, fragment bits, link-local sources) rather than uniformly random bytes.
use std::net::{Ipv4Addr, Ipv6Addr};

/// What the program must do with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    Drop(&'static str),
    Pass,
    Either,
}

/// A small, seedable generator (xorshift64*): runs are reproducible from the printed seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        for b in &mut out {
            *b = self.next() as u8;
        }
        out
    }
}

/// The enrolled pod the frames come from.
pub struct Pod {
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;
const VLAN_TYPES: [u16; 3] = [0x8100, 0x88a8, 0x9100];
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;
/// IPv6 extension headers we generate (hop-by-hop, routing, fragment, destination options).
const EXT_HEADERS: [u8; 4] = [0, 43, 44, 60];
/// Next-header values the program treats as a chain to follow: ours plus ESP and AH.
const CHAIN_HEADERS: [u8; 6] = [0, 43, 44, 50, 51, 60];
const IPPROTO_ESP: u8 = 50;

/// One generated frame and what the program must do with it.
pub fn frame(rng: &mut Rng, pod: &Pod) -> (Vec<u8>, Expect) {
    let mut f = Vec::with_capacity(128);
    f.extend_from_slice(&rng.bytes::<12>()); // MACs: the program never reads them
    match rng.below(100) {
        0..=39 => ipv4(rng, pod, &mut f),
        40..=69 => ipv6(rng, pod, &mut f),
        70..=79 => arp(rng, pod, &mut f),
        80..=84 => {
            f.extend_from_slice(&VLAN_TYPES[rng.below(3) as usize].to_be_bytes());
            // A tagged frame carrying a perfectly good packet of the pod's.
            f.extend_from_slice(&rng.bytes::<4>());
            let (inner, _) = frame(rng, pod);
            f.extend_from_slice(&inner[12..]);
            truncate(rng, &mut f);
            return (f, Expect::Drop("VLAN tag"));
        }
        85..=92 => {
            // Ethertypes that are not IP or ARP (LLDP, 802.3 lengths, anything).
            let t = [0x88ccu16, 0x0042, 0x05dc, rng.next() as u16][rng.below(4) as usize];
            if t == ETH_P_IP || t == ETH_P_ARP || t == ETH_P_IPV6 || VLAN_TYPES.contains(&t) {
                f.extend_from_slice(&0x88ccu16.to_be_bytes());
            } else {
                f.extend_from_slice(&t.to_be_bytes());
            }
            for _ in 0..rng.below(64) {
                f.push(rng.next() as u8);
            }
            return (f, Expect::Pass);
        }
        _ => {
            // Random bytes behind an IP ethertype.
            let t = [ETH_P_IP, ETH_P_IPV6][rng.below(2) as usize];
            f.extend_from_slice(&t.to_be_bytes());
            for _ in 0..rng.below(96) {
                f.push(rng.next() as u8);
            }
            let e = judge(&f, pod);
            return (f, e);
        }
    }
    truncate(rng, &mut f);
    let e = judge(&f, pod);
    (f, e)
}

/// Sometimes cuts the frame short, often inside a header.
fn truncate(rng: &mut Rng, f: &mut Vec<u8>) {
    if rng.chance(12) {
        let keep = 14 + rng.below((f.len() - 14) as u64 + 1) as usize;
        f.truncate(keep);
    }
}

fn source4(rng: &mut Rng, pod: &Pod) -> [u8; 4] {
    let own = pod.ipv4.octets();
    match rng.below(100) {
        0..=64 => own,
        65..=79 => {
            let mut o = own;
            o[rng.below(4) as usize] ^= 1 << rng.below(8);
            o
        }
        _ => rng.bytes(),
    }
}

fn dest4(rng: &mut Rng) -> [u8; 4] {
    match rng.below(100) {
        0..=69 => [10, 244, rng.below(4) as u8, 2 + rng.below(200) as u8],
        70..=79 => [127, 0, 0, 1 + rng.below(3) as u8],
        80..=84 => [0, 0, 0, rng.below(3) as u8],
        85..=89 => [224 + rng.below(32) as u8, 0, 0, 251],
        90..=94 => [255, 255, 255, 255],
        _ => rng.bytes(),
    }
}

fn tcp_header(rng: &mut Rng, f: &mut Vec<u8>) {
    f.extend_from_slice(&(1024 + rng.below(60000) as u16).to_be_bytes());
    f.extend_from_slice(
        &[80u16, 443, 8080, 15001, 15008, rng.next() as u16][rng.below(6) as usize].to_be_bytes(),
    );
    f.extend_from_slice(&rng.bytes::<8>()); // seq, ack
    f.push(0x50); // data offset 5
    let flags = match rng.below(10) {
        0..=3 => 0x02, // SYN
        4..=7 => 0x10, // ACK
        _ => rng.next() as u8,
    };
    f.push(flags);
    f.extend_from_slice(&rng.bytes::<6>()); // window, checksum, urgent
    for _ in 0..rng.below(24) {
        f.push(rng.next() as u8);
    }
}

fn ipv4(rng: &mut Rng, pod: &Pod, f: &mut Vec<u8>) {
    f.extend_from_slice(&ETH_P_IP.to_be_bytes());
    let options = if rng.chance(8) { rng.below(4) as u8 } else { 0 };
    let ihl = if rng.chance(4) {
        rng.below(5) as u8
    } else {
        5 + options
    };
    f.push(0x40 | ihl);
    f.push(0);
    f.extend_from_slice(&[0, 60]); // total length: the program never reads it
    f.extend_from_slice(&rng.bytes::<2>());
    let frag: u16 = match rng.below(100) {
        0..=3 => 0x2000,                       // more fragments
        4..=7 => 1 + rng.below(0x1fff) as u16, // an offset
        8..=11 => 0x4000,                      // don't fragment: fine
        _ => 0,
    };
    f.extend_from_slice(&frag.to_be_bytes());
    f.push(64);
    let proto = match rng.below(10) {
        0..=7 => IPPROTO_TCP,
        8 => IPPROTO_UDP,
        _ => rng.next() as u8,
    };
    f.push(proto);
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(&source4(rng, pod));
    f.extend_from_slice(&dest4(rng));
    for _ in 0..options * 4 {
        f.push(1); // NOP options
    }
    tcp_header(rng, f);
}

fn ipv6(rng: &mut Rng, pod: &Pod, f: &mut Vec<u8>) {
    f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0, 0, 40]);
    let ext = rng.chance(12);
    let upper = match rng.below(10) {
        0..=6 => IPPROTO_TCP,
        7 | 8 => IPPROTO_ICMPV6,
        _ => IPPROTO_UDP,
    };
    let next = if ext {
        EXT_HEADERS[rng.below(4) as usize]
    } else {
        upper
    };
    f.push(next);
    f.push(64);
    let own = pod.ipv6.octets();
    let src: [u8; 16] = match rng.below(100) {
        0..=59 => own,
        60..=71 => {
            let mut o = own;
            o[rng.below(16) as usize] ^= 1 << rng.below(8);
            o
        }
        72..=81 => {
            let mut o = [0u8; 16];
            o[0] = 0xfe;
            o[1] = 0x80;
            o[8..].copy_from_slice(&rng.bytes::<8>());
            o
        }
        82..=87 => [0u8; 16],
        _ => rng.bytes(),
    };
    f.extend_from_slice(&src);
    let dst: [u8; 16] = match rng.below(100) {
        0..=69 => {
            let mut d = [0xfd, 0, 0, 0x44, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            d[15] = 2 + rng.below(200) as u8;
            d
        }
        70..=74 => Ipv6Addr::LOCALHOST.octets(),
        75..=79 => [0u8; 16],
        80..=84 => Ipv4Addr::new(127, 0, 0, 1).to_ipv6_mapped().octets(),
        85..=89 => [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        90..=94 => [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xfb],
        _ => rng.bytes(),
    };
    f.extend_from_slice(&dst);
    if ext {
        // One or two extension headers, 8 bytes each, then the upper protocol.
        let count = 1 + rng.below(2);
        for i in 0..count {
            let nh = if i + 1 == count {
                upper
            } else {
                EXT_HEADERS[rng.below(4) as usize]
            };
            f.push(nh);
            f.push(0);
            f.extend_from_slice(&rng.bytes::<6>());
        }
    }
    tcp_header(rng, f);
}

fn arp(rng: &mut Rng, pod: &Pod, f: &mut Vec<u8>) {
    f.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1 + rng.below(2) as u8]);
    f.extend_from_slice(&rng.bytes::<6>());
    f.extend_from_slice(&source4(rng, pod));
    f.extend_from_slice(&rng.bytes::<6>());
    f.extend_from_slice(&dest4(rng));
}

/// What the program must do with `f`, from its bytes alone.
pub fn judge(f: &[u8], pod: &Pod) -> Expect {
    let at = |i: usize| f.get(i).copied();
    let slice = |i: usize, n: usize| f.get(i..i + n);
    let ethertype = u16::from_be_bytes([f[12], f[13]]);
    const L3: usize = 14;
    match ethertype {
        t if VLAN_TYPES.contains(&t) => Expect::Drop("VLAN tag"),
        ETH_P_ARP => match slice(L3 + 14, 4) {
            Some(s) if s == pod.ipv4.octets() => Expect::Pass,
            Some(_) => Expect::Drop("spoofed ARP sender"),
            None => Expect::Drop("ARP too short to check"),
        },
        ETH_P_IP => {
            let Some(src) = slice(L3 + 12, 4) else {
                return Expect::Drop("IPv4 too short to check");
            };
            if src != pod.ipv4.octets() {
                return Expect::Drop("spoofed IPv4 source");
            }
            if at(L3 + 9) != Some(IPPROTO_TCP) {
                return Expect::Pass;
            }
            let frag = u16::from_be_bytes([f[L3 + 6], f[L3 + 7]]);
            if frag & 0x3fff != 0 {
                return Expect::Drop("IPv4 fragment");
            }
            let ihl = usize::from(f[L3] & 0x0f) * 4;
            if ihl < 20 {
                return Expect::Drop("IPv4 header length below 20");
            }
            let Some(dst) = slice(L3 + 16, 4) else {
                return Expect::Drop("IPv4 destination missing");
            };
            if slice(L3 + ihl, 14).is_none() {
                return Expect::Drop("TCP header truncated");
            }
            let dst = Ipv4Addr::new(dst[0], dst[1], dst[2], dst[3])
                .to_ipv6_mapped()
                .octets();
            if mesh_common::forbidden_destination(&dst, false).is_some() {
                return Expect::Drop("forbidden destination");
            }
            tcp_verdict(f[L3 + ihl + 13])
        }
        ETH_P_IPV6 => {
            let Some(src) = slice(L3 + 8, 16) else {
                return Expect::Drop("IPv6 too short to check");
            };
            let next = at(L3 + 6).expect("present when the source is");
            if src != pod.ipv6.octets() {
                let link_local = src[0] == 0xfe && src[1] & 0xc0 == 0x80;
                let unspecified = src.iter().all(|b| *b == 0);
                let icmp =
                    next == IPPROTO_ICMPV6 || (next == 0 && at(L3 + 40) == Some(IPPROTO_ICMPV6));
                if !((link_local || unspecified) && icmp) {
                    return Expect::Drop("spoofed IPv6 source");
                }
            }
            if CHAIN_HEADERS.contains(&next) {
                return if chain_hides_tcp(f) {
                    Expect::Drop("TCP (or ESP) behind IPv6 extension headers")
                } else {
                    Expect::Either
                };
            }
            if next != IPPROTO_TCP {
                return Expect::Pass;
            }
            let Some(dst) = slice(L3 + 24, 16) else {
                return Expect::Drop("IPv6 destination missing");
            };
            if slice(L3 + 40, 14).is_none() {
                return Expect::Drop("TCP header truncated");
            }
            let dst: [u8; 16] = dst.try_into().expect("16 bytes");
            if mesh_common::forbidden_destination(&dst, true).is_some() {
                return Expect::Drop("forbidden destination");
            }
            tcp_verdict(f[L3 + 40 + 13])
        }
        _ => Expect::Pass,
    }
}

/// A parseable segment from the pod to an allowed destination: passes, unless it is a new
/// connection (see the module's note on SYNs).
fn tcp_verdict(flags: u8) -> Expect {
    const SYN: u8 = 0x02;
    const RST: u8 = 0x04;
    const ACK: u8 = 0x10;
    if flags & (SYN | ACK | RST) == SYN {
        Expect::Either
    } else {
        Expect::Pass
    }
}

/// Whether an IPv6 extension-header chain visibly reaches TCP or ESP (whose payload may be
/// TCP) within the first four headers, as the program walks it.
fn chain_hides_tcp(f: &[u8]) -> bool {
    let mut next = f[14 + 6];
    let mut off = 14 + 40;
    for _ in 0..4 {
        if next == IPPROTO_TCP || next == IPPROTO_ESP {
            return true;
        }
        if !CHAIN_HEADERS.contains(&next) {
            return false;
        }
        let (Some(&nh), Some(&len)) = (f.get(off), f.get(off + 1)) else {
            return false;
        };
        off += match next {
            44 => 8,
            51 => (usize::from(len) + 2) * 4,
            _ => (usize::from(len) + 1) * 8,
        };
        next = nh;
    }
    false
}

/// A frame arriving from the network or another pod, towards `pod` more often than not.
pub fn frame_to(rng: &mut Rng, pod: &Pod) -> Vec<u8> {
    let (mut f, _) = frame(rng, pod);
    if rng.chance(60) {
        let ethertype = u16::from_be_bytes([f[12], f[13]]);
        let (at, addr): (usize, &[u8]) = match ethertype {
            ETH_P_IP => (14 + 16, &pod.ipv4.octets()),
            ETH_P_IPV6 => (14 + 24, &pod.ipv6.octets()),
            _ => return f,
        };
        // As far as the frame goes.
        for (i, b) in addr.iter().enumerate() {
            if let Some(slot) = f.get_mut(at + i) {
                *slot = *b;
            }
        }
    }
    f
}

/// What `mesh_tc_to_pods` must do with `f`, from its bytes alone.
pub fn judge_inbound(f: &[u8], pod: &Pod) -> Expect {
    let at = |i: usize| f.get(i).copied();
    let slice = |i: usize, n: usize| f.get(i..i + n);
    const L3: usize = 14;
    let ethertype = u16::from_be_bytes([f[12], f[13]]);
    // (is TCP?, parseable?, destination if readable, TCP flags if parseable)
    let (dst, parsed): (Option<bool>, Option<Option<u8>>) = match ethertype {
        ETH_P_IP => {
            let Some(proto) = at(L3 + 9) else {
                return Expect::Either;
            };
            if proto != IPPROTO_TCP {
                return Expect::Pass;
            }
            let dst = slice(L3 + 16, 4).map(|d| d == pod.ipv4.octets());
            let ihl = usize::from(f[L3] & 0x0f) * 4;
            let frag = u16::from_be_bytes([f[L3 + 6], f[L3 + 7]]);
            let ok = frag & 0x3fff == 0 && ihl >= 20 && dst.is_some();
            (dst, Some(ok.then(|| at(L3 + ihl + 13)).flatten()))
        }
        ETH_P_IPV6 => {
            let Some(next) = at(L3 + 6) else {
                return Expect::Either;
            };
            let dst = slice(L3 + 24, 16).map(|d| d == pod.ipv6.octets());
            if CHAIN_HEADERS.contains(&next) {
                return match (chain_hides_tcp(f), dst) {
                    (true, Some(true)) => Expect::Drop("unparseable TCP to the enrolled pod"),
                    (true, Some(false)) => Expect::Pass,
                    _ => Expect::Either,
                };
            }
            if next != IPPROTO_TCP {
                return Expect::Pass;
            }
            (dst, Some(dst.and(at(L3 + 40 + 13))))
        }
        _ => return Expect::Pass,
    };
    match (dst, parsed) {
        (_, None) => Expect::Pass,
        // Unparseable TCP: dropped towards the pod, none of our business otherwise.
        (Some(true), Some(None)) => Expect::Drop("unparseable TCP to the enrolled pod"),
        (Some(false), Some(None)) => Expect::Pass,
        (None, Some(None)) => Expect::Either,
        (Some(true), Some(Some(flags))) => tcp_verdict(flags),
        (_, Some(Some(_))) => Expect::Pass,
    }
}
