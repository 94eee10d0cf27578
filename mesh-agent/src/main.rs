//! The `mesh-agent` binary: one executable, one subcommand per role.
use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use mesh_agent::logging::LogFormat;
use mesh_agent::{
    capture,
    ebpf::Datapath,
    node::{self, HandlerMode, NodeOptions},
};

#[derive(Parser, Debug)]
#[command(
    name = "mesh-agent",
    version,
    about = "Sidecarless eBPF service mesh agent"
)]
struct Cli {
    /// Log format on stderr (access logs included): human-readable text, one JSON object per
    /// line, or logfmt.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the per-node agent (capture, and for now a pass-through relay), or inspect/remove the
    /// kernel state it owns.
    Node(NodeArgs),
    /// An L7 waypoint proxy (VirtualService / DestinationRule / HTTPRoute routing) for the
    /// services and pods bound to one Gateway of class mesh-waypoint. Run it in the waypoint
    /// pod's network namespace.
    Waypoint(WaypointArgs),
    /// The mesh certificate authority.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Inspect the embedded eBPF data path.
    Ebpf {
        #[command(subcommand)]
        command: EbpfCommand,
    },
    /// What the local node agent is doing (enrolled pods, certificates, connections, errors),
    /// read from its admin API. Run it in the agent's network namespace.
    Status {
        /// The agent's admin API.
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: std::net::SocketAddr,
    },
    /// The local agent's metrics, summarised: busiest workload pairs, then node figures.
    Metrics {
        /// The agent's Prometheus endpoint.
        #[arg(long, default_value = "127.0.0.1:15020")]
        addr: std::net::SocketAddr,
        /// How many workload pairs to list.
        #[arg(long, default_value_t = 10)]
        top: usize,
        /// Print the raw exposition instead.
        #[arg(long)]
        raw: bool,
        /// Refresh every N seconds until interrupted.
        #[arg(long)]
        watch: Option<u64>,
    },
}

#[derive(Subcommand, Debug)]
enum EbpfCommand {
    /// Load every program through this kernel's verifier and list programs and maps; attaches
    /// nothing. Exit status 0 means this kernel runs our data path.
    Check,
}

#[derive(Subcommand, Debug)]
enum CaCommand {
    /// Serve Istio's IstioCertificateService on 15012 (Kubernetes mode): callers authenticate
    /// with a projected service-account token (audience istio-ca); the node agent may ask for
    /// the service accounts that have pods on its node.
    Serve {
        #[arg(long, default_value = "0.0.0.0:15012")]
        listen: std::net::SocketAddr,
        /// Prometheus metrics of the CA (`/metrics`: refusals on the CA port); as istiod's
        /// monitoring port.
        #[arg(long, default_value = "0.0.0.0:15014")]
        metrics_listen: std::net::SocketAddr,
        /// The CA's namespace (its Secrets and the root ConfigMap live there).
        #[arg(long, env = "POD_NAMESPACE", default_value = "mesh-system")]
        namespace: String,
        #[arg(long, default_value = mesh_agent::identity::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// The node agents' service account, namespace/name.
        #[arg(long, default_value = "mesh-system/mesh-agent")]
        node_agent: String,
        /// Longest (and default) workload certificate lifetime, seconds.
        #[arg(long, default_value_t = 86_400)]
        max_ttl_seconds: u64,
        /// DNS names of the CA's serving certificate (repeatable); default: the mesh-ca
        /// Service's names in the namespace.
        #[arg(long = "dns-name")]
        dns_names: Vec<String>,
        /// A kubeconfig file; default: in cluster.
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// Run the controllers too: waypoint provisioning for Gateways of class mesh-waypoint /
        /// istio-waypoint, and the root ConfigMap in every namespace (`--controllers=false`
        /// when something else does that).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        controllers: bool,
        /// The image of provisioned waypoints; default: this pod's own image (POD_NAME).
        #[arg(long, env = "WAYPOINT_IMAGE")]
        waypoint_image: Option<String>,
        /// This pod's name, to find its own image.
        #[arg(long, env = "POD_NAME")]
        pod_name: Option<String>,
    },
    /// Write a fresh self-signed ECDSA P-256 root (ca-cert.pem, ca-key.pem, root-cert.pem) to a
    /// directory; never overwrites. The layout is Istio's `cacerts`, which can be used instead.
    Init {
        /// Directory to create the files in.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = mesh_agent::identity::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// Validity of the root, days.
        #[arg(long, default_value_t = 3650)]
        validity_days: u64,
    },
}

