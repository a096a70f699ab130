//! What the node proxy needs to handle traffic beyond "is this address meshed": services and
//! their endpoints, authorization policies, HTTP routes. Comes from mesh-control (xDS); the
//! standalone manifests mode has none (L4 only).
//!
//! [`TrafficSpec`] is the raw config as received; [`Traffic`] is its compiled, indexed form the
//! proxy reads on every connection (swapped whole, so a connection sees one consistent version).

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
    time::Duration,
};

use mesh_api::{
    SpiffeId,
    workload::v1::{self as proto, AuthorizationScope, LoadBalancerMode},
};
use mesh_manifests::PodKey;
use mesh_policy::{
    authz::{Policy, Scope},
    route::Route,
};

/// A workload with an address, as an endpoint of services and a target of policies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSpec {
    pub key: PodKey,
    pub ip: Ipv4Addr,
    /// In the mesh: reached through HBONE with this service account's identity.
    pub meshed: bool,
    pub service_account: String,
    /// Policies (`ns/name`) whose selector matches this workload.
    pub policies: Vec<String>,
    /// Service (`ns/hostname`) → (service port, target port).
    pub services: BTreeMap<String, Vec<(u16, u16)>>,
}

/// The traffic config as received.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrafficSpec {
    pub services: Vec<proto::Service>,
    pub endpoints: Vec<EndpointSpec>,
    pub authorizations: Vec<proto::Authorization>,
    pub routes: Vec<proto::HttpRoute>,
    /// Policies here without a selector apply mesh-wide.
    pub root_namespace: String,
    /// Policies (`ns/name`) this node could not read or compile, with why: enforced as
    /// deny-all over every workload they could apply to (see [`Traffic::compile`]).
    pub unenforceable: Vec<(String, String)>,
}

/// How a service port's traffic is parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum AppProtocol {
    /// Declared HTTP/1.1 (`http`).
    Http1,
    /// Declared HTTP/2 (`http2`, `grpc`, `h2c`).
    Http2,
    /// Declared opaque (`tcp`, or any other protocol name): never parsed.
    Opaque,
    /// Not declared: the first bytes decide.
    Detect,
}

impl AppProtocol {
    pub fn from_name(name: &str) -> Self {
        match name.to_ascii_lowercase().as_str() {
            "" => AppProtocol::Detect,
            "http" | "http1" | "kubernetes.io/http" => AppProtocol::Http1,
            "http2" | "grpc" | "h2c" | "kubernetes.io/h2c" | "grpc-web" => AppProtocol::Http2,
            _ => AppProtocol::Opaque,
        }
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ServicePort {
    pub port: u16,
    pub target_port: u16,
    pub protocol: AppProtocol,
}

/// One endpoint of a service port.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Endpoint {
    pub workload: String,
    pub addr: std::net::SocketAddr,
    /// The identity it must present; `None`: outside the mesh (plain TCP).
    #[serde(serialize_with = "serialize_identity")]
    pub identity: Option<SpiffeId>,
}

fn serialize_identity<S: serde::Serializer>(id: &Option<SpiffeId>, s: S) -> Result<S::Ok, S::Error> {
    match id {
        Some(id) => s.serialize_str(&id.to_string()),
        None => s.serialize_none(),
    }
}

/// Load balancing and protection settings of a service, with the proxy's defaults filled in.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Resilience {
    pub round_robin: bool,
    pub max_connections: usize,
    pub max_pending_requests: usize,
    /// 0: unlimited.
    pub max_requests_per_connection: usize,
    pub consecutive_errors: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
}

/// Defaults generous enough never to bite a healthy service, tight enough to stop a stampede.
const DEFAULT_MAX_CONNECTIONS: usize = 1024;
const DEFAULT_MAX_PENDING: usize = 1024;
const DEFAULT_CONSECUTIVE_ERRORS: u32 = 5;
const DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(30);
const DEFAULT_MAX_EJECTION: Duration = Duration::from_secs(300);

