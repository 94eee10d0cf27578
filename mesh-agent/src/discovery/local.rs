//! The local-mode configuration file: this node, namespaces (with labels), workloads, services
//! and Istio policy objects (in the CRDs' own schema, so real manifests can be pasted in). Unknown fields are errors; YAML
//! errors carry the line and column; semantic errors name the offending entry and field.
use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    path::Path,
};

use serde::Deserialize;

use super::{DATAPLANE_MODE_AMBIENT, DATAPLANE_MODE_LABEL, DATAPLANE_MODE_NONE};
use crate::names::{Addresses, Labels, Name, interned};

/// The whole file.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LocalConfig {
    pub node: NodeSection,
    /// The certificate authority (local mode: files). Needed for the mesh handler (HBONE).
    #[serde(default)]
    pub ca: Option<CaSection>,
    #[serde(default)]
    pub namespaces: Vec<Namespace>,
    #[serde(default)]
    pub workloads: Vec<Workload>,
    #[serde(default)]
    pub services: Vec<Service>,
    /// Mesh-wide settings (Istio's meshConfig).
    #[serde(default)]
    pub mesh: MeshSection,
    /// `security.istio.io` PeerAuthentication, AuthorizationPolicy and RequestAuthentication
    /// objects. Each is checked on its own: a rejected one fails closed for the workloads it
    /// selects, the rest still apply.
    #[serde(default)]
    pub policies: Vec<crate::policy::RawObject>,
    /// Which workloads each Service selects, indexed on first use: a config is not changed
    /// once built.
    #[serde(skip)]
    pub selection: super::selection::WorkloadIndex,
}

/// Nothing: what an agent holds before its first configuration arrives.
impl Default for LocalConfig {
    fn default() -> Self {
        Self {
            node: NodeSection {
                name: String::new(),
                uplinks: Vec::new(),
                trust_domain: default_trust_domain(),
            },
            ca: None,
            namespaces: Vec::new(),
            workloads: Vec::new(),
            services: Vec::new(),
            mesh: MeshSection::default(),
            policies: Vec::new(),
            selection: Default::default(),
        }
    }
}

/// The parts of Istio's meshConfig we read.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MeshSection {
    /// Policies here without a selector apply to the whole mesh.
    #[serde(default = "default_root_namespace")]
    pub root_namespace: String,
    /// Local mode: a reload may leave no workload of this node enrolled. Without it such a
    /// reload is refused, since a truncated or emptied file looks exactly like that and would
    /// send the pods' traffic out in plaintext.
    #[serde(default)]
    pub allow_unenroll_all: bool,
}

impl Default for MeshSection {
    fn default() -> Self {
        Self {
            root_namespace: default_root_namespace(),
            allow_unenroll_all: false,
        }
    }
}

fn default_root_namespace() -> String {
    crate::policy::DEFAULT_ROOT_NAMESPACE.to_owned()
}

/// A Kubernetes-style Service: virtual IPs and ports in front of the workloads its selector
/// matches in its namespace.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Service {
    pub name: Name,
    #[serde(deserialize_with = "interned")]
    pub namespace: Name,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    #[serde(default)]
    pub selector: Labels,
    /// Endpoint addresses given explicitly (Kubernetes mode: from the service's EndpointSlices,
    /// ready endpoints only). When present they replace the selector as the endpoint source.
    #[serde(default)]
    pub endpoints: Option<Vec<IpAddr>>,
    /// The Service's labels (`istio.io/use-waypoint` binds it to a waypoint).
    #[serde(default)]
    pub labels: Labels,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(from = "RawServicePort")]
pub struct ServicePort {
    pub port: u16,
    /// Defaults to `port`.
    pub target_port: Option<u16>,
    /// Declared by `appProtocol` or the port name's prefix (`http-web`); `None`: detected.
    pub protocol: Option<crate::l7::protocol::Protocol>,
}

/// A service port as written: `name` and `appProtocol` are read for the protocol only.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawServicePort {
    port: u16,
    #[serde(default)]
    target_port: Option<u16>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    app_protocol: Option<String>,
}

