use std::path::PathBuf;

/// Why an operation on the kernel data path failed. Callers branch on it to tell a kernel that
/// refuses our programs (fatal) from a missing interface or pin (per-pod, recoverable).
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("the kernel refused the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program `{0}` is not in the eBPF object (agent and object out of sync?)")]
    MissingProgram(&'static str),
    #[error("map `{0}` is not in the eBPF object (agent and object out of sync?)")]
    MissingMap(&'static str),
    #[error("program `{name}`: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("attaching `{name}` to interface {iface}: {source}")]
    Attach {
        name: &'static str,
        iface: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("attaching `{name}` to cgroup {cgroup}: {source}")]
    AttachCgroup {
        name: &'static str,
        cgroup: PathBuf,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("cgroup {cgroup}: {source}")]
    Cgroup {
        cgroup: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("taking the link on {iface}: {source}")]
    Link {
        iface: String,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("interface {iface} does not exist in this network namespace: {source}")]
    NoInterface {
        iface: String,
        #[source]
        source: nix::Error,
    },
    #[error("map `{name}`: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("pinning at {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("creating bpffs directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("removing pin {path}: {source}")]
    Unpin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
