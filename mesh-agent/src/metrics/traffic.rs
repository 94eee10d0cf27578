//! Istio's TCP metrics and the access log, per proxied connection, as ztunnel reports them: the
//! client's agent as `reporter="source"`, the server's as `reporter="destination"`.
//!
//! Labels name workloads, never addresses or ports, so their number is bounded by the pairs of
//! workloads that talk (plus one `unknown` for non-mesh peers). Byte counters are resolved once
//! per connection and bumped as data moves, so a long-lived connection's bytes show up while it
//! lives, not only when it closes.
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::Instant,
};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use tracing::{info, warn};

/// Which agent reports.
#[derive(Clone, Copy, Debug, Default, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Reporter {
    #[default]
    source,
    destination,
}

/// Why a connection failed (Istio's `response_flags`; `-` for none).
#[derive(Clone, Copy, Debug, Default, Hash, PartialEq, Eq)]
pub enum ResponseFlags {
    #[default]
    None,
    /// Denied by policy (AuthorizationPolicy, PeerAuthentication STRICT).
    Denied,
    /// The upstream connection could not be made.
    ConnectFailed,
}

impl ResponseFlags {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "-",
            Self::Denied => "DENY",
            Self::ConnectFailed => "CONNECT",
        }
    }
}

impl EncodeLabelValue for ResponseFlags {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder,
    ) -> Result<(), std::fmt::Error> {
        use std::fmt::Write as _;
        encoder.write_str(self.as_str())
    }
}

/// `connection_security_policy`.
#[derive(Clone, Copy, Debug, Default, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum SecurityPolicy {
    /// Plaintext (a non-mesh peer, pass-through, or a same-node hop without TLS).
    #[default]
    unknown,
    mutual_tls,
}

/// A workload as the labels describe it; `None` fields encode as `unknown`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerInfo {
    pub workload: Option<String>,
    pub namespace: Option<String>,
    pub principal: Option<String>,
    pub canonical_service: Option<String>,
    pub canonical_revision: Option<String>,
    pub cluster: Option<String>,
}

/// A service the client addressed (its VIP), for the `destination_service*` labels.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceInfo {
    pub name: String,
    pub namespace: String,
    /// `<name>.<namespace>.svc.<domain>`.
    pub hostname: String,
}

/// Istio's standard TCP metric labels. Values are held escaped ([`super::label_value`]).
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrafficLabels {
    pub reporter: Reporter,
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_service_name: String,
    pub destination_workload: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_cluster: String,
    pub request_protocol: String,
    pub response_flags: ResponseFlags,
    pub connection_security_policy: SecurityPolicy,
}

fn or_unknown(v: &Option<String>) -> String {
    v.as_deref()
        .map_or_else(|| "unknown".to_owned(), super::label_value)
}

impl TrafficLabels {
    pub fn new(
        reporter: Reporter,
        source: &PeerInfo,
        destination: &PeerInfo,
        service: Option<&ServiceInfo>,
        security: SecurityPolicy,
    ) -> Self {
        let service_label = |field: fn(&ServiceInfo) -> &str| {
            service.map_or_else(|| "unknown".into(), |s| super::label_value(field(s)))
        };
        Self {
            reporter,
            source_workload: or_unknown(&source.workload),
            source_canonical_service: or_unknown(&source.canonical_service),
            source_canonical_revision: or_unknown(&source.canonical_revision),
            source_workload_namespace: or_unknown(&source.namespace),
            source_principal: or_unknown(&source.principal),
            source_app: or_unknown(&source.canonical_service),
            source_version: or_unknown(&source.canonical_revision),
            source_cluster: or_unknown(&source.cluster),
            destination_service: service_label(|s| &s.hostname),
            destination_service_namespace: service_label(|s| &s.namespace),
            destination_service_name: service_label(|s| &s.name),
            destination_workload: or_unknown(&destination.workload),
            destination_canonical_service: or_unknown(&destination.canonical_service),
            destination_canonical_revision: or_unknown(&destination.canonical_revision),
            destination_workload_namespace: or_unknown(&destination.namespace),
            destination_principal: or_unknown(&destination.principal),
            destination_app: or_unknown(&destination.canonical_service),
            destination_version: or_unknown(&destination.canonical_revision),
            destination_cluster: or_unknown(&destination.cluster),
            request_protocol: "tcp".to_owned(),
            response_flags: ResponseFlags::None,
            connection_security_policy: security,
        }
    }
}

/// The TCP metric families.
#[derive(Clone, Default)]
pub struct TrafficMetrics {
    opened: Family<TrafficLabels, Counter>,
    closed: Family<TrafficLabels, Counter>,
    failed: Family<TrafficLabels, Counter>,
    received_bytes: Family<TrafficLabels, Counter>,
    sent_bytes: Family<TrafficLabels, Counter>,
    /// Connections whose telemetry is alive (attributed and not yet logged): what a draining
    /// agent waits for.
    in_flight: Arc<AtomicI64>,
}

