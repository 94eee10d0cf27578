//! Certificates of the service accounts that have pods on this node: issued on first use, cached,
//! rotated at half-life with jitter in the background. A request never waits for a rotation: it
//! gets the current certificate, which stays valid until well after its replacement arrives.
use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use rcgen::{CertificateParams, KeyPair};
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    sign::CertifiedKey,
};
use tokio::sync::OnceCell;
use tracing::{info, warn};

use super::{CertificateIssuer, IdentityError, SpiffeId};

/// One identity's current certificate and key, ready for rustls.
#[derive(Debug)]
pub struct WorkloadCert {
    pub identity: SpiffeId,
    pub key: Arc<CertifiedKey>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// When we received it (notBefore is backdated for clock skew): rotation counts from here.
    pub issued_at: SystemTime,
}

impl WorkloadCert {
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.key.cert
    }
}

struct Slot {
    current: RwLock<Option<Arc<WorkloadCert>>>,
    first: OnceCell<()>,
    /// The last failed first issuance: until when the CA is not asked again, and why.
    held_off: Mutex<Option<HoldOff>>,
}

/// After a failed first issuance the CA is not asked again for a while (1 s, doubling to 30 s):
/// a burst of connections for a refused identity fails fast instead of becoming a burst of CA
/// requests. Rotation has its own backoff.
struct HoldOff {
    until: tokio::time::Instant,
    backoff: Duration,
    reason: String,
}

const FIRST_HOLD_OFF: Duration = Duration::from_secs(1);
const MAX_HOLD_OFF: Duration = Duration::from_secs(30);

impl Slot {
    /// The refusal to repeat, while the hold-off lasts.
    fn held_off(&self, identity: &SpiffeId) -> Option<IdentityError> {
        let h = self.held_off.lock().unwrap_or_else(|e| e.into_inner());
        let h = h.as_ref()?;
        let left = h
            .until
            .checked_duration_since(tokio::time::Instant::now())?;
        Some(IdentityError::Refused {
            identity: identity.uri(),
            reason: format!(
                "{} (the CA is asked again in {:.1} s)",
                h.reason,
                left.as_secs_f64()
            ),
        })
    }

    fn failed(&self, error: &IdentityError) {
        let mut h = self.held_off.lock().unwrap_or_else(|e| e.into_inner());
        let backoff = h
            .as_ref()
            .map_or(FIRST_HOLD_OFF, |p| (p.backoff * 2).min(MAX_HOLD_OFF));
        *h = Some(HoldOff {
            until: tokio::time::Instant::now() + backoff,
            backoff,
            reason: error.to_string(),
        });
    }
}

/// The node's workload certificates.
pub struct CertManager {
    issuer: Arc<dyn CertificateIssuer>,
    ttl: Duration,
    slots: Mutex<HashMap<SpiffeId, Arc<Slot>>>,
    /// Certificate requests to the CA that succeeded / failed (first issuance and rotations).
    issued: AtomicU64,
    refused: AtomicU64,
}

impl CertManager {
    pub fn new(issuer: Arc<dyn CertificateIssuer>, ttl: Duration) -> Arc<Self> {
        Arc::new(Self {
            issuer,
            ttl,
            slots: Mutex::new(HashMap::new()),
            issued: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        })
    }

    pub fn issuer(&self) -> &Arc<dyn CertificateIssuer> {
        &self.issuer
    }

