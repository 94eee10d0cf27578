//! The compiled, L4-only form of authorization policies (the shape ztunnel evaluates): a policy
//! is a list of rules (OR); a rule is a list of clauses (AND: one for `from`, one for `to`, one per
//! `when`); a clause is a list of matches (OR); a match ANDs its fields; a field ORs its values and
//! its `not` variant excludes every value it lists.
use std::{net::IpAddr, sync::Arc};

use ipnet::IpNet;

use crate::identity::SpiffeId;

/// What policy may look at for one connection, at the destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionAttrs {
    /// The peer's verified identity; `None` for plaintext.
    pub source: Option<SpiffeId>,
    /// The client's address (for HBONE: the address the source agent connected from, which is
    /// the client pod's).
    pub source_ip: IpAddr,
    pub destination_ip: IpAddr,
    /// The workload's port (after any service port mapping).
    pub destination_port: u16,
    /// The service hostname the client addressed, when the peer says (HBONE `forwarded:
    /// ...;host=`): traffic to a waypoint-bound service must come from its waypoint.
    pub service_host: Option<Arc<str>>,
}

/// The source as string matchers see it: Istio principals have no `spiffe://` prefix.
pub(super) struct Subject<'a> {
    pub principal: Option<String>,
    pub namespace: Option<&'a str>,
    pub service_account: Option<(&'a str, &'a str)>,
    pub attrs: &'a ConnectionAttrs,
}

impl<'a> Subject<'a> {
    pub fn new(attrs: &'a ConnectionAttrs) -> Self {
        let id = attrs.source.as_ref();
        Self {
            principal: id.map(|i| {
                format!(
                    "{}/ns/{}/sa/{}",
                    i.trust_domain, i.namespace, i.service_account
                )
            }),
            namespace: id.map(|i| i.namespace.as_str()),
            service_account: id.map(|i| (i.namespace.as_str(), i.service_account.as_str())),
            attrs,
        }
    }
}

/// Istio's string forms: `*` (any non-empty value), `prefix*`, `*suffix`, or exact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Presence,
}

impl StringMatch {
    /// Parses a value; a `*` anywhere but alone, first or last is an error, as in Istio.
    pub fn parse(v: &str) -> Result<Self, String> {
        if v.is_empty() {
            return Err("empty value".into());
        }
        if v == "*" {
            return Ok(Self::Presence);
        }
        let stars = v.matches('*').count();
        if stars == 0 {
            return Ok(Self::Exact(v.to_owned()));
        }
        if stars == 1 {
            if let Some(rest) = v.strip_suffix('*') {
                return Ok(Self::Prefix(rest.to_owned()));
            }
            if let Some(rest) = v.strip_prefix('*') {
                return Ok(Self::Suffix(rest.to_owned()));
            }
        }
        Err(format!(
            "{v:?}: a wildcard is only allowed alone, as a prefix (`*x`) or as a suffix (`x*`)"
        ))
    }

    pub fn matches(&self, s: &str) -> bool {
        match self {
            Self::Exact(e) => s == e,
            Self::Prefix(p) => s.starts_with(p.as_str()),
            Self::Suffix(x) => s.ends_with(x.as_str()),
            Self::Presence => !s.is_empty(),
        }
    }
}

/// One `source`, `operation` or `when` condition: every non-empty field must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Match {
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    /// `(namespace, service account)`.
    pub service_accounts: Vec<(String, String)>,
    pub not_service_accounts: Vec<(String, String)>,
    pub source_ips: Vec<IpNet>,
    pub not_source_ips: Vec<IpNet>,
    /// `remoteIpBlocks` / `remote.ip`: the original client. With no proxy in between (the
    /// source agent connects from the client pod's address) that is the source address.
    pub remote_ips: Vec<IpNet>,
    pub not_remote_ips: Vec<IpNet>,
    pub destination_ips: Vec<IpNet>,
    pub not_destination_ips: Vec<IpNet>,
    pub destination_ports: Vec<u16>,
    pub not_destination_ports: Vec<u16>,
}

/// A positive list holds when it is empty or some value matches; a value that is absent (no
/// identity on a plaintext connection) matches nothing, so it passes every `not` list, as in
/// Envoy's RBAC.
fn positive<T, V: Copy>(list: &[T], value: Option<V>, m: impl Fn(&T, V) -> bool) -> bool {
    list.is_empty() || value.is_some_and(|v| list.iter().any(|x| m(x, v)))
}

fn negative<T, V: Copy>(list: &[T], value: Option<V>, m: impl Fn(&T, V) -> bool) -> bool {
    !value.is_some_and(|v| list.iter().any(|x| m(x, v)))
}

impl Match {
    pub(super) fn matches(&self, s: &Subject<'_>) -> bool {
        let principal = s.principal.as_deref();
        let a = s.attrs;
        let sm = |m: &StringMatch, v: &str| m.matches(v);
        let sa = |x: &(String, String), v: (&str, &str)| x.0 == v.0 && x.1 == v.1;
        let net = |n: &IpNet, ip: IpAddr| n.contains(&ip);
        let port = |p: &u16, v: u16| *p == v;
        positive(&self.principals, principal, sm)
            && negative(&self.not_principals, principal, sm)
            && positive(&self.namespaces, s.namespace, sm)
            && negative(&self.not_namespaces, s.namespace, sm)
            && positive(&self.service_accounts, s.service_account, sa)
            && negative(&self.not_service_accounts, s.service_account, sa)
            && positive(&self.source_ips, Some(a.source_ip), net)
            && negative(&self.not_source_ips, Some(a.source_ip), net)
            && positive(&self.remote_ips, Some(a.source_ip), net)
            && negative(&self.not_remote_ips, Some(a.source_ip), net)
            && positive(&self.destination_ips, Some(a.destination_ip), net)
            && negative(&self.not_destination_ips, Some(a.destination_ip), net)
            && positive(&self.destination_ports, Some(a.destination_port), port)
            && negative(&self.not_destination_ports, Some(a.destination_port), port)
    }
}

/// Clauses that must all hold, each an OR of matches.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    pub clauses: Vec<Vec<Match>>,
}

impl Rule {
    pub(super) fn matches(&self, s: &Subject<'_>) -> bool {
        self.clauses
            .iter()
            .all(|clause| clause.iter().any(|m| m.matches(s)))
    }
}

/// What a matching policy does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    Allow,
    Deny,
    /// Recorded, never decides.
    Audit,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "ALLOW",
            Self::Deny => "DENY",
            Self::Audit => "AUDIT",
        }
    }
}

/// An authorization policy ready to evaluate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompiledPolicy {
    /// `namespace/name`.
    pub name: Arc<str>,
    pub action: Action,
    pub rules: Vec<Rule>,
    /// ALLOW rules that need L7 attributes: they never allow here (there is no waypoint), but
    /// their L4 parts are kept so a denial can say that an L7 rule would have been consulted.
    pub unenforceable: Vec<Rule>,
}

impl CompiledPolicy {
    pub(super) fn matches(&self, s: &Subject<'_>) -> bool {
        self.rules.iter().any(|r| r.matches(s))
    }

    pub(super) fn l7_would_apply(&self, s: &Subject<'_>) -> bool {
        self.unenforceable.iter().any(|r| r.matches(s))
    }
}

/// PeerAuthentication's mTLS modes after resolution (DISABLE is PERMISSIVE: mesh traffic is
/// always mutual TLS, plaintext is accepted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MtlsMode {
    Permissive,
    Strict,
}

impl MtlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Permissive => "PERMISSIVE",
            Self::Strict => "STRICT",
        }
    }
}
