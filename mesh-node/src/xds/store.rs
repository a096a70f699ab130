//! The config this node holds: every resource it accepted, by type and name, persisted after each
//! update so a restart resumes from it (and tells mesh-control what it already has).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
    path::PathBuf,
};

use mesh_api::{
    workload::v1::{
        ADDRESS_TYPE, AUTHORIZATION_TYPE, Address, Authorization, HTTP_ROUTE_TYPE, HttpRoute,
        MESH_CONFIG_TYPE, MtlsMode as ProtoMtlsMode, TunnelProtocol, address,
    },
    xds::v1::{DeltaDiscoveryResponse, Resource},
};
use mesh_manifests::{MtlsMode, PodKey};
use prost::Message as _;

use crate::{
    desired::{MeshView, MeshWorkload},
    state_dir::StateDir,
    traffic::EndpointSpec,
};

/// The resource types a node subscribes to.
pub const TYPES: [&str; 4] = [ADDRESS_TYPE, AUTHORIZATION_TYPE, HTTP_ROUTE_TYPE, MESH_CONFIG_TYPE];

/// A resource the node accepted, and what it means to the node.
#[derive(Debug, Clone)]
struct Accepted {
    resource: Resource,
    meaning: Meaning,
}

#[derive(Debug, Clone)]
enum Meaning {
    /// A meshed workload (its address and netns may come from the CNI plugin), and what it
    /// serves once it has an address.
    Meshed(MeshWorkload, Option<EndpointSpec>),
    /// A pod outside the mesh (an endpoint in plain TCP once it has an address).
    Outside(PodKey, Option<EndpointSpec>),
    MeshConfig {
        ambient_namespaces: BTreeSet<String>,
        root_namespace: String,
    },
    Service(Box<mesh_api::workload::v1::Service>),
    Authorization(Box<Authorization>),
    Route(Box<HttpRoute>),
}

impl Meaning {
    fn meshed(&self) -> Option<&MeshWorkload> {
        match self {
            Meaning::Meshed(workload, _) => Some(workload),
            _ => None,
        }
    }
}

#[derive(Debug, Default)]
pub struct ConfigStore {
    types: BTreeMap<String, BTreeMap<String, Accepted>>,
    /// Resources rejected (NACKed), by type and name, with the reason. Kept so they are
    /// reconsidered when what made them invalid goes away (a conflicting workload deleted).
    rejected: BTreeMap<String, BTreeMap<String, (Resource, String)>>,
    dir: Option<StateDir>,
}

/// Persisted file of a type: its resources as one response message.
fn file_name(type_url: &str) -> String {
    let short = type_url.rsplit('.').next().unwrap_or(type_url).to_ascii_lowercase();
    format!("xds_{short}.pb")
}

impl ConfigStore {
    /// Loads what was persisted in `dir` (if anything; an unreadable file is logged and
    /// ignored, the control plane then sends everything again).
    pub fn load(dir: Option<StateDir>) -> Self {
        let mut store = ConfigStore { types: BTreeMap::new(), rejected: BTreeMap::new(), dir };
        for type_url in TYPES {
            let Some(dir) = &store.dir else { break };
            let name = file_name(type_url);
            let saved = match dir.read(&name) {
                Ok(Some(bytes)) => {
                    DeltaDiscoveryResponse::decode(bytes.as_slice()).map_err(|e| e.to_string())
                }
                Ok(None) => continue,
                Err(err) => Err(err.to_string()),
            };
            match saved {
                Ok(saved) => {
                    let rejected = store.apply(&saved);
                    if !rejected.is_empty() {
                        tracing::warn!(type_url, ?rejected, "persisted resources rejected");
                    }
                }
                Err(err) => {
                    tracing::warn!(file = %dir.path(&name).display(), error = %err, "ignoring persisted config")
                }
            }
        }
        store
    }