impl Resilience {
    fn of(service: &proto::Service) -> Self {
        let nonzero = |v: u32, default: usize| if v == 0 { default } else { v as usize };
        let cb = service.circuit_breaker.unwrap_or_default();
        let od = service.outlier_detection.unwrap_or_default();
        let base = if od.base_ejection_ms == 0 {
            DEFAULT_BASE_EJECTION
        } else {
            Duration::from_millis(od.base_ejection_ms)
        };
        let max = if od.max_ejection_ms == 0 {
            DEFAULT_MAX_EJECTION.max(base)
        } else {
            Duration::from_millis(od.max_ejection_ms)
        };
        Resilience {
            round_robin: service
                .load_balancing
                .as_ref()
                .is_some_and(|lb| lb.mode() == LoadBalancerMode::RoundRobin),
            max_connections: nonzero(cb.max_connections, DEFAULT_MAX_CONNECTIONS),
            max_pending_requests: nonzero(cb.max_pending_requests, DEFAULT_MAX_PENDING),
            max_requests_per_connection: cb.max_requests_per_connection as usize,
            consecutive_errors: if od.consecutive_errors == 0 {
                DEFAULT_CONSECUTIVE_ERRORS
            } else {
                od.consecutive_errors
            },
            base_ejection: base,
            max_ejection: max,
        }
    }
}

#[derive(Debug, serde::Serialize)]
pub struct ServiceEntry {
    /// `ns/hostname`: how routes and backends name it.
    pub key: String,
    pub namespace: String,
    pub name: String,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// Service port → its endpoints, in a stable order.
    pub endpoints: BTreeMap<u16, Vec<Endpoint>>,
    pub resilience: Resilience,
}

impl ServiceEntry {
    pub fn port(&self, port: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == port)
    }

    pub fn endpoints(&self, port: u16) -> &[Endpoint] {
        self.endpoints.get(&port).map_or(&[], Vec::as_slice)
    }
}

/// A workload's own view: who it is and which policies select it.
#[derive(Clone, Debug)]
struct WorkloadEntry {
    key: PodKey,
    policies: Vec<String>,
    /// Target port → declared protocol, from the service ports it serves.
    protocols: HashMap<u16, AppProtocol>,
    /// Target port → the services (`ns/hostname`) it serves there, sorted.
    services: HashMap<u16, Vec<String>>,
}

/// The compiled traffic config.
#[derive(Debug, Default)]
pub struct Traffic {
    services: HashMap<String, Arc<ServiceEntry>>,
    by_vip: HashMap<IpAddr, Arc<ServiceEntry>>,
    workloads: HashMap<IpAddr, WorkloadEntry>,
    policies: BTreeMap<String, Policy>,
    /// Keys of the policies without a selector, by the namespace whose workloads they apply to
    /// (`""`: mesh-wide), so a workload's policies are found without scanning them all.
    unselected: HashMap<String, Vec<String>>,
    routes: Vec<Route>,
    root_namespace: String,
    /// Resources that did not compile (mesh-control validates them, so this is a bug or a
    /// version skew): their key and the error.
    pub invalid: Vec<(String, String)>,
}

