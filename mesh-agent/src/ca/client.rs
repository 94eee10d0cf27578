//! The node agent's side of the CA: a [`CertificateIssuer`] that asks `mesh-agent ca` (or any
//! Istio-compatible CA) over gRPC, authenticating with the agent's projected service-account
//! token and naming the workload identity in `ImpersonatedIdentity`.
use std::{path::PathBuf, time::Duration};

use rustls::pki_types::{CertificateDer, pem::PemObject};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use super::{
    IMPERSONATED_IDENTITY,
    proto::{
        IstioCertificateRequest, istio_certificate_service_client::IstioCertificateServiceClient,
    },
};
use crate::identity::{CertificateIssuer, IdentityError, SpiffeId, issuer::IssueFuture};

/// Asks the mesh CA.
pub struct GrpcIssuer {
    channel: Channel,
    token_file: PathBuf,
    roots: Vec<CertificateDer<'static>>,
    trust_domain: String,
}

impl GrpcIssuer {
    /// `address`: `https://host:port`; `root_pem`: the mesh root (the CA's ConfigMap), trusted
    /// for the CA's TLS and for peers; `token_file`: re-read for every request (kubelet rotates
    /// projected tokens).
    pub fn new(
        address: &str,
        root_pem: &str,
        token_file: PathBuf,
        trust_domain: &str,
    ) -> Result<Self, IdentityError> {
        let bad = |m: String| IdentityError::BadCertificate {
            what: format!("CA address {address}"),
            message: m,
        };
        let roots: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(root_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| IdentityError::BadCertificate {
                    what: "mesh root".into(),
                    message: e.to_string(),
                })?;
        if roots.is_empty() {
            return Err(IdentityError::BadCertificate {
                what: "mesh root".into(),
                message: "no PEM certificate in it".into(),
            });
        }
        let uri: http::Uri = address.parse().map_err(|e| bad(format!("{e}")))?;
        let host = uri.host().ok_or_else(|| bad("no host".into()))?.to_owned();
        let channel = Endpoint::from_shared(address.to_owned())
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(15))
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(root_pem))
                    .domain_name(host),
            )
            .map_err(|e| bad(e.to_string()))?
            .connect_lazy();
        Ok(Self {
            channel,
            token_file,
            roots,
            trust_domain: trust_domain.to_owned(),
        })
    }
}

impl CertificateIssuer for GrpcIssuer {
    fn sign<'a>(
        &'a self,
        csr_pem: &'a str,
        identity: &'a SpiffeId,
        ttl: Duration,
    ) -> IssueFuture<'a> {
        Box::pin(async move {
            let refused = |reason: String| IdentityError::Refused {
                identity: identity.uri(),
                reason,
            };
            let token = std::fs::read_to_string(&self.token_file).map_err(|source| {
                IdentityError::Read {
                    path: self.token_file.display().to_string(),
                    source,
                }
            })?;
            let metadata = prost_types::Struct {
                fields: [(
                    IMPERSONATED_IDENTITY.to_owned(),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::StringValue(identity.uri())),
                    },
                )]
                .into(),
            };
            let mut request = tonic::Request::new(IstioCertificateRequest {
                csr: csr_pem.to_owned(),
                validity_duration: ttl.as_secs() as i64,
                metadata: Some(metadata),
            });
            let bearer = format!("Bearer {}", token.trim()).parse().map_err(|_| {
                refused("the token file holds something that is not a token".into())
            })?;
            request.metadata_mut().insert("authorization", bearer);
            let response = IstioCertificateServiceClient::new(self.channel.clone())
                .create_certificate(request)
                .await
                .map_err(|s| refused(format!("{:?}: {}", s.code(), s.message())))?;
            let mut chain = Vec::new();
            for pem in &response.get_ref().cert_chain {
                for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                    chain.push(c.map_err(|e| refused(format!("bad PEM in the chain: {e}")))?);
                }
            }
            if chain.is_empty() {
                return Err(refused("the CA returned no certificate".into()));
            }
            Ok(chain)
        })
    }

    fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.roots.clone()
    }

    fn trust_domain(&self) -> String {
        self.trust_domain.clone()
    }
}
