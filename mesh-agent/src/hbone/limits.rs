//! What the HBONE server bounds for a peer that already holds a valid identity (issue 15, items
//! 6 and 9): how long HTTP/2 may take to start after TLS, how long a connection may sit without
//! streams, and how many upstream connections one peer may hold open across all its HBONE
//! connections. Every refusal is counted in `mesh_hbone_server_refusals_total{reason}` and
//! logged at most [`LOG_BURST`] times a second per reason.
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

use crate::{identity::SpiffeId, log_limit::LogLimiter};

/// The client preface must arrive this soon after TLS (the TLS handshake has the same bound):
/// a peer with a valid certificate that never speaks HTTP/2 is otherwise kept forever.
pub const H2_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A server connection with no open stream for this long is closed (GOAWAY). Twice the client
/// pool's idle timeout ([`super::client::IDLE_TIMEOUT`], 5 min), so a well-behaved client closes
/// first and never races a new stream against our GOAWAY. ztunnel's server relies on PINGs and
/// the client's pool instead; with no stream there is nothing for it to keep.
pub const SERVER_IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// After the idle GOAWAY, the peer has this long to read it and close (it normally does in
/// milliseconds) while no stream is open; then the connection is dropped. A peer that stops
/// reading (a SETTINGS flood whose ACKs it never takes, a full receive window) would otherwise
/// hold its TLS and HTTP/2 buffers forever: h2 waits for the GOAWAY to be written.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Upstream connections one peer (certificate identity and source address) may hold open on
/// this agent at once, across all its HBONE connections. Each costs a descriptor: without a
/// bound one identity could open 200 streams on each of any number of connections. A client
/// pod rarely holds more than a few hundred connections to one pod's node; 4096 leaves room for
/// bursts while keeping one peer from exhausting the agent. ztunnel has no such bound.
pub const MAX_UPSTREAMS_PER_PEER: usize = 4096;

/// Log lines per reason and second; the rest are only counted.
const LOG_BURST: u32 = 10;

/// The server's bounds; [`Default`] is the constants above (tests shorten them).
#[derive(Clone, Copy, Debug)]
pub struct ServerLimits {
    pub h2_handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub drain_timeout: Duration,
    pub max_upstreams_per_peer: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            h2_handshake_timeout: H2_HANDSHAKE_TIMEOUT,
            idle_timeout: SERVER_IDLE_TIMEOUT,
            drain_timeout: DRAIN_TIMEOUT,
            max_upstreams_per_peer: MAX_UPSTREAMS_PER_PEER,
        }
    }
}

/// Why the server refused or closed something.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The TLS handshake failed: no or an untrusted client certificate, or not TLS at all.
    TlsHandshakeError,
    /// No TLS handshake within 10 s of the connection (with the per-source cap on handshakes
    /// in flight, what keeps a slow-loris from holding the listener).
    TlsHandshakeTimeout,
    /// No HTTP/2 client preface within [`ServerLimits::h2_handshake_timeout`].
    H2HandshakeTimeout,
    /// The peer sent something that is not an HTTP/2 preface.
    H2HandshakeError,
    /// No stream for [`ServerLimits::idle_timeout`].
    IdleTimeout,
    /// The peer holds [`ServerLimits::max_upstreams_per_peer`] upstream connections (503).
    PeerUpstreamLimit,
    /// h2 closed the connection with GOAWAY ENHANCE_YOUR_CALM: the peer reset streams faster
    /// than they could be accepted (the HTTP/2 rapid reset attack, CVE-2023-44487) or made
    /// the server reset too many of its streams for protocol errors.
    H2Abuse,
    /// The peer took no GOAWAY within [`ServerLimits::drain_timeout`] of the idle close and
    /// has no stream open: it is not reading, and the connection is dropped.
    DrainTimeout,
    /// The agent's memory is above its cap ([`crate::memory_cap`]): new streams get 503.
    MemoryCap,
}

