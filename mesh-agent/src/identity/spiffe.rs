//! SPIFFE workload identities as Istio uses them: `spiffe://<trust domain>/ns/<ns>/sa/<sa>`.
use std::fmt;

use super::IdentityError;
use crate::names::Name;

/// Istio's default trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// A workload identity: the service account of a namespace in a trust domain. Its parts are
/// shared strings (cloning one costs no allocation); they are not interned, since identities
/// are parsed from every peer certificate and the pool's lock has no place on that path. The
/// node agent shares one identity per service account instead (`node::state`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    pub trust_domain: Name,
    pub namespace: Name,
    pub service_account: Name,
}

impl SpiffeId {
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        for (what, v) in [
            ("trust domain", trust_domain),
            ("namespace", namespace),
            ("service account", service_account),
        ] {
            if v.is_empty() || v.contains('/') || v.chars().any(char::is_whitespace) {
                return Err(IdentityError::BadSpiffeId(format!(
                    "{what} {v:?} is empty or contains '/' or spaces"
                )));
            }
        }
        Ok(Self {
            trust_domain: Name::from(trust_domain.to_ascii_lowercase()),
            namespace: Name::from(namespace),
            service_account: Name::from(service_account),
        })
    }

    /// Parses `spiffe://<td>/ns/<ns>/sa/<sa>` (the only shape Istio issues).
    pub fn parse(uri: &str) -> Result<Self, IdentityError> {
        let bad = || {
            IdentityError::BadSpiffeId(format!(
                "{uri:?} is not spiffe://<trust domain>/ns/<namespace>/sa/<service account>"
            ))
        };
        let rest = uri.strip_prefix("spiffe://").ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] => Self::new(td, ns, sa),
            _ => Err(bad()),
        }
    }

    /// The URI form, as carried in the certificate's URI SAN.
    pub fn uri(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats_istio_identities() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/sleep").unwrap();
        assert_eq!(id.namespace, "default");
        assert_eq!(id.service_account, "sleep");
        assert_eq!(id.uri(), "spiffe://cluster.local/ns/default/sa/sleep");
        for bad in [
            "http://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/ns/a/sa/b/c",
            "spiffe:///ns/a/sa/b",
            "spiffe://td/sa/a/ns/b",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad}");
        }
    }
}
