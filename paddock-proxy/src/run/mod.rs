//! Pieces of `paddock-proxy run -- COMMAND`: who the command runs as, what it sees in its
//! environment, and how it is started inside the agent cgroup, supervised and reaped.
//!
//! The command must not be able to read what only Paddock may read: it runs as an
//! unprivileged user (default: the invoking `SUDO_USER`, else `nobody`), gets only the run
//! CA's certificate and its placeholder bearers, and never the secrets, the CA key, the broker
//! database or the audit log, which stay root-only.

pub mod child;
pub mod env;
pub mod resolv;
pub mod session;
pub mod user;

pub use child::{ChildError, ExitOutcome, SpawnSpec, spawn_in_cgroup, supervise};
pub use env::{CaFiles, child_env};
pub use session::{RunError, RunOptions, run};
pub use user::{RunUser, UserError, resolve_user};
