//! What the node agent does with a captured connection, and the attribution every handler
//! relies on.
//!
//! - `mesh` (default): HBONE between agents and policy enforcement, see [`super::mesh`].
//! - `passthrough`: a transparent L4 relay (a diagnostic mode without HBONE); inbound plaintext
//!   still obeys the destination's PeerAuthentication and AuthorizationPolicy. Outbound and inbound-plaintext connections
//!   are connected onwards to their original destination *from the original client address*;
//!   inbound HBONE (15008) is refused, because HBONE termination is not built yet.
//! - `report`: a diagnostic sink. Each connection receives one JSON line saying what the capture
//!   learnt (listener, client, original destination, the pod it is attributed to); the agent then
//!   reads until the client half-closes and answers with a second line, the byte count and FNV-1a
//!   digest of what it received. Tests use it to check capture without a relay in between.
use std::{net::SocketAddr, sync::Arc};

use mesh_common::FlowKind;
use serde::Serialize;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tracing::{info, warn};

use super::direct::{closed, splice_tcp};
use super::sockets::reset;
use super::sockets::{Upstream, canonical, connect_direct};
use crate::{
    capture::{FlowTable, PodCapture, SharedCaptureView},
    metrics::ResponseFlags,
};

/// How captured connections are handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum HandlerMode {
    Mesh,
    Passthrough,
    Report,
}

/// Everything a connection task needs, shared.
pub struct HandlerContext {
    pub mode: HandlerMode,
    pub flows: FlowTable,
    pub view: SharedCaptureView,
    /// Present in `mesh` mode.
    pub mesh: Option<Arc<super::mesh::MeshContext>>,
    /// Inbound policy (PeerAuthentication, AuthorizationPolicy) for plaintext delivered to
    /// enrolled pods, in every mode that delivers it.
    pub enforcer: Arc<crate::policy::Enforcer>,
    /// Metrics and access logs of every connection.
    pub telemetry: Arc<super::telemetry::Telemetry>,
}

/// The first line of a `report` answer.
#[derive(Serialize)]
struct Report<'a> {
    listener: &'static str,
    client: SocketAddr,
    original_dst: SocketAddr,
    /// Outbound: the pod the connection came from; inbound: the pod it is for.
    pod: &'a str,
    ifindex: u32,
}

/// A connection the capture attributed: the pod and the kernel's record.
struct Attributed {
    pod: PodCapture,
    ifindex: u32,
}

/// The handler's name as the CLI spells it.
pub fn mode_name(mode: HandlerMode) -> &'static str {
    match mode {
        HandlerMode::Mesh => "mesh",
        HandlerMode::Passthrough => "passthrough",
        HandlerMode::Report => "report",
    }
}

pub fn listener_name(kind: FlowKind) -> &'static str {
    match kind {
        FlowKind::Outbound => "outbound",
        FlowKind::InboundPlaintext => "inbound_plaintext",
        FlowKind::InboundHbone => "inbound_hbone",
    }
}

/// Serves one accepted connection from `client` (as accept reported it) to completion;
/// `admitted` holds its admission permits (see [`super::admission`]) until the connection, or
/// its setup, ends.
pub async fn handle(
    ctx: Arc<HandlerContext>,
    (stream, client): (TcpStream, SocketAddr),
    kind: FlowKind,
    admitted: super::admission::Admitted,
) {
    let super::admission::Admitted {
        connection: _connection,
        setup,
    } = admitted;
    let Ok(original_dst) = stream.local_addr() else {
        return;
    };
    let client = canonical(client);
    let original_dst = canonical(original_dst);
    let listener = listener_name(kind);
    let attributed = match attribute(&ctx, kind, client, original_dst) {
        Ok(a) => a,
        Err(reason) => {
            warn!(listener, %client, %original_dst, reason, "refusing captured connection");
            reset(stream);
            return;
        }
    };
    let pod = attributed.pod.key.as_str();
    match (ctx.mode, kind) {
        (HandlerMode::Report, _) => {
            let report = Report {
                listener,
                client,
                original_dst,
                pod,
                ifindex: attributed.ifindex,
            };
            if let Err(e) = report_and_sink(stream, &report).await {
                info!(listener, %client, %original_dst, error = %e, "report connection ended early");
            }
        }
        (HandlerMode::Mesh, kind) => {
            let Some(mesh) = ctx.mesh.as_deref() else {
                reset(stream);
                return;
            };
            match kind {
                FlowKind::InboundHbone => {
                    super::inbound::inbound_hbone(mesh, stream, original_dst, setup).await
                }
                FlowKind::InboundPlaintext => {
                    super::inbound::inbound_plaintext(&ctx, stream, client, original_dst, setup)
                        .await
                }
                FlowKind::Outbound => {
                    super::outbound::outbound(mesh, stream, client, original_dst, pod).await
                }
            }
        }
        (HandlerMode::Passthrough, FlowKind::InboundHbone) => {
            warn!(listener, %client, %original_dst, pod,
                "HBONE termination is not built yet (issue #4); refusing");
            reset(stream);
        }
        // Plaintext to an enrolled pod obeys its policy here too (never plaintext to STRICT).
        (HandlerMode::Passthrough, FlowKind::InboundPlaintext) => {
            super::inbound::inbound_plaintext(&ctx, stream, client, original_dst, setup).await
        }
        (HandlerMode::Passthrough, FlowKind::Outbound) => {
            relay(&ctx, stream, client, original_dst).await
        }
    }
}

