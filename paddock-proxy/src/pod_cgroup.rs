//! Where kubelet puts a pod's cgroup under cgroup v2, for both kubelet cgroup drivers.
//!
//! ```text
//! systemd:  kubepods.slice/kubepods-pod<uid_>.slice                                  Guaranteed
//!           kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice
//!           kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice
//! cgroupfs: kubepods/pod<uid>                                                        Guaranteed
//!           kubepods/burstable/pod<uid>
//!           kubepods/besteffort/pod<uid>
//! ```
//!
//! `<uid_>` is the pod UID with `-` replaced by `_` (systemd reserves `-` in unit names for
//! nesting). The container runtime's scopes (containerd `cri-containerd-<id>.scope`, CRI-O
//! `crio-<id>.scope`, or bare ids under cgroupfs) sit below the pod cgroup; programs attached
//! to the pod cgroup apply to them, including containers created after the attach.
//!
//! The UID comes from outside (CNI arguments, the API server), so it is checked to be a UUID
//! before it becomes part of a path: nothing else can name a directory.

use std::path::{Path, PathBuf};

/// Kubelet's `cgroupDriver`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupDriver {
    Systemd,
    Cgroupfs,
}

/// A pod's quality-of-service class, which picks its parent cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl QosClass {
    const ALL: [QosClass; 3] = [
        QosClass::Guaranteed,
        QosClass::Burstable,
        QosClass::BestEffort,
    ];

    fn dir(self) -> Option<&'static str> {
        match self {
            QosClass::Guaranteed => None,
            QosClass::Burstable => Some("burstable"),
            QosClass::BestEffort => Some("besteffort"),
        }
    }
}

/// A pod UID, checked to be a UUID (lower-case hex in the 8-4-4-4-12 form).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct PodUid(String);

/// Why a pod's cgroup was not found.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PodCgroupError {
    #[error("pod UID {0:?} is not a UUID (8-4-4-4-12 lower-case hex digits)")]
    BadUid(String),
    #[error(
        "no cgroup for pod {uid} under {root} (looked for the {drivers} layouts of all three QoS \
         classes): is the pod on this node, and is kubelet's cgroup root {root}?"
    )]
    NotFound {
        uid: PodUid,
        root: PathBuf,
        drivers: &'static str,
    },
    #[error("pod {uid} has a cgroup in more than one place ({0:?}); refusing to guess", .paths)]
    Ambiguous { uid: PodUid, paths: Vec<PathBuf> },
}

