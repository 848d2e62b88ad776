//! The seccomp filter the command runs under: a deny-list on top of its own network, PID, mount
//! and IPC namespaces.
//!
//! Default action: allow. An allow-list of syscalls breaks real agents (language runtimes,
//! package managers and browsers use a long and changing tail of calls); what is refused here
//! is what would let the command leave its namespaces or reach what they do not cover:
//!
//! | refused | why |
//! | --- | --- |
//! | `socket`/`socketpair` of any family but unix, inet, inet6, netlink | `AF_VSOCK` reaches the hypervisor host, `AF_PACKET`/`AF_BLUETOOTH`/`AF_CAN`/... bypass the cgroup hooks, which only see inet sockets |
//! | `ioctl` `TIOCSTI`, `TIOCLINUX` | push keystrokes into a terminal (a TTY the command was handed, or the console) |
//! | `ptrace`, `process_vm_readv/writev`, `process_madvise`, `pidfd_getfd` | act inside another process (steal its descriptors or memory, make it connect out) |
//! | `clone`/`unshare` with a `CLONE_NEW*` flag, `setns`; `clone3` (ENOSYS) | new user namespaces (a large kernel attack surface, and "root" in them) or joining others; `clone3` passes its flags in memory a filter cannot read, so it answers ENOSYS and libc falls back to `clone` |
//! | `mount`, `umount2`, `pivot_root`, `open_tree`, `move_mount`, `fsopen`, `fsconfig`, `fsmount`, `fspick`, `mount_setattr` | rearrange the filesystem view (fail anyway without privileges; refused so a kernel bug cannot make them succeed) |
//! | `io_uring_setup/enter/register` | `io_uring` performs socket, connect and other operations without passing through this filter (`IORING_OP_SOCKET` creates an `AF_VSOCK` socket seccomp never sees) |
//! | `bpf`, `perf_event_open`, `userfaultfd` | kernel attack surface and exploit primitives; none is needed by agents |
//! | `keyctl`, `add_key`, `request_key` | kernel keyrings are per uid, not per namespace: with `--user` they are the operator's |
//! | `kexec_load`, `kexec_file_load`, `init_module`, `finit_module`, `delete_module`, `syslog` | privileged or kernel-revealing |
//!
//! Refused calls answer `EPERM` (`clone3`: `ENOSYS`). Integer arguments the kernel reads as
//! 32-bit (`socket`'s family, `ioctl`'s request, `clone`/`unshare` flags) are compared on
//! their low 32 bits only, so setting the upper half cannot slip past a rule.
//!
//! Two filters are installed. The first (built by `seccompiler`) holds the rules above and
//! kills the process on any other architecture's calling convention (32-bit `int 0x80` on
//! `x86_64`). The second refuses `clone3` with `ENOSYS` and every x32 call (syscall numbers with
//! bit 30 set, which share `x86_64`'s audit architecture and would otherwise match no rule).
//! Only `x86_64` and `aarch64` are supported: elsewhere building the filter fails and `run`
//! refuses to start rather than run the command unfiltered.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch, sock_filter,
};

/// Why the filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error(
        "no seccomp filter for this architecture ({0}); paddock-proxy run supports x86_64 and \
         aarch64 and will not run a command unfiltered"
    )]
    UnsupportedArch(&'static str),
    #[error("building the seccomp filter: {0}")]
    Build(String),
    #[error("installing the seccomp filter: {0}")]
    Install(String),
}

/// The filters, in installation order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filters {
    pub deny: BpfProgram,
    pub guard: BpfProgram,
}

/// Socket families the command may create.
pub const ALLOWED_FAMILIES: [u32; 4] = [
    libc::AF_UNIX as u32,
    libc::AF_INET as u32,
    libc::AF_INET6 as u32,
    libc::AF_NETLINK as u32,
];

/// Namespace flags refused in `clone` (`CLONE_NEWTIME` shares its bit with `CSIGNAL` there).
const CLONE_NS_FLAGS: [u32; 7] = [
    libc::CLONE_NEWNS as u32,
    libc::CLONE_NEWCGROUP as u32,
    libc::CLONE_NEWUTS as u32,
    libc::CLONE_NEWIPC as u32,
    libc::CLONE_NEWUSER as u32,
    libc::CLONE_NEWPID as u32,
    libc::CLONE_NEWNET as u32,
];

/// `CLONE_NEWTIME`, valid in `unshare` and `clone3` only.
const CLONE_NEWTIME: u32 = 0x80;

/// `open_tree_attr` (Linux 6.15; the same number on every architecture), not yet in libc.
const SYS_OPEN_TREE_ATTR: i64 = 467;

