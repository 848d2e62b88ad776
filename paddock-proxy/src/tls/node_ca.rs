//! A node agent's forging CA in broker mode: a short-lived intermediate the broker issues
//! for this node, renewed well before it expires.
//!
//! The node generates an ECDSA P-256 key in memory (never written anywhere), sends a
//! certificate signing request for `CN=<node>` to the broker (`POST /v1/node-ca`) and forges
//! under the intermediate it gets back; every forged leaf carries the intermediate, so agents
//! trusting only the cluster root verify it. [`keep_renewed`] renews at about two thirds of
//! the intermediate's life (with jitter, so nodes do not renew in step) with a new key each
//! time, and retries with backoff when the broker cannot be reached. A renewal replaces the
//! CA of the [`LeafCache`]: open connections keep their session, new handshakes get leaves of
//! the new CA. If no renewal succeeds before the intermediate expires, forging fails and new
//! interceptions are refused: there is no fallback to a CA made on the node.
//!
//! Revocation: between renewals the node agent reads the root's revocation list every
//! [`RenewalSettings::revocation_check`]. When it lists the intermediate in use, the agent
//! renews at once; if that fails too (the node is barred, or the broker is away), the CA is
//! withdrawn: nothing is forged until a new intermediate arrives. A list that cannot be
//! fetched changes nothing (the intermediate's short life is the hard bound).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use paddock_wire::api::{NodeCaRequest, NodeCaResponse};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256};

use super::TlsError;
use super::ca::RunCa;
use super::leaf_cache::LeafCache;

/// Where intermediates come from (the broker; tests use an in-process root).
pub trait NodeCaSource: Send + Sync + fmt::Debug {
    /// Sends one signing request; `Err` holds a message without secrets.
    fn request<'a>(
        &'a self,
        request: &'a NodeCaRequest,
    ) -> Pin<Box<dyn Future<Output = Result<NodeCaResponse, String>> + Send + 'a>>;

    /// The root's current certificate revocation list (DER).
    fn revocation_list(&self)
    -> Pin<Box<dyn Future<Output = Result<Vec<u8>, String>> + Send + '_>>;
}

impl NodeCaSource for crate::broker::BrokerClient {
    fn request<'a>(
        &'a self,
        request: &'a NodeCaRequest,
    ) -> Pin<Box<dyn Future<Output = Result<NodeCaResponse, String>> + Send + 'a>> {
        Box::pin(async move { self.node_ca(request).await.map_err(|e| e.to_string()) })
    }

    fn revocation_list(
        &self,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, String>> + Send + '_>> {
        Box::pin(async move {
            self.node_ca_crl()
                .await
                .map(|b| b.to_vec())
                .map_err(|e| e.to_string())
        })
    }
}

/// Whether the revocation list `crl` (DER) revokes the CA certificate `ca` (DER): same
/// issuer, and its serial listed. A list that does not parse revokes nothing (and is logged
/// by the caller).
pub fn is_revoked(crl: &[u8], ca: &[u8]) -> Result<bool, String> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(ca).map_err(|e| format!("the CA certificate: {e}"))?;
    let (_, list) =
        x509_parser::parse_x509_crl(crl).map_err(|e| format!("the revocation list: {e}"))?;
    if list.issuer() != cert.issuer() {
        return Err(format!(
            "the revocation list is issued by {}, the CA by {}",
            list.issuer(),
            cert.issuer()
        ));
    }
    Ok(list
        .iter_revoked_certificates()
        .any(|r| r.raw_serial() == cert.raw_serial()))
}

/// Why no intermediate was obtained.
#[derive(Debug, thiserror::Error)]
pub enum NodeCaError {
    #[error("node CA key or request: {0}")]
    Request(rcgen::Error),
    #[error("node CA from the broker: {0}")]
    Broker(String),
    #[error("the broker's node CA is unusable: {0}")]
    Invalid(#[from] TlsError),
}

/// An intermediate installed from the broker.
#[derive(Debug)]
pub struct IssuedNodeCa {
    /// The CA (intermediate certificate and this node's key).
    pub ca: RunCa,
    /// The cluster root the broker named (PEM): what agents trust.
    pub root_pem: String,
    /// When the answer arrived.
    pub received: SystemTime,
}

impl IssuedNodeCa {
    /// The intermediate's `notAfter`.
    #[must_use]
    pub fn not_after(&self) -> SystemTime {
        SystemTime::from(self.ca.not_after())
    }
}

/// Generates a key, asks `source` for an intermediate for `node`, and checks the answer
/// (a CA for this very key, valid now) before anything forges with it.
pub async fn obtain(source: &dyn NodeCaSource, node: &str) -> Result<IssuedNodeCa, NodeCaError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(NodeCaError::Request)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, node);
    params.distinguished_name = dn;
    let csr = params
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(NodeCaError::Request)?;
    let request = NodeCaRequest {
        node: node.to_owned(),
        csr,
    };
    let answer = source
        .request(&request)
        .await
        .map_err(NodeCaError::Broker)?;
    // Only the intermediate goes after each leaf; agents hold the root already.
    let ca = RunCa::from_pem(
        answer.certificate.as_bytes(),
        key.serialize_pem().as_bytes(),
    )?;
    if ca.chain().len() != 1 {
        return Err(NodeCaError::Broker(
            "expected exactly one certificate (the intermediate)".to_owned(),
        ));
    }
    Ok(IssuedNodeCa {
        ca,
        root_pem: answer.root,
        received: SystemTime::now(),
    })
}

