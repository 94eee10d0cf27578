//! Istio objects -> compiled policies, with Istio's validation (errors name the object and the
//! field). The L7 attributes are kept for waypoints (`model::RequestMatch`); node agents treat
//! them as Istio ambient's ztunnel does:
//!
//! - an ALLOW rule that needs L7 attributes never allows at a node agent, so the policy can
//!   only be stricter than its author meant;
//! - a DENY (or AUDIT) rule's L7 attributes are dropped there, so it denies every connection
//!   its L4 parts match — again stricter.
use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use ipnet::IpNet;

use super::{
    crd::{
        AuthorizationPolicySpec, MutualTls, Operation, PeerAuthenticationSpec,
        PolicyTargetReference, RawObject, Source, WorkloadSelector,
    },
    model::{Action, CompiledPolicy, Match, MtlsMode, RequestMatch, Rule, StringMatch},
};

/// Why a policy object was rejected: the object, the field, and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {namespace}/{name}: {field}: {message}")]
pub struct PolicyError {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub field: String,
    pub message: String,
}

/// Which workloads a policy applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The root namespace without a selector: every workload of the mesh.
    Mesh,
    /// The root namespace with a selector: matching workloads of every namespace.
    MeshSelector(BTreeMap<String, String>),
    /// No selector: every workload of the namespace.
    Namespace(String),
    /// Matching workloads of the namespace.
    Selector {
        namespace: String,
        labels: BTreeMap<String, String>,
    },
    /// `targetRefs` naming Services: the workloads behind them (node agents enforce it for
    /// Services not bound to a waypoint; a waypoint enforces it for those bound to it).
    Services {
        namespace: String,
        names: Vec<String>,
    },
    /// Attached to waypoints only (Gateway targetRefs): no workload is enforced by node agents.
    Waypoint,
}

/// What a scope is tested against.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkloadInfo {
    /// `namespace/name`.
    pub key: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub ips: Vec<IpAddr>,
    /// `(namespace, name)` of the Services that select it and are not bound to a waypoint
    /// (policies attached to a bound Service are the waypoint's to enforce, as in Istio).
    pub services: Vec<(String, String)>,
    /// Waypoints its traffic must come through (Istio ambient: all traffic into a
    /// waypoint-bound resource passes its waypoint).
    pub waypoints: Vec<WaypointGate>,
}

/// One waypoint requirement of a workload.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WaypointGate {
    /// `namespace/name` of the waypoint (the decision's policy label).
    pub waypoint: String,
    /// `None`: every connection to the workload (it is bound itself); `Some(host)`: connections
    /// addressed to that service.
    pub service_host: Option<String>,
    /// The waypoint pods' identities; empty when the waypoint does not exist (nothing passes).
    pub identities: Vec<crate::identity::SpiffeId>,
}

impl Scope {
    pub fn selects(&self, w: &WorkloadInfo) -> bool {
        let labels_match =
            |l: &BTreeMap<String, String>| l.iter().all(|(k, v)| w.labels.get(k) == Some(v));
        match self {
            Self::Mesh => true,
            Self::MeshSelector(l) => labels_match(l),
            Self::Namespace(ns) => &w.namespace == ns,
            Self::Selector { namespace, labels } => {
                &w.namespace == namespace && labels_match(labels)
            }
            Self::Services { namespace, names } => w
                .services
                .iter()
                .any(|(ns, n)| ns == namespace && names.contains(n)),
            Self::Waypoint => false,
        }
    }
}

/// A compiled AuthorizationPolicy, or why it was rejected. A rejected policy still has a scope:
/// the workloads it would have governed deny every connection until it is fixed (fail closed).
#[derive(Clone, Debug)]
pub struct AuthorizationEntry {
    pub name: Arc<str>,
    pub scope: Scope,
    pub policy: Result<Arc<CompiledPolicy>, PolicyError>,
    /// Things the author should know (L7 parts not enforced, waypoint-only attachment).
    pub notes: Vec<String>,
    /// Rules whose L7 parts cannot be enforced here (ALLOW: never allow; DENY/AUDIT: L4 only).
    pub l7_rules: usize,
}

/// A PeerAuthentication's modes (`None` = UNSET, inherit).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerAuthModes {
    pub mode: Option<MtlsMode>,
    pub ports: BTreeMap<u16, Option<MtlsMode>>,
}

