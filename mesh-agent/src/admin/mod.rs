//! The agent's HTTP endpoints, served from a thread and runtime of their own so that a scrape or
//! a config dump never runs on the data path:
//!
//! - admin, **localhost only** (`127.0.0.1:15000`, `[::1]:15000`): `/config_dump`, `/certs`,
//!   `/logging` (GET the filter; POST `?level=<RUST_LOG filter>` to change it), `/debug/ebpf`;
//! - Prometheus on every address (`:15020`): `/metrics` and `/stats/prometheus`;
//! - readiness on every address (`:15021`): `/healthz/ready`, 200 only when the config is
//!   loaded, the capture is in place and the local workloads' certificates are held.
//!
//! Each endpoint bounds its connections (per source and in all) and how long they may idle or
//! live: see [`limits`].
pub mod dump;
pub mod limits;
pub mod readiness;

use std::{
    convert::Infallible,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use anyhow::Context as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use tokio::net::TcpListener;
use tracing::{info, warn};

pub use readiness::Readiness;

use crate::{
    capture::{BpffsLayout, SharedCaptureView},
    hbone::client::Pool,
    identity::CertManager,
    logging::LogControl,
    metrics::Metrics,
    policy::Enforcer,
};

/// Everything the endpoints read.
pub struct AdminState {
    pub handler: &'static str,
    pub layout: BpffsLayout,
    /// The configuration in force (shared with the Kubernetes discovery, which computes its
    /// deltas against it).
    pub config: Arc<crate::discovery::kube::ConfigInForce>,
    pub view: SharedCaptureView,
    pub enforcer: Arc<Enforcer>,
    pub certs: Option<Arc<CertManager>>,
    pub pool: Option<Arc<Pool>>,
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    pub log: LogControl,
    pub runtime: RuntimeSummary,
}

/// How the agent runs, as chosen at start: what an operator asks first when figures surprise
/// them (`mesh-agent status`).
#[derive(Clone, Debug)]
pub struct RuntimeSummary {
    pub worker_threads: crate::node::workers::WorkerChoice,
    /// `on: …` with the bound, or `off: ` and why.
    pub splice: String,
    /// The memory cap above which new connections are refused, and how it was chosen.
    pub memory_cap: String,
}

/// Where the endpoints listen.
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct AdminAddrs {
    /// Admin API port (config dump, certificates, log level, eBPF state), bound to localhost.
    #[arg(long, default_value_t = 15000)]
    pub admin_port: u16,
    /// Prometheus metrics port, every address.
    #[arg(long, default_value_t = 15020)]
    pub metrics_port: u16,
    /// Readiness port (`/healthz/ready`), every address.
    #[arg(long, default_value_t = 15021)]
    pub readiness_port: u16,
}

impl Default for AdminAddrs {
    fn default() -> Self {
        Self {
            admin_port: 15000,
            metrics_port: 15020,
            readiness_port: 15021,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Surface {
    Admin,
    Metrics,
    Readiness,
}

impl Surface {
    /// The `listener` label of its refusals.
    fn name(self) -> &'static str {
        crate::metrics::admission::ENDPOINT_LISTENERS[self as usize]
    }
}

/// The running endpoints; [`AdminEndpoints::stop`] closes them (a successor agent binds the
/// same ports during a handover).
pub struct AdminEndpoints {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AdminEndpoints {
    /// Closes every endpoint's listener (and the requests in progress) and waits until they are
    /// closed.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Binds every endpoint (errors are returned here, not later) and serves them on a thread of
/// their own until the process exits or [`AdminEndpoints::stop`]. Must be called inside the
/// network namespace to serve. A port still held by an agent handing over to this one is
/// retried for a moment.
pub fn start(state: Arc<AdminState>, addrs: AdminAddrs) -> anyhow::Result<AdminEndpoints> {
    let mut binds = vec![
        (
            Surface::Admin,
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addrs.admin_port),
        ),
        (
            Surface::Metrics,
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), addrs.metrics_port),
        ),
        (
            Surface::Readiness,
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), addrs.readiness_port),
        ),
    ];
    // IPv6 where the namespace has it (v6-only sockets next to the v4 ones).
    if std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).is_ok() {
        binds.push((
            Surface::Admin,
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addrs.admin_port),
        ));
        binds.push((
            Surface::Metrics,
            SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), addrs.metrics_port),
        ));
        binds.push((
            Surface::Readiness,
            SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), addrs.readiness_port),
        ));
    }
    let mut listeners = Vec::new();
    for (surface, addr) in binds {
        listeners.push((
            surface,
            bind_soon(addr).with_context(|| format!("binding {addr}"))?,
        ));
    }
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("mesh-admin".into())
        .spawn(move || {
            lower_priority();
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    warn!(error = %e, "admin runtime failed to start; no admin endpoints");
                    return;
                }
            };
            rt.block_on(async move {
                let mut tasks = Vec::new();
                let mut slots = std::collections::HashMap::new();
                let logs = Arc::new(crate::log_limit::LogLimiter::per_second(1));
                for (surface, l) in listeners {
                    let Ok(l) = TcpListener::from_std(l) else {
                        continue;
                    };
                    let state = Arc::clone(&state);
                    // One set of bounds per endpoint: a flood of one leaves the others alone
                    // (shared by the IPv4 and IPv6 sockets of an endpoint).
                    let slots = Arc::clone(
                        slots
                            .entry(surface)
                            .or_insert_with(|| limits::Slots::new(limits::Bounds::default())),
                    );
                    let logs = Arc::clone(&logs);
                    tasks.push(tokio::spawn(serve(surface, l, state, slots, logs)));
                }
                let all = async {
                    for t in &mut tasks {
                        let _ = t.await;
                    }
                };
                tokio::select! {
                    () = all => {}
                    _ = stopped => {
                        for t in &tasks {
                            t.abort();
                        }
                    }
                }
            });
            // The runtime drops here, and every listener and connection with it.
        })
        .context("starting the admin thread")?;
    info!(
        admin = addrs.admin_port,
        metrics = addrs.metrics_port,
        readiness = addrs.readiness_port,
        "admin, metrics and readiness endpoints up"
    );
    Ok(AdminEndpoints {
        stop: Some(stop),
        thread: Some(thread),
    })
}

