//! Local mode's source: a YAML file or a directory of `*.yaml` / `*.yml` files holding the same
//! Kubernetes objects the cluster would (the files work with `kubectl apply`). Each object is
//! read into the Kubernetes types the Kubernetes source uses, so one translation serves both.
//! Errors name the file, the line and the field.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use serde::de::DeserializeOwned;

use crate::{
    ClusterObjects, Location, ManifestError,
    crd::{AuthorizationPolicy, HttpRoute},
};

/// Where an object was read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    /// Line of the document's first line.
    pub line: usize,
}

/// The objects of a directory, with where each came from (for error messages).
#[derive(Debug, Default)]
pub struct LocalObjects {
    pub objects: ClusterObjects,
    origins: HashMap<(String, String), Origin>,
    /// Each object as read, to tell a harmless repetition from a conflict.
    documents: HashMap<(String, String), serde_json::Value>,
}

impl LocalObjects {
    /// Where the object `kind` `namespace/name` (or `name` for cluster-scoped kinds) came from.
    pub fn origin(&self, kind: &str, object: &str) -> Option<&Origin> {
        self.origins.get(&(kind.to_owned(), object.to_owned()))
    }
}

/// Reads every object of a file or directory.
pub fn read(path: &Path) -> Result<LocalObjects, ManifestError> {
    let mut local = LocalObjects::default();
    for file in yaml_files(path)? {
        let text = std::fs::read_to_string(&file)
            .map_err(|source| ManifestError::Read { path: file.clone(), source })?;
        for (line, document) in documents(&text) {
            read_document(&mut local, &file, line, document)?;
        }
    }
    Ok(local)
}

/// Each file with its inode, size and modification time (seconds, nanoseconds).
pub type Fingerprint = Vec<(PathBuf, u64, u64, i64, i64)>;

/// What a file or directory of manifests looks like without reading it: each file with its
/// inode, size and modification time. Equal fingerprints mean nothing to re-read, so an idle
/// control plane does not parse thousands of objects on every poll.
pub fn fingerprint(path: &Path) -> Result<Fingerprint, ManifestError> {
    use std::os::unix::fs::MetadataExt as _;
    yaml_files(path)?
        .into_iter()
        .map(|file| {
            let meta = std::fs::metadata(&file)
                .map_err(|source| ManifestError::Read { path: file.clone(), source })?;
            Ok((file, meta.ino(), meta.size(), meta.mtime(), meta.mtime_nsec()))
        })
        .collect()
}

