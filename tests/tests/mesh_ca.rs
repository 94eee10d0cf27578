//! The mesh CA (`mesh-agent ca serve`) over real gRPC and TLS, against an API server double for
//! TokenReview, pods, Secrets and ConfigMaps: who gets which certificate, who is refused with
//! which status, and where the root lives.
use std::{collections::BTreeMap, sync::Arc, time::Duration};

use rustls::client::danger::ServerCertVerifier as _;

use mesh_agent::{
    ca::{
        CaService, CaSettings, IMPERSONATED_IDENTITY,
        client::GrpcIssuer,
        csr,
        proto::{
            IstioCertificateRequest,
            istio_certificate_service_client::IstioCertificateServiceClient,
        },
        root::{self, RootObjects},
    },
    identity::{CertificateIssuer, SpiffeId},
};
use mesh_testbed::fakeapi::{FakeApi, TokenUser};
use rcgen::SanType;
use rustls::pki_types::{CertificateDer, pem::PemObject};
use serde_json::json;

const NS: &str = "mesh-system";

fn pod(ns: &str, name: &str, sa: &str, node: &str) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}")},
           "spec": {"nodeName": node, "serviceAccountName": sa, "containers": [{"name": "c", "image": "x"}]},
           "status": {"phase": "Running", "podIP": "10.244.1.9"}})
}

fn user(ns: &str, sa: &str, pod: Option<&str>, node: Option<&str>) -> TokenUser {
    let mut extra = BTreeMap::new();
    if let Some(p) = pod {
        extra.insert(
            "authentication.kubernetes.io/pod-name".into(),
            vec![p.to_owned()],
        );
        extra.insert(
            "authentication.kubernetes.io/pod-uid".into(),
            vec![format!("uid-{p}")],
        );
    }
    if let Some(n) = node {
        extra.insert(
            "authentication.kubernetes.io/node-name".into(),
            vec![n.to_owned()],
        );
    }
    TokenUser {
        username: format!("system:serviceaccount:{ns}:{sa}"),
        audiences: vec!["istio-ca".into()],
        extra,
    }
}

