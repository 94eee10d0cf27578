//! HBONE client and server against each other in-process, over loopback TCP, with real mTLS.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use h2::RecvStream;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use super::{
    Connector,
    client::{HboneError, Pool, StreamRequest},
    limits::{PeerUpstreams, ServerCounters, ServerLimits},
    server::{AllowMesh, InboundTelemetry, ServerContext, Target},
};
use crate::identity::{CertManager, CertificateIssuer, LocalCa, LocalIssuer, SpiffeId};

pub(super) struct Rig {
    pub pool: Arc<Pool>,
    pub server: SocketAddr,
    pub a: SpiffeId,
    pub b: SpiffeId,
    pub certs: Arc<CertManager>,
    pub roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    pub counters: Arc<ServerCounters>,
    pub upstreams: Arc<PeerUpstreams>,
    pub ctx: Arc<ServerContext>,
    /// TCP connections the server accepted.
    pub accepted: Arc<std::sync::atomic::AtomicUsize>,
}

pub(super) fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "default", sa).unwrap()
}

/// A CA, an HBONE server on loopback speaking for identity `b`, and a pool.
async fn rig() -> Rig {
    rig_with(ServerLimits::default(), super::server::no_telemetry()).await
}

/// [`rig`] with the server's limits and telemetry given.
pub(super) async fn rig_with(limits: ServerLimits, telemetry: InboundTelemetry) -> Rig {
    let dir = std::env::temp_dir().join(format!(
        "mesh-hbone-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    LocalCa::init_dir(&dir, "cluster.local", Duration::from_secs(3600)).unwrap();
    let ca = Arc::new(LocalCa::from_dir(&dir, "cluster.local").unwrap());
    std::fs::remove_dir_all(&dir).unwrap();
    let issuer: Arc<dyn CertificateIssuer> = Arc::new(LocalIssuer::new(ca));
    let certs = CertManager::new(Arc::clone(&issuer), Duration::from_secs(3600));
    let (a, b) = (id("a"), id("b"));
    let b_cert = certs.get(&b).await.unwrap();
    let server_connector: Connector = Arc::new(|_client, dst| Box::pin(TcpStream::connect(dst)));
    let counters = Arc::new(ServerCounters::default());
    let upstreams = Arc::new(PeerUpstreams::default());
    let ctx = Arc::new(ServerContext {
        roots: issuer.roots(),
        trust_domain: "cluster.local".into(),
        authorizer: Arc::new(AllowMesh),
        connector: server_connector,
        telemetry,
        limits,
        counters: Arc::clone(&counters),
        upstreams: Arc::clone(&upstreams),
        goaway: Default::default(),
        memory: crate::memory_cap::MemoryCap::unlimited(),
    });
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = listener.local_addr().unwrap();
    let server_ctx = Arc::clone(&ctx);
    let counted = Arc::clone(&accepted);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let target = Target {
                ip: "127.0.0.1".parse().unwrap(),
                identity: b_cert.identity.clone(),
                cert: Arc::clone(&b_cert.key),
                baggage: "k8s.namespace.name=default,service.name=b".into(),
            };
            tokio::spawn(super::server::serve(Arc::clone(&ctx), tcp, target, ()));
        }
    });
    let connector: Connector = Arc::new(|_client, addr| Box::pin(TcpStream::connect(addr)));
    Rig {
        pool: Pool::new(issuer.roots(), connector),
        server,
        a,
        b,
        certs,
        roots: issuer.roots(),
        counters,
        upstreams,
        ctx: server_ctx,
        accepted,
    }
}

/// An upstream that answers each connection with everything it received, then closes.
pub(super) async fn echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut all = Vec::new();
                let _ = s.read_to_end(&mut all).await;
                let _ = s.write_all(&all).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

