//! A mesh in Kubernetes mode on a testbed, as a cluster runs it: the API server double
//! ([`FakeApi`]) holding the namespaces and pods, `mesh-agent ca serve` run as the CA
//! Deployment runs it (uid 65532, no capabilities) with projected-token authentication, and node
//! agents with no `--config`, holding exactly the capabilities the DaemonSet grants. Shared by
//! the `kube_mode` suite and `cargo xtask soak`.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use crate::{
    Background, Pod, Testbed,
    deploy::{node_agent_capabilities, with_only_capabilities},
    fakeapi::{FakeApi, TokenUser},
    http::http_get,
};

/// The CA's audience for projected tokens (`mesh_agent::ca::auth::CA_AUDIENCE`).
pub const CA_AUDIENCE: &str = "istio-ca";

/// A Namespace object; `ambient` labels it `istio.io/dataplane-mode=ambient`.
pub fn namespace(name: &str, ambient: bool) -> Value {
    let mut labels = json!({"kubernetes.io/metadata.name": name});
    if ambient {
        labels["istio.io/dataplane-mode"] = json!("ambient");
    }
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

/// The Pod object of testbed pod `p` in `ns` (labels `app: <name>`, service account
/// `sa-<name>`, both addresses, running on its node).
pub fn pod(p: &Pod, ns: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": p.name(), "namespace": ns, "uid": p.uid(), "labels": {"app": p.name()}},
        "spec": {"nodeName": format!("node{}", p.node), "serviceAccountName": format!("sa-{}", p.name()),
                 "containers": [{"name": "app", "image": "mtb-probe"}]},
        "status": {"phase": "Running", "podIP": p.ipv4.to_string(),
                   "podIPs": [{"ip": p.ipv4.to_string()}, {"ip": p.ipv6.to_string()}]}
    })
}

/// The API server double, the CA's files and the agents' command lines for one testbed.
pub struct KubeMesh<'a> {
    tb: &'a Testbed,
    pub api: FakeApi,
    work: PathBuf,
    kubeconfig: PathBuf,
    agent_bin: PathBuf,
    capabilities: Vec<String>,
}

