//! The HBONE limits past TLS and ztunnel's HTTP/2 settings (issue 15, items 6 and 9), against
//! the real server and client over loopback with mTLS; raw frames where the h2 crate would hide
//! what is on the wire.
use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use super::{
    CLIENT_MAX_HEADER_LIST, SERVER_MAX_CONCURRENT_STREAMS, SERVER_MAX_HEADER_LIST,
    client::HboneError,
    limits::{Refusal, ServerLimits},
    server::{InboundTelemetry, no_telemetry},
    tests::{Rig, echo, id, read_all, rig_with},
};
use crate::{metrics::ConnectionTelemetry, tls};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const SETTINGS: u8 = 0x4;
const SETTINGS_ENABLE_PUSH: u16 = 0x2;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 0x6;

/// mTLS to the rig's server as identity `a`, nothing else.
async fn tls_to_server(rig: &Rig) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(rig.server).await.unwrap();
    let cert = rig.certs.get(&rig.a).await.unwrap();
    let config = tls::client_config(Arc::clone(&cert.key), &rig.roots, rig.b.clone()).unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(tls::server_name(rig.server.ip()), tcp)
        .await
        .unwrap()
}

/// Reads one frame: (type, payload).
async fn read_frame(r: &mut (impl AsyncRead + Unpin)) -> (u8, Vec<u8>) {
    let mut head = [0u8; 9];
    r.read_exact(&mut head).await.unwrap();
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await.unwrap();
    (head[3], payload)
}

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

fn short(limits: impl FnOnce(&mut ServerLimits)) -> ServerLimits {
    let mut l = ServerLimits::default();
    limits(&mut l);
    l
}

#[tokio::test]
async fn a_silent_tls_client_is_closed_after_the_h2_handshake_timeout() {
    let bound = Duration::from_millis(300);
    let rig = rig_with(short(|l| l.h2_handshake_timeout = bound), no_telemetry()).await;
    let mut tls = tls_to_server(&rig).await;
    // A valid identity, TLS done, and then nothing: the server must give up on its own. (It
    // sends its SETTINGS first: read past them to the close.)
    let started = Instant::now();
    let until_closed = async {
        let mut buf = [0u8; 1024];
        while let Ok(n @ 1..) = tls.read(&mut buf).await {
            assert!(n <= 64, "only the server's SETTINGS, got {n} bytes");
        }
    };
    tokio::time::timeout(Duration::from_secs(10), until_closed)
        .await
        .expect("the server kept a connection that never sent the HTTP/2 preface");
    let waited = started.elapsed();
    assert!(waited >= bound, "closed before the bound: {waited:?}");
    assert_eq!(rig.counters.count(Refusal::H2HandshakeTimeout), 1);
    // A client that speaks goes on working.
    let up = echo().await;
    let mut s = rig.pool.open(&rig.request(up, &rig.b).await).await.unwrap();
    s.send.send_data(Bytes::from_static(b"ok"), true).unwrap();
    assert_eq!(read_all(s.recv).await.unwrap(), b"ok");
}

