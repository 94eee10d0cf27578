//! The local-mode certificate authority: a root (or intermediate, Istio `cacerts` style) key and
//! certificate read from files, signing workload CSRs. `mesh-agent ca init` creates a fresh root.
use std::{path::Path, time::Duration};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, pem::PemObject};
use time::OffsetDateTime;

use super::{IdentityError, SpiffeId};

/// File names of a CA directory (Istio's `cacerts` Secret uses the same names).
pub const CA_CERT_FILE: &str = "ca-cert.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
pub const CERT_CHAIN_FILE: &str = "cert-chain.pem";

/// Clock skew tolerated on freshly issued certificates.
const BACKDATE: Duration = Duration::from_secs(60);

/// A signing CA.
pub struct LocalCa {
    issuer: Issuer<'static, KeyPair>,
    /// Certificates between the signing certificate and the root, signing certificate first
    /// (empty when the signing certificate is the root).
    chain: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
    trust_domain: String,
}

impl LocalCa {
    /// Reads `dir/ca-cert.pem` + `dir/ca-key.pem`, and `dir/root-cert.pem` (defaults to the CA
    /// certificate) + `dir/cert-chain.pem` (defaults to the CA certificate when it is not the
    /// root) — the layout of `mesh-agent ca init` and of Istio's `cacerts`.
    pub fn from_dir(dir: &Path, trust_domain: &str) -> Result<Self, IdentityError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| IdentityError::Read {
                path: path.display().to_string(),
                source,
            })
        };
        let ca_cert = read(CA_CERT_FILE)?;
        let ca_key = read(CA_KEY_FILE)?;
        let root = match read(ROOT_CERT_FILE) {
            Ok(r) => r,
            Err(IdentityError::Read { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                ca_cert.clone()
            }
            Err(e) => return Err(e),
        };
        let chain = match read(CERT_CHAIN_FILE) {
            Ok(c) => Some(c),
            Err(IdentityError::Read { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                None
            }
            Err(e) => return Err(e),
        };
        Self::from_pem(&ca_cert, &ca_key, &root, chain.as_deref(), trust_domain)
    }

    /// See [`LocalCa::from_dir`].
    pub fn from_pem(
        ca_cert: &str,
        ca_key: &str,
        root: &str,
        chain: Option<&str>,
        trust_domain: &str,
    ) -> Result<Self, IdentityError> {
        let bad = |what: &str, e: &dyn std::fmt::Display| IdentityError::BadCertificate {
            what: what.to_owned(),
            message: e.to_string(),
        };
        let key = KeyPair::from_pem(ca_key).map_err(|e| bad(CA_KEY_FILE, &e))?;
        let issuer = Issuer::from_ca_cert_pem(ca_cert, key).map_err(|e| bad(CA_CERT_FILE, &e))?;
        let roots = pem_certs(root, ROOT_CERT_FILE)?;
        let ca_der = pem_certs(ca_cert, CA_CERT_FILE)?;
        let chain = match chain {
            Some(c) => pem_certs(c, CERT_CHAIN_FILE)?,
            None if ca_der.first() == roots.first() => Vec::new(),
            None => ca_der,
        };
        Ok(Self {
            issuer,
            chain,
            roots,
            trust_domain: trust_domain.to_owned(),
        })
    }

    /// Creates a fresh self-signed ECDSA P-256 root, valid `validity`, and writes it to `dir` as
    /// `ca-cert.pem`, `ca-key.pem` (mode 0600) and `root-cert.pem`. Refuses to overwrite.
    pub fn init_dir(
        dir: &Path,
        trust_domain: &str,
        validity: Duration,
    ) -> Result<(), IdentityError> {
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| IdentityError::Read { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let (cert, key) = Self::generate_root(trust_domain, validity)?;
        for name in [CA_CERT_FILE, CA_KEY_FILE, ROOT_CERT_FILE] {
            let path = dir.join(name);
            if path.exists() {
                return Err(IdentityError::BadCertificate {
                    what: path.display().to_string(),
                    message: "already exists; not overwriting a CA".into(),
                });
            }
        }
        write_file(&dir.join(CA_KEY_FILE), &key, 0o600).map_err(io(&dir.join(CA_KEY_FILE)))?;
        write_file(&dir.join(CA_CERT_FILE), &cert, 0o644).map_err(io(&dir.join(CA_CERT_FILE)))?;
        write_file(&dir.join(ROOT_CERT_FILE), &cert, 0o644)
            .map_err(io(&dir.join(ROOT_CERT_FILE)))?;
        Ok(())
    }

    /// A fresh self-signed ECDSA P-256 root for `trust_domain`: (certificate PEM, key PEM).
    pub fn generate_root(
        trust_domain: &str,
        validity: Duration,
    ) -> Result<(String, String), IdentityError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        dn.push(DnType::CommonName, "mesh-agent root CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + validity;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// A TLS server certificate for the CA service itself (DNS names), signed by this CA:
    /// (chain PEM leaf first, key PEM).
    pub fn sign_server(
        &self,
        dns_names: &[String],
        ttl: Duration,
    ) -> Result<(String, String), IdentityError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(dns_names.to_vec())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "mesh-agent CA service");
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + ttl;
        params.serial_number = Some(random_serial());
        let leaf = params.signed_by(&key, &self.issuer)?;
        let mut chain = leaf.pem();
        for c in &self.chain {
            chain += &pem_encode(c);
        }
        Ok((chain, key.serialize_pem()))
    }

    /// The roots as PEM (published for agents).
    pub fn roots_pem(&self) -> String {
        self.roots.iter().map(pem_encode).collect()
    }

    /// The trust anchors workloads verify peers against.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Signs a CSR for `identity`, valid `ttl`. The CSR's own names are ignored: the certificate
    /// carries exactly one URI SAN, the identity the caller is entitled to (decided by the
    /// caller of this function). Returns the chain, leaf first.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        identity: &SpiffeId,
        ttl: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
        if identity.trust_domain != self.trust_domain {
            return Err(IdentityError::Refused {
                identity: identity.uri(),
                reason: format!("this CA signs only for trust domain {}", self.trust_domain),
            });
        }
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
            IdentityError::BadCertificate {
                what: "CSR".into(),
                message: e.to_string(),
            }
        })?;
        let params = &mut csr.params;
        params.subject_alt_names = vec![SanType::URI(identity.uri().try_into()?)];
        params.distinguished_name = DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + ttl;
        params.serial_number = Some(random_serial());
        let leaf = csr.signed_by(&self.issuer)?;
        let mut out = vec![leaf.der().clone()];
        out.extend(self.chain.iter().cloned());
        Ok(out)
    }
}

