//! The HBONE client: a pool of mTLS HTTP/2 connections per (client address, source identity,
//! destination identity, destination), at most 100 streams each, idle ones closed after 5
//! minutes; one CONNECT stream per proxied connection.
//!
//! HTTP/2 settings as ztunnel's client (`src/proxy/h2/client.rs`): its windows and frame size,
//! ENABLE_PUSH=0 (a CONNECT client never takes pushes), a 16 KiB header list.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use tracing::debug;

use super::{
    CLIENT_MAX_HEADER_LIST, CONNECTION_WINDOW, Connector, EARLY_DATA_HEADER, MAX_FRAME,
    MAX_STREAMS_PER_CONNECTION, STREAM_WINDOW, forwarded,
};
use crate::{identity::SpiffeId, tls};

/// Connections idle this long are closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Why a stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS with {addr}: {source}")]
    Tls {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS configuration: {0}")]
    Config(#[from] tls::TlsError),
    #[error("HTTP/2 with {addr}: {source}")]
    H2 {
        addr: SocketAddr,
        #[source]
        source: h2::Error,
    },
    #[error("CONNECT {authority} via {addr} answered {status}")]
    Status {
        addr: SocketAddr,
        authority: SocketAddr,
        status: StatusCode,
    },
    /// The stream failed without an answer after its first bytes went with the CONNECT: the
    /// server may have passed them on, so they must not be sent anywhere else.
    #[error("HTTP/2 with {addr} failed after the stream's first bytes were sent: {source}")]
    EarlyDataInDoubt {
        addr: SocketAddr,
        #[source]
        source: h2::Error,
    },
}

impl HboneError {
    /// The server never saw the stream: the connection was going away (GOAWAY, e.g. an agent
    /// handing over to its successor) before the stream got in, or the server refused it
    /// unprocessed. Such a stream may be opened again on another connection.
    fn unprocessed(&self) -> bool {
        match self {
            HboneError::H2 { source, .. } => {
                source.is_go_away() || source.reason() == Some(h2::Reason::REFUSED_STREAM)
            }
            _ => false,
        }
    }

    /// The client's first bytes may have reached the destination (see
    /// [`HboneError::EarlyDataInDoubt`]): the caller must not try another endpoint with them.
    pub fn may_have_delivered(&self) -> bool {
        matches!(self, HboneError::EarlyDataInDoubt { .. })
    }
}

/// One stream to open.
#[derive(Clone, Debug)]
pub struct StreamRequest {
    /// Address the outer connection comes from (the client pod's: the destination agent takes
    /// the client address from it).
    pub client: SocketAddr,
    pub source: SpiffeId,
    pub source_cert: Arc<rustls::sign::CertifiedKey>,
    /// The identity the destination must prove.
    pub destination: SpiffeId,
    /// `<destination pod IP>:15008`.
    pub hbone_addr: SocketAddr,
    /// The `:authority`: the original destination `ip:port`.
    pub authority: SocketAddr,
    /// W3C `baggage` describing the source workload (k8s.cluster.name, k8s.namespace.name,
    /// k8s.pod.name, service.name, service.version), as ztunnel sends it.
    pub baggage: String,
    /// The service hostname the client addressed (a VIP), sent as `forwarded: ...;host=` as
    /// ztunnel does: the destination agent reports it as `destination_service`.
    pub service_host: Option<String>,
    /// The client's first bytes, already read from its connection (at most
    /// [`super::EARLY_DATA_MAX`]; empty if none had arrived): sent with the CONNECT to a server
    /// that accepts early data ([`EARLY_DATA_HEADER`]), otherwise right after its 200. Either
    /// way an opened stream has carried them; a failed open leaves them to the next attempt.
    pub early: Bytes,
}

/// How many times a stream a going-away connection did not take is opened again.
const UNPROCESSED_RETRIES: usize = 2;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PoolKey {
    client_ip: IpAddr,
    source: SpiffeId,
    destination: SpiffeId,
    hbone_addr: SocketAddr,
}

struct Pooled {
    send: h2::client::SendRequest<Bytes>,
    active: AtomicUsize,
    dead: Arc<AtomicBool>,
    last_used: Mutex<Instant>,
    /// When it was made: a stream refused by a connection going away is retried only on a
    /// newer one.
    born: Instant,
    /// The server said in a 200 that it takes a stream's first bytes before its answer.
    early_data: AtomicBool,
}

/// A stream in use. Its [`StreamSlot`] frees the stream's place in the pooled connection when
/// dropped.
pub struct PooledStream {
    pub send: h2::SendStream<Bytes>,
    pub recv: h2::RecvStream,
    pub slot: StreamSlot,
}

/// Holds one stream's place in a pooled connection.
pub struct StreamSlot(Arc<Pooled>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
        *self.0.last_used.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }
}

