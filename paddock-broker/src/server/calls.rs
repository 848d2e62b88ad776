//! Broker calls from async route handlers: run on the blocking pool, errors answered as the
//! error envelope.

use std::sync::Arc;

use super::{
    State,
    respond::{Resp, error_response},
};
use crate::{
    broker::{Broker, BrokerError},
    wire::ErrorCode,
};

/// The answer to a failed broker call (logged by how bad it is).
pub(super) fn broker_error(e: &BrokerError) -> Resp {
    match e.code() {
        ErrorCode::Internal | ErrorCode::AuditUnavailable | ErrorCode::Unavailable => {
            tracing::error!(error = %e, "interactive request failed");
        }
        _ => tracing::info!(error = %e, "interactive request refused"),
    }
    error_response(e.code(), e.public_message())
}

/// Runs a blocking broker call on the blocking pool.
pub(super) async fn blocking<T: Send + 'static>(
    state: &Arc<State>,
    f: impl FnOnce(&Broker) -> Result<T, BrokerError> + Send + 'static,
) -> Result<T, BrokerError> {
    let broker = state.broker.clone();
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(|| f(&broker)))
        .await
        .map_err(|e| BrokerError::Internal(format!("broker task failed: {e}")))?
}
