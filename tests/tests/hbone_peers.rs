//! Issue #15, items 6 and 9, on the testbed: what a peer holding a valid mesh identity meets at
//! an agent's HBONE port (ztunnel's HTTP/2 settings, a handshake timeout for a peer that never
//! speaks, a bounded header list, the `forwarded ...;host=` it may send), and how our agent
//! speaks as an HBONE client to a peer that is not one of ours (a stand-in ztunnel in a pod).
mod support;

use std::{
    io::{self, BufRead as _, BufReader},
    net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use mesh_agent::{
    identity::{CertManager, CertificateIssuer, LocalCa, LocalIssuer, SpiffeId},
    tls,
};
use mesh_testbed::metrics::{scrape, value};
use mesh_testbed::{Pod, Testbed, TestbedSpec, can_run, probe::ProbeServer};
use support::{Agent, TempDir, config_yaml_with_ca, pods};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::{TlsAcceptor, TlsConnector, client::TlsStream};

const SPEC: TestbedSpec = TestbedSpec {
    nodes: 2,
    pods_per_node: 2,
};
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_SETTINGS: u8 = 0x4;
const SETTINGS_ENABLE_PUSH: u16 = 0x2;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 0x6;
/// The agent's bound on a peer that completed TLS and says nothing (ztunnel's is 10 s too).
const H2_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The identity the testbed's config gives `pod` while it is enrolled.
fn identity(pod: &Pod) -> SpiffeId {
    SpiffeId::new("cluster.local", "mesh", &format!("sa-{}", pod.name())).unwrap()
}

/// Certificates from the testbed's CA, as another mesh member (or a ztunnel) would hold them.
fn certificates(
    ca: &TempDir,
) -> (
    Arc<CertManager>,
    Vec<rustls::pki_types::CertificateDer<'static>>,
) {
    let ca = Arc::new(LocalCa::from_dir(ca.path(), "cluster.local").unwrap());
    let issuer: Arc<dyn CertificateIssuer> = Arc::new(LocalIssuer::new(ca));
    let roots = issuer.roots();
    (CertManager::new(issuer, Duration::from_secs(3600)), roots)
}

/// A TCP connection made from `pod`'s network namespace, for use from any thread.
fn tcp_from(pod: &Pod, dst: SocketAddr) -> TcpStream {
    let s = pod
        .place
        .in_netns(|| StdStream::connect_timeout(&dst, Duration::from_secs(5)))
        .unwrap()
        .unwrap_or_else(|e| panic!("TCP to {dst} from {}: {e}", pod.name()));
    s.set_nonblocking(true).unwrap();
    TcpStream::from_std(s).unwrap()
}

/// mTLS from `client` (as identity `me`) to the HBONE port of `server`, verifying its identity.
async fn mtls(
    certs: &Arc<CertManager>,
    roots: &[rustls::pki_types::CertificateDer<'static>],
    me: &SpiffeId,
    client: &Pod,
    server: &Pod,
) -> TlsStream<TcpStream> {
    let dst = SocketAddr::new(server.ip(false), 15008);
    let key = Arc::clone(&certs.get(me).await.unwrap().key);
    let config = tls::client_config(key, roots, identity(server)).unwrap();
    TlsConnector::from(config)
        .connect(tls::server_name(dst.ip()), tcp_from(client, dst))
        .await
        .unwrap_or_else(|e| panic!("mTLS to {dst}: {e}"))
}

/// Reads one HTTP/2 frame: (type, payload).
async fn read_frame(r: &mut (impl AsyncRead + Unpin)) -> io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head).await?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok((head[3], payload))
}

