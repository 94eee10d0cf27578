//! Who signs workload certificates. Local mode signs in-process with [`LocalCa`]; the Kubernetes
//! issue adds the gRPC `IstioCertificateService` client behind the same trait.
use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use rustls::pki_types::CertificateDer;

use super::{IdentityError, LocalCa, SpiffeId};

/// A boxed future, so the trait stays object-safe.
pub type IssueFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<CertificateDer<'static>>, IdentityError>> + Send + 'a>>;

/// Signs CSRs for workload identities.
pub trait CertificateIssuer: Send + Sync {
    /// Signs `csr_pem` for `identity`, valid about `ttl`; returns the chain, leaf first.
    fn sign<'a>(
        &'a self,
        csr_pem: &'a str,
        identity: &'a SpiffeId,
        ttl: Duration,
    ) -> IssueFuture<'a>;

    /// The roots peers' certificates must chain to.
    fn roots(&self) -> Vec<CertificateDer<'static>>;

    /// The trust domain peers must be in.
    fn trust_domain(&self) -> String;
}

/// In-process signing by a [`LocalCa`].
pub struct LocalIssuer {
    ca: Arc<LocalCa>,
}

impl LocalIssuer {
    pub fn new(ca: Arc<LocalCa>) -> Self {
        Self { ca }
    }
}

impl CertificateIssuer for LocalIssuer {
    fn sign<'a>(
        &'a self,
        csr_pem: &'a str,
        identity: &'a SpiffeId,
        ttl: Duration,
    ) -> IssueFuture<'a> {
        Box::pin(async move { self.ca.sign_csr(csr_pem, identity, ttl) })
    }

    fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.ca.roots().to_vec()
    }

    fn trust_domain(&self) -> String {
        self.ca.trust_domain().to_owned()
    }
}