#[tokio::test]
async fn an_oversized_header_list_is_refused_and_other_connections_are_served() {
    let rig = rig_with(ServerLimits::default(), no_telemetry()).await;
    let up = echo().await;
    // h2 does not hold a client to the server's advertised limit: it sends whatever it is given.
    let (send, conn) = h2::client::handshake(tls_to_server(&rig).await)
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut send = send.ready().await.unwrap();
    let big = "x".repeat(SERVER_MAX_HEADER_LIST as usize + 4096);
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri(up.to_string())
        .header("x-padding", big)
        .body(())
        .unwrap();
    let (response, _stream) = send.send_request(req, false).unwrap();
    match tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .unwrap()
    {
        Ok(r) => assert_eq!(r.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
        Err(e) => assert!(e.is_reset() || e.is_go_away(), "{e}"),
    }
    // Another connection (the pool's) is served as usual.
    let mut s = rig.pool.open(&rig.request(up, &rig.b).await).await.unwrap();
    s.send
        .send_data(Bytes::from_static(b"still"), true)
        .unwrap();
    assert_eq!(read_all(s.recv).await.unwrap(), b"still");
}

#[tokio::test]
async fn a_rapid_reset_flood_is_cut_off_with_goaway_and_counted() {
    let rig = rig_with(ServerLimits::default(), no_telemetry()).await;
    let up = echo().await;
    let (mut send, conn) = h2::client::handshake(tls_to_server(&rig).await)
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    // CVE-2023-44487: open a stream and cancel it at once, as fast as the connection takes
    // them. Each costs the client two frames and the server a stream it has to set up.
    for _ in 0..20_000 {
        let Ok(ready) = send.ready().await else { break };
        send = ready;
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(up.to_string())
            .body(())
            .unwrap();
        let Ok((_response, mut stream)) = send.send_request(req, false) else {
            break;
        };
        stream.send_reset(h2::Reason::CANCEL);
    }
    let ended = tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("the server kept the connection of a rapid reset flood")
        .unwrap();
    // The server sends GOAWAY and closes; the client may meet the closed socket (a broken
    // pipe) before it reads the GOAWAY, so the server's counter is what says why.
    let e = ended.expect_err("the connection ends in an error");
    if e.is_go_away() {
        assert_eq!(e.reason(), Some(h2::Reason::ENHANCE_YOUR_CALM), "{e}");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while rig.counters.count(Refusal::H2Abuse) == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(rig.counters.count(Refusal::H2Abuse), 1, "client saw: {e}");
    // Other connections are served as usual.
    let mut s = rig.pool.open(&rig.request(up, &rig.b).await).await.unwrap();
    s.send.send_data(Bytes::from_static(b"calm"), true).unwrap();
    assert_eq!(read_all(s.recv).await.unwrap(), b"calm");
}

#[tokio::test]
async fn the_server_advertises_ztunnels_stream_and_header_limits() {
    let rig = rig_with(ServerLimits::default(), no_telemetry()).await;
    let mut tls = tls_to_server(&rig).await;
    tls.write_all(PREFACE).await.unwrap();
    tls.write_all(&[0, 0, 0, SETTINGS, 0, 0, 0, 0, 0])
        .await
        .unwrap();
    let (kind, payload) = read_frame(&mut tls).await;
    assert_eq!(kind, SETTINGS, "the server's first frame");
    let s = settings(&payload);
    assert!(
        s.contains(&(
            SETTINGS_MAX_CONCURRENT_STREAMS,
            SERVER_MAX_CONCURRENT_STREAMS
        )),
        "{s:?}"
    );
    assert!(
        s.contains(&(SETTINGS_MAX_HEADER_LIST_SIZE, SERVER_MAX_HEADER_LIST)),
        "{s:?}"
    );
    assert_eq!(
        (SERVER_MAX_CONCURRENT_STREAMS, SERVER_MAX_HEADER_LIST),
        (200, 65536)
    );
}

#[tokio::test]
async fn the_client_refuses_push_and_advertises_a_16k_header_list() {
    let rig = rig_with(ServerLimits::default(), no_telemetry()).await;
    // A TLS server for `b` that records the client's first SETTINGS and answers nothing.
    let b = rig.certs.get(&rig.b).await.unwrap();
    let config = tls::server_config(Arc::clone(&b.key), &rig.roots, "cluster.local").unwrap();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = tokio::spawn(async move {
        let (tcp, _) = l.accept().await.unwrap();
        let mut tls = tokio_rustls::TlsAcceptor::from(config)
            .accept(tcp)
            .await
            .unwrap();
        let mut preface = [0u8; 24];
        tls.read_exact(&mut preface).await.unwrap();
        assert_eq!(preface, PREFACE);
        let (kind, payload) = read_frame(&mut tls).await;
        assert_eq!(kind, SETTINGS, "the client's first frame");
        settings(&payload)
    });
    let mut req = rig.request(echo().await, &rig.b).await;
    req.hbone_addr = addr;
    let pool = Arc::clone(&rig.pool);
    let opening = tokio::spawn(async move { pool.open(&req).await.map(drop) });
    let s = tokio::time::timeout(Duration::from_secs(10), seen)
        .await
        .unwrap()
        .unwrap();
    opening.abort();
    assert!(s.contains(&(SETTINGS_ENABLE_PUSH, 0)), "{s:?}");
    assert!(
        s.contains(&(SETTINGS_MAX_HEADER_LIST_SIZE, CLIENT_MAX_HEADER_LIST)),
        "{s:?}"
    );
}

#[tokio::test]
async fn a_peer_beyond_its_upstream_budget_gets_503_until_one_closes() {
    let rig = rig_with(short(|l| l.max_upstreams_per_peer = 3), no_telemetry()).await;
    let up = echo().await;
    let req = rig.request(up, &rig.b).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(rig.pool.open(&req).await.unwrap());
    }
    match rig.pool.open(&req).await {
        Err(HboneError::Status { status, .. }) => assert_eq!(status, 503),
        other => panic!("the fourth upstream was not refused: {:?}", other.err()),
    }
    assert_eq!(rig.counters.count(Refusal::PeerUpstreamLimit), 1);
    // Another identity from the same address has its own budget.
    let mut other = req.clone();
    other.source = id("c");
    other.source_cert = Arc::clone(&rig.certs.get(&other.source).await.unwrap().key);
    drop(rig.pool.open(&other).await.unwrap());
    // One finishes: its place comes back.
    let mut s = held.pop().unwrap();
    s.send.send_data(Bytes::from_static(b"bye"), true).unwrap();
    assert_eq!(read_all(s.recv).await.unwrap(), b"bye");
    let deadline = Instant::now() + Duration::from_secs(5);
    while rig.upstreams.held(&rig.a, req.client.ip()) > 2 {
        assert!(Instant::now() < deadline, "the slot was never given back");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(rig.pool.open(&req).await.unwrap());
    assert_eq!(rig.counters.count(Refusal::PeerUpstreamLimit), 1);
}

#[tokio::test]
async fn an_idle_connection_is_closed_but_not_one_with_a_stream() {
    let idle = Duration::from_millis(300);
    let rig = rig_with(short(|l| l.idle_timeout = idle), no_telemetry()).await;
    let up = echo().await;
    let req = rig.request(up, &rig.b).await;
    // A stream open for several idle periods keeps its connection.
    let mut s = rig.pool.open(&req).await.unwrap();
    tokio::time::sleep(idle * 3).await;
    assert_eq!(rig.counters.count(Refusal::IdleTimeout), 0);
    s.send
        .send_data(Bytes::from_static(b"alive"), true)
        .unwrap();
    assert_eq!(read_all(s.recv).await.unwrap(), b"alive");
    drop(s.slot);
    // Without streams the server closes it (GOAWAY), and the pool sees it go.
    let deadline = Instant::now() + Duration::from_secs(10);
    while rig.pool.stats().connections > 0 {
        assert!(Instant::now() < deadline, "the idle connection was kept");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(rig.counters.count(Refusal::IdleTimeout), 1);
}

#[tokio::test]
async fn the_forwarded_host_reaches_the_inbound_telemetry() {
    let hosts = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&hosts);
    let telemetry: InboundTelemetry = Arc::new(move |_, _, _, _, host| {
        record.lock().unwrap().push(host.map(str::to_owned));
        ConnectionTelemetry::disabled()
    });
    let rig = rig_with(ServerLimits::default(), telemetry).await;
    let up = echo().await;
    let mut req = rig.request(up, &rig.b).await;
    for host in [Some("b.default.svc.cluster.local"), None] {
        req.service_host = host.map(str::to_owned);
        let mut s = rig.pool.open(&req).await.unwrap();
        s.send.send_data(Bytes::new(), true).unwrap();
        read_all(s.recv).await.unwrap();
    }
    assert_eq!(
        *hosts.lock().unwrap(),
        [Some("b.default.svc.cluster.local".to_owned()), None]
    );
}
