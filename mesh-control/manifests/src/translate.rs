//! From Kubernetes objects (either source) to the mesh model: which pods are workloads, which are
//! in the mesh and how, which services they serve on which ports and how their traffic is
//! balanced ([`traffic`]), which authorization policies apply to them ([`authorization`]) and
//! how HTTP to services is routed ([`routes`]). Pure: no I/O, no clock.
//! An object that cannot be translated (as written) becomes a [`Problem`] naming it; the rest
//! still translates (the local source turns problems into errors, so a bad file changes
//! nothing; the Kubernetes source reports them in the objects' status).

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
};

use k8s_openapi::{
    api::core::v1::{Namespace, Pod, Service},
    apimachinery::pkg::util::intstr::IntOrString,
};

use crate::{ClusterObjects, DATAPLANE_MODE, MTLS_MODE, MtlsMode, NETNS_ANNOTATION, PodKey};

pub mod authorization;
pub mod duration;
pub mod routes;
pub mod traffic;

pub use authorization::AuthorizationSpec;
pub use routes::{ParentStatus, RouteSpec};
pub use traffic::TrafficPolicy;

/// Istio's default root namespace, nodemesh's own.
pub const DEFAULT_ROOT_NAMESPACE: &str = "nodemesh-system";

/// Options that differ between the sources.
#[derive(Clone, Debug)]
pub struct TranslateOptions {
    /// Local mode needs each enrolled pod's netns path from the `nodemesh.io/netns` annotation;
    /// in Kubernetes mode the node finds it.
    pub require_netns: bool,
    /// `cluster.local` unless the cluster says otherwise.
    pub cluster_domain: String,
    /// Authorization policies here without a selector apply to every workload of the mesh,
    /// and their selectors pick workloads in every namespace (Istio's root namespace).
    pub root_namespace: String,
}

impl Default for TranslateOptions {
    fn default() -> Self {
        TranslateOptions {
            require_netns: true,
            cluster_domain: "cluster.local".into(),
            root_namespace: DEFAULT_ROOT_NAMESPACE.into(),
        }
    }
}

/// Whether a policy or route was taken as written, as a status condition says it: `True` or
/// `False`, a CamelCase reason and a message for people.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Acceptance {
    pub status: bool,
    pub reason: String,
    pub message: String,
}

impl Acceptance {
    /// Returns a condition's outcome.
    pub fn condition(status: bool, reason: &str, message: impl Into<String>) -> Self {
        Acceptance { status, reason: reason.to_owned(), message: message.into() }
    }

    /// Returns the outcome of a policy taken as written.
    pub fn accepted() -> Self {
        Self::condition(true, "Accepted", "enforced as written")
    }

    /// Returns the outcome of a policy not taken as written, and why.
    pub fn rejected(reason: &str, message: impl Into<String>) -> Self {
        Self::condition(false, reason, message)
    }
}

/// An object that could not be translated, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub kind: &'static str,
    /// `namespace/name`, or `name` for cluster-scoped kinds.
    pub object: String,
    pub message: String,
}

/// How an enrolled pod is in the mesh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Membership {
    pub netns: Option<PathBuf>,
    pub mtls_mode: MtlsMode,
}

/// A port a workload serves for a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortMapping {
    pub service_port: u16,
    pub target_port: u16,
}