impl PodUid {
    /// Checks `s` is a UUID; upper-case hex is accepted and lower-cased (kubelet names
    /// directories with the API server's lower-case form).
    pub fn parse(s: &str) -> Result<Self, PodCgroupError> {
        let bad = || PodCgroupError::BadUid(s.chars().take(64).collect());
        let groups: Vec<&str> = s.split('-').collect();
        let lens = [8, 4, 4, 4, 12];
        if groups.len() != lens.len()
            || groups
                .iter()
                .zip(lens)
                .any(|(g, n)| g.len() != n || !g.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(bad());
        }
        Ok(Self(s.to_ascii_lowercase()))
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for PodUid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for PodUid {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// The pod cgroup's path relative to the cgroup root, for one driver and quality-of-service class.
#[must_use]
pub fn pod_cgroup_relpath(driver: CgroupDriver, qos: QosClass, uid: &PodUid) -> PathBuf {
    match driver {
        CgroupDriver::Systemd => {
            let uid = uid.as_str().replace('-', "_");
            let mut p = PathBuf::from("kubepods.slice");
            match qos.dir() {
                None => p.push(format!("kubepods-pod{uid}.slice")),
                Some(q) => {
                    p.push(format!("kubepods-{q}.slice"));
                    p.push(format!("kubepods-{q}-pod{uid}.slice"));
                }
            }
            p
        }
        CgroupDriver::Cgroupfs => {
            let mut p = PathBuf::from("kubepods");
            if let Some(q) = qos.dir() {
                p.push(q);
            }
            p.push(format!("pod{}", uid.as_str()));
            p
        }
    }
}

/// Finds the pod's cgroup under `root` (kubelet's cgroup root, normally `/sys/fs/cgroup`),
/// trying `driver` or, without one, both drivers; every quality-of-service class is tried, since the quality-of-service
/// class is not known from a CNI call. Exactly one directory must exist.
pub fn find_pod_cgroup(
    root: &Path,
    uid: &PodUid,
    driver: Option<CgroupDriver>,
) -> Result<(PathBuf, CgroupDriver), PodCgroupError> {
    let drivers: &[CgroupDriver] = match driver {
        Some(CgroupDriver::Systemd) => &[CgroupDriver::Systemd],
        Some(CgroupDriver::Cgroupfs) => &[CgroupDriver::Cgroupfs],
        None => &[CgroupDriver::Systemd, CgroupDriver::Cgroupfs],
    };
    let mut found = Vec::new();
    for &d in drivers {
        for qos in QosClass::ALL {
            let path = root.join(pod_cgroup_relpath(d, qos, uid));
            if path.is_dir() {
                found.push((path, d));
            }
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(PodCgroupError::NotFound {
            uid: uid.clone(),
            root: root.to_path_buf(),
            drivers: match driver {
                Some(CgroupDriver::Systemd) => "systemd",
                Some(CgroupDriver::Cgroupfs) => "cgroupfs",
                None => "systemd and cgroupfs",
            },
        }),
        _ => Err(PodCgroupError::Ambiguous {
            uid: uid.clone(),
            paths: found.into_iter().map(|(p, _)| p).collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "5f2a1c3e-8b7d-4e6f-9a0b-1c2d3e4f5a6b";

    #[test]
    fn uids_must_be_uuids() {
        assert_eq!(PodUid::parse(UID).expect("uuid").as_str(), UID);
        assert_eq!(
            PodUid::parse(&UID.to_ascii_uppercase())
                .expect("upper")
                .as_str(),
            UID
        );
        for bad in [
            "",
            "../../etc",
            "5f2a1c3e-8b7d-4e6f-9a0b-1c2d3e4f5a6",
            "5f2a1c3e-8b7d-4e6f-9a0b-1c2d3e4f5a6b0",
            "5f2a1c3e_8b7d_4e6f_9a0b_1c2d3e4f5a6b",
            "5f2a1c3e-8b7d-4e6f-9a0b-1c2d3e4f5a6g",
            "5f2a1c3e-8b7d-4e6f-9a0b/1c2d3e4f5a6b",
            "5f2a1c3e-8b7d-4e6f-9a0b-1c2d3e4f5a6b/..",
        ] {
            assert!(
                matches!(PodUid::parse(bad), Err(PodCgroupError::BadUid(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn kubelet_layouts_for_both_drivers() {
        let uid = PodUid::parse(UID).expect("uid");
        let u = UID.replace('-', "_");
        let cases = [
            (
                CgroupDriver::Systemd,
                QosClass::Guaranteed,
                format!("kubepods.slice/kubepods-pod{u}.slice"),
            ),
            (
                CgroupDriver::Systemd,
                QosClass::Burstable,
                format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice"),
            ),
            (
                CgroupDriver::Systemd,
                QosClass::BestEffort,
                format!(
                    "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice"
                ),
            ),
            (
                CgroupDriver::Cgroupfs,
                QosClass::Guaranteed,
                format!("kubepods/pod{UID}"),
            ),
            (
                CgroupDriver::Cgroupfs,
                QosClass::Burstable,
                format!("kubepods/burstable/pod{UID}"),
            ),
            (
                CgroupDriver::Cgroupfs,
                QosClass::BestEffort,
                format!("kubepods/besteffort/pod{UID}"),
            ),
        ];
        for (driver, qos, want) in cases {
            assert_eq!(
                pod_cgroup_relpath(driver, qos, &uid),
                PathBuf::from(&want),
                "{driver:?} {qos:?}"
            );
        }
    }

    #[test]
    fn finds_the_one_directory_that_exists() {
        let uid = PodUid::parse(UID).expect("uid");
        for driver in [CgroupDriver::Systemd, CgroupDriver::Cgroupfs] {
            for qos in QosClass::ALL {
                let root = tempfile::tempdir().expect("root");
                let dir = root.path().join(pod_cgroup_relpath(driver, qos, &uid));
                // A container scope below must not confuse the search.
                std::fs::create_dir_all(dir.join("cri-containerd-abc.scope")).expect("mkdir");
                assert_eq!(
                    find_pod_cgroup(root.path(), &uid, None).expect("found"),
                    (dir.clone(), driver)
                );
                assert_eq!(
                    find_pod_cgroup(root.path(), &uid, Some(driver)).expect("found"),
                    (dir, driver)
                );
                let other = match driver {
                    CgroupDriver::Systemd => CgroupDriver::Cgroupfs,
                    CgroupDriver::Cgroupfs => CgroupDriver::Systemd,
                };
                assert!(matches!(
                    find_pod_cgroup(root.path(), &uid, Some(other)),
                    Err(PodCgroupError::NotFound { .. })
                ));
            }
        }
    }

    #[test]
    fn missing_and_ambiguous_pods_are_errors() {
        let uid = PodUid::parse(UID).expect("uid");
        let root = tempfile::tempdir().expect("root");
        let err = find_pod_cgroup(root.path(), &uid, None).expect_err("none");
        assert!(err.to_string().contains(UID), "{err}");
        for qos in [QosClass::Burstable, QosClass::BestEffort] {
            std::fs::create_dir_all(root.path().join(pod_cgroup_relpath(
                CgroupDriver::Systemd,
                qos,
                &uid,
            )))
            .expect("mkdir");
        }
        assert!(matches!(
            find_pod_cgroup(root.path(), &uid, None),
            Err(PodCgroupError::Ambiguous { .. })
        ));
    }
}
