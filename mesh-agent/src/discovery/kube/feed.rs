//! One kube-rs watcher feeding a reflector store, with the state readiness and logs need:
//! shared by discovery (the agents' view of the cluster) and the control plane's controllers.
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use kube::{
    Api,
    runtime::{WatchStreamExt as _, reflector, watcher},
};
use tokio::sync::Notify;
use tracing::{info, warn};

/// One watcher's state, for readiness and logs.
pub struct Feed {
    pub name: String,
    listed: AtomicBool,
    /// The resource is not served (an Istio CRD that is not installed).
    absent: AtomicBool,
}

impl Feed {
    pub fn new(name: &str) -> Arc<Self> {
        Arc::new(Self {
            name: name.to_owned(),
            listed: AtomicBool::new(false),
            absent: AtomicBool::new(false),
        })
    }

    /// Listed, or known to be absent: its (empty) store can be trusted.
    pub fn usable(&self) -> bool {
        self.listed.load(Ordering::Acquire) || self.absent.load(Ordering::Acquire)
    }

    /// Listed (not merely absent): an empty store means there are none.
    pub fn listed(&self) -> bool {
        self.listed.load(Ordering::Acquire)
    }
}

/// Drives one watcher into a reflector store, waking `changed` on every event.
pub fn drive<K>(
    api: Api<K>,
    config: watcher::Config,
    writer: reflector::store::Writer<K>,
    feed: Arc<Feed>,
    changed: Arc<Notify>,
    optional: bool,
) where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + Send
        + Sync
        + serde::de::DeserializeOwned
        + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    tokio::spawn(async move {
        let stream = watcher(api, config).default_backoff().reflect(writer);
        futures::pin_mut!(stream);
        let mut last_error_log = None::<Instant>;
        while let Some(item) = stream.next().await {
            match item {
                Ok(watcher::Event::InitDone) => {
                    if !feed.listed.swap(true, Ordering::AcqRel) {
                        info!(resource = %feed.name, "listed");
                    }
                    feed.absent.store(false, Ordering::Release);
                    changed.notify_one();
                }
                Ok(_) => changed.notify_one(),
                Err(e) => {
                    let not_served = matches!(
                        &e,
                        watcher::Error::InitialListFailed(kube::Error::Api(s)) if s.is_not_found()
                    );
                    if optional && not_served && !feed.absent.swap(true, Ordering::AcqRel) {
                        info!(resource = %feed.name, "not served by this cluster (CRD not installed); treated as empty");
                        changed.notify_one();
                    }
                    // The watcher retries with backoff; say so now and then, not per retry.
                    if last_error_log.is_none_or(|t| t.elapsed() > Duration::from_secs(30)) {
                        warn!(resource = %feed.name, error = %e, "watch failed; retrying, the last known state stays in force");
                        last_error_log = Some(Instant::now());
                    }
                }
            }
        }
    });
}
