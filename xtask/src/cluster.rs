//! `cargo xtask image`, `cargo xtask kind …` and `cargo xtask minikube …`: a local Kubernetes
//! cluster with the mesh on it, for people with Docker. Every step is an ordinary command
//! (docker, kind or minikube, kubectl), printed before it runs; `--dry-run` prints them only.
//! None of this can run on the project's CI machines (no Docker engine there): the manifests
//! themselves are checked offline by tests/tests/deploy_manifests.rs.
use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Subcommand;

use crate::{cmd, workspace_root};

/// The image every manifest overlay uses (loaded into the nodes, never pulled).
pub const IMAGE: &str = "mesh-agent:dev";
/// The cluster's name (kind) / profile (minikube).
const CLUSTER: &str = "mesh";
const MESH_NAMESPACE: &str = "mesh-system";
const DEMO_NAMESPACE: &str = "demo";

#[derive(Subcommand, Clone, Copy, Debug)]
pub enum ClusterCmd {
    /// Create the cluster (kind: a control plane and two workers; minikube: two nodes).
    Up {
        #[arg(long)]
        dry_run: bool,
    },
    /// Build the image, load it into the nodes, install the CRDs (unless Istio's are there)
    /// and deploy/ overlay, and wait for the CA and every node agent to be ready.
    Deploy {
        #[arg(long)]
        dry_run: bool,
    },
    /// Deploy the demo (namespace `demo`, enrolled by label) and show traffic through the
    /// mesh: the allowed client reaches the server, the intruder is refused, the agents count it.
    Demo,
    /// Delete the cluster.
    Down {
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    Kind,
    Minikube,
}

impl Flavor {
    fn tool(self) -> &'static str {
        match self {
            Flavor::Kind => "kind",
            Flavor::Minikube => "minikube",
        }
    }

    /// The kubeconfig context each tool creates for the cluster.
    fn context(self) -> String {
        match self {
            Flavor::Kind => format!("kind-{CLUSTER}"),
            Flavor::Minikube => CLUSTER.to_owned(),
        }
    }

    fn overlay(self) -> PathBuf {
        workspace_root().join("deploy/overlays").join(self.tool())
    }

    fn create(self) -> Command {
        match self {
            Flavor::Kind => {
                let mut c = command(
                    "kind",
                    &["create", "cluster", "--name", CLUSTER, "--config"],
                );
                c.arg(workspace_root().join("deploy/kind/cluster.yaml"));
                c
            }
            // A routed CNI: the agent finds pods by their host route (the default bridge CNI
            // puts every pod behind one bridge).
            Flavor::Minikube => command(
                "minikube",
                &[
                    "start",
                    "--profile",
                    CLUSTER,
                    "--nodes",
                    "2",
                    "--cni",
                    "kindnet",
                    "--container-runtime",
                    "containerd",
                ],
            ),
        }
    }

    fn load_image(self) -> Command {
        match self {
            Flavor::Kind => command("kind", &["load", "docker-image", IMAGE, "--name", CLUSTER]),
            Flavor::Minikube => {
                command("minikube", &["--profile", CLUSTER, "image", "load", IMAGE])
            }
        }
    }

    fn delete(self) -> Command {
        match self {
            Flavor::Kind => command("kind", &["delete", "cluster", "--name", CLUSTER]),
            Flavor::Minikube => command("minikube", &["delete", "--profile", CLUSTER]),
        }
    }

    fn exists(self) -> Result<bool> {
        Ok(match self {
            Flavor::Kind => cmd::output(&mut command("kind", &["get", "clusters"]))?
                .lines()
                .any(|l| l.trim() == CLUSTER),
            Flavor::Minikube => command("minikube", &["status", "--profile", CLUSTER])
                .output()
                .is_ok_and(|o| o.status.success()),
        })
    }

    fn kubectl(self, args: &[&str]) -> Command {
        let mut c = command("kubectl", &["--context", &self.context()]);
        c.args(args);
        c
    }
}

/// `Command::new(program).args(args)`.
fn command(program: &str, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    c
}

/// Prints and runs, or only prints.
struct Steps {
    dry_run: bool,
}

impl Steps {
    fn run(&self, mut c: Command) -> Result<()> {
        if self.dry_run {
            println!("  → {}", cmd::display(&c));
            Ok(())
        } else {
            cmd::run(&mut c)
        }
    }
}

fn require(tools: &[&str]) -> Result<()> {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| !mesh_testbed::privilege::on_path(t))
        .collect();
    if !missing.is_empty() {
        bail!(
            "{} not found on PATH: a local cluster needs Docker, kubectl and kind or minikube \
             (see README, \"Run on kind / minikube\"); `--dry-run` prints the commands instead",
            missing.join(", ")
        );
    }
    Ok(())
}

