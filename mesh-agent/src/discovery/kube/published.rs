//! Handing configurations from the discovery task to the agent. There is one copy of the
//! configuration: the agent's, which it applies every update to ([`ConfigInForce`]). The
//! discovery reads it to compute the next delta, and so waits, before computing one, until the
//! agent has dealt with everything handed over before ([`Published::settled`]); changes seen
//! meanwhile accumulate in the feeds. A second copy kept here for the discovery cost a third
//! of the agent's memory at 100,000 pods (issue #19).
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use tokio::sync::{Notify, watch};

use crate::discovery::{ConfigDelta, ConfigUpdate, LocalConfig};

/// The configuration in force: the agent's, shared with the discovery that computes deltas
/// against it and with the admin endpoints that show it. Writers: whoever applies updates.
pub type ConfigInForce = RwLock<Arc<LocalConfig>>;

/// What was handed over and not yet dealt with.
#[derive(Default)]
struct Mailbox {
    /// The agent applied an update of ours: the configuration in force is the cluster's
    /// (before that it is empty, and no delta can be computed against it).
    in_force: bool,
    /// What the last full build left out.
    skipped: Vec<String>,
    /// Not yet taken: a full configuration or a delta.
    pending: Option<ConfigUpdate>,
    /// Taken by the agent and not yet dealt with.
    in_agent: bool,
    /// The agent refused the update it took last.
    refused: bool,
    /// An update was refused since the last full build: what it carried is not in force, so
    /// the next round builds whole.
    rebuild: bool,
}

/// The mailbox between the discovery task and the agent: hands the agent one update at a
/// time, and says when one was refused (the next round then builds whole, so nothing a
/// refused update carried stays out for good).
pub struct Published {
    config: Arc<ConfigInForce>,
    mailbox: Mutex<Mailbox>,
    /// Bumped on every publication (waiters watch it).
    version: watch::Sender<u64>,
    /// Woken when the agent has dealt with what it took.
    settled: Notify,
}

