//! What `/proc/self/mountinfo` says is mounted, parsed once for the node
//! plugin and `nbd-client unmap` alike (paths with their octal escapes
//! undone: `\040` is a space).

use std::path::PathBuf;

/// One line of `/proc/self/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    /// Device number of the mounted filesystem (`major:minor`).
    pub major: u64,
    pub minor: u64,
    /// The directory of that filesystem which is mounted here.
    pub root: String,
    pub mount_point: PathBuf,
    /// Per-mount options (`rw`, `ro`, `noatime`, ...).
    pub options: Vec<String>,
    pub fs_type: String,
    pub source: String,
}

impl MountEntry {
    pub fn read_only(&self) -> bool {
        self.options.iter().any(|o| o == "ro")
    }
}

/// Undoes the octal escapes (`\040` for a space) of mountinfo paths.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            let value = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<MountEntry> {
    // id parent major:minor root mount_point options [optional...] - fstype source super_options
    let (before, after) = line.split_once(" - ")?;
    let fields: Vec<&str> = before.split(' ').collect();
    if fields.len() < 6 {
        return None;
    }
    let (major, minor) = fields[2].split_once(':')?;
    let mut tail = after.split(' ');
    let fs_type = tail.next()?.to_string();
    let source = unescape(tail.next().unwrap_or_default());
    Some(MountEntry {
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
        root: unescape(fields[3]),
        mount_point: PathBuf::from(unescape(fields[4])),
        options: fields[5].split(',').map(String::from).collect(),
        fs_type,
        source,
    })
}

/// The mount table of this process.
pub fn read() -> std::io::Result<Vec<MountEntry>> {
    Ok(parse_mountinfo(&std::fs::read_to_string("/proc/self/mountinfo")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
42 27 7:0 / /var/lib/kubelet/plugins/kubernetes.io/csi/csi.ballast.io/abc/globalmount rw,relatime shared:5 - ext4 /dev/loop0 rw
43 27 7:0 / /var/lib/kubelet/pods/p/volumes/kubernetes.io~csi/pvc-1/mount ro,relatime shared:5 - ext4 /dev/loop0 rw
44 27 0:6 /nbd3 /var/lib/kubelet/pods/p/volumeDevices/x/pvc\\0402 rw,nosuid - devtmpfs udev rw
";

    #[test]
    fn mountinfo_lines() {
        let table = parse_mountinfo(SAMPLE);
        assert_eq!(table.len(), 4);
        assert_eq!((table[1].major, table[1].minor), (7, 0));
        assert_eq!(table[1].fs_type, "ext4");
        assert_eq!(table[1].source, "/dev/loop0");
        assert!(!table[1].read_only());
        assert!(table[2].read_only());
        assert_eq!(table[3].root, "/nbd3");
        assert_eq!(table[3].mount_point, PathBuf::from("/var/lib/kubelet/pods/p/volumeDevices/x/pvc 2"));
    }
}
