//! The control plane's own TLS identity: a serving certificate signed by the mesh root, so
//! nodes verify mesh-control with the same trust bundle they use for workloads.

use std::net::IpAddr;

use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType};
use time::{Duration, OffsetDateTime};

use crate::ca::RootCa;

/// The DNS name every node uses to verify mesh-control, whatever address it dials.
pub const SERVER_NAME: &str = "mesh-control";

/// Issues a serving certificate for `extra_names` (DNS names or IPs) plus [`SERVER_NAME`].
/// Returns (certificate chain PEM, key PEM).
pub fn server_identity(root: &RootCa, extra_names: &[String]) -> Result<(String, String), rcgen::Error> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::minutes(5);
    params.not_after = now + Duration::days(90);
    params.is_ca = IsCa::ExplicitNoCa;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.distinguished_name.push(DnType::CommonName, SERVER_NAME);
    params.subject_alt_names.push(SanType::DnsName(SERVER_NAME.try_into()?));
    for name in extra_names {
        match name.parse::<IpAddr>() {
            Ok(ip) => params.subject_alt_names.push(SanType::IpAddress(ip)),
            Err(_) => params.subject_alt_names.push(SanType::DnsName(name.as_str().try_into()?)),
        }
    }
    let certificate = params.signed_by(&key, root.issuer())?;
    Ok((format!("{}{}", certificate.pem(), root.certificate_pem()), key.serialize_pem()))
}