impl Rig {
    pub(super) async fn request(&self, authority: SocketAddr, expect: &SpiffeId) -> StreamRequest {
        StreamRequest {
            client: "127.0.0.1:40000".parse().unwrap(),
            source: self.a.clone(),
            source_cert: Arc::clone(&self.certs.get(&self.a).await.unwrap().key),
            destination: expect.clone(),
            hbone_addr: self.server,
            authority,
            baggage: "k8s.namespace.name=default,service.name=a".into(),
            service_host: None,
            early: bytes::Bytes::new(),
        }
    }
}

pub(super) async fn read_all(mut recv: RecvStream) -> Result<Vec<u8>, h2::Error> {
    let mut out = Vec::new();
    while let Some(c) = recv.data().await {
        let c = c?;
        let _ = recv.flow_control().release_capacity(c.len());
        out.extend_from_slice(&c);
    }
    Ok(out)
}

#[tokio::test]
async fn connect_half_close_and_echo() {
    let rig = rig().await;
    let up = echo().await;
    let req = rig.request(up, &rig.b).await;
    let mut s = rig.pool.open(&req).await.unwrap();
    s.send
        .send_data(Bytes::from_static(b"hello through hbone"), true)
        .unwrap();
    let got = read_all(s.recv).await.unwrap();
    assert_eq!(got, b"hello through hbone");
}

#[tokio::test]
async fn response_codes_as_ztunnel() {
    let rig = rig().await;
    // Authority is not the pod this connection is for -> 400.
    let req = rig.request("10.9.9.9:80".parse().unwrap(), &rig.b).await;
    match rig.pool.open(&req).await {
        Err(HboneError::Status { status, .. }) => assert_eq!(status, 400),
        other => panic!("{:?}", other.err()),
    }
    // Nothing listens upstream -> 503.
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let req = rig.request(closed, &rig.b).await;
    match rig.pool.open(&req).await {
        Err(HboneError::Status { status, .. }) => assert_eq!(status, 503),
        other => panic!("{:?}", other.err()),
    }
    // The server is not who we expect -> TLS refused, nothing opened.
    let up = echo().await;
    let req = rig.request(up, &id("someone-else")).await;
    assert!(matches!(
        rig.pool.open(&req).await,
        Err(HboneError::Tls { .. })
    ));
}

#[tokio::test]
async fn thousand_concurrent_streams_share_ten_connections_and_leave_nothing() {
    let rig = Arc::new(rig().await);
    let up = echo().await;
    let req = rig.request(up, &rig.b).await;
    // Open all first (held concurrently), then use them.
    let mut streams = Vec::new();
    for i in 0..1000 {
        let s = tokio::time::timeout(Duration::from_secs(5), rig.pool.open(&req))
            .await
            .unwrap_or_else(|_| panic!("stream {i} did not open: {:?}", rig.pool.stats()))
            .unwrap();
        streams.push(s);
    }
    let stats = rig.pool.stats();
    assert_eq!(stats.streams, 1000);
    assert_eq!(stats.connections, 10, "100 streams per connection");
    let mut tasks = Vec::new();
    for (i, mut s) in streams.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let msg = format!("stream {i}");
            s.send.send_data(Bytes::from(msg.clone()), true).unwrap();
            assert_eq!(read_all(s.recv).await.unwrap(), msg.as_bytes());
            drop(s.slot);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(rig.pool.stats().streams, 0);
    rig.pool.reap(Duration::ZERO);
    assert_eq!(
        rig.pool.stats().connections,
        0,
        "idle connections are closed"
    );
}

