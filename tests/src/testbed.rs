//! [`Testbed`]: build the mini-cluster of DESIGN.md §8, find it again, tear it down.
use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    addressing::{self as addr, GATEWAY_V4, GATEWAY_V6},
    cgroup,
    naming::{BPFFS_ROOT, MANIFEST_DIR, PREFIX, RunId},
    netns,
    place::Place,
    sys::{self, ip_in},
    topology::{Node, Pod, TestbedInfo},
};

/// Size of a testbed.
#[derive(Clone, Copy, Debug)]
pub struct TestbedSpec {
    pub nodes: usize,
    pub pods_per_node: usize,
}

/// A running mini-cluster. An ephemeral testbed is torn down when dropped (also while a test
/// panics); a named one stays until [`Testbed::teardown`] (`cargo xtask testbed down`).
pub struct Testbed {
    run: RunId,
    info: TestbedInfo,
    torn_down: bool,
    /// True until the build finished: a half-built testbed is torn down on drop even if named.
    building: bool,
}

impl Testbed {
    /// Builds an ephemeral testbed owned by this process. Stale runs of dead processes are swept
    /// first.
    pub fn build(spec: TestbedSpec) -> Result<Self> {
        Self::build_run(RunId::ephemeral(), spec)
    }

    /// Builds a named testbed that outlives this process.
    pub fn build_named(name: &str, spec: TestbedSpec) -> Result<Self> {
        let run = RunId::named(name)?;
        if run.manifest_path().exists() || !netns::names_with_prefix(&run.netns_prefix()).is_empty()
        {
            bail!("testbed {name} already exists (`cargo xtask testbed down {name}` removes it)");
        }
        Self::build_run(run, spec)
    }

    /// Opens a named testbed from its manifest.
    pub fn open_named(name: &str) -> Result<Self> {
        let run = RunId::named(name)?;
        let text = fs::read_to_string(run.manifest_path())
            .with_context(|| format!("no testbed named {name} (no manifest)"))?;
        let info = serde_json::from_str(&text)
            .with_context(|| format!("manifest of testbed {name} is unreadable"))?;
        Ok(Self {
            run,
            info,
            torn_down: false,
            building: false,
        })
    }

