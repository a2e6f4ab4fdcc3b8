//! Volume capabilities: which access types and modes Ballast serves.
//!
//! A Ballast volume is a block device attached to one node for writing (the
//! fencing epoch makes a second writer impossible), or to any number of
//! nodes read-only. So every single-node mode is supported, and
//! MULTI_NODE_READER_ONLY; the multi-node writer modes are not.

use ballast_proto::csi;
use ballast_proto::csi::volume_capability::access_mode::Mode;
use ballast_proto::csi::volume_capability::AccessType;

use crate::error::{CsiError, Result};
use crate::params::FsType;

/// What a volume capability asks for, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checked {
    pub access: Access,
    pub mode: Mode,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Access {
    Block,
    Mount {
        /// Empty when the capability leaves it to the StorageClass.
        fs_type: Option<FsType>,
        mount_flags: Vec<String>,
    },
}

impl Checked {
    pub fn is_block(&self) -> bool {
        matches!(self.access, Access::Block)
    }

    /// Modes in which the volume must never be written.
    pub fn read_only_mode(&self) -> bool {
        matches!(self.mode, Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly)
    }
}

/// Checks one capability; unsupported ones are InvalidArgument.
pub fn check(cap: &csi::VolumeCapability) -> Result<Checked> {
    let access = match &cap.access_type {
        Some(AccessType::Block(_)) => Access::Block,
        Some(AccessType::Mount(mount)) => {
            let fs_type = match mount.fs_type.as_str() {
                "" => None,
                other => Some(other.parse()?),
            };
            if !mount.volume_mount_group.is_empty() {
                return Err(CsiError::invalid("volume_mount_group is not supported"));
            }
            Access::Mount { fs_type, mount_flags: mount.mount_flags.clone() }
        }
        None => return Err(CsiError::invalid("volume capability needs an access type (block or mount)")),
    };
    let mode = cap
        .access_mode
        .as_ref()
        .map(|m| Mode::try_from(m.mode).unwrap_or(Mode::Unknown))
        .ok_or_else(|| CsiError::invalid("volume capability needs an access mode"))?;
    match mode {
        Mode::SingleNodeWriter
        | Mode::SingleNodeSingleWriter
        | Mode::SingleNodeMultiWriter
        | Mode::SingleNodeReaderOnly
        | Mode::MultiNodeReaderOnly => Ok(Checked { access, mode }),
        Mode::MultiNodeSingleWriter | Mode::MultiNodeMultiWriter => Err(CsiError::invalid(format!(
            "access mode {} is not supported: a Ballast volume has one writer node at a time",
            mode.as_str_name()
        ))),
        Mode::Unknown => Err(CsiError::invalid("access mode is unknown")),
    }
}

/// Checks a non-empty list of capabilities.
pub fn check_all(caps: &[csi::VolumeCapability]) -> Result<Vec<Checked>> {
    if caps.is_empty() {
        return Err(CsiError::Missing("volume_capabilities"));
    }
    caps.iter().map(check).collect()
}

/// The filesystem the capabilities ask for, reconciled with the
/// StorageClass's `fsType`; `None` when every capability is raw block.
pub fn filesystem(caps: &[Checked], from_params: Option<FsType>) -> Result<Option<FsType>> {
    let mut chosen: Option<FsType> = None;
    let mut any_mount = false;
    for cap in caps {
        if let Access::Mount { fs_type, .. } = &cap.access {
            any_mount = true;
            if let Some(fs) = fs_type {
                if chosen.is_some_and(|c| c != *fs) {
                    return Err(CsiError::invalid("volume capabilities ask for different filesystems"));
                }
                chosen = Some(*fs);
            }
        }
    }
    if !any_mount {
        return Ok(None);
    }
    match (chosen, from_params) {
        (Some(cap), Some(param)) if cap != param => Err(CsiError::invalid(format!(
            "the volume capability asks for {cap} but the fsType parameter says {param}"
        ))),
        (Some(fs), _) | (None, Some(fs)) => Ok(Some(fs)),
        (None, None) => Ok(Some(FsType::default())),
    }
}

pub fn block(mode: Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(AccessType::Block(csi::volume_capability::BlockVolume {})),
        access_mode: Some(csi::volume_capability::AccessMode { mode: mode as i32 }),
    }
}

pub fn mount(fs_type: &str, mode: Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(AccessType::Mount(csi::volume_capability::MountVolume {
            fs_type: fs_type.to_string(),
            mount_flags: Vec::new(),
            volume_mount_group: String::new(),
        })),
        access_mode: Some(csi::volume_capability::AccessMode { mode: mode as i32 }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supported_modes_and_types() {
        for mode in [
            Mode::SingleNodeWriter,
            Mode::SingleNodeSingleWriter,
            Mode::SingleNodeMultiWriter,
            Mode::SingleNodeReaderOnly,
            Mode::MultiNodeReaderOnly,
        ] {
            assert!(check(&block(mode)).unwrap().is_block());
            assert!(!check(&mount("ext4", mode)).unwrap().is_block());
        }
        for mode in [Mode::MultiNodeMultiWriter, Mode::MultiNodeSingleWriter, Mode::Unknown] {
            assert!(matches!(check(&block(mode)), Err(CsiError::InvalidArgument(_))));
        }
        assert!(check(&mount("btrfs", Mode::SingleNodeWriter)).is_err());
        let no_type = csi::VolumeCapability { access_type: None, ..block(Mode::SingleNodeWriter) };
        assert!(check(&no_type).is_err());
        assert!(matches!(check_all(&[]), Err(CsiError::Missing(_))));
        assert!(check(&block(Mode::MultiNodeReaderOnly)).unwrap().read_only_mode());
    }

    #[test]
    fn filesystem_choice() {
        let ext4 = check(&mount("ext4", Mode::SingleNodeWriter)).unwrap();
        let xfs = check(&mount("xfs", Mode::SingleNodeWriter)).unwrap();
        let any = check(&mount("", Mode::SingleNodeWriter)).unwrap();
        let raw = check(&block(Mode::SingleNodeWriter)).unwrap();
        assert_eq!(filesystem(std::slice::from_ref(&raw), Some(FsType::Xfs)).unwrap(), None);
        assert_eq!(filesystem(std::slice::from_ref(&any), None).unwrap(), Some(FsType::Ext4));
        assert_eq!(filesystem(std::slice::from_ref(&any), Some(FsType::Xfs)).unwrap(), Some(FsType::Xfs));
        assert_eq!(filesystem(std::slice::from_ref(&xfs), None).unwrap(), Some(FsType::Xfs));
        assert!(filesystem(&[ext4.clone(), xfs.clone()], None).is_err());
        assert!(filesystem(&[xfs], Some(FsType::Ext4)).is_err());
        assert_eq!(filesystem(&[ext4, raw], None).unwrap(), Some(FsType::Ext4));
    }
}
