//! The compiled policy set, indexed by destination workload: each workload holds exactly the
//! policies that select it, so a decision costs O(policies selecting the destination).
use std::{collections::HashMap, net::IpAddr, sync::Arc};

use tracing::{error, warn};

use super::{
    compile::{
        AuthorizationEntry, KIND_AUTHORIZATION, KIND_PEER_AUTHENTICATION,
        KIND_REQUEST_AUTHENTICATION, PeerAuthEntry, PolicyError, Scope, WorkloadInfo,
        compile_authorization, compile_peer_authentication,
    },
    crd::RawObject,
    model::{Action, CompiledPolicy, ConnectionAttrs, MtlsMode, RequestView, Subject},
};

/// Why a decision came out the way it did (a metric label: a small fixed set).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// No ALLOW policy selects the workload and no DENY matched.
    NoAllowPolicy,
    /// An ALLOW policy matched.
    AllowMatched,
    /// A DENY policy matched.
    DenyMatched,
    /// ALLOW policies select the workload and none matched.
    NoAllowMatched,
    /// Only an ALLOW rule that needs L7 attributes would have matched (checked at L4: a node
    /// agent, or opaque TCP through a waypoint).
    L7Unenforceable,
    /// Plaintext to a workload (port) whose PeerAuthentication is STRICT.
    MtlsStrict,
    /// A policy selecting the workload was rejected; its workloads fail closed.
    InvalidPolicy,
    /// The destination is bound to a waypoint and the connection did not come from it.
    WaypointBypassed,
    /// The destination is not a workload this agent enforces for.
    UnknownDestination,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoAllowPolicy => "no_allow_policy",
            Self::AllowMatched => "allow_matched",
            Self::DenyMatched => "deny_matched",
            Self::NoAllowMatched => "no_allow_matched",
            Self::L7Unenforceable => "l7_unenforceable",
            Self::MtlsStrict => "mtls_strict",
            Self::InvalidPolicy => "invalid_policy",
            Self::WaypointBypassed => "waypoint_bypassed",
            Self::UnknownDestination => "unknown_destination",
        }
    }
}

/// The outcome for one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub reason: Reason,
    /// The policy that decided (`namespace/name`), if one did.
    pub policy: Option<Arc<str>>,
    /// AUDIT policies that matched (recorded, no effect).
    pub audited: Vec<Arc<str>>,
}

impl Decision {
    fn new(allowed: bool, reason: Reason, policy: Option<&Arc<str>>) -> Self {
        Self {
            allowed,
            reason,
            policy: policy.cloned(),
            audited: Vec::new(),
        }
    }
}

/// PeerAuthentication resolved for one workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedMtls {
    pub mode: MtlsMode,
    pub ports: HashMap<u16, MtlsMode>,
    /// The most specific policy that set anything, for logs.
    pub policy: Option<Arc<str>>,
}

impl ResolvedMtls {
    pub fn mode_for(&self, port: u16) -> MtlsMode {
        self.ports.get(&port).copied().unwrap_or(self.mode)
    }
}

/// Everything that applies to one workload.
#[derive(Clone, Debug)]
pub struct WorkloadPolicies {
    pub key: Arc<str>,
    pub allow: Vec<Arc<CompiledPolicy>>,
    pub deny: Vec<Arc<CompiledPolicy>>,
    pub audit: Vec<Arc<CompiledPolicy>>,
    /// Rejected policies that select it.
    pub invalid: Vec<Arc<str>>,
    pub mtls: ResolvedMtls,
    pub waypoints: Vec<(Arc<str>, super::compile::WaypointGate)>,
}

/// All policies of the mesh, compiled for the workloads this agent enforces for.
#[derive(Debug, Default)]
pub struct PolicySet {
    by_ip: HashMap<IpAddr, Arc<WorkloadPolicies>>,
    /// Every rejected object (also those that select no local workload).
    pub errors: Vec<PolicyError>,
    /// Notes about accepted objects (L7 parts, DISABLE, waypoint attachment).
    pub notes: Vec<String>,
    /// Objects accepted, by kind.
    pub authorization_policies: usize,
    pub peer_authentications: usize,
    /// Accepted rules that use L7 attributes, which node agents cannot check (see `compile`).
    pub l7_rules: usize,
}

