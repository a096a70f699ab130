//! From the protobuf `Authorization` to a [`Policy`], once, refusing what could not be enforced.
//!
//! The control plane validates with this same code, but still ships what fails (the nodes then
//! refuse it), so refusals here stay within what its translator already reports. In particular
//! empty `source` and `operation` entries are accepted (they match anything): the translator
//! empties a DENY field whose values are invalid so that the rule fails closed.

use mesh_api::workload::v1::{
    Authorization, AuthorizationAction, AuthorizationCondition, AuthorizationOperation, AuthorizationScope,
    AuthorizationSource,
};

use super::{
    Action, Condition, Operation, Policy, Rule, Scope, Source,
    pattern::{IpBlock, Pattern, PatternError},
};
use crate::{PolicyError, is_method, object_key};

pub(super) fn policy(p: &Authorization) -> Result<Policy, PolicyError> {
    let key = object_key(&p.namespace, &p.name);
    let c = Compiler { object: &key };
    if p.namespace.is_empty() {
        return Err(c.empty("metadata.namespace"));
    }
    if p.name.is_empty() {
        return Err(c.empty("metadata.name"));
    }
    let scope = match AuthorizationScope::try_from(p.scope) {
        Ok(AuthorizationScope::WorkloadSelector) => Scope::WorkloadSelector,
        Ok(AuthorizationScope::Namespace) => Scope::Namespace,
        Ok(AuthorizationScope::Global) => Scope::Global,
        Err(_) => return Err(c.unknown_enum("scope", p.scope)),
    };
    // An action this node does not know must not default to ALLOW (prost's getter would).
    let action = match AuthorizationAction::try_from(p.action) {
        Ok(AuthorizationAction::Allow) => Action::Allow,
        Ok(AuthorizationAction::Deny) => Action::Deny,
        Ok(AuthorizationAction::Audit) => Action::Audit,
        Err(_) => return Err(c.unknown_enum("spec.action", p.action)),
    };
    let mut rules = Vec::with_capacity(p.rules.len());
    for (r, rule) in p.rules.iter().enumerate() {
        let mut compiled = Rule::default();
        for (i, from) in rule.from.iter().enumerate() {
            compiled.from.push(c.source(&format!("rules[{r}].from[{i}].source"), from)?);
        }
        for (i, to) in rule.to.iter().enumerate() {
            compiled.to.push(c.operation(&format!("rules[{r}].to[{i}].operation"), to)?);
        }
        for (i, when) in rule.when.iter().enumerate() {
            compiled.when.push(c.condition(&format!("rules[{r}].when[{i}]"), when)?);
        }
        rules.push(compiled);
    }
    Ok(Policy { namespace: p.namespace.clone(), key, scope, action, rules })
}

struct Compiler<'a> {
    object: &'a str,
}

