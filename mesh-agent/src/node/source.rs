//! Where the node agent's configuration comes from: a local file (watched with inotify, read
//! only when whole; see [`ConfigFile`]) or the Kubernetes API (watched). Both yield the same
//! [`LocalConfig`].
use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use tracing::{info, warn};

use super::config_file::ConfigFile;
use crate::discovery::{
    ConfigUpdate, LocalConfig,
    kube::{
        ConfigInForce, HostLocator, KubeDiscovery, SnapshotSettings, annotate::Annotator, host,
    },
    local::ConfigError,
};

/// How the agent talks to Kubernetes.
#[derive(Clone, Debug)]
pub struct KubeSource {
    /// A kubeconfig file; None: in-cluster (the pod's service account), or $KUBECONFIG.
    pub kubeconfig: Option<PathBuf>,
    pub settings: SnapshotSettings,
    /// The host's cgroup v2 hierarchy, where local pods' cgroups are looked up by UID (for
    /// splicing); None: where this process sees cgroup v2 mounted.
    pub pod_cgroup_root: Option<PathBuf>,
}

/// The configuration source of a running agent.
pub enum Source {
    File {
        file: Box<ConfigFile>,
        /// The enrolled pods of the configuration in force (the last one handed out), for the
        /// un-enrol-all check.
        current: Option<Vec<String>>,
    },
    Kube {
        discovery: KubeDiscovery,
        annotator: Arc<Annotator>,
        /// What the last snapshot left out (logged when it changes).
        skipped: Vec<String>,
    },
}

/// A Kubernetes client from a kubeconfig file, or the default chain (in-cluster, then
/// $KUBECONFIG / ~/.kube/config).
pub async fn kube_client(kubeconfig: Option<&Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no in-cluster service account and no kubeconfig (--kubeconfig)")?,
    };
    kube::Client::try_from(config).context("building the Kubernetes client")
}

impl Source {
    /// The local file at `path`, watched with inotify (polled every `interval` where that is
    /// unavailable).
    pub fn file(path: &Path, interval: Duration) -> Self {
        Self::File {
            file: Box::new(ConfigFile::new(path, interval, settle_interval(interval))),
            current: None,
        }
    }

    /// Starts watching the API server.
    pub async fn kube(k: &KubeSource) -> anyhow::Result<Self> {
        let client = kube_client(k.kubeconfig.as_deref()).await?;
        let discovery = KubeDiscovery::start(
            client.clone(),
            k.settings.clone(),
            Arc::new(HostLocator::new(k.pod_cgroup_root.clone())),
            Arc::new(host::interfaces),
        );
        Ok(Self::Kube {
            discovery,
            annotator: Arc::new(Annotator::new(client)),
            skipped: Vec::new(),
        })
    }

    /// Where the agent keeps the configuration in force: in Kubernetes mode the discovery's
    /// (it computes deltas against it), otherwise a new one.
    pub fn config_in_force(&self) -> Arc<ConfigInForce> {
        match self {
            Self::File { .. } => Arc::default(),
            Self::Kube { discovery, .. } => discovery.config(),
        }
    }

    /// For logs.
    pub fn describe(&self) -> String {
        match self {
            Self::File { file, .. } => file.path().display().to_string(),
            Self::Kube { .. } => "kubernetes".into(),
        }
    }

    /// The first configuration (waits for the API's first full list in Kubernetes mode).
    pub async fn initial(&mut self) -> anyhow::Result<LocalConfig> {
        match self {
            Self::File { file, current } => {
                let text = file.read_initial().map_err(|source| ConfigError::Read {
                    path: file.path().display().to_string(),
                    source,
                })?;
                let config = LocalConfig::parse_file(file.path(), &text)?;
                *current = Some(config.enrolled_local());
                Ok(config)
            }
            Self::Kube { .. } => {
                info!("waiting for the Kubernetes API (every watcher's first list)");
                loop {
                    // The first publication is whole; anything else before it is not (and
                    // cannot happen: a delta needs a published configuration).
                    if let ConfigUpdate::Full(config) =
                        self.next().await.map_err(anyhow::Error::msg)?
                    {
                        return Ok(*config);
                    }
                }
            }
        }
    }