/// The pool (one per agent).
pub struct Pool {
    roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    connector: Connector,
    conns: Mutex<HashMap<PoolKey, Vec<Arc<Pooled>>>>,
    /// One dial at a time per key: a burst of new streams waits for the connection being opened
    /// instead of each opening its own.
    dialing: Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<()>>>>,
    /// Streams whose first bytes went with the CONNECT.
    #[cfg(test)]
    early_sends: AtomicUsize,
}

/// Connections and streams, for tests and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub connections: usize,
    pub streams: usize,
}

impl Pool {
    pub fn new(
        roots: Vec<rustls::pki_types::CertificateDer<'static>>,
        connector: Connector,
    ) -> Arc<Self> {
        let pool = Arc::new(Self {
            roots,
            connector,
            conns: Mutex::new(HashMap::new()),
            dialing: Mutex::new(HashMap::new()),
            #[cfg(test)]
            early_sends: AtomicUsize::new(0),
        });
        let weak = Arc::downgrade(&pool);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(30)).await;
                let Some(pool) = weak.upgrade() else { return };
                pool.reap(IDLE_TIMEOUT);
            }
        });
        pool
    }

    /// Opens a CONNECT stream, reusing a pooled connection with room. A stream the server did
    /// not take because its connection was going away is opened again on a connection made
    /// after that (a peer agent handing over tells every pooled connection GOAWAY at once, so
    /// another pooled one would refuse it too), up to [`UNPROCESSED_RETRIES`] times: a peer
    /// may still accept a connection it then tells GOAWAY at once.
    pub async fn open(&self, req: &StreamRequest) -> Result<PooledStream, HboneError> {
        let mut retries = 0;
        let mut newer_than = None;
        loop {
            match self.open_once(req, newer_than).await {
                Err(e) if e.unprocessed() && retries < UNPROCESSED_RETRIES => {
                    retries += 1;
                    newer_than = Some(Instant::now());
                    debug!(addr = %req.hbone_addr, error = %e, retries, "HBONE: stream not taken by a connection going away, opening it again on a new one");
                }
                other => return other,
            }
        }
    }

    /// One try; only on a connection made after `newer_than`, when given.
    async fn open_once(
        &self,
        req: &StreamRequest,
        newer_than: Option<Instant>,
    ) -> Result<PooledStream, HboneError> {
        let key = PoolKey {
            client_ip: req.client.ip(),
            source: req.source.clone(),
            destination: req.destination.clone(),
            hbone_addr: req.hbone_addr,
        };
        let conn = match self.reserve(&key, newer_than) {
            Some(c) => c,
            None => {
                let gate = Arc::clone(
                    self.dialing
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .entry(key.clone())
                        .or_default(),
                );
                let _dialing = gate.lock().await;
                // Whoever dialed while we waited may have left room for us.
                match self.reserve(&key, newer_than) {
                    Some(c) => c,
                    None => {
                        let c = self.dial(req).await?;
                        self.conns
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .entry(key)
                            .or_default()
                            .push(Arc::clone(&c));
                        c
                    }
                }
            }
        };
        let guard = Reservation(Some(conn));
        let send = guard.conn().send.clone();
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri(req.authority.to_string())
            .header(
                http::header::FORWARDED,
                forwarded::header_value(req.client, req.service_host.as_deref()),
            )
            .header("baggage", &req.baggage)
            .header("traceparent", traceparent())
            .body(())
            .expect("valid CONNECT request");
        let h2err = |source: h2::Error| {
            if source.is_go_away() {
                // No new streams on it; those it has finish.
                guard.conn().dead.store(true, Ordering::Release);
            }
            HboneError::H2 {
                addr: req.hbone_addr,
                source,
            }
        };
        let ready = send.ready().await;
        let mut ready = match ready {
            Ok(r) => r,
            Err(e) => {
                guard.conn().dead.store(true, Ordering::Release);
                return Err(h2err(e));
            }
        };
        let (response, mut send_stream) = ready.send_request(request, false).map_err(h2err)?;
        // Early data saves the round trip to the 200 before the first bytes can leave, where
        // the server said it may (h2 writes the HEADERS and the DATA in one flush).
        let early = !req.early.is_empty() && guard.conn().early_data.load(Ordering::Acquire);
        if early {
            #[cfg(test)]
            self.early_sends.fetch_add(1, Ordering::Relaxed);
            send_stream
                .send_data(req.early.clone(), false)
                .map_err(h2err)?;
        }
        let response = match response.await {
            Ok(r) => r,
            // A stream the server never took cannot have passed anything on; any other failure
            // may have come after the server's 200 and its first writes upstream.
            Err(source) => {
                let e = h2err(source);
                let in_doubt = early && !e.unprocessed();
                return Err(match e {
                    HboneError::H2 { addr, source } if in_doubt => {
                        HboneError::EarlyDataInDoubt { addr, source }
                    }
                    e => e,
                });
            }
        };
        if response.status() != StatusCode::OK {
            return Err(HboneError::Status {
                addr: req.hbone_addr,
                authority: req.authority,
                status: response.status(),
            });
        }
        if response
            .headers()
            .get(EARLY_DATA_HEADER)
            .is_some_and(|v| v.as_bytes() == b"1")
        {
            guard.conn().early_data.store(true, Ordering::Release);
        }
        if !early && !req.early.is_empty() {
            send_stream
                .send_data(req.early.clone(), false)
                .map_err(h2err)?;
        }
        Ok(PooledStream {
            send: send_stream,
            recv: response.into_body(),
            slot: StreamSlot(guard.into_conn()),
        })
    }

    /// Streams so far whose first bytes went with the CONNECT.
    #[cfg(test)]
    pub(super) fn early_sends(&self) -> usize {
        self.early_sends.load(Ordering::Relaxed)
    }

    /// Connections and active streams right now.
    pub fn stats(&self) -> PoolStats {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let all = conns.values().flatten();
        PoolStats {
            connections: all
                .clone()
                .filter(|c| !c.dead.load(Ordering::Acquire))
                .count(),
            streams: all.map(|c| c.active.load(Ordering::Acquire)).sum(),
        }
    }

    /// Closes connections idle for `idle` and forgets dead ones.
    pub fn reap(&self, idle: Duration) {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        for list in conns.values_mut() {
            list.retain(|c| {
                let idle_for = c
                    .last_used
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .elapsed();
                let unused = c.active.load(Ordering::Acquire) == 0;
                !(c.dead.load(Ordering::Acquire) || (unused && idle_for >= idle))
            });
        }
        conns.retain(|_, l| !l.is_empty());
    }

    /// A slot on a live pooled connection of `key` (made after `newer_than`, when given).
    fn reserve(&self, key: &PoolKey, newer_than: Option<Instant>) -> Option<Arc<Pooled>> {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.get(key)?.iter().find_map(|c| {
            if c.dead.load(Ordering::Acquire) || newer_than.is_some_and(|t| c.born <= t) {
                return None;
            }
            // Claim a slot if there is one.
            c.active
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < MAX_STREAMS_PER_CONNECTION).then_some(n + 1)
                })
                .ok()
                .map(|_| Arc::clone(c))
        })
    }

    async fn dial(&self, req: &StreamRequest) -> Result<Arc<Pooled>, HboneError> {
        let addr = req.hbone_addr;
        let tcp = (self.connector)(req.client.ip(), addr)
            .await
            .map_err(|source| HboneError::Connect { addr, source })?;
        let _ = tcp.set_nodelay(true);
        let config = tls::client_config(
            Arc::clone(&req.source_cert),
            &self.roots,
            req.destination.clone(),
        )?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(tls::server_name(addr.ip()), tcp)
            .await
            .map_err(|source| HboneError::Tls { addr, source })?;
        let (send, conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_header_list_size(CLIENT_MAX_HEADER_LIST)
            .enable_push(false)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|source| HboneError::H2 { addr, source })?;
        let dead = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&dead);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(%addr, error = %e, "HBONE connection ended");
            }
            flag.store(true, Ordering::Release);
        });
        Ok(Arc::new(Pooled {
            send,
            // The stream about to be opened on it.
            active: AtomicUsize::new(1),
            dead,
            last_used: Mutex::new(Instant::now()),
            born: Instant::now(),
            early_data: AtomicBool::new(false),
        }))
    }
}