/// Kubernetes mode (no --config).
/// A feature that is on unless turned off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Switch {
    On,
    Off,
}

#[derive(clap::Args, Debug)]
struct KubeArgs {
    /// This node's name (the DaemonSet passes spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// A kubeconfig file; default: the pod's service account (in cluster), then $KUBECONFIG.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// SPIFFE trust domain.
    #[arg(long, default_value = mesh_agent::identity::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Istio's root namespace (policies there apply mesh-wide).
    #[arg(long, default_value = "istio-system")]
    root_namespace: String,
    /// Interfaces traffic from other nodes arrives on (repeatable); default: every interface
    /// that is not a pod's and not loopback.
    #[arg(long = "uplink")]
    uplinks: Vec<String>,
    /// Sign workload certificates with CA files in this directory (Istio's `cacerts` layout)
    /// instead of asking the mesh CA.
    #[arg(long, conflicts_with = "ca_address")]
    ca_dir: Option<PathBuf>,
    /// The mesh CA (`mesh-agent ca serve`, or any Istio-compatible CA).
    #[arg(long)]
    ca_address: Option<String>,
    /// The mesh root certificate (the CA's `istio-ca-root-cert` ConfigMap, mounted).
    #[arg(long, default_value = "/var/run/secrets/istio/root-cert.pem")]
    ca_root: PathBuf,
    /// The projected service-account token for the CA (audience istio-ca).
    #[arg(long, default_value = "/var/run/secrets/tokens/istio-ca-token")]
    ca_token: PathBuf,
}

#[derive(clap::Args, Debug)]
struct NodeArgs {
    /// Local-mode configuration file (node, namespaces, workloads); reloaded when it changes.
    /// Without it the agent runs in Kubernetes mode (in-cluster or --kubeconfig).
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    kube: KubeArgs,
    /// bpffs directory holding the pinned programs, maps and links.
    #[arg(long, default_value = capture::DEFAULT_BPFFS_DIR)]
    bpffs_dir: PathBuf,
    /// What to do with captured connections.
    #[arg(long, value_enum, default_value = "mesh")]
    handler: HandlerMode,
    /// Config file polling interval, milliseconds.
    #[arg(long, default_value_t = 500)]
    reload_interval_ms: u64,
    /// Splice pod<->agent hops of this node with sockmap: sends move socket to socket in the
    /// kernel. On by default; bounded per socket by `--splice-queue-kib` (beyond it a send takes
    /// TCP, whose buffers push back). Where the kernel cannot (no cgroup v2, no sockmap, no
    /// `sock_recv_length` tracepoint) the agent says so once and carries on without. `--splice`
    /// alone means on.
    #[arg(long, value_enum, default_value = "on", num_args = 0..=1,
          default_missing_value = "on", require_equals = true)]
    splice: Switch,
    /// Most bytes redirected into one spliced socket and not yet read by its owner, KiB.
    #[arg(long, default_value_t = mesh_common::capture::SPLICE_QUEUE_BYTES >> 10,
          value_parser = clap::value_parser!(u64).range(64..=1 << 20))]
    splice_queue_kib: u64,
    /// Kubernetes mode: the host's cgroup v2 hierarchy, where each local pod's cgroup is found
    /// by its UID (kubelet's naming) so its hops can be spliced. A container sees only its own
    /// cgroup at /sys/fs/cgroup: the DaemonSet mounts the host's at /host/sys/fs/cgroup and
    /// passes that. Default: where this process sees cgroup v2. A pod whose cgroup is not found
    /// is carried without splicing.
    #[arg(long)]
    pod_cgroup_root: Option<PathBuf>,
    /// Threads carrying connections: a count, or `auto` (the default): one per four cores this
    /// process may use (CPU limit included), between 1 and 4. The agent shares the cores with
    /// the pods it serves, and on small nodes one thread never pays for cross-thread wake-ups
    /// (measured: docs/PERFORMANCE.md). `mesh-agent status` shows the choice. The control loop
    /// (config, reconciliation) runs on its own thread.
    #[arg(long, default_value = "auto")]
    worker_threads: node::workers::WorkerThreads,
    /// Above this much resident memory (MiB), every listener refuses new connections and
    /// established ones carry on, instead of an OOM kill resetting them all. `auto`: 80% of
    /// the agent's cgroup memory limit (the DaemonSet's 512Mi gives 409 MiB), none without
    /// one; `off`: no cap.
    #[arg(long, default_value = "auto")]
    max_memory_mib: mesh_agent::memory_cap::MemoryCapChoice,
    #[command(flatten)]
    admin: node::AdminAddrs,
    /// Print every kernel object the capture owns on this node (pins, links, rules, routes), then exit.
    #[arg(long, conflicts_with = "uninstall")]
    explain_datapath: bool,
    /// On SIGTERM/SIGINT, keep serving live connections for up to this long (seconds) before
    /// exiting: the agent exits as soon as the last one ends. Readiness turns false at once. A
    /// second signal exits immediately. Long on purpose: during an upgrade the old agent keeps
    /// its database sessions and streams until they end (set terminationGracePeriodSeconds to
    /// match).
    #[arg(long, default_value_t = 3600)]
    drain_seconds: u64,
    /// Remove every kernel object the capture owns on this node, then exit.
    #[arg(long)]
    uninstall: bool,
}

