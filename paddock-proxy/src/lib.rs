//! Placeholder.

pub mod tls;
