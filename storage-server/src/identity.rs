//! The server's stable identity: given on the command line, or generated on
//! first start and kept in the data directory.

use std::io::{self, Write};
use std::path::Path;

const FILE: &str = "server-id";

/// Returns `explicit` if given, else the id stored in `data_dir`, creating
/// and durably storing a random one on first start.
pub fn load_or_create(data_dir: &Path, explicit: Option<&str>) -> io::Result<String> {
    let path = data_dir.join(FILE);
    let stored = match std::fs::read_to_string(&path) {
        Ok(id) => Some(id.trim().to_string()).filter(|id| !id.is_empty()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    match (explicit, stored) {
        (Some(id), Some(stored)) if id != stored => {
            tracing::warn!(%id, %stored, "--server-id differs from the id stored in the data directory");
            Ok(id.to_string())
        }
        (Some(id), _) => Ok(id.to_string()),
        (None, Some(stored)) => Ok(stored),
        (None, None) => {
            let id = format!("ss-{:016x}", rand::random::<u64>());
            let tmp = data_dir.join(format!("{FILE}.tmp"));
            let mut file = std::fs::File::create(&tmp)?;
            writeln!(file, "{id}")?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(data_dir)?.sync_all()?;
            Ok(id)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_id_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let id = load_or_create(dir.path(), None).unwrap();
        assert!(id.starts_with("ss-"));
        assert_eq!(load_or_create(dir.path(), None).unwrap(), id);
        assert_eq!(load_or_create(dir.path(), Some("x")).unwrap(), "x");
    }
}
