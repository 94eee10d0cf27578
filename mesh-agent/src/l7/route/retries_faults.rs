//! Retries and fault injection as Istio validates them: `retryOn` conditions, attempts and
//! per-try timeouts, Istio's default policy, and `fault` delays and aborts with their shares.
use std::time::Duration;

use http::StatusCode;

use super::{
    FieldError, at, duration,
    model::{Abort, Fault, RetryOn, RetryPolicy},
};
use crate::l7::api::istio;

/// Istio's retry policy for a rule without `retries`: two retries on connect failures, refused
/// streams and gRPC `unavailable`/`cancelled` (503 left the default in Istio 1.24).
pub fn default_retries() -> RetryPolicy {
    RetryPolicy {
        attempts: 2,
        per_try_timeout: None,
        on: default_retry_on(),
    }
}

fn default_retry_on() -> RetryOn {
    RetryOn {
        connect_failure: true,
        refused_stream: true,
        grpc: vec![GRPC_CANCELLED, GRPC_UNAVAILABLE],
        ..RetryOn::default()
    }
}

const GRPC_CANCELLED: u32 = 1;
const GRPC_DEADLINE_EXCEEDED: u32 = 4;
const GRPC_RESOURCE_EXHAUSTED: u32 = 8;
const GRPC_INTERNAL: u32 = 13;
const GRPC_UNAVAILABLE: u32 = 14;

/// `retries` as Istio validates it.
pub(super) fn retry_policy(p: &istio::HttpRetry) -> Result<RetryPolicy, FieldError> {
    // The proto's default is 0: `retries:` without `attempts` disables retries.
    let attempts = match p.attempts.unwrap_or(0) {
        a if a < 0 => return Err((".attempts".into(), format!("{a} is negative"))),
        a => u32::try_from(a).map_err(|_| (".attempts".to_owned(), "too large".to_owned()))?,
    };
    if attempts == 0
        && (p.per_try_timeout.is_some()
            || p.retry_on.is_some()
            || p.retry_remote_localities.is_some())
    {
        return Err((
            ".attempts".into(),
            "0 disables retries; perTryTimeout, retryOn and retryRemoteLocalities need attempts > 0".into(),
        ));
    }
    let per_try_timeout = p
        .per_try_timeout
        .as_deref()
        .map(duration::parse)
        .transpose()
        .map_err(at(".perTryTimeout"))?;
    if per_try_timeout.is_some_and(|t| t < Duration::from_millis(1)) {
        return Err((".perTryTimeout".into(), "must be at least 1ms".into()));
    }
    let on = match p.retry_on.as_deref() {
        None | Some("") => default_retry_on(),
        Some(list) => retry_on(list).map_err(at(".retryOn"))?,
    };
    Ok(RetryPolicy {
        attempts,
        per_try_timeout,
        on,
    })
}

/// `retryOn`: Envoy's HTTP and gRPC conditions and bare status codes, comma-separated.
fn retry_on(list: &str) -> Result<RetryOn, String> {
    let mut on = RetryOn::default();
    for token in list.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        match token {
            "5xx" => on.server_error = true,
            "gateway-error" => on.gateway_error = true,
            "reset" | "reset-before-request" => on.reset = true,
            "connect-failure" => on.connect_failure = true,
            "retriable-4xx" => on.retriable_4xx = true,
            "refused-stream" => on.refused_stream = true,
            // Codes are listed as bare numbers; the names alone add nothing.
            "retriable-status-codes"
            | "retriable-headers"
            | "envoy-ratelimited"
            | "http3-post-connect-failure" => {}
            "cancelled" => on.grpc.push(GRPC_CANCELLED),
            "deadline-exceeded" => on.grpc.push(GRPC_DEADLINE_EXCEEDED),
            "internal" => on.grpc.push(GRPC_INTERNAL),
            "resource-exhausted" => on.grpc.push(GRPC_RESOURCE_EXHAUSTED),
            "unavailable" => on.grpc.push(GRPC_UNAVAILABLE),
            code => match code.parse::<u16>() {
                Ok(c) if (100..=599).contains(&c) => on.statuses.push(c),
                _ => return Err(format!("{code:?} is not a retry condition or status code")),
            },
        }
    }
    Ok(on)
}

