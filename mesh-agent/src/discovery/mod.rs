//! Where the agent learns about the world. Local mode reads one YAML file ([`local`]);
//! Kubernetes mode ([`kube`]) watches the API server and builds the same [`LocalConfig`].
//! Either hands over changes to workloads and Services as a [`delta::ConfigDelta`].

pub mod delta;
pub mod kube;
pub mod local;
pub mod selection;

pub use crate::names::{Labels, Name, intern};
pub use delta::{ConfigDelta, ConfigUpdate};
pub use local::{CaSection, LocalConfig, Namespace, NodeSection, Service, ServicePort, Workload};

/// Istio's enrolment label (namespace or pod).
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// Label value that enrols.
pub const DATAPLANE_MODE_AMBIENT: &str = "ambient";
/// Pod label value that opts a pod out even if its namespace is enrolled.
pub const DATAPLANE_MODE_NONE: &str = "none";
