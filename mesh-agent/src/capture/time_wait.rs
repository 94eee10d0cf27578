//! Retiring the agent's TIME_WAIT sockets of a pod that leaves the mesh (issue #15 item 8).
//!
//! The agent closes first towards a pod whenever the far end did, so the node's namespace holds
//! its finished connections' tuples in TIME_WAIT for 60 s — where the pod's port allocator cannot
//! see them. While the pod is enrolled a colliding SYN is captured through the kernel's TIME_WAIT
//! handling (rule 3a). Once it has left, its SYNs go to the normal stack: early demux attaches the
//! TIME_WAIT socket and forwarding drops the packet, and the pod hangs on new connections for up
//! to a minute. So when a pod leaves, its TIME_WAIT sockets are destroyed (`SOCK_DESTROY` over
//! `NETLINK_SOCK_DIAG`, what `ss -K` does), and again for a while after, as its draining
//! connections finish.
use std::{
    collections::HashSet,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const TCP_TIME_WAIT: u32 = 6;
const NLMSG_HDRLEN: usize = 16;
const REQ_LEN: usize = 56;
/// `inet_diag_msg`: family, state, timer, retrans (4) + sockid (48) + 5 × u32.
const DIAG_MSG_LEN: usize = 72;

/// Destroys every TIME_WAIT TCP socket of the calling thread's namespace whose local or remote
/// address is one of `ips`; returns how many. Needs CAP_NET_ADMIN.
pub fn destroy_time_wait(ips: &HashSet<IpAddr>) -> io::Result<usize> {
    if ips.is_empty() {
        return Ok(0);
    }
    let nl = open()?;
    let mut destroyed = 0;
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        let ids = dump_time_wait(&nl, family)?;
        for id in ids.iter().filter(|id| {
            let (src, dst) = addrs(family, id);
            ips.contains(&src) || ips.contains(&dst)
        }) {
            // A socket that expired meanwhile is not an error.
            match request(&nl, SOCK_DESTROY, family, id, libc::NLM_F_ACK as u16)
                .and_then(|()| ack(&nl))
            {
                Ok(()) => destroyed += 1,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(destroyed)
}

fn open() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the descriptor is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The 48-byte `inet_diag_sockid` of every TIME_WAIT TCP socket of `family`.
fn dump_time_wait(nl: &OwnedFd, family: u8) -> io::Result<Vec<[u8; 48]>> {
    request(
        nl,
        SOCK_DIAG_BY_FAMILY,
        family,
        &[0; 48],
        libc::NLM_F_DUMP as u16,
    )?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = recv(nl, &mut buf)?;
        let mut off = 0;
        while off + NLMSG_HDRLEN <= n {
            let len = u32::from_ne_bytes(buf[off..off + 4].try_into().expect("4 bytes")) as usize;
            let ty = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().expect("2 bytes"));
            if len < NLMSG_HDRLEN || off + len > n {
                return Err(io::Error::other("malformed sock_diag reply"));
            }
            match ty {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => return Err(nl_error(&buf[off + NLMSG_HDRLEN..off + len])),
                SOCK_DIAG_BY_FAMILY if len >= NLMSG_HDRLEN + DIAG_MSG_LEN => {
                    let msg = &buf[off + NLMSG_HDRLEN..];
                    if u32::from(msg[1]) == TCP_TIME_WAIT {
                        out.push(msg[4..52].try_into().expect("48 bytes"));
                    }
                }
                _ => {}
            }
            off += (len + 3) & !3;
        }
    }
}

/// Sends an `inet_diag_req_v2` for TCP TIME_WAIT sockets with socket id `id`.
fn request(nl: &OwnedFd, ty: u16, family: u8, id: &[u8; 48], flags: u16) -> io::Result<()> {
    let mut msg = [0u8; NLMSG_HDRLEN + REQ_LEN];
    msg[0..4].copy_from_slice(&((NLMSG_HDRLEN + REQ_LEN) as u32).to_ne_bytes());
    msg[4..6].copy_from_slice(&ty.to_ne_bytes());
    msg[6..8].copy_from_slice(&(libc::NLM_F_REQUEST as u16 | flags).to_ne_bytes());
    let req = &mut msg[NLMSG_HDRLEN..];
    req[0] = family;
    req[1] = libc::IPPROTO_TCP as u8;
    req[4..8].copy_from_slice(&(1u32 << TCP_TIME_WAIT).to_ne_bytes());
    req[8..56].copy_from_slice(id);
    // SAFETY: a valid buffer of the given length; the kernel is the destination (zeroed addr).
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    let n = unsafe {
        libc::sendto(
            nl.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            &addr as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads the acknowledgement of one request.
fn ack(nl: &OwnedFd) -> io::Result<()> {
    let mut buf = [0u8; 512];
    let n = recv(nl, &mut buf)?;
    if n < NLMSG_HDRLEN + 4 {
        return Err(io::Error::other("short netlink acknowledgement"));
    }
    let ty = u16::from_ne_bytes([buf[4], buf[5]]);
    if ty != NLMSG_ERROR {
        return Err(io::Error::other("unexpected netlink reply"));
    }
    match nl_error(&buf[NLMSG_HDRLEN..n]) {
        e if e.raw_os_error() == Some(0) => Ok(()),
        e => Err(e),
    }
}

fn nl_error(payload: &[u8]) -> io::Error {
    let code = payload.get(0..4).map_or(libc::EIO, |b| {
        -i32::from_ne_bytes(b.try_into().expect("4 bytes"))
    });
    io::Error::from_raw_os_error(code)
}

fn recv(nl: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: a valid buffer of the given length.
    let n = unsafe { libc::recv(nl.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Local and remote address of a socket id (IPv4-mapped IPv6 spelled as IPv4).
fn addrs(family: u8, id: &[u8; 48]) -> (IpAddr, IpAddr) {
    let at = |o: usize| -> IpAddr {
        if family == libc::AF_INET as u8 {
            IpAddr::V4(Ipv4Addr::new(id[o], id[o + 1], id[o + 2], id[o + 3]))
        } else {
            let b: [u8; 16] = id[o..o + 16].try_into().expect("16 bytes");
            IpAddr::V6(Ipv6Addr::from(b)).to_canonical()
        }
    };
    (at(4), at(20))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real TIME_WAIT socket on the loopback is found and destroyed; others are left alone.
    #[test]
    fn destroys_only_the_named_addresses_time_wait_sockets() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP destroys_only_the_named_addresses_time_wait_sockets: needs root");
            return;
        }
        use std::{io::Read as _, net::TcpListener, net::TcpStream};
        // An address of our own: the test must not touch anyone else's sockets.
        let l = TcpListener::bind("127.93.17.5:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        let local = c.local_addr().unwrap();
        // The accepted side closes first: it holds the tuple in TIME_WAIT.
        drop(s);
        let mut c = c;
        let _ = c.read(&mut [0u8; 1]);
        drop(c);
        std::thread::sleep(std::time::Duration::from_millis(50));
        let nl = open().unwrap();
        let tuple = |id: &[u8; 48]| u16::from_be_bytes([id[2], id[3]]) == local.port();
        let held = dump_time_wait(&nl, libc::AF_INET as u8).unwrap();
        assert!(held.iter().any(tuple), "no TIME_WAIT socket for {local}");
        let other: HashSet<IpAddr> = ["127.93.17.6".parse().unwrap()].into();
        destroy_time_wait(&other).unwrap();
        let held = dump_time_wait(&nl, libc::AF_INET as u8).unwrap();
        assert!(
            held.iter().any(tuple),
            "another address's socket was destroyed"
        );
        let ours: HashSet<IpAddr> = [l.local_addr().unwrap().ip()].into();
        assert!(destroy_time_wait(&ours).unwrap() >= 1);
        let held = dump_time_wait(&nl, libc::AF_INET as u8).unwrap();
        assert!(!held.iter().any(tuple), "the TIME_WAIT socket survived");
    }
}