/// x32 system calls carry this bit in their number (`x86_64` audit architecture).
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// Calls refused outright, whatever their arguments.
fn refused_outright() -> Vec<i64> {
    vec![
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_process_madvise,
        libc::SYS_pidfd_getfd,
        libc::SYS_setns,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_open_tree,
        SYS_OPEN_TREE_ATTR,
        libc::SYS_move_mount,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_mount_setattr,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_userfaultfd,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_syslog,
    ]
}

fn target_arch() -> Result<TargetArch, SeccompError> {
    match std::env::consts::ARCH {
        "x86_64" => Ok(TargetArch::x86_64),
        "aarch64" => Ok(TargetArch::aarch64),
        other => Err(SeccompError::UnsupportedArch(other)),
    }
}

fn audit_arch() -> Result<u32, SeccompError> {
    // linux/audit.h: EM_X86_64 / EM_AARCH64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE.
    match std::env::consts::ARCH {
        "x86_64" => Ok(0x3e | 0x8000_0000 | 0x4000_0000),
        "aarch64" => Ok(0xb7 | 0x8000_0000 | 0x4000_0000),
        other => Err(SeccompError::UnsupportedArch(other)),
    }
}

fn cond(arg: u8, op: SeccompCmpOp, value: u32) -> Result<SeccompCondition, SeccompError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, u64::from(value))
        .map_err(|e| SeccompError::Build(e.to_string()))
}

fn rule(conds: Vec<SeccompCondition>) -> Result<SeccompRule, SeccompError> {
    SeccompRule::new(conds).map_err(|e| SeccompError::Build(e.to_string()))
}

/// Matches when argument `arg` has any of `flags` set (one rule per flag; any matching rule matches).
fn any_flag(arg: u8, flags: &[u32]) -> Result<Vec<SeccompRule>, SeccompError> {
    flags
        .iter()
        .map(|&f| rule(vec![cond(arg, SeccompCmpOp::MaskedEq(u64::from(f)), f)?]))
        .collect()
}

/// An ioctl request number as the kernel reads it (an unsigned int).
fn request(r: libc::Ioctl) -> Result<u32, SeccompError> {
    u32::try_from(r).map_err(|e| SeccompError::Build(e.to_string()))
}

/// The deny-list filter (matches answer `EPERM`; everything else is allowed).
fn deny_filter() -> Result<BpfProgram, SeccompError> {
    let arch = target_arch()?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    // A family outside the allowed set: all four "not equal" conditions hold.
    let other_family = || -> Result<Vec<SeccompRule>, SeccompError> {
        Ok(vec![rule(
            ALLOWED_FAMILIES
                .iter()
                .map(|&f| cond(0, SeccompCmpOp::Ne, f))
                .collect::<Result<_, _>>()?,
        )?])
    };
    rules.insert(libc::SYS_socket, other_family()?);
    rules.insert(libc::SYS_socketpair, other_family()?);
    rules.insert(
        libc::SYS_ioctl,
        vec![
            rule(vec![cond(1, SeccompCmpOp::Eq, request(libc::TIOCSTI)?)?])?,
            rule(vec![cond(1, SeccompCmpOp::Eq, request(libc::TIOCLINUX)?)?])?,
        ],
    );
    rules.insert(libc::SYS_clone, any_flag(0, &CLONE_NS_FLAGS)?);
    let mut unshare = CLONE_NS_FLAGS.to_vec();
    unshare.push(CLONE_NEWTIME);
    rules.insert(libc::SYS_unshare, any_flag(0, &unshare)?);
    for nr in refused_outright() {
        // An empty rule list matches the call unconditionally.
        rules.insert(nr, Vec::new());
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|e| SeccompError::Build(e.to_string()))?;
    BpfProgram::try_from(filter).map_err(|e| SeccompError::Build(e.to_string()))
}

// Classic BPF opcodes (linux/bpf_common.h).
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JEQ_K: u16 = 0x15;
const BPF_JGE_K: u16 = 0x35;
const BPF_RET_K: u16 = 0x06;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
const SECCOMP_RET_KILL_PROCESS: u32 = 0x8000_0000;
/// `offsetof(struct seccomp_data, nr)` and `arch`.
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;

