//! Which pods the test runs between: every node's enrolled pods (its `/pods` and `/certs`), their
//! labels from the manifests (local mode), and the choice of client and servers ([`plan`], pure).

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

use crate::{
    client,
    context::{Context, Endpoint},
};

/// An enrolled pod, as its node reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshPod {
    pub namespace: String,
    pub name: String,
    pub ip: Ipv4Addr,
    pub node: String,
    pub netns: PathBuf,
    pub service_account: String,
    /// Its SPIFFE ID, when its node holds a certificate for it.
    pub identity: Option<String>,
    /// Labels that select this pod and no other pod of its namespace (a Service's or a
    /// policy's selector), if it has such labels.
    pub selector: Option<BTreeMap<String, String>>,
}

impl MeshPod {
    /// Returns `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Returns the principal policies name it by (its SPIFFE ID without `spiffe://`).
    pub fn principal(&self) -> Option<&str> {
        self.identity.as_deref().and_then(|id| id.strip_prefix("spiffe://"))
    }
}

/// A node as the test uses it.
#[derive(Clone, Debug)]
pub struct NodeView {
    pub name: String,
    pub endpoint: Endpoint,
    /// Where capture is attached; probes run in a cgroup below it.
    pub pods_cgroup: PathBuf,
    /// Whether it has a CA (mutual TLS between pods).
    pub has_ca: bool,
}

/// Every reachable node and its enrolled pods.
#[derive(Clone, Debug, Default)]
pub struct Discovery {
    pub nodes: Vec<NodeView>,
    pub pods: Vec<MeshPod>,
    /// Nodes that did not answer, with why.
    pub unreachable: Vec<(String, String)>,
    /// Why the manifests could not be read for labels, if they could not.
    pub labels_error: Option<String>,
}

impl Discovery {
    /// Returns the node called `name`.
    pub fn node(&self, name: &str) -> anyhow::Result<&NodeView> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .with_context(|| format!("node {name} is not in the context"))
    }
}

/// Asks every node of the context for its pods and certificates, and reads the pods' labels
/// from `config_dir`.
pub fn discover(context: &Context, config_dir: &Path) -> anyhow::Result<Discovery> {
    let mut discovery = Discovery::default();
    for node in &context.nodes {
        let endpoint = node.endpoint();
        let answer = client::get_json(&endpoint, "/pods")
            .and_then(|pods| client::get_json(&endpoint, "/certs").map(|certs| (pods, certs)));
        let (pods, certs) = match answer {
            Ok(answer) => answer,
            Err(err) => {
                discovery.unreachable.push((node.name.clone(), format!("{err:#}")));
                continue;
            }
        };
        let Some(pods_cgroup) = pods["pods_cgroup"].as_str() else {
            bail!(
                "node {} does not say which cgroup its capture is attached to (mesh-node older than meshctl?)",
                node.name
            );
        };
        let identities: Vec<&str> = certs["certificates"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["serial"].is_string())
            .filter_map(|c| c["identity"].as_str())
            .collect();
        for pod in pods["pods"].as_array().into_iter().flatten() {
            let text = |field: &str| pod[field].as_str().unwrap_or_default().to_owned();
            let (namespace, service_account) = (text("namespace"), text("service_account"));
            let suffix = format!("/ns/{namespace}/sa/{service_account}");
            let Ok(ip) = text("ip").parse() else { continue };
            discovery.pods.push(MeshPod {
                identity: identities.iter().find(|id| id.ends_with(&suffix)).map(|id| (*id).to_owned()),
                namespace,
                name: text("name"),
                ip,
                node: node.name.clone(),
                netns: PathBuf::from(text("netns")),
                service_account,
                selector: None,
            });
        }
        discovery.nodes.push(NodeView {
            name: node.name.clone(),
            endpoint,
            pods_cgroup: PathBuf::from(pods_cgroup),
            has_ca: certs["ca"].as_bool().unwrap_or(false),
        });
    }
    match mesh_manifests::local::read(config_dir) {
        Ok(local) => {
            let labelled: Vec<(String, String, BTreeMap<String, String>)> = local
                .objects
                .pods
                .iter()
                .map(|p| {
                    let meta = &p.metadata;
                    (
                        meta.namespace.clone().unwrap_or_else(|| "default".into()),
                        meta.name.clone().unwrap_or_default(),
                        meta.labels.clone().unwrap_or_default(),
                    )
                })
                .collect();
            for pod in &mut discovery.pods {
                pod.selector = unique_selector(&labelled, &pod.namespace, &pod.name);
            }
        }
        Err(err) => discovery.labels_error = Some(err.to_string()),
    }
    discovery.pods.sort_by(|a, b| (&a.node, a.key()).cmp(&(&b.node, b.key())));
    Ok(discovery)
}

