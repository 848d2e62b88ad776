//! Pieces of `paddock-proxy run -- COMMAND`: who the command runs as, what it sees in its
//! environment, and the sandbox it runs in inside the agent cgroup.
//!
//! The command gets a pod's isolation on one machine: its own network namespace with only
//! loopback and the proxy's listener inside, its own PID, mount and IPC namespaces, a private
//! `/tmp`, `/var/tmp`, `/dev/shm` and `/run`, a new session without the operator's terminal (a
//! pty relayed by `run` when stdin is one), no inherited descriptors above 2, `no_new_privs`
//! and a seccomp filter ([`seccomp`]). It runs as a fresh unprivileged uid per run unless
//! `--user` names one ([`user`]), and gets only the run CA's certificate and its placeholder
//! bearers, never the secrets, the CA key or the audit log, which stay root-only, nor the
//! broker's lease database and caller key, which exist only in Paddock's memory. See [`init`]
//! for the process chain.

pub mod child;
pub mod env;
pub mod init;
pub mod interactive;
pub mod pty;
pub mod publish;
pub mod resolv;
pub mod seccomp;
pub mod session;
pub mod shell;
pub mod spec;
pub mod summary;
pub mod user;

pub use child::{ChildError, ExitOutcome, Launch, Sandboxed, spawn_sandboxed, supervise};
pub use env::{CaFiles, child_env};
pub use publish::Publish;
pub use session::{RunError, RunOptions, run};
pub use spec::SandboxSpec;
pub use user::{RunUser, UserError, resolve_user};
