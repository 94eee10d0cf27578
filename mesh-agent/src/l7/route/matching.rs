//! Request matching as Envoy does it for Istio's `HTTPMatchRequest`: string matchers (exact,
//! prefix, whole-value RE2-style regex), header presence and inversion, query parameters, and
//! the request facts a match may look at ([`RequestView`]).
use std::{borrow::Cow, collections::BTreeMap};

use http::HeaderMap;
use regex::Regex;

/// What a route match may look at, whatever carried the request (HTTP/1.1, HTTP/2, gRPC).
#[derive(Clone, Copy, Debug)]
pub struct RequestView<'a> {
    pub method: &'a str,
    pub scheme: &'a str,
    /// The `:path` as received, query string included.
    pub path_and_query: &'a str,
    /// `:authority` / `Host`, port included when the client sent one.
    pub authority: &'a str,
    pub headers: &'a HeaderMap,
    /// The destination port the client addressed (the service port).
    pub port: u16,
    /// The source workload's labels and namespace, when the source is a known workload.
    pub source_labels: Option<&'a crate::names::Labels>,
    pub source_namespace: Option<&'a str>,
}

/// What a `tcp[]` match may look at: the connection, not its bytes.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionView<'a> {
    /// The destination port the client addressed (the service port).
    pub port: u16,
    /// The address the client addressed (the VIP).
    pub destination: std::net::IpAddr,
    pub source_labels: Option<&'a crate::names::Labels>,
    pub source_namespace: Option<&'a str>,
}

impl RequestView<'_> {
    /// The path without its query string (what uri matches see, as in Envoy).
    pub fn path(&self) -> &str {
        self.path_and_query
            .split_once('?')
            .map_or(self.path_and_query, |(p, _)| p)
    }

    /// The query string's parameters, `+` and percent-decoding left alone (Envoy compares the
    /// raw value too).
    pub fn query_param(&self, name: &str) -> Option<&str> {
        let (_, q) = self.path_and_query.split_once('?')?;
        q.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == name).then_some(v)
        })
    }
}

/// A compiled `StringMatch`.
#[derive(Clone, Debug)]
pub enum StringMatcher {
    Exact(String),
    Prefix(String),
    /// Gateway API `PathPrefix`: whole segments (`/foo` matches `/foo` and `/foo/bar`, not
    /// `/foobar`); held without its trailing `/`.
    PathPrefix(String),
    /// Anchored at both ends: the whole value must match (Envoy's `safe_regex`).
    Regex(Regex),
}

impl StringMatcher {
    /// Compiles a regex so that it must match the whole value.
    pub fn regex(pattern: &str) -> Result<Self, regex::Error> {
        regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
            .size_limit(1 << 20)
            .build()
            .map(Self::Regex)
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            Self::Exact(e) => value == e,
            Self::Prefix(p) => value.starts_with(p.as_str()),
            Self::PathPrefix(p) => {
                value.starts_with(p.as_str())
                    && (value.len() == p.len() || value.as_bytes()[p.len()] == b'/')
            }
            Self::Regex(r) => r.is_match(value),
        }
    }

    /// `ignoreUriCase`: exact and prefix compare without ASCII case; a regex is unchanged.
    pub fn matches_ignoring_case(&self, value: &str) -> bool {
        match self {
            Self::Exact(e) => value.eq_ignore_ascii_case(e),
            Self::Prefix(p) => value
                .get(..p.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(p)),
            Self::PathPrefix(_) | Self::Regex(_) => self.matches(value),
        }
    }
}

/// A header or query parameter condition: present at all, or with a matching value.
#[derive(Clone, Debug)]
pub enum ValueMatcher {
    Present,
    Value(StringMatcher),
}

impl ValueMatcher {
    fn matches(&self, value: Option<&str>) -> bool {
        match (self, value) {
            (_, None) => false,
            (Self::Present, Some(_)) => true,
            (Self::Value(m), Some(v)) => m.matches(v),
        }
    }
}