/// Returns the pod's labels if no other pod of its namespace carries all of them.
fn unique_selector(
    pods: &[(String, String, BTreeMap<String, String>)],
    namespace: &str,
    name: &str,
) -> Option<BTreeMap<String, String>> {
    let (_, _, labels) = pods.iter().find(|(ns, n, _)| ns == namespace && n == name)?;
    let selects = |other: &BTreeMap<String, String>| labels.iter().all(|(k, v)| other.get(k) == Some(v));
    let unique =
        !labels.is_empty() && !pods.iter().any(|(ns, n, l)| ns == namespace && n != name && selects(l));
    unique.then(|| labels.clone())
}

/// The pods a run uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub client: MeshPod,
    /// A server on another node than the client.
    pub cross_node: Option<MeshPod>,
    /// A server on the client's node.
    pub same_node: Option<MeshPod>,
}

impl Plan {
    /// Returns the server the service, wire and policy checks use: the cross-node one if any.
    pub fn primary(&self) -> &MeshPod {
        self.cross_node.as_ref().or(self.same_node.as_ref()).unwrap_or(&self.client)
    }
}

/// Finds `ns/name` (or a bare name, when only one namespace has it) among `pods`.
fn find<'a>(pods: &'a [MeshPod], wanted: &str) -> anyhow::Result<&'a MeshPod> {
    let matches: Vec<&MeshPod> = pods
        .iter()
        .filter(|p| match wanted.split_once('/') {
            Some((ns, name)) => p.namespace == ns && p.name == name,
            None => p.name == wanted,
        })
        .collect();
    match matches.as_slice() {
        [one] => Ok(one),
        [] => {
            let known: Vec<String> = pods.iter().map(MeshPod::key).collect();
            bail!("no enrolled pod {wanted} on the nodes of the context (enrolled: {})", known.join(", "))
        }
        several => {
            let keys: Vec<String> = several.iter().map(|p| p.key()).collect();
            bail!("{wanted} is ambiguous ({}): name it as namespace/pod", keys.join(", "))
        }
    }
}

/// Returns the pods other than `pod`.
fn others<'a>(pods: &'a [MeshPod], pod: &'a MeshPod) -> impl Iterator<Item = &'a MeshPod> + Clone + 'a {
    pods.iter().filter(move |p| p.key() != pod.key())
}

