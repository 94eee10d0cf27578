//! Running real `mesh-agent node` processes on a testbed: config files generated from the
//! topology, start / kill / restart, waiting for a reconciliation to land, and reading the pinned
//! counters. Shared by the capture end-to-end tests.
#![allow(dead_code)]

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use mesh_agent::{capture::PinnedMaps, ebpf::CounterSnapshot};
use mesh_testbed::{Background, Pod, Testbed, binaries};

pub mod http;
pub mod pktgen;
pub mod sniffer;

/// A pod by (node, index), 1-based like the testbed.
pub type PodId = (usize, usize);

/// One node agent process and its files.
pub struct Agent {
    pub node: usize,
    pub handler: &'static str,
    pub config: PathBuf,
    pub bpffs: PathBuf,
    ca_dir: Option<PathBuf>,
    /// RLIMIT_NOFILE (soft, hard) to start the agent with (`prlimit`), instead of the test's.
    nofile: Option<(u64, u64)>,
    /// Extra command-line flags of the agent.
    flags: Vec<String>,
    process: Option<Background>,
}

/// The local-mode config for `node`: every pod of the testbed as a workload, `enrolled` ones in
/// namespace `mesh` (labelled ambient), the others in `plain`.
pub fn config_yaml(tb: &Testbed, node: usize, enrolled: &BTreeSet<PodId>) -> String {
    config_yaml_with_ca(tb, node, enrolled, None)
}

/// [`config_yaml`] plus a `ca:` section (for the mesh handler).
pub fn config_yaml_with_ca(
    tb: &Testbed,
    node: usize,
    enrolled: &BTreeSet<PodId>,
    ca_dir: Option<&Path>,
) -> String {
    config_yaml_full(tb, node, enrolled, ca_dir, None)
}

/// [`config_yaml_with_ca`] with a workload certificate lifetime.
pub fn config_yaml_full(
    tb: &Testbed,
    node: usize,
    enrolled: &BTreeSet<PodId>,
    ca_dir: Option<&Path>,
    cert_ttl: Option<u64>,
) -> String {
    let ca = ca_dir.map_or(String::new(), |d| match cert_ttl {
        Some(t) => format!("ca: {{dir: {}, certTtlSeconds: {t}}}\n", d.display()),
        None => format!("ca: {{dir: {}}}\n", d.display()),
    });
    // Every pod is labelled `slot: "<index on its node>"`; `svc-slot1` selects the first pod of
    // every node in namespace `mesh`.
    let services = "services:\n  - {name: svc-slot1, namespace: mesh, vips: [10.96.0.1, \"fd00:96::1\"], ports: [{port: 80, targetPort: 8080}], selector: {slot: \"1\"}}\n";
    let mut y = format!(
        "node: {{name: node{node}, uplinks: [{}]}}\n{ca}{services}namespaces:\n  - name: mesh\n    labels: {{istio.io/dataplane-mode: ambient}}\n  - name: plain\nworkloads:\n",
        tb.node(node).uplink
    );
    for pod in tb.pods() {
        let ns = if enrolled.contains(&(pod.node, pod.index)) {
            "mesh"
        } else {
            "plain"
        };
        y += &format!(
            "  - {{name: {}, namespace: {ns}, serviceAccount: sa-{}, node: node{}, ips: [{}, \"{}\"], hostInterface: {}, cgroup: {}, labels: {{slot: \"{}\"}}}}\n",
            pod.name(),
            pod.name(),
            pod.node,
            pod.ipv4,
            pod.ipv6,
            pod.host_veth,
            pod.place.cgroup.display(),
            pod.index
        );
    }
    y
}

/// A config with a `policies:` list appended (`policies`: YAML list items, may be empty).
pub fn with_policies(mut yaml: String, policies: &str) -> String {
    if policies.trim().is_empty() {
        yaml += "policies: []\n";
    } else {
        yaml += "policies:\n";
        yaml += policies;
    }
    yaml
}

/// `namespace/name` as the agent reports a pod.
pub fn pod_key(pod: &Pod, enrolled: bool) -> String {
    format!("{}/{}", if enrolled { "mesh" } else { "plain" }, pod.name())
}

impl Agent {
    /// Starts the agent of `node` with `handler` (`report` or `passthrough`) and waits until all
    /// three listeners are up.
    pub fn start(
        tb: &Testbed,
        node: usize,
        handler: &'static str,
        enrolled: &BTreeSet<PodId>,
    ) -> Result<Self> {
        Self::start_with_ca(tb, node, handler, enrolled, None)
    }

    /// [`Agent::start`] with a CA directory in the config (the `mesh` handler needs one).
    pub fn start_with_ca(
        tb: &Testbed,
        node: usize,
        handler: &'static str,
        enrolled: &BTreeSet<PodId>,
        ca_dir: Option<&Path>,
    ) -> Result<Self> {
        Self::start_full(tb, node, handler, enrolled, ca_dir, None)
    }

