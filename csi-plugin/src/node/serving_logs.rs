//! The serving processes' logs, relayed into the node plugin's stderr so
//! that `kubectl logs` on the node plugin shows them. Each serving process
//! appends to its own file in nbd-client's state directory (the file
//! outlives the process, and the container that started it); the relay
//! follows every such file and passes complete lines on unchanged.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

const POLL: Duration = Duration::from_secs(1);
/// At startup, how much of each existing log is shown again: the recent
/// history of the volumes already attached, not all of it after every
/// restart of the plugin.
const REPLAY: u64 = 16 * 1024;

/// Follows the `*.log` files in `dir`.
pub struct Relay {
    dir: PathBuf,
    /// How far each file has been passed on.
    offsets: HashMap<PathBuf, u64>,
    started: bool,
}

impl Relay {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir, offsets: HashMap::new(), started: false }
    }

    /// Relays forever on a thread of its own (plain blocking file reads).
    pub fn spawn(mut self) -> io::Result<()> {
        std::thread::Builder::new().name("serving-logs".into()).spawn(move || loop {
            if let Err(err) = self.pass(&mut io::stderr()) {
                tracing::debug!(dir = %self.dir.display(), "relaying the serving processes' logs: {err}");
            }
            std::thread::sleep(POLL);
        })?;
        Ok(())
    }

    /// Writes to `out` the complete lines added to each log since the
    /// last pass.
    pub fn pass(&mut self, out: &mut impl Write) -> io::Result<()> {
        let first = !std::mem::replace(&mut self.started, true);
        let mut seen = HashSet::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let path = entry.path();
            if path.extension().is_none_or(|ext| ext != "log") {
                continue;
            }
            let offset = *self.offsets.entry(path.clone()).or_insert(if first { u64::MAX } else { 0 });
            // Logs accumulate, one per volume ever attached here, and most
            // are quiet: an unchanged length needs no open and no read.
            if entry.metadata().is_ok_and(|meta| meta.len() == offset) {
                seen.insert(path);
                continue;
            }
            match follow(&path, offset, out) {
                Ok(next) => {
                    self.offsets.insert(path.clone(), next);
                }
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => return Err(err),
            }
            seen.insert(path);
        }
        self.offsets.retain(|path, _| seen.contains(path));
        Ok(())
    }
}

/// Passes on the complete lines of `path` after `offset` (`u64::MAX`: the
/// file was there at startup, replay its tail) and returns the new offset.
fn follow(path: &Path, offset: u64, out: &mut impl Write) -> io::Result<u64> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let (start, skip_partial) = match offset {
        u64::MAX => (len.saturating_sub(REPLAY), len > REPLAY),
        // Shorter than what was read: truncated, start again.
        offset if offset > len => (0, false),
        offset => (offset, false),
    };
    if start == len {
        return Ok(len);
    }
    file.seek(SeekFrom::Start(start))?;
    let mut added = Vec::with_capacity((len - start) as usize);
    file.take(len - start).read_to_end(&mut added)?;
    // A replayed tail starts in the middle of a line: drop that part.
    let begin = if skip_partial { added.iter().position(|&b| b == b'\n').map_or(added.len(), |i| i + 1) } else { 0 };
    // A line still being written waits for the next pass.
    let end = added.iter().rposition(|&b| b == b'\n').map_or(begin, |i| i + 1).max(begin);
    out.write_all(&added[begin..end])?;
    out.flush()?;
    Ok(start + end as u64)
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;

    use super::*;

    fn append(path: &Path, text: &str) {
        OpenOptions::new().create(true).append(true).open(path).unwrap().write_all(text.as_bytes()).unwrap();
    }

    fn pass(relay: &mut Relay) -> String {
        let mut out = Vec::new();
        relay.pass(&mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn passes_on_complete_lines_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut relay = Relay::new(dir.path().to_path_buf());
        assert_eq!(pass(&mut relay), "");
        let log = dir.path().join("vol-1.log");
        append(&log, "attached\nserving");
        append(&dir.path().join("vol-1.json"), "not a log\n");
        assert_eq!(pass(&mut relay), "attached\n");
        append(&log, " the volume\n");
        assert_eq!(pass(&mut relay), "serving the volume\n");
        assert_eq!(pass(&mut relay), "");
    }

    #[test]
    fn replays_only_the_tail_of_logs_found_at_startup() {
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short.log");
        append(&short, "one\ntwo\n");
        let long = dir.path().join("long.log");
        let old = "old line\n".repeat(REPLAY as usize / 9 + 10);
        append(&long, &format!("{old}last\n"));
        let mut relay = Relay::new(dir.path().to_path_buf());
        let replayed = pass(&mut relay);
        assert!(replayed.contains("one\ntwo\n"), "{replayed}");
        assert!(replayed.ends_with("last\n") || replayed.contains("last\n"), "{replayed}");
        assert!(replayed.len() < REPLAY as usize + 16, "replayed {} bytes", replayed.len());
        assert!(replayed.lines().all(|l| ["one", "two", "old line", "last"].contains(&l)), "{replayed}");
    }

    #[test]
    fn starts_again_after_truncation_and_forgets_removed_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut relay = Relay::new(dir.path().to_path_buf());
        pass(&mut relay);
        let log = dir.path().join("vol-2.log");
        append(&log, "first process, a long line\n");
        assert_eq!(pass(&mut relay), "first process, a long line\n");
        std::fs::write(&log, "new\n").unwrap();
        assert_eq!(pass(&mut relay), "new\n");
        std::fs::remove_file(&log).unwrap();
        pass(&mut relay);
        assert!(relay.offsets.is_empty());
    }
}
