//! DestinationRule → per-(service, subset, port) traffic policy: load balancing, connection
//! pool limits (circuit breaking) and outlier detection, merged as Istio merges them (each
//! component replaced whole; subset port-level > subset > port-level > rule).
use std::{collections::BTreeMap, time::Duration};

use super::{FieldError, compile::qualify, duration, model::HostPattern};
use crate::{
    l7::api::{ConfigError, ISTIO_NETWORKING_VERSIONS, ObjectContext, istio},
    policy::RawObject,
};

/// How an endpoint is chosen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadBalancer {
    /// Istio's default (`UNSPECIFIED` and the deprecated `LEAST_CONN` too).
    LeastRequest,
    RoundRobin,
    Random,
    /// To the address the client asked for.
    Passthrough,
    /// Sticky by a request attribute.
    ConsistentHash(HashKey),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HashKey {
    Header(String),
    /// The cookie's name (generated with `ttl` when missing).
    Cookie {
        name: String,
        ttl: Option<Duration>,
    },
    SourceIp,
    QueryParameter(String),
}

/// Circuit-breaker thresholds and connection limits; beyond them a request gets 503 UO.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionPool {
    pub max_connections: u32,
    pub connect_timeout: Duration,
    pub max_pending_requests: u32,
    pub max_requests: u32,
    /// 0: unlimited; 1: no keep-alive.
    pub max_requests_per_connection: u32,
    /// Concurrent retries across the service.
    pub max_retries: u32,
    pub idle_timeout: Duration,
}

impl Default for ConnectionPool {
    /// Istio's: every threshold at 2³²−1, 10 s connect timeout, 1 h idle timeout.
    fn default() -> Self {
        Self {
            max_connections: u32::MAX,
            connect_timeout: Duration::from_secs(10),
            max_pending_requests: u32::MAX,
            max_requests: u32::MAX,
            max_requests_per_connection: 0,
            max_retries: u32::MAX,
            idle_timeout: Duration::from_secs(3600),
        }
    }
}

/// Passive health checking: endpoints that keep failing are ejected for a while.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutlierDetection {
    /// `None`: this kind of failure does not eject.
    pub consecutive_5xx: Option<u32>,
    pub consecutive_gateway_errors: Option<u32>,
    pub interval: Duration,
    /// Ejection time = this × the number of times the endpoint was ejected.
    pub base_ejection_time: Duration,
    pub max_ejection_percent: u32,
    /// Below this share of healthy endpoints, ejections are ignored (panic mode).
    pub min_health_percent: u32,
}

/// The policy that applies to one (service, subset, port).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResolvedPolicy {
    pub load_balancer: Option<LoadBalancer>,
    pub connection_pool: ConnectionPool,
    pub outlier_detection: Option<OutlierDetection>,
}

impl ResolvedPolicy {
    pub fn load_balancer(&self) -> &LoadBalancer {
        self.load_balancer
            .as_ref()
            .unwrap_or(&LoadBalancer::LeastRequest)
    }
}

/// The components one level sets (`None`: inherited from the level below).
#[derive(Clone, Debug, Default)]
struct Level {
    load_balancer: Option<LoadBalancer>,
    connection_pool: Option<ConnectionPool>,
    outlier_detection: Option<OutlierDetection>,
}

impl Level {
    fn over(&self, base: &mut ResolvedPolicy) {
        if let Some(lb) = &self.load_balancer {
            base.load_balancer = Some(lb.clone());
        }
        if let Some(p) = &self.connection_pool {
            base.connection_pool = p.clone();
        }
        if let Some(o) = &self.outlier_detection {
            base.outlier_detection = Some(o.clone());
        }
    }
}

#[derive(Clone, Debug, Default)]
struct Levels {
    all_ports: Level,
    ports: BTreeMap<u16, Level>,
}

#[derive(Clone, Debug)]
pub struct Subset {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    policy: Levels,
}

/// One compiled DestinationRule.
#[derive(Clone, Debug)]
pub struct DestinationRule {
    pub key: String,
    pub created: Option<String>,
    pub host: HostPattern,
    pub subsets: Vec<Subset>,
    policy: Levels,
}

