//! Loading Paddock's eBPF programs, attaching them to cgroups and configuring them.
//!
//! Layout under a pin directory (default `/sys/fs/bpf/paddock/default`):
//!
//! ```text
//! maps/CONFIG, maps/BYPASS, maps/ORIG_BY_COOKIE, maps/ORIG_BY_TUPLE   shared by every cgroup
//! links/agent-<cgroup id>/<program>                                    one set per agent cgroup
//! ```
//!
//! Every agent cgroup gets the egress programs (connect, sendmsg, recvmsg, getpeername,
//! sockops, `sock_create`) and the inbound ones: `bind4`/`bind6` keep listeners off outside
//! addresses and `cgroup_skb/ingress` drops what arrives from outside the namespace for a
//! listener or UDP socket, except on [`AgentConfig::inbound_ports`] and DNS replies (see
//! `paddock-ebpf/src/programs.rs` for the exact semantics).
//!
//! Maps and agent links are pinned, so interception survives a proxy restart and a restarted
//! loader finds the same maps; [`Interceptor::detach_agent`] and [`teardown`] remove them. The
//! `getsockopt` link serves the proxy's own accepted sockets and lives as long as the process
//! that attached it (aya 0.14 cannot turn that link into a pinnable fd link); a restarted proxy
//! attaches it again.

pub mod config;
pub mod errors;
/// Moved to [`crate::mounts`] (cgroups need it too); kept here for existing callers.
pub use crate::mounts;
mod object;

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, LpmTrie, Map, MapData, MapError, lpm_trie::Key},
    programs::{CgroupAttachMode, CgroupSkbAttachType, Program, ProgramError, links::FdLink},
};
use paddock_common::{BypassKeyData, CgroupConfig};

pub use self::{
    config::{AgentConfig, ConfigError},
    errors::EbpfError,
};
use crate::cgroup::Cgroup;

/// Map holding per-cgroup [`CgroupConfig`].
pub const MAP_CONFIG: &str = "CONFIG";
/// LPM trie of bypassed destinations.
pub const MAP_BYPASS: &str = "BYPASS";
/// Original destinations by socket cookie.
pub const MAP_ORIG_BY_COOKIE: &str = "ORIG_BY_COOKIE";
/// Original destinations by (netns cookie, 4-tuple).
pub const MAP_ORIG_BY_TUPLE: &str = "ORIG_BY_TUPLE";

/// Default pin directory.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/paddock/default";

/// Programs attached to every agent cgroup.
const AGENT_PROGRAMS: &[&str] = &[
    "paddock_sock_create",
    "paddock_connect4",
    "paddock_connect6",
    "paddock_sendmsg4",
    "paddock_sendmsg6",
    "paddock_recvmsg4",
    "paddock_recvmsg6",
    "paddock_getpeername4",
    "paddock_getpeername6",
    "paddock_sockops",
    "paddock_bind4",
    "paddock_bind6",
    "paddock_ingress",
];
/// The inbound-control programs among those attached to every agent cgroup.
pub const INBOUND_PROGRAMS: &[&str] = &["paddock_bind4", "paddock_bind6", "paddock_ingress"];
/// Program attached to the proxy's cgroup.
const PROXY_PROGRAM: &str = "paddock_getsockopt";

/// Where a map is pinned under a pin directory.
#[must_use]
pub fn map_pin_path(pin_dir: &Path, map: &str) -> PathBuf {
    pin_dir.join("maps").join(map)
}

fn agent_link_dir(pin_dir: &Path, cgroup_id: u64) -> PathBuf {
    pin_dir.join("links").join(format!("agent-{cgroup_id}"))
}

/// Where the link of `program` on agent cgroup `cgroup_id` is pinned. Removing that file
/// detaches the program from the cgroup (nothing else holds agent links).
#[must_use]
pub fn agent_link_pin(pin_dir: &Path, cgroup_id: u64, program: &str) -> PathBuf {
    agent_link_dir(pin_dir, cgroup_id).join(program)
}

/// Load-time options.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Pin directory on bpffs (one per Paddock instance).
    pub pin_dir: PathBuf,
    /// Bound of each original-destination LRU map.
    pub orig_entries: u32,
    /// Forward eBPF debug records (cgroups with `debug_log`) to tracing.
    pub forward_logs: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            pin_dir: PathBuf::from(DEFAULT_PIN_DIR),
            orig_entries: paddock_common::DEFAULT_ORIG_ENTRIES,
            forward_logs: false,
        }
    }
}

