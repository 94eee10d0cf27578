//! Authorization at a waypoint, as Istio's waypoint does it with Envoy's RBAC filter: the
//! AuthorizationPolicies attached to the waypoint (`targetRefs` naming its Gateway, or its
//! GatewayClass from the root namespace) apply to every request through it; those attached to
//! a Service bound to it apply to requests for that Service. Each request is checked with its
//! rules whole (methods, paths, hosts, headers as well as the source); opaque TCP through the
//! waypoint is checked as a node agent checks a connection. Policies with a selector, or none,
//! are the node agents' (Istio ambient does not apply them to waypoints either).
use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use http::{Response, StatusCode};

use super::{
    binding::Waypoint,
    proxy::{Body, grpc_local, local},
};
use crate::policy::{
    Action, Attached, CompiledPolicy, ConnectionAttrs, Decision, RawObject, RequestView,
    compile::{KIND_AUTHORIZATION, compile_authorization, target_refs},
};

const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// Policies of one scope, by action.
#[derive(Debug, Default, Clone)]
struct ByAction {
    allow: Vec<Arc<CompiledPolicy>>,
    deny: Vec<Arc<CompiledPolicy>>,
    audit: Vec<Arc<CompiledPolicy>>,
    invalid: Vec<Arc<str>>,
}

impl ByAction {
    fn add(
        &mut self,
        policy: &Result<Arc<CompiledPolicy>, crate::policy::PolicyError>,
        name: &Arc<str>,
    ) {
        match policy {
            Ok(p) => match p.action {
                Action::Allow => self.allow.push(Arc::clone(p)),
                Action::Deny => self.deny.push(Arc::clone(p)),
                Action::Audit => self.audit.push(Arc::clone(p)),
            },
            Err(_) => self.invalid.push(Arc::clone(name)),
        }
    }

    fn extend(&mut self, other: &Self) {
        self.allow.extend(other.allow.iter().cloned());
        self.deny.extend(other.deny.iter().cloned());
        self.audit.extend(other.audit.iter().cloned());
        self.invalid.extend(other.invalid.iter().cloned());
    }

    fn is_empty(&self) -> bool {
        self.allow.is_empty()
            && self.deny.is_empty()
            && self.audit.is_empty()
            && self.invalid.is_empty()
    }

    fn attached(&self) -> Attached<'_> {
        Attached {
            allow: &self.allow,
            deny: &self.deny,
            audit: &self.audit,
            invalid: &self.invalid,
        }
    }
}

/// The policies one waypoint enforces.
#[derive(Debug, Default)]
pub struct WaypointAuthz {
    /// Attached to the waypoint (its Gateway or class): every request.
    all: ByAction,
    /// `(namespace, name)` of a Service → the waypoint's policies plus the Service's own.
    by_service: HashMap<(String, String), ByAction>,
}

impl WaypointAuthz {
    /// The policies among `objects` that attach to waypoint `me` or to one of `bound` (its
    /// Services, `(namespace, name)`), and the errors of those rejected (they deny what they
    /// would have governed: fail closed).
    pub fn build(
        objects: &[RawObject],
        me: &Waypoint,
        bound: &[(String, String)],
        root_namespace: &str,
    ) -> (Self, Vec<String>) {
        let bound: HashSet<&(String, String)> = bound.iter().collect();
        let mut errors = Vec::new();
        let mut all = ByAction::default();
        let mut services: HashMap<(String, String), ByAction> = HashMap::new();
        for obj in objects.iter().filter(|o| o.kind == KIND_AUTHORIZATION) {
            let ns = obj.metadata.namespace.as_str();
            let mut to_me = false;
            let mut to_services = Vec::new();
            for r in target_refs(obj) {
                if !r.namespace.is_empty() && r.namespace != ns {
                    continue;
                }
                match (r.group.as_str(), r.kind.as_str()) {
                    (GATEWAY_GROUP, "Gateway") => {
                        to_me |= ns == me.namespace && r.name == me.name;
                    }
                    (GATEWAY_GROUP, "GatewayClass") => {
                        to_me |= ns == root_namespace && r.name == me.class;
                    }
                    ("" | "core", "Service") => {
                        let key = (ns.to_owned(), r.name.clone());
                        if bound.contains(&key) {
                            to_services.push(key);
                        }
                    }
                    _ => {}
                }
            }
            if !to_me && to_services.is_empty() {
                continue;
            }
            let entry = compile_authorization(obj, root_namespace);
            if let Err(e) = &entry.policy {
                errors.push(format!("{e} (the waypoint denies what it governs)"));
            }
            if to_me {
                all.add(&entry.policy, &entry.name);
            } else {
                for key in to_services {
                    services
                        .entry(key)
                        .or_default()
                        .add(&entry.policy, &entry.name);
                }
            }
        }
        for specific in services.values_mut() {
            specific.extend(&all);
        }
        (
            Self {
                all,
                by_service: services,
            },
            errors,
        )
    }

    /// No policy applies to anything through this waypoint.
    pub fn is_empty(&self) -> bool {
        self.all.is_empty() && self.by_service.is_empty()
    }

    /// Decides one request (or, with `request: None`, one opaque connection) addressed to
    /// `service` (`(namespace, name)`; `None` for a pod addressed directly).
    pub fn decide(
        &self,
        service: Option<(&str, &str)>,
        attrs: &ConnectionAttrs,
        request: Option<&RequestView<'_>>,
    ) -> Decision {
        let scope = service
            .and_then(|(ns, name)| self.by_service.get(&(ns.to_owned(), name.to_owned())))
            .unwrap_or(&self.all);
        scope.attached().decide(attrs, request)
    }
}

/// Envoy's answer to a request its RBAC filter denies: 403 `RBAC: access denied`; for gRPC,
/// a trailers-only answer with status 7 (PERMISSION_DENIED), as Envoy's gRPC local replies.
pub fn denied(grpc: bool) -> Response<Body> {
    const TEXT: &str = "RBAC: access denied";
    if grpc {
        grpc_local(7, TEXT)
    } else {
        local(StatusCode::FORBIDDEN, TEXT)
    }
}

#[cfg(test)]
#[path = "authz_tests.rs"]
mod tests;
