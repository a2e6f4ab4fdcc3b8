//! Encryption at rest: an encrypted volume is a LUKS2 container
//! (cryptsetup) on the attached device, unlocked with the passphrase of the
//! node-stage secret; its filesystem, or the raw block device a pod gets, is
//! the opened mapping `/dev/mapper/ballast-<volume id>`. The chunk servers
//! only ever hold ciphertext, and so do snapshots and clones, which open
//! with the same passphrase. The passphrase reaches cryptsetup on stdin,
//! never in an argument, a log line or the metadata service.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::tools::{self, Content};
use crate::error::{CsiError, Result};

/// The key of the node-stage secret that holds a volume's passphrase.
pub const PASSPHRASE_KEY: &str = "encryptionPassphrase";

/// Formatting derives the key slot with Argon2, which takes seconds by
/// design; opening does the same work.
const CRYPTSETUP_LIMIT: Duration = Duration::from_secs(120);

/// Argon2id's memory per key slot, in KiB. cryptsetup's default (up to
/// 1 GiB) would get a node plugin limited to 1 GiB killed when it opens a
/// few volumes at once; 64 MiB is still well above what brute-forcing
/// hardware can afford per guess.
const PBKDF_MEMORY: &str = "--pbkdf-memory=65536";

/// What `blkid` calls a LUKS header.
const LUKS_SIGNATURE: &str = "crypto_LUKS";

/// The device-mapper name of a volume's opened container.
pub fn mapping_name(meta_volume_id: &str) -> String {
    format!("ballast-{meta_volume_id}")
}

pub fn mapping_path(meta_volume_id: &str) -> PathBuf {
    Path::new("/dev/mapper").join(mapping_name(meta_volume_id))
}

/// Whether `content` (of an attached device) is a LUKS container.
pub fn is_container(content: &Content) -> bool {
    matches!(content, Content::Other(what) if what.starts_with(LUKS_SIGNATURE))
}

/// Opens the container on `device` as the volume's mapping, making one
/// first if the device is blank, and returns the mapping's path. A mapping
/// already open on this device is returned as it is; one left open on
/// another device (an earlier attachment) is closed first.
pub async fn open(device: &Path, meta_volume_id: &str, passphrase: &[u8], readonly: bool) -> Result<PathBuf> {
    let mapping = mapping_path(meta_volume_id);
    if mapping.exists() {
        if backing_device(meta_volume_id).await?.is_some_and(|d| same_device(&d, device)) {
            return Ok(mapping);
        }
        close(meta_volume_id).await?;
    }
    let cryptsetup = cryptsetup()?;
    match tools::probe_content(device).await? {
        content if is_container(&content) => {}
        Content::Blank if readonly => {
            return Err(CsiError::precondition("volume is blank and attached read-only: nothing to unlock"))
        }
        Content::Blank => {
            tracing::info!("making the blank volume a LUKS2 container");
            let args = [
                OsStr::new("luksFormat"),
                OsStr::new("--type=luks2"),
                OsStr::new("--batch-mode"),
                OsStr::new("--pbkdf=argon2id"),
                OsStr::new(PBKDF_MEMORY),
            ];
            let key = [OsStr::new("--key-file=-"), device.as_os_str()];
            tools::run_with_input(&cryptsetup, args.iter().chain(&key), passphrase, CRYPTSETUP_LIMIT).await?;
        }
        Content::Filesystem(found) => {
            return Err(CsiError::precondition(format!(
                "volume holds an unencrypted {found} filesystem; it is never made into an encrypted one"
            )))
        }
        Content::Other(what) => {
            return Err(CsiError::precondition(format!("volume holds {what}, not a LUKS container")))
        }
    }
    let name = mapping_name(meta_volume_id);
    // Without the kernel keyring the volume key sits in the dm-crypt table,
    // so that growing the mapping later needs no passphrase.
    let mut args = vec![OsStr::new("open"), OsStr::new("--type=luks2"), OsStr::new("--disable-keyring")];
    if readonly {
        args.push(OsStr::new("--readonly"));
    }
    args.extend([OsStr::new("--key-file=-"), device.as_os_str(), OsStr::new(&name)]);
    tools::run_with_input(&cryptsetup, args, passphrase, CRYPTSETUP_LIMIT).await.map_err(|e| match e {
        CsiError::Tool { detail, .. } if detail.contains("No key available") => {
            CsiError::precondition("the node-stage secret's passphrase does not open this volume")
        }
        other => other,
    })?;
    tracing::info!(mapping = %mapping.display(), "LUKS container opened");
    Ok(mapping)
}

/// Closes the volume's mapping, if it is open.
pub async fn close(meta_volume_id: &str) -> Result<()> {
    if !mapping_path(meta_volume_id).exists() {
        return Ok(());
    }
    let name = mapping_name(meta_volume_id);
    tools::run(&cryptsetup()?, [OsStr::new("close"), OsStr::new(&name)], CRYPTSETUP_LIMIT).await?;
    tracing::info!(mapping = %name, "LUKS container closed");
    Ok(())
}

/// Grows the open mapping to fill its (grown) device.
pub async fn grow(meta_volume_id: &str) -> Result<()> {
    let name = mapping_name(meta_volume_id);
    tools::run(&cryptsetup()?, [OsStr::new("resize"), OsStr::new(&name)], CRYPTSETUP_LIMIT).await?;
    Ok(())
}

/// The device an open mapping sits on, from `cryptsetup status`.
async fn backing_device(meta_volume_id: &str) -> Result<Option<PathBuf>> {
    let name = mapping_name(meta_volume_id);
    let status = tools::run_status(&cryptsetup()?, [OsStr::new("status"), OsStr::new(&name)], CRYPTSETUP_LIMIT).await?;
    Ok(parse_status_device(&status.stdout))
}

fn parse_status_device(status: &str) -> Option<PathBuf> {
    status.lines().find_map(|line| line.trim().strip_prefix("device:").map(|d| PathBuf::from(d.trim())))
}

fn same_device(a: &Path, b: &Path) -> bool {
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    canon(a) == canon(b)
}

fn cryptsetup() -> Result<PathBuf> {
    tools::which("cryptsetup").ok_or_else(|| {
        CsiError::precondition("cryptsetup is not installed on this node: encrypted volumes need it (and dm-crypt)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_luks_header_is_told_from_other_content() {
        assert!(is_container(&tools::parse_blkid("TYPE=crypto_LUKS\nUSAGE=crypto\nVERSION=2\n")));
        assert!(!is_container(&tools::parse_blkid("TYPE=ext4\nUSAGE=filesystem\n")));
        assert!(!is_container(&Content::Blank));
    }

    #[test]
    fn the_backing_device_is_read_from_cryptsetup_status() {
        let status = "/dev/mapper/ballast-vol-1 is active.\n  type:    LUKS2\n  cipher:  aes-xts-plain64\n  \
                      device:  /dev/nbd0\n  sector size:  512\n";
        assert_eq!(parse_status_device(status), Some(PathBuf::from("/dev/nbd0")));
        assert_eq!(parse_status_device("ballast-vol-1 is inactive.\n"), None);
        assert_eq!(mapping_path("vol-1a"), Path::new("/dev/mapper/ballast-vol-1a"));
    }
}
