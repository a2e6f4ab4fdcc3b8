//! The external programs the node service drives: a runner with a time
//! limit, and blkid, mkfs, e2fsck, resize2fs and xfs_growfs on top of it;
//! the size an ext4 superblock records.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::error::{CsiError, Result};
use crate::params::FsType;

/// Runs `program args...`, returning its stdout. A non-zero exit or a run
/// longer than `limit` is an error naming the tool and its stderr.
pub async fn run<I, S>(program: &Path, args: I, limit: Duration) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let output = run_status(program, args, limit).await?;
    if output.status.success() {
        return Ok(output.stdout);
    }
    Err(failure(program, &output))
}

/// Like [`run`], with `input` written to the program's stdin (a secret
/// that must not appear in its arguments).
pub async fn run_with_input<I, S>(program: &Path, args: I, input: &[u8], limit: Duration) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let output = execute(program, args, Some(input), limit).await?;
    if output.status.success() {
        return Ok(output.stdout);
    }
    Err(failure(program, &output))
}

/// Like [`run`], but hands back the exit status instead of judging it.
pub async fn run_status<I, S>(program: &Path, args: I, limit: Duration) -> Result<Finished>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    execute(program, args, None, limit).await
}

async fn execute<I, S>(program: &Path, args: I, input: Option<&[u8]>, limit: Duration) -> Result<Finished>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    use tokio::io::AsyncWriteExt;
    let tool = tool_name(program);
    let failed = |detail: String| CsiError::Tool { tool: tool.clone(), detail };
    let mut command = Command::new(program);
    let stdin = if input.is_some() { Stdio::piped() } else { Stdio::null() };
    command.args(args).stdin(stdin).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    tracing::debug!(tool, "running");
    let mut child = command.spawn().map_err(|e| failed(e.to_string()))?;
    let run = async {
        if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin.write_all(input).await?;
            // Closing stdin is the end of the input.
            drop(stdin);
        }
        child.wait_with_output().await
    };
    let output = tokio::time::timeout(limit, run)
        .await
        .map_err(|_| failed(format!("no answer within {limit:?}")))?
        .map_err(|e| failed(e.to_string()))?;
    Ok(Finished {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

pub struct Finished {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

pub fn failure(program: &Path, output: &Finished) -> CsiError {
    let stderr = output.stderr.trim();
    let detail = match output.status.code() {
        Some(code) if stderr.is_empty() => format!("exit status {code}"),
        Some(code) => format!("exit status {code}: {stderr}"),
        None => format!("killed by a signal: {stderr}"),
    };
    CsiError::Tool { tool: tool_name(program), detail }
}

fn tool_name(program: &Path) -> String {
    program.file_name().unwrap_or(program.as_os_str()).to_string_lossy().into_owned()
}

/// Finds `name` in `PATH` (plus the sbin directories, which a container's
/// PATH may lack).
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn tool(name: &str) -> Result<PathBuf> {
    which(name).ok_or_else(|| CsiError::precondition(format!("{name} is not installed on this node")))
}

const PROBE_LIMIT: Duration = Duration::from_secs(30);
const MKFS_LIMIT: Duration = Duration::from_secs(600);
const RESIZE_LIMIT: Duration = Duration::from_secs(600);

/// What `blkid -p` finds on a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    /// No signature at all: safe to format.
    Blank,
    Filesystem(String),
    /// A partition table or another non-filesystem signature: never format.
    Other(String),
}

/// Probes `device` with `blkid -p` (low-level, bypassing the cache).
pub async fn probe_content(device: &Path) -> Result<Content> {
    let blkid = tool("blkid")?;
    let output =
        run_status(&blkid, [OsStr::new("-p"), OsStr::new("-o"), OsStr::new("export"), device.as_os_str()], PROBE_LIMIT)
            .await?;
    match output.status.code() {
        // 2: nothing was found.
        Some(2) => Ok(Content::Blank),
        Some(0) => Ok(parse_blkid(&output.stdout)),
        _ => Err(failure(&blkid, &output)),
    }
}

pub fn parse_blkid(export: &str) -> Content {
    let mut fs_type = None;
    let mut usage = None;
    let mut pt_type = None;
    for line in export.lines() {
        match line.split_once('=') {
            Some(("TYPE", v)) => fs_type = Some(v.to_string()),
            Some(("USAGE", v)) => usage = Some(v.to_string()),
            Some(("PTTYPE", v)) => pt_type = Some(v.to_string()),
            _ => {}
        }
    }
    match (fs_type, usage.as_deref(), pt_type) {
        (Some(t), Some("filesystem") | None, None) => Content::Filesystem(t),
        (Some(t), Some(usage), _) => Content::Other(format!("{t} ({usage})")),
        (Some(t), None, Some(pt)) => Content::Other(format!("{t}, partition table {pt}")),
        (None, _, Some(pt)) => Content::Other(format!("partition table {pt}")),
        (None, _, None) => Content::Other("an unrecognised signature".to_string()),
    }
}

/// Creates a filesystem on a blank device. No discard: a new Ballast
/// volume is thin and already reads as zeros.
pub async fn mkfs(device: &Path, fs: FsType) -> Result<()> {
    let (program, args): (&str, &[&str]) = match fs {
        FsType::Ext4 => ("mkfs.ext4", &["-F", "-q", "-E", "nodiscard"]),
        FsType::Xfs => ("mkfs.xfs", &["-f", "-q", "-K"]),
    };
    let program = tool(program)?;
    let mut argv: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    argv.push(device.as_os_str());
    run(&program, argv, MKFS_LIMIT).await?;
    Ok(())
}

/// Grows the filesystem on `device` (mounted at `mount_point`) to fill it.
pub async fn grow_filesystem(device: &Path, mount_point: &Path, fs: FsType) -> Result<()> {
    match fs {
        FsType::Ext4 => run(&tool("resize2fs")?, [device.as_os_str()], RESIZE_LIMIT).await?,
        FsType::Xfs => run(&tool("xfs_growfs")?, [mount_point.as_os_str()], RESIZE_LIMIT).await?,
    };
    Ok(())
}

/// The size in bytes of the ext4 filesystem on `device`, read from its
/// superblock (no tool needed: a node may have resize2fs but not dumpe2fs).
pub fn ext4_size(device: &Path) -> Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut superblock = [0u8; 1024];
    std::fs::File::open(device)
        .and_then(|f| f.read_exact_at(&mut superblock, 1024))
        .map_err(|e| CsiError::io("reading the ext4 superblock of", device, e))?;
    parse_ext4_size(&superblock)
        .ok_or_else(|| CsiError::precondition(format!("{} holds no ext4 superblock", device.display())))
}

/// An ext4 superblock's block count times its block size.
fn parse_ext4_size(superblock: &[u8; 1024]) -> Option<u64> {
    const MAGIC: u16 = 0xEF53;
    const INCOMPAT_64BIT: u32 = 0x80;
    let u32_at = |at: usize| u32::from_le_bytes(superblock[at..at + 4].try_into().expect("4 bytes"));
    if u16::from_le_bytes([superblock[0x38], superblock[0x39]]) != MAGIC {
        return None;
    }
    let high = if u32_at(0x60) & INCOMPAT_64BIT != 0 { u64::from(u32_at(0x150)) } else { 0 };
    let blocks = high << 32 | u64::from(u32_at(0x04));
    let block_size = 1024u64.checked_shl(u32_at(0x18))?;
    blocks.checked_mul(block_size)
}

/// Grows the unmounted ext4 filesystem on `device` to fill it. resize2fs
/// works on an unmounted filesystem only after a full check; unlike
/// growing a mounted one, this needs no CAP_SYS_RESOURCE.
pub async fn grow_unmounted_ext4(device: &Path) -> Result<()> {
    let e2fsck = tool("e2fsck")?;
    let checked = run_status(&e2fsck, [OsStr::new("-f"), OsStr::new("-p"), device.as_os_str()], RESIZE_LIMIT).await?;
    // 0: clean; 1: errors corrected. Anything else needs a person.
    if !matches!(checked.status.code(), Some(0 | 1)) {
        return Err(failure(&e2fsck, &checked));
    }
    run(&tool("resize2fs")?, [device.as_os_str()], RESIZE_LIMIT).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blkid_output() {
        let ext4 = "DEVNAME=/dev/loop0\nUUID=ae0d\nVERSION=1.0\nBLOCK_SIZE=1024\nTYPE=ext4\nUSAGE=filesystem\n";
        assert_eq!(parse_blkid(ext4), Content::Filesystem("ext4".into()));
        let gpt = "DEVNAME=/dev/loop0\nPTUUID=1234\nPTTYPE=gpt\n";
        assert!(matches!(parse_blkid(gpt), Content::Other(_)));
        let luks = "DEVNAME=/dev/loop0\nTYPE=crypto_LUKS\nUSAGE=crypto\n";
        assert!(matches!(parse_blkid(luks), Content::Other(_)));
    }

    #[test]
    fn ext4_superblock_sizes() {
        let mut superblock = [0u8; 1024];
        assert_eq!(parse_ext4_size(&superblock), None, "no magic, no ext4");
        superblock[0x38..0x3a].copy_from_slice(&0xEF53u16.to_le_bytes());
        superblock[0x04..0x08].copy_from_slice(&262_144u32.to_le_bytes());
        superblock[0x18..0x1c].copy_from_slice(&2u32.to_le_bytes()); // 1024 << 2
        assert_eq!(parse_ext4_size(&superblock), Some(1 << 30));
        // 64-bit block counts: the high half counts only with the feature.
        superblock[0x150..0x154].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(parse_ext4_size(&superblock), Some(1 << 30));
        superblock[0x60..0x64].copy_from_slice(&0x80u32.to_le_bytes());
        assert_eq!(parse_ext4_size(&superblock), Some(((1u64 << 32) + 262_144) * 4096));
    }

    #[tokio::test]
    async fn runner_reports_the_tool_and_its_stderr() {
        let sh = which("sh").unwrap();
        assert_eq!(run(&sh, ["-c", "echo hi"], Duration::from_secs(5)).await.unwrap(), "hi\n");
        let err = run(&sh, ["-c", "echo bad >&2; exit 3"], Duration::from_secs(5)).await.unwrap_err();
        assert_eq!(err.to_string(), "sh failed: exit status 3: bad");
        let err = run(&sh, ["-c", "sleep 5"], Duration::from_millis(100)).await.unwrap_err();
        assert!(err.to_string().contains("no answer"), "{err}");
    }
}