impl Traffic {
    pub fn compile(spec: &TrafficSpec, trust_domain: &str) -> Self {
        let mut traffic = Traffic { root_namespace: spec.root_namespace.clone(), ..Default::default() };
        let mut unenforceable = spec.unenforceable.clone();
        for policy in &spec.authorizations {
            match Policy::compile(policy) {
                Ok(compiled) => {
                    traffic.policies.insert(compiled.key().to_owned(), compiled);
                }
                Err(err) => {
                    unenforceable.push((format!("{}/{}", policy.namespace, policy.name), err.to_string()))
                }
            }
        }
        // Fails closed: a policy this node cannot enforce as written (version skew, a corrupt
        // resource) becomes a DENY of everything over all it could have applied to: its
        // namespace, or the whole mesh from the root namespace. It replaces any older version.
        for (key, why) in unenforceable {
            let Some((namespace, name)) = key.split_once('/') else { continue };
            let scope = if namespace == spec.root_namespace {
                AuthorizationScope::Global
            } else {
                AuthorizationScope::Namespace
            };
            let deny_all = proto::Authorization {
                name: name.to_owned(),
                namespace: namespace.to_owned(),
                scope: scope.into(),
                action: proto::AuthorizationAction::Deny.into(),
                rules: vec![proto::AuthorizationRule::default()],
            };
            if let Ok(compiled) = Policy::compile(&deny_all) {
                tracing::warn!(policy = %key, error = %why, "policy not enforceable here: denying all it could apply to");
                traffic.policies.insert(key.clone(), compiled);
            }
            traffic.invalid.push((key, why));
        }
        for route in &spec.routes {
            match Route::compile(route) {
                Ok(compiled) => traffic.routes.push(compiled),
                Err(err) => {
                    traffic.invalid.push((format!("{}/{}", route.namespace, route.name), err.to_string()))
                }
            }
        }
        let mut endpoints: HashMap<&str, BTreeMap<u16, Vec<Endpoint>>> = HashMap::new();
        let protocols: HashMap<(String, u16), AppProtocol> = spec
            .services
            .iter()
            .flat_map(|s| {
                s.ports.iter().map(move |p| {
                    ((service_key(s), p.service_port as u16), AppProtocol::from_name(&p.app_protocol))
                })
            })
            .collect();
        for endpoint in &spec.endpoints {
            let identity = if endpoint.meshed {
                SpiffeId::new(trust_domain, &endpoint.key.namespace, &endpoint.service_account).ok()
            } else {
                None
            };
            if endpoint.meshed && identity.is_none() {
                continue; // no valid identity: never reachable through the mesh
            }
            let mut workload_protocols = HashMap::new();
            let mut workload_services: HashMap<u16, Vec<String>> = HashMap::new();
            for (service, ports) in &endpoint.services {
                for &(service_port, target_port) in ports {
                    let served = workload_services.entry(target_port).or_default();
                    if !served.contains(service) {
                        served.push(service.clone());
                    }
                    endpoints.entry(service.as_str()).or_default().entry(service_port).or_default().push(
                        Endpoint {
                            workload: endpoint.key.to_string(),
                            addr: (endpoint.ip, target_port).into(),
                            identity: identity.clone(),
                        },
                    );
                    if let Some(protocol) = protocols.get(&(service.clone(), service_port)) {
                        workload_protocols.insert(target_port, *protocol);
                    }
                }
            }
            traffic.workloads.insert(
                IpAddr::V4(endpoint.ip),
                WorkloadEntry {
                    key: endpoint.key.clone(),
                    policies: endpoint.policies.clone(),
                    protocols: workload_protocols,
                    services: workload_services,
                },
            );
        }
        for service in &spec.services {
            let key = service_key(service);
            let mut by_port = endpoints.remove(key.as_str()).unwrap_or_default();
            by_port.values_mut().for_each(|e| e.sort_by(|a, b| a.workload.cmp(&b.workload)));
            let entry = Arc::new(ServiceEntry {
                namespace: service.namespace.clone(),
                name: service.name.clone(),
                vips: service.addresses.iter().filter_map(|a| ip_of(&a.address)).collect(),
                ports: service
                    .ports
                    .iter()
                    .map(|p| ServicePort {
                        port: p.service_port as u16,
                        target_port: p.target_port as u16,
                        protocol: AppProtocol::from_name(&p.app_protocol),
                    })
                    .collect(),
                endpoints: by_port,
                resilience: Resilience::of(service),
                key: key.clone(),
            });
            for vip in &entry.vips {
                traffic.by_vip.insert(*vip, entry.clone());
            }
            traffic.services.insert(key, entry);
        }
        for policy in traffic.policies.values() {
            let applies_to = match policy.scope() {
                Scope::Global if policy.namespace() == traffic.root_namespace => "",
                Scope::Global | Scope::WorkloadSelector => continue, // outside the root namespace: nowhere
                Scope::Namespace => policy.namespace(),
            };
            traffic.unselected.entry(applies_to.to_owned()).or_default().push(policy.key().to_owned());
        }
        traffic
    }

    /// The service whose cluster IP this is.
    pub fn service_at(&self, ip: IpAddr) -> Option<&Arc<ServiceEntry>> {
        self.by_vip.get(&unmap(ip))
    }