#[derive(clap::Args, Debug)]
struct WaypointArgs {
    /// Local-mode configuration file (the node agents' schema: services, workloads, and the
    /// Gateway, VirtualService, DestinationRule and HTTPRoute objects under `policies:`);
    /// reloaded when it changes. Without it the waypoint runs in Kubernetes mode.
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    kube: KubeArgs,
    /// The Gateway (class mesh-waypoint) this waypoint is, `namespace/name`.
    #[arg(long)]
    gateway: String,
    /// This pod's name in the config; default: the first pod labelled
    /// `gateway.networking.k8s.io/gateway-name=<gateway name>` in the Gateway's namespace.
    #[arg(long, env = "POD_NAME")]
    pod: Option<String>,
    #[arg(long, default_value_t = 15008)]
    hbone_port: u16,
    #[arg(long, default_value_t = 15020)]
    metrics_port: u16,
    #[arg(long, default_value_t = 15021)]
    readiness_port: u16,
    /// Config file polling interval, milliseconds.
    #[arg(long, default_value_t = 500)]
    reload_interval_ms: u64,
    /// Threads serving requests.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    worker_threads: u16,
    /// On SIGTERM/SIGINT, keep serving open connections for up to this long (seconds), then
    /// exit; it exits sooner once none is left. Readiness turns false at once, clients are told
    /// to move on (HBONE GOAWAY, HTTP `connection: close`); a second signal exits at once.
    /// Long on purpose: opaque TCP through the waypoint (a database session) is never cut by
    /// a rollout (set terminationGracePeriodSeconds to match).
    #[arg(long, default_value_t = 3600)]
    drain_seconds: u64,
    /// After the signal, keep accepting new connections for this long (seconds) even with none
    /// open: the clients' agents learn that this pod is going through the API a moment after
    /// the kubelet signals it (Istio's terminationDrainDuration plays this part).
    #[arg(long, default_value_t = 5)]
    drain_accept_seconds: u64,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    // Log lines (access logs included) are written in batches by a background thread: a
    // connection task never waits for stderr (see mesh_agent::logging).
    let (log_control, _flush_on_exit) = mesh_agent::logging::init(&filter, cli.log_format);
    match cli.command {
        Command::Node(args) => node(args, log_control),
        Command::Waypoint(args) => {
            let (namespace, name) = args
                .gateway
                .split_once('/')
                .context("--gateway must be namespace/name")?;
            let source = match args.config {
                Some(path) => mesh_agent::waypoint::WaypointSource::File(path),
                None => mesh_agent::waypoint::WaypointSource::Kube(node::source::KubeSource {
                    kubeconfig: args.kube.kubeconfig,
                    settings: mesh_agent::discovery::kube::SnapshotSettings {
                        node_name: mesh_agent::waypoint::NO_NODE.to_owned(),
                        trust_domain: args.kube.trust_domain,
                        root_namespace: args.kube.root_namespace,
                        uplinks: Vec::new(),
                        ca: args
                            .kube
                            .ca_dir
                            .map(|dir| mesh_agent::discovery::CaSection {
                                dir,
                                cert_ttl_seconds: 86_400,
                            }),
                    },
                    pod_cgroup_root: None,
                }),
            };
            let opts = mesh_agent::waypoint::WaypointOptions {
                source,
                ca_service: args.kube.ca_address.map(|address| node::CaServiceOptions {
                    address,
                    root: args.kube.ca_root,
                    token: args.kube.ca_token,
                }),
                gateway: mesh_agent::l7::binding::WaypointRef {
                    name: name.to_owned(),
                    namespace: namespace.to_owned(),
                },
                pod: args.pod,
                hbone_port: args.hbone_port,
                metrics_port: args.metrics_port,
                readiness_port: args.readiness_port,
                reload_interval: Duration::from_millis(args.reload_interval_ms.max(50)),
                drain: mesh_agent::drain::DrainTimes {
                    accept_for: Duration::from_secs(args.drain_accept_seconds),
                    limit: Duration::from_secs(args.drain_seconds),
                },
            };
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(args.worker_threads.into())
                .thread_name("mesh-waypoint")
                .enable_all()
                .build()
                .context("starting the async runtime")?
                .block_on(mesh_agent::waypoint::run(opts))
        }
        Command::Ca {
            command:
                CaCommand::Serve {
                    listen,
                    metrics_listen,
                    namespace,
                    trust_domain,
                    node_agent,
                    max_ttl_seconds,
                    dns_names,
                    kubeconfig,
                    controllers,
                    waypoint_image,
                    pod_name,
                },
        } => {
            let node_agent = node_agent
                .split_once('/')
                .map(|(n, s)| (n.to_owned(), s.to_owned()))
                .context("--node-agent must be namespace/name")?;
            let dns_names = if dns_names.is_empty() {
                vec![
                    format!("mesh-ca.{namespace}.svc"),
                    format!("mesh-ca.{namespace}.svc.cluster.local"),
                ]
            } else {
                dns_names
            };
            small_runtime()?.block_on(async move {
                let client = node::source::kube_client(kubeconfig.as_deref()).await?;
                let names = mesh_agent::ca::root::RootObjects::new(&namespace);
                let ca = mesh_agent::ca::root::load_or_create(
                    &client,
                    &names,
                    &trust_domain,
                    Duration::from_secs(10 * 365 * 86_400),
                )
                .await?;
                mesh_agent::ca::root::publish(&client, &names, &ca).await?;
                if controllers {
                    let waypoints = mesh_agent::controller::waypoint_template(
                        &client,
                        &namespace,
                        listen.port(),
                        &trust_domain,
                        waypoint_image,
                        pod_name.as_deref(),
                    )
                    .await;
                    let settings = mesh_agent::controller::ControllerSettings {
                        ca_namespace: namespace.clone(),
                        waypoints,
                        roots_pem: ca.roots_pem(),
                    };
                    tokio::spawn(mesh_agent::controller::run(client.clone(), settings));
                }
                let service = mesh_agent::ca::CaService::new(
                    client,
                    std::sync::Arc::new(ca),
                    mesh_agent::ca::CaSettings {
                        listen,
                        trust_domain,
                        node_agent,
                        max_ttl: Duration::from_secs(max_ttl_seconds),
                        dns_names,
                        bounds: Default::default(),
                    },
                );
                let metrics = tokio::net::TcpListener::bind(metrics_listen)
                    .await
                    .with_context(|| format!("binding the CA's metrics on {metrics_listen}"))?;
                tokio::spawn(mesh_agent::ca::limits::serve_metrics(
                    metrics,
                    service.registry(),
                ));
                service.serve().await
            })
        }
        Command::Ca {
            command:
                CaCommand::Init {
                    out,
                    trust_domain,
                    validity_days,
                },
        } => {
            mesh_agent::identity::LocalCa::init_dir(
                &out,
                &trust_domain,
                Duration::from_secs(validity_days * 86_400),
            )
            .with_context(|| format!("creating a CA in {}", out.display()))?;
            println!(
                "root CA for trust domain {trust_domain} written to {} (ca-key.pem is secret)",
                out.display()
            );
            Ok(())
        }
        Command::Ebpf {
            command: EbpfCommand::Check,
        } => ebpf_check(),
        Command::Status { admin } => {
            print!(
                "{}",
                small_runtime()?.block_on(mesh_agent::cli::status::run(admin))?
            );
            Ok(())
        }
        Command::Metrics {
            addr,
            top,
            raw,
            watch,
        } => {
            let rt = small_runtime()?;
            loop {
                let text = rt.block_on(mesh_agent::cli::top::run(addr, top, raw))?;
                match watch {
                    None => {
                        print!("{text}");
                        return Ok(());
                    }
                    Some(secs) => {
                        // Clear the screen, then the table.
                        print!("\x1b[2J\x1b[H{text}");
                        std::thread::sleep(Duration::from_secs(secs.max(1)));
                    }
                }
            }
        }
    }
}

