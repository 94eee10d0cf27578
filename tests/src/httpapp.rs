//! A small HTTP application for L7 tests and the demo (`mtb-probe http-app <port> <name>
//! [fail]`): HTTP/1.1 and h2c on one port (hyper), every request logged on stdout, answers that
//! say who served and what arrived, so a test can assert routing, header edits, rewrites and
//! mirroring from the client's side and from the server's log.
//!
//! - any path: 200, body `<name> saw <peer>` then the request's method, path and every header;
//!   response header `x-served-by: <name>`
//! - `/status/<code>`: that status
//! - `/delay/<ms>`: answers after the delay
//! - `/bytes/<n>`: `n` bytes of body, nothing else (the benchmark's 1 KiB answer); not logged
//! - `content-type: application/grpc`: a gRPC-shaped answer (200, empty body, trailers
//!   `grpc-status: 0`, `x-served-by`)
//! - `Upgrade: websocket`: 101, then echoes bytes
//! - `fail` mode: every request gets 503 (a broken pod)
use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::{Request, Response, body::Frame};
use hyper_util::rt::{TokioExecutor, TokioIo};

type Body = BoxBody<Bytes, Infallible>;

/// Serves until the process ends.
pub fn serve(port: u16, name: &str, fail: bool) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let name: Arc<str> = name.into();
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("::", port))
            .await
            .context("binding")?;
        loop {
            let (tcp, peer) = listener.accept().await?;
            let name = Arc::clone(&name);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let name = Arc::clone(&name);
                    async move { Ok::<_, Infallible>(answer(&name, peer, fail, req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(tcp), service)
                    .await;
            });
        }
    })
}

async fn answer(
    name: &str,
    peer: SocketAddr,
    fail: bool,
    mut req: Request<hyper::body::Incoming>,
) -> Response<Body> {
    let path = req.uri().path().to_owned();
    if let Some(n) = path
        .strip_prefix("/bytes/")
        .and_then(|n| n.parse::<usize>().ok())
    {
        return Response::builder()
            .header("content-type", "application/octet-stream")
            .body(full_bytes(Bytes::from(vec![b'x'; n.min(1 << 20)])))
            .unwrap();
    }
    let host = req
        .headers()
        .get("host")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    println!(
        "{name} {} {} host={host} from={}",
        req.method(),
        req.uri().path_and_query().map_or("/", |p| p.as_str()),
        peer.ip().to_canonical()
    );
    let builder = Response::builder().header("x-served-by", name);
    if fail {
        return builder
            .status(503)
            .body(full(format!("{name} is failing\n")))
            .unwrap();
    }
    if req.headers().contains_key("upgrade") {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut io = TokioIo::new(up);
                let (mut r, mut w) = tokio::io::split(&mut io);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        return builder
            .status(101)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(full(String::new()))
            .unwrap();
    }
    if req
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
    {
        let _ = req.into_body().collect().await;
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        trailers.insert("grpc-message", "served".parse().unwrap());
        let frames = futures::stream::iter([Ok::<_, Infallible>(Frame::trailers(trailers))]);
        return builder
            .status(200)
            .header("content-type", "application/grpc")
            .body(StreamBody::new(frames).boxed())
            .unwrap();
    }
    let mut status = 200;
    if let Some(code) = path.strip_prefix("/status/").and_then(|c| c.parse().ok()) {
        status = code;
    }
    if let Some(ms) = path.strip_prefix("/delay/").and_then(|c| c.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let mut body = format!(
        "{name} saw {}\n{} {}\n",
        peer.ip().to_canonical(),
        req.method(),
        req.uri()
    );
    for (k, v) in req.headers() {
        body += &format!("{k}: {}\n", v.to_str().unwrap_or("?"));
    }
    builder.status(status).body(full(body)).unwrap()
}

fn full(s: String) -> Body {
    full_bytes(Bytes::from(s))
}

fn full_bytes(b: Bytes) -> Body {
    Full::new(b).boxed()
}
