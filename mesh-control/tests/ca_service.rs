//! The CA over its real gRPC + TLS API: node authentication, node authorization, bad input.

mod common;

use common::{start, token};
use mesh_api::ca::v1::{
    CertificateRequest, WorkloadIdentity, certificate_service_client::CertificateServiceClient,
};
use mesh_control::tls::SERVER_NAME;
use mesh_control::{metrics::CaOutcome, service::NODE_HEADER};
use rcgen::{CertificateParams, KeyPair};
use tonic::{
    Code, Request,
    transport::{Certificate, Channel, ClientTlsConfig},
};
use x509_parser::prelude::*;

fn csr() -> String {
    let key = KeyPair::generate().expect("key");
    CertificateParams::default().serialize_request(&key).expect("csr").pem().expect("pem")
}

fn request(node: &str, token: &str, sa: &str, csr: String) -> Request<CertificateRequest> {
    let mut request = Request::new(CertificateRequest {
        csr,
        validity_duration: 3600,
        identity: Some(WorkloadIdentity { namespace: "demo".into(), service_account: sa.into() }),
    });
    request.metadata_mut().insert(NODE_HEADER, node.parse().expect("ascii"));
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("ascii"));
    request
}

#[tokio::test]
async fn node_obtains_the_identity_of_its_own_pod() {
    let h = start("issue").await;
    let mut client = CertificateServiceClient::new(h.channel.clone());
    let response = client
        .create_certificate(request("node-a", &token(&h, "node-a"), "web", csr()))
        .await
        .expect("issued");
    let response = response.into_inner();
    assert_eq!(response.cert_chain.len(), 2, "leaf then root");
    assert_eq!(response.trust_bundle.len(), 1);
    let der = ::pem::parse(&response.cert_chain[0]).expect("pem").into_contents();
    let (_, leaf) = X509Certificate::from_der(&der).expect("leaf");
    let san = leaf.subject_alternative_name().expect("ext").expect("san").value.general_names.clone();
    assert_eq!(format!("{san:?}"), r#"[URI("spiffe://cluster.local/ns/demo/sa/web")]"#);
    let lifetime = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    assert_eq!(lifetime, 3600 + 300, "requested validity (plus skew allowance)");
    assert_eq!(h.plane.service.metrics.requests(CaOutcome::Issued), 1);
}

#[tokio::test]
async fn refusals_are_precise_and_nothing_is_signed() {
    let h = start("refuse").await;
    let mut client = CertificateServiceClient::new(h.channel.clone());
    let (a, b) = (token(&h, "node-a"), token(&h, "node-b"));

    let cases: Vec<(Request<CertificateRequest>, Code, &str)> = vec![
        (
            request("node-a", &a, "db", csr()),
            Code::PermissionDenied,
            "spiffe://cluster.local/ns/demo/sa/db runs on node node-a",
        ),
        (request("node-a", &b, "web", csr()), Code::Unauthenticated, "unknown or its token is wrong"),
        (request("node-z", &a, "web", csr()), Code::Unauthenticated, "\"node-z\" is unknown"),
        (
            request(
                "node-a",
                &a,
                "web",
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".into(),
            ),
            Code::InvalidArgument,
            "malformed CSR",
        ),
        (
            request("node-a", &a, "Web!", csr()),
            Code::InvalidArgument,
            "service account \"Web!\" is not valid",
        ),
        (request("node-a", &a, "web", "x".repeat(20_000)), Code::InvalidArgument, "the limit is 16384"),
    ];
    for (req, code, message) in cases {
        let status = client.create_certificate(req).await.expect_err(message);
        assert_eq!(status.code(), code, "{status:?}");
        assert!(status.message().contains(message), "{:?} should contain {message:?}", status.message());
    }
    let missing = Request::new(CertificateRequest { csr: csr(), validity_duration: 0, identity: None });
    let status = client.create_certificate(missing).await.expect_err("no node");
    assert_eq!(status.code(), Code::Unauthenticated);

    // A message beyond the decoding limit is refused before it is parsed.
    let huge = request("node-a", &a, "web", "x".repeat(200_000));
    let status = client.create_certificate(huge).await.expect_err("too big");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");

    let metrics = &h.plane.service.metrics;
    assert_eq!(metrics.requests(CaOutcome::Issued), 0, "nothing was signed");
    assert_eq!(metrics.requests(CaOutcome::NotOnNode), 1);
    assert_eq!(metrics.requests(CaOutcome::Unauthenticated), 3);
    assert_eq!(metrics.requests(CaOutcome::InvalidRequest), 3);
    assert!(metrics.render().contains(r#"nodemesh_ca_requests_total{outcome="not_on_node"} 1"#));
}

#[tokio::test]
async fn plaintext_and_untrusted_clients_cannot_talk_to_the_ca() {
    let h = start("tls").await;
    let other_root = mesh_control::ca::RootCa::generate("cluster.local").expect("root");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(other_root.certificate_pem()))
        .domain_name(SERVER_NAME);
    let listener_addr = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let a = l.local_addr().expect("addr");
        tokio::spawn(h.plane.clone().serve(l));
        a
    };
    let untrusted = Channel::from_shared(format!("https://{listener_addr}"))
        .expect("uri")
        .tls_config(tls)
        .expect("tls")
        .connect()
        .await;
    assert!(untrusted.is_err(), "a client that does not trust the mesh root must not connect");
    let plain = Channel::from_shared(format!("http://{listener_addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("tcp connects");
    let status = CertificateServiceClient::new(plain)
        .create_certificate(request("node-a", &token(&h, "node-a"), "web", csr()))
        .await
        .expect_err("plaintext refused");
    assert_ne!(status.code(), Code::Ok);
    assert_eq!(h.plane.service.metrics.requests(CaOutcome::Issued), 0);
}