    pub fn is_empty(&self) -> bool {
        self.types.get(ADDRESS_TYPE).is_none_or(BTreeMap::is_empty)
            && !self.types.contains_key(MESH_CONFIG_TYPE)
    }

    pub fn persisted_at(&self) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.path(""))
    }

    /// Name → version held, for the subscription's `initial_resource_versions`. Only what
    /// was accepted: after a restart, rejected resources are sent (and judged) again.
    pub fn versions(&self, type_url: &str) -> HashMap<String, String> {
        self.types
            .get(type_url)
            .map(|r| r.iter().map(|(name, a)| (name.clone(), a.resource.version.clone())).collect())
            .unwrap_or_default()
    }

    pub fn count(&self, type_url: &str) -> usize {
        self.types.get(type_url).map_or(0, BTreeMap::len)
    }

    /// Applies a delta: every valid resource replaces its old version, removals go, and each
    /// invalid resource is left out (its previous version, if any, stays). Returns the
    /// rejected resources with the reason, for the NACK. Earlier rejects that became valid
    /// (their conflict was removed) are accepted now.
    pub fn apply(&mut self, response: &DeltaDiscoveryResponse) -> Vec<(String, String)> {
        let type_url = response.type_url.as_str();
        let held = self.types.entry(type_url.to_owned()).or_default();
        let rejected_before = self.rejected.entry(type_url.to_owned()).or_default();
        for name in &response.removed_resources {
            held.remove(name);
            rejected_before.remove(name);
        }
        let mut rejected = Vec::new();
        for resource in &response.resources {
            rejected_before.remove(&resource.name);
            match accept(type_url, resource, held) {
                Ok(accepted) => {
                    held.insert(resource.name.clone(), accepted);
                }
                Err(problem) => {
                    rejected_before.insert(resource.name.clone(), (resource.clone(), problem.clone()));
                    rejected.push((resource.name.clone(), problem));
                }
            }
        }
        let retry: Vec<(String, Resource)> = rejected_before
            .iter()
            .filter(|(name, _)| !rejected.iter().any(|(r, _)| r == *name))
            .map(|(name, (resource, _))| (name.clone(), resource.clone()))
            .collect();
        for (name, resource) in retry {
            if let Ok(accepted) = accept(type_url, &resource, held) {
                tracing::info!(resource = %name, "a previously rejected resource is valid now");
                rejected_before.remove(&name);
                held.insert(name, accepted);
            }
        }
        rejected
    }

    /// Rejected resources and why, for the admin endpoint.
    pub fn rejected(&self) -> Vec<(String, String)> {
        self.rejected
            .values()
            .flat_map(|r| r.iter().map(|(name, (_, why))| (name.clone(), why.clone())))
            .collect()
    }

    /// Writes the held config to the state directory.
    pub fn persist(&self) {
        let Some(dir) = &self.dir else { return };
        for (type_url, held) in &self.types {
            let all = DeltaDiscoveryResponse {
                type_url: type_url.clone(),
                resources: held.values().map(|a| a.resource.clone()).collect(),
                ..Default::default()
            };
            if let Err(err) = dir.write(&file_name(type_url), &all.encode_to_vec()) {
                tracing::warn!(error = %err, "cannot persist the config");
            }
        }
    }

    /// The mesh as the held config describes it.
    pub fn view(&self) -> MeshView {
        let mut view = MeshView::default();
        for accepted in self.types.values().flat_map(BTreeMap::values) {
            match &accepted.meaning {
                Meaning::Meshed(workload, endpoint) => {
                    view.workloads.push(workload.clone());
                    view.traffic.endpoints.extend(endpoint.clone());
                }
                Meaning::Outside(key, endpoint) => {
                    view.outside.insert(key.clone());
                    view.traffic.endpoints.extend(endpoint.clone());
                }
                Meaning::MeshConfig { ambient_namespaces, root_namespace } => {
                    view.ambient_namespaces = Some(ambient_namespaces.clone());
                    view.traffic.root_namespace.clone_from(root_namespace);
                }
                Meaning::Service(service) => view.traffic.services.push((**service).clone()),
                Meaning::Authorization(policy) => view.traffic.authorizations.push((**policy).clone()),
                Meaning::Route(route) => view.traffic.routes.push((**route).clone()),
            }
        }
        // A policy that was refused is still a policy: it must not be silently dropped.
        if let Some(refused) = self.rejected.get(AUTHORIZATION_TYPE) {
            view.traffic
                .unenforceable
                .extend(refused.iter().map(|(name, (_, why))| (name.clone(), why.clone())));
        }
        view.workloads.sort_by(|a, b| a.key.cmp(&b.key));
        view
    }
}