/// A compiled PeerAuthentication. A rejected one makes its workloads STRICT (fail closed).
#[derive(Clone, Debug)]
pub struct PeerAuthEntry {
    pub name: Arc<str>,
    pub scope: Scope,
    pub created: Option<String>,
    pub modes: Result<PeerAuthModes, PolicyError>,
    pub notes: Vec<String>,
}

pub const KIND_AUTHORIZATION: &str = "AuthorizationPolicy";
pub const KIND_PEER_AUTHENTICATION: &str = "PeerAuthentication";
pub const KIND_REQUEST_AUTHENTICATION: &str = "RequestAuthentication";

/// Collects errors for one object.
struct Ctx<'a> {
    kind: &'static str,
    meta: &'a super::crd::ObjectMeta,
}

impl Ctx<'_> {
    fn err(&self, field: impl Into<String>, message: impl Into<String>) -> PolicyError {
        PolicyError {
            kind: self.kind.to_owned(),
            namespace: self.meta.namespace.clone(),
            name: self.meta.name.clone(),
            field: field.into(),
            message: message.into(),
        }
    }
}

fn api_version_error(ctx: &Ctx<'_>, obj: &RawObject) -> Option<PolicyError> {
    (!super::crd::API_VERSIONS.contains(&obj.api_version.as_str())).then(|| {
        ctx.err(
            "apiVersion",
            format!(
                "{:?} is not one of {}",
                obj.api_version,
                super::crd::API_VERSIONS.join(", ")
            ),
        )
    })
}

/// Parses `spec` with the full schema; errors carry the path of the offending field.
fn parse_spec<T: serde::de::DeserializeOwned>(
    ctx: &Ctx<'_>,
    obj: &RawObject,
) -> Result<T, PolicyError> {
    obj.typed_spec()
        .map_err(|(field, message)| ctx.err(field, message))
}

/// The part of a spec that decides its scope, read leniently so that a policy with an error
/// elsewhere still fails closed for the right workloads.
#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ScopeOnly {
    #[serde(default)]
    selector: Option<WorkloadSelector>,
    #[serde(default)]
    target_ref: Option<PolicyTargetReference>,
    #[serde(default)]
    target_refs: Vec<PolicyTargetReference>,
}

fn selector_scope(
    namespace: &str,
    root_namespace: &str,
    selector: Option<&WorkloadSelector>,
    mesh_wide_selectors: bool,
) -> Scope {
    match selector.filter(|s| !s.match_labels.is_empty()) {
        None if namespace == root_namespace => Scope::Mesh,
        None => Scope::Namespace(namespace.to_owned()),
        Some(s) if namespace == root_namespace && mesh_wide_selectors => {
            Scope::MeshSelector(s.match_labels.clone())
        }
        Some(s) => Scope::Selector {
            namespace: namespace.to_owned(),
            labels: s.match_labels.clone(),
        },
    }
}

/// AuthorizationPolicy scope: selector (root namespace: across namespaces) or targetRefs.
fn authorization_scope(
    ctx: &Ctx<'_>,
    s: &ScopeOnly,
    root_namespace: &str,
    notes: &mut Vec<String>,
) -> Result<Scope, PolicyError> {
    let ns = ctx.meta.namespace.as_str();
    if s.target_ref.is_some() && !s.target_refs.is_empty() {
        return Err(ctx.err(
            "spec.targetRef",
            "only one of targetRef and targetRefs may be set",
        ));
    }
    let refs: Vec<(String, &PolicyTargetReference)> = match &s.target_ref {
        Some(r) => vec![("spec.targetRef".to_owned(), r)],
        None => s
            .target_refs
            .iter()
            .enumerate()
            .map(|(i, r)| (format!("spec.targetRefs[{i}]"), r))
            .collect(),
    };
    if refs.is_empty() {
        return Ok(selector_scope(
            ns,
            root_namespace,
            s.selector.as_ref(),
            true,
        ));
    }
    if s.selector.is_some() {
        return Err(ctx.err(
            "spec.selector",
            "only one of selector and targetRefs may be set",
        ));
    }
    let mut services = Vec::new();
    for (at, r) in refs {
        if r.name.is_empty() {
            return Err(ctx.err(format!("{at}.name"), "must not be empty"));
        }
        if !r.namespace.is_empty() && r.namespace != ns {
            return Err(ctx.err(
                format!("{at}.namespace"),
                "cross-namespace references are not allowed",
            ));
        }
        match (r.group.as_str(), r.kind.as_str()) {
            ("" | "core", "Service") => services.push(r.name.clone()),
            ("gateway.networking.k8s.io", "Gateway" | "GatewayClass")
            | ("networking.istio.io", "ServiceEntry") => notes.push(format!(
                "{at} ({} {}) attaches to waypoints: the waypoint enforces it, node agents do not",
                r.kind, r.name
            )),
            (g, k) => {
                return Err(ctx.err(
                    format!("{at}.kind"),
                    format!(
                        "{g:?}/{k:?} is not a supported target (Service, or a waypoint Gateway)"
                    ),
                ));
            }
        }
    }
    if services.is_empty() {
        return Ok(Scope::Waypoint);
    }
    Ok(Scope::Services {
        namespace: ns.to_owned(),
        names: services,
    })
}

