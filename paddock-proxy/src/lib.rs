//! Paddock's egress proxy.
//!
//! This crate holds the kernel half of interception (loading and attaching the eBPF programs,
//! recovering original destinations) and, on top of it, the proxy data plane.

#![deny(unsafe_code)]

pub mod cgroup;
pub mod ebpf;
pub mod netns;
pub mod origdst;
mod sys;
pub mod tls;
