//! `mesh-agent node`: the per-node agent. Loads the data path, installs its routing, binds the
//! capture listeners, follows the configuration (reloaded when the file changes) and hands each
//! captured connection to a handler.
//!
//! When the agent stops, the data path stays attached on purpose: captured pods' new connections
//! are then refused (no listener), never let out uncaptured. `--uninstall` removes it all.

pub mod admission;
pub mod config_file;
mod direct;
pub mod handler;
mod inbound;
pub mod mesh;
mod outbound;
mod snapshot_map;
mod sockets;
pub mod source;
pub mod state;
mod succession;
pub mod telemetry;
mod update;
pub mod workers;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use mesh_common::FlowKind;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

pub use crate::admin::AdminAddrs;
pub use handler::HandlerMode;

use crate::{
    admin::{AdminState, Readiness},
    capture::{
        self, BpffsLayout, CaptureController, DesiredCapture, FlowTable, PodCapture, listeners,
        routing,
    },
    discovery::LocalConfig,
    hbone::server::ServerContext,
    identity::{CertManager, CertificateIssuer},
    logging::LogControl,
    metrics::{Metrics, NodeSources},
    policy::{Enforcer, PolicyAuthorizer},
};

/// Options of `mesh-agent node`.
#[derive(Clone)]
pub struct NodeOptions {
    /// A local config file, or Kubernetes.
    pub config: ConfigOrigin,
    pub bpffs_dir: PathBuf,
    pub handler: HandlerMode,
    /// How often the config file is checked for changes.
    pub reload_interval: Duration,
    /// Splice this node's pod<->agent hops with sockmap (needs cgroup v2 and the pods' cgroups).
    pub splice: bool,
    /// Bound on the bytes redirected into one spliced socket and not yet read.
    pub splice_queue_bytes: u64,
    /// The process's log filter (the admin API changes it).
    pub log: LogControl,
    /// Ports of the admin, metrics and readiness endpoints.
    pub admin: AdminAddrs,
    /// The mesh CA to ask for certificates (Kubernetes mode); None: the config's `ca` files.
    pub ca_service: Option<CaServiceOptions>,
    /// On SIGTERM/SIGINT, how long live connections may take to finish before the agent exits.
    pub drain: Duration,
    /// The runtime's worker threads and why that many (reported by the admin API).
    pub worker_threads: workers::WorkerChoice,
    /// `--max-memory-mib`: above the cap new connections are refused (`crate::memory_cap`).
    pub memory_cap: crate::memory_cap::MemoryCapChoice,
}

/// Where the mesh CA is and how to authenticate to it.
#[derive(Clone, Debug)]
pub struct CaServiceOptions {
    /// `https://host:port`.
    pub address: String,
    /// The mesh root certificate (PEM file).
    pub root: PathBuf,
    /// The projected service-account token (file, re-read per request).
    pub token: PathBuf,
}

/// Where the configuration comes from.
#[derive(Clone, Debug)]
pub enum ConfigOrigin {
    File(PathBuf),
    Kube(source::KubeSource),
}

/// The capture's desired state for this node from a local configuration.
pub fn desired_capture(config: &LocalConfig, agent_cgroup: Option<&Path>) -> DesiredCapture {
    let mut desired = DesiredCapture {
        uplinks: config.node.uplinks.clone(),
        agent_cgroup: agent_cgroup.map(Path::to_owned),
        ..DesiredCapture::default()
    };
    for w in config.local_pods() {
        let Some(iface) = &w.host_interface else {
            continue;
        };
        let pod = PodCapture {
            key: format!("{}/{}", w.namespace, w.name),
            host_iface: iface.to_string(),
            ips: w.ips.to_vec(),
            cgroup: w.cgroup.as_deref().map(Path::to_path_buf),
        };
        if config.is_enrolled(w) {
            desired.enrolled.push(pod);
        } else {
            desired.bystanders.push(pod);
        }
    }
    desired
}

