//! HBONE: one HTTP/2 CONNECT stream per proxied TCP connection, over mutual TLS between workload
//! identities, to `<destination pod IP>:15008` (DESIGN.md §5; wire-compatible with ztunnel).
//! [`server`] terminates it on the destination node, [`client`] opens it (pooled) on the source
//! node, [`relay`] moves the bytes with TCP semantics.

use std::{
    future::Future,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::Arc,
};

use tokio::net::TcpStream;

pub mod client;
pub mod forwarded;
pub mod limits;
pub mod relay;
pub mod server;
pub mod stream_io;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_early;
#[cfg(test)]
mod tests_limits;

/// HTTP/2 settings both ends use (ztunnel's): 4 MiB per stream, 16 MiB per connection, 1 MiB
/// frames.
pub const STREAM_WINDOW: u32 = 4 << 20;
pub const CONNECTION_WINDOW: u32 = 16 << 20;
pub const MAX_FRAME: u32 = 1 << 20;
/// Streams per pooled connection before another connection is opened.
pub const MAX_STREAMS_PER_CONNECTION: usize = 100;
/// SETTINGS_MAX_CONCURRENT_STREAMS the server advertises: ztunnel's (hyper's default), 200.
/// Our pool opens at most [`MAX_STREAMS_PER_CONNECTION`] on one connection, ztunnel's pool up to
/// its `pool_max_streams_per_conn` (100), so neither meets it in normal operation.
pub const SERVER_MAX_CONCURRENT_STREAMS: u32 = 200;
/// SETTINGS_MAX_HEADER_LIST_SIZE the server advertises and enforces: ztunnel's 64 KiB (h2's
/// default is 16 MiB). A CONNECT carries a few hundred bytes; a larger list is answered 431 and
/// the stream reset by h2, the connection's other streams unaffected.
pub const SERVER_MAX_HEADER_LIST: u32 = 64 << 10;
/// SETTINGS_MAX_HEADER_LIST_SIZE the client advertises: ztunnel's 16 KiB (a response to CONNECT
/// carries a status and `baggage`).
pub const CLIENT_MAX_HEADER_LIST: u32 = 16 << 10;

/// Response header of our HBONE server's 200 (value `1`): "on this connection, send a stream's
/// first bytes with its CONNECT, before the 200". HTTP/2 allows a request's DATA before its
/// response; HBONE peers (ztunnel) wait for the 200, so our client does so too until the server
/// it talks to said this. A peer that never says it (ztunnel) never gets early data.
pub const EARLY_DATA_HEADER: &str = "x-mesh-early-data";
/// At most this many of a connection's first bytes travel with its CONNECT: one read of what
/// the client had sent when the stream opened (a request, a TLS ClientHello).
pub const EARLY_DATA_MAX: usize = 16 << 10;

/// How either end opens TCP on behalf of a client: `connect(client_ip, addr)` — the client
/// towards `<pod>:15008`, the server towards the destination pod. The agent connects
/// transparently from `client_ip`; tests connect plainly.
pub type Connector = Arc<
    dyn Fn(IpAddr, SocketAddr) -> Pin<Box<dyn Future<Output = std::io::Result<TcpStream>> + Send>>
        + Send
        + Sync,
>;
