//! What `run` tells the sandbox launcher (`paddock-proxy __sandbox`) to start.
//!
//! The spec travels as JSON in an in-memory file (memfd) whose descriptor the launcher
//! inherits: never in argv, which every user can read in `/proc/PID/cmdline`, and not in the
//! environment. Byte strings (program, arguments, environment, paths) are kept as bytes, so
//! non-UTF-8 values pass through unchanged. The launcher validates it before acting on it.

use std::{
    ffi::{OsStr, OsString},
    os::unix::ffi::{OsStrExt, OsStringExt},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::RunUser;

/// The directory inside the sandbox (on its private `/tmp`, root-owned, 0755) holding the CA
/// files, the resolv.conf and the passwd/group copies; a dynamic user's home is under it.
pub const SANDBOX_DIR: &str = "/tmp/.paddock";

/// Largest spec accepted (the CA bundle with the system roots is ~200 KiB).
pub const MAX_SPEC_BYTES: u64 = 16 << 20;

/// A file written into [`SANDBOX_DIR`] before the command starts (root-owned).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxFile {
    /// A plain file name (no `/`).
    pub name: String,
    pub contents: String,
    pub mode: u32,
}

/// Terminal size, copied from `run`'s terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowSize {
    pub rows: u16,
    pub cols: u16,
}

/// The command's own pseudo-terminal, standing in for the operator's terminal on each of
/// stdin, stdout and stderr that is one (the others pass through unchanged), so the command
/// never holds a descriptor of the operator's terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtySpec {
    pub size: WindowSize,
    /// Which of descriptors 0, 1 and 2 get the pty.
    pub stdio: [bool; 3],
}

/// Everything the launcher needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxSpec {
    pub program: Vec<u8>,
    pub args: Vec<Vec<u8>>,
    /// The complete environment (nothing else is inherited).
    pub env: Vec<(Vec<u8>, Vec<u8>)>,
    pub uid: u32,
    pub gid: u32,
    pub user_name: String,
    pub home: Vec<u8>,
    /// Add passwd/group entries for the user and create its home (a per-run uid).
    pub dynamic_user: bool,
    /// Where the command starts; it must be able to enter it as the run user.
    pub cwd: Vec<u8>,
    /// Allocate a pseudo-terminal inside the sandbox and send its master to `run`.
    pub pty: Option<PtySpec>,
    /// Group of the sandbox's pty slaves (the `tty` group), when it exists.
    pub tty_gid: Option<u32>,
    pub files: Vec<SandboxFile>,
    /// Replaces `/etc/resolv.conf` inside the sandbox.
    pub resolv_conf: Option<String>,
}

/// A spec the launcher refuses.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("invalid sandbox spec: {0}")]
    Invalid(String),
}

fn bytes(s: &OsStr) -> Vec<u8> {
    s.as_bytes().to_vec()
}

