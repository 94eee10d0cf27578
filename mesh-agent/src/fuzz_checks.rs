//! The invariants the fuzz targets check, one function per target, so that the coverage-guided
//! cargo-fuzz targets (`mesh-agent/fuzz`, `cargo xtask fuzz`) and the short unguided run in the
//! test suite (`tests/fuzz_smoke.rs`, on every CI run) check the same thing. Each panics when
//! an invariant breaks; anything else (errors, refusals) is the expected answer to bad input.
use std::net::SocketAddr;

use base64::Engine as _;
use http::{Method, Uri};

use prometheus_client::{
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

use crate::{
    ca::csr,
    discovery::LocalConfig,
    hbone::{forwarded, server::connect_target},
    identity::SpiffeId,
    l7::route::RouteTable,
    metrics::{PeerInfo, Reporter, SecurityPolicy, ServiceInfo, TrafficLabels},
    node::state::MeshState,
};

/// What a peer controls in a CONNECT: its `:authority` (first line) and its `forwarded`
/// header (the rest). No panic; an accepted target is an `ip:port` in canonical form that
/// reads back the same; a `host=` taken is a plausible hostname; what our client writes reads
/// back unchanged.
pub fn hbone_connect(data: &[u8]) {
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
}

/// The local configuration file and every object compiler behind it (workloads, services,
/// namespaces, the `policies:` list with Istio's security and routing kinds and Gateway API
/// routes). No panic; an accepted file builds the data path's state, its policies and routes.
pub fn config_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = LocalConfig::parse(text) else {
        return;
    };
    let _ = config.compile_policies();
    let _ = MeshState::from_config(&config);
    let _ = RouteTable::build(&config.policies);
}

/// The CA's check of a certificate signing request, which any pod with a token can send: as
/// raw text and, so that the DER parser is reached, as its bytes wrapped in PEM. No panic; a
/// CSR accepted for an identity carries that identity's URI and is refused for any other.
pub fn csr_check(data: &[u8]) {
    let wanted = SpiffeId::new("cluster.local", "default", "sleep").expect("a valid identity");
    let other = SpiffeId::new("cluster.local", "default", "sleeq").expect("a valid identity");
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = csr::check(text, &wanted);
    }
    let pem = format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        base64::engine::general_purpose::STANDARD.encode(data)
    );
    if csr::check(&pem, &wanted).is_ok() {
        let uri = wanted.uri();
        assert!(
            data.windows(uri.len()).any(|w| w == uri.as_bytes()),
            "accepted a CSR that does not carry {uri}"
        );
        assert!(
            csr::check(&pem, &other).is_err(),
            "one CSR accepted for two identities"
        );
    }
}

/// Istio's TCP metric labels with values from anywhere (configuration, certificates, requests),
/// separated by NUL: workload, namespace, principal, canonical service, the service's hostname
/// and name. The exposition the agent serves stays parseable, with one sample whose label
/// values read back as given.
pub fn metric_labels(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut parts = text.split('\0').map(str::to_owned);
    let mut next = || parts.next();
    let source = PeerInfo {
        workload: next(),
        namespace: next(),
        principal: next(),
        canonical_service: next(),
        ..PeerInfo::default()
    };
    let service = match (next(), next()) {
        (Some(hostname), Some(name)) => Some(ServiceInfo {
            name,
            namespace: "default".into(),
            hostname,
        }),
        _ => None,
    };
    let labels = TrafficLabels::new(
        Reporter::destination,
        &source,
        &PeerInfo::default(),
        service.as_ref(),
        SecurityPolicy::mutual_tls,
    );
    let family = Family::<TrafficLabels, Counter>::default();
    family.get_or_create(&labels).inc();
    let mut registry = Registry::default();
    registry.register("fuzz", "label escaping", family);
    let mut exposition = String::new();
    prometheus_client::encoding::text::encode(&mut exposition, &registry).expect("encodes");
    let samples: Vec<&str> = exposition.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(samples.len(), 1, "{exposition:?}");
    let read = exposition_labels(samples[0]).unwrap_or_else(|| panic!("{:?}", samples[0]));
    let get = |k: &str| {
        read.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    let unknown = |v: &Option<String>| v.clone().unwrap_or_else(|| "unknown".into());
    assert_eq!(get("source_workload"), Some(&*unknown(&source.workload)));
    assert_eq!(
        get("source_workload_namespace"),
        Some(&*unknown(&source.namespace))
    );
    assert_eq!(get("source_principal"), Some(&*unknown(&source.principal)));
    assert_eq!(
        get("source_canonical_service"),
        Some(&*unknown(&source.canonical_service))
    );
    let (hostname, name) = service.map_or(("unknown".into(), "unknown".into()), |s| {
        (s.hostname, s.name)
    });
    assert_eq!(get("destination_service"), Some(hostname.as_str()));
    assert_eq!(get("destination_service_name"), Some(name.as_str()));
}

/// The label pairs of one sample line of the text exposition, unescaped; None if the line
/// does not parse (`name{key="value",...} number`).
fn exposition_labels(line: &str) -> Option<Vec<(String, String)>> {
    let (_, rest) = line.split_once('{')?;
    let mut chars = rest.chars();
    let mut out = Vec::new();
    loop {
        let mut key = String::new();
        for c in chars.by_ref() {
            if c == '=' {
                break;
            }
            key.push(c);
        }
        if chars.next()? != '"' || key.is_empty() {
            return None;
        }
        let mut value = String::new();
        loop {
            match chars.next()? {
                '"' => break,
                '\\' => match chars.next()? {
                    '\\' => value.push('\\'),
                    '"' => value.push('"'),
                    'n' => value.push('\n'),
                    _ => return None,
                },
                c => value.push(c),
            }
        }
        out.push((key, value));
        match chars.next()? {
            ',' => continue,
            '}' => break,
            _ => return None,
        }
    }
    let number = chars.as_str().trim();
    number.parse::<f64>().ok()?;
    Some(out)
}