/// The kernel boundary for interception, so orchestration (the `run` command, the node agent)
/// can be tested without a kernel.
pub trait Interception: Send + std::fmt::Debug {
    /// Redirect `cgroup`'s egress per `cfg` (idempotent: re-attaching rewrites the config).
    fn attach_agent(&mut self, cgroup: &Cgroup, cfg: &AgentConfig) -> Result<(), EbpfError>;
    /// Stop intercepting `cgroup` and forget its config.
    fn detach_agent(&mut self, cgroup: &Cgroup) -> Result<(), EbpfError> {
        self.detach_agent_id(cgroup.id())
    }
    /// Stop intercepting the cgroup with this id and forget its config; works when the cgroup
    /// is gone already (a pod deleted while the node agent was down).
    fn detach_agent_id(&mut self, cgroup_id: u64) -> Result<(), EbpfError>;
    /// Answer `SO_ORIGINAL_DST` for sockets accepted by processes in `cgroup`.
    fn attach_proxy(&mut self, cgroup: &Cgroup) -> Result<(), EbpfError>;
}

/// The loaded program set.
pub struct Interceptor {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    _logs: Option<object::LogForwarder>,
}

impl std::fmt::Debug for Interceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interceptor")
            .field("pin_dir", &self.pin_dir)
            .finish_non_exhaustive()
    }
}

impl Interceptor {
    /// Load (or re-open the pinned maps of) a Paddock instance.
    pub fn load(opts: &LoadOptions) -> Result<Self, EbpfError> {
        let bytes = object::bytes()?;
        mounts::ensure_bpffs()?;
        let maps_dir = opts.pin_dir.join("maps");
        std::fs::create_dir_all(&maps_dir).map_err(|source| EbpfError::Io {
            path: maps_dir.clone(),
            source,
        })?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .map_max_entries(MAP_ORIG_BY_COOKIE, opts.orig_entries)
            .map_max_entries(MAP_ORIG_BY_TUPLE, opts.orig_entries)
            .load(bytes)
            .map_err(|e| EbpfError::load(&e))?;
        for name in AGENT_PROGRAMS.iter().chain(std::iter::once(&PROXY_PROGRAM)) {
            let prog = ebpf
                .program_mut(name)
                .ok_or(EbpfError::MissingProgram(name))?;
            let res = match prog {
                Program::CgroupSockAddr(p) => load_retrying(|| p.load()),
                Program::CgroupSock(p) => load_retrying(|| p.load()),
                Program::CgroupSockopt(p) => load_retrying(|| p.load()),
                Program::SockOps(p) => load_retrying(|| p.load()),
                Program::CgroupSkb(p) => load_retrying(|| p.load()),
                _ => return Err(EbpfError::MissingProgram(name)),
            };
            res.map_err(|e| EbpfError::program(name, &e))?;
        }
        // After every program is loaded: taking the log map earlier breaks later loads.
        let logs = if opts.forward_logs {
            Some(object::LogForwarder::start(&mut ebpf)?)
        } else {
            None
        };
        Ok(Self {
            ebpf,
            pin_dir: opts.pin_dir.clone(),
            _logs: logs,
        })
    }

    /// The pin directory of this instance.
    #[must_use]
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    fn config_map(&mut self) -> Result<BpfHashMap<&mut MapData, u64, CgroupConfig>, EbpfError> {
        let map = self
            .ebpf
            .map_mut(MAP_CONFIG)
            .ok_or(EbpfError::MissingMap(MAP_CONFIG))?;
        BpfHashMap::try_from(map).map_err(|e| EbpfError::map(MAP_CONFIG, &e))
    }

    fn bypass_map(&mut self) -> Result<LpmTrie<&mut MapData, BypassKeyData, u8>, EbpfError> {
        let map = self
            .ebpf
            .map_mut(MAP_BYPASS)
            .ok_or(EbpfError::MissingMap(MAP_BYPASS))?;
        LpmTrie::try_from(map).map_err(|e| EbpfError::map(MAP_BYPASS, &e))
    }

    fn write_config(&mut self, cgroup: &Cgroup, cfg: &AgentConfig) -> Result<(), EbpfError> {
        let value = cfg.encode()?;
        let id = cgroup.id();
        clear_bypass(&mut self.bypass_map()?, id)?;
        let mut bypass = self.bypass_map()?;
        for (bits, data) in config::bypass_keys(id, &cfg.bypass) {
            bypass
                .insert(&Key::new(bits, data), 1, 0)
                .map_err(|e| EbpfError::map(MAP_BYPASS, &e))?;
        }
        self.config_map()?
            .insert(id, value, 0)
            .map_err(|e| EbpfError::map(MAP_CONFIG, &e))
    }

