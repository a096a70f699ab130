//! What the node should enrol: the mesh's workloads (from mesh-control or the manifests) joined
//! with what the CNI plugin reported about pods being created on this node.
//!
//! In Kubernetes a pod's address and network namespace exist on its node before the API knows
//! them: the CNI plugin reports both at creation, so the pod is captured before its app starts.
//! In local mode the manifests carry both (`status.podIP`, `nodemesh.io/netns`).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::PathBuf,
};

use mesh_manifests::{EnrolledPodSpec, MtlsMode, PodKey};
use serde::{Deserialize, Serialize};

/// A meshed workload as the node holds it; address and netns may still be unknown.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshWorkload {
    pub key: PodKey,
    pub node: String,
    pub ip: Option<Ipv4Addr>,
    pub netns: Option<PathBuf>,
    pub service_account: String,
    pub mtls_mode: MtlsMode,
}

impl From<EnrolledPodSpec> for MeshWorkload {
    fn from(spec: EnrolledPodSpec) -> Self {
        MeshWorkload {
            key: spec.key,
            node: spec.node,
            ip: Some(spec.ip),
            netns: Some(spec.netns),
            service_account: spec.service_account,
            mtls_mode: spec.mtls_mode,
        }
    }
}

/// The whole mesh as the source describes it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MeshView {
    /// Meshed workloads of every node.
    pub workloads: Vec<MeshWorkload>,
    /// Pods known and deliberately outside the mesh (opted out, or namespace not ambient).
    pub outside: BTreeSet<PodKey>,
    /// Namespaces in ambient mode; `None` when the source does not say (standalone manifests).
    pub ambient_namespaces: Option<BTreeSet<String>>,
    /// Services, endpoints, policies and routes (none from standalone manifests).
    pub traffic: crate::traffic::TrafficSpec,
}

impl MeshView {
    pub fn from_manifests(pods: Vec<EnrolledPodSpec>) -> Self {
        MeshView { workloads: pods.into_iter().map(MeshWorkload::from).collect(), ..Default::default() }
    }
}

/// What the CNI plugin reported for a pod sandbox on this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniBinding {
    /// The sandbox's container ID: a DEL for an older sandbox of the same pod name is ignored.
    pub container_id: String,
    pub netns: PathBuf,
    pub ip: Ipv4Addr,
}

/// Pods on this node that should be enrolled, and the meshed ones still waiting for the CNI
/// plugin (no address or netns known yet).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    /// Every meshed workload with an address, this node's pods with their CNI address: the
    /// view for outbound decisions.
    pub mesh: Vec<(PodKey, Ipv4Addr, String)>,
    pub mine: Vec<EnrolledPodSpec>,
    pub awaiting_cni: Vec<PodKey>,
}

/// Joins the view with the CNI bindings. A binding wins over the source: it is what the pod
/// actually has on this node (the source may lag behind a re-created pod).
pub fn resolve(view: &MeshView, bindings: &BTreeMap<PodKey, CniBinding>, node: &str) -> Resolved {
    let mut resolved = Resolved::default();
    for workload in &view.workloads {
        let binding = (workload.node == node).then(|| bindings.get(&workload.key)).flatten();
        let ip = binding.map(|b| b.ip).or(workload.ip);
        if let (Some(binding), Some(reported)) = (binding, workload.ip)
            && binding.ip != reported
        {
            tracing::warn!(
                pod = %workload.key, cni = %binding.ip, source = %reported,
                "the pod's address from the CNI plugin differs from mesh-control's; using the CNI one"
            );
        }
        if let Some(ip) = ip {
            resolved.mesh.push((workload.key.clone(), ip, workload.service_account.clone()));
        }
        if workload.node != node {
            continue;
        }
        let netns = binding.map(|b| b.netns.clone()).or_else(|| workload.netns.clone());
        match (ip, netns) {
            (Some(ip), Some(netns)) => resolved.mine.push(EnrolledPodSpec {
                key: workload.key.clone(),
                node: workload.node.clone(),
                ip,
                netns,
                service_account: workload.service_account.clone(),
                mtls_mode: workload.mtls_mode,
            }),
            _ => resolved.awaiting_cni.push(workload.key.clone()),
        }
    }
    resolved
}

/// What the CNI plugin should do with a pod being created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CniDecision {
    /// Captured: the app may start.
    Enrolled,
    /// Not in the mesh: start it as it is.
    Outside,
    /// Not decided yet (the reason is the error if it stays so).
    Waiting(String),
    /// Cannot be captured: pod creation fails (and the kubelet retries).
    Failed(String),
}