    pub fn service(&self, key: &str) -> Option<&Arc<ServiceEntry>> {
        self.services.get(key)
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// Returns how the source proxy reads a connection to `service`'s `port`: the declaration
    /// handed to protocol detection. As declared, except that an undeclared port no route
    /// attaches to is relayed whole without sniffing: nothing there needs HTTP, and a
    /// server-speaks-first protocol would otherwise wait out the sniffing timeout.
    pub fn outbound_parsing(&self, service: &ServiceEntry, port: &ServicePort) -> AppProtocol {
        let routed = self.routes.iter().any(|r| r.attaches_to(&service.key, port.port));
        match port.protocol {
            AppProtocol::Detect if !routed => AppProtocol::Opaque,
            declared => declared,
        }
    }

    /// Returns every service (in no particular order).
    pub fn services(&self) -> impl Iterator<Item = &Arc<ServiceEntry>> {
        self.services.values()
    }

    /// The policies that apply to the workload at `ip`: mesh-wide ones, its namespace's, and
    /// those whose selector matches it. A workload the node does not know gets the mesh-wide
    /// ones (and a namespace's if it is given).
    pub fn policies_for(&self, ip: IpAddr, namespace: &str) -> Vec<&Policy> {
        let selected = self.workloads.get(&unmap(ip)).map(|w| w.policies.as_slice()).unwrap_or_default();
        let unselected = ["", namespace].into_iter().filter_map(|ns| self.unselected.get(ns)).flatten();
        let selectors = selected
            .iter()
            .filter(|key| self.policies.get(*key).is_some_and(|p| p.scope() == Scope::WorkloadSelector));
        let mut keys: Vec<&String> = unselected.chain(selectors).collect();
        // In key order, as before: the first matching DENY names the decision.
        keys.sort_unstable();
        keys.dedup();
        keys.into_iter().filter_map(|key| self.policies.get(key)).collect()
    }

    /// The service (`ns/hostname`) the workload at `ip` serves on `port`, when exactly one does:
    /// how the destination side names the service a connection came for (the caller's choice
    /// of cluster IP never reaches it), for Istio's `destination_service` label.
    pub fn service_serving(&self, ip: IpAddr, port: u16) -> Option<&str> {
        match self.workloads.get(&unmap(ip))?.services.get(&port)?.as_slice() {
            [only] => Some(only),
            _ => None,
        }
    }

    /// The workload at `ip`, if known.
    pub fn workload_at(&self, ip: IpAddr) -> Option<&PodKey> {
        self.workloads.get(&unmap(ip)).map(|w| &w.key)
    }

    /// How traffic to `port` of the workload at `ip` is declared.
    pub fn declared_protocol(&self, ip: IpAddr, port: u16) -> AppProtocol {
        self.workloads
            .get(&unmap(ip))
            .and_then(|w| w.protocols.get(&port))
            .copied()
            .unwrap_or(AppProtocol::Detect)
    }

    /// Services (with their endpoints' live health), policies and routes, for the admin
    /// endpoint and `meshctl`.
    pub fn dump(
        &self,
        health: &HashMap<String, Vec<crate::proxy::balancer::EndpointHealth>>,
    ) -> serde_json::Value {
        let mut services: Vec<_> = self.services.values().collect();
        services.sort_by(|a, b| a.key.cmp(&b.key));
        let services: Vec<_> = services
            .iter()
            .map(|s| {
                let entry: &ServiceEntry = s;
                serde_json::json!({"service": entry, "health": health.get(&s.key)})
            })
            .collect();
        let policies: Vec<_> = self
            .policies
            .values()
            .map(|p| {
                serde_json::json!({
                    "policy": p.key(), "scope": p.scope(), "action": p.action(), "http_rules": p.has_l7(),
                })
            })
            .collect();
        let routes: Vec<_> = self.routes.iter().map(|r| r.key()).collect();
        let mut workloads: Vec<_> = self
            .workloads
            .iter()
            .map(|(ip, w)| serde_json::json!({"workload": w.key.to_string(), "ip": ip, "policies": w.policies}))
            .collect();
        workloads.sort_by_key(|w| w["workload"].as_str().unwrap_or_default().to_owned());
        serde_json::json!({
            "services": services, "policies": policies, "routes": routes, "workloads": workloads,
            "root_namespace": self.root_namespace, "invalid": self.invalid,
        })
    }
}

fn service_key(service: &proto::Service) -> String {
    format!("{}/{}", service.namespace, service.hostname)
}

fn ip_of(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))),
        16 => <[u8; 16]>::try_from(bytes).ok().map(|b| IpAddr::V6(b.into())),
        _ => None,
    }
}

