//! One consistent version of everything the control plane distributes, per resource type, with
//! a content version per resource so a push carries only what changed. Every node receives
//! every resource: workloads and services (`Address`), authorization policies and HTTP routes
//! (small, and a node needs its peers' to route and to enforce), and the mesh config.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use mesh_api::{
    workload::v1::{
        ADDRESS_TYPE, AUTHORIZATION_TYPE, Address, HTTP_ROUTE_TYPE, MESH_CONFIG_TYPE, MeshConfig,
        MtlsMode as ProtoMtlsMode, NetworkAddress, Port, PortList, Service, TunnelProtocol, Workload,
        WorkloadStatus, address,
    },
    xds::v1::Resource,
};
use mesh_manifests::{
    MtlsMode,
    translate::{Model, PortMapping, ServiceSpec, WorkloadSpec},
};

/// Name of the one mesh config resource.
pub const MESH_CONFIG_NAME: &str = "mesh";
/// The resource types this control plane serves.
pub const TYPES: [&str; 4] = [ADDRESS_TYPE, AUTHORIZATION_TYPE, HTTP_ROUTE_TYPE, MESH_CONFIG_TYPE];

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
    /// Builds the snapshot of a translated model: every workload and service, every
    /// authorization policy (accepted or not: nodes fail closed on what was not taken as
    /// written), every route that was accepted, and the mesh config.
    pub fn build(model: &Model, trust_domain: &str) -> Self {
        let workloads = model.workloads.iter().map(|w| {
            let workload = workload_of(w, trust_domain);
            (workload.uid.clone(), Address { r#type: Some(address::Type::Workload(workload)) })
        });
        let services = model.services.iter().map(|s| {
            let service = service_of(s);
            (
                format!("{}/{}", service.namespace, service.hostname),
                Address { r#type: Some(address::Type::Service(service)) },
            )
        });
        let addresses =
            workloads.chain(services).map(|(name, address)| (name, Versioned::encode(&address))).collect();
        let authorizations = model
            .authorizations
            .iter()
            .map(|a| &a.authorization)
            .map(|a| (format!("{}/{}", a.namespace, a.name), Versioned::encode(a)))
            .collect();
        let routes = model
            .routes
            .iter()
            .filter_map(|r| r.route.as_ref())
            .map(|r| (format!("{}/{}", r.namespace, r.name), Versioned::encode(r)))
            .collect();
        let mesh = MeshConfig {
            trust_domain: trust_domain.to_owned(),
            ambient_namespaces: model.ambient_namespaces.clone(),
            root_namespace: model.root_namespace.clone(),
        };
        let config = BTreeMap::from([(MESH_CONFIG_NAME.to_owned(), Versioned::encode(&mesh))]);
        let types = BTreeMap::from([
            (ADDRESS_TYPE, addresses),
            (AUTHORIZATION_TYPE, authorizations),
            (HTTP_ROUTE_TYPE, routes),
            (MESH_CONFIG_TYPE, config),
        ]);
        let all: String = types
            .iter()
            .flat_map(|(type_url, r)| {
                r.iter().map(move |(name, v)| format!("{type_url}:{name}={};", v.version))
            })
            .collect();
        let version = mesh_api::fingerprint(all.as_bytes())[..16].to_owned();
        Snapshot { types, version }
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    /// Whether `type_url` is a type this control plane serves.
    pub fn serves(type_url: &str) -> bool {
        TYPES.contains(&type_url)
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

    /// Returns what a node holding exactly `held`'s resources of `type_url` must be sent to
    /// hold this snapshot's: one walk of both name-ordered maps, no hashing, nothing copied but
    /// what changed (what every node's push costs on every change).
    pub fn delta_from(&self, held: &Snapshot, type_url: &str) -> Delta {
        let empty = BTreeMap::new();
        let mut old = held.types.get(type_url).unwrap_or(&empty).iter().peekable();
        let mut new = self.types.get(type_url).unwrap_or(&empty).iter().peekable();
        let mut delta = Delta::default();
        let resource = |name: &String, v: &Versioned| Resource {
            name: name.clone(),
            version: v.version.clone(),
            resource: v.bytes.clone(),
        };
        loop {
            match (old.peek(), new.peek()) {
                (None, None) => return delta,
                (Some((gone, _)), None) => {
                    delta.removed.push((*gone).clone());
                    old.next();
                }
                (None, Some((name, v))) => {
                    delta.resources.push(resource(name, v));
                    new.next();
                }
                (Some((held_name, held_v)), Some((name, v))) => match held_name.cmp(name) {
                    std::cmp::Ordering::Less => {
                        delta.removed.push((*held_name).clone());
                        old.next();
                    }
                    std::cmp::Ordering::Greater => {
                        delta.resources.push(resource(name, v));
                        new.next();
                    }
                    std::cmp::Ordering::Equal => {
                        if held_v.version != v.version {
                            delta.resources.push(resource(name, v));
                        }
                        old.next();
                        new.next();
                    }
                },
            }
        }
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

fn workload_of(w: &WorkloadSpec, trust_domain: &str) -> Workload {
    let ports = |mappings: &Vec<PortMapping>| PortList {
        ports: mappings
            .iter()
            .map(|m| Port {
                service_port: u32::from(m.service_port),
                target_port: u32::from(m.target_port),
                app_protocol: String::new(),
            })
            .collect(),
    };
    let meshed = w.membership.as_ref();
    Workload {
        uid: workload_uid(&w.key.namespace, &w.key.name),
        name: w.key.name.clone(),
        namespace: w.key.namespace.clone(),
        addresses: w.ip.iter().map(|ip| ip.octets().to_vec()).collect(),
        node: w.node.clone(),
        service_account: w.service_account.clone(),
        trust_domain: trust_domain.to_owned(),
        tunnel_protocol: if meshed.is_some() { TunnelProtocol::Hbone } else { TunnelProtocol::None }.into(),
        status: WorkloadStatus::Healthy.into(),
        services: w.services.iter().map(|(name, mappings)| (name.clone(), ports(mappings))).collect(),
        authorization_policies: w.authorization_policies.clone(),
        netns: meshed.and_then(|m| m.netns.as_ref()).map(|p| p.display().to_string()).unwrap_or_default(),
        mtls_mode: match meshed.map(|m| m.mtls_mode) {
            Some(MtlsMode::Permissive) => ProtoMtlsMode::Permissive,
            _ => ProtoMtlsMode::Strict,
        }
        .into(),
    }
}

fn service_of(s: &ServiceSpec) -> Service {
    Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        hostname: s.hostname.clone(),
        addresses: s
            .vips
            .iter()
            .map(|ip| NetworkAddress {
                address: match ip {
                    IpAddr::V4(v4) => v4.octets().to_vec(),
                    IpAddr::V6(v6) => v6.octets().to_vec(),
                },
            })
            .collect(),
        ports: s
            .ports
            .iter()
            .map(|p| Port {
                service_port: u32::from(p.port),
                target_port: match &p.target_port {
                    IntOrString::Int(n) => u32::try_from(*n).unwrap_or_default(),
                    IntOrString::String(_) => 0, // resolved per workload
                },
                app_protocol: p.app_protocol.clone(),
            })
            .collect(),
        load_balancing: s.traffic.load_balancing,
        circuit_breaker: s.traffic.circuit_breaker,
        outlier_detection: s.traffic.outlier_detection,
    }
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, path::PathBuf};

    use mesh_api::workload::v1::{
        Authorization, AuthorizationAction, HttpRoute, LoadBalancerMode, LoadBalancing, RouteParent,
    };
    use mesh_manifests::{
        PodKey,
        translate::{Acceptance, AuthorizationSpec, Membership, RouteSpec, ServicePortSpec, TrafficPolicy},
    };
    use prost::Message as _;

    use super::*;

    fn pod(name: &str, node: &str, ip: [u8; 4]) -> WorkloadSpec {
        WorkloadSpec {
            key: PodKey { namespace: "demo".into(), name: name.into() },
            node: node.into(),
            ip: Some(Ipv4Addr::from(ip)),
            service_account: name.into(),
            membership: Some(Membership {
                netns: Some(PathBuf::from(format!("/run/netns/{name}"))),
                mtls_mode: MtlsMode::Strict,
            }),
            services: BTreeMap::new(),
            authorization_policies: Vec::new(),
        }
    }

    fn model(workloads: Vec<WorkloadSpec>) -> Model {
        Model { workloads, ..Default::default() }
    }

    fn decode(resource: &Resource) -> address::Type {
        Address::decode(resource.resource.as_slice()).unwrap().r#type.expect("a type")
    }

    #[test]
    fn a_workload_carries_what_a_node_needs() {
        let snapshot = Snapshot::build(&model(vec![pod("a1", "node-a", [10, 1, 1, 2])]), "cluster.local");
        let delta = snapshot.delta(ADDRESS_TYPE, &HashMap::new());
        assert_eq!(delta.resources.len(), 1);
        assert_eq!(delta.resources[0].name, "Kubernetes//Pod/demo/a1");
        let address::Type::Workload(w) = decode(&delta.resources[0]) else { panic!("not a workload") };
        assert_eq!(w.addresses, [vec![10, 1, 1, 2]]);
        assert_eq!((w.node.as_str(), w.service_account.as_str()), ("node-a", "a1"));
        assert_eq!(w.tunnel_protocol(), TunnelProtocol::Hbone);
        assert_eq!(w.netns, "/run/netns/a1");
    }

    #[test]
    fn services_and_workloads_outside_the_mesh_are_addresses_too() {
        let mut web = pod("web", "node-b", [10, 1, 2, 2]);
        web.membership = None;
        web.services.insert(
            "demo/web.demo.svc.cluster.local".into(),
            vec![PortMapping { service_port: 80, target_port: 8080 }],
        );
        let service = ServiceSpec {
            namespace: "demo".into(),
            name: "web".into(),
            hostname: "web.demo.svc.cluster.local".into(),
            vips: vec!["10.96.0.10".parse().unwrap()],
            ports: vec![ServicePortSpec {
                port: 80,
                target_port: IntOrString::Int(8080),
                app_protocol: "http".into(),
            }],
            traffic: Default::default(),
        };
        let snapshot = Snapshot::build(
            &Model { workloads: vec![web], services: vec![service], ..Default::default() },
            "td",
        );
        let delta = snapshot.delta(ADDRESS_TYPE, &HashMap::new());
        let names: Vec<&str> = delta.resources.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["Kubernetes//Pod/demo/web", "demo/web.demo.svc.cluster.local"]);
        let address::Type::Workload(w) = decode(&delta.resources[0]) else { panic!("not a workload") };
        assert_eq!(w.tunnel_protocol(), TunnelProtocol::None);
        assert_eq!(w.services["demo/web.demo.svc.cluster.local"].ports[0].target_port, 8080);
        let address::Type::Service(s) = decode(&delta.resources[1]) else { panic!("not a service") };
        assert_eq!(s.addresses[0].address, [10, 96, 0, 10]);
        assert_eq!((s.ports[0].service_port, s.ports[0].app_protocol.as_str()), (80, "http"));
    }

    #[test]
    fn deltas_carry_only_changes_and_removals() {
        let before = Snapshot::build(
            &model(vec![pod("a1", "node-a", [10, 1, 1, 2]), pod("b1", "node-b", [10, 1, 2, 2])]),
            "td",
        );
        let have = before.versions(ADDRESS_TYPE);
        assert!(before.delta(ADDRESS_TYPE, &have).is_empty(), "nothing to send when up to date");

        // b1 moves to another IP, a1 is deleted, c1 appears.
        let after = Snapshot::build(
            &model(vec![pod("b1", "node-b", [10, 1, 2, 9]), pod("c1", "node-b", [10, 1, 2, 3])]),
            "td",
        );
        let delta = after.delta(ADDRESS_TYPE, &have);
        let names: Vec<&str> = delta.resources.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["Kubernetes//Pod/demo/b1", "Kubernetes//Pod/demo/c1"]);
        assert_eq!(delta.removed, ["Kubernetes//Pod/demo/a1"]);
        // From the snapshot a node was last sent, the same delta without listing its versions.
        assert_eq!(after.delta_from(&before, ADDRESS_TYPE), delta);
        assert!(after.delta_from(&after, ADDRESS_TYPE).is_empty());
        let from_nothing = after.delta_from(&Snapshot::default(), ADDRESS_TYPE);
        assert_eq!(from_nothing, after.delta(ADDRESS_TYPE, &HashMap::new()));
        let to_nothing = Snapshot::default().delta_from(&after, ADDRESS_TYPE);
        assert_eq!(to_nothing.removed, ["Kubernetes//Pod/demo/b1", "Kubernetes//Pod/demo/c1"]);
    }

    #[test]
    fn versions_are_content_hashes_stable_across_builds() {
        let m = model(vec![pod("a1", "node-a", [10, 1, 1, 2])]);
        assert_eq!(Snapshot::build(&m, "td"), Snapshot::build(&m, "td"));
        let other = Snapshot::build(&m, "other-td");
        assert_ne!(Snapshot::build(&m, "td").versions(ADDRESS_TYPE), other.versions(ADDRESS_TYPE));
    }

    #[test]
    fn the_mesh_config_is_one_resource() {
        let snapshot = Snapshot::build(&Model::default(), "cluster.local");
        let delta = snapshot.delta(MESH_CONFIG_TYPE, &HashMap::new());
        assert_eq!(delta.resources.len(), 1);
        let config = MeshConfig::decode(delta.resources[0].resource.as_slice()).unwrap();
        assert_eq!(config.trust_domain, "cluster.local");
        assert!(Snapshot::serves(MESH_CONFIG_TYPE) && !Snapshot::serves("type.googleapis.com/Other"));
    }

    fn policy(name: &str, action: AuthorizationAction) -> AuthorizationSpec {
        AuthorizationSpec {
            authorization: Authorization {
                name: name.into(),
                namespace: "demo".into(),
                action: action.into(),
                ..Default::default()
            },
            generation: Some(1),
            acceptance: Acceptance::accepted(),
        }
    }

    fn route(name: &str, accepted: bool) -> RouteSpec {
        let route = HttpRoute {
            name: name.into(),
            namespace: "demo".into(),
            parents: vec![RouteParent { service: "demo/web.demo.svc.cluster.local".into(), port: 80 }],
            ..Default::default()
        };
        RouteSpec {
            namespace: "demo".into(),
            name: name.into(),
            route: accepted.then_some(route),
            generation: Some(1),
            parents: vec![],
        }
    }

    #[test]
    fn policies_and_accepted_routes_are_resources_named_by_namespace_and_name() {
        let mut a1 = pod("a1", "node-a", [10, 1, 1, 2]);
        a1.authorization_policies = vec!["demo/deny".into()];
        let mut rejected = policy("deny", AuthorizationAction::Deny);
        rejected.acceptance = Acceptance::rejected("UnenforceableHTTPRule", "rules[0]: …");
        let model = Model {
            workloads: vec![a1],
            authorizations: vec![policy("allow", AuthorizationAction::Allow), rejected],
            routes: vec![route("canary", true), route("redirect", false)],
            root_namespace: "mesh-root".into(),
            ..Default::default()
        };
        let snapshot = Snapshot::build(&model, "td");
        let names = |type_url| -> Vec<String> {
            snapshot.delta(type_url, &HashMap::new()).resources.into_iter().map(|r| r.name).collect()
        };
        assert_eq!(
            names(AUTHORIZATION_TYPE),
            ["demo/allow", "demo/deny"],
            "a rejected policy is enforced too"
        );
        assert_eq!(names(HTTP_ROUTE_TYPE), ["demo/canary"], "a route not accepted is not applied");
        let delta = snapshot.delta(AUTHORIZATION_TYPE, &HashMap::new());
        let deny = Authorization::decode(delta.resources[1].resource.as_slice()).unwrap();
        assert_eq!(deny.action(), AuthorizationAction::Deny);
        let delta = snapshot.delta(HTTP_ROUTE_TYPE, &HashMap::new());
        let canary = HttpRoute::decode(delta.resources[0].resource.as_slice()).unwrap();
        assert_eq!(canary.parents[0].port, 80);
        let address::Type::Workload(w) = decode(&snapshot.delta(ADDRESS_TYPE, &HashMap::new()).resources[0])
        else {
            panic!("not a workload")
        };
        assert_eq!(w.authorization_policies, ["demo/deny"]);
        let config = MeshConfig::decode(
            snapshot.delta(MESH_CONFIG_TYPE, &HashMap::new()).resources[0].resource.as_slice(),
        )
        .unwrap();
        assert_eq!(config.root_namespace, "mesh-root");
        assert!(TYPES.iter().all(|t| Snapshot::serves(t)));
    }

    #[test]
    fn a_changed_policy_is_one_changed_resource() {
        let before = Snapshot::build(
            &Model {
                authorizations: vec![
                    policy("a", AuthorizationAction::Allow),
                    policy("b", AuthorizationAction::Allow),
                ],
                ..Default::default()
            },
            "td",
        );
        let have = before.versions(AUTHORIZATION_TYPE);
        let after = Snapshot::build(
            &Model { authorizations: vec![policy("a", AuthorizationAction::Deny)], ..Default::default() },
            "td",
        );
        let delta = after.delta(AUTHORIZATION_TYPE, &have);
        assert_eq!(delta.resources.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["demo/a"]);
        assert_eq!(delta.removed, ["demo/b"]);
        assert_ne!(before.version(), after.version());
        assert!(
            after.delta(ADDRESS_TYPE, &before.versions(ADDRESS_TYPE)).is_empty(),
            "other types untouched"
        );
    }

    #[test]
    fn a_service_carries_its_traffic_policy() {
        let service = ServiceSpec {
            namespace: "demo".into(),
            name: "web".into(),
            hostname: "web.demo.svc.cluster.local".into(),
            vips: vec![],
            ports: vec![],
            traffic: TrafficPolicy {
                load_balancing: Some(LoadBalancing { mode: LoadBalancerMode::RoundRobin.into() }),
                ..Default::default()
            },
        };
        let snapshot = Snapshot::build(&Model { services: vec![service], ..Default::default() }, "td");
        let address::Type::Service(s) = decode(&snapshot.delta(ADDRESS_TYPE, &HashMap::new()).resources[0])
        else {
            panic!("not a service")
        };
        assert_eq!(s.load_balancing.map(|l| l.mode()), Some(LoadBalancerMode::RoundRobin));
        assert_eq!((s.circuit_breaker, s.outlier_detection), (None, None));
    }
}
