//! Workload certificates for the identities this node serves.
//!
//! One key pair per identity, generated here (private keys never leave the node); a CSR goes to
//! mesh-control's CA, authenticated with the node's token. Each identity has a task that renews
//! at half of the certificate's lifetime (with jitter, so a node's identities do not all renew
//! at once). When a renewal fails, the still-valid certificate stays in use and the task retries
//! with backoff. An identity is kept while at least one enrolled pod uses it.

mod client;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use mesh_api::SpiffeId;
use prometheus_client::metrics::{family::Family, gauge::Gauge};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use serde::Serialize;
use time::OffsetDateTime;
use tokio::{sync::watch, task::JoinHandle};

pub use client::CaClient;

use crate::state_dir::StateDir;

mod persist;

/// First retry delay after a failed request; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Renewal happens at half-life, moved by up to this fraction of the lifetime either way.
const JITTER_FRACTION: f64 = 0.05;

/// A certificate and its key, ready for rustls.
#[derive(Debug)]
pub struct WorkloadCert {
    pub identity: SpiffeId,
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// The roots peers' certificates must chain to.
    pub trust_bundle: Vec<CertificateDer<'static>>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// When this node received it. The CA backdates `not_before` for clock skew, so the
    /// lifetime that matters for renewal starts here.
    pub received: OffsetDateTime,
    pub serial: String,
}

impl WorkloadCert {
    /// Builds a certificate from PEM text (as the CA sends it and the node persists it),
    /// checking that the leaf names exactly `identity` and the bundle is not empty.
    pub fn assemble(
        identity: &SpiffeId,
        chain_pem: &[String],
        key: PrivateKeyDer<'static>,
        bundle_pem: &[String],
        received: OffsetDateTime,
    ) -> Result<Self, String> {
        let parse = |pems: &[String]| -> Result<Vec<CertificateDer<'static>>, String> {
            pems.iter()
                .map(|p| CertificateDer::from_pem_slice(p.as_bytes()).map_err(|e| e.to_string()))
                .collect()
        };
        let (chain, trust_bundle) = (parse(chain_pem)?, parse(bundle_pem)?);
        if trust_bundle.is_empty() {
            return Err("empty trust bundle".into());
        }
        let leaf = chain.first().ok_or("empty certificate chain")?;
        match crate::tls::spiffe_id_of(leaf)? {
            named if named == *identity => {}
            named => return Err(format!("certificate names {named}, not {identity}")),
        }
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf).map_err(|e| e.to_string())?;
        let when = |t: x509_parser::time::ASN1Time| {
            OffsetDateTime::from_unix_timestamp(t.timestamp()).map_err(|e| e.to_string())
        };
        Ok(WorkloadCert {
            identity: identity.clone(),
            not_before: when(parsed.validity().not_before)?,
            not_after: when(parsed.validity().not_after)?,
            received,
            serial: parsed.raw_serial_as_string(),
            chain,
            key,
            trust_bundle,
        })
    }

    /// Returns when this certificate should be renewed: at half-life, with jitter in `[-1, 1]`.
    pub fn renew_at(&self, jitter: f64) -> OffsetDateTime {
        let lifetime = self.not_after - self.received;
        self.received + lifetime / 2 + lifetime * (JITTER_FRACTION * jitter.clamp(-1.0, 1.0))
    }
}

/// One identity's state, shared by its renewal task and readers.
#[derive(Debug)]
struct Slot {
    current: watch::Sender<Option<Arc<WorkloadCert>>>,
    last_error: Mutex<Option<String>>,
    users: Mutex<usize>,
    task: Mutex<Option<JoinHandle<()>>>,
}

