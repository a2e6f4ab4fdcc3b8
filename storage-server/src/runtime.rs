//! The runtime a chunk server runs on.
//!
//! With io_uring, the whole server runs on one ring's thread
//! ([`uring::Ring`]): a request is read from its socket, written to disk and
//! answered without changing threads, which on a loaded machine is worth
//! more than spreading one server over cores (`make bench`). A chunk server
//! thus uses one core for its data path; a machine with several disks runs
//! one server per disk. Blocking work still goes to tokio's blocking pool.
//!
//! Where the kernel refuses a ring, or `--io-backend threadpool` is asked
//! for, the server runs on tokio's multi-thread runtime and
//! [`backend::select`](crate::store::backend::select) decides (and says)
//! what happens to disk I/O.

use std::future::Future;
use std::io;

use crate::store::backend::{uring, BackendChoice};

/// Runs `future`, the whole server, to completion on the runtime `choice` calls for.
pub fn block_on<F: Future>(choice: BackendChoice, future: F) -> io::Result<F::Output> {
    if choice != BackendChoice::Threadpool {
        if let Ok(ring) = uring::Ring::new() {
            return Ok(ring.block_on(future));
        }
    }
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(future))
}
