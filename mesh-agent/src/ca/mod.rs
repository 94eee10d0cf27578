//! `mesh-agent ca`: the mesh certificate authority for Kubernetes mode, speaking Istio's
//! `istio.v1.auth.IstioCertificateService/CreateCertificate` over TLS (port 15012), so node
//! agents (ours, and ztunnel-style clients) get workload certificates.
//!
//! Per request: authenticate the bearer token (TokenReview, audience `istio-ca`), decide the
//! identity (the caller's own, or `ImpersonatedIdentity` for the node agent, see [`auth`]),
//! check the CSR names exactly that identity ([`csr`]), sign with the root from
//! [`root`], return the chain leaf first.
pub mod auth;
pub mod client;
pub mod csr;
pub mod limits;
pub mod root;

/// The generated gRPC code.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("istio.v1.auth");
}

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use kube::Client;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::identity::{LocalCa, SpiffeId, ca::pem_encode};
use proto::{
    IstioCertificateRequest, IstioCertificateResponse,
    istio_certificate_service_server::{IstioCertificateService, IstioCertificateServiceServer},
};

/// The metadata key a node agent names the identity it asks for with (Istio's).
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// Settings of the CA service.
#[derive(Clone, Debug)]
pub struct CaSettings {
    pub listen: SocketAddr,
    pub trust_domain: String,
    /// The node agents' service account (namespace, name): the only caller that may ask for
    /// other identities.
    pub node_agent: (String, String),
    /// Longest workload certificate the CA signs (and the default).
    pub max_ttl: Duration,
    /// DNS names of the CA's own serving certificate.
    pub dns_names: Vec<String>,
    /// Bounds on the port (see [`limits`]).
    pub bounds: limits::CaBounds,
}

/// The service.
pub struct CaService {
    client: Client,
    ca: Arc<LocalCa>,
    settings: CaSettings,
    counters: Arc<limits::CaCounters>,
    registry: Arc<prometheus_client::registry::Registry>,
}

impl CaService {
    pub fn new(client: Client, ca: Arc<LocalCa>, settings: CaSettings) -> Self {
        let mut registry = prometheus_client::registry::Registry::default();
        let counters = limits::CaCounters::register(&mut registry);
        Self {
            client,
            ca,
            settings,
            counters,
            registry: Arc::new(registry),
        }
    }

    /// The port's refusal counters (tests, reports).
    pub fn counters(&self) -> Arc<limits::CaCounters> {
        Arc::clone(&self.counters)
    }

    /// The CA's metrics, for [`limits::serve_metrics`].
    pub fn registry(&self) -> Arc<prometheus_client::registry::Registry> {
        Arc::clone(&self.registry)
    }

    /// Serves until the process stops (TLS with a certificate for `settings.dns_names`).
    pub async fn serve(self) -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind(self.settings.listen)
            .await
            .with_context(|| format!("binding {}", self.settings.listen))?;
        self.serve_on(listener).await
    }

    /// Serves on `listener`.
    pub async fn serve_on(self, listener: tokio::net::TcpListener) -> anyhow::Result<()> {
        let (chain, key) = self
            .ca
            .sign_server(&self.settings.dns_names, Duration::from_secs(365 * 86_400))
            .context("issuing the CA's own serving certificate")?;
        let tls = server_tls(&chain, &key)?;
        let addr = listener.local_addr()?;
        info!(%addr, names = ?self.settings.dns_names, bounds = ?self.settings.bounds, "CA serving IstioCertificateService");
        let bounds = self.settings.bounds;
        let incoming = limits::admitted(listener, tls, bounds, Arc::clone(&self.counters));
        tonic::transport::Server::builder()
            .timeout(bounds.request_timeout)
            .concurrency_limit_per_connection(bounds.streams_per_connection as usize)
            .max_concurrent_streams(bounds.streams_per_connection)
            .max_connection_age(bounds.max_connection_age)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .http2_max_pending_accept_reset_streams(Some(32))
            .add_service(IstioCertificateServiceServer::new(self))
            .serve_with_incoming(incoming)
            .await
            .context("serving the CA")
    }

    async fn create(
        &self,
        token: &str,
        req: &IstioCertificateRequest,
    ) -> Result<Vec<String>, Status> {
        let caller = auth::authenticate(&self.client, token)
            .await
            .map_err(status)?;
        let requested = match impersonated(req) {
            Some(uri) => SpiffeId::parse(&uri)
                .map_err(|e| Status::invalid_argument(format!("{IMPERSONATED_IDENTITY}: {e}")))?,
            None => SpiffeId::new(
                &self.settings.trust_domain,
                &caller.namespace,
                &caller.service_account,
            )
            .map_err(|e| Status::invalid_argument(e.to_string()))?,
        };
        if requested.trust_domain != self.settings.trust_domain {
            return Err(Status::invalid_argument(format!(
                "{requested} is not in this mesh's trust domain {}",
                self.settings.trust_domain
            )));
        }
        auth::authorize(&self.client, &caller, &requested, &self.settings.node_agent)
            .await
            .map_err(status)?;
        csr::check(&req.csr, &requested).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let ttl = match u64::try_from(req.validity_duration) {
            Ok(0) | Err(_) => self.settings.max_ttl,
            Ok(s) => Duration::from_secs(s.max(60)).min(self.settings.max_ttl),
        };
        let chain = self
            .ca
            .sign_csr(&req.csr, &requested, ttl)
            .map_err(|e| Status::internal(format!("signing: {e}")))?;
        let mut pems: Vec<String> = chain.iter().map(pem_encode).collect();
        pems.extend(self.ca.roots().iter().map(pem_encode));
        info!(
            caller = %format!("{}/{}", caller.namespace, caller.service_account),
            identity = %requested, ttl_s = ttl.as_secs(), "certificate issued"
        );
        Ok(pems)
    }
}

/// The CA's serving TLS configuration (HTTP/2 only, as gRPC needs).
fn server_tls(chain_pem: &str, key_pem: &str) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("the CA's serving certificate")?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).context("the CA's serving key")?;
    let mut config = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the CA's serving certificate and key")?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The `ImpersonatedIdentity` string of the request's metadata, if any.
fn impersonated(req: &IstioCertificateRequest) -> Option<String> {
    let field = req.metadata.as_ref()?.fields.get(IMPERSONATED_IDENTITY)?;
    match &field.kind {
        Some(prost_types::value::Kind::StringValue(s)) if !s.is_empty() => Some(s.clone()),
        _ => None,
    }
}

fn status(r: auth::Refusal) -> Status {
    match r {
        auth::Refusal::Unauthenticated(m) => Status::unauthenticated(m),
        auth::Refusal::PermissionDenied(m) => Status::permission_denied(m),
        auth::Refusal::Unavailable(m) => Status::unavailable(m),
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("")
            .trim()
            .to_owned();
        let req = request.into_inner();
        match self.create(&token, &req).await {
            Ok(cert_chain) => Ok(Response::new(IstioCertificateResponse { cert_chain })),
            Err(s) => {
                warn!(code = ?s.code(), reason = s.message(), "certificate request refused");
                Err(s)
            }
        }
    }
}
