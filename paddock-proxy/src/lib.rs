//! Placeholder.

pub mod audit;
pub mod metrics;
pub mod net;
pub mod policy;