    /// Names of the named testbeds that exist.
    pub fn list_named() -> Vec<String> {
        let Ok(dir) = fs::read_dir(MANIFEST_DIR) else {
            return Vec::new();
        };
        let mut names: Vec<String> = dir
            .filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                let run = RunId::parse(name.strip_suffix(".json")?)?;
                run.is_named().then(|| run.to_string())
            })
            .collect();
        names.sort();
        names
    }

    fn build_run(run: RunId, spec: TestbedSpec) -> Result<Self> {
        addr::check_size(spec.nodes, spec.pods_per_node)?;
        sweep_stale();
        let cgroup_dir = run.cgroup_dir(&cgroup::cgroup2_root()?);
        let place = |name: String| Place {
            netns: run.netns_name(&name),
            cgroup: cgroup_dir.join(&name),
            name,
        };
        let nodes: Vec<Node> = (1..=spec.nodes)
            .map(|i| Node {
                index: i,
                place: place(format!("node{i}")),
                uplink: "eth0".into(),
                ipv4: addr::node_ipv4(i),
                ipv6: addr::node_ipv6(i),
                pod_cidr_v4: addr::pod_cidr_v4(i),
                pod_cidr_v6: addr::pod_cidr_v6(i),
            })
            .collect();
        let pods: Vec<Pod> = (1..=spec.nodes)
            .flat_map(|i| (1..=spec.pods_per_node).map(move |k| (i, k)))
            .map(|(i, k)| {
                let mut pod = Pod {
                    index: k,
                    node: i,
                    place: place(format!("node{i}-pod{k}")),
                    iface: "eth0".into(),
                    host_veth: format!("veth-pod{k}"),
                    ipv4: addr::pod_ipv4(i, k),
                    ipv6: addr::pod_ipv6(i, k),
                };
                // As kubelet lays them out (cgroupfs driver): below one directory per node.
                pod.place.cgroup =
                    pod_cgroup_root(&cgroup_dir, i).join(format!("pod{}", pod.uid()));
                pod
            })
            .collect();
        let info = TestbedInfo {
            run: run.to_string(),
            owner_pid: std::process::id(),
            fabric: place("fabric".into()),
            nodes,
            pods,
            bpffs_dir: run.bpffs_dir(),
            cgroup_dir,
            netns_inodes: Vec::new(),
        };
        // From here on, dropping `testbed` (an error below, a panic) tears down what exists.
        let mut testbed = Testbed {
            run,
            info,
            torn_down: false,
            building: true,
        };
        testbed.write_manifest()?;
        testbed.create()?;
        testbed.write_manifest()?;
        testbed.building = false;
        Ok(testbed)
    }

    fn write_manifest(&self) -> Result<()> {
        fs::create_dir_all(MANIFEST_DIR).context("creating the manifest directory")?;
        let path = self.run.manifest_path();
        fs::write(&path, serde_json::to_vec_pretty(&self.info)?)
            .with_context(|| format!("writing {}", path.display()))
    }

    fn create(&mut self) -> Result<()> {
        ensure_bpffs()?;
        fs::create_dir_all(&self.info.bpffs_dir)
            .with_context(|| format!("creating {}", self.info.bpffs_dir.display()))?;
        let info = self.info.clone();
        create_place(&info.fabric, false)?;
        let fab = info.fabric.netns.as_str();
        ip_in(fab, "link add br0 type bridge mcast_snooping 0")?;
        ip_in(fab, "link set br0 up")?;
        for node in &info.nodes {
            create_node(&info.fabric, node)?;
        }
        for pod in &info.pods {
            create_pod(&info.nodes[pod.node - 1], pod)?;
        }
        // Each node routes the other nodes' pod CIDRs over the fabric, like kindnet.
        for node in &info.nodes {
            for other in info.nodes.iter().filter(|o| o.index != node.index) {
                let ns = &node.place.netns;
                ip_in(
                    ns,
                    &format!("route add {} via {}", other.pod_cidr_v4, other.ipv4),
                )?;
                ip_in(
                    ns,
                    &format!("-6 route add {} via {}", other.pod_cidr_v6, other.ipv6),
                )?;
            }
        }
        let inodes = self
            .places()
            .map(|place| netns::inode(&place.netns))
            .collect::<Result<Vec<_>>>()?;
        self.info.netns_inodes = inodes;
        Ok(())
    }

    pub fn info(&self) -> &TestbedInfo {
        &self.info
    }

    pub fn run_id(&self) -> String {
        self.run.to_string()
    }

    /// Node by 1-based index.
    pub fn node(&self, node: usize) -> &Node {
        &self.info.nodes[node - 1]
    }

    /// Pod by 1-based node and pod index.
    pub fn pod(&self, node: usize, pod: usize) -> &Pod {
        self.info
            .pods
            .iter()
            .find(|p| p.node == node && p.index == pod)
            .unwrap_or_else(|| panic!("no pod {pod} on node {node}"))
    }

    pub fn pods(&self) -> &[Pod] {
        &self.info.pods
    }

    pub fn fabric(&self) -> &Place {
        &self.info.fabric
    }

    /// The cgroup directory holding node `node`'s pods' cgroups, as a Kubernetes node's
    /// hierarchy holds kubelet's (what `mesh-agent node --pod-cgroup-root` searches).
    pub fn pod_cgroup_root(&self, node: usize) -> PathBuf {
        pod_cgroup_root(&self.info.cgroup_dir, node)
    }

    /// A bpffs directory for this run's pins; removed at teardown.
    pub fn bpffs_dir(&self) -> &Path {
        &self.info.bpffs_dir
    }

    /// Every place of the run: fabric, nodes, pods.
    pub fn places(&self) -> impl Iterator<Item = &Place> {
        std::iter::once(&self.info.fabric)
            .chain(self.info.nodes.iter().map(|n| &n.place))
            .chain(self.info.pods.iter().map(|p| &p.place))
    }

    /// Kills every process of the run and removes its namespaces, cgroups, pins and manifest.
    pub fn teardown(mut self) -> Result<()> {
        self.torn_down = true;
        teardown_run(&self.run)
    }

    /// [`Testbed::teardown`], then fails unless [`Testbed::leftovers`] finds nothing.
    pub fn teardown_verified(self) -> Result<()> {
        let info = self.info.clone();
        self.teardown()?;
        let left = Self::leftovers(&info);
        if !left.is_empty() {
            bail!(
                "testbed {} torn down, but these remain: {}",
                info.run,
                left.join(", ")
            );
        }
        Ok(())
    }

    /// What of this run still exists (empty after a clean teardown): names, cgroup and bpffs
    /// directories, the manifest, and namespaces that live on unnamed (held by a process or fd).
    pub fn leftovers(info: &TestbedInfo) -> Vec<String> {
        let mut left = Vec::new();
        let Some(run) = RunId::parse(&info.run) else {
            return vec![format!("unparseable run id {}", info.run)];
        };
        for name in netns::names_with_prefix(&run.netns_prefix()) {
            left.push(format!("netns name {name}"));
        }
        for inode in unnamed_but_held(&info.netns_inodes) {
            left.push(format!(
                "network namespace inode {inode} still held by a process or fd"
            ));
        }
        for (what, path) in [
            ("cgroup", &info.cgroup_dir),
            ("bpffs directory", &info.bpffs_dir),
            ("manifest", &run.manifest_path()),
        ] {
            if path.exists() {
                left.push(format!("{what} {}", path.display()));
            }
        }
        left
    }
}