    /// The certificate for `identity`: cached, or issued now (concurrent callers share one
    /// issuance). The first issuance starts the identity's rotation task.
    pub async fn get(
        self: &Arc<Self>,
        identity: &SpiffeId,
    ) -> Result<Arc<WorkloadCert>, IdentityError> {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(slots.entry(identity.clone()).or_insert_with(|| {
                Arc::new(Slot {
                    current: RwLock::new(None),
                    first: OnceCell::new(),
                    held_off: Mutex::new(None),
                })
            }))
        };
        if let Some(c) = current(&slot) {
            return Ok(c);
        }
        if let Some(e) = slot.held_off(identity) {
            return Err(e);
        }
        slot.first
            .get_or_try_init(|| async {
                // Callers queued behind a failure see it, rather than asking again each.
                if let Some(e) = slot.held_off(identity) {
                    return Err(e);
                }
                let cert = self.issue(identity).await.inspect_err(|e| slot.failed(e))?;
                *slot.held_off.lock().unwrap_or_else(|e| e.into_inner()) = None;
                *slot.current.write().unwrap_or_else(|e| e.into_inner()) = Some(cert);
                let me = Arc::clone(self);
                let (id, s) = (identity.clone(), Arc::clone(&slot));
                tokio::spawn(async move { me.rotate_forever(id, s).await });
                Ok::<(), IdentityError>(())
            })
            .await?;
        current(&slot).ok_or_else(|| IdentityError::Refused {
            identity: identity.uri(),
            reason: "no certificate after issuance".into(),
        })
    }

    /// Identities with a certificate, with their expiry (for status and metrics).
    pub fn held(&self) -> Vec<(SpiffeId, SystemTime)> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots
            .iter()
            .filter_map(|(id, s)| current(s).map(|c| (id.clone(), c.not_after)))
            .collect()
    }

    /// Every certificate held now (for the admin API).
    pub fn certificates(&self) -> Vec<Arc<WorkloadCert>> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<_> = slots.values().filter_map(|s| current(s)).collect();
        out.sort_by_key(|c| c.identity.uri());
        out
    }

    /// Certificate requests to the CA so far: (succeeded, failed).
    pub fn request_outcomes(&self) -> (u64, u64) {
        (
            self.issued.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
        )
    }

    async fn issue(&self, identity: &SpiffeId) -> Result<Arc<WorkloadCert>, IdentityError> {
        let outcome = self.request(identity).await;
        let counter = if outcome.is_ok() {
            &self.issued
        } else {
            &self.refused
        };
        counter.fetch_add(1, Ordering::Relaxed);
        outcome
    }

    async fn request(&self, identity: &SpiffeId) -> Result<Arc<WorkloadCert>, IdentityError> {
        // The CSR names the identity (a CA checks it; the local CA ignores CSR names anyway).
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = vec![rcgen::SanType::URI(identity.uri().try_into()?)];
        let csr = params.serialize_request(&key)?.pem()?;
        let chain = self.issuer.sign(&csr, identity, self.ttl).await?;
        let (not_before, not_after) = validity(&chain[0])?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing = rustls::crypto::ring::sign::any_ecdsa_type(&der).map_err(|e| {
            IdentityError::BadCertificate {
                what: "workload key".into(),
                message: e.to_string(),
            }
        })?;
        info!(identity = %identity, expires = ?not_after, "workload certificate issued");
        Ok(Arc::new(WorkloadCert {
            identity: identity.clone(),
            key: Arc::new(CertifiedKey::new(chain, signing)),
            not_before,
            not_after,
            issued_at: SystemTime::now(),
        }))
    }

    /// Replaces the certificate at half its remaining lifetime as received (±10% jitter), retrying failures with
    /// backoff while the current one is still valid.
    async fn rotate_forever(self: Arc<Self>, identity: SpiffeId, slot: Arc<Slot>) {
        loop {
            let Some(cert) = current(&slot) else { return };
            let life = cert
                .not_after
                .duration_since(cert.issued_at)
                .unwrap_or_default();
            let at = cert.issued_at + life / 2 + jitter(life / 10);
            let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
            tokio::time::sleep(wait).await;
            let mut backoff = Duration::from_millis(200);
            loop {
                match self.issue(&identity).await {
                    Ok(new) => {
                        *slot.current.write().unwrap_or_else(|e| e.into_inner()) = Some(new);
                        break;
                    }
                    Err(e) => {
                        warn!(identity = %identity, error = %e, "certificate rotation failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                }
            }
        }
    }
}

fn current(slot: &Slot) -> Option<Arc<WorkloadCert>> {
    slot.current
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

/// A symmetric jitter in [-max, +max], from the system RNG.
fn jitter(max: Duration) -> Duration {
    let mut b = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    let frac = (u64::from_le_bytes(b) % 1_000_000) as f64 / 1_000_000.0; // [0, 1)
    // Shift into [-max, +max] by starting from -max; callers add it to a time well after now.
    max.mul_f64(2.0 * frac).saturating_sub(max)
}

/// notBefore / notAfter of a DER certificate.
pub fn validity(der: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime), IdentityError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| IdentityError::BadCertificate {
            what: "issued certificate".into(),
            message: e.to_string(),
        })?;
    let v = cert.validity();
    let to_system = |t: &x509_parser::time::ASN1Time| {
        SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64)
    };
    Ok((to_system(&v.not_before), to_system(&v.not_after)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{LocalCa, LocalIssuer};

    fn manager(ttl: Duration) -> Arc<CertManager> {
        let dir = std::env::temp_dir().join(format!(
            "mesh-mgr-{}-{}",
            std::process::id(),
            ttl.as_millis()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        LocalCa::init_dir(&dir, "cluster.local", Duration::from_secs(3600)).unwrap();
        let ca = LocalCa::from_dir(&dir, "cluster.local").unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        CertManager::new(Arc::new(LocalIssuer::new(Arc::new(ca))), ttl)
    }

    /// Refuses every request until told otherwise, counting them.
    struct Refusing {
        inner: LocalIssuer,
        refuse: std::sync::atomic::AtomicBool,
        calls: AtomicU64,
    }

    impl CertificateIssuer for Refusing {
        fn sign<'a>(
            &'a self,
            csr_pem: &'a str,
            identity: &'a SpiffeId,
            ttl: Duration,
        ) -> crate::identity::issuer::IssueFuture<'a> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            if self.refuse.load(Ordering::Relaxed) {
                return Box::pin(async move {
                    Err(IdentityError::Refused {
                        identity: identity.uri(),
                        reason: "PermissionDenied: not on this node".into(),
                    })
                });
            }
            self.inner.sign(csr_pem, identity, ttl)
        }
        fn roots(&self) -> Vec<CertificateDer<'static>> {
            self.inner.roots()
        }
        fn trust_domain(&self) -> String {
            self.inner.trust_domain()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_is_repeated_without_asking_the_ca_until_the_hold_off_ends() {
        let dir = std::env::temp_dir().join(format!("mesh-mgr-holdoff-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        LocalCa::init_dir(&dir, "cluster.local", Duration::from_secs(3600)).unwrap();
        let ca = LocalCa::from_dir(&dir, "cluster.local").unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let issuer = Arc::new(Refusing {
            inner: LocalIssuer::new(Arc::new(ca)),
            refuse: true.into(),
            calls: AtomicU64::new(0),
        });
        let m = CertManager::new(issuer.clone(), Duration::from_secs(3600));
        let id = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap();
        // A burst of connections: one CA request, every caller gets its answer.
        let burst = futures::future::join_all((0..20).map(|_| m.get(&id))).await;
        assert!(burst.iter().all(|r| {
            r.as_ref()
                .is_err_and(|e| e.to_string().contains("not on this node"))
        }));
        assert_eq!(issuer.calls.load(Ordering::Relaxed), 1);
        // After the hold-off the CA is asked again (and the next hold-off is longer).
        tokio::time::advance(FIRST_HOLD_OFF + Duration::from_millis(10)).await;
        assert!(m.get(&id).await.is_err());
        assert_eq!(issuer.calls.load(Ordering::Relaxed), 2);
        tokio::time::advance(FIRST_HOLD_OFF + Duration::from_millis(10)).await;
        let e = m.get(&id).await.unwrap_err().to_string();
        assert!(e.contains("asked again in"), "{e}");
        assert_eq!(
            issuer.calls.load(Ordering::Relaxed),
            2,
            "second hold-off is 2 s"
        );
        // Once the CA agrees, the certificate comes and sticks.
        issuer.refuse.store(false, Ordering::Relaxed);
        tokio::time::advance(2 * FIRST_HOLD_OFF).await;
        assert!(m.get(&id).await.is_ok());
        assert!(m.get(&id).await.is_ok());
        assert_eq!(issuer.calls.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn issues_once_and_caches() {
        let m = manager(Duration::from_secs(3600));
        let id = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap();
        let (a, b) = tokio::join!(m.get(&id), m.get(&id));
        let (a, b) = (a.unwrap(), b.unwrap());
        assert!(Arc::ptr_eq(&a, &b), "concurrent callers share one issuance");
        assert_eq!(m.held().len(), 1);
        assert!(a.not_after > SystemTime::now() + Duration::from_secs(3000));
    }

    #[tokio::test]
    async fn rotates_before_expiry_without_blocking_readers() {
        // 4 s certificates (plus the CA's 60 s backdating): the replacement comes at half-life.
        let m = manager(Duration::from_secs(4));
        let id = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap();
        let first = m.get(&id).await.unwrap();
        let life = first.not_after.duration_since(first.not_before).unwrap();
        let deadline = first.not_after;
        loop {
            let now = m.get(&id).await.unwrap();
            if !Arc::ptr_eq(&now, &first) {
                assert!(now.not_after >= first.not_after && now.issued_at > first.issued_at);
                assert!(SystemTime::now() < deadline, "rotated before expiry");
                break;
            }
            assert!(
                SystemTime::now() < deadline,
                "no rotation within the lifetime ({life:?})"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
