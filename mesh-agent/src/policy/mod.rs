//! L4 security policy with Istio's semantics: PeerAuthentication (is plaintext accepted?) and
//! AuthorizationPolicy (may this peer reach this workload on this port?), enforced by the
//! destination's agent for HBONE, plaintext and same-node connections.
//!
//! - [`crd`]: the objects as users write them (`security.istio.io/v1` and `v1beta1`).
//! - [`compile`]: Istio's validation and the compilation (L7 parts kept for waypoints; node
//!   agents handle them as Istio ambient's ztunnel does).
//! - [`model`]: the compiled rules and how a connection matches them.
//! - [`index`]: the set indexed by destination workload, and the evaluation order.
//! - [`enforcer`]: decisions at run time: counting, rate-limited logging, and closing live
//!   connections a new policy set denies.

pub mod compile;
pub mod crd;
pub mod enforcer;
pub mod index;
pub mod model;

#[cfg(test)]
mod conformance;

pub use compile::{PolicyError, Scope, WaypointGate, WorkloadInfo};
pub use crd::RawObject;
pub use enforcer::{Admission, Enforcer, InboundKind, PolicyAuthorizer};
pub use index::{Attached, Decision, PolicySet, Reason, WorkloadPolicies};
pub use model::{Action, CompiledPolicy, ConnectionAttrs, MtlsMode, RequestView};

/// Istio's default root namespace (mesh-wide policies live there).
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";