/// Runs the node agent until SIGINT/SIGTERM.
pub async fn run(opts: NodeOptions) -> anyhow::Result<()> {
    let layout = BpffsLayout::new(&opts.bpffs_dir);
    // Before anything slow: a running agent closes its endpoints for us at once.
    let claim = CaptureController::claim(&layout)?;
    let mut source = match &opts.config {
        ConfigOrigin::File(path) => source::Source::file(path, opts.reload_interval),
        ConfigOrigin::Kube(k) => source::Source::kube(k).await?,
    };
    let config = source.initial().await?;
    let readiness = Arc::new(Readiness::new());
    readiness.config(None);
    // What can fail on a bad configuration fails here, before a running agent hands over.
    let identity = match opts.handler {
        HandlerMode::Mesh => Some(mesh_identity(&config, opts.ca_service.as_ref())?),
        _ => None,
    };
    // The data path's lock (a running agent hands it over now that we are ready): until then
    // this agent touches nothing.
    let mut controller = CaptureController::start(layout.clone(), claim)?;
    routing::ensure().context("installing the capture's policy routing")?;
    let (agent_cgroup, splice) = match splice_cgroup(opts.splice) {
        Err(why) => (None, format!("off: {why}")),
        Ok(own) => match controller.enable_splice(opts.splice_queue_bytes) {
            Ok(()) => (
                Some(own),
                format!(
                    "on: at most {} KiB queued per socket",
                    opts.splice_queue_bytes >> 10
                ),
            ),
            Err(e) => {
                let e = format!("{e:#}");
                warn!(
                    error = e,
                    "same-node splicing is off: this kernel cannot bound it"
                );
                (None, format!("off: this kernel cannot bound it ({e})"))
            }
        },
    };
    direct::set_kernel_splice(agent_cgroup.is_none());
    let first = controller.reconcile(&desired_capture(&config, agent_cgroup.as_deref()));
    log_state(&controller, &config, first.errors.len());

    let mesh_state = mesh::MeshState::shared(&config);
    let policies = config.compile_policies();
    policies.log();
    // Reading a large configuration freed most of what it allocated: hand it back before
    // saying ready (the periodic trim would, seconds later).
    release_free_memory();
    let enforcer = Enforcer::new(policies);
    let pool = identity.as_ref().map(|(issuer, _)| {
        crate::hbone::client::Pool::new(issuer.roots(), mesh::transparent_connector())
    });
    let metrics = Metrics::new(Some(NodeSources {
        maps: capture::PinnedMaps::new(&layout.maps()),
        view: controller.view(),
        enforcer: Arc::clone(&enforcer),
        certs: identity.as_ref().map(|(_, c)| Arc::clone(c)),
        pool: pool.clone(),
        runtime: tokio::runtime::Handle::current(),
    }));
    let telemetry = telemetry::Telemetry::new(Arc::clone(&metrics), Arc::clone(&mesh_state));
    // Before anything accepts: above the cap, every listener refuses new connections.
    let (memory_limit, memory_cap) = opts.memory_cap.resolve();
    info!(cap = %memory_cap, "memory cap (new connections are refused above it)");
    let memory = crate::memory_cap::MemoryCap::new(memory_limit);
    memory.spawn_sampler();
    let mesh = match (&identity, &pool) {
        (Some((issuer, certs)), Some(pool)) => Some(Arc::new(mesh::MeshContext {
            state: Arc::clone(&mesh_state),
            certs: Arc::clone(certs),
            pool: Arc::clone(pool),
            server: Arc::new(ServerContext {
                roots: issuer.roots(),
                trust_domain: issuer.trust_domain(),
                authorizer: Arc::new(PolicyAuthorizer(Arc::clone(&enforcer))),
                connector: mesh::transparent_connector(),
                telemetry: {
                    let t = Arc::clone(&telemetry);
                    Arc::new(move |peer, client, dst, hbone, host| {
                        t.inbound_hbone(peer, client, dst, hbone, host)
                    })
                },
                limits: Default::default(),
                counters: Arc::clone(&metrics.hbone_server),
                upstreams: Default::default(),
                goaway: Default::default(),
                memory: Arc::clone(&memory),
            }),
            enforcer: Arc::clone(&enforcer),
            telemetry: Arc::clone(&telemetry),
        })),
        _ => None,
    };
    let ctx = Arc::new(handler::HandlerContext {
        mode: opts.handler,
        flows: FlowTable::open(&layout.maps())?,
        view: controller.view(),
        mesh,
        enforcer: Arc::clone(&enforcer),
        telemetry,
    });
    // Before any listener: the limits are derived from the open-files limit.
    let admission = admission::start(Arc::clone(&metrics.admission), Arc::clone(&memory));
    let kinds = [
        FlowKind::Outbound,
        FlowKind::InboundPlaintext,
        FlowKind::InboundHbone,
    ];
    let bound = listeners::bind_all(&kinds, 4096)?;
    controller.register_listeners(&bound)?;
    for l in bound {
        let (ctx, admission) = (Arc::clone(&ctx), Arc::clone(&admission));
        tokio::spawn(async move {
            loop {
                match l.listener.accept().await {
                    Ok((stream, peer)) => match admission.admit(l.kind, peer.ip()) {
                        Ok(admitted) => {
                            tokio::spawn(handler::handle(
                                Arc::clone(&ctx),
                                (stream, peer),
                                l.kind,
                                admitted,
                            ));
                        }
                        Err(_) => handler::refuse(&ctx, (stream, peer)),
                    },
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning; the connection
                        // waits in the backlog until descriptors free up.
                        admission.accept_failed(l.kind, &e);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
    }
    readiness.capture(reconcile_problem(&first));
    let certs = identity.as_ref().map(|(_, c)| Arc::clone(c));
    let prefetch = update::Prefetch::new(certs.clone(), Arc::clone(&readiness));
    prefetch.start(&config);
    let admin = Arc::new(AdminState {
        handler: handler::mode_name(opts.handler),
        layout: layout.clone(),
        config: {
            let in_force = source.config_in_force();
            *in_force.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
            in_force
        },
        view: controller.view(),
        enforcer: Arc::clone(&enforcer),
        certs: certs.clone(),
        pool,
        metrics: Arc::clone(&metrics),
        readiness: Arc::clone(&readiness),
        log: opts.log.clone(),
        runtime: crate::admin::RuntimeSummary {
            worker_threads: opts.worker_threads.clone(),
            splice,
            memory_cap,
        },
    });
    let endpoints = crate::admin::start(Arc::clone(&admin), opts.admin)
        .context("starting the admin, metrics and readiness endpoints")?;
    let mut succession = succession::Succession::new(endpoints, Arc::clone(&admin), opts.admin);
    source.applied(&admin.config.read().unwrap_or_else(|e| e.into_inner()));
    info!(handler = ?opts.handler, config = %source.describe(), bpffs = %layout.root.display(), "node agent ready");
    let updater = update::Updater {
        mesh_state,
        enforcer,
        agent_cgroup,
        metrics: Arc::clone(&metrics),
        readiness: Arc::clone(&readiness),
        prefetch,
        admin: Arc::clone(&admin),
    };

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut trim = tokio::time::interval(MEMORY_TRIM_INTERVAL);
    let mut node_addrs = tokio::time::interval(NODE_ADDRS_INTERVAL);
    let mut successor = tokio::time::interval(SUCCESSOR_POLL);
    let mut splice_sweep = tokio::time::interval(SPLICE_SWEEP_INTERVAL);
    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = trim.tick() => release_free_memory(),
            _ = successor.tick() => succession.poll(&mut controller, &ctx, &metrics),
            _ = splice_sweep.tick() => {
                if let Err(e) = controller.sweep_splice() {
                    warn!(error = format!("{e:#}"), "splice entries not swept");
                }
            }
            _ = node_addrs.tick() => {
                if let Err(e) = controller.sync_node_addresses() {
                    warn!(error = %e, "node addresses not updated");
                }
                match controller.retire_time_wait() {
                    Ok(n) => {
                        metrics.control.time_wait_destroyed.inc_by(n as u64);
                    }
                    Err(e) => warn!(error = %e, "TIME_WAIT sockets not retired"),
                }
            }
            next = source.next() => {
                if let Err(e) = next.and_then(|update| updater.apply(&mut controller, &source, update)) {
                    // Keep serving the last good configuration.
                    source.refused();
                    metrics.control.config_rejected(e.reason());
                    error!(source = %source.describe(), reason = e.reason(), error = %e,
                        "configuration rejected; keeping the previous one");
                }
            }
        }
    }
    source.stop().await;
    drain(
        &metrics,
        &readiness,
        opts.drain,
        [&mut sigterm, &mut sigint],
        || succession.poll(&mut controller, &ctx, &metrics),
    )
    .await;
    info!(
        "stopping; the data path stays attached (captured pods' new connections are refused until an agent is back)"
    );
    Ok(())
}

/// Shutting down: readiness turns false at once (a rollout sees it), connections keep flowing
/// and new ones are still served, until none is left or `limit` has passed. A second signal
/// ends it at once. `successor` runs every 100 ms: a successor arriving now still gets the
/// data path.
async fn drain(
    metrics: &Metrics,
    readiness: &Readiness,
    limit: Duration,
    signals: [&mut tokio::signal::unix::Signal; 2],
    successor: impl FnMut(),
) {
    readiness.draining();
    let live = metrics.traffic.in_flight();
    if live > 0 {
        info!(
            connections = live,
            limit_s = limit.as_secs_f64(),
            "draining"
        );
    }
    let open = || usize::try_from(metrics.traffic.in_flight()).unwrap_or(0);
    let times = crate::drain::DrainTimes {
        accept_for: Duration::ZERO,
        limit,
    };
    let drained =
        crate::drain::until_drained(open, times, SUCCESSOR_POLL, signals, successor).await;
    if let crate::drain::Drained::TimeOver { open } = drained {
        warn!(
            connections = open,
            "drain time over: closing the connections still open"
        );
    }
}

/// Readiness wording for a reconciliation.
fn reconcile_problem(report: &capture::ReconcileReport) -> Option<String> {
    match report.errors.as_slice() {
        [] => None,
        [one] => Some(one.clone()),
        [first, rest @ ..] => Some(format!("{first} (and {} more)", rest.len())),
    }
}

/// The identity side of the `mesh` handler (and of a waypoint): the mesh CA over gRPC, or a CA
/// from files.
pub fn mesh_identity(
    config: &LocalConfig,
    service: Option<&CaServiceOptions>,
) -> anyhow::Result<(Arc<dyn CertificateIssuer>, Arc<CertManager>)> {
    use crate::identity::{LocalCa, LocalIssuer};
    if let Some(s) = service {
        let root = std::fs::read_to_string(&s.root)
            .with_context(|| format!("reading the mesh root {}", s.root.display()))?;
        let issuer: Arc<dyn CertificateIssuer> = Arc::new(
            crate::ca::client::GrpcIssuer::new(
                &s.address,
                &root,
                s.token.clone(),
                &config.node.trust_domain,
            )
            .with_context(|| format!("the mesh CA at {}", s.address))?,
        );
        let certs = CertManager::new(Arc::clone(&issuer), Duration::from_secs(86_400));
        return Ok((issuer, certs));
    }
    let ca = config.ca.as_ref().context(
        "the mesh handler needs a CA: add `ca: {dir: ...}` to the config (`mesh-agent ca init --out DIR` makes one), or run with --handler passthrough",
    )?;
    let local = LocalCa::from_dir(&ca.dir, &config.node.trust_domain)
        .with_context(|| format!("loading the CA from {}", ca.dir.display()))?;
    let issuer: Arc<dyn CertificateIssuer> = Arc::new(LocalIssuer::new(Arc::new(local)));
    let certs = CertManager::new(
        Arc::clone(&issuer),
        Duration::from_secs(ca.cert_ttl_seconds),
    );
    Ok((issuer, certs))
}

/// Heap settings for a long-running proxy (glibc). Buffers of 256 KiB and more come from their
/// own mappings and go back to the kernel when freed. With glibc's default (a threshold that
/// rises to the largest buffer ever freed) large buffers were carved from the heap and
/// stranded there by small live allocations between them: 12 MB of arena for 137 KB in use
/// after a 16-stream transfer, which `malloc_trim` cannot release. The relays' buffers stay
/// below the threshold (64 KiB chunks, see `hbone::relay`), so this costs no mapping per read.
pub fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator parameters; called before the runtime starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 10);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// How often freed heap memory is handed back to the kernel.
const MEMORY_TRIM_INTERVAL: Duration = Duration::from_secs(2);
/// The agent's own cgroup, where its side of splicing attaches, or why splicing stays off.
/// (The pods' side attaches to each enrolled pod's cgroup: from the config file, or found by
/// the pod's UID under `--pod-cgroup-root` in Kubernetes mode.)
fn splice_cgroup(splice: bool) -> Result<PathBuf, String> {
    if !splice {
        return Err("--splice=off".into());
    }
    capture::cgroup::own_cgroup().ok_or_else(|| {
        warn!("no cgroup v2 membership found: same-node splicing is off");
        "no cgroup v2 membership found".to_owned()
    })
}

/// How often splice entries of sockets that closed unseen are looked for (a walk of two maps).
const SPLICE_SWEEP_INTERVAL: Duration = Duration::from_secs(60);
/// How often the agent checks whether a successor is waiting for the data path.
const SUCCESSOR_POLL: Duration = Duration::from_millis(100);
/// How often the node's own addresses are re-read into the data path between reconciliations.
const NODE_ADDRS_INTERVAL: Duration = Duration::from_secs(5);

/// Returns freed heap memory to the kernel. glibc keeps what a burst of connections allocated
/// (TLS and HTTP/2 buffers) in its arenas; without this an idle agent keeps the RSS of its
/// busiest moment (bench: 23.8 MiB idle after load against 11.6 MiB before).
fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory; it is safe to call at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn log_state(controller: &CaptureController, config: &LocalConfig, errors: usize) {
    let view = controller.view().load_full();
    let mut enrolled: Vec<_> = view.by_ifindex.values().map(|p| p.key.clone()).collect();
    enrolled.sort();
    info!(node = %config.node.name, enrolled = ?enrolled, errors, "capture reconciled");
}

/// `mesh-agent node --uninstall`: removes every kernel object the capture owns.
pub fn uninstall(bpffs_dir: &Path) -> anyhow::Result<()> {
    capture::remove_all(&BpffsLayout::new(bpffs_dir))
}

/// `mesh-agent node --explain-datapath`.
pub fn explain(bpffs_dir: &Path) -> anyhow::Result<String> {
    capture::explain(&BpffsLayout::new(bpffs_dir))
}