/// Which of `inodes` are namespaces that lost their name but are still held. The kernel reuses
/// nsfs inode numbers at once, so an inode held *and named* is another run's new namespace, and a
/// hit is rechecked briefly to let a namespace being named (`ip netns add`) get its name.
fn unnamed_but_held(inodes: &[u64]) -> Vec<u64> {
    let mut suspects: Vec<u64> = inodes.to_vec();
    for _ in 0..10 {
        let held = netns::held_inodes();
        let named = netns::named_inodes();
        suspects.retain(|i| held.contains(i) && !named.contains(i));
        if suspects.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    suspects
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if self.torn_down || (self.run.is_named() && !self.building) {
            return;
        }
        if let Err(e) = teardown_run(&self.run) {
            crate::privilege::report(&format!("testbed {}: teardown failed: {e:#}", self.run));
        }
    }
}

/// The directory holding node `node`'s pods' cgroups (its `kubepods`).
fn pod_cgroup_root(run_cgroup_dir: &Path, node: usize) -> PathBuf {
    run_cgroup_dir.join(format!("node{node}-kubepods"))
}

/// Creates the place's netns (with sysctls a node or pod needs) and cgroup.
fn create_place(place: &Place, forwarding: bool) -> Result<()> {
    cgroup::create(&place.cgroup)?;
    netns::add(&place.netns)?;
    // New namespaces start with forwarding off and IPv6 DAD on; DAD would delay addresses by
    // seconds, and nothing here can conflict.
    for key in [
        "net.ipv6.conf.all.accept_dad",
        "net.ipv6.conf.default.accept_dad",
    ] {
        netns::sysctl(&place.netns, key, "0")?;
    }
    if forwarding {
        netns::sysctl(&place.netns, "net.ipv4.ip_forward", "1")?;
        netns::sysctl(&place.netns, "net.ipv6.conf.all.forwarding", "1")?;
    }
    Ok(())
}

fn create_node(fabric: &Place, node: &Node) -> Result<()> {
    create_place(&node.place, true)?;
    let (ns, up) = (node.place.netns.as_str(), node.uplink.as_str());
    let (port, fab) = (node.name(), fabric.netns.as_str());
    ip_in(
        ns,
        &format!("link add {up} type veth peer name {port} netns {fab}"),
    )?;
    ip_in(fab, &format!("link set {port} master br0 up"))?;
    ip_in(ns, &format!("addr add {}/24 dev {up}", node.ipv4))?;
    ip_in(ns, &format!("addr add {}/64 dev {up} nodad", node.ipv6))?;
    ip_in(ns, &format!("link set {up} up"))
}

