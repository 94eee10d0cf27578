//! The direct (plaintext, same-node or pass-through) relay between two TCP connections.
//!
//! Each direction starts as an ordinary copy through a small buffer, which suits the many short
//! request/response connections (no pipe, no large allocation). A direction that keeps moving
//! data — more than [`SPLICE_AFTER`] bytes — switches to the kernel's `splice(2)` through a pipe
//! of its own: socket pages are moved into the pipe and from there into the other socket, so
//! the payload is never copied through userspace.
//!
//! TCP semantics are kept: a FIN half-closes the other side (the other direction goes on), an
//! error on either side ends both (the caller then resets them), and nothing is read from one
//! side faster than the other side accepts it (the pipe holds at most [`PIPE_BYTES`]).
use std::{
    io,
    net::Shutdown,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::atomic::{AtomicBool, Ordering},
};

use tokio::{io::Interest, net::TcpStream};

use super::sockets::reset;
use crate::{
    hbone::relay::reset_tcp_on_close,
    metrics::{ConnectionTelemetry, Meter, Outcome},
};

/// Copy-mode buffer of a direction.
const COPY_BUFFER: usize = 32 << 10;
/// Bytes a direction moves by copying before it switches to splice(2).
pub const SPLICE_AFTER: u64 = 512 << 10;
/// Pipe capacity asked for (the kernel rounds to pages; the default is 64 KiB).
const PIPE_BYTES: usize = 512 << 10;

/// Whether bulk directions may switch to splice(2). Off while the agent splices pod<->agent
/// hops with sockmap (`--splice`): data redirected into a sockmap socket sits in its psock
/// queue, which `read` serves but splice(2) never sees.
static KERNEL_SPLICE: AtomicBool = AtomicBool::new(true);

/// Turns the switch to splice(2) on or off for every relay started afterwards.
pub fn set_kernel_splice(on: bool) {
    KERNEL_SPLICE.store(on, Ordering::Relaxed);
}

/// Bytes moved each way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Moved {
    /// `a` -> `b`.
    pub a_to_b: u64,
    /// `b` -> `a`.
    pub b_to_a: u64,
}

/// Relays between `a` (the client's side) and `b` (the server's) until both directions have
/// seen EOF (Ok) or either failed (Err); `meter` counts a -> b as request bytes.
pub async fn relay(a: &TcpStream, b: &TcpStream, meter: &dyn Meter) -> io::Result<Moved> {
    let request = |n| meter.request(n);
    let response = |n| meter.response(n);
    let (a_to_b, b_to_a) = tokio::try_join!(one_way(a, b, &request), one_way(b, a, &response))?;
    Ok(Moved { a_to_b, b_to_a })
}

/// `src` -> `dst` until EOF on `src`, then half-closes `dst`.
async fn one_way(
    src: &TcpStream,
    dst: &TcpStream,
    meter: &(dyn Fn(u64) + Sync),
) -> io::Result<u64> {
    let mut total = 0u64;
    let mut buf = vec![0u8; COPY_BUFFER];
    while total < SPLICE_AFTER {
        let n = read_some(src, &mut buf).await?;
        if n == 0 {
            return finish(dst, total);
        }
        write_all(dst, &buf[..n]).await?;
        total += n as u64;
        meter(n as u64);
    }
    if !KERNEL_SPLICE.load(Ordering::Relaxed) {
        return copy_until_eof(src, dst, total, meter).await;
    }
    drop(buf);
    match Pipe::new() {
        Ok(pipe) => splice_until_eof(src, dst, &pipe, total, meter).await,
        // Out of file descriptors or pipe memory: keep copying.
        Err(_) => copy_until_eof(src, dst, total, meter).await,
    }
}

async fn copy_until_eof(
    src: &TcpStream,
    dst: &TcpStream,
    mut total: u64,
    meter: &(dyn Fn(u64) + Sync),
) -> io::Result<u64> {
    let mut buf = vec![0u8; COPY_BUFFER];
    loop {
        let n = read_some(src, &mut buf).await?;
        if n == 0 {
            return finish(dst, total);
        }
        write_all(dst, &buf[..n]).await?;
        total += n as u64;
        meter(n as u64);
    }
}

async fn splice_until_eof(
    src: &TcpStream,
    dst: &TcpStream,
    pipe: &Pipe,
    mut total: u64,
    meter: &(dyn Fn(u64) + Sync),
) -> io::Result<u64> {
    let (src_fd, dst_fd) = (src.as_raw_fd(), dst.as_raw_fd());
    let mut in_pipe = 0usize;
    let mut eof = false;
    loop {
        // (A zero-length splice would read as EOF: only fill a pipe with room.)
        if !eof && in_pipe < pipe.capacity {
            let filled = if in_pipe == 0 {
                // With the pipe empty, EAGAIN can only mean the socket is empty: let tokio
                // clear the socket's readiness so that we wait for the next data.
                src.try_io(Interest::READABLE, || {
                    splice(src_fd, pipe.write.as_raw_fd(), pipe.capacity)
                })
            } else {
                // EAGAIN here may also mean the pipe is full: leave readiness alone and drain.
                splice(src_fd, pipe.write.as_raw_fd(), pipe.capacity - in_pipe)
            };
            match filled {
                Ok(0) => eof = true,
                Ok(n) => in_pipe += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if in_pipe == 0 {
                        src.readable().await?;
                        continue;
                    }
                }
                Err(e) => return Err(e),
            }
        }
        if in_pipe > 0 {
            match dst.try_io(Interest::WRITABLE, || {
                splice(pipe.read.as_raw_fd(), dst_fd, in_pipe)
            }) {
                Ok(n) => {
                    in_pipe -= n;
                    total += n as u64;
                    meter(n as u64);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => dst.writable().await?,
                Err(e) => return Err(e),
            }
        } else if eof {
            return finish(dst, total);
        }
    }
}