    /// The next change: a whole configuration (a file; a cluster after a re-list or a change
    /// beyond pods and Services) or a delta (a cluster's pods and Services), each returned
    /// once; `Err` for one that is refused (the caller keeps the previous one). Cancel-safe.
    pub async fn next(&mut self) -> Result<ConfigUpdate, ConfigError> {
        match self {
            Self::File { file, current } => {
                let text = file.next().await;
                let new = LocalConfig::parse_file(file.path(), &text)?;
                if let Some(current) = current {
                    new.check_reload(current, file.path())?;
                }
                *current = Some(new.enrolled_local());
                Ok(ConfigUpdate::Full(Box::new(new)))
            }
            Self::Kube {
                discovery, skipped, ..
            } => {
                let (update, now_skipped) = discovery.next_update().await;
                if now_skipped != *skipped {
                    for s in now_skipped.iter().filter(|s| !skipped.contains(s)) {
                        warn!(detail = %s, "left out of the configuration");
                    }
                    *skipped = now_skipped;
                }
                match update {
                    // Checked like a file: an inconsistent cluster must not reach the data
                    // path (a delta is checked where it is applied).
                    ConfigUpdate::Full(config) => {
                        LocalConfig::parse_checked(*config).map(|c| ConfigUpdate::Full(Box::new(c)))
                    }
                    delta => Ok(delta),
                }
            }
        }
    }

    /// The update [`Self::next`] returned last was refused, by it or when applied (Kubernetes:
    /// the discovery builds whole next, as what it carried is not in force).
    pub fn refused(&self) {
        if let Self::Kube { discovery, .. } = self {
            discovery.refused();
        }
    }

    /// After a configuration was applied (Kubernetes: annotate the pods now captured).
    pub fn applied(&self, config: &LocalConfig) {
        if let Self::Kube { annotator, .. } = self {
            let (annotator, want) = (Arc::clone(annotator), Annotator::wanted(config));
            tokio::spawn(async move { annotator.sync_pods(want).await });
        }
    }

    /// On exit (Kubernetes: remove the annotations, briefly).
    pub async fn stop(&self) {
        if let Self::Kube { annotator, .. } = self
            && tokio::time::timeout(Duration::from_secs(5), annotator.clear())
                .await
                .is_err()
        {
            warn!("could not remove every redirection annotation before exiting");
        }
    }
}

/// Without inotify, how long a changed file must read the same before it is applied: several
/// poll intervals and at least a second (a writer pausing longer still defeats it; see
/// [`ConfigFile`]).
fn settle_interval(interval: Duration) -> Duration {
    (interval * 4).max(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENROLLED: &str = "node: {name: n1}\nnamespaces: [{name: m, labels: {istio.io/dataplane-mode: ambient}}]\nworkloads:\n  - {name: a, namespace: m, node: n1, ips: [10.0.0.1], hostInterface: va}\n";

    fn replace(path: &Path, text: &str) {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    async fn next(source: &mut Source) -> Result<LocalConfig, ConfigError> {
        match tokio::time::timeout(Duration::from_secs(2), source.next())
            .await
            .expect("no reload")?
        {
            ConfigUpdate::Full(c) => Ok(*c),
            ConfigUpdate::Delta(d) => panic!("a file gives whole configurations: {d:?}"),
        }
    }

    #[tokio::test]
    async fn a_file_unenrolling_everything_is_refused_unless_it_says_so() {
        let dir = super::super::config_file::tests::Dir::new("source");
        let path = dir.0.join("node.yaml");
        std::fs::write(&path, ENROLLED).unwrap();
        let mut source = Source::file(&path, Duration::from_millis(20));
        let first = source.initial().await.unwrap();
        assert_eq!(first.workloads.len(), 1);
        replace(&path, "node: {name: n1}\n");
        let e = next(&mut source).await.unwrap_err();
        assert_eq!(e.reason(), "unenrolls_all", "{e}");
        // A broken file is refused too, and the last good one still counts as current.
        replace(&path, "node: {name: n1\n");
        assert_eq!(next(&mut source).await.unwrap_err().reason(), "syntax");
        replace(&path, "node: {name: n1}\nmesh: {allowUnenrollAll: true}\n");
        let applied = next(&mut source).await.unwrap();
        assert!(applied.workloads.is_empty());
        // Now nothing is enrolled: enrolling again and emptying again are fine... once more
        // enrolled, emptying is refused again.
        replace(&path, ENROLLED);
        next(&mut source).await.unwrap();
        replace(&path, "node: {name: n1}\nworkloads: []\n");
        assert_eq!(
            next(&mut source).await.unwrap_err().reason(),
            "unenrolls_all"
        );
    }
}