impl TrafficMetrics {
    /// Connections being carried now (a same-node connection counts once per reporter).
    pub fn in_flight(&self) -> i64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Registers the families under the `istio` prefix of `registry`.
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let m = Self::default();
        registry.register(
            "tcp_connections_opened",
            "The total number of TCP connections opened",
            m.opened.clone(),
        );
        registry.register(
            "tcp_connections_closed",
            "The total number of TCP connections closed",
            m.closed.clone(),
        );
        registry.register(
            "tcp_connections_failed",
            "The total number of TCP connections that failed (policy denial, upstream connect failure)",
            m.failed.clone(),
        );
        registry.register(
            "tcp_received_bytes",
            "The size of total bytes received during request in case of a TCP connection",
            m.received_bytes.clone(),
        );
        registry.register(
            "tcp_sent_bytes",
            "The size of total bytes sent during response in case of a TCP connection",
            m.sent_bytes.clone(),
        );
        Arc::new(m)
    }
}

/// What the access log says about a connection besides its labels.
#[derive(Clone, Debug, Default)]
pub struct AccessInfo {
    pub client: Option<SocketAddr>,
    pub destination: Option<SocketAddr>,
    /// For HBONE: the outer address (`<pod>:15008`).
    pub hbone: Option<SocketAddr>,
    /// The policy that decided (or `-`).
    pub policy: Option<String>,
    pub reason: Option<&'static str>,
}

/// One connection's telemetry, from its first byte to its access log line. Dropping it without
/// [`close`](Self::close) or [`fail`](Self::fail) records nothing (a connection refused before
/// it was attributed to anyone).
pub struct ConnectionTelemetry {
    inner: Option<Live>,
}

struct Live {
    metrics: Arc<TrafficMetrics>,
    labels: TrafficLabels,
    access: AccessInfo,
    started: Instant,
    opened: bool,
    received: Counter,
    sent: Counter,
    request_bytes: AtomicU64,
    response_bytes: AtomicU64,
}

