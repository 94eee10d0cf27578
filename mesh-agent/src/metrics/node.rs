//! Node-level metrics read at scrape time (`mesh_*`, `process_*`, `tokio_*`): nothing here is
//! touched by the data path, which only bumps the traffic counters and the eBPF programs' own
//! per-CPU counters.
use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use aya::maps::{MapData, PerCpuArray};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::ConstGauge,
        histogram::Histogram,
    },
    registry::Registry,
};

use crate::{
    capture::{PinnedMaps, SharedCaptureView, inspect::MapOccupancy},
    ebpf::{CounterSnapshot, read_counters},
    hbone::client::Pool,
    identity::CertManager,
    policy::Enforcer,
};

/// Keys counted at most per map.
const OCCUPANCY_LIMIT: u64 = 8192;
/// How long a map occupancy reading is reused: counting walks every bucket of a map (a scrape
/// loop spent 38% of the agent's CPU in `htab_map_get_next_key`), and occupancy moves slowly.
const OCCUPANCY_TTL: Duration = Duration::from_secs(10);

/// Counters the control loop bumps.
#[derive(Clone)]
pub struct ControlCounters {
    /// Config loads by outcome (`applied`, `rejected`).
    pub config_reloads: Family<OutcomeLabels, Counter>,
    /// Refused configurations by reason (`syntax`, `invalid`, `unenrolls_all`, ...).
    pub config_rejections: Family<ReasonLabels, Counter>,
    /// Items a capture reconciliation could not apply.
    pub reconcile_errors: Counter,
    /// TIME_WAIT sockets of pods that left the mesh, destroyed so the pods' new connections
    /// are not dropped by the node.
    pub time_wait_destroyed: Counter,
    /// Time to apply a configuration change, by kind (`delta`: workloads and Services changed
    /// in place; `full`: everything rebuilt).
    pub apply_seconds: Family<KindLabels, Histogram, fn() -> Histogram>,
}

impl Default for ControlCounters {
    fn default() -> Self {
        Self {
            config_reloads: Family::default(),
            config_rejections: Family::default(),
            reconcile_errors: Counter::default(),
            time_wait_destroyed: Counter::default(),
            apply_seconds: Family::new_with_constructor(apply_histogram),
        }
    }
}

fn apply_histogram() -> Histogram {
    Histogram::new([
        0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
        2.5, 5.0,
    ])
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

impl ControlCounters {
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let c = Self::default();
        // Both outcomes exist from the start (at 0), so rates and alerts have a series.
        for outcome in ["applied", "rejected"] {
            let _ = c.config_reloads.get_or_create(&OutcomeLabels { outcome });
        }
        registry.register(
            "mesh_config_reloads",
            "Configuration loads by outcome (applied, rejected)",
            c.config_reloads.clone(),
        );
        registry.register(
            "mesh_time_wait_sockets_destroyed",
            "TIME_WAIT sockets of pods that left the mesh, destroyed so their new connections are not dropped",
            c.time_wait_destroyed.clone(),
        );
        registry.register(
            "mesh_config_rejections",
            "Configurations refused (the previous one kept serving) by reason",
            c.config_rejections.clone(),
        );
        registry.register(
            "mesh_config_apply_seconds",
            "Time to apply a configuration change, by kind (delta: in place; full: rebuilt)",
            c.apply_seconds.clone(),
        );
        registry.register(
            "mesh_capture_reconcile_errors",
            "Items a capture reconciliation could not apply (interfaces, attachments, map entries)",
            c.reconcile_errors.clone(),
        );
        Arc::new(c)
    }

    pub fn config(&self, applied: bool) {
        let outcome = if applied { "applied" } else { "rejected" };
        self.config_reloads
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// A change applied in `elapsed`.
    pub fn applied(&self, kind: &'static str, elapsed: Duration) {
        self.config(true);
        self.apply_seconds
            .get_or_create(&KindLabels { kind })
            .observe(elapsed.as_secs_f64());
    }

    /// A refused configuration: `rejected` in `mesh_config_reloads` and its reason.
    pub fn config_rejected(&self, reason: &'static str) {
        self.config(false);
        self.config_rejections
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }
}

/// What the collector reads from.
pub struct NodeSources {
    /// The agent's pinned maps (`<bpffs>/maps`).
    pub maps: PinnedMaps,
    pub view: SharedCaptureView,
    pub enforcer: Arc<Enforcer>,
    /// Present in mesh mode.
    pub certs: Option<Arc<CertManager>>,
    pub pool: Option<Arc<Pool>>,
    /// The data-path runtime.
    pub runtime: tokio::runtime::Handle,
}

/// The scrape-time collector.
pub struct NodeCollector {
    sources: NodeSources,
    cache: Mutex<ScrapeCache>,
}

/// What a scrape keeps for the next one.
#[derive(Default)]
struct ScrapeCache {
    counters: Option<PerCpuArray<MapData, u64>>,
    occupancy: Option<(Instant, Vec<MapOccupancy>)>,
}

impl std::fmt::Debug for NodeCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeCollector")
    }
}