/// Chooses the client and the servers. Without `--client`, the client is a pod that has a
/// peer on another node and, if possible, one on its own node; without `--server`, the
/// cross-node server prefers a pod a Service can select alone (so the service check runs).
pub fn plan(pods: &[MeshPod], client: Option<&str>, server: Option<&str>) -> anyhow::Result<Plan> {
    if pods.is_empty() {
        bail!("no node of the context has an enrolled pod to test with");
    }
    let server = server.map(|s| find(pods, s)).transpose()?;
    let client = match client {
        Some(wanted) => find(pods, wanted)?,
        None => {
            // Rank: a server on another node, then a peer on its own node.
            let score = |c: &MeshPod| match server {
                Some(s) => {
                    (s.node != c.node, others(pods, c).any(|p| p.node == c.node && p.key() != s.key()))
                }
                None => {
                    (others(pods, c).any(|p| p.node != c.node), others(pods, c).any(|p| p.node == c.node))
                }
            };
            let candidates = pods.iter().filter(|c| server.is_none_or(|s| s.key() != c.key()));
            candidates
                .clone()
                .max_by_key(|c| (score(c), std::cmp::Reverse((&c.node, c.key()))))
                .unwrap_or(&pods[0])
        }
    };
    if server.is_some_and(|s| s.key() == client.key()) {
        bail!("the client and the server are the same pod ({})", client.key());
    }
    let (cross_node, same_node) = match server {
        Some(s) if s.node == client.node => (None, Some(s.clone())),
        Some(s) => {
            let peer = others(pods, client).find(|p| p.node == client.node && p.key() != s.key());
            (Some(s.clone()), peer.cloned())
        }
        None => {
            let remote = others(pods, client).filter(|p| p.node != client.node);
            let cross = remote.clone().find(|p| p.selector.is_some()).or_else(|| remote.clone().next());
            (cross.cloned(), others(pods, client).find(|p| p.node == client.node).cloned())
        }
    };
    if cross_node.is_none() && same_node.is_none() {
        bail!("{} is the only enrolled pod: there is nothing to connect to", client.key());
    }
    Ok(Plan { client: client.clone(), cross_node, same_node })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(node: &str, name: &str, labelled: bool) -> MeshPod {
        MeshPod {
            namespace: "demo".into(),
            name: name.into(),
            ip: Ipv4Addr::new(10, 1, 1, 2),
            node: node.into(),
            netns: PathBuf::from("/run/netns/x"),
            service_account: name.into(),
            identity: Some(format!("spiffe://cluster.local/ns/demo/sa/{name}")),
            selector: labelled.then(|| BTreeMap::from([("app".to_owned(), name.to_owned())])),
        }
    }

    fn names(plan: &Plan) -> (String, Option<String>, Option<String>) {
        (
            plan.client.name.clone(),
            plan.cross_node.as_ref().map(|p| p.name.clone()),
            plan.same_node.as_ref().map(|p| p.name.clone()),
        )
    }

    #[test]
    fn the_default_plan_spans_nodes_and_prefers_a_selectable_server() {
        let pods =
            [pod("a", "a1", false), pod("a", "a2", false), pod("b", "b1", false), pod("b", "b2", true)];
        let plan = plan(&pods, None, None).unwrap();
        assert_eq!(names(&plan), ("a1".into(), Some("b2".into()), Some("a2".into())));
        assert_eq!(plan.primary().name, "b2");
        assert_eq!(plan.client.principal(), Some("cluster.local/ns/demo/sa/a1"));
    }

    #[test]
    fn a_client_with_peers_on_both_nodes_is_preferred() {
        let pods = [pod("a", "a1", false), pod("b", "b1", false), pod("b", "b2", false)];
        assert_eq!(
            names(&plan(&pods, None, None).unwrap()),
            ("b1".into(), Some("a1".into()), Some("b2".into()))
        );
        let one_node = [pod("a", "a1", false), pod("a", "a2", false)];
        let plan = plan(&one_node, None, None).unwrap();
        assert_eq!(names(&plan), ("a1".into(), None, Some("a2".into())));
        assert_eq!(plan.primary().name, "a2");
    }

    #[test]
    fn named_pods_are_used_and_mistakes_are_named() {
        let pods = [pod("a", "a1", false), pod("a", "a2", false), pod("b", "b1", false)];
        let chosen = plan(&pods, Some("demo/a2"), Some("b1")).unwrap();
        assert_eq!(names(&chosen), ("a2".into(), Some("b1".into()), Some("a1".into())));
        let same = plan(&pods, Some("a1"), Some("a2")).unwrap();
        assert_eq!(names(&same), ("a1".into(), None, Some("a2".into())));
        let server_only = plan(&pods, None, Some("a1")).unwrap();
        assert_eq!(names(&server_only), ("b1".into(), Some("a1".into()), None), "a client across nodes");
        assert!(plan(&pods, Some("zz"), None).unwrap_err().to_string().contains("enrolled: demo/a1"));
        assert!(plan(&pods, Some("a1"), Some("demo/a1")).unwrap_err().to_string().contains("same pod"));
        assert!(plan(&pods[..1], None, None).unwrap_err().to_string().contains("nothing to connect to"));
        assert!(plan(&[], None, None).is_err());
    }

    #[test]
    fn a_selector_is_only_offered_when_it_picks_the_pod_alone() {
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
        };
        let pods = vec![
            ("demo".to_owned(), "web1".to_owned(), labels(&[("app", "web"), ("v", "1")])),
            ("demo".to_owned(), "web2".to_owned(), labels(&[("app", "web"), ("v", "2")])),
            ("demo".to_owned(), "big".to_owned(), labels(&[("app", "web"), ("v", "1"), ("x", "y")])),
            ("demo".to_owned(), "bare".to_owned(), labels(&[])),
            ("other".to_owned(), "web3".to_owned(), labels(&[("app", "web"), ("v", "2")])),
        ];
        assert_eq!(unique_selector(&pods, "demo", "web2"), Some(labels(&[("app", "web"), ("v", "2")])));
        assert_eq!(unique_selector(&pods, "demo", "web1"), None, "big carries web1's labels too");
        assert!(unique_selector(&pods, "demo", "big").is_some());
        assert_eq!(unique_selector(&pods, "demo", "bare"), None);
        assert_eq!(unique_selector(&pods, "demo", "missing"), None);
    }
}
