use std::time::Duration;

use mesh_api::SpiffeId;
use rcgen::{CertificateParams, KeyPair, SanType};
use x509_parser::{extensions::GeneralName, prelude::*};

use super::*;

fn ca_with(ttl: TtlPolicy) -> CertificateAuthority {
    let root = RootCa::generate("cluster.local").expect("root");
    CertificateAuthority::new("cluster.local", root, TrustBundle::default(), ttl)
}

fn csr_pem(sans: Vec<SanType>) -> String {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    params.serialize_request(&key).expect("csr").pem().expect("pem")
}

fn identity(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", ns, sa).expect("identity")
}

fn der_of(pem_text: &str) -> Vec<u8> {
    ::pem::parse(pem_text).expect("pem").into_contents()
}

#[test]
fn issues_an_svid_with_exactly_the_attested_uri_san() {
    let ca = ca_with(TtlPolicy::default());
    // The CSR asks for another identity: it must be ignored.
    let evil = SanType::URI("spiffe://cluster.local/ns/kube-system/sa/admin".try_into().expect("ia5"));
    let issued = ca.sign(&csr_pem(vec![evil]), &identity("demo", "a1"), 0).expect("signed");
    assert_eq!(issued.chain.len(), 2, "leaf then root");
    assert_eq!(issued.chain[1], ca.signer().certificate_pem());

    let leaf_der = der_of(&issued.chain[0]);
    let (_, leaf) = X509Certificate::from_der(&leaf_der).expect("parse leaf");
    let sans = leaf.subject_alternative_name().expect("ext").expect("has SAN").value.general_names.clone();
    assert_eq!(sans, vec![GeneralName::URI("spiffe://cluster.local/ns/demo/sa/a1")]);
    let constraints = leaf.basic_constraints().expect("ext").expect("present").value;
    assert!(!constraints.ca, "leaf is not a CA");
    let lifetime = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    assert_eq!(lifetime, 24 * 3600 + 5 * 60, "default TTL plus clock-skew allowance");

    let root_der = der_of(&issued.chain[1]);
    let (_, root) = X509Certificate::from_der(&root_der).expect("parse root");
    leaf.verify_signature(Some(root.public_key())).expect("leaf signed by the root");
}

#[test]
fn ttl_is_defaulted_and_clamped() {
    let policy = TtlPolicy {
        default: Duration::from_secs(3600),
        min: Duration::from_secs(600),
        max: Duration::from_secs(7200),
    };
    assert_eq!(policy.grant(0).expect("ok"), Duration::from_secs(3600));
    assert_eq!(policy.grant(60).expect("ok"), Duration::from_secs(600));
    assert_eq!(policy.grant(1_000_000).expect("ok"), Duration::from_secs(7200));
    assert!(matches!(policy.grant(-1), Err(CaError::NegativeValidity(-1))));
}

#[test]
fn refuses_bad_requests_and_signs_nothing() {
    let ca = ca_with(TtlPolicy::default());
    let id = identity("demo", "a1");
    let good = csr_pem(vec![]);

    let tampered = {
        let mut der = der_of(&good);
        let last = der.len() - 1;
        der[last] ^= 0xff;
        ::pem::encode(&::pem::Pem::new("CERTIFICATE REQUEST", der))
    };
    for (csr, expected) in [
        ("not a csr".to_owned(), "malformed CSR"),
        (tampered, "malformed CSR"),
        ("x".repeat(MAX_CSR_BYTES + 1), "the limit is 16384"),
    ] {
        let err = ca.sign(&csr, &id, 0).expect_err(expected).to_string();
        assert!(err.contains(expected), "{err}");
    }
    let other_domain = SpiffeId::new("evil.example", "demo", "a1").expect("id");
    let err = ca.sign(&good, &other_domain, 0).expect_err("wrong domain").to_string();
    assert!(err.contains("not in this CA's trust domain cluster.local"), "{err}");
    assert!(ca.sign(&good, &id, -5).is_err());
}

#[test]
fn root_is_generated_once_persisted_privately_and_reloaded() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = std::env::temp_dir().join(format!("nm-ca-root-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (first, created) = RootCa::load_or_generate(&dir, "cluster.local").expect("generate");
    assert!(created);
    let mode = std::fs::metadata(dir.join(root::KEY_FILE)).expect("key file").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the root key is private");
    let (again, created) = RootCa::load_or_generate(&dir, "cluster.local").expect("load");
    assert!(!created);
    assert_eq!(first.certificate_pem(), again.certificate_pem(), "the same root after a restart");

    // A reloaded root still signs certificates that chain to it.
    let ca = CertificateAuthority::new("cluster.local", again, TrustBundle::default(), TtlPolicy::default());
    assert!(ca.sign(&csr_pem(vec![]), &identity("demo", "a1"), 0).is_ok());

    std::fs::remove_file(dir.join(root::KEY_FILE)).expect("remove key");
    let err = RootCa::load_or_generate(&dir, "cluster.local").expect_err("half present").to_string();
    assert!(err.contains("give both or neither"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn trust_bundle_is_a_set_of_ca_roots() {
    let (a, b) =
        (RootCa::generate("cluster.local").expect("a"), RootCa::generate("cluster.local").expect("b"));
    let mut bundle = TrustBundle::default();
    assert_eq!(bundle.add(a.certificate_pem()).expect("add"), 1);
    assert_eq!(bundle.add(a.certificate_pem()).expect("dup"), 0, "duplicates are ignored");
    let both = format!("{}{}", a.certificate_pem(), b.certificate_pem());
    assert_eq!(bundle.add(&both).expect("add two"), 1);
    assert_eq!(bundle.len(), 2);

    let ca = CertificateAuthority::new("cluster.local", b, bundle.clone(), TtlPolicy::default());
    assert_eq!(ca.trust_bundle().len(), 2, "old and new root while rotating");
    let leaf = ca.sign(&csr_pem(vec![]), &identity("demo", "a1"), 0).expect("signed");
    let mut not_a_ca = TrustBundle::default();
    assert!(not_a_ca.add(&leaf.chain[0]).expect_err("leaf").to_string().contains("not a CA certificate"));

    let a_der = bundle.ders().next().expect("a").clone();
    assert!(bundle.remove(&a_der));
    assert_eq!(bundle.len(), 1);
}