struct Rig {
    api: FakeApi,
    address: String,
    root_pem: String,
    dir: std::path::PathBuf,
    /// Where the CA listens, its refusal counters and its metrics endpoint.
    listen: std::net::SocketAddr,
    counters: Arc<mesh_agent::ca::limits::CaCounters>,
    metrics: std::net::SocketAddr,
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn client(api: &FakeApi) -> kube::Client {
    kube::Client::try_from(kube::Config::new(api.url().parse().unwrap())).unwrap()
}

/// The cluster: node agents on node-a and node-b, workloads `demo/web` on node-a and
/// `demo/db` on node-b, and an ordinary pod `demo/sleep` on node-a.
async fn rig() -> Rig {
    rig_with(Default::default()).await
}

async fn rig_with(bounds: mesh_agent::ca::limits::CaBounds) -> Rig {
    let api = FakeApi::start();
    for p in [
        pod(NS, "mesh-agent-a", "mesh-agent", "node-a"),
        pod(NS, "mesh-agent-b", "mesh-agent", "node-b"),
        pod("demo", "web-1", "web", "node-a"),
        pod("demo", "db-1", "db", "node-b"),
        pod("demo", "sleep-1", "sleep", "node-a"),
    ] {
        api.apply(p);
    }
    api.add_token(
        "agent-a",
        user(NS, "mesh-agent", Some("mesh-agent-a"), None),
    );
    api.add_token(
        "agent-b-with-node",
        user(NS, "mesh-agent", Some("mesh-agent-b"), Some("node-b")),
    );
    api.add_token("sleep", user("demo", "sleep", Some("sleep-1"), None));
    api.reject_token(
        "expired",
        "[invalid bearer token, service account token has expired]",
    );
    api.add_token(
        "wrong-audience",
        TokenUser {
            audiences: vec!["https://kubernetes.default.svc".into()],
            ..user(NS, "mesh-agent", Some("mesh-agent-a"), None)
        },
    );
    let kc = client(&api).await;
    let names = RootObjects::new(NS);
    let ca = root::load_or_create(
        &kc,
        &names,
        "cluster.local",
        Duration::from_secs(86_400 * 30),
    )
    .await
    .unwrap();
    root::publish(&kc, &names, &ca).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let service = CaService::new(
        kc,
        Arc::new(ca),
        CaSettings {
            listen: listener.local_addr().unwrap(),
            trust_domain: "cluster.local".into(),
            node_agent: (NS.into(), "mesh-agent".into()),
            max_ttl: Duration::from_secs(86_400),
            dns_names: vec!["localhost".into()],
            bounds,
        },
    );
    let listen = listener.local_addr().unwrap();
    let counters = service.counters();
    let metrics_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics = metrics_listener.local_addr().unwrap();
    tokio::spawn(mesh_agent::ca::limits::serve_metrics(
        metrics_listener,
        service.registry(),
    ));
    tokio::spawn(service.serve_on(listener));
    let root_pem =
        api.get("configmaps", NS, "istio-ca-root-cert").unwrap()["data"]["root-cert.pem"]
            .as_str()
            .unwrap()
            .to_owned();
    let dir = std::env::temp_dir().join(format!("mesh-ca-test-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    Rig {
        api,
        address: format!("https://localhost:{port}"),
        root_pem,
        dir,
        listen,
        counters,
        metrics,
    }
}

impl Rig {
    /// The node agent's issuer with `token`.
    fn issuer(&self, token: &str) -> GrpcIssuer {
        let file = self.dir.join(format!("token-{token}"));
        std::fs::write(&file, token).unwrap();
        GrpcIssuer::new(&self.address, &self.root_pem, file, "cluster.local").unwrap()
    }

    /// A raw request (any CSR, any metadata), for refusals the issuer would never produce.
    async fn raw(
        &self,
        token: &str,
        csr_pem: &str,
        impersonate: Option<&str>,
    ) -> Result<Vec<String>, tonic::Status> {
        let channel = tonic::transport::Endpoint::from_shared(self.address.clone())
            .unwrap()
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(&self.root_pem))
                    .domain_name("localhost"),
            )
            .unwrap()
            .connect()
            .await
            .unwrap();
        let metadata = impersonate.map(|id| prost_types::Struct {
            fields: [(
                IMPERSONATED_IDENTITY.to_owned(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(id.to_owned())),
                },
            )]
            .into(),
        });
        let mut req = tonic::Request::new(IstioCertificateRequest {
            csr: csr_pem.to_owned(),
            validity_duration: 3600,
            metadata,
        });
        req.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        IstioCertificateServiceClient::new(channel)
            .create_certificate(req)
            .await
            .map(|r| r.into_inner().cert_chain)
    }
}

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", ns, sa).unwrap()
}

fn csr_for(uri: &str) -> String {
    csr::make(vec![SanType::URI(uri.try_into().unwrap())])
        .unwrap()
        .1
}

