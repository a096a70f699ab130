//! Kubernetes mode: writes how each AuthorizationPolicy and HTTPRoute was taken into its
//! status subresource, only when that changed.
//!
//! - AuthorizationPolicy: `status.conditions`, one `Accepted` condition (`True`, or `False`
//!   with reason `UnenforceableHTTPRule` or `Invalid` and the findings as message).
//! - HTTPRoute: one `status.parents[]` entry per Service parent, with `controllerName`
//!   `nodemesh.io/mesh-control` and conditions `Accepted` and `ResolvedRefs`; entries of other
//!   controllers are kept.
//!
//! What the status should be is decided by pure functions ([`policy_status`], [`route_status`])
//! that keep a condition's `lastTransitionTime` while its status stays the same, so writing
//! the same outcome twice is recognized as no change. Writes are JSON merge patches of the
//! status subresource, conditional on the resourceVersion they were computed from (RBAC:
//! `patch` on `authorizationpolicies/status` and `httproutes/status`).

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client, ResourceExt as _,
    api::{Patch, PatchParams},
};
use mesh_manifests::{
    crd::{AuthorizationPolicy, HttpRoute, PolicyStatus, RouteParentStatus, RouteStatus},
    translate::{Acceptance, AuthorizationSpec, RouteSpec, routes::CONTROLLER_NAME},
};
use serde::Serialize;
use tokio::sync::watch;

/// How long to wait before writing again what could not be written.
pub const RETRY: Duration = Duration::from_secs(5);

/// What the status writer works from: the objects as discovered (with their current status)
/// and how the last translation took them.
#[derive(Debug, Default)]
pub struct StatusInput {
    pub policies: Vec<AuthorizationPolicy>,
    pub routes: Vec<HttpRoute>,
    pub authorizations: Vec<AuthorizationSpec>,
    pub route_specs: Vec<RouteSpec>,
}

/// Returns `current` with its `Accepted` condition set from `spec`, or `None` when it says
/// that already. Other conditions are kept.
pub fn policy_status(
    current: Option<&PolicyStatus>,
    spec: &AuthorizationSpec,
    now: &Time,
) -> Option<PolicyStatus> {
    let existing = current.map(|s| s.conditions.as_slice()).unwrap_or_default();
    let accepted = condition(existing, "Accepted", &spec.acceptance, spec.generation, now);
    let mut conditions: Vec<Condition> = existing.iter().filter(|c| c.type_ != "Accepted").cloned().collect();
    conditions.push(accepted);
    let desired = PolicyStatus { conditions };
    (current != Some(&desired)).then_some(desired)
}

/// Returns `current` with nodemesh's parent entries set from `spec` (one per Service parent;
/// other controllers' entries kept), or `None` when it says that already.
pub fn route_status(current: Option<&RouteStatus>, spec: &RouteSpec, now: &Time) -> Option<RouteStatus> {
    let existing = current.map(|s| s.parents.as_slice()).unwrap_or_default();
    let mut parents: Vec<RouteParentStatus> =
        existing.iter().filter(|p| p.controller_name != CONTROLLER_NAME).cloned().collect();
    for parent in &spec.parents {
        let before = existing
            .iter()
            .find(|p| p.controller_name == CONTROLLER_NAME && p.parent_ref == parent.parent_ref)
            .map(|p| p.conditions.as_slice())
            .unwrap_or_default();
        parents.push(RouteParentStatus {
            parent_ref: parent.parent_ref.clone(),
            controller_name: CONTROLLER_NAME.to_owned(),
            conditions: vec![
                condition(before, "Accepted", &parent.accepted, spec.generation, now),
                condition(before, "ResolvedRefs", &parent.resolved_refs, spec.generation, now),
            ],
        });
    }
    let desired = RouteStatus { parents };
    (current != Some(&desired)).then_some(desired)
}

/// A condition of `type_` saying `outcome`; its transition time is the existing one's while
/// the status stays the same.
fn condition(
    existing: &[Condition],
    type_: &str,
    outcome: &Acceptance,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let status = if outcome.status { "True" } else { "False" };
    let since = existing
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: outcome.reason.clone(),
        message: outcome.message.clone(),
        observed_generation: generation,
        last_transition_time: since,
    }
}

