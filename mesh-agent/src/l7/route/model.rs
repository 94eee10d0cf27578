//! Compiled routing: what a waypoint or gateway consults per request. Built from Istio's
//! VirtualService / DestinationRule (and later Gateway API routes) by [`super::compile`]; holds
//! no text that still needs parsing, so a request never meets a config error.
use std::{collections::BTreeMap, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use regex::Regex;

use super::matching::{RequestMatch, StringMatcher};

/// Which hosts a VirtualService claims.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostPattern {
    /// A fully qualified name.
    Exact(String),
    /// `*.example.com`: the suffix `.example.com`.
    Suffix(String),
    /// `*`.
    Any,
}

impl HostPattern {
    pub fn matches(&self, host: &str) -> bool {
        match self {
            Self::Exact(h) => h.eq_ignore_ascii_case(host),
            Self::Suffix(s) => {
                host.len() > s.len() && host[host.len() - s.len()..].eq_ignore_ascii_case(s)
            }
            Self::Any => true,
        }
    }

    /// More specific patterns win: exact, then longer suffixes, then `*`.
    pub fn specificity(&self) -> usize {
        match self {
            Self::Exact(_) => usize::MAX,
            Self::Suffix(s) => s.len(),
            Self::Any => 0,
        }
    }
}

/// One compiled VirtualService.
#[derive(Clone, Debug)]
pub struct VirtualService {
    /// `namespace/name`.
    pub key: String,
    /// RFC 3339 text; among services claiming one host the oldest wins.
    pub created: Option<String>,
    pub hosts: Vec<HostPattern>,
    pub http: Vec<HttpRule>,
    pub tcp: Vec<TcpRule>,
}

/// One `http[]` rule.
#[derive(Clone, Debug)]
pub struct HttpRule {
    /// `name`, or `#<index>` when the rule has none.
    pub name: String,
    /// Alternatives; empty matches every request.
    pub matches: Vec<RequestMatch>,
    pub action: RuleAction,
    pub rewrite: Option<Rewrite>,
    pub headers: HeaderOps,
    /// Whole-request bound, retries included; `None`: no timeout (Istio's default).
    pub timeout: Option<Duration>,
    pub retries: RetryPolicy,
    pub fault: Option<Fault>,
    pub mirrors: Vec<Mirror>,
    pub cors: Option<Cors>,
}

impl HttpRule {
    /// The header edits for a request to `target` (or its response), in the order Istio's
    /// Envoy config applies them: with one destination the destination's edits come after the
    /// rule's (its `set` wins); with several they come before (the rule's `set` wins).
    pub fn header_edits<'a>(
        &'a self,
        target: Option<&'a RouteTarget>,
        response: bool,
    ) -> Vec<&'a HeaderEdit> {
        let pick = |ops: &'a HeaderOps| {
            if response {
                &ops.response
            } else {
                &ops.request
            }
        };
        let rule = pick(&self.headers);
        let several = matches!(&self.action, RuleAction::Route(w) if w.destinations.len() > 1);
        match target.map(|t| pick(&t.headers)) {
            None => vec![rule],
            Some(dest) if several => vec![dest, rule],
            Some(dest) => vec![rule, dest],
        }
    }

    /// `None`: the rule does not apply; `Some(None)`: it has no conditions; `Some(Some(m))`:
    /// the first alternative that matched (a prefix rewrite replaces what it matched).
    pub fn first_match(&self, r: &super::RequestView<'_>) -> Option<Option<&RequestMatch>> {
        if self.matches.is_empty() {
            return Some(None);
        }
        self.matches.iter().find(|m| m.matches(r)).map(Some)
    }
}

/// What a matched rule does.
#[derive(Clone, Debug)]
pub enum RuleAction {
    /// Forward to one of these, chosen by weight.
    Route(WeightedDestinations),
    Redirect(Redirect),
    Direct {
        status: StatusCode,
        body: Bytes,
    },
}

/// Destinations with relative weights (a destination gets weight / total).
#[derive(Clone, Debug)]
pub struct WeightedDestinations {
    pub destinations: Vec<RouteTarget>,
    pub total_weight: u64,
}