impl Drop for Live {
    fn drop(&mut self) {
        self.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How a connection ended, for the access log.
pub enum Outcome<'a> {
    Closed,
    Reset(&'a str),
}

impl ConnectionTelemetry {
    pub fn new(metrics: &Arc<TrafficMetrics>, labels: TrafficLabels, access: AccessInfo) -> Self {
        let received = metrics.received_bytes.get_or_create(&labels).clone();
        let sent = metrics.sent_bytes.get_or_create(&labels).clone();
        metrics.in_flight.fetch_add(1, Ordering::Relaxed);
        Self {
            inner: Some(Live {
                metrics: Arc::clone(metrics),
                labels,
                access,
                started: Instant::now(),
                opened: false,
                received,
                sent,
                request_bytes: AtomicU64::new(0),
                response_bytes: AtomicU64::new(0),
            }),
        }
    }

    /// Records nothing (tests of the HBONE layer, diagnostic handlers).
    pub fn disabled() -> Self {
        Self { inner: None }
    }

    /// The connection is up (upstream connected, CONNECT answered 200).
    pub fn opened(&mut self) {
        if let Some(l) = &mut self.inner {
            l.metrics.opened.get_or_create(&l.labels).inc();
            l.opened = true;
        }
    }

    pub fn set_policy(&mut self, policy: Option<&str>, reason: &'static str) {
        if let Some(l) = &mut self.inner {
            l.access.policy = policy.map(str::to_owned);
            l.access.reason = Some(reason);
        }
    }

    /// The connection never opened: denied or the upstream was unreachable.
    pub fn fail(mut self, flags: ResponseFlags, error: &str) {
        let Some(mut l) = self.inner.take() else {
            return;
        };
        l.labels.response_flags = flags;
        l.metrics.failed.get_or_create(&l.labels).inc();
        access_log(&l, flags, Some(error));
    }

    /// The connection is over.
    pub fn close(mut self, outcome: Outcome<'_>) {
        let Some(l) = self.inner.take() else {
            return;
        };
        if l.opened {
            l.metrics.closed.get_or_create(&l.labels).inc();
        }
        let error = match outcome {
            Outcome::Closed => None,
            Outcome::Reset(why) => Some(why),
        };
        access_log(&l, ResponseFlags::None, error);
    }
}

/// The access log line: target `access`, one per connection and reporter.
fn access_log(l: &Live, flags: ResponseFlags, error: Option<&str>) {
    let t = &l.labels;
    let direction = match t.reporter {
        Reporter::source => "outbound",
        Reporter::destination => "inbound",
    };
    let addr = |a: Option<SocketAddr>| a.map_or_else(|| "-".to_owned(), |a| a.to_string());
    let duration_ms = l.started.elapsed().as_secs_f64() * 1e3;
    let duration_ms = (duration_ms * 1000.0).round() / 1000.0;
    macro_rules! line {
        ($level:ident, $error:expr) => {
            $level!(
                target: "access",
                direction,
                src.addr = %addr(l.access.client),
                src.workload = %t.source_workload,
                src.namespace = %t.source_workload_namespace,
                src.identity = %t.source_principal,
                dst.addr = %addr(l.access.destination),
                dst.hbone_addr = %addr(l.access.hbone),
                dst.workload = %t.destination_workload,
                dst.namespace = %t.destination_workload_namespace,
                dst.identity = %t.destination_principal,
                dst.service = %t.destination_service,
                security = ?t.connection_security_policy,
                bytes_sent = l.response_bytes.load(Ordering::Relaxed),
                bytes_recv = l.request_bytes.load(Ordering::Relaxed),
                duration_ms,
                response_flags = flags.as_str(),
                policy = l.access.policy.as_deref().unwrap_or("-"),
                reason = l.access.reason.unwrap_or("-"),
                error = $error,
                "connection complete"
            )
        };
    }
    match error {
        None => line!(info, "-"),
        Some(e) => line!(warn, e),
    }
}

impl super::Meter for ConnectionTelemetry {
    /// Client-to-server bytes (Istio's "received during request").
    fn request(&self, n: u64) {
        if let Some(l) = &self.inner {
            l.received.inc_by(n);
            l.request_bytes.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Server-to-client bytes ("sent during response").
    fn response(&self, n: u64) {
        if let Some(l) = &self.inner {
            l.sent.inc_by(n);
            l.response_bytes.fetch_add(n, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str) -> PeerInfo {
        PeerInfo {
            workload: Some(name.into()),
            namespace: Some("ns".into()),
            principal: Some(format!("spiffe://cluster.local/ns/ns/sa/{name}")),
            canonical_service: Some(name.into()),
            canonical_revision: Some("v1".into()),
            cluster: Some("Kubernetes".into()),
        }
    }

    fn encode(registry: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
        out
    }

    #[test]
    fn a_connection_counts_open_close_and_bytes_under_its_labels() {
        let mut registry = Registry::with_prefix("istio");
        let m = TrafficMetrics::register(&mut registry);
        let labels = TrafficLabels::new(
            Reporter::source,
            &peer("a"),
            &peer("b"),
            None,
            SecurityPolicy::mutual_tls,
        );
        let mut t = ConnectionTelemetry::new(&m, labels.clone(), AccessInfo::default());
        t.opened();
        use crate::metrics::Meter as _;
        t.request(100);
        t.response(7);
        t.request(1);
        t.close(Outcome::Closed);
        let text = encode(&registry);
        let line = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name) && l.contains("reporter=\"source\""))
                .unwrap_or_else(|| panic!("{name} missing in\n{text}"))
                .rsplit(' ')
                .next()
                .unwrap()
                .to_owned()
        };
        assert_eq!(line("istio_tcp_connections_opened_total"), "1");
        assert_eq!(line("istio_tcp_connections_closed_total"), "1");
        assert_eq!(line("istio_tcp_received_bytes_total"), "101");
        assert_eq!(line("istio_tcp_sent_bytes_total"), "7");
        assert!(text.contains("source_principal=\"spiffe://cluster.local/ns/ns/sa/a\""));
        assert!(text.contains("destination_workload=\"b\""));
        assert!(text.contains("response_flags=\"-\""));
        assert!(text.contains("connection_security_policy=\"mutual_tls\""));
    }

    #[test]
    fn a_failure_is_counted_with_its_flag_and_not_as_opened_or_closed() {
        let mut registry = Registry::with_prefix("istio");
        let m = TrafficMetrics::register(&mut registry);
        let labels = TrafficLabels::new(
            Reporter::destination,
            &PeerInfo::default(),
            &peer("b"),
            None,
            SecurityPolicy::unknown,
        );
        ConnectionTelemetry::new(&m, labels, AccessInfo::default())
            .fail(ResponseFlags::Denied, "denied");
        let text = encode(&registry);
        assert!(
            text.lines()
                .any(|l| l.starts_with("istio_tcp_connections_failed_total")
                    && l.contains("response_flags=\"DENY\"")
                    && l.contains("source_workload=\"unknown\"")
                    && l.ends_with(" 1")),
            "{text}"
        );
        assert!(
            !text
                .lines()
                .any(|l| l.starts_with("istio_tcp_connections_opened_total")),
            "{text}"
        );
    }
}
