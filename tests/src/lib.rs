//! Harness for Paddock's root-only integration tests: uniquely named network namespaces,
//! veth links, cgroups and bpffs pin directories that clean up after themselves (also when a
//! test panics), helpers to run a process inside a cgroup and a namespace, and the privilege
//! gate that never skips silently under `CI=true`.

pub mod broker_lab;
pub mod cgroup;
pub mod echo_api;
pub mod files;
pub mod git_server;
pub mod h2_api;
pub mod inbound;
pub mod interactive;
pub mod loadgen;
pub mod names;
pub mod netns;
pub mod node_lab;
pub mod peers;
pub mod pins;
pub mod privilege;
pub mod process;
pub mod proxied;
pub mod pyserver;
pub mod reflect_api;
pub mod relay;
pub mod servers;
pub mod topology;
pub mod tty;
pub mod wrk;

pub use cgroup::CgroupGuard;
pub use netns::Netns;
pub use pins::PinDir;
pub use privilege::require_root;
pub use topology::{HostLink, Topology};