/// The leaf's only URI SAN, after checking the chain verifies against `root_pem`.
fn verified_identity(chain: &[CertificateDer<'static>], root_pem: &str) -> String {
    let root = CertificateDer::pem_slice_iter(root_pem.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root).unwrap();
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap();
    // webpki checks the chain; the name check (DNS) is not ours: SPIFFE certs carry a URI.
    let err = verifier.verify_server_cert(
        &chain[0],
        &chain[1..],
        &rustls::pki_types::ServerName::try_from("unused.example").unwrap(),
        &[],
        rustls::pki_types::UnixTime::now(),
    );
    assert!(
        matches!(
            err,
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                    | rustls::CertificateError::NotValidForNameContext { .. }
            ))
        ),
        "the chain must verify up to the name check: {err:?}"
    );
    let (_, cert) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    let uris: Vec<String> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_owned()),
            _ => None,
        })
        .collect();
    assert_eq!(uris.len(), 1, "exactly one URI SAN: {uris:?}");
    uris[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_signs_only_what_the_caller_may_hold() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rig = rig().await;

    // A node agent gets the identity of a pod on its own node, and the chain verifies
    // against the published root.
    let agent_a = rig.issuer("agent-a");
    let web = id("demo", "web");
    let csr = csr_for(&web.uri());
    let chain = agent_a
        .sign(&csr, &web, Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(verified_identity(&chain, &rig.root_pem), web.uri());

    // The node named by the token itself (Kubernetes >= 1.32) works the same way.
    let db = id("demo", "db");
    let chain = rig
        .issuer("agent-b-with-node")
        .sign(&csr_for(&db.uri()), &db, Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(verified_identity(&chain, &rig.root_pem), db.uri());

    // An ordinary workload gets its own identity.
    let sleep = id("demo", "sleep");
    let own = rig
        .raw("sleep", &csr_for(&sleep.uri()), None)
        .await
        .unwrap();
    assert!(own.len() >= 2, "leaf and root");

    let code = |r: Result<Vec<String>, tonic::Status>| r.map(|_| ()).unwrap_err();
    // Refusals, each with its status:
    // - a node agent asking for a service account whose pods run on another node;
    let s = code(
        rig.raw("agent-a", &csr_for(&db.uri()), Some(&db.uri()))
            .await,
    );
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("node-a"), "{}", s.message());
    // - impersonation by anyone but the node agent;
    let s = code(
        rig.raw("sleep", &csr_for(&web.uri()), Some(&web.uri()))
            .await,
    );
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    assert!(
        s.message().contains("only ask for its own identity"),
        "{}",
        s.message()
    );
    // - a token the API server does not accept (bad, expired, or for another audience);
    for token in ["not-a-token", "expired", "wrong-audience"] {
        let s = code(rig.raw(token, &csr_for(&web.uri()), Some(&web.uri())).await);
        assert_eq!(s.code(), tonic::Code::Unauthenticated, "{token}: {s:?}");
    }
    let s = code(rig.raw("", &csr_for(&web.uri()), None).await);
    assert_eq!(s.code(), tonic::Code::Unauthenticated, "{s:?}");
    // - a CSR with extra names;
    let (_, extra) = csr::make(vec![
        SanType::URI(web.uri().as_str().try_into().unwrap()),
        SanType::DnsName("kubernetes.default.svc".try_into().unwrap()),
    ])
    .unwrap();
    let s = code(rig.raw("agent-a", &extra, Some(&web.uri())).await);
    assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("only the URI SAN"), "{}", s.message());
    // - another trust domain, in the metadata or in the CSR.
    let foreign = "spiffe://evil.example/ns/demo/sa/web";
    let s = code(rig.raw("agent-a", &csr_for(foreign), Some(foreign)).await);
    assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("trust domain"), "{}", s.message());
    let s = code(
        rig.raw("agent-a", &csr_for(foreign), Some(&web.uri()))
            .await,
    );
    assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");

    // The root lives in a Secret created on first start and is reused by the next start.
    let secret = rig
        .api
        .get("secrets", NS, "mesh-ca-root")
        .expect("root Secret created");
    assert!(secret["data"]["ca-key.pem"].is_string());
    let kc = client(&rig.api).await;
    let again = root::load_or_create(
        &kc,
        &RootObjects::new(NS),
        "cluster.local",
        Duration::from_secs(86_400),
    )
    .await
    .unwrap();
    assert_eq!(
        again.roots_pem(),
        rig.root_pem,
        "a restarted CA keeps its root"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_istio_cacerts_secret_is_used_when_present() {
    let api = FakeApi::start();
    let dir = std::env::temp_dir().join(format!("mesh-cacerts-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // Removed however the test ends.
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(dir.clone());
    mesh_agent::identity::LocalCa::init_dir(&dir, "cluster.local", Duration::from_secs(86_400))
        .unwrap();
    let read = |f: &str| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(std::fs::read(dir.join(f)).unwrap())
    };
    api.apply(
        json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                     "metadata": {"name": "cacerts", "namespace": NS},
                     "data": {"ca-cert.pem": read("ca-cert.pem"), "ca-key.pem": read("ca-key.pem"),
                              "root-cert.pem": read("root-cert.pem")}}),
    );
    let kc = client(&api).await;
    let ca = root::load_or_create(
        &kc,
        &RootObjects::new(NS),
        "cluster.local",
        Duration::from_secs(86_400),
    )
    .await
    .unwrap();
    assert_eq!(
        ca.roots_pem().trim(),
        std::fs::read_to_string(dir.join("root-cert.pem"))
            .unwrap()
            .trim()
    );
    assert!(
        api.get("secrets", NS, "mesh-ca-root").is_none(),
        "no root of our own next to cacerts"
    );
}

