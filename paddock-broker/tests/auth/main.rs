//! Integration tests of the auth backends against servers started on 127.0.0.1:0.

#[path = "../common/mod.rs"]
mod common;
mod introspection;
mod jwt;
mod node_agent;
mod routes;
mod rsa_session;
mod support;
mod tokenreview;
