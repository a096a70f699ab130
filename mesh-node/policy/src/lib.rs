//! nodemesh's policy decisions as pure functions: who may talk to a workload ([`authz`], Istio's
//! AuthorizationPolicy semantics) and where an HTTP request goes ([`route`], Gateway API HTTPRoute
//! attached to a Service).
//!
//! Nothing here does I/O, reads a clock or draws random numbers, so the node proxy, the control
//! plane's validation and `meshctl explain` all reach the same answer from the same inputs, and
//! every decision is table-tested without sockets. Resources are compiled once from their protobuf
//! form (patterns parsed, CIDRs and regexes built), which is also where invalid ones are rejected.

pub mod authz;
pub mod route;

/// Reasons a policy or route cannot be compiled.
///
/// Each names the object (`<namespace>/<name>`), the field in the resource's YAML spelling (e.g.
/// `rules[0].to[1].operation.paths[2]`) and the problem, so the control plane can put the message
/// on the object's status and a user can find the line to fix.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum PolicyError {
    #[error("{object}: {field}: must not be empty")]
    Empty { object: String, field: String },
    #[error("{object}: {field}: unknown enum value {value}")]
    UnknownEnum { object: String, field: String, value: i32 },
    #[error("{object}: {field}: {value:?} is not a port (1-65535)")]
    BadPort { object: String, field: String, value: String },
    #[error("{object}: {field}: {value:?} is not a CIDR or an IP address")]
    BadIpBlock { object: String, field: String, value: String },
    #[error("{object}: {field}: {value:?}: `*` may only stand alone or at the start or the end")]
    BadPattern { object: String, field: String, value: String },
    #[error(
        "{object}: {field}: unknown condition key {key:?} (supported: request.headers[<name>], \
         source.ip, source.namespace, source.principal, destination.port)"
    )]
    UnknownConditionKey { object: String, field: String, key: String },
    #[error("{object}: {field}: a condition needs values or notValues")]
    NoConditionValues { object: String, field: String },
    #[error(
        "{object}: {field}: {value:?} is not an HTTP method (uppercase, no wildcards: methods match exactly)"
    )]
    BadMethod { object: String, field: String, value: String },
    #[error("{object}: {field}: {value:?} is not a valid header name")]
    BadHeaderName { object: String, field: String, value: String },
    #[error("{object}: {field}: {value:?} is not a valid header value")]
    BadHeaderValue { object: String, field: String, value: String },
    #[error("{object}: {field}: {value:?} must start with \"/\"")]
    BadPath { object: String, field: String, value: String },
    #[error("{object}: {field}: invalid regular expression {value:?}: {reason}")]
    BadRegex { object: String, field: String, value: String, reason: String },
    #[error("{object}: {field}: {value:?} is not \"<namespace>/<hostname>\"")]
    BadService { object: String, field: String, value: String },
    #[error("{object}: {field}: {value:?} is not a hostname or a \"*.\" wildcard")]
    BadHostname { object: String, field: String, value: String },
    #[error("{object}: {field}: {name:?} is listed twice")]
    Duplicate { object: String, field: String, name: String },
    #[error("{object}: {field}: {value} is outside {min}-{max}")]
    OutOfRange { object: String, field: String, value: u64, min: u64, max: u64 },
    #[error("{object}: {field}: {value:?} is not an RFC 3339 time")]
    BadTime { object: String, field: String, value: String },
    #[error("{object}: {field}: {backend_ms} ms is longer than the request timeout ({request_ms} ms)")]
    TimeoutOrder { object: String, field: String, backend_ms: u64, request_ms: u64 },
}

impl PolicyError {
    /// Returns the object the error is about, `<namespace>/<name>`.
    pub fn object(&self) -> &str {
        self.parts().0
    }

    /// Returns the path of the offending field, e.g. `rules[0].from[1].source.ipBlocks[0]`.
    pub fn field(&self) -> &str {
        self.parts().1
    }

