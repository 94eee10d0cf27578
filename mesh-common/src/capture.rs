//! Capture contract between the tc programs and the agent: listener ports, the routing mark, and
//! the flow table that tells the agent which pod a captured connection came from.

/// Agent listener for TCP captured leaving an enrolled pod (ztunnel's port).
pub const PORT_OUTBOUND: u16 = 15001;
/// Agent listener for plaintext TCP captured on its way to an enrolled pod.
pub const PORT_INBOUND_PLAINTEXT: u16 = 15006;
/// Agent listener for HBONE: TCP to `<enrolled pod IP>:15008`.
pub const PORT_INBOUND_HBONE: u16 = 15008;

/// skb mark bit set on every packet the tc programs steer to a local agent socket. The agent's
/// policy-routing rule (`fwmark MARK/MARK lookup ROUTE_TABLE`, table holding `local default dev lo`)
/// makes the node deliver such packets locally although their destination is not a node address.
pub const MARK_DELIVER_LOCAL: u32 = 0x0000_2000;
/// Routing table the agent fills with the `local` default routes for [`MARK_DELIVER_LOCAL`].
pub const ROUTE_TABLE: u32 = 2000;
/// Priority of the agent's `ip rule`s: ahead of `main` (32766), behind `local` (0).
pub const RULE_PRIORITY: u32 = 2000;

/// Name of the LRU hash [`FlowKey`] -> [`FlowInfo`] written when a connection is captured.
pub const FLOWS_MAP: &str = "MESH_FLOWS";
/// Capacity of [`FLOWS_MAP`]: connections captured but not yet accepted by the agent. LRU, so a
/// flood evicts the oldest unaccepted entries (the agent then refuses those connections).
pub const MAX_FLOWS: u32 = 65_536;

/// Name of the LRU hash [`FlowKey`] -> `u32` (unused) of connections the agent holds, as their
/// segments are seen at the hook that checks them: written for every captured SYN and for the
/// SYN-ACK a pod answers an agent's connection with. A later segment of such a connection that
/// no live socket holds (the agent was killed, or it closed the connection first) is dropped
/// instead of passing uncaptured: the application's plaintext never leaves the node.
pub const CAPTURED_MAP: &str = "MESH_CAPTURED";
/// Capacity of [`CAPTURED_MAP`]. LRU: on a node holding more connections than this, the oldest
/// are forgotten, and their segments after an agent's death pass as before.
pub const MAX_CAPTURED: u32 = 65_536;

/// Name of the sockmap holding the agent's capture listeners, at [`listener_slot`]: where
/// `mesh_sk_lookup` finds the listener for a captured SYN the kernel looks up itself (one whose
/// tuple meets an agent socket in TIME_WAIT).
pub const LISTENERS_MAP: &str = "MESH_LISTENERS";
/// Capacity of [`LISTENERS_MAP`].
pub const LISTENER_SLOTS: u32 = 8;

/// The [`LISTENERS_MAP`] slot of the listener for `kind` (a [`FlowKind`] value) and family.
pub const fn listener_slot(kind: u32, ipv6: bool) -> u32 {
    kind * 2 + ipv6 as u32
}

/// Name of the hash map pod address (v4-mapped for IPv4) -> [`PodIpEntry`], for pods of this node
/// that are enrolled or were enrolled and may still have connections through the agent.
pub const POD_IPS_MAP: &str = "MESH_POD_IPS";

/// [`PodIpEntry::flags`]: the pod is enrolled; new connections to it are captured.
pub const POD_IP_ENROLLED: u32 = 1;

/// A local pod address the tc programs must look at. Without [`POD_IP_ENROLLED`] the pod is
/// draining: its connections that the agent already owns keep flowing through the agent, new ones
/// are not captured.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodIpEntry {
    pub ifindex: u32,
    pub flags: u32,
}

/// Why a connection was captured: which listener it was handed to.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowKind {
    Outbound = 1,
    InboundPlaintext = 2,
    InboundHbone = 3,
}

