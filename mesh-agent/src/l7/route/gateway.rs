//! Gateway API HTTPRoutes and GRPCRoutes attached to Services (GAMMA) → one [`VirtualService`]
//! per service, as Istio converts them (a GRPCRoute's method match is the path gRPC sends,
//! `/<service>/<method>`): every rule-match becomes its own rule, ordered by the Gateway API's
//! precedence (exact path, longest prefix, method, most headers, most query parameters, then
//! the oldest route, `namespace/name`, rule order) instead of list order.
use std::collections::BTreeMap;

use bytes::Bytes;
use http::{HeaderName, StatusCode};

use super::{
    FieldError,
    compile::{default_retries, qualify},
    duration,
    headers::{header_names, header_pair},
    matching::{RequestMatch, StringMatcher, ValueMatcher},
    model::{
        HeaderEdit, HeaderOps, HostPattern, HttpRule, Mirror, Redirect, RedirectPort, Rewrite,
        RouteTarget, RuleAction, Target, VirtualService, WeightedDestinations,
    },
};
use crate::{
    l7::api::{
        ConfigError, ObjectContext,
        gateway::{self as api, GATEWAY_API_VERSIONS},
    },
    policy::RawObject,
};

/// One match of one rule, with its place in the precedence order.
struct Candidate {
    host: String,
    order: (u8, usize, bool, usize, usize, String, String, usize, usize),
    rule: HttpRule,
}

/// Compiles every HTTPRoute among `objects` into per-service route lists.
pub fn http_routes(objects: &[RawObject]) -> (Vec<VirtualService>, Vec<ConfigError>) {
    let mut errors = Vec::new();
    let mut candidates = Vec::new();
    for obj in objects
        .iter()
        .filter(|o| o.kind == "HTTPRoute" || o.kind == "GRPCRoute")
    {
        match route(obj) {
            Ok(mut c) => candidates.append(&mut c),
            Err(e) => errors.push(e),
        }
    }
    candidates.sort_by(|a, b| a.order.cmp(&b.order));
    let mut by_host: BTreeMap<String, Vec<HttpRule>> = BTreeMap::new();
    for c in candidates {
        by_host.entry(c.host).or_default().push(c.rule);
    }
    let services = by_host
        .into_iter()
        .map(|(host, http)| VirtualService {
            key: format!("httproute:{host}"),
            created: None,
            hosts: vec![HostPattern::Exact(host)],
            http,
            tcp: Vec::new(),
        })
        .collect();
    (services, errors)
}

