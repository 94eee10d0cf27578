//! Named network namespaces (iproute2's /run/netns convention) and running code inside them.
use std::{
    collections::HashSet,
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    thread,
};

use anyhow::{Context as _, Result, anyhow};
use nix::sched::{CloneFlags, setns};

use crate::{naming::NETNS_DIR, sys::ip};

pub fn path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Creates a named netns with loopback up.
pub fn add(name: &str) -> Result<()> {
    ip(&["netns", "add", name])?;
    ip(&["-n", name, "link", "set", "lo", "up"])
}

/// Removes the name; the namespace itself goes once no process or fd holds it.
pub fn delete(name: &str) -> Result<()> {
    ip(&["netns", "delete", name])
}

/// The namespace's inode number: its identity, which outlives its name.
pub fn inode(name: &str) -> Result<u64> {
    Ok(fs::metadata(path(name))
        .with_context(|| format!("netns {name} does not exist"))?
        .ino())
}

/// Names under /run/netns starting with `prefix`.
pub fn names_with_prefix(prefix: &str) -> Vec<String> {
    let Ok(dir) = fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = dir
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}

/// Inodes of network namespaces that some process is in or holds an fd to.
pub fn held_inodes() -> HashSet<u64> {
    let mut inodes = HashSet::new();
    let parse = |link: &Path| -> Option<u64> {
        let target = fs::read_link(link).ok()?;
        let target = target.to_str()?;
        target
            .strip_prefix("net:[")?
            .strip_suffix(']')?
            .parse()
            .ok()
    };
    if let Ok(procs) = fs::read_dir("/proc") {
        for proc_entry in procs.flatten() {
            let pid_dir = proc_entry.path();
            if !proc_entry
                .file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
            {
                continue;
            }
            let tasks = fs::read_dir(pid_dir.join("task"))
                .into_iter()
                .flatten()
                .flatten();
            for task in tasks {
                inodes.extend(parse(&task.path().join("ns/net")));
            }
            let fds = fs::read_dir(pid_dir.join("fd"))
                .into_iter()
                .flatten()
                .flatten();
            for fd in fds {
                inodes.extend(parse(&fd.path()));
            }
        }
    }
    inodes
}

/// Inodes of every namespace that has a name under /run/netns.
pub fn named_inodes() -> HashSet<u64> {
    fs::read_dir(NETNS_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| Some(entry.metadata().ok()?.ino()))
        .collect()
}

/// Runs `f` on a fresh thread that has joined the named netns (only that thread moves, so the rest
/// of the process, other tests included, is unaffected). Processes spawned from `f` inherit it.
pub fn run_in<R, F>(name: &str, f: F) -> Result<R>
where
    F: FnOnce() -> R + Send,
    R: Send,
{
    let file = fs::File::open(path(name)).with_context(|| format!("opening netns {name}"))?;
    thread::scope(|scope| {
        scope
            .spawn(move || {
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("joining netns {name}"))?;
                drop(file);
                Ok(f())
            })
            .join()
            .map_err(|panic| anyhow!("closure in netns {name} panicked: {panic:?}"))?
    })
}

/// Writes a sysctl inside the named netns (/proc/sys/net is per network namespace).
pub fn sysctl(netns: &str, key: &str, value: &str) -> Result<()> {
    let file = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
    run_in(netns, || fs::write(&file, value))?
        .with_context(|| format!("setting {key}={value} in netns {netns}"))
}
