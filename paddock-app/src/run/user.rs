//! Which unprivileged user runs the agent command.
//!
//! By default a fresh uid per run, as systemd's `DynamicUser=` does: a number from
//! [`DYNAMIC_UIDS`] (systemd's dynamic range) that has no passwd or group entry, no process
//! running with it as any of its ids, and no lock held by another run, reserved by an
//! `flock`ed file under [`UID_LOCK_DIR`] for as long as the run lasts. Such a user owns nothing
//! on the host: it cannot read the operator's files (`~/.ssh`, cloud credentials), its kernel
//! keyring and IPC objects are its own, and no other process shares its identity.
//! `--user NAME` runs the command as an existing account instead (to work on the operator's
//! files); root is always refused. `SUDO_USER` no longer picks the user.

use std::{
    collections::BTreeSet,
    fs::{File, OpenOptions},
    io,
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use nix::unistd::{Gid, Group, Uid, User};

/// systemd's range for dynamic users (`DynamicUser=`); the same numbers for uid and gid.
pub const DYNAMIC_UIDS: std::ops::RangeInclusive<u32> = 61184..=65519;

/// Lock files reserving dynamic uids, one per uid, shared by every `run` on the machine
/// (whatever its `--state-dir`).
pub const UID_LOCK_DIR: &str = "/run/paddock/uids";

/// Where the sandbox puts a dynamic user's home (inside its private `/tmp`).
pub const DYNAMIC_HOME: &str = "/tmp/.paddock/home";

/// The identity the command runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunUser {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
    pub home: PathBuf,
    /// A per-run uid without an account: the sandbox adds its passwd and group entries and
    /// creates its home.
    pub dynamic: bool,
}

impl RunUser {
    /// The per-run user for a reserved uid (gid: the same number).
    #[must_use]
    pub fn dynamic(uid: u32) -> Self {
        Self {
            name: format!("paddock-{uid}"),
            uid: Uid::from_raw(uid),
            gid: Gid::from_raw(uid),
            home: PathBuf::from(DYNAMIC_HOME),
            dynamic: true,
        }
    }
}

/// Why no run user could be chosen.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("no such user: {0}")]
    Unknown(String),
    #[error(
        "refusing to run the command as root: it could read the secrets, the CA key and the \
         audit log; leave out --user (a fresh unprivileged uid is used) or name another user"
    )]
    Root,
    #[error("user database lookup failed: {0}")]
    Lookup(nix::Error),
    #[error(
        "no free uid in {first}..={last} for the command (every one has an account, a process \
         or another run's lock); pass --user NAME",
        first = DYNAMIC_UIDS.start(),
        last = DYNAMIC_UIDS.end()
    )]
    NoFreeUid,
    #[error("reserving a uid under {dir}: {source}")]
    Lock { dir: PathBuf, source: io::Error },
    #[error("listing the uids in use in /proc: {0}")]
    Proc(io::Error),
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

/// The user named by `--user` (a name or a numeric uid with an account). Root is refused, so
/// the command can never read what only Paddock may read.
pub fn resolve_user(spec: &str) -> Result<RunUser, UserError> {
    let u = lookup(spec)?;
    if u.uid.is_root() {
        return Err(UserError::Root);
    }
    Ok(RunUser {
        name: u.name,
        uid: u.uid,
        gid: u.gid,
        home: u.dir,
        dynamic: false,
    })
}

/// What choosing a dynamic uid needs to know about the machine (a seam for unit tests).
pub trait UidHost {
    /// Held while the uid is in use.
    type Lock;
    /// A passwd or group entry (or another allocator's record) uses this number.
    fn has_account(&self, id: u32) -> bool;
    /// Every uid and gid some running process holds (real, effective, saved or filesystem).
    fn ids_in_use(&self) -> io::Result<BTreeSet<u32>>;
    /// Reserve `id`; `None` when another run holds it.
    fn try_lock(&self, id: u32) -> io::Result<Option<Self::Lock>>;
}

