//! Where the node agent's configuration comes from: a local file (polled) or the Kubernetes API
//! (watched). Both yield the same [`LocalConfig`].
use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use tracing::{info, warn};

use crate::discovery::{
    LocalConfig,
    kube::{HostLocator, KubeDiscovery, SnapshotSettings, annotate::Annotator, host},
};

/// How the agent talks to Kubernetes.
#[derive(Clone, Debug)]
pub struct KubeSource {
    /// A kubeconfig file; None: in-cluster (the pod's service account), or $KUBECONFIG.
    pub kubeconfig: Option<PathBuf>,
    pub settings: SnapshotSettings,
}

/// The configuration source of a running agent.
pub enum Source {
    File {
        path: PathBuf,
        watcher: ConfigWatcher,
        tick: tokio::time::Interval,
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
    /// The local file at `path`, polled every `interval`.
    pub fn file(path: &Path, interval: Duration) -> Self {
        Self::File {
            path: path.to_owned(),
            watcher: ConfigWatcher::new(path),
            tick: tokio::time::interval(interval),
        }
    }

    /// Starts watching the API server.
    pub async fn kube(k: &KubeSource) -> anyhow::Result<Self> {
        let client = kube_client(k.kubeconfig.as_deref()).await?;
        let discovery = KubeDiscovery::start(
            client.clone(),
            k.settings.clone(),
            Arc::new(HostLocator::new()),
            Arc::new(host::interfaces),
        );
        Ok(Self::Kube {
            discovery,
            annotator: Arc::new(Annotator::new(client)),
            skipped: Vec::new(),
        })
    }

    /// For logs.
    pub fn describe(&self) -> String {
        match self {
            Self::File { path, .. } => path.display().to_string(),
            Self::Kube { .. } => "kubernetes".into(),
        }
    }

    /// The first configuration (waits for the API's first full list in Kubernetes mode).
    pub async fn initial(&mut self) -> anyhow::Result<LocalConfig> {
        match self {
            Self::File { path, .. } => Ok(LocalConfig::load(path)?),
            Self::Kube { .. } => {
                info!("waiting for the Kubernetes API (every watcher's first list)");
                self.next().await.map_err(anyhow::Error::msg)
            }
        }
    }

    /// The next configuration, when it changes; `Err` for a file that does not load (the
    /// caller keeps the previous one).
    pub async fn next(&mut self) -> Result<LocalConfig, String> {
        match self {
            Self::File {
                path,
                watcher,
                tick,
            } => loop {
                tick.tick().await;
                if watcher.changed() {
                    return LocalConfig::load(path).map_err(|e| e.to_string());
                }
            },
            Self::Kube {
                discovery, skipped, ..
            } => loop {
                // Only a snapshot not returned before: the publisher sends one only when the
                // configuration differs, and each is applied once.
                if discovery.snapshots.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
                let current = discovery.snapshots.borrow_and_update().clone();
                if let Some(snap) = current {
                    if snap.skipped != *skipped {
                        for s in snap.skipped.iter().filter(|s| !skipped.contains(s)) {
                            warn!(detail = %s, "left out of the configuration");
                        }
                        *skipped = snap.skipped.clone();
                    }
                    let config = snap.config.clone();
                    // Check it like a file: an inconsistent cluster must not reach the data path.
                    if let Err(e) = LocalConfig::parse_checked(config) {
                        return Err(e.to_string());
                    }
                    return Ok(snap.config.clone());
                }
            },
        }
    }

    /// After a configuration was applied (Kubernetes: annotate the pods now captured).
    pub fn applied(&self, config: &LocalConfig) {
        if let Self::Kube { annotator, .. } = self {
            let (annotator, config) = (Arc::clone(annotator), config.clone());
            tokio::spawn(async move { annotator.sync(&config).await });
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

/// Detects changes of the config file by modification time and size (cheap, and robust to
/// editors that replace the file).
pub struct ConfigWatcher {
    path: PathBuf,
    last: Option<(SystemTime, u64)>,
}

impl ConfigWatcher {
    pub fn new(path: &Path) -> Self {
        let mut w = Self {
            path: path.to_owned(),
            last: None,
        };
        w.last = w.stamp();
        w
    }

    fn stamp(&self) -> Option<(SystemTime, u64)> {
        let meta = std::fs::metadata(&self.path).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    }

    pub fn changed(&mut self) -> bool {
        let now = self.stamp();
        if now != self.last {
            self.last = now;
            return now.is_some();
        }
        false
    }
}
