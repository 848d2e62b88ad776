//! The proxy's broker client to a broker in the same process: an in-memory pipe per
//! connection from the embedded broker's [`LocalLink`], served by the broker's own HTTP
//! server, routes and authentication. No TCP and no TLS: inside one process they only cost
//! CPU and expose a port.

use std::sync::Arc;
use std::time::Duration;

use http::Uri;
use hyper_util::rt::TokioIo;
use paddock_broker::{embed::EmbeddedClient, server::LocalLink};
use paddock_proxy::broker::{
    BrokerBearer, BrokerClient, BrokerConfigError, BrokerConnector, BrokerStream, ConnectFuture,
};

/// Opens in-process connections to the broker for the client's pool.
#[derive(Debug, Clone)]
pub struct LocalConnector(pub LocalLink);

impl BrokerConnector for LocalConnector {
    fn base(&self) -> Uri {
        // Never resolved: only the pool key and the Host header.
        Uri::from_static("http://paddock-broker.local")
    }

    fn connect(&self, _uri: Uri) -> ConnectFuture {
        let opened = self
            .0
            .connect()
            .map(|stream| Box::new(TokioIo::new(stream)) as BrokerStream)
            .map_err(Into::into);
        Box::pin(std::future::ready(opened))
    }
}

/// A broker client of the embedded broker: its link and its in-memory caller key.
pub fn client(
    embedded: &EmbeddedClient,
    timeout: Duration,
) -> Result<BrokerClient, BrokerConfigError> {
    BrokerClient::with_connector(
        Arc::new(LocalConnector(embedded.link().clone())),
        BrokerBearer::Value(embedded.bearer().expose().to_owned()),
        timeout,
    )
}