#[tokio::test]
async fn upstream_reset_resets_the_stream() {
    let rig = rig().await;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut b = [0u8; 1];
        let _ = s.read_exact(&mut b).await;
        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
        drop(s); // RST once the stream is up
    });
    let req = rig.request(up, &rig.b).await;
    let mut s = rig.pool.open(&req).await.unwrap();
    s.send.send_data(Bytes::from_static(b"x"), false).unwrap();
    assert!(
        read_all(s.recv).await.is_err(),
        "the reset reaches the client as a stream reset"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_streams_shares_dials_instead_of_opening_one_connection_each() {
    let rig = Arc::new(rig().await);
    let up = echo().await;
    let req = Arc::new(rig.request(up, &rig.b).await);
    let opens: Vec<_> = (0..150)
        .map(|_| {
            let (rig, req) = (Arc::clone(&rig), Arc::clone(&req));
            tokio::spawn(async move { rig.pool.open(&req).await.unwrap() })
        })
        .collect();
    let mut streams = Vec::new();
    for o in opens {
        streams.push(o.await.unwrap());
    }
    assert_eq!(
        rig.pool.stats().connections,
        2,
        "150 streams need 2 connections"
    );
    drop(streams);
}

#[test]
fn traceparent_is_w3c_shaped() {
    let t = super::client::traceparent_for_tests();
    let parts: Vec<_> = t.split('-').collect();
    assert_eq!(parts.len(), 4, "{t}");
    assert_eq!(
        (parts[0], parts[1].len(), parts[2].len(), parts[3]),
        ("00", 32, 16, "01")
    );
    let lower_hex = |s: &str| s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    assert!(lower_hex(parts[1]) && lower_hex(parts[2]), "{t}");
    assert_ne!(parts[1], "0".repeat(32), "an all-zero trace id is invalid");
    // Ids are fresh per stream.
    assert_ne!(t, super::client::traceparent_for_tests());
}

/// An agent handing over to its successor tells its HBONE peers GOAWAY: a stream open across it
/// finishes intact, and the next stream is opened on a new connection (which, in the node, the
/// successor accepts) without the caller seeing an error.
#[tokio::test]
async fn after_a_goaway_open_streams_finish_and_new_ones_go_to_a_new_connection() {
    let rig = rig().await;
    let up = echo().await;
    let req = rig.request(up, &rig.b).await;
    let mut first = rig.pool.open(&req).await.unwrap();
    first
        .send
        .send_data(Bytes::from_static(b"before the goaway, "), false)
        .unwrap();
    rig.ctx.goaway.fire();
    tokio::time::sleep(Duration::from_millis(200)).await;
    rig.ctx.goaway.stand_in_for_successor();
    let mut second = rig
        .pool
        .open(&req)
        .await
        .expect("opened on a new connection");
    second
        .send
        .send_data(Bytes::from_static(b"after"), true)
        .unwrap();
    assert_eq!(read_all(second.recv).await.unwrap(), b"after");
    first
        .send
        .send_data(Bytes::from_static(b"and after it"), true)
        .unwrap();
    assert_eq!(
        read_all(first.recv).await.unwrap(),
        b"before the goaway, and after it"
    );
    assert_eq!(
        rig.accepted.load(std::sync::atomic::Ordering::Relaxed),
        2,
        "the second stream went to a new connection"
    );
}

/// A peer handing over tells every pooled connection GOAWAY at once: a new stream is opened on
/// a new connection, not tried on the other pooled connections that are going away too (the
/// soak caught a stream refused three times that way, under 10,000 connections).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_goaway_on_every_pooled_connection_a_new_stream_still_gets_through() {
    let rig = rig().await;
    let up = echo().await;
    let req = rig.request(up, &rig.b).await;
    let mut held = Vec::new();
    for _ in 0..250 {
        held.push(rig.pool.open(&req).await.unwrap());
    }
    assert_eq!(
        rig.pool.stats().connections,
        3,
        "250 streams on 3 connections"
    );
    // Every connection keeps some streams open and has room for more.
    let held: Vec<_> = held.into_iter().step_by(2).collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    rig.ctx.goaway.fire();
    tokio::time::sleep(Duration::from_millis(200)).await;
    rig.ctx.goaway.stand_in_for_successor();
    let mut next = rig
        .pool
        .open(&req)
        .await
        .expect("opened on a new connection");
    next.send
        .send_data(Bytes::from_static(b"through"), true)
        .unwrap();
    assert_eq!(read_all(next.recv).await.unwrap(), b"through");
    assert_eq!(
        rig.accepted.load(std::sync::atomic::Ordering::Relaxed),
        4,
        "one new connection, not a retry on each going-away one"
    );
    drop(held);
}
