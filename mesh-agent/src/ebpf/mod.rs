//! The kernel side of the data path as seen from userspace: the embedded eBPF object, loading it,
//! attaching its programs and reading its maps.

mod counters;
mod datapath;
mod enrollment;
mod error;
mod tc;

pub use counters::CounterSnapshot;
pub use datapath::{Datapath, ObjectEntry};
pub use enrollment::{Enrollment, pod_addrs};
pub use error::DatapathError;
pub use tc::{TcAttachment, TcHook};

/// The compiled `mesh-ebpf` object (ELF with BTF), embedded at build time by build.rs.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh"));

/// Names of the programs in [`OBJECT`], as `bpftool prog show` lists them.
pub mod programs {
    /// tc program that counts frames by family and size and never changes their fate.
    pub const TC_OBSERVE: &str = "mesh_tc_observe";
    /// tc program on an enrolled pod's host interface (ingress: what the pod sends).
    pub const TC_FROM_POD: &str = "mesh_tc_from_pod";
}
