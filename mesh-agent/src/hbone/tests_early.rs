//! Early data: a stream's first bytes travel with its CONNECT only on a connection whose server
//! said in an earlier 200 that it takes them ([`super::EARLY_DATA_HEADER`]); towards any other
//! server (ztunnel) nothing is sent before the 200. A bare HTTP/2 server over the same mTLS
//! stands in for the peer, so the test sees exactly when each DATA frame arrives.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Response, StatusCode};
use tokio::{net::TcpListener, sync::mpsc};

use super::{
    EARLY_DATA_HEADER,
    client::HboneError,
    tests::{Rig, read_all, rig_with},
};

/// How long the bare server waits for a stream's DATA before it answers.
const WAIT_BEFORE_ANSWER: Duration = Duration::from_millis(700);

/// How the bare server answers a stream.
#[derive(Clone, Copy)]
enum Answer {
    Status(StatusCode),
    /// RST_STREAM with this reason instead of a response.
    Reset(h2::Reason),
}

/// What the bare server saw of one stream.
#[derive(Debug)]
struct Seen {
    /// DATA arrived before the server answered.
    before_answer: bool,
    /// Every byte of the stream, in order.
    bytes: Vec<u8>,
}

/// An HBONE server as `rig.b` that answers its n-th CONNECT with `answers[n]` (the last one
/// from then on), with the early-data header when `advertise`, once DATA has arrived or
/// [`WAIT_BEFORE_ANSWER`] has passed.
async fn bare_server(
    rig: &Rig,
    advertise: bool,
    answers: &'static [Answer],
) -> (SocketAddr, mpsc::UnboundedReceiver<Seen>) {
    let streams = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let cert = rig.certs.get(&rig.b).await.unwrap();
    let config = crate::tls::server_config(Arc::clone(&cert.key), &rig.roots, "cluster.local")
        .expect("server TLS configuration");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (config, tx, streams) = (Arc::clone(&config), tx.clone(), Arc::clone(&streams));
            tokio::spawn(async move {
                let tls = tokio_rustls::TlsAcceptor::from(config)
                    .accept(tcp)
                    .await
                    .expect("TLS");
                let mut conn = h2::server::handshake(tls).await.expect("h2");
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    let tx = tx.clone();
                    let n = streams.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let answer = answers[n.min(answers.len() - 1)];
                    tokio::spawn(async move {
                        let mut body = req.into_body();
                        let first = tokio::time::timeout(WAIT_BEFORE_ANSWER, body.data()).await;
                        let before_answer = first.is_ok();
                        let mut bytes = match first {
                            Ok(Some(Ok(b))) => b.to_vec(),
                            _ => Vec::new(),
                        };
                        let report = |bytes| {
                            let _ = tx.send(Seen {
                                before_answer,
                                bytes,
                            });
                        };
                        let status = match answer {
                            Answer::Status(s) => s,
                            Answer::Reset(reason) => {
                                respond.send_reset(reason);
                                return report(bytes);
                            }
                        };
                        let mut answer = Response::builder().status(status);
                        if advertise {
                            answer = answer.header(EARLY_DATA_HEADER, "1");
                        }
                        let answer = answer.body(()).unwrap();
                        if status != StatusCode::OK {
                            let _ = respond.send_response(answer, true);
                            return report(bytes);
                        }
                        let Ok(mut reply) = respond.send_response(answer, false) else {
                            return;
                        };
                        bytes.extend(read_all(body).await.unwrap_or_default());
                        report(bytes);
                        let _ = reply.send_data(Bytes::new(), true);
                    });
                }
            });
        }
    });
    (addr, rx)
}

/// Opens a stream carrying `early` to `server` and ends it: what the open returned.
async fn open_with(rig: &Rig, server: SocketAddr, early: &'static str) -> Result<(), HboneError> {
    let mut req = rig.request("127.0.0.1:8080".parse().unwrap(), &rig.b).await;
    req.hbone_addr = server;
    req.early = Bytes::from_static(early.as_bytes());
    let mut stream = rig.pool.open(&req).await?;
    stream.send.send_data(Bytes::new(), true).unwrap();
    // Until the server has read everything (dropping the stream earlier would reset it).
    read_all(stream.recv).await.unwrap();
    Ok(())
}

async fn rig() -> Rig {
    rig_with(Default::default(), super::server::no_telemetry()).await
}

