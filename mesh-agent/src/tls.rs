//! mTLS between workloads as ztunnel speaks it (DESIGN.md §5): TLS 1.3 only, AES-GCM suites, ALPN
//! `h2`, client certificates required, no SNI, no session resumption. The server accepts any client
//! that chains to the mesh roots and is in the trust domain (authorization reads the full identity
//! afterwards); the client accepts only the exact identity it expects for the destination.
use std::sync::Arc;

use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
    client::{
        ResolvesClientCert, Resumption,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        verify_server_cert_signed_by_trust_anchor,
    },
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms, verify_tls13_signature},
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{
        ClientHello, NoServerSessionStorage, ParsedCertificate, ResolvesServerCert,
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::CertifiedKey,
};

use crate::identity::SpiffeId;

/// ALPN of HBONE.
pub const ALPN_H2: &[u8] = b"h2";

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("mesh roots: {0}")]
    Roots(String),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// ring with only the AES-GCM TLS 1.3 suites (no ChaCha20, as ztunnel).
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.retain(|s| {
        matches!(
            s.suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
                | rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
        )
    });
    Arc::new(p)
}

fn root_store(roots: &[CertificateDer<'static>]) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for r in roots {
        store
            .add(r.clone())
            .map_err(|e| TlsError::Roots(e.to_string()))?;
    }
    if store.is_empty() {
        return Err(TlsError::Roots("no root certificate".into()));
    }
    Ok(store)
}