/// Returns the current time as the API stores it (whole seconds).
fn now() -> Time {
    Time(Timestamp::from_second(Timestamp::now().as_second()).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// Writes status for each new input until the sender is dropped; retries failed writes every
/// [`RETRY`].
pub async fn run(client: Client, mut inputs: watch::Receiver<Arc<StatusInput>>) {
    let mut writer = Writer { client, written: HashSet::new() };
    let mut failed = false;
    loop {
        if failed {
            tokio::select! {
                changed = inputs.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(RETRY) => {}
            }
        } else if inputs.changed().await.is_err() {
            return;
        }
        let input = inputs.borrow_and_update().clone();
        failed = !writer.write(&input).await;
    }
}

/// One object's kind, namespace, name and the resourceVersion a write was computed from.
type Written = (String, String, String, String);

struct Writer {
    client: Client,
    /// Writes made from each object's resourceVersion: the same version seen again (before
    /// the watch delivers the written status) needs no second write.
    written: HashSet<Written>,
}

impl Writer {
    /// Brings every status up to date; returns whether every write succeeded.
    async fn write(&mut self, input: &StatusInput) -> bool {
        let now = now();
        let mut ok = true;
        let specs: HashMap<(&str, &str), &AuthorizationSpec> = input
            .authorizations
            .iter()
            .map(|s| ((s.authorization.namespace.as_str(), s.authorization.name.as_str()), s))
            .collect();
        for policy in &input.policies {
            let key = (policy.namespace().unwrap_or_default(), policy.name_any());
            let Some(spec) = specs.get(&(key.0.as_str(), key.1.as_str())) else { continue };
            if let Some(status) = policy_status(policy.status.as_ref(), spec, &now) {
                ok &= self.patch(policy, "conditions", &status.conditions).await;
            }
        }
        let specs: HashMap<(&str, &str), &RouteSpec> =
            input.route_specs.iter().map(|s| ((s.namespace.as_str(), s.name.as_str()), s)).collect();
        for route in &input.routes {
            let key = (route.namespace().unwrap_or_default(), route.name_any());
            let Some(spec) = specs.get(&(key.0.as_str(), key.1.as_str())) else { continue };
            if let Some(status) = route_status(route.status.as_ref(), spec, &now) {
                ok &= self.patch(route, "parents", &status.parents).await;
            }
        }
        // Forget versions no longer current.
        let current: HashSet<Written> =
            input.policies.iter().map(written).chain(input.routes.iter().map(written)).collect();
        self.written.retain(|w| current.contains(w));
        ok
    }

    /// Sets `status.<field>` of `object`, conditional on the resourceVersion it was read at.
    async fn patch<K, V>(&mut self, object: &K, field: &str, value: &V) -> bool
    where
        K: kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
            + Clone
            + std::fmt::Debug
            + serde::de::DeserializeOwned,
        V: Serialize,
    {
        let identity = written(object);
        if self.written.contains(&identity) {
            return true;
        }
        let (kind, namespace, name, version) = &identity;
        let api: Api<K> = Api::namespaced(self.client.clone(), namespace);
        let patch = serde_json::json!({
            "metadata": {"resourceVersion": version},
            "status": {field: value},
        });
        match api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => {
                tracing::info!(kind = kind.as_str(), object = %format!("{namespace}/{name}"), "status written");
                self.written.insert(identity);
                true
            }
            // Changed since it was read: its new version is on its way through the watch.
            Err(kube::Error::Api(status)) if status.code == 409 => {
                tracing::debug!(kind = kind.as_str(), object = %format!("{namespace}/{name}"), "status write conflicted; will retry from the newer object");
                true
            }
            // Deleted meanwhile: nothing to write.
            Err(kube::Error::Api(status)) if status.code == 404 => true,
            Err(err) => {
                let error = match &err {
                    kube::Error::Api(status) => format!("{} ({})", status.message, status.code),
                    other => other.to_string(),
                };
                tracing::warn!(kind = kind.as_str(), object = %format!("{namespace}/{name}"), error = %error, "status write failed; retrying");
                false
            }
        }
    }
}

fn written<K: kube::Resource<DynamicType = ()>>(object: &K) -> Written {
    let meta = object.meta();
    (
        K::kind(&()).into_owned(),
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
        meta.resource_version.clone().unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests;
