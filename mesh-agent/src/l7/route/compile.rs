//! VirtualService → [`model::VirtualService`], validated as Istio's webhook validates it: an
//! object that would not be admitted is rejected whole, with the field named.
use std::collections::BTreeMap;

use bytes::Bytes;
use http::{HeaderName, StatusCode};

pub use super::retries_faults::default_retries;
use super::{
    FieldError, at, duration,
    headers::header_ops,
    matching::{RequestMatch, StringMatcher, ValueMatcher},
    model::{
        Cors, HeaderOps, HostPattern, HttpRule, Mirror, Redirect, RedirectPort, Rewrite,
        RouteTarget, RuleAction, Target, TcpRule, VirtualService, WeightedDestinations,
    },
    retries_faults::{compile_fault, percent, retry_policy},
};
use crate::{
    l7::api::{ConfigError, ISTIO_NETWORKING_VERSIONS, ObjectContext, istio},
    policy::RawObject,
};

/// The cluster's DNS domain: short names are qualified with it.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// Istio's limit on a match regex.
const MAX_REGEX_LEN: usize = 1024;

/// A host as written in `namespace` qualified as Istio does: a name without a dot gets
/// `.<namespace>.svc.cluster.local`; anything with a dot is taken as written.
pub fn qualify(host: &str, namespace: &str) -> String {
    if host == "*" || host.contains('.') {
        host.to_ascii_lowercase()
    } else {
        format!(
            "{}.{namespace}.svc.{CLUSTER_DOMAIN}",
            host.to_ascii_lowercase()
        )
    }
}