impl DestinationRule {
    pub fn subset(&self, name: &str) -> Option<&Subset> {
        self.subsets.iter().find(|s| s.name == name)
    }

    /// The policy for traffic to `subset` (if any) on `port`.
    pub fn resolve(&self, subset: Option<&str>, port: u16) -> ResolvedPolicy {
        let mut p = ResolvedPolicy::default();
        self.policy.all_ports.over(&mut p);
        if let Some(l) = self.policy.ports.get(&port) {
            l.over(&mut p);
        }
        if let Some(s) = subset.and_then(|s| self.subset(s)) {
            s.policy.all_ports.over(&mut p);
            if let Some(l) = s.policy.ports.get(&port) {
                l.over(&mut p);
            }
        }
        p
    }
}

/// The DestinationRules of a config, looked up by service host.
#[derive(Clone, Debug, Default)]
pub struct DestinationRules {
    /// Oldest first: among rules for one host with equally specific patterns the oldest wins.
    rules: Vec<DestinationRule>,
}

impl DestinationRules {
    /// Compiles every DestinationRule among `objects`; rejected ones are reported and left out.
    pub fn build(objects: &[RawObject]) -> (Self, Vec<ConfigError>) {
        let mut errors = Vec::new();
        let mut rules: Vec<DestinationRule> = objects
            .iter()
            .filter(|o| o.kind == "DestinationRule")
            .filter_map(|o| compile(o).map_err(|e| errors.push(e)).ok())
            .collect();
        rules.sort_by(|a, b| {
            let created = |r: &DestinationRule| r.created.clone().unwrap_or_default();
            created(a).cmp(&created(b)).then_with(|| a.key.cmp(&b.key))
        });
        (Self { rules }, errors)
    }

    /// The rule for `host` (fully qualified): the most specific host, then the oldest.
    pub fn for_host(&self, host: &str) -> Option<&DestinationRule> {
        let mut best: Option<(&DestinationRule, usize)> = None;
        for r in self.rules.iter().filter(|r| r.host.matches(host)) {
            let s = r.host.specificity();
            if best.is_none_or(|(_, b)| s > b) {
                best = Some((r, s));
            }
        }
        best.map(|(r, _)| r)
    }
}

fn compile(obj: &RawObject) -> Result<DestinationRule, ConfigError> {
    let ctx = ObjectContext { obj };
    ctx.check_version(&ISTIO_NETWORKING_VERSIONS)?;
    let spec: istio::DestinationRuleSpec = ctx.spec()?;
    let ns = obj.metadata.namespace.as_str();
    let host = match spec.host.as_str() {
        "" => return Err(ctx.err("spec.host", "required")),
        "*" => HostPattern::Any,
        h if h.starts_with("*.") => HostPattern::Suffix(h[1..].to_ascii_lowercase()),
        h if h.contains('*') => {
            return Err(ctx.err(
                "spec.host",
                format!("{h:?}: a wildcard must be a leading \"*.\""),
            ));
        }
        h => HostPattern::Exact(qualify(h, ns)),
    };
    let policy = levels(spec.traffic_policy.as_ref())
        .map_err(|(f, m)| ctx.err(format!("spec.trafficPolicy{f}"), m))?;
    let mut subsets: Vec<Subset> = Vec::new();
    for (i, s) in spec.subsets.iter().enumerate() {
        if s.name.is_empty() {
            return Err(ctx.err(format!("spec.subsets[{i}].name"), "required"));
        }
        if subsets.iter().any(|o| o.name == s.name) {
            return Err(ctx.err(
                format!("spec.subsets[{i}].name"),
                format!("duplicate subset {:?}", s.name),
            ));
        }
        subsets.push(Subset {
            name: s.name.clone(),
            labels: s.labels.clone(),
            policy: levels(s.traffic_policy.as_ref())
                .map_err(|(f, m)| ctx.err(format!("spec.subsets[{i}].trafficPolicy{f}"), m))?,
        });
    }
    Ok(DestinationRule {
        key: format!("{ns}/{}", obj.metadata.name),
        created: obj.metadata.creation_timestamp.clone(),
        host,
        subsets,
        policy,
    })
}

