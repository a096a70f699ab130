//! The node's client of mesh-control's CA.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use mesh_api::{
    SpiffeId,
    ca::v1::{CertificateRequest, WorkloadIdentity, certificate_service_client::CertificateServiceClient},
};
use rcgen::{CertificateParams, KeyPair};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject as _};
use time::OffsetDateTime;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

use super::WorkloadCert;

/// The name mesh-control's serving certificate carries, whatever address is dialled.
const CONTROL_PLANE_NAME: &str = "mesh-control";
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum CaClientError {
    #[error("invalid control plane address {0:?}")]
    Address(String),
    #[error("control plane TLS configuration: {0}")]
    Tls(String),
    #[error("the CA refused: {code:?}: {message}")]
    Refused { code: tonic::Code, message: String },
    #[error("cannot generate a key or CSR: {0}")]
    Key(#[from] rcgen::Error),
    #[error("the CA answered with an unusable certificate: {0}")]
    BadResponse(String),
}

/// Where the CA is and how this node proves who it is.
#[derive(Clone, Debug)]
pub struct CaClientConfig {
    /// `https://host:port`.
    pub address: String,
    /// PEM roots that sign mesh-control's serving certificate (the mesh trust bundle).
    pub trust_roots_pem: String,
    pub node: String,
    pub token: String,
    /// Requested certificate lifetime; 0 = the CA's default.
    pub validity: Duration,
}

#[derive(Debug, Clone)]
pub struct CaClient {
    config: CaClientConfig,
    /// The roots mesh-control is verified with, and the client using them: the configured roots
    /// until the CA first answers, then the trust bundle it sends, so the node keeps trusting
    /// mesh-control while its root is rotated.
    grpc: Arc<Mutex<(String, CertificateServiceClient<Channel>)>>,
}

impl CaClient {
    /// Prepares a client; the connection is made (and re-made) on demand.
    pub fn new(config: CaClientConfig) -> Result<Self, CaClientError> {
        let grpc = connect(&config.address, &config.trust_roots_pem)?;
        let roots = config.trust_roots_pem.clone();
        Ok(CaClient { config, grpc: Arc::new(Mutex::new((roots, grpc))) })
    }

    /// Verifies mesh-control with `bundle` from now on, if it differs from the roots in use.
    fn follow_bundle(&self, bundle: &[String]) -> Result<(), CaClientError> {
        let pem = bundle.concat();
        let mut grpc = self.grpc.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if grpc.0 != pem {
            *grpc = (pem.clone(), connect(&self.config.address, &pem)?);
            tracing::info!(roots = bundle.len(), "verifying mesh-control with the CA's trust bundle");
        }
        Ok(())
    }

    /// Generates a key, asks the CA to certify it for `identity`, and checks the answer.
    pub async fn request(&self, identity: &SpiffeId) -> Result<WorkloadCert, CaClientError> {
        let key = KeyPair::generate()?;
        let csr = CertificateParams::default().serialize_request(&key)?.pem()?;
        let mut request = tonic::Request::new(CertificateRequest {
            csr,
            validity_duration: self.config.validity.as_secs() as i64,
            identity: Some(WorkloadIdentity {
                namespace: identity.namespace().to_owned(),
                service_account: identity.service_account().to_owned(),
            }),
        });
        let metadata = request.metadata_mut();
        metadata.insert(
            "x-nodemesh-node",
            self.config.node.parse().map_err(|_| CaClientError::Address(self.config.node.clone()))?,
        );
        metadata.insert(
            "authorization",
            format!("Bearer {}", self.config.token)
                .parse()
                .map_err(|_| CaClientError::Tls("node token is not ASCII".into()))?,
        );
        let mut grpc = self.grpc.lock().unwrap_or_else(std::sync::PoisonError::into_inner).1.clone();
        let response = grpc
            .create_certificate(request)
            .await
            .map_err(|s| CaClientError::Refused { code: s.code(), message: s.message().to_owned() })?
            .into_inner();
        let parse = |pems: &[String]| -> Result<Vec<CertificateDer<'static>>, CaClientError> {
            pems.iter()
                .map(|p| {
                    CertificateDer::from_pem_slice(p.as_bytes())
                        .map_err(|e| CaClientError::BadResponse(e.to_string()))
                })
                .collect()
        };
        let chain = parse(&response.cert_chain)?;
        let trust_bundle = parse(&response.trust_bundle)?;
        if trust_bundle.is_empty() {
            return Err(CaClientError::BadResponse("empty trust bundle".into()));
        }
        let leaf =
            chain.first().ok_or_else(|| CaClientError::BadResponse("empty certificate chain".into()))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| CaClientError::BadResponse(e.to_string()))?;
        match crate::tls::spiffe_id_of(leaf) {
            Ok(named) if named == *identity => {}
            Ok(named) => {
                return Err(CaClientError::BadResponse(format!("certificate names {named}, not {identity}")));
            }
            Err(problem) => return Err(CaClientError::BadResponse(problem)),
        }
        self.follow_bundle(&response.trust_bundle)?;
        let when = |t: x509_parser::time::ASN1Time| {
            OffsetDateTime::from_unix_timestamp(t.timestamp())
                .map_err(|e| CaClientError::BadResponse(e.to_string()))
        };
        Ok(WorkloadCert {
            identity: identity.clone(),
            not_before: when(parsed.validity().not_before)?,
            not_after: when(parsed.validity().not_after)?,
            received: OffsetDateTime::now_utc(),
            serial: parsed.raw_serial_as_string(),
            chain,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            trust_bundle,
        })
    }
}

/// A lazily connecting client that verifies mesh-control with `roots_pem`.
fn connect(address: &str, roots_pem: &str) -> Result<CertificateServiceClient<Channel>, CaClientError> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(roots_pem))
        .domain_name(CONTROL_PLANE_NAME);
    let channel = Channel::from_shared(address.to_owned())
        .map_err(|_| CaClientError::Address(address.to_owned()))?
        .timeout(REQUEST_TIMEOUT)
        .connect_timeout(REQUEST_TIMEOUT)
        .tls_config(tls)
        .map_err(|e| CaClientError::Tls(e.to_string()))?
        .connect_lazy();
    Ok(CertificateServiceClient::new(channel))
}