impl WeightedDestinations {
    /// The destination for a uniformly random `roll`; `None` when every weight is 0.
    pub fn pick(&self, roll: u64) -> Option<&RouteTarget> {
        if self.total_weight == 0 {
            return None;
        }
        let mut point = roll % self.total_weight;
        for d in &self.destinations {
            if point < u64::from(d.weight) {
                return Some(d);
            }
            point -= u64::from(d.weight);
        }
        None
    }
}

/// A service (and subset) a request goes to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Fully qualified.
    pub host: String,
    pub subset: Option<String>,
    /// `None`: the port the client addressed.
    pub port: Option<u16>,
}

#[derive(Clone, Debug)]
pub struct RouteTarget {
    pub target: Target,
    pub weight: u32,
    /// Applied after the rule's own edits.
    pub headers: HeaderOps,
}

/// Header edits for the request and the response.
#[derive(Clone, Debug, Default)]
pub struct HeaderOps {
    pub request: HeaderEdit,
    pub response: HeaderEdit,
}

/// `remove`, then `set` (replaces), then `add` (appends), as Envoy applies them.
#[derive(Clone, Debug, Default)]
pub struct HeaderEdit {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderEdit {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }
}

#[derive(Clone, Debug)]
pub enum Rewrite {
    /// Gateway API `ReplaceFullPath`: the whole path, whatever matched.
    FullPath {
        path: String,
        authority: Option<String>,
    },
    /// Gateway API `ReplacePrefixMatch`: the matched path prefix (whole segments) replaced,
    /// without doubling or losing the `/` between it and the rest.
    PrefixSegments {
        prefix: String,
        replacement: String,
        authority: Option<String>,
    },
    /// Replace the part the rule's prefix match matched (the whole path for other matches).
    Uri {
        uri: Option<String>,
        authority: Option<String>,
    },
    /// `uriRegexRewrite`: every match of the pattern in the path replaced.
    Regex {
        pattern: Regex,
        substitution: String,
        authority: Option<String>,
    },
}

impl Rewrite {
    /// The new `:authority`, if the rewrite sets one.
    pub fn authority(&self) -> Option<&str> {
        match self {
            Self::Uri { authority, .. }
            | Self::Regex { authority, .. }
            | Self::FullPath { authority, .. }
            | Self::PrefixSegments { authority, .. } => authority.as_deref(),
        }
    }

    /// The rewritten path (query string kept). `matched` is the alternative that matched:
    /// after a prefix match the prefix is replaced, after an exact or regex match the whole
    /// path; a rule without a uri condition matched the prefix `/` (so `/v2` rewrites `/a` to
    /// `/v2a`, as in Istio).
    pub fn path(&self, path_and_query: &str, matched: Option<&RequestMatch>) -> String {
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path_and_query, None),
        };
        let new_path = match self {
            Self::Uri { uri: None, .. } => path.to_owned(),
            Self::Uri { uri: Some(uri), .. } => {
                match matched.and_then(|m| m.uri.as_ref()) {
                    Some(StringMatcher::Prefix(p) | StringMatcher::PathPrefix(p)) => {
                        // `ignoreUriCase` may have matched a prefix of another case.
                        format!("{uri}{}", path.get(p.len()..).unwrap_or(""))
                    }
                    Some(StringMatcher::Exact(_) | StringMatcher::Regex(_)) => uri.clone(),
                    None => format!("{uri}{}", path.get(1..).unwrap_or("")),
                }
            }
            Self::Regex {
                pattern,
                substitution,
                ..
            } => pattern
                .replace_all(path, substitution.as_str())
                .into_owned(),
            Self::FullPath { path, .. } => path.clone(),
            Self::PrefixSegments {
                prefix,
                replacement,
                ..
            } => replace_prefix_segments(path, prefix, replacement),
        };
        match query {
            Some(q) => format!("{new_path}?{q}"),
            None => new_path,
        }
    }
}

