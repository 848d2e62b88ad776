//! Paddock credential broker: holds real secrets, issues per-run placeholder bearers, and
//! tells the proxy what to substitute on each intercepted request.
//!
//! Layers: [`wire`] (API types, shared with the proxy), [`auth`] (caller authentication),
//! [`policy`] (`BrokerPolicy` documents), [`providers`] (how secrets are injected), [`store`]
//! (`SQLite` state), [`ratelimit`], [`audit`], [`broker`] (the domain service, usable embedded)
//! and [`server`] (HTTPS API and admin listener).

pub mod audit;
pub mod auth;
pub mod bearer;
pub mod broker;
pub mod policy;
pub mod providers;
pub mod ratelimit;
pub mod secrets;
pub mod store;
pub mod wire;

pub use broker::{Broker, BrokerError};
pub mod config;
pub mod metrics;
pub mod server;
