//! One consistent version of everything the control plane distributes, per resource type, with
//! a content version per resource so a push carries only what changed.

use std::collections::{BTreeMap, HashMap};

use mesh_api::{
    workload::v1::{
        ADDRESS_TYPE, Address, MESH_CONFIG_TYPE, MeshConfig, MtlsMode as ProtoMtlsMode, TunnelProtocol,
        Workload, WorkloadStatus, address,
    },
    xds::v1::Resource,
};
use mesh_manifests::{EnrolledPodSpec, MtlsMode};

/// Name of the one mesh config resource.
pub const MESH_CONFIG_NAME: &str = "mesh";

/// An encoded resource and its content version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned {
    pub version: String,
    pub bytes: Vec<u8>,
}

impl Versioned {
    fn encode(message: &impl prost::Message) -> Self {
        let bytes = message.encode_to_vec();
        // The content hash: equal content, equal version, across restarts of the control plane
        // too, so a node resuming with its persisted config is sent nothing it already has.
        let version = mesh_api::fingerprint(&bytes)[..16].to_owned();
        Versioned { version, bytes }
    }
}

/// Every resource, by type URL then name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    types: BTreeMap<&'static str, BTreeMap<String, Versioned>>,
    /// A hash over every resource version: equal snapshots, equal versions.
    version: String,
}

/// What a node must be sent to go from what it has to a snapshot.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Delta {
    pub resources: Vec<Resource>,
    pub removed: Vec<String>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.resources.is_empty() && self.removed.is_empty()
    }
}

