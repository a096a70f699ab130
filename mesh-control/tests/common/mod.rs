//! A real control plane on loopback, over TLS, for the API tests.

#![allow(dead_code, reason = "each test file uses part of the harness")]

use std::{path::PathBuf, sync::Arc, time::Duration};

use mesh_control::{
    ca::TtlPolicy,
    control_plane::{Config, ControlPlane},
    tls::SERVER_NAME,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

pub const MANIFESTS: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {nodemesh.io/dataplane-mode: ambient}}
---
kind: Pod
metadata: {name: a1, namespace: demo, annotations: {nodemesh.io/netns: /run/netns/a1}}
spec: {nodeName: node-a, serviceAccountName: web}
status: {podIP: 10.1.1.2}
---
kind: Pod
metadata: {name: b1, namespace: demo, annotations: {nodemesh.io/netns: /run/netns/b1}}
spec: {nodeName: node-b, serviceAccountName: db}
status: {podIP: 10.1.2.2}
";

pub struct Harness {
    pub plane: Arc<ControlPlane>,
    pub channel: Channel,
    pub dir: PathBuf,
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub async fn start(name: &str) -> Harness {
    let dir = std::env::temp_dir().join(format!("nm-ca-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("config")).expect("dir");
    std::fs::write(dir.join("config/pods.yaml"), MANIFESTS).expect("manifests");
    let config = Config {
        config_dir: Some(dir.join("config")),
        state_dir: dir.join("state"),
        root_dir: None,
        trust_domain: "cluster.local".into(),
        ttl: TtlPolicy::default(),
        extra_roots: vec![],
        server_names: vec![],
        reload_interval: Duration::from_secs(60),
        netns_from_cni: false,
    };
    let plane = Arc::new(ControlPlane::open(config).expect("control plane"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(plane.clone().serve(listener));
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(plane.trust_bundle_pem()))
        .domain_name(SERVER_NAME);
    let channel = Channel::from_shared(format!("https://{addr}"))
        .expect("uri")
        .tls_config(tls)
        .expect("tls")
        .connect()
        .await
        .expect("connect over TLS");
    Harness { plane, channel, dir }
}

pub fn token(h: &Harness, node: &str) -> String {
    std::fs::read_to_string(h.plane.service.nodes.token_path(node))
        .expect("node token created for nodes with pods")
}