/// Checks a resource against itself and against what is held: a workload may not claim an
/// address another workload holds (its identity would be ambiguous, so it fails closed).
fn accept(
    type_url: &str,
    resource: &Resource,
    held: &BTreeMap<String, Accepted>,
) -> Result<Accepted, String> {
    let meaning = interpret(type_url, resource)?;
    if let Some(ip) = meaning.meshed().and_then(|w| w.ip)
        && let Some((other, _)) = held
            .iter()
            .find(|(name, a)| **name != resource.name && a.meaning.meshed().is_some_and(|w| w.ip == Some(ip)))
    {
        return Err(format!("address {ip} already belongs to {other}"));
    }
    Ok(Accepted { resource: resource.clone(), meaning })
}

/// Checks a resource and says what it means to this node.
fn interpret(type_url: &str, resource: &Resource) -> Result<Meaning, String> {
    match type_url {
        ADDRESS_TYPE => {
            let address =
                Address::decode(resource.resource.as_slice()).map_err(|e| format!("undecodable: {e}"))?;
            match address.r#type {
                Some(address::Type::Workload(workload)) => workload_meaning(&workload),
                Some(address::Type::Service(service)) => service_meaning(service),
                None => Err("an Address with neither a workload nor a service".into()),
            }
        }
        MESH_CONFIG_TYPE => {
            let config = mesh_api::workload::v1::MeshConfig::decode(resource.resource.as_slice())
                .map_err(|e| format!("undecodable: {e}"))?;
            Ok(Meaning::MeshConfig {
                ambient_namespaces: config.ambient_namespaces.into_iter().collect(),
                root_namespace: config.root_namespace,
            })
        }
        AUTHORIZATION_TYPE => {
            let policy = Authorization::decode(resource.resource.as_slice())
                .map_err(|e| format!("undecodable: {e}"))?;
            mesh_policy::authz::Policy::compile(&policy).map_err(|e| e.to_string())?;
            Ok(Meaning::Authorization(Box::new(policy)))
        }
        HTTP_ROUTE_TYPE => {
            let route =
                HttpRoute::decode(resource.resource.as_slice()).map_err(|e| format!("undecodable: {e}"))?;
            mesh_policy::route::Route::compile(&route).map_err(|e| e.to_string())?;
            Ok(Meaning::Route(Box::new(route)))
        }
        other => Err(format!("unexpected type {other}")),
    }
}