fn route(obj: &RawObject) -> Result<Vec<Candidate>, ConfigError> {
    let ctx = ObjectContext { obj };
    ctx.check_version(&GATEWAY_API_VERSIONS)?;
    let spec: api::HttpRouteSpec = if obj.kind == "GRPCRoute" {
        grpc_as_http(ctx.spec()?).map_err(|(f, m)| ctx.err(format!("spec{f}"), m))?
    } else {
        ctx.spec()?
    };
    let ns = obj.metadata.namespace.as_str();
    let mut parents = Vec::new();
    for (i, p) in spec.parent_refs.iter().enumerate() {
        let group = p.group.as_deref().unwrap_or("gateway.networking.k8s.io");
        let kind = p.kind.as_deref().unwrap_or("Gateway");
        match (group, kind) {
            ("" | "core", "Service") => {
                let port = p
                    .port
                    .map(|n| u16::try_from(n).ok().filter(|n| *n != 0))
                    .map(|n| {
                        n.ok_or_else(|| ctx.err(format!("spec.parentRefs[{i}].port"), "not a port"))
                    })
                    .transpose()?;
                parents.push((qualify(&p.name, p.namespace.as_deref().unwrap_or(ns)), port));
            }
            ("gateway.networking.k8s.io", "Gateway") => {
                // A Gateway's own routes: an ingress's are not the mesh's, and a waypoint
                // rewrites the ones attached to it into its Services before compiling
                // (`waypoint::attach`).
            }
            _ => {
                return Err(ctx.err(
                    format!("spec.parentRefs[{i}]"),
                    format!("{group}/{kind}: a parent is a Service or a Gateway"),
                ));
            }
        }
    }
    if spec.parent_refs.is_empty() {
        return Err(ctx.err(
            "spec.parentRefs",
            "a parent (Service or waypoint Gateway) is required",
        ));
    }
    let created = obj.metadata.creation_timestamp.clone().unwrap_or_default();
    let key = format!("{ns}/{}", obj.metadata.name);
    let mut out = Vec::new();
    for (ri, r) in spec.rules.iter().enumerate() {
        let here = format!("spec.rules[{ri}]");
        let compiled = rule(r, ns).map_err(|(f, m)| ctx.err(format!("{here}{f}"), m))?;
        let matches = if r.matches.is_empty() {
            vec![api::HttpRouteMatch::default()]
        } else {
            r.matches.clone()
        };
        for (mi, m) in matches.iter().enumerate() {
            let (request_match, rank, len) =
                route_match(m).map_err(|(f, e)| ctx.err(format!("{here}.matches[{mi}]{f}"), e))?;
            for (host, port) in &parents {
                let mut rm = request_match.clone();
                rm.port = *port;
                let mut rule = compiled.clone();
                rule.name = r.name.clone().unwrap_or_else(|| format!("{key}#{ri}"));
                rule.rewrite = rule.rewrite.map(|rw| for_match(rw, &rm));
                if let RuleAction::Redirect(red) = &mut rule.action
                    && let Some((prefix, _)) = &mut red.replace_prefix
                {
                    *prefix = matched_prefix(&rm);
                }
                rule.matches = vec![rm];
                out.push(Candidate {
                    host: host.clone(),
                    order: (
                        rank,
                        usize::MAX - len,
                        m.method.is_none(),
                        usize::MAX - m.headers.len(),
                        usize::MAX - m.query_params.len(),
                        created.clone(),
                        key.clone(),
                        ri,
                        mi,
                    ),
                    rule,
                });
            }
        }
    }
    Ok(out)
}

/// A GRPCRoute as the HTTPRoute it means: method matches become path matches, and only the
/// filters GRPCRoute has are accepted.
fn grpc_as_http(spec: api::GrpcRouteSpec) -> Result<api::HttpRouteSpec, FieldError> {
    let mut rules = Vec::with_capacity(spec.rules.len());
    for (ri, r) in spec.rules.into_iter().enumerate() {
        let here = format!(".rules[{ri}]");
        for (fi, f) in r.filters.iter().enumerate() {
            if !matches!(
                f.kind.as_str(),
                "RequestHeaderModifier" | "ResponseHeaderModifier" | "RequestMirror"
            ) {
                return Err((
                    format!("{here}.filters[{fi}].type"),
                    format!(
                        "{:?}: a GRPCRoute has RequestHeaderModifier, ResponseHeaderModifier and RequestMirror",
                        f.kind
                    ),
                ));
            }
        }
        let matches = r
            .matches
            .iter()
            .enumerate()
            .map(|(mi, m)| grpc_match(m).map_err(|(f, e)| (format!("{here}.matches[{mi}]{f}"), e)))
            .collect::<Result<Vec<_>, _>>()?;
        rules.push(api::HttpRouteRule {
            name: r.name,
            matches,
            filters: r.filters,
            backend_refs: r.backend_refs,
            timeouts: None,
            retry: None,
            session_persistence: r.session_persistence,
        });
    }
    Ok(api::HttpRouteSpec {
        parent_refs: spec.parent_refs,
        hostnames: spec.hostnames,
        rules,
    })
}