impl Snapshot {
    /// Builds the snapshot for the enrolled pods of the whole mesh.
    pub fn build(pods: &[EnrolledPodSpec], trust_domain: &str) -> Self {
        let addresses = pods
            .iter()
            .map(|pod| {
                let workload = workload_of(pod, trust_domain);
                let name = workload.uid.clone();
                (name, Versioned::encode(&Address { r#type: Some(address::Type::Workload(workload)) }))
            })
            .collect();
        let mesh = MeshConfig { trust_domain: trust_domain.to_owned() };
        let config = BTreeMap::from([(MESH_CONFIG_NAME.to_owned(), Versioned::encode(&mesh))]);
        let types = BTreeMap::from([(ADDRESS_TYPE, addresses), (MESH_CONFIG_TYPE, config)]);
        let all: String =
            types.values().flat_map(|r| r.iter()).map(|(name, v)| format!("{name}={};", v.version)).collect();
        let version = mesh_api::fingerprint(all.as_bytes())[..16].to_owned();
        Snapshot { types, version }
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    /// Whether `type_url` is a type this control plane serves.
    pub fn serves(type_url: &str) -> bool {
        [ADDRESS_TYPE, MESH_CONFIG_TYPE].contains(&type_url)
    }

    /// Number of resources of a type.
    pub fn count(&self, type_url: &str) -> usize {
        self.types.get(type_url).map_or(0, BTreeMap::len)
    }

    /// Returns the resources of `type_url` a node holding `have` (name → version) lacks or holds
    /// in another version, and the names it holds that no longer exist.
    pub fn delta(&self, type_url: &str, have: &HashMap<String, String>) -> Delta {
        let empty = BTreeMap::new();
        let current = self.types.get(type_url).unwrap_or(&empty);
        let resources = current
            .iter()
            .filter(|(name, v)| have.get(*name) != Some(&v.version))
            .map(|(name, v)| Resource {
                name: name.clone(),
                version: v.version.clone(),
                resource: v.bytes.clone(),
            })
            .collect();
        let mut removed: Vec<String> =
            have.keys().filter(|name| !current.contains_key(*name)).cloned().collect();
        removed.sort();
        Delta { resources, removed }
    }

    /// Name → version of a type: what a node holds after applying all of it.
    pub fn versions(&self, type_url: &str) -> HashMap<String, String> {
        self.types
            .get(type_url)
            .map(|r| r.iter().map(|(name, v)| (name.clone(), v.version.clone())).collect())
            .unwrap_or_default()
    }
}

/// The uid Istio's workload API gives a pod.
pub fn workload_uid(namespace: &str, name: &str) -> String {
    format!("Kubernetes//Pod/{namespace}/{name}")
}

fn workload_of(pod: &EnrolledPodSpec, trust_domain: &str) -> Workload {
    Workload {
        uid: workload_uid(&pod.key.namespace, &pod.key.name),
        name: pod.key.name.clone(),
        namespace: pod.key.namespace.clone(),
        addresses: vec![pod.ip.octets().to_vec()],
        node: pod.node.clone(),
        service_account: pod.service_account.clone(),
        trust_domain: trust_domain.to_owned(),
        tunnel_protocol: TunnelProtocol::Hbone.into(),
        status: WorkloadStatus::Healthy.into(),
        services: HashMap::new(),
        netns: pod.netns.display().to_string(),
        mtls_mode: match pod.mtls_mode {
            MtlsMode::Strict => ProtoMtlsMode::Strict,
            MtlsMode::Permissive => ProtoMtlsMode::Permissive,
        }
        .into(),
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;
    use std::{net::Ipv4Addr, path::PathBuf};

    use mesh_manifests::PodKey;

    use super::*;

    fn pod(name: &str, node: &str, ip: [u8; 4]) -> EnrolledPodSpec {
        EnrolledPodSpec {
            key: PodKey { namespace: "demo".into(), name: name.into() },
            node: node.into(),
            ip: Ipv4Addr::from(ip),
            netns: PathBuf::from(format!("/run/netns/{name}")),
            service_account: name.into(),
            mtls_mode: MtlsMode::Strict,
        }
    }

    #[test]
    fn a_workload_carries_what_a_node_needs() {
        let snapshot = Snapshot::build(&[pod("a1", "node-a", [10, 1, 1, 2])], "cluster.local");
        let delta = snapshot.delta(ADDRESS_TYPE, &HashMap::new());
        assert_eq!(delta.resources.len(), 1);
        assert_eq!(delta.resources[0].name, "Kubernetes//Pod/demo/a1");
        let Address { r#type: Some(address::Type::Workload(w)) } =
            Address::decode(delta.resources[0].resource.as_slice()).unwrap()
        else {
            panic!("not a workload");
        };
        assert_eq!(w.addresses, [vec![10, 1, 1, 2]]);
        assert_eq!((w.node.as_str(), w.service_account.as_str()), ("node-a", "a1"));
        assert_eq!(w.tunnel_protocol(), TunnelProtocol::Hbone);
        assert_eq!(w.netns, "/run/netns/a1");
    }

    #[test]
    fn deltas_carry_only_changes_and_removals() {
        let before =
            Snapshot::build(&[pod("a1", "node-a", [10, 1, 1, 2]), pod("b1", "node-b", [10, 1, 2, 2])], "td");
        let have = before.versions(ADDRESS_TYPE);
        assert!(before.delta(ADDRESS_TYPE, &have).is_empty(), "nothing to send when up to date");

        // b1 moves to another IP, a1 is deleted, c1 appears.
        let after =
            Snapshot::build(&[pod("b1", "node-b", [10, 1, 2, 9]), pod("c1", "node-b", [10, 1, 2, 3])], "td");
        let delta = after.delta(ADDRESS_TYPE, &have);
        let names: Vec<&str> = delta.resources.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["Kubernetes//Pod/demo/b1", "Kubernetes//Pod/demo/c1"]);
        assert_eq!(delta.removed, ["Kubernetes//Pod/demo/a1"]);
    }

    #[test]
    fn versions_are_content_hashes_stable_across_builds() {
        let pods = [pod("a1", "node-a", [10, 1, 1, 2])];
        assert_eq!(Snapshot::build(&pods, "td"), Snapshot::build(&pods, "td"));
        let other = Snapshot::build(&pods, "other-td");
        assert_ne!(Snapshot::build(&pods, "td").versions(ADDRESS_TYPE), other.versions(ADDRESS_TYPE));
    }

    #[test]
    fn the_mesh_config_is_one_resource() {
        let snapshot = Snapshot::build(&[], "cluster.local");
        let delta = snapshot.delta(MESH_CONFIG_TYPE, &HashMap::new());
        assert_eq!(delta.resources.len(), 1);
        let config = MeshConfig::decode(delta.resources[0].resource.as_slice()).unwrap();
        assert_eq!(config.trust_domain, "cluster.local");
        assert!(Snapshot::serves(MESH_CONFIG_TYPE) && !Snapshot::serves("type.googleapis.com/Other"));
    }
}