/// Checks a workload: meshed (to enrol, or a peer), or a pod outside the mesh.
fn workload_meaning(workload: &mesh_api::workload::v1::Workload) -> Result<Meaning, String> {
    for (field, value) in
        [("name", &workload.name), ("namespace", &workload.namespace), ("node", &workload.node)]
    {
        if value.is_empty() {
            return Err(format!("workload {field} is empty"));
        }
    }
    let key = PodKey { namespace: workload.namespace.clone(), name: workload.name.clone() };
    let meshed = workload.tunnel_protocol() == TunnelProtocol::Hbone;
    // No address yet: a pod being created, whose node learns it from the CNI plugin.
    let ip = match workload.addresses.first().map(Vec::as_slice) {
        Some(&[a, b, c, d]) => Some(Ipv4Addr::new(a, b, c, d)),
        Some(bytes) if bytes.len() == 16 => {
            return Err("IPv6 workload addresses are not supported yet".into());
        }
        Some(bytes) => return Err(format!("workload address has {} bytes", bytes.len())),
        None => None,
    };
    let service_account = if workload.service_account.is_empty() {
        "default".to_owned()
    } else {
        workload.service_account.clone()
    };
    let endpoint = match ip {
        Some(ip) => Some(endpoint_of(workload, key.clone(), ip, meshed, &service_account)?),
        None => None,
    };
    if !meshed {
        return Ok(Meaning::Outside(key, endpoint));
    }
    // No netns: found on the node (CNI plugin), as in Kubernetes.
    let netns = match workload.netns.as_str() {
        "" => None,
        path if path.starts_with('/') => Some(PathBuf::from(path)),
        path => return Err(format!("workload netns {path:?} is not an absolute path")),
    };
    let mtls_mode = match ProtoMtlsMode::try_from(workload.mtls_mode) {
        Ok(ProtoMtlsMode::Strict) => MtlsMode::Strict,
        Ok(ProtoMtlsMode::Permissive) => MtlsMode::Permissive,
        Err(_) => return Err(format!("unknown mTLS mode {}", workload.mtls_mode)),
    };
    Ok(Meaning::Meshed(
        MeshWorkload { key, node: workload.node.clone(), ip, netns, service_account, mtls_mode },
        endpoint,
    ))
}

/// A workload with an address as an endpoint of the services it serves.
fn endpoint_of(
    workload: &mesh_api::workload::v1::Workload,
    key: PodKey,
    ip: Ipv4Addr,
    meshed: bool,
    service_account: &str,
) -> Result<EndpointSpec, String> {
    let mut services = BTreeMap::new();
    for (service, list) in &workload.services {
        let ports = list
            .ports
            .iter()
            .map(|p| Ok((port(p.service_port, service)?, port(p.target_port, service)?)))
            .collect::<Result<Vec<_>, String>>()?;
        services.insert(service.clone(), ports);
    }
    Ok(EndpointSpec {
        key,
        ip,
        meshed,
        service_account: service_account.to_owned(),
        policies: workload.authorization_policies.clone(),
        services,
    })
}

fn port(value: u32, what: &str) -> Result<u16, String> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{what}: port {value} is out of range"))
}

/// Checks a service: ports in range, addresses of 4 or 16 bytes.
fn service_meaning(service: mesh_api::workload::v1::Service) -> Result<Meaning, String> {
    let name = format!("service {}/{}", service.namespace, service.hostname);
    if service.namespace.is_empty() || service.hostname.is_empty() {
        return Err(format!("{name}: namespace and hostname are required"));
    }
    for p in &service.ports {
        port(p.service_port, &name)?;
        if p.target_port != 0 {
            port(p.target_port, &name)?;
        }
    }
    if let Some(bad) = service.addresses.iter().find(|a| !matches!(a.address.len(), 4 | 16)) {
        return Err(format!("{name}: an address has {} bytes", bad.address.len()));
    }
    Ok(Meaning::Service(Box::new(service)))
}

#[cfg(test)]
mod tests {
    use mesh_api::workload::v1::Workload;

    use super::*;