fn pem_certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| IdentityError::BadCertificate {
            what: what.to_owned(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(IdentityError::BadCertificate {
            what: what.to_owned(),
            message: "no PEM certificate in it".into(),
        });
    }
    Ok(certs)
}

/// One certificate as PEM.
pub fn pem_encode(der: &CertificateDer<'_>) -> String {
    pem::encode_config(
        &pem::Pem::new("CERTIFICATE", der.as_ref().to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // ring's system RNG (the crypto provider we already link).
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    bytes[0] &= 0x7f; // positive
    SerialNumber::from_slice(&bytes)
}

fn write_file(path: &Path, contents: &str, mode: u32) -> std::io::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    f.write_all(contents.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A temporary directory removed on drop, also when an assertion fails.
    struct Tmp(std::path::PathBuf);

    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    impl std::ops::Deref for Tmp {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    fn tmpdir(name: &str) -> Tmp {
        let d = std::env::temp_dir().join(format!("mesh-ca-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        Tmp(d)
    }

    fn csr() -> (KeyPair, String) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        // A CSR asking for names it must not get.
        let params = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
        let pem = params.serialize_request(&key).unwrap().pem().unwrap();
        (key, pem)
    }

    #[test]
    fn init_then_sign_gives_exactly_the_requested_identity() {
        let dir = tmpdir("init");
        LocalCa::init_dir(&dir, "cluster.local", Duration::from_secs(3600)).unwrap();
        assert!(
            LocalCa::init_dir(&dir, "cluster.local", Duration::from_secs(3600)).is_err(),
            "never overwrites"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let ca = LocalCa::from_dir(&dir, "cluster.local").unwrap();
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/sleep").unwrap();
        let (_key, csr) = csr();
        let chain = ca.sign_csr(&csr, &id, Duration::from_secs(600)).unwrap();
        assert_eq!(chain.len(), 1, "signed by the root: no intermediates");
        let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
        let sans: Vec<String> = leaf
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| format!("{n:?}"))
            .collect();
        assert_eq!(sans, vec![format!("URI({:?})", id.uri())]);
        assert!(!leaf.is_ca());
        let v = leaf.validity().time_to_expiration().unwrap();
        assert!(v <= time::Duration::seconds(600) && v > time::Duration::seconds(500));
        let other = SpiffeId::parse("spiffe://other.domain/ns/default/sa/sleep").unwrap();
        assert!(matches!(
            ca.sign_csr(&csr, &other, Duration::from_secs(60)),
            Err(IdentityError::Refused { .. })
        ));
    }

    #[test]
    fn istio_cacerts_layout_with_an_intermediate_chains_to_the_root() {
        let dir = tmpdir("cacerts");
        let root_dir = dir.join("root");
        LocalCa::init_dir(&root_dir, "cluster.local", Duration::from_secs(3600)).unwrap();
        let root_pem = std::fs::read_to_string(root_dir.join(CA_CERT_FILE)).unwrap();
        let root_key =
            KeyPair::from_pem(&std::fs::read_to_string(root_dir.join(CA_KEY_FILE)).unwrap())
                .unwrap();
        let root_issuer = Issuer::from_ca_cert_pem(&root_pem, root_key).unwrap();
        let int_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name
            .push(DnType::CommonName, "intermediate");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let int_cert = p.signed_by(&int_key, &root_issuer).unwrap();
        let ca = LocalCa::from_pem(
            &int_cert.pem(),
            &int_key.serialize_pem(),
            &root_pem,
            None,
            "cluster.local",
        )
        .unwrap();
        let id = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap();
        let chain = ca.sign_csr(&csr().1, &id, Duration::from_secs(60)).unwrap();
        assert_eq!(chain.len(), 2, "leaf + intermediate");
        assert_eq!(chain[1], *int_cert.der());
        assert_eq!(ca.roots().len(), 1);
    }

    #[test]
    fn unreadable_material_is_named() {
        let e = LocalCa::from_pem("junk", "junk", "junk", None, "cluster.local")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(CA_KEY_FILE), "{e}");
        let e = LocalCa::from_dir(Path::new("/nonexistent-ca-dir"), "td")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("/nonexistent-ca-dir/ca-cert.pem"), "{e}");
    }
}