    fn attach_one(&mut self, name: &'static str, cgroup: &File) -> Result<FdLink, EbpfError> {
        let prog = self
            .ebpf
            .program_mut(name)
            .ok_or(EbpfError::MissingProgram(name))?;
        let mode = CgroupAttachMode::Single;
        let link: FdLink = match prog {
            Program::CgroupSockAddr(p) => {
                let id = p
                    .attach(cgroup, mode)
                    .map_err(|e| EbpfError::attach(name, &e))?;
                let l = p.take_link(id).map_err(|e| EbpfError::attach(name, &e))?;
                FdLink::try_from(l).map_err(|e| EbpfError::attach_link(name, &e))?
            }
            Program::CgroupSock(p) => {
                let id = p
                    .attach(cgroup, mode)
                    .map_err(|e| EbpfError::attach(name, &e))?;
                let l = p.take_link(id).map_err(|e| EbpfError::attach(name, &e))?;
                FdLink::try_from(l).map_err(|e| EbpfError::attach_link(name, &e))?
            }
            Program::SockOps(p) => {
                let id = p
                    .attach(cgroup, mode)
                    .map_err(|e| EbpfError::attach(name, &e))?;
                let l = p.take_link(id).map_err(|e| EbpfError::attach(name, &e))?;
                FdLink::try_from(l).map_err(|e| EbpfError::attach_link(name, &e))?
            }
            Program::CgroupSkb(p) => {
                let id = p
                    .attach(cgroup, CgroupSkbAttachType::Ingress, mode)
                    .map_err(|e| EbpfError::attach(name, &e))?;
                let l = p.take_link(id).map_err(|e| EbpfError::attach(name, &e))?;
                FdLink::try_from(l).map_err(|e| EbpfError::attach_link(name, &e))?
            }
            _ => return Err(EbpfError::MissingProgram(name)),
        };
        Ok(link)
    }
}

fn clear_bypass(
    trie: &mut LpmTrie<&mut MapData, BypassKeyData, u8>,
    cgroup_id: u64,
) -> Result<(), EbpfError> {
    let prefix = cgroup_id.to_be_bytes();
    let stale: Vec<Key<BypassKeyData>> = trie
        .keys()
        .filter_map(Result::ok)
        .filter(|k| k.data()[..8] == prefix)
        .collect();
    for k in stale {
        trie.remove(&k)
            .map_err(|e| EbpfError::map(MAP_BYPASS, &e))?;
    }
    Ok(())
}

fn open_cgroup(cgroup: &Cgroup) -> Result<File, EbpfError> {
    File::open(cgroup.path()).map_err(|source| EbpfError::Io {
        path: cgroup.path().to_path_buf(),
        source,
    })
}

impl Interception for Interceptor {
    fn attach_agent(&mut self, cgroup: &Cgroup, cfg: &AgentConfig) -> Result<(), EbpfError> {
        // Config first: an attached cgroup without config refuses every connect.
        self.write_config(cgroup, cfg)?;
        let dir = agent_link_dir(&self.pin_dir, cgroup.id());
        std::fs::create_dir_all(&dir).map_err(|source| EbpfError::Io {
            path: dir.clone(),
            source,
        })?;
        let fd = open_cgroup(cgroup)?;
        for name in AGENT_PROGRAMS {
            let pin = agent_link_pin(&self.pin_dir, cgroup.id(), name);
            if pin.exists() {
                continue;
            }
            let link = self.attach_one(name, &fd)?;
            link.pin(&pin).map_err(|e| EbpfError::Pin {
                path: pin.clone(),
                reason: e.to_string(),
            })?;
        }
        tracing::info!(cgroup = %cgroup.path().display(), cgroup_id = cgroup.id(), "agent cgroup intercepted");
        Ok(())
    }

    fn detach_agent_id(&mut self, cgroup_id: u64) -> Result<(), EbpfError> {
        detach_agent_pins(&self.pin_dir, cgroup_id)?;
        clear_bypass(&mut self.bypass_map()?, cgroup_id)?;
        match self.config_map()?.remove(&cgroup_id) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(EbpfError::map(MAP_CONFIG, &e)),
        }
    }

    fn attach_proxy(&mut self, cgroup: &Cgroup) -> Result<(), EbpfError> {
        let fd = open_cgroup(cgroup)?;
        let prog = self
            .ebpf
            .program_mut(PROXY_PROGRAM)
            .ok_or(EbpfError::MissingProgram(PROXY_PROGRAM))?;
        let Program::CgroupSockopt(p) = prog else {
            return Err(EbpfError::MissingProgram(PROXY_PROGRAM));
        };
        // The link stays owned by the program, i.e. by this Interceptor.
        p.attach(&fd, CgroupAttachMode::Single)
            .map_err(|e| EbpfError::attach(PROXY_PROGRAM, &e))?;
        tracing::info!(cgroup = %cgroup.path().display(), "proxy cgroup answers SO_ORIGINAL_DST");
        Ok(())
    }
}

