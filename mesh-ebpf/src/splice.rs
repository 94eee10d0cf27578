//! Same-node splicing of pod<->agent hops: both sockets of such a hop join `MESH_SPLICE` when their
//! connection is established, and `mesh_sk_msg` then moves `sendmsg`s straight into the peer
//! socket's receive queue, so the bytes never cross the TCP/IP stack (no segments, no veth).
//!
//! Which connections qualify:
//! - a captured outbound connection: the pod's socket (`mesh_sops_pod`, active side) and the
//!   agent's accepted socket (`mesh_sops_agent`, passive side) both find the flow the tc program
//!   recorded for the SYN in `MESH_FLOWS`;
//! - the agent's delivery to an enrolled pod of this node: the agent's socket (active side) sees the
//!   destination in `MESH_POD_IPS` and leaves a note in `MESH_SPLICE_PEERS`, which the pod's
//!   accepted socket (passive side, established later) finds.
//!
//! **Backpressure.** A redirected send is charged to the receiver only against the global TCP
//! memory limit, never its receive buffer, so a reader that stops would let the queue grow without
//! bound. Each joined socket therefore has a [`SpliceQueue`] (keyed by its kernel address): the
//! sender adds what it redirects or sends over TCP, and `mesh_splice_read` (on the
//! `sock_recv_length` tracepoint, which every `recvmsg` passes) counts what the owner reads.
//! A raw tracepoint, not fentry/fexit: kernels in lockdown (Secure Boot) refuse tracing programs.
//! A send is redirected only while the receiver's redirected-but-unread bytes stay within the
//! bound and every byte sent over TCP has been read; otherwise it takes the TCP path, whose
//! buffers block the writer exactly as without us. The reader takes queued redirected bytes
//! before TCP ones, so switching to TCP never reorders, and switching back waits until TCP is
//! drained.
//!
//! A socket whose send finds no peer to account with (the peer's handshake completion raced
//! behind, or the peer is not ours) stays on TCP for good (`SPLICE_UNTRACKED`).
use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_TCP_CLOSE, sk_action::SK_PASS,
    },
    helpers::bpf_get_netns_cookie,
    macros::{map, raw_tracepoint, sk_msg, sock_ops},
    maps::{Array, HashMap, LruHashMap, SockHash},
    programs::{RawTracePointContext, SkMsgContext, SockOpsContext},
};
use mesh_common::{
    Counter, FlowKey, FlowKind,
    capture::{
        CONFIG_AGENT_NETNS_COOKIE, CONFIG_SLOTS, CONFIG_SPLICE_QUEUE_BYTES, MAX_SPLICED,
        POD_IP_ENROLLED, SPLICE_QUEUE_BYTES, SPLICE_SIDE_AGENT, SPLICE_SIDE_POD, SPLICE_UNTRACKED,
        SpliceKey, SpliceQueue, v4_mapped,
    },
};

use crate::{
    counters,
    maps::{MESH_FLOWS, MESH_POD_IPS, MESH_PODS},
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
/// `recvmsg` flag: the data stays queued.
const MSG_PEEK: i32 = 2;

#[map(name = "MESH_SPLICE")]
static MESH_SPLICE: SockHash<SpliceKey> = SockHash::with_max_entries(MAX_SPLICED, 0);

#[map(name = "MESH_SPLICE_PEERS")]
static MESH_SPLICE_PEERS: LruHashMap<FlowKey, u32> = LruHashMap::with_max_entries(MAX_SPLICED, 0);

/// Settings the agent writes at start (see `CONFIG_*` in mesh-common).
#[map(name = "MESH_CONFIG")]
static MESH_CONFIG: Array<u64> = Array::with_max_entries(CONFIG_SLOTS, 0);

/// Not LRU: an evicted entry would lose the count of unread TCP bytes, and with it the ordering.
#[map(name = "MESH_SPLICE_SOCKETS")]
static MESH_SPLICE_SOCKETS: HashMap<SpliceKey, u64> = HashMap::with_max_entries(MAX_SPLICED, 0);

#[map(name = "MESH_SPLICE_QUEUE")]
static MESH_SPLICE_QUEUE: HashMap<u64, SpliceQueue> = HashMap::with_max_entries(MAX_SPLICED, 0);

/// sock_ops on enrolled pods' cgroups, or once on a cgroup holding every pod of the node
/// (Kubernetes mode: the node's cgroup root, which holds the agent too).
#[sock_ops]
pub fn mesh_sops_pod(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if !handled(op) || in_agent_netns(&ctx) {
        // The agent's own sockets (its program handles them) and host-network processes', which
        // are never a pod's side of a hop.
        return 1;
    }
    let Some(me) = sock_ops_key(&ctx, SPLICE_SIDE_POD) else {
        return 1;
    };
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        // The pod is the client: was this connection captured towards the agent?
        if captured_outbound(&client_view(&me)).is_some() {
            join(&ctx, me);
        }
    } else if op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        // The pod is the server: is the client the agent's delivery socket?
        let flow = client_view(&me.peer());
        // SAFETY: read-only lookup.
        if unsafe { MESH_SPLICE_PEERS.get(&flow) }.is_some() {
            join(&ctx, me);
            let _ = MESH_SPLICE_PEERS.remove(&flow);
        }
    } else if op == BPF_SOCK_OPS_STATE_CB {
        leave_if_closed(&ctx, &me);
    }
    1
}