/// A pod with an address, in the mesh or not (services' endpoints include both).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadSpec {
    pub key: PodKey,
    pub node: String,
    /// `None` while the pod is being created (scheduled, no address yet). Such a pod is only
    /// in the model when its namespace is ambient, so its node's CNI plugin can tell whether
    /// to capture it before its app starts.
    pub ip: Option<Ipv4Addr>,
    pub service_account: String,
    /// `None`: not in the mesh (its traffic is not captured; peers reach it in plain TCP).
    pub membership: Option<Membership>,
    /// Service (`namespace/hostname`) → the ports this pod serves for it.
    pub services: BTreeMap<String, Vec<PortMapping>>,
    /// Authorization policies (`namespace/name`) whose selector picks this pod, sorted.
    pub authorization_policies: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortSpec {
    pub port: u16,
    /// The number, or a named container port resolved per pod.
    pub target_port: IntOrString,
    /// `http`, `http2`, `grpc`, `tcp`, …: `appProtocol`, else the port name's prefix (Istio's
    /// convention), else empty (sniffed or L4).
    pub app_protocol: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub namespace: String,
    pub name: String,
    /// `<name>.<namespace>.svc.<cluster domain>`.
    pub hostname: String,
    /// Cluster IPs; none for headless services.
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePortSpec>,
    /// From the `nodemesh.io/*` traffic annotations.
    pub traffic: TrafficPolicy,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Model {
    pub workloads: Vec<WorkloadSpec>,
    pub services: Vec<ServiceSpec>,
    /// Every AuthorizationPolicy, accepted or not (nodes enforce each, failing closed where it
    /// was not taken as written), sorted by namespace and name.
    pub authorizations: Vec<AuthorizationSpec>,
    /// Every HTTPRoute attached to a Service, sorted by namespace and name.
    pub routes: Vec<RouteSpec>,
    /// Namespaces with `nodemesh.io/dataplane-mode: ambient`, sorted.
    pub ambient_namespaces: Vec<String>,
    /// [`TranslateOptions::root_namespace`], for the nodes' mesh config.
    pub root_namespace: String,
    pub problems: Vec<Problem>,
}

/// Translates everything discovery found.
pub fn translate(objects: &ClusterObjects, options: &TranslateOptions) -> Model {
    let mut model = Model { root_namespace: options.root_namespace.clone(), ..Model::default() };
    let namespaces: BTreeMap<String, &Namespace> =
        objects.namespaces.iter().filter_map(|n| Some((n.metadata.name.clone()?, n))).collect();
    model.ambient_namespaces = namespaces
        .iter()
        .filter(|(_, n)| setting(&n.metadata, DATAPLANE_MODE) == Some("ambient"))
        .map(|(name, _)| name.clone())
        .collect();
    for pod in &objects.pods {
        match workload(pod, &namespaces, options) {
            Ok(Some(workload)) => model.workloads.push(workload),
            Ok(None) => {}
            Err(message) => {
                model.problems.push(Problem { kind: "Pod", object: key_of(&pod.metadata), message })
            }
        }
    }
    let index = EndpointIndex::new(&objects.pods, &model.workloads);
    for service in &objects.services {
        // A bad traffic annotation is a problem; the service still counts, without it.
        let (traffic, traffic_problems) = traffic::traffic_policy(service.metadata.annotations.as_ref());
        let problems = match service_spec(service, options) {
            Ok(spec) => {
                attach_endpoints(service, &spec, &index, &mut model.workloads);
                model.services.push(ServiceSpec { traffic, ..spec });
                traffic_problems
            }
            Err(message) => vec![message],
        };
        if !problems.is_empty() {
            let message = problems.join("; ");
            model.problems.push(Problem { kind: "Service", object: key_of(&service.metadata), message });
        }
    }
    translate_policies(objects, options, &index, &mut model);
    translate_routes(objects, options, &mut model);
    model.workloads.sort_by(|a, b| a.key.cmp(&b.key));
    model.services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    model
}

/// Adds every AuthorizationPolicy to the model and lists the selector policies on the
/// workloads they pick. Runs before the workloads are sorted (the index points into them).
fn translate_policies(
    objects: &ClusterObjects,
    options: &TranslateOptions,
    index: &EndpointIndex<'_>,
    model: &mut Model,
) {
    let services: HashMap<String, &ServiceSpec> =
        model.services.iter().map(|s| (format!("{}/{}", s.namespace, s.hostname), s)).collect();
    let context = authorization::Context {
        root_namespace: &options.root_namespace,
        workloads: &model.workloads,
        index,
        services: &services,
    };
    let mut listings = Vec::new();
    let mut authorizations = Vec::new();
    for policy in &objects.authorization_policies {
        let object = key_of(&policy.metadata);
        match authorization::translate(policy, &context) {
            Ok(translated) => {
                if !translated.findings.is_empty() {
                    let message = translated.findings.join("; ");
                    model.problems.push(Problem {
                        kind: "AuthorizationPolicy",
                        object: object.clone(),
                        message,
                    });
                }
                let authorization = &translated.spec.authorization;
                // The nodes compile what they receive with the same code: refuse here what
                // they would refuse (NACK) there.
                if let Err(err) = mesh_policy::authz::Policy::compile(authorization) {
                    model.problems.push(Problem {
                        kind: "AuthorizationPolicy",
                        object: object.clone(),
                        message: format!("nodes would refuse it: {err}"),
                    });
                }
                let name = format!("{}/{}", authorization.namespace, authorization.name);
                listings.extend(translated.listed_by.into_iter().map(|w| (w, name.clone())));
                authorizations.push(translated.spec);
            }
            Err(message) => model.problems.push(Problem { kind: "AuthorizationPolicy", object, message }),
        }
    }
    for (w, name) in listings {
        model.workloads[w].authorization_policies.push(name);
    }
    for workload in &mut model.workloads {
        workload.authorization_policies.sort();
    }
    authorizations.sort_by(|a, b| {
        let key = |s: &AuthorizationSpec| (s.authorization.namespace.clone(), s.authorization.name.clone());
        key(a).cmp(&key(b))
    });
    model.authorizations = authorizations;
}

/// Adds every HTTPRoute attached to a Service to the model.
fn translate_routes(objects: &ClusterObjects, options: &TranslateOptions, model: &mut Model) {
    let services: HashMap<(String, String), &ServiceSpec> =
        model.services.iter().map(|s| ((s.namespace.clone(), s.name.clone()), s)).collect();
    let mut routes = Vec::new();
    for route in &objects.http_routes {
        match routes::translate(route, &services, &options.cluster_domain) {
            Ok(None) => {} // attached to Gateways only: another implementation's
            Ok(Some((spec, mut problems))) => {
                if let Some(Err(err)) = spec.route.as_ref().map(mesh_policy::route::Route::compile) {
                    problems.push(format!("nodes would refuse it: {err}"));
                }
                if !problems.is_empty() {
                    let message = problems.join("; ");
                    model.problems.push(Problem {
                        kind: "HTTPRoute",
                        object: key_of(&route.metadata),
                        message,
                    });
                }
                routes.push(spec);
            }
            Err(message) => {
                model.problems.push(Problem { kind: "HTTPRoute", object: key_of(&route.metadata), message })
            }
        }
    }
    routes.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    model.routes = routes;
}

fn key_of(metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    let name = metadata.name.as_deref().unwrap_or("?");
    match &metadata.namespace {
        Some(namespace) => format!("{namespace}/{name}"),
        None => name.to_owned(),
    }
}

/// A nodemesh setting: the annotation, else the label.
fn setting<'a>(
    metadata: &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    key: &str,
) -> Option<&'a str> {
    metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .or_else(|| metadata.labels.as_ref().and_then(|l| l.get(key)))
        .map(String::as_str)
}

