//! The CA's check of a certificate signing request, which any pod with a token can send:
//! as raw text and, so the fuzzer reaches the DER parser, as its bytes wrapped in PEM.
//! Invariants: no panic; a CSR accepted for an identity carries that identity's URI and is
//! refused for any other identity.
#![no_main]

use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use mesh_agent::{ca::csr, identity::SpiffeId};

fuzz_target!(|data: &[u8]| {
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
});