async fn read_some(src: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match src.try_read(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => src.readable().await?,
            other => return other,
        }
    }
}

async fn write_all(dst: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match dst.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => dst.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// EOF from the source: FIN to the destination (its other direction goes on).
fn finish(dst: &TcpStream, total: u64) -> io::Result<u64> {
    match socket2::SockRef::from(dst).shutdown(Shutdown::Write) {
        // The peer already closed both ways: nothing left to tell it.
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(total),
        Err(e) => Err(e),
        Ok(()) => Ok(total),
    }
}

/// One non-blocking splice(2) of up to `len` bytes.
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain syscall on descriptors we own; null offsets (sockets and pipes have none).
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// A non-blocking pipe, closed on drop.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 fills the two descriptors on success; we take ownership at once.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned by nothing else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl on our own pipe; a refusal (pipe-max-size, memory) keeps the default.
        let size = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_BYTES as i32) };
        // SAFETY: as above.
        let size = if size > 0 {
            size
        } else {
            unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) }
        };
        Ok(Self {
            read,
            write,
            capacity: usize::try_from(size).unwrap_or(64 << 10).max(4096),
        })
    }
}

/// Relays both ways until both sides are done (half-closes propagate; bulk transfers move by
/// splice(2), see this module); a reset on either side resets both, and so does `stop` (a
/// policy change revoked the connection). `meter` counts the bytes as they move.
pub(super) async fn splice_tcp(
    inbound: TcpStream,
    upstream: TcpStream,
    meter: &dyn Meter,
    stop: impl std::future::Future<Output = ()>,
) -> Result<Moved, String> {
    let _ = inbound.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    // Until both directions are done, any close is a reset (the agent's death included): an
    // application never mistakes a truncated transfer for a clean end.
    for s in [&inbound, &upstream] {
        reset_tcp_on_close(s, true);
    }
    let moved = tokio::select! {
        r = relay(&inbound, &upstream, meter) => r,
        () = stop => Err(std::io::Error::other("revoked by a policy change")),
    };
    match moved {
        Ok(m) => {
            for s in [&inbound, &upstream] {
                reset_tcp_on_close(s, false);
            }
            Ok(m)
        }
        Err(e) => {
            reset(inbound);
            reset(upstream);
            Err(e.to_string())
        }
    }
}

/// Closes a connection's telemetry after [`splice_tcp`].
pub(super) fn closed(
    telemetry: impl IntoIterator<Item = ConnectionTelemetry>,
    result: &Result<Moved, String>,
) {
    for t in telemetry {
        match result {
            Ok(_) => t.close(Outcome::Closed),
            Err(why) => t.close(Outcome::Reset(why)),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A connected pair of loopback streams.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// client <-> (a | relay | b) <-> server, both directions at once, sizes below and far
    /// above the switch to splice.
    #[tokio::test]
    async fn both_directions_arrive_intact_and_half_closes_propagate() {
        for size in [0usize, 1, 100_000, 8 << 20] {
            let (mut client, a) = pair().await;
            let (b, mut server) = pair().await;
            let relay = tokio::spawn(async move { relay(&a, &b, &crate::metrics::NoMeter).await });
            let up = pattern(size);
            let down: Vec<u8> = pattern(size + 3).into_iter().rev().collect();
            let (up2, down2) = (up.clone(), down.clone());
            let server_side = tokio::spawn(async move {
                let mut got = Vec::new();
                let (mut r, mut w) = server.split();
                let (read, write) = tokio::join!(r.read_to_end(&mut got), async {
                    w.write_all(&down2).await?;
                    w.shutdown().await
                });
                read.unwrap();
                write.unwrap();
                got
            });
            let (mut r, mut w) = client.split();
            let mut got = Vec::new();
            let (read, write) = tokio::join!(r.read_to_end(&mut got), async {
                w.write_all(&up2).await?;
                w.shutdown().await
            });
            if let Err(e) = read {
                panic!("client read, {size} bytes: {e}; relay: {:?}", relay.await);
            }
            write.unwrap_or_else(|e| panic!("client write, {size} bytes: {e}"));
            assert_eq!(got, down, "server -> client, {size} bytes");
            assert_eq!(
                server_side.await.unwrap(),
                up,
                "client -> server, {size} bytes"
            );
            let moved = relay.await.unwrap().unwrap();
            assert_eq!(moved.a_to_b, size as u64);
            assert_eq!(moved.b_to_a, size as u64 + 3);
        }
    }

    #[tokio::test]
    async fn a_reset_ends_the_relay_with_an_error() {
        let (client, a) = pair().await;
        let (b, _server) = pair().await;
        let relay = tokio::spawn(async move { relay(&a, &b, &crate::metrics::NoMeter).await });
        socket2::SockRef::from(&client)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        drop(client);
        assert!(relay.await.unwrap().is_err());
    }

    #[tokio::test]
    async fn a_slow_reader_holds_the_sender_back() {
        // Nothing reads the server side: the relay may hold at most a pipe and two socket
        // buffers, so a large write from the client cannot complete.
        let (mut client, a) = pair().await;
        let (b, _server) = pair().await;
        let _relay = tokio::spawn(async move { relay(&a, &b, &crate::metrics::NoMeter).await });
        let big = vec![1u8; 64 << 20];
        let sent = tokio::time::timeout(std::time::Duration::from_secs(2), client.write_all(&big));
        assert!(sent.await.is_err(), "64 MiB vanished into the relay");
    }
}
