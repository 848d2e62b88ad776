//! Paddock credential broker.

pub mod auth;