fn levels(p: Option<&istio::TrafficPolicy>) -> Result<Levels, FieldError> {
    let Some(p) = p else {
        return Ok(Levels::default());
    };
    let all_ports = level(
        p.load_balancer.as_ref(),
        p.connection_pool.as_ref(),
        p.outlier_detection.as_ref(),
    )?;
    let mut ports = BTreeMap::new();
    for (i, pl) in p.port_level_settings.iter().enumerate() {
        let here = format!(".portLevelSettings[{i}]");
        let port = pl
            .port
            .as_ref()
            .and_then(|p| u16::try_from(p.number).ok())
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                (
                    format!("{here}.port.number"),
                    "a port is required".to_owned(),
                )
            })?;
        let l = level(
            pl.load_balancer.as_ref(),
            pl.connection_pool.as_ref(),
            pl.outlier_detection.as_ref(),
        )
        .map_err(|(f, m)| (format!("{here}{f}"), m))?;
        if ports.insert(port, l).is_some() {
            return Err((
                format!("{here}.port.number"),
                format!("port {port} appears twice"),
            ));
        }
    }
    Ok(Levels { all_ports, ports })
}

fn level(
    lb: Option<&istio::LoadBalancerSettings>,
    pool: Option<&istio::ConnectionPoolSettings>,
    outlier: Option<&istio::OutlierDetection>,
) -> Result<Level, FieldError> {
    Ok(Level {
        load_balancer: lb.map(load_balancer).transpose()?,
        connection_pool: pool.map(connection_pool).transpose()?,
        outlier_detection: outlier.map(outlier_detection).transpose()?,
    })
}

fn load_balancer(lb: &istio::LoadBalancerSettings) -> Result<LoadBalancer, FieldError> {
    match (&lb.simple, &lb.consistent_hash) {
        (Some(_), Some(_)) => Err((
            ".loadBalancer".into(),
            "simple and consistentHash exclude each other".into(),
        )),
        (Some(s), None) => match s.as_str() {
            "UNSPECIFIED" | "LEAST_REQUEST" | "LEAST_CONN" => Ok(LoadBalancer::LeastRequest),
            "ROUND_ROBIN" => Ok(LoadBalancer::RoundRobin),
            "RANDOM" => Ok(LoadBalancer::Random),
            "PASSTHROUGH" => Ok(LoadBalancer::Passthrough),
            other => Err((
                ".loadBalancer.simple".into(),
                format!("{other:?}: ROUND_ROBIN, LEAST_REQUEST, RANDOM or PASSTHROUGH"),
            )),
        },
        (None, Some(h)) => {
            let keys = [
                h.http_header_name.is_some(),
                h.http_cookie.is_some(),
                h.use_source_ip == Some(true),
                h.http_query_parameter_name.is_some(),
            ];
            if keys.iter().filter(|k| **k).count() != 1 {
                return Err((
                    ".loadBalancer.consistentHash".into(),
                    "exactly one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName".into(),
                ));
            }
            let key = if let Some(name) = &h.http_header_name {
                HashKey::Header(name.to_ascii_lowercase())
            } else if let Some(c) = &h.http_cookie {
                let ttl = c
                    .ttl
                    .as_deref()
                    .map(duration::parse)
                    .transpose()
                    .map_err(|m| (".loadBalancer.consistentHash.httpCookie.ttl".to_owned(), m))?;
                HashKey::Cookie {
                    name: c.name.clone(),
                    ttl,
                }
            } else if let Some(q) = &h.http_query_parameter_name {
                HashKey::QueryParameter(q.clone())
            } else {
                HashKey::SourceIp
            };
            Ok(LoadBalancer::ConsistentHash(key))
        }
        (None, None) => Ok(LoadBalancer::LeastRequest),
    }
}

/// A threshold: absent keeps the default, 0 or less is refused (Istio's validation).
fn threshold(v: Option<i64>, field: &str, default: u32) -> Result<u32, FieldError> {
    match v {
        None => Ok(default),
        Some(n) if n <= 0 => Err((field.to_owned(), format!("{n}: must be at least 1"))),
        Some(n) => Ok(u32::try_from(n).unwrap_or(u32::MAX)),
    }
}

