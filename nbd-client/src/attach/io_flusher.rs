//! `PR_SET_IO_FLUSHER` for the threads that serve a block device.
//!
//! When memory runs low the kernel writes dirty pages back, possibly to the
//! very device this process serves. A serving thread that then allocates
//! memory would wait for reclaim, which waits for the device, which waits
//! for the thread. Marking the thread an I/O flusher makes its allocations
//! avoid I/O-backed reclaim and exempts it from dirty throttling, which is
//! what the kernel provides this flag for (nbd and FUSE servers, loop users).
//!
//! The binary should mark its tokio worker threads too, e.g.
//! `tokio::runtime::Builder::on_thread_start(|| { let _ = set_io_flusher(); })`.

use std::cell::Cell;
use std::io;

/// `PR_SET_IO_FLUSHER` (Linux ≥ 5.6).
const PR_SET_IO_FLUSHER: libc::c_int = 57;

/// Marks the calling thread as an I/O flusher. Needs `CAP_SYS_RESOURCE`.
pub fn set_io_flusher() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe {
        libc::prctl(PR_SET_IO_FLUSHER, 1 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

thread_local! {
    static MARKED: Cell<bool> = const { Cell::new(false) };
}

/// Marks the calling thread once; threads we do not create ourselves (the
/// FUSE library's) call this on their first request.
pub(crate) fn mark_current_thread() {
    MARKED.with(|marked| {
        if !marked.get() {
            marked.set(true);
            if let Err(e) = set_io_flusher() {
                tracing::debug!(error = %e, "cannot mark thread as I/O flusher");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marking_is_harmless() {
        // Root on Linux ≥ 5.6 succeeds; elsewhere the error is only logged.
        std::thread::spawn(|| {
            mark_current_thread();
            mark_current_thread();
        })
        .join()
        .unwrap();
    }
}
