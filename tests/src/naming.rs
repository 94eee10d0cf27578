//! Names of everything a testbed run creates, and how to tell a stale run from a live one.
//!
//! Every kernel object carries the run id: netns `mtb-<run>-<place>`, cgroup `<cgroup2>/mtb-<run>`,
//! bpffs `/sys/fs/bpf/mtb-<run>`, manifest `/run/mesh-testbed/<run>.json`. An ephemeral run id is
//! `<pid>.<seq>` (owner process and a per-process counter, so parallel tests never collide); a named
//! (persistent) run id is a short lowercase name chosen by a person and never swept automatically.
use std::{
    fmt,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Result, bail};

/// Prefix of every netns, cgroup and bpffs directory the testbed creates.
pub const PREFIX: &str = "mtb-";
/// Where run manifests live (tmpfs: gone after a reboot, like the namespaces they describe).
pub const MANIFEST_DIR: &str = "/run/mesh-testbed";
/// Where named network namespaces live (iproute2's convention).
pub const NETNS_DIR: &str = "/run/netns";
/// Where the bpf filesystem is mounted.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Identifies one testbed run.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RunId {
    /// Torn down when its owner is done; swept when its owner process is gone.
    Ephemeral { pid: u32, seq: u32 },
    /// Left running for a person (`cargo xtask testbed up`); only `down` removes it.
    Named(String),
}

impl RunId {
    /// A fresh id owned by this process.
    pub fn ephemeral() -> Self {
        RunId::Ephemeral {
            pid: std::process::id(),
            seq: SEQ.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// A persistent id; names are short so interface-derived names stay readable.
    pub fn named(name: &str) -> Result<Self> {
        let valid = (1..=16).contains(&name.len())
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if !valid {
            bail!(
                "testbed name {name:?} is invalid: use 1-16 lowercase letters/digits, starting with a letter"
            );
        }
        Ok(RunId::Named(name.to_owned()))
    }

    /// Parses the text form produced by `Display`.
    pub fn parse(text: &str) -> Option<Self> {
        if let Some((pid, seq)) = text.split_once('_') {
            return Some(RunId::Ephemeral {
                pid: pid.parse().ok()?,
                seq: seq.parse().ok()?,
            });
        }
        RunId::named(text).ok()
    }

    /// Splits a netns name of ours into run id and place name.
    pub fn from_netns_name(netns: &str) -> Option<(Self, &str)> {
        let rest = netns.strip_prefix(PREFIX)?;
        let (run, place) = rest.split_once('-')?;
        Some((RunId::parse(run)?, place))
    }

    /// Whether this run may be removed by a sweep: an ephemeral run whose owner process is gone.
    /// (A reused pid only delays the sweep; it never makes two live runs collide.)
    pub fn is_stale(&self) -> bool {
        match self {
            RunId::Ephemeral { pid, .. } => !Path::new(&format!("/proc/{pid}")).exists(),
            RunId::Named(_) => false,
        }
    }

    pub fn is_named(&self) -> bool {
        matches!(self, RunId::Named(_))
    }

    pub fn netns_name(&self, place: &str) -> String {
        format!("{PREFIX}{self}-{place}")
    }

    /// Prefix shared by all of this run's netns names.
    pub fn netns_prefix(&self) -> String {
        format!("{PREFIX}{self}-")
    }

    pub fn cgroup_dir(&self, cgroup2_root: &Path) -> PathBuf {
        cgroup2_root.join(format!("{PREFIX}{self}"))
    }

    pub fn bpffs_dir(&self) -> PathBuf {
        Path::new(BPFFS_ROOT).join(format!("{PREFIX}{self}"))
    }

    pub fn manifest_path(&self) -> PathBuf {
        Path::new(MANIFEST_DIR).join(format!("{self}.json"))
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunId::Ephemeral { pid, seq } => write!(f, "{pid}_{seq}"),
            RunId::Named(name) => f.write_str(name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ephemeral_ids_are_unique_within_a_process_and_round_trip() {
        let a = RunId::ephemeral();
        let b = RunId::ephemeral();
        assert_ne!(a, b);
        assert_eq!(RunId::parse(&a.to_string()), Some(a.clone()));
        let netns = a.netns_name("node1-pod2");
        assert_eq!(RunId::from_netns_name(&netns), Some((a, "node1-pod2")));
    }

    #[test]
    fn named_ids_are_validated_and_never_stale() {
        assert!(RunId::named("demo1").is_ok());
        for bad in ["", "1abc", "Demo", "a.b", "a_b", "abcdefghijklmnopq"] {
            assert!(RunId::named(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(!RunId::named("demo").unwrap().is_stale());
        assert_eq!(
            RunId::from_netns_name("mtb-demo-node1"),
            Some((RunId::Named("demo".into()), "node1"))
        );
        assert_eq!(RunId::from_netns_name("cni-1234"), None);
    }

    #[test]
    fn a_run_of_a_dead_process_is_stale_and_ours_is_not() {
        assert!(!RunId::ephemeral().is_stale());
        // pid_max is at most 2^22, so this pid cannot exist.
        assert!(
            RunId::Ephemeral {
                pid: 1 << 23,
                seq: 0
            }
            .is_stale()
        );
    }
}
