//! Bounds on the CA's gRPC port (15012, issue #18). Every pod of the cluster can reach it, so
//! without bounds idle or slow connections (a slow-loris, a flood of TLS handshakes) would hold
//! its descriptors and tasks until legitimate agents could no longer renew certificates.
//!
//! The CA terminates TLS itself (not inside tonic) so that each step is bounded and counted:
//! a source address may hold a bounded number of connections and all sources together a larger
//! one (refused at once with a reset); the TLS handshake must finish within a time limit; after
//! that tonic's own limits apply (request timeout, streams per connection, connection age,
//! HTTP/2 keep-alive and reset-flood limits). Every refusal is counted in
//! `mesh_connections_refused_total{listener="ca", reason}` and logged (rate-limited).
use std::{
    io,
    net::IpAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::info;

use crate::{
    admin::limits::{self, Bounds, Slot, Slots},
    log_limit::LogLimiter,
    metrics::admission::RefusalLabels,
};

/// The CA port's limits.
#[derive(Clone, Copy, Debug)]
pub struct CaBounds {
    /// Connections one source address may hold (a node agent uses one).
    pub per_source: usize,
    /// Connections all sources together may hold (loopback not counted).
    pub global: usize,
    /// Longest TLS handshake.
    pub handshake_timeout: Duration,
    /// Longest request.
    pub request_timeout: Duration,
    /// Longest a connection lives (clients reconnect; an idle one goes with it).
    pub max_connection_age: Duration,
    /// Concurrent requests (streams) per connection.
    pub streams_per_connection: u32,
}

impl Default for CaBounds {
    fn default() -> Self {
        Self {
            per_source: 32,
            global: 4096,
            handshake_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_connection_age: Duration::from_secs(30 * 60),
            streams_per_connection: 32,
        }
    }
}

/// Why the CA refused a connection (the `reason` label).
pub const CA_REFUSAL_REASONS: [&str; 5] = [
    "endpoint_per_source",
    "endpoint_global",
    "tls_handshake_timeout",
    "tls_handshake_error",
    "accept_error",
];

/// The CA's refusal counters and handshakes in flight.
pub struct CaCounters {
    refused: Family<RefusalLabels, Counter>,
    handshakes: Gauge,
    logs: LogLimiter<&'static str>,
}

impl CaCounters {
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let refused = Family::<RefusalLabels, Counter>::default();
        for reason in CA_REFUSAL_REASONS {
            let _ = refused.get_or_create(&RefusalLabels {
                listener: "ca",
                reason,
            });
        }
        registry.register(
            "mesh_connections_refused",
            "Connections the CA refused to protect itself (reset at once or closed), by reason",
            refused.clone(),
        );
        let handshakes = Gauge::default();
        registry.register(
            "mesh_ca_handshakes_in_flight",
            "TLS handshakes in progress on the CA's port",
            handshakes.clone(),
        );
        Arc::new(Self {
            refused,
            handshakes,
            logs: LogLimiter::per_second(10),
        })
    }

    /// Refusals so far for `reason` (tests, reports).
    pub fn refused(&self, reason: &'static str) -> u64 {
        self.refused
            .get_or_create(&RefusalLabels {
                listener: "ca",
                reason,
            })
            .get()
    }

    fn refuse(&self, reason: &'static str, source: IpAddr, detail: &dyn std::fmt::Display) {
        self.refused
            .get_or_create(&RefusalLabels {
                listener: "ca",
                reason,
            })
            .inc();
        if let Some(suppressed) = self.logs.allow(reason) {
            info!(%source, reason, %detail, suppressed, "CA: connection refused");
        }
    }
}

/// A TLS connection the CA admitted: it holds its slot until it closes.
pub struct AdmittedTls {
    tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    _slot: Slot,
}

impl tonic::transport::server::Connected for AdmittedTls {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for AdmittedTls {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for AdmittedTls {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }
}

/// Accepts on `listener`, admits within `bounds` and completes TLS with `config`, each
/// handshake on a task of its own; the connections that made it, as the stream tonic serves.
pub fn admitted(
    listener: tokio::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
    bounds: CaBounds,
    counters: Arc<CaCounters>,
) -> impl futures::Stream<Item = io::Result<AdmittedTls>> {
    let slots = Slots::new(Bounds {
        per_source: bounds.per_source,
        global: bounds.global,
        ..Bounds::default()
    });
    // A small queue: a connection is handed over as soon as tonic polls for it.
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off; the backlog holds the connection meanwhile.
                    counters.refuse("accept_error", IpAddr::from([0, 0, 0, 0]), &e);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let slot = match slots.admit(peer.ip()) {
                Ok(s) => s,
                Err(refusal) => {
                    counters.refuse(refusal.reason(), peer.ip(), &"connection limit");
                    limits::reset(tcp);
                    continue;
                }
            };
            let (acceptor, counters, tx) = (acceptor.clone(), Arc::clone(&counters), tx.clone());
            tokio::spawn(async move {
                counters.handshakes.inc();
                let handshake =
                    tokio::time::timeout(bounds.handshake_timeout, acceptor.accept(tcp)).await;
                counters.handshakes.dec();
                match handshake {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(AdmittedTls { tls, _slot: slot })).await;
                    }
                    // Connected and closed without a byte: a TCP health check (the kubelet's
                    // probe), not a refusal.
                    Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {}
                    Ok(Err(e)) => counters.refuse("tls_handshake_error", peer.ip(), &e),
                    Err(_) => counters.refuse(
                        "tls_handshake_timeout",
                        peer.ip(),
                        &format_args!("no TLS handshake within {:?}", bounds.handshake_timeout),
                    ),
                }
            });
        }
    });
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) })
}

/// Serves the CA's metrics (`GET /metrics`, Prometheus text) on `listener`, within the same
/// per-source bounds as the agent's endpoints.
pub async fn serve_metrics(listener: tokio::net::TcpListener, registry: Arc<Registry>) {
    use http_body_util::Full;
    let slots = Slots::new(Bounds::default());
    loop {
        let Ok((tcp, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(slot) = slots.admit(peer.ip()) else {
            limits::reset(tcp);
            continue;
        };
        let registry = Arc::clone(&registry);
        tokio::spawn(async move {
            let _slot = slot;
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let registry = Arc::clone(&registry);
                    async move {
                        let (status, body) = if req.uri().path() == "/metrics" {
                            let mut text = String::new();
                            match prometheus_client::encoding::text::encode(&mut text, &registry) {
                                Ok(()) => (hyper::StatusCode::OK, text),
                                Err(e) => (hyper::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                            }
                        } else {
                            (hyper::StatusCode::NOT_FOUND, "try /metrics\n".to_owned())
                        };
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .status(status)
                                .header(
                                    "content-type",
                                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                )
                                .body(Full::new(bytes::Bytes::from(body)))
                                .expect("static response parts"),
                        )
                    }
                });
            limits::serve_http1(tcp, Bounds::default(), svc).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_reason_has_its_series_from_the_start() {
        let mut registry = Registry::default();
        let counters = CaCounters::register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for reason in CA_REFUSAL_REASONS {
            assert!(
                text.contains(&format!(
                    "mesh_connections_refused_total{{listener=\"ca\",reason=\"{reason}\"}} 0"
                )),
                "{text}"
            );
            assert_eq!(counters.refused(reason), 0);
        }
    }
}