/// `path` with its leading `prefix` (whole segments, as a Gateway API `PathPrefix` matched it)
/// replaced by `replacement`, keeping one `/` between them and the request's trailing slash
/// (the table in the Gateway API's `HTTPPathModifier` docs): `/foo/bar` → `/xyz/bar` for
/// `/xyz` or `/xyz/`, `/bar` for `/`; `/foo/` → `/xyz/`; `/foo` → `/xyz`.
pub fn replace_prefix_segments(path: &str, prefix: &str, replacement: &str) -> String {
    let prefix = prefix.trim_end_matches('/');
    let rest = path.get(prefix.len()..).unwrap_or("");
    if rest.is_empty() {
        return if replacement.is_empty() {
            "/".into()
        } else {
            replacement.to_owned()
        };
    }
    format!("{}{rest}", replacement.trim_end_matches('/'))
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedirectPort {
    Fixed(u16),
    FromRequest,
    ProtocolDefault,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirect {
    pub uri: Option<String>,
    /// Gateway API `ReplacePrefixMatch`: (the matched prefix, its replacement).
    pub replace_prefix: Option<(String, String)>,
    pub authority: Option<String>,
    pub port: Option<RedirectPort>,
    pub scheme: Option<String>,
    pub status: StatusCode,
}

impl Redirect {
    /// The `Location` for a request (`port`: the port the client addressed). The query string
    /// is kept unless the new uri has its own; a default port for the scheme is left out.
    pub fn location(
        &self,
        scheme: &str,
        authority: &str,
        path_and_query: &str,
        port: u16,
    ) -> String {
        let scheme = self.scheme.as_deref().unwrap_or(scheme);
        let authority = self.authority.as_deref().unwrap_or(authority);
        let (host, authority_port) = split_authority(authority);
        let port = match &self.port {
            Some(RedirectPort::Fixed(p)) => Some(*p),
            Some(RedirectPort::FromRequest) => Some(port),
            Some(RedirectPort::ProtocolDefault) => None,
            None => authority_port,
        };
        let default_port = match scheme {
            "https" => Some(443),
            "http" => Some(80),
            _ => None,
        };
        let host_port = match port.filter(|p| Some(*p) != default_port) {
            Some(p) => format!("{host}:{p}"),
            None => host.to_owned(),
        };
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path_and_query, None),
        };
        let replaced;
        let uri = match &self.replace_prefix {
            Some((prefix, with)) => {
                replaced = Some(replace_prefix_segments(path, prefix, with));
                &replaced
            }
            None => &self.uri,
        };
        let path = match (uri, query) {
            (Some(uri), _) if uri.contains('?') => uri.clone(),
            (Some(uri), Some(q)) => format!("{uri}?{q}"),
            (Some(uri), None) => uri.clone(),
            (None, Some(q)) => format!("{path}?{q}"),
            (None, None) => path.to_owned(),
        };
        format!("{scheme}://{host_port}{path}")
    }
}

/// `host[:port]` (IPv6 in brackets) into the host and the port, if any.
fn split_authority(authority: &str) -> (&str, Option<u16>) {
    if let Some(rest) = authority.strip_prefix('[')
        && let Some((_, after)) = rest.split_once(']')
    {
        let host_len = authority.len() - after.len();
        return (
            &authority[..host_len],
            after.strip_prefix(':').and_then(|p| p.parse().ok()),
        );
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => match p.parse() {
            Ok(port) => (h, Some(port)),
            Err(_) => (authority, None),
        },
        _ => (authority, None),
    }
}

/// When a failed attempt is tried again (Envoy's `retry_on` conditions).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetryOn {
    /// Any 5xx, connect failures and resets (`5xx`).
    pub server_error: bool,
    /// 502, 503, 504 (`gateway-error`).
    pub gateway_error: bool,
    pub reset: bool,
    pub connect_failure: bool,
    /// 409 (`retriable-4xx`).
    pub retriable_4xx: bool,
    pub refused_stream: bool,
    /// gRPC status names (`cancelled`, `deadline-exceeded`, `internal`, `resource-exhausted`,
    /// `unavailable`) seen in the response's `grpc-status`.
    pub grpc: Vec<u32>,
    /// `retriable-status-codes` and bare status codes in `retryOn`.
    pub statuses: Vec<u16>,
}

/// How one upstream attempt ended, as the retry policy sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// Response headers arrived (`grpc_status` from a trailers-only gRPC answer).
    Response {
        status: u16,
        grpc_status: Option<u32>,
    },
    ConnectFailure,
    /// The upstream closed or reset without answering.
    Reset,
    /// HTTP/2 REFUSED_STREAM: the upstream did not start on the request.
    RefusedStream,
    /// `perTryTimeout` passed without response headers.
    PerTryTimeout,
}