impl From<RawServicePort> for ServicePort {
    fn from(r: RawServicePort) -> Self {
        Self {
            port: r.port,
            target_port: r.target_port,
            protocol: crate::l7::protocol::declared(r.app_protocol.as_deref(), r.name.as_deref()),
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NodeSection {
    /// This node's name; workloads whose `node` equals it are local.
    pub name: String,
    /// Interfaces traffic from other nodes arrives on (watched for traffic to enrolled pods).
    #[serde(default)]
    pub uplinks: Vec<String>,
    /// SPIFFE trust domain of the mesh.
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
}

/// Where the local CA's files are (`mesh-agent ca init` layout, or Istio's `cacerts`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CaSection {
    pub dir: std::path::PathBuf,
    /// Workload certificate validity, seconds (Istio's default: 24 h).
    #[serde(default = "default_cert_ttl")]
    pub cert_ttl_seconds: u64,
}

fn default_trust_domain() -> String {
    crate::identity::DEFAULT_TRUST_DOMAIN.to_owned()
}

fn default_cert_ttl() -> u64 {
    86_400
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Namespace {
    #[serde(deserialize_with = "interned")]
    pub name: Name,
    #[serde(default)]
    pub labels: Labels,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Workload {
    /// Unique, so not interned.
    pub name: Name,
    #[serde(deserialize_with = "interned")]
    pub namespace: Name,
    #[serde(default = "default_service_account", deserialize_with = "interned")]
    pub service_account: Name,
    #[serde(deserialize_with = "interned")]
    pub node: Name,
    pub ips: Addresses,
    #[serde(default)]
    pub labels: Labels,
    #[serde(default)]
    pub host_network: bool,
    /// The pod is being deleted and still runs, draining (Kubernetes: its deletionTimestamp is
    /// set). Its connections are served as any pod's, but it is sent no new ones while the
    /// Service or waypoint it belongs to has a pod that is not ([`serving`]).
    #[serde(default)]
    pub terminating: bool,
    /// The pod's interface in the node's network namespace (host side of its veth). Required for
    /// pods of this node that are not host-network.
    #[serde(default)]
    pub host_interface: Option<Name>,
    /// The pod's cgroup v2 directory on this node (local mode only). Optional: when given, the
    /// pod's same-node hops to the agent are spliced in the kernel.
    #[serde(default)]
    pub cgroup: Option<Box<std::path::Path>>,
    /// Kubernetes mode: the pod's creation time in seconds since the epoch (0: unknown), which
    /// settles two pods claiming one address. Kept here so that a remote pod's workload says
    /// all discovery knows of it (no second record per pod, issue #19); it sits in what was
    /// the struct's padding. Not part of the file format.
    #[serde(skip)]
    pub created: u32,
}

impl Workload {
    /// Istio's canonical service name and revision, from the labels Istio reads (the pod's
    /// name and `latest` when none is set): telemetry and baggage use them.
    pub fn canonical_names(&self) -> (Name, Name) {
        let first = |keys: &[&str]| keys.iter().find_map(|k| self.labels.get(k).cloned());
        let name = first(&[
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ])
        .unwrap_or_else(|| self.name.clone());
        let version = first(&[
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ])
        .unwrap_or_else(|| arcstr::literal!("latest"));
        (name, version)
    }
}

/// The pods of a group (a Service's endpoints, a waypoint's pods) that new connections go to:
/// those not terminating, or all of them when every one is. Kubernetes does the same with its
/// EndpointSlice conditions (ready endpoints, else serving terminating ones: KEP-1669), so a
/// pod that drains during a rollout keeps what it has and gets nothing new while a replacement
/// runs, yet a group whose every pod terminates still answers.
pub fn serving(mut pods: Vec<&Workload>) -> Vec<&Workload> {
    if pods.iter().any(|p| !p.terminating) {
        pods.retain(|p| !p.terminating);
    }
    pods
}

fn default_service_account() -> Name {
    arcstr::literal!("default")
}

/// Why a configuration file was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// serde_yaml's message includes the line and column.
    #[error("{path}: {source}")]
    Syntax {
        path: String,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("{path}: {field}: {message}")]
    Invalid {
        path: String,
        field: String,
        message: String,
    },
    /// A reload that would leave none of this node's workloads enrolled.
    #[error(
        "{path}: would un-enrol every workload of this node (enrolled now: {enrolled}); set `mesh: {{allowUnenrollAll: true}}` in the file if that is meant"
    )]
    UnenrolsAll { path: String, enrolled: String },
}

impl ConfigError {
    /// A short label for metrics (`reason`).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Read { .. } => "unreadable",
            Self::Syntax { .. } => "syntax",
            Self::Invalid { .. } => "invalid",
            Self::UnenrolsAll { .. } => "unenrolls_all",
        }
    }
}

