//! The node's client of mesh-control's CA.

use std::time::Duration;

use super::WorkloadCert;
use crate::control_plane::{ControlPlane, ControlPlaneError};
use mesh_api::{
    SpiffeId,
    ca::v1::{CertificateRequest, WorkloadIdentity, certificate_service_client::CertificateServiceClient},
};
use rcgen::{CertificateParams, KeyPair};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum CaClientError {
    #[error(transparent)]
    ControlPlane(#[from] ControlPlaneError),
    #[error("the CA refused: {code:?}: {message}")]
    Refused { code: tonic::Code, message: String },
    #[error("cannot generate a key or CSR: {0}")]
    Key(#[from] rcgen::Error),
    #[error("the CA answered with an unusable certificate: {0}")]
    BadResponse(String),
}

/// The node's CA client.
#[derive(Debug, Clone)]
pub struct CaClient {
    control: ControlPlane,
    /// Requested certificate lifetime; 0 = the CA's default.
    validity: Duration,
}

impl CaClient {
    pub fn new(control: ControlPlane, validity: Duration) -> Self {
        CaClient { control, validity }
    }

    /// Generates a key, asks the CA to certify it for `identity`, and checks the answer.
    pub async fn request(&self, identity: &SpiffeId) -> Result<WorkloadCert, CaClientError> {
        let key = KeyPair::generate()?;
        let csr = CertificateParams::default().serialize_request(&key)?.pem()?;
        let mut request = tonic::Request::new(CertificateRequest {
            csr,
            validity_duration: self.validity.as_secs() as i64,
            identity: Some(WorkloadIdentity {
                namespace: identity.namespace().to_owned(),
                service_account: identity.service_account().to_owned(),
            }),
        });
        request.set_timeout(REQUEST_TIMEOUT);
        self.control.authorize(&mut request);
        let mut grpc = CertificateServiceClient::new(self.control.channel());
        let response = grpc
            .create_certificate(request)
            .await
            .map_err(|s| CaClientError::Refused { code: s.code(), message: s.message().to_owned() })?
            .into_inner();
        let cert = WorkloadCert::assemble(
            identity,
            &response.cert_chain,
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            &response.trust_bundle,
            OffsetDateTime::now_utc(),
        )
        .map_err(CaClientError::BadResponse)?;
        self.control.follow_bundle(&response.trust_bundle)?;
        Ok(cert)
    }
}
