//! Istio's `security.istio.io` objects as users write them (v1 and v1beta1 share one schema).
//!
//! Field names follow the CRDs exactly. Unknown fields in `spec` are errors rather than ignored:
//! a misspelt `principal:` silently dropped from an ALLOW source would widen it. `metadata` keeps
//! whatever Kubernetes puts there.
use std::collections::BTreeMap;

use serde::Deserialize;

/// The API group and versions we read.
pub const API_GROUP: &str = "security.istio.io";
pub const API_VERSIONS: [&str; 2] = ["security.istio.io/v1", "security.istio.io/v1beta1"];

/// Kubernetes object metadata: only what policy evaluation needs.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: String,
    /// RFC 3339; decides between PeerAuthentications of the same level (oldest wins), as Istio.
    #[serde(default)]
    pub creation_timestamp: Option<String>,
    /// Labels (a waypoint Gateway's `istio.io/waypoint-for`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// `spec.selector`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// `spec.targetRef` / `spec.targetRefs[]`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicyTargetReference {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: String,
}

/// `AuthorizationPolicy.spec`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub target_ref: Option<PolicyTargetReference>,
    #[serde(default)]
    pub target_refs: Vec<PolicyTargetReference>,
    /// `None` means a policy with no rules (for ALLOW: allow nothing).
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// ALLOW (default), DENY, AUDIT or CUSTOM; kept as text so an unknown value is reported by
    /// name instead of as a parse error.
    #[serde(default)]
    pub action: Option<String>,
    /// Only meaningful with CUSTOM.
    #[serde(default)]
    pub provider: Option<serde_yaml::Value>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Rule {
    #[serde(default)]
    pub from: Vec<RuleFrom>,
    #[serde(default)]
    pub to: Vec<RuleTo>,
    #[serde(default)]
    pub when: Vec<Condition>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RuleFrom {
    #[serde(default)]
    pub source: Option<Source>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Source {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub request_principals: Vec<String>,
    #[serde(default)]
    pub not_request_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    /// `<namespace>/<service account>`.
    #[serde(default)]
    pub service_accounts: Vec<String>,
    #[serde(default)]
    pub not_service_accounts: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RuleTo {
    #[serde(default)]
    pub operation: Option<Operation>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Operation {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub not_ports: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Condition {
    #[serde(default)]
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}

/// `PeerAuthentication.spec`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub mtls: Option<MutualTls>,
    /// Keyed by the workload's port (YAML keys may be numbers or strings).
    #[serde(default)]
    pub port_level_mtls: BTreeMap<PortKey, MutualTls>,
}

/// A `portLevelMtls` key: YAML and JSON write it as a number or as a string.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(untagged)]
pub enum PortKey {
    Number(i64),
    Text(String),
}

impl std::fmt::Display for PortKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Number(n) => write!(f, "{n}"),
            Self::Text(s) => f.write_str(s),
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MutualTls {
    /// UNSET, DISABLE, PERMISSIVE or STRICT; text for the same reason as `action`.
    #[serde(default)]
    pub mode: Option<String>,
}

/// Any object in the config's `policies:` list, before its kind is known.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RawObject {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: serde_yaml::Value,
}

impl RawObject {
    /// `spec` read with the full schema `T` (a missing spec is an empty one); an error gives
    /// the offending field's path (`spec.rules[0].from`) and what is wrong with it.
    pub fn typed_spec<T: serde::de::DeserializeOwned>(&self) -> Result<T, (String, String)> {
        let spec = if self.spec.is_null() {
            serde_yaml::Value::Mapping(Default::default())
        } else {
            self.spec.clone()
        };
        serde_path_to_error::deserialize(spec).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." || path.is_empty() {
                "spec".to_owned()
            } else {
                format!("spec.{path}")
            };
            (field, e.into_inner().to_string())
        })
    }
}
