//! How each AuthorizationPolicy and HTTPRoute was taken, for people and for the API: the
//! admin endpoint's `/policies` and `/routes` (both modes), and, in Kubernetes mode, the
//! objects' own status ([`kubernetes`]).

pub mod kubernetes;

use mesh_manifests::translate::{Acceptance, Model};
use serde::Serialize;

/// How one AuthorizationPolicy was taken.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PolicyReport {
    pub namespace: String,
    pub name: String,
    /// `WORKLOAD_SELECTOR`, `NAMESPACE` or `GLOBAL`.
    pub scope: &'static str,
    /// `ALLOW`, `DENY` or `AUDIT`.
    pub action: &'static str,
    /// The `Accepted` condition: `False` says why (nodes still enforce the policy, failing
    /// closed where it was not taken as written).
    pub accepted: Acceptance,
}

/// How one HTTPRoute was taken.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RouteReport {
    pub namespace: String,
    pub name: String,
    /// Whether nodes receive it (not when a value cannot be implemented).
    pub distributed: bool,
    pub parents: Vec<ParentReport>,
}

/// One Service parent of a route.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ParentReport {
    /// `namespace/name`, and `:port` when the route names one.
    pub service: String,
    pub accepted: Acceptance,
    pub resolved_refs: Acceptance,
}

/// The policies and routes of the last translation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Reports {
    /// Whether this translation is what nodes receive. `false` in local mode when the
    /// manifests were refused (see `/debug/config`): nodes keep the last good state, and
    /// these reports say what was wrong with the new one.
    pub served: bool,
    pub policies: Vec<PolicyReport>,
    pub routes: Vec<RouteReport>,
}

impl Reports {
    /// Summarizes a model's policies and routes; `served` says whether nodes receive it.
    pub fn of(model: &Model, served: bool) -> Self {
        let policies = model
            .authorizations
            .iter()
            .map(|spec| {
                let a = &spec.authorization;
                PolicyReport {
                    namespace: a.namespace.clone(),
                    name: a.name.clone(),
                    scope: a.scope().as_str_name(),
                    action: a.action().as_str_name(),
                    accepted: spec.acceptance.clone(),
                }
            })
            .collect();
        let routes = model
            .routes
            .iter()
            .map(|spec| RouteReport {
                namespace: spec.namespace.clone(),
                name: spec.name.clone(),
                distributed: spec.route.is_some(),
                parents: spec
                    .parents
                    .iter()
                    .map(|p| {
                        let namespace = p.parent_ref.namespace.as_deref().unwrap_or(&spec.namespace);
                        let port = p.parent_ref.port.map(|port| format!(":{port}")).unwrap_or_default();
                        ParentReport {
                            service: format!("{namespace}/{}{port}", p.parent_ref.name),
                            accepted: p.accepted.clone(),
                            resolved_refs: p.resolved_refs.clone(),
                        }
                    })
                    .collect(),
            })
            .collect();
        Reports { served, policies, routes }
    }
}

#[cfg(test)]
mod tests {
    use mesh_api::workload::v1::{Authorization, AuthorizationAction, AuthorizationScope};
    use mesh_manifests::{
        crd::ParentReference,
        translate::{AuthorizationSpec, ParentStatus, RouteSpec},
    };

    use super::*;

    #[test]
    fn reports_name_each_policy_and_route_with_its_conditions() {
        let rejected = Acceptance::rejected("UnenforceableHTTPRule", "rules[0]: …");
        let model = Model {
            authorizations: vec![AuthorizationSpec {
                authorization: Authorization {
                    name: "p".into(),
                    namespace: "demo".into(),
                    scope: AuthorizationScope::Global.into(),
                    action: AuthorizationAction::Deny.into(),
                    rules: vec![],
                },
                generation: Some(1),
                acceptance: rejected.clone(),
            }],
            routes: vec![RouteSpec {
                namespace: "demo".into(),
                name: "r".into(),
                route: None,
                generation: None,
                parents: vec![ParentStatus {
                    parent_ref: ParentReference {
                        kind: Some("Service".into()),
                        name: "web".into(),
                        namespace: Some("prod".into()),
                        port: Some(80),
                        group: None,
                    },
                    accepted: Acceptance::condition(false, "UnsupportedValue", "…"),
                    resolved_refs: Acceptance::condition(true, "ResolvedRefs", "…"),
                }],
            }],
            ..Default::default()
        };
        let reports = Reports::of(&model, false);
        let json = serde_json::to_value(&reports).expect("json");
        assert_eq!(json["served"], false);
        assert_eq!(json["policies"][0]["scope"], "GLOBAL");
        assert_eq!(json["policies"][0]["action"], "DENY");
        assert_eq!(json["policies"][0]["accepted"]["status"], false);
        assert_eq!(json["policies"][0]["accepted"]["reason"], "UnenforceableHTTPRule");
        assert_eq!(json["routes"][0]["distributed"], false);
        assert_eq!(json["routes"][0]["parents"][0]["service"], "prod/web:80");
        assert_eq!(json["routes"][0]["parents"][0]["accepted"]["reason"], "UnsupportedValue");
    }
}