/// Compiles one VirtualService.
pub fn virtual_service(obj: &RawObject) -> Result<VirtualService, ConfigError> {
    let ctx = ObjectContext { obj };
    ctx.check_version(&ISTIO_NETWORKING_VERSIONS)?;
    let spec: istio::VirtualServiceSpec = ctx.spec()?;
    let ns = obj.metadata.namespace.as_str();
    if spec.hosts.is_empty() {
        return Err(ctx.err("spec.hosts", "at least one host is required"));
    }
    let hosts = spec
        .hosts
        .iter()
        .enumerate()
        .map(|(i, h)| host_pattern(h, ns).map_err(|m| ctx.err(format!("spec.hosts[{i}]"), m)))
        .collect::<Result<Vec<_>, _>>()?;
    for (i, h) in hosts.iter().enumerate() {
        if hosts[..i].contains(h) {
            return Err(ctx.err(format!("spec.hosts[{i}]"), "a duplicate of an earlier host"));
        }
    }
    if spec.http.is_empty() && spec.tcp.is_empty() && spec.tls.is_empty() {
        return Err(ctx.err("spec", "http, tcp or tls routes are required"));
    }
    let http = spec
        .http
        .iter()
        .enumerate()
        .map(|(i, r)| {
            http_rule(r, i, ns).map_err(|(f, m)| ctx.err(format!("spec.http[{i}]{f}"), m))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let tcp = spec
        .tcp
        .iter()
        .enumerate()
        .map(|(i, r)| tcp_rule(r, ns).map_err(|(f, m)| ctx.err(format!("spec.tcp[{i}]{f}"), m)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(VirtualService {
        key: format!("{ns}/{}", obj.metadata.name),
        created: obj.metadata.creation_timestamp.clone(),
        hosts,
        http,
        tcp,
    })
}

fn host_pattern(host: &str, ns: &str) -> Result<HostPattern, String> {
    if host.is_empty() {
        return Err("empty host".into());
    }
    if host == "*" {
        return Err("\"*\" is only for gateways, not for the mesh".into());
    }
    if let Some(suffix) = host.strip_prefix('*') {
        if !suffix.starts_with('.') || suffix.len() < 2 || suffix[1..].contains('*') {
            return Err(format!("{host:?}: a wildcard must be a leading \"*.\""));
        }
        return Ok(HostPattern::Suffix(suffix.to_ascii_lowercase()));
    }
    if host.contains('*') || host.contains('/') || host.contains(' ') {
        return Err(format!("{host:?} is not a valid host name"));
    }
    Ok(HostPattern::Exact(qualify(host, ns)))
}

fn http_rule(r: &istio::HttpRoute, index: usize, ns: &str) -> Result<HttpRule, FieldError> {
    if r.delegate.is_some() {
        return Err((".delegate".into(), "delegate is not supported".into()));
    }
    let actions = [
        !r.route.is_empty(),
        r.redirect.is_some(),
        r.direct_response.is_some(),
    ];
    match actions.iter().filter(|a| **a).count() {
        0 => {
            return Err((
                String::new(),
                "a rule needs route, redirect or directResponse".into(),
            ));
        }
        1 => {}
        _ => {
            return Err((
                String::new(),
                "route, redirect and directResponse exclude each other".into(),
            ));
        }
    }
    if r.rewrite.is_some() && r.redirect.is_some() {
        return Err((
            ".rewrite".into(),
            "rewrite and redirect exclude each other".into(),
        ));
    }
    if r.fault.is_some() && (r.redirect.is_some() || r.direct_response.is_some()) {
        return Err((
            ".fault".into(),
            "a fault cannot go with redirect or directResponse".into(),
        ));
    }
    if r.mirror.is_some() && !r.mirrors.is_empty() {
        return Err((
            ".mirrors".into(),
            "mirror and mirrors exclude each other".into(),
        ));
    }
    let matches = r
        .matches
        .iter()
        .enumerate()
        .map(|(i, m)| request_match(m).map_err(|(f, e)| (format!(".match[{i}]{f}"), e)))
        .collect::<Result<Vec<_>, _>>()?;
    let action = if let Some(redirect) = &r.redirect {
        RuleAction::Redirect(
            compile_redirect(redirect).map_err(|(f, e)| (format!(".redirect{f}"), e))?,
        )
    } else if let Some(direct) = &r.direct_response {
        let status = StatusCode::from_u16(u16::try_from(direct.status).unwrap_or(0))
            .ok()
            .filter(|s| s.as_u16() >= 200)
            .ok_or_else(|| {
                (
                    ".directResponse.status".to_owned(),
                    format!("{} is not a valid HTTP status", direct.status),
                )
            })?;
        let body = match &direct.body {
            Some(istio::HttpBody {
                string: Some(s), ..
            }) => Bytes::from(s.clone()),
            Some(istio::HttpBody { bytes: Some(b), .. }) => {
                use base64::Engine as _;
                Bytes::from(
                    base64::engine::general_purpose::STANDARD
                        .decode(b)
                        .map_err(|e| (".directResponse.body.bytes".to_owned(), e.to_string()))?,
                )
            }
            _ => Bytes::new(),
        };
        RuleAction::Direct { status, body }
    } else {
        let destinations = r
            .route
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let target = route_target(i, d.destination.as_ref(), ns)?;
                let headers = header_ops(d.headers.as_ref())
                    .map_err(|(f, e)| (format!(".route[{i}].headers{f}"), e))?;
                Ok((target, d.weight, headers))
            })
            .collect::<Result<Vec<_>, FieldError>>()?;
        RuleAction::Route(weighted(destinations, ".route")?)
    };
    let rewrite = r
        .rewrite
        .as_ref()
        .map(compile_rewrite)
        .transpose()
        .map_err(|(f, e)| (format!(".rewrite{f}"), e))?;
    let timeout = r
        .timeout
        .as_deref()
        .map(duration::parse)
        .transpose()
        .map_err(at(".timeout"))?
        .filter(|t| !t.is_zero());
    let retries = match &r.retries {
        None => default_retries(),
        Some(p) => retry_policy(p).map_err(|(f, e)| (format!(".retries{f}"), e))?,
    };
    let fault = r
        .fault
        .as_ref()
        .map(compile_fault)
        .transpose()
        .map_err(|(f, e)| (format!(".fault{f}"), e))?;
    let mut mirrors = Vec::new();
    if let Some(m) = &r.mirror {
        let percent = match (r.mirror_percentage, r.mirror_percent) {
            (Some(p), _) => percent(p.value).map_err(at(".mirrorPercentage.value"))?,
            (None, Some(p)) => percent(f64::from(p)).map_err(at(".mirrorPercent"))?,
            (None, None) => 100.0,
        };
        mirrors.push(Mirror {
            target: target(m, ns).map_err(|(f, e)| (format!(".mirror{f}"), e))?,
            percent,
        });
    }
    for (i, m) in r.mirrors.iter().enumerate() {
        mirrors.push(Mirror {
            target: target(&m.destination, ns)
                .map_err(|(f, e)| (format!(".mirrors[{i}].destination{f}"), e))?,
            percent: match m.percentage {
                Some(p) => {
                    percent(p.value).map_err(at(format!(".mirrors[{i}].percentage.value")))?
                }
                None => 100.0,
            },
        });
    }
    let cors = r
        .cors_policy
        .as_ref()
        .map(compile_cors)
        .transpose()
        .map_err(|(f, e)| (format!(".corsPolicy{f}"), e))?;
    Ok(HttpRule {
        name: r.name.clone().unwrap_or_else(|| format!("#{index}")),
        matches,
        action,
        rewrite,
        headers: header_ops(r.headers.as_ref()).map_err(|(f, e)| (format!(".headers{f}"), e))?,
        timeout,
        retries,
        fault,
        mirrors,
        cors,
    })
}

fn string_matcher(m: &istio::StringMatch) -> Result<Option<StringMatcher>, FieldError> {
    match (&m.exact, &m.prefix, &m.regex) {
        (None, None, None) => Ok(None),
        (Some(e), None, None) => Ok(Some(StringMatcher::Exact(e.clone()))),
        (None, Some(p), None) => Ok(Some(StringMatcher::Prefix(p.clone()))),
        (None, None, Some(r)) if r.is_empty() || r.len() > MAX_REGEX_LEN => Err((
            ".regex".into(),
            format!("a regex of 1 to {MAX_REGEX_LEN} characters"),
        )),
        (None, None, Some(r)) => StringMatcher::regex(r)
            .map(Some)
            .map_err(|e| (".regex".into(), format!("{r:?} is not a valid regex: {e}"))),
        _ => Err((
            String::new(),
            "exact, prefix and regex exclude each other".into(),
        )),
    }
}

/// Istio allows an empty prefix only for uri (where it matches every path).
fn no_empty_prefix(m: &istio::StringMatch, field: &str, allowed: bool) -> Result<(), FieldError> {
    if !allowed && m.prefix.as_deref() == Some("") {
        return Err((
            format!("{field}.prefix"),
            "an empty prefix is only allowed for uri".into(),
        ));
    }
    Ok(())
}

/// A matcher that must have a value (uri, method, authority, scheme).
fn required_matcher(m: &istio::StringMatch, field: &str) -> Result<StringMatcher, FieldError> {
    no_empty_prefix(m, field, field == ".uri")?;
    string_matcher(m)
        .map_err(|(f, e)| (format!("{field}{f}"), e))?
        .ok_or_else(|| {
            (
                field.to_owned(),
                "exact, prefix or regex is required".into(),
            )
        })
}

fn value_matchers(
    map: &BTreeMap<String, istio::StringMatch>,
    field: &str,
    headers: bool,
) -> Result<Vec<(String, ValueMatcher)>, FieldError> {
    map.iter()
        .map(|(name, m)| {
            let here = format!("{field}.{name}");
            no_empty_prefix(m, &here, false)?;
            if name.is_empty() {
                return Err((field.to_owned(), "an empty name".into()));
            }
            let name = if headers {
                HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| (here.clone(), format!("{name:?} is not a valid header name")))?
                    .as_str()
                    .to_owned()
            } else {
                name.clone()
            };
            // `{}` and `regex: "*"` both mean "present" (Istio turns both into presence).
            let matcher =
                if m.regex.as_deref() == Some("*") && m.exact.is_none() && m.prefix.is_none() {
                    ValueMatcher::Present
                } else {
                    string_matcher(m)
                        .map_err(|(f, e)| (format!("{here}{f}"), e))?
                        .map_or(ValueMatcher::Present, ValueMatcher::Value)
                };
            Ok((name, matcher))
        })
        .collect()
}

fn request_match(m: &istio::HttpMatchRequest) -> Result<RequestMatch, FieldError> {
    let port = m
        .port
        .map(|p| u16::try_from(p).ok().filter(|p| *p != 0))
        .map(|p| p.ok_or_else(|| (".port".to_owned(), "not a port number".to_owned())))
        .transpose()?;
    Ok(RequestMatch {
        uri: m
            .uri
            .as_ref()
            .map(|u| required_matcher(u, ".uri"))
            .transpose()?,
        ignore_uri_case: m.ignore_uri_case,
        scheme: m
            .scheme
            .as_ref()
            .map(|s| required_matcher(s, ".scheme"))
            .transpose()?,
        method: m
            .method
            .as_ref()
            .map(|s| required_matcher(s, ".method"))
            .transpose()?,
        authority: m
            .authority
            .as_ref()
            .map(|s| required_matcher(s, ".authority"))
            .transpose()?,
        headers: value_matchers(&m.headers, ".headers", true)?,
        without_headers: value_matchers(&m.without_headers, ".withoutHeaders", true)?,
        query_params: value_matchers(&m.query_params, ".queryParams", false)?,
        port,
        source_labels: m.source_labels.clone(),
        source_namespace: m.source_namespace.clone(),
        // Matched against `mesh`, as Istio's waypoint does: an entry for gateways only never
        // matches here.
        for_mesh: m.gateways.is_empty() || m.gateways.iter().any(|g| g == "mesh"),
    })
}

/// `route[i].destination` (required).
fn route_target(i: usize, d: Option<&istio::Destination>, ns: &str) -> Result<Target, FieldError> {
    let d = d.ok_or_else(|| (format!(".route[{i}].destination"), "required".to_owned()))?;
    target(d, ns).map_err(|(f, e)| (format!(".route[{i}].destination{f}"), e))
}

fn target(d: &istio::Destination, ns: &str) -> Result<Target, FieldError> {
    if d.host.is_empty() {
        return Err((".host".into(), "required".into()));
    }
    if d.host.contains('*') {
        return Err((
            ".host".into(),
            format!("{:?}: a destination cannot be a wildcard", d.host),
        ));
    }
    let port = d
        .port
        .as_ref()
        .map(|p| {
            u16::try_from(p.number)
                .ok()
                .filter(|n| *n != 0)
                .ok_or_else(|| {
                    (
                        ".port.number".to_owned(),
                        format!("{} is not a port", p.number),
                    )
                })
        })
        .transpose()?;
    Ok(Target {
        host: qualify(&d.host, ns),
        subset: d.subset.clone().filter(|s| !s.is_empty()),
        port,
    })
}

/// Weights as Istio reads them: relative, a lone destination takes everything, none may be
/// negative, and several destinations may not all weigh 0.
fn weighted(
    destinations: Vec<(Target, Option<i64>, HeaderOps)>,
    field: &str,
) -> Result<WeightedDestinations, FieldError> {
    let lone = destinations.len() == 1;
    let mut out = Vec::with_capacity(destinations.len());
    let mut total = 0u64;
    for (i, (target, weight, headers)) in destinations.into_iter().enumerate() {
        let w = match weight {
            Some(w) if w < 0 => {
                return Err((format!("{field}[{i}].weight"), format!("{w} is negative")));
            }
            Some(w) if w > i64::from(u32::MAX) => {
                return Err((format!("{field}[{i}].weight"), format!("{w} is too large")));
            }
            _ if lone => 1,
            Some(w) => w as u32,
            None => 0,
        };
        total += u64::from(w);
        out.push(RouteTarget {
            target,
            weight: w,
            headers,
        });
    }
    if total == 0 {
        return Err((field.to_owned(), "the total weight is 0".into()));
    }
    Ok(WeightedDestinations {
        destinations: out,
        total_weight: total,
    })
}

fn compile_redirect(r: &istio::HttpRedirect) -> Result<Redirect, FieldError> {
    // 0 is the proto default: 301.
    let code = r.redirect_code.filter(|c| *c != 0).unwrap_or(301);
    let status = match code {
        301 | 302 | 303 | 307 | 308 => StatusCode::from_u16(code as u16).expect("a 3xx code"),
        _ => {
            return Err((
                ".redirectCode".into(),
                format!("{code}: 301, 302, 303, 307 or 308"),
            ));
        }
    };
    if r.uri.is_none()
        && r.authority.is_none()
        && r.scheme.is_none()
        && r.port.is_none()
        && r.derive_port.is_none()
    {
        return Err((
            String::new(),
            "uri, authority, scheme or port is required".into(),
        ));
    }
    if let Some(s) = &r.scheme
        && s != "http"
        && s != "https"
    {
        return Err((".scheme".into(), format!("{s:?}: http or https")));
    }
    let port = match (r.port, r.derive_port.as_deref()) {
        (Some(_), Some(_)) => {
            return Err((
                ".port".into(),
                "port and derivePort exclude each other".into(),
            ));
        }
        (Some(p), None) => Some(RedirectPort::Fixed(
            u16::try_from(p)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| (".port".to_owned(), format!("{p} is not a port")))?,
        )),
        (None, Some("FROM_REQUEST_PORT")) => Some(RedirectPort::FromRequest),
        (None, Some("FROM_PROTOCOL_DEFAULT")) => Some(RedirectPort::ProtocolDefault),
        (None, Some(other)) => {
            return Err((
                ".derivePort".into(),
                format!("{other:?}: FROM_PROTOCOL_DEFAULT or FROM_REQUEST_PORT"),
            ));
        }
        (None, None) => None,
    };
    if let Some(uri) = &r.uri
        && !uri.starts_with('/')
    {
        return Err((".uri".into(), format!("{uri:?} must start with /")));
    }
    Ok(Redirect {
        uri: r.uri.clone(),
        replace_prefix: None,
        authority: r.authority.clone(),
        port,
        scheme: r.scheme.clone(),
        status,
    })
}

