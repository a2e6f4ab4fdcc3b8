//! Attaching volumes through the `nbd-client` binary. The serving process
//! it leaves behind is not ours: restarting the plugin never touches an
//! attached device.
//!
//! The contract:
//! - `nbd-client map VOLUME_ID --meta LIST --epoch N [--readonly]` prints the
//!   device path and exits 0, leaving a serving process in the background;
//! - `nbd-client unmap VOLUME_ID_OR_DEVICE` exits 0, also when not mapped;
//! - `nbd-client list -o json` prints `[{"volume": .., "device": .., "pid": ..}]`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::{CsiError, Result};
use crate::node::tools;

const BINARY: &str = "nbd-client";
const MAP_LIMIT: Duration = Duration::from_secs(120);
const UNMAP_LIMIT: Duration = Duration::from_secs(120);
const LIST_LIMIT: Duration = Duration::from_secs(30);

/// One attached volume, as `nbd-client list` reports it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Mapping {
    pub volume: String,
    pub device: PathBuf,
    #[serde(default)]
    pub pid: u32,
}

impl Mapping {
    /// Whether the serving process is still there.
    pub fn is_served(&self) -> bool {
        self.pid == 0 || Path::new(&format!("/proc/{}", self.pid)).exists()
    }
}

#[derive(Clone, Debug)]
pub struct NbdClient {
    /// `--nbd-client-bin`, if given.
    configured: Option<PathBuf>,
}

impl NbdClient {
    pub fn new(configured: Option<PathBuf>) -> Self {
        Self { configured }
    }

    /// The binary to run: the configured one (a bare name is looked up in
    /// PATH), else the one next to this executable, else `nbd-client` in
    /// PATH. Looked up on every call, so installing it later needs no
    /// restart.
    pub fn binary(&self) -> Result<PathBuf> {
        let found = match &self.configured {
            Some(path) if path.components().count() > 1 => Some(path.clone()).filter(|p| tools::is_executable(p)),
            Some(name) => tools::which(&name.to_string_lossy()),
            None => std::env::current_exe()
                .ok()
                .and_then(|exe| exe.parent().map(|dir| dir.join(BINARY)))
                .filter(|p| tools::is_executable(p))
                .or_else(|| tools::which(BINARY)),
        };
        found.ok_or_else(|| {
            let wanted = self.configured.as_ref().map_or(BINARY.into(), |p| p.display().to_string());
            CsiError::precondition(format!(
                "{wanted} was not found (set --nbd-client-bin, or install it next to csi-plugin or in PATH)"
            ))
        })
    }

    /// Attaches `volume` and returns its device.
    pub async fn map(&self, volume: &str, meta: &str, epoch: u64, readonly: bool) -> Result<PathBuf> {
        let epoch = epoch.to_string();
        let mut args = vec!["map", volume, "--meta", meta, "--epoch", &epoch];
        if readonly {
            args.push("--readonly");
        }
        let stdout = tools::run(&self.binary()?, args, MAP_LIMIT).await?;
        let device = stdout.lines().map(str::trim).rfind(|l| !l.is_empty()).unwrap_or_default();
        if !device.starts_with('/') {
            return Err(CsiError::Tool {
                tool: BINARY.into(),
                detail: format!("map printed {device:?}, not a device path"),
            });
        }
        Ok(PathBuf::from(device))
    }

    /// Detaches a volume (by id or device); detaching what is not attached
    /// succeeds.
    pub async fn unmap(&self, volume_or_device: &str) -> Result<()> {
        tools::run(&self.binary()?, ["unmap", volume_or_device], UNMAP_LIMIT).await?;
        Ok(())
    }

    pub async fn list(&self) -> Result<Vec<Mapping>> {
        let stdout = tools::run(&self.binary()?, ["list", "-o", "json"], LIST_LIMIT).await?;
        parse_list(&stdout)
    }

    /// The mapping of `volume`, if attached.
    pub async fn find(&self, volume: &str) -> Result<Option<Mapping>> {
        Ok(self.list().await?.into_iter().find(|m| m.volume == volume))
    }
}

pub fn parse_list(json: &str) -> Result<Vec<Mapping>> {
    if json.trim().is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str(json)
        .map_err(|e| CsiError::Tool { tool: BINARY.into(), detail: format!("list printed invalid JSON: {e}") })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_output() {
        let list = parse_list(r#"[{"volume": "vol-1a", "device": "/dev/nbd0", "pid": 42}]"#).unwrap();
        assert_eq!(list, vec![Mapping { volume: "vol-1a".into(), device: "/dev/nbd0".into(), pid: 42 }]);
        assert!(parse_list("").unwrap().is_empty());
        assert!(parse_list("[]").unwrap().is_empty());
        assert!(parse_list("nope").is_err());
    }

    #[test]
    fn a_missing_binary_is_a_failed_precondition() {
        let client = NbdClient::new(Some("/nonexistent/nbd-client".into()));
        assert!(matches!(client.binary(), Err(CsiError::FailedPrecondition(_))));
    }

    #[tokio::test]
    async fn map_reads_the_device_from_stdout() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("nbd-client");
        let log = dir.path().join("args");
        std::fs::write(&fake, format!("#!/bin/sh\necho \"$@\" > {}\necho /dev/nbd7\n", log.display())).unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let client = NbdClient::new(Some(fake));
        let device = client.map("vol-1", "a:1,b:2", 7, true).await.unwrap();
        assert_eq!(device, PathBuf::from("/dev/nbd7"));
        let args = std::fs::read_to_string(log).unwrap();
        assert_eq!(args.trim(), "map vol-1 --meta a:1,b:2 --epoch 7 --readonly");
    }
}
