//! The kernel side of the data path as seen from userspace: the embedded eBPF object, loading it,
//! attaching its programs and reading its maps.

mod counters;
mod datapath;
mod enrollment;
mod error;
mod lookup;
mod node_addrs;
pub mod raw;
mod splice;
mod tc;

pub use counters::{CounterSnapshot, read_counters};
pub use datapath::{Datapath, ObjectEntry};
pub use enrollment::{Enrollment, addrs_of, ifindex_of, ip_from_key, ip_key, pod_addrs};
pub use error::DatapathError;
pub use lookup::NetnsAttachment;
pub use node_addrs::{NodeAddrsChange, node_addresses};
pub use splice::CgroupAttachment;
pub use tc::{TcAttachment, TcHook};

/// The compiled `mesh-ebpf` object (ELF with BTF), embedded at build time by build.rs.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh"));

/// Names of the programs in [`OBJECT`], as `bpftool prog show` lists them.
pub mod programs {
    /// tc program that counts frames by family and size and never changes their fate.
    pub const TC_OBSERVE: &str = "mesh_tc_observe";
    /// tc program on an enrolled pod's host interface (ingress: what the pod sends).
    pub const TC_FROM_POD: &str = "mesh_tc_from_pod";
    /// tc program on every other way into the node (uplinks, non-enrolled pods' interfaces):
    /// captures TCP addressed to enrolled pods.
    pub const TC_TO_PODS: &str = "mesh_tc_to_pods";
    /// Every tc program, for verification.
    pub const ALL_TC: [&str; 3] = [TC_OBSERVE, TC_FROM_POD, TC_TO_PODS];
    /// sock_ops on enrolled pods' cgroups: their captured sockets join the splice.
    pub const SOCK_OPS_POD: &str = "mesh_sops_pod";
    /// sock_ops on the agent's own cgroup: its pod-facing sockets join the splice.
    pub const SOCK_OPS_AGENT: &str = "mesh_sops_agent";
    /// sk_msg verdict on the splice sockhash: moves sends socket to socket.
    pub const SK_MSG: &str = "mesh_sk_msg";
    /// Raw tracepoint on [`SPLICE_READ_TRACEPOINT`]: what the owner of a spliced socket reads
    /// leaves its splice queue count (the splice's backpressure).
    pub const SPLICE_READ: &str = "mesh_splice_read";
    /// Passed at the end of every `recvmsg` (Linux ≥ 6.3).
    pub const SPLICE_READ_TRACEPOINT: &str = "sock_recv_length";
    /// sk_lookup on the node's network namespace: the listener for captured SYNs that TCP's
    /// TIME_WAIT handling looks up itself.
    pub const SK_LOOKUP: &str = "mesh_sk_lookup";
    /// Every sock_ops program.
    pub const ALL_SOCK_OPS: [&str; 2] = [SOCK_OPS_POD, SOCK_OPS_AGENT];
}

/// Names of the maps in [`OBJECT`]; all of them are pinned when the agent runs with a bpffs dir.
pub const MAPS: [&str; 12] = [
    mesh_common::COUNTERS_MAP,
    mesh_common::PODS_MAP,
    mesh_common::capture::POD_IPS_MAP,
    mesh_common::capture::FLOWS_MAP,
    mesh_common::capture::CAPTURED_MAP,
    mesh_common::capture::SPLICE_MAP,
    mesh_common::capture::SPLICE_PEERS_MAP,
    mesh_common::capture::SPLICE_SOCKETS_MAP,
    mesh_common::capture::SPLICE_QUEUE_MAP,
    mesh_common::capture::CONFIG_MAP,
    mesh_common::capture::LISTENERS_MAP,
    mesh_common::capture::NODE_ADDRS_MAP,
];
