//! `mesh-agent waypoint`: the L7 proxy node agents send a bound service's (or pod's) traffic
//! to. It is a mesh workload of its own (its pod's service account and certificate), serves
//! HBONE on 15008 ([`inbound`]), runs each request through the shared L7 engine
//! ([`crate::l7::proxy::Engine`]) and reaches the chosen endpoint over HBONE with its own
//! identity ([`upstream`]). Config (services, pods, Gateways, VirtualServices,
//! DestinationRules, HTTPRoutes) comes from the local config file and is reloaded when it
//! changes; requests in flight finish with the config they started with.
pub mod attach;
pub mod drain;
pub mod inbound;
pub mod state;
pub mod upstream;

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::{Arc, atomic::AtomicUsize},
    time::Duration,
};

use anyhow::Context as _;
use prometheus_client::registry::Registry;
use tracing::{info, warn};

use crate::{
    discovery::{ConfigUpdate, LocalConfig},
    hbone::{
        client::Pool,
        limits::{ServerCounters, ServerLimits},
        server::{ConnectionLayer, serve_connection},
    },
    identity::SpiffeId,
    l7::{
        binding::WaypointRef,
        proxy::{Engine, Routing},
    },
    metrics::requests::RequestMetrics,
    node::config_file::ConfigFile,
};
use state::WaypointState;
use upstream::HboneUpstream;

/// Where a waypoint's configuration comes from.
#[derive(Clone, Debug)]
pub enum WaypointSource {
    /// The local config file (the node agents' schema), reloaded when it changes.
    File(PathBuf),
    /// The Kubernetes API (the node agents' watches; every pod is a remote workload).
    Kube(crate::node::source::KubeSource),
}

/// How to run a waypoint.
#[derive(Clone, Debug)]
pub struct WaypointOptions {
    pub source: WaypointSource,
    /// The mesh CA (Kubernetes mode); without it the config's `ca: {dir}` signs.
    pub ca_service: Option<crate::node::CaServiceOptions>,
    /// The Gateway this process is (`namespace/name`).
    pub gateway: WaypointRef,
    /// This pod's name in the config (its identity and address); default: the first pod
    /// labelled with the Gateway's name.
    pub pod: Option<String>,
    pub hbone_port: u16,
    pub metrics_port: u16,
    pub readiness_port: u16,
    pub reload_interval: Duration,
    /// How a SIGTERM is taken (see [`drain`]).
    pub drain: crate::drain::DrainTimes,
}

/// The configuration feed: a file or the API.
enum Feed {
    File(Box<ConfigFile>, PathBuf),
    /// The watches, and the configuration their deltas apply to.
    Kube(Box<crate::node::source::Source>, Option<Box<LocalConfig>>),
}

impl Feed {
    async fn start(opts: &WaypointOptions) -> anyhow::Result<Self> {
        Ok(match &opts.source {
            WaypointSource::File(path) => Self::File(
                Box::new(ConfigFile::new(
                    path,
                    opts.reload_interval,
                    Duration::from_millis(200),
                )),
                path.clone(),
            ),
            WaypointSource::Kube(k) => {
                Self::Kube(Box::new(crate::node::source::Source::kube(k).await?), None)
            }
        })
    }

    async fn initial(&mut self) -> anyhow::Result<LocalConfig> {
        match self {
            Self::File(file, path) => {
                let text = file
                    .read_initial()
                    .with_context(|| format!("reading {}", path.display()))?;
                Ok(LocalConfig::parse_file(path, &text)?)
            }
            Self::Kube(source, current) => {
                let config = source.initial().await?;
                *current = Some(Box::new(config.clone()));
                Ok(config)
            }
        }
    }

    /// The next configuration; `Err` for one refused (the previous one stays).
    async fn next(&mut self) -> Result<LocalConfig, String> {
        match self {
            Self::File(file, path) => {
                let text = file.next().await;
                LocalConfig::parse_file(path, &text).map_err(|e| e.to_string())
            }
            // The waypoint's state is rebuilt from the whole configuration either way (a delta
            // is applied to the copy kept here first).
            Self::Kube(source, current) => {
                match (source.next().await.map_err(|e| e.to_string())?, current) {
                    (ConfigUpdate::Full(config), current) => {
                        let config = *config;
                        *current = Some(Box::new(config.clone()));
                        Ok(config)
                    }
                    (ConfigUpdate::Delta(delta), Some(current)) => {
                        current.check_delta(&delta).map_err(|e| e.to_string())?;
                        current.apply(&delta);
                        Ok((**current).clone())
                    }
                    (ConfigUpdate::Delta(_), None) => {
                        Err("a change arrived before any configuration".into())
                    }
                }
            }
        }
    }
}

/// The node name a waypoint gives the Kubernetes snapshot: not a valid node name, so no pod is
/// "local" (a waypoint captures nothing; it needs every pod as a remote workload).
pub const NO_NODE: &str = "_waypoint_";