/// What a policy's `targetRef`/`targetRefs` name, read leniently: a waypoint picks the
/// policies attached to it, to its class or to the Services bound to it.
pub fn target_refs(obj: &RawObject) -> Vec<PolicyTargetReference> {
    let s: ScopeOnly = serde_yaml::from_value(obj.spec.clone()).unwrap_or_default();
    s.target_ref.into_iter().chain(s.target_refs).collect()
}

/// Compiles one AuthorizationPolicy object.
pub fn compile_authorization(obj: &RawObject, root_namespace: &str) -> AuthorizationEntry {
    let ctx = Ctx {
        kind: KIND_AUTHORIZATION,
        meta: &obj.metadata,
    };
    let name: Arc<str> = format!("{}/{}", obj.metadata.namespace, obj.metadata.name).into();
    let mut notes = Vec::new();
    let mut l7_rules = 0;
    let lenient: ScopeOnly = serde_yaml::from_value(obj.spec.clone()).unwrap_or_default();
    // Fail closed: an unscopable policy governs what it would without selector/targetRefs.
    let fallback = || selector_scope(&obj.metadata.namespace, root_namespace, None, true);
    let (scope, scope_error) = match authorization_scope(&ctx, &lenient, root_namespace, &mut notes)
    {
        Ok(s) => (s, None),
        Err(e) => (fallback(), Some(e)),
    };
    let policy = match scope_error.or_else(|| api_version_error(&ctx, obj)) {
        Some(e) => Err(e),
        None => parse_spec::<AuthorizationPolicySpec>(&ctx, obj)
            .and_then(|spec| {
                compile_rules(&ctx, &spec, Arc::clone(&name), &mut notes, &mut l7_rules)
            })
            .map(Arc::new),
    };
    AuthorizationEntry {
        name,
        scope,
        policy,
        notes,
        l7_rules,
    }
}

fn compile_rules(
    ctx: &Ctx<'_>,
    spec: &AuthorizationPolicySpec,
    name: Arc<str>,
    notes: &mut Vec<String>,
    l7_rules: &mut usize,
) -> Result<CompiledPolicy, PolicyError> {
    let action = match spec.action.as_deref().unwrap_or("ALLOW") {
        "ALLOW" => Action::Allow,
        "DENY" => Action::Deny,
        "AUDIT" => Action::Audit,
        "CUSTOM" => {
            return Err(ctx.err(
                "spec.action",
                "CUSTOM (external authorization) is not supported by mesh-agent",
            ));
        }
        other => {
            return Err(ctx.err(
                "spec.action",
                format!("unknown action {other:?} (expected ALLOW, DENY, AUDIT or CUSTOM)"),
            ));
        }
    };
    if spec.provider.is_some() {
        return Err(ctx.err("spec.provider", "only allowed with action CUSTOM"));
    }
    let mut rules = Vec::new();
    let mut unenforceable = Vec::new();
    for (i, r) in spec.rules.iter().enumerate() {
        let at = format!("spec.rules[{i}]");
        let mut l7 = Vec::new();
        let mut rule = Rule::default();
        if !r.from.is_empty() {
            let mut clause = Vec::new();
            for (j, f) in r.from.iter().enumerate() {
                let at = format!("{at}.from[{j}].source");
                let src = f
                    .source
                    .as_ref()
                    .ok_or_else(|| ctx.err(&at, "must be set"))?;
                clause.push(source_match(ctx, &at, src, &mut l7)?);
            }
            rule.clauses.push(clause);
        }
        if !r.to.is_empty() {
            let mut clause = Vec::new();
            for (j, t) in r.to.iter().enumerate() {
                let at = format!("{at}.to[{j}].operation");
                let op = t
                    .operation
                    .as_ref()
                    .ok_or_else(|| ctx.err(&at, "must be set"))?;
                clause.push(operation_match(ctx, &at, op, &mut l7)?);
            }
            rule.clauses.push(clause);
        }
        for (j, c) in r.when.iter().enumerate() {
            let at = format!("{at}.when[{j}]");
            rule.clauses
                .push(vec![condition_match(ctx, &at, c, &mut l7)?]);
        }
        if !l7.is_empty() {
            *l7_rules += 1;
        }
        if l7.is_empty() {
            rules.push(rule);
        } else if action == Action::Allow {
            notes.push(format!(
                "{at} uses L7 attributes ({}): node agents never allow by it (a waypoint checks it whole)",
                l7.join(", ")
            ));
            unenforceable.push(rule);
        } else {
            notes.push(format!(
                "{at}: L7 attributes ({}) are ignored by node agents: there the rule {}s every connection its L4 parts match (a waypoint checks it whole)",
                l7.join(", "),
                action.as_str().to_lowercase()
            ));
            rules.push(rule);
        }
    }
    Ok(CompiledPolicy {
        name,
        action,
        rules,
        unenforceable,
    })
}

