//! Which protocol a service port speaks, decided as Istio decides it: the port's `appProtocol`,
//! then the prefix of its name (`http-web`, `grpc`, `tcp-db` ...), then, when neither says,
//! the first bytes of the connection (HTTP/1.x request line or the HTTP/2 preface; anything
//! else is opaque TCP).
use serde::{Deserialize, Serialize};

/// A port's protocol as far as L7 handling goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 (HTTP/2 with prior knowledge is recognised from the preface too).
    Http,
    /// HTTP/2 cleartext (h2c) with prior knowledge.
    Http2,
    /// gRPC over HTTP/2 (trailers carried through).
    Grpc,
    /// Opaque bytes: L4 rules and TCP metrics only.
    Tcp,
    /// TLS the application terminates itself: opaque to the waypoint.
    Tls,
}

impl Protocol {
    pub fn is_http(self) -> bool {
        matches!(self, Self::Http | Self::Http2 | Self::Grpc)
    }
}

/// The protocol a name designates (`appProtocol` values and port-name prefixes share Istio's
/// vocabulary); `None` for anything unknown, which leaves the choice to detection.
fn named(name: &str) -> Option<Protocol> {
    match name.to_ascii_lowercase().as_str() {
        "http" | "http1" | "kubernetes.io/ws" | "ws" => Some(Protocol::Http),
        "http2" | "h2c" | "kubernetes.io/h2c" => Some(Protocol::Http2),
        "grpc" | "grpc-web" => Some(Protocol::Grpc),
        "tcp" | "mongo" | "mysql" | "redis" => Some(Protocol::Tcp),
        "tls" | "https" | "kubernetes.io/wss" | "wss" => Some(Protocol::Tls),
        _ => None,
    }
}

/// The declared protocol of a port: `appProtocol` first, then the port name's prefix (the part
/// before the first `-`: `http-web` is HTTP, `web` says nothing).
pub fn declared(app_protocol: Option<&str>, port_name: Option<&str>) -> Option<Protocol> {
    if let Some(p) = app_protocol.and_then(named) {
        return Some(p);
    }
    let name = port_name?;
    let prefix = name.split_once('-').map_or(name, |(p, _)| p);
    named(prefix)
}

/// What the first bytes of a connection say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    Http1,
    /// The HTTP/2 client preface.
    Http2,
    /// Not HTTP: carry it as TCP.
    Opaque,
    /// Too few bytes to tell yet.
    NeedMore,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Methods an HTTP/1.x request line may start with (RFC 9110 and WebDAV's common ones).
const METHODS: [&[u8]; 14] = [
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"CONNECT ",
    b"OPTIONS ",
    b"TRACE ",
    b"PATCH ",
    b"PROPFIND ",
    b"PROPPATCH ",
    b"MKCOL ",
    b"COPY ",
    b"MOVE ",
];

/// Sniffs the first bytes the client sent (server-first protocols send nothing: the caller
/// gives up waiting and treats them as [`Detected::Opaque`]).
pub fn detect(first: &[u8]) -> Detected {
    if first.is_empty() {
        return Detected::NeedMore;
    }
    let n = first.len().min(H2_PREFACE.len());
    if first[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Detected::Http2
        } else {
            Detected::NeedMore
        };
    }
    let mut could_be_method = false;
    for m in METHODS {
        let n = first.len().min(m.len());
        if first[..n] == m[..n] {
            if n == m.len() {
                return request_line(first);
            }
            could_be_method = true;
        }
    }
    if could_be_method {
        Detected::NeedMore
    } else {
        Detected::Opaque
    }
}

/// After a method: HTTP/1.x once the request line ends in ` HTTP/1.0` or ` HTTP/1.1`.
fn request_line(first: &[u8]) -> Detected {
    match first.windows(2).position(|w| w == b"\r\n") {
        Some(end) => {
            let line = &first[..end];
            if line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0") {
                Detected::Http1
            } else {
                Detected::Opaque
            }
        }
        // Request lines are short; a long run without CRLF is not HTTP.
        None if first.len() > 8192 => Detected::Opaque,
        None => Detected::NeedMore,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Istio's protocol selection: (appProtocol, port name) → declared protocol.
    #[test]
    fn declared_protocols_as_istio_reads_them() {
        let cases: &[(Option<&str>, Option<&str>, Option<Protocol>)] = &[
            (Some("http"), None, Some(Protocol::Http)),
            (Some("HTTP"), None, Some(Protocol::Http)),
            (Some("http2"), None, Some(Protocol::Http2)),
            (Some("kubernetes.io/h2c"), None, Some(Protocol::Http2)),
            (Some("grpc"), Some("tcp-x"), Some(Protocol::Grpc)),
            (Some("tcp"), Some("http"), Some(Protocol::Tcp)),
            (Some("https"), None, Some(Protocol::Tls)),
            (Some("kubernetes.io/ws"), None, Some(Protocol::Http)),
            // appProtocol wins over the name.
            (Some("http"), Some("tcp-db"), Some(Protocol::Http)),
            // Unknown appProtocol: the name decides.
            (
                Some("example.com/custom"),
                Some("grpc-api"),
                Some(Protocol::Grpc),
            ),
            (None, Some("http"), Some(Protocol::Http)),
            (None, Some("http-web"), Some(Protocol::Http)),
            (None, Some("http2-api"), Some(Protocol::Http2)),
            (None, Some("grpc-web"), Some(Protocol::Grpc)),
            (None, Some("tcp-db"), Some(Protocol::Tcp)),
            (None, Some("mongo"), Some(Protocol::Tcp)),
            (None, Some("tls-passthrough"), Some(Protocol::Tls)),
            // A name that is not a protocol prefix, or none: detect.
            (None, Some("web"), None),
            (None, Some("httpx"), None),
            (None, Some("webhttp"), None),
            (None, None, None),
        ];
        for (app, name, want) in cases {
            assert_eq!(
                declared(*app, *name),
                *want,
                "appProtocol {app:?}, name {name:?}"
            );
        }
    }

    #[test]
    fn detection_from_the_first_bytes() {
        assert_eq!(
            detect(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
            Detected::Http1
        );
        assert_eq!(detect(b"POST /x HTTP/1.0\r\n"), Detected::Http1);
        assert_eq!(detect(H2_PREFACE), Detected::Http2);
        assert_eq!(detect(&H2_PREFACE[..10]), Detected::NeedMore);
        assert_eq!(detect(b"GE"), Detected::NeedMore);
        assert_eq!(detect(b"GET /very/long"), Detected::NeedMore);
        assert_eq!(detect(b"GET / SPDY/3\r\n"), Detected::Opaque);
        assert_eq!(
            detect(b"\x16\x03\x01\x02\x00"),
            Detected::Opaque,
            "a TLS ClientHello"
        );
        assert_eq!(detect(b"SSH-2.0-OpenSSH\r\n"), Detected::Opaque);
        assert_eq!(detect(b""), Detected::NeedMore);
        let long = [b"GET /".as_slice(), &[b'a'; 9000]].concat();
        assert_eq!(detect(&long), Detected::Opaque);
    }
}
