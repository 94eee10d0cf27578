//! Hand-made TCP segments from inside a pod, as a hostile pod with CAP_NET_RAW sends them: an
//! `AF_PACKET` socket on the pod's interface writes whole Ethernet frames, so the destination
//! can be anything (`::`, `127.0.0.1`, a multicast group), which a normal `connect()` would keep
//! on the pod's own loopback. Replies are read from the same socket.
use std::{
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::Place;

const ETH_P_ALL: u16 = 0x0003;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const PACKET_OUTGOING: u8 = 4;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// An `AF_PACKET` socket bound to one interface of a place.
pub struct RawTcp {
    fd: OwnedFd,
    ifindex: i32,
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
}

/// The MAC address of `iface` in `place`, from `ip -o link`.
pub fn mac_of(place: &Place, iface: &str) -> Result<[u8; 6]> {
    let out = place.run("ip", &["-o", "link", "show", "dev", iface])?;
    let text = out
        .split("link/ether ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .with_context(|| format!("no MAC in: {out}"))?;
    let mut mac = [0u8; 6];
    for (i, part) in text.split(':').enumerate().take(6) {
        mac[i] = u8::from_str_radix(part, 16).with_context(|| format!("MAC {text}"))?;
    }
    Ok(mac)
}

impl RawTcp {
    /// A raw socket on `iface` of `place`, framing towards `dst_mac` (the node's side of the
    /// pod's link).
    pub fn open(place: &Place, iface: &str, dst_mac: [u8; 6]) -> Result<Self> {
        let src_mac = mac_of(place, iface)?;
        let iface_c = std::ffi::CString::new(iface)?;
        let (fd, ifindex) = place.in_netns(|| -> Result<(OwnedFd, i32)> {
            // SAFETY: plain syscalls; the descriptor is owned right away.
            let raw = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    i32::from(ETH_P_ALL.to_be()),
                )
            };
            if raw < 0 {
                bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
            }
            // SAFETY: `raw` is a fresh descriptor nobody else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: NUL-terminated name.
            let ifindex = unsafe { libc::if_nametoindex(iface_c.as_ptr()) } as i32;
            if ifindex == 0 {
                bail!("no interface {:?}", iface_c);
            }
            // SAFETY: zeroed sockaddr_ll filled with valid values.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = ETH_P_ALL.to_be();
            sll.sll_ifindex = ifindex;
            // SAFETY: sll is a valid sockaddr_ll of the given size.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    &sll as *const _ as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if rc < 0 {
                bail!("bind AF_PACKET: {}", std::io::Error::last_os_error());
            }
            Ok((fd, ifindex))
        })??;
        Ok(Self {
            fd,
            ifindex,
            src_mac,
            dst_mac,
        })
    }

    /// Sends one SYN from `src` to `dst` (same family; an IPv6 `dst` may be any spelling,
    /// `::ffff:127.0.0.1` included).
    pub fn send_syn(&self, src: SocketAddr, dst: SocketAddr) -> Result<()> {
        let frame = syn_frame(self.src_mac, self.dst_mac, src, dst, 0x1000_0000)?;
        // SAFETY: zeroed sockaddr_ll filled with valid values; frame outlives the call.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = self.ifindex;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&self.dst_mac);
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                &sll as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n < 0 {
            bail!("sendto: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// The TCP flags of the first segment that answers a SYN from `src` to `dst` (any segment
    /// from `dst`'s port to `src`'s port, whatever its addresses), within `timeout`.
    pub fn reply(&self, src: SocketAddr, dst: SocketAddr, timeout: Duration) -> Option<u8> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 2048];
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let rc = unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) };
            if rc <= 0 {
                return None;
            }
            // SAFETY: zeroed sockaddr_ll receives the packet's metadata.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    &mut sll as *mut _ as *mut libc::sockaddr,
                    &mut len,
                )
            };
            if n <= 0 || sll.sll_pkttype == PACKET_OUTGOING {
                continue;
            }
            if let Some((sport, dport, flags)) = tcp_ports(&buf[..n as usize])
                && sport == dst.port()
                && dport == src.port()
            {
                return Some(flags);
            }
        }
    }
}

/// (source port, destination port, flags) of a TCP-in-IP Ethernet frame.
fn tcp_ports(frame: &[u8]) -> Option<(u16, u16, u8)> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let l4 = match ethertype {
        ETH_P_IP if frame.get(23) == Some(&6) => 14 + usize::from(frame.get(14)? & 0x0f) * 4,
        ETH_P_IPV6 if frame.get(20) == Some(&6) => 14 + 40,
        _ => return None,
    };
    let t = frame.get(l4..l4 + 14)?;
    Some((
        u16::from_be_bytes([t[0], t[1]]),
        u16::from_be_bytes([t[2], t[3]]),
        t[13],
    ))
}

/// An Ethernet frame holding an IPv4 or IPv6 SYN with correct checksums.
pub fn syn_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: SocketAddr,
    dst: SocketAddr,
    seq: u32,
) -> Result<Vec<u8>> {
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&src.port().to_be_bytes());
    tcp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = TCP_SYN;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut frame = Vec::with_capacity(80);
    frame.extend_from_slice(&dst_mac);
    frame.extend_from_slice(&src_mac);
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            frame.extend_from_slice(&ETH_P_IP.to_be_bytes());
            let mut ip = vec![0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&40u16.to_be_bytes());
            ip[8] = 64;
            ip[9] = 6;
            ip[12..16].copy_from_slice(&s.octets());
            ip[16..20].copy_from_slice(&d.octets());
            let c = checksum(&[&ip]);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            let mut pseudo = Vec::new();
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, 6, 0, 20]);
            let c = checksum(&[&pseudo, &tcp]);
            tcp[16..18].copy_from_slice(&c.to_be_bytes());
            frame.extend_from_slice(&ip);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            frame.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
            let mut ip = vec![0u8; 40];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&20u16.to_be_bytes());
            ip[6] = 6;
            ip[7] = 64;
            ip[8..24].copy_from_slice(&s.octets());
            ip[24..40].copy_from_slice(&d.octets());
            let mut pseudo = Vec::new();
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, 0, 0, 20, 0, 0, 0, 6]);
            let c = checksum(&[&pseudo, &tcp]);
            tcp[16..18].copy_from_slice(&c.to_be_bytes());
            frame.extend_from_slice(&ip);
        }
        _ => bail!("{src} and {dst} are of different families"),
    }
    frame.extend_from_slice(&tcp);
    Ok(frame)
}

/// The Internet checksum of the concatenated parts (each of even length but the last).
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum = 0u32;
    for part in parts {
        for pair in part.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 1071's example words sum to 0xddf2; the checksum is its complement.
    #[test]
    fn checksum_matches_rfc1071() {
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&[&data]), !0xddf2);
    }

    #[test]
    fn frames_parse_back() {
        let src: SocketAddr = "[fd00::2]:40000".parse().unwrap();
        let dst: SocketAddr = "[::]:15000".parse().unwrap();
        let f = syn_frame([2; 6], [4; 6], src, dst, 1).unwrap();
        assert_eq!(tcp_ports(&f), Some((40000, 15000, TCP_SYN)));
        let src: SocketAddr = "10.0.0.2:40000".parse().unwrap();
        let dst: SocketAddr = "127.0.0.1:15000".parse().unwrap();
        let f = syn_frame([2; 6], [4; 6], src, dst, 1).unwrap();
        assert_eq!(tcp_ports(&f), Some((40000, 15000, TCP_SYN)));
        // A valid IPv4 header sums to zero.
        assert_eq!(checksum(&[&f[14..34]]), 0);
    }
}