impl SandboxSpec {
    /// A spec for `program args...` as `user` in `cwd`, with exactly `env`.
    pub fn new<'a>(
        program: &OsStr,
        args: impl IntoIterator<Item = &'a OsString>,
        env: impl IntoIterator<Item = (&'a OsString, &'a OsString)>,
        user: &RunUser,
        cwd: &Path,
    ) -> Self {
        Self {
            program: bytes(program),
            args: args.into_iter().map(|a| bytes(a)).collect(),
            env: env.into_iter().map(|(k, v)| (bytes(k), bytes(v))).collect(),
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            user_name: user.name.clone(),
            home: bytes(user.home.as_os_str()),
            dynamic_user: user.dynamic,
            cwd: bytes(cwd.as_os_str()),
            pty: None,
            tty_gid: None,
            files: Vec::new(),
            resolv_conf: None,
        }
    }

    /// A spec for a process of an existing sandbox (a pod's shell): `/bin/sh` as `uid:gid`
    /// in `/`, with an empty environment the caller fills in.
    #[must_use]
    pub fn raw(uid: u32, gid: u32, user_name: String) -> Self {
        Self {
            program: b"/bin/sh".to_vec(),
            args: Vec::new(),
            env: Vec::new(),
            uid,
            gid,
            user_name,
            home: b"/".to_vec(),
            dynamic_user: false,
            cwd: b"/".to_vec(),
            pty: None,
            tty_gid: None,
            files: Vec::new(),
            resolv_conf: None,
        }
    }

    pub fn encode(&self) -> Result<Vec<u8>, SpecError> {
        serde_json::to_vec(self).map_err(|e| SpecError::Invalid(e.to_string()))
    }

    /// Parse and validate.
    pub fn decode(data: &[u8]) -> Result<Self, SpecError> {
        let spec: Self =
            serde_json::from_slice(data).map_err(|e| SpecError::Invalid(e.to_string()))?;
        spec.validate()?;
        Ok(spec)
    }

    /// Refuse what the launcher must never do: run as root, write outside [`SANDBOX_DIR`],
    /// pass NUL bytes into C strings.
    pub fn validate(&self) -> Result<(), SpecError> {
        let bad = |m: &str| Err(SpecError::Invalid(m.to_owned()));
        if self.uid == 0 || self.gid == 0 {
            return bad("refusing to run the command as root");
        }
        if self.program.is_empty() {
            return bad("no program");
        }
        let no_nul = std::iter::once(&self.program)
            .chain(&self.args)
            .chain(self.env.iter().flat_map(|(k, v)| [k, v]))
            .chain([&self.home, &self.cwd])
            .all(|b| !b.contains(&0));
        if !no_nul
            || self
                .env
                .iter()
                .any(|(k, _)| k.is_empty() || k.contains(&b'='))
        {
            return bad("NUL byte or malformed environment variable");
        }
        if !self.cwd.starts_with(b"/") || !self.home.starts_with(b"/") {
            return bad("working directory and home must be absolute");
        }
        for f in &self.files {
            if f.name.is_empty()
                || f.name.contains('/')
                || f.name == "."
                || f.name == ".."
                || f.name.contains('\0')
                || f.mode & !0o777 != 0
            {
                return bad("sandbox files must be plain names with permission bits only");
            }
        }
        if self.pty.is_some_and(|p| !p.stdio.contains(&true)) {
            return bad("a pty for none of stdin, stdout and stderr");
        }
        if self.resolv_conf.as_ref().is_some_and(|r| r.contains('\0'))
            || self.user_name.contains([':', '\n', '\0'])
        {
            return bad("NUL byte or separator in resolv.conf or the user name");
        }
        Ok(())
    }

    #[must_use]
    pub fn program(&self) -> &OsStr {
        OsStr::from_bytes(&self.program)
    }

    #[must_use]
    pub fn cwd(&self) -> PathBuf {
        PathBuf::from(OsString::from_vec(self.cwd.clone()))
    }

    #[must_use]
    pub fn home(&self) -> PathBuf {
        PathBuf::from(OsString::from_vec(self.home.clone()))
    }

    /// The value of `PATH` in the command's environment.
    #[must_use]
    pub fn path_var(&self) -> Option<&[u8]> {
        self.env
            .iter()
            .find(|(k, _)| k == b"PATH")
            .map(|(_, v)| v.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> SandboxSpec {
        let env = [
            (OsString::from("PATH"), OsString::from("/usr/bin:/bin")),
            (
                OsString::from("ODD"),
                OsString::from_vec(vec![0xff, 0xfe, b'x']),
            ),
        ];
        let args = [OsString::from("-c"), OsString::from_vec(vec![b'e', 0x80])];
        SandboxSpec::new(
            OsStr::new("sh"),
            &args,
            env.iter().map(|(k, v)| (k, v)),
            &RunUser::dynamic(61184),
            Path::new("/work"),
        )
    }

    #[test]
    fn round_trips_non_utf8_bytes() {
        let mut s = spec();
        s.pty = Some(PtySpec {
            size: WindowSize {
                rows: 40,
                cols: 120,
            },
            stdio: [false, true, true],
        });
        s.files.push(SandboxFile {
            name: "ca.crt".into(),
            contents: "PEM".into(),
            mode: 0o644,
        });
        let back = SandboxSpec::decode(&s.encode().expect("encode")).expect("decode");
        assert_eq!(back, s);
        assert_eq!(back.env[1].1, vec![0xff, 0xfe, b'x']);
        assert_eq!(back.path_var(), Some(&b"/usr/bin:/bin"[..]));
        assert_eq!(back.cwd(), Path::new("/work"));
        assert!(back.dynamic_user);
    }

    #[test]
    fn refuses_root_escapes_and_nul_bytes() {
        let refused = |f: &dyn Fn(&mut SandboxSpec)| {
            let mut s = spec();
            f(&mut s);
            assert!(s.validate().is_err(), "{s:?}");
            assert!(SandboxSpec::decode(&s.encode().expect("encode")).is_err());
        };
        refused(&|s| s.uid = 0);
        refused(&|s| s.gid = 0);
        refused(&|s| s.program.clear());
        refused(&|s| s.args.push(b"a\0b".to_vec()));
        refused(&|s| s.env.push((b"A=B".to_vec(), b"c".to_vec())));
        refused(&|s| s.env.push((Vec::new(), b"c".to_vec())));
        refused(&|s| s.cwd = b"relative".to_vec());
        for name in ["../etc/passwd", "a/b", "..", "", "."] {
            refused(&|s| {
                s.files.push(SandboxFile {
                    name: name.into(),
                    contents: String::new(),
                    mode: 0o644,
                });
            });
        }
        refused(&|s| {
            s.files.push(SandboxFile {
                name: "x".into(),
                contents: String::new(),
                mode: 0o4755,
            });
        });
        refused(&|s| s.user_name = "a:0:0".into());
        refused(&|s| {
            s.pty = Some(PtySpec {
                size: WindowSize { rows: 1, cols: 1 },
                stdio: [false; 3],
            });
        });
        assert!(SandboxSpec::decode(b"{not json").is_err());
        assert!(spec().validate().is_ok());
    }
}