/// One compiled `match[]` entry: every condition must hold.
#[derive(Clone, Debug)]
pub struct RequestMatch {
    pub uri: Option<StringMatcher>,
    pub ignore_uri_case: bool,
    pub scheme: Option<StringMatcher>,
    pub method: Option<StringMatcher>,
    pub authority: Option<StringMatcher>,
    /// Lower-case names.
    pub headers: Vec<(String, ValueMatcher)>,
    /// Holds when the header does not match: for a presence condition, when it is absent; for
    /// a value, when the value (an absent header reads as empty) does not match (Envoy's
    /// `invert_match` with `treat_missing_header_as_empty`).
    pub without_headers: Vec<(String, ValueMatcher)>,
    pub query_params: Vec<(String, ValueMatcher)>,
    pub port: Option<u16>,
    pub source_labels: BTreeMap<String, String>,
    pub source_namespace: Option<String>,
    /// `false` when the entry names only gateways (never matches mesh traffic).
    pub for_mesh: bool,
}

impl RequestMatch {
    pub fn matches(&self, r: &RequestView<'_>) -> bool {
        if !self.for_mesh {
            return false;
        }
        if let Some(uri) = &self.uri {
            let path = r.path();
            let ok = if self.ignore_uri_case {
                uri.matches_ignoring_case(path)
            } else {
                uri.matches(path)
            };
            if !ok {
                return false;
            }
        }
        let pseudo = [
            (&self.scheme, r.scheme),
            (&self.method, r.method),
            (&self.authority, r.authority),
        ];
        if pseudo
            .iter()
            .any(|(m, v)| m.as_ref().is_some_and(|m| !m.matches(v)))
        {
            return false;
        }
        if self.port.is_some_and(|p| p != r.port) {
            return false;
        }
        let header = |name: &str| header_value(r.headers, name);
        if !self
            .headers
            .iter()
            .all(|(n, m)| m.matches(header(n).as_deref()))
        {
            return false;
        }
        if self.without_headers.iter().any(|(n, m)| match m {
            ValueMatcher::Present => header(n).is_some(),
            ValueMatcher::Value(v) => v.matches(header(n).as_deref().unwrap_or("")),
        }) {
            return false;
        }
        if !self
            .query_params
            .iter()
            .all(|(n, m)| m.matches(r.query_param(n)))
        {
            return false;
        }
        if !self.source_labels.is_empty() {
            let Some(labels) = r.source_labels else {
                return false;
            };
            if !self.source_labels.iter().all(|(k, v)| labels.has(k, v)) {
                return false;
            }
        }
        if let Some(ns) = &self.source_namespace
            && r.source_namespace != Some(ns.as_str())
        {
            return false;
        }
        true
    }
}

/// A header's value as one string: repeated headers joined with `,` as Envoy's matcher sees
/// them; a value that is not text matches only presence.
fn header_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<Cow<'a, str>> {
    let text = |v: &'a http::HeaderValue| v.to_str().unwrap_or("");
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    match values.next() {
        None => Some(Cow::Borrowed(text(first))),
        Some(second) => {
            let mut joined = format!("{},{}", text(first), text(second));
            for v in values {
                joined.push(',');
                joined.push_str(text(v));
            }
            Some(Cow::Owned(joined))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view<'a>(path: &'a str, headers: &'a HeaderMap) -> RequestView<'a> {
        RequestView {
            method: "GET",
            scheme: "http",
            path_and_query: path,
            authority: "reviews:9080",
            headers,
            port: 9080,
            source_labels: None,
            source_namespace: None,
        }
    }

    #[test]
    fn regexes_match_the_whole_value() {
        let m = StringMatcher::regex("/v[0-9]+").unwrap();
        assert!(m.matches("/v12"));
        assert!(!m.matches("/v12/x"));
        assert!(!m.matches("x/v12"));
        let alt = StringMatcher::regex("a|b").unwrap();
        assert!(!alt.matches("ab"), "alternation stays inside the anchors");
    }

    #[test]
    fn the_query_string_is_not_part_of_the_path() {
        let h = HeaderMap::new();
        let r = view("/ratings?user=jason&x", &h);
        assert_eq!(r.path(), "/ratings");
        assert_eq!(r.query_param("user"), Some("jason"));
        assert_eq!(r.query_param("x"), Some(""));
        assert_eq!(r.query_param("y"), None);
    }

    #[test]
    fn ignoring_case_does_not_panic_inside_a_multibyte_character() {
        let m = StringMatcher::Prefix("/ab".into());
        assert!(!m.matches_ignoring_case("/é"));
        assert!(m.matches_ignoring_case("/AB/c"));
    }
}