/// The CA port's bounds (issue #18): a pod holding idle connections gets its share and no more,
/// its connections are closed when their TLS handshake does not come, garbage instead of TLS is
/// refused, every refusal is counted in the CA's metrics — and a node agent renews throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_garbage_connections_are_bounded_while_agents_renew() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rig = rig_with(mesh_agent::ca::limits::CaBounds {
        per_source: 8,
        handshake_timeout: Duration::from_secs(1),
        ..Default::default()
    })
    .await;
    let refused = |reason| rig.counters.refused(reason);
    // Refusals are counted by the CA's accept task: wait (5 s at most) for `n` of `reason`.
    let counted = |reason, n| async move {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while refused(reason) < n {
            assert!(
                std::time::Instant::now() < deadline,
                "{reason}: {} refusals counted, {n} expected",
                refused(reason)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    // 12 idle connections from one (other) source: 8 held, 4 reset at once.
    let mut idle = Vec::new();
    for _ in 0..12 {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        // A refused one may be reset before connect() even returns.
        match s.connect(rig.listen).await {
            Ok(c) => idle.push(c),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        }
    }
    counted("endpoint_per_source", 4).await;
    // Meanwhile an agent on another address gets its certificate.
    let web = id("demo", "web");
    let chain = rig
        .issuer("agent-a")
        .sign(&csr_for(&web.uri()), &web, Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(verified_identity(&chain, &rig.root_pem), web.uri());
    // The held ones never start TLS: closed after the handshake time.
    let mut closed = 0;
    for s in &mut idle {
        let mut b = [0u8; 1];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await
        {
            closed += 1;
        }
    }
    assert_eq!(
        closed,
        idle.len(),
        "every idle connection closed (reset or timed out)"
    );
    assert_eq!(refused("tls_handshake_timeout"), 8);
    // Plain text where a ClientHello belongs.
    let mut garbage = tokio::net::TcpStream::connect(rig.listen).await.unwrap();
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut rest = Vec::new();
    let _ = garbage.read_to_end(&mut rest).await;
    counted("tls_handshake_error", 1).await;
    // The same figures on the CA's metrics endpoint.
    let mut m = tokio::net::TcpStream::connect(rig.metrics).await.unwrap();
    m.write_all(b"GET /metrics HTTP/1.1\r\nHost: ca\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    m.read_to_string(&mut text).await.unwrap();
    for line in [
        "mesh_connections_refused_total{listener=\"ca\",reason=\"endpoint_per_source\"} 4",
        "mesh_connections_refused_total{listener=\"ca\",reason=\"tls_handshake_timeout\"} 8",
        "mesh_connections_refused_total{listener=\"ca\",reason=\"tls_handshake_error\"} 1",
    ] {
        assert!(text.contains(line), "{line} missing from:\n{text}");
    }
}
