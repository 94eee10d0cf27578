//! Finding a local pod on the host without knowing its CNI plugin's naming: the node routes to
//! each of its pods through the pod's host-side interface (kindnet, Calico, Cilium and every
//! other routed/ptp plugin), so the interface is what the node's routing table says for the
//! pod's address; the pod's cgroup is the one kubelet named after the pod's UID, and its network
//! namespace is that of any process in it.
use std::{
    collections::HashMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Mutex,
};

/// Where a pod is on this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located {
    /// The host side of the pod's interface.
    pub interface: String,
    /// The pod's cgroup v2 directory, when found (same-node splicing uses it).
    pub cgroup: Option<PathBuf>,
}

/// Finds local pods.
pub trait PodLocator: Send + Sync {
    fn locate(&self, uid: &str, ips: &[IpAddr]) -> Option<Located>;
}

/// The real locator: routing table for the interface (`ip -j route get`), cgroup v2 tree for
/// the cgroup. Results are cached per (uid, address) while the interface exists.
pub struct HostLocator {
    cgroup_root: Option<PathBuf>,
    cache: Mutex<HashMap<(String, IpAddr), Located>>,
}

impl HostLocator {
    /// Looks pods' cgroups up under `cgroup_root` (the host's cgroup v2 hierarchy; a container
    /// mounts it from the host), or where this process sees cgroup v2 mounted.
    pub fn new(cgroup_root: Option<PathBuf>) -> Self {
        Self {
            cgroup_root: cgroup_root.or_else(crate::capture::cgroup::cgroup2_mount),
            cache: Mutex::default(),
        }
    }
}

impl PodLocator for HostLocator {
    fn locate(&self, uid: &str, ips: &[IpAddr]) -> Option<Located> {
        let ip = *ips.first()?;
        let key = (uid.to_owned(), ip);
        if let Some(hit) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            && interface_exists(&hit.interface)
        {
            return Some(hit.clone());
        }
        let interface = route_interface(ip)?;
        let cgroup = self
            .cgroup_root
            .as_deref()
            .and_then(|root| find_pod_cgroup(root, uid));
        let found = Located { interface, cgroup };
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, found.clone());
        Some(found)
    }
}

/// The interface the node routes `ip` through, if it is a direct route to a non-bridge device
/// (a pod on a Linux bridge is switched, not routed, by the node: the capture cannot see it).
fn route_interface(ip: IpAddr) -> Option<String> {
    let out = std::process::Command::new("ip")
        .args(["-j", "route", "get", &ip.to_string()])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    parse_route_get(&String::from_utf8_lossy(&out.stdout)).filter(|dev| !is_bridge(dev))
}

// Interfaces are looked up by netlink/ioctl, never through /sys/class/net: sysfs shows the
// network namespace it was mounted in, which is not necessarily the agent's (a process that
// entered a namespace with setns keeps the old /sys).

/// Whether `name` is an interface of this network namespace.
fn interface_exists(name: &str) -> bool {
    nix::net::if_::if_nametoindex(name).is_ok()
}

/// Whether `dev` is a Linux bridge (`ip -d -j link show dev <dev>`).
fn is_bridge(dev: &str) -> bool {
    std::process::Command::new("ip")
        .args(["-d", "-j", "link", "show", "dev", dev])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .is_some_and(|o| {
            link_kind(&String::from_utf8_lossy(&o.stdout)).as_deref() == Some("bridge")
        })
}

/// `linkinfo.info_kind` of `ip -d -j link show` output (`veth`, `bridge`…; None for plain
/// devices).
pub fn link_kind(json: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    v.as_array()?.first()?["linkinfo"]["info_kind"]
        .as_str()
        .map(str::to_owned)
}

/// The `dev` of `ip -j route get` output, when the route is direct (no gateway) and not local.
pub fn parse_route_get(json: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let r = v.as_array()?.first()?;
    if r.get("gateway").is_some() || r["type"].as_str() == Some("local") {
        return None;
    }
    let dev = r["dev"].as_str()?;
    (dev != "lo").then(|| dev.to_owned())
}

