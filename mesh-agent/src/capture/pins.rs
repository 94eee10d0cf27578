//! Where the data path lives in bpffs, and how pinned tcx links are named so that a restarted
//! agent can tell which program on which interface a pin holds, and which agent instance made it.
//!
//! ```text
//! <dir>/maps/<MAP>                         every map (adopted across restarts)
//! <dir>/progs/<program>                    the programs of the running instance
//! <dir>/links/<program>-if<ifindex>-<instance>   one tcx attachment
//! <dir>/links/<program>-cg<cgroup id>-<instance> one cgroup (sock_ops) attachment
//! <dir>/links/<program>-ns<netns inode>-<instance> the node namespace's sk_lookup
//! <dir>/links/<program>-trace-<version>    a tracing program (the splice's read accounting),
//!                                          shared by every agent instance of that version
//! ```
use std::{
    fs,
    path::{Path, PathBuf},
};

/// The bpffs directories of one data path.
#[derive(Clone, Debug)]
pub struct BpffsLayout {
    pub root: PathBuf,
}

/// A pinned link, decoded from its file name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkPin {
    pub program: String,
    pub target: LinkTarget,
    pub instance: String,
    pub path: PathBuf,
}

/// What a link is attached to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LinkTarget {
    /// tcx ingress of the interface with this ifindex.
    Interface(u32),
    /// The cgroup whose directory has this inode number (the cgroup id).
    Cgroup(u64),
    /// The network namespace with this inode number (sk_lookup).
    Netns(u64),
    /// A tracepoint (raw); kept across agent instances, never reconciled away.
    Trace,
    Unknown,
}

impl LinkTarget {
    fn encode(&self) -> String {
        match self {
            LinkTarget::Interface(i) => format!("if{i}"),
            LinkTarget::Cgroup(c) => format!("cg{c}"),
            LinkTarget::Netns(n) => format!("ns{n}"),
            LinkTarget::Trace => "trace".to_owned(),
            LinkTarget::Unknown => "unknown".to_owned(),
        }
    }

    fn decode(s: &str) -> LinkTarget {
        if let Some(i) = s.strip_prefix("if").and_then(|n| n.parse().ok()) {
            LinkTarget::Interface(i)
        } else if let Some(c) = s.strip_prefix("cg").and_then(|n| n.parse().ok()) {
            LinkTarget::Cgroup(c)
        } else if let Some(n) = s.strip_prefix("ns").and_then(|n| n.parse().ok()) {
            LinkTarget::Netns(n)
        } else if s == "trace" {
            LinkTarget::Trace
        } else {
            LinkTarget::Unknown
        }
    }

    /// For people: the interface name or cgroup id.
    pub fn describe(&self) -> String {
        match self {
            LinkTarget::Interface(i) => {
                format!("tcx ingress of {} (ifindex {i})", iface_name(*i))
            }
            LinkTarget::Cgroup(c) => format!("cgroup id {c}"),
            LinkTarget::Netns(n) => format!("socket lookup of network namespace {n}"),
            LinkTarget::Trace => "raw tracepoint (shared by agent instances)".to_owned(),
            LinkTarget::Unknown => "unknown target".to_owned(),
        }
    }
}

impl BpffsLayout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn progs(&self) -> PathBuf {
        self.root.join("progs")
    }

    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }

    /// Creates the directories (bpffs must already be mounted at or above `root`).
    pub fn create(&self) -> std::io::Result<()> {
        for dir in [self.maps(), self.progs(), self.links()] {
            fs::create_dir_all(dir)?;
        }
        Ok(())
    }

    pub fn link_path(&self, program: &str, target: &LinkTarget, instance: &str) -> PathBuf {
        self.links()
            .join(format!("{program}-{}-{instance}", target.encode()))
    }

    /// Every link pin in the links directory (unparseable names are reported as instance "?").
    pub fn link_pins(&self) -> std::io::Result<Vec<LinkPin>> {
        let mut out = Vec::new();
        let entries = match fs::read_dir(self.links()) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            out.push(parse_link_name(&name, entry.path()));
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    /// Every pinned file under the root, relative, sorted: what `--explain-datapath` lists.
    pub fn all_pins(&self) -> std::io::Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for dir in [self.maps(), self.progs(), self.links()] {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries {
                let path = entry?.path();
                out.push(path.strip_prefix(&self.root).unwrap_or(&path).to_owned());
            }
        }
        out.sort();
        Ok(out)
    }
}

fn parse_link_name(name: &str, path: PathBuf) -> LinkPin {
    let mut parts = name.splitn(3, '-');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(program), Some(target), Some(instance)) => LinkPin {
            program: program.to_owned(),
            target: LinkTarget::decode(target),
            instance: instance.to_owned(),
            path,
        },
        _ => LinkPin {
            program: name.to_owned(),
            target: LinkTarget::Unknown,
            instance: "?".to_owned(),
            path,
        },
    }
}

/// The name of interface `ifindex` in this network namespace, or `<gone>`.
pub fn iface_name(ifindex: u32) -> String {
    nix::net::if_::if_indextoname(ifindex)
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "<gone>".to_owned())
}

/// Removes a link pin and detaches the link *now*: the pin is first opened (so the link has an
/// fd), then unpinned, then the fd is closed. Unlinking the bpffs file alone drops the last
/// reference from a kernel work queue, so the program could keep running for a moment after we
/// said it was gone.
pub fn remove_link_pin(path: &Path) -> std::io::Result<()> {
    match aya::programs::links::PinnedLink::from_pin(path) {
        Ok(link) => {
            let fd_link = link.unpin()?;
            drop(fd_link);
            Ok(())
        }
        // Not a link (or unreadable): still remove the file, it is in our directory.
        Err(_) => fs::remove_file(path),
    }
}

/// A name for this agent instance that bpffs accepts (no dots) and that differs across restarts.
pub fn instance_name() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!(
        "{}{:09}p{}",
        now.as_secs(),
        now.subsec_nanos(),
        std::process::id()
    )
}

/// Whether `path` is on a bpffs mount (pins elsewhere would silently fail).
pub fn is_on_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_pin_names_round_trip() {
        let layout = BpffsLayout::new("/sys/fs/bpf/mesh");
        let path = layout.link_path(
            "mesh_tc_from_pod",
            &LinkTarget::Interface(42),
            "1700000000123p99",
        );
        let name = path.file_name().unwrap().to_str().unwrap();
        let pin = parse_link_name(name, path.clone());
        assert_eq!(pin.program, "mesh_tc_from_pod");
        assert_eq!(pin.target, LinkTarget::Interface(42));
        assert_eq!(pin.instance, "1700000000123p99");
        let path = layout.link_path("mesh_sops_pod", &LinkTarget::Cgroup(77), "i");
        let pin = parse_link_name(path.file_name().unwrap().to_str().unwrap(), path.clone());
        assert_eq!(pin.target, LinkTarget::Cgroup(77));
        let path = layout.link_path("mesh_splice_read", &LinkTarget::Trace, "v1");
        let pin = parse_link_name(path.file_name().unwrap().to_str().unwrap(), path.clone());
        assert_eq!(
            (pin.target, pin.instance.as_str()),
            (LinkTarget::Trace, "v1")
        );
        assert!(!instance_name().contains('.'));
        assert_eq!(parse_link_name("junk", path).instance, "?");
    }
}
