//! Workload certificates (with their keys) in the node's private state directory, so a restarted
//! mesh-node presents them at once instead of waiting for mesh-control.

use mesh_api::SpiffeId;
use rustls_pki_types::{PrivateKeyDer, pem::PemObject as _};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::WorkloadCert;
use crate::state_dir::StateDir;

#[derive(Serialize, Deserialize)]
struct Persisted {
    chain: Vec<String>,
    key: String,
    trust_bundle: Vec<String>,
    /// When the node received it (Unix seconds): renewal is timed from this.
    received: i64,
}

/// Kubernetes names cannot contain `_`, so this names one file per identity.
fn file_name(identity: &SpiffeId) -> String {
    format!("cert_{}_{}.json", identity.namespace(), identity.service_account())
}

fn pem(label: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(label, der.to_vec()))
}

pub fn save(dir: &StateDir, cert: &WorkloadCert) {
    let persisted = Persisted {
        chain: cert.chain.iter().map(|c| pem("CERTIFICATE", c)).collect(),
        key: pem("PRIVATE KEY", cert.key.secret_der()),
        trust_bundle: cert.trust_bundle.iter().map(|c| pem("CERTIFICATE", c)).collect(),
        received: cert.received.unix_timestamp(),
    };
    let written = serde_json::to_vec(&persisted)
        .map_err(|e| e.to_string())
        .and_then(|json| dir.write(&file_name(&cert.identity), &json).map_err(|e| e.to_string()));
    if let Err(err) = written {
        tracing::warn!(identity = %cert.identity, error = %err, "cannot persist the workload certificate");
    }
}

/// Returns the persisted certificate of `identity` if there is one that has not expired.
pub fn load(dir: &StateDir, identity: &SpiffeId) -> Option<WorkloadCert> {
    let name = file_name(identity);
    let bytes = match dir.read(&name) {
        Ok(bytes) => bytes?,
        Err(err) => {
            tracing::warn!(identity = %identity, error = %err, "cannot read the persisted certificate");
            return None;
        }
    };
    let restored = serde_json::from_slice::<Persisted>(&bytes).map_err(|e| e.to_string()).and_then(|p| {
        let key = PrivateKeyDer::from_pem_slice(p.key.as_bytes()).map_err(|e| e.to_string())?;
        let received = OffsetDateTime::from_unix_timestamp(p.received).map_err(|e| e.to_string())?;
        WorkloadCert::assemble(identity, &p.chain, key, &p.trust_bundle, received)
    });
    match restored {
        Ok(cert) if cert.not_after > OffsetDateTime::now_utc() => Some(cert),
        Ok(_) => {
            dir.remove(&name);
            None
        }
        Err(err) => {
            tracing::warn!(identity = %identity, error = %err, "ignoring an unusable persisted certificate");
            dir.remove(&name);
            None
        }
    }
}

pub fn forget(dir: &StateDir, identity: &SpiffeId) {
    dir.remove(&file_name(identity));
}