/// One GRPCRoute match as an HTTPRoute match on the path `/<service>/<method>`.
fn grpc_match(m: &api::GrpcRouteMatch) -> Result<api::HttpRouteMatch, FieldError> {
    let path = match &m.method {
        None => None,
        Some(method) => {
            let service = method.service.as_deref().filter(|s| !s.is_empty());
            let name = method.method.as_deref().filter(|s| !s.is_empty());
            if service.is_none() && name.is_none() {
                return Err((".method".into(), "service or method is required".into()));
            }
            let (kind, value) = match method.kind.as_deref().unwrap_or("Exact") {
                "Exact" => {
                    for (field, v) in [("service", service), ("method", name)] {
                        if let Some(v) = v
                            && (v.contains('/') || v.contains(char::is_whitespace))
                        {
                            return Err((
                                format!(".method.{field}"),
                                format!("{v:?} is not a gRPC {field} name"),
                            ));
                        }
                    }
                    match (service, name) {
                        (Some(s), Some(n)) => ("Exact", format!("/{s}/{n}")),
                        (Some(s), None) => ("PathPrefix", format!("/{s}/")),
                        (None, Some(n)) => {
                            ("RegularExpression", format!("/[^/]+/{}", regex::escape(n)))
                        }
                        (None, None) => unreachable!("checked above"),
                    }
                }
                "RegularExpression" => {
                    for (field, v) in [("service", service), ("method", name)] {
                        if let Some(v) = v {
                            regex::Regex::new(v)
                                .map_err(|e| (format!(".method.{field}"), e.to_string()))?;
                        }
                    }
                    (
                        "RegularExpression",
                        format!(
                            "/{}/{}",
                            service.unwrap_or("[^/]+"),
                            name.unwrap_or("[^/]+")
                        ),
                    )
                }
                other => {
                    return Err((
                        ".method.type".into(),
                        format!("{other:?}: Exact or RegularExpression"),
                    ));
                }
            };
            Some(api::HttpPathMatch {
                kind: Some(kind.into()),
                value: Some(value),
            })
        }
    };
    Ok(api::HttpRouteMatch {
        path,
        headers: m.headers.clone(),
        query_params: Vec::new(),
        method: None,
    })
}

/// The prefix a `PathPrefix` match matched (empty for any other match).
fn matched_prefix(m: &RequestMatch) -> String {
    match &m.uri {
        Some(StringMatcher::PathPrefix(p)) => p.clone(),
        _ => String::new(),
    }
}

/// A `ReplacePrefixMatch` rewrite learns the prefix of the match it serves.
fn for_match(rw: Rewrite, m: &RequestMatch) -> Rewrite {
    match rw {
        Rewrite::PrefixSegments {
            replacement,
            authority,
            ..
        } => Rewrite::PrefixSegments {
            prefix: matched_prefix(m),
            replacement,
            authority,
        },
        other => other,
    }
}

/// The compiled match, its precedence rank (0 exact, 1 regex, 2 prefix) and path length.
fn route_match(m: &api::HttpRouteMatch) -> Result<(RequestMatch, u8, usize), FieldError> {
    let path = m.path.clone().unwrap_or_default();
    let value = path.value.clone().unwrap_or_else(|| "/".into());
    if !value.starts_with('/') && path.kind.as_deref() != Some("RegularExpression") {
        return Err((".path.value".into(), format!("{value:?} must start with /")));
    }
    let (uri, rank) = match path.kind.as_deref().unwrap_or("PathPrefix") {
        "Exact" => (StringMatcher::Exact(value.clone()), 0),
        "PathPrefix" => (
            StringMatcher::PathPrefix(value.trim_end_matches('/').to_owned()),
            2,
        ),
        "RegularExpression" => (
            StringMatcher::regex(&value).map_err(|e| (".path.value".to_owned(), e.to_string()))?,
            1,
        ),
        other => {
            return Err((
                ".path.type".into(),
                format!("{other:?}: Exact, PathPrefix or RegularExpression"),
            ));
        }
    };
    let pairs = |list: &[api::NameValueMatch], field: &str, header: bool| {
        list.iter()
            .enumerate()
            .map(|(i, nv)| {
                let here = format!("{field}[{i}]");
                let name = if header {
                    HeaderName::from_bytes(nv.name.as_bytes())
                        .map_err(|_| {
                            (
                                format!("{here}.name"),
                                format!("{:?} is not a header name", nv.name),
                            )
                        })?
                        .as_str()
                        .to_owned()
                } else {
                    nv.name.clone()
                };
                let matcher = match nv.kind.as_deref().unwrap_or("Exact") {
                    "Exact" => StringMatcher::Exact(nv.value.clone()),
                    "RegularExpression" => StringMatcher::regex(&nv.value)
                        .map_err(|e| (format!("{here}.value"), e.to_string()))?,
                    other => {
                        return Err((
                            format!("{here}.type"),
                            format!("{other:?}: Exact or RegularExpression"),
                        ));
                    }
                };
                Ok((name, ValueMatcher::Value(matcher)))
            })
            .collect::<Result<Vec<_>, FieldError>>()
    };
    let method = m
        .method
        .as_ref()
        .map(|name| match name.as_str() {
            "GET" | "HEAD" | "POST" | "PUT" | "DELETE" | "CONNECT" | "OPTIONS" | "TRACE"
            | "PATCH" => Ok(StringMatcher::Exact(name.clone())),
            other => Err((
                ".method".to_owned(),
                format!("{other:?} is not an HTTP method"),
            )),
        })
        .transpose()?;
    let len = value.len();
    Ok((
        RequestMatch {
            uri: Some(uri),
            ignore_uri_case: false,
            scheme: None,
            method,
            authority: None,
            headers: pairs(&m.headers, ".headers", true)?,
            without_headers: Vec::new(),
            query_params: pairs(&m.query_params, ".queryParams", false)?,
            port: None,
            source_labels: BTreeMap::new(),
            source_namespace: None,
            for_mesh: true,
        },
        rank,
        len,
    ))
}

