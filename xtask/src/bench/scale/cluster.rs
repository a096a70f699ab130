//! The synthetic cluster the scale bench feeds mesh-control: namespaces, pods spread over the
//! simulated nodes, services selecting them, written as the local-mode YAML mesh-control reads
//! (`--config-dir`), and the changes made to it one at a time. Pure: the files are returned as
//! text, the runner writes them.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::Ipv4Addr,
};

use serde::{Deserialize, Serialize};

/// Namespaces the pods and services are spread over (a divisor of the service counts, so every
/// service selects pods of its own namespace).
const NAMESPACES: u32 = 10;
/// Services per `services-NN.yaml` file: a service change rewrites one file, not all of them.
const SERVICES_PER_FILE: u32 = 100;

/// What a change does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChangeKind {
    /// A new pod on one node (its node file rewritten).
    AddPod,
    /// A service's port changed (its services file rewritten): the service and every workload
    /// it selects change.
    ServicePort,
    /// The pod the last `AddPod` made is deleted.
    DeletePod,
}

impl ChangeKind {
    /// Returns the short name used in tables.
    pub fn label(self) -> &'static str {
        match self {
            ChangeKind::AddPod => "add a pod",
            ChangeKind::ServicePort => "change a service port",
            ChangeKind::DeletePod => "delete a pod",
        }
    }
}

/// The resource whose arrival at a node means the change reached it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Watch {
    /// The xDS resource name (`Kubernetes//Pod/<ns>/<name>`, `<ns>/<hostname>`).
    pub name: String,
    /// Whether the change removes it (it must appear in `removed_resources`).
    pub removed: bool,
}

/// One change: the file to replace and what to wait for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub kind: ChangeKind,
    /// File name inside the config directory, and its new content.
    pub file: String,
    pub content: String,
    pub watch: Watch,
}

#[derive(Clone, Debug)]
struct PodDef {
    index: u32,
    namespace: u32,
    app: u32,
}

/// The cluster as generated and changed so far.
#[derive(Clone, Debug)]
pub struct Cluster {
    nodes: u32,
    /// Service index → its port.
    service_ports: Vec<u16>,
    /// Node → pod name → pod.
    pods: BTreeMap<u32, BTreeMap<String, PodDef>>,
    next_index: u32,
    /// Pods added by changes and not yet deleted: (node, name).
    added: Vec<(u32, String)>,
}

fn namespace_name(namespace: u32) -> String {
    format!("scale-{namespace}")
}

/// Returns the name of simulated node `node` (`node-007`).
pub fn node_name(node: u32) -> String {
    format!("node-{node:03}")
}

fn pod_name(index: u32) -> String {
    format!("pod-{index:05}")
}

fn service_name(service: u32) -> String {
    format!("svc-{service:04}")
}

fn node_file(node: u32) -> String {
    format!("node-{node:03}.yaml")
}

fn services_file(chunk: u32) -> String {
    format!("services-{chunk:02}.yaml")
}

/// The xDS name of a workload (mesh-control's `workload_uid`).
fn workload_resource(namespace: u32, name: &str) -> String {
    format!("Kubernetes//Pod/{}/{name}", namespace_name(namespace))
}

/// The xDS name of a service (`<ns>/<hostname>`).
fn service_resource(service: u32) -> String {
    let ns = namespace_name(service % NAMESPACES);
    format!("{ns}/{}.{ns}.svc.cluster.local", service_name(service))
}

impl Cluster {
    /// Returns a cluster of `workloads` pods spread round-robin over `nodes` nodes and
    /// `NAMESPACES` namespaces, and `services` services; pod `i` is selected by service
    /// `i % services` (when it is in that service's namespace).
    pub fn new(workloads: u32, services: u32, nodes: u32) -> Cluster {
        let nodes = nodes.max(1);
        let mut cluster = Cluster {
            nodes,
            service_ports: vec![80; services as usize],
            pods: (0..nodes).map(|n| (n, BTreeMap::new())).collect(),
            next_index: 0,
            added: Vec::new(),
        };
        for _ in 0..workloads {
            cluster.add_pod();
        }
        cluster
    }

