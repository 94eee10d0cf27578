//! mesh-agent: a sidecarless, eBPF-accelerated service mesh agent speaking Istio's APIs and HBONE.
//!
//! The crate is a library (so end-to-end tests can drive pieces of it in-process) plus the
//! `mesh-agent` binary. See docs/ARCHITECTURE.md for where each concern lives.

pub mod admin;
pub mod ca;
pub mod capture;
pub mod cli;
pub mod controller;
pub mod discovery;
pub mod drain;
pub mod ebpf;
pub mod fuzz_checks;
pub mod hbone;
pub mod identity;
pub mod l7;
pub mod log_limit;
pub mod logging;
pub mod memory_cap;
pub mod metrics;
pub mod names;
pub mod node;
pub mod policy;
pub mod tls;
pub mod waypoint;
