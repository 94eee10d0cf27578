//! Istio's request metrics, as a waypoint reports them (`reporter="waypoint"`):
//! `istio_requests_total` and `istio_request_duration_milliseconds`, labelled by workloads,
//! service, response code and Envoy's response flags. Labels name workloads and services,
//! never addresses or paths, so their number stays bounded.
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

/// One request's labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_canonical_service: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_canonical_service: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub request_protocol: &'static str,
    pub response_code: u16,
    pub response_flags: String,
    pub connection_security_policy: &'static str,
}

impl RequestLabels {
    /// The same labels with every value escaped for the exposition ([`super::label_value`]):
    /// what a request carries (its host) and what peers' certificates say must not be able
    /// to break the scrape.
    pub fn escaped(self) -> Self {
        let e = |v: String| super::label_value(&v);
        Self {
            source_workload: e(self.source_workload),
            source_workload_namespace: e(self.source_workload_namespace),
            source_principal: e(self.source_principal),
            source_canonical_service: e(self.source_canonical_service),
            destination_workload: e(self.destination_workload),
            destination_workload_namespace: e(self.destination_workload_namespace),
            destination_principal: e(self.destination_principal),
            destination_canonical_service: e(self.destination_canonical_service),
            destination_service: e(self.destination_service),
            destination_service_name: e(self.destination_service_name),
            destination_service_namespace: e(self.destination_service_namespace),
            response_flags: e(self.response_flags),
            ..self
        }
    }
}

/// The families.
pub struct RequestMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Family<RequestLabels, Histogram, fn() -> Histogram>,
}

/// Istio's default buckets for request durations, milliseconds.
const DURATION_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

impl RequestMetrics {
    /// Registers under `istio` (the caller's `istio_` prefixed registry).
    pub fn register(istio: &mut Registry) -> std::sync::Arc<Self> {
        let requests = Family::<RequestLabels, Counter>::default();
        istio.register("requests", "Requests handled", requests.clone());
        let duration = Family::<RequestLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            duration_histogram,
        );
        istio.register(
            "request_duration_milliseconds",
            "Time from the request's arrival to the response headers, milliseconds",
            duration.clone(),
        );
        std::sync::Arc::new(Self { requests, duration })
    }

    /// Counts one request that took `millis` (its label values escaped here, so that no caller
    /// can forget).
    pub fn record(&self, labels: RequestLabels, millis: f64) {
        let labels = labels.escaped();
        self.requests.get_or_create(&labels).inc();
        self.duration.get_or_create(&labels).observe(millis);
    }
}