/// Default interval between reads of the revocation list: a revoked intermediate is
/// replaced within a minute, at one small request per node per minute.
pub const DEFAULT_REVOCATION_CHECK: Duration = Duration::from_mins(1);

/// When and how to renew.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RenewalSettings {
    /// Renew after this fraction of the remaining life at receipt (0.5 .. 0.9).
    pub renew_at: f64,
    /// Spread of the renewal time, as a fraction of the life (either way).
    pub jitter: f64,
    /// First retry delay after a failed renewal; doubles up to `retry_max`.
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// How often to read the root's revocation list between renewals (`None`: never).
    pub revocation_check: Option<Duration>,
}

impl Default for RenewalSettings {
    fn default() -> Self {
        Self {
            renew_at: 2.0 / 3.0,
            jitter: 0.05,
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_mins(1),
            revocation_check: Some(DEFAULT_REVOCATION_CHECK),
        }
    }
}

/// How long after `received` to renew a CA that expires at `not_after`; `sample` in
/// `[-1, 1]` places it within the jitter.
#[must_use]
pub fn renewal_delay(
    received: SystemTime,
    not_after: SystemTime,
    settings: &RenewalSettings,
    sample: f64,
) -> Duration {
    let life = not_after.duration_since(received).unwrap_or(Duration::ZERO);
    let fraction = (settings.renew_at + settings.jitter * sample.clamp(-1.0, 1.0)).clamp(0.1, 0.9);
    life.mul_f64(fraction)
}

/// Renews the CA of `cache` (received at `received`, expiring at `not_after`) until the
/// future is dropped (or its task aborted); renews early when the revocation list names it.
pub async fn keep_renewed(
    cache: Arc<LeafCache>,
    source: Arc<dyn NodeCaSource>,
    node: String,
    mut received: SystemTime,
    mut not_after: SystemTime,
    settings: RenewalSettings,
) {
    loop {
        let sample = rand::random::<f64>() * 2.0 - 1.0;
        let delay = renewal_delay(received, not_after, &settings, sample);
        let revoked = wait_for_renewal(&cache, source.as_ref(), received + delay, &settings).await;
        if revoked {
            tracing::warn!(node = %node, "the node CA was revoked: replacing it now");
        }
        let mut backoff = settings.retry_min;
        loop {
            match obtain(source.as_ref(), &node).await {
                Ok(issued) => {
                    let subject = issued.ca.subject().to_owned();
                    let (new_received, new_not_after) = (issued.received, issued.not_after());
                    match cache.replace_ca(issued.ca) {
                        Ok(()) => {
                            tracing::info!(
                                node = %node,
                                subject,
                                not_after = ?new_not_after,
                                "node CA renewed; new handshakes use it"
                            );
                            received = new_received;
                            not_after = new_not_after;
                            break;
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "installing the renewed node CA failed");
                        }
                    }
                }
                Err(e) => {
                    if revoked && !cache.ca_withdrawn() {
                        cache.withdraw_ca();
                        tracing::error!(
                            error = %e,
                            "the revoked node CA could not be replaced: new TLS interceptions \
                             are refused until it is"
                        );
                    } else if SystemTime::now() >= not_after {
                        tracing::error!(
                            error = %e,
                            "node CA expired and not renewed: new TLS interceptions are refused"
                        );
                    } else {
                        tracing::warn!(error = %e, retry_in = ?backoff, "node CA renewal failed");
                    }
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(settings.retry_max);
        }
    }
}

/// Waits until `due`, reading the revocation list every `settings.revocation_check` on the
/// way. Returns whether the list revoked the CA in use (`false`: renewal is simply due).
async fn wait_for_renewal(
    cache: &LeafCache,
    source: &dyn NodeCaSource,
    due: SystemTime,
    settings: &RenewalSettings,
) -> bool {
    loop {
        let Ok(left) = due.duration_since(SystemTime::now()) else {
            return false;
        };
        let Some(every) = settings.revocation_check.filter(|d| *d < left) else {
            tokio::time::sleep(left).await;
            return false;
        };
        tokio::time::sleep(every).await;
        let ca = cache.ca_summary().0;
        match source.revocation_list().await {
            Ok(crl) => match is_revoked(&crl, &ca) {
                Ok(true) => return true,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "node CA revocation list unusable"),
            },
            Err(e) => {
                tracing::warn!(error = %e, "node CA revocation list unavailable; checking again later");
            }
        }
    }
}

#[cfg(test)]
mod tests;
