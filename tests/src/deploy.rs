//! The Kubernetes manifests in deploy/, read by the tests that check them against the agent
//! (tests/tests/deploy_manifests.rs) and by the e2e test that runs the agent with exactly the
//! DaemonSet's capabilities (tests/tests/kube_mode.rs).
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::Container};

/// The repository's deploy/ directory.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .join("deploy")
}

/// The node agent's DaemonSet as written in the kustomize base.
pub fn node_agent_daemonset() -> Result<DaemonSet> {
    let path = deploy_dir().join("base/node-agent.yaml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_yaml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// The DaemonSet's `mesh-agent` container.
pub fn node_agent_container(ds: &DaemonSet) -> Result<&Container> {
    ds.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.containers.iter().find(|c| c.name == "mesh-agent"))
        .context("the DaemonSet has no mesh-agent container")
}

/// The capabilities the DaemonSet gives the agent (after dropping ALL), upper case without
/// the `CAP_` prefix, as Kubernetes spells them.
pub fn node_agent_capabilities() -> Result<Vec<String>> {
    let ds = node_agent_daemonset()?;
    let caps = node_agent_container(&ds)?
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .context("the agent container sets no capabilities")?;
    if caps.drop.as_deref() != Some(&["ALL".to_owned()][..]) {
        bail!(
            "the agent container must drop ALL capabilities, drops {:?}",
            caps.drop
        );
    }
    Ok(caps.add.clone().unwrap_or_default())
}

/// `program args` as uid 0 holding only `caps` (a container with `drop: [ALL]`, `add: caps`,
/// `allowPrivilegeEscalation: false`): setpriv bounds the capability set before exec.
pub fn with_only_capabilities(caps: &[String], program: &str, args: &[&str]) -> Vec<String> {
    let bounding: Vec<String> = caps
        .iter()
        .map(|c| format!("+{}", c.to_lowercase()))
        .collect();
    let mut out = vec![
        format!("--bounding-set=-all,{}", bounding.join(",")),
        "--inh-caps=-all".to_owned(),
        "--no-new-privs".to_owned(),
        "--".to_owned(),
        program.to_owned(),
    ];
    out.extend(args.iter().map(|a| (*a).to_owned()));
    out
}

/// `kubectl kustomize dir`: the objects it renders, offline.
pub fn kustomize(dir: &Path) -> Result<Vec<serde_json::Value>> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .context("running kubectl kustomize")?;
    if !out.status.success() {
        bail!(
            "kubectl kustomize {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8(out.stdout).context("kustomize output is not UTF-8")?;
    parse_documents(&text)
}

/// Every YAML document of a multi-document stream, as JSON values (empty documents skipped).
pub fn parse_documents(text: &str) -> Result<Vec<serde_json::Value>> {
    use serde::Deserialize as _;
    let mut docs = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let v =
            serde_json::Value::deserialize(doc).with_context(|| format!("YAML document {i}"))?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

/// The Dockerfile rules the project holds itself to (no hadolint offline): multi-stage with
/// named stages, pinned base tags, a final stage that installs what the binary shells out to
/// (`ip`), copies the binary from a build stage, runs as a non-root user by default and
/// executes the binary in exec form; apt without recommends and without leftover lists; no
/// downloads by ADD. Returns the problems found.
pub fn lint_dockerfile(text: &str) -> Vec<String> {
    // Instructions with continuations joined; comments and blank lines dropped.
    let mut instructions: Vec<String> = Vec::new();
    let mut pending = String::new();
    for line in text.lines() {
        let t = line.trim();
        if pending.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(part) => {
                pending.push_str(part);
                pending.push(' ');
            }
            None => {
                pending.push_str(t);
                instructions.push(std::mem::take(&mut pending));
            }
        }
    }
    let mut problems = Vec::new();
    let mut stages: Vec<(Option<String>, Vec<String>)> = Vec::new();
    for ins in instructions {
        let (op, rest) = ins.split_once(' ').unwrap_or((&ins, ""));
        let op = op.to_ascii_uppercase();
        if op == "FROM" {
            let words: Vec<&str> = rest.split_whitespace().collect();
            let image = words.first().copied().unwrap_or_default();
            let name = match words.as_slice() {
                [_, as_, n] if as_.eq_ignore_ascii_case("as") => Some(n.to_string()),
                _ => None,
            };
            let known_stage = stages.iter().any(|(n, _)| n.as_deref() == Some(image));
            match image.rsplit_once(':') {
                _ if known_stage => {}
                Some((_, "latest")) => {
                    problems.push(format!("FROM {image}: pin a tag, not latest"))
                }
                None => problems.push(format!("FROM {image}: pin a tag")),
                Some(_) => {}
            }
            stages.push((name, Vec::new()));
            continue;
        }
        let Some((_, body)) = stages.last_mut() else {
            if op != "ARG" {
                problems.push(format!("{op} before the first FROM"));
            }
            continue;
        };
        if op == "ADD" && (rest.contains("http://") || rest.contains("https://")) {
            problems
                .push("ADD of a URL: no downloads at build time outside package managers".into());
        }
        if op == "RUN" && rest.contains("apt-get install") {
            if !rest.contains("--no-install-recommends") {
                problems.push("apt-get install without --no-install-recommends".into());
            }
            if !rest.contains("rm -rf /var/lib/apt/lists") {
                problems.push("apt lists left in the layer".into());
            }
        }
        body.push(format!("{op} {rest}"));
    }
    if stages.len() < 2 {
        problems.push("not multi-stage: build and runtime must be separate stages".into());
        return problems;
    }
    let build_names: Vec<&str> = stages[..stages.len() - 1]
        .iter()
        .filter_map(|(n, _)| n.as_deref())
        .collect();
    let (_, last) = stages.last().unwrap();
    let copied: Vec<&String> = last
        .iter()
        .filter(|i| i.starts_with("COPY --from="))
        .collect();
    if !copied.iter().any(|c| {
        let from = c["COPY --from=".len()..]
            .split_whitespace()
            .next()
            .unwrap_or("");
        build_names.contains(&from)
    }) {
        problems.push("the runtime stage copies nothing from a named build stage".into());
    }
    if !last
        .iter()
        .any(|i| i.starts_with("RUN") && i.contains("iproute2"))
    {
        problems.push("the runtime stage lacks iproute2 (the agent runs `ip`)".into());
    }
    match last.iter().rev().find(|i| i.starts_with("USER ")) {
        None => problems.push("no USER: the image would run as root by default".into()),
        Some(u) => {
            let user = u["USER ".len()..].split(':').next().unwrap_or("").trim();
            if user == "0" || user == "root" {
                problems.push("USER is root".into());
            }
        }
    }
    match last.iter().rev().find(|i| i.starts_with("ENTRYPOINT ")) {
        None => problems.push("no ENTRYPOINT".into()),
        Some(e) => match serde_json::from_str::<Vec<String>>(&e["ENTRYPOINT ".len()..]) {
            Err(_) => problems.push(
                "ENTRYPOINT not in exec (JSON) form: signals would not reach the agent".into(),
            ),
            Ok(argv) => {
                let target = argv.first().cloned().unwrap_or_default();
                if !copied
                    .iter()
                    .any(|c| c.split_whitespace().last() == Some(target.as_str()))
                {
                    problems.push(format!(
                        "ENTRYPOINT {target} is not what the runtime stage copies in"
                    ));
                }
            }
        },
    }
    problems
}

/// `mesh-agent <args> --help`, to check manifests against the binary's real flags.
pub fn help(args: &[&str]) -> String {
    let bin = crate::binaries::mesh_agent().unwrap();
    let out = std::process::Command::new(bin)
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?} --help failed");
    String::from_utf8(out.stdout).unwrap()
}

/// Every `--flag` in `args` is one the subcommand has (`help` from [`help`]).
pub fn assert_flags_exist(args: &[String], help: &str, who: &str) {
    for a in args.iter().filter(|a| a.starts_with("--")) {
        let flag = a.split('=').next().unwrap();
        assert!(
            help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
            "{who}: {flag} is not a flag of the binary"
        );
    }
}
