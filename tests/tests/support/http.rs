//! HTTP clients beyond curl ([`mesh_testbed::http::curl`]) for the L7 end-to-end tests:
//! a gRPC-shaped call over h2 with trailers, and a WebSocket-style upgrade with an echo.

use std::{
    io::{Read as _, Write as _},
    net::SocketAddr,
    time::Duration,
};

use mesh_testbed::Pod;

/// What a gRPC-shaped call saw: HTTP status, the `grpc-status` trailer and `x-served-by`.
#[derive(Debug)]
pub struct GrpcAnswer {
    pub status: u16,
    pub grpc_status: Option<String>,
    pub served_by: Option<String>,
    pub headers: http::HeaderMap,
}

/// A unary gRPC-shaped call over h2c from inside `pod` to `dst`, naming `authority` and `path`.
pub fn grpc_call(pod: &Pod, dst: SocketAddr, authority: &str, path: &str) -> GrpcAnswer {
    let uri = format!("http://{authority}{path}");
    pod.place
        .in_netns(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async move {
                    let tcp = tokio::net::TcpStream::connect(dst).await.unwrap();
                    let (mut client, conn) = h2::client::handshake(tcp).await.unwrap();
                    tokio::spawn(conn);
                    let req = http::Request::post(uri)
                        .header("content-type", "application/grpc")
                        .header("te", "trailers")
                        .body(())
                        .unwrap();
                    let (resp, mut send) = client.send_request(req, false).unwrap();
                    send.send_data(bytes::Bytes::from_static(b"\0\0\0\0\0"), true)
                        .unwrap();
                    let resp = resp.await.unwrap();
                    let status = resp.status().as_u16();
                    let headers = resp.headers().clone();
                    let served_by = headers
                        .get("x-served-by")
                        .map(|v| v.to_str().unwrap().to_owned());
                    let mut body = resp.into_body();
                    while let Some(d) = body.data().await {
                        let _ = d.unwrap();
                    }
                    let trailers = body.trailers().await.unwrap();
                    let grpc_status = trailers
                        .and_then(|t| t.get("grpc-status").map(|v| v.to_str().unwrap().to_owned()));
                    GrpcAnswer {
                        status,
                        grpc_status,
                        served_by,
                        headers,
                    }
                })
        })
        .unwrap()
}

/// A WebSocket-style upgrade to `dst` (Host `host`), then one echo: (response head, echo).
pub fn websocket_echo(pod: &Pod, dst: SocketAddr, host: &str) -> (String, String) {
    let request = format!(
        "GET /chat HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    pod.place
        .in_netns(move || {
            let mut s = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(5)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(request.as_bytes()).unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                s.read_exact(&mut byte).unwrap();
                head.push(byte[0]);
            }
            s.write_all(b"ping-through-the-waypoint").unwrap();
            let mut echo = [0u8; 25];
            s.read_exact(&mut echo).unwrap();
            (
                String::from_utf8_lossy(&head).into_owned(),
                String::from_utf8_lossy(&echo).into_owned(),
            )
        })
        .unwrap()
}
