//! The local-mode pod manifests the test bed writes for each node (the format mesh-node and
//! mesh-control read with `--pods` / `--config-dir`).

use std::{fmt::Write as _, net::Ipv4Addr, path::Path};

/// The namespace every test pod lives in; it is labelled ambient, so its pods are enrolled unless
/// they opt out.
pub const NAMESPACE: &str = "demo";

/// One pod as it is written into a node's manifest file.
#[derive(Clone, Debug)]
pub struct PodEntry<'a> {
    /// `metadata.name`; also the service account.
    pub name: &'a str,
    /// `status.podIP`.
    pub ip: Ipv4Addr,
    /// The pod's netns path (annotation `nodemesh.io/netns`).
    pub netns: &'a Path,
    /// Whether the pod is in the mesh; `false` writes the opt-out annotation
    /// `nodemesh.io/dataplane-mode: none`, so the pod is listed but not enrolled.
    pub enrolled: bool,
    /// Extra annotations (`key`, `value`).
    pub annotations: &'a [(String, String)],
    /// Labels (`key`, `value`), which Services and policies select pods by.
    pub labels: &'a [(String, String)],
}

/// Returns the YAML for one node: the ambient `demo` Namespace, then a Pod document per pod.
pub fn render<'a>(node: &str, pods: impl IntoIterator<Item = PodEntry<'a>>) -> String {
    let mut yaml = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NAMESPACE}\n  labels:\n    nodemesh.io/dataplane-mode: ambient\n"
    );
    for pod in pods {
        let _ = write!(
            yaml,
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {NAMESPACE}\n",
            name = pod.name,
        );
        if !pod.labels.is_empty() {
            yaml.push_str("  labels:\n");
            for (key, value) in pod.labels {
                // Quoted: label values are strings even when they look like numbers (`"1"`).
                let _ = writeln!(yaml, "    {key}: {}", serde_json::Value::from(value.as_str()));
            }
        }
        let _ = writeln!(yaml, "  annotations:\n    nodemesh.io/netns: {}", pod.netns.display());
        if !pod.enrolled {
            yaml.push_str("    nodemesh.io/dataplane-mode: none\n");
        }
        for (key, value) in pod.annotations {
            let _ = writeln!(yaml, "    {key}: {value}");
        }
        let _ = write!(
            yaml,
            "spec:\n  nodeName: {node}\n  serviceAccountName: {name}\nstatus:\n  podIP: {ip}\n",
            name = pod.name,
            ip = pod.ip,
        );
    }
    yaml
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, path::Path};

    use super::{PodEntry, render};

    /// The rendered file means to mesh-node what the test bed intends: enrolled pods in, opted-out
    /// pods out, addresses, netns paths, service accounts, annotations and labels as written.
    #[test]
    fn rendered_manifests_enrol_exactly_the_enrolled_pods() {
        let mtls = vec![("nodemesh.io/mtls-mode".to_owned(), "PERMISSIVE".to_owned())];
        let labels = vec![("app".to_owned(), "web".to_owned()), ("canary".to_owned(), "1".to_owned())];
        let yaml = render(
            "node-a",
            [
                PodEntry {
                    name: "a1",
                    ip: Ipv4Addr::new(10, 1, 1, 2),
                    netns: Path::new("/run/netns/nmt-x-a1"),
                    enrolled: true,
                    annotations: &mtls,
                    labels: &labels,
                },
                PodEntry {
                    name: "a3",
                    ip: Ipv4Addr::new(10, 1, 1, 4),
                    netns: Path::new("/run/netns/nmt-x-a3"),
                    enrolled: false,
                    annotations: &[],
                    labels: &[],
                },
            ],
        );
        let dir = std::env::temp_dir().join(format!("nmt-manifest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("node-a-pods.yaml");
        std::fs::write(&file, &yaml).unwrap();
        let loaded = mesh_manifests::load(&file, "node-a");
        let elsewhere = mesh_manifests::load(&file, "node-b");
        // The labels are what a Service selects by (a numeric-looking value stays a string).
        std::fs::write(
            dir.join("web.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: demo\nspec:\n  selector:\n    app: web\n    canary: \"1\"\n  ports:\n  - port: 80\n",
        )
        .unwrap();
        let model = mesh_manifests::load_model(&dir);
        std::fs::remove_dir_all(&dir).unwrap();

        let pods = loaded.unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        assert_eq!(pods.len(), 1, "only a1 is enrolled: {pods:?}");
        let a1 = &pods[0];
        assert_eq!((a1.key.namespace.as_str(), a1.key.name.as_str()), ("demo", "a1"));
        assert_eq!(a1.ip, Ipv4Addr::new(10, 1, 1, 2));
        assert_eq!(a1.netns, Path::new("/run/netns/nmt-x-a1"));
        assert_eq!(a1.service_account, "a1");
        assert_eq!(a1.mtls_mode, mesh_manifests::MtlsMode::Permissive);
        assert!(elsewhere.unwrap().is_empty(), "pods of node-a are not node-b's");
        let model = model.unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        let selected: Vec<&str> = model
            .workloads
            .iter()
            .filter(|w| w.services.contains_key("demo/web.demo.svc.cluster.local"))
            .map(|w| w.key.name.as_str())
            .collect();
        assert_eq!(selected, ["a1"], "the Service selects a1 by its labels");
    }
}