fn strings(
    ctx: &Ctx<'_>,
    at: &str,
    field: &str,
    v: &[String],
) -> Result<Vec<StringMatch>, PolicyError> {
    v.iter()
        .enumerate()
        .map(|(i, s)| StringMatch::parse(s).map_err(|m| ctx.err(format!("{at}.{field}[{i}]"), m)))
        .collect()
}

fn parse_net(s: &str) -> Result<IpNet, String> {
    if let Ok(n) = s.parse::<IpNet>() {
        return Ok(n.trunc());
    }
    s.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("{s:?} is not an IP address or CIDR block"))
}

fn nets(ctx: &Ctx<'_>, at: &str, field: &str, v: &[String]) -> Result<Vec<IpNet>, PolicyError> {
    v.iter()
        .enumerate()
        .map(|(i, s)| parse_net(s).map_err(|m| ctx.err(format!("{at}.{field}[{i}]"), m)))
        .collect()
}

fn parse_port(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("{s:?} is not a port (1-65535)")),
    }
}

fn ports(ctx: &Ctx<'_>, at: &str, field: &str, v: &[String]) -> Result<Vec<u16>, PolicyError> {
    v.iter()
        .enumerate()
        .map(|(i, s)| parse_port(s).map_err(|m| ctx.err(format!("{at}.{field}[{i}]"), m)))
        .collect()
}

fn service_accounts(
    ctx: &Ctx<'_>,
    at: &str,
    field: &str,
    v: &[String],
) -> Result<Vec<(String, String)>, PolicyError> {
    v.iter()
        .enumerate()
        .map(|(i, s)| match s.split_once('/') {
            Some((ns, sa))
                if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') && !s.contains('*') =>
            {
                Ok((ns.to_owned(), sa.to_owned()))
            }
            _ => Err(ctx.err(
                format!("{at}.{field}[{i}]"),
                format!("{s:?} is not <namespace>/<service account> (no wildcards)"),
            )),
        })
        .collect()
}

fn source_match(
    ctx: &Ctx<'_>,
    at: &str,
    s: &Source,
    l7: &mut Vec<String>,
) -> Result<Match, PolicyError> {
    if *s == Source::default() {
        return Err(ctx.err(at, "must not be empty"));
    }
    let mut request = RequestMatch::default();
    for (field, v) in [
        ("requestPrincipals", &s.request_principals),
        ("notRequestPrincipals", &s.not_request_principals),
    ] {
        if !v.is_empty() {
            strings(ctx, at, field, v)?;
            l7.push(format!("{at}.{field}"));
        }
    }
    // No JWT is validated (RequestAuthentication is not implemented): no request has a
    // principal, so a positive list never matches and a negative one always passes.
    if !s.request_principals.is_empty() {
        request.never.push(format!("{at}.requestPrincipals"));
    }
    Ok(Match {
        principals: strings(ctx, at, "principals", &s.principals)?,
        not_principals: strings(ctx, at, "notPrincipals", &s.not_principals)?,
        namespaces: strings(ctx, at, "namespaces", &s.namespaces)?,
        not_namespaces: strings(ctx, at, "notNamespaces", &s.not_namespaces)?,
        service_accounts: service_accounts(ctx, at, "serviceAccounts", &s.service_accounts)?,
        not_service_accounts: service_accounts(
            ctx,
            at,
            "notServiceAccounts",
            &s.not_service_accounts,
        )?,
        source_ips: nets(ctx, at, "ipBlocks", &s.ip_blocks)?,
        not_source_ips: nets(ctx, at, "notIpBlocks", &s.not_ip_blocks)?,
        remote_ips: nets(ctx, at, "remoteIpBlocks", &s.remote_ip_blocks)?,
        not_remote_ips: nets(ctx, at, "notRemoteIpBlocks", &s.not_remote_ip_blocks)?,
        request,
        ..Match::default()
    })
}