impl Refusal {
    pub const ALL: [Refusal; 9] = [
        Refusal::TlsHandshakeError,
        Refusal::TlsHandshakeTimeout,
        Refusal::H2HandshakeTimeout,
        Refusal::H2HandshakeError,
        Refusal::IdleTimeout,
        Refusal::PeerUpstreamLimit,
        Refusal::H2Abuse,
        Refusal::DrainTimeout,
        Refusal::MemoryCap,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::TlsHandshakeError => "tls_handshake_error",
            Refusal::TlsHandshakeTimeout => "tls_handshake_timeout",
            Refusal::H2HandshakeTimeout => "h2_handshake_timeout",
            Refusal::H2HandshakeError => "h2_handshake_error",
            Refusal::IdleTimeout => "idle_timeout",
            Refusal::PeerUpstreamLimit => "peer_upstream_limit",
            Refusal::H2Abuse => "h2_abuse",
            Refusal::DrainTimeout => "drain_timeout",
            Refusal::MemoryCap => "memory",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// The server's refusal counters and their log rate limit. Oversized header lists are refused
/// by h2 itself (431 and RST_STREAM before the request reaches us), so they have no counter
/// here.
pub struct ServerCounters {
    refusals: Family<ReasonLabels, Counter>,
    logs: LogLimiter<Refusal>,
}

impl Default for ServerCounters {
    fn default() -> Self {
        Self {
            refusals: Family::default(),
            logs: LogLimiter::per_second(LOG_BURST),
        }
    }
}

impl ServerCounters {
    /// Counters registered as `mesh_hbone_server_refusals` (every reason present from 0).
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let c = Self::default();
        for r in Refusal::ALL {
            let _ = c
                .refusals
                .get_or_create(&ReasonLabels { reason: r.as_str() });
        }
        registry.register(
            "mesh_hbone_server_refusals",
            "HBONE connections or streams refused or closed by the server's limits, by reason",
            c.refusals.clone(),
        );
        Arc::new(c)
    }

    /// Counts `r`; `Some(n)`: log it now, `n` similar ones were not logged since the last line.
    pub fn refuse(&self, r: Refusal) -> Option<u64> {
        self.refusals
            .get_or_create(&ReasonLabels { reason: r.as_str() })
            .inc();
        self.logs.allow(r)
    }

    /// How many times `r` was counted.
    pub fn count(&self, r: Refusal) -> u64 {
        self.refusals
            .get_or_create(&ReasonLabels { reason: r.as_str() })
            .get()
    }
}

/// A peer as the per-peer bound sees it.
type PeerKey = (SpiffeId, IpAddr);

/// Upstream connections held per peer, shared by every connection of the server.
#[derive(Default)]
pub struct PeerUpstreams {
    held: Mutex<HashMap<PeerKey, usize>>,
}

/// One upstream connection's place in its peer's budget, given back when dropped.
pub struct UpstreamSlot {
    table: Arc<PeerUpstreams>,
    key: PeerKey,
}

impl PeerUpstreams {
    /// A slot for `peer` from `ip`, unless it already holds `max`.
    pub fn acquire(
        self: &Arc<Self>,
        peer: &SpiffeId,
        ip: IpAddr,
        max: usize,
    ) -> Option<UpstreamSlot> {
        let key = (peer.clone(), ip);
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let n = held.entry(key.clone()).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(UpstreamSlot {
            table: Arc::clone(self),
            key,
        })
    }

    /// Slots `peer` from `ip` holds now.
    pub fn held(&self, peer: &SpiffeId, ip: IpAddr) -> usize {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.get(&(peer.clone(), ip)).copied().unwrap_or(0)
    }
}

impl Drop for UpstreamSlot {
    fn drop(&mut self) {
        let mut held = self.table.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = held.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "default", sa).unwrap()
    }

    #[test]
    fn peer_budget_is_per_identity_and_address_and_given_back() {
        let t = Arc::new(PeerUpstreams::default());
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let a = t.acquire(&id("a"), ip, 2).unwrap();
        let _b = t.acquire(&id("a"), ip, 2).unwrap();
        assert!(t.acquire(&id("a"), ip, 2).is_none(), "third refused");
        assert!(t.acquire(&id("b"), ip, 2).is_some(), "another identity");
        assert!(t.acquire(&id("a"), other, 2).is_some(), "another address");
        drop(a);
        assert_eq!(t.held(&id("a"), ip), 1);
        assert!(t.acquire(&id("a"), ip, 2).is_some(), "room again");
    }

    #[test]
    fn refusals_are_counted_and_their_logs_limited() {
        let c = ServerCounters::default();
        let logged = (0..25)
            .filter(|_| c.refuse(Refusal::IdleTimeout).is_some())
            .count();
        assert_eq!(logged, LOG_BURST as usize);
        assert_eq!(c.count(Refusal::IdleTimeout), 25);
        assert_eq!(c.count(Refusal::PeerUpstreamLimit), 0);
    }
}
