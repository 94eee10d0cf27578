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

/// Reads one frame: (type, payload); None at the end of the connection.
async fn try_read_frame(r: &mut (impl AsyncRead + Unpin)) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head).await.ok()?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await.ok()?;
    Some((head[3], payload))
}

/// Reads one frame: (type, payload).
async fn read_frame(r: &mut (impl AsyncRead + Unpin)) -> (u8, Vec<u8>) {
    try_read_frame(r).await.expect("a frame")
}

/// Checks that a client with a well-behaved connection (the rig's pool) is still served:
/// `msg` goes through a CONNECT to `up` and comes back.
async fn still_served(rig: &Rig, up: std::net::SocketAddr, msg: &'static [u8]) {
    let mut s = rig.pool.open(&rig.request(up, &rig.b).await).await.unwrap();
    s.send.send_data(Bytes::from_static(msg), true).unwrap();
    assert_eq!(read_all(s.recv).await.unwrap(), msg);
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
    still_served(&rig, echo().await, b"ok").await;
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
    still_served(&rig, up, b"still").await;
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
    assert_eq!(counted(&rig, Refusal::H2Abuse).await, 1, "client saw: {e}");
    // Other connections are served as usual.
    still_served(&rig, up, b"calm").await;
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

const HEADERS: u8 = 0x1;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// One frame on the wire.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_be_bytes();
    let mut out = vec![len[1], len[2], len[3], kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Reads frames until GOAWAY (its error code) or the end of the connection (None).
async fn goaway_code(r: &mut (impl AsyncRead + Unpin)) -> Option<u32> {
    loop {
        let (kind, payload) = try_read_frame(r).await?;
        if kind == GOAWAY && payload.len() >= 8 {
            return Some(u32::from_be_bytes([
                payload[4], payload[5], payload[6], payload[7],
            ]));
        }
    }
}

/// Waits (bounded) for the server to count `reason` once.
async fn counted(rig: &Rig, reason: Refusal) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    while rig.counters.count(reason) == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rig.counters.count(reason)
}

#[tokio::test]
async fn a_continuation_flood_is_cut_off_with_goaway_and_counted() {
    let rig = rig_with(ServerLimits::default(), no_telemetry()).await;
    let mut tls = tls_to_server(&rig).await;
    tls.write_all(PREFACE).await.unwrap();
    tls.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    // A header block that never ends (CVE-2024-27316 and friends): HEADERS without
    // END_HEADERS, then CONTINUATION frames each adding a little, for as long as the server
    // reads them. Without a bound the server buffers the block until memory runs out.
    let mut flood = frame(HEADERS, 0, 1, &[0x82]); // :method GET, and more to come
    for _ in 0..10_000 {
        flood.extend(frame(CONTINUATION, 0, 1, &[0x40, 0x01, b'x', 0x01, b'y']));
    }
    let (mut rd, mut wr) = tokio::io::split(tls);
    // The server may close before it read everything: a failed write is the expected end.
    let writer = tokio::spawn(async move { wr.write_all(&flood).await.is_ok() });
    let code = tokio::time::timeout(Duration::from_secs(10), goaway_code(&mut rd))
        .await
        .expect("the server kept reading an endless header block");
    if let Some(code) = code {
        assert_eq!(code, ENHANCE_YOUR_CALM, "the GOAWAY's error code");
    }
    assert_eq!(
        counted(&rig, Refusal::H2Abuse).await,
        1,
        "GOAWAY code {code:?}"
    );
    writer.abort();
    // Other connections are served as usual.
    still_served(&rig, echo().await, b"calm").await;
}

#[tokio::test]
async fn a_settings_flood_from_a_peer_that_never_reads_is_pushed_back_then_dropped() {
    let idle = Duration::from_millis(300);
    let drain = Duration::from_millis(500);
    let rig = rig_with(
        short(|l| {
            l.idle_timeout = idle;
            l.drain_timeout = drain;
        }),
        no_telemetry(),
    )
    .await;
    let tls = tls_to_server(&rig).await;
    let (_rd, mut wr) = tokio::io::split(tls);
    wr.write_all(PREFACE).await.unwrap();
    // Empty SETTINGS frames, each owed an ACK, from a peer that never reads one: the server
    // must stop reading while its ACKs cannot be written, not queue them.
    const FRAMES: usize = 4_000_000;
    let chunk: Vec<u8> = (0..1_000)
        .flat_map(|_| frame(SETTINGS, 0, 0, &[]))
        .collect();
    let mut written = 0usize;
    while written < FRAMES * 9 {
        match tokio::time::timeout(Duration::from_secs(1), wr.write_all(&chunk)).await {
            Ok(Ok(())) => written += chunk.len(),
            // Stalled for a second (pushed back) or closed: either way the server stopped.
            _ => break,
        }
    }
    assert!(
        written < FRAMES * 9,
        "the server took all {written} bytes of SETTINGS without its ACKs being read"
    );
    // Pushed back, idle (no stream), GOAWAY unwritable: dropped after the drain timeout.
    assert_eq!(
        counted(&rig, Refusal::DrainTimeout).await,
        1,
        "the server kept a connection whose peer never reads ({written} bytes taken)"
    );
    assert_eq!(rig.counters.count(Refusal::IdleTimeout), 1);
    still_served(&rig, echo().await, b"still").await;
}

/// A server that writes `total` bytes of a known pattern to its first client and closes,
/// counting what the kernel took so far.
async fn firehose(total: usize) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let taken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let progress = Arc::clone(&taken);
    tokio::spawn(async move {
        let (mut tcp, _) = l.accept().await.unwrap();
        let mut sent = 0usize;
        let mut buf = vec![0u8; 64 << 10];
        while sent < total {
            let n = buf.len().min(total - sent);
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = ((sent + i) % 251) as u8;
            }
            if tcp.write_all(&buf[..n]).await.is_err() {
                return;
            }
            sent += n;
            progress.store(sent, std::sync::atomic::Ordering::Relaxed);
        }
    });
    (addr, taken)
}