impl RetryOn {
    /// Whether an attempt that ended this way is tried again (Envoy's rules: `5xx` and
    /// `gateway-error` include no answer at all and per-try timeouts; `reset` includes connect
    /// failures).
    pub fn retries(&self, outcome: AttemptOutcome) -> bool {
        let no_answer = self.server_error || self.gateway_error;
        match outcome {
            AttemptOutcome::Response {
                status,
                grpc_status,
            } => {
                (self.server_error && (500..=599).contains(&status))
                    || (self.gateway_error && matches!(status, 502..=504))
                    || (self.retriable_4xx && status == 409)
                    || self.statuses.contains(&status)
                    || grpc_status.is_some_and(|g| self.grpc.contains(&g))
            }
            AttemptOutcome::ConnectFailure => no_answer || self.reset || self.connect_failure,
            AttemptOutcome::Reset => no_answer || self.reset,
            AttemptOutcome::RefusedStream => no_answer || self.reset || self.refused_stream,
            AttemptOutcome::PerTryTimeout => no_answer || self.reset,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first try (0: none).
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub on: RetryOn,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Fault {
    pub delay: Option<(Duration, f64)>,
    pub abort: Option<(Abort, f64)>,
}

impl Fault {
    /// Draws this request's faults: each applies with its own percentage.
    pub fn sample(&self, rng: &mut fastrand::Rng) -> (Option<Duration>, Option<&Abort>) {
        let hit = |percent: f64, rng: &mut fastrand::Rng| rng.f64() * 100.0 < percent;
        let delay = self
            .delay
            .as_ref()
            .and_then(|(d, p)| hit(*p, rng).then_some(*d));
        let abort = self
            .abort
            .as_ref()
            .and_then(|(a, p)| hit(*p, rng).then_some(a));
        (delay, abort)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Abort {
    Http(StatusCode),
    /// A gRPC status code (the response is a trailers-only 200 with `grpc-status`).
    Grpc(u32),
}

#[derive(Clone, Debug)]
pub struct Mirror {
    pub target: Target,
    /// 0–100.
    pub percent: f64,
}

impl Mirror {
    /// Whether this request is copied to the mirror.
    pub fn sample(&self, rng: &mut fastrand::Rng) -> bool {
        rng.f64() * 100.0 < self.percent
    }
}

#[derive(Clone, Debug)]
pub struct Cors {
    pub allow_origins: Vec<StringMatcher>,
    pub allow_methods: Vec<String>,
    pub allow_headers: Vec<String>,
    pub expose_headers: Vec<String>,
    pub max_age: Option<Duration>,
    pub allow_credentials: bool,
    /// `unmatchedPreflights: IGNORE`: a preflight from an origin not allowed gets no CORS
    /// answer (and is not forwarded); `FORWARD` (default) passes it to the upstream.
    pub forward_unmatched_preflights: bool,
}

impl Cors {
    /// Whether `origin` is allowed: a matcher matches it, or matches `*` (so `exact: "*"` allows
    /// every origin, as in Envoy).
    pub fn allows_origin(&self, origin: &str) -> bool {
        self.allow_origins
            .iter()
            .any(|m| m.matches(origin) || m.matches("*"))
    }
}

/// One `tcp[]` rule.
#[derive(Clone, Debug)]
pub struct TcpRule {
    pub port: Option<u16>,
    pub destination_subnets: Vec<ipnet::IpNet>,
    pub source_labels: BTreeMap<String, String>,
    pub source_namespace: Option<String>,
    pub route: WeightedDestinations,
}

impl TcpRule {
    /// Every condition holds (an absent one holds): Istio's L4 match.
    pub fn matches(&self, c: &super::matching::ConnectionView<'_>) -> bool {
        self.port.is_none_or(|p| p == c.port)
            && (self.destination_subnets.is_empty()
                || self
                    .destination_subnets
                    .iter()
                    .any(|n| n.contains(&c.destination)))
            && (self.source_labels.is_empty()
                || c.source_labels
                    .is_some_and(|l| self.source_labels.iter().all(|(k, v)| l.has(k, v))))
            && self
                .source_namespace
                .as_deref()
                .is_none_or(|ns| c.source_namespace == Some(ns))
    }
}