/// Decides for `key` from the view (`None`: no config yet), whether it is enrolled, and why it
/// failed to enrol if it did.
pub fn cni_decision(
    view: Option<&MeshView>,
    key: &PodKey,
    node: &str,
    enrolled: bool,
    failure: Option<&str>,
) -> CniDecision {
    if enrolled {
        return CniDecision::Enrolled;
    }
    if let Some(failure) = failure {
        return CniDecision::Failed(format!("cannot capture pod {key}: {failure}"));
    }
    let Some(view) = view else {
        return CniDecision::Waiting(
            "this node has no mesh configuration yet (mesh-control not reached since mesh-node started)"
                .into(),
        );
    };
    if let Some(workload) = view.workloads.iter().find(|w| w.key == *key) {
        if workload.node != node {
            return CniDecision::Failed(format!(
                "mesh-control places pod {key} on node {}, not on {node}",
                workload.node
            ));
        }
        return CniDecision::Waiting(format!("pod {key} is being enrolled"));
    }
    if view.outside.contains(key) {
        return CniDecision::Outside;
    }
    if view.ambient_namespaces.as_ref().is_some_and(|n| n.contains(&key.namespace)) {
        return CniDecision::Waiting(format!(
            "namespace {} is ambient but mesh-control has not sent pod {key} yet",
            key.namespace
        ));
    }
    CniDecision::Outside
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> PodKey {
        PodKey { namespace: "demo".into(), name: name.into() }
    }

    fn workload(name: &str, node: &str, ip: Option<[u8; 4]>, netns: Option<&str>) -> MeshWorkload {
        MeshWorkload {
            key: key(name),
            node: node.into(),
            ip: ip.map(Ipv4Addr::from),
            netns: netns.map(PathBuf::from),
            service_account: name.into(),
            mtls_mode: MtlsMode::Strict,
        }
    }

    fn binding(ip: [u8; 4]) -> CniBinding {
        CniBinding { container_id: "c1".into(), netns: "/run/netns/cni-1".into(), ip: Ipv4Addr::from(ip) }
    }

    #[test]
    fn a_pod_being_created_is_enrolled_once_the_cni_plugin_reports_it() {
        let view = MeshView {
            workloads: vec![
                workload("local", "node-a", Some([10, 1, 1, 2]), Some("/run/netns/local")),
                workload("new", "node-a", None, None),
                workload("remote", "node-b", Some([10, 1, 2, 2]), None),
                workload("remote-new", "node-b", None, None),
            ],
            ..Default::default()
        };
        let none = resolve(&view, &BTreeMap::new(), "node-a");
        assert_eq!(none.mine.iter().map(|p| p.key.name.as_str()).collect::<Vec<_>>(), ["local"]);
        assert_eq!(none.awaiting_cni, [key("new")]);
        assert_eq!(none.mesh.len(), 2, "only workloads with an address are reachable");

        let bindings = BTreeMap::from([(key("new"), binding([10, 1, 1, 9]))]);
        let reported = resolve(&view, &bindings, "node-a");
        assert!(reported.awaiting_cni.is_empty());
        let new = reported.mine.iter().find(|p| p.key == key("new")).expect("enrolled");
        assert_eq!((new.ip, new.netns.to_str()), (Ipv4Addr::new(10, 1, 1, 9), Some("/run/netns/cni-1")));
        assert!(reported.mesh.contains(&(key("new"), Ipv4Addr::new(10, 1, 1, 9), "new".into())));
    }

    #[test]
    fn the_cni_binding_wins_over_a_lagging_source_and_only_on_its_node() {
        let view = MeshView {
            workloads: vec![
                workload("p", "node-a", Some([10, 1, 1, 2]), None),
                workload("q", "node-b", Some([10, 1, 2, 2]), None),
            ],
            ..Default::default()
        };
        let bindings =
            BTreeMap::from([(key("p"), binding([10, 1, 1, 3])), (key("q"), binding([10, 9, 9, 9]))]);
        let resolved = resolve(&view, &bindings, "node-a");
        assert_eq!(resolved.mine[0].ip, Ipv4Addr::new(10, 1, 1, 3));
        assert!(resolved.mesh.contains(&(key("q"), Ipv4Addr::new(10, 1, 2, 2), "q".into())), "not ours");
    }

    #[test]
    fn the_cni_plugin_waits_for_ambient_pods_and_lets_others_start() {
        let view = MeshView {
            workloads: vec![
                workload("meshed", "node-a", None, None),
                workload("elsewhere", "node-b", None, None),
            ],
            outside: BTreeSet::from([key("opted-out")]),
            ambient_namespaces: Some(BTreeSet::from(["demo".to_owned()])),
            ..Default::default()
        };
        let decide = |name: &str| cni_decision(Some(&view), &key(name), "node-a", false, None);
        assert_eq!(cni_decision(Some(&view), &key("meshed"), "node-a", true, None), CniDecision::Enrolled);
        assert!(matches!(decide("meshed"), CniDecision::Waiting(w) if w.contains("being enrolled")));
        assert!(matches!(decide("elsewhere"), CniDecision::Failed(f) if f.contains("on node node-b")));
        assert_eq!(decide("opted-out"), CniDecision::Outside);
        assert!(
            matches!(decide("unknown"), CniDecision::Waiting(w) if w.contains("has not sent pod demo/unknown"))
        );
        let other = PodKey { namespace: "plain".into(), name: "x".into() };
        assert_eq!(cni_decision(Some(&view), &other, "node-a", false, None), CniDecision::Outside);
        assert!(matches!(cni_decision(None, &other, "node-a", false, None), CniDecision::Waiting(_)));
        assert!(matches!(
            cni_decision(Some(&view), &key("meshed"), "node-a", false, Some("netns gone")),
            CniDecision::Failed(f) if f.contains("netns gone")
        ));
    }
}
