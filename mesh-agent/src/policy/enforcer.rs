//! Policy at run time: every inbound connection is admitted (or refused) here, counted by
//! decision, policy and reason, and logged with a per-kind rate limit. Admitted connections stay
//! registered until they end, so that a new policy set can close exactly those it now denies.
use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tracing::{info, warn};

use super::{
    index::{Decision, PolicySet, Reason},
    model::ConnectionAttrs,
};
use crate::log_limit::LogLimiter;

/// How the connection reached the destination's agent (a log and metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum InboundKind {
    /// HBONE from another node's agent (mutual TLS).
    Hbone,
    /// Plaintext captured on 15006 (a non-mesh client).
    Plaintext,
    /// From an enrolled pod of this node (identity known from the capture).
    SameNode,
}

impl InboundKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hbone => "hbone",
            Self::Plaintext => "plaintext",
            Self::SameNode => "same_node",
        }
    }
}

/// A decision counter's labels: `decision` is allow, deny or audit.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DecisionKey {
    pub decision: &'static str,
    pub policy: String,
    pub reason: &'static str,
}

/// Log lines per (decision, policy, reason) and second; the rest are counted and summarised.
const LOG_BURST: u32 = 10;

struct Live {
    attrs: ConnectionAttrs,
    kind: InboundKind,
    revoke: watch::Sender<bool>,
}

/// The policy decision point of one agent.
pub struct Enforcer {
    /// Read by every new connection without a lock; replaced whole.
    set: ArcSwap<PolicySet>,
    live: Mutex<HashMap<u64, Live>>,
    next_id: AtomicU64,
    counts: Mutex<BTreeMap<DecisionKey, u64>>,
    revoked: AtomicU64,
    logs: LogLimiter<DecisionKey>,
}

/// An admitted connection: keep it for as long as the connection lives.
pub struct Admission {
    registration: Option<(Arc<Enforcer>, u64, watch::Receiver<bool>)>,
    pub decision: Decision,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("decision", &self.decision)
            .field("registered", &self.registration.is_some())
            .finish()
    }
}

impl Admission {
    /// Admission without policy (the `AllowMesh` authorizer and tests): never revoked.
    pub fn unconditional() -> Self {
        Self {
            registration: None,
            decision: Decision {
                allowed: true,
                reason: Reason::NoAllowPolicy,
                policy: None,
                audited: Vec::new(),
            },
        }
    }

