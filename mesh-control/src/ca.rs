//! The workload certificate authority: signs X.509 SVIDs for attested identities.
//!
//! The SVID's only SAN is the identity's SPIFFE URI, taken from the attested identity passed in
//! by the caller (node authorization happens before), never from the CSR, which contributes only
//! its public key (after its self-signature is verified: proof of possession).

mod root;
mod trust_bundle;

use std::time::Duration;

use mesh_api::SpiffeId;
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    IsCa, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

pub use root::{RootCa, RootError};
pub use trust_bundle::TrustBundle;

/// Largest CSR accepted, PEM. A P-256 or RSA-4096 CSR is well under this.
pub const MAX_CSR_BYTES: usize = 16 * 1024;
/// Certificates start this long in the past, so peers with a slightly slow clock accept them.
const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("the CSR is {size} bytes; the limit is {MAX_CSR_BYTES}")]
    TooLarge { size: usize },
    #[error("malformed CSR: {0}")]
    MalformedCsr(String),
    #[error("identity {identity} is not in this CA's trust domain {trust_domain}")]
    WrongTrustDomain { identity: SpiffeId, trust_domain: String },
    #[error("requested validity {0}s is negative")]
    NegativeValidity(i64),
    #[error("cannot sign: {0}")]
    Signing(#[from] rcgen::Error),
}

/// How long certificates live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TtlPolicy {
    pub default: Duration,
    pub min: Duration,
    pub max: Duration,
}

impl Default for TtlPolicy {
    fn default() -> Self {
        TtlPolicy {
            default: Duration::from_secs(24 * 3600),
            min: Duration::from_secs(60),
            max: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl TtlPolicy {
    /// Returns the validity to grant for a request (0 = the default), within `[min, max]`.
    pub fn grant(&self, requested_secs: i64) -> Result<Duration, CaError> {
        if requested_secs < 0 {
            return Err(CaError::NegativeValidity(requested_secs));
        }
        let requested =
            if requested_secs == 0 { self.default } else { Duration::from_secs(requested_secs as u64) };
        Ok(requested.clamp(self.min, self.max))
    }
}

/// A signed workload certificate.
#[derive(Clone, Debug)]
pub struct Issued {
    /// PEM, leaf first, ending with the signing root.
    pub chain: Vec<String>,
    pub not_after: OffsetDateTime,
}

/// Signs SVIDs with one root, and publishes the trust bundle (which may hold more roots).
#[derive(Debug)]
pub struct CertificateAuthority {
    trust_domain: String,
    signer: RootCa,
    bundle: TrustBundle,
    ttl: TtlPolicy,
}

impl CertificateAuthority {
    /// Builds a CA signing with `signer`; the bundle always contains the signer's root.
    pub fn new(trust_domain: &str, signer: RootCa, mut bundle: TrustBundle, ttl: TtlPolicy) -> Self {
        bundle
            .add(signer.certificate_pem())
            .unwrap_or_else(|_| unreachable!("a root we generated or loaded parses"));
        CertificateAuthority { trust_domain: trust_domain.to_owned(), signer, bundle, ttl }
    }

    pub fn trust_bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn signer(&self) -> &RootCa {
        &self.signer
    }

    /// Signs `csr_pem` for `identity`, which the caller has already attested.
    pub fn sign(&self, csr_pem: &str, identity: &SpiffeId, requested_secs: i64) -> Result<Issued, CaError> {
        if csr_pem.len() > MAX_CSR_BYTES {
            return Err(CaError::TooLarge { size: csr_pem.len() });
        }
        if identity.trust_domain() != self.trust_domain {
            return Err(CaError::WrongTrustDomain {
                identity: identity.clone(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        let ttl = self.ttl.grant(requested_secs)?;
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::MalformedCsr(e.to_string()))?;

        // Everything but the public key is ours, not the CSR's.
        let mut params = CertificateParams::default();
        let now = OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + ttl;
        params.serial_number = Some(random_serial());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, self.trust_domain.clone());
        params.distinguished_name = dn;
        let uri = identity
            .uri()
            .try_into()
            .map_err(|_| CaError::MalformedCsr("identity is not an IA5 string".into()))?;
        params.subject_alt_names = vec![SanType::URI(uri)];

        let leaf = params.signed_by(&csr.public_key, self.signer.issuer())?;
        Ok(Issued {
            chain: vec![leaf.pem(), self.signer.certificate_pem().to_owned()],
            not_after: params.not_after,
        })
    }
}

/// Returns a positive 128-bit random serial number.
fn random_serial() -> SerialNumber {
    use rustls::crypto::ring::default_provider;
    let mut bytes = [0u8; 16];
    if default_provider().secure_random.fill(&mut bytes).is_err() {
        // The system RNG failing is not recoverable in any useful way; a time-based serial is
        // still unique for this CA.
        let nanos = OffsetDateTime::now_utc().unix_timestamp_nanos().to_be_bytes();
        bytes.copy_from_slice(&nanos);
    }
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

#[cfg(test)]
mod tests;