#[tokio::test]
async fn a_peer_that_grants_no_window_holds_the_upstream_back_and_then_gets_every_byte() {
    const TOTAL: usize = 96 << 20;
    // Socket buffers (this kernel's autotuning reaches 32 MiB of receive buffer) plus what the
    // relay holds: a relay that queued into h2 regardless of the window would take it all.
    const HELD_AT_MOST: usize = 48 << 20;
    let rig = rig_with(ServerLimits::default(), no_telemetry()).await;
    let (up, taken) = firehose(TOTAL).await;
    // Window exhaustion: every stream of this connection starts with no window at all.
    let (send, mut conn) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, Bytes>(tls_to_server(&rig).await)
        .await
        .unwrap();
    let (grant, granted) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        tokio::select! {
            _ = &mut conn => return,
            _ = granted => {}
        }
        conn.set_initial_window_size(4 << 20).unwrap();
        conn.set_target_window_size(16 << 20);
        let _ = conn.await;
    });
    let mut send = send.ready().await.unwrap();
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri(up.to_string())
        .body(())
        .unwrap();
    let (response, _stream) = send.send_request(req, false).unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // Wait until the upstream is pushed back: no progress for half a second.
    let mut last = usize::MAX;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = taken.load(std::sync::atomic::Ordering::Relaxed);
        if now == last || now == TOTAL || Instant::now() > deadline {
            break;
        }
        last = now;
    }
    let held = taken.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        held <= HELD_AT_MOST,
        "the server took {held} bytes from the upstream for a stream with no window"
    );
    // The window opens: every byte arrives, in order.
    grant.send(()).unwrap();
    let mut body = response.into_body();
    let mut got = 0usize;
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(30), body.data())
        .await
        .expect("the stream stalled after the window opened")
    {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        for (i, b) in chunk.iter().enumerate() {
            assert_eq!(*b, ((got + i) % 251) as u8, "byte {} corrupted", got + i);
        }
        got += chunk.len();
    }
    assert_eq!(got, TOTAL);
    eprintln!("held back at {held} bytes of {TOTAL}, then delivered all");
}
