//! TLS for HBONE: TLS 1.3 only, ALPN `h2`, mutual authentication with workload certificates.
//!
//! webpki checks a server's certificate against a DNS name or IP; mesh peers are named by their
//! SPIFFE ID instead, so the client uses [`SpiffeVerifier`]: the chain must lead to a root of the
//! trust bundle **and** the leaf's only URI SAN must be exactly the identity the destination is
//! expected to have. The server requires a client certificate from the same bundle and reads the
//! client's identity from it.

use std::sync::Arc;

use mesh_api::SpiffeId;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, Error as TlsError, RootCertStore, ServerConfig,
    SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{ParsedCertificate, WebPkiClientVerifier},
};

use crate::identity::WorkloadCert;

/// ALPN protocol of HBONE.
pub const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum MtlsError {
    #[error("TLS configuration: {0}")]
    Config(#[from] TlsError),
    #[error("trust bundle: {0}")]
    Bundle(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(cert: &WorkloadCert) -> Result<Arc<RootCertStore>, MtlsError> {
    let mut roots = RootCertStore::empty();
    for root in &cert.trust_bundle {
        roots.add(root.clone()).map_err(|e| MtlsError::Bundle(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(MtlsError::Bundle("empty trust bundle".into()));
    }
    Ok(Arc::new(roots))
}

/// Returns the SPIFFE ID of a certificate: its one and only URI SAN.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, String> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert).map_err(|e| format!("unparsable certificate: {e}"))?;
    let uris: Vec<&str> = parsed
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match uris.as_slice() {
        [uri] => uri.parse().map_err(|e: mesh_api::IdentityError| e.to_string()),
        [] => Err("certificate has no URI SAN".into()),
        _ => Err(format!("certificate has {} URI SANs; a workload certificate has exactly one", uris.len())),
    }
}

/// Returns a certificate's serial number (hex), for logs.
pub fn serial_of(cert: &CertificateDer<'_>) -> String {
    x509_parser::parse_x509_certificate(cert).map(|(_, c)| c.raw_serial_as_string()).unwrap_or_default()
}

/// Returns when a certificate expires, or `None` when it cannot be parsed.
pub fn not_after_of(cert: &CertificateDer<'_>) -> Option<time::OffsetDateTime> {
    x509_parser::parse_x509_certificate(cert).ok().map(|(_, c)| c.validity().not_after.to_datetime())
}

/// Verifies a server by chain and exact SPIFFE ID.
#[derive(Debug)]
pub struct SpiffeVerifier {
    roots: Arc<RootCertStore>,
    expected: SpiffeId,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let actual = spiffe_id_of(end_entity).map_err(TlsError::General)?;
        if actual != self.expected {
            tracing::warn!(expected = %self.expected, presented = %actual, "peer presented the wrong identity");
            return Err(TlsError::InvalidCertificate(CertificateError::NotValidForName));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        Err(TlsError::General("TLS 1.2 is not allowed for HBONE".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Builds the client side of a tunnel: presents `own`, accepts only `expected`.
pub fn client_config(own: &WorkloadCert, expected: &SpiffeId) -> Result<ClientConfig, MtlsError> {
    let provider = provider();
    let verifier = SpiffeVerifier {
        roots: roots(own)?,
        expected: expected.clone(),
        algorithms: provider.signature_verification_algorithms,
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(own.chain.clone(), own.key.clone_key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // IP server names send no SNI, as HBONE wants; keep it off for any name.
    config.enable_sni = false;
    Ok(config)
}

/// Builds the server side of a pod's tunnel endpoint: presents `own`, requires a client
/// certificate from the trust bundle.
pub fn server_config(own: &WorkloadCert) -> Result<ServerConfig, MtlsError> {
    let provider = provider();
    let client_verifier = WebPkiClientVerifier::builder_with_provider(roots(own)?, provider.clone())
        .build()
        .map_err(|e| MtlsError::Bundle(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(own.chain.clone(), own.key.clone_key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests;