/// A runtime for the CLI's own requests.
fn small_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime")
}

fn ebpf_check() -> anyhow::Result<()> {
    let mut datapath = Datapath::load().context("loading the eBPF object")?;
    datapath
        .verify_all()
        .context("verifying the eBPF programs")?;
    for entry in datapath.describe() {
        println!("{:<8} {:<24} {}", entry.kind, entry.name, entry.detail);
    }
    println!("ok: the kernel accepted every program");
    Ok(())
}

fn node(args: NodeArgs, log: mesh_agent::logging::LogControl) -> anyhow::Result<()> {
    if args.explain_datapath {
        print!("{}", node::explain(&args.bpffs_dir)?);
        return Ok(());
    }
    if args.uninstall {
        node::uninstall(&args.bpffs_dir)?;
        println!(
            "removed the capture's kernel objects ({})",
            args.bpffs_dir.display()
        );
        return Ok(());
    }
    let opts = NodeOptions {
        config: match args.config {
            Some(path) => node::ConfigOrigin::File(path),
            None => node::ConfigOrigin::Kube(node::source::KubeSource {
                kubeconfig: args.kube.kubeconfig,
                settings: mesh_agent::discovery::kube::SnapshotSettings {
                    node_name: args.kube.node_name.context(
                        "Kubernetes mode needs --node-name (or NODE_NAME); for local mode give --config FILE",
                    )?,
                    trust_domain: args.kube.trust_domain,
                    root_namespace: args.kube.root_namespace,
                    uplinks: args.kube.uplinks,
                    ca: args.kube.ca_dir.map(|dir| mesh_agent::discovery::CaSection {
                        dir,
                        cert_ttl_seconds: 86_400,
                    }),
                },
                pod_cgroup_root: args.pod_cgroup_root,
            }),
        },
        bpffs_dir: args.bpffs_dir,
        handler: args.handler,
        reload_interval: Duration::from_millis(args.reload_interval_ms.max(50)),
        splice: args.splice == Switch::On,
        splice_queue_bytes: args.splice_queue_kib << 10,
        log,
        admin: args.admin,
        ca_service: args.kube.ca_address.map(|address| node::CaServiceOptions {
            address,
            root: args.kube.ca_root,
            token: args.kube.ca_token,
        }),
        drain: Duration::from_secs(args.drain_seconds),
        worker_threads: args.worker_threads.choose_here(),
        memory_cap: args.max_memory_mib,
    };
    node::tune_allocator();
    tracing::info!(worker_threads = %opts.worker_threads, "connection threads");
    // `block_on` runs the control loop on this thread; connections run on the workers.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opts.worker_threads.count)
        .thread_name("mesh-data")
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(node::run(opts))
}