fn header_modifier(m: &api::HeaderModifier, field: &str) -> Result<HeaderEdit, FieldError> {
    let pairs = |list: &[api::HeaderValuePair], kind: &str| {
        list.iter()
            .enumerate()
            .map(|(i, p)| header_pair(&p.name, &p.value, &format!("{field}.{kind}[{i}]")))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(HeaderEdit {
        set: pairs(&m.set, "set")?,
        add: pairs(&m.add, "add")?,
        remove: header_names(&m.remove, &format!("{field}.remove"))?,
    })
}

/// A Service backend (the only kind served): host and the required port.
fn backend_target(
    group: Option<&str>,
    kind: Option<&str>,
    name: &str,
    namespace: Option<&str>,
    port: Option<u32>,
    ns: &str,
) -> Result<Target, FieldError> {
    if !matches!(group.unwrap_or(""), "" | "core") || kind.unwrap_or("Service") != "Service" {
        return Err((String::new(), "only Service backends are served".into()));
    }
    let port = port
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
        .ok_or_else(|| {
            (
                ".port".to_owned(),
                "a Service backend needs a port".to_owned(),
            )
        })?;
    Ok(Target {
        host: qualify(name, namespace.unwrap_or(ns)),
        subset: None,
        port: Some(port),
    })
}

fn rule(r: &api::HttpRouteRule, ns: &str) -> Result<HttpRule, FieldError> {
    if r.retry.is_some() {
        return Err((
            ".retry".into(),
            "not supported yet (a VirtualService's retries are)".into(),
        ));
    }
    if r.session_persistence.is_some() {
        return Err((".sessionPersistence".into(), "not supported yet".into()));
    }
    let mut headers = HeaderOps::default();
    let mut redirect = None;
    let mut rewrite = None;
    let mut mirrors = Vec::new();
    for (i, f) in r.filters.iter().enumerate() {
        let here = format!(".filters[{i}]");
        let missing = || (here.clone(), format!("type {} needs its field", f.kind));
        match f.kind.as_str() {
            "RequestHeaderModifier" => {
                headers.request = header_modifier(
                    f.request_header_modifier.as_ref().ok_or_else(missing)?,
                    &format!("{here}.requestHeaderModifier"),
                )?;
            }
            "ResponseHeaderModifier" => {
                headers.response = header_modifier(
                    f.response_header_modifier.as_ref().ok_or_else(missing)?,
                    &format!("{here}.responseHeaderModifier"),
                )?;
            }
            "RequestRedirect" => {
                let rr = f.request_redirect.as_ref().ok_or_else(missing)?;
                redirect = Some(
                    request_redirect(rr)
                        .map_err(|(f, e)| (format!("{here}.requestRedirect{f}"), e))?,
                );
            }
            "URLRewrite" => {
                let u = f.url_rewrite.as_ref().ok_or_else(missing)?;
                rewrite =
                    Some(url_rewrite(u).map_err(|(f, e)| (format!("{here}.urlRewrite{f}"), e))?);
            }
            "RequestMirror" => {
                let m = f.request_mirror.as_ref().ok_or_else(missing)?;
                let b = &m.backend_ref;
                let target = backend_target(
                    b.group.as_deref(),
                    b.kind.as_deref(),
                    &b.name,
                    b.namespace.as_deref(),
                    b.port,
                    ns,
                )
                .map_err(|(f, e)| (format!("{here}.requestMirror.backendRef{f}"), e))?;
                let percent = match (m.percent, m.fraction) {
                    (Some(_), Some(_)) => {
                        return Err((
                            format!("{here}.requestMirror"),
                            "percent and fraction exclude each other".into(),
                        ));
                    }
                    (Some(p), None) if p <= 100 => f64::from(p),
                    (None, Some(fr)) => {
                        let d = fr.denominator.unwrap_or(100);
                        if d == 0 || fr.numerator > d {
                            return Err((
                                format!("{here}.requestMirror.fraction"),
                                "numerator must be within 0 and the denominator (> 0)".into(),
                            ));
                        }
                        f64::from(fr.numerator) * 100.0 / f64::from(d)
                    }
                    (None, None) => 100.0,
                    (Some(p), None) => {
                        return Err((
                            format!("{here}.requestMirror.percent"),
                            format!("{p} is above 100"),
                        ));
                    }
                };
                mirrors.push(Mirror { target, percent });
            }
            other => {
                return Err((format!("{here}.type"), format!("{other}: not supported")));
            }
        }
    }
    if redirect.is_some() && rewrite.is_some() {
        return Err((
            ".filters".into(),
            "RequestRedirect and URLRewrite exclude each other".into(),
        ));
    }
    let action = if let Some(red) = redirect {
        if !r.backend_refs.is_empty() {
            return Err((
                ".backendRefs".into(),
                "a rule with RequestRedirect cannot have backendRefs".into(),
            ));
        }
        RuleAction::Redirect(red)
    } else {
        let mut destinations = Vec::new();
        let mut total = 0u64;
        for (i, b) in r.backend_refs.iter().enumerate() {
            let here = format!(".backendRefs[{i}]");
            let target = backend_target(
                b.group.as_deref(),
                b.kind.as_deref(),
                &b.name,
                b.namespace.as_deref(),
                b.port,
                ns,
            )
            .map_err(|(f, e)| (format!("{here}{f}"), e))?;
            let weight = match b.weight.unwrap_or(1) {
                w if !(0..=1_000_000).contains(&w) => {
                    return Err((
                        format!("{here}.weight"),
                        format!("{w} is not within 0 and 1000000"),
                    ));
                }
                w => w as u32,
            };
            let mut dest_headers = HeaderOps::default();
            for (j, f) in b.filters.iter().enumerate() {
                let fh = format!("{here}.filters[{j}]");
                match (
                    f.kind.as_str(),
                    &f.request_header_modifier,
                    &f.response_header_modifier,
                ) {
                    ("RequestHeaderModifier", Some(m), _) => {
                        dest_headers.request =
                            header_modifier(m, &format!("{fh}.requestHeaderModifier"))?;
                    }
                    ("ResponseHeaderModifier", _, Some(m)) => {
                        dest_headers.response =
                            header_modifier(m, &format!("{fh}.responseHeaderModifier"))?;
                    }
                    (other, _, _) => {
                        return Err((
                            format!("{fh}.type"),
                            format!("{other}: not supported on a backend"),
                        ));
                    }
                }
            }
            total += u64::from(weight);
            destinations.push(RouteTarget {
                target,
                weight,
                headers: dest_headers,
            });
        }
        if total == 0 {
            // No backend to send to (none listed, or every weight 0): the spec's 500.
            RuleAction::Direct {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                body: Bytes::new(),
            }
        } else {
            RuleAction::Route(WeightedDestinations {
                destinations,
                total_weight: total,
            })
        }
    };
    let parse = |v: &Option<String>, field: &str| {
        v.as_deref()
            .map(duration::parse)
            .transpose()
            .map_err(|m| (format!(".timeouts.{field}"), m))
    };
    let timeouts = r.timeouts.clone().unwrap_or_default();
    let timeout = parse(&timeouts.request, "request")?.filter(|t| !t.is_zero());
    let backend = parse(&timeouts.backend_request, "backendRequest")?.filter(|t| !t.is_zero());
    if let (Some(total), Some(each)) = (timeout, backend)
        && each > total
    {
        return Err((
            ".timeouts.backendRequest".into(),
            "must not exceed timeouts.request".into(),
        ));
    }
    let mut retries = default_retries();
    retries.per_try_timeout = backend;
    Ok(HttpRule {
        name: String::new(),
        matches: Vec::new(),
        action,
        rewrite,
        headers,
        timeout,
        retries,
        fault: None,
        mirrors,
        cors: None,
    })
}

fn path_modifier(p: &api::PathModifier) -> Result<PathChange, FieldError> {
    match (
        p.kind.as_str(),
        &p.replace_full_path,
        &p.replace_prefix_match,
    ) {
        ("ReplaceFullPath", Some(full), None) => Ok(PathChange::Full(full.clone())),
        ("ReplacePrefixMatch", None, Some(prefix)) => Ok(PathChange::Prefix(prefix.clone())),
        (kind, _, _) => Err((
            ".path".into(),
            format!(
                "type {kind:?} needs exactly its own field (replaceFullPath or replacePrefixMatch)"
            ),
        )),
    }
}

enum PathChange {
    Full(String),
    Prefix(String),
}

fn request_redirect(r: &api::RequestRedirect) -> Result<Redirect, FieldError> {
    let code = r.status_code.unwrap_or(302);
    let status = match code {
        301 | 302 | 303 | 307 | 308 => StatusCode::from_u16(code as u16).expect("a 3xx code"),
        _ => {
            return Err((
                ".statusCode".into(),
                format!("{code}: 301, 302, 303, 307 or 308"),
            ));
        }
    };
    if let Some(s) = &r.scheme
        && s != "http"
        && s != "https"
    {
        return Err((".scheme".into(), format!("{s:?}: http or https")));
    }
    // No port: the scheme's well-known port when the scheme changes, else the request's.
    let port = match r.port {
        Some(p) => Some(RedirectPort::Fixed(
            u16::try_from(p)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| (".port".to_owned(), format!("{p} is not a port")))?,
        )),
        None if r.scheme.is_some() => Some(RedirectPort::ProtocolDefault),
        None => Some(RedirectPort::FromRequest),
    };
    let (uri, replace_prefix) = match r.path.as_ref().map(path_modifier).transpose()? {
        None => (None, None),
        Some(PathChange::Full(p)) => (Some(p), None),
        // The matched prefix is filled in per match.
        Some(PathChange::Prefix(p)) => (None, Some((String::new(), p))),
    };
    Ok(Redirect {
        uri,
        replace_prefix,
        authority: r.hostname.clone(),
        port,
        scheme: r.scheme.clone(),
        status,
    })
}

fn url_rewrite(u: &api::UrlRewrite) -> Result<Rewrite, FieldError> {
    let authority = u.hostname.clone();
    Ok(match u.path.as_ref().map(path_modifier).transpose()? {
        Some(PathChange::Full(path)) => Rewrite::FullPath { path, authority },
        Some(PathChange::Prefix(replacement)) => Rewrite::PrefixSegments {
            prefix: String::new(),
            replacement,
            authority,
        },
        None if authority.is_some() => Rewrite::Uri {
            uri: None,
            authority,
        },
        None => return Err((String::new(), "hostname or path is required".into())),
    })
}