    /// [`Agent::start_with_ca`] with a workload certificate lifetime (seconds).
    pub fn start_full(
        tb: &Testbed,
        node: usize,
        handler: &'static str,
        enrolled: &BTreeSet<PodId>,
        ca_dir: Option<&Path>,
        cert_ttl: Option<u64>,
    ) -> Result<Self> {
        Self::start_with_config(
            tb,
            node,
            handler,
            enrolled,
            ca_dir,
            &config_yaml_full(tb, node, enrolled, ca_dir, cert_ttl),
        )
    }

    /// A `mesh` agent whose config carries `policies` (YAML list items of Istio objects).
    pub fn start_with_policies(
        tb: &Testbed,
        node: usize,
        enrolled: &BTreeSet<PodId>,
        ca_dir: &Path,
        policies: &str,
    ) -> Result<Self> {
        let yaml = with_policies(
            config_yaml_with_ca(tb, node, enrolled, Some(ca_dir)),
            policies,
        );
        Self::start_with_config(tb, node, "mesh", enrolled, Some(ca_dir), &yaml)
    }

    /// A `mesh` agent started with RLIMIT_NOFILE `(soft, hard)`.
    pub fn start_with_nofile(
        tb: &Testbed,
        node: usize,
        enrolled: &BTreeSet<PodId>,
        ca_dir: &Path,
        nofile: (u64, u64),
    ) -> Result<Self> {
        Self::start_mesh_with(tb, node, enrolled, ca_dir, (Some(nofile), &[]))
    }

    /// A `mesh` agent started with extra command-line `flags`.
    pub fn start_with_flags(
        tb: &Testbed,
        node: usize,
        enrolled: &BTreeSet<PodId>,
        ca_dir: &Path,
        flags: &[&str],
    ) -> Result<Self> {
        Self::start_mesh_with(tb, node, enrolled, ca_dir, (None, flags))
    }

    /// A `mesh` agent on the plain configuration, with an RLIMIT_NOFILE and extra flags.
    fn start_mesh_with(
        tb: &Testbed,
        node: usize,
        enrolled: &BTreeSet<PodId>,
        ca_dir: &Path,
        extra: (Option<(u64, u64)>, &[&str]),
    ) -> Result<Self> {
        let yaml = config_yaml_with_ca(tb, node, enrolled, Some(ca_dir));
        Self::start_inner(tb, node, "mesh", enrolled, Some(ca_dir), &yaml, extra)
    }

    pub fn start_with_config(
        tb: &Testbed,
        node: usize,
        handler: &'static str,
        enrolled: &BTreeSet<PodId>,
        ca_dir: Option<&Path>,
        yaml: &str,
    ) -> Result<Self> {
        Self::start_inner(tb, node, handler, enrolled, ca_dir, yaml, (None, &[]))
    }

    fn start_inner(
        tb: &Testbed,
        node: usize,
        handler: &'static str,
        enrolled: &BTreeSet<PodId>,
        ca_dir: Option<&Path>,
        yaml: &str,
        (nofile, flags): (Option<(u64, u64)>, &[&str]),
    ) -> Result<Self> {
        let dir = tb.bpffs_dir().join(format!("agent-node{node}"));
        let config =
            std::env::temp_dir().join(format!("mesh-e2e-{}-node{node}.yaml", tb.info().run));
        std::fs::write(&config, yaml)?;
        let mut agent = Agent {
            node,
            handler,
            config,
            bpffs: dir,
            ca_dir: ca_dir.map(Path::to_owned),
            nofile,
            flags: flags.iter().map(|f| (*f).to_owned()).collect(),
            process: None,
        };
        agent.spawn(tb)?;
        agent.wait_enrolled(tb, enrolled)?;
        Ok(agent)
    }