impl Published {
    pub fn new(config: Arc<ConfigInForce>) -> Self {
        Self {
            config,
            mailbox: Mutex::default(),
            version: watch::Sender::new(0),
            settled: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Mailbox> {
        self.mailbox.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bump(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    /// The configuration in force.
    pub fn config(&self) -> &Arc<ConfigInForce> {
        &self.config
    }

    /// Waits until everything published was taken and dealt with: from then on the
    /// configuration in force includes it (or the agent refused it).
    pub async fn settled(&self) {
        loop {
            {
                let m = self.lock();
                if m.pending.is_none() && !m.in_agent {
                    return;
                }
            }
            self.settled.notified().await;
        }
    }

    /// Whether the agent holds a configuration of ours yet.
    pub fn in_force(&self) -> bool {
        self.lock().in_force
    }

    /// Whether an update was refused since the last full build (and forgets it: the caller
    /// builds whole).
    pub fn take_rebuild(&self) -> bool {
        std::mem::take(&mut self.lock().rebuild)
    }

    /// Runs `f` on the configuration in force (None before the agent applied one of ours).
    pub fn with_config<T>(&self, f: impl FnOnce(Option<&LocalConfig>) -> T) -> T {
        let in_force = self.in_force();
        let config = self.config.read().unwrap_or_else(PoisonError::into_inner);
        f(in_force.then_some(&**config))
    }

    /// Publishes a full configuration, unless it is the one in force.
    pub fn full(&self, config: LocalConfig, skipped: Vec<String>) {
        let mut m = self.lock();
        let same = m.in_force
            && m.pending.is_none()
            && m.skipped == skipped
            && **self.config.read().unwrap_or_else(PoisonError::into_inner) == config;
        if same {
            return;
        }
        m.pending = Some(ConfigUpdate::Full(Box::new(config)));
        m.skipped = skipped;
        drop(m);
        self.bump();
    }

    /// Publishes `delta` to the configuration in force; `Err(why)` (nothing published) when
    /// it does not apply there.
    pub fn delta(&self, delta: ConfigDelta) -> Result<(), &'static str> {
        if delta.is_empty() {
            return Ok(());
        }
        let mut m = self.lock();
        if !m.in_force {
            return Err("no configuration in force yet");
        }
        if m.pending.is_some() {
            // Only reached if a round did not wait for `settled`: what is pending was not
            // computed against the configuration in force either.
            return Err("an update not yet taken");
        }
        let config = self.config.read().unwrap_or_else(PoisonError::into_inner);
        if config.check_delta(&delta).is_err() {
            return Err("a conflict the full build settles");
        }
        drop(config);
        m.pending = Some(ConfigUpdate::Delta(delta));
        drop(m);
        self.bump();
        Ok(())
    }

    /// The update not taken yet, and what the configuration left out. The caller deals with
    /// it and says so with [`Self::dealt_with`].
    pub fn take(&self) -> Option<(ConfigUpdate, Vec<String>)> {
        let mut m = self.lock();
        let update = m.pending.take()?;
        m.in_agent = true;
        Some((update, m.skipped.clone()))
    }

    /// The update taken last was refused by the agent (call before [`Self::dealt_with`]).
    pub fn refused(&self) {
        let mut m = self.lock();
        if m.in_agent {
            m.refused = true;
            m.rebuild = true;
        }
    }

    /// The update taken last was applied to the configuration in force, or refused.
    pub fn dealt_with(&self) {
        let mut m = self.lock();
        if std::mem::take(&mut m.in_agent) {
            if !std::mem::take(&mut m.refused) {
                m.in_force = true;
            }
            drop(m);
            self.settled.notify_one();
        }
    }

    /// A copy of the configuration in force (None before the agent applied one of ours).
    pub fn current(&self) -> Option<LocalConfig> {
        self.with_config(|c| c.cloned())
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(name: &str, ip: &str) -> crate::discovery::Workload {
        let yaml = format!("{{name: {name}, namespace: n, node: n2, ips: [{ip}]}}");
        serde_yaml::from_str(&yaml).unwrap()
    }

    fn add(name: &str, ip: &str) -> ConfigDelta {
        let mut d = ConfigDelta::default();
        d.workloads
            .insert(("n".into(), name.into()), Some(workload(name, ip)));
        d
    }

    /// What the agent does with an update (without the derived state).
    fn deal_with(p: &Published) -> ConfigUpdate {
        let (update, _) = p.take().expect("an update");
        {
            let mut config = p.config().write().unwrap();
            match &update {
                ConfigUpdate::Full(c) => *config = Arc::new((**c).clone()),
                ConfigUpdate::Delta(d) => {
                    Arc::make_mut(&mut config).apply(d);
                }
            }
        }
        p.dealt_with();
        update
    }

    #[tokio::test]
    async fn one_update_at_a_time_against_the_configuration_in_force() {
        let p = Published::new(Arc::default());
        assert!(p.current().is_none() && p.delta(add("a", "10.0.0.1")).is_err());
        p.settled().await; // nothing published: settled at once
        p.full(LocalConfig::default(), vec![]);
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), p.settled())
                .await
                .is_err(),
            "not settled while the agent has not taken it"
        );
        assert!(matches!(deal_with(&p), ConfigUpdate::Full(_)));
        p.settled().await;
        // The same configuration again is nothing new.
        p.full(LocalConfig::default(), vec![]);
        assert!(p.take().is_none());
        // One update at a time: a second delta while one is pending is left to a full build.
        p.delta(add("a", "10.0.0.1")).unwrap();
        assert_eq!(
            p.delta(add("b", "10.0.0.2")),
            Err("an update not yet taken")
        );
        match deal_with(&p) {
            ConfigUpdate::Delta(d) => assert_eq!(d.workloads.len(), 1),
            other => panic!("{other:?}"),
        }
        p.settled().await;
        p.delta(add("b", "10.0.0.2")).unwrap();
        deal_with(&p);
        assert_eq!(p.current().unwrap().workloads.len(), 2);
        assert!(!p.take_rebuild());
        // A delta that conflicts with the configuration in force (an address taken) is
        // refused here, so that a full build settles it.
        assert_eq!(
            p.delta(add("c", "10.0.0.1")),
            Err("a conflict the full build settles")
        );
        // Taken but not yet dealt with: not settled.
        p.delta(add("d", "10.0.0.4")).unwrap();
        let _ = p.take().unwrap();
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), p.settled())
                .await
                .is_err()
        );
        p.dealt_with();
        p.settled().await;
    }

    /// A refused update is not in force, and makes the next round build whole.
    #[tokio::test]
    async fn a_refused_update_makes_the_next_round_build_whole() {
        let p = Published::new(Arc::default());
        // The first configuration refused: still nothing in force, no delta possible.
        p.full(LocalConfig::default(), vec![]);
        let _ = p.take().unwrap();
        p.refused();
        p.dealt_with();
        p.settled().await;
        assert!(p.current().is_none() && !p.in_force());
        assert!(p.take_rebuild(), "the next round builds whole");
        assert!(!p.take_rebuild(), "once");
        p.full(LocalConfig::default(), vec![]);
        deal_with(&p);
        assert!(p.in_force() && p.current().is_some());
        // A delta refused: the configuration in force stays, and a full build follows.
        p.delta(add("a", "10.0.0.1")).unwrap();
        let _ = p.take().unwrap();
        p.refused();
        p.dealt_with();
        assert!(p.take_rebuild() && p.current().unwrap().workloads.is_empty());
        // Saying "refused" with nothing taken is nothing.
        p.refused();
        assert!(!p.take_rebuild());
    }
}
