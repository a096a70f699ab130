//! Node authentication in Kubernetes mode: a node agent presents its projected service-account
//! token, bound to its own pod. mesh-control asks the API server to review it (TokenReview),
//! checks it belongs to the node agent's service account, and reads which node the bound pod
//! runs on: a node can only speak for itself, and a token copied to another node does not help.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::Pod,
};
use kube::api::{Api, PostParams};

/// A successful review is trusted this long before the API server is asked again.
const CACHE_FOR: Duration = Duration::from_secs(60);
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";

pub struct KubernetesNodeAuth {
    client: kube::Client,
    namespace: String,
    service_account: String,
    /// SHA-256 of the token → (node, when reviewed).
    reviewed: Mutex<HashMap<String, (String, Instant)>>,
}

impl std::fmt::Debug for KubernetesNodeAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesNodeAuth")
            .field("service_account", &format!("{}/{}", self.namespace, self.service_account))
            .finish_non_exhaustive()
    }
}

impl KubernetesNodeAuth {
    /// `service_account` is `namespace/name`, the node agent's (e.g. `nodemesh-system/mesh-node`).
    pub fn new(client: kube::Client, service_account: &str) -> Result<Self, String> {
        let (namespace, name) = service_account
            .split_once('/')
            .filter(|(ns, name)| !ns.is_empty() && !name.is_empty())
            .ok_or_else(|| format!("node service account {service_account:?} is not namespace/name"))?;
        Ok(KubernetesNodeAuth {
            client,
            namespace: namespace.to_owned(),
            service_account: name.to_owned(),
            reviewed: Mutex::new(HashMap::new()),
        })
    }

    /// Returns `Ok` when `token` proves the caller is the node agent running on `node`.
    pub async fn authenticate(&self, node: &str, token: &str) -> Result<(), String> {
        let key = mesh_api::fingerprint(token.as_bytes());
        if let Some((reviewed_node, at)) = self.cached(&key)
            && at.elapsed() < CACHE_FOR
        {
            return check_node(&reviewed_node, node);
        }
        let actual = self.review(token).await?;
        self.reviewed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key, (actual.clone(), Instant::now()));
        check_node(&actual, node)
    }

    fn cached(&self, key: &str) -> Option<(String, Instant)> {
        self.reviewed.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(key).cloned()
    }

    /// Reviews the token and returns the node its bound pod runs on.
    async fn review(&self, token: &str) -> Result<String, String> {
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(token.to_owned()), audiences: None },
            ..Default::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| format!("cannot review the token with the Kubernetes API: {e}"))?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(format!(
                "the Kubernetes API rejected the token: {}",
                status.error.unwrap_or_else(|| "not authenticated".into())
            ));
        }
        let user = status.user.unwrap_or_default();
        let expected = format!("system:serviceaccount:{}:{}", self.namespace, self.service_account);
        let username = user.username.unwrap_or_default();
        if username != expected {
            return Err(format!(
                "the token belongs to {username}, not the node agent's service account {expected}"
            ));
        }
        let extra = user.extra.unwrap_or_default();
        let first = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
        let pod_name = first(POD_NAME)
            .ok_or("the token is not bound to a pod (mount a projected service-account token)")?;
        let pod = Api::<Pod>::namespaced(self.client.clone(), &self.namespace)
            .get(&pod_name)
            .await
            .map_err(|e| format!("cannot read the token's pod {}/{pod_name}: {e}", self.namespace))?;
        if first(POD_UID).is_some_and(|uid| pod.metadata.uid.as_deref() != Some(uid.as_str())) {
            return Err(format!("the token's pod {pod_name} was replaced; the token is stale"));
        }
        pod.spec
            .and_then(|s| s.node_name)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| format!("the token's pod {pod_name} is not scheduled on a node"))
    }
}

fn check_node(actual: &str, claimed: &str) -> Result<(), String> {
    if actual == claimed {
        Ok(())
    } else {
        Err(format!("the token is bound to a node agent on {actual}, not on {claimed}"))
    }
}
