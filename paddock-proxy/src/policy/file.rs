//! A [`StaticPolicy`] read from a file that can be reloaded while the proxy runs.
//!
//! A reload that fails (unreadable file, a rule that does not validate) keeps the rules in
//! force and reports the error: a typo while editing must neither open everything nor cut
//! every run off. Open connections see a successful reload through
//! [`super::EgressRecheck`] within its interval.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use super::{CheckFuture, EgressPolicy, EgressRequest, PolicyConfigError, StaticPolicy};

/// What identifies one version of the file on disk.
type Stamp = Option<(SystemTime, u64)>;

/// The static policy of one file; [`PolicyFile::reload`] swaps in its current contents.
#[derive(Debug)]
pub struct PolicyFile {
    path: PathBuf,
    current: RwLock<(Arc<StaticPolicy>, Stamp)>,
    /// Bumped after every reload that put new rules in force ([`EgressPolicy::generation`]).
    generation: std::sync::atomic::AtomicU64,
}

fn stamp(path: &Path) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

impl PolicyFile {
    /// Loads `path`; an invalid file is an error (the proxy does not start).
    pub fn open(path: &Path) -> Result<Self, PolicyConfigError> {
        let stamp = stamp(path);
        let policy = StaticPolicy::from_file(path)?;
        Ok(Self {
            path: path.to_owned(),
            current: RwLock::new((Arc::new(policy), stamp)),
            generation: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The file this policy is read from.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The rules in force.
    #[must_use]
    pub fn current(&self) -> Arc<StaticPolicy> {
        // A poisoned lock only means a panic mid-swap; the value is one whole policy.
        let guard = self
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(&guard.0)
    }

    /// Re-reads the file. On error the rules in force stay.
    pub fn reload(&self) -> Result<(), PolicyConfigError> {
        let stamp = stamp(&self.path);
        let policy = StaticPolicy::from_file(&self.path)?;
        let mut guard = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *guard = (Arc::new(policy), stamp);
        drop(guard);
        // After the swap: a check that read the old number may have seen either policy.
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// Re-reads the file if its modification time or size changed since the last load;
    /// `Ok(true)` when new rules are in force.
    pub fn reload_if_changed(&self) -> Result<bool, PolicyConfigError> {
        let seen = {
            let guard = self
                .current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            guard.1
        };
        if stamp(&self.path) == seen {
            return Ok(false);
        }
        self.reload().map(|()| true)
    }

    /// Polls the file every `every` and reloads it when it changed, until the task is
    /// dropped. Failed reloads are logged and keep the rules in force.
    pub async fn watch(self: Arc<Self>, every: std::time::Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match self.reload_if_changed() {
                Ok(true) => tracing::info!(
                    path = %self.path.display(), rules = self.current().len(),
                    "egress policy reloaded"
                ),
                Ok(false) => {}
                Err(e) => tracing::error!(
                    path = %self.path.display(), error = %e,
                    "egress policy file is invalid; keeping the rules in force"
                ),
            }
        }
    }
}

impl EgressPolicy for PolicyFile {
    fn check<'a>(&'a self, req: &'a EgressRequest) -> CheckFuture<'a> {
        Box::pin(std::future::ready(self.current().decide(req)))
    }

    fn name_allowed<'a>(&'a self, _run: &'a str, host: &'a str) -> CheckFuture<'a> {
        Box::pin(std::future::ready(self.current().decide_name(host)))
    }

    fn generation(&self) -> Option<u64> {
        Some(self.generation.load(std::sync::atomic::Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Mode;

    #[tokio::test]
    async fn reloads_keep_the_old_rules_when_the_new_file_is_bad() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("policy.toml");
        std::fs::write(&path, "[[rule]]\nhosts = [\"a.test\"]\nports = [443]\n").expect("w");
        let file = PolicyFile::open(&path).expect("open");
        let a = EgressRequest::new("r", "a.test", 443, Mode::Transparent).expect("req");
        let b = EgressRequest::new("r", "b.test", 443, Mode::Transparent).expect("req");
        assert!(file.check(&a).await.expect("answer").is_allowed());
        assert!(!file.check(&b).await.expect("answer").is_allowed());
        assert!(!file.reload_if_changed().expect("unchanged"));

        std::fs::write(
            &path,
            "[[rule]]\nhosts = [\"b.test\", \"bb.test\"]\nports = [443]\n",
        )
        .expect("w");
        assert!(file.reload_if_changed().expect("changed"));
        assert!(!file.check(&a).await.expect("answer").is_allowed());
        assert!(file.check(&b).await.expect("answer").is_allowed());

        std::fs::write(&path, "[[rule]]\nhosts = [\"*x\"]\nports = [443]\n").expect("w");
        file.reload().expect_err("invalid rule");
        assert!(
            file.check(&b).await.expect("answer").is_allowed(),
            "old rules stay"
        );
    }
}