fn connection_pool(p: &istio::ConnectionPoolSettings) -> Result<ConnectionPool, FieldError> {
    let d = ConnectionPool::default();
    let tcp = p.tcp.clone().unwrap_or_default();
    let http = p.http.clone().unwrap_or_default();
    let dur = |v: &Option<String>, field: &str, default: Duration| {
        v.as_deref()
            .map(duration::parse)
            .transpose()
            .map_err(|m| (field.to_owned(), m))
            .map(|d| d.unwrap_or(default))
    };
    let connect_timeout = dur(
        &tcp.connect_timeout,
        ".connectionPool.tcp.connectTimeout",
        d.connect_timeout,
    )?;
    if connect_timeout < Duration::from_millis(1) {
        return Err((
            ".connectionPool.tcp.connectTimeout".into(),
            "must be at least 1ms".into(),
        ));
    }
    let tcp_idle = dur(
        &tcp.idle_timeout,
        ".connectionPool.tcp.idleTimeout",
        d.idle_timeout,
    )?;
    Ok(ConnectionPool {
        max_connections: threshold(
            tcp.max_connections,
            ".connectionPool.tcp.maxConnections",
            d.max_connections,
        )?,
        connect_timeout,
        max_pending_requests: threshold(
            http.http1_max_pending_requests,
            ".connectionPool.http.http1MaxPendingRequests",
            d.max_pending_requests,
        )?,
        max_requests: threshold(
            http.http2_max_requests,
            ".connectionPool.http.http2MaxRequests",
            d.max_requests,
        )?,
        max_requests_per_connection: match http.max_requests_per_connection {
            None => 0,
            Some(n) if n < 0 => {
                return Err((
                    ".connectionPool.http.maxRequestsPerConnection".into(),
                    format!("{n} is negative"),
                ));
            }
            Some(n) => u32::try_from(n).unwrap_or(u32::MAX),
        },
        max_retries: match http.max_retries {
            None => d.max_retries,
            Some(n) if n < 0 => {
                return Err((
                    ".connectionPool.http.maxRetries".into(),
                    format!("{n} is negative"),
                ));
            }
            Some(n) => u32::try_from(n).unwrap_or(u32::MAX),
        },
        idle_timeout: dur(
            &http.idle_timeout,
            ".connectionPool.http.idleTimeout",
            tcp_idle,
        )?,
    })
}

fn outlier_detection(o: &istio::OutlierDetection) -> Result<OutlierDetection, FieldError> {
    let dur = |v: &Option<String>, field: &str, default: Duration| {
        v.as_deref()
            .map(duration::parse)
            .transpose()
            .map_err(|m| (format!(".outlierDetection.{field}"), m))
            .map(|d| d.unwrap_or(default))
    };
    let interval = dur(&o.interval, "interval", Duration::from_secs(10))?;
    if interval < Duration::from_millis(1) {
        return Err((
            ".outlierDetection.interval".into(),
            "must be at least 1ms".into(),
        ));
    }
    let percent = |v: Option<i64>, field: &str, default: u32| match v {
        None => Ok(default),
        Some(n) if (0..=100).contains(&n) => Ok(n as u32),
        Some(n) => Err((
            format!(".outlierDetection.{field}"),
            format!("{n} is not within 0 and 100"),
        )),
    };
    Ok(OutlierDetection {
        // The deprecated consecutiveErrors meant gateway errors; 0 disables a kind.
        consecutive_5xx: Some(o.consecutive_5xx_errors.unwrap_or(5)).filter(|n| *n > 0),
        consecutive_gateway_errors: o
            .consecutive_gateway_errors
            .or(o.consecutive_errors)
            .filter(|n| *n > 0),
        interval,
        base_ejection_time: dur(
            &o.base_ejection_time,
            "baseEjectionTime",
            Duration::from_secs(30),
        )?,
        max_ejection_percent: percent(o.max_ejection_percent, "maxEjectionPercent", 10)?,
        min_health_percent: percent(o.min_health_percent, "minHealthPercent", 0)?,
    })
}
