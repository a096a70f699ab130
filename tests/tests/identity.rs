//! End-to-end: mesh-node obtains workload certificates from a real mesh-control CA for exactly
//! the pods it enrols, and drops them when the pods go.

use std::time::{Duration, Instant};

use nodemesh_testbed::{NodeId, Topology};
use serde_json::Value;

fn certificates(topology: &Topology, node: NodeId) -> Vec<Value> {
    let body = topology.node_admin(node, "/certs").expect("admin /certs");
    let json: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(json["ca"], Value::Bool(true), "{body}");
    json["certificates"].as_array().cloned().unwrap_or_default()
}

/// Returns the identities with a current certificate, once every listed identity has one.
fn issued(topology: &Topology, node: NodeId, want: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let certs = certificates(topology, node);
        let done: Vec<String> = certs
            .iter()
            .filter(|c| c["serial"].is_string() && c["last_error"].is_null())
            .filter_map(|c| c["identity"].as_str().map(str::to_owned))
            .collect();
        if done.len() == want && certs.len() == want {
            return done;
        }
        assert!(Instant::now() < deadline, "{} certificates not issued in time: {certs:?}", node.name());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn nodes_obtain_certificates_for_exactly_their_enrolled_pods() {
    let mut topology = Topology::build("identity_certificates").expect("topology");
    topology.start_control_plane().expect("mesh-control");
    for node in NodeId::ALL {
        topology.start_node(node).expect("mesh-node");
    }
    let spiffe = |sa: &str| format!("spiffe://cluster.local/ns/demo/sa/{sa}");
    assert_eq!(issued(&topology, NodeId::A, 2), [spiffe("a1"), spiffe("a2")], "a3 is not enrolled");
    assert_eq!(issued(&topology, NodeId::B, 2), [spiffe("b1"), spiffe("b2")]);

    let metrics = topology.node_metrics(NodeId::A).expect("metrics");
    let gauge = format!(r#"nodemesh_workload_cert_expiry_timestamp_seconds{{identity="{}"}}"#, spiffe("a1"));
    let expiry: i64 = metrics
        .lines()
        .find(|l| l.starts_with(&gauge))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {gauge} in:\n{metrics}"));
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs() as i64;
    assert!(
        (now + 23 * 3600..=now + 24 * 3600 + 60).contains(&expiry),
        "default 24 h lifetime: {expiry} vs now {now}"
    );

    // A withdrawn pod's identity is no longer served.
    topology.set_enrolled("a2", false).expect("withdraw a2");
    assert_eq!(issued(&topology, NodeId::A, 1), [spiffe("a1")]);
}
