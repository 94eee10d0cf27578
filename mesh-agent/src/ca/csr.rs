//! What a CSR may ask for: exactly one subject alternative name, the URI of the identity the
//! caller is entitled to. Anything else (DNS names, addresses, e-mail, a second URI, another
//! trust domain) is refused: the CA never signs a name nobody checked.
use x509_parser::{
    certification_request::X509CertificationRequest,
    extensions::{GeneralName, ParsedExtension},
    prelude::FromDer,
};

use crate::identity::SpiffeId;

/// Why a CSR was refused (the message goes back to the caller).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CsrError {
    #[error("the CSR is not PEM: {0}")]
    NotPem(String),
    #[error("the CSR does not parse: {0}")]
    Parse(String),
    #[error("the CSR's signature does not verify (is it signed by its own key?)")]
    Signature,
    #[error("the CSR asks for {0}: only the URI SAN of the requested identity is allowed")]
    ExtraName(String),
    #[error("the CSR names {found}, not the requested identity {wanted}")]
    OtherIdentity { found: String, wanted: String },
    #[error("the CSR names no identity (a URI SAN {0} is required)")]
    NoIdentity(String),
}

/// Checks `pem` for `wanted`.
pub fn check(pem: &str, wanted: &SpiffeId) -> Result<(), CsrError> {
    let der = rustls::pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
        .map(|d: rustls::pki_types::CertificateSigningRequestDer<'static>| d.as_ref().to_vec())
        .map_err(|e| CsrError::NotPem(e.to_string()))?;
    let (_, csr) =
        X509CertificationRequest::from_der(&der).map_err(|e| CsrError::Parse(e.to_string()))?;
    csr.verify_signature().map_err(|_| CsrError::Signature)?;
    let wanted_uri = wanted.uri();
    let mut uris = Vec::new();
    for ext in csr.requested_extensions().into_iter().flatten() {
        let ParsedExtension::SubjectAlternativeName(san) = ext else {
            continue;
        };
        for name in &san.general_names {
            match name {
                GeneralName::URI(u) => uris.push((*u).to_owned()),
                other => return Err(CsrError::ExtraName(format!("{other}"))),
            }
        }
    }
    match uris.as_slice() {
        [] => Err(CsrError::NoIdentity(wanted_uri)),
        [one] if *one == wanted_uri => Ok(()),
        [one] => Err(CsrError::OtherIdentity {
            found: one.clone(),
            wanted: wanted_uri,
        }),
        [_, second, ..] => Err(CsrError::ExtraName(format!("a second URI {second}"))),
    }
}

/// A CSR for `sans` (the node agent's, and tests'): a fresh P-256 key and its PEM CSR.
pub fn make(sans: Vec<rcgen::SanType>) -> Result<(rcgen::KeyPair, String), rcgen::Error> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.subject_alt_names = sans;
    let pem = params.serialize_request(&key)?.pem()?;
    Ok((key, pem))
}

#[cfg(test)]
mod tests {
    use rcgen::SanType;

    use super::*;

    fn id(ns: &str, sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", ns, sa).unwrap()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    #[test]
    fn only_the_requested_identity_is_accepted() {
        let wanted = id("demo", "web");
        let (_, ok) = make(vec![uri("spiffe://cluster.local/ns/demo/sa/web")]).unwrap();
        assert_eq!(check(&ok, &wanted), Ok(()));
        let (_, none) = make(vec![]).unwrap();
        assert!(matches!(
            check(&none, &wanted),
            Err(CsrError::NoIdentity(_))
        ));
        let (_, dns) = make(vec![
            uri("spiffe://cluster.local/ns/demo/sa/web"),
            SanType::DnsName("web.demo.svc".try_into().unwrap()),
        ])
        .unwrap();
        assert!(matches!(check(&dns, &wanted), Err(CsrError::ExtraName(_))));
        let (_, two) = make(vec![
            uri("spiffe://cluster.local/ns/demo/sa/web"),
            uri("spiffe://cluster.local/ns/kube-system/sa/admin"),
        ])
        .unwrap();
        assert!(matches!(check(&two, &wanted), Err(CsrError::ExtraName(_))));
        let (_, foreign) = make(vec![uri("spiffe://evil.example/ns/demo/sa/web")]).unwrap();
        assert!(matches!(
            check(&foreign, &wanted),
            Err(CsrError::OtherIdentity { .. })
        ));
        assert!(matches!(
            check("garbage", &wanted),
            Err(CsrError::NotPem(_))
        ));
    }
}