/// kubelet's cgroup for a pod: `…/pod<uid>` (cgroupfs driver) or `…-pod<uid_with_underscores>.slice`
/// (systemd driver), a few levels below the cgroup v2 root.
pub fn find_pod_cgroup(root: &Path, uid: &str) -> Option<PathBuf> {
    if uid.is_empty() {
        return None;
    }
    let names = [format!("pod{uid}"), format!("pod{}", uid.replace('-', "_"))];
    let matches = |name: &str| {
        names
            .iter()
            .any(|n| name == n || name.ends_with(&format!("-{n}.slice")))
    };
    let mut frontier = vec![root.to_owned()];
    for _ in 0..5 {
        let mut next = Vec::new();
        for dir in frontier {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                if !e.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let name = e.file_name().to_string_lossy().into_owned();
                if matches(&name) {
                    return Some(e.path());
                }
                // Only descend where kubelet puts pods.
                let kubelet_dir = name.starts_with("kubepods")
                    || matches!(
                        name.as_str(),
                        "kubelet.slice" | "kubelet" | "besteffort" | "burstable"
                    )
                    || (dir == root && name.ends_with(".slice"));
                if kubelet_dir {
                    next.push(e.path());
                }
            }
        }
        frontier = next;
    }
    None
}

/// The network namespace of the first process in `cgroup` (for operators: which netns a pod
/// is), as `/proc/<pid>/ns/net`.
pub fn pod_netns(cgroup: &Path) -> Option<PathBuf> {
    let mut stack = vec![cgroup.to_owned()];
    while let Some(dir) = stack.pop() {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs"))
            && let Some(pid) = procs.lines().next()
        {
            return Some(PathBuf::from(format!("/proc/{pid}/ns/net")));
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            stack.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    None
}

/// The interface names of this network namespace (for automatic uplinks).
pub fn interfaces() -> Vec<String> {
    let mut out: Vec<String> = nix::net::if_::if_nameindex()
        .map(|list| {
            list.iter()
                .map(|i| i.name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_direct_route_names_the_pod_interface_and_others_do_not() {
        let direct = r#"[{"dst":"10.244.1.5","dev":"veth1a2b3c","prefsrc":"10.244.1.1","flags":[],"uid":0,"cache":[]}]"#;
        assert_eq!(parse_route_get(direct).as_deref(), Some("veth1a2b3c"));
        let via = r#"[{"dst":"10.244.2.5","gateway":"172.18.0.3","dev":"eth0","flags":[]}]"#;
        assert_eq!(parse_route_get(via), None, "a remote pod (via a gateway)");
        let local = r#"[{"type":"local","dst":"10.0.0.1","dev":"lo","flags":[]}]"#;
        assert_eq!(parse_route_get(local), None);
        let bridge = r#"[{"ifindex":4,"ifname":"cni0","linkinfo":{"info_kind":"bridge","info_data":{"stp_state":0}}}]"#;
        assert_eq!(link_kind(bridge).as_deref(), Some("bridge"));
        let veth = r#"[{"ifindex":5,"ifname":"veth1","linkinfo":{"info_kind":"veth"}}]"#;
        assert_eq!(link_kind(veth).as_deref(), Some("veth"));
        assert_eq!(link_kind(r#"[{"ifindex":2,"ifname":"eth0"}]"#), None);
        assert_eq!(parse_route_get("not json"), None);
    }

    #[test]
    fn finds_kubelet_pod_cgroups_for_both_drivers() {
        let root = std::env::temp_dir().join(format!("mesh-cg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let uid = "1b4f0c2e-9a7d-4a1e-8a55-0d7f5e6c2b10";
        let systemd = root.join(format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
            uid.replace('-', "_")
        ));
        std::fs::create_dir_all(&systemd).unwrap();
        let other = "7f000000-0000-0000-0000-000000000001";
        let cgroupfs = root.join(format!("kubepods/burstable/pod{other}"));
        std::fs::create_dir_all(&cgroupfs).unwrap();
        assert_eq!(find_pod_cgroup(&root, uid), Some(systemd));
        assert_eq!(find_pod_cgroup(&root, other), Some(cgroupfs));
        assert_eq!(find_pod_cgroup(&root, "no-such-uid"), None);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
