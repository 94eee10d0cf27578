//! Same-node splicing of pod<->agent hops: both sockets of such a hop join `MESH_SPLICE` when their
//! connection is established, and `mesh_sk_msg` then moves every `sendmsg` straight into the peer
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
//! A socket whose first send finds no peer in the map (the peer's handshake completion raced
//! ahead) stays on TCP for good: switching paths mid-stream could reorder bytes.
use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, sk_action::SK_PASS,
    },
    helpers::bpf_get_netns_cookie,
    macros::{map, sk_msg, sock_ops},
    maps::{Array, LruHashMap, SockHash},
    programs::{SkMsgContext, SockOpsContext},
};
use mesh_common::{
    Counter, FlowKey, FlowKind,
    capture::{
        CONFIG_AGENT_NETNS_COOKIE, CONFIG_SLOTS, MAX_SPLICED, POD_IP_ENROLLED, SPLICE_SIDE_AGENT,
        SPLICE_SIDE_POD, SPLICE_STATE_OFF, SPLICE_STATE_ON, SpliceKey, v4_mapped,
    },
};

use crate::{
    counters,
    maps::{MESH_FLOWS, MESH_POD_IPS, MESH_PODS},
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

#[map(name = "MESH_SPLICE")]
static MESH_SPLICE: SockHash<SpliceKey> = SockHash::with_max_entries(MAX_SPLICED, 0);

#[map(name = "MESH_SPLICE_PEERS")]
static MESH_SPLICE_PEERS: LruHashMap<FlowKey, u32> = LruHashMap::with_max_entries(MAX_SPLICED, 0);

/// Settings the agent writes at start (see `CONFIG_*` in mesh-common).
#[map(name = "MESH_CONFIG")]
static MESH_CONFIG: Array<u64> = Array::with_max_entries(CONFIG_SLOTS, 0);

#[map(name = "MESH_SPLICE_STATE")]
static MESH_SPLICE_STATE: LruHashMap<SpliceKey, u32> = LruHashMap::with_max_entries(MAX_SPLICED, 0);

/// sock_ops on enrolled pods' cgroups.
#[sock_ops]
pub fn mesh_sops_pod(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
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
    } else {
        // The pod is the server: is the client the agent's delivery socket?
        let flow = client_view(&me.peer());
        // SAFETY: read-only lookup.
        if unsafe { MESH_SPLICE_PEERS.get(&flow) }.is_some() {
            join(&ctx, me);
            let _ = MESH_SPLICE_PEERS.remove(&flow);
        }
    }
    1
}

/// sock_ops on the agent's own cgroup.
#[sock_ops]
pub fn mesh_sops_agent(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
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
    } else {
        // Delivering to an enrolled pod of this node.
        // SAFETY: read-only lookup.
        let enrolled =
            unsafe { MESH_POD_IPS.get(&me.remote) }.is_some_and(|e| e.flags & POD_IP_ENROLLED != 0);
        if enrolled {
            join(&ctx, me);
            let _ = MESH_SPLICE_PEERS.insert(&client_view(&me), &1, 0);
        }
    }
    1
}

/// sk_msg verdict on every socket in `MESH_SPLICE`.
#[sk_msg]
pub fn mesh_sk_msg(ctx: SkMsgContext) -> u32 {
    // Our side: agent sockets live in the agent's network namespace, pod sockets in pods'.
    // SAFETY: helper on the valid context; map read copied out.
    let netns = unsafe { bpf_get_netns_cookie(ctx.msg as *mut _) };
    let agent_netns = MESH_CONFIG
        .get(CONFIG_AGENT_NETNS_COOKIE)
        .copied()
        .unwrap_or(0);
    let side = if agent_netns != 0 && netns == agent_netns {
        SPLICE_SIDE_AGENT
    } else {
        SPLICE_SIDE_POD
    };
    let Some(me) = sk_msg_key(&ctx, side) else {
        return SK_PASS;
    };
    // SAFETY: read-only lookup, value copied.
    let state = unsafe { MESH_SPLICE_STATE.get(&me) }.copied();
    if state == Some(SPLICE_STATE_OFF) {
        return SK_PASS;
    }
    let size = u64::from(ctx.size());
    let verdict = MESH_SPLICE.redirect_msg(&ctx, me.peer(), u64::from(BPF_F_INGRESS));
    if verdict == i64::from(SK_PASS) {
        if state.is_none() {
            let _ = MESH_SPLICE_STATE.insert(&me, &SPLICE_STATE_ON, 0);
        }
        counters::add(Counter::SplicedMessages, 1);
        counters::add(Counter::SplicedBytes, size);
    } else if state.is_none() {
        let _ = MESH_SPLICE_STATE.insert(&me, &SPLICE_STATE_OFF, 0);
        counters::add(Counter::SpliceFallbacks, 1);
    }
    // Not redirected: the bytes take the TCP path as if we were not here.
    SK_PASS
}

#[inline(always)]
fn join(ctx: &SockOpsContext, mut me: SpliceKey) {
    let _ = MESH_SPLICE_STATE.remove(&me);
    // SAFETY: the context pointer is the kernel's bpf_sock_ops for this callback.
    let ops = unsafe { &mut *ctx.ops };
    let _ = MESH_SPLICE.update(&mut me, ops, u64::from(BPF_ANY));
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

#[inline(always)]
fn sock_ops_key(ctx: &SockOpsContext, side: u32) -> Option<SpliceKey> {
    key_of(&read_sock_fields!(ctx.ops), side)
}

#[inline(always)]
fn sk_msg_key(ctx: &SkMsgContext, side: u32) -> Option<SpliceKey> {
    key_of(&read_sock_fields!(ctx.msg), side)
}