impl FlowKind {
    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(FlowKind::Outbound),
            2 => Some(FlowKind::InboundPlaintext),
            3 => Some(FlowKind::InboundHbone),
            _ => None,
        }
    }

    /// The agent listener this kind of flow is handed to.
    pub const fn port(self) -> u16 {
        match self {
            FlowKind::Outbound => PORT_OUTBOUND,
            FlowKind::InboundPlaintext => PORT_INBOUND_PLAINTEXT,
            FlowKind::InboundHbone => PORT_INBOUND_HBONE,
        }
    }
}

/// A TCP connection as the client sees it. Addresses are 16 bytes, IPv4 as `::ffff:a.b.c.d`;
/// ports in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
}

/// What the tc program knew when it captured the connection's SYN.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowInfo {
    /// Interface the SYN arrived on. For outbound flows this is the source pod's host interface:
    /// the unforgeable identity of the client.
    pub ifindex: u32,
    /// A [`FlowKind`].
    pub kind: u32,
}

/// `::ffff:a.b.c.d`, the 16-byte form IPv4 addresses take in [`FlowKey`] and [`POD_IPS_MAP`].
pub const fn v4_mapped(v4: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}

// SAFETY: repr(C), integer arrays and u16s, no padding (16 + 16 + 2 + 2 = 36 bytes, align 2).
#[cfg(feature = "user")]
unsafe impl aya::Pod for FlowKey {}
// SAFETY: repr(C), two u32s, no padding.
#[cfg(feature = "user")]
unsafe impl aya::Pod for FlowInfo {}
// SAFETY: repr(C), two u32s, no padding.
#[cfg(feature = "user")]
unsafe impl aya::Pod for PodIpEntry {}

/// Name of the hash of this node's own addresses (16-byte keys as [`FlowKey`]'s -> u32, unused):
/// a pod's SYN to one of them is left to the node's stack (so node services see the pod's own
/// address) unless it is for an agent port, which is dropped. Filled and kept current by the agent.
pub const NODE_ADDRS_MAP: &str = "MESH_NODE_ADDRS";
/// Capacity of [`NODE_ADDRS_MAP`]: every address of every interface of the node (pod gateways
/// included), with room to spare.
pub const MAX_NODE_ADDRS: u32 = 4096;
/// The admin API's port (localhost only, never reachable from a pod).
pub const PORT_ADMIN: u16 = 15000;
/// DNS proxy port (reserved, as ztunnel's).
pub const PORT_DNS: u16 = 15053;

/// Ports of the node's own addresses a pod must never reach: the admin API and the capture
/// listeners (a pod connecting to them directly would make the agent serve a connection the
/// capture never saw). Metrics (15020) and readiness (15021) stay reachable: Prometheus and
/// health checkers may be pods.
pub const fn is_agent_port(port: u16) -> bool {
    matches!(
        port,
        PORT_ADMIN | PORT_OUTBOUND | PORT_INBOUND_PLAINTEXT | PORT_INBOUND_HBONE | PORT_DNS
    )
}

/// Name of the sockhash of spliced sockets, keyed by [`SpliceKey`].
pub const SPLICE_MAP: &str = "MESH_SPLICE";
/// Name of the LRU hash of agent->pod connections whose pod end may join the splice
/// ([`FlowKey`] as the agent's socket is the client -> u32).
pub const SPLICE_PEERS_MAP: &str = "MESH_SPLICE_PEERS";
/// Name of the hash [`SpliceKey`] -> kernel socket address of every socket in [`SPLICE_MAP`]: how a
/// sender finds its peer's [`SpliceQueue`]. Entries leave when the socket closes.
pub const SPLICE_SOCKETS_MAP: &str = "MESH_SPLICE_SOCKETS";
/// Name of the hash kernel socket address -> [`SpliceQueue`] of every socket in [`SPLICE_MAP`]
/// (the address, not the cookie: the tracepoint that counts reads passes only the address).
pub const SPLICE_QUEUE_MAP: &str = "MESH_SPLICE_QUEUE";
/// Capacity of the splice maps.
pub const MAX_SPLICED: u32 = 65_536;
/// Default bound on the bytes redirected into one socket and not yet read by its owner
/// (`CONFIG_SPLICE_QUEUE_BYTES` overrides it). Sends beyond it take the TCP path, whose own
/// buffers then push back on the writer.
pub const SPLICE_QUEUE_BYTES: u64 = 4 << 20;
/// The largest message one `sendmsg` hands an sk_msg program: the kernel builds it from at most
/// `MAX_SKB_FRAGS` fragments (17 by default, 45 at most: `CONFIG_MAX_SKB_FRAGS`) of the
/// socket's page fragment, at most 32 KiB each. So a connection's first
/// `SPLICE_QUEUE_BYTES - MAX_SK_MSG_BYTES` bytes are always spliced.
pub const MAX_SK_MSG_BYTES: u64 = 45 * (32 << 10);
/// [`SpliceQueue::flags`]: this socket sent bytes the splice could not account for (its peer
/// was not spliceable yet): it stays on TCP for good.
pub const SPLICE_UNTRACKED: u64 = 1;