/// The (identifier, value) pairs of a SETTINGS payload.
fn settings(payload: &[u8]) -> Vec<(u16, u32)> {
    payload
        .chunks_exact(6)
        .map(|c| {
            (
                u16::from_be_bytes([c[0], c[1]]),
                u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
            )
        })
        .collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn a_peer_with_a_valid_identity_is_held_to_ztunnels_http2_limits() {
    if !can_run("HBONE peers: server limits", &["ip"]) {
        return;
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tb = Testbed::build(SPEC).unwrap();
    let ca = TempDir::with_ca(&tb.info().run);
    let enrolled = pods(&[(2, 1)]);
    let _agent = Agent::start_with_ca(&tb, 2, "mesh", &enrolled, Some(ca.path())).unwrap();
    let (client, server) = (tb.pod(1, 1), tb.pod(2, 1));
    let _probe = ProbeServer::start(&server.place, &[8080]).unwrap();
    let (certs, roots) = certificates(&ca);
    // Another node's pod, as its agent would present it.
    let me = identity(client);
    let rt = runtime();

    rt.block_on(async {
        // A peer that completes mTLS and never sends the HTTP/2 preface is closed on a timer;
        // it runs while the rest of the test goes on.
        let mut silent = mtls(&certs, &roots, &me, client, server).await;
        let silent = tokio::spawn(async move {
            let started = Instant::now();
            let mut buf = [0u8; 1024];
            // The server's own SETTINGS arrive first; read past them to the close.
            while let Ok(Ok(n @ 1..)) =
                tokio::time::timeout(Duration::from_secs(30), silent.read(&mut buf)).await
            {
                assert!(n <= 64, "only the server's SETTINGS, got {n} bytes");
            }
            started.elapsed()
        });

        // The server advertises ztunnel's limits: 200 streams, a 64 KiB header list.
        let mut tls = mtls(&certs, &roots, &me, client, server).await;
        tls.write_all(PREFACE).await.unwrap();
        tls.write_all(&[0, 0, 0, FRAME_SETTINGS, 0, 0, 0, 0, 0])
            .await
            .unwrap();
        let (kind, payload) = read_frame(&mut tls).await.unwrap();
        assert_eq!(kind, FRAME_SETTINGS, "the server's first frame");
        let advertised = settings(&payload);
        assert!(
            advertised.contains(&(SETTINGS_MAX_CONCURRENT_STREAMS, 200)),
            "max concurrent streams: {advertised:?}"
        );
        assert!(
            advertised.contains(&(SETTINGS_MAX_HEADER_LIST_SIZE, 64 << 10)),
            "max header list size: {advertised:?}"
        );
        drop(tls);

        // A header list over the advertised size is refused (431 or a reset), not served. The
        // h2 client does not hold itself to the server's limit, so the bytes do go out.
        let authority = SocketAddr::new(server.ip(false), 8080).to_string();
        let (send, conn) = h2::client::handshake(mtls(&certs, &roots, &me, client, server).await)
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut send = send.ready().await.unwrap();
        let oversized = Request::builder()
            .method(Method::CONNECT)
            .uri(&authority)
            .header("x-padding", "x".repeat((64 << 10) + 4096))
            .body(())
            .unwrap();
        let (response, _stream) = send.send_request(oversized, false).unwrap();
        match tokio::time::timeout(Duration::from_secs(10), response)
            .await
            .expect("no answer to an oversized header list")
        {
            Ok(r) => assert_eq!(
                r.status(),
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "an oversized header list was served"
            ),
            Err(e) => assert!(e.is_reset() || e.is_go_away(), "{e}"),
        }

        // A well-formed CONNECT naming the service the client addressed, as ztunnel sends it,
        // is served, and the service reaches the destination's telemetry.
        let (send, conn) = h2::client::handshake(mtls(&certs, &roots, &me, client, server).await)
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut send = send.ready().await.unwrap();
        let connect = Request::builder()
            .method(Method::CONNECT)
            .uri(&authority)
            .header(
                "forwarded",
                format!(
                    "for=\"{}:40000\";host=svc-slot1.mesh.svc.cluster.local:80",
                    client.ipv4
                ),
            )
            .body(())
            .unwrap();
        let (response, mut stream) = send.send_request(connect, false).unwrap();
        let response = response.await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        let mut hello = Vec::new();
        while !hello.contains(&b'\n') {
            let chunk = body.data().await.expect("the probe's hello").unwrap();
            let _ = body.flow_control().release_capacity(chunk.len());
            hello.extend_from_slice(&chunk);
        }
        let hello = String::from_utf8_lossy(&hello);
        assert!(
            hello.contains(&format!("\"{}:", client.ipv4)),
            "the pod sees the client's address: {hello}"
        );
        stream.send_data(Bytes::new(), true).unwrap();
        while let Some(chunk) = body.data().await {
            chunk.unwrap();
        }

        let waited = silent.await.unwrap();
        assert!(
            waited >= H2_HANDSHAKE_TIMEOUT - Duration::from_millis(500),
            "closed before the handshake timeout: {waited:?}"
        );
        assert!(
            waited < Duration::from_secs(25),
            "a peer that never sent the HTTP/2 preface was kept ({waited:?})"
        );
    });

    let m = scrape(&tb, 2);
    assert_eq!(
        value(
            &m,
            "mesh_hbone_server_refusals",
            &[("reason", "h2_handshake_timeout")]
        ),
        1.0,
        "the silent peer is counted"
    );
    let to_service = value(
        &m,
        "istio_tcp_connections_opened",
        &[
            ("reporter", "destination"),
            ("destination_service", "svc-slot1.mesh.svc.cluster.local"),
        ],
    );
    assert_eq!(to_service, 1.0, "destination_service from forwarded host=");
    tb.teardown_verified().unwrap();
}

/// Copies what is read through it, so a test can look at the raw frames h2 consumed.
struct Tap<S> {
    inner: S,
    seen: Arc<Mutex<Vec<u8>>>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tap<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let new = buf.filled()[before..].to_vec();
        let mut seen = self.seen.lock().unwrap();
        if seen.len() < 4096 {
            seen.extend_from_slice(&new);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tap<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What the stand-in ztunnel saw of the agent's HBONE client.
struct Seen {
    client_settings: Vec<(u16, u32)>,
    forwarded: Option<String>,
    authority: String,
}

/// One HBONE connection served by a stand-in ztunnel: mTLS as `me`, one CONNECT answered 200,
/// then the stream's bytes echoed.
async fn serve_as_ztunnel(listener: StdListener, certs: Arc<CertManager>, me: SpiffeId) -> Seen {
    let roots = certs.issuer().roots();
    listener.set_nonblocking(true).unwrap();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    let (tcp, _) = listener.accept().await.unwrap();
    let key = Arc::clone(&certs.get(&me).await.unwrap().key);
    let config = tls::server_config(key, &roots, "cluster.local").unwrap();
    let tls = TlsAcceptor::from(config).accept(tcp).await.unwrap();
    let raw = Arc::new(Mutex::new(Vec::new()));
    let mut conn = h2::server::handshake(Tap {
        inner: tls,
        seen: Arc::clone(&raw),
    })
    .await
    .unwrap();
    let (req, mut respond) = conn.accept().await.unwrap().unwrap();
    let driver = tokio::spawn(async move { while conn.accept().await.is_some() {} });
    assert_eq!(req.method(), Method::CONNECT);
    let forwarded = req
        .headers()
        .get("forwarded")
        .map(|v| v.to_str().unwrap().to_owned());
    let authority = req.uri().to_string();
    let mut body = req.into_body();
    let mut send = respond.send_response(Response::new(()), false).unwrap();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        send.reserve_capacity(chunk.len());
        send.send_data(chunk, false).unwrap();
    }
    send.send_data(Bytes::new(), true).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    driver.abort();

    let raw = raw.lock().unwrap().clone();
    assert!(raw.starts_with(PREFACE), "the client preface");
    let head = &raw[PREFACE.len()..];
    assert_eq!(head[3], FRAME_SETTINGS, "the client's first frame");
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    Seen {
        client_settings: settings(&head[9..9 + len]),
        forwarded,
        authority,
    }
}

#[test]
fn the_agent_speaks_to_a_ztunnel_peer_as_ztunnel_does() {
    if !can_run("HBONE peers: client settings", &["ip"]) {
        return;
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tb = Testbed::build(SPEC).unwrap();
    let ca = TempDir::with_ca(&tb.info().run);
    let (client, peer) = (tb.pod(1, 1), tb.pod(2, 2));
    // Node 1's agent knows pod 2/2 as a mesh workload of node 2, behind a service of its own;
    // node 2 runs no agent of ours: the pod itself answers on 15008, as a ztunnel would.
    let enrolled = pods(&[(1, 1), (2, 2)]);
    let peer_line = format!("{}, labels: {{slot: \"2\"}}}}", peer.place.cgroup.display());
    let mut yaml = config_yaml_with_ca(&tb, 1, &enrolled, Some(ca.path()));
    assert!(yaml.contains(&peer_line), "{yaml}");
    yaml = yaml.replace(
        &peer_line,
        &format!(
            "{}, labels: {{slot: \"2\", role: ztunnel-peer}}}}",
            peer.place.cgroup.display()
        ),
    );
    yaml = yaml.replace(
        "services:\n",
        "services:\n  - {name: peer, namespace: mesh, vips: [10.96.0.9], ports: [{port: 80, targetPort: 8080}], selector: {role: ztunnel-peer}}\n",
    );
    let _agent =
        Agent::start_with_config(&tb, 1, "mesh", &pods(&[(1, 1)]), Some(ca.path()), &yaml).unwrap();
    let listener = peer
        .place
        .in_netns(|| StdListener::bind("0.0.0.0:15008"))
        .unwrap()
        .unwrap();
    let (certs, _) = certificates(&ca);
    let rt = runtime();
    let served = rt.spawn(serve_as_ztunnel(listener, certs, identity(peer)));

    // The client pod uses the service; its agent carries it over HBONE to the stand-in.
    let mut s = client
        .place
        .in_netns(|| {
            StdStream::connect_timeout(&"10.96.0.9:80".parse().unwrap(), Duration::from_secs(10))
        })
        .unwrap()
        .expect("connect to the service");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    io::Write::write_all(&mut s, b"through the peer\n").unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    assert_eq!(line, "through the peer\n");
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let seen = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(15), served).await })
        .expect("the stand-in ztunnel finished")
        .unwrap();

    assert!(
        seen.client_settings.contains(&(SETTINGS_ENABLE_PUSH, 0)),
        "ENABLE_PUSH=0: {:?}",
        seen.client_settings
    );
    assert!(
        seen.client_settings
            .contains(&(SETTINGS_MAX_HEADER_LIST_SIZE, 16 << 10)),
        "max header list size: {:?}",
        seen.client_settings
    );
    assert_eq!(seen.authority, format!("{}:8080", peer.ipv4));
    let forwarded = seen.forwarded.expect("a forwarded header");
    assert!(
        forwarded.contains("host=peer.mesh.svc.cluster.local"),
        "the service host in {forwarded}"
    );
    tb.teardown_verified().unwrap();
}
