//! Placeholder.

pub mod policy;
