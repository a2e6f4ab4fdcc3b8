//! The server's stable identity: its id, given on the command line or
//! generated on first start, and the metadata cluster its data belongs to,
//! learnt at its first registration, with the key that cluster signs
//! capabilities with. All are kept in the data directory.

use std::io;
use std::path::Path;

const FILE: &str = "server-id";
const CLUSTER_FILE: &str = "cluster-id";
const CAPABILITY_KEY_FILE: &str = "capability-key";

/// Returns `explicit` if given, else the id stored in `data_dir`, creating
/// and durably storing a random one on first start.
pub fn load_or_create(data_dir: &Path, explicit: Option<&str>) -> io::Result<String> {
    match (explicit, stored(data_dir)?) {
        (Some(id), Some(stored)) if id != stored => {
            tracing::warn!(%id, %stored, "--server-id differs from the id stored in the data directory");
            Ok(id.to_string())
        }
        (Some(id), _) => Ok(id.to_string()),
        (None, Some(stored)) => Ok(stored),
        (None, None) => {
            let id = format!("ss-{:016x}", rand::random::<u64>());
            write_durably(data_dir, FILE, &id)?;
            Ok(id)
        }
    }
}

/// The id of a server that presents a certificate: the name the
/// certificate gives it. A `--server-id` or a data directory that says
/// otherwise is refused (the chunks here belong to that other server).
pub fn for_certificate(data_dir: &Path, explicit: Option<&str>, certified: &str) -> io::Result<String> {
    if let Some(id) = explicit.filter(|id| *id != certified) {
        return Err(io::Error::other(format!(
            "--server-id is {id:?} but the certificate names {certified:?}; issue a certificate for {id:?}"
        )));
    }
    match stored(data_dir)? {
        Some(stored) if stored != certified => Err(io::Error::other(format!(
            "this data directory belongs to chunk server {stored:?} but the certificate names {certified:?}; \
             issue a certificate for {stored:?}"
        ))),
        Some(_) => Ok(certified.to_string()),
        None => {
            write_durably(data_dir, FILE, certified)?;
            Ok(certified.to_string())
        }
    }
}

fn stored(data_dir: &Path) -> io::Result<Option<String>> {
    match std::fs::read_to_string(data_dir.join(FILE)) {
        Ok(id) => Ok(Some(id.trim().to_string()).filter(|id| !id.is_empty())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The metadata cluster this data directory belongs to, if it ever
/// registered with one.
pub fn cluster_id(data_dir: &Path) -> io::Result<Option<String>> {
    match std::fs::read_to_string(data_dir.join(CLUSTER_FILE)) {
        Ok(id) => Ok(Some(id.trim().to_string()).filter(|id| !id.is_empty())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Records the metadata cluster this data directory belongs to.
pub fn set_cluster_id(data_dir: &Path, id: &str) -> io::Result<()> {
    write_durably(data_dir, CLUSTER_FILE, id)
}

/// The public key the cluster signs capabilities with, as last learnt
/// from the metadata service: kept so that a restarted server checks
/// capabilities before it reaches the metadata service again.
pub fn capability_key(data_dir: &Path) -> io::Result<Option<Vec<u8>>> {
    let hex = match std::fs::read_to_string(data_dir.join(CAPABILITY_KEY_FILE)) {
        Ok(hex) => hex,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let hex = hex.trim();
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|at| hex.get(at..at + 2).and_then(|pair| u8::from_str_radix(pair, 16).ok()))
        .collect();
    bytes.map(Some).ok_or_else(|| io::Error::other(format!("{CAPABILITY_KEY_FILE} is not hexadecimal")))
}

pub fn set_capability_key(data_dir: &Path, key: &[u8]) -> io::Result<()> {
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    write_durably(data_dir, CAPABILITY_KEY_FILE, &hex)
}

/// Writes `DATA_DIR/name` whole or not at all, and durably.
fn write_durably(data_dir: &Path, name: &str, value: &str) -> io::Result<()> {
    crate::durable::replace(&data_dir.join(name), format!("{value}\n").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_capability_key_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(capability_key(dir.path()).unwrap(), None);
        set_capability_key(dir.path(), &[0, 1, 0xab, 0xff]).unwrap();
        assert_eq!(capability_key(dir.path()).unwrap(), Some(vec![0, 1, 0xab, 0xff]));
        std::fs::write(dir.path().join(CAPABILITY_KEY_FILE), "zz").unwrap();
        assert!(capability_key(dir.path()).is_err());
    }

    #[test]
    fn generated_id_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let id = load_or_create(dir.path(), None).unwrap();
        assert!(id.starts_with("ss-"));
        assert_eq!(load_or_create(dir.path(), None).unwrap(), id);
        assert_eq!(load_or_create(dir.path(), Some("x")).unwrap(), "x");
    }

    #[test]
    fn cluster_id_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(cluster_id(dir.path()).unwrap(), None);
        set_cluster_id(dir.path(), "c1").unwrap();
        assert_eq!(cluster_id(dir.path()).unwrap().as_deref(), Some("c1"));
    }
}
