//! One HBONE stream as a byte stream (`AsyncRead` + `AsyncWrite`), so an HTTP library can
//! speak through the tunnel: the waypoint serves the tunnelled requests with hyper and talks
//! to the chosen endpoint the same way. The TCP relays in [`super::relay`] copy frames
//! directly and do not need it.
use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf as _, Bytes};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest DATA frame written at once (h2 splits further to the peer's frame size).
const MAX_WRITE: usize = 64 * 1024;

/// The two halves of a stream, plus what was received and not read yet.
pub struct StreamIo {
    send: SendStream<Bytes>,
    recv: RecvStream,
    pending: Bytes,
    /// Anything held for the stream's lifetime (the pool's slot).
    _hold: Option<Box<dyn Send + Sync>>,
}

impl StreamIo {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            pending: Bytes::new(),
            _hold: None,
        }
    }

    /// Keeps `hold` alive as long as the stream (e.g. a pooled stream's slot).
    pub fn holding(mut self, hold: impl Send + Sync + 'static) -> Self {
        self._hold = Some(Box::new(hold));
        self
    }
}

fn io_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"))
    } else {
        io::Error::new(io::ErrorKind::ConnectionReset, e)
    }
}

impl AsyncRead for StreamIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pending.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                Some(Ok(data)) => {
                    // Flow control: the window reopens as soon as the bytes are ours.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    self.pending = data;
                }
            }
        }
        let n = self.pending.len().min(buf.remaining());
        buf.put_slice(&self.pending[..n]);
        self.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for StreamIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.send.reserve_capacity(buf.len().min(MAX_WRITE));
        let granted = match ready!(self.send.poll_capacity(cx)) {
            None => {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the HBONE stream is closed",
                )));
            }
            Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
            Some(Ok(n)) => n,
        };
        let n = granted.min(buf.len());
        match self
            .send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
        {
            Ok(()) => Poll::Ready(Ok(n)),
            Err(e) => Poll::Ready(Err(io_error(e))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 writes frames as soon as it can; there is nothing held here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // END_STREAM: the peer reads end of file; reading our side goes on.
        Poll::Ready(self.send.send_data(Bytes::new(), true).map_err(io_error))
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http_body_util::{BodyExt as _, Full};
    use hyper_util::rt::TokioIo;
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };

    use super::*;
    use crate::hbone::{
        limits::ServerLimits,
        server::no_telemetry,
        tests::{echo, rig_with},
    };

    #[tokio::test]
    async fn bytes_cross_the_tunnel_both_ways_with_end_of_file() {
        let rig = rig_with(ServerLimits::default(), no_telemetry()).await;
        let up = echo().await;
        let s = rig.pool.open(&rig.request(up, &rig.b).await).await.unwrap();
        let mut io = StreamIo::new(s.send, s.recv).holding(s.slot);
        // More than the 4 MiB stream window: writes wait for the window to reopen.
        let sent: Vec<u8> = (0..(5u32 << 20)).map(|i| (i % 251) as u8).collect();
        io.write_all(&sent).await.unwrap();
        io.shutdown().await.unwrap();
        let mut back = Vec::new();
        io.read_to_end(&mut back).await.unwrap();
        assert_eq!(
            back, sent,
            "300 kB echoed intact (more than one window's worth)"
        );
    }

    #[tokio::test]
    async fn hyper_speaks_http1_through_an_hbone_stream() {
        let rig = rig_with(ServerLimits::default(), no_telemetry()).await;
        // An HTTP/1.1 server as the tunnel's upstream.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = l.accept().await.unwrap();
            let svc = hyper::service::service_fn(
                |req: http::Request<hyper::body::Incoming>| async move {
                    let path = req.uri().path().to_owned();
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(
                        format!("hello from {path}"),
                    ))))
                },
            );
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
        let s = rig.pool.open(&rig.request(up, &rig.b).await).await.unwrap();
        let io = StreamIo::new(s.send, s.recv).holding(s.slot);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .unwrap();
        tokio::spawn(conn);
        for path in ["/one", "/two"] {
            let req = http::Request::builder()
                .uri(path)
                .header("host", "reviews")
                .body(Full::new(Bytes::new()))
                .unwrap();
            let resp = sender.send_request(req).await.unwrap();
            assert_eq!(resp.status(), http::StatusCode::OK);
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(
                body,
                format!("hello from {path}"),
                "keep-alive over one stream"
            );
        }
    }
}
