//! The CRD manifests in `deploy/crds/`, rendered from the Rust types: `cargo xtask gen-crds`
//! writes them and a test fails when the checked-in files differ, so the schema Kubernetes
//! validates against is always the one the code deserializes.

use kube::CustomResourceExt;

use super::{AuthorizationPolicy, HttpRoute};

/// The command that rewrites the files, named in every header and staleness message.
pub const GENERATE_COMMAND: &str = "cargo xtask gen-crds";

/// One generated CRD file: its name in `deploy/crds/` and its contents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CrdFile {
    pub file_name: String,
    pub yaml: String,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot render the {crd} CRD as YAML: {source}")]
pub struct RenderError {
    crd: String,
    source: serde_saphyr::ser::Error,
}

/// Said at the top of the HTTPRoute CRD: applying it over Gateway API's own CRD would replace
/// the full schema with this subset, and the API server would then prune every field outside it.
const HTTP_ROUTE_NOTE: &str = "\
# This is the subset of Gateway API's HTTPRoute that nodemesh reads, for tests and for clusters
# without Gateway API. Where Gateway API is installed, keep its CRD (standard channel, v1.0 or
# later) and do not apply this one: it would replace the full schema, and fields outside the
# subset would be pruned from stored routes.
";

/// Returns every CRD nodemesh reads, rendered as YAML with a header saying where it comes from,
/// named `<plural>.<group>.yaml` (the CRD's own name).
pub fn crd_files() -> Result<Vec<CrdFile>, RenderError> {
    [(AuthorizationPolicy::crd(), ""), (HttpRoute::crd(), HTTP_ROUTE_NOTE)]
        .into_iter()
        .map(|(crd, note)| {
            let name = crd.metadata.name.clone().unwrap_or_default();
            let body =
                serde_saphyr::to_string(&crd).map_err(|source| RenderError { crd: name.clone(), source })?;
            let header = format!(
                "# Generated from mesh-control/manifests/src/crd.rs by `{GENERATE_COMMAND}`: do not edit.\n"
            );
            Ok(CrdFile { file_name: format!("{name}.yaml"), yaml: format!("{header}{note}---\n{body}") })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

    use super::*;

    #[test]
    fn the_yaml_reads_back_as_the_same_crd() {
        let files = crd_files().unwrap();
        let names: Vec<&str> = files.iter().map(|f| f.file_name.as_str()).collect();
        assert_eq!(
            names,
            ["authorizationpolicies.nodemesh.io.yaml", "httproutes.gateway.networking.k8s.io.yaml"]
        );
        for (file, expected) in files.iter().zip([AuthorizationPolicy::crd(), HttpRoute::crd()]) {
            let read: CustomResourceDefinition = serde_saphyr::from_str(&file.yaml).unwrap();
            assert_eq!(read, expected, "{}", file.file_name);
        }
        assert!(files[1].yaml.contains("do not apply this one"));
    }
}
