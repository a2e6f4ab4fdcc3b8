//! Attaching volumes through the `nbd-client` binary. The serving process
//! it leaves behind is not ours: restarting the plugin never touches an
//! attached device.
//!
//! The contract (`--state-dir DIR` is added to every command when the
//! plugin has `--nbd-state-dir`; otherwise `nbd-client` uses its own
//! default, `/run/ballast/nbd`):
//! - `nbd-client map VOLUME_ID --meta LIST --epoch N [--readonly]` prints the
//!   device path and exits 0, leaving a serving process in the background;
//! - `nbd-client unmap VOLUME_ID_OR_DEVICE` exits 0, also when not mapped,
//!   and refuses while the device holds a mounted filesystem;
//! - `nbd-client resize VOLUME_ID --meta LIST` grows the mapped device to the
//!   volume's size in metadata and prints the device's size in bytes;
//! - `nbd-client list -o json` prints
//!   `[{"volume": .., "device": .., "pid": .., "served": ..}, ...]`.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use ballast_telemetry::LogFormat;
use clap::ValueEnum;
use serde::Deserialize;

use crate::error::{CsiError, Result};
use crate::node::tools;

const BINARY: &str = "nbd-client";
const MAP_LIMIT: Duration = Duration::from_secs(120);
const UNMAP_LIMIT: Duration = Duration::from_secs(120);
const LIST_LIMIT: Duration = Duration::from_secs(30);
const RESIZE_LIMIT: Duration = Duration::from_secs(60);
const PROBE_LIMIT: Duration = Duration::from_secs(30);

/// One attached volume, as `nbd-client list` reports it.
pub use nbd_records::mapping::Listed as Mapping;

/// How `nbd-client probe` says devices attach on this host.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct AttachProbe {
    /// `netlink`, `ioctl` or `fuse-loop`; none when nothing works.
    pub method: Option<String>,
    pub reason: String,
    /// What `modprobe nbd` said, when it was tried.
    #[serde(default)]
    pub module: Option<String>,
    /// Kernel features (`nbd`, `fuse`, `io_uring`): null when one works,
    /// else why not.
    #[serde(default)]
    pub missing: std::collections::BTreeMap<String, Option<String>>,
}

#[derive(Clone, Debug)]
pub struct NbdClient {
    /// `--nbd-client-bin`, if given.
    configured: Option<PathBuf>,
    /// `--nbd-state-dir`, passed on as `nbd-client --state-dir`.
    state_dir: Option<PathBuf>,
    /// The plugin's own log format, which the serving processes then use
    /// too: their logs are relayed into the plugin's.
    log_format: LogFormat,
    /// The node's certificate directory, passed on as `--tls-dir`.
    tls_dir: Option<PathBuf>,
}

impl NbdClient {
    pub fn new(configured: Option<PathBuf>, state_dir: Option<PathBuf>, log_format: LogFormat) -> Self {
        Self { configured, state_dir, log_format, tls_dir: None }
    }

    /// Serving processes reach the cluster with the certificate in `dir`.
    pub fn with_tls_dir(self, tls_dir: Option<PathBuf>) -> Self {
        Self { tls_dir, ..self }
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

    /// Where `nbd-client` keeps its records and the serving processes' logs.
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir.clone().unwrap_or_else(|| PathBuf::from(nbd_records::mapping::DEFAULT_STATE_DIR))
    }

    /// `--state-dir DIR`, when configured.
    fn state_args(&self) -> Vec<OsString> {
        match &self.state_dir {
            Some(dir) => vec!["--state-dir".into(), dir.clone().into_os_string()],
            None => Vec::new(),
        }
    }