    fn parts(&self) -> (&str, &str) {
        match self {
            Self::Empty { object, field }
            | Self::UnknownEnum { object, field, .. }
            | Self::BadPort { object, field, .. }
            | Self::BadIpBlock { object, field, .. }
            | Self::BadPattern { object, field, .. }
            | Self::UnknownConditionKey { object, field, .. }
            | Self::NoConditionValues { object, field }
            | Self::BadMethod { object, field, .. }
            | Self::BadHeaderName { object, field, .. }
            | Self::BadHeaderValue { object, field, .. }
            | Self::BadPath { object, field, .. }
            | Self::BadRegex { object, field, .. }
            | Self::BadService { object, field, .. }
            | Self::BadHostname { object, field, .. }
            | Self::Duplicate { object, field, .. }
            | Self::OutOfRange { object, field, .. }
            | Self::BadTime { object, field, .. }
            | Self::TimeoutOrder { object, field, .. } => (object, field),
        }
    }
}

/// Returns the principal policies match on (`<td>/ns/<ns>/sa/<sa>`) for a SPIFFE URI, or None if
/// it is not one. Istio writes principals without the scheme, so peers' URIs are stripped once here.
pub fn principal_of(spiffe_uri: &str) -> Option<&str> {
    spiffe_uri.strip_prefix("spiffe://").filter(|rest| !rest.is_empty())
}

/// Names the object in errors even when the resource left its name or namespace empty.
fn object_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// Returns whether `s` is a valid HTTP method as policies and routes must write it: a token with no
/// lowercase letters (methods are case-sensitive, so `get` would never match a real GET).
fn is_method(s: &str) -> bool {
    !s.is_empty()
        && !s.contains('*')
        && !s.bytes().any(|b| b.is_ascii_lowercase())
        && http::Method::from_bytes(s.as_bytes()).is_ok()
}

/// Returns a Host header's host with the port and a trailing dot removed (IPv6 brackets kept).
fn host_without_port(host: &str) -> &str {
    let bare = if host.starts_with('[') {
        host.find(']').map_or(host, |end| &host[..=end])
    } else if host.bytes().filter(|&b| b == b':').count() == 1 {
        host.split_once(':').map_or(host, |(h, _)| h)
    } else {
        host
    };
    bare.strip_suffix('.').unwrap_or(bare)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principal_of_strips_the_scheme() {
        assert_eq!(principal_of("spiffe://cluster.local/ns/a/sa/b"), Some("cluster.local/ns/a/sa/b"));
        assert_eq!(principal_of("cluster.local/ns/a/sa/b"), None);
        assert_eq!(principal_of("spiffe://"), None);
    }

    #[test]
    fn host_without_port_handles_names_and_addresses() {
        for (host, want) in [
            ("example.com", "example.com"),
            ("example.com:8080", "example.com"),
            ("example.com.", "example.com"),
            ("example.com.:80", "example.com"),
            ("10.0.0.1:80", "10.0.0.1"),
            ("[::1]:80", "[::1]"),
            ("[::1]", "[::1]"),
            ("::1", "::1"),
        ] {
            assert_eq!(host_without_port(host), want, "{host}");
        }
    }

    #[test]
    fn methods_must_be_uppercase_tokens() {
        assert!(is_method("GET"));
        assert!(is_method("PROPFIND"));
        assert!(!is_method("get"));
        assert!(!is_method("*"));
        assert!(!is_method(""));
        assert!(!is_method("GE T"));
    }

    #[test]
    fn errors_name_object_and_field_on_one_line() {
        let e = PolicyError::BadIpBlock {
            object: "demo/p".into(),
            field: "rules[0].from[1].source.ipBlocks[2]".into(),
            value: "10.0.0.0/33".into(),
        };
        assert_eq!(e.object(), "demo/p");
        assert_eq!(e.field(), "rules[0].from[1].source.ipBlocks[2]");
        assert_eq!(
            e.to_string(),
            "demo/p: rules[0].from[1].source.ipBlocks[2]: \"10.0.0.0/33\" is not a CIDR or an IP address"
        );
    }
}
