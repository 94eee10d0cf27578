//! The per-node memory cap: when memory runs short, the agent refuses new connections and
//! keeps carrying the ones it has, instead of being OOM-killed with all of them (an OOM kill
//! resets every connection of the node, see docs/RELIABILITY.md).
//!
//! The cap is `--max-memory-mib`; by default (`auto`) 80% of the smallest `memory.max` on the
//! agent's cgroup path (the container's limit: the DaemonSet sets 512 MiB), and none when no
//! limit is set. The agent's resident memory is sampled every 100 ms. Above the cap every
//! capture listener resets new connections at once (`mesh_connections_refused_total{reason=
//! "memory"}`) and the HBONE server answers new streams 503 (`mesh_hbone_server_refusals_total
//! {reason="memory"}`), until the agent is back under it.
//!
//! Kernel socket buffers are not resident memory of the process: TCP bounds them itself
//! (`tcp_mem`, per-socket buffers), and splicing bounds its queue per socket.
use std::{
    path::Path,
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

/// The share of the cgroup's memory limit `auto` caps at: the rest is headroom for what is in
/// flight when the cap is reached, and for the kernel's share charged to the cgroup.
pub const AUTO_SHARE_PERCENT: u64 = 80;
/// How often the resident memory is read.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// `--max-memory-mib`: `auto`, `off` or a size in MiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryCapChoice {
    Auto,
    Off,
    Mib(u64),
}

impl FromStr for MemoryCapChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "off" => Ok(Self::Off),
            n => match n.parse::<u64>() {
                Ok(0) | Err(_) => Err(format!(
                    "{s:?}: expected `auto`, `off` or a size in MiB (at least 1)"
                )),
                Ok(mib) => Ok(Self::Mib(mib)),
            },
        }
    }
}

impl MemoryCapChoice {
    /// The cap in bytes (None: no cap), and how it was chosen, for the log and `status`.
    pub fn resolve(self) -> (Option<u64>, String) {
        match self {
            Self::Off => (None, "off".into()),
            Self::Mib(mib) => (Some(mib << 20), format!("{mib} MiB (--max-memory-mib)")),
            Self::Auto => {
                match crate::capture::cgroup::own_cgroup().and_then(|dir| cgroup_memory_max(&dir)) {
                    Some(limit) => {
                        let cap = limit / 100 * AUTO_SHARE_PERCENT;
                        (
                            Some(cap),
                            format!(
                                "{} MiB (auto: {AUTO_SHARE_PERCENT}% of the cgroup's {} MiB limit)",
                                cap >> 20,
                                limit >> 20
                            ),
                        )
                    }
                    None => (None, "off (auto: no cgroup memory limit)".into()),
                }
            }
        }
    }
}

/// The smallest `memory.max` from `dir` up its cgroup ancestors (a pod's limit sits above its
/// container's); None when none is set.
pub fn cgroup_memory_max(dir: &Path) -> Option<u64> {
    dir.ancestors()
        .take_while(|d| d.join("cgroup.procs").exists())
        .filter_map(|d| std::fs::read_to_string(d.join("memory.max")).ok())
        .filter_map(|v| parse_memory_max(&v))
        .min()
}

/// `memory.max`'s value: bytes, or `max` (no limit).
fn parse_memory_max(v: &str) -> Option<u64> {
    v.trim().parse().ok()
}

/// This process's resident memory, bytes (`/proc/self/statm`, one read).
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    Some(pages * page)
}

/// The cap and the latest reading, shared by every listener and the HBONE server.
#[derive(Debug, Default)]
pub struct MemoryCap {
    limit: Option<u64>,
    resident: AtomicU64,
}

impl MemoryCap {
    pub fn new(limit: Option<u64>) -> Arc<Self> {
        Arc::new(Self {
            limit,
            resident: AtomicU64::new(resident_bytes().unwrap_or(0)),
        })
    }

    /// No cap (tests of other layers).
    pub fn unlimited() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn limit(&self) -> Option<u64> {
        self.limit
    }

    /// Whether new connections are to be refused now.
    pub fn over(&self) -> bool {
        self.limit
            .is_some_and(|l| self.resident.load(Ordering::Relaxed) > l)
    }

    /// Records a reading (the sampler; tests).
    pub fn set_resident(&self, bytes: u64) {
        self.resident.store(bytes, Ordering::Relaxed);
    }

    /// Samples the resident memory every [`SAMPLE_EVERY`] for as long as the runtime runs (not
    /// at all without a cap).
    pub fn spawn_sampler(self: &Arc<Self>) {
        if self.limit.is_none() {
            return;
        }
        let cap = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            loop {
                tick.tick().await;
                if let Some(b) = resident_bytes() {
                    cap.set_resident(b);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_takes_auto_off_or_mebibytes() {
        assert_eq!("auto".parse(), Ok(MemoryCapChoice::Auto));
        assert_eq!("off".parse(), Ok(MemoryCapChoice::Off));
        assert_eq!("400".parse(), Ok(MemoryCapChoice::Mib(400)));
        for bad in ["0", "-1", "1.5", "400Mi", ""] {
            let e = bad.parse::<MemoryCapChoice>().unwrap_err();
            assert!(e.contains("auto") && e.contains(bad), "{e}");
        }
        assert_eq!(MemoryCapChoice::Mib(3).resolve().0, Some(3 << 20));
        assert_eq!(MemoryCapChoice::Off.resolve().0, None);
    }

    #[test]
    fn the_smallest_limit_on_the_cgroup_path_counts() {
        let root = std::env::temp_dir().join(format!("memcap-{}", std::process::id()));
        let leaf = root.join("pod/container");
        std::fs::create_dir_all(&leaf).unwrap();
        for d in [root.as_path(), &root.join("pod"), &leaf] {
            std::fs::write(d.join("cgroup.procs"), "").unwrap();
        }
        std::fs::write(root.join("memory.max"), "max\n").unwrap();
        std::fs::write(root.join("pod/memory.max"), "268435456\n").unwrap();
        std::fs::write(leaf.join("memory.max"), "536870912\n").unwrap();
        assert_eq!(cgroup_memory_max(&leaf), Some(256 << 20));
        std::fs::write(root.join("pod/memory.max"), "max\n").unwrap();
        assert_eq!(cgroup_memory_max(&leaf), Some(512 << 20));
        std::fs::write(leaf.join("memory.max"), "max\n").unwrap();
        assert_eq!(cgroup_memory_max(&leaf), None);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn over_only_with_a_cap_and_above_it() {
        let cap = MemoryCap::new(Some(100 << 20));
        cap.set_resident(99 << 20);
        assert!(!cap.over());
        cap.set_resident((100 << 20) + 1);
        assert!(cap.over());
        let none = MemoryCap::unlimited();
        none.set_resident(u64::MAX);
        assert!(!none.over());
        assert!(resident_bytes().unwrap() > 1 << 20);
    }
}
