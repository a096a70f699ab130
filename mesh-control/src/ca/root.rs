//! A root CA key and certificate: loaded from PEM files, or generated on first start and
//! persisted (key 0600) so restarts keep the same root.

use std::{
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::pem::PemObject as _;
use time::{Duration, OffsetDateTime};

/// Root validity: long, because rotating a root is deliberate (see the trust bundle).
const ROOT_VALIDITY: Duration = Duration::days(10 * 365);
pub const CERT_FILE: &str = "root-cert.pem";
pub const KEY_FILE: &str = "root-key.pem";

#[derive(Debug, thiserror::Error)]
pub enum RootError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{path}: {problem}")]
    Invalid { path: PathBuf, problem: String },
    #[error("{found} exists but {missing} does not: give both or neither")]
    HalfPresent { found: PathBuf, missing: PathBuf },
    #[error("{0} already exists: refusing to overwrite a root")]
    Exists(PathBuf),
    #[error("cannot generate the root: {0}")]
    Generate(#[from] rcgen::Error),
}

/// The root that signs workload certificates.
pub struct RootCa {
    certificate_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for RootCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RootCa").finish_non_exhaustive()
    }
}

impl RootCa {
    /// Generates a new self-signed root for `trust_domain`.
    pub fn generate(trust_domain: &str) -> Result<Self, RootError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + ROOT_VALIDITY;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        dn.push(DnType::CommonName, format!("nodemesh root CA {}", now.unix_timestamp()));
        params.distinguished_name = dn;
        let certificate = params.self_signed(&key)?;
        Ok(RootCa { certificate_pem: certificate.pem(), issuer: Issuer::new(params, key) })
    }

    /// Builds a root from PEM text.
    pub fn from_pem(certificate_pem: &str, key_pem: &str, origin: &Path) -> Result<Self, RootError> {
        let invalid = |problem: String| RootError::Invalid { path: origin.to_owned(), problem };
        let key = KeyPair::from_pem(key_pem).map_err(|e| invalid(format!("root key: {e}")))?;
        let issuer = Issuer::from_ca_cert_pem(certificate_pem, key)
            .map_err(|e| invalid(format!("root certificate: {e}")))?;
        Ok(RootCa { certificate_pem: certificate_pem.to_owned(), issuer })
    }

    /// Loads `root-cert.pem` and `root-key.pem` from `dir`, or generates and writes them
    /// (directory 0700, key 0600). Returns the root and whether it was generated.
    pub fn load_or_generate(dir: &Path, trust_domain: &str) -> Result<(Self, bool), RootError> {
        let (cert_path, key_path) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => {
                let read = |p: &Path| {
                    std::fs::read_to_string(p)
                        .map_err(|source| RootError::Read { path: p.to_owned(), source })
                };
                Ok((Self::from_pem(&read(&cert_path)?, &read(&key_path)?, dir)?, false))
            }
            (false, false) => {
                let root = Self::generate(trust_domain)?;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(|source| RootError::Write { path: dir.to_owned(), source })?;
                write_file(&key_path, &root.issuer.key().serialize_pem(), 0o600)?;
                write_file(&cert_path, &root.certificate_pem, 0o644)?;
                Ok((root, true))
            }
            (true, false) => Err(RootError::HalfPresent { found: cert_path, missing: key_path }),
            (false, true) => Err(RootError::HalfPresent { found: key_path, missing: cert_path }),
        }
    }

    /// Generates a root into `dir`, which must not hold one yet (the next root, for rotation).
    pub fn generate_into(dir: &Path, trust_domain: &str) -> Result<Self, RootError> {
        if let Some(found) = [CERT_FILE, KEY_FILE].map(|f| dir.join(f)).into_iter().find(|p| p.exists()) {
            return Err(RootError::Exists(found));
        }
        Self::load_or_generate(dir, trust_domain).map(|(root, _)| root)
    }

    /// SHA-256 fingerprint of the root certificate.
    pub fn fingerprint(&self) -> String {
        rustls_pki_types::CertificateDer::from_pem_slice(self.certificate_pem.as_bytes())
            .map(|der| mesh_api::fingerprint(&der))
            .unwrap_or_default()
    }

    pub fn certificate_pem(&self) -> &str {
        &self.certificate_pem
    }

    pub fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }
}

/// Creates a file with `mode` from the start (never briefly world-readable).
fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), RootError> {
    let err = |source| RootError::Write { path: path.to_owned(), source };
    let mut file =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(err)?;
    file.write_all(contents.as_bytes()).map_err(err)?;
    file.sync_all().map_err(err)
}
