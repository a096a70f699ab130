//! End-to-end: mTLS fails closed against hand-made rogue peers. A rogue server stands where a
//! meshed pod's `:15008` should be, and rogue clients dial a meshed pod's `:15008`, each with a
//! certificate that must not pass: the wrong identity, expired, from an untrusted CA, or with no
//! SPIFFE ID at all.

use std::{net::SocketAddr, time::Duration};

use nodemesh_testbed::{
    NodeId, Topology, eventually,
    rogue::{self, Flaw, RogueServer},
};

const PORT: u16 = 8080;
const HBONE: u16 = 15008;
/// How long node A may take to record what its client already saw.
const WAIT: Duration = Duration::from_secs(5);

fn spiffe(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/demo/sa/{sa}")
}

fn meshed(test: &str) -> Topology {
    let topology = Topology::build(test).expect("topology");
    topology.start_meshed(&[]).expect("meshed topology");
    topology
}

/// What node A must have logged when it refused a rogue server with this flaw.
fn refusal(flaw: Flaw) -> &'static str {
    match flaw {
        Flaw::WrongIdentity => "peer presented the wrong identity",
        Flaw::Expired => "expired",
        Flaw::UntrustedCa => "UnknownIssuer",
        Flaw::NoSpiffeId => "certificate has no URI SAN",
    }
}

#[test]
fn a_rogue_server_in_place_of_a_meshed_pod_is_refused_and_the_client_fails() {
    let topology = meshed("rogue_server");
    let b1 = topology.pod("b1").ip;
    // Node B is gone; a rogue takes b1's HBONE port with a certificate it made itself.
    topology.kill_node(NodeId::B).expect("kill node-b");
    let flaws = [Flaw::WrongIdentity, Flaw::Expired, Flaw::UntrustedCa, Flaw::NoSpiffeId];
    for (i, flaw) in flaws.into_iter().enumerate() {
        let cert = rogue::certificate(&topology.control_root_dir(), &spiffe("b1"), flaw).expect("rogue cert");
        let server = RogueServer::start(&topology.netns_name("b1"), SocketAddr::from((b1, HBONE)), cert)
            .expect("rogue server");
        let log_before = topology.node_log_text(NodeId::A).len();
        let report = topology.client("a1", SocketAddr::from((b1, PORT)), 1024, 1).expect("client");
        let seen = server.stop();

        assert_eq!(report.succeeded, 0, "{flaw:?}: the client's connection must fail: {report:?}");
        assert_eq!(report.bytes_received, 0, "{flaw:?}: nothing came back");
        assert!(seen.connections >= 1, "{flaw:?}: the tunnel did reach the rogue: {seen:?}");
        assert_eq!(seen.handshakes_completed, 0, "{flaw:?}: node-a never finished a handshake: {seen:?}");
        // node-a logs and counts the refusal just after it closes the client's connection.
        eventually(&format!("{flaw:?}: node-a says why ({})", refusal(flaw)), WAIT, || {
            topology.node_log_text(NodeId::A)[log_before..].contains(refusal(flaw)).then_some(())
        });
        let failed = || topology.node_pods(NodeId::A).ok()?.pod("a1").map(|a1| a1.outbound.failed);
        eventually(&format!("{flaw:?}: counted as failure {}", i + 1), WAIT, || {
            (failed()? == i as u64 + 1).then_some(())
        });
    }
}

#[test]
fn rogue_clients_are_refused_by_a_meshed_pods_tunnel_endpoint() {
    let topology = meshed("rogue_client");
    topology.serve("b1", PORT).expect("server");
    let b1 = SocketAddr::from((topology.pod("b1").ip, HBONE));
    // a3 is not in the mesh, so nothing captures its connection to b1:15008.
    let from = topology.netns_name("a3");
    let dial = |flaw: Option<Flaw>| {
        let cert =
            flaw.map(|f| rogue::certificate(&topology.control_root_dir(), &spiffe("a3"), f).expect("cert"));
        rogue::dial(&from, b1, cert).expect("dial")
    };

    // The control: a certificate from the mesh CA (here, for an identity no pod has) passes
    // the TLS layer and gets HTTP/2 SETTINGS back, so the refusals below are the certificates'.
    let accepted = dial(Some(Flaw::WrongIdentity));
    assert!(accepted.as_ref().is_ok_and(|n| *n > 0), "a mesh certificate is answered: {accepted:?}");

    for flaw in [None, Some(Flaw::Expired), Some(Flaw::UntrustedCa), Some(Flaw::NoSpiffeId)] {
        let refused = dial(flaw);
        assert!(refused.is_err(), "{flaw:?}: b1's tunnel endpoint must refuse: {refused:?}");
    }

    let log = topology.node_log_text(NodeId::B);
    assert_eq!(log.matches("HBONE mTLS handshake refused").count(), 3, "{log}");
    assert_eq!(log.matches("HBONE client certificate has no usable identity").count(), 1, "{log}");
    std::thread::sleep(Duration::from_millis(200));
    let pods = topology.node_pods(NodeId::B).expect("pods");
    assert_eq!(pods.pod("b1").expect("b1").inbound.connections, 0, "nothing reached b1's app");
}
