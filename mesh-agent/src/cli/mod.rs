//! Operator commands that read a running agent through its own endpoints: `mesh-agent status`
//! (admin API) and `mesh-agent metrics` (Prometheus endpoint). Run them where the agent runs (its
//! network namespace: `kubectl exec ds/mesh-agent -- mesh-agent status` in a cluster).
pub mod status;
pub mod top;

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;

/// GET `path` from `addr` over HTTP/1.1; the body of a 200, an error naming the status otherwise.
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let work = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr} (is the agent running here?)"))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let req = http::Request::get(path)
            .header(http::header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())?;
        let resp = send.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        let text = String::from_utf8_lossy(&body).into_owned();
        if !status.is_success() {
            bail!("GET {path} on {addr}: {status}: {}", text.trim());
        }
        Ok(text)
    };
    tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .with_context(|| format!("GET {path} on {addr} timed out"))?
}