    /// Resolves when a policy change denies this connection (never, otherwise).
    pub async fn revoked(&mut self) {
        match &mut self.registration {
            Some((_, _, rx)) => {
                // An error means the enforcer is gone: nothing will revoke any more.
                if rx.wait_for(|r| *r).await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending().await,
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Some((enforcer, id, _)) = &self.registration {
            enforcer
                .live
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(id);
        }
    }
}

impl Enforcer {
    pub fn new(set: PolicySet) -> Arc<Self> {
        Arc::new(Self {
            set: ArcSwap::from_pointee(set),
            live: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            counts: Mutex::new(BTreeMap::new()),
            revoked: AtomicU64::new(0),
            logs: LogLimiter::per_second(LOG_BURST),
        })
    }

    /// The policy set in force.
    pub fn current(&self) -> Arc<PolicySet> {
        self.set.load_full()
    }

    /// Decides a new connection; an allowed one is registered until its [`Admission`] drops.
    pub fn admit(
        self: &Arc<Self>,
        attrs: ConnectionAttrs,
        kind: InboundKind,
    ) -> Result<Admission, Decision> {
        let set = self.current();
        let mut decision = set.evaluate(&attrs);
        if !decision.allowed {
            self.record(&attrs, kind, &decision, "new connection");
            return Err(decision);
        }
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        // A set put in force since the decision may not have seen this connection among the
        // live ones (`replace` looks at them under this lock): decide again by it.
        let now = self.set.load();
        if !Arc::ptr_eq(&set, &now) {
            decision = now.evaluate(&attrs);
        }
        self.record(&attrs, kind, &decision, "new connection");
        if !decision.allowed {
            return Err(decision);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(false);
        live.insert(
            id,
            Live {
                attrs,
                kind,
                revoke: tx,
            },
        );
        drop(live);
        Ok(Admission {
            registration: Some((Arc::clone(self), id, rx)),
            decision,
        })
    }

    /// Puts `set` in force and closes the live connections it denies; returns how many.
    pub fn replace(&self, set: PolicySet) -> usize {
        let set = Arc::new(set);
        self.set.store(Arc::clone(&set));
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let mut closed = 0;
        for l in live.values() {
            let d = set.evaluate(&l.attrs);
            if !d.allowed {
                self.record(&l.attrs, l.kind, &d, "policy change closes live connection");
                let _ = l.revoke.send(true);
                closed += 1;
            }
        }
        self.revoked.fetch_add(closed as u64, Ordering::Relaxed);
        closed
    }

    /// Decisions so far, by labels.
    pub fn decision_counts(&self) -> BTreeMap<DecisionKey, u64> {
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Live connections closed because a new policy set denied them.
    pub fn revoked_connections(&self) -> u64 {
        self.revoked.load(Ordering::Relaxed)
    }

    /// Connections currently admitted.
    pub fn live_connections(&self) -> usize {
        self.live.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn record(&self, attrs: &ConnectionAttrs, kind: InboundKind, d: &Decision, what: &str) {
        let key = DecisionKey {
            decision: if d.allowed { "allow" } else { "deny" },
            policy: d.policy.as_deref().unwrap_or("").to_owned(),
            reason: d.reason.as_str(),
        };
        {
            let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
            *counts.entry(key.clone()).or_default() += 1;
            for p in &d.audited {
                let audit = DecisionKey {
                    decision: "audit",
                    policy: p.to_string(),
                    reason: "audit_matched",
                };
                *counts.entry(audit).or_default() += 1;
            }
        }
        let Some(suppressed) = self.logs.allow(key) else {
            return;
        };
        let source = attrs
            .source
            .as_ref()
            .map_or_else(|| "plaintext".to_owned(), ToString::to_string);
        let policy = d.policy.as_deref().unwrap_or("-");
        let audited: Vec<&str> = d.audited.iter().map(|a| &**a).collect();
        if d.allowed {
            info!(
                decision = "allow", reason = d.reason.as_str(), policy, kind = kind.as_str(),
                source = %source, source_ip = %attrs.source_ip,
                destination = %std::net::SocketAddr::new(attrs.destination_ip, attrs.destination_port),
                audited = ?audited, suppressed, "{what}"
            );
        } else {
            warn!(
                decision = "deny", reason = d.reason.as_str(), policy, kind = kind.as_str(),
                source = %source, source_ip = %attrs.source_ip,
                destination = %std::net::SocketAddr::new(attrs.destination_ip, attrs.destination_port),
                audited = ?audited, suppressed, "{what}"
            );
        }
    }
}

/// The HBONE server's authorizer: policy for the peer's verified identity.
pub struct PolicyAuthorizer(pub Arc<Enforcer>);

impl crate::hbone::server::Authorizer for PolicyAuthorizer {
    fn admit(
        &self,
        peer: &crate::identity::SpiffeId,
        client: std::net::SocketAddr,
        dst: std::net::SocketAddr,
        service_host: Option<&str>,
    ) -> Result<Admission, Decision> {
        let attrs = ConnectionAttrs {
            source: Some(peer.clone()),
            source_ip: client.ip(),
            destination_ip: dst.ip(),
            destination_port: dst.port(),
            // `host=` may carry the port.
            service_host: service_host
                .map(|h| {
                    h.rsplit_once(':')
                        .filter(|(_, p)| p.parse::<u16>().is_ok())
                        .map_or(h, |(h, _)| h)
                })
                .map(Arc::from),
        };
        self.0.admit(attrs, InboundKind::Hbone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{compile::WorkloadInfo, crd::RawObject};
    use std::time::Duration;

    fn set(policies: &str) -> PolicySet {
        let objects: Vec<RawObject> = serde_yaml::from_str(policies).unwrap();
        let w = WorkloadInfo {
            key: "ns/app".into(),
            namespace: "ns".into(),
            ips: vec!["10.0.0.1".parse().unwrap()],
            ..Default::default()
        };
        PolicySet::compile(&objects, &[w], "istio-system")
    }

    fn attrs(port: u16) -> ConnectionAttrs {
        ConnectionAttrs {
            source: Some(crate::identity::SpiffeId::new("cluster.local", "ns", "client").unwrap()),
            source_ip: "10.0.0.9".parse().unwrap(),
            destination_ip: "10.0.0.1".parse().unwrap(),
            destination_port: port,
            service_host: None,
        }
    }

    #[tokio::test]
    async fn a_new_policy_closes_only_the_connections_it_denies() {
        let e = Enforcer::new(set("[]"));
        let mut a80 = e.admit(attrs(80), InboundKind::Hbone).unwrap();
        let mut a81 = e.admit(attrs(81), InboundKind::Hbone).unwrap();
        assert_eq!(e.live_connections(), 2);
        let closed = e.replace(set(
            "- {apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: no80, namespace: ns}, spec: {action: DENY, rules: [{to: [{operation: {ports: [\"80\"]}}]}]}}",
        ));
        assert_eq!(closed, 1);
        tokio::time::timeout(Duration::from_secs(1), a80.revoked())
            .await
            .expect("port 80 revoked");
        assert!(
            tokio::time::timeout(Duration::from_millis(50), a81.revoked())
                .await
                .is_err(),
            "port 81 untouched"
        );
        assert_eq!(e.revoked_connections(), 1);
        let denied = e.admit(attrs(80), InboundKind::Hbone).unwrap_err();
        assert_eq!(denied.reason, Reason::DenyMatched);
        assert_eq!(denied.policy.as_deref(), Some("ns/no80"));
        drop((a80, a81));
        assert_eq!(e.live_connections(), 0);
        let counts = e.decision_counts();
        let deny = DecisionKey {
            decision: "deny",
            policy: "ns/no80".into(),
            reason: "deny_matched",
        };
        // One revocation and one refused new connection.
        assert_eq!(counts[&deny], 2);
    }

    #[test]
    fn logging_is_rate_limited_per_kind_of_decision() {
        let e = Enforcer::new(set("[]"));
        let key = |r| DecisionKey {
            decision: "deny",
            policy: String::new(),
            reason: r,
        };
        let logged = (0..100)
            .filter(|_| e.logs.allow(key("a")).is_some())
            .count();
        assert_eq!(logged, LOG_BURST as usize);
        assert_eq!(
            e.logs.allow(key("b")),
            Some(0),
            "another reason has its own budget"
        );
    }
}
