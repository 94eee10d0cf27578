//! Traffic-management objects as users apply them, and the errors that name what is wrong with
//! one. The same objects come from the local config file and from Kubernetes.
pub mod gateway;
pub mod istio;

use crate::policy::RawObject;

/// `networking.istio.io` versions we serve (one schema).
pub const ISTIO_NETWORKING_VERSIONS: [&str; 3] = [
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
];

/// Kinds read by the L7 side (waypoints, bindings), which may sit in a config's `policies:`
/// list next to the security objects.
pub const ROUTING_KINDS: [&str; 5] = [
    "VirtualService",
    "DestinationRule",
    "HTTPRoute",
    "GRPCRoute",
    "Gateway",
];

/// Why a routing object was rejected: the object, the field, and what is wrong. A rejected
/// object is left out; the others keep working.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {namespace}/{name}: {field}: {message}")]
pub struct ConfigError {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub field: String,
    pub message: String,
}

/// Error reporting for one object.
pub struct ObjectContext<'a> {
    pub obj: &'a RawObject,
}

impl ObjectContext<'_> {
    pub fn err(&self, field: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            kind: self.obj.kind.clone(),
            namespace: self.obj.metadata.namespace.clone(),
            name: self.obj.metadata.name.clone(),
            field: field.into(),
            message: message.into(),
        }
    }

    /// Checks `apiVersion` against `versions`.
    pub fn check_version(&self, versions: &[&str]) -> Result<(), ConfigError> {
        if versions.contains(&self.obj.api_version.as_str()) {
            Ok(())
        } else {
            Err(self.err(
                "apiVersion",
                format!(
                    "{:?} is not one of {}",
                    self.obj.api_version,
                    versions.join(", ")
                ),
            ))
        }
    }

    /// Parses `spec` with the full schema; errors carry the path of the offending field.
    pub fn spec<T: serde::de::DeserializeOwned>(&self) -> Result<T, ConfigError> {
        self.obj
            .typed_spec()
            .map_err(|(field, message)| self.err(field, message))
    }
}