/// An IPv4-mapped IPv6 address (dual-stack sockets) as the IPv4 address it is.
pub fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use mesh_api::workload::v1::{
        Authorization, AuthorizationAction, AuthorizationRule, AuthorizationScope, NetworkAddress, Port,
        Service,
    };

    use super::*;

    fn endpoint(name: &str, ip: [u8; 4], policies: &[&str], services: &[(&str, u16, u16)]) -> EndpointSpec {
        let mut by_service: BTreeMap<String, Vec<(u16, u16)>> = BTreeMap::new();
        for (service, port, target) in services {
            by_service.entry((*service).to_owned()).or_default().push((*port, *target));
        }
        EndpointSpec {
            key: PodKey { namespace: "demo".into(), name: name.into() },
            ip: ip.into(),
            meshed: name != "plain",
            service_account: name.into(),
            policies: policies.iter().map(|p| (*p).to_owned()).collect(),
            services: by_service,
        }
    }

    fn policy(namespace: &str, name: &str, scope: AuthorizationScope) -> Authorization {
        Authorization {
            name: name.into(),
            namespace: namespace.into(),
            scope: scope.into(),
            action: AuthorizationAction::Deny.into(),
            rules: vec![AuthorizationRule::default()],
        }
    }

    fn spec() -> TrafficSpec {
        TrafficSpec {
            services: vec![Service {
                name: "web".into(),
                namespace: "demo".into(),
                hostname: "web.demo.svc.cluster.local".into(),
                addresses: vec![NetworkAddress { address: vec![10, 96, 0, 10] }],
                ports: vec![
                    Port { service_port: 80, target_port: 8080, app_protocol: "http".into() },
                    Port { service_port: 5432, target_port: 5432, app_protocol: "tcp".into() },
                ],
                ..Default::default()
            }],
            endpoints: vec![
                endpoint(
                    "b1",
                    [10, 1, 2, 2],
                    &["demo/only-b1"],
                    &[("demo/web.demo.svc.cluster.local", 80, 8080)],
                ),
                endpoint("plain", [10, 1, 2, 4], &[], &[("demo/web.demo.svc.cluster.local", 80, 8080)]),
            ],
            authorizations: vec![
                policy("demo", "only-b1", AuthorizationScope::WorkloadSelector),
                policy("demo", "whole-namespace", AuthorizationScope::Namespace),
                policy("other", "other-namespace", AuthorizationScope::Namespace),
                policy("nodemesh-system", "mesh-wide", AuthorizationScope::Global),
            ],
            routes: Vec::new(),
            root_namespace: "nodemesh-system".into(),
            unenforceable: Vec::new(),
        }
    }

    #[test]
    fn services_resolve_by_cluster_ip_with_endpoints_and_declared_protocols() {
        let traffic = Traffic::compile(&spec(), "cluster.local");
        assert!(traffic.invalid.is_empty(), "{:?}", traffic.invalid);
        let web = traffic.service_at("10.96.0.10".parse().unwrap()).expect("by VIP");
        assert_eq!(web.key, "demo/web.demo.svc.cluster.local");
        assert_eq!(web.port(80).map(|p| p.protocol), Some(AppProtocol::Http1));
        assert_eq!(web.port(5432).map(|p| p.protocol), Some(AppProtocol::Opaque));
        let endpoints = web.endpoints(80);
        assert_eq!(endpoints.len(), 2);
        assert_eq!(endpoints[0].addr, "10.1.2.2:8080".parse().unwrap());
        assert_eq!(
            endpoints[0].identity.as_ref().map(ToString::to_string).as_deref(),
            Some("spiffe://cluster.local/ns/demo/sa/b1")
        );
        assert!(endpoints[1].identity.is_none(), "outside the mesh: plain TCP");
        assert_eq!(traffic.declared_protocol("10.1.2.2".parse().unwrap(), 8080), AppProtocol::Http1);
        assert_eq!(traffic.declared_protocol("10.1.2.2".parse().unwrap(), 9999), AppProtocol::Detect);
        assert!(traffic.service_at("10.96.0.11".parse().unwrap()).is_none());
        let b1: IpAddr = "10.1.2.2".parse().unwrap();
        assert_eq!(traffic.service_serving(b1, 8080), Some("demo/web.demo.svc.cluster.local"));
        assert_eq!(traffic.service_serving(b1, 9999), None, "a port no service targets");
        let mapped: IpAddr = "::ffff:10.96.0.10".parse().unwrap();
        assert!(traffic.service_at(mapped).is_some(), "IPv4-mapped addresses resolve too");
    }

    #[test]
    fn a_workload_gets_mesh_wide_namespace_and_selected_policies_only() {
        let traffic = Traffic::compile(&spec(), "cluster.local");
        let keys = |ip: &str, ns: &str| {
            let mut keys: Vec<String> =
                traffic.policies_for(ip.parse().unwrap(), ns).iter().map(|p| p.key().to_owned()).collect();
            keys.sort();
            keys
        };
        assert_eq!(
            keys("10.1.2.2", "demo"),
            ["demo/only-b1", "demo/whole-namespace", "nodemesh-system/mesh-wide"]
        );
        assert_eq!(keys("10.1.2.4", "demo"), ["demo/whole-namespace", "nodemesh-system/mesh-wide"]);
        assert_eq!(keys("10.1.9.9", "other"), ["nodemesh-system/mesh-wide", "other/other-namespace"]);
    }

    #[test]
    fn a_policy_this_node_cannot_enforce_denies_everything_it_could_apply_to() {
        use mesh_policy::authz::{Peer, Verdict, check_connection};

        let mut spec = spec();
        // Compiles nowhere: a malformed CIDR. It replaces the valid selector policy's scope
        // by its whole namespace.
        let mut bad = policy("demo", "only-b1", AuthorizationScope::WorkloadSelector);
        bad.action = mesh_api::workload::v1::AuthorizationAction::Allow.into();
        bad.rules[0].from.push(mesh_api::workload::v1::AuthorizationSource {
            ip_blocks: vec!["10.0.0.0/99".into()],
            ..Default::default()
        });
        spec.authorizations[0] = bad;
        // Refused by the xDS store (undecodable), in the root namespace: mesh-wide.
        spec.unenforceable.push(("nodemesh-system/corrupt".into(), "undecodable".into()));
        let traffic = Traffic::compile(&spec, "cluster.local");
        let mut invalid: Vec<&str> = traffic.invalid.iter().map(|(k, _)| k.as_str()).collect();
        invalid.sort_unstable();
        assert_eq!(invalid, ["demo/only-b1", "nodemesh-system/corrupt"]);
        let peer = Peer {
            ip: "10.1.1.2".parse().unwrap(),
            principal: Some("cluster.local/ns/demo/sa/a1"),
            namespace: Some("demo"),
        };
        let decide = |ip: &str, ns: &str| {
            let policies = traffic.policies_for(ip.parse().unwrap(), ns);
            let decision = check_connection(&policies, &peer, 8080, false);
            (decision.verdict, decision.policy)
        };
        // b1 (was selected), plain (same namespace, was not), and a workload of another
        // namespace (only the mesh-wide corrupt one reaches it): all denied.
        assert_eq!(decide("10.1.2.2", "demo").0, Verdict::Deny);
        assert_eq!(decide("10.1.2.4", "demo").0, Verdict::Deny);
        assert_eq!(decide("10.1.9.9", "other"), (Verdict::Deny, Some("nodemesh-system/corrupt".into())));
    }
}
