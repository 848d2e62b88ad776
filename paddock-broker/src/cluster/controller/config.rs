//! The controller's configuration file (`paddock-broker controller --config FILE`, YAML).
//!
//! ```yaml
//! broker:
//!   url: https://paddock-broker.paddock-system.svc:8443
//!   tokenFile: /var/run/secrets/paddock/token   # a projected token, audience paddock-broker
//!   caFile: /etc/paddock/broker-ca/ca.crt        # the broker's CA (default: webpki roots)
//! trust:
//!   caFile: /etc/paddock/trust/ca.crt            # what agents must trust (the proxies' CA)
//!   bundleFile: /etc/paddock/trust/bundle.crt    # optional: that CA plus system roots
//! leaderElection:
//!   namespace: paddock-system
//!   name: paddock-controller                     # the Lease
//! runLabel: paddock.dev/run                      # the node agent's kubernetes.run_label
//! resyncSeconds: 60
//! adminListen: 0.0.0.0:9092                      # optional: /healthz, /readyz, /metrics
//! ```

use std::{path::PathBuf, time::Duration};

use serde::Deserialize;

use super::lease::LeaseSettings;

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ControllerConfig {
    pub broker: BrokerEndpoint,
    pub trust: TrustConfig,
    pub leader_election: LeaderElection,
    #[serde(default = "default_run_label")]
    pub run_label: String,
    #[serde(default = "default_resync")]
    pub resync_seconds: u64,
    /// Plain-HTTP admin listener for probes and metrics (see [`super::admin`]).
    #[serde(default)]
    pub admin_listen: Option<std::net::SocketAddr>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BrokerEndpoint {
    pub url: String,
    /// A bearer with the `controller`, `issue`, `revoke` and `leases:read` scopes; re-read on
    /// every call.
    pub token_file: PathBuf,
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrustConfig {
    pub ca_file: PathBuf,
    #[serde(default)]
    pub bundle_file: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LeaderElection {
    pub namespace: String,
    #[serde(default = "default_lease_name")]
    pub name: String,
    #[serde(default = "default_lease_seconds")]
    pub lease_seconds: u64,
    #[serde(default = "default_renew_deadline")]
    pub renew_deadline_seconds: u64,
    #[serde(default = "default_retry")]
    pub retry_seconds: u64,
}

fn default_run_label() -> String {
    super::reconcile::DEFAULT_RUN_LABEL.to_owned()
}

fn default_resync() -> u64 {
    60
}

fn default_lease_name() -> String {
    "paddock-controller".to_owned()
}

fn default_lease_seconds() -> u64 {
    15
}

fn default_renew_deadline() -> u64 {
    10
}

fn default_retry() -> u64 {
    2
}

#[derive(Debug, thiserror::Error)]
pub enum ControllerConfigError {
    #[error("controller config: {0}")]
    Parse(String),
    #[error("controller config: {0}")]
    Invalid(String),
}

impl ControllerConfig {
    pub fn parse(text: &str) -> Result<Self, ControllerConfigError> {
        let c: Self =
            crate::yaml::from_str(text).map_err(|e| ControllerConfigError::Parse(e.to_string()))?;
        c.lease_settings()?;
        if c.run_label.trim().is_empty() {
            return Err(ControllerConfigError::Invalid(
                "runLabel must not be empty".into(),
            ));
        }
        if !(1..=86_400).contains(&c.resync_seconds) {
            return Err(ControllerConfigError::Invalid(
                "resyncSeconds must be between 1 and 86400".into(),
            ));
        }
        Ok(c)
    }

    /// The election timing; the renew deadline must leave room before the lease expires, and
    /// retries must fit several times into the deadline.
    pub fn lease_settings(&self) -> Result<LeaseSettings, ControllerConfigError> {
        let l = &self.leader_election;
        if l.retry_seconds == 0
            || l.renew_deadline_seconds <= l.retry_seconds
            || l.lease_seconds <= l.renew_deadline_seconds
            || l.lease_seconds > 3600
        {
            return Err(ControllerConfigError::Invalid(
                "leaderElection needs 0 < retrySeconds < renewDeadlineSeconds < leaseSeconds <= 3600"
                    .into(),
            ));
        }
        Ok(LeaseSettings {
            duration: Duration::from_secs(l.lease_seconds),
            renew_deadline: Duration::from_secs(l.renew_deadline_seconds),
            retry: Duration::from_secs(l.retry_seconds),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::ControllerConfig;

    const OK: &str = "
broker: {url: 'https://b:8443', tokenFile: /t}
trust: {caFile: /ca.crt}
leaderElection: {namespace: paddock-system}
";

    #[test]
    fn defaults_and_refusals() {
        let c = ControllerConfig::parse(OK).expect("valid");
        assert_eq!(c.run_label, "paddock.dev/run");
        assert_eq!(c.leader_election.name, "paddock-controller");
        let s = c.lease_settings().expect("settings");
        assert!(s.renew_deadline < s.duration && s.retry < s.renew_deadline);
        for bad in [
            // The deadline must end before the lease does: else two replicas act at once.
            "leaderElection: {namespace: n, leaseSeconds: 10, renewDeadlineSeconds: 10}",
            "leaderElection: {namespace: n, retrySeconds: 0}",
        ] {
            let text = OK.replace("leaderElection: {namespace: paddock-system}", bad);
            assert!(ControllerConfig::parse(&text).is_err(), "{bad}");
        }
        assert!(ControllerConfig::parse(&format!("{OK}unknown: 1\n")).is_err());
        assert!(ControllerConfig::parse(&OK.replace("{caFile: /ca.crt}", "{}")).is_err());
    }
}