/// sock_ops on the agent's own cgroup.
#[sock_ops]
pub fn mesh_sops_agent(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if !handled(op) {
        return 1;
    }
    let Some(me) = sock_ops_key(&ctx, SPLICE_SIDE_AGENT) else {
        return 1;
    };
    if op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        // Accepted from the outbound listener, from a pod of this node.
        if let Some(ifindex) = captured_outbound(&client_view(&me.peer()))
            // SAFETY: read-only lookup.
            && unsafe { MESH_PODS.get(&ifindex) }.is_some()
        {
            join(&ctx, me);
        }
    } else if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        // Delivering to an enrolled pod of this node.
        // SAFETY: read-only lookup.
        let enrolled =
            unsafe { MESH_POD_IPS.get(&me.remote) }.is_some_and(|e| e.flags & POD_IP_ENROLLED != 0);
        if enrolled && join(&ctx, me) {
            let _ = MESH_SPLICE_PEERS.insert(&client_view(&me), &1, 0);
        }
    } else if op == BPF_SOCK_OPS_STATE_CB {
        leave_if_closed(&ctx, &me);
    }
    1
}

/// sk_msg verdict on every socket in `MESH_SPLICE`.
#[sk_msg]
pub fn mesh_sk_msg(ctx: SkMsgContext) -> u32 {
    // Our side: agent sockets live in the agent's network namespace, pod sockets in pods'.
    // SAFETY: helper on the valid context; map read copied out.
    let netns = unsafe { bpf_get_netns_cookie(ctx.msg as *mut _) };
    let side = if is_agent_netns(netns) {
        SPLICE_SIDE_AGENT
    } else {
        SPLICE_SIDE_POD
    };
    let Some(me) = sk_msg_key(&ctx, side) else {
        return SK_PASS;
    };
    // SAFETY: read-only lookups, values copied.
    let Some(own) = (unsafe { MESH_SPLICE_SOCKETS.get(&me) }).copied() else {
        return SK_PASS;
    };
    let Some(own) = MESH_SPLICE_QUEUE.get_ptr_mut(&own) else {
        return SK_PASS;
    };
    // SAFETY: map value pointer; `flags` is written only by this socket's sends, which the kernel
    // serialises (socket lock).
    if unsafe { (*own).flags } & SPLICE_UNTRACKED != 0 {
        return SK_PASS;
    }
    let size = u64::from(ctx.size());
    // SAFETY: read-only lookup, value copied.
    let peer = unsafe { MESH_SPLICE_SOCKETS.get(&me.peer()) }
        .copied()
        .and_then(|sk_addr| MESH_SPLICE_QUEUE.get_ptr_mut(&sk_addr));
    let Some(peer) = peer else {
        // SAFETY: as above.
        unsafe { (*own).flags |= SPLICE_UNTRACKED };
        counters::add(Counter::SpliceFallbacks, 1);
        return SK_PASS;
    };
    let bound = match MESH_CONFIG.get(CONFIG_SPLICE_QUEUE_BYTES).copied() {
        Some(b) if b > 0 => b,
        _ => SPLICE_QUEUE_BYTES,
    };
    // SAFETY: map value pointer, valid for this run; the `*_sent` fields are this sender's (see
    // `SpliceQueue`), the `*_read` ones are read whole (aligned u64) while the reader updates them.
    unsafe {
        let q = peer;
        let spliced_sent = read_volatile(&raw const (*q).spliced_sent);
        let queued = spliced_sent.wrapping_sub(read_volatile(&raw const (*q).spliced_read));
        let tcp_sent = read_volatile(&raw const (*q).tcp_sent);
        let tcp_drained = tcp_sent == read_volatile(&raw const (*q).tcp_read);
        if tcp_drained && queued + size <= bound {
            // Counted before the bytes are queued, so the reader never reads more than is counted.
            write_volatile(&raw mut (*q).spliced_sent, spliced_sent + size);
            let verdict = MESH_SPLICE.redirect_msg(&ctx, me.peer(), u64::from(BPF_F_INGRESS));
            if verdict == i64::from(SK_PASS) {
                counters::add(Counter::SplicedMessages, 1);
                counters::add(Counter::SplicedBytes, size);
                return SK_PASS;
            }
            // The peer left the sockhash (closing): the bytes go by TCP.
            write_volatile(&raw mut (*q).spliced_sent, spliced_sent);
        } else {
            counters::add(Counter::SpliceDeferredMessages, 1);
            counters::add(Counter::SpliceDeferredBytes, size);
        }
        write_volatile(&raw mut (*q).tcp_sent, tcp_sent + size);
    }
    SK_PASS
}

