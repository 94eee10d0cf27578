//! Prometheus metrics of the node agent, in Istio's names where Istio has one (so its dashboards
//! and Kiali work) and `mesh_*` for our own node-level figures. See docs/ARCHITECTURE.md
//! "Observability".
//!
//! The data path only bumps counters (atomics); everything else is read at scrape time by
//! [`node::NodeCollector`], on the admin thread, never on the data-path runtime.
pub mod admission;
pub mod node;
pub mod process;
pub mod requests;
pub mod traffic;

use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};

pub use admission::AdmissionMetrics;
pub use node::{ControlCounters, NodeCollector, NodeSources};
pub use traffic::{
    AccessInfo, ConnectionTelemetry, Outcome, PeerInfo, Reporter, ResponseFlags, SecurityPolicy,
    ServiceInfo, TrafficLabels, TrafficMetrics,
};

/// A label value as the text exposition needs it: backslash, double quote and line feed
/// escaped. prometheus-client (0.24) writes label values as given (prometheus/client_rust#151),
/// so one value carrying a quote or a newline would make the whole scrape unparseable, or add
/// samples of its own; label sets holding values from configuration, certificates or requests
/// hold them escaped.
pub fn label_value(v: &str) -> String {
    if !v.bytes().any(|b| matches!(b, b'\\' | b'"' | b'\n')) {
        return v.to_owned();
    }
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Counts the bytes a relay moves, by Istio's direction.
pub trait Meter: Sync {
    /// Client-to-server bytes.
    fn request(&self, n: u64);
    /// Server-to-client bytes.
    fn response(&self, n: u64);
}

/// Counts nothing.
pub struct NoMeter;

impl Meter for NoMeter {
    fn request(&self, _: u64) {}
    fn response(&self, _: u64) {}
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    component: &'static str,
    tag: &'static str,
}

/// Every metric of one agent.
pub struct Metrics {
    registry: Registry,
    pub traffic: Arc<TrafficMetrics>,
    pub control: Arc<ControlCounters>,
    /// The HBONE server's refusals (its limits past TLS).
    pub hbone_server: Arc<crate::hbone::limits::ServerCounters>,
    /// Connection admission (refusals, handshakes in flight, the fd budget).
    pub admission: Arc<AdmissionMetrics>,
}

impl Metrics {
    /// The registry with the traffic families, the control counters, `istio_build` and, when
    /// given, the node collector.
    pub fn new(node: Option<NodeSources>) -> Arc<Self> {
        let mut registry = Registry::default();
        let istio = registry.sub_registry_with_prefix("istio");
        let traffic = TrafficMetrics::register(istio);
        let build = Family::<BuildLabels, Gauge>::default();
        istio.register(
            "build",
            "Istio component build info (component, version tag)",
            build.clone(),
        );
        build
            .get_or_create(&BuildLabels {
                component: "mesh-agent",
                tag: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        let control = ControlCounters::register(&mut registry);
        let hbone_server = crate::hbone::limits::ServerCounters::register(&mut registry);
        let admission = AdmissionMetrics::register(&mut registry);
        if let Some(sources) = node {
            registry.register_collector(Box::new(NodeCollector::new(sources)));
        }
        Arc::new(Self {
            registry,
            traffic,
            control,
            hbone_server,
            admission,
        })
    }

    /// The exposition (OpenMetrics text, which Prometheus scrapes natively).
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 << 10);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The content type of [`Metrics::encode`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