    fn spawn(&mut self, tb: &Testbed) -> Result<()> {
        let mut p = self.launch(tb)?;
        for port in [15001, 15006, 15008] {
            if let Err(e) = p.wait_listening(port, Duration::from_secs(20)) {
                let out = p.kill()?;
                bail!(
                    "{e:#}\nagent stderr:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        self.process = Some(p);
        Ok(())
    }

    /// Starts a second agent on this agent's node with the same configuration and bpffs
    /// directory, as the new pod of an upgrade does, and waits until it has taken the data path
    /// over: every link pin is its own and the readiness endpoint, which the old agent closes
    /// when it hands over, answers 200. Returns the new agent and how long the takeover took.
    pub fn start_successor(&self, tb: &Testbed) -> Result<(Agent, Duration)> {
        let config = self.config.with_extension("next.yaml");
        std::fs::copy(&self.config, &config)?;
        let mut next = Agent {
            node: self.node,
            handler: self.handler,
            config,
            bpffs: self.bpffs.clone(),
            ca_dir: self.ca_dir.clone(),
            nofile: self.nofile,
            flags: self.flags.clone(),
            process: None,
        };
        let started = Instant::now();
        let p = next.launch(tb)?;
        let p = mesh_testbed::kubemesh::wait_takeover(
            tb,
            self.node,
            &self.bpffs,
            p,
            Duration::from_secs(30),
        )?;
        next.process = Some(p);
        Ok((next, started.elapsed()))
    }

    /// Sends SIGTERM and returns at once (see [`Agent::wait_exit`]).
    pub fn signal_stop(&self) -> Result<()> {
        let pid = self.process.as_ref().context("agent not running")?.pid();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        Ok(())
    }

    /// Whether the agent process is still running.
    pub fn running(&mut self) -> bool {
        self.process
            .as_mut()
            .is_some_and(|p| p.try_wait().is_ok_and(|s| s.is_none()))
    }

    /// Waits up to `timeout` for the agent to exit by itself; its exit status and log.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<(std::process::ExitStatus, String)> {
        let out = self
            .process
            .take()
            .context("agent not running")?
            .wait(timeout)?;
        Ok((
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// Spawns `mesh-agent node` for this agent (no waiting).
    fn launch(&self, tb: &Testbed) -> Result<Background> {
        let bin = binaries::mesh_agent()?;
        let bin = bin.to_str().context("agent path")?;
        // prlimit sets the limit and execs the agent (same pid).
        let limit = self.nofile.map(|(s, h)| format!("--nofile={s}:{h}"));
        let (program, mut args) = match &limit {
            Some(l) => ("prlimit", vec![l.as_str(), bin]),
            None => (bin, vec![]),
        };
        args.extend_from_slice(&[
            "node",
            "--config",
            self.config.to_str().context("config path")?,
            "--bpffs-dir",
            self.bpffs.to_str().context("bpffs path")?,
            "--handler",
            self.handler,
            "--reload-interval-ms",
            "100",
        ]);
        if !spliced() {
            args.push("--splice=off");
        }
        args.extend(self.flags.iter().map(String::as_str));
        tb.node(self.node).place.spawn(program, &args)
    }

    /// Rewrites the config with a new enrolled set and waits until the kernel maps show it.
    /// Un-enrolling every pod of the node is meant here, so the file says so (the agent refuses
    /// it otherwise, see `mesh.allowUnenrollAll`).
    pub fn set_enrolled(&mut self, tb: &Testbed, enrolled: &BTreeSet<PodId>) -> Result<()> {
        let mut yaml = config_yaml(tb, self.node, enrolled);
        yaml += "mesh: {allowUnenrollAll: true}\n";
        std::fs::write(&self.config, yaml)?;
        self.wait_enrolled(tb, enrolled)
    }

    /// Rewrites the config (same pods, CA) with a new list of policies; the agent picks it up
    /// within its reload interval.
    pub fn set_policies(
        &self,
        tb: &Testbed,
        enrolled: &BTreeSet<PodId>,
        policies: &str,
    ) -> Result<()> {
        let yaml = with_policies(
            config_yaml_with_ca(tb, self.node, enrolled, self.ca_dir.as_deref()),
            policies,
        );
        std::fs::write(&self.config, yaml)?;
        Ok(())
    }

    /// Replaces the whole config file (the agent reloads it within its polling interval).
    pub fn rewrite_config(&self, yaml: &str) -> Result<()> {
        std::fs::write(&self.config, yaml)?;
        Ok(())
    }

    /// Waits until MESH_PODS holds exactly the host interfaces of this node's enrolled pods.
    pub fn wait_enrolled(&self, tb: &Testbed, enrolled: &BTreeSet<PodId>) -> Result<()> {
        let want = self.ifindexes(tb, enrolled)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let have: BTreeSet<u32> = self
                .maps()
                .pods()
                .map(|v| v.into_iter().map(|(i, _)| i).collect())
                .unwrap_or_default();
            // The links too: the agent attaches after writing the maps.
            let linked: BTreeSet<u32> = std::fs::read_dir(self.bpffs.join("links"))
                .map(|d| {
                    d.flatten()
                        .filter_map(|e| {
                            let name = e.file_name().to_string_lossy().into_owned();
                            let rest = name.strip_prefix("mesh_tc_from_pod-if")?;
                            rest.split('-').next()?.parse().ok()
                        })
                        .collect()
                })
                .unwrap_or_default();
            if have == want && linked == want {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "node{}: enrolled interfaces {have:?}, want {want:?}",
                    self.node
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The host-side interface indexes of this node's pods in `enrolled` (as MESH_PODS keys them).
    pub fn ifindexes(&self, tb: &Testbed, enrolled: &BTreeSet<PodId>) -> Result<BTreeSet<u32>> {
        tb.pods()
            .iter()
            .filter(|p| p.node == self.node && enrolled.contains(&(p.node, p.index)))
            .map(|p| {
                tb.node(self.node)
                    .place
                    .in_netns(|| mesh_agent::ebpf::ifindex_of(&p.host_veth))
                    .and_then(|r| Ok(r?))
            })
            .collect()
    }

    pub fn maps(&self) -> PinnedMaps {
        PinnedMaps::new(&self.bpffs.join("maps"))
    }

    pub fn counters(&self) -> CounterSnapshot {
        self.maps().counters().expect("pinned counters readable")
    }

    /// Stops the agent (SIGTERM) and returns its log.
    pub fn stop(&mut self) -> Result<String> {
        let out = self
            .process
            .take()
            .context("agent not running")?
            .terminate(Duration::from_secs(10))?;
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// SIGKILL, as a crash would: nothing is cleaned up by the agent.
    pub fn kill(&mut self) -> Result<String> {
        let out = self.process.take().context("agent not running")?.kill()?;
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// Starts the agent again with the same config and bpffs directory.
    pub fn restart(&mut self, tb: &Testbed, enrolled: &BTreeSet<PodId>) -> Result<()> {
        anyhow::ensure!(self.process.is_none(), "agent still running");
        self.spawn(tb)?;
        self.wait_enrolled(tb, enrolled)
    }

    /// `mesh-agent node --explain-datapath` for this agent.
    pub fn explain(&self, tb: &Testbed) -> Result<String> {
        self.agent_cmd(tb, &["--explain-datapath"])
    }

    /// `mesh-agent node --uninstall` for this agent.
    pub fn uninstall(&self, tb: &Testbed) -> Result<String> {
        self.agent_cmd(tb, &["--uninstall"])
    }

    fn agent_cmd(&self, tb: &Testbed, extra: &[&str]) -> Result<String> {
        let bin = binaries::mesh_agent()?;
        let mut args = vec!["node", "--bpffs-dir", self.bpffs.to_str().context("path")?];
        args.extend_from_slice(extra);
        tb.node(self.node)
            .place
            .run(bin.to_str().context("path")?, &args)
    }

    /// Open file descriptors of the running agent (sockets included).
    pub fn fd_count(&self) -> usize {
        let pid = self.process.as_ref().expect("agent running").pid();
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    pub fn bpffs(&self) -> &Path {
        &self.bpffs
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(p) = self.process.take() {
            let _ = p.kill();
        }
        let _ = std::fs::remove_file(&self.config);
        // The testbed's teardown removes the namespaces (rules, routes, links with their
        // interfaces) and the bpffs directory; nothing else is left.
    }
}

/// A testbed of two nodes with a `mesh` agent each, sharing a fresh CA.
pub struct Mesh {
    pub tb: Testbed,
    pub ca: TempDir,
    pub a1: Agent,
    pub a2: Agent,
}

impl Mesh {
    pub fn start(spec: mesh_testbed::TestbedSpec, enrolled: &[PodId]) -> Self {
        let tb = Testbed::build(spec).unwrap();
        let ca = TempDir::with_ca(&tb.info().run);
        let enrolled = pods(enrolled);
        let a1 = Agent::start_with_ca(&tb, 1, "mesh", &enrolled, Some(ca.path())).unwrap();
        let a2 = Agent::start_with_ca(&tb, 2, "mesh", &enrolled, Some(ca.path())).unwrap();
        Mesh { tb, ca, a1, a2 }
    }
}

/// Removes the CA and checks the testbed leaves nothing behind (agents already dropped).
pub fn finish(tb: Testbed, ca: TempDir) {
    drop(ca);
    tb.teardown_verified().unwrap();
}

/// The set of pods, as a `BTreeSet`.
/// Whether agents run spliced: the agent's default; `cargo xtask test` runs some suites once more
/// with `MESH_TEST_SPLICE=off`.
pub fn spliced() -> bool {
    std::env::var("MESH_TEST_SPLICE").as_deref() != Ok("off")
}

pub fn pods(ids: &[PodId]) -> BTreeSet<PodId> {
    ids.iter().copied().collect()
}

/// A directory removed when dropped (also when the test panics).
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh CA (`mesh-agent ca init` layout) in a new temporary directory.
    pub fn with_ca(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("mesh-e2e-ca-{tag}"));
        let _ = std::fs::remove_dir_all(&dir);
        mesh_agent::identity::LocalCa::init_dir(&dir, "cluster.local", Duration::from_secs(3600))
            .expect("creating a test CA");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
