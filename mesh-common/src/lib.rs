//! Types and constants shared by `mesh-ebpf` (kernel side) and `mesh-agent` (userspace).
//!
//! Everything here is `#![no_std]` and `#[repr(C)]`/plain integers so the same definitions describe
//! the map layouts on both sides of the kernel boundary.
#![no_std]

pub mod capture;
pub mod counters;
pub mod destination;
pub mod pods;

pub use capture::{FlowInfo, FlowKey, FlowKind, PodIpEntry};
pub use counters::Counter;
pub use destination::{Forbidden, forbidden_destination};
pub use pods::{POD_HAS_IPV4, POD_HAS_IPV6, PODS_MAP, PodAddrs};

/// Name of the per-CPU array that holds the data path's per-reason counters.
pub const COUNTERS_MAP: &str = "MESH_COUNTERS";
