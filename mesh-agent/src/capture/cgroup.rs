//! Finding cgroup v2 directories: the agent's own (its sockets join the splice from there) and the
//! id of any directory (the cgroup id is the directory's inode number).
use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// The cgroup v2 directory this process belongs to, if cgroup v2 is mounted where its
/// membership resolves. Checked against the directory's `cgroup.procs`: in a container the
/// host's hierarchy may be mounted too (for pods' cgroups), and attaching the agent's side of
/// splicing to the wrong directory would mistake pods' sockets for the agent's.
pub fn own_cgroup() -> Option<PathBuf> {
    let membership = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let pid = std::process::id().to_string();
    candidates(&membership, &mountinfo).into_iter().find(|dir| {
        std::fs::read_to_string(dir.join("cgroup.procs"))
            .is_ok_and(|procs| procs.lines().any(|l| l.trim() == pid))
    })
}

/// Where the cgroup v2 path of `/proc/self/cgroup` may be, one per cgroup2 mount whose root
/// (mountinfo field 4, relative to this process's cgroup namespace) holds it.
fn candidates(membership: &str, mountinfo: &str) -> Vec<PathBuf> {
    let Some(relative) = membership.lines().find_map(|l| l.strip_prefix("0::")) else {
        return Vec::new();
    };
    let relative = Path::new(relative.trim());
    cgroup2_mounts(mountinfo)
        .filter_map(|(root, point)| {
            let rest = relative.strip_prefix(&root).ok()?;
            Some(if rest.as_os_str().is_empty() {
                point
            } else {
                point.join(rest)
            })
        })
        .collect()
}

/// Every cgroup2 mount: (root within the hierarchy, mount point).
fn cgroup2_mounts(mountinfo: &str) -> impl Iterator<Item = (PathBuf, PathBuf)> + '_ {
    mountinfo.lines().filter_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        if post.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mut fields = pre.split_whitespace().skip(3);
        let root = PathBuf::from(unescape(fields.next()?));
        let point = PathBuf::from(unescape(fields.next()?));
        Some((root, point))
    })
}

/// Where cgroup v2 is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on hybrid hosts).
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    cgroup2_mounts(&mountinfo).next().map(|(_, point)| point)
}

/// The cgroup id of a cgroup v2 directory.
pub fn cgroup_id(dir: &Path) -> std::io::Result<u64> {
    Ok(std::fs::metadata(dir)?.ino())
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v as char);
            i += 4;
            continue;
        }
        out.push(b[i] as char);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_cgroup_resolves_through_the_mount_whose_root_holds_it() {
        // A container with a private cgroup namespace (its own cgroup is `/`) that also mounts
        // the host's hierarchy (rooted outside its namespace, shown as `/../..`).
        let mountinfo = "\
500 400 0:30 / /sys/fs/cgroup ro,nosuid - cgroup2 cgroup rw
501 400 0:30 /../.. /host/sys/fs/cgroup ro,nosuid - cgroup2 cgroup rw
502 400 0:5 / /proc rw - proc proc rw";
        assert_eq!(
            candidates("0::/\n", mountinfo),
            [PathBuf::from("/sys/fs/cgroup")]
        );
        // On a host: the path below the one mount.
        let host = "30 24 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw";
        assert_eq!(
            candidates("0::/system.slice/mesh.service\n", host),
            [PathBuf::from("/sys/fs/cgroup/system.slice/mesh.service")]
        );
        // cgroup v1 only: nothing.
        assert!(candidates("12:cpu:/x\n", host).is_empty());
        assert!(
            candidates(
                "0::/x\n",
                "30 24 0:26 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu"
            )
            .is_empty()
        );
    }

    #[test]
    fn this_process_finds_its_own_cgroup_when_cgroup_v2_is_mounted() {
        if cgroup2_mount().is_none() {
            eprintln!("skipped: no cgroup v2 here");
            return;
        }
        let own = own_cgroup().expect("own cgroup");
        let procs = std::fs::read_to_string(own.join("cgroup.procs")).unwrap();
        assert!(procs.lines().any(|l| l == std::process::id().to_string()));
    }

    #[test]
    fn unescapes_mountinfo_paths() {
        assert_eq!(unescape(r"/sys/fs/cgroup\040x"), "/sys/fs/cgroup x");
        assert_eq!(unescape("/plain"), "/plain");
    }
}
