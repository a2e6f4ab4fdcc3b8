//! What `/sys/block` tells about nbd devices: which are free, and which
//! backend a connected device serves.

use std::path::Path;
use std::time::Duration;

pub const SYS_BLOCK: &str = "/sys/block";

/// The lowest-numbered nbd device not connected: the driver creates
/// `nbdN/pid` while a device is in use.
pub fn first_free_nbd(sys_block: &Path) -> Option<u32> {
    nbd_indices(sys_block).into_iter().find(|index| !sys_block.join(format!("nbd{index}/pid")).exists())
}

/// The backend identifier a device was connected with (kernel ≥ 5.13 and
/// only when given at connect).
pub fn nbd_backend(sys_block: &Path, index: u32) -> Option<String> {
    let backend = std::fs::read_to_string(sys_block.join(format!("nbd{index}/backend"))).ok()?;
    let backend = backend.trim_end_matches('\n');
    (!backend.is_empty()).then(|| backend.to_owned())
}

/// The connected nbd device serving `backend`, e.g. to reconnect to it after
/// a restart.
pub fn find_nbd_by_backend(sys_block: &Path, backend: &str) -> Option<u32> {
    nbd_indices(sys_block).into_iter().find(|index| nbd_backend(sys_block, *index).as_deref() == Some(backend))
}

/// The size in bytes the kernel gives block device `name` (`nbd0`, `loop3`).
pub fn block_device_size(sys_block: &Path, name: &str) -> Option<u64> {
    let sectors = std::fs::read_to_string(sys_block.join(name).join("size")).ok()?;
    sectors.trim().parse::<u64>().ok().map(|s| s * 512)
}

/// Sets the block layer's request timeout of `/dev/nbdN` in milliseconds
/// (`queue/io_timeout`): netlink only takes whole seconds.
pub fn set_io_timeout(sys_block: &Path, index: u32, timeout: Duration) -> std::io::Result<()> {
    let millis = timeout.as_millis().max(1);
    std::fs::write(sys_block.join(format!("nbd{index}/queue/io_timeout")), format!("{millis}\n"))
}

/// The request timeout the block layer applies to `/dev/nbdN`.
pub fn io_timeout(sys_block: &Path, index: u32) -> Option<Duration> {
    let millis = std::fs::read_to_string(sys_block.join(format!("nbd{index}/queue/io_timeout"))).ok()?;
    millis.trim().parse().ok().map(Duration::from_millis)
}

fn nbd_indices(sys_block: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(sys_block) else {
        return Vec::new();
    };
    let mut indices: Vec<u32> =
        entries.flatten().filter_map(|entry| entry.file_name().to_str()?.strip_prefix("nbd")?.parse().ok()).collect();
    indices.sort_unstable();
    indices
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_device_and_backend_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for name in ["nbd0", "nbd1", "nbd10", "nbd2", "loop0"] {
            std::fs::create_dir(root.join(name)).unwrap();
        }
        std::fs::write(root.join("nbd0/pid"), "123\n").unwrap();
        std::fs::write(root.join("nbd0/backend"), "vol-a\n").unwrap();
        assert_eq!(first_free_nbd(root), Some(1));
        std::fs::write(root.join("nbd1/pid"), "123\n").unwrap();
        std::fs::write(root.join("nbd1/backend"), "\n").unwrap();
        std::fs::write(root.join("nbd2/pid"), "123\n").unwrap();
        std::fs::write(root.join("nbd2/backend"), "vol-b\n").unwrap();
        assert_eq!(first_free_nbd(root), Some(10));
        std::fs::write(root.join("nbd10/pid"), "123\n").unwrap();
        assert_eq!(first_free_nbd(root), None);
        assert_eq!(first_free_nbd(&root.join("missing")), None);

        assert_eq!(nbd_backend(root, 0).as_deref(), Some("vol-a"));
        assert_eq!(nbd_backend(root, 1), None);
        assert_eq!(find_nbd_by_backend(root, "vol-b"), Some(2));
        assert_eq!(find_nbd_by_backend(root, "vol-c"), None);

        std::fs::write(root.join("nbd2/size"), "4096\n").unwrap();
        assert_eq!(block_device_size(root, "nbd2"), Some(2 << 20));
        assert_eq!(block_device_size(root, "nbd1"), None);

        std::fs::create_dir(root.join("nbd2/queue")).unwrap();
        set_io_timeout(root, 2, Duration::from_millis(750)).unwrap();
        assert_eq!(io_timeout(root, 2), Some(Duration::from_millis(750)));
        assert!(set_io_timeout(root, 1, Duration::from_secs(1)).is_err(), "nbd1 has no queue directory");
    }
}