pub(super) fn percent(value: f64) -> Result<f64, String> {
    if (0.0..=100.0).contains(&value) {
        Ok(value)
    } else {
        Err(format!("{value} is not within 0 and 100"))
    }
}

/// A fault's share of requests; without `percentage` (or the old `percent`) none are hit.
fn fault_percent(
    p: Option<istio::Percent>,
    legacy: Option<i64>,
    field: &str,
) -> Result<f64, FieldError> {
    let (value, field) = match (p, legacy) {
        (Some(p), _) => (p.value, format!("{field}.percentage.value")),
        (None, Some(l)) => (l as f64, format!("{field}.percent")),
        (None, None) => return Ok(0.0),
    };
    if value != 0.0 && value < 0.0001 {
        return Err((
            field,
            format!("{value} is below the smallest share, 0.0001"),
        ));
    }
    percent(value).map_err(|m| (field, m))
}

pub(super) fn compile_fault(f: &istio::HttpFaultInjection) -> Result<Fault, FieldError> {
    if f.delay.is_none() && f.abort.is_none() {
        return Err((String::new(), "delay or abort is required".into()));
    }
    let delay = f
        .delay
        .as_ref()
        .map(|d| {
            if d.exponential_delay.is_some() {
                return Err((
                    ".delay.exponentialDelay".to_owned(),
                    "not supported (Istio rejects it too)".to_owned(),
                ));
            }
            let fixed = d
                .fixed_delay
                .as_deref()
                .ok_or_else(|| (".delay.fixedDelay".to_owned(), "required".to_owned()))?;
            let fixed = duration::parse(fixed).map_err(at(".delay.fixedDelay"))?;
            if fixed < Duration::from_millis(1) {
                return Err((".delay.fixedDelay".into(), "must be at least 1ms".into()));
            }
            Ok((fixed, fault_percent(d.percentage, d.percent, ".delay")?))
        })
        .transpose()?;
    let abort = f
        .abort
        .as_ref()
        .map(|a| {
            let kind = match (a.http_status, &a.grpc_status, &a.http2_error) {
                (Some(s), None, None) => Abort::Http(
                    u16::try_from(s)
                        .ok()
                        .filter(|s| (200..=599).contains(s))
                        .and_then(|s| StatusCode::from_u16(s).ok())
                        .ok_or_else(|| {
                            (
                                ".abort.httpStatus".to_owned(),
                                format!("{s} is not within 200 and 599"),
                            )
                        })?,
                ),
                (None, Some(g), None) => Abort::Grpc(grpc_code(g).ok_or_else(|| {
                    (
                        ".abort.grpcStatus".to_owned(),
                        format!("{g:?} is not a gRPC status name"),
                    )
                })?),
                (None, None, Some(_)) => {
                    return Err((
                        ".abort.http2Error".to_owned(),
                        "not supported (Istio does not implement it)".to_owned(),
                    ));
                }
                (None, None, None) => {
                    return Err((
                        ".abort".to_owned(),
                        "httpStatus or grpcStatus is required".to_owned(),
                    ));
                }
                _ => {
                    return Err((
                        ".abort".to_owned(),
                        "httpStatus, grpcStatus and http2Error exclude each other".to_owned(),
                    ));
                }
            };
            Ok((kind, fault_percent(a.percentage, None, ".abort")?))
        })
        .transpose()?;
    Ok(Fault { delay, abort })
}

/// gRPC status names as Istio accepts them (`UNAVAILABLE`) or their numbers.
fn grpc_code(name: &str) -> Option<u32> {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    NAMES
        .iter()
        .position(|n| n.eq_ignore_ascii_case(name))
        .map(|i| i as u32)
        .or_else(|| name.parse().ok().filter(|n| *n < 17))
}
