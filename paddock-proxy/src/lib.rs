//! Placeholder.

pub mod http;
