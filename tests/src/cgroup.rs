//! cgroup v2 directories for pods and nodes: where the hierarchy is mounted, creating, emptying
//! (killing every process inside) and removing them.
use std::{
    fs,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// The cgroup v2 mount point. Hosts with the hybrid layout mount it at /sys/fs/cgroup/unified,
/// pure v2 hosts at /sys/fs/cgroup, so it is read from mountinfo rather than assumed.
pub fn cgroup2_root() -> Result<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    find_mount(&mountinfo, "cgroup2").context("no cgroup v2 hierarchy is mounted on this host")
}

/// The mount point of the first mount with filesystem type `fstype` in mountinfo text.
pub(crate) fn find_mount(mountinfo: &str, fstype: &str) -> Option<PathBuf> {
    mount_points(mountinfo, fstype).next()
}

/// Mount points of every mount with filesystem type `fstype` in mountinfo text.
pub(crate) fn mount_points<'a>(
    mountinfo: &'a str,
    fstype: &'a str,
) -> impl Iterator<Item = PathBuf> + 'a {
    mountinfo.lines().filter_map(move |line| {
        let (left, right) = line.split_once(" - ")?;
        let mount_point = left.split(' ').nth(4)?;
        (right.split(' ').next()? == fstype).then(|| PathBuf::from(unescape_octal(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let digits: String = chars.clone().take(3).collect();
            if digits.len() == 3
                && let Ok(byte) = u8::from_str_radix(&digits, 8)
            {
                out.push(byte as char);
                chars.nth(2);
                continue;
            }
        }
        out.push(c);
    }
    out
}

/// Creates `dir` (and parents).
pub fn create(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating cgroup {}", dir.display()))
}

/// Kills every process in `dir` and its descendants and waits until the cgroup is empty.
pub fn kill_all(dir: &Path, timeout: Duration) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let kill_file = dir.join("cgroup.kill");
    let deadline = Instant::now() + timeout;
    loop {
        if !populated(dir)? {
            return Ok(());
        }
        if kill_file.exists() {
            fs::write(&kill_file, "1")
                .with_context(|| format!("writing {}", kill_file.display()))?;
        } else {
            // Kernels before 5.14 have no cgroup.kill: signal each process ourselves.
            for pid in pids_recursive(dir)? {
                // SAFETY: kill(2) with a pid read from cgroup.procs; ESRCH is harmless.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if Instant::now() > deadline {
            bail!(
                "processes remain in cgroup {} after {timeout:?}",
                dir.display()
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn populated(dir: &Path) -> Result<bool> {
    let events = dir.join("cgroup.events");
    match fs::read_to_string(&events) {
        Ok(text) => Ok(text.lines().any(|l| l == "populated 1")),
        Err(_) => Ok(!pids_recursive(dir)?.is_empty()),
    }
}

fn pids_recursive(dir: &Path) -> Result<Vec<i32>> {
    let mut pids = Vec::new();
    if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    for child in subdirs(dir)? {
        pids.extend(pids_recursive(&child)?);
    }
    Ok(pids)
}

fn subdirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            out.push(entry.path());
        }
    }
    Ok(out)
}

/// Removes `dir` and its descendants (cgroups are removed with rmdir, children first). The
/// cgroups must be empty: call [`kill_all`] first.
pub fn remove_tree(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for child in subdirs(dir)? {
        remove_tree(&child)?;
    }
    fs::remove_dir(dir).with_context(|| format!("removing cgroup {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
30 24 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw
32 30 0:28 / /sys/fs/cgroup/cpu rw,relatime shared:11 - cgroup cgroup rw,cpu
";

    #[test]
    fn finds_the_v2_mount_in_a_hybrid_layout() {
        assert_eq!(
            find_mount(HYBRID, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(find_mount(HYBRID, "bpf"), None);
    }

    #[test]
    fn unescapes_spaces_in_mount_points() {
        let line = "40 24 0:30 / /mnt/with\\040space rw - bpf bpf rw\n";
        assert_eq!(
            find_mount(line, "bpf"),
            Some(PathBuf::from("/mnt/with space"))
        );
    }
}
