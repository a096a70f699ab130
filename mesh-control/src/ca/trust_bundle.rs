//! The set of roots workloads trust. A set, not a single root, so a root can be rotated without
//! a failed connection: add the new root, re-issue, then remove the old one.

use rustls_pki_types::{CertificateDer, pem::PemObject as _};

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("trust bundle entry is not a PEM certificate: {0}")]
    NotPem(String),
    #[error("trust bundle entry is not a CA certificate: {0}")]
    NotCa(String),
}

/// Roots, in PEM, without duplicates, in the order they were added.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustBundle {
    roots: Vec<(String, CertificateDer<'static>)>,
}

impl TrustBundle {
    /// Adds every certificate in `pem` (a file may hold several); duplicates are ignored.
    pub fn add(&mut self, pem: &str) -> Result<usize, BundleError> {
        let mut added = 0;
        for der in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let der = der.map_err(|e| BundleError::NotPem(e.to_string()))?;
            let (_, parsed) =
                x509_parser::parse_x509_certificate(&der).map_err(|e| BundleError::NotPem(e.to_string()))?;
            if !parsed.is_ca() {
                return Err(BundleError::NotCa(parsed.subject().to_string()));
            }
            if self.roots.iter().any(|(_, existing)| *existing == der) {
                continue;
            }
            let single = pem_of(&der);
            self.roots.push((single, der.into_owned()));
            added += 1;
        }
        if added == 0 && self.roots.is_empty() {
            return Err(BundleError::NotPem("no certificate found".into()));
        }
        Ok(added)
    }

    /// Removes a root (by its DER); returns whether it was there.
    pub fn remove(&mut self, der: &CertificateDer<'_>) -> bool {
        let before = self.roots.len();
        self.roots.retain(|(_, existing)| existing != der);
        before != self.roots.len()
    }

    pub fn pems(&self) -> Vec<String> {
        self.roots.iter().map(|(pem, _)| pem.clone()).collect()
    }

    pub fn ders(&self) -> impl Iterator<Item = &CertificateDer<'static>> {
        self.roots.iter().map(|(_, der)| der)
    }

    /// SHA-256 fingerprints, in order: how operators tell roots apart.
    pub fn fingerprints(&self) -> Vec<String> {
        self.roots.iter().map(|(_, der)| mesh_api::fingerprint(der)).collect()
    }

    pub fn len(&self) -> usize {
        self.roots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.roots.is_empty()
    }
}

fn pem_of(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}