/// Pick a free dynamic uid, trying the range from `start` (wrapping), and reserve it.
pub fn pick_dynamic_uid<H: UidHost>(host: &H, start: u32) -> Result<(u32, H::Lock), UserError> {
    let (first, last) = (*DYNAMIC_UIDS.start(), *DYNAMIC_UIDS.end());
    let span = last - first + 1;
    let offset = start.wrapping_sub(first) % span;
    let busy = host.ids_in_use().map_err(UserError::Proc)?;
    for i in 0..span {
        let id = first + (offset + i) % span;
        if busy.contains(&id) || host.has_account(id) {
            continue;
        }
        let Some(lock) = host.try_lock(id).map_err(|source| UserError::Lock {
            dir: PathBuf::from(UID_LOCK_DIR),
            source,
        })?
        else {
            continue;
        };
        // Checked again under the lock: a run that released this uid a moment ago may have
        // left nothing, but a process that started with it since the scan must not be joined.
        let busy_now = host.ids_in_use().map_err(UserError::Proc)?;
        if busy_now.contains(&id) || host.has_account(id) {
            continue;
        }
        return Ok((id, lock));
    }
    Err(UserError::NoFreeUid)
}

/// The real machine: NSS for accounts, `/proc` for processes, lock files in a directory.
#[derive(Debug, Clone)]
pub struct HostUids {
    pub lock_dir: PathBuf,
}

impl Default for HostUids {
    fn default() -> Self {
        Self {
            lock_dir: PathBuf::from(UID_LOCK_DIR),
        }
    }
}

/// A reserved uid: the lock file is removed, then unlocked, when this is dropped.
#[derive(Debug)]
pub struct UidLock {
    path: PathBuf,
    _lock: nix::fcntl::Flock<File>,
}

