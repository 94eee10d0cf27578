//! Connection admission figures (`node::admission`): every refusal by listener and reason, the
//! HBONE handshakes in flight and the file-descriptor budget. Bumped by the accept loops
//! (atomics only), read at scrape time.
use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

/// Why the agent refused (or could not accept) a connection.
pub const REFUSAL_REASONS: [&str; 6] = [
    "handshake_per_source",
    "handshake_global",
    "pending_per_source",
    "fd_reserve",
    "memory",
    "accept_error",
];

/// The capture listeners, as `handler::listener_name` spells them.
pub const LISTENERS: [&str; 3] = ["outbound", "inbound_plaintext", "inbound_hbone"];

/// The agent's HTTP endpoints (`admin::limits`), and why they refuse.
pub const ENDPOINT_LISTENERS: [&str; 3] = ["admin", "metrics", "readiness"];
pub const ENDPOINT_REFUSAL_REASONS: [&str; 2] = ["endpoint_per_source", "endpoint_global"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub listener: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Default)]
pub struct AdmissionMetrics {
    /// Connections refused (reset at once) or not accepted, by listener and reason.
    pub refused: Family<RefusalLabels, Counter>,
    /// HBONE TLS handshakes in progress.
    pub handshakes: Gauge,
    /// Descriptors inbound connections hold (two per connection: its socket and its upstream).
    pub inbound_fds: Gauge,
    /// The most `inbound_fds` may reach: the open-files limit minus the reserve.
    pub inbound_fd_budget: Gauge,
    /// The agent's open-files limit (RLIMIT_NOFILE soft, after raising it).
    pub fd_limit: Gauge,
}

impl AdmissionMetrics {
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let m = Self::default();
        // Every series exists from the start (at 0), so rates and alerts have one to read.
        for listener in LISTENERS {
            for reason in REFUSAL_REASONS {
                let _ = m.refused.get_or_create(&RefusalLabels { listener, reason });
            }
        }
        for listener in ENDPOINT_LISTENERS {
            for reason in ENDPOINT_REFUSAL_REASONS {
                let _ = m.refused.get_or_create(&RefusalLabels { listener, reason });
            }
        }
        registry.register(
            "mesh_connections_refused",
            "Connections the agent refused to protect itself (reset at once) or failed to accept, by listener and reason",
            m.refused.clone(),
        );
        registry.register(
            "mesh_hbone_handshakes_in_flight",
            "Inbound HBONE TLS handshakes in progress",
            m.handshakes.clone(),
        );
        registry.register(
            "mesh_inbound_fds",
            "File descriptors held by inbound (15006/15008) connections, two per connection",
            m.inbound_fds.clone(),
        );
        registry.register(
            "mesh_inbound_fd_budget",
            "The most file descriptors inbound connections may hold (the open-files limit minus the reserve)",
            m.inbound_fd_budget.clone(),
        );
        registry.register(
            "mesh_fd_limit",
            "The agent's open-files limit (RLIMIT_NOFILE, raised to the hard limit at start)",
            m.fd_limit.clone(),
        );
        Arc::new(m)
    }

    pub fn refused(&self, listener: &'static str, reason: &'static str) {
        self.refused
            .get_or_create(&RefusalLabels { listener, reason })
            .inc();
    }
}
