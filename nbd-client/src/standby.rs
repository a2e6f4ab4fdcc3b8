//! The standby: a second process per kernel nbd device, started by the
//! serving process, connected to the metadata service and waiting. When the
//! serving process dies without handing the device over (SIGKILL, the OOM
//! killer, a crash), the standby takes the device over at once: the kernel
//! resends what was stranded on the dead connections as soon as their
//! request timeout fires, instead of waiting for someone to start a
//! successor. When the serving process is asked to stop (SIGTERM), it asks
//! its standby to take the device over with its live connections first
//! ([`crate::handover`]), and nothing waits at all.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nbd_records::mapping::{Mapping, StateDir};

/// Waits until process `pid` has exited (a pidfd becomes readable then).
/// Returns at once if it is already gone.
pub async fn exited(pid: u32) -> io::Result<()> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor
    // or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ESRCH) => Ok(()),
            _ => Err(err),
        };
    }
    // SAFETY: the descriptor was just created for us and is owned once.
    let pidfd = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
    tokio::task::spawn_blocking(move || loop {
        let mut poll = libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one pollfd, valid for the call.
        match unsafe { libc::poll(&mut poll, 1, -1) } {
            n if n > 0 => return Ok(()),
            _ => {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
        }
    })
    .await
    .map_err(io::Error::other)?
}

/// What a standby does after its serving process `active` exited, as the
/// state directory tells.
#[derive(Debug, PartialEq, Eq)]
pub enum AfterExit {
    /// It died serving the device (its record still names it): take over.
    TakeOver(Mapping),
    /// It unmapped the volume, or handed the device to another process:
    /// the standby is not needed.
    Leave(&'static str),
}

pub fn after_exit(state: &StateDir, volume_id: &str, active: u32) -> io::Result<AfterExit> {
    Ok(match state.load(volume_id)? {
        None => AfterExit::Leave("the volume was unmapped"),
        Some(mapping) if mapping.pid != active => AfterExit::Leave("another process serves the device"),
        Some(mapping) if mapping.method != "netlink" => AfterExit::Leave("the device died with its process"),
        Some(mapping) => AfterExit::TakeOver(mapping),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping(pid: u32, method: &str) -> Mapping {
        Mapping {
            volume_id: "vol-a".into(),
            volume_name: "a".into(),
            device: "/dev/nbd0".into(),
            method: method.into(),
            pid,
            epoch: 3,
            resizable: true,
        }
    }

    #[test]
    fn a_standby_takes_over_only_from_a_process_that_died_serving() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path()).unwrap();
        assert_eq!(after_exit(&state, "vol-a", 10).unwrap(), AfterExit::Leave("the volume was unmapped"));
        state.save(&mapping(11, "netlink")).unwrap();
        assert!(matches!(after_exit(&state, "vol-a", 10).unwrap(), AfterExit::Leave(_)));
        state.save(&mapping(10, "fuse-loop")).unwrap();
        assert!(matches!(after_exit(&state, "vol-a", 10).unwrap(), AfterExit::Leave(_)));
        state.save(&mapping(10, "netlink")).unwrap();
        assert_eq!(after_exit(&state, "vol-a", 10).unwrap(), AfterExit::TakeOver(mapping(10, "netlink")));
    }

    #[tokio::test]
    async fn exit_of_a_process_is_seen() {
        let mut child = std::process::Command::new("sleep").arg("0.2").spawn().unwrap();
        let started = std::time::Instant::now();
        tokio::time::timeout(std::time::Duration::from_secs(10), exited(child.id())).await.unwrap().unwrap();
        assert!(started.elapsed() >= std::time::Duration::from_millis(150));
        child.wait().unwrap();
    }
}
