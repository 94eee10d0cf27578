//! Moving bytes between a TCP connection and one HTTP/2 stream with TCP's semantics: each
//! direction half-closes on its own (TCP FIN <-> END_STREAM), a reset on either side resets the
//! other (RST <-> RST_STREAM), and nothing is buffered beyond one read: HTTP/2 flow control
//! (capacity granted by the peer, released as we write) gives backpressure end to end.
use std::{future::poll_fn, task::Poll};

use crate::metrics::Meter;
use bytes::{Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};

/// Largest chunk read from TCP and sent as one DATA frame payload.
const CHUNK: usize = 64 << 10;
/// First read buffer of a connection (see `tcp_to_stream`).
const FIRST_CHUNK: usize = 16 << 10;

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

/// Which end of the proxied connection the TCP side is, so bytes are metered in Istio's
/// directions (request = client to server).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpSide {
    /// The client's connection (the source agent): TCP -> stream is the request.
    Client,
    /// The connection to the server (the destination agent): TCP -> stream is the response.
    Server,
}

/// Relays until both directions are done.
pub async fn relay(
    tcp: TcpStream,
    send: SendStream<Bytes>,
    recv: RecvStream,
    meter: (&dyn Meter, TcpSide),
) -> RelayEnd {
    relay_until(tcp, send, recv, meter, std::future::pending()).await
}

/// [`relay`], unless `stop` resolves first (a policy change revoked the connection): then both
/// sides are reset, the TCP connection with a RST and the stream with RST_STREAM.
pub async fn relay_until(
    tcp: TcpStream,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    (meter, side): (&dyn Meter, TcpSide),
    stop: impl std::future::Future<Output = ()>,
) -> RelayEnd {
    let up = |n: u64| match side {
        TcpSide::Client => meter.request(n),
        TcpSide::Server => meter.response(n),
    };
    let down = |n: u64| match side {
        TcpSide::Client => meter.response(n),
        TcpSide::Server => meter.request(n),
    };
    let _ = tcp.set_nodelay(true);
    // Until the relay ends cleanly, any close is a reset — the agent's death included, so an
    // application never mistakes a truncated transfer for a clean end.
    reset_tcp_on_close(&tcp, true);
    let (mut r, mut w) = tcp.into_split();
    let mut moved = Moved::default();
    let outcome = {
        let both = async {
            tokio::join!(
                tcp_to_stream(&mut r, &mut send, &mut moved.sent, &up),
                stream_to_tcp(&mut recv, &mut w, &mut moved.received, &down)
            )
        };
        tokio::select! {
            done = both => Some(done),
            () = stop => None,
        }
    };
    match outcome {
        Some((Ok(()), Ok(()))) => {
            reset_tcp_on_close(w.as_ref(), false);
            RelayEnd::Closed(moved)
        }
        Some((up, down)) => {
            if let Err(Failure {
                reset_tcp: true, ..
            }) = &down
            {
                // RST_STREAM (or connection loss) -> TCP RST. `forget` keeps the write half
                // from sending a FIN when dropped, so the close is the reset alone.
                reset_tcp(&w);
                w.forget();
            }
            let why = match (up, down) {
                (Err(f), _) | (_, Err(f)) => f.message,
                _ => unreachable!("both succeeded above"),
            };
            RelayEnd::Reset(moved, why)
        }
        None => {
            send.send_reset(Reason::CANCEL);
            reset_tcp(&w);
            w.forget();
            RelayEnd::Reset(moved, "revoked by a policy change".into())
        }
    }
}

/// Why one direction stopped early.
struct Failure {
    /// The TCP side must be reset (the stream was reset or lost).
    reset_tcp: bool,
    message: String,
}

fn failed(message: String) -> Failure {
    Failure {
        reset_tcp: false,
        message,
    }
}

async fn tcp_to_stream(
    r: &mut OwnedReadHalf,
    send: &mut SendStream<Bytes>,
    total: &mut u64,
    meter: &(dyn Fn(u64) + Sync),
) -> Result<(), Failure> {
    // Bytes are read into a buffer whose filled part is handed to h2 as is (no copy). The
    // buffer starts small and doubles while reads fill it, up to CHUNK: request/response
    // connections keep a few KiB, bulk transfers get large reads.
    let mut buf = BytesMut::new();
    let mut size = FIRST_CHUNK;
    loop {
        if buf.capacity() < size / 2 {
            buf.reserve(size);
        }
        let room = buf.capacity();
        let read = tokio::select! {
            read = r.read_buf(&mut buf) => read,
            reason = poll_fn(|cx| send.poll_reset(cx)) => {
                return Err(failed(reset_message(reason)));
            }
        };
        let n = match read {
            Ok(0) => {
                // TCP FIN -> END_STREAM.
                let _ = send.send_data(Bytes::new(), true);
                return Ok(());
            }
            Ok(n) => n,
            Err(e) => {
                // TCP RST (or failure) -> RST_STREAM.
                send.send_reset(Reason::CANCEL);
                return Err(failed(format!("tcp: {e}")));
            }
        };
        if n == room {
            size = (size * 2).min(CHUNK);
        }
        let mut data = buf.split_to(n).freeze();
        // Only what we hold is reserved (reserving ahead would let idle streams starve busy
        // ones of the connection window), and nothing more is read until it is sent:
        // backpressure.
        while !data.is_empty() {
            send.reserve_capacity(data.len());
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
                Ok(Some(Err(e))) => return Err(failed(format!("stream: {e}"))),
                Ok(None) => return Err(failed("stream closed".into())),
                Err(reason) => return Err(failed(reset_message(reason))),
            };
            let k = granted.min(data.len());
            send.send_data(data.split_to(k), false)
                .map_err(|e| failed(format!("stream: {e}")))?;
            *total += k as u64;
            meter(k as u64);
        }
    }
}

async fn stream_to_tcp(
    recv: &mut RecvStream,
    w: &mut OwnedWriteHalf,
    total: &mut u64,
    meter: &(dyn Fn(u64) + Sync),
) -> Result<(), Failure> {
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.map_err(|e| Failure {
            reset_tcp: true,
            message: format!("stream: {e}"),
        })?;
        let n = chunk.len();
        w.write_all(&chunk)
            .await
            .map_err(|e| failed(format!("tcp: {e}")))?;
        *total += n as u64;
        meter(n as u64);
        let _ = recv.flow_control().release_capacity(n);
    }
    // END_STREAM -> TCP FIN.
    let _ = w.shutdown().await;
    Ok(())
}

fn reset_message(reason: Result<Reason, h2::Error>) -> String {
    match reason {
        Ok(r) => format!("peer reset the stream ({r:?})"),
        Err(e) => format!("stream lost: {e}"),
    }
}

/// Makes the eventual close of the TCP socket a RST (SO_LINGER 0).
fn reset_tcp(w: &OwnedWriteHalf) {
    reset_tcp_on_close(w.as_ref(), true);
}

/// SO_LINGER 0 (`reset`: every close, the process's exit included, sends a RST) or the default
/// (a close after both FINs is quiet).
pub fn reset_tcp_on_close(tcp: &TcpStream, reset: bool) {
    let linger = reset.then_some(std::time::Duration::ZERO);
    let _ = socket2::SockRef::from(tcp).set_linger(linger);
}
