//! The compiled form of authorization policies (the shape ztunnel and Envoy's RBAC evaluate): a
//! policy is a list of rules (OR); a rule is a list of clauses (AND: one for `from`, one for
//! `to`, one per `when`); a clause is a list of matches (OR); a match ANDs its fields; a field ORs
//! its values and its `not` variant excludes every value it lists. Node agents check the L4
//! fields; a waypoint also checks a match's [`RequestMatch`].
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
    /// The HTTP parts (empty for an L4-only match).
    pub request: RequestMatch,
}

/// The parts of a match only a proxy that reads the request can check (a waypoint).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestMatch {
    /// Lower case: hosts match case-insensitively, as in Istio.
    pub hosts: Vec<StringMatch>,
    pub not_hosts: Vec<StringMatch>,
    pub methods: Vec<StringMatch>,
    pub not_methods: Vec<StringMatch>,
    pub paths: Vec<StringMatch>,
    pub not_paths: Vec<StringMatch>,
    /// `when: request.headers[name]`: the name (lower case), values and notValues.
    pub headers: Vec<(String, Vec<StringMatch>, Vec<StringMatch>)>,
    /// Fields that need a value no request has here (`requestPrincipals`, `request.auth.*`: no
    /// JWT is validated; `connection.sni`): absent values match nothing, so a match listing one
    /// never holds, while their `not` forms always do (and are not recorded).
    pub never: Vec<String>,
}

/// A request as authorization sees it.
#[derive(Clone, Copy, Debug)]
pub struct RequestView<'a> {
    pub method: &'a str,
    /// Without the query, dot segments removed (Istio's default BASE normalisation).
    pub path: &'a str,
    /// The authority (`Host`), as sent.
    pub host: &'a str,
    pub headers: &'a http::HeaderMap,
}

impl RequestMatch {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Every field holds for `r`.
    pub fn matches(&self, r: &RequestView<'_>) -> bool {
        let sm = |m: &StringMatch, v: &str| m.matches(v);
        let host = r.host.to_ascii_lowercase();
        self.never.is_empty()
            && positive(&self.hosts, Some(host.as_str()), sm)
            && negative(&self.not_hosts, Some(host.as_str()), sm)
            && positive(&self.methods, Some(r.method), sm)
            && negative(&self.not_methods, Some(r.method), sm)
            && positive(&self.paths, Some(r.path), sm)
            && negative(&self.not_paths, Some(r.path), sm)
            && self.headers.iter().all(|(name, values, not_values)| {
                // Repeated headers are seen joined with commas, as Envoy does.
                let joined = r
                    .headers
                    .get_all(name.as_str())
                    .iter()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .collect::<Vec<_>>()
                    .join(",");
                let value = r
                    .headers
                    .contains_key(name.as_str())
                    .then_some(joined.as_str());
                positive(values, value, sm) && negative(not_values, value, sm)
            })
    }
}

/// RFC 3986 §5.2.4: `.` and `..` segments removed, so `/public/../admin` is checked as `/admin`.
pub fn normalize_path(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').collect();
    let last = segments.len().saturating_sub(1);
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." | ".." => {
                if *seg == ".." && out.len() > 1 {
                    out.pop();
                }
                // A trailing dot segment leaves the directory: `/a/b/..` is `/a/`.
                if i == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    let joined = out.join("/");
    if joined.starts_with('/') {
        joined
    } else {
        format!("/{joined}")
    }
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

    /// The L4 fields and, when there is a request, the HTTP ones.
    fn matches_in(&self, s: &Subject<'_>, request: Option<&RequestView<'_>>) -> bool {
        self.matches(s) && request.is_none_or(|r| self.request.matches(r))
    }
}

/// Clauses that must all hold, each an OR of matches.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    pub clauses: Vec<Vec<Match>>,
}

impl Rule {
    pub(super) fn matches(&self, s: &Subject<'_>) -> bool {
        self.matches_in(s, None)
    }

    fn matches_in(&self, s: &Subject<'_>, request: Option<&RequestView<'_>>) -> bool {
        self.clauses
            .iter()
            .all(|clause| clause.iter().any(|m| m.matches_in(s, request)))
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
    /// ALLOW rules that need L7 attributes: a node agent never allows by them (a waypoint
    /// checks them whole); their L4 parts tell a denial that an L7 rule would have been
    /// consulted.
    pub unenforceable: Vec<Rule>,
}

impl CompiledPolicy {
    pub(super) fn matches(&self, s: &Subject<'_>) -> bool {
        self.rules.iter().any(|r| r.matches(s))
    }

    /// With a request (at a waypoint) every rule is checked whole; without one (opaque TCP),
    /// as a node agent does: L4 parts only, ALLOW rules that need the request never match.
    pub(super) fn matches_in(&self, s: &Subject<'_>, request: Option<&RequestView<'_>>) -> bool {
        match request {
            None => self.matches(s),
            Some(_) => self
                .rules
                .iter()
                .chain(&self.unenforceable)
                .any(|r| r.matches_in(s, request)),
        }
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
