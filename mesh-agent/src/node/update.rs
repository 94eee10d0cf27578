//! Applying a configuration change to the running agent, in the data path's order: the mesh
//! state connections read, the policies, the capture, certificates, the admin view. A change to
//! workloads and Services only (what churns in a cluster) is applied by difference, in time
//! proportional to it; anything else rebuilds (issue #19).
use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use tracing::info;

use super::{
    desired_capture,
    mesh::{MeshState, SharedMeshState},
    source::Source,
};
use crate::{
    admin::{AdminState, Readiness},
    capture::CaptureController,
    discovery::{ConfigDelta, ConfigUpdate, LocalConfig, local::ConfigError},
    identity::CertManager,
    metrics::Metrics,
    policy::Enforcer,
};

/// Everything a configuration change updates.
pub(super) struct Updater {
    pub mesh_state: SharedMeshState,
    pub enforcer: Arc<Enforcer>,
    pub agent_cgroup: Option<PathBuf>,
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    pub prefetch: Prefetch,
    pub admin: Arc<AdminState>,
}

impl Updater {
    /// Applies `update`; `Err` when it is refused (the configuration in force stays).
    pub fn apply(
        &self,
        controller: &mut CaptureController,
        source: &Source,
        update: ConfigUpdate,
    ) -> Result<(), ConfigError> {
        let mut diffed = Duration::ZERO;
        let update = match update {
            // A whole configuration (a file) that differs only in workloads and Services is
            // applied as its difference.
            ConfigUpdate::Full(new) => {
                let started = Instant::now();
                let delta = {
                    let current = self.admin.config.read().unwrap_or_else(|e| e.into_inner());
                    ConfigDelta::between(&current, &new)
                };
                diffed = started.elapsed();
                match delta {
                    Some(delta) => {
                        // Freeing a large configuration takes a while: not on this path.
                        std::thread::spawn(move || drop(new));
                        ConfigUpdate::Delta(delta)
                    }
                    None => ConfigUpdate::Full(new),
                }
            }
            delta => delta,
        };
        let started = Instant::now();
        let (kind, workloads, services) = match update {
            ConfigUpdate::Full(new) => self.full(controller, source, *new),
            ConfigUpdate::Delta(delta) => self.delta(controller, source, &delta)?,
        };
        let elapsed = started.elapsed();
        self.metrics.control.applied(kind, elapsed);
        let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        info!(
            kind,
            workloads,
            services,
            diff_us = us(diffed),
            apply_us = us(elapsed),
            "configuration applied"
        );
        Ok(())
    }

    /// Rebuilds everything from `new`.
    fn full(
        &self,
        controller: &mut CaptureController,
        source: &Source,
        new: LocalConfig,
    ) -> (&'static str, usize, usize) {
        self.mesh_state
            .store(Arc::new(MeshState::from_config(&new)));
        self.replace_policies(&new);
        self.reconcile(controller, source, &new);
        let counts = (new.workloads.len(), new.services.len());
        *self.admin.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
        // Reading and building a large configuration freed most of what it allocated (the
        // file's text and parse, the configuration replaced): hand it back now rather than at
        // the next periodic trim, so the agent is at its steady size when it says ready.
        super::release_free_memory();
        ("full", counts.0, counts.1)
    }

    /// Applies `delta` in place: the mesh state by difference; policies only when a pod of
    /// this node or a Service selecting one changed; the capture and certificates only when a
    /// pod of this node changed.
    fn delta(
        &self,
        controller: &mut CaptureController,
        source: &Source,
        delta: &ConfigDelta,
    ) -> Result<(&'static str, usize, usize), ConfigError> {
        let mut guard = self.admin.config.write().unwrap_or_else(|e| e.into_inner());
        // The admin view shares this configuration; it is copied only while a dump holds it.
        let config = Arc::make_mut(&mut guard);
        config.check_delta(delta)?;
        let local = delta.touches_node(config, &config.node.name);
        let replaced = config.apply(delta);
        // The next state starts as a copy of this one sharing all its entries; connections
        // keep reading this one until it is published.
        let mut state = MeshState::clone(&self.mesh_state.load());
        if !state.apply(config, delta, &replaced) {
            state = MeshState::from_config(config);
        }
        self.mesh_state.store(Arc::new(state));
        let selects_local = |s: &crate::discovery::Service| {
            config
                .endpoints_of(s)
                .any(|w| w.node == config.node.name && config.is_enrolled(w))
        };
        if local
            || delta
                .new_services()
                .chain(&replaced.services)
                .any(selects_local)
        {
            self.replace_policies(config);
        }
        if local {
            self.reconcile(controller, source, config);
        }
        Ok(("delta", delta.workloads.len(), delta.services.len()))
    }

    fn replace_policies(&self, config: &LocalConfig) {
        let policies = config.compile_policies();
        policies.log();
        let closed = self.enforcer.replace(policies);
        if closed > 0 {
            info!(
                closed,
                "policy change closed live connections it now denies"
            );
        }
    }

    /// The capture, certificates and (Kubernetes) annotations of this node's pods.
    fn reconcile(&self, controller: &mut CaptureController, source: &Source, config: &LocalConfig) {
        let report = controller.reconcile(&desired_capture(config, self.agent_cgroup.as_deref()));
        let control = &self.metrics.control;
        control.reconcile_errors.inc_by(report.errors.len() as u64);
        control
            .time_wait_destroyed
            .inc_by(report.time_wait_destroyed as u64);
        self.readiness.capture(super::reconcile_problem(&report));
        super::log_state(controller, config, report.errors.len());
        self.prefetch.start(config);
        source.applied(config);
    }
}

/// Fetches the certificates of every enrolled workload of this node in the background and
/// tells readiness when they are all held; while some are missing (CA down, a refusal) it
/// tries again (1 s doubling to 30 s), so readiness recovers without a configuration change.
/// Each configuration starts a new round; an older round stops.
pub(super) struct Prefetch {
    certs: Option<Arc<CertManager>>,
    readiness: Arc<Readiness>,
    round: Arc<std::sync::atomic::AtomicU64>,
}

impl Prefetch {
    pub fn new(certs: Option<Arc<CertManager>>, readiness: Arc<Readiness>) -> Self {
        Self {
            certs,
            readiness,
            round: Arc::default(),
        }
    }

    pub fn start(&self, config: &LocalConfig) {
        use std::sync::atomic::Ordering;
        let Some(certs) = self.certs.clone() else {
            self.readiness.certificates(None);
            return;
        };
        let mut identities: Vec<_> = config
            .local_pods()
            .filter(|w| config.is_enrolled(w))
            .map(|w| config.identity_of(w))
            .collect();
        identities.sort();
        identities.dedup();
        let round = self.round.fetch_add(1, Ordering::AcqRel) + 1;
        let (rounds, readiness) = (Arc::clone(&self.round), Arc::clone(&self.readiness));
        tokio::spawn(async move {
            let mut wait = Duration::from_secs(1);
            loop {
                let mut problems = Vec::new();
                for id in &identities {
                    if let Err(e) = certs.get(id).await {
                        problems.push(format!("{id}: {e}"));
                    }
                }
                if rounds.load(Ordering::Acquire) != round {
                    return;
                }
                if problems.is_empty() {
                    readiness.certificates(None);
                    return;
                }
                readiness.certificates(Some(problems.join("; ")));
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(30));
            }
        });
    }
}
