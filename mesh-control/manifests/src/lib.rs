//! Local mode: the mesh's pods, read from Kubernetes-shaped YAML.
//!
//! The same files work with `kubectl apply`: Namespace and Pod documents are read, every other
//! kind is ignored. A pod is enrolled when its namespace (or the pod itself) says
//! `nodemesh.io/dataplane-mode: ambient` and the pod does not opt out with `none`. Its netns path
//! comes from the `nodemesh.io/netns` annotation. mesh-node enrols the pods scheduled on its node;
//! the CA issues a node only the identities of pods scheduled on it.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

use serde::Deserialize;

pub mod crd;

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
    fn parse(value: &str) -> Option<Self> {
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
    #[error("{path}: {kind} {object}: {problem}")]
    Invalid { path: PathBuf, kind: &'static str, object: String, problem: String },
    #[error("pod {object} is defined twice: in {first} and in {second}")]
    Duplicate { object: String, first: PathBuf, second: PathBuf },
}

/// Where in a file a YAML error is, if known.
#[derive(Debug, Default)]
pub struct Location(Option<(usize, usize)>);

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some((line, column)) => write!(f, ":{line}:{column}"),
            None => Ok(()),
        }
    }
}

/// Identifies a pod across reloads.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
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

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    kind: Option<String>,
    #[serde(default)]
    metadata: Metadata,
    #[serde(default)]
    spec: PodSpecFields,
    #[serde(default)]
    status: PodStatusFields,
}

#[derive(Debug, Default, Deserialize)]
struct Metadata {
    name: Option<String>,
    namespace: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

impl Metadata {
    /// Returns the dataplane mode, annotation first, as Kubernetes mode reads it.
    fn dataplane_mode(&self) -> Option<&str> {
        self.setting(DATAPLANE_MODE)
    }

