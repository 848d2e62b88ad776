//! Paddock's app layer: where the proxy library's data plane and the credential broker are
//! assembled into programs.
//!
//! `paddock-proxy` (the library) is the data plane and knows the broker only through its wire
//! types and [`paddock_proxy::broker::BrokerConnector`]; this crate alone links
//! `paddock-broker`. It holds the `paddock-proxy` binary, [`run`] (one command under Paddock,
//! with the broker embedded through [`paddock_broker::embed`] and called over
//! [`broker_link`]), [`serve`] (a config file turned into the library's running
//! components) and [`node`] (the node agent: every agent pod on a Kubernetes node, each its
//! own run). [`token_refresher`] is the client-credentials sidecar that keeps the proxy's
//! `bearer_file` fresh.

#![deny(unsafe_code)]

pub mod broker_link;
pub mod check;
pub mod node;
pub mod run;
pub mod runtime;
pub mod serve;
pub mod token_refresher;