/// `sock_recv_length(struct sock *sk, int ret, int flags)`, at the end of every `recvmsg`: what the
/// owner of a spliced socket read, by path. The sockmap queue is read before TCP's and a read never takes
/// from both, so a read with redirected bytes unread took only those; and no send is redirected
/// while TCP bytes are counted unread, so a read that took TCP bytes finds none redirected.
#[raw_tracepoint(tracepoint = "sock_recv_length")]
pub fn mesh_splice_read(ctx: RawTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    let read: i32 = ctx.arg(1);
    let flags: i32 = ctx.arg(2);
    if read <= 0 || flags & MSG_PEEK != 0 {
        return 0;
    }
    let Some(q) = MESH_SPLICE_QUEUE.get_ptr_mut(&sk) else {
        return 0;
    };
    let read = read as u64;
    // SAFETY: map value pointer; the `*_read` fields are this reader's.
    unsafe {
        let spliced_read = read_volatile(&raw const (*q).spliced_read);
        let queued = read_volatile(&raw const (*q).spliced_sent).wrapping_sub(spliced_read);
        let from_splice = read.min(queued);
        if from_splice > 0 {
            write_volatile(&raw mut (*q).spliced_read, spliced_read + from_splice);
        }
        let tcp_read = read_volatile(&raw const (*q).tcp_read);
        let unread_tcp = read_volatile(&raw const (*q).tcp_sent).wrapping_sub(tcp_read);
        let from_tcp = (read - from_splice).min(unread_tcp);
        if from_tcp > 0 {
            write_volatile(&raw mut (*q).tcp_read, tcp_read + from_tcp);
        }
    }
    0
}

/// The sock_ops callbacks the splice acts on (the others are left before reading any field).
#[inline(always)]
fn handled(op: u32) -> bool {
    op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
        || op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB
        || op == BPF_SOCK_OPS_STATE_CB
}

