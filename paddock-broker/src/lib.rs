//! Paddock credential broker: holds real secrets, issues per-run placeholder bearers, and
//! tells the proxy what to substitute on each intercepted request.
//!
//! Layers: [`wire`] (API types, shared with the proxy), [`auth`] (caller authentication),
//! [`policy`] (`BrokerPolicy` documents), [`providers`] (how secrets are injected), [`store`]
//! (`SQLite` or `PostgreSQL` state), [`ratelimit`], [`audit`], [`broker`] (the domain service), [`server`] (HTTPS API and admin
//! listener) and [`embed`] (the broker built from a typed config and served in-process only).

#[cfg(feature = "server")]
pub mod audit;
#[cfg(feature = "server")]
pub mod auth;
#[cfg(feature = "server")]
pub mod base_url;
#[cfg(feature = "server")]
pub mod bearer;
#[cfg(feature = "server")]
pub mod broker;
#[cfg(feature = "kube")]
pub mod cluster;
#[cfg(feature = "server")]
pub mod grants;
#[cfg(feature = "server")]
pub mod interactive;
pub mod node_ca;
#[cfg(feature = "server")]
pub mod policy;
#[cfg(feature = "server")]
pub mod providers;
#[cfg(feature = "server")]
pub mod ratelimit;
#[cfg(feature = "server")]
pub mod secrets;
#[cfg(feature = "server")]
pub mod store;
#[cfg(feature = "server")]
pub mod yaml;
/// The API's types live in `paddock-wire` (shared with the proxy); re-exported under the
/// name the broker's modules use.
pub use paddock_wire::api as wire;

#[cfg(feature = "server")]
pub use broker::{Broker, BrokerError};
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
pub mod embed;
#[cfg(feature = "server")]
#[doc(hidden)]
pub mod fuzzing;
#[cfg(feature = "server")]
pub mod metrics;
#[cfg(feature = "server")]
pub mod server;