/// [`bind`], retried for up to 2 s while the address is in use: the agent handing over to this
/// one closes its endpoints before it lets go of the data path, but a listener's close can
/// trail by a moment.
fn bind_soon(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match bind(addr) {
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// The endpoints yield the CPU to the data path: this thread runs at nice 19, so a scraper in a
/// tight loop takes only what the connections leave (the kernel still gives it a small share, so
/// readiness probes are answered under full load). Measured by the bench (`rr_1kib_scraped`).
fn lower_priority() {
    // SAFETY: plain syscalls on the calling thread (a tid is a valid PRIO_PROCESS target).
    let rc = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 19)
    };
    if rc != 0 {
        warn!(error = %std::io::Error::last_os_error(), "could not lower the admin thread's priority");
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(128)?;
    Ok(s.into())
}

async fn serve(
    surface: Surface,
    listener: TcpListener,
    state: Arc<AdminState>,
    slots: Arc<limits::Slots>,
    logs: Arc<crate::log_limit::LogLimiter<(&'static str, &'static str)>>,
) {
    let bounds = slots.bounds();
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let slot = match slots.admit(peer.ip()) {
            Ok(slot) => slot,
            Err(refusal) => {
                let (listener, reason) = (surface.name(), refusal.reason());
                state
                    .metrics
                    .admission
                    .refused
                    .get_or_create(&crate::metrics::admission::RefusalLabels { listener, reason })
                    .inc();
                if let Some(unlogged) = logs.allow((listener, reason)) {
                    warn!(listener, reason, source = %peer.ip(), unlogged, "endpoint connection refused");
                }
                limits::reset(stream);
                continue;
            }
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let _slot = slot;
            let svc = service_fn(move |req| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(route(surface, &state, req).await) }
            });
            limits::serve_http1(stream, bounds, svc).await;
        });
    }
}

type Body = Full<Bytes>;

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .expect("static response parts")
}

fn json(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    let mut text = serde_json::to_string_pretty(v).unwrap_or_default();
    text.push('\n');
    reply(status, "application/json", text)
}

fn not_found(path: &str, paths: &[&str]) -> Response<Body> {
    reply(
        StatusCode::NOT_FOUND,
        "text/plain",
        format!(
            "no such endpoint {path:?}; this port serves: {}\n",
            paths.join(" ")
        ),
    )
}

async fn route(
    surface: Surface,
    state: &AdminState,
    req: Request<hyper::body::Incoming>,
) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    match (surface, req.method(), path.as_str()) {
        (Surface::Metrics, &Method::GET, "/metrics" | "/stats/prometheus") => reply(
            StatusCode::OK,
            crate::metrics::CONTENT_TYPE,
            state.metrics.encode(),
        ),
        (Surface::Metrics, _, p) => not_found(p, &["/metrics", "/stats/prometheus"]),
        (Surface::Readiness, &Method::GET, "/healthz/ready") => {
            let (ready, why) = state.readiness.check();
            if ready {
                reply(StatusCode::OK, "text/plain", "ready\n")
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("not ready: {}\n", why.join("; ")),
                )
            }
        }
        (Surface::Readiness, _, p) => not_found(p, &["/healthz/ready"]),
        (Surface::Admin, &Method::GET, "/config_dump") => {
            json(StatusCode::OK, &dump::config_dump(state))
        }
        (Surface::Admin, &Method::GET, "/certs") => json(StatusCode::OK, &dump::certs(state)),
        (Surface::Admin, &Method::GET, "/logging") => json(
            StatusCode::OK,
            &serde_json::json!({"filter": state.log.current()}),
        ),
        (Surface::Admin, &Method::POST, "/logging") => {
            let level = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("level="))
                .map(|v| {
                    v.replace("%2C", ",")
                        .replace("%3D", "=")
                        .replace("%3A", ":")
                });
            match level {
                None => reply(
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    "POST /logging?level=<filter>, e.g. level=debug or level=info,mesh_agent::hbone=trace\n",
                ),
                Some(level) => match state.log.set(&level) {
                    Ok(()) => {
                        info!(filter = %level, "log filter changed through the admin API");
                        json(
                            StatusCode::OK,
                            &serde_json::json!({"filter": state.log.current()}),
                        )
                    }
                    Err(e) => reply(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
                },
            }
        }
        (Surface::Admin, &Method::GET, "/debug/ebpf") => {
            match crate::capture::explain(&state.layout) {
                Ok(text) => reply(StatusCode::OK, "text/plain", text),
                Err(e) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    format!("{e:#}\n"),
                ),
            }
        }
        (Surface::Admin, &Method::GET, "/") => reply(
            StatusCode::OK,
            "text/plain",
            "mesh-agent admin: /config_dump /certs /logging /debug/ebpf (metrics on :15020, readiness on :15021)\n",
        ),
        (Surface::Admin, _, p) => {
            not_found(p, &["/config_dump", "/certs", "/logging", "/debug/ebpf"])
        }
    }
}