    /// `--meta META`, and `--tls-dir DIR` when configured.
    fn meta_args(&self, meta: &str) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["--meta".into(), meta.into()];
        if let Some(dir) = &self.tls_dir {
            args.extend(["--tls-dir".into(), dir.clone().into_os_string()]);
        }
        args
    }

    /// The arguments of `nbd-client map`.
    pub fn map_args(&self, volume: &str, meta: &str, epoch: u64, readonly: bool) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["map".into(), volume.into()];
        args.extend(self.meta_args(meta));
        args.extend(["--epoch".into(), epoch.to_string().into()]);
        if readonly {
            args.push("--readonly".into());
        }
        if self.log_format != LogFormat::default() {
            let format = self.log_format.to_possible_value().expect("named");
            args.extend(["--log-format".into(), format.get_name().into()]);
        }
        args.extend(self.state_args());
        args
    }

    /// Attaches `volume` and returns its device.
    pub async fn map(&self, volume: &str, meta: &str, epoch: u64, readonly: bool) -> Result<PathBuf> {
        let stdout = tools::run(&self.binary()?, self.map_args(volume, meta, epoch, readonly), MAP_LIMIT).await?;
        parse_device(&stdout)
    }

    /// Detaches a volume (by id or device); detaching what is not attached
    /// succeeds.
    pub async fn unmap(&self, volume_or_device: &str) -> Result<()> {
        let mut args: Vec<OsString> = vec!["unmap".into(), volume_or_device.into()];
        args.extend(self.state_args());
        tools::run(&self.binary()?, args, UNMAP_LIMIT).await?;
        Ok(())
    }

    /// Grows the device of a mapped volume to the volume's size in
    /// metadata; returns the device's size in bytes.
    pub async fn resize(&self, volume: &str, meta: &str) -> Result<u64> {
        let mut args: Vec<OsString> = vec!["resize".into(), volume.into()];
        args.extend(self.meta_args(meta));
        args.extend(self.state_args());
        let stdout = tools::run(&self.binary()?, args, RESIZE_LIMIT).await?;
        stdout.trim().parse().map_err(|_| CsiError::Tool {
            tool: BINARY.into(),
            detail: format!("resize printed {:?}, not a size in bytes", stdout.trim()),
        })
    }

    pub async fn list(&self) -> Result<Vec<Mapping>> {
        let mut args: Vec<OsString> = vec!["list".into(), "-o".into(), "json".into()];
        args.extend(self.state_args());
        let stdout = tools::run(&self.binary()?, args, LIST_LIMIT).await?;
        parse_list(&stdout)
    }

    /// How devices attach on this host, loading the nbd driver if it can.
    /// A host where nothing works is an answer too (`method` is `None`).
    pub async fn probe(&self) -> Result<AttachProbe> {
        let args: Vec<OsString> = ["probe", "--load-module", "-o", "json"].into_iter().map(OsString::from).collect();
        let binary = self.binary()?;
        // It exits 1 when nothing works, still printing its answer.
        let output = tools::run_status(&binary, args, PROBE_LIMIT).await?;
        if output.stdout.trim().is_empty() {
            return Err(tools::failure(&binary, &output));
        }
        serde_json::from_str(output.stdout.trim())
            .map_err(|e| CsiError::Tool { tool: BINARY.into(), detail: format!("probe printed invalid JSON: {e}") })
    }

    /// The mapping of `volume`, if attached.
    pub async fn find(&self, volume: &str) -> Result<Option<Mapping>> {
        Ok(self.list().await?.into_iter().find(|m| m.volume == volume))
    }
}

/// The device `map` printed: its last non-empty line.
pub fn parse_device(stdout: &str) -> Result<PathBuf> {
    let device = stdout.lines().map(str::trim).rfind(|l| !l.is_empty()).unwrap_or_default();
    if !device.starts_with('/') {
        return Err(CsiError::Tool {
            tool: BINARY.into(),
            detail: format!("map printed {device:?}, not a device path"),
        });
    }
    Ok(PathBuf::from(device))
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
        assert_eq!(
            list,
            vec![Mapping { volume: "vol-1a".into(), device: "/dev/nbd0".into(), pid: 42, ..Mapping::default() }]
        );
        // What nbd-client prints today, extra fields and all.
        let real = r#"[{"device":"/dev/loop0","epoch":1,"method":"fuse-loop","name":"t1","pid":4730,"served":false,"volume":"vol-8"}]"#;
        let list = parse_list(real).unwrap();
        assert_eq!((list[0].volume.as_str(), list[0].served), ("vol-8", Some(false)));
        assert_eq!(list[0].method.as_deref(), Some("fuse-loop"));
        assert!(!list[0].is_served(), "nbd-client says its process is gone");
        assert!(parse_list("").unwrap().is_empty());
        assert!(parse_list("[]").unwrap().is_empty());
        assert!(parse_list("nope").is_err());
    }

    #[test]
    fn a_missing_binary_is_a_failed_precondition() {
        let client = NbdClient::new(Some("/nonexistent/nbd-client".into()), None, LogFormat::Human);
        assert!(matches!(client.binary(), Err(CsiError::FailedPrecondition(_))));
    }

    #[test]
    fn map_arguments_and_its_device() {
        let plain = NbdClient::new(None, None, LogFormat::Human);
        assert_eq!(
            plain.map_args("vol-1", "a:1,b:2", 7, true),
            ["map", "vol-1", "--meta", "a:1,b:2", "--epoch", "7", "--readonly"]
        );
        let private = NbdClient::new(None, Some("/run/test/nbd".into()), LogFormat::Json);
        assert_eq!(
            private.map_args("vol-1", "a:1", 3, false),
            ["map", "vol-1", "--meta", "a:1", "--epoch", "3", "--log-format", "json", "--state-dir", "/run/test/nbd"]
        );
        let secured = NbdClient::new(None, None, LogFormat::Human).with_tls_dir(Some("/etc/ballast/tls".into()));
        assert_eq!(
            secured.map_args("vol-1", "a:1", 3, false),
            ["map", "vol-1", "--meta", "a:1", "--tls-dir", "/etc/ballast/tls", "--epoch", "3"]
        );
        assert_eq!(parse_device("/dev/loop3\n").unwrap(), PathBuf::from("/dev/loop3"));
        assert_eq!(parse_device("attaching\n/dev/nbd7\n\n").unwrap(), PathBuf::from("/dev/nbd7"));
        assert!(parse_device("").is_err());
        assert!(parse_device("loop3").is_err());
    }
}
