//! Routing decisions for one request: which VirtualService owns the host, which rule matches
//! first, which weighted destination takes it. Pure and synchronous, so the same table serves
//! the waypoint, the gateway and the conformance table.
pub mod compile;
pub mod destination;
pub mod duration;
pub mod gateway;
mod headers;
pub mod matching;
pub mod model;
mod retries_faults;

use std::sync::Arc;

pub use matching::{ConnectionView, RequestMatch, RequestView};
use model::{HttpRule, RouteTarget, RuleAction, VirtualService};

use super::api::ConfigError;
use crate::policy::RawObject;

/// An error inside an object: the field path below where it was found, and the message.
pub(crate) type FieldError = (String, String);

/// Attaches a field path to a message.
pub(crate) fn at(field: impl Into<String>) -> impl FnOnce(String) -> FieldError {
    let field = field.into();
    move |m| (field, m)
}

/// The compiled VirtualServices of a config, looked up by host.
#[derive(Clone, Debug, Default)]
pub struct RouteTable {
    /// From HTTPRoutes, one per service: consulted first (Istio leaves mixing both APIs on one
    /// service undefined; we let the Gateway API object, the recommended one, win).
    gateway: Vec<Arc<VirtualService>>,
    /// Oldest first (creation time, then `namespace/name`): among services claiming one host
    /// with equally specific patterns, the first wins.
    services: Vec<Arc<VirtualService>>,
}

/// What the table says about one request.
#[derive(Debug)]
pub enum Decision<'a> {
    /// No VirtualService claims the host: to the service itself, with Istio's defaults.
    Default,
    /// A rule matched. `target` is the weighted pick for a `route` rule (`None` for redirects
    /// and direct responses).
    Rule {
        service: &'a VirtualService,
        rule: &'a HttpRule,
        /// The alternative of `rule.matches` that matched (`None`: the rule has none).
        matched: Option<&'a RequestMatch>,
        target: Option<&'a RouteTarget>,
    },
    /// The host is claimed but no rule matched: 404, response flag NR.
    NoRoute { service: &'a VirtualService },
}

impl RouteTable {
    /// Compiles every VirtualService and HTTPRoute among `objects` (other kinds are skipped);
    /// a rejected object is left out and reported, the rest are served.
    pub fn build(objects: &[RawObject]) -> (Self, Vec<ConfigError>) {
        let (gateway, mut errors) = gateway::http_routes(objects);
        let gateway = gateway.into_iter().map(Arc::new).collect();
        let mut services: Vec<Arc<VirtualService>> = objects
            .iter()
            .filter(|o| o.kind == "VirtualService")
            .filter_map(|o| match compile::virtual_service(o) {
                Ok(vs) => Some(Arc::new(vs)),
                Err(e) => {
                    errors.push(e);
                    None
                }
            })
            .collect();
        services.sort_by(|a, b| {
            let created = |v: &VirtualService| v.created.clone().unwrap_or_default();
            created(a).cmp(&created(b)).then_with(|| a.key.cmp(&b.key))
        });
        (Self { gateway, services }, errors)
    }

    /// The VirtualService owning HTTP traffic to `host` (fully qualified, no port): among those
    /// with `http` rules, the most specific host pattern wins, then the oldest object.
    /// An HTTPRoute-derived list claims the host only on the ports its parentRefs name.
    pub fn service_for(&self, host: &str, port: u16) -> Option<&VirtualService> {
        let attached = |vs: &&Arc<VirtualService>| {
            vs.hosts[0].matches(host)
                && vs
                    .http
                    .iter()
                    .flat_map(|r| &r.matches)
                    .any(|m| m.port.is_none_or(|p| p == port))
        };
        if let Some(vs) = self.gateway.iter().find(attached) {
            return Some(vs);
        }
        self.most_specific(host, |vs| !vs.http.is_empty())
    }

    /// Among the VirtualServices `having` something, the one whose host pattern matches `host`
    /// most specifically (the oldest among equals).
    fn most_specific(
        &self,
        host: &str,
        having: impl Fn(&VirtualService) -> bool,
    ) -> Option<&VirtualService> {
        let mut best: Option<(&VirtualService, usize)> = None;
        for vs in self.services.iter().filter(|vs| having(vs)) {
            let Some(spec) = vs
                .hosts
                .iter()
                .filter(|h| h.matches(host))
                .map(model::HostPattern::specificity)
                .max()
            else {
                continue;
            };
            if best.is_none_or(|(_, s)| spec > s) {
                best = Some((vs, spec));
            }
        }
        best.map(|(vs, _)| vs)
    }

    /// Routes one HTTP request to `host`; `roll` is a uniformly random number (the weighted
    /// pick), fixed by tests.
    pub fn route(&self, host: &str, request: &RequestView<'_>, roll: u64) -> Decision<'_> {
        let Some(service) = self.service_for(host, request.port) else {
            return Decision::Default;
        };
        let Some((rule, matched)) = service
            .http
            .iter()
            .find_map(|r| r.first_match(request).map(|m| (r, m)))
        else {
            return Decision::NoRoute { service };
        };
        let target = match &rule.action {
            RuleAction::Route(w) => w.pick(roll),
            RuleAction::Redirect(_) | RuleAction::Direct { .. } => None,
        };
        Decision::Rule {
            service,
            rule,
            matched,
            target,
        }
    }

    /// The destination of a TCP connection to `host`: the first `tcp[]` rule that matches, of
    /// the most specific VirtualService with `tcp` rules, picks by weight (`roll` as in
    /// [`Self::route`]). `None`: no VirtualService routes TCP for `host` (or none of its rules
    /// matches), so the connection goes to the service itself.
    pub fn tcp_route(
        &self,
        host: &str,
        connection: &matching::ConnectionView<'_>,
        roll: u64,
    ) -> Option<&RouteTarget> {
        self.most_specific(host, |vs| !vs.tcp.is_empty())?
            .tcp
            .iter()
            .find(|r| r.matches(connection))
            .and_then(|r| r.route.pick(roll))
    }

    /// Route lists held (VirtualServices plus one per HTTPRoute-attached service).
    pub fn len(&self) -> usize {
        self.services.len() + self.gateway.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