impl<'a> KubeMesh<'a> {
    /// Starts the API server double on node1's uplink address (every node reaches it over the
    /// LAN from its own namespace, where nothing is captured) and registers each node's agent
    /// pod with a bound token for the CA; `work` holds the kubeconfig, tokens and root.
    pub fn new(tb: &'a Testbed, work: &Path, agent_bin: &Path) -> Result<Self> {
        let node1 = tb.node(1);
        let listener = node1
            .place
            .in_netns(|| std::net::TcpListener::bind((node1.ipv4, 0)))??;
        let api = FakeApi::start_on(listener);
        let kubeconfig = api.write_kubeconfig(work);
        for n in 1..=tb.info().nodes.len() {
            let name = format!("mesh-agent-node{n}");
            api.apply(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": "mesh-system", "uid": format!("uid-{name}")},
                "spec": {"nodeName": format!("node{n}"), "serviceAccountName": "mesh-agent",
                         "hostNetwork": true, "containers": [{"name": "mesh-agent", "image": "mesh-agent"}]},
                "status": {"phase": "Running", "podIP": tb.node(n).ipv4.to_string()}
            }));
            let token = format!("token-of-{name}");
            api.add_token(
                &token,
                TokenUser {
                    username: "system:serviceaccount:mesh-system:mesh-agent".into(),
                    audiences: vec![CA_AUDIENCE.into()],
                    extra: BTreeMap::from([
                        (
                            "authentication.kubernetes.io/pod-name".into(),
                            vec![name.clone()],
                        ),
                        (
                            "authentication.kubernetes.io/pod-uid".into(),
                            vec![format!("uid-{name}")],
                        ),
                    ]),
                },
            );
            let dir = work.join(format!("tokens-node{n}"));
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("istio-ca-token"), token)?;
        }
        // A copy anyone may execute: the checkout may sit where uid 65532 cannot reach.
        std::fs::copy(agent_bin, work.join("mesh-agent-ca")).context("copying the agent")?;
        Ok(KubeMesh {
            tb,
            api,
            work: work.to_owned(),
            kubeconfig,
            agent_bin: agent_bin.to_owned(),
            capabilities: node_agent_capabilities()?,
        })
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The CA's address, as the agents are given it.
    pub fn ca_address(&self) -> String {
        format!("https://{}:15012", self.tb.node(1).ipv4)
    }

    /// Starts the CA on node1 (uid 65532, no capabilities) with `extra` flags and waits until it
    /// listens. The first time, it publishes its root, which is written where the agents read
    /// it (the DaemonSet's ConfigMap mount).
    pub fn start_ca(&self, extra: &[&str]) -> Result<Background> {
        let ca_bin = self.work.join("mesh-agent-ca");
        let node1 = self.tb.node(1);
        let listen = format!("{}:15012", node1.ipv4);
        let metrics = format!("{}:15014", node1.ipv4);
        let mut args = vec![
            "--reuid=65532",
            "--regid=65532",
            "--clear-groups",
            "--bounding-set=-all",
            "--inh-caps=-all",
            "--no-new-privs",
            "--",
            ca_bin.to_str().context("path")?,
            "ca",
            "serve",
            "--listen",
            &listen,
            "--metrics-listen",
            &metrics,
            "--namespace",
            "mesh-system",
            "--kubeconfig",
            self.kubeconfig.to_str().context("path")?,
        ];
        let address = node1.ipv4.to_string();
        args.extend(["--dns-name", &address]);
        args.extend(extra);
        let mut ca = node1.place.spawn("setpriv", &args)?;
        if let Err(e) = ca.wait_listening(15012, Duration::from_secs(30)) {
            let out = ca.kill()?;
            bail!("the CA: {e:#}\n{}", String::from_utf8_lossy(&out.stderr));
        }
        let root_file = self.root_file();
        if !root_file.exists() {
            let root = self
                .api
                .get("configmaps", "mesh-system", "istio-ca-root-cert")
                .context("the CA did not publish its root")?["data"]["root-cert.pem"]
                .as_str()
                .context("root-cert.pem in the root ConfigMap")?
                .to_owned();
            std::fs::create_dir_all(root_file.parent().context("path")?)?;
            std::fs::write(&root_file, root)?;
        }
        Ok(ca)
    }

    fn root_file(&self) -> PathBuf {
        self.work.join("istio/root-cert.pem")
    }

    /// The bpffs directory of node `n`'s agent.
    pub fn bpffs(&self, n: usize) -> PathBuf {
        self.tb.bpffs_dir().join(format!("agent-node{n}"))
    }

    /// Node `n`'s agent as the DaemonSet runs it (under `setpriv`, holding only its
    /// capabilities), with `extra` flags.
    pub fn agent_argv(&self, n: usize, extra: &[&str]) -> Result<Vec<String>> {
        let token = self.work.join(format!("tokens-node{n}/istio-ca-token"));
        let bpffs = self.bpffs(n);
        let cgroups = self.tb.pod_cgroup_root(n);
        let ca_address = self.ca_address();
        let node = format!("node{n}");
        let root = self.root_file();
        let mut args = vec![
            "node",
            "--kubeconfig",
            self.kubeconfig.to_str().context("path")?,
            "--node-name",
            &node,
            "--ca-address",
            &ca_address,
            "--ca-root",
            root.to_str().context("path")?,
        ];
        args.extend([
            "--ca-token",
            token.to_str().context("path")?,
            "--bpffs-dir",
            bpffs.to_str().context("path")?,
            "--pod-cgroup-root",
            cgroups.to_str().context("path")?,
        ]);
        args.extend(extra);
        Ok(with_only_capabilities(
            &self.capabilities,
            self.agent_bin.to_str().context("path")?,
            &args,
        ))
    }

    /// Spawns node `n`'s agent (no waiting).
    pub fn spawn_agent(&self, n: usize, extra: &[&str]) -> Result<Background> {
        let argv = self.agent_argv(n, extra)?;
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        self.tb.node(n).place.spawn("setpriv", &argv)
    }

    /// Spawns node `n`'s agent and waits until its capture listeners are up.
    pub fn start_agent(&self, n: usize, extra: &[&str]) -> Result<Background> {
        let mut a = self.spawn_agent(n, extra)?;
        for port in [15001, 15006, 15008] {
            if let Err(e) = a.wait_listening(port, Duration::from_secs(30)) {
                let out = a.kill()?;
                bail!("node{n}: {e:#}\n{}", String::from_utf8_lossy(&out.stderr));
            }
        }
        Ok(a)
    }

    /// Starts a second agent on node `n` beside the running one, as the surge pod of a rollout,
    /// and waits until it has taken the data path over; returns it and how long that took.
    pub fn start_successor(&self, n: usize, extra: &[&str]) -> Result<(Background, Duration)> {
        let started = Instant::now();
        let p = self.spawn_agent(n, extra)?;
        let p = wait_takeover(self.tb, n, &self.bpffs(n), p, Duration::from_secs(30))?;
        Ok((p, started.elapsed()))
    }

    /// Node `n`'s readiness endpoint: (status line, body); empty when it does not answer.
    pub fn readiness(&self, n: usize) -> (String, String) {
        readiness(self.tb, n)
    }
}

/// Node `n`'s readiness endpoint (127.0.0.1:15021 in the node): (status line, body); empty when
/// it does not answer.
pub fn readiness(tb: &Testbed, n: usize) -> (String, String) {
    http_get(
        &tb.node(n).place,
        "127.0.0.1:15021".parse().expect("address"),
        "GET",
        "/healthz/ready",
    )
    .unwrap_or_default()
}

/// Waits until `next`, a second agent started on node `n` with the running one's bpffs
/// directory `bpffs`, has taken the data path over: every link pin is its own (named after its
/// pid) and the readiness endpoint, which the old agent closes when it hands over, answers 200.
/// Kills it and fails with its log when it exits or `timeout` passes first.
pub fn wait_takeover(
    tb: &Testbed,
    n: usize,
    bpffs: &Path,
    mut next: Background,
    timeout: Duration,
) -> Result<Background> {
    let suffix = format!("p{}", next.pid());
    let deadline = Instant::now() + timeout;
    loop {
        // The splice's tracing link is shared by agent instances, not taken over.
        let links: Vec<String> = std::fs::read_dir(bpffs.join("links"))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| !name.contains("-trace-"))
            .collect();
        let all_new = !links.is_empty() && links.iter().all(|l| l.ends_with(&suffix));
        if all_new && readiness(tb, n).0.contains("200") {
            return Ok(next);
        }
        if Instant::now() > deadline || next.try_wait()?.is_some() {
            let out = next.kill()?;
            bail!(
                "node{n}: the successor did not take over (links {links:?})\nits stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
