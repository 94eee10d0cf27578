//! What a peer controls in a CONNECT: its `:authority` and its `forwarded` header. Invariants:
//! no panic; an accepted target is an `ip:port` in canonical form that reads back the same;
//! a `host=` taken is a plausible hostname; what our client writes reads back unchanged.
#![no_main]

use std::net::SocketAddr;

use http::{Method, Uri};
use libfuzzer_sys::fuzz_target;
use mesh_agent::hbone::{forwarded, server::connect_target};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (authority, header) = text.split_once('\n').unwrap_or((text, ""));
    if let Ok(uri) = authority.parse::<Uri>() {
        if let Some(dst) = connect_target(&Method::CONNECT, &uri) {
            assert_eq!(dst.ip(), dst.ip().to_canonical(), "{authority:?}");
            assert_eq!(dst.to_string().parse::<SocketAddr>().ok(), Some(dst));
        }
        assert_eq!(connect_target(&Method::GET, &uri), None);
    }
    let f = forwarded::parse(header);
    if let Some(host) = &f.host {
        // A DNS name (at most 253 characters), optionally with `:port`.
        assert!(!host.is_empty() && host.len() <= 253 + 6, "{host:?}");
        assert!(
            host.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':')),
            "{host:?}"
        );
    }
    if let Some(client) = f.for_addr {
        let written = forwarded::header_value(client, f.host.as_deref());
        assert!(http::HeaderValue::from_str(&written).is_ok(), "{written:?}");
        assert_eq!(forwarded::parse(&written), f, "{written:?}");
    }
});
