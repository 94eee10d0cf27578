//! Where the agent learns about the world. Local mode reads one YAML file (this module's
//! [`local`]); the Kubernetes watchers come with the Kubernetes issue and feed the same types.

pub mod local;

pub use local::{CaSection, LocalConfig, Namespace, NodeSection, Service, ServicePort, Workload};

/// Istio's enrolment label (namespace or pod).
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// Label value that enrols.
pub const DATAPLANE_MODE_AMBIENT: &str = "ambient";
/// Pod label value that opts a pod out even if its namespace is enrolled.
pub const DATAPLANE_MODE_NONE: &str = "none";
