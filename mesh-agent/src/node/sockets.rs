//! Socket helpers the connection flows share (a leaf: it calls nothing of the flows): opening
//! the upstream connection on a pod's behalf, refusing with a reset, address spelling.
//!
//! Every connect the agent makes for a pod passes [`connect_direct`]'s checks first, whatever
//! the capture already dropped: a destination no pod may reach through the node (see
//! [`mesh_common::destination`]), the agent's own ports on the node's addresses, and the node's
//! addresses outside a Service are refused before any socket is made.
use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use mesh_common::{capture::is_agent_port, forbidden_destination};
use tokio::net::TcpStream;

use crate::{capture::listeners::connect_transparent, ebpf::ip_key};

/// How the destination of an upstream connection was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Upstream {
    /// The address the client dialled.
    Dialled,
    /// An endpoint of the Service the client dialled (the Service's own choice of backend).
    ServiceEndpoint,
}

/// Why the agent will not connect to a destination on a pod's behalf.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refused {
    #[error("destination {0} is never reachable from a pod ({1})")]
    Forbidden(IpAddr, &'static str),
    #[error("destination {0} is the agent's own port on this node")]
    AgentPort(SocketAddr),
    #[error(
        "destination {0} is this node's own address: pods reach the node directly, not through the agent"
    )]
    NodeAddress(SocketAddr),
}

impl From<Refused> for std::io::Error {
    fn from(r: Refused) -> Self {
        std::io::Error::new(std::io::ErrorKind::PermissionDenied, r.to_string())
    }
}

/// The checks of [`connect_direct`], apart: `local` is whether `dst` is an address of this node.
pub fn refusal(dst: SocketAddr, local: bool, how: Upstream) -> Result<(), Refused> {
    let ip = dst.ip().to_canonical();
    if let Some(why) = forbidden_destination(&ip_key(ip), ip.is_ipv6()) {
        return Err(Refused::Forbidden(ip, why.name()));
    }
    if local && is_agent_port(dst.port()) {
        return Err(Refused::AgentPort(dst));
    }
    // The capture leaves a pod's connections to the node's addresses to the node's stack, so
    // one reaching us was not meant to: relaying it would present the pod as the node to host
    // services. A Service endpoint on the node (a host-network backend) is the Service's
    // choice and is reached from the node's address (replies to a pod's address would be
    // routed to the pod, not to us).
    if local && how == Upstream::Dialled {
        return Err(Refused::NodeAddress(dst));
    }
    Ok(())
}

/// Connects to `dst` on behalf of `client`: transparently from the client's address, except for
/// a Service endpoint on this node, which is reached from the node's address. Refuses what
/// [`refusal`] refuses.
pub async fn connect_direct(
    client: SocketAddr,
    dst: SocketAddr,
    how: Upstream,
) -> std::io::Result<TcpStream> {
    let local = is_local_address(dst.ip());
    refusal(dst, local, how)?;
    let connect = tokio::time::timeout(Duration::from_secs(10), async {
        if local {
            TcpStream::connect(dst).await
        } else {
            connect_transparent(client.ip(), dst).await
        }
    });
    connect
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}

/// Per-attempt bounds of [`connect_soon`]: each new attempt sends a fresh SYN at once instead of
/// waiting out the kernel's SYN back-off (after `tcp_syn_linear_timeouts` 1 s steps: 2 s, 4 s,
/// 8 s ...), so a connection started while
/// the peer's agent was down goes through within a second of its return (an agent restart takes
/// seconds). About 30 s in all, then the connect fails (the kernel alone would try for two
/// minutes).
const CONNECT_ATTEMPTS: [Duration; 3] = [
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
];
/// How many attempts of the last bound [`connect_soon`] makes after the first ones.
const CONNECT_LAST_REPEATS: usize = 28;

/// A transparent connect from `client_ip` to `dst` retried on silence (dropped SYNs: the peer's
/// agent restarting fails closed by dropping them); a definite answer (refused, unreachable)
/// ends it at once. Used for HBONE dials and deliveries to pods.
pub async fn connect_soon(client_ip: IpAddr, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let last = CONNECT_ATTEMPTS[CONNECT_ATTEMPTS.len() - 1];
    let bounds = CONNECT_ATTEMPTS
        .into_iter()
        .chain(std::iter::repeat_n(last, CONNECT_LAST_REPEATS));
    let mut attempts = 0;
    for bound in bounds {
        attempts += 1;
        if let Ok(result) = tokio::time::timeout(bound, connect_transparent(client_ip, dst)).await {
            return result;
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("no answer from {dst} in {attempts} attempts"),
    ))
}

/// What `tcp` has received and nobody read yet, at most `max` bytes, without waiting: empty if
/// nothing has arrived or the peer has closed (a later read sees the end again). Read past
/// tokio's readiness, which a socket just accepted does not have yet.
pub fn read_ready(tcp: &TcpStream, max: usize) -> std::io::Result<bytes::Bytes> {
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); crate::hbone::EARLY_DATA_MAX];
    let buf = &mut buf[..max.min(crate::hbone::EARLY_DATA_MAX)];
    match socket2::SockRef::from(tcp).recv_with_flags(buf, libc::MSG_DONTWAIT) {
        // SAFETY: recv initialised the first `n` bytes.
        Ok(n) => Ok(bytes::Bytes::copy_from_slice(unsafe {
            std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n)
        })),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(bytes::Bytes::new()),
        Err(e) => Err(e),
    }
}

