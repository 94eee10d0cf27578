//! mesh-testbed: mini-clusters built from network namespaces (DESIGN.md §8), shared by the
//! end-to-end tests (in this crate's tests/), `cargo xtask demo|bench|testbed`.
//!
//! A testbed is a "fabric" netns with a bridge (the LAN), N node namespaces each with an uplink to
//! the fabric and routes to the other nodes' pod CIDRs, and per pod a netns joined to its node by a
//! veth pair (ptp /32 routes, like kindnet) plus its own cgroup v2 directory. Dual stack throughout
//! (see [`addressing`]). Everything carries a per-run name prefix and is removed on drop, on panic,
//! and by a sweep of dead runs when the next testbed is built.

pub mod addressing;
pub mod binaries;
pub mod bpf_test_run;
pub mod cgroup;
pub mod deploy;
pub mod fakeapi;
pub mod hostnet;
pub mod http;
pub mod httpapp;
pub mod kubemesh;
pub mod load;
pub mod metrics;
pub mod naming;
pub mod netns;
pub mod place;
pub mod privilege;
pub mod probe;
pub mod rawtcp;
pub mod soak;
pub mod stall;
mod sys;
mod testbed;
pub mod tlsflood;
pub mod topology;
pub mod traffic;

pub use hostnet::HostNetSnapshot;
pub use place::{Background, Place};
pub use privilege::can_run;
pub use testbed::{Testbed, TestbedSpec, sweep_stale};
pub use topology::{Node, Pod, TestbedInfo};
