//! Backend selection: where io_uring is blocked (as by the default seccomp
//! profiles of Docker and containerd), `auto` falls back to the thread pool
//! and says why, and `uring` refuses to start.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

/// Runs the server binary with `io_uring_setup(2)` failing with EPERM.
fn server_without_io_uring(data_dir: &std::path::Path, backend: &str) -> std::process::Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_storage-server"));
    cmd.args(["serve", "--insecure", "--listen", "127.0.0.1:0", "--scrub-rate", "0", "--io-backend", backend])
        .arg("--data-dir")
        .arg(data_dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: only async-signal-safe calls (prctl) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let mut filter = [
                // Load the syscall number.
                libc::sock_filter { code: 0x20, jt: 0, jf: 0, k: 0 },
                // io_uring_setup? fall through : skip the next instruction.
                libc::sock_filter { code: 0x15, jt: 0, jf: 1, k: libc::SYS_io_uring_setup as u32 },
                libc::sock_filter { code: 0x06, jt: 0, jf: 0, k: 0x0005_0000 | libc::EPERM as u32 },
                libc::sock_filter { code: 0x06, jt: 0, jf: 0, k: 0x7fff_0000 },
            ];
            let prog = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_mut_ptr() };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(libc::PR_SET_SECCOMP, 2, &prog as *const libc::sock_fprog) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().expect("spawn storage-server")
}

#[test]
fn auto_falls_back_to_the_thread_pool_when_io_uring_is_blocked() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = server_without_io_uring(dir.path(), "auto");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(line.contains("io_backend=threadpool"), "{line}");
    assert!(stderr.contains("falling back to the thread-pool"), "{stderr}");
    assert!(stderr.contains("cannot set up a ring"), "the warning says why: {stderr}");
}

#[test]
fn forced_uring_refuses_to_start_when_io_uring_is_blocked() {
    let dir = tempfile::tempdir().unwrap();
    let child = server_without_io_uring(dir.path(), "uring");
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("io_uring backend unavailable"), "{stderr}");
}
