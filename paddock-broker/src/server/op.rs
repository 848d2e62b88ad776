//! What each API route does, and the run an interactive path names: shared by the route
//! table ([`super::routes`]) and the interactive routes ([`super::interact`]).

/// What a route does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Issue,
    Renew,
    Revoke,
    ValidateEgress,
    SubstituteAuth,
    Leases,
    Runs,
    GrantsPoll,
    Ping,
    NodeCa,
    NodeCaCrl,
    Prompt,
    Interrupt,
    End,
    Attach,
    Shell,
    NodeTunnel,
}

impl Op {
    /// The only operations a node agent may call, whatever scopes a configuration gave it.
    #[must_use]
    pub fn is_for_node_agents(self) -> bool {
        matches!(
            self,
            Op::ValidateEgress
                | Op::SubstituteAuth
                | Op::GrantsPoll
                | Op::Ping
                | Op::NodeCa
                | Op::NodeCaCrl
                | Op::NodeTunnel
        )
    }

    /// The operations on one interactive run (`/v1/runs/{namespace}/{run}/...`).
    #[must_use]
    pub fn is_interactive(self) -> bool {
        matches!(
            self,
            Op::Prompt | Op::Interrupt | Op::End | Op::Attach | Op::Shell
        )
    }
}

/// The (namespace, run) of an interactive path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunPath {
    pub namespace: String,
    pub run: String,
}