impl NodeCollector {
    pub fn new(sources: NodeSources) -> Self {
        Self {
            sources,
            cache: Mutex::default(),
        }
    }

    /// The eBPF counters, through a map handle kept open between scrapes.
    fn counters(&self, cache: &mut ScrapeCache) -> Option<CounterSnapshot> {
        if cache.counters.is_none() {
            cache.counters = self.sources.maps.counters_map().ok();
        }
        match read_counters(cache.counters.as_ref()?) {
            Ok(s) => Some(s),
            Err(_) => {
                // The pinned map was replaced (an uninstall): reopen next time.
                cache.counters = None;
                None
            }
        }
    }

    fn occupancy(&self, cache: &mut ScrapeCache) -> Vec<MapOccupancy> {
        match &cache.occupancy {
            Some((at, v)) if at.elapsed() < OCCUPANCY_TTL => v.clone(),
            _ => {
                let v = self.sources.maps.occupancy(OCCUPANCY_LIMIT);
                cache.occupancy = Some((Instant::now(), v.clone()));
                v
            }
        }
    }
}

fn gauge<S: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (S, f64)>,
) -> Result<(), std::fmt::Error> {
    let mut m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in values {
        ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn counter<S: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (S, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in values {
        ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A gauge or counter without labels.
fn single(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    v: f64,
) -> Result<(), std::fmt::Error> {
    let m = encoder.encode_descriptor(name, help, None, kind)?;
    match kind {
        MetricType::Counter => ConstCounter::new(v).encode(m),
        _ => ConstGauge::new(v).encode(m),
    }
}

type L1 = [(&'static str, String); 1];
type L3 = [(&'static str, String); 3];

impl Collector for NodeCollector {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let s = &self.sources;
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        // eBPF counters by reason (pinned per-CPU array, summed).
        if let Some(snapshot) = self.counters(&mut cache) {
            counter(
                &mut e,
                "mesh_ebpf_events",
                "Data-path events counted by the eBPF programs, by reason",
                mesh_common::Counter::ALL.iter().map(|c| {
                    let v: L1 = [("reason", c.name().to_owned())];
                    (v, snapshot.get(*c))
                }),
            )?;
        }
        let occupancy = self.occupancy(&mut cache);
        drop(cache);
        gauge(
            &mut e,
            "mesh_bpf_map_entries",
            "Entries in each eBPF hash map (counted up to 8192, refreshed every 10 s)",
            occupancy.iter().map(|o| {
                let v: L1 = [("map", o.name.to_owned())];
                (v, o.entries as f64)
            }),
        )?;
        gauge(
            &mut e,
            "mesh_bpf_map_capacity",
            "Capacity (max entries) of each eBPF hash map",
            occupancy.iter().map(|o| {
                let v: L1 = [("map", o.name.to_owned())];
                (v, o.capacity as f64)
            }),
        )?;
        let enrolled = s.view.load().by_ifindex.len();
        single(
            &mut e,
            "mesh_enrolled_pods",
            "Pods of this node whose traffic is captured",
            MetricType::Gauge,
            enrolled as f64,
        )?;

        // Policy.
        counter(
            &mut e,
            "mesh_policy_decisions",
            "Inbound connection decisions by decision (allow, deny, audit), policy and reason",
            s.enforcer.decision_counts().into_iter().map(|(k, v)| {
                let labels: L3 = [
                    ("decision", k.decision.to_owned()),
                    (
                        "policy",
                        if k.policy.is_empty() {
                            "-".into()
                        } else {
                            k.policy
                        },
                    ),
                    ("reason", k.reason.to_owned()),
                ];
                (labels, v)
            }),
        )?;
        single(
            &mut e,
            "mesh_policy_revoked_connections",
            "Live connections closed because a policy change denied them",
            MetricType::Counter,
            s.enforcer.revoked_connections() as f64,
        )?;
        let set = s.enforcer.current();
        gauge(
            &mut e,
            "mesh_policies",
            "Policy objects in force by kind, and those rejected as invalid",
            [
                (
                    [("kind", "AuthorizationPolicy".to_owned())],
                    set.authorization_policies as f64,
                ),
                (
                    [("kind", "PeerAuthentication".to_owned())],
                    set.peer_authentications as f64,
                ),
                ([("kind", "rejected".to_owned())], set.errors.len() as f64),
            ],
        )?;

        // Certificates.
        if let Some(certs) = &s.certs {
            let held = certs.held();
            single(
                &mut e,
                "mesh_certificates",
                "Workload certificates held",
                MetricType::Gauge,
                held.len() as f64,
            )?;
            let now = SystemTime::now();
            gauge(
                &mut e,
                "mesh_certificate_expiry_seconds",
                "Seconds until each workload certificate expires",
                held.into_iter().map(|(id, not_after)| {
                    let left = match not_after.duration_since(now) {
                        Ok(d) => d.as_secs_f64(),
                        Err(e) => -e.duration().as_secs_f64(),
                    };
                    let v: L1 = [("identity", id.uri())];
                    (v, left)
                }),
            )?;
            let (ok, failed) = certs.request_outcomes();
            counter(
                &mut e,
                "mesh_ca_requests",
                "Certificate requests to the CA by outcome",
                [
                    ([("outcome", "success".to_owned())], ok),
                    ([("outcome", "failure".to_owned())], failed),
                ],
            )?;
        }
        if let Some(pool) = &s.pool {
            let stats = pool.stats();
            single(
                &mut e,
                "mesh_hbone_pool_connections",
                "Pooled outbound HBONE (HTTP/2 over mTLS) connections",
                MetricType::Gauge,
                stats.connections as f64,
            )?;
            single(
                &mut e,
                "mesh_hbone_pool_streams",
                "Streams (proxied connections) open on pooled HBONE connections",
                MetricType::Gauge,
                stats.streams as f64,
            )?;
        }
        single(
            &mut e,
            "mesh_inbound_connections",
            "Inbound connections admitted by policy and still open",
            MetricType::Gauge,
            s.enforcer.live_connections() as f64,
        )?;

        // The process.
        let p = super::process::read();
        for (name, help, kind, v) in [
            (
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                MetricType::Counter,
                p.cpu_seconds,
            ),
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                MetricType::Gauge,
                p.resident_bytes as f64,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                MetricType::Gauge,
                p.virtual_bytes as f64,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                MetricType::Gauge,
                p.open_fds as f64,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors",
                MetricType::Gauge,
                p.max_fds as f64,
            ),
            (
                "process_threads",
                "Number of OS threads",
                MetricType::Gauge,
                p.threads as f64,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch in seconds",
                MetricType::Gauge,
                p.start_time_seconds,
            ),
        ] {
            single(&mut e, name, help, kind, v)?;
        }

        // The data-path runtime.
        let rt = s.runtime.metrics();
        single(
            &mut e,
            "tokio_workers",
            "Worker threads of the data-path runtime",
            MetricType::Gauge,
            rt.num_workers() as f64,
        )?;
        single(
            &mut e,
            "tokio_alive_tasks",
            "Tasks alive on the data-path runtime (about one per proxied connection)",
            MetricType::Gauge,
            rt.num_alive_tasks() as f64,
        )?;
        single(
            &mut e,
            "tokio_global_queue_depth",
            "Tasks waiting in the data-path runtime's global queue",
            MetricType::Gauge,
            rt.global_queue_depth() as f64,
        )?;
        let busy: f64 = (0..rt.num_workers())
            .map(|w| rt.worker_total_busy_duration(w).as_secs_f64())
            .sum();
        single(
            &mut e,
            "tokio_worker_busy_seconds",
            "Time the data-path workers spent running tasks",
            MetricType::Counter,
            busy,
        )?;
        Ok(())
    }
}