/// Puts the socket in `MESH_SPLICE` with an empty queue, and asks for its state changes (to forget
/// it at close). False when a map is full: the socket then stays on TCP.
#[inline(always)]
fn join(ctx: &SockOpsContext, mut me: SpliceKey) -> bool {
    let Some(sk_addr) = sock_address(ctx) else {
        return false;
    };
    if MESH_SPLICE_QUEUE
        .insert(&sk_addr, &SpliceQueue::default(), u64::from(BPF_ANY))
        .is_err()
    {
        return false;
    }
    // SAFETY: the context pointer is the kernel's bpf_sock_ops for this callback.
    let ops = unsafe { &mut *ctx.ops };
    if MESH_SPLICE
        .update(&mut me, ops, u64::from(BPF_ANY))
        .is_err()
    {
        let _ = MESH_SPLICE_QUEUE.remove(&sk_addr);
        return false;
    }
    if MESH_SPLICE_SOCKETS
        .insert(&me, &sk_addr, u64::from(BPF_ANY))
        .is_err()
    {
        // In the sockhash but unknown to senders: they fall back to TCP (untracked).
        let _ = MESH_SPLICE_QUEUE.remove(&sk_addr);
        return false;
    }
    // SAFETY: field read off the valid context.
    let flags = unsafe { core::ptr::read_volatile(&raw const (*ctx.ops).bpf_sock_ops_cb_flags) };
    let _ = ctx.set_cb_flags((flags | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    true
}

/// At `TCP_CLOSE`, drops the socket's entries (the sockhash drops the socket by itself).
#[inline(always)]
fn leave_if_closed(ctx: &SockOpsContext, me: &SpliceKey) {
    // SAFETY: field read off the valid context (args[1] of a state callback: the new state).
    let new_state =
        unsafe { core::ptr::read_volatile(&raw const (*ctx.ops).__bindgen_anon_1.args[1]) };
    if new_state != BPF_TCP_CLOSE {
        return;
    }
    let Some(sk_addr) = sock_address(ctx) else {
        return;
    };
    // SAFETY: read-only lookup, value copied.
    if unsafe { MESH_SPLICE_SOCKETS.get(me) }.copied() == Some(sk_addr) {
        let _ = MESH_SPLICE_SOCKETS.remove(me);
    }
    let _ = MESH_SPLICE_QUEUE.remove(&sk_addr);
}

/// The socket's kernel address: the key the `sock_recv_length` tracepoint can match (it passes no
/// cookie). Unique while the socket lives; its entries leave at `TCP_CLOSE`, before the memory can
/// be reused. Storing it needs CAP_PERFMON (the verifier's pointer-leak rule).
#[inline(always)]
fn sock_address(ctx: &SockOpsContext) -> Option<u64> {
    // SAFETY: field read off the valid context.
    let sk = unsafe { core::ptr::read_volatile(&raw const (*ctx.ops).__bindgen_anon_2.sk) };
    (!sk.is_null()).then_some(sk as u64)
}

/// The ifindex recorded for a captured outbound flow, if this is one.
#[inline(always)]
fn captured_outbound(flow: &FlowKey) -> Option<u32> {
    // SAFETY: read-only lookup, value copied.
    let info = unsafe { MESH_FLOWS.get(flow) }.copied()?;
    (info.kind == FlowKind::Outbound as u32).then_some(info.ifindex)
}

/// The flow key of a connection from the point of view of its client, given the client socket.
#[inline(always)]
fn client_view(client: &SpliceKey) -> FlowKey {
    FlowKey {
        src: client.local,
        dst: client.remote,
        sport: client.local_port,
        dport: client.remote_port,
    }
}

/// `remote_port` is network order in the upper 16 bits (DESIGN.md §3); `local_port` host order.
#[inline(always)]
fn ports(local: u32, remote: u32) -> (u16, u16) {
    (local as u16, u16::from_be((remote >> 16) as u16))
}

#[inline(always)]
fn ip6(words: [u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    out
}

/// The socket fields of a sock_ops or sk_msg context, read with volatile loads straight off the
/// context pointer: the verifier rejects the offset context pointers the optimiser otherwise makes.
struct SockFields {
    family: u32,
    local_ip4: u32,
    remote_ip4: u32,
    local_ip6: [u32; 4],
    remote_ip6: [u32; 4],
    local_port: u32,
    remote_port: u32,
}

macro_rules! read_sock_fields {
    ($ptr:expr) => {{
        let p = $ptr;
        // SAFETY: `p` is the kernel's context for this program; each field is read once.
        unsafe {
            use core::ptr::{addr_of, read_volatile};
            SockFields {
                family: read_volatile(addr_of!((*p).family)),
                local_ip4: read_volatile(addr_of!((*p).local_ip4)),
                remote_ip4: read_volatile(addr_of!((*p).remote_ip4)),
                local_ip6: [
                    read_volatile(addr_of!((*p).local_ip6[0])),
                    read_volatile(addr_of!((*p).local_ip6[1])),
                    read_volatile(addr_of!((*p).local_ip6[2])),
                    read_volatile(addr_of!((*p).local_ip6[3])),
                ],
                remote_ip6: [
                    read_volatile(addr_of!((*p).remote_ip6[0])),
                    read_volatile(addr_of!((*p).remote_ip6[1])),
                    read_volatile(addr_of!((*p).remote_ip6[2])),
                    read_volatile(addr_of!((*p).remote_ip6[3])),
                ],
                local_port: read_volatile(addr_of!((*p).local_port)),
                remote_port: read_volatile(addr_of!((*p).remote_port)),
            }
        }
    }};
}

#[inline(always)]
fn key_of(f: &SockFields, side: u32) -> Option<SpliceKey> {
    let (local_port, remote_port) = ports(f.local_port, f.remote_port);
    let (local, remote) = match f.family {
        AF_INET => (
            v4_mapped(f.local_ip4.to_ne_bytes()),
            v4_mapped(f.remote_ip4.to_ne_bytes()),
        ),
        AF_INET6 => (ip6(f.local_ip6), ip6(f.remote_ip6)),
        _ => return None,
    };
    Some(SpliceKey {
        local,
        remote,
        local_port,
        remote_port,
        side,
    })
}

/// Whether the socket lives in the agent's network namespace (the node's).
#[inline(always)]
fn in_agent_netns(ctx: &SockOpsContext) -> bool {
    // SAFETY: helper on the valid context; map read copied out.
    let netns = unsafe { bpf_get_netns_cookie(ctx.ops as *mut _) };
    is_agent_netns(netns)
}

/// Whether netns cookie `netns` is the agent's (written to `MESH_CONFIG` at start; unset: no).
#[inline(always)]
fn is_agent_netns(netns: u64) -> bool {
    let agent_netns = MESH_CONFIG
        .get(CONFIG_AGENT_NETNS_COOKIE)
        .copied()
        .unwrap_or(0);
    agent_netns != 0 && netns == agent_netns
}

#[inline(always)]
fn sock_ops_key(ctx: &SockOpsContext, side: u32) -> Option<SpliceKey> {
    key_of(&read_sock_fields!(ctx.ops), side)
}

#[inline(always)]
fn sk_msg_key(ctx: &SkMsgContext, side: u32) -> Option<SpliceKey> {
    key_of(&read_sock_fields!(ctx.msg), side)
}
