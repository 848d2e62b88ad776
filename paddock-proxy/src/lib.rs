//! Paddock's egress proxy.
//!
//! This crate holds the kernel half of interception (loading and attaching the eBPF programs,
//! recovering original destinations) and, on top of it, the proxy data plane.

#![deny(unsafe_code)]

pub mod audit;
pub mod broker;
pub mod cgroup;
pub mod dns;
pub mod ebpf;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod labels;
pub mod metrics;
pub mod mounts;
pub mod net;
pub mod netns;
pub mod origdst;
pub mod policy;
pub mod proxy;
pub mod run;
pub mod scrub;
mod sys;
pub mod tls;
