//! The node agents of the benchmark and the configurations they are measured in.
//!
//! The mesh path is measured once per [`Variant`]: production defaults, and the same agents
//! with one setting changed (splicing off, two worker threads). A variant is a process flag, so
//! switching variants restarts both agents; the plain path never depends on them.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result};
use mesh_testbed::Testbed;

use super::sampler::AgentProcess;

/// One configuration of both agents.
#[derive(Debug, PartialEq, Eq)]
pub struct Variant {
    /// Its `--variant` value.
    pub name: &'static str,
    /// Its path in the results (`mesh` is the production default the targets are judged on).
    pub path: &'static str,
    /// Agent flags on top of the bench's own.
    pub args: &'static [&'static str],
    /// What it is, for the report.
    pub what: &'static str,
}

/// Every variant, the production default first.
pub const VARIANTS: [Variant; 3] = [
    Variant {
        name: "default",
        path: "mesh",
        args: &[],
        what: "production defaults: pod<->agent hops spliced (sockmap, bounded), worker threads `auto`",
    },
    Variant {
        name: "splice-off",
        path: "mesh_splice_off",
        args: &["--splice=off"],
        what: "`--splice=off`: the agents' relay carries every pod<->agent hop",
    },
    Variant {
        name: "threads-2",
        path: "mesh_threads_2",
        args: &["--worker-threads", "2"],
        what: "`--worker-threads 2`: two threads carry connections",
    },
];

/// The production default.
pub const DEFAULT: &Variant = &VARIANTS[0];

/// The variant called `name`.
pub fn variant(name: &str) -> Option<&'static Variant> {
    VARIANTS.iter().find(|v| v.name == name)
}

/// Starts one agent per node in `variant`, each on its config file in `work`; waits until they
/// listen.
pub fn start(
    tb: &Testbed,
    agent: &Path,
    work: &Path,
    variant: &Variant,
) -> Result<Vec<AgentProcess>> {
    let mut agents = Vec::new();
    for node in 1..=2 {
        let config = config_path(work, node);
        let bpffs = tb.bpffs_dir().join(format!("agent-node{node}"));
        let mut args = vec![
            "node",
            "--config",
            config.to_str().context("path")?,
            "--bpffs-dir",
            bpffs.to_str().context("path")?,
            // Only how fast enrolment follows the file between trials; the data path is the
            // variant's.
            "--reload-interval-ms",
            "100",
            // The bench ends with SIGTERM: a connection a trial left open must not hold the
            // teardown for the production drain limit (1 h).
            "--drain-seconds",
            "5",
        ];
        args.extend(variant.args);
        let mut p = tb
            .node(node)
            .place
            .spawn(agent.to_str().context("path")?, &args)?;
        for port in [15001, 15006, 15008] {
            p.wait_listening(port, Duration::from_secs(20))
                .with_context(|| format!("agent of node{node} ({})", variant.name))?;
        }
        agents.push(AgentProcess::new(node, p, config, bpffs));
    }
    Ok(agents)
}

/// Stops the agents; with `logs`, appends each one's log to `agent-node<N>.log` there under a
/// line naming the variant.
pub fn stop(agents: Vec<AgentProcess>, variant: &Variant, logs: Option<&Path>) -> Result<()> {
    for a in agents {
        let node = a.node;
        let log = a.stop()?;
        if let Some(dir) = logs {
            use std::io::Write as _;
            std::fs::create_dir_all(dir)?;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join(format!("agent-node{node}.log")))?;
            writeln!(f, "===== agent variant {} =====", variant.name)?;
            f.write_all(&log)?;
        }
    }
    Ok(())
}

/// Node `node`'s agent config file.
pub fn config_path(work: &Path, node: usize) -> PathBuf {
    work.join(format!("node{node}.yaml"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_have_distinct_names_and_paths_and_the_default_is_mesh() {
        assert_eq!(DEFAULT.path, "mesh");
        assert!(DEFAULT.args.is_empty());
        for (i, a) in VARIANTS.iter().enumerate() {
            assert_eq!(variant(a.name), Some(a));
            for b in &VARIANTS[i + 1..] {
                assert!(a.name != b.name && a.path != b.path);
            }
        }
        assert_eq!(variant("nonsense"), None);
    }
}
