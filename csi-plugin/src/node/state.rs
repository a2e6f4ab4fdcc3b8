//! What the node remembers about a staged volume between calls (and across
//! plugin restarts): one small JSON file per volume under `--state-dir`,
//! replaced atomically. The mount table stays the authority on what is
//! mounted; this records what the mount table cannot say (the device a raw
//! block volume was attached as, its epoch, whether it is ephemeral).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::luks;
use crate::error::{CsiError, Result};
use crate::params::FsType;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Staged {
    /// The CSI volume id (the kubelet's own for an ephemeral volume).
    pub volume_id: String,
    /// The volume's id in the metadata service.
    pub meta_volume_id: String,
    pub device: PathBuf,
    pub epoch: u64,
    pub readonly: bool,
    pub staging_path: PathBuf,
    /// `None` for a raw block volume.
    pub fs_type: Option<FsType>,
    /// Created by NodePublishVolume for an inline ephemeral volume, and
    /// deleted again by NodeUnpublishVolume.
    #[serde(default)]
    pub ephemeral: bool,
    /// A LUKS2 container, opened as [`luks::mapping_path`].
    #[serde(default)]
    pub encrypted: bool,
}

impl Staged {
    /// What the filesystem (or a pod's raw block device) sits on: the
    /// opened container of an encrypted volume, else the attached device.
    pub fn data_device(&self) -> PathBuf {
        if self.encrypted {
            luks::mapping_path(&self.meta_volume_id)
        } else {
            self.device.clone()
        }
    }
}

#[derive(Clone, Debug)]
pub struct StateDir {
    dir: PathBuf,
}

/// Volume ids become file names: refuse anything that could escape the
/// directory or surprise a shell.
pub fn check_volume_id(id: &str) -> Result<()> {
    let valid = !id.is_empty()
        && id.len() <= 253
        && !id.starts_with('.')
        && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !valid {
        return Err(CsiError::invalid(format!("volume id {id:?} is not a valid Ballast volume id")));
    }
    Ok(())
}

impl StateDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn file(&self, volume_id: &str) -> PathBuf {
        self.dir.join(format!("{volume_id}.json"))
    }

    /// Where an ephemeral volume is staged (it has no staging path of the
    /// kubelet's).
    pub fn ephemeral_staging(&self, volume_id: &str) -> PathBuf {
        self.dir.join("ephemeral").join(volume_id)
    }

    pub fn load(&self, volume_id: &str) -> Result<Option<Staged>> {
        let path = self.file(volume_id);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| CsiError::Internal(format!("state file {} is corrupt: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CsiError::io("reading", path, e)),
        }
    }

    /// Every volume recorded here; a file that cannot be read is skipped
    /// with a warning.
    pub fn list(&self) -> Result<Vec<Staged>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(CsiError::io("reading", &self.dir, e)),
        };
        let mut staged = Vec::new();
        for entry in entries {
            let path = entry.map_err(|e| CsiError::io("reading", &self.dir, e))?.path();
            let Some(volume_id) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".json"))
            else {
                continue;
            };
            match self.load(volume_id) {
                Ok(Some(volume)) => staged.push(volume),
                Ok(None) => {}
                Err(err) => tracing::warn!("skipping {}: {err}", path.display()),
            }
        }
        Ok(staged)
    }

    pub fn save(&self, staged: &Staged) -> Result<()> {
        std::fs::create_dir_all(&self.dir).map_err(|e| CsiError::io("creating", &self.dir, e))?;
        let path = self.file(&staged.volume_id);
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(staged).expect("state serialises");
        std::fs::write(&tmp, bytes).map_err(|e| CsiError::io("writing", &tmp, e))?;
        std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| CsiError::io("syncing", &tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| CsiError::io("renaming", &tmp, e))
    }

    pub fn remove(&self, volume_id: &str) -> Result<()> {
        let path = self.file(volume_id);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(CsiError::io("removing", path, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_removal_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path().join("state"));
        assert!(state.load("vol-1").unwrap().is_none());
        let staged = Staged {
            volume_id: "vol-1".into(),
            meta_volume_id: "vol-1".into(),
            device: "/dev/nbd0".into(),
            epoch: 3,
            readonly: false,
            staging_path: "/stage".into(),
            fs_type: Some(FsType::Xfs),
            ephemeral: false,
            encrypted: true,
        };
        assert_eq!(staged.data_device(), Path::new("/dev/mapper/ballast-vol-1"));
        assert!(state.list().unwrap().is_empty());
        state.save(&staged).unwrap();
        assert_eq!(state.load("vol-1").unwrap(), Some(staged.clone()));
        std::fs::write(dir.path().join("state/vol-2.json"), b"{").unwrap();
        assert_eq!(state.list().unwrap(), vec![staged]);
        state.remove("vol-1").unwrap();
        state.remove("vol-1").unwrap();
        assert!(state.load("vol-1").unwrap().is_none());
    }

    #[test]
    fn volume_ids_are_checked() {
        check_volume_id("vol-1f").unwrap();
        check_volume_id("csi-0123abcd").unwrap();
        for bad in ["", "../etc", ".hidden", "a/b", "a b"] {
            assert!(check_volume_id(bad).is_err(), "{bad:?}");
        }
    }
}