fn mtls_mode(value: &str) -> Result<MtlsMode, String> {
    MtlsMode::parse(value).ok_or_else(|| format!("{MTLS_MODE} must be STRICT or PERMISSIVE, not {value:?}"))
}

/// Returns the pod as a workload, `None` while it has no node or has finished, or has no address
/// yet outside an ambient namespace.
fn workload(
    pod: &Pod,
    namespaces: &BTreeMap<String, &Namespace>,
    options: &TranslateOptions,
) -> Result<Option<WorkloadSpec>, String> {
    let metadata = &pod.metadata;
    let name = metadata.name.clone().ok_or("metadata.name is required")?;
    let namespace = metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let namespace_object = namespaces.get(&namespace);
    let namespace_ambient =
        namespace_object.is_some_and(|n| setting(&n.metadata, DATAPLANE_MODE) == Some("ambient"));
    let opted_in = match setting(metadata, DATAPLANE_MODE) {
        Some("none") => false,
        Some("ambient") => true,
        Some(other) => {
            return Err(format!("{DATAPLANE_MODE} must be \"ambient\" or \"none\", not {other:?}"));
        }
        None => namespace_ambient,
    };
    let spec = pod.spec.as_ref();
    let Some(node) = spec.and_then(|s| s.node_name.clone()).filter(|n| !n.is_empty()) else {
        return Ok(None); // not scheduled yet
    };
    let status = pod.status.as_ref();
    if matches!(status.and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed")) {
        return Ok(None); // finished: its address may already belong to another pod
    }
    let ip = match status.and_then(|s| s.pod_ip.as_deref()) {
        Some(ip) => match ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => Some(ip),
            Ok(IpAddr::V6(_)) => {
                return Err(format!("status.podIP {ip}: IPv6 pod addresses are not supported yet"));
            }
            Err(_) => return Err(format!("status.podIP {ip:?} is not an IP address")),
        },
        // Being created: its node's CNI plugin needs to know about it (capture it, or not)
        // when it is in or around the mesh; otherwise there is nothing to reach yet.
        None if opted_in || namespace_ambient => None,
        None => return Ok(None),
    };
    let membership = if opted_in {
        let netns = match metadata.annotations.as_ref().and_then(|a| a.get(NETNS_ANNOTATION)) {
            Some(path) if path.starts_with('/') => Some(PathBuf::from(path)),
            Some(path) => {
                return Err(format!("annotation {NETNS_ANNOTATION} must be an absolute path, not {path:?}"));
            }
            // A pod being created gets its netns (and address) from the CNI plugin.
            None if options.require_netns && ip.is_some() => {
                return Err(format!(
                    "annotation {NETNS_ANNOTATION} (path of the pod's network namespace) is required in local mode"
                ));
            }
            None => None,
        };
        let mtls_mode = match setting(metadata, MTLS_MODE) {
            Some(value) => mtls_mode(value)?,
            None => match namespace_object.and_then(|n| setting(&n.metadata, MTLS_MODE)) {
                Some(value) => mtls_mode(value).map_err(|e| format!("namespace {namespace}: {e}"))?,
                None => MtlsMode::Strict,
            },
        };
        Some(Membership { netns, mtls_mode })
    } else {
        None
    };
    let service_account = spec
        .and_then(|s| s.service_account_name.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".into());
    Ok(Some(WorkloadSpec {
        key: PodKey { namespace, name },
        node,
        ip,
        service_account,
        membership,
        services: BTreeMap::new(),
        authorization_policies: Vec::new(),
    }))
}