    /// Returns a nodemesh setting from the annotations, else the labels.
    fn setting(&self, key: &str) -> Option<&str> {
        self.annotations.get(key).or_else(|| self.labels.get(key)).map(String::as_str)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodSpecFields {
    node_name: Option<String>,
    service_account_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodStatusFields {
    #[serde(rename = "podIP")]
    pod_ip: Option<String>,
}

/// Reads a YAML file, or every `*.yaml` / `*.yml` file of a directory, and returns the pods
/// enrolled on `node`.
pub fn load(path: &Path, node: &str) -> Result<Vec<EnrolledPodSpec>, ManifestError> {
    Ok(load_all(path)?.into_iter().filter(|p| p.node == node).collect())
}

/// Like [`load`], for every node.
pub fn load_all(path: &Path) -> Result<Vec<EnrolledPodSpec>, ManifestError> {
    let files = yaml_files(path)?;
    let mut namespaces: HashMap<String, NamespaceSettings> = HashMap::new();
    let mut pods = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file)
            .map_err(|source| ManifestError::Read { path: file.clone(), source })?;
        for doc in parse_documents(file, &text)? {
            match doc.kind.as_deref() {
                Some("Namespace") => {
                    let name = required(file, "Namespace", &doc.metadata.name, "metadata.name", "?")?;
                    let mode = match doc.metadata.setting(MTLS_MODE) {
                        None => None,
                        Some(value) => {
                            Some(MtlsMode::parse(value).ok_or_else(|| ManifestError::Invalid {
                                path: file.clone(),
                                kind: "Namespace",
                                object: name.to_owned(),
                                problem: format!("{MTLS_MODE} must be STRICT or PERMISSIVE, not {value:?}"),
                            })?)
                        }
                    };
                    namespaces.insert(
                        name.to_owned(),
                        NamespaceSettings {
                            ambient: doc.metadata.dataplane_mode() == Some("ambient"),
                            mtls_mode: mode,
                        },
                    );
                }
                Some("Pod") => pods.push((file.clone(), doc)),
                _ => {}
            }
        }
    }
    select_enrolled(pods, &namespaces)
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

fn parse_documents(file: &Path, text: &str) -> Result<Vec<Document>, ManifestError> {
    let docs: Vec<Option<Document>> =
        serde_saphyr::from_multiple(text).map_err(|err| ManifestError::Yaml {
            path: file.to_owned(),
            location: Location(err.location().map(|l| (l.line() as usize, l.column() as usize))),
            message: first_line(&err.to_string()),
        })?;
    Ok(docs.into_iter().flatten().collect())
}

fn first_line(message: &str) -> String {
    message.lines().next().unwrap_or(message).to_owned()
}

fn required<'a>(
    file: &Path,
    kind: &'static str,
    value: &'a Option<String>,
    field: &str,
    object: &str,
) -> Result<&'a str, ManifestError> {
    match value.as_deref() {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(ManifestError::Invalid {
            path: file.to_owned(),
            kind,
            object: object.to_owned(),
            problem: format!("{field} is required"),
        }),
    }
}

/// What a Namespace document says about its pods.
#[derive(Debug, Clone, Copy)]
struct NamespaceSettings {
    ambient: bool,
    mtls_mode: Option<MtlsMode>,
}

fn select_enrolled(
    pods: Vec<(PathBuf, Document)>,
    namespaces: &HashMap<String, NamespaceSettings>,
) -> Result<Vec<EnrolledPodSpec>, ManifestError> {
    let mut seen: HashMap<PodKey, PathBuf> = HashMap::new();
    let mut enrolled = Vec::new();
    for (file, doc) in pods {
        let name = required(&file, "Pod", &doc.metadata.name, "metadata.name", "?")?;
        let namespace = doc.metadata.namespace.clone().unwrap_or_else(|| "default".to_owned());
        let key = PodKey { namespace, name: name.to_owned() };
        if let Some(first) = seen.insert(key.clone(), file.clone()) {
            return Err(ManifestError::Duplicate { object: key.to_string(), first, second: file });
        }
        let invalid = |problem: String| ManifestError::Invalid {
            path: file.clone(),
            kind: "Pod",
            object: key.to_string(),
            problem,
        };
        let opted_in = match doc.metadata.dataplane_mode() {
            Some("none") => false,
            Some("ambient") => true,
            Some(other) => {
                return Err(invalid(format!(
                    "{DATAPLANE_MODE} must be \"ambient\" or \"none\", not {other:?}"
                )));
            }
            None => namespaces.get(&key.namespace).is_some_and(|n| n.ambient),
        };
        let Some(node) = doc.spec.node_name.clone().filter(|n| !n.is_empty()) else {
            // Not scheduled yet.
            continue;
        };
        if !opted_in {
            continue;
        }
        let Some(ip) = doc.status.pod_ip.as_deref() else {
            // Not running yet: nothing to capture until it has an address.
            continue;
        };
        let ip = match ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => ip,
            Ok(IpAddr::V6(_)) => {
                return Err(invalid(format!("status.podIP {ip}: IPv6 pod addresses are not supported yet")));
            }
            Err(_) => return Err(invalid(format!("status.podIP {ip:?} is not an IP address"))),
        };
        let netns = doc.metadata.annotations.get(NETNS_ANNOTATION).ok_or_else(|| {
            invalid(format!("annotation {NETNS_ANNOTATION} (path of the pod's network namespace) is required in local mode"))
        })?;
        if !netns.starts_with('/') {
            return Err(invalid(format!(
                "annotation {NETNS_ANNOTATION} must be an absolute path, not {netns:?}"
            )));
        }
        let mtls_mode = match doc.metadata.setting(MTLS_MODE) {
            Some(value) => MtlsMode::parse(value)
                .ok_or_else(|| invalid(format!("{MTLS_MODE} must be STRICT or PERMISSIVE, not {value:?}")))?,
            None => namespaces.get(&key.namespace).and_then(|n| n.mtls_mode).unwrap_or_default(),
        };
        enrolled.push(EnrolledPodSpec {
            mtls_mode,
            key,
            node,
            ip,
            netns: PathBuf::from(netns),
            service_account: doc.spec.service_account_name.clone().unwrap_or_else(|| "default".to_owned()),
        });
    }
    enrolled.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(enrolled)
}

#[cfg(test)]
mod tests;