/// Remove the pinned links of one agent cgroup (works without loading anything). The links
/// detach once no process holds them any more.
pub fn detach_agent_pins(pin_dir: &Path, cgroup_id: u64) -> Result<(), EbpfError> {
    let dir = agent_link_dir(pin_dir, cgroup_id);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(EbpfError::Io { path: dir, source }),
    }
}

/// Remove a whole instance: every pinned link and map under `pin_dir`.
pub fn teardown(pin_dir: &Path) -> Result<(), EbpfError> {
    match std::fs::remove_dir_all(pin_dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(EbpfError::Io {
            path: pin_dir.to_path_buf(),
            source,
        }),
    }
}

/// Agent cgroup ids with pinned links under `pin_dir`.
#[must_use]
pub fn attached_agents(pin_dir: &Path) -> Vec<u64> {
    let Ok(entries) = std::fs::read_dir(pin_dir.join("links")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("agent-")?.parse().ok())
        .collect()
}

/// Maps pinned under `pin_dir` (every one the programs share).
/// How many times one program load is tried while the verifier answers `EAGAIN`.
const LOAD_ATTEMPTS: usize = 5;

/// Load one program, again when the verifier gave up with `EAGAIN`.
///
/// The verifier stops with `EAGAIN` whenever a signal is pending for the loading thread
/// (`signal_pending()` in `do_check`), which is not a verdict on the program: a SIGCHLD
/// for a child, a SIGWINCH or a tokio signal handler are enough. libbpf retries such loads
/// in the same way; aya only retries once, to fetch the verifier log. A failed load leaves
/// aya's program state untouched, so calling `load` again is safe.
fn load_retrying(load: impl FnMut() -> Result<(), ProgramError>) -> Result<(), ProgramError> {
    retry_interrupted(load, |e| {
        matches!(e, ProgramError::LoadError { io_error, .. }
            if io_error.raw_os_error() == Some(libc::EAGAIN))
    })
}

fn retry_interrupted<E>(
    mut load: impl FnMut() -> Result<(), E>,
    interrupted: impl Fn(&E) -> bool,
) -> Result<(), E> {
    let mut attempt = 1;
    loop {
        match load() {
            Err(e) if attempt < LOAD_ATTEMPTS && interrupted(&e) => {
                tracing::debug!(
                    attempt,
                    "the verifier was interrupted by a signal: loading again"
                );
                attempt += 1;
            }
            other => return other,
        }
    }
}

const PINNED_MAPS: [&str; 4] = [
    MAP_CONFIG,
    MAP_BYPASS,
    MAP_ORIG_BY_COOKIE,
    MAP_ORIG_BY_TUPLE,
];

/// Checks that interception is in place for `cgroup_ids`: every shared map and every agent
/// program's link is still pinned (a removed link pin means a detached program, see
/// [`agent_link_pin`]). `Ok` describes what was found; `Err` names the first thing missing.
/// A file-system check only, so readiness probes cost no `bpf()` calls.
pub fn check_pins(pin_dir: &Path, cgroup_ids: &[u64]) -> Result<String, String> {
    for map in PINNED_MAPS {
        let path = map_pin_path(pin_dir, map);
        if !path.exists() {
            return Err(format!("map {map} is not pinned at {}", path.display()));
        }
    }
    for &id in cgroup_ids {
        for program in AGENT_PROGRAMS {
            let path = agent_link_pin(pin_dir, id, program);
            if !path.exists() {
                return Err(format!(
                    "cgroup {id}: program {program} is detached (no link at {})",
                    path.display()
                ));
            }
        }
    }
    Ok(format!(
        "{} maps and {} links for {} agent cgroup(s) pinned",
        PINNED_MAPS.len(),
        AGENT_PROGRAMS.len() * cgroup_ids.len(),
        cgroup_ids.len()
    ))
}

/// An intercepted agent cgroup as the pinned maps describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentStatus {
    /// The cgroup id (inode number of its directory).
    pub cgroup_id: u64,
    /// What its programs read; `None` when the links exist without config (everything that
    /// needs the config is then refused).
    pub config: Option<CgroupConfig>,
}

