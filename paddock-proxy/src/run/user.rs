//! Which unprivileged user runs the agent command.

use nix::unistd::{Gid, Uid, User};

/// The identity the command runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunUser {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
    pub home: std::path::PathBuf,
}

/// Why no run user could be chosen.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
    #[error("no such user: {0}")]
    Unknown(String),
    #[error(
        "refusing to run the command as root: it could read the secrets, the CA key and the \
         audit log; pass --user NAME (or run through sudo so SUDO_USER is set)"
    )]
    Root,
    #[error("user database lookup failed: {0}")]
    Lookup(nix::Error),
}

fn lookup(spec: &str) -> Result<User, UserError> {
    let found = match spec.parse::<u32>() {
        Ok(uid) => User::from_uid(Uid::from_raw(uid)),
        Err(_) => User::from_name(spec),
    };
    found
        .map_err(UserError::Lookup)?
        .ok_or_else(|| UserError::Unknown(spec.to_owned()))
}

/// Pick the user: an explicit `--user`, else `SUDO_USER` (when not root), else `nobody`.
/// Root is refused, so the command can never read what only Paddock may read.
pub fn resolve_user(explicit: Option<&str>, sudo_user: Option<&str>) -> Result<RunUser, UserError> {
    let spec = explicit
        .or(sudo_user.filter(|u| !u.is_empty() && *u != "root"))
        .unwrap_or("nobody");
    let u = lookup(spec)?;
    if u.uid.is_root() {
        return Err(UserError::Root);
    }
    Ok(RunUser {
        name: u.name,
        uid: u.uid,
        gid: u.gid,
        home: u.dir,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_to_nobody_and_prefers_sudo_user_then_explicit() {
        let u = resolve_user(None, None).expect("nobody exists");
        assert_eq!(u.name, "nobody");
        assert!(!u.uid.is_root());
        // SUDO_USER=root is ignored rather than honoured.
        assert_eq!(
            resolve_user(None, Some("root")).expect("nobody").name,
            "nobody"
        );
        assert_eq!(resolve_user(None, Some("")).expect("nobody").name, "nobody");
        // An explicit numeric uid wins over SUDO_USER.
        assert_eq!(
            resolve_user(Some("65534"), Some("daemon"))
                .expect("uid")
                .uid
                .as_raw(),
            65534
        );
    }

    #[test]
    fn root_and_unknown_users_are_refused() {
        assert_eq!(resolve_user(Some("root"), None), Err(UserError::Root));
        assert_eq!(resolve_user(Some("0"), None), Err(UserError::Root));
        assert_eq!(
            resolve_user(Some("paddock-no-such-user"), None),
            Err(UserError::Unknown("paddock-no-such-user".into()))
        );
    }
}