fn service_spec(service: &Service, options: &TranslateOptions) -> Result<ServiceSpec, String> {
    let name = service.metadata.name.clone().ok_or("metadata.name is required")?;
    let namespace = service.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let spec = service.spec.as_ref();
    let mut vips = Vec::new();
    let cluster_ips = spec.and_then(|s| s.cluster_ips.clone()).unwrap_or_default();
    let cluster_ip = spec.and_then(|s| s.cluster_ip.clone());
    for ip in cluster_ips.iter().chain(cluster_ip.iter()) {
        if ip == "None" || ip.is_empty() {
            continue; // headless
        }
        let ip: IpAddr = ip.parse().map_err(|_| format!("spec.clusterIP {ip:?} is not an IP address"))?;
        if !vips.contains(&ip) {
            vips.push(ip);
        }
    }
    let mut ports = Vec::new();
    for (index, port) in spec.and_then(|s| s.ports.as_ref()).into_iter().flatten().enumerate() {
        if port.protocol.as_deref().is_some_and(|p| p != "TCP") {
            continue; // the mesh carries TCP only
        }
        let number = u16::try_from(port.port).ok().filter(|p| *p != 0);
        let number = number.ok_or_else(|| format!("spec.ports[{index}].port {} is not a port", port.port))?;
        let target_port = match &port.target_port {
            Some(IntOrString::Int(n)) => IntOrString::Int(
                u16::try_from(*n)
                    .ok()
                    .filter(|p| *p != 0)
                    .map(i32::from)
                    .ok_or_else(|| format!("spec.ports[{index}].targetPort {n} is not a port"))?,
            ),
            Some(IntOrString::String(name)) => IntOrString::String(name.clone()),
            None => IntOrString::Int(i32::from(number)),
        };
        let app_protocol =
            port.app_protocol.clone().unwrap_or_else(|| protocol_from_name(port.name.as_deref()));
        ports.push(ServicePortSpec {
            port: number,
            target_port,
            app_protocol: app_protocol.to_ascii_lowercase(),
        });
    }
    Ok(ServiceSpec {
        hostname: format!("{name}.{namespace}.svc.{}", options.cluster_domain),
        namespace,
        name,
        vips,
        ports,
        traffic: TrafficPolicy::default(), // set by the caller, which reports bad annotations
    })
}

