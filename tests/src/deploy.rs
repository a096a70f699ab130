//! The manifests in the workspace's `deploy/` directory, read and applied to a
//! [`KubeApiServer`](crate::KubeApiServer) as they are written, so tests exercise the very files
//! a cluster would get (`kubectl apply -f` equivalent: server-side apply, any kind).

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api, Client,
    api::{DynamicObject, GroupVersionKind, Patch, PatchParams},
    discovery::Scope,
};
use serde::de::DeserializeOwned;

/// The field manager the test bed's server-side applies use.
const FIELD_MANAGER: &str = "nodemesh-testbed";

/// Returns the workspace's `deploy/` directory.
pub fn deploy_dir() -> PathBuf {
    // This crate is `<workspace>/tests`.
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("deploy")
}

/// Reads every object of a (multi-document) YAML file, in order; empty documents are skipped.
pub fn read_objects(path: &Path) -> anyhow::Result<Vec<DynamicObject>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let documents: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(&text).with_context(|| format!("parsing {}", path.display()))?;
    documents
        .into_iter()
        .filter(|document| !document.is_null())
        .map(|document| {
            serde_json::from_value(document)
                .with_context(|| format!("{}: not a Kubernetes object", path.display()))
        })
        .collect()
}

/// Reads the objects of `kind` in a YAML file as their Rust type.
pub fn read_kind<K: DeserializeOwned>(path: &Path, kind: &str) -> anyhow::Result<Vec<K>> {
    read_objects(path)?
        .into_iter()
        .filter(|object| object.types.as_ref().is_some_and(|t| t.kind == kind))
        .map(|object| {
            let value = serde_json::to_value(&object)?;
            serde_json::from_value(value)
                .with_context(|| format!("{}: a {kind} that does not parse", path.display()))
        })
        .collect()
}

/// Creates or updates each object (server-side apply), finding its resource through the API
/// server's discovery, as `kubectl apply` does.
pub async fn apply(client: &Client, objects: &[DynamicObject]) -> anyhow::Result<()> {
    for object in objects {
        let types = object.types.as_ref().context("an object without apiVersion and kind")?;
        let name = object.metadata.name.as_deref().context("an object without a name")?;
        let gvk = GroupVersionKind::try_from(types).context("apiVersion")?;
        let (resource, capabilities) = kube::discovery::pinned_kind(client, &gvk)
            .await
            .with_context(|| format!("the API server does not serve {}/{}", types.api_version, types.kind))?;
        let api: Api<DynamicObject> = match (capabilities.scope, object.metadata.namespace.as_deref()) {
            (Scope::Cluster, _) => Api::all_with(client.clone(), &resource),
            (Scope::Namespaced, Some(namespace)) => {
                Api::namespaced_with(client.clone(), namespace, &resource)
            }
            (Scope::Namespaced, None) => bail!("{} {name} is namespaced but names no namespace", types.kind),
        };
        api.patch(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(object))
            .await
            .with_context(|| format!("applying {} {name}", types.kind))?;
    }
    Ok(())
}

/// Applies every YAML file in `deploy/<dir>` (sorted by name).
pub async fn apply_dir(client: &Client, dir: &str) -> anyhow::Result<()> {
    let dir = deploy_dir().join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|path| path.extension().is_some_and(|ext| ext == "yaml"));
    files.sort();
    for file in files {
        apply(client, &read_objects(&file)?).await.with_context(|| format!("applying {}", file.display()))?;
    }
    Ok(())
}

/// Kinds in `deploy/` that the test kube-apiserver (v1.20) does not serve, and why: applying a
/// kustomization skips these (and only these) when the server says it does not serve them.
pub const NOT_SERVED_BY_TEST_SERVER: [(&str, &str, &str); 1] = [(
    "policy/v1",
    "PodDisruptionBudget",
    "policy/v1 arrived in Kubernetes 1.21; policy/v1beta1 would do for 1.20 but is gone from 1.25 on, and the manifests target 1.30 and later",
)];

/// Returns the files a `deploy/<dir>/kustomization.yaml` lists, in order, failing when the
/// kustomization transforms the objects (then the files are not what the cluster gets).
pub fn kustomization_resources(dir: &str) -> anyhow::Result<Vec<PathBuf>> {
    let dir = deploy_dir().join(dir);
    let path = dir.join("kustomization.yaml");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let kustomization: serde_json::Value =
        serde_saphyr::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let fields = kustomization.as_object().context("a kustomization that is not a map")?;
    if let Some(other) = fields.keys().find(|k| !["apiVersion", "kind", "resources"].contains(&k.as_str())) {
        bail!("{}: `{other}` transforms the objects; teach deploy.rs to do the same", path.display());
    }
    let resources = fields.get("resources").and_then(|r| r.as_array()).context("no resources list")?;
    resources
        .iter()
        .map(|resource| Ok(dir.join(resource.as_str().context("a resource that is not a file name")?)))
        .collect()
}

/// Applies, in order, the `resources` a `deploy/<dir>/kustomization.yaml` lists: what
/// `kubectl apply -k` creates, as long as the kustomization transforms nothing (checked).
/// Objects of a kind in [`NOT_SERVED_BY_TEST_SERVER`] that the server does not serve are left
/// out and returned as `kind/name`; any other kind it does not serve is an error.
pub async fn apply_kustomization(client: &Client, dir: &str) -> anyhow::Result<Vec<String>> {
    let mut skipped = Vec::new();
    for file in kustomization_resources(dir)? {
        let mut objects = read_objects(&file)?;
        let mut kept = Vec::with_capacity(objects.len());
        for object in objects.drain(..) {
            let types = object.types.as_ref().context("an object without apiVersion and kind")?;
            let known_gap = NOT_SERVED_BY_TEST_SERVER
                .iter()
                .any(|(api_version, kind, _)| types.api_version == *api_version && types.kind == *kind);
            if known_gap {
                let gvk = GroupVersionKind::try_from(types).context("apiVersion")?;
                if kube::discovery::pinned_kind(client, &gvk).await.is_err() {
                    skipped.push(format!("{}/{}", types.kind, object.metadata.name.as_deref().unwrap_or("")));
                    continue;
                }
            }
            kept.push(object);
        }
        apply(client, &kept).await.with_context(|| format!("applying {}", file.display()))?;
    }
    Ok(skipped)
}

/// Waits until each named CRD is `Established` (its API is served), failing with the CRD's
/// conditions (why the API server refused it) after `timeout`.
pub async fn wait_established(client: &Client, names: &[&str], timeout: Duration) -> anyhow::Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let deadline = Instant::now() + timeout;
    for name in names {
        loop {
            let crd = api.get(name).await.with_context(|| format!("reading CRD {name}"))?;
            let conditions = crd.status.and_then(|s| s.conditions).unwrap_or_default();
            if conditions.iter().any(|c| c.type_ == "Established" && c.status == "True") {
                break;
            }
            if Instant::now() > deadline {
                bail!("CRD {name} not Established within {timeout:?}: {conditions:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}