    fn workload(name: &str, change: impl FnOnce(&mut Workload)) -> Resource {
        let mut w = Workload {
            uid: format!("Kubernetes//Pod/demo/{name}"),
            name: name.into(),
            namespace: "demo".into(),
            addresses: vec![vec![10, 1, 1, 2]],
            node: "node-a".into(),
            service_account: name.into(),
            tunnel_protocol: TunnelProtocol::Hbone.into(),
            netns: format!("/run/netns/{name}"),
            ..Default::default()
        };
        change(&mut w);
        let bytes = Address { r#type: Some(address::Type::Workload(w)) }.encode_to_vec();
        Resource {
            name: format!("Kubernetes//Pod/demo/{name}"),
            version: format!("v-{name}"),
            resource: bytes,
        }
    }

    fn response(resources: Vec<Resource>, removed: &[&str]) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            type_url: ADDRESS_TYPE.into(),
            resources,
            removed_resources: removed.iter().map(|s| (*s).to_owned()).collect(),
            nonce: "1".into(),
            ..Default::default()
        }
    }

    #[test]
    fn invalid_resources_are_rejected_with_a_reason_and_the_rest_applied() {
        let mut store = ConfigStore::default();
        let rejected = store.apply(&response(
            vec![
                workload("good", |_| {}),
                workload("relative", |w| w.netns = "netns/x".into()),
                workload("v6", |w| w.addresses = vec![vec![0; 16]]),
                workload("short", |w| w.addresses = vec![vec![10, 1]]),
                workload("nameless", |w| w.name.clear()),
                workload("nodeless", |w| w.node.clear()),
                workload("mode", |w| w.mtls_mode = 7),
                Resource { name: "garbage".into(), version: "1".into(), resource: vec![0xff, 0xff, 0xff] },
            ],
            &[],
        ));
        let reasons: BTreeMap<String, String> = rejected.into_iter().collect();
        assert_eq!(reasons.len(), 7, "{reasons:#?}");
        assert!(reasons["Kubernetes//Pod/demo/relative"].contains("not an absolute path"));
        assert!(reasons["Kubernetes//Pod/demo/v6"].contains("IPv6"));
        assert!(reasons["Kubernetes//Pod/demo/short"].contains("2 bytes"));
        assert!(reasons["Kubernetes//Pod/demo/nameless"].contains("name is empty"));
        assert!(reasons["Kubernetes//Pod/demo/nodeless"].contains("node is empty"));
        assert!(reasons["Kubernetes//Pod/demo/mode"].contains("unknown mTLS mode"));
        assert!(reasons["garbage"].contains("undecodable"));
        let pods = store.view().workloads;
        assert_eq!(pods.len(), 1);
        assert_eq!((pods[0].key.name.as_str(), pods[0].ip), ("good", Some(Ipv4Addr::new(10, 1, 1, 2))));
    }

    #[test]
    fn a_rejected_update_keeps_the_previous_version_and_removals_apply() {
        let mut store = ConfigStore::default();
        store.apply(&response(vec![workload("a", |_| {}), workload("b", |_| {})], &[]));
        let rejected = store
            .apply(&response(vec![workload("a", |w| w.netns = "x".into())], &["Kubernetes//Pod/demo/b"]));
        assert_eq!(rejected.len(), 1);
        let pods = store.view().workloads;
        assert_eq!(pods.len(), 1, "b removed");
        assert_eq!(pods[0].netns, Some(PathBuf::from("/run/netns/a")), "a keeps its last good version");
        assert_eq!(store.versions(ADDRESS_TYPE)["Kubernetes//Pod/demo/a"], "v-a");
    }

    #[test]
    fn a_refused_policy_reaches_the_traffic_config_as_unenforceable_and_leaves_with_its_removal() {
        let mut store = ConfigStore::default();
        let policy =
            |name: &str, bytes: Vec<u8>| Resource { name: name.into(), version: "1".into(), resource: bytes };
        let good = Authorization { name: "ok".into(), namespace: "demo".into(), ..Default::default() };
        let mut delta = response(
            vec![policy("demo/ok", good.encode_to_vec()), policy("demo/corrupt", vec![0xff, 0xff, 0xff])],
            &[],
        );
        delta.type_url = AUTHORIZATION_TYPE.into();
        let rejected = store.apply(&delta);
        assert_eq!(rejected.len(), 1, "NACKed: {rejected:?}");
        let traffic = store.view().traffic;
        assert_eq!(traffic.authorizations.len(), 1);
        assert_eq!(traffic.unenforceable.len(), 1);
        assert_eq!(traffic.unenforceable[0].0, "demo/corrupt");
        assert!(traffic.unenforceable[0].1.contains("undecodable"), "{:?}", traffic.unenforceable);

        let mut removal = response(Vec::new(), &["demo/corrupt"]);
        removal.type_url = AUTHORIZATION_TYPE.into();
        store.apply(&removal);
        assert!(store.view().traffic.unenforceable.is_empty(), "removed by its owner: no longer enforced");
    }

    #[test]
    fn a_workload_claiming_a_held_address_is_rejected_until_the_holder_goes() {
        let mut store = ConfigStore::default();
        store.apply(&response(vec![workload("a", |_| {})], &[]));
        let rejected = store.apply(&response(vec![workload("impostor", |_| {})], &[]));
        assert_eq!(rejected.len(), 1);
        assert!(rejected[0].1.contains("10.1.1.2 already belongs to Kubernetes//Pod/demo/a"), "{rejected:?}");
        assert_eq!(store.view().workloads.len(), 1);
        assert_eq!(store.rejected().len(), 1, "remembered for the admin endpoint");
        // The holder is deleted: the earlier reject is accepted without being sent again.
        let rejected = store.apply(&response(vec![], &["Kubernetes//Pod/demo/a"]));
        assert!(rejected.is_empty());
        let pods = store.view().workloads;
        assert_eq!(pods.len(), 1);
        assert_eq!(pods[0].key.name, "impostor");
        assert!(store.rejected().is_empty());
    }

    #[test]
    fn workloads_outside_the_mesh_enrol_nothing() {
        let mut store = ConfigStore::default();
        let rejected = store.apply(&response(
            vec![workload("plain", |w| {
                w.tunnel_protocol = TunnelProtocol::None.into();
                w.netns.clear();
            })],
            &[],
        ));
        assert!(rejected.is_empty());
        let view = store.view();
        assert!(view.workloads.is_empty());
        assert!(view.outside.contains(&PodKey { namespace: "demo".into(), name: "plain".into() }));
        assert_eq!(store.count(ADDRESS_TYPE), 1, "still known (for policy by address later)");
    }

    #[test]
    fn a_pod_being_created_is_held_without_address_or_netns_and_the_ambient_namespaces_too() {
        let mut store = ConfigStore::default();
        let rejected = store.apply(&response(
            vec![workload("new", |w| {
                w.addresses.clear();
                w.netns.clear();
            })],
            &[],
        ));
        assert!(rejected.is_empty(), "{rejected:?}");
        let config = mesh_api::workload::v1::MeshConfig {
            trust_domain: "cluster.local".into(),
            ambient_namespaces: vec!["demo".into()],
            ..Default::default()
        };
        store.apply(&DeltaDiscoveryResponse {
            type_url: MESH_CONFIG_TYPE.into(),
            resources: vec![Resource {
                name: "mesh".into(),
                version: "1".into(),
                resource: config.encode_to_vec(),
            }],
            ..Default::default()
        });
        let view = store.view();
        assert_eq!((view.workloads[0].ip, view.workloads[0].netns.as_ref()), (None, None));
        assert_eq!(view.ambient_namespaces, Some(BTreeSet::from(["demo".to_owned()])));
    }

    #[test]
    fn persisted_config_is_restored_with_its_versions() {
        let root = std::env::temp_dir().join(format!("nm-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dir = StateDir::open(&root).expect("state dir");
        let mut store = ConfigStore::load(Some(dir.clone()));
        assert!(store.is_empty());
        store.apply(&response(vec![workload("a", |_| {}), workload("b", |_| {})], &[]));
        store.persist();
        let restored = ConfigStore::load(Some(dir));
        assert_eq!(restored.view(), store.view());
        assert_eq!(restored.versions(ADDRESS_TYPE), store.versions(ADDRESS_TYPE));
        let _ = std::fs::remove_dir_all(&root);
    }
}
