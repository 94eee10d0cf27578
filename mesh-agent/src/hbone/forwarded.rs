//! The `forwarded` header of a CONNECT (RFC 7239) as ztunnel writes it:
//! `for="<client ip:port>"`, plus `;host=<service hostname>` when the client addressed a
//! service (ztunnel's inbound reads `host` to pick `destination_service` for its telemetry). We
//! read it tolerantly: parameters in any order, names in any case, values quoted or not; only the
//! first element (the hop closest to the client) counts. A value that is not a plausible
//! address or hostname is ignored rather than trusted into a metric label.
use std::net::SocketAddr;

/// What the server uses from `forwarded`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Forwarded {
    /// `for=`: the client's address.
    pub for_addr: Option<SocketAddr>,
    /// `host=`: the service hostname the client addressed.
    pub host: Option<String>,
}

/// Longest hostname taken (DNS names are at most 253 characters).
const MAX_HOST: usize = 253;

/// Parses the first element of a `forwarded` value; unknown or malformed parameters are skipped.
pub fn parse(value: &str) -> Forwarded {
    let mut out = Forwarded::default();
    for (name, v) in first_element(value) {
        if name.eq_ignore_ascii_case("for") && out.for_addr.is_none() {
            out.for_addr = v.parse::<SocketAddr>().ok();
        } else if name.eq_ignore_ascii_case("host") && out.host.is_none() {
            out.host = Some(v).filter(|h| is_hostname(h));
        }
    }
    out
}

/// Reads `forwarded` from request headers.
pub fn from_headers(headers: &http::HeaderMap) -> Forwarded {
    headers
        .get(http::header::FORWARDED)
        .and_then(|v| v.to_str().ok())
        .map(parse)
        .unwrap_or_default()
}

/// The value ztunnel's client sends: `for="<client>"` and, for service traffic, `;host=<host>`
/// (left out unless it is a hostname, so the value is always a valid header).
pub fn header_value(client: SocketAddr, host: Option<&str>) -> String {
    match host.filter(|h| is_hostname(h)) {
        Some(h) => format!("for=\"{client}\";host={h}"),
        None => format!("for=\"{client}\""),
    }
}

/// `name=value` pairs of the first element, values unquoted (a `,` or `;` inside quotes is part
/// of the value).
fn first_element(value: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let (mut cur, mut quoted, mut escaped) = (String::new(), false, false);
    let mut push = |cur: &mut String| {
        if let Some((n, v)) = cur.split_once('=') {
            pairs.push((n.trim().to_owned(), unquote(v.trim())));
        }
        cur.clear();
    };
    for c in value.chars() {
        match c {
            _ if escaped => {
                cur.push(c);
                escaped = false;
            }
            '\\' if quoted => {
                cur.push(c);
                escaped = true;
            }
            '"' => {
                cur.push(c);
                quoted = !quoted;
            }
            ';' if !quoted => push(&mut cur),
            ',' if !quoted => break,
            _ => cur.push(c),
        }
    }
    push(&mut cur);
    pairs
}

fn unquote(v: &str) -> String {
    match v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        Some(inner) => {
            let mut out = String::with_capacity(inner.len());
            let mut escaped = false;
            for c in inner.chars() {
                if !escaped && c == '\\' {
                    escaped = true;
                    continue;
                }
                escaped = false;
                out.push(c);
            }
            out
        }
        None => v.to_owned(),
    }
}

/// A DNS name (optionally with `:port`): letters, digits, `-`, `.`, `_`.
fn is_hostname(h: &str) -> bool {
    let name = match h.rsplit_once(':') {
        // Digits only: `u16::from_str` also takes a leading `+` (found by the fuzzer).
        Some((n, port))
            if port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u16>().is_ok() =>
        {
            n
        }
        _ => h,
    };
    !name.is_empty()
        && name.len() <= MAX_HOST
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SVC: &str = "b.default.svc.cluster.local";

    #[test]
    fn reads_for_and_host_in_any_order_quoted_or_not() {
        let client: SocketAddr = "10.0.0.1:4242".parse().unwrap();
        for v in [
            "for=\"10.0.0.1:4242\";host=b.default.svc.cluster.local",
            "host=b.default.svc.cluster.local;for=\"10.0.0.1:4242\"",
            "Host=\"b.default.svc.cluster.local\"; For=\"10.0.0.1:4242\"",
            " for = \"10.0.0.1:4242\" ; host = b.default.svc.cluster.local ",
            "for=\"10.0.0.1:4242\";proto=http;host=b.default.svc.cluster.local;by=x",
            "for=\"10.0.0.1:4242\";host=b.default.svc.cluster.local, for=\"10.9.9.9:1\";host=evil",
        ] {
            let f = parse(v);
            assert_eq!(f.for_addr, Some(client), "{v}");
            assert_eq!(f.host.as_deref(), Some(SVC), "{v}");
        }
    }

    #[test]
    fn ipv6_and_ports() {
        let f = parse("for=\"[fd00::1]:80\";host=\"b.default.svc.cluster.local:8080\"");
        assert_eq!(f.for_addr, Some("[fd00::1]:80".parse().unwrap()));
        assert_eq!(f.host.as_deref(), Some("b.default.svc.cluster.local:8080"));
    }

    #[test]
    fn what_it_does_not_trust() {
        // No port, garbage, a host that is not a DNS name, an unterminated quote.
        assert_eq!(parse("for=10.0.0.1").for_addr, None);
        assert_eq!(parse("for=junk"), Forwarded::default());
        assert_eq!(parse("host=\"a b\"").host, None);
        assert_eq!(
            parse("host=\"a;b=c\"").host,
            None,
            "quoted ; stays in the value"
        );
        assert_eq!(parse("host=x{}").host, None);
        assert_eq!(parse("host=a.b:+2").host, None, "a port is digits only");
        assert_eq!(parse("host=a.b:70000").host, None);
        assert_eq!(parse(&format!("host={}", "a".repeat(300))).host, None);
        assert_eq!(parse("for=\"10.0.0.1:1;host=x").host, None);
        assert_eq!(parse(""), Forwarded::default());
        // Only the first of repeated parameters.
        assert_eq!(parse("host=a.b;host=c.d").host.as_deref(), Some("a.b"));
    }

    #[test]
    fn what_the_client_writes_reads_back() {
        let client: SocketAddr = "[fd00::7]:5555".parse().unwrap();
        assert_eq!(
            parse(&header_value(client, Some(SVC))),
            Forwarded {
                for_addr: Some(client),
                host: Some(SVC.into())
            }
        );
        assert_eq!(
            parse(&header_value(client, Some("bad\nvalue"))),
            parse(&header_value(client, None)),
            "not a hostname: left out"
        );
        assert_eq!(
            parse(&header_value(client, None)),
            Forwarded {
                for_addr: Some(client),
                host: None
            }
        );
    }
}