/// `docker build -f deploy/Dockerfile -t <tag> .` from the repository root.
pub fn image_command(tag: &str) -> Command {
    let root = workspace_root();
    let mut c = command("docker", &["build", "-f"]);
    c.arg(root.join("deploy/Dockerfile"))
        .args(["-t", tag])
        .arg(&root);
    c
}

pub fn image(tag: &str, dry_run: bool) -> Result<()> {
    if !dry_run {
        require(&["docker"])?;
    }
    Steps { dry_run }.run(image_command(tag))
}

pub fn run(flavor: Flavor, command: ClusterCmd) -> Result<()> {
    match command {
        ClusterCmd::Up { dry_run } => up(flavor, dry_run),
        ClusterCmd::Deploy { dry_run } => deploy(flavor, dry_run),
        ClusterCmd::Demo => demo(flavor),
        ClusterCmd::Down { dry_run } => {
            if !dry_run {
                require(&[flavor.tool()])?;
            }
            Steps { dry_run }.run(flavor.delete())
        }
    }
}

fn up(flavor: Flavor, dry_run: bool) -> Result<()> {
    if !dry_run {
        require(&["docker", flavor.tool()])?;
        if flavor.exists()? {
            println!("✓ {} cluster {CLUSTER} exists", flavor.tool());
            return Ok(());
        }
    }
    Steps { dry_run }.run(flavor.create())
}

fn deploy(flavor: Flavor, dry_run: bool) -> Result<()> {
    if !dry_run {
        require(&["docker", "kubectl", flavor.tool()])?;
    }
    let steps = Steps { dry_run };
    steps.run(image_command(IMAGE))?;
    steps.run(flavor.load_image())?;
    // Istio's CRDs, when installed, are used as they are; otherwise ours.
    let istio_crds = !dry_run && foreign_crds_installed(flavor)?;
    if istio_crds {
        println!("✓ security.istio.io CRDs installed by someone else (Istio?): using them");
    } else {
        let mut c = flavor.kubectl(&["apply", "--server-side", "-k"]);
        c.arg(workspace_root().join("deploy/crds"));
        steps.run(c)?;
    }
    let mut c = flavor.kubectl(&["apply", "-k"]);
    c.arg(flavor.overlay());
    steps.run(c)?;
    // The same tag may now name a newer image: restart to pick it up.
    steps.run(flavor.kubectl(&[
        "-n",
        MESH_NAMESPACE,
        "rollout",
        "restart",
        "deployment/mesh-ca",
        "daemonset/mesh-agent",
    ]))?;
    for what in ["deployment/mesh-ca", "daemonset/mesh-agent"] {
        steps.run(flavor.kubectl(&[
            "-n",
            MESH_NAMESPACE,
            "rollout",
            "status",
            what,
            "--timeout=300s",
        ]))?;
    }
    Ok(())
}

