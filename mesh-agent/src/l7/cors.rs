//! What a route's `corsPolicy` does to a request, as Envoy's CORS filter (which Istio
//! configures from it) does: a preflight from an allowed origin is answered here (200, never
//! forwarded); other requests from an allowed origin are forwarded and their responses carry
//! `access-control-allow-origin` (the origin itself, echoed), credentials and exposed headers.
//! A preflight from an origin not allowed is forwarded (`unmatchedPreflights: FORWARD`, the
//! default) or answered 200 without CORS headers (`IGNORE`).
use http::{HeaderMap, HeaderName, HeaderValue, Method, header};

use super::route::model::Cors;

/// The policy's decision for one request.
#[derive(Debug, PartialEq)]
pub enum CorsStep {
    /// Answer here with 200 and these headers.
    Answer(HeaderMap),
    /// Forward; add these headers to the response (may be empty).
    Forward(HeaderMap),
}

/// Applies `cors` to a request with `method` and `headers`.
pub fn evaluate(cors: &Cors, method: &Method, headers: &HeaderMap) -> CorsStep {
    let Some(origin) = headers.get(header::ORIGIN).filter(|o| !o.is_empty()) else {
        return CorsStep::Forward(HeaderMap::new());
    };
    let allowed = origin.to_str().is_ok_and(|o| cors.allows_origin(o));
    let preflight =
        method == Method::OPTIONS && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut out = HeaderMap::new();
    if !allowed {
        return if preflight && !cors.forward_unmatched_preflights {
            CorsStep::Answer(out)
        } else {
            CorsStep::Forward(out)
        };
    }
    out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    if cors.allow_credentials {
        out.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
    if preflight {
        put_list(
            &mut out,
            header::ACCESS_CONTROL_ALLOW_METHODS,
            &cors.allow_methods,
        );
        put_list(
            &mut out,
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            &cors.allow_headers,
        );
        if let Some(age) = cors.max_age {
            out.insert(header::ACCESS_CONTROL_MAX_AGE, age.as_secs().into());
        }
        CorsStep::Answer(out)
    } else {
        put_list(
            &mut out,
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            &cors.expose_headers,
        );
        CorsStep::Forward(out)
    }
}

/// `name: a,b,c` when `values` is not empty (values that cannot be a header are left out).
fn put_list(out: &mut HeaderMap, name: HeaderName, values: &[String]) {
    if values.is_empty() {
        return;
    }
    if let Ok(v) = HeaderValue::from_str(&values.join(",")) {
        out.insert(name, v);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::l7::route::matching::StringMatcher;

    fn policy(forward_unmatched_preflights: bool) -> Cors {
        Cors {
            allow_origins: vec![StringMatcher::Exact("https://app.example".into())],
            allow_methods: vec!["GET".into(), "POST".into()],
            allow_headers: vec!["x-token".into()],
            expose_headers: vec!["x-trace".into()],
            max_age: Some(Duration::from_secs(600)),
            allow_credentials: true,
            forward_unmatched_preflights,
        }
    }

    fn request(origin: Option<&str>, preflight: bool) -> (Method, HeaderMap) {
        let mut h = HeaderMap::new();
        if let Some(o) = origin {
            h.insert(header::ORIGIN, HeaderValue::from_str(o).unwrap());
        }
        if preflight {
            h.insert(
                header::ACCESS_CONTROL_REQUEST_METHOD,
                HeaderValue::from_static("POST"),
            );
            (Method::OPTIONS, h)
        } else {
            (Method::GET, h)
        }
    }

    /// Envoy's CORS filter, case by case: (origin, preflight, IGNORE?) → answered here?, the
    /// CORS headers.
    #[test]
    fn envoys_cors_answers() {
        type Case = (
            Option<&'static str>,
            bool,
            bool,
            bool,
            &'static [(&'static str, &'static str)],
        );
        let cases: [Case; 7] = [
            // An allowed preflight is answered with the whole policy.
            (
                Some("https://app.example"),
                true,
                false,
                true,
                &[
                    ("access-control-allow-origin", "https://app.example"),
                    ("access-control-allow-credentials", "true"),
                    ("access-control-allow-methods", "GET,POST"),
                    ("access-control-allow-headers", "x-token"),
                    ("access-control-max-age", "600"),
                ],
            ),
            // An allowed simple request is forwarded; the answer names the origin.
            (
                Some("https://app.example"),
                false,
                false,
                false,
                &[
                    ("access-control-allow-origin", "https://app.example"),
                    ("access-control-allow-credentials", "true"),
                    ("access-control-expose-headers", "x-trace"),
                ],
            ),
            // Another origin: forwarded, no CORS headers (the browser blocks it).
            (Some("https://evil.example"), false, false, false, &[]),
            // Its preflight: forwarded by default...
            (Some("https://evil.example"), true, false, false, &[]),
            // ...answered empty with unmatchedPreflights: IGNORE.
            (Some("https://evil.example"), true, true, true, &[]),
            // No Origin: not CORS at all, even OPTIONS with a request method.
            (None, true, false, false, &[]),
            (None, false, true, false, &[]),
        ];
        for (origin, preflight, ignore, answered, want) in cases {
            let (method, headers) = request(origin, preflight);
            let step = evaluate(&policy(!ignore), &method, &headers);
            let (here, got) = match step {
                CorsStep::Answer(h) => (true, h),
                CorsStep::Forward(h) => (false, h),
            };
            let case = format!("{origin:?} preflight={preflight} ignore={ignore}");
            assert_eq!(here, answered, "{case}");
            let got: Vec<(String, String)> = got
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
                .collect();
            let mut want: Vec<(String, String)> = want
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            let mut got_sorted = got.clone();
            got_sorted.sort();
            want.sort();
            assert_eq!(got_sorted, want, "{case}");
        }
    }
}