impl PolicySet {
    /// Compiles `objects` for `workloads`. Every object is compiled, so errors are reported even
    /// for policies that select none of these workloads.
    pub fn compile(
        objects: &[RawObject],
        workloads: &[WorkloadInfo],
        root_namespace: &str,
    ) -> Self {
        let mut set = PolicySet::default();
        let mut authz: Vec<AuthorizationEntry> = Vec::new();
        let mut peer: Vec<PeerAuthEntry> = Vec::new();
        for obj in objects {
            match obj.kind.as_str() {
                KIND_AUTHORIZATION => authz.push(compile_authorization(obj, root_namespace)),
                KIND_PEER_AUTHENTICATION => {
                    peer.push(compile_peer_authentication(obj, root_namespace))
                }
                KIND_REQUEST_AUTHENTICATION => set.notes.push(format!(
                    "RequestAuthentication {}/{}: JWTs are checked by waypoints, not node agents",
                    obj.metadata.namespace, obj.metadata.name
                )),
                // Routing objects live in the same list; the waypoints and the node agents'
                // waypoint bindings read (and report) them.
                kind if crate::l7::api::ROUTING_KINDS.contains(&kind) => {}
                other => set.errors.push(PolicyError {
                    kind: other.to_owned(),
                    namespace: obj.metadata.namespace.clone(),
                    name: obj.metadata.name.clone(),
                    field: "kind".into(),
                    message: "not a policy kind mesh-agent reads".into(),
                }),
            }
        }
        for e in &authz {
            set.notes.extend(
                e.notes
                    .iter()
                    .map(|n| format!("AuthorizationPolicy {}: {n}", e.name)),
            );
            match &e.policy {
                Ok(_) => {
                    set.authorization_policies += 1;
                    set.l7_rules += e.l7_rules;
                }
                Err(err) => set.errors.push(err.clone()),
            }
        }
        for e in &peer {
            set.notes.extend(
                e.notes
                    .iter()
                    .map(|n| format!("PeerAuthentication {}: {n}", e.name)),
            );
            match &e.modes {
                Ok(_) => set.peer_authentications += 1,
                Err(err) => set.errors.push(err.clone()),
            }
        }
        // Same-level PeerAuthentications: the oldest wins, then the name (as Istio).
        peer.sort_by(|a, b| (&a.created, &a.name).cmp(&(&b.created, &b.name)));
        for w in workloads {
            let wp = Arc::new(for_workload(w, &authz, &peer));
            for ip in &w.ips {
                set.by_ip.insert(*ip, Arc::clone(&wp));
            }
        }
        set
    }

    /// Logs what compilation found: errors at error level, notes at warn.
    pub fn log(&self) {
        for e in &self.errors {
            error!(error = %e, "policy rejected; the workloads it selects deny every connection until it is fixed");
        }
        for n in &self.notes {
            warn!(note = %n, "policy");
        }
    }

    /// What applies to the workload at `ip`.
    pub fn workload(&self, ip: IpAddr) -> Option<&Arc<WorkloadPolicies>> {
        self.by_ip.get(&ip)
    }

    /// Decides a connection to a workload of this node. `source: None` means plaintext.
    pub fn evaluate(&self, attrs: &ConnectionAttrs) -> Decision {
        let Some(wp) = self.by_ip.get(&attrs.destination_ip) else {
            return Decision::new(false, Reason::UnknownDestination, None);
        };
        // Checked first: a bypass is refused whatever the policies would allow.
        if let Some((name, _)) = wp.waypoints.iter().find(|(_, g)| {
            let applies = match &g.service_host {
                None => true,
                Some(h) => attrs.service_host.as_deref() == Some(h.as_str()),
            };
            applies
                && !attrs
                    .source
                    .as_ref()
                    .is_some_and(|s| g.identities.contains(s))
        }) {
            return Decision::new(false, Reason::WaypointBypassed, Some(name));
        }
        if attrs.source.is_none() && wp.mtls.mode_for(attrs.destination_port) == MtlsMode::Strict {
            return Decision::new(false, Reason::MtlsStrict, wp.mtls.policy.as_ref());
        }
        let policies = Attached {
            allow: &wp.allow,
            deny: &wp.deny,
            audit: &wp.audit,
            invalid: &wp.invalid,
        };
        policies.decide(attrs, None)
    }
}

/// The policies that apply to one destination, by action.
pub struct Attached<'a> {
    pub allow: &'a [Arc<CompiledPolicy>],
    pub deny: &'a [Arc<CompiledPolicy>],
    pub audit: &'a [Arc<CompiledPolicy>],
    /// Rejected policies that would apply: their destinations fail closed.
    pub invalid: &'a [Arc<str>],
}