fn operation_match(
    ctx: &Ctx<'_>,
    at: &str,
    op: &Operation,
    l7: &mut Vec<String>,
) -> Result<Match, PolicyError> {
    if *op == Operation::default() {
        return Err(ctx.err(at, "must not be empty"));
    }
    for (field, v) in [
        ("hosts", &op.hosts),
        ("notHosts", &op.not_hosts),
        ("methods", &op.methods),
        ("notMethods", &op.not_methods),
        ("paths", &op.paths),
        ("notPaths", &op.not_paths),
    ] {
        if !v.is_empty() {
            l7.push(format!("{at}.{field}"));
        }
    }
    let hosts = |field: &str, v: &[String]| {
        let lower: Vec<String> = v.iter().map(|h| h.to_ascii_lowercase()).collect();
        strings(ctx, at, field, &lower)
    };
    let paths = |field: &str, v: &[String]| {
        if let Some((i, p)) = v.iter().enumerate().find(|(_, p)| p.contains('{')) {
            return Err(ctx.err(
                format!("{at}.{field}[{i}]"),
                format!("{p:?}: path templates ({{*}}, {{**}}) are not supported"),
            ));
        }
        strings(ctx, at, field, v)
    };
    Ok(Match {
        destination_ports: ports(ctx, at, "ports", &op.ports)?,
        not_destination_ports: ports(ctx, at, "notPorts", &op.not_ports)?,
        request: RequestMatch {
            hosts: hosts("hosts", &op.hosts)?,
            not_hosts: hosts("notHosts", &op.not_hosts)?,
            methods: strings(ctx, at, "methods", &op.methods)?,
            not_methods: strings(ctx, at, "notMethods", &op.not_methods)?,
            paths: paths("paths", &op.paths)?,
            not_paths: paths("notPaths", &op.not_paths)?,
            ..RequestMatch::default()
        },
        ..Match::default()
    })
}

/// Condition keys that only a proxy parsing the request can check.
fn is_l7_key(key: &str) -> bool {
    matches!(
        key,
        "request.auth.principal"
            | "request.auth.audiences"
            | "request.auth.presenter"
            | "connection.sni"
    ) || (key.starts_with("request.headers[") && key.ends_with(']'))
        || (key.starts_with("request.auth.claims[") && key.ends_with(']'))
        || key.starts_with("experimental.envoy.filters.")
}

/// A `when` condition (an L7 key is recorded in `l7` too).
fn condition_match(
    ctx: &Ctx<'_>,
    at: &str,
    c: &super::crd::Condition,
    l7: &mut Vec<String>,
) -> Result<Match, PolicyError> {
    if c.key.is_empty() {
        return Err(ctx.err(format!("{at}.key"), "must not be empty"));
    }
    if c.values.is_empty() && c.not_values.is_empty() {
        return Err(ctx.err(at, "at least one of values and notValues must be set"));
    }
    let (v, nv) = (&c.values, &c.not_values);
    let m = match c.key.as_str() {
        "source.ip" => Match {
            source_ips: nets(ctx, at, "values", v)?,
            not_source_ips: nets(ctx, at, "notValues", nv)?,
            ..Match::default()
        },
        "remote.ip" => Match {
            remote_ips: nets(ctx, at, "values", v)?,
            not_remote_ips: nets(ctx, at, "notValues", nv)?,
            ..Match::default()
        },
        "source.namespace" => Match {
            namespaces: strings(ctx, at, "values", v)?,
            not_namespaces: strings(ctx, at, "notValues", nv)?,
            ..Match::default()
        },
        "source.principal" => Match {
            principals: strings(ctx, at, "values", v)?,
            not_principals: strings(ctx, at, "notValues", nv)?,
            ..Match::default()
        },
        "destination.ip" => Match {
            destination_ips: nets(ctx, at, "values", v)?,
            not_destination_ips: nets(ctx, at, "notValues", nv)?,
            ..Match::default()
        },
        "destination.port" => Match {
            destination_ports: ports(ctx, at, "values", v)?,
            not_destination_ports: ports(ctx, at, "notValues", nv)?,
            ..Match::default()
        },
        k if is_l7_key(k) => {
            l7.push(format!("{at} ({k})"));
            let values = strings(ctx, at, "values", v)?;
            let not_values = strings(ctx, at, "notValues", nv)?;
            let mut request = RequestMatch::default();
            match k
                .strip_prefix("request.headers[")
                .and_then(|h| h.strip_suffix(']'))
            {
                Some(name) if !name.is_empty() => {
                    request
                        .headers
                        .push((name.to_ascii_lowercase(), values, not_values));
                }
                Some(_) => return Err(ctx.err(format!("{at}.key"), "empty header name")),
                // Attributes no request has here: see RequestMatch::never.
                None if !values.is_empty() => request.never.push(format!("{at} ({k})")),
                None => {}
            }
            Match {
                request,
                ..Match::default()
            }
        }
        k => {
            return Err(ctx.err(format!("{at}.key"), format!("unknown attribute {k:?}")));
        }
    };
    Ok(m)
}

