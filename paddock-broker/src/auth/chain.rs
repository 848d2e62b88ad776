//! Tries the configured backends in order.

use std::sync::Arc;

use super::{AuthError, AuthFuture, Authenticator, ReadinessFuture};

/// Tries each backend in order. The first success wins; `Forbidden` and `Unavailable` stop
/// the chain (a backend that recognised the credential has decided, and an unavailable
/// backend must not let a later one decide instead: fail closed). Only `Unauthenticated`
/// moves on to the next backend. An empty chain authenticates nobody.
#[derive(Debug, Clone, Default)]
pub struct AuthChain {
    backends: Vec<Arc<dyn Authenticator>>,
}

impl AuthChain {
    #[must_use]
    pub fn new(backends: Vec<Arc<dyn Authenticator>>) -> Self {
        Self { backends }
    }

    #[must_use]
    pub fn backend_names(&self) -> Vec<&'static str> {
        self.backends.iter().map(|b| b.name()).collect()
    }
}

impl Authenticator for AuthChain {
    fn name(&self) -> &'static str {
        "chain"
    }

    fn authenticate<'a>(&'a self, bearer: &'a str) -> AuthFuture<'a> {
        Box::pin(async move {
            let mut reasons = Vec::new();
            for backend in &self.backends {
                match backend.authenticate(bearer).await {
                    Ok(identity) => return Ok(identity),
                    Err(AuthError::Unauthenticated(reason)) => {
                        reasons.push(format!("{}: {reason}", backend.name()));
                    }
                    Err(other) => return Err(other),
                }
            }
            if reasons.is_empty() {
                reasons.push("no authentication backend configured".to_owned());
            }
            Err(AuthError::Unauthenticated(reasons.join("; ")))
        })
    }

    fn readiness(&self) -> ReadinessFuture<'_> {
        Box::pin(async move {
            // One after the other: chains are short, and the caller bounds the whole probe.
            let mut all = Vec::new();
            for backend in &self.backends {
                all.extend(backend.readiness().await);
            }
            all
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::auth::Identity;

    #[derive(Debug)]
    struct Fixed(Result<&'static str, u8>);

    impl Authenticator for Fixed {
        fn name(&self) -> &'static str {
            "fixed"
        }
        fn authenticate<'a>(&'a self, _bearer: &'a str) -> AuthFuture<'a> {
            Box::pin(async move {
                match self.0 {
                    Ok(sub) => Ok(Identity {
                        subject: sub.to_owned(),
                        namespace: "ns".to_owned(),
                        service_account: None,
                        scopes: BTreeSet::new(),
                        backend: "fixed",
                        run: None,
                        node: None,
                        placement: None,
                    }),
                    Err(0) => Err(AuthError::Unauthenticated("no".into())),
                    Err(1) => Err(AuthError::Forbidden("no".into())),
                    Err(_) => Err(AuthError::Unavailable("down".into())),
                }
            })
        }
    }

    fn chain(items: Vec<Fixed>) -> AuthChain {
        AuthChain::new(
            items
                .into_iter()
                .map(|f| Arc::new(f) as Arc<dyn Authenticator>)
                .collect(),
        )
    }

    #[tokio::test]
    async fn falls_through_unauthenticated_only() {
        let c = chain(vec![Fixed(Err(0)), Fixed(Ok("b"))]);
        assert_eq!(
            c.authenticate("x").await.map(|i| i.subject).ok(),
            Some("b".to_owned())
        );
        let c = chain(vec![Fixed(Err(2)), Fixed(Ok("b"))]);
        assert!(matches!(
            c.authenticate("x").await,
            Err(AuthError::Unavailable(_))
        ));
        let c = chain(vec![Fixed(Err(1)), Fixed(Ok("b"))]);
        assert!(matches!(
            c.authenticate("x").await,
            Err(AuthError::Forbidden(_))
        ));
        let c = chain(vec![]);
        assert!(matches!(
            c.authenticate("x").await,
            Err(AuthError::Unauthenticated(_))
        ));
    }
}