impl Attached<'_> {
    /// Istio's order: a rejected policy denies, then DENY, then ALLOW (when any ALLOW policy
    /// applies, one must match). With `request` (a waypoint) rules are checked whole;
    /// without, at L4 as a node agent checks them.
    pub fn decide(&self, attrs: &ConnectionAttrs, request: Option<&RequestView<'_>>) -> Decision {
        if let Some(bad) = self.invalid.first() {
            return Decision::new(false, Reason::InvalidPolicy, Some(bad));
        }
        let s = Subject::new(attrs);
        let audited: Vec<Arc<str>> = self
            .audit
            .iter()
            .filter(|p| p.matches_in(&s, request))
            .map(|p| Arc::clone(&p.name))
            .collect();
        let mut d = self.decide_subject(&s, request);
        d.audited = audited;
        d
    }

    fn decide_subject(&self, s: &Subject<'_>, request: Option<&RequestView<'_>>) -> Decision {
        if let Some(p) = self.deny.iter().find(|p| p.matches_in(s, request)) {
            return Decision::new(false, Reason::DenyMatched, Some(&p.name));
        }
        if self.allow.is_empty() {
            return Decision::new(true, Reason::NoAllowPolicy, None);
        }
        if let Some(p) = self.allow.iter().find(|p| p.matches_in(s, request)) {
            return Decision::new(true, Reason::AllowMatched, Some(&p.name));
        }
        if request.is_none()
            && let Some(p) = self.allow.iter().find(|p| p.l7_would_apply(s))
        {
            return Decision::new(false, Reason::L7Unenforceable, Some(&p.name));
        }
        Decision::new(false, Reason::NoAllowMatched, None)
    }
}

fn for_workload(
    w: &WorkloadInfo,
    authz: &[AuthorizationEntry],
    peer: &[PeerAuthEntry],
) -> WorkloadPolicies {
    let mut wp = WorkloadPolicies {
        key: w.key.as_str().into(),
        allow: Vec::new(),
        deny: Vec::new(),
        audit: Vec::new(),
        invalid: Vec::new(),
        mtls: resolve_mtls(w, peer),
        waypoints: w
            .waypoints
            .iter()
            .map(|g| (Arc::from(g.waypoint.as_str()), g.clone()))
            .collect(),
    };
    for e in authz.iter().filter(|e| e.scope.selects(w)) {
        match &e.policy {
            Ok(p) => match p.action {
                Action::Allow => wp.allow.push(Arc::clone(p)),
                Action::Deny => wp.deny.push(Arc::clone(p)),
                Action::Audit => wp.audit.push(Arc::clone(p)),
            },
            Err(_) => wp.invalid.push(Arc::clone(&e.name)),
        }
    }
    wp
}