/// What a spliced socket has been sent and has read, by path, as running totals. Each field has
/// one writer (its sender's sends, serialised by the socket lock, or its owner's reads), so plain
/// loads and stores suffice: the BPF target has no atomic read-modify-write in `core`. A send is
/// redirected only while `tcp_sent == tcp_read` (every byte sent over TCP has been read, so a
/// redirected byte cannot overtake one) and `spliced_sent - spliced_read` stays within the bound.
/// A lost update between two concurrent readers can only under-count reads: more TCP, never
/// reordering or more queued.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpliceQueue {
    /// Bytes redirected into this socket's sockmap queue.
    pub spliced_sent: u64,
    /// Of those, bytes its owner has read.
    pub spliced_read: u64,
    /// Bytes its peer sent over TCP while both were spliced.
    pub tcp_sent: u64,
    /// Of those, bytes its owner has read.
    pub tcp_read: u64,
    /// [`SPLICE_UNTRACKED`] (about this socket as a sender).
    pub flags: u64,
}

// SAFETY: repr(C), five u64s, no padding.
#[cfg(feature = "user")]
unsafe impl aya::Pod for SpliceQueue {}

/// [`SpliceKey::side`] of a pod's socket.
pub const SPLICE_SIDE_POD: u32 = 1;
/// [`SpliceKey::side`] of an agent's socket.
pub const SPLICE_SIDE_AGENT: u32 = 2;

/// Name of the array holding the agent's configuration for the programs; slot
/// [`CONFIG_AGENT_NETNS_COOKIE`] is the agent's network-namespace cookie.
pub const CONFIG_MAP: &str = "MESH_CONFIG";
/// Slot of [`CONFIG_MAP`]: the agent's netns cookie (tells sk_msg which side a socket is on).
pub const CONFIG_AGENT_NETNS_COOKIE: u32 = 0;
/// Slot of [`CONFIG_MAP`]: the splice queue bound in bytes (0: [`SPLICE_QUEUE_BYTES`]).
pub const CONFIG_SPLICE_QUEUE_BYTES: u32 = 1;
/// Slots of [`CONFIG_MAP`].
pub const CONFIG_SLOTS: u32 = 8;

/// A socket as seen from itself: local and remote address (IPv4 v4-mapped), ports (host order),
/// and which side of a pod<->agent hop it is. The side keeps the two ends apart even when the
/// agent's transparent socket happens to have the same 4-tuple as a pod's own socket (both use
/// the pod's address; their ports come from different network namespaces).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SpliceKey {
    pub local: [u8; 16],
    pub remote: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
    /// [`SPLICE_SIDE_POD`] or [`SPLICE_SIDE_AGENT`].
    pub side: u32,
}

impl SpliceKey {
    /// The key of the socket at the other end of the same connection (the other side).
    pub const fn peer(&self) -> SpliceKey {
        SpliceKey {
            local: self.remote,
            remote: self.local,
            local_port: self.remote_port,
            remote_port: self.local_port,
            side: if self.side == SPLICE_SIDE_POD {
                SPLICE_SIDE_AGENT
            } else {
                SPLICE_SIDE_POD
            },
        }
    }
}

// SAFETY: repr(C), integer arrays, u16s and a u32, no padding (40 bytes, align 4).
#[cfg(feature = "user")]
unsafe impl aya::Pod for SpliceKey {}
