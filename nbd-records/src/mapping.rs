//! Records of mapped volumes, one JSON file per volume in a state
//! directory, so that `list`, `unmap` and a restarted serving process find
//! what is mapped where and which process serves it.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Default state directory; volatile on purpose: mappings do not survive a reboot.
pub const DEFAULT_STATE_DIR: &str = "/run/ballast/nbd";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mapping {
    pub volume_id: String,
    pub volume_name: String,
    pub device: String,
    /// `netlink`, `ioctl` or `fuse-loop`.
    pub method: String,
    /// The serving process.
    pub pid: u32,
    pub epoch: u64,
    /// Whether the serving process grows the device on SIGHUP (`resize`);
    /// processes of older versions would die of the signal.
    #[serde(default)]
    pub resizable: bool,
}

impl Mapping {
    /// Whether the serving process still runs (a recycled pid running some
    /// other program does not count).
    pub fn is_served(&self) -> bool {
        process_is_nbd_client(self.pid)
    }
}

/// One entry of `nbd-client list -o json`: what it prints and what the CSI
/// node reads. Older versions printed only `volume`, `device` and `pid`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listed {
    pub volume: String,
    #[serde(default)]
    pub name: String,
    pub device: PathBuf,
    /// `netlink`, `ioctl` or `fuse-loop`.
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub pid: u32,
    #[serde(default)]
    pub epoch: u64,
    /// Whether the serving process still runs, as `nbd-client` saw it.
    #[serde(default)]
    pub served: Option<bool>,
}

impl Listed {
    /// Whether the serving process is still there; without `served`, by
    /// its pid.
    pub fn is_served(&self) -> bool {
        self.served.unwrap_or_else(|| self.pid == 0 || Path::new(&format!("/proc/{}", self.pid)).exists())
    }
}

impl From<&Mapping> for Listed {
    fn from(mapping: &Mapping) -> Self {
        Listed {
            volume: mapping.volume_id.clone(),
            name: mapping.volume_name.clone(),
            device: PathBuf::from(&mapping.device),
            method: Some(mapping.method.clone()),
            pid: mapping.pid,
            epoch: mapping.epoch,
            served: Some(mapping.is_served()),
        }
    }
}

pub fn process_is_nbd_client(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|cmdline| {
            let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
            argv0.ends_with(b"nbd-client")
        })
        .unwrap_or(false)
}

pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    pub fn new(dir: impl Into<PathBuf>) -> io::Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)?;
        Ok(StateDir { dir })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn record(&self, volume_id: &str) -> PathBuf {
        self.dir.join(format!("{volume_id}.json"))
    }

    pub fn log_path(&self, volume_id: &str) -> PathBuf {
        self.dir.join(format!("{volume_id}.log"))
    }

    /// Where the serving process listens for a successor to take its
    /// device over (nbd-client's `handover` module).
    pub fn handover_path(&self, volume_id: &str) -> PathBuf {
        self.dir.join(format!("{volume_id}.handover"))
    }

    /// Where the serving process reports why its last resize failed.
    pub fn resize_error_path(&self, volume_id: &str) -> PathBuf {
        self.dir.join(format!("{volume_id}.resize-error"))
    }

    /// Writes a record atomically (rename), so readers never see half of one.
    pub fn save(&self, mapping: &Mapping) -> io::Result<()> {
        let tmp = self.dir.join(format!(".{}.tmp", mapping.volume_id));
        std::fs::write(&tmp, serde_json::to_vec_pretty(mapping).map_err(io::Error::other)?)?;
        std::fs::rename(tmp, self.record(&mapping.volume_id))
    }

    pub fn load(&self, volume_id: &str) -> io::Result<Option<Mapping>> {
        match std::fs::read(self.record(volume_id)) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(io::Error::other),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn remove(&self, volume_id: &str) -> io::Result<()> {
        match std::fs::remove_file(self.record(volume_id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    pub fn all(&self) -> io::Result<Vec<Mapping>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "json") {
                if let Ok(bytes) = std::fs::read(&path) {
                    if let Ok(mapping) = serde_json::from_slice::<Mapping>(&bytes) {
                        out.push(mapping);
                    }
                }
            }
        }
        out.sort_by(|a, b| a.volume_id.cmp(&b.volume_id));
        Ok(out)
    }

    /// The mapping of a volume (by id or name) or of a device path.
    pub fn find(&self, volume_or_device: &str) -> io::Result<Option<Mapping>> {
        Ok(self.all()?.into_iter().find(|m| {
            m.volume_id == volume_or_device || m.volume_name == volume_or_device || m.device == volume_or_device
        }))
    }
}

/// Where `device` is mounted, if anywhere.
pub fn mount_points(device: &str) -> Vec<String> {
    let table = crate::mountinfo::read().unwrap_or_default();
    table.into_iter().filter(|m| m.source == device).map(|m| m.mount_point.display().to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_are_found_by_volume_name_or_device() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path()).unwrap();
        let mapping = Mapping {
            volume_id: "vol-1".into(),
            volume_name: "db".into(),
            device: "/dev/loop3".into(),
            method: "fuse-loop".into(),
            pid: 1,
            epoch: 4,
            resizable: true,
        };
        state.save(&mapping).unwrap();
        assert_eq!(state.load("vol-1").unwrap(), Some(mapping.clone()));
        for key in ["vol-1", "db", "/dev/loop3"] {
            assert_eq!(state.find(key).unwrap(), Some(mapping.clone()));
        }
        assert_eq!(state.find("other").unwrap(), None);
        state.remove("vol-1").unwrap();
        state.remove("vol-1").unwrap();
        assert!(state.all().unwrap().is_empty());
    }
}