/// Istio's port naming convention: `http`, `http-web`, `grpc-api`, … name the protocol.
fn protocol_from_name(name: Option<&str>) -> String {
    let prefix = name.unwrap_or_default().split('-').next().unwrap_or_default().to_ascii_lowercase();
    match prefix.as_str() {
        "http" | "http2" | "grpc" | "tcp" | "tls" | "https" | "grpc-web" => prefix,
        _ => String::new(),
    }
}

/// Finds a service's workloads by label instead of looking at every workload of its namespace
/// and scanning every pod for each (quadratic at 10,000 pods): pods by key, workloads by their
/// pod's labels.
struct EndpointIndex<'a> {
    pods: HashMap<(&'a str, &'a str), &'a Pod>,
    /// (namespace, label key, label value) → indexes into the workloads.
    by_label: HashMap<(&'a str, &'a str, &'a str), Vec<usize>>,
    /// Namespace → indexes into the workloads (for namespace-wide policies).
    by_namespace: HashMap<String, Vec<usize>>,
}

impl<'a> EndpointIndex<'a> {
    fn new(pods: &'a [Pod], workloads: &[WorkloadSpec]) -> Self {
        let mut index =
            EndpointIndex { pods: HashMap::new(), by_label: HashMap::new(), by_namespace: HashMap::new() };
        for pod in pods {
            let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
            if let Some(name) = pod.metadata.name.as_deref() {
                index.pods.entry((namespace, name)).or_insert(pod);
            }
        }
        for (i, workload) in workloads.iter().enumerate() {
            index.by_namespace.entry(workload.key.namespace.clone()).or_default().push(i);
            let Some(pod) = index.pods.get(&(workload.key.namespace.as_str(), workload.key.name.as_str()))
            else {
                continue;
            };
            let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
            for (key, value) in pod.metadata.labels.iter().flatten() {
                index.by_label.entry((namespace, key, value)).or_default().push(i);
            }
        }
        index
    }
}

/// Adds the service's ports to every workload its selector picks (same namespace). A service
/// without a selector has no endpoints from pods (its Endpoints are managed elsewhere).
fn attach_endpoints(
    service: &Service,
    spec: &ServiceSpec,
    index: &EndpointIndex<'_>,
    workloads: &mut [WorkloadSpec],
) {
    let Some(selector) = service.spec.as_ref().and_then(|s| s.selector.as_ref()).filter(|s| !s.is_empty())
    else {
        return;
    };
    // Only workloads carrying the selector's first label can match all of it.
    let Some((first_key, first_value)) = selector.iter().next() else { return };
    let Some(candidates) =
        index.by_label.get(&(spec.namespace.as_str(), first_key.as_str(), first_value.as_str()))
    else {
        return;
    };
    let key = format!("{}/{}", spec.namespace, spec.hostname);
    for &i in candidates {
        let Some(workload) = workloads.get_mut(i) else { continue };
        if workload.ip.is_none() {
            continue;
        }
        let Some(pod) = index.pods.get(&(workload.key.namespace.as_str(), workload.key.name.as_str())) else {
            continue;
        };
        let labels = pod.metadata.labels.as_ref();
        if !selector.iter().all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v)) {
            continue;
        }
        let mappings: Vec<PortMapping> = spec
            .ports
            .iter()
            .filter_map(|port| {
                let target_port = match &port.target_port {
                    IntOrString::Int(n) => u16::try_from(*n).ok()?,
                    IntOrString::String(name) => named_port(pod, name)?,
                };
                Some(PortMapping { service_port: port.port, target_port })
            })
            .collect();
        if !mappings.is_empty() {
            workload.services.insert(key.clone(), mappings);
        }
    }
}

/// Resolves a named container port of a pod.
fn named_port(pod: &Pod, name: &str) -> Option<u16> {
    pod.spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(name))
        .and_then(|p| u16::try_from(p.container_port).ok())
}

#[cfg(test)]
mod tests;