    /// Adds the next pod; returns its node and name.
    fn add_pod(&mut self) -> (u32, String) {
        let index = self.next_index;
        self.next_index += 1;
        let node = index % self.nodes;
        let app = match self.service_ports.len() as u32 {
            0 => 0,
            services => index % services,
        };
        let name = pod_name(index);
        let pod = PodDef { index, namespace: index % NAMESPACES, app };
        self.pods.entry(node).or_default().insert(name.clone(), pod);
        (node, name)
    }

    /// Returns every file of the config directory: (name, content).
    pub fn files(&self) -> Vec<(String, String)> {
        let mut files = vec![("namespaces.yaml".to_owned(), self.render_namespaces())];
        let chunks = (self.service_ports.len() as u32).div_ceil(SERVICES_PER_FILE);
        files.extend((0..chunks).map(|c| (services_file(c), self.render_services(c))));
        files.extend((0..self.nodes).map(|n| (node_file(n), self.render_node(n))));
        files
    }

    /// Returns the xDS address names a node holding the whole current state has.
    pub fn expected_addresses(&self) -> BTreeSet<String> {
        let workloads = self
            .pods
            .values()
            .flat_map(|p| p.iter())
            .map(|(name, pod)| workload_resource(pod.namespace, name));
        let services = (0..self.service_ports.len() as u32).map(service_resource);
        workloads.chain(services).collect()
    }

    /// Makes change number `i` (0, 1, 2, …): adds a pod, changes a service's port, deletes the
    /// pod added last, in turn. Returns the file to replace and the resource to watch for.
    pub fn change(&mut self, i: u32) -> Change {
        let services = self.service_ports.len() as u32;
        match (i % 3, services) {
            (1, 1..) => {
                let service = (i / 3) % services;
                // A port it has not had: 1000 + i is new each time, and never the initial 80.
                self.service_ports[service as usize] = 1000 + (i % 60_000) as u16;
                let chunk = service / SERVICES_PER_FILE;
                Change {
                    kind: ChangeKind::ServicePort,
                    file: services_file(chunk),
                    content: self.render_services(chunk),
                    watch: Watch { name: service_resource(service), removed: false },
                }
            }
            (2, _) if !self.added.is_empty() => {
                let (node, name) = self.added.pop().unwrap_or_default();
                let pod = self.pods.get_mut(&node).and_then(|pods| pods.remove(&name));
                let namespace = pod.map_or(0, |p| p.namespace);
                Change {
                    kind: ChangeKind::DeletePod,
                    file: node_file(node),
                    content: self.render_node(node),
                    watch: Watch { name: workload_resource(namespace, &name), removed: true },
                }
            }
            _ => {
                let (node, name) = self.add_pod();
                self.added.push((node, name.clone()));
                let namespace = self.pods[&node][&name].namespace;
                Change {
                    kind: ChangeKind::AddPod,
                    file: node_file(node),
                    content: self.render_node(node),
                    watch: Watch { name: workload_resource(namespace, &name), removed: false },
                }
            }
        }
    }

    fn render_namespaces(&self) -> String {
        (0..NAMESPACES)
            .map(|n| {
                format!(
                    "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {}\n  labels:\n    nodemesh.io/dataplane-mode: ambient\n",
                    namespace_name(n)
                )
            })
            .collect::<Vec<_>>()
            .join("---\n")
    }

    fn render_services(&self, chunk: u32) -> String {
        let first = chunk * SERVICES_PER_FILE;
        let last = (first + SERVICES_PER_FILE).min(self.service_ports.len() as u32);
        (first..last)
            .map(|s| {
                let vip = Ipv4Addr::from(0x0a60_0001 + s); // 10.96.0.1 onwards
                format!(
                    "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  clusterIP: {vip}\n  \
                     selector:\n    app: {name}\n  ports:\n  - name: http\n    port: {port}\n    targetPort: http\n",
                    name = service_name(s),
                    ns = namespace_name(s % NAMESPACES),
                    port = self.service_ports[s as usize],
                )
            })
            .collect::<Vec<_>>()
            .join("---\n")
    }