/// Compiles one PeerAuthentication object.
pub fn compile_peer_authentication(obj: &RawObject, root_namespace: &str) -> PeerAuthEntry {
    let ctx = Ctx {
        kind: KIND_PEER_AUTHENTICATION,
        meta: &obj.metadata,
    };
    let lenient: ScopeOnly = serde_yaml::from_value(obj.spec.clone()).unwrap_or_default();
    // Selectors of PeerAuthentication never cross namespaces, even in the root namespace.
    let scope = selector_scope(
        &obj.metadata.namespace,
        root_namespace,
        lenient.selector.as_ref(),
        false,
    );
    let mut notes = Vec::new();
    let modes = match api_version_error(&ctx, obj) {
        Some(e) => Err(e),
        None => parse_spec::<PeerAuthenticationSpec>(&ctx, obj)
            .and_then(|spec| peer_modes(&ctx, &spec, &mut notes)),
    };
    PeerAuthEntry {
        name: format!("{}/{}", obj.metadata.namespace, obj.metadata.name).into(),
        scope,
        created: obj.metadata.creation_timestamp.clone(),
        modes,
        notes,
    }
}

fn mode(
    ctx: &Ctx<'_>,
    at: &str,
    m: Option<&MutualTls>,
    notes: &mut Vec<String>,
) -> Result<Option<MtlsMode>, PolicyError> {
    match m.and_then(|m| m.mode.as_deref()) {
        None | Some("UNSET") => Ok(None),
        Some("PERMISSIVE") => Ok(Some(MtlsMode::Permissive)),
        Some("STRICT") => Ok(Some(MtlsMode::Strict)),
        Some("DISABLE") => {
            notes.push(format!(
                "{at}: DISABLE acts as PERMISSIVE (traffic between enrolled workloads is always mutual TLS)"
            ));
            Ok(Some(MtlsMode::Permissive))
        }
        Some(other) => Err(ctx.err(
            at,
            format!("unknown mode {other:?} (expected UNSET, DISABLE, PERMISSIVE or STRICT)"),
        )),
    }
}

fn peer_modes(
    ctx: &Ctx<'_>,
    spec: &PeerAuthenticationSpec,
    notes: &mut Vec<String>,
) -> Result<PeerAuthModes, PolicyError> {
    let mut out = PeerAuthModes {
        mode: mode(ctx, "spec.mtls.mode", spec.mtls.as_ref(), notes)?,
        ports: BTreeMap::new(),
    };
    let has_selector = spec
        .selector
        .as_ref()
        .is_some_and(|s| !s.match_labels.is_empty());
    if !spec.port_level_mtls.is_empty() && !has_selector {
        return Err(ctx.err(
            "spec.portLevelMtls",
            "port-level mTLS needs a workload selector",
        ));
    }
    for (key, m) in &spec.port_level_mtls {
        let text = key.to_string();
        let at = format!("spec.portLevelMtls.{text}");
        let port = parse_port(&text).map_err(|m| ctx.err(&at, m))?;
        out.ports
            .insert(port, mode(ctx, &format!("{at}.mode"), Some(m), notes)?);
    }
    Ok(out)
}
