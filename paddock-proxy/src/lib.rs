//! Paddock's egress proxy.
//!
//! This crate holds the kernel half of interception (loading and attaching the eBPF programs,
//! recovering original destinations) and, on top of it, the proxy data plane, its client of
//! the broker, and (for now) the `serve` and `run` compositions. `README.md` in the crate lists
//! its seams and how to test it; `ARCHITECTURE.md` at the repository root maps the data path.

#![deny(unsafe_code)]

pub mod audit;
pub mod broker;
pub mod cgroup;
pub mod dns;
pub mod ebpf;
#[doc(hidden)]
pub mod fuzzing;
pub mod health;
mod heap;
pub mod http;
pub mod labels;
pub mod metrics;
pub mod mounts;
pub mod net;
pub mod netns;
pub mod origdst;
pub mod pod_cgroup;
pub mod policy;
pub mod proxy;
pub mod scrub;
mod sys;
pub mod tls;