impl AgentStatus {
    /// The allowed inbound ports, in slot order, without free slots.
    #[must_use]
    pub fn inbound_ports(&self) -> Vec<u16> {
        self.config
            .map(|c| c.inbound_ports.into_iter().filter(|&p| p != 0).collect())
            .unwrap_or_default()
    }
}

/// Agent cgroups with pinned links under `pin_dir` and the config each has in the pinned
/// `CONFIG` map (read without loading any program).
pub fn agent_status(pin_dir: &Path) -> Result<Vec<AgentStatus>, EbpfError> {
    let ids = attached_agents(pin_dir);
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let path = map_pin_path(pin_dir, MAP_CONFIG);
    let data = MapData::from_pin(&path).map_err(|e| EbpfError::map(MAP_CONFIG, &e))?;
    let map: BpfHashMap<MapData, u64, CgroupConfig> = BpfHashMap::try_from(Map::HashMap(data))
        .map_err(|e| match e {
            MapError::InvalidValueSize { .. } => EbpfError::Map {
                map: MAP_CONFIG,
                reason: format!(
                    "{e}: pinned by a Paddock version with another layout (run `paddock-proxy \
                     ebpf teardown` and attach again)"
                ),
            },
            e => EbpfError::map(MAP_CONFIG, &e),
        })?;
    ids.into_iter()
        .map(|cgroup_id| match map.get(&cgroup_id, 0) {
            Ok(c) => Ok(AgentStatus {
                cgroup_id,
                config: Some(c),
            }),
            Err(MapError::KeyNotFound) => Ok(AgentStatus {
                cgroup_id,
                config: None,
            }),
            Err(e) => Err(EbpfError::map(MAP_CONFIG, &e)),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interrupted_load_is_tried_again_and_a_verdict_is_not() {
        let eagain = |e: &std::io::Error| e.raw_os_error() == Some(libc::EAGAIN);
        let error = std::io::Error::from_raw_os_error;
        let mut calls = 0;
        let res = retry_interrupted(
            || {
                calls += 1;
                if calls < 3 {
                    Err(error(libc::EAGAIN))
                } else {
                    Ok(())
                }
            },
            eagain,
        );
        assert!(res.is_ok(), "{res:?}");
        assert_eq!(calls, 3);

        let mut calls = 0;
        let res = retry_interrupted(
            || {
                calls += 1;
                Err(error(libc::EAGAIN))
            },
            eagain,
        );
        assert_eq!(res.map_err(|e| e.raw_os_error()), Err(Some(libc::EAGAIN)));
        assert_eq!(calls, LOAD_ATTEMPTS, "bounded");

        let mut calls = 0;
        let res = retry_interrupted(
            || {
                calls += 1;
                Err(error(libc::EACCES))
            },
            eagain,
        );
        assert!(res.is_err());
        assert_eq!(calls, 1, "a rejected program is not loaded again");
    }

    #[test]
    fn inbound_programs_are_attached_to_every_agent() {
        for p in INBOUND_PROGRAMS {
            assert!(AGENT_PROGRAMS.contains(p), "{p}");
        }
        assert_eq!(
            agent_link_pin(Path::new("/p"), 7, "paddock_ingress"),
            Path::new("/p/links/agent-7/paddock_ingress")
        );
    }

    #[test]
    fn pin_check_names_the_first_missing_map_or_link() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pins = dir.path();
        let err = check_pins(pins, &[]).expect_err("no maps");
        assert!(err.contains("map CONFIG"), "{err}");
        std::fs::create_dir_all(pins.join("maps")).expect("mkdir");
        for map in PINNED_MAPS {
            std::fs::write(map_pin_path(pins, map), b"").expect("pin");
        }
        assert!(check_pins(pins, &[]).is_ok());
        std::fs::create_dir_all(agent_link_dir(pins, 9)).expect("mkdir");
        for program in AGENT_PROGRAMS {
            std::fs::write(agent_link_pin(pins, 9, program), b"").expect("pin");
        }
        let ok = check_pins(pins, &[9]).expect("all pinned");
        assert!(ok.contains("1 agent cgroup"), "{ok}");
        let err = check_pins(pins, &[9, 10]).expect_err("cgroup 10 has no links");
        assert!(err.contains("cgroup 10"), "{err}");
        std::fs::remove_file(agent_link_pin(pins, 9, "paddock_connect6")).expect("rm");
        let err = check_pins(pins, &[9]).expect_err("one link gone");
        assert!(err.contains("paddock_connect6 is detached"), "{err}");
    }
}
