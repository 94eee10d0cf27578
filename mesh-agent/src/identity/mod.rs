//! Workload identity: SPIFFE IDs, the certificate authority that signs them (a local one from
//! files in local mode; the Kubernetes issue adds the gRPC CA client behind the same
//! [`CertificateIssuer`] trait), and the per-service-account certificate cache with rotation.

pub mod ca;
pub mod issuer;
pub mod manager;
pub mod spiffe;

pub use ca::LocalCa;
pub use issuer::{CertificateIssuer, LocalIssuer};
pub use manager::{CertManager, WorkloadCert};
pub use spiffe::{DEFAULT_TRUST_DOMAIN, SpiffeId};

/// Why an identity operation failed.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("bad SPIFFE ID: {0}")]
    BadSpiffeId(String),
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {message}")]
    BadCertificate { what: String, message: String },
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("the CA refused to sign {identity}: {reason}")]
    Refused { identity: String, reason: String },
}