/// Whether `ip` is an address of this node (binding to it without IP_TRANSPARENT succeeds).
/// With `net.ipv4.ip_nonlocal_bind=1` every address looks local: pods' connections relayed by
/// the agent are then refused as node addresses (fail closed).
fn is_local_address(ip: IpAddr) -> bool {
    let domain = socket2::Domain::for_address(SocketAddr::new(ip, 0));
    socket2::Socket::new(domain, socket2::Type::STREAM, None)
        .and_then(|s| s.bind(&SocketAddr::new(ip, 0).into()))
        .is_ok()
}

/// Closes with a RST (SO_LINGER 0) so the client sees a refusal, not a clean end of stream.
pub fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// IPv4 peers of a dual-stack socket appear as `::ffff:a.b.c.d`; we speak plain IPv4.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v4_mapped_peers_become_ipv4() {
        assert_eq!(canonical(sa("[::ffff:10.1.2.3]:80")), sa("10.1.2.3:80"));
    }

    /// Every spelling of the node's loopback and "this host" is refused before any socket is
    /// made, whether or not the address looks local.
    #[test]
    fn refuses_every_form_of_the_nodes_loopback() {
        for dst in [
            "0.0.0.0:15000",
            "0.1.2.3:80",
            "127.0.0.1:15000",
            "127.8.9.10:22",
            "[::]:15000",
            "[::1]:15000",
            "[::ffff:127.0.0.1]:15000",
            "[::ffff:0.0.0.0]:15000",
            "[::127.0.0.1]:15000",
            "[ff02::1]:80",
            "224.0.0.1:80",
            "255.255.255.255:80",
            "[fe80::1]:80",
        ] {
            for local in [false, true] {
                for how in [Upstream::Dialled, Upstream::ServiceEndpoint] {
                    assert!(
                        matches!(refusal(sa(dst), local, how), Err(Refused::Forbidden(..))),
                        "{dst} local={local} {how:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn node_addresses_only_through_a_service_and_never_on_agent_ports() {
        let node = sa("10.0.0.1:8080");
        assert_eq!(
            refusal(node, true, Upstream::Dialled),
            Err(Refused::NodeAddress(node))
        );
        assert_eq!(refusal(node, true, Upstream::ServiceEndpoint), Ok(()));
        for port in [15000, 15001, 15006, 15008, 15053] {
            let admin = SocketAddr::new(node.ip(), port);
            for how in [Upstream::Dialled, Upstream::ServiceEndpoint] {
                assert_eq!(refusal(admin, true, how), Err(Refused::AgentPort(admin)));
            }
        }
        // Metrics and readiness stay reachable through a Service (Prometheus may be a pod).
        assert_eq!(
            refusal(sa("10.0.0.1:15020"), true, Upstream::ServiceEndpoint),
            Ok(())
        );
        // Remote destinations: any port.
        assert_eq!(
            refusal(sa("10.244.2.5:15000"), false, Upstream::Dialled),
            Ok(())
        );
    }

    /// What has arrived, at most `max` at a time, never waiting; the end of the stream reads as
    /// empty, a reset as the error it is (a later read would no longer report it).
    #[tokio::test]
    async fn read_ready_takes_what_has_arrived_without_waiting() {
        use tokio::io::AsyncWriteExt as _;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        assert!(read_ready(&s, 16).unwrap().is_empty(), "nothing sent yet");
        c.write_all(b"0123456789abcdefXYZ").await.unwrap();
        s.readable().await.unwrap();
        assert_eq!(&read_ready(&s, 16).unwrap()[..], b"0123456789abcdef");
        assert_eq!(&read_ready(&s, 16).unwrap()[..], b"XYZ");
        c.shutdown().await.unwrap();
        s.readable().await.unwrap();
        assert!(read_ready(&s, 16).unwrap().is_empty(), "end of stream");

        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        reset(c);
        s.readable().await.unwrap();
        let e = read_ready(&s, 16).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    }

    /// The real check, end to end in this process: `::` and `0.0.0.0` are refused without a
    /// connection being attempted (a listener on the loopback never sees one).
    #[tokio::test]
    async fn connect_direct_never_reaches_the_loopback() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        for dst in [
            SocketAddr::new("0.0.0.0".parse().unwrap(), port),
            SocketAddr::new("127.0.0.1".parse().unwrap(), port),
            SocketAddr::new("::ffff:127.0.0.1".parse().unwrap(), port),
        ] {
            let e = connect_direct(sa("10.244.1.2:5555"), dst, Upstream::Dialled)
                .await
                .unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{dst}: {e}");
        }
        let accepted = tokio::time::timeout(Duration::from_millis(100), l.accept()).await;
        assert!(accepted.is_err(), "a refused destination was connected to");
    }
}
