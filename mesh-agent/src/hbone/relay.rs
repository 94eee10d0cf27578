//! Moving bytes between a TCP connection and one HTTP/2 stream with TCP's semantics: each
//! direction half-closes on its own (TCP FIN <-> END_STREAM), a reset on either side resets the
//! other (RST <-> RST_STREAM), and nothing is buffered beyond one read: HTTP/2 flow control
//! (capacity granted by the peer, released as we write) gives backpressure end to end.
use std::{future::poll_fn, task::Poll};

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};

/// Largest chunk read from TCP and sent as one DATA frame payload.
const CHUNK: usize = 256 << 10;

/// Bytes moved in each direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Moved {
    /// TCP -> stream.
    pub sent: u64,
    /// stream -> TCP.
    pub received: u64,
}

/// How the relay ended.
#[derive(Debug)]
pub enum RelayEnd {
    /// Both directions finished with a clean close.
    Closed(Moved),
    /// One side reset (or failed); the other was reset too.
    Reset(Moved, String),
}

/// Relays until both directions are done.
pub async fn relay(tcp: TcpStream, send: SendStream<Bytes>, recv: RecvStream) -> RelayEnd {
    let _ = tcp.set_nodelay(true);
    let (r, w) = tcp.into_split();
    let (up, down) = tokio::join!(tcp_to_stream(r, send), stream_to_tcp(recv, w));
    let moved = Moved {
        sent: up.as_ref().map_or_else(|(n, _)| *n, |n| *n),
        received: down.as_ref().map_or_else(|(n, _)| *n, |n| *n),
    };
    match (up, down) {
        (Ok(_), Ok(_)) => RelayEnd::Closed(moved),
        (Err((_, e)), _) | (_, Err((_, e))) => RelayEnd::Reset(moved, e),
    }
}

async fn tcp_to_stream(
    mut r: OwnedReadHalf,
    mut send: SendStream<Bytes>,
) -> Result<u64, (u64, String)> {
    let mut total = 0u64;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let read = tokio::select! {
            read = r.read(&mut buf) => read,
            reason = poll_fn(|cx| send.poll_reset(cx)) => {
                return Err((total, format!("peer reset the stream: {reason:?}")));
            }
        };
        let n = match read {
            Ok(0) => {
                // TCP FIN -> END_STREAM.
                let _ = send.send_data(Bytes::new(), true);
                return Ok(total);
            }
            Ok(n) => n,
            Err(e) => {
                // TCP RST (or failure) -> RST_STREAM.
                send.send_reset(Reason::CANCEL);
                return Err((total, format!("tcp: {e}")));
            }
        };
        // Only what we hold is reserved (reserving ahead would let idle streams starve busy
        // ones of the connection window), and nothing more is read until it is sent:
        // backpressure.
        let mut off = 0;
        while off < n {
            send.reserve_capacity(n - off);
            let wake = poll_fn(|cx| {
                if let Poll::Ready(reason) = send.poll_reset(cx) {
                    return Poll::Ready(Err(reason));
                }
                send.poll_capacity(cx).map(Ok)
            })
            .await;
            let granted = match wake {
                Ok(Some(Ok(0))) => continue,
                Ok(Some(Ok(g))) => g,
                Ok(Some(Err(e))) => return Err((total, format!("stream: {e}"))),
                Ok(None) => return Err((total, "stream closed".into())),
                Err(reason) => return Err((total, format!("peer reset the stream: {reason:?}"))),
            };
            let k = granted.min(n - off);
            send.send_data(Bytes::copy_from_slice(&buf[off..off + k]), false)
                .map_err(|e| (total, format!("stream: {e}")))?;
            off += k;
            total += k as u64;
        }
    }
}

async fn stream_to_tcp(mut recv: RecvStream, mut w: OwnedWriteHalf) -> Result<u64, (u64, String)> {
    let mut total = 0u64;
    while let Some(chunk) = recv.data().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                // RST_STREAM (or connection loss) -> TCP RST. `forget` keeps the write half from
                // sending a FIN when dropped, so the close is the reset alone.
                reset_tcp(&w);
                w.forget();
                return Err((total, format!("stream: {e}")));
            }
        };
        let n = chunk.len();
        if let Err(e) = w.write_all(&chunk).await {
            return Err((total, format!("tcp: {e}")));
        }
        total += n as u64;
        let _ = recv.flow_control().release_capacity(n);
    }
    // END_STREAM -> TCP FIN.
    let _ = w.shutdown().await;
    Ok(total)
}

/// Makes the eventual close of the TCP socket a RST (SO_LINGER 0).
fn reset_tcp(w: &OwnedWriteHalf) {
    let _ = socket2::SockRef::from(w.as_ref()).set_linger(Some(std::time::Duration::ZERO));
}
