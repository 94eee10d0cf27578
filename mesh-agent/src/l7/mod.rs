//! The L7 engine shared by the waypoint and the gateway: Istio and Gateway API traffic objects
//! ([`api`]) compiled into routing decisions ([`route`]). Nothing here knows how a request
//! arrived (HBONE for a waypoint, TLS or TCP listeners for a gateway); the proxies that feed it
//! live beside it.
pub mod api;
pub mod authz;
pub mod binding;
pub mod cors;
pub mod protocol;
pub mod proxy;
pub mod resilience;
pub mod route;

#[cfg(test)]
mod conformance;