#[tokio::test]
async fn first_bytes_go_with_the_connect_once_the_server_said_it_takes_them() {
    let rig = rig().await;
    let (server, mut seen) = bare_server(&rig, true, &[Answer::Status(StatusCode::OK)]).await;
    open_with(&rig, server, "hello").await.unwrap();
    let first = seen.recv().await.unwrap();
    // The connection's first stream cannot know yet: its bytes wait for the 200.
    assert!(!first.before_answer, "{first:?}");
    assert_eq!(first.bytes, b"hello");
    open_with(&rig, server, "world").await.unwrap();
    let second = seen.recv().await.unwrap();
    assert!(second.before_answer, "{second:?}");
    assert_eq!(second.bytes, b"world");
}

/// ztunnel never says it: nothing before the 200, however many streams.
#[tokio::test]
async fn nothing_before_the_200_to_a_server_that_never_said_it() {
    let rig = rig().await;
    let (server, mut seen) = bare_server(&rig, false, &[Answer::Status(StatusCode::OK)]).await;
    for early in ["one", "two", "three"] {
        open_with(&rig, server, early).await.unwrap();
        let s = seen.recv().await.unwrap();
        assert!(!s.before_answer, "{early}: {s:?}");
        assert_eq!(s.bytes, early.as_bytes());
    }
}

/// A refused stream that carried early bytes reports the refusal as before, the bytes went no
/// further than the refusing peer, and the connection goes on taking early data.
#[tokio::test]
async fn a_refused_stream_reports_the_status_after_early_bytes() {
    use StatusCode as S;
    let rig = rig().await;
    let answers = &[
        Answer::Status(S::OK),
        Answer::Status(S::UNAUTHORIZED),
        Answer::Status(S::OK),
    ];
    let (server, mut seen) = bare_server(&rig, true, answers).await;
    open_with(&rig, server, "learn").await.unwrap();
    assert!(!seen.recv().await.unwrap().before_answer);
    let e = open_with(&rig, server, "denied").await.unwrap_err();
    assert!(
        matches!(e, HboneError::Status { status, .. } if status == S::UNAUTHORIZED),
        "{e}"
    );
    let refused = seen.recv().await.unwrap();
    assert!(
        refused.before_answer && refused.bytes == b"denied",
        "{refused:?}"
    );
    open_with(&rig, server, "again").await.unwrap();
    let s = seen.recv().await.unwrap();
    assert!(s.before_answer && s.bytes == b"again", "{s:?}");
}

/// A stream lost without an answer after its first bytes went out may have delivered them: the
/// error says so (the outbound path then tries no other endpoint). A stream the server refused
/// unprocessed did not: it is opened again on a new connection, which waits for its 200.
#[tokio::test]
async fn a_stream_lost_after_early_bytes_is_in_doubt_a_refused_one_is_not() {
    use h2::Reason;
    let rig = rig().await;
    let answers = &[
        Answer::Status(StatusCode::OK),
        Answer::Reset(Reason::INTERNAL_ERROR),
        Answer::Reset(Reason::REFUSED_STREAM),
        Answer::Status(StatusCode::OK),
    ];
    let (server, mut seen) = bare_server(&rig, true, answers).await;
    open_with(&rig, server, "learn").await.unwrap();
    assert!(!seen.recv().await.unwrap().before_answer);
    let lost = open_with(&rig, server, "lost").await.unwrap_err();
    assert!(lost.may_have_delivered(), "{lost}");
    assert!(seen.recv().await.unwrap().before_answer);
    open_with(&rig, server, "refused").await.unwrap();
    assert!(seen.recv().await.unwrap().before_answer, "the refused try");
    let retried = seen.recv().await.unwrap();
    assert!(
        !retried.before_answer && retried.bytes == b"refused",
        "the retry, on a new connection: {retried:?}"
    );
}

/// Our own HBONE server says it takes early data, and the bytes that went early reach the
/// upstream once, before the ones the relay carries after them.
#[tokio::test]
async fn our_server_takes_early_data_and_delivers_it_once_in_order() {
    let rig = rig().await;
    let upstream = super::tests::echo().await;
    for (i, early) in ["abc", "ghi"].into_iter().enumerate() {
        let mut req = rig.request(upstream, &rig.b).await;
        req.early = Bytes::from_static(early.as_bytes());
        let mut stream = rig.pool.open(&req).await.unwrap();
        stream
            .send
            .send_data(Bytes::from_static(b"-then"), true)
            .unwrap();
        let echoed = read_all(stream.recv).await.unwrap();
        assert_eq!(echoed, format!("{early}-then").as_bytes());
        // The first stream learnt it from the 200; the second sent early.
        assert_eq!(rig.pool.early_sends(), i);
    }
}
