//! The identity manager against a real mesh-control CA over gRPC + TLS, with short lifetimes.

use std::{path::PathBuf, sync::Arc, time::Duration};

use mesh_api::SpiffeId;
use mesh_control::{
    ca::TtlPolicy,
    control_plane::{Config, ControlPlane},
};
use tokio::task::JoinHandle;

use super::*;

const MANIFESTS: &str = "\
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

struct Ca {
    plane: Arc<ControlPlane>,
    address: String,
    server: JoinHandle<anyhow::Result<()>>,
    dir: PathBuf,
}

impl Drop for Ca {
    fn drop(&mut self) {
        self.server.abort();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn start_ca(name: &str) -> Ca {
    let dir = std::env::temp_dir().join(format!("nm-identity-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("config")).expect("dir");
    std::fs::write(dir.join("config/pods.yaml"), MANIFESTS).expect("manifests");
    let ttl = TtlPolicy {
        default: Duration::from_secs(4),
        min: Duration::from_secs(1),
        max: Duration::from_secs(60),
    };
    let config = Config {
        config_dir: Some(dir.join("config")),
        state_dir: dir.join("state"),
        root_dir: None,
        trust_domain: "cluster.local".into(),
        ttl,
        extra_roots: vec![],
        server_names: vec![],
        reload_interval: Duration::from_secs(60),
        netns_from_cni: false,
    };
    let plane = Arc::new(ControlPlane::open(config).expect("control plane"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = format!("https://{}", listener.local_addr().expect("addr"));
    let server = tokio::spawn(plane.clone().serve(listener));
    Ca { plane, address, server, dir }
}

/// A TCP forwarder to the CA whose connections can all be cut at once (a CA outage).
struct Outage {
    address: String,
    tasks: tokio::task::JoinSet<()>,
}

async fn forwarder(to: &str) -> Outage {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = format!("https://{}", listener.local_addr().expect("addr"));
    let target = to.trim_start_matches("https://").to_owned();
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        while let Ok((mut inbound, _)) = listener.accept().await {
            let target = target.clone();
            connections.spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    Outage { address, tasks }
}

fn manager(ca: &Ca, validity: Duration) -> Arc<IdentityManager> {
    manager_via(ca, &ca.address, validity)
}

fn manager_via(ca: &Ca, address: &str, validity: Duration) -> Arc<IdentityManager> {
    let token = std::fs::read_to_string(ca.plane.service.nodes.token_path("node-a")).expect("token");
    let control =
        crate::control_plane::ControlPlane::new(address, &ca.plane.trust_bundle_pem(), "node-a", &token)
            .expect("control plane");
    let client = CaClient::new(control, validity);
    IdentityManager::new(client, None)
}

fn web() -> SpiffeId {
    SpiffeId::new("cluster.local", "demo", "web").expect("id")
}

#[tokio::test]
async fn issues_renews_at_half_life_and_drops_unused_identities() {
    let ca = start_ca("renew").await;
    let identities = manager(&ca, Duration::from_secs(4));
    identities.acquire(&web());
    let first = identities.wait_for(&web(), Duration::from_secs(10)).await.expect("issued");
    assert_eq!(first.identity, web());
    assert_eq!(first.chain.len(), 2);
    assert_eq!(first.trust_bundle.len(), 1, "the CA's bundle comes with the certificate");
    let lifetime = first.not_after - first.received;
    assert!(lifetime.whole_seconds() <= 4, "requested lifetime: {lifetime}");

    // Renewal at half-life (about 2 s): a new certificate with a new key and serial.
    let started = std::time::Instant::now();
    let second = loop {
        let current = identities.current(&web()).expect("still certified");
        if current.serial != first.serial {
            break current;
        }
        assert!(started.elapsed() < Duration::from_secs(4), "renewed before the old certificate expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(second.not_after > first.not_after);
    assert_ne!(second.key.secret_der(), first.key.secret_der(), "a fresh key per renewal");
    let renewed_after = started.elapsed();
    assert!(renewed_after > Duration::from_millis(1200), "not before half-life: {renewed_after:?}");

    let status = identities.status();
    assert_eq!(status.len(), 1);
    assert_eq!((status[0].pods, status[0].last_error.as_deref()), (1, None));

    // A second pod with the same identity shares it; the last one to go drops it.
    identities.acquire(&web());
    identities.release(&web());
    assert!(identities.current(&web()).is_some());
    identities.release(&web());
    assert!(identities.current(&web()).is_none());
    assert!(identities.status().is_empty());
}

#[tokio::test]
async fn failed_renewal_keeps_the_valid_certificate_then_fails_closed_at_expiry() {
    let ca = start_ca("outage").await;
    let mut path = forwarder(&ca.address).await;
    let identities = manager_via(&ca, &path.address, Duration::from_secs(3));
    identities.acquire(&web());
    let issued = identities.wait_for(&web(), Duration::from_secs(10)).await.expect("issued");
    path.tasks.abort_all(); // the CA becomes unreachable: listener and open connections gone

    // Past half-life: renewal failed, the still-valid certificate stays in use.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let current = identities.current(&web()).expect("kept while valid");
    assert_eq!(current.serial, issued.serial);
    let status = identities.status();
    assert!(status[0].last_error.is_some(), "the failure is visible: {status:?}");

    // Past expiry: nothing is presented any more.
    let expired = tokio::time::timeout(Duration::from_secs(6), async {
        while identities.current(&web()).is_some() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(expired.is_ok(), "an expired certificate must be withdrawn");
}

#[tokio::test]
async fn identity_of_another_node_is_refused_with_the_reason() {
    let ca = start_ca("refused").await;
    let identities = manager(&ca, Duration::from_secs(60));
    let db = SpiffeId::new("cluster.local", "demo", "db").expect("id");
    identities.acquire(&db);
    let err = identities.wait_for(&db, Duration::from_secs(2)).await.expect_err("refused").to_string();
    assert!(err.contains("PermissionDenied") && err.contains("runs on node node-a"), "{err}");
}