/// Resets a connection admission refused. Its capture record is removed too: it would
/// otherwise stay in the flow map until evicted, and a flood would evict legitimate ones.
pub fn refuse(ctx: &HandlerContext, (stream, client): (TcpStream, SocketAddr)) {
    if let Ok(original_dst) = stream.local_addr() {
        let _ = ctx.flows.take(canonical(client), canonical(original_dst));
    }
    reset(stream);
}

/// Decides who a connection belongs to from what the kernel recorded, never from the client
/// address alone.
fn attribute(
    ctx: &HandlerContext,
    kind: FlowKind,
    client: SocketAddr,
    original_dst: SocketAddr,
) -> Result<Attributed, &'static str> {
    let flow = ctx.flows.take(client, original_dst).ok_or(
        "no capture record for this connection (not captured by our programs, or evicted)",
    )?;
    if flow.kind != kind {
        return Err("capture record names a different listener");
    }
    let view = ctx.view.load();
    let pod = match kind {
        FlowKind::Outbound => {
            let pod = view
                .by_ifindex
                .get(&flow.ifindex)
                .ok_or("the interface it came from is not an enrolled pod's")?;
            if !pod.ips.contains(&client.ip()) {
                return Err("client address is not the address of the pod it came from");
            }
            pod.clone()
        }
        FlowKind::InboundPlaintext | FlowKind::InboundHbone => view
            .by_ip
            .get(&original_dst.ip())
            .ok_or("destination is not an enrolled pod of this node")?
            .clone(),
    };
    Ok(Attributed {
        pod,
        ifindex: flow.ifindex,
    })
}

async fn report_and_sink(mut stream: TcpStream, report: &Report<'_>) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(report).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line).await?;
    let mut digest = Fnv1a64::new();
    let mut bytes = 0u64;
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        digest.update(&buf[..n]);
        bytes += n as u64;
    }
    let summary = format!(
        "{{\"bytes\":{bytes},\"digest\":\"{:016x}\"}}\n",
        digest.finish()
    );
    stream.write_all(summary.as_bytes()).await?;
    stream.shutdown().await
}

async fn relay(
    ctx: &HandlerContext,
    inbound: TcpStream,
    client: SocketAddr,
    original_dst: SocketAddr,
) {
    let mut telemetry = ctx.telemetry.outbound(client, original_dst, None, None);
    match connect_direct(client, original_dst, Upstream::Dialled).await {
        Ok(upstream) => {
            telemetry.opened();
            let result = splice_tcp(inbound, upstream, &telemetry, std::future::pending()).await;
            closed([telemetry], &result);
        }
        Err(e) => {
            telemetry.fail(ResponseFlags::ConnectFailed, &e.to_string());
            reset(inbound);
        }
    }
}

/// FNV-1a, 64 bit: the report digest (stable across builds, trivially reimplemented by clients).
pub struct Fnv1a64(u64);

impl Fnv1a64 {
    pub fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    pub fn update(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    pub fn finish(&self) -> u64 {
        self.0
    }
}

impl Default for Fnv1a64 {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_the_published_vectors() {
        let mut h = Fnv1a64::new();
        assert_eq!(h.finish(), 0xcbf29ce484222325);
        h.update(b"a");
        assert_eq!(h.finish(), 0xaf63dc4c8601ec8c);
        let mut h = Fnv1a64::new();
        h.update(b"foobar");
        assert_eq!(h.finish(), 0x85944171f73967e8);
    }
}
