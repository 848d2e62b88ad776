//! Integration tests of the auth backends against servers started on 127.0.0.1:0.

mod jwt;
mod rsa_session;
mod support;
mod tokenreview;
