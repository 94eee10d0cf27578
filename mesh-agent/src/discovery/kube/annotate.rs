//! `ambient.istio.io/redirection: enabled` on the local pods the agent captures (as istio-cni
//! marks them), removed when a pod leaves the mesh and when the agent exits.
use std::{
    collections::BTreeSet,
    sync::atomic::{AtomicBool, Ordering},
};

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use tracing::{debug, warn};

use crate::discovery::LocalConfig;

/// Istio's annotation for a pod whose traffic is redirected to the node proxy.
pub const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";

/// Keeps the annotation in step with enrolment.
pub struct Annotator {
    client: Client,
    annotated: tokio::sync::Mutex<BTreeSet<(String, String)>>,
    /// Set by [`clear`](Self::clear): a sync still queued behind it must not annotate again.
    closed: AtomicBool,
}

impl Annotator {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            annotated: Default::default(),
            closed: AtomicBool::new(false),
        }
    }

    async fn set(&self, namespace: &str, name: &str, on: bool) -> Result<(), kube::Error> {
        let value = if on {
            serde_json::Value::String("enabled".into())
        } else {
            serde_json::Value::Null
        };
        let patch =
            serde_json::json!({"metadata": {"annotations": {REDIRECTION_ANNOTATION: value}}});
        Api::<Pod>::namespaced(self.client.clone(), namespace)
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(drop)
    }

    /// Annotates newly enrolled local pods and un-annotates those that left.
    pub async fn sync(&self, config: &LocalConfig) {
        self.sync_pods(Self::wanted(config)).await;
    }

    /// The pods `config` captures: this node's enrolled pods, `(namespace, name)`.
    pub fn wanted(config: &LocalConfig) -> BTreeSet<(String, String)> {
        config
            .local_pods()
            .filter(|w| config.is_enrolled(w))
            .map(|w| (w.namespace.to_string(), w.name.to_string()))
            .collect()
    }

    /// Annotates the pods of `want` not annotated yet and un-annotates the others.
    pub async fn sync_pods(&self, want: BTreeSet<(String, String)>) {
        let mut annotated = self.annotated.lock().await;
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        for (ns, name) in want.difference(&annotated.clone()) {
            match self.set(ns, name, true).await {
                Ok(()) => {
                    debug!(pod = %format!("{ns}/{name}"), "annotated as redirected");
                    annotated.insert((ns.clone(), name.clone()));
                }
                Err(e) => {
                    warn!(pod = %format!("{ns}/{name}"), error = %e, "could not annotate the pod")
                }
            }
        }
        let gone: Vec<_> = annotated.difference(&want).cloned().collect();
        for (ns, name) in gone {
            // A deleted pod needs nothing; anything else is retried on the next sync.
            match self.set(&ns, &name, false).await {
                Ok(()) => {
                    annotated.remove(&(ns, name));
                }
                Err(kube::Error::Api(s)) if s.is_not_found() => {
                    annotated.remove(&(ns, name));
                }
                Err(e) => {
                    warn!(pod = %format!("{ns}/{name}"), error = %e, "could not remove the annotation")
                }
            }
        }
    }

    /// Removes every annotation this agent set (on exit).
    pub async fn clear(&self) {
        self.closed.store(true, Ordering::Release);
        // Holding the lock: a sync in progress finishes first, later ones see `closed`.
        let mut annotated = self.annotated.lock().await;
        for (ns, name) in std::mem::take(&mut *annotated) {
            if let Err(e) = self.set(&ns, &name, false).await {
                warn!(pod = %format!("{ns}/{name}"), error = %e, "could not remove the annotation on exit");
            }
        }
    }
}
