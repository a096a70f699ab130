//! SPIFFE workload identities: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::{fmt, str::FromStr};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("{what} {value:?} is not valid: {why}")]
    Invalid { what: &'static str, value: String, why: &'static str },
    #[error(
        "{0:?} is not a workload SPIFFE ID (expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>)"
    )]
    NotWorkloadId(String),
}

/// A workload's identity: trust domain, Kubernetes namespace and service account.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

/// Checks a trust domain: SPIFFE allows lowercase letters, digits, `.`, `-` and `_`.
fn check_trust_domain(value: &str) -> Result<(), IdentityError> {
    let invalid = |why| IdentityError::Invalid { what: "trust domain", value: value.to_owned(), why };
    if value.is_empty() || value.len() > 255 {
        return Err(invalid("must be 1 to 255 characters"));
    }
    if !value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b)) {
        return Err(invalid("may contain only lowercase letters, digits, '.', '-' and '_'"));
    }
    Ok(())
}

/// Checks a Kubernetes name as used in a path segment (DNS-1123 subdomain characters).
fn check_name(what: &'static str, value: &str) -> Result<(), IdentityError> {
    let invalid = |why| IdentityError::Invalid { what, value: value.to_owned(), why };
    if value.is_empty() || value.len() > 253 {
        return Err(invalid("must be 1 to 253 characters"));
    }
    if !value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b)) {
        return Err(invalid("may contain only lowercase letters, digits, '-' and '.'"));
    }
    Ok(())
}

impl SpiffeId {
    /// Builds an identity, validating each part.
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Result<Self, IdentityError> {
        check_trust_domain(trust_domain)?;
        check_name("namespace", namespace)?;
        check_name("service account", service_account)?;
        Ok(SpiffeId {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// Returns the URI form, as it appears in a certificate's URI SAN.
    pub fn uri(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let not_workload = || IdentityError::NotWorkloadId(s.to_owned());
        let rest = s.strip_prefix("spiffe://").ok_or_else(not_workload)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] => SpiffeId::new(td, ns, sa),
            _ => Err(not_workload()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_workload_ids() {
        let id: SpiffeId = "spiffe://cluster.local/ns/demo/sa/a1".parse().expect("valid");
        assert_eq!(
            (id.trust_domain(), id.namespace(), id.service_account()),
            ("cluster.local", "demo", "a1")
        );
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/demo/sa/a1");
        assert_eq!(SpiffeId::new("cluster.local", "demo", "a1").expect("valid"), id);
    }

    #[test]
    fn rejects_anything_else() {
        for bad in [
            "spiffe://cluster.local/ns/demo/sa/",
            "spiffe://cluster.local/ns/demo",
            "spiffe://cluster.local/ns/demo/sa/a1/extra",
            "spiffe://Cluster.local/ns/demo/sa/a1",
            "spiffe://cluster.local/ns/Demo/sa/a1",
            "spiffe://cluster.local/ns/de mo/sa/a1",
            "spiffe:///ns/demo/sa/a1",
            "https://cluster.local/ns/demo/sa/a1",
            "spiffe://cluster.local/sa/a1/ns/demo",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad} must be rejected");
        }
    }
}
