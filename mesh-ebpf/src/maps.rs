//! Maps shared by several programs. The agent pins every map under its bpffs directory, so the
//! state (enrolments, captured flows, counters) survives an agent restart.
use aya_ebpf::{
    macros::map,
    maps::{HashMap, LruHashMap, SockMap},
};
use mesh_common::{
    FlowInfo, FlowKey, PodAddrs, PodIpEntry,
    capture::{LISTENER_SLOTS, MAX_CAPTURED, MAX_FLOWS, MAX_NODE_ADDRS},
    pods::MAX_PODS,
};

/// Enrolled pods by host-interface ifindex. Not in the map = not enrolled = untouched.
#[map(name = "MESH_PODS")]
pub static MESH_PODS: HashMap<u32, PodAddrs> = HashMap::with_max_entries(MAX_PODS, 0);

/// Local pods' addresses (IPv4 v4-mapped): "is this an enrolled (or draining) pod of this node?"
/// for traffic arriving from the network or from other pods.
#[map(name = "MESH_POD_IPS")]
pub static MESH_POD_IPS: HashMap<[u8; 16], PodIpEntry> = HashMap::with_max_entries(MAX_PODS * 2, 0);

/// Captured connections the agent has not yet accepted: who sent the SYN, and why it was captured.
#[map(name = "MESH_FLOWS")]
pub static MESH_FLOWS: LruHashMap<FlowKey, FlowInfo> = LruHashMap::with_max_entries(MAX_FLOWS, 0);

/// Connections the agent holds, keyed as their segments are seen where they are checked (see
/// `mesh_common::capture::CAPTURED_MAP`): segments of one no live socket holds are dropped.
#[map(name = "MESH_CAPTURED")]
pub static MESH_CAPTURED: LruHashMap<FlowKey, u32> = LruHashMap::with_max_entries(MAX_CAPTURED, 0);

/// This node's own addresses (IPv4 v4-mapped), kept current by the agent: pods' connections to
/// them are the node's business, not the mesh's (see `mesh_tc_from_pod`).
#[map(name = "MESH_NODE_ADDRS")]
pub static MESH_NODE_ADDRS: HashMap<[u8; 16], u32> = HashMap::with_max_entries(MAX_NODE_ADDRS, 0);

/// The capture listeners new connections go to, one per (flow kind, family): the tc programs
/// and `mesh_sk_lookup` take the listener from here, never from a lookup by port. The newest
/// ready agent fills it, so during an upgrade (two agents side by side, see
/// `capture/handover.rs`) new connections go to the new agent the moment it registers, while
/// connections the old one accepted stay its own. The kernel drops an entry when its socket
/// closes.
#[map(name = "MESH_LISTENERS")]
pub static MESH_LISTENERS: SockMap = SockMap::with_max_entries(LISTENER_SLOTS, 0);
