//! Placeholder.

pub mod net;
pub mod policy;