fn compile_rewrite(r: &istio::HttpRewrite) -> Result<Rewrite, FieldError> {
    match (&r.uri, &r.uri_regex_rewrite) {
        (Some(_), Some(_)) => Err((
            ".uriRegexRewrite".into(),
            "uri and uriRegexRewrite exclude each other".into(),
        )),
        (_, Some(rr)) => {
            let pattern = regex::RegexBuilder::new(&rr.pattern)
                .size_limit(1 << 20)
                .build()
                .map_err(|e| (".uriRegexRewrite.match".to_owned(), e.to_string()))?;
            Ok(Rewrite::Regex {
                pattern,
                substitution: envoy_substitution(&rr.rewrite),
                authority: r.authority.clone(),
            })
        }
        (uri, None) => {
            if uri.is_none() && r.authority.is_none() {
                return Err((
                    String::new(),
                    "uri, uriRegexRewrite or authority is required".into(),
                ));
            }
            Ok(Rewrite::Uri {
                uri: uri.clone(),
                authority: r.authority.clone(),
            })
        }
    }
}

/// Envoy writes capture groups as `\1`; the regex crate as `${1}`.
fn envoy_substitution(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, chars.peek()) {
            ('\\', Some(d)) if d.is_ascii_digit() => {
                out.push_str(&format!("${{{d}}}"));
                chars.next();
            }
            ('$', _) => out.push_str("$$"),
            _ => out.push(c),
        }
    }
    out
}

