//! Real TLS handshakes between workload certificates signed by a real CA.

use std::sync::Arc;

use mesh_api::SpiffeId;
use mesh_control::ca::{CertificateAuthority, RootCa, TrustBundle, TtlPolicy};
use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, pem::PemObject as _};
use time::OffsetDateTime;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::*;

fn ca() -> CertificateAuthority {
    let root = RootCa::generate("cluster.local").expect("root");
    CertificateAuthority::new("cluster.local", root, TrustBundle::default(), TtlPolicy::default())
}

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "demo", sa).expect("id")
}

fn der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).expect("pem")
}

/// A workload certificate for `sa`, issued by `ca`.
fn workload(ca: &CertificateAuthority, sa: &str) -> WorkloadCert {
    let key = KeyPair::generate().expect("key");
    let csr = CertificateParams::default().serialize_request(&key).expect("csr").pem().expect("pem");
    let issued = ca.sign(&csr, &id(sa), 0).expect("signed");
    WorkloadCert {
        identity: id(sa),
        chain: issued.chain.iter().map(|p| der(p)).collect(),
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        trust_bundle: ca.trust_bundle().pems().iter().map(|p| der(p)).collect(),
        not_before: OffsetDateTime::now_utc(),
        not_after: issued.not_after,
        received: OffsetDateTime::now_utc(),
        serial: "test".into(),
    }
}

/// Runs a handshake; returns (client result, server's view of the client identity).
async fn handshake(
    client: &WorkloadCert,
    expected: &SpiffeId,
    server: &WorkloadCert,
) -> (Result<(), String>, Result<SpiffeId, String>) {
    let (c, s) = tokio::io::duplex(64 * 1024);
    let connector = TlsConnector::from(Arc::new(client_config(client, expected).expect("client config")));
    let acceptor = TlsAcceptor::from(Arc::new(server_config(server).expect("server config")));
    let name = ServerName::IpAddress(std::net::Ipv4Addr::new(10, 1, 2, 2).into());
    let (client_side, server_side) = tokio::join!(connector.connect(name, c), acceptor.accept(s));
    let client_result = client_side.map(|tls| {
        let (_, conn) = tls.get_ref();
        assert_eq!(conn.alpn_protocol(), Some(ALPN_H2));
        assert_eq!(conn.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
    });
    let server_view = server_side.map_err(|e| e.to_string()).and_then(|tls| {
        let (_, conn) = tls.get_ref();
        let peer = conn.peer_certificates().and_then(|c| c.first()).ok_or("no client certificate")?;
        spiffe_id_of(peer)
    });
    (client_result.map_err(|e| e.to_string()), server_view)
}

#[tokio::test]
async fn mutual_tls_with_the_expected_identities() {
    let ca = ca();
    let (a1, b1) = (workload(&ca, "a1"), workload(&ca, "b1"));
    let (client, server) = handshake(&a1, &id("b1"), &b1).await;
    client.expect("client accepts b1");
    assert_eq!(server.expect("server accepts a1"), id("a1"), "the server learns the client's identity");
}

#[tokio::test]
async fn a_peer_with_the_wrong_identity_is_refused() {
    let ca = ca();
    let (a1, b2) = (workload(&ca, "a1"), workload(&ca, "b2"));
    let (client, _) = handshake(&a1, &id("b1"), &b2).await;
    let err = client.expect_err("b2 is not b1");
    assert!(err.contains("NotValidForName") || err.contains("not valid for name"), "{err}");
}

#[tokio::test]
async fn a_peer_from_an_untrusted_ca_is_refused_both_ways() {
    let (ours, theirs) = (ca(), ca());
    let (a1, rogue_b1) = (workload(&ours, "a1"), workload(&theirs, "b1"));
    let (client, _) = handshake(&a1, &id("b1"), &rogue_b1).await;
    let err = client.expect_err("untrusted server");
    assert!(err.contains("UnknownIssuer") || err.contains("BadSignature"), "{err}");
    let (rogue_a1, b1) = (workload(&theirs, "a1"), workload(&ours, "b1"));
    let (_, server) = handshake(&rogue_a1, &id("b1"), &b1).await;
    assert!(server.is_err(), "the server refuses a client from another CA");
}

#[tokio::test]
async fn an_expired_certificate_is_refused() {
    let ca = ca();
    let a1 = workload(&ca, "a1");
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::default();
    params.not_before = OffsetDateTime::now_utc() - time::Duration::hours(2);
    params.not_after = OffsetDateTime::now_utc() - time::Duration::hours(1);
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    params.extended_key_usages =
        vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.subject_alt_names = vec![SanType::URI(id("b1").uri().try_into().expect("ia5"))];
    let leaf = params.signed_by(&key, ca.signer().issuer()).expect("sign");
    let mut expired = workload(&ca, "b1");
    expired.chain = vec![leaf.der().clone(), der(ca.signer().certificate_pem())];
    expired.key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let (client, _) = handshake(&a1, &id("b1"), &expired).await;
    let err = client.expect_err("expired");
    assert!(err.contains("certificate expired"), "{err}");
}

#[test]
fn spiffe_id_needs_exactly_one_uri_san() {
    let ca = ca();
    let cert = workload(&ca, "a1");
    assert_eq!(spiffe_id_of(&cert.chain[0]).expect("one"), id("a1"));
    let root = &cert.trust_bundle[0];
    assert!(spiffe_id_of(root).expect_err("root has none").contains("no URI SAN"));
}