impl Compiler<'_> {
    fn empty(&self, field: &str) -> PolicyError {
        PolicyError::Empty { object: self.object.into(), field: field.into() }
    }

    fn unknown_enum(&self, field: &str, value: i32) -> PolicyError {
        PolicyError::UnknownEnum { object: self.object.into(), field: field.into(), value }
    }

    fn patterns(&self, field: &str, values: &[String], lowercase: bool) -> Result<Vec<Pattern>, PolicyError> {
        let one = |(i, v): (usize, &String)| {
            Pattern::parse(v, lowercase).map_err(|e| match e {
                PatternError::Empty => self.empty(&format!("{field}[{i}]")),
                PatternError::Wildcard => PolicyError::BadPattern {
                    object: self.object.into(),
                    field: format!("{field}[{i}]"),
                    value: v.clone(),
                },
            })
        };
        values.iter().enumerate().map(one).collect()
    }

    fn methods(&self, field: &str, values: &[String]) -> Result<Vec<Pattern>, PolicyError> {
        let one = |(i, v): (usize, &String)| {
            if is_method(v) {
                Ok(Pattern::exact(v))
            } else {
                Err(PolicyError::BadMethod {
                    object: self.object.into(),
                    field: format!("{field}[{i}]"),
                    value: v.clone(),
                })
            }
        };
        values.iter().enumerate().map(one).collect()
    }

    fn ip_blocks(&self, field: &str, values: &[String]) -> Result<Vec<IpBlock>, PolicyError> {
        let one = |(i, v): (usize, &String)| {
            IpBlock::parse(v).ok_or_else(|| PolicyError::BadIpBlock {
                object: self.object.into(),
                field: format!("{field}[{i}]"),
                value: v.clone(),
            })
        };
        values.iter().enumerate().map(one).collect()
    }

    fn ports(&self, field: &str, values: &[u32]) -> Result<Vec<u16>, PolicyError> {
        values.iter().enumerate().map(|(i, v)| self.port(&format!("{field}[{i}]"), &v.to_string())).collect()
    }

    fn port(&self, field: &str, value: &str) -> Result<u16, PolicyError> {
        value.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| PolicyError::BadPort {
            object: self.object.into(),
            field: field.into(),
            value: value.into(),
        })
    }

    fn source(&self, field: &str, s: &AuthorizationSource) -> Result<Source, PolicyError> {
        Ok(Source {
            principals: self.patterns(&format!("{field}.principals"), &s.principals, false)?,
            not_principals: self.patterns(&format!("{field}.notPrincipals"), &s.not_principals, false)?,
            namespaces: self.patterns(&format!("{field}.namespaces"), &s.namespaces, false)?,
            not_namespaces: self.patterns(&format!("{field}.notNamespaces"), &s.not_namespaces, false)?,
            ip_blocks: self.ip_blocks(&format!("{field}.ipBlocks"), &s.ip_blocks)?,
            not_ip_blocks: self.ip_blocks(&format!("{field}.notIpBlocks"), &s.not_ip_blocks)?,
        })
    }

    fn operation(&self, field: &str, o: &AuthorizationOperation) -> Result<Operation, PolicyError> {
        Ok(Operation {
            ports: self.ports(&format!("{field}.ports"), &o.ports)?,
            not_ports: self.ports(&format!("{field}.notPorts"), &o.not_ports)?,
            methods: self.methods(&format!("{field}.methods"), &o.methods)?,
            not_methods: self.methods(&format!("{field}.notMethods"), &o.not_methods)?,
            paths: self.patterns(&format!("{field}.paths"), &o.paths, false)?,
            not_paths: self.patterns(&format!("{field}.notPaths"), &o.not_paths, false)?,
            hosts: self.patterns(&format!("{field}.hosts"), &o.hosts, true)?,
            not_hosts: self.patterns(&format!("{field}.notHosts"), &o.not_hosts, true)?,
        })
    }

    fn condition(&self, field: &str, c: &AuthorizationCondition) -> Result<Condition, PolicyError> {
        let key_field = format!("{field}.key");
        let header = match c.key.as_str() {
            "" => return Err(self.empty(&key_field)),
            "source.ip" | "source.namespace" | "source.principal" | "destination.port" => None,
            k => match k.strip_prefix("request.headers[").and_then(|r| r.strip_suffix(']')) {
                Some("") => return Err(self.empty(&key_field)),
                Some(name) => Some(http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                    PolicyError::BadHeaderName {
                        object: self.object.into(),
                        field: key_field,
                        value: name.into(),
                    }
                })?),
                None => {
                    return Err(PolicyError::UnknownConditionKey {
                        object: self.object.into(),
                        field: key_field,
                        key: c.key.clone(),
                    });
                }
            },
        };
        if c.values.is_empty() && c.not_values.is_empty() {
            return Err(PolicyError::NoConditionValues { object: self.object.into(), field: field.into() });
        }
        let (values, not_values) = (format!("{field}.values"), format!("{field}.notValues"));
        let patterns = |f: &str, list: &[String]| self.patterns(f, list, false);
        let ips = |f: &str, list: &[String]| self.ip_blocks(f, list);
        let ports = |f: &str, list: &[String]| -> Result<Vec<u16>, PolicyError> {
            list.iter().enumerate().map(|(i, v)| self.port(&format!("{f}[{i}]"), v)).collect()
        };
        Ok(match (header, c.key.as_str()) {
            (Some(name), _) => Condition::Header {
                name,
                values: patterns(&values, &c.values)?,
                not_values: patterns(&not_values, &c.not_values)?,
            },
            (None, "source.ip") => Condition::SourceIp {
                values: ips(&values, &c.values)?,
                not_values: ips(&not_values, &c.not_values)?,
            },
            (None, "source.namespace") => Condition::SourceNamespace {
                values: patterns(&values, &c.values)?,
                not_values: patterns(&not_values, &c.not_values)?,
            },
            (None, "source.principal") => Condition::SourcePrincipal {
                values: patterns(&values, &c.values)?,
                not_values: patterns(&not_values, &c.not_values)?,
            },
            (None, _) => Condition::DestinationPort {
                values: ports(&values, &c.values)?,
                not_values: ports(&not_values, &c.not_values)?,
            },
        })
    }
}
