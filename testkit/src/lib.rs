//! What Ballast's system tests need from the machine (root, device nodes,
//! external tools), checked in one place; network namespaces for the
//! tests that cut the network ([`netns`]); reading metrics ([`metrics`]);
//! a local metadata cluster of real members ([`meta_cluster`]); a process
//! held to a share of a CPU ([`cpu_limit`]).
//!
//! A test starts with `if !ballast_testkit::machine_has(&[...]) { return; }`.
//! What happens when something is missing depends on `BALLAST_SYSTEM_TESTS`,
//! which `make test` sets:
//! - `required` (`make test`): the test fails and names what is missing, so
//!   a green run never hides untested parts;
//! - anything else (`SKIP_SYSTEM_TESTS=1 make test`, or a bare `cargo
//!   test`): the test returns early, and when `BALLAST_SKIP_LOG` names a
//!   file the skip is appended to it (`test<TAB>missing`) for the run's
//!   summary.

pub mod cpu_limit;
pub mod meta_cluster;
pub mod metrics;
pub mod netns;

use std::io::Write;
use std::path::Path;

/// What a test can ask for.
pub const ROOT: &str = "root";

/// Whether the machine has every item of `needs`: [`ROOT`], a device or
/// file path (starting with `/`), or a command looked up on `PATH`.
/// Missing items fail the test under `BALLAST_SYSTEM_TESTS=required`,
/// and are logged as a skip otherwise.
pub fn machine_has(needs: &[&str]) -> bool {
    let missing: Vec<&str> = needs.iter().copied().filter(|need| !present(need)).collect();
    if missing.is_empty() {
        return true;
    }
    let test = std::thread::current().name().unwrap_or("unnamed test").to_owned();
    let missing = missing.join(", ");
    if std::env::var("BALLAST_SYSTEM_TESTS").as_deref() == Ok("required") {
        panic!("{test} needs {missing} (make deps installs the tools; the system tests run as root)");
    }
    eprintln!("SKIP {test}: needs {missing}");
    if let Some(log) = std::env::var_os("BALLAST_SKIP_LOG") {
        // One short line per skip: concurrent appends from test threads do not interleave.
        let line = format!("{test}\t{missing}\n");
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut file| file.write_all(line.as_bytes()));
        if let Err(e) = appended {
            eprintln!("cannot record the skip in {}: {e}", Path::new(&log).display());
        }
    }
    false
}

fn present(need: &str) -> bool {
    if need == ROOT {
        // SAFETY: geteuid has no preconditions and cannot fail.
        return unsafe { libc::geteuid() } == 0;
    }
    if need.starts_with('/') {
        return Path::new(need).exists();
    }
    std::env::var_os("PATH").is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(need).is_file()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_commands_paths_and_reports_what_is_absent() {
        assert!(present("sh"));
        assert!(present("/"));
        assert!(!present("/nonexistent/ballast-device"));
        assert!(!present("ballast-no-such-tool"));
    }
}
