//! The agent's capture listeners: one IP_TRANSPARENT socket per kind and family, bound to the
//! wildcard address. The tc programs assign captured SYNs to them with `bpf_sk_assign`; because the
//! socket is transparent, the connection TCP creates keeps the original destination as its local
//! address, so `local_addr()` of an accepted stream *is* the original destination.
//!
//! The data path finds the listeners in `MESH_LISTENERS`, not by port, so the port a listener is
//! bound to is only a label: each binds its kind's well-known port (15001/15006/15008) and, when
//! the agent it is taking over from still holds that port (an upgrade, see `handover.rs`), an
//! ephemeral one.
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::Context as _;
use mesh_common::FlowKind;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// A bound capture listener and what it receives.
pub struct CaptureListener {
    pub kind: FlowKind,
    pub listener: TcpListener,
}

/// Binds the transparent listeners for `kinds`, IPv4 and IPv6 each. Must run inside a tokio
/// runtime, in the node's network namespace, with CAP_NET_ADMIN (IP_TRANSPARENT).
pub fn bind_all(kinds: &[FlowKind], backlog: i32) -> anyhow::Result<Vec<CaptureListener>> {
    let mut out = Vec::new();
    for &kind in kinds {
        for ip in [
            std::net::IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            std::net::IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        ] {
            let addr = SocketAddr::new(ip, kind.port());
            let listener = match bind_transparent(addr, backlog) {
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    let listener = bind_transparent(SocketAddr::new(ip, 0), backlog)
                        .with_context(|| format!("binding the {kind:?} capture listener"))?;
                    tracing::info!(listener = ?kind, wanted = %addr, bound = ?listener.local_addr().ok(),
                        "capture port held by the agent being replaced; listening on another (the data path steers by socket, not port)");
                    listener
                }
                other => other
                    .with_context(|| format!("binding the {kind:?} capture listener on {addr}"))?,
            };
            out.push(CaptureListener { kind, listener });
        }
    }
    Ok(out)
}

/// A non-blocking IP_TRANSPARENT TCP socket of `addr`'s family, bound to `addr`.
fn transparent_socket(addr: SocketAddr, listener: bool) -> std::io::Result<Socket> {
    // Non-blocking from the start: one system call fewer per connection than setting it after.
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    if addr.is_ipv6() {
        if listener {
            // One socket per family keeps the kernel's listener lookup from the tc program exact.
            socket.set_only_v6(true)?;
        }
        socket.set_ip_transparent_v6(true)?;
    } else {
        socket.set_ip_transparent_v4(true)?;
    }
    if listener {
        socket.set_reuse_address(true)?;
    } else {
        bind_address_no_port(&socket)?;
    }
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// IP_BIND_ADDRESS_NO_PORT: the source port of a transparent connection is chosen at connect
/// time for the full 4-tuple (as for an unbound socket), not at bind time for (address, port).
/// Binding a port first would make every port that ever carried a connection from this client
/// address unusable for its TIME_WAIT period — about 470 new connections per second per client
/// address — and would ignore which tuples this namespace still holds in TIME_WAIT.
fn bind_address_no_port(socket: &Socket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: valid socket fd and an int option of the advertised size. The option is at the
    // IPPROTO_IP level for IPv6 sockets too.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn bind_transparent(addr: SocketAddr, backlog: i32) -> std::io::Result<TcpListener> {
    let socket = transparent_socket(addr, true)?;
    socket.listen(backlog)?;
    TcpListener::from_std(socket.into())
}

/// Connects to `dst` with `src_ip` as the source address (transparent: `src_ip` is the original
/// client's, not ours), so the destination and its NetworkPolicy see the real peer. The kernel
/// picks the source port at connect time. Replies come back to this socket because the capture programs steer
/// packets of connections a local socket owns.
pub async fn connect_transparent(
    src_ip: std::net::IpAddr,
    dst: SocketAddr,
) -> std::io::Result<TcpStream> {
    let socket = transparent_socket(SocketAddr::new(src_ip, 0), false)?;
    let std_stream: std::net::TcpStream = socket.into();
    TcpSocket::from_std_stream(std_stream).connect(dst).await
}
