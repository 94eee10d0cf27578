//! Bounds on the agent's own HTTP endpoints (issue #18). Metrics and readiness listen on every
//! address of the node, so any pod can reach them: without bounds, idle or slow connections
//! (a slow-loris) would hold descriptors until the agent ran out, and every listener with it.
//! Each endpoint admits a bounded number of connections per source address and in all,
//! refuses the rest at once (a reset, counted and logged), and closes a connection that takes
//! too long to send a request's headers or that has lived too long.
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

/// Why a connection to an endpoint was refused (`mesh_connections_refused_total{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The source address holds its share of the endpoint's connections.
    PerSource,
    /// The endpoint holds all the connections it takes.
    Global,
}

impl Refusal {
    pub const ALL: [Refusal; 2] = [Refusal::PerSource, Refusal::Global];

    pub fn reason(self) -> &'static str {
        match self {
            Self::PerSource => "endpoint_per_source",
            Self::Global => "endpoint_global",
        }
    }
}

/// The bounds of one endpoint.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    /// Connections one source address may hold open (Prometheus and the kubelet use one or
    /// two at a time).
    pub per_source: usize,
    /// Connections all sources together may hold open. Loopback sources (the node's own
    /// tools) are not counted against it, so a flood from pods cannot lock them out.
    pub global: usize,
    /// Longest wait for a request's headers, the first and each next one on a kept-alive
    /// connection: an idle or slow client is closed after it.
    pub header_timeout: Duration,
    /// Longest a connection may live, whatever it does (a scraper reconnects).
    pub lifetime: Duration,
}

impl Default for Bounds {
    fn default() -> Self {
        Self {
            per_source: 16,
            global: 128,
            header_timeout: Duration::from_secs(10),
            lifetime: Duration::from_secs(120),
        }
    }
}

/// The connections an endpoint holds, by source.
#[derive(Debug)]
pub struct Slots {
    bounds: Bounds,
    held: Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    by_source: HashMap<IpAddr, usize>,
    counted: usize,
}

/// One admitted connection: its slot is given back when this drops.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<Slots>,
    source: IpAddr,
}

impl Slots {
    pub fn new(bounds: Bounds) -> Arc<Self> {
        Arc::new(Self {
            bounds,
            held: Mutex::default(),
        })
    }

    pub fn bounds(&self) -> Bounds {
        self.bounds
    }

    /// Admits a connection from `source`, or says why not.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Result<Slot, Refusal> {
        let source = source.to_canonical();
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let mine = held.by_source.get(&source).copied().unwrap_or(0);
        if mine >= self.bounds.per_source {
            return Err(Refusal::PerSource);
        }
        let counted = !source.is_loopback();
        if counted && held.counted >= self.bounds.global {
            return Err(Refusal::Global);
        }
        *held.by_source.entry(source).or_insert(0) += 1;
        held.counted += usize::from(counted);
        Ok(Slot {
            slots: Arc::clone(self),
            source,
        })
    }

    /// Connections held now (tests, reports).
    pub fn held(&self) -> usize {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.by_source.values().sum()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.slots.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = held.by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                held.by_source.remove(&self.source);
            }
        }
        if !self.source.is_loopback() {
            held.counted -= 1;
        }
    }
}

/// Resets a refused connection: no descriptor kept, no TIME_WAIT, the backlog keeps draining.
pub fn reset(stream: tokio::net::TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
}

/// Serves one admitted HTTP/1 connection within `bounds`' time limits.
pub async fn serve_http1<S>(stream: tokio::net::TcpStream, bounds: Bounds, service: S)
where
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResBody: 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(bounds.header_timeout)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    let _ = tokio::time::timeout(bounds.lifetime, connection).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds(per_source: usize, global: usize) -> Bounds {
        Bounds {
            per_source,
            global,
            ..Bounds::default()
        }
    }

    #[test]
    fn every_refusal_has_its_series() {
        let reasons: Vec<&str> = Refusal::ALL.iter().map(|r| r.reason()).collect();
        assert_eq!(
            reasons,
            crate::metrics::admission::ENDPOINT_REFUSAL_REASONS.to_vec()
        );
    }

    #[test]
    fn a_source_gets_its_share_and_no_more() {
        let slots = Slots::new(bounds(2, 10));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = slots.admit(a).unwrap();
        let _second = slots.admit(a).unwrap();
        assert_eq!(slots.admit(a).unwrap_err(), Refusal::PerSource);
        // Another source is not held back by the first.
        let _other = slots.admit(b).unwrap();
        drop(first);
        let _again = slots.admit(a).unwrap();
        assert_eq!(slots.held(), 3);
    }

    #[test]
    fn the_endpoint_takes_a_bounded_number_in_all_but_loopback_always_gets_in() {
        let slots = Slots::new(bounds(1, 3));
        let held: Vec<Slot> = (1..=3)
            .map(|i| slots.admit(IpAddr::from([10, 0, 0, i])).unwrap())
            .collect();
        assert_eq!(
            slots.admit("10.0.0.9".parse().unwrap()).unwrap_err(),
            Refusal::Global
        );
        // The node's own tools: their per-source share still applies.
        let local = slots.admit("127.0.0.1".parse().unwrap()).unwrap();
        assert_eq!(
            slots.admit("127.0.0.1".parse().unwrap()).unwrap_err(),
            Refusal::PerSource
        );
        // An IPv4 client on a dual-stack socket is the same source as over IPv4.
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(slots.admit(mapped).unwrap_err(), Refusal::PerSource);
        drop(held);
        drop(local);
        assert_eq!(slots.held(), 0);
        let _fresh = slots.admit("10.0.0.9".parse().unwrap()).unwrap();
    }
}