fn insn(code: u16, jt: u8, jf: u8, k: u32) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// `clone3` answers `ENOSYS`; x32 numbers answer `ENOSYS`; another architecture is killed.
fn guard_filter() -> Result<BpfProgram, SeccompError> {
    let arch = audit_arch()?;
    let clone3 = u32::try_from(libc::SYS_clone3).map_err(|e| SeccompError::Build(e.to_string()))?;
    let enosys = SECCOMP_RET_ERRNO | libc::ENOSYS as u32;
    Ok(vec![
        insn(BPF_LD_W_ABS, 0, 0, DATA_ARCH),
        insn(BPF_JEQ_K, 1, 0, arch),
        insn(BPF_RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS),
        insn(BPF_LD_W_ABS, 0, 0, DATA_NR),
        insn(BPF_JGE_K, 2, 0, X32_SYSCALL_BIT),
        insn(BPF_JEQ_K, 1, 0, clone3),
        insn(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
        insn(BPF_RET_K, 0, 0, enosys),
    ])
}

/// Build both filters for this machine's architecture.
pub fn build() -> Result<Filters, SeccompError> {
    Ok(Filters {
        deny: deny_filter()?,
        guard: guard_filter()?,
    })
}

/// Install the filters on the calling thread (which must be the only one), after setting
/// `no_new_privs` (required for an unprivileged caller, and what keeps set-uid binaries from
/// gaining privileges afterwards).
pub fn install(filters: &Filters) -> Result<(), SeccompError> {
    seccompiler::apply_filter(&filters.deny).map_err(|e| SeccompError::Install(e.to_string()))?;
    seccompiler::apply_filter(&filters.guard).map_err(|e| SeccompError::Install(e.to_string()))
}

#[cfg(test)]
mod tests {
    //! The filters are run through a small classic-BPF interpreter against `seccomp_data` the
    //! way the kernel would, combining the two filters' answers by seccomp's precedence.
    use super::*;

    const EPERM: u32 = SECCOMP_RET_ERRNO | libc::EPERM as u32;
    const ENOSYS: u32 = SECCOMP_RET_ERRNO | libc::ENOSYS as u32;

    struct Data {
        nr: u32,
        arch: u32,
        args: [u64; 6],
    }

    fn load(d: &Data, off: u32) -> u32 {
        let mut bytes = [0u8; 64];
        bytes[0..4].copy_from_slice(&d.nr.to_le_bytes());
        bytes[4..8].copy_from_slice(&d.arch.to_le_bytes());
        for (i, a) in d.args.iter().enumerate() {
            bytes[16 + i * 8..24 + i * 8].copy_from_slice(&a.to_le_bytes());
        }
        let o = off as usize;
        u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"))
    }

    fn eval(prog: &[sock_filter], d: &Data) -> u32 {
        let (mut pc, mut acc) = (0usize, 0u32);
        loop {
            let i = &prog[pc];
            let jump = |cond: bool| 1 + usize::from(if cond { i.jt } else { i.jf });
            pc += match i.code {
                0x20 => {
                    acc = load(d, i.k);
                    1
                }
                0x54 => {
                    acc &= i.k;
                    1
                }
                0x05 => 1 + i.k as usize,
                0x15 => jump(acc == i.k),
                0x25 => jump(acc > i.k),
                0x35 => jump(acc >= i.k),
                0x45 => jump(acc & i.k != 0),
                0x06 => return i.k,
                other => panic!("opcode {other:#x} not interpreted"),
            };
        }
    }

    /// seccomp's precedence: kill > errno > allow (the kinds these filters return).
    fn verdict(f: &Filters, d: &Data) -> u32 {
        let rank = |r: u32| match r & 0xffff_0000 {
            SECCOMP_RET_KILL_PROCESS => 3,
            SECCOMP_RET_ERRNO => 2,
            _ => 1,
        };
        let (a, b) = (eval(&f.deny, d), eval(&f.guard, d));
        if rank(b) > rank(a) { b } else { a }
    }

    fn call(nr: i64, args: &[u64]) -> Data {
        let mut a = [0u64; 6];
        a[..args.len()].copy_from_slice(args);
        Data {
            nr: u32::try_from(nr).expect("nr"),
            arch: audit_arch().expect("arch"),
            args: a,
        }
    }

    fn filters() -> Filters {
        build().expect("this test runs on x86_64 or aarch64")
    }

    #[test]
    fn socket_families_outside_the_allowed_four_are_refused() {
        let f = filters();
        for fam in ALLOWED_FAMILIES {
            for nr in [libc::SYS_socket, libc::SYS_socketpair] {
                assert_eq!(
                    verdict(&f, &call(nr, &[u64::from(fam), 1, 0])),
                    SECCOMP_RET_ALLOW,
                    "family {fam}"
                );
            }
        }
        for fam in [
            libc::AF_VSOCK,
            libc::AF_PACKET,
            libc::AF_BLUETOOTH,
            libc::AF_CAN,
            0,
            255,
        ] {
            let fam = u64::try_from(fam).expect("family");
            assert_eq!(verdict(&f, &call(libc::SYS_socket, &[fam, 1, 0])), EPERM);
            assert_eq!(
                verdict(&f, &call(libc::SYS_socketpair, &[fam, 1, 0])),
                EPERM
            );
        }
        // The kernel reads the family as an int: upper bits must not matter either way.
        let vsock_high = (1u64 << 32) | u64::try_from(libc::AF_VSOCK).expect("family");
        assert_eq!(
            verdict(&f, &call(libc::SYS_socket, &[vsock_high, 1, 0])),
            EPERM
        );
        let inet_high = (7u64 << 32) | u64::try_from(libc::AF_INET).expect("family");
        assert_eq!(
            verdict(&f, &call(libc::SYS_socket, &[inet_high, 1, 0])),
            SECCOMP_RET_ALLOW
        );
    }

    #[test]
    fn terminal_injection_ioctls_are_refused_and_others_pass() {
        let f = filters();
        for req in [libc::TIOCSTI, libc::TIOCLINUX] {
            let req = u64::from(request(req).expect("request"));
            assert_eq!(verdict(&f, &call(libc::SYS_ioctl, &[0, req, 0])), EPERM);
            // ioctl's request is an unsigned int in the kernel: high bits are ignored there.
            assert_eq!(
                verdict(&f, &call(libc::SYS_ioctl, &[0, req | (1 << 40), 0])),
                EPERM
            );
        }
        for req in [
            libc::TIOCGWINSZ,
            libc::TCGETS,
            libc::FIONREAD,
            libc::TIOCSCTTY,
        ] {
            let req = u64::from(request(req).expect("request"));
            assert_eq!(
                verdict(&f, &call(libc::SYS_ioctl, &[0, req, 0])),
                SECCOMP_RET_ALLOW
            );
        }
    }

    #[test]
    fn process_access_and_kernel_surface_calls_are_refused() {
        let f = filters();
        for nr in refused_outright() {
            assert_eq!(verdict(&f, &call(nr, &[1, 2, 3])), EPERM, "syscall {nr}");
        }
        for nr in [
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_execve,
            libc::SYS_connect,
            libc::SYS_kill,
            libc::SYS_wait4,
        ] {
            assert_eq!(verdict(&f, &call(nr, &[1, 2, 3])), SECCOMP_RET_ALLOW);
        }
    }

    #[test]
    fn namespace_creation_is_refused_and_clone3_falls_back() {
        let f = filters();
        // What glibc passes for fork() and pthread_create().
        let fork = u64::try_from(libc::SIGCHLD).expect("sig");
        let thread = u64::try_from(
            libc::CLONE_VM
                | libc::CLONE_FS
                | libc::CLONE_FILES
                | libc::CLONE_SIGHAND
                | libc::CLONE_THREAD
                | libc::CLONE_SYSVSEM
                | libc::CLONE_SETTLS
                | libc::CLONE_PARENT_SETTID
                | libc::CLONE_CHILD_CLEARTID,
        )
        .expect("flags");
        assert_eq!(
            verdict(&f, &call(libc::SYS_clone, &[fork])),
            SECCOMP_RET_ALLOW
        );
        assert_eq!(
            verdict(&f, &call(libc::SYS_clone, &[thread])),
            SECCOMP_RET_ALLOW
        );
        for flag in CLONE_NS_FLAGS {
            let flags = u64::from(flag) | fork;
            assert_eq!(verdict(&f, &call(libc::SYS_clone, &[flags])), EPERM);
            assert_eq!(verdict(&f, &call(libc::SYS_unshare, &[flags])), EPERM);
        }
        assert_eq!(
            verdict(&f, &call(libc::SYS_unshare, &[u64::from(CLONE_NEWTIME)])),
            EPERM
        );
        let files = u64::try_from(libc::CLONE_FILES).expect("flags");
        assert_eq!(
            verdict(&f, &call(libc::SYS_unshare, &[files])),
            SECCOMP_RET_ALLOW
        );
        assert_eq!(verdict(&f, &call(libc::SYS_clone3, &[0, 88])), ENOSYS);
    }

    #[test]
    fn other_calling_conventions_are_killed_or_refused() {
        let f = filters();
        // A 32-bit call (int 0x80 on x86_64) carries another audit architecture.
        let mut i386 = call(libc::SYS_getpid, &[]);
        i386.arch = 3 | 0x4000_0000;
        assert_eq!(verdict(&f, &i386), SECCOMP_RET_KILL_PROCESS);
        // x32: x86_64's architecture with bit 30 in the number; socket(AF_VSOCK) that way.
        let x32_socket = u32::try_from(libc::SYS_socket).expect("nr") | X32_SYSCALL_BIT;
        let mut d = call(0, &[40, 1, 0]);
        d.nr = x32_socket;
        assert_eq!(verdict(&f, &d), ENOSYS);
    }
}