/// Whether AuthorizationPolicy's CRD exists without our label.
fn foreign_crds_installed(flavor: Flavor) -> Result<bool> {
    let out = flavor
        .kubectl(&[
            "get",
            "crd",
            "authorizationpolicies.security.istio.io",
            "--ignore-not-found",
            "-o",
            "jsonpath={.metadata.name} {.metadata.labels.app\\.kubernetes\\.io/part-of}",
        ])
        .output()
        .context("running kubectl")?;
    if !out.status.success() {
        bail!(
            "kubectl get crd failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    Ok(words.next().is_some() && words.next() != Some("mesh-agent"))
}

fn demo(flavor: Flavor) -> Result<()> {
    require(&["kubectl"])?;
    let deployed = flavor
        .kubectl(&[
            "-n",
            MESH_NAMESPACE,
            "get",
            "daemonset/mesh-agent",
            "-o",
            "name",
        ])
        .output()
        .is_ok_and(|o| o.status.success());
    if !deployed {
        let tool = flavor.tool();
        bail!(
            "no mesh-agent DaemonSet in context {}: run `cargo xtask {tool} up` and `cargo xtask {tool} deploy` first",
            flavor.context()
        );
    }
    let mut c = flavor.kubectl(&["apply", "-k"]);
    c.arg(workspace_root().join("deploy/demo"));
    cmd::run(&mut c)?;
    for d in ["server", "client", "intruder"] {
        cmd::run(&mut flavor.kubectl(&[
            "-n",
            DEMO_NAMESPACE,
            "rollout",
            "status",
            &format!("deployment/{d}"),
            "--timeout=300s",
        ]))?;
    }
    // The node agent has captured the client when it annotates it.
    let client_pod = pod_of(flavor, "client")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let a = pod_field(
            flavor,
            &client_pod,
            "{.metadata.annotations.ambient\\.istio\\.io/redirection}",
        )?;
        if a.trim() == "enabled" {
            println!("✓ {client_pod} is captured (ambient.istio.io/redirection: enabled)");
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "{client_pod} was not captured within 60 s: see `kubectl -n {MESH_NAMESPACE} logs ds/mesh-agent`"
            );
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    // The server echoes the address it sees: the client's own (the mesh keeps the source).
    let curl = |who: &str| {
        flavor.kubectl(&[
            "-n",
            DEMO_NAMESPACE,
            "exec",
            &format!("deployment/{who}"),
            "--",
            "curl",
            "-sS",
            "--max-time",
            "5",
            "http://server/clientip",
        ])
    };
    let client_ip = pod_field(flavor, &client_pod, "{.status.podIP}")?;
    for i in 1..=5 {
        let seen = cmd::output(&mut curl("client"))
            .with_context(|| format!("request {i} from the allowed client"))?;
        let seen = seen.trim();
        // agnhost answers Go's RemoteAddr, `ip:port` or `[ip]:port`: compare the address.
        let seen_ip = seen
            .rsplit_once(':')
            .map_or(seen, |(ip, _)| ip)
            .trim_matches(['[', ']']);
        if seen_ip != client_ip.trim() {
            bail!(
                "the server saw {seen}, not the client's address {client_ip}: the source was not kept"
            );
        }
        println!("✓ client → server ({i}/5): the server saw the client's own address {seen}");
    }
    match cmd::output(&mut curl("intruder")) {
        Ok(body) => bail!(
            "the intruder reached the server ({}): the AuthorizationPolicy was not enforced",
            body.trim()
        ),
        Err(e) => println!("✓ intruder → server refused by policy ({e:#})"),
    }
    // What the client's node agent counted.
    let node = pod_field(flavor, &client_pod, "{.spec.nodeName}")?;
    let agent = cmd::output(&mut flavor.kubectl(&[
        "-n",
        MESH_NAMESPACE,
        "get",
        "pod",
        "-l",
        "app.kubernetes.io/name=mesh-agent",
        "--field-selector",
        &format!("spec.nodeName={}", node.trim()),
        "-o",
        "name",
    ]))?;
    cmd::run(&mut flavor.kubectl(&[
        "-n",
        MESH_NAMESPACE,
        "exec",
        agent.trim(),
        "--",
        "mesh-agent",
        "metrics",
        "--top",
        "5",
    ]))?;
    println!(
        "✓ demo done; remove it with: kubectl --context {} delete -k deploy/demo",
        flavor.context()
    );
    Ok(())
}

/// A field of a demo pod, by JSONPath.
fn pod_field(flavor: Flavor, pod: &str, jsonpath: &str) -> Result<String> {
    cmd::output(&mut flavor.kubectl(&[
        "-n",
        DEMO_NAMESPACE,
        "get",
        "pod",
        pod,
        "-o",
        &format!("jsonpath={jsonpath}"),
    ]))
}

fn pod_of(flavor: Flavor, app: &str) -> Result<String> {
    let name = cmd::output(&mut flavor.kubectl(&[
        "-n",
        DEMO_NAMESPACE,
        "get",
        "pod",
        "-l",
        &format!("app={app}"),
        "-o",
        "jsonpath={.items[0].metadata.name}",
    ]))?;
    if name.trim().is_empty() {
        bail!("no {app} pod in namespace {DEMO_NAMESPACE}");
    }
    Ok(name.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_the_commands_use_exists() {
        for flavor in [Flavor::Kind, Flavor::Minikube] {
            assert!(flavor.overlay().join("kustomization.yaml").is_file());
        }
        for p in [
            "deploy/kind/cluster.yaml",
            "deploy/crds/kustomization.yaml",
            "deploy/demo/kustomization.yaml",
            "deploy/Dockerfile",
        ] {
            assert!(workspace_root().join(p).is_file(), "{p}");
        }
    }

    #[test]
    fn the_image_and_cluster_names_match_the_manifests() {
        let component = std::fs::read_to_string(
            workspace_root().join("deploy/components/local-image/kustomization.yaml"),
        )
        .unwrap();
        let (name, tag) = IMAGE.split_once(':').unwrap();
        assert!(component.contains(&format!("newName: {name}")));
        assert!(component.contains(&format!("newTag: {tag}")));
        let kind =
            std::fs::read_to_string(workspace_root().join("deploy/kind/cluster.yaml")).unwrap();
        assert!(kind.contains(&format!("name: {CLUSTER}\n")));
        let build = cmd::display(&image_command(IMAGE));
        assert!(build.starts_with("docker build -f ") && build.contains("-t mesh-agent:dev"));
        assert_eq!(
            cmd::display(&Flavor::Kind.load_image()),
            "kind load docker-image mesh-agent:dev --name mesh"
        );
    }
}