/// Server side of HBONE for one workload identity (the pod the client dialled).
pub fn server_config(
    cert: Arc<CertifiedKey>,
    roots: &[CertificateDer<'static>],
    trust_domain: &str,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let inner = WebPkiClientVerifier::builder_with_provider(
        Arc::new(root_store(roots)?),
        Arc::clone(&provider),
    )
    .build()
    .map_err(|e| TlsError::Roots(e.to_string()))?;
    let verifier = Arc::new(TrustDomainClientVerifier {
        inner,
        trust_domain: trust_domain.to_owned(),
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(Fixed(cert)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Client side of HBONE: our workload's certificate, and the one identity we accept.
pub fn client_config(
    cert: Arc<CertifiedKey>,
    roots: &[CertificateDer<'static>],
    expected: SpiffeId,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = Arc::new(ExpectedIdentityVerifier {
        roots: root_store(roots)?,
        algs: provider.signature_verification_algorithms,
        expected,
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(Fixed(cert)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// The name rustls wants for a connection; never sent (SNI is off).
pub fn server_name(ip: std::net::IpAddr) -> ServerName<'static> {
    ServerName::IpAddress(ip.into())
}

/// The identity in a peer's leaf certificate: its only URI SAN, parsed as SPIFFE.
pub fn identity_of(leaf: &CertificateDer<'_>) -> Option<SpiffeId> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let uri = uris.next()?;
    if uris.next().is_some() {
        return None;
    }
    SpiffeId::parse(uri).ok()
}

/// The peer's identity as a handshake error when it has none (`who`: "client" / "server").
fn spiffe_of(end_entity: &CertificateDer<'_>, who: &str) -> Result<SpiffeId, rustls::Error> {
    identity_of(end_entity).ok_or_else(|| {
        rustls::Error::General(format!("{who} certificate has no single SPIFFE URI SAN"))
    })
}

#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

impl ResolvesClientCert for Fixed {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// WebPKI chain validation plus: the client's SPIFFE ID is in our trust domain.
#[derive(Debug)]
struct TrustDomainClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for TrustDomainClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let id = spiffe_of(end_entity, "client")?;
        if id.trust_domain != self.trust_domain {
            return Err(rustls::Error::General(format!(
                "client identity {id} is not in trust domain {}",
                self.trust_domain
            )));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Chain to the mesh roots, and exactly the expected SPIFFE ID (no DNS names: no SNI).
#[derive(Debug)]
struct ExpectedIdentityVerifier {
    roots: RootCertStore,
    algs: WebPkiSupportedAlgorithms,
    expected: SpiffeId,
}

impl ServerCertVerifier for ExpectedIdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        let id = spiffe_of(end_entity, "server")?;
        if id != self.expected {
            return Err(rustls::Error::General(format!(
                "server identity {id} is not the expected {}",
                self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not allowed".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rcgen::{CertificateParams, Issuer, KeyPair, SanType};
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::identity::LocalCa;

    struct Ca {
        issuer: Issuer<'static, KeyPair>,
        root: CertificateDer<'static>,
    }

    fn ca(name: &str) -> Ca {
        let dir = std::env::temp_dir().join(format!("mesh-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        LocalCa::init_dir(&dir, "cluster.local", Duration::from_secs(3600)).unwrap();
        let pem = std::fs::read_to_string(dir.join("ca-cert.pem")).unwrap();
        let key =
            KeyPair::from_pem(&std::fs::read_to_string(dir.join("ca-key.pem")).unwrap()).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let root = CertificateDer::pem_slice_iter(pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        Ca {
            issuer: Issuer::from_ca_cert_pem(&pem, key).unwrap(),
            root,
        }
    }

    /// A leaf for `uri`, valid from `from` to `until` seconds relative to now.
    fn leaf(ca: &Ca, uri: &str, from: i64, until: i64) -> Arc<CertifiedKey> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
        p.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now + time::Duration::seconds(from);
        p.not_after = now + time::Duration::seconds(until);
        let cert = p.signed_by(&key, &ca.issuer).unwrap();
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signer = rustls::crypto::ring::sign::any_ecdsa_type(&der).unwrap();
        Arc::new(CertifiedKey::new(vec![cert.der().clone()], signer))
    }

    const A: &str = "spiffe://cluster.local/ns/default/sa/a";
    const B: &str = "spiffe://cluster.local/ns/default/sa/b";

    /// Handshakes client (cert, expecting `expect`) with server (cert), both trusting `root`.
    /// Returns the identity the server saw, or the error of whichever side failed.
    async fn handshake(
        root: &CertificateDer<'static>,
        client: Arc<CertifiedKey>,
        expect: &str,
        server: Arc<CertifiedKey>,
    ) -> Result<SpiffeId, String> {
        let roots = vec![root.clone()];
        let sc = server_config(server, &roots, "cluster.local").unwrap();
        let cc = client_config(client, &roots, SpiffeId::parse(expect).unwrap()).unwrap();
        let (c, s) = tokio::io::duplex(64 << 10);
        let srv = tokio::spawn(async move {
            let mut tls = tokio_rustls::TlsAcceptor::from(sc)
                .accept(s)
                .await
                .map_err(|e| format!("server: {e}"))?;
            let peer = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(identity_of);
            let mut b = [0u8; 4];
            tls.read_exact(&mut b)
                .await
                .map_err(|e| format!("server read: {e}"))?;
            Ok::<_, String>(peer.ok_or("no peer identity")?)
        });
        let conn = tokio_rustls::TlsConnector::from(cc)
            .connect(server_name("10.0.0.1".parse().unwrap()), c)
            .await;
        match conn {
            Ok(mut tls) => {
                assert_eq!(tls.get_ref().1.alpn_protocol(), Some(ALPN_H2));
                let _ = tls.write_all(b"ping").await;
                let _ = tls.flush().await;
                srv.await.unwrap()
            }
            Err(e) => {
                srv.abort();
                Err(format!("client: {e}"))
            }
        }
    }

    #[tokio::test]
    async fn mutual_tls_between_mesh_identities() {
        let ca = ca("ok");
        let got = handshake(&ca.root, leaf(&ca, A, -60, 600), B, leaf(&ca, B, -60, 600)).await;
        assert_eq!(got.unwrap(), SpiffeId::parse(A).unwrap());
    }

    #[tokio::test]
    async fn refuses_the_wrong_server_identity() {
        let ca = ca("wrong");
        let e = handshake(&ca.root, leaf(&ca, A, -60, 600), A, leaf(&ca, B, -60, 600))
            .await
            .unwrap_err();
        assert!(e.contains("not the expected"), "{e}");
    }

    #[tokio::test]
    async fn refuses_expired_and_foreign_client_certificates() {
        let ca = ca("refuse");
        let expired = handshake(
            &ca.root,
            leaf(&ca, A, -7200, -3600),
            B,
            leaf(&ca, B, -60, 600),
        )
        .await;
        assert!(expired.is_err(), "expired client cert accepted");
        let other = crate::tls::tests::ca("other");
        let foreign_ca = handshake(
            &ca.root,
            leaf(&other, A, -60, 600),
            B,
            leaf(&ca, B, -60, 600),
        )
        .await;
        assert!(foreign_ca.is_err(), "client from another CA accepted");
        let foreign_td = handshake(
            &ca.root,
            leaf(&ca, "spiffe://evil.domain/ns/default/sa/a", -60, 600),
            B,
            leaf(&ca, B, -60, 600),
        )
        .await;
        assert!(
            foreign_td.is_err(),
            "client from another trust domain accepted"
        );
        let not_spiffe = handshake(
            &ca.root,
            leaf(&ca, "https://example.com/a", -60, 600),
            B,
            leaf(&ca, B, -60, 600),
        )
        .await;
        assert!(not_spiffe.is_err());
    }

    #[test]
    fn only_aes_gcm_suites() {
        let names: Vec<_> = provider().cipher_suites.iter().map(|s| s.suite()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }
}