/// Shared by every connection.
pub struct Waypoint {
    state: Arc<arc_swap::ArcSwap<WaypointState>>,
    pub engine: Arc<Engine>,
    pub upstream: Arc<HboneUpstream>,
    pub metrics: Arc<RequestMetrics>,
    /// Round-robin position for opaque TCP.
    tcp_next: AtomicUsize,
    /// Set off by SIGTERM: every connection is asked to let its clients move on.
    pub drain: Arc<drain::Drain>,
}

impl Waypoint {
    fn state(&self) -> Arc<WaypointState> {
        self.state.load_full()
    }
}

/// Who this waypoint is in `config`.
fn own_pod<'a>(
    config: &'a LocalConfig,
    opts: &WaypointOptions,
) -> anyhow::Result<&'a crate::discovery::Workload> {
    let pods = crate::l7::binding::Waypoints::pods(config, &opts.gateway);
    match &opts.pod {
        Some(name) => config
            .workloads
            .iter()
            .find(|w| &w.name == name && w.namespace == opts.gateway.namespace)
            .with_context(|| format!("pod {}/{name} is not in the config", opts.gateway.namespace)),
        None => pods.first().copied().with_context(|| {
            format!(
                "no pod of waypoint {}/{} in the config (label it {}={})",
                opts.gateway.namespace,
                opts.gateway.name,
                crate::l7::binding::GATEWAY_NAME_LABEL,
                opts.gateway.name
            )
        }),
    }
}

/// Runs the waypoint until the process is stopped.
pub async fn run(opts: WaypointOptions) -> anyhow::Result<()> {
    let mut feed = Feed::start(&opts).await?;
    let config = feed.initial().await?;
    let pod = own_pod(&config, &opts)?;
    let me: SpiffeId = config.identity_of(pod);
    let (service, version) = pod.canonical_names();
    let baggage = format!(
        "k8s.cluster.name={},k8s.namespace.name={},k8s.pod.name={},service.name={service},service.version={version}",
        crate::node::mesh::CLUSTER_NAME,
        pod.namespace,
        pod.name
    );
    let (issuer, certs) = crate::node::mesh_identity(&config, opts.ca_service.as_ref())
        .context("the waypoint's identity")?;
    let roots = issuer.roots();
    let own = certs
        .get(&me)
        .await
        .with_context(|| format!("a certificate for {me}"))?;
    let trust_domain = config.node.trust_domain.clone();

    let first = WaypointState::build(&config, &opts.gateway);
    report(&first, &opts.gateway);
    let routing = Routing {
        routes: Arc::clone(&first.routes),
        destinations: Arc::clone(&first.destinations),
    };
    let state = Arc::new(arc_swap::ArcSwap::from_pointee(first));
    // The waypoint is an ordinary pod: its connections leave from its own address.
    let connector: crate::hbone::Connector =
        Arc::new(|_, dst| Box::pin(tokio::net::TcpStream::connect(dst)));
    let pool = Pool::new(roots.clone(), connector);
    let upstream = Arc::new(HboneUpstream::new(
        Arc::clone(&state),
        pool,
        Arc::clone(&certs),
        me.clone(),
        baggage,
    ));
    let mut registry = Registry::default();
    let metrics = RequestMetrics::register(registry.sub_registry_with_prefix("istio"));
    let counters = ServerCounters::register(&mut registry);
    let engine = Arc::new(Engine::new(
        routing.routes,
        routing.destinations,
        Arc::clone(&upstream) as Arc<dyn crate::l7::proxy::Upstream>,
    ));
    let wp = Arc::new(Waypoint {
        state: Arc::clone(&state),
        engine,
        upstream,
        metrics,
        tcp_next: AtomicUsize::new(0),
        drain: Arc::new(drain::Drain::default()),
    });
    let registry = Arc::new(registry);
    serve_admin(
        opts.metrics_port,
        opts.readiness_port,
        registry,
        Arc::clone(&wp.drain),
    )
    .await?;

    let listener = bind_dual(opts.hbone_port)
        .with_context(|| format!("binding the HBONE port {}", opts.hbone_port))?;
    info!(gateway = %format!("{}/{}", opts.gateway.namespace, opts.gateway.name), identity = %me,
        port = opts.hbone_port, "waypoint serving");
    let limits = Arc::new(ServerLimits::default());
    let accept = {
        let wp = Arc::clone(&wp);
        let certs = Arc::clone(&certs);
        let me = me.clone();
        async move {
            loop {
                let (tcp, _) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(error = %e, "waypoint: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let cert = match certs.get(&me).await {
                    Ok(c) => Arc::clone(&c.key),
                    Err(_) => Arc::clone(&own.key),
                };
                let (wp, roots, limits, counters, td, me) = (
                    Arc::clone(&wp),
                    roots.clone(),
                    Arc::clone(&limits),
                    Arc::clone(&counters),
                    trust_domain.clone(),
                    me.clone(),
                );
                tokio::spawn(async move {
                    let _live = wp.drain.enter();
                    let layer = ConnectionLayer {
                        roots: &roots,
                        trust_domain: &td,
                        limits: &limits,
                        counters: &counters,
                        goaway: Some(&wp.drain.goaway),
                    };
                    let on_stream = |req, respond, peer, addrs| {
                        inbound::stream(Arc::clone(&wp), req, respond, peer, addrs)
                    };
                    serve_connection(layer, tcp, cert, &me, (), on_stream).await;
                });
            }
        }
    };
    let drain = Arc::clone(&wp.drain);
    let reload = async move {
        loop {
            match feed.next().await {
                Ok(config) => {
                    let next = WaypointState::build(&config, &opts.gateway);
                    report(&next, &opts.gateway);
                    wp.engine.reconfigure(Routing {
                        routes: Arc::clone(&next.routes),
                        destinations: Arc::clone(&next.destinations),
                    });
                    state.store(Arc::new(next));
                }
                Err(e) => warn!(error = %e, "waypoint: config rejected, keeping the previous one"),
            }
        }
    };
    tokio::select! {
        () = accept => Ok(()),
        () = reload => Ok(()),
        r = drain.on_signal(opts.drain) => r,
    }
}