/// What the admin endpoint shows for one identity.
#[derive(Debug, Serialize, Clone)]
pub struct CertStatus {
    pub identity: String,
    pub pods: usize,
    pub serial: Option<String>,
    pub not_before: Option<String>,
    pub not_after: Option<String>,
    /// Fingerprint of the root that signed the certificate.
    pub signed_by: Option<String>,
    /// Fingerprints of the roots peers' certificates may chain to.
    pub trust_roots: Vec<String>,
    pub last_error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("identity {0} is not served by this node")]
    NotServed(SpiffeId),
    #[error("no certificate for {identity} yet (last error: {last_error})")]
    NotReady { identity: SpiffeId, last_error: String },
}

/// The identities this node serves.
#[derive(Debug)]
pub struct IdentityManager {
    client: CaClient,
    /// Where certificates are kept across restarts, if anywhere.
    store: Option<StateDir>,
    slots: RwLock<BTreeMap<SpiffeId, Arc<Slot>>>,
    expiry: Family<Vec<(String, String)>, Gauge>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl IdentityManager {
    pub fn new(client: CaClient, store: Option<StateDir>) -> Arc<Self> {
        Arc::new(IdentityManager {
            client,
            store,
            slots: RwLock::new(BTreeMap::new()),
            expiry: Family::default(),
        })
    }

    /// Returns the gauge family `nodemesh_workload_cert_expiry_timestamp_seconds{identity}`.
    pub fn expiry_gauge(&self) -> Family<Vec<(String, String)>, Gauge> {
        self.expiry.clone()
    }

    /// Records that a pod uses `identity`; the first user starts its certificate.
    pub fn acquire(self: &Arc<Self>, identity: &SpiffeId) {
        let mut slots = self.slots.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let slot = slots.entry(identity.clone()).or_insert_with(|| {
            Arc::new(Slot {
                current: watch::channel(None).0,
                last_error: Mutex::new(None),
                users: Mutex::new(0),
                task: Mutex::new(None),
            })
        });
        let mut users = lock(&slot.users);
        *users += 1;
        if *users == 1 {
            let task = tokio::spawn(renew_forever(self.clone(), identity.clone(), slot.clone()));
            *lock(&slot.task) = Some(task);
        }
    }

    /// Records that a pod no longer uses `identity`; the last user drops it (and its key).
    pub fn release(&self, identity: &SpiffeId) {
        let mut slots = self.slots.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(slot) = slots.get(identity) else { return };
        let remaining = {
            let mut users = lock(&slot.users);
            *users = users.saturating_sub(1);
            *users
        };
        if remaining == 0 {
            if let Some(task) = lock(&slot.task).take() {
                task.abort();
            }
            slots.remove(identity);
            if let Some(store) = &self.store {
                persist::forget(store, identity);
            }
            self.expiry.remove(&vec![("identity".to_owned(), identity.to_string())]);
            tracing::info!(identity = %identity, "identity no longer used; certificate dropped");
        }
    }

    /// Makes `cert` the one presented for `identity`.
    fn install(&self, identity: &SpiffeId, slot: &Slot, cert: WorkloadCert) {
        self.expiry
            .get_or_create(&vec![("identity".to_owned(), identity.to_string())])
            .set(cert.not_after.unix_timestamp());
        slot.current.send_replace(Some(Arc::new(cert)));
        *lock(&slot.last_error) = None;
    }

    /// Whether every identity in use has a current certificate.
    pub fn all_certified(&self) -> bool {
        let slots = self.slots.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        slots.values().all(|s| s.current.borrow().is_some())
    }

    /// Returns the current certificate, if one was issued.
    pub fn current(&self, identity: &SpiffeId) -> Option<Arc<WorkloadCert>> {
        let slots = self.slots.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        slots.get(identity).and_then(|s| s.current.borrow().clone())
    }

    /// Waits up to `timeout` for a certificate of `identity`.
    pub async fn wait_for(
        &self,
        identity: &SpiffeId,
        timeout: Duration,
    ) -> Result<Arc<WorkloadCert>, IdentityError> {
        let slot = {
            let slots = self.slots.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            slots.get(identity).cloned().ok_or_else(|| IdentityError::NotServed(identity.clone()))?
        };
        let mut updates = slot.current.subscribe();
        let waited = tokio::time::timeout(timeout, updates.wait_for(Option::is_some)).await;
        if let Ok(Ok(cert)) = waited
            && let Some(cert) = cert.clone()
        {
            return Ok(cert);
        }
        Err(IdentityError::NotReady {
            identity: identity.clone(),
            last_error: lock(&slot.last_error).clone().unwrap_or_else(|| "still requesting".into()),
        })
    }

    pub fn status(&self) -> Vec<CertStatus> {
        let slots = self.slots.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        slots
            .iter()
            .map(|(identity, slot)| {
                let current = slot.current.borrow().clone();
                CertStatus {
                    identity: identity.to_string(),
                    pods: *lock(&slot.users),
                    serial: current.as_ref().map(|c| c.serial.clone()),
                    not_before: current.as_ref().map(|c| c.not_before.to_string()),
                    not_after: current.as_ref().map(|c| c.not_after.to_string()),
                    signed_by: current
                        .as_ref()
                        .and_then(|c| c.chain.last())
                        .map(|r| mesh_api::fingerprint(r)),
                    trust_roots: current
                        .as_ref()
                        .map(|c| c.trust_bundle.iter().map(|r| mesh_api::fingerprint(r)).collect())
                        .unwrap_or_default(),
                    last_error: lock(&slot.last_error).clone(),
                }
            })
            .collect()
    }
}

/// A jitter in `[-1, 1]` without a random-number crate: the clock's sub-second noise is enough
/// to spread renewals.
fn jitter() -> f64 {
    let nanos = OffsetDateTime::now_utc().nanosecond();
    f64::from(nanos % 2001) / 1000.0 - 1.0
}

fn until(when: OffsetDateTime) -> Duration {
    let left = when - OffsetDateTime::now_utc();
    Duration::try_from(left).unwrap_or(Duration::ZERO)
}

/// Keeps `identity` certified until the task is aborted.
async fn renew_forever(manager: Arc<IdentityManager>, identity: SpiffeId, slot: Arc<Slot>) {
    let mut backoff = MIN_BACKOFF;
    // A certificate kept from before a restart serves at once; it is renewed on its schedule.
    if let Some(cert) = manager.store.as_ref().and_then(|store| persist::load(store, &identity)) {
        let renew_in = until(cert.renew_at(jitter()));
        tracing::info!(
            identity = %identity, serial = %cert.serial, not_after = %cert.not_after,
            renew_in_s = renew_in.as_secs(), "workload certificate restored from the state directory"
        );
        manager.install(&identity, &slot, cert);
        tokio::time::sleep(renew_in).await;
    }
    loop {
        match manager.client.request(&identity).await {
            Ok(cert) => {
                let renew_in = until(cert.renew_at(jitter()));
                tracing::info!(
                    identity = %identity, serial = %cert.serial, not_after = %cert.not_after,
                    renew_in_s = renew_in.as_secs(), "workload certificate issued"
                );
                if let Some(store) = &manager.store {
                    persist::save(store, &cert);
                }
                manager.install(&identity, &slot, cert);
                backoff = MIN_BACKOFF;
                tokio::time::sleep(renew_in).await;
            }
            Err(err) => {
                let still_valid =
                    slot.current.borrow().as_ref().is_some_and(|c| c.not_after > OffsetDateTime::now_utc());
                tracing::warn!(
                    identity = %identity, error = %err, keeping_valid_certificate = still_valid,
                    retry_in_ms = backoff.as_millis() as u64, "certificate request failed"
                );
                *lock(&slot.last_error) = Some(err.to_string());
                if !still_valid {
                    // An expired certificate must not be presented: fail closed.
                    slot.current.send_replace(None);
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

#[cfg(test)]
mod tests;