    fn render_node(&self, node: u32) -> String {
        let mut yaml = String::new();
        for (name, pod) in self.pods.get(&node).into_iter().flatten() {
            if !yaml.is_empty() {
                yaml.push_str("---\n");
            }
            let _ = write!(
                yaml,
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels:\n    app: {app}\n  \
                 annotations:\n    nodemesh.io/netns: /run/netns/{name}\nspec:\n  nodeName: {node}\n  \
                 serviceAccountName: {app}\n  containers:\n  - name: app\n    image: app\n    ports:\n    \
                 - name: http\n      containerPort: 8080\nstatus:\n  podIP: {ip}\n",
                ns = namespace_name(pod.namespace),
                app = service_name(pod.app),
                node = node_name(node),
                ip = Ipv4Addr::from(0x0a00_0001 + pod.index), // 10.0.0.1 onwards
            );
        }
        yaml
    }
}

#[cfg(test)]
mod tests {
    use super::{ChangeKind, Cluster};

    #[test]
    fn pods_spread_over_nodes_and_every_object_has_a_file() {
        let cluster = Cluster::new(100, 10, 5);
        let files = cluster.files();
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "namespaces.yaml",
                "services-00.yaml",
                "node-000.yaml",
                "node-001.yaml",
                "node-002.yaml",
                "node-003.yaml",
                "node-004.yaml"
            ]
        );
        let pods: usize = files.iter().map(|(_, text)| text.matches("kind: Pod\n").count()).sum();
        assert_eq!(pods, 100);
        assert_eq!(files[2].1.matches("kind: Pod\n").count(), 20, "20 pods per node");
        assert!(files[2].1.contains("nodeName: node-000") && !files[2].1.contains("node-001"));
        assert_eq!(cluster.expected_addresses().len(), 110, "100 workloads and 10 services");
        assert!(cluster.expected_addresses().contains("Kubernetes//Pod/scale-3/pod-00013"));
        assert!(cluster.expected_addresses().contains("scale-3/svc-0003.scale-3.svc.cluster.local"));
    }

    #[test]
    fn a_service_selects_pods_of_its_own_namespace() {
        let cluster = Cluster::new(40, 20, 4);
        let files = cluster.files();
        // Pod 23: namespace 3, app svc-0003, which lives in namespace scale-3.
        let node3 = &files.iter().find(|(n, _)| n == "node-003.yaml").expect("node 3").1;
        assert!(node3.contains("name: pod-00023\n  namespace: scale-3\n  labels:\n    app: svc-0003\n"));
        assert!(files[1].1.contains("name: svc-0003\n  namespace: scale-3\nspec:\n  clusterIP: 10.96.0.4\n"));
    }

    #[test]
    fn changes_add_change_and_delete_in_turn() {
        let mut cluster = Cluster::new(10, 4, 2);
        let before = cluster.expected_addresses();

        let add = cluster.change(0);
        assert_eq!(add.kind, ChangeKind::AddPod);
        assert_eq!((add.file.as_str(), add.watch.removed), ("node-000.yaml", false), "pod 10 goes to node 0");
        assert_eq!(add.watch.name, "Kubernetes//Pod/scale-0/pod-00010");
        assert!(add.content.contains("name: pod-00010"));
        assert_eq!(cluster.expected_addresses().len(), before.len() + 1);

        let port = cluster.change(1);
        assert_eq!(port.kind, ChangeKind::ServicePort);
        assert_eq!(port.file, "services-00.yaml");
        assert_eq!(port.watch.name, "scale-0/svc-0000.scale-0.svc.cluster.local");
        assert!(port.content.contains("port: 1001\n"), "{}", port.content);

        let delete = cluster.change(2);
        assert_eq!(delete.kind, ChangeKind::DeletePod);
        assert_eq!(delete.watch.name, add.watch.name);
        assert!(delete.watch.removed);
        assert!(!delete.content.contains("pod-00010"));
        assert_eq!(cluster.expected_addresses(), before, "the added pod is gone again");

        let next = cluster.change(4);
        assert_eq!(next.watch.name, "scale-1/svc-0001.scale-1.svc.cluster.local", "the next service");
    }

    #[test]
    fn without_services_every_change_still_changes_something() {
        let mut cluster = Cluster::new(3, 0, 1);
        assert_eq!(cluster.change(1).kind, ChangeKind::AddPod);
        assert_eq!(cluster.change(2).kind, ChangeKind::DeletePod);
    }
}