/// Logs what a config gives this waypoint and every object rejected.
fn report(state: &WaypointState, me: &WaypointRef) {
    let (ports, pods) = state.served();
    info!(gateway = %format!("{}/{}", me.namespace, me.name), service_ports = ports, pods,
        routes = state.routes.len(), "waypoint config");
    for e in &state.errors {
        warn!(error = %e, "waypoint: object rejected");
    }
}

/// A listener on every address, IPv6 too where the namespace has it.
fn bind_dual(port: u16) -> std::io::Result<tokio::net::TcpListener> {
    let v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
    let socket = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None);
    let bound = socket.and_then(|s| {
        s.set_only_v6(false)?;
        s.set_reuse_address(true)?;
        s.set_nonblocking(true)?;
        s.bind(&v6.into())?;
        s.listen(1024)?;
        Ok(s)
    });
    let std: std::net::TcpListener = match bound {
        Ok(s) => s.into(),
        Err(_) => {
            let l = std::net::TcpListener::bind(("0.0.0.0", port))?;
            l.set_nonblocking(true)?;
            l
        }
    };
    tokio::net::TcpListener::from_std(std)
}

/// Prometheus on `metrics_port` (`/metrics`, `/stats/prometheus`) and readiness on
/// `readiness_port` (`/healthz/ready`: ready once the listeners are up).
async fn serve_admin(
    metrics_port: u16,
    readiness_port: u16,
    registry: Arc<Registry>,
    drain: Arc<drain::Drain>,
) -> anyhow::Result<()> {
    use crate::admin::limits::{self, Bounds, Slots};
    use http_body_util::Full;
    let logs = Arc::new(crate::log_limit::LogLimiter::per_second(1));
    for (port, metrics) in [(metrics_port, true), (readiness_port, false)] {
        let listener = bind_dual(port).with_context(|| format!("binding port {port}"))?;
        let registry = Arc::clone(&registry);
        // The node agent's bounds (admin/limits.rs): these ports face every pod too.
        let slots = Slots::new(Bounds::default());
        let (logs, drain) = (Arc::clone(&logs), Arc::clone(&drain));
        tokio::spawn(async move {
            loop {
                let Ok((tcp, peer)) = listener.accept().await else {
                    continue;
                };
                let slot = match slots.admit(peer.ip()) {
                    Ok(slot) => slot,
                    Err(refusal) => {
                        if let Some(unlogged) = logs.allow((port, refusal.reason())) {
                            warn!(port, reason = refusal.reason(), source = %peer.ip(), unlogged, "waypoint: endpoint connection refused");
                        }
                        limits::reset(tcp);
                        continue;
                    }
                };
                let (registry, drain) = (Arc::clone(&registry), Arc::clone(&drain));
                let service = hyper::service::service_fn(move |req: http::Request<_>| {
                    let (registry, drain) = (Arc::clone(&registry), Arc::clone(&drain));
                    async move {
                        let path = req.uri().path();
                        let (status, body, ctype) = if metrics
                            && (path == "/metrics" || path == "/stats/prometheus")
                        {
                            let mut out = String::new();
                            let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
                            (200, out, crate::metrics::CONTENT_TYPE)
                        } else if !metrics && path == "/healthz/ready" {
                            if drain.started() {
                                (503, "draining\n".to_owned(), "text/plain")
                            } else {
                                (200, "ready\n".to_owned(), "text/plain")
                            }
                        } else {
                            (404, "not found\n".to_owned(), "text/plain")
                        };
                        let resp = http::Response::builder()
                            .status(status)
                            .header(http::header::CONTENT_TYPE, ctype)
                            .body(Full::new(bytes::Bytes::from(body)))
                            .expect("static response");
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let bounds = slots.bounds();
                tokio::spawn(async move {
                    let _slot = slot;
                    limits::serve_http1(tcp, bounds, service).await;
                });
            }
        });
    }
    Ok(())
}