/// A fresh W3C trace context (version 00, random trace and span ids, sampled). The ids need to
/// be unique, not secret: a per-thread generator seeded once (no system call per connection).
fn traceparent() -> String {
    fn hex(out: &mut String, v: u128, digits: u32) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        for i in (0..digits).rev() {
            out.push(char::from(HEX[((v >> (4 * i)) & 0xf) as usize]));
        }
    }
    // All-zero ids are invalid.
    let (trace, span) = (fastrand::u128(1..), fastrand::u64(1..));
    let mut out = String::with_capacity(55);
    out.push_str("00-");
    hex(&mut out, trace, 32);
    out.push('-');
    hex(&mut out, u128::from(span), 16);
    out.push_str("-01");
    out
}

#[cfg(test)]
pub(super) fn traceparent_for_tests() -> String {
    traceparent()
}

/// A slot reserved on a connection before the stream exists (freed if opening fails).
struct Reservation(Option<Arc<Pooled>>);

impl Reservation {
    fn conn(&self) -> &Arc<Pooled> {
        self.0.as_ref().expect("present until taken")
    }

    /// The slot now belongs to the stream.
    fn into_conn(mut self) -> Arc<Pooled> {
        self.0.take().expect("present until taken")
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            c.active.fetch_sub(1, Ordering::AcqRel);
        }
    }
}