fn compile_cors(c: &istio::CorsPolicy) -> Result<Cors, FieldError> {
    let mut allow_origins = c
        .allow_origins
        .iter()
        .enumerate()
        .map(|(i, m)| required_matcher(m, &format!(".allowOrigins[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    allow_origins.extend(
        c.allow_origin
            .iter()
            .map(|o| StringMatcher::Exact(o.clone())),
    );
    let max_age = c
        .max_age
        .as_deref()
        .map(duration::parse)
        .transpose()
        .map_err(at(".maxAge"))?;
    if max_age.is_some_and(|a| a.subsec_nanos() != 0) {
        return Err((".maxAge".into(), "whole seconds only".into()));
    }
    let forward_unmatched_preflights = match c.unmatched_preflights.as_deref() {
        None | Some("FORWARD" | "UNSPECIFIED") => true,
        Some("IGNORE") => false,
        Some(other) => {
            return Err((
                ".unmatchedPreflights".into(),
                format!("{other:?}: FORWARD or IGNORE"),
            ));
        }
    };
    Ok(Cors {
        allow_origins,
        allow_methods: c.allow_methods.clone(),
        allow_headers: c.allow_headers.clone(),
        expose_headers: c.expose_headers.clone(),
        max_age,
        allow_credentials: c.allow_credentials.unwrap_or(false),
        forward_unmatched_preflights,
    })
}

fn tcp_rule(r: &istio::TcpRoute, ns: &str) -> Result<TcpRule, FieldError> {
    if r.matches.len() > 1 {
        return Err((
            ".match".into(),
            "a waypoint supports at most one match per tcp rule".into(),
        ));
    }
    let m = r.matches.first().cloned().unwrap_or_default();
    let destination_subnets = m
        .destination_subnets
        .iter()
        .enumerate()
        .map(|(i, s)| {
            s.parse::<ipnet::IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    (
                        format!(".match[0].destinationSubnets[{i}]"),
                        format!("{s:?} is not a CIDR"),
                    )
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let port = m
        .port
        .map(|p| {
            u16::try_from(p)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| (".match[0].port".to_owned(), format!("{p} is not a port")))
        })
        .transpose()?;
    if r.route.is_empty() {
        return Err((
            ".route".into(),
            "at least one destination is required".into(),
        ));
    }
    let destinations = r
        .route
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let t = route_target(i, d.destination.as_ref(), ns)?;
            Ok((t, d.weight, HeaderOps::default()))
        })
        .collect::<Result<Vec<_>, FieldError>>()?;
    Ok(TcpRule {
        port,
        destination_subnets,
        source_labels: m.source_labels,
        source_namespace: m.source_namespace,
        route: weighted(destinations, ".route")?,
    })
}
