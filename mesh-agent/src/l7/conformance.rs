//! Runs the routing conformance table (`conformance.yaml`): each case compiles its objects,
//! routes one request and checks what Istio (its Envoy config) would do with it.
use std::collections::BTreeMap;

use http::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;

use super::route::{
    ConnectionView, Decision, RequestView, RouteTable,
    destination::{DestinationRules, ResolvedPolicy},
    model::{Abort, AttemptOutcome, RuleAction},
};
use crate::policy::RawObject;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Table {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    istio: String,
    objects: Vec<RawObject>,
    #[serde(default)]
    request: Request,
    expect: Expect,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Request {
    host: String,
    method: String,
    scheme: String,
    path: String,
    authority: String,
    port: u16,
    /// A list value: the header repeated.
    headers: BTreeMap<String, serde_yaml::Value>,
    source_labels: Option<BTreeMap<String, String>>,
    source_namespace: Option<String>,
    /// The address the client addressed (`tcp` cases; default the VIP 10.96.0.10).
    destination: Option<std::net::IpAddr>,
}

impl Default for Request {
    fn default() -> Self {
        Self {
            host: "reviews.default.svc.cluster.local".into(),
            method: "GET".into(),
            scheme: "http".into(),
            path: "/".into(),
            authority: "reviews:9080".into(),
            port: 9080,
            headers: BTreeMap::new(),
            source_labels: None,
            source_namespace: None,
            destination: None,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Expect {
    /// A rule's name (`#<index>` when unnamed), `default`, `noRoute` or `rejected`; `tcp`: the
    /// request is a TCP connection (`tcp[]` routes; `target`/`shares` name the destination,
    /// `service` when no rule takes it).
    rule: String,
    /// With `rejected`: text the error must contain (the field, the reason).
    error: Option<String>,
    /// Objects rejected while the others route (default 0).
    #[serde(default)]
    rejections: usize,
    /// `host[/subset][:port]` picked with `roll`.
    target: Option<String>,
    #[serde(default)]
    roll: u64,
    /// Percent of requests per target over 20,000 seeded rolls (±1.5 points).
    shares: Option<BTreeMap<String, f64>>,
    path: Option<String>,
    authority: Option<String>,
    redirect: Option<Redirect>,
    direct: Option<Direct>,
    /// Milliseconds; `0`: no timeout.
    timeout_ms: Option<u64>,
    attempts: Option<u32>,
    per_try_timeout_ms: Option<u64>,
    /// Attempt outcome (`503`, `grpc:14`, `connect-failure`, `reset`, `refused-stream`,
    /// `per-try-timeout`) → retried or not.
    retried: Option<BTreeMap<String, bool>>,
    /// Percent of requests delayed / aborted over 20,000 seeded draws (±1.5 points).
    fault_shares: Option<FaultShares>,
    delay_ms: Option<u64>,
    abort: Option<String>,
    /// `target percent` per mirror.
    mirrors: Option<Vec<String>>,
    /// The request's headers after the rule's and the destination's edits.
    request_headers: Option<BTreeMap<String, String>>,
    /// Response headers (starting from `responseIn`) after the edits.
    response_headers: Option<BTreeMap<String, String>>,
    #[serde(default)]
    response_in: BTreeMap<String, String>,
    /// Whether the CORS policy allows this `origin`.
    cors_allows: Option<BTreeMap<String, bool>>,
    /// With `rule: policy`: the DestinationRule policy for `subset` on the request's port.
    subset: Option<String>,
    /// The resolved policy's fields as text (see `policy_fields`).
    policy: Option<BTreeMap<String, String>>,
    /// The subset's labels; `{}` with `unknownSubset`.
    subset_labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    unknown_subset: bool,
}

/// The resolved policy as the table spells it.
fn policy_fields(p: &ResolvedPolicy) -> BTreeMap<String, String> {
    let pool = &p.connection_pool;
    let mut f: BTreeMap<String, String> = [
        ("lb", format!("{:?}", p.load_balancer())),
        ("maxConnections", pool.max_connections.to_string()),
        (
            "connectTimeoutMs",
            pool.connect_timeout.as_millis().to_string(),
        ),
        ("maxPendingRequests", pool.max_pending_requests.to_string()),
        ("maxRequests", pool.max_requests.to_string()),
        (
            "maxRequestsPerConnection",
            pool.max_requests_per_connection.to_string(),
        ),
        ("maxRetries", pool.max_retries.to_string()),
        ("idleTimeoutS", pool.idle_timeout.as_secs().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let o = p.outlier_detection.as_ref();
    let opt = |v: Option<u32>| v.map_or("off".to_owned(), |n| n.to_string());
    f.insert(
        "outlier".into(),
        if o.is_some() { "on" } else { "off" }.into(),
    );
    if let Some(o) = o {
        f.insert("consecutive5xx".into(), opt(o.consecutive_5xx));
        f.insert(
            "consecutiveGatewayErrors".into(),
            opt(o.consecutive_gateway_errors),
        );
        f.insert("intervalMs".into(), o.interval.as_millis().to_string());
        f.insert(
            "baseEjectionMs".into(),
            o.base_ejection_time.as_millis().to_string(),
        );
        f.insert(
            "maxEjectionPercent".into(),
            o.max_ejection_percent.to_string(),
        );
        f.insert("minHealthPercent".into(), o.min_health_percent.to_string());
    }
    f
}

/// A `rule: policy` case: DestinationRule lookup and merging.
fn run_policy(case: &Case, objects: &[RawObject]) -> Result<(), String> {
    let (rules, errors) = DestinationRules::build(objects);
    let e = &case.expect;
    if errors.len() != e.rejections {
        return Err(format!(
            "{} rejected, want {}: {errors:?}",
            errors.len(),
            e.rejections
        ));
    }
    let rule = rules.for_host(&case.request.host);
    let policy = rule.map_or_else(ResolvedPolicy::default, |r| {
        r.resolve(e.subset.as_deref(), case.request.port)
    });
    if let Some(want) = &e.policy {
        let got = policy_fields(&policy);
        for (k, v) in want {
            if got.get(k) != Some(v) {
                return Err(format!("{k}: want {v}, got {:?}", got.get(k)));
            }
        }
    }
    if let Some(want) = &e.subset_labels {
        let name = e.subset.as_deref().ok_or("subsetLabels needs subset")?;
        let got = rule.and_then(|r| r.subset(name)).map(|s| s.labels.clone());
        if got.as_ref() != Some(want) {
            return Err(format!("subset {name}: want {want:?}, got {got:?}"));
        }
    }
    if e.unknown_subset {
        let name = e.subset.as_deref().ok_or("unknownSubset needs subset")?;
        if rule.and_then(|r| r.subset(name)).is_some() {
            return Err(format!("subset {name} should be unknown (503 NC)"));
        }
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Redirect {
    status: u16,
    location: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Direct {
    status: u16,
    #[serde(default)]
    body: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultShares {
    delay: f64,
    abort: f64,
}

const DRAWS: u32 = 20_000;
const TOLERANCE: f64 = 1.5;

fn headers_of(req: &Request) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in &req.headers {
        let name = HeaderName::from_bytes(k.as_bytes()).unwrap();
        let values: Vec<String> = match v {
            serde_yaml::Value::Sequence(s) => s.iter().map(scalar).collect(),
            other => vec![scalar(other)],
        };
        for v in values {
            h.append(name.clone(), HeaderValue::from_str(&v).unwrap());
        }
    }
    h
}

fn scalar(v: &serde_yaml::Value) -> String {
    match v {
        serde_yaml::Value::String(s) => s.clone(),
        other => serde_yaml::to_string(other).unwrap().trim().to_owned(),
    }
}

fn target_text(t: &super::route::model::Target) -> String {
    let mut s = t.host.clone();
    if let Some(sub) = &t.subset {
        s += &format!("/{sub}");
    }
    if let Some(p) = t.port {
        s += &format!(":{p}");
    }
    s
}

fn outcome(text: &str) -> AttemptOutcome {
    match text {
        "connect-failure" => AttemptOutcome::ConnectFailure,
        "reset" => AttemptOutcome::Reset,
        "refused-stream" => AttemptOutcome::RefusedStream,
        "per-try-timeout" => AttemptOutcome::PerTryTimeout,
        g if g.starts_with("grpc:") => AttemptOutcome::Response {
            status: 200,
            grpc_status: Some(g[5..].parse().unwrap()),
        },
        s => AttemptOutcome::Response {
            status: s.parse().unwrap(),
            grpc_status: None,
        },
    }
}

fn header_text(h: &HeaderMap) -> BTreeMap<String, String> {
    h.keys()
        .map(|k| {
            let joined: Vec<&str> = h.get_all(k).iter().map(|v| v.to_str().unwrap()).collect();
            (k.as_str().to_owned(), joined.join(","))
        })
        .collect()
}

/// A `tcp` case: where `tcp_route` sends the connection.
fn run_tcp(req: &Request, e: &Expect, table: &RouteTable) -> Result<(), String> {
    let source_labels = req.source_labels.as_ref().map(crate::names::Labels::from);
    let view = ConnectionView {
        port: req.port,
        destination: req
            .destination
            .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 96, 0, 10))),
        source_labels: source_labels.as_ref(),
        source_namespace: req.source_namespace.as_deref(),
    };
    let pick = |roll: u64| {
        table
            .tcp_route(&req.host, &view, roll)
            .map_or_else(|| "service".to_owned(), |t| target_text(&t.target))
    };
    if let Some(want) = &e.target {
        let got = pick(e.roll);
        if got != *want {
            return Err(format!("tcp target: want {want}, got {got}"));
        }
    }
    if let Some(shares) = &e.shares {
        check_shares(shares, |roll| Some(pick(roll)))?;
    }
    Ok(())
}

/// `pick` over [`DRAWS`] seeded rolls gives each target its share (± [`TOLERANCE`] points)
/// and nothing else.
fn check_shares(
    shares: &BTreeMap<String, f64>,
    mut pick: impl FnMut(u64) -> Option<String>,
) -> Result<(), String> {
    let mut rng = fastrand::Rng::with_seed(7);
    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..DRAWS {
        if let Some(t) = pick(rng.u64(..)) {
            *counts.entry(t).or_default() += 1;
        }
    }
    for (t, want) in shares {
        let got = f64::from(counts.remove(t).unwrap_or(0)) * 100.0 / f64::from(DRAWS);
        if (got - want).abs() > TOLERANCE {
            return Err(format!("share of {t}: want {want}%, got {got:.2}%"));
        }
    }
    if counts.is_empty() {
        Ok(())
    } else {
        Err(format!("unexpected targets: {counts:?}"))
    }
}

/// Checks one case; `Err` says what differs.
fn run(case: &Case) -> Result<(), String> {
    let objects: Vec<RawObject> = case
        .objects
        .iter()
        .cloned()
        .map(|mut o| {
            if o.metadata.namespace.is_empty() {
                o.metadata.namespace = "default".into();
            }
            o
        })
        .collect();
    let e = &case.expect;
    if e.rule == "policy" {
        return run_policy(case, &objects);
    }
    let (table, errors) = RouteTable::build(&objects);
    if e.rule == "rejected" {
        let (_, dr_errors) = DestinationRules::build(&objects);
        let Some(err) = errors.first().or(dr_errors.first()) else {
            return Err("accepted, Istio rejects it".into());
        };
        let text = err.to_string();
        if let Some(want) = &e.error
            && !text.contains(want.as_str())
        {
            return Err(format!("error {text:?} lacks {want:?}"));
        }
        return Ok(());
    }
    if errors.len() != e.rejections {
        return Err(format!(
            "{} rejected, want {}: {errors:?}",
            errors.len(),
            e.rejections
        ));
    }
    let req = &case.request;
    if e.rule == "tcp" {
        return run_tcp(req, e, &table);
    }
    let headers = headers_of(req);
    let source_labels = req.source_labels.as_ref().map(crate::names::Labels::from);
    let view = RequestView {
        method: &req.method,
        scheme: &req.scheme,
        path_and_query: &req.path,
        authority: &req.authority,
        headers: &headers,
        port: req.port,
        source_labels: source_labels.as_ref(),
        source_namespace: req.source_namespace.as_deref(),
    };
    let decision = table.route(&req.host, &view, e.roll);
    let (rule, matched, target) = match (&decision, e.rule.as_str()) {
        (Decision::Default, "default") | (Decision::NoRoute { .. }, "noRoute") => return Ok(()),
        (
            Decision::Rule {
                rule,
                matched,
                target,
                ..
            },
            name,
        ) if rule.name == name => (*rule, *matched, *target),
        (d, want) => {
            let got = match d {
                Decision::Default => "default".to_owned(),
                Decision::NoRoute { .. } => "noRoute".to_owned(),
                Decision::Rule { rule, .. } => format!("rule {}", rule.name),
            };
            return Err(format!("want {want}, got {got}"));
        }
    };
    if let Some(want) = &e.target {
        let got = target.map(|t| target_text(&t.target));
        if got.as_deref() != Some(want.as_str()) {
            return Err(format!("target: want {want}, got {got:?}"));
        }
    }
    if let Some(shares) = &e.shares {
        let RuleAction::Route(w) = &rule.action else {
            return Err("shares of a rule that does not route".into());
        };
        check_shares(shares, |roll| w.pick(roll).map(|t| target_text(&t.target)))?;
    }
    if e.path.is_some() || e.authority.is_some() {
        let (path, authority) = match &rule.rewrite {
            Some(r) => (
                r.path(&req.path, matched),
                r.authority().unwrap_or(&req.authority).to_owned(),
            ),
            None => (req.path.clone(), req.authority.clone()),
        };
        if let Some(want) = &e.path
            && &path != want
        {
            return Err(format!("path: want {want}, got {path}"));
        }
        if let Some(want) = &e.authority
            && &authority != want
        {
            return Err(format!("authority: want {want}, got {authority}"));
        }
    }
    if let Some(want) = &e.redirect {
        let RuleAction::Redirect(r) = &rule.action else {
            return Err("not a redirect".into());
        };
        let location = r.location(&req.scheme, &req.authority, &req.path, req.port);
        if r.status.as_u16() != want.status || location != want.location {
            return Err(format!(
                "redirect: want {} {}, got {} {location}",
                want.status,
                want.location,
                r.status.as_u16()
            ));
        }
    }
    if let Some(want) = &e.direct {
        let RuleAction::Direct { status, body } = &rule.action else {
            return Err("not a direct response".into());
        };
        if status.as_u16() != want.status || body.as_ref() != want.body.as_bytes() {
            return Err(format!("direct: got {status} {body:?}"));
        }
    }
    if let Some(ms) = e.timeout_ms {
        let got = rule.timeout.map_or(0, |t| t.as_millis() as u64);
        if got != ms {
            return Err(format!("timeout: want {ms} ms, got {got} ms"));
        }
    }
    if let Some(a) = e.attempts
        && rule.retries.attempts != a
    {
        return Err(format!("attempts: want {a}, got {}", rule.retries.attempts));
    }
    if let Some(ms) = e.per_try_timeout_ms {
        let got = rule
            .retries
            .per_try_timeout
            .map_or(0, |t| t.as_millis() as u64);
        if got != ms {
            return Err(format!("perTryTimeout: want {ms} ms, got {got} ms"));
        }
    }
    for (o, want) in e.retried.iter().flatten() {
        let got = rule.retries.attempts > 0 && rule.retries.on.retries(outcome(o));
        if got != *want {
            return Err(format!("retry after {o}: want {want}, got {got}"));
        }
    }
    if let Some(want) = &e.fault_shares {
        let fault = rule.fault.as_ref().ok_or("no fault")?;
        let mut rng = fastrand::Rng::with_seed(11);
        let (mut delayed, mut aborted) = (0u32, 0u32);
        for _ in 0..DRAWS {
            let (d, a) = fault.sample(&mut rng);
            delayed += u32::from(d.is_some());
            aborted += u32::from(a.is_some());
        }
        let pct = |n: u32| f64::from(n) * 100.0 / f64::from(DRAWS);
        if (pct(delayed) - want.delay).abs() > TOLERANCE
            || (pct(aborted) - want.abort).abs() > TOLERANCE
        {
            return Err(format!(
                "faults: want {}% / {}%, got {:.2}% / {:.2}%",
                want.delay,
                want.abort,
                pct(delayed),
                pct(aborted)
            ));
        }
    }
    if let Some(ms) = e.delay_ms {
        let got = rule
            .fault
            .as_ref()
            .and_then(|f| f.delay.as_ref())
            .map(|(d, _)| d.as_millis() as u64);
        if got != Some(ms) {
            return Err(format!("delay: want {ms} ms, got {got:?}"));
        }
    }
    if let Some(want) = &e.abort {
        let got = match rule.fault.as_ref().and_then(|f| f.abort.as_ref()) {
            Some((Abort::Http(s), _)) => format!("http {}", s.as_u16()),
            Some((Abort::Grpc(g), _)) => format!("grpc {g}"),
            None => "none".into(),
        };
        if &got != want {
            return Err(format!("abort: want {want}, got {got}"));
        }
    }
    if let Some(want) = &e.mirrors {
        let got: Vec<String> = rule
            .mirrors
            .iter()
            .map(|m| format!("{} {}", target_text(&m.target), m.percent))
            .collect();
        if &got != want {
            return Err(format!("mirrors: want {want:?}, got {got:?}"));
        }
    }
    if let Some(want) = &e.request_headers {
        let mut h = headers.clone();
        for edit in rule.header_edits(target, false) {
            edit.apply(&mut h);
        }
        let got = header_text(&h);
        if &got != want {
            return Err(format!("request headers: want {want:?}, got {got:?}"));
        }
    }
    if let Some(want) = &e.response_headers {
        let mut h = HeaderMap::new();
        for (k, v) in &e.response_in {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        for edit in rule.header_edits(target, true) {
            edit.apply(&mut h);
        }
        let got = header_text(&h);
        if &got != want {
            return Err(format!("response headers: want {want:?}, got {got:?}"));
        }
    }
    for (origin, want) in e.cors_allows.iter().flatten() {
        let cors = rule.cors.as_ref().ok_or("no corsPolicy")?;
        let got = cors.allows_origin(origin);
        if got != *want {
            return Err(format!("CORS origin {origin}: want {want}, got {got}"));
        }
    }
    Ok(())
}

#[test]
fn routing_conformance_table() {
    let table: Table = serde_yaml::from_str(include_str!("conformance.yaml")).unwrap();
    let mut failures = Vec::new();
    let mut names = std::collections::BTreeSet::new();
    for case in &table.cases {
        assert!(
            names.insert(case.name.clone()),
            "duplicate case {}",
            case.name
        );
        assert!(
            !case.istio.trim().is_empty(),
            "{}: say what Istio does",
            case.name
        );
        if let Err(why) = run(case) {
            failures.push(format!("{}: {why}\n    Istio: {}", case.name, case.istio));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ from Istio:\n{}",
        failures.len(),
        table.cases.len(),
        failures.join("\n")
    );
}
