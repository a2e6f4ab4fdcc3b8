//! Holding a running process to a small share of one CPU, the way an
//! overloaded node would run it: the cgroup `cpu` controller's bandwidth
//! limit (cgroup v1 `cpu.cfs_quota_us`, or v2 `cpu.max` where v2 has the
//! controller). The process goes back to its own cgroup when the limit is
//! dropped.

use std::io;
use std::path::{Path, PathBuf};

const V1: &str = "/sys/fs/cgroup/cpu";
const V2: &str = "/sys/fs/cgroup";
/// The scheduler's accounting period the quota is a share of.
const PERIOD_US: u64 = 100_000;

/// The file whose presence says this machine can limit CPU, for
/// [`machine_has`](crate::machine_has).
pub fn control_file() -> &'static str {
    if Path::new(V1).join("cpu.cfs_quota_us").exists() {
        "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"
    } else {
        "/sys/fs/cgroup/cgroup.controllers"
    }
}

/// A cgroup of its own holding one process to `percent` of a CPU.
pub struct CpuLimit {
    dir: PathBuf,
    /// Where the process was, to put it back.
    home: PathBuf,
    pid: u32,
}

impl CpuLimit {
    /// Moves `pid` (all its threads) into a new cgroup limited to `percent`
    /// of one CPU.
    pub fn apply(pid: u32, percent: u64) -> io::Result<CpuLimit> {
        let quota_us = PERIOD_US * percent / 100;
        let v1 = Path::new(V1).join("cpu.cfs_quota_us").exists();
        let root = Path::new(if v1 { V1 } else { V2 });
        let home = root.join(own_cgroup(pid, v1)?.trim_start_matches('/'));
        let dir = root.join(format!("ballast-cpu-limit-{pid}"));
        std::fs::create_dir(&dir).map_err(|e| context(e, &dir))?;
        let limit = CpuLimit { dir, home, pid };
        let mut settings = vec![];
        if v1 {
            settings.push((limit.dir.join("cpu.cfs_period_us"), PERIOD_US.to_string()));
            settings.push((limit.dir.join("cpu.cfs_quota_us"), quota_us.to_string()));
        } else {
            // The root may not hand the controller down yet.
            settings.push((root.join("cgroup.subtree_control"), "+cpu".to_string()));
            settings.push((limit.dir.join("cpu.max"), format!("{quota_us} {PERIOD_US}")));
        }
        settings.push((limit.dir.join("cgroup.procs"), pid.to_string()));
        for (file, value) in settings {
            std::fs::write(&file, &value).map_err(|e| context(e, &file))?;
        }
        Ok(limit)
    }
}

fn context(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("limiting CPU through {}: {e}", path.display()))
}

impl Drop for CpuLimit {
    fn drop(&mut self) {
        // The process may have exited; the cgroup goes either way.
        let _ = std::fs::write(self.home.join("cgroup.procs"), self.pid.to_string());
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The path of `pid`'s cgroup in the hierarchy that holds the `cpu`
/// controller (v1), or in the unified one (v2).
fn own_cgroup(pid: u32, v1: bool) -> io::Result<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            Some((parts.next()?, parts.next()?, parts.next()?))
        })
        .find(
            |(_, controllers, _)| if v1 { controllers.split(',').any(|c| c == "cpu") } else { controllers.is_empty() },
        )
        .map(|(_, _, path)| path.to_string())
        .ok_or_else(|| io::Error::other(format!("process {pid} is in no cpu cgroup")))
}