impl LocalConfig {
    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: p.clone(),
            source,
        })?;
        Self::parse_file(path, &text)
    }

    /// Parses and validates `text`, read from `path` (errors name the file).
    pub fn parse_file(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let p = path.display().to_string();
        Self::parse(text).map_err(|e| match e {
            ConfigError::Syntax { source, .. } => ConfigError::Syntax { path: p, source },
            ConfigError::Invalid { field, message, .. } => ConfigError::Invalid {
                path: p,
                field,
                message,
            },
            other => other,
        })
    }

    /// Whether replacing `current` by `self` may go ahead: a reload that leaves no workload of
    /// this node enrolled while some are must say so (`mesh.allowUnenrollAll`). The first
    /// configuration may enrol nothing (there is nothing to un-enrol).
    pub fn check_reload(&self, enrolled_now: &[String], path: &Path) -> Result<(), ConfigError> {
        if enrolled_now.is_empty()
            || self.mesh.allow_unenroll_all
            || self.local_pods().any(|w| self.is_enrolled(w))
        {
            return Ok(());
        }
        Err(ConfigError::UnenrolsAll {
            path: path.display().to_string(),
            enrolled: enrolled_now.join(", "),
        })
    }

    /// This node's enrolled pods, `namespace/name`: all a reload check needs of the config in
    /// force (so the file source does not keep a second copy of a large config).
    pub fn enrolled_local(&self) -> Vec<String> {
        self.local_pods()
            .filter(|w| self.is_enrolled(w))
            .map(|w| format!("{}/{}", w.namespace, w.name))
            .collect()
    }

    /// Validates a configuration built elsewhere (Kubernetes mode) with the file's rules.
    pub fn parse_checked(mut config: LocalConfig) -> Result<Self, ConfigError> {
        // Built by pushes, as a file is read: no room left over.
        config.workloads.shrink_to_fit();
        config.services.shrink_to_fit();
        config.validate()?;
        Ok(config)
    }

    /// Parses and validates YAML text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let mut config: LocalConfig =
            serde_yaml::from_str(text).map_err(|source| ConfigError::Syntax {
                path: "<config>".to_owned(),
                source,
            })?;
        // Read into vectors that grew by doubling: up to half of them unused.
        config.workloads.shrink_to_fit();
        config.services.shrink_to_fit();
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: String, message: String| ConfigError::Invalid {
            path: "<config>".to_owned(),
            field,
            message,
        };
        if self.node.name.is_empty() {
            return Err(invalid("node.name".into(), "must not be empty".into()));
        }
        if let Some(ca) = &self.ca
            && ca.cert_ttl_seconds < 10
        {
            return Err(invalid(
                "ca.certTtlSeconds".into(),
                "must be at least 10".into(),
            ));
        }
        let mut seen_ns = HashSet::new();
        for (i, ns) in self.namespaces.iter().enumerate() {
            if !seen_ns.insert(&ns.name) {
                return Err(invalid(
                    format!("namespaces[{i}].name"),
                    format!("namespace {:?} is listed twice", ns.name),
                ));
            }
        }
        let mut seen_wl = HashSet::new();
        let mut seen_iface: HashMap<&str, String> = HashMap::new();
        let mut ip_owner: HashMap<IpAddr, String> = HashMap::new();
        for (i, w) in self.workloads.iter().enumerate() {
            let at = |f: &str| format!("workloads[{i}] ({}/{}).{f}", w.namespace, w.name);
            self.check_workload(w, &at)?;
            if !seen_wl.insert((&w.namespace, &w.name)) {
                return Err(invalid(at("name"), "workload is listed twice".into()));
            }
            if !w.host_network {
                for ip in &w.ips {
                    if let Some(other) = ip_owner.insert(*ip, format!("{}/{}", w.namespace, w.name))
                    {
                        return Err(invalid(at("ips"), format!("{ip} is also used by {other}")));
                    }
                }
            }
            if w.node == self.node.name
                && let Some(iface) = &w.host_interface
                && let Some(other) =
                    seen_iface.insert(iface.as_str(), format!("{}/{}", w.namespace, w.name))
            {
                return Err(invalid(
                    at("hostInterface"),
                    format!("{iface} is also the interface of {other}"),
                ));
            }
        }
        let mut seen_policies = HashSet::new();
        for (i, p) in self.policies.iter().enumerate() {
            let at = |f: &str| format!("policies[{i}].{f}");
            if p.metadata.name.is_empty() {
                return Err(invalid(at("metadata.name"), "must not be empty".into()));
            }
            if p.metadata.namespace.is_empty() {
                return Err(invalid(
                    at("metadata.namespace"),
                    format!("{} {:?} needs a namespace", p.kind, p.metadata.name),
                ));
            }
            if !seen_policies.insert((&p.kind, &p.metadata.namespace, &p.metadata.name)) {
                return Err(invalid(
                    at("metadata.name"),
                    format!(
                        "{} {}/{} is listed twice",
                        p.kind, p.metadata.namespace, p.metadata.name
                    ),
                ));
            }
        }
        let mut seen_vip_ports = HashMap::new();
        for (i, svc) in self.services.iter().enumerate() {
            let at = |f: &str| format!("services[{i}] ({}/{}).{f}", svc.namespace, svc.name);
            self.check_service(svc, &at)?;
            for vip in &svc.vips {
                if let Some(owner) = ip_owner.get(vip) {
                    return Err(invalid(
                        at("vips"),
                        format!("{vip} is also the address of workload {owner}"),
                    ));
                }
                for p in &svc.ports {
                    let key = (*vip, p.port);
                    if let Some(other) =
                        seen_vip_ports.insert(key, format!("{}/{}", svc.namespace, svc.name))
                    {
                        return Err(invalid(
                            at("ports"),
                            format!("{vip}:{} is also served by {other}", p.port),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// The rules one workload must meet on its own (those between entries are the callers').
    pub(super) fn check_workload(
        &self,
        w: &Workload,
        at: &dyn Fn(&str) -> String,
    ) -> Result<(), ConfigError> {
        let invalid = |field: &str, message: String| ConfigError::Invalid {
            path: "<config>".to_owned(),
            field: at(field),
            message,
        };
        if w.name.is_empty() || w.namespace.is_empty() {
            return Err(invalid(
                "name",
                "name and namespace must not be empty".into(),
            ));
        }
        if w.ips.is_empty() && !w.host_network {
            return Err(invalid("ips", "a pod needs at least one address".into()));
        }
        let v4 = w.ips.iter().filter(|ip| ip.is_ipv4()).count();
        if v4 > 1 || w.ips.len() - v4 > 1 {
            return Err(invalid(
                "ips",
                "at most one IPv4 and one IPv6 address per pod".into(),
            ));
        }
        if w.node == self.node.name && !w.host_network && w.host_interface.is_none() {
            return Err(invalid(
                "hostInterface",
                "required for pods on this node (the host side of the pod's interface)".into(),
            ));
        }
        if crate::identity::SpiffeId::new(&self.node.trust_domain, &w.namespace, &w.service_account)
            .is_err()
        {
            return Err(invalid(
                "serviceAccount",
                format!(
                    "{:?} cannot be part of a SPIFFE identity",
                    w.service_account
                ),
            ));
        }
        if let Some(mode) = w.labels.get(DATAPLANE_MODE_LABEL)
            && mode != DATAPLANE_MODE_AMBIENT
            && mode != DATAPLANE_MODE_NONE
        {
            return Err(invalid(
                &format!("labels.{DATAPLANE_MODE_LABEL}"),
                format!("{mode:?} is not one of \"ambient\", \"none\""),
            ));
        }
        Ok(())
    }

    /// The rules one Service must meet on its own.
    pub(super) fn check_service(
        &self,
        svc: &Service,
        at: &dyn Fn(&str) -> String,
    ) -> Result<(), ConfigError> {
        let invalid = |field: &str, message: &str| ConfigError::Invalid {
            path: "<config>".to_owned(),
            field: at(field),
            message: message.to_owned(),
        };
        if svc.vips.is_empty() {
            return Err(invalid("vips", "a service needs at least one virtual IP"));
        }
        if svc.ports.is_empty() {
            return Err(invalid("ports", "a service needs at least one port"));
        }
        if svc
            .ports
            .iter()
            .any(|p| p.port == 0 || p.target_port == Some(0))
        {
            return Err(invalid("ports", "ports must be 1-65535"));
        }
        Ok(())
    }

    /// The workloads a service selects (same namespace, labels include the selector; a service
    /// without a selector selects nothing, as in Kubernetes).
    /// With explicit `endpoints`, the workloads at those addresses.
    pub fn endpoints_of<'a>(&'a self, svc: &'a Service) -> impl Iterator<Item = &'a Workload> + 'a {
        self.selection.selected(self, svc).into_iter()
    }

    /// A service's endpoint addresses: the explicit ones, or those of its selected workloads
    /// that take new connections ([`serving`]).
    pub fn endpoint_ips(&self, svc: &Service) -> Vec<IpAddr> {
        match &svc.endpoints {
            Some(ips) => ips.clone(),
            None => serving(self.endpoints_of(svc).collect())
                .into_iter()
                .flat_map(|w| w.ips.iter().copied())
                .collect(),
        }
    }

    /// The namespace called `name`, if the config lists it.
    pub fn namespace(&self, name: &str) -> Option<&Namespace> {
        self.selection.namespace(&self.namespaces, name)
    }

    /// Whether `w` is in the mesh, with Istio's rules: host-network pods never; pod label
    /// `istio.io/dataplane-mode=none` opts out; otherwise the pod's or its namespace's label
    /// `istio.io/dataplane-mode=ambient` enrols.
    pub fn is_enrolled(&self, w: &Workload) -> bool {
        if w.host_network {
            return false;
        }
        match w.labels.get(DATAPLANE_MODE_LABEL).map(Name::as_str) {
            Some(DATAPLANE_MODE_NONE) => false,
            Some(DATAPLANE_MODE_AMBIENT) => true,
            _ => self
                .namespace(&w.namespace)
                .and_then(|ns| ns.labels.get(DATAPLANE_MODE_LABEL))
                .is_some_and(|v| v == DATAPLANE_MODE_AMBIENT),
        }
    }

    /// The SPIFFE identity of a workload.
    pub fn identity_of(&self, w: &Workload) -> crate::identity::SpiffeId {
        crate::identity::SpiffeId::new(&self.node.trust_domain, &w.namespace, &w.service_account)
            .expect("validated on load")
    }

    /// This node's enrolled pods as policy sees them: namespace, labels, addresses and the
    /// services that select them.
    pub fn policy_workloads(&self) -> Vec<crate::policy::WorkloadInfo> {
        use crate::l7::binding::{Binding, Waypoints};
        let (waypoints, _) = Waypoints::of_config(self);
        // A binding as the gate the destination agent checks: the waypoint's pods' identities
        // (none for a missing waypoint: fail closed).
        let gate = |binding: Binding, service_host: Option<String>| {
            let r = match binding {
                Binding::Direct => return None,
                Binding::Waypoint(r) | Binding::Missing(r) => r,
            };
            Some(crate::policy::WaypointGate {
                waypoint: format!("{}/{}", r.namespace, r.name),
                service_host,
                identities: Waypoints::pods(self, &r)
                    .into_iter()
                    .map(|p| self.identity_of(p))
                    .collect(),
            })
        };
        self.local_pods()
            .filter(|w| self.is_enrolled(w))
            .map(|w| {
                let services: Vec<&Service> = self
                    .services
                    .iter()
                    .filter(|s| self.endpoints_of(s).any(|e| std::ptr::eq(e, w)))
                    .collect();
                let mut gates: Vec<_> = gate(waypoints.of_workload(self, w), None)
                    .into_iter()
                    .collect();
                gates.extend(services.iter().filter_map(|s| {
                    gate(
                        waypoints.of_service(self, s),
                        Some(crate::l7::route::compile::qualify(&s.name, &s.namespace)),
                    )
                }));
                crate::policy::WorkloadInfo {
                    key: format!("{}/{}", w.namespace, w.name),
                    namespace: w.namespace.to_string(),
                    labels: w
                        .labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    ips: w.ips.to_vec(),
                    services: services
                        .iter()
                        .filter(|s| waypoints.of_service(self, s) == Binding::Direct)
                        .map(|s| (s.namespace.to_string(), s.name.to_string()))
                        .collect(),
                    waypoints: gates,
                }
            })
            .collect()
    }

    /// The policy set this node enforces.
    pub fn compile_policies(&self) -> crate::policy::PolicySet {
        crate::policy::PolicySet::compile(
            &self.policies,
            &self.policy_workloads(),
            &self.mesh.root_namespace,
        )
    }

    /// Pods on this node (not host-network).
    pub fn local_pods(&self) -> impl Iterator<Item = &Workload> {
        self.workloads
            .iter()
            .filter(|w| w.node == self.node.name && !w.host_network)
    }
}

#[cfg(test)]
#[path = "local_tests.rs"]
mod tests;