/// Istio's precedence: workload selector > namespace > mesh (root namespace); the oldest policy
/// of a level; UNSET inherits from the level above; port-level settings (workload policies
/// only) override the workload's mode for that port. Nothing at all: PERMISSIVE. A rejected
/// policy counts as STRICT at its level.
fn resolve_mtls(w: &WorkloadInfo, peer: &[PeerAuthEntry]) -> ResolvedMtls {
    let pick =
        |level: fn(&Scope) -> bool| peer.iter().find(|e| level(&e.scope) && e.scope.selects(w));
    let mesh = pick(|s| matches!(s, Scope::Mesh));
    let namespace = pick(|s| matches!(s, Scope::Namespace(_)));
    let workload = pick(|s| matches!(s, Scope::Selector { .. }));
    let mut out = ResolvedMtls {
        mode: MtlsMode::Permissive,
        ports: HashMap::new(),
        policy: None,
    };
    for e in [mesh, namespace, workload].into_iter().flatten() {
        let modes = match &e.modes {
            Ok(m) => m.clone(),
            Err(_) => super::compile::PeerAuthModes {
                mode: Some(MtlsMode::Strict),
                ports: Default::default(),
            },
        };
        if let Some(m) = modes.mode {
            out.mode = m;
            out.policy = Some(Arc::clone(&e.name));
        }
        for (port, m) in modes.ports {
            out.ports.insert(port, m.unwrap_or(out.mode));
            out.policy = Some(Arc::clone(&e.name));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn l7_rules_are_counted_and_explained() {
        let objects: Vec<RawObject> = serde_yaml::from_str(
            r#"
- {apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: get, namespace: ns},
   spec: {rules: [{to: [{operation: {methods: [GET]}}]}, {from: [{source: {namespaces: [ns]}}]}]}}
- {apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: no-admin, namespace: ns},
   spec: {action: DENY, rules: [{to: [{operation: {paths: [/admin]}}]}]}}
- {apiVersion: security.istio.io/v1, kind: RequestAuthentication, metadata: {name: jwt, namespace: ns}, spec: {}}
"#,
        )
        .unwrap();
        let set = PolicySet::compile(&objects, &[], "istio-system");
        assert!(set.errors.is_empty(), "{:?}", set.errors);
        assert_eq!((set.authorization_policies, set.l7_rules), (2, 2));
        let notes = set.notes.join("\n");
        assert!(
            notes.contains(
                "ns/get: spec.rules[0] uses L7 attributes (spec.rules[0].to[0].operation.methods)"
            ),
            "{notes}"
        );
        assert!(
            notes.contains("ns/no-admin: spec.rules[0]: L7 attributes"),
            "{notes}"
        );
        assert!(notes.contains("RequestAuthentication ns/jwt"), "{notes}");
    }

    /// Istio ambient: all traffic into a waypoint-bound resource passes its waypoint. The
    /// destination agent refuses the rest, whatever the policies allow; a missing waypoint
    /// lets nothing through.
    #[test]
    fn traffic_that_bypasses_a_waypoint_is_refused() {
        use crate::identity::SpiffeId;
        let waypoint = SpiffeId::new("cluster.local", "ns", "waypoint").unwrap();
        let client = SpiffeId::new("cluster.local", "ns", "client").unwrap();
        let gate = |service_host: Option<&str>, identities: Vec<SpiffeId>| {
            super::super::compile::WaypointGate {
                waypoint: "ns/waypoint".into(),
                service_host: service_host.map(str::to_owned),
                identities,
            }
        };
        let workload = |ip: &str, gates| WorkloadInfo {
            key: format!("ns/{ip}"),
            namespace: "ns".into(),
            ips: vec![ip.parse().unwrap()],
            waypoints: gates,
            ..Default::default()
        };
        let set = PolicySet::compile(
            &[],
            &[
                workload("10.0.0.1", vec![gate(None, vec![waypoint.clone()])]),
                workload(
                    "10.0.0.2",
                    vec![gate(
                        Some("svc.ns.svc.cluster.local"),
                        vec![waypoint.clone()],
                    )],
                ),
                workload("10.0.0.3", vec![gate(None, vec![])]),
            ],
            "istio-system",
        );
        let attrs = |dst: &str, source: Option<&SpiffeId>, host: Option<&str>| ConnectionAttrs {
            source: source.cloned(),
            source_ip: "10.0.9.9".parse().unwrap(),
            destination_ip: dst.parse().unwrap(),
            destination_port: 8080,
            service_host: host.map(Arc::from),
        };
        let svc = Some("svc.ns.svc.cluster.local");
        let cases: [(&str, ConnectionAttrs, Option<Reason>); 8] = [
            (
                "a bound pod: its waypoint passes",
                attrs("10.0.0.1", Some(&waypoint), None),
                None,
            ),
            (
                "a bound pod: another identity is refused",
                attrs("10.0.0.1", Some(&client), None),
                Some(Reason::WaypointBypassed),
            ),
            (
                "a bound pod: plaintext is refused",
                attrs("10.0.0.1", None, None),
                Some(Reason::WaypointBypassed),
            ),
            (
                "a bound pod: naming a service does not help",
                attrs("10.0.0.1", Some(&client), svc),
                Some(Reason::WaypointBypassed),
            ),
            (
                "a bound service, addressed: only its waypoint",
                attrs("10.0.0.2", Some(&client), svc),
                Some(Reason::WaypointBypassed),
            ),
            (
                "a bound service, addressed by its waypoint",
                attrs("10.0.0.2", Some(&waypoint), svc),
                None,
            ),
            (
                "a bound service's pod addressed directly (waypoint-for service): allowed, as Istio",
                attrs("10.0.0.2", Some(&client), None),
                None,
            ),
            (
                "a missing waypoint lets nothing through",
                attrs("10.0.0.3", Some(&waypoint), None),
                Some(Reason::WaypointBypassed),
            ),
        ];
        for (istio, a, want) in cases {
            let d = set.evaluate(&a);
            match want {
                None => assert!(d.allowed, "{istio}: {d:?}"),
                Some(r) => {
                    assert!(!d.allowed, "{istio}: {d:?}");
                    assert_eq!(d.reason, r, "{istio}");
                    assert_eq!(d.policy.as_deref(), Some("ns/waypoint"), "{istio}");
                }
            }
        }
    }
}