fn create_pod(node: &Node, pod: &Pod) -> Result<()> {
    create_place(&pod.place, false)?;
    let (pns, nns) = (pod.place.netns.as_str(), node.place.netns.as_str());
    let (eth, veth) = (pod.iface.as_str(), pod.host_veth.as_str());
    let (gw4, gw6) = (GATEWAY_V4, GATEWAY_V6);
    ip_in(
        pns,
        &format!("link add {eth} type veth peer name {veth} netns {nns}"),
    )?;
    // Pod side: /32 and /128 addresses, everything via the node's gateway address (ptp).
    ip_in(pns, &format!("addr add {}/32 dev {eth}", pod.ipv4))?;
    ip_in(pns, &format!("addr add {}/128 dev {eth} nodad", pod.ipv6))?;
    ip_in(pns, &format!("link set {eth} up"))?;
    ip_in(pns, &format!("route add {gw4} dev {eth} scope link"))?;
    ip_in(pns, &format!("route add default via {gw4} dev {eth}"))?;
    ip_in(pns, &format!("-6 route add default via {gw6} dev {eth}"))?;
    // Node side: the gateway addresses on the host veth, a host route to the pod.
    ip_in(nns, &format!("addr add {gw4}/32 dev {veth}"))?;
    ip_in(nns, &format!("addr add {gw6}/64 dev {veth} nodad"))?;
    ip_in(nns, &format!("link set {veth} up"))?;
    ip_in(nns, &format!("route add {}/32 dev {veth}", pod.ipv4))?;
    ip_in(nns, &format!("-6 route add {}/128 dev {veth}", pod.ipv6))
}

/// Mounts the bpf filesystem at /sys/fs/bpf unless it already is (the agent pins there too).
/// Serialised: parallel tests checking and mounting at once would stack several bpffs instances
/// and hide each other's pins.
fn ensure_bpffs() -> Result<()> {
    static MOUNTING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = MOUNTING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    let mounted = cgroup::mount_points(&mountinfo, "bpf").any(|p| p == Path::new(BPFFS_ROOT));
    if !mounted {
        sys::run("mount", &["-t", "bpf", "bpf", BPFFS_ROOT])?;
    }
    Ok(())
}

/// Removes everything of `run`, identified by name patterns (works without a manifest).
fn teardown_run(run: &RunId) -> Result<()> {
    let mut errors = Vec::new();
    let cgroup_dir = cgroup::cgroup2_root().map(|root| run.cgroup_dir(&root));
    if let Ok(dir) = &cgroup_dir
        && let Err(e) = cgroup::kill_all(dir, Duration::from_secs(10))
    {
        errors.push(format!("{e:#}"));
    }
    for name in netns::names_with_prefix(&run.netns_prefix()) {
        if let Err(e) = netns::delete(&name) {
            errors.push(format!("{e:#}"));
        }
    }
    match &cgroup_dir {
        Ok(dir) => {
            if let Err(e) = cgroup::remove_tree(dir) {
                errors.push(format!("{e:#}"));
            }
        }
        Err(e) => errors.push(format!("{e:#}")),
    }
    let bpffs = run.bpffs_dir();
    if bpffs.exists()
        && let Err(e) = fs::remove_dir_all(&bpffs)
    {
        errors.push(format!("removing {}: {e}", bpffs.display()));
    }
    let manifest = run.manifest_path();
    if manifest.exists()
        && let Err(e) = fs::remove_file(&manifest)
    {
        errors.push(format!("removing {}: {e}", manifest.display()));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        bail!("{}", errors.join("; "))
    }
}

/// Tears down ephemeral runs whose owner process is gone (a test that was killed, a crash).
pub fn sweep_stale() {
    let mut runs: Vec<RunId> = Vec::new();
    let mut consider = |run: RunId| {
        if run.is_stale() && !runs.contains(&run) {
            runs.push(run);
        }
    };
    for name in netns::names_with_prefix(PREFIX) {
        if let Some((run, _)) = RunId::from_netns_name(&name) {
            consider(run);
        }
    }
    let dir_runs = |dir: PathBuf| -> Vec<RunId> {
        fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| RunId::parse(e.file_name().to_str()?.strip_prefix(PREFIX)?))
            .collect()
    };
    if let Ok(root) = cgroup::cgroup2_root() {
        dir_runs(root).into_iter().for_each(&mut consider);
    }
    dir_runs(PathBuf::from(BPFFS_ROOT))
        .into_iter()
        .for_each(&mut consider);
    for entry in fs::read_dir(MANIFEST_DIR).into_iter().flatten().flatten() {
        if let Some(run) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.strip_suffix(".json"))
            .and_then(RunId::parse)
        {
            consider(run);
        }
    }
    for run in runs {
        if let Err(e) = teardown_run(&run) {
            crate::privilege::report(&format!("sweeping stale testbed {run}: {e:#}"));
        }
    }
}
