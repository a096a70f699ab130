//! The mesh's inputs as Kubernetes objects, from either source, and their translation into the
//! mesh model.
//!
//! - [`crd`]: nodemesh's `AuthorizationPolicy` and Gateway API's `HTTPRoute` as Rust types.
//! - [`local`]: local mode's source, a directory of Kubernetes YAML (the same files work with
//!   `kubectl apply`).
//! - [`translate`]: objects → workloads (in the mesh or not), services, authorization policies
//!   and HTTP routes, pure. Policies and routes come out as the API's messages (what nodes
//!   receive), with whether each was accepted as written.
//!
//! A pod is enrolled when its namespace (or the pod itself) says
//! `nodemesh.io/dataplane-mode: ambient` and the pod does not opt out with `none`. In local mode
//! its netns path comes from the `nodemesh.io/netns` annotation. mesh-node enrols the pods
//! scheduled on its node; the CA issues a node only the identities of pods scheduled on it.

use std::{
    fmt,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};

pub mod crd;
pub mod local;
pub mod translate;

pub const DATAPLANE_MODE: &str = "nodemesh.io/dataplane-mode";
pub const NETNS_ANNOTATION: &str = "nodemesh.io/netns";
pub const MTLS_MODE: &str = "nodemesh.io/mtls-mode";

/// Whether an enrolled pod accepts plaintext from outside the mesh.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MtlsMode {
    /// Only mutual-TLS (HBONE) connections from the mesh; plaintext is refused.
    #[default]
    Strict,
    /// Mutual TLS from the mesh, and plaintext from elsewhere too (for migrations).
    Permissive,
}

impl MtlsMode {
    pub(crate) fn parse(value: &str) -> Option<Self> {
        match value.to_ascii_uppercase().as_str() {
            "STRICT" => Some(MtlsMode::Strict),
            "PERMISSIVE" => Some(MtlsMode::Permissive),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}{location}: {message}")]
    Yaml { path: PathBuf, location: Location, message: String },
    #[error("{path}{location}: {kind} {object}: {problem}")]
    Invalid { path: PathBuf, location: Location, kind: &'static str, object: String, problem: String },
    #[error("{object} is defined twice: in {first} and in {second}")]
    Duplicate { object: String, first: PathBuf, second: PathBuf },
}

/// Where in a file a YAML error is, if known.
#[derive(Debug, Default)]
pub struct Location(pub(crate) Option<(usize, usize)>);

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some((line, column)) => write!(f, ":{line}:{column}"),
            None => Ok(()),
        }
    }
}

/// Identifies a pod across reloads.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct PodKey {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for PodKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// An enrolled pod with an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnrolledPodSpec {
    pub key: PodKey,
    /// `spec.nodeName`.
    pub node: String,
    pub ip: Ipv4Addr,
    pub netns: PathBuf,
    pub service_account: String,
    pub mtls_mode: MtlsMode,
}

/// Everything discovery found, from either source.
#[derive(Clone, Debug, Default)]
pub struct ClusterObjects {
    pub namespaces: Vec<Namespace>,
    pub pods: Vec<Pod>,
    pub services: Vec<Service>,
    pub authorization_policies: Vec<crd::AuthorizationPolicy>,
    pub http_routes: Vec<crd::HttpRoute>,
}

/// Reads a YAML file, or every `*.yaml` / `*.yml` file of a directory, and returns the pods
/// enrolled on `node`.
pub fn load(path: &Path, node: &str) -> Result<Vec<EnrolledPodSpec>, ManifestError> {
    Ok(load_all(path)?.into_iter().filter(|p| p.node == node).collect())
}

/// Like [`load`], for every node.
pub fn load_all(path: &Path) -> Result<Vec<EnrolledPodSpec>, ManifestError> {
    Ok(enrolled(&load_model(path)?))
}

/// Reads and translates a local-mode directory; any object that does not translate is an
/// error naming its file and line, so a bad file changes nothing.
pub fn load_model(path: &Path) -> Result<translate::Model, ManifestError> {
    load_model_with(path, &translate::TranslateOptions::default())
}

/// Like [`load_model`], translated with `options`.
pub fn load_model_with(
    path: &Path,
    options: &translate::TranslateOptions,
) -> Result<translate::Model, ManifestError> {
    match translate_dir(path, options)? {
        (_, Some(err)) => Err(err),
        (model, None) => Ok(model),
    }
}

/// Reads and translates a local-mode directory, and returns the model with the error its first
/// problem makes (naming the object's file and line), if it has one: such a model is for
/// showing what was wrong (which policies were rejected, and why), never for serving.
pub fn translate_dir(
    path: &Path,
    options: &translate::TranslateOptions,
) -> Result<(translate::Model, Option<ManifestError>), ManifestError> {
    let local = local::read(path)?;
    let model = translate::translate(&local.objects, options);
    let error = model.problems.first().map(|problem| {
        let origin = local.origin(problem.kind, &problem.object);
        ManifestError::Invalid {
            path: origin.map_or_else(|| path.to_owned(), |o| o.file.clone()),
            location: Location(origin.map(|o| (o.line, 1))),
            kind: problem.kind,
            object: problem.object.clone(),
            problem: problem.message.clone(),
        }
    });
    Ok((model, error))
}

/// The enrolled pods of a model that have an address and netns (local mode; a pod being created
/// gets both from the CNI plugin on its node).
pub fn enrolled(model: &translate::Model) -> Vec<EnrolledPodSpec> {
    model
        .workloads
        .iter()
        .filter_map(|w| {
            let membership = w.membership.as_ref()?;
            Some(EnrolledPodSpec {
                key: w.key.clone(),
                node: w.node.clone(),
                ip: w.ip?,
                netns: membership.netns.clone()?,
                service_account: w.service_account.clone(),
                mtls_mode: membership.mtls_mode,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests;