impl Drop for UidLock {
    fn drop(&mut self) {
        // Unlinked while still locked: a run that opened the old file sees its link count drop
        // to 0 after taking the lock and tries again (systemd's protocol for the same files).
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The ids in a `/proc/PID/status` text's `Uid:` and `Gid:` lines.
fn status_ids(status: &str, out: &mut BTreeSet<u32>) {
    for line in status.lines() {
        if let Some(rest) = line
            .strip_prefix("Uid:")
            .or_else(|| line.strip_prefix("Gid:"))
        {
            out.extend(
                rest.split_whitespace()
                    .filter_map(|w| w.parse::<u32>().ok()),
            );
        }
    }
}

impl UidHost for HostUids {
    type Lock = UidLock;

    fn has_account(&self, id: u32) -> bool {
        // A failed lookup counts as taken: never hand out a number we could not check.
        !matches!(User::from_uid(Uid::from_raw(id)), Ok(None))
            || !matches!(Group::from_gid(Gid::from_raw(id)), Ok(None))
            || Path::new("/run/systemd/dynamic-uid")
                .join(id.to_string())
                .exists()
    }

    fn ids_in_use(&self) -> io::Result<BTreeSet<u32>> {
        let mut ids = BTreeSet::new();
        for entry in std::fs::read_dir("/proc")? {
            let entry = entry?;
            let name = entry.file_name();
            if !name
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
            {
                continue;
            }
            // A process that exits during the scan has no status any more: skip it.
            if let Ok(status) = std::fs::read_to_string(entry.path().join("status")) {
                status_ids(&status, &mut ids);
            }
        }
        Ok(ids)
    }

    fn try_lock(&self, id: u32) -> io::Result<Option<UidLock>> {
        std::fs::create_dir_all(&self.lock_dir)?;
        std::fs::set_permissions(
            &self.lock_dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )?;
        let path = self.lock_dir.join(format!("{id}.lock"));
        for _ in 0..3 {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&path)?;
            let lock =
                match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                    Ok(l) => l,
                    Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Ok(None),
                    Err((_, e)) => return Err(e.into()),
                };
            // Locked a file its previous holder had already unlinked: open the new one.
            if lock.metadata()?.nlink() == 0 {
                continue;
            }
            return Ok(Some(UidLock { path, _lock: lock }));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, collections::BTreeMap};

    use super::*;

    #[test]
    fn an_explicit_user_is_looked_up_and_root_refused() {
        let u = resolve_user("nobody").expect("nobody exists");
        assert_eq!(u.name, "nobody");
        assert!(!u.uid.is_root() && !u.dynamic);
        assert_eq!(resolve_user("65534").expect("uid").uid.as_raw(), 65534);
        assert!(matches!(resolve_user("root"), Err(UserError::Root)));
        assert!(matches!(resolve_user("0"), Err(UserError::Root)));
        assert!(matches!(
            resolve_user("paddock-no-such-user"),
            Err(UserError::Unknown(n)) if n == "paddock-no-such-user"
        ));
    }

    #[test]
    fn a_dynamic_user_has_a_name_home_and_matching_gid() {
        let u = RunUser::dynamic(61200);
        assert_eq!(u.name, "paddock-61200");
        assert_eq!((u.uid.as_raw(), u.gid.as_raw()), (61200, 61200));
        assert_eq!(u.home, Path::new(DYNAMIC_HOME));
        assert!(u.dynamic);
    }

    /// A machine where some ids have accounts, some run processes and some are locked.
    #[derive(Default)]
    struct Fake {
        accounts: BTreeSet<u32>,
        procs: BTreeSet<u32>,
        locked: RefCell<BTreeSet<u32>>,
        /// A process starting with this id right after the first scan.
        starts_later: Option<u32>,
        scans: RefCell<u32>,
        lock_calls: RefCell<BTreeMap<u32, u32>>,
    }

    impl UidHost for Fake {
        type Lock = u32;
        fn has_account(&self, id: u32) -> bool {
            self.accounts.contains(&id)
        }
        fn ids_in_use(&self) -> io::Result<BTreeSet<u32>> {
            *self.scans.borrow_mut() += 1;
            let mut ids = self.procs.clone();
            if *self.scans.borrow() > 1 {
                ids.extend(self.starts_later);
            }
            Ok(ids)
        }
        fn try_lock(&self, id: u32) -> io::Result<Option<u32>> {
            *self.lock_calls.borrow_mut().entry(id).or_default() += 1;
            Ok(self.locked.borrow_mut().insert(id).then_some(id))
        }
    }

    #[test]
    fn picks_the_first_free_uid_from_start_skipping_taken_ones() {
        let first = *DYNAMIC_UIDS.start();
        let host = Fake {
            accounts: [first + 10].into(),
            procs: [first + 11].into(),
            locked: RefCell::new([first + 12].into()),
            ..Fake::default()
        };
        let (id, lock) = pick_dynamic_uid(&host, first + 10).expect("free uid");
        assert_eq!((id, lock), (first + 13, first + 13));
        // Accounts and processes are never locked at all.
        assert!(!host.lock_calls.borrow().contains_key(&(first + 10)));
        assert!(!host.lock_calls.borrow().contains_key(&(first + 11)));
        // A second run gets another uid.
        let (again, _) = pick_dynamic_uid(&host, first + 10).expect("free uid");
        assert_eq!(again, first + 14);
    }

    #[test]
    fn start_outside_the_range_wraps_into_it_and_the_end_wraps_to_the_start() {
        let (first, last) = (*DYNAMIC_UIDS.start(), *DYNAMIC_UIDS.end());
        let host = Fake {
            accounts: [last].into(),
            ..Fake::default()
        };
        let (id, _) = pick_dynamic_uid(&host, last).expect("free uid");
        assert_eq!(id, first, "wrapped past the taken last uid");
        let (id, _) = pick_dynamic_uid(&host, 7).expect("free uid");
        assert!(DYNAMIC_UIDS.contains(&id));
    }

    #[test]
    fn a_process_appearing_before_the_lock_is_taken_is_noticed() {
        let first = *DYNAMIC_UIDS.start();
        let host = Fake {
            starts_later: Some(first),
            ..Fake::default()
        };
        let (id, _) = pick_dynamic_uid(&host, first).expect("free uid");
        assert_eq!(id, first + 1);
    }

    #[test]
    fn a_full_range_is_a_clear_error() {
        let host = Fake {
            accounts: DYNAMIC_UIDS.collect(),
            ..Fake::default()
        };
        let err = pick_dynamic_uid(&host, 0).expect_err("full");
        assert!(matches!(err, UserError::NoFreeUid));
        assert!(err.to_string().contains("--user"), "{err}");
    }

    #[test]
    fn proc_status_ids_include_every_kind() {
        let mut ids = BTreeSet::new();
        status_ids(
            "Name:\tx\nUid:\t1000\t1001\t1002\t1003\nGid:\t2000\t2000\t2000\t2001\nGroups:\t27\n",
            &mut ids,
        );
        assert_eq!(ids, [1000, 1001, 1002, 1003, 2000, 2001].into());
    }

    #[test]
    fn lock_files_exclude_each_other_and_vanish_on_release() {
        let dir = tempfile::tempdir().expect("tempdir");
        let host = HostUids {
            lock_dir: dir.path().join("uids"),
        };
        let a = host.try_lock(61999).expect("lock").expect("free");
        assert!(host.try_lock(61999).expect("lock").is_none(), "held");
        let path = dir.path().join("uids/61999.lock");
        assert!(path.exists());
        drop(a);
        assert!(!path.exists(), "removed on release");
        assert!(host.try_lock(61999).expect("lock").is_some(), "free again");
    }
}
