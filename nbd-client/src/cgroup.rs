//! Leaving a container's cgroup. The CSI node plugin starts serving
//! processes from inside its container; when that container stops (an
//! upgrade, a crash, `kubectl delete pod`), the runtime kills every process
//! in the container's cgroup, and a volume whose server dies fails every
//! I/O of the pod using it. So a serving process started inside a pod's
//! cgroup moves itself to a cgroup of its own next to the kubelet's
//! `kubepods` (`<root>/kubepods/...` → `<root>/ballast-volumes`), in every
//! hierarchy, the way a node daemon started by the host would live.

use std::path::{Path, PathBuf};

/// The cgroup serving processes move to, beside `kubepods`.
pub const CGROUP_NAME: &str = "ballast-volumes";
const PODS: &str = "/kubepods";

/// One line of `/proc/self/cgroup`: the hierarchy's controllers (empty for
/// cgroup v2) and this process's path in it.
#[derive(Debug, PartialEq, Eq)]
struct Membership {
    controllers: String,
    path: String,
}

fn memberships(proc_cgroup: &str) -> Vec<Membership> {
    proc_cgroup
        .lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (_id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            Some(Membership { controllers: controllers.to_string(), path: path.to_string() })
        })
        .collect()
}

/// Where a process in `path` moves: beside the kubelet's pods cgroup, or
/// nowhere if it is not in a pod.
fn escape_path(path: &str) -> Option<String> {
    let at = path.find(PODS)?;
    let after = &path[at + PODS.len()..];
    (after.is_empty() || after.starts_with('/') || after.starts_with('.'))
        .then(|| format!("{}/{CGROUP_NAME}", &path[..at]))
}

/// The mount point of the whole hierarchy with these controllers
/// (`cpu,cpuacct`, `name=systemd`, or "" for cgroup v2), from mountinfo:
/// a mount whose root is the hierarchy's root, not a container's subtree.
fn hierarchy_mount(mountinfo: &str, controllers: &str) -> Option<PathBuf> {
    let wanted: Vec<&str> = controllers.split(',').filter(|c| !c.is_empty()).collect();
    mountinfo.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        let mount: Vec<&str> = mount.split(' ').collect();
        let fs: Vec<&str> = fs.split(' ').collect();
        let (root, point) = (*mount.get(3)?, *mount.get(4)?);
        if root != "/" {
            return None;
        }
        let matches = match *fs.first()? {
            "cgroup2" => wanted.is_empty(),
            "cgroup" => {
                let options: Vec<&str> = fs.get(2)?.split(',').collect();
                !wanted.is_empty() && wanted.iter().all(|c| options.contains(c))
            }
            _ => false,
        };
        matches.then(|| PathBuf::from(point))
    })
}

/// Moves this process out of a pod's cgroup into [`CGROUP_NAME`] in every
/// hierarchy it can reach. Returns the new path, or `None` when the
/// process is not in a pod (started on the host or by a test). A
/// hierarchy that cannot be reached is reported: the process then still
/// dies with the container.
pub fn leave_pod() -> std::io::Result<Option<String>> {
    let proc_cgroup = std::fs::read_to_string("/proc/self/cgroup")?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mut moved = None;
    for membership in memberships(&proc_cgroup) {
        let Some(target) = escape_path(&membership.path) else { continue };
        let Some(mount) = hierarchy_mount(&mountinfo, &membership.controllers) else {
            return Err(std::io::Error::other(format!(
                "the cgroup hierarchy {:?} is not mounted whole in this container (mount the host's /sys)",
                membership.controllers
            )));
        };
        join(&mount.join(target.trim_start_matches('/')))?;
        moved = Some(target);
    }
    Ok(moved)
}

fn join(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    // A new cpuset cgroup has no CPUs or memory nodes until given its parent's.
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let own = dir.join(file);
        if own.exists() && std::fs::read_to_string(&own)?.trim().is_empty() {
            let parent = dir.parent().map(|p| p.join(file)).filter(|p| p.exists());
            if let Some(parent) = parent {
                std::fs::write(&own, std::fs::read_to_string(parent)?)?;
            }
        }
    }
    std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_process_moves_beside_kubepods() {
        assert_eq!(escape_path("/kubepods/burstable/pod12/abc").as_deref(), Some("/ballast-volumes"));
        assert_eq!(escape_path("/k8s/node1/kubepods/pod1/c").as_deref(), Some("/k8s/node1/ballast-volumes"));
        assert_eq!(escape_path("/kubepods.slice/kubepods-pod1.slice/x").as_deref(), Some("/ballast-volumes"));
        assert_eq!(escape_path("/user.slice/session-1.scope"), None);
        assert_eq!(escape_path("/"), None);
    }

    #[test]
    fn memberships_and_hierarchies() {
        let cgroup = "12:cpu,cpuacct:/kubepods/pod1/c\n1:name=systemd:/kubepods/pod1/c\n0::/\n";
        assert_eq!(
            memberships(cgroup),
            vec![
                Membership { controllers: "cpu,cpuacct".into(), path: "/kubepods/pod1/c".into() },
                Membership { controllers: "name=systemd".into(), path: "/kubepods/pod1/c".into() },
                Membership { controllers: "".into(), path: "/".into() },
            ]
        );
        let mountinfo = "\
30 25 0:26 /kubepods/pod1/c /sys/fs/cgroup/cpu,cpuacct ro - cgroup cgroup rw,cpu,cpuacct
40 35 0:26 / /host/sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
41 35 0:27 / /host/sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd
42 35 0:28 / /host/sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw";
        assert_eq!(hierarchy_mount(mountinfo, "cpu,cpuacct"), Some(PathBuf::from("/host/sys/fs/cgroup/cpu,cpuacct")));
        assert_eq!(hierarchy_mount(mountinfo, "name=systemd"), Some(PathBuf::from("/host/sys/fs/cgroup/systemd")));
        assert_eq!(hierarchy_mount(mountinfo, ""), Some(PathBuf::from("/host/sys/fs/cgroup/unified")));
        assert_eq!(hierarchy_mount(mountinfo, "memory"), None);
    }
}
