//! Finding the cgroup2 and bpffs mounts from `/proc/self/mounts`, and mounting bpffs.
//!
//! cgroup2 sits at `/sys/fs/cgroup` on most Kubernetes nodes and at `/sys/fs/cgroup/unified` on
//! hybrid hosts, so it is looked up rather than assumed.

use std::path::{Path, PathBuf};

/// Where bpffs is mounted when it is absent.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

/// One line of `/proc/self/mounts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub source: String,
    pub target: PathBuf,
    pub fstype: String,
}

/// Errors from mount discovery.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "no cgroup2 filesystem is mounted (checked /proc/self/mounts); Paddock needs the unified \
         cgroup hierarchy: boot with systemd.unified_cgroup_hierarchy=1 or mount cgroup2"
    )]
    NoCgroup2,
    #[error("mounting bpffs at {target}: {source} (is this process root with CAP_SYS_ADMIN?)")]
    MountBpffs { target: PathBuf, source: nix::Error },
}

/// Undo the octal escapes (`\040` for a space and so on) the kernel uses in mount paths.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let oct = &bytes[i + 1..i + 4];
            if oct.iter().all(|b| (b'0'..=b'7').contains(b)) {
                let v = oct
                    .iter()
                    .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parse the contents of `/proc/self/mounts`; malformed lines are skipped.
#[must_use]
pub fn parse_mounts(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_ascii_whitespace();
            let source = fields.next()?;
            let target = fields.next()?;
            let fstype = fields.next()?;
            Some(MountEntry {
                source: unescape(source),
                target: PathBuf::from(unescape(target)),
                fstype: fstype.to_owned(),
            })
        })
        .collect()
}

/// The first cgroup2 mount point in `mounts`.
#[must_use]
pub fn find_cgroup2(mounts: &[MountEntry]) -> Option<&Path> {
    mounts
        .iter()
        .find(|m| m.fstype == "cgroup2")
        .map(|m| m.target.as_path())
}

/// Whether `dir` is a bpffs mount point.
#[must_use]
pub fn is_bpffs(mounts: &[MountEntry], dir: &Path) -> bool {
    mounts.iter().any(|m| m.fstype == "bpf" && m.target == dir)
}

fn read_mounts() -> Result<Vec<MountEntry>, MountError> {
    let path = PathBuf::from("/proc/self/mounts");
    let text =
        std::fs::read_to_string(&path).map_err(|source| MountError::Read { path, source })?;
    Ok(parse_mounts(&text))
}

/// The cgroup2 mount point of this system.
pub fn cgroup2_root() -> Result<PathBuf, MountError> {
    find_cgroup2(&read_mounts()?)
        .map(Path::to_path_buf)
        .ok_or(MountError::NoCgroup2)
}

/// Make sure bpffs is mounted at [`DEFAULT_BPFFS`] (mounting it if absent) and return it.
pub fn ensure_bpffs() -> Result<PathBuf, MountError> {
    let target = PathBuf::from(DEFAULT_BPFFS);
    if is_bpffs(&read_mounts()?, &target) {
        return Ok(target);
    }
    std::fs::create_dir_all(&target).map_err(|e| MountError::MountBpffs {
        target: target.clone(),
        source: nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
    })?;
    nix::mount::mount(
        Some("bpf"),
        &target,
        Some("bpf"),
        nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|source| MountError::MountBpffs {
        target: target.clone(),
        source,
    })?;
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
bpf /sys/fs/bpf bpf rw,nosuid,nodev,noexec,relatime,mode=700 0 0
/dev/vda /mnt/with\\040space ext4 rw 0 0
garbage
";

    #[test]
    fn finds_cgroup2_on_a_hybrid_host() {
        let m = parse_mounts(HYBRID);
        assert_eq!(find_cgroup2(&m), Some(Path::new("/sys/fs/cgroup/unified")));
    }

    #[test]
    fn finds_cgroup2_on_a_unified_host() {
        let m = parse_mounts("cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n");
        assert_eq!(find_cgroup2(&m), Some(Path::new("/sys/fs/cgroup")));
    }

    #[test]
    fn no_cgroup2_is_none() {
        let m = parse_mounts("cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n");
        assert_eq!(find_cgroup2(&m), None);
    }

    #[test]
    fn octal_escapes_are_decoded_and_bad_lines_skipped() {
        let m = parse_mounts(HYBRID);
        assert_eq!(m.len(), 6, "the one-word line is skipped");
        assert!(m.iter().any(|e| e.target == Path::new("/mnt/with space")));
        assert_eq!(unescape("a\\134b"), "a\\b");
        assert_eq!(
            unescape("trailing\\04"),
            "trailing\\04",
            "short escape left alone"
        );
        assert_eq!(unescape("\\9xx"), "\\9xx", "non-octal left alone");
    }

    #[test]
    fn detects_bpffs() {
        let m = parse_mounts(HYBRID);
        assert!(is_bpffs(&m, Path::new("/sys/fs/bpf")));
        assert!(!is_bpffs(&m, Path::new("/sys/fs/cgroup")));
    }
}