fn yaml_files(path: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let read_err = |source| ManifestError::Read { path: path.to_owned(), source };
    if !path.is_dir() {
        std::fs::metadata(path).map_err(read_err)?;
        return Ok(vec![path.to_owned()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(read_err)? {
        let file = entry.map_err(read_err)?.path();
        if matches!(file.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            files.push(file);
        }
    }
    files.sort();
    Ok(files)
}

/// Splits a multi-document YAML text at `---` lines; yields (first line number, text).
fn documents(text: &str) -> Vec<(usize, &str)> {
    let mut documents = Vec::new();
    let (mut start, mut start_line) = (0, 1);
    let mut offset = 0;
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let content = line.trim_end();
        if content == "---" || content.starts_with("--- ") {
            documents.push((start_line, &text[start..offset]));
            start = offset + line.len();
            start_line = index + 2;
        }
        offset += line.len();
    }
    documents.push((start_line, &text[start..]));
    documents
}

fn read_document(
    local: &mut LocalObjects,
    file: &Path,
    line: usize,
    text: &str,
) -> Result<(), ManifestError> {
    let value: Option<serde_json::Value> =
        serde_saphyr::from_str(text).map_err(|err| ManifestError::Yaml {
            path: file.to_owned(),
            location: Location(err.location().map(|l| (line + l.line() as usize - 1, l.column() as usize))),
            message: err.to_string().lines().next().unwrap_or_default().to_owned(),
        })?;
    let Some(mut value) = value.filter(|v| !v.is_null()) else { return Ok(()) };
    let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or_default().to_owned();
    let api_version = value.get("apiVersion").and_then(|k| k.as_str()).map(str::to_owned);
    let origin = Origin { file: file.to_owned(), line };
    let name = value.pointer("/metadata/name").and_then(|n| n.as_str()).unwrap_or_default().to_owned();
    let namespace = value.pointer("/metadata/namespace").and_then(|n| n.as_str()).unwrap_or("default");
    let described =
        if kind == "Namespace" || name.is_empty() { name.clone() } else { format!("{namespace}/{name}") };
    let at = |object: &str, problem: String| ManifestError::Invalid {
        path: file.to_owned(),
        location: Location(Some((line, 1))),
        kind: kind_name(&kind),
        object: if object.is_empty() { "?".to_owned() } else { object.to_owned() },
        problem,
    };
    let expected = match kind.as_str() {
        "Namespace" | "Pod" | "Service" => "v1",
        "AuthorizationPolicy" => "nodemesh.io/v1alpha1",
        "HTTPRoute" => "gateway.networking.k8s.io/v1",
        // ServiceAccounts, Deployments, …: not what the mesh reads.
        _ => return Ok(()),
    };
    if let Some(version) = &api_version
        && version != expected
    {
        return Err(at(
            &described,
            format!("apiVersion {version} is not one nodemesh reads (expected {expected})"),
        ));
    }
    if name.is_empty() {
        return Err(at(&name, "metadata.name is required".into()));
    }
    let key = if kind == "Namespace" {
        name
    } else {
        let metadata = value.get_mut("metadata").and_then(|m| m.as_object_mut());
        let metadata = metadata.ok_or_else(|| at(&name, "metadata must be a mapping".into()))?;
        let namespace = metadata
            .entry("namespace")
            .or_insert_with(|| serde_json::Value::String("default".into()))
            .as_str()
            .unwrap_or("default")
            .to_owned();
        format!("{namespace}/{name}")
    };
    if let Some(first) = local.origins.get(&(kind.clone(), key.clone())) {
        // The same object in two files (each node's manifests may carry the shared Namespace)
        // is what `kubectl apply` of both would make; two different ones are a mistake.
        if local.documents.get(&(kind.clone(), key.clone())) == Some(&value) {
            return Ok(());
        }
        return Err(ManifestError::Duplicate {
            object: format!("{kind} {key}"),
            first: first.file.clone(),
            second: file.to_owned(),
        });
    }
    local.documents.insert((kind.clone(), key.clone()), value.clone());
    let invalid = |problem| at(&key, problem);
    let objects = &mut local.objects;
    match kind.as_str() {
        "Namespace" => objects.namespaces.push(typed::<Namespace>(value).map_err(invalid)?),
        "Pod" => objects.pods.push(typed::<Pod>(value).map_err(invalid)?),
        "Service" => objects.services.push(typed::<Service>(value).map_err(invalid)?),
        "AuthorizationPolicy" => {
            objects.authorization_policies.push(typed::<AuthorizationPolicy>(value).map_err(invalid)?)
        }
        _ => objects.http_routes.push(typed::<HttpRoute>(value).map_err(invalid)?),
    }
    local.origins.insert((kind, key), origin);
    Ok(())
}

/// Reads a JSON value into a Kubernetes type; errors name the field (`spec.ports[0].port: …`).
fn typed<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|err| {
        let path = err.path().to_string();
        if path == "." { err.into_inner().to_string() } else { format!("{path}: {}", err.into_inner()) }
    })
}

fn kind_name(kind: &str) -> &'static str {
    match kind {
        "Namespace" => "Namespace",
        "Pod" => "Pod",
        "Service" => "Service",
        "AuthorizationPolicy" => "AuthorizationPolicy",
        "HTTPRoute" => "HTTPRoute",
        _ => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_split_at_separator_lines_with_their_first_line() {
        let text = "a: 1\n---\nb: 2\nc: 3\n--- # comment\nd: 4\n";
        let docs = documents(text);
        assert_eq!(docs, [(1, "a: 1\n"), (3, "b: 2\nc: 3\n"), (6, "d: 4\n")]);
        assert_eq!(documents("---\nx: 1\n"), [(1, ""), (2, "x: 1\n")]);
    }
}
