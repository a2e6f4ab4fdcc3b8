//! The io_uring backend, on tokio-uring.
//!
//! tokio-uring runs its own current-thread runtime whose futures are not
//! `Send`. A ring serves operations sent over a channel and answers on
//! oneshots, from one of two places:
//!
//! - the thread the server runs on, when [`Ring::block_on`] runs the whole
//!   server on the ring's runtime (the chunk server binary): sockets,
//!   requests and disk I/O share one thread, and a request never wakes
//!   another one;
//! - otherwise dedicated OS threads, one per ring (a server started inside
//!   some other runtime, as the tests do).
//!
//! A file is always served by the same ring, which keeps its own duplicate
//! of the descriptor while the file is open.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, Notify};

use super::{BackendKind, IoBackend, IoFile, IoFuture};
use crate::store::buf::AlignedBuf;

/// Ring threads started by default. One ring keeps hundreds of operations in
/// flight; the thread mostly waits for completions.
pub const DEFAULT_THREADS: usize = 1;
/// Submission queue entries per ring.
const RING_ENTRIES: u32 = 256;

type Reply<T> = oneshot::Sender<io::Result<T>>;

/// Shared bytes handed to the kernel for a write.
struct SharedBuf(Bytes);

// SAFETY: the bytes a `Bytes` points to never move or change while it is
// alive, and the ring owns this value until the operation completes.
unsafe impl tokio_uring::buf::IoBuf for SharedBuf {
    fn stable_ptr(&self) -> *const u8 {
        self.0.as_ptr()
    }

    fn bytes_init(&self) -> usize {
        self.0.len()
    }

    fn bytes_total(&self) -> usize {
        self.0.len()
    }
}

enum Op {
    Read { file: FileRef, buf: AlignedBuf, offset: u64, reply: Reply<AlignedBuf> },
    Write { file: FileRef, data: SharedBuf, offset: u64, reply: Reply<()> },
    Sync { file: FileRef, reply: Reply<()> },
    Fallocate { file: FileRef, mode: i32, offset: u64, len: u64, reply: Reply<()> },
    Close { id: u64 },
}

#[derive(Clone)]
struct FileRef {
    id: u64,
    std: Arc<std::fs::File>,
}

thread_local! {
    /// Set while this thread runs a [`Ring::block_on`].
    static ON_RING: Cell<bool> = const { Cell::new(false) };
}

/// An io_uring runtime to run a whole program on.
pub struct Ring(tokio_uring::Runtime);

impl Ring {
    /// Fails if the kernel refuses to set up a ring (old kernels, seccomp).
    pub fn new() -> io::Result<Ring> {
        tokio_uring::Runtime::new(tokio_uring::builder().entries(RING_ENTRIES)).map(Ring)
    }

    /// Runs `future` on this thread; a [`UringBackend`] started inside it
    /// submits to this ring rather than starting ring threads.
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        struct Leave;
        impl Drop for Leave {
            fn drop(&mut self) {
                ON_RING.set(false);
            }
        }
        ON_RING.set(true);
        let _leave = Leave;
        self.0.block_on(future)
    }
}

pub struct UringBackend {
    rings: Vec<mpsc::UnboundedSender<Op>>,
    next_id: AtomicU64,
}

impl UringBackend {
    /// Serves on the current thread's ring inside [`Ring::block_on`];
    /// elsewhere starts `threads` ring threads. Fails if the kernel refuses
    /// to set up a ring.
    pub fn start(threads: usize) -> io::Result<UringBackend> {
        if ON_RING.get() {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio_uring::spawn(serve(rx));
            return Ok(UringBackend { rings: vec![tx], next_id: AtomicU64::new(0) });
        }
        let mut rings = Vec::with_capacity(threads);
        for n in 0..threads.max(1) {
            let (tx, rx) = mpsc::unbounded_channel();
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            std::thread::Builder::new().name(format!("uring-io-{n}")).spawn(move || {
                let ring = match Ring::new() {
                    Ok(ring) => ring,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                ring.0.block_on(serve(rx));
            })?;
            ready_rx.recv().map_err(|_| io::Error::other("ring thread exited during setup"))??;
            rings.push(tx);
        }
        Ok(UringBackend { rings, next_id: AtomicU64::new(0) })
    }
}

impl IoBackend for UringBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Uring
    }

    fn open(&self, file: std::fs::File) -> Arc<dyn IoFile> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let ring = self.rings[id as usize % self.rings.len()].clone();
        Arc::new(UringFile { file: FileRef { id, std: Arc::new(file) }, ring })
    }
}

struct UringFile {
    file: FileRef,
    ring: mpsc::UnboundedSender<Op>,
}

impl UringFile {
    fn submit<T: Send + 'static>(&self, make: impl FnOnce(FileRef, Reply<T>) -> Op) -> IoFuture<T> {
        let (tx, rx) = oneshot::channel();
        let sent = self.ring.send(make(self.file.clone(), tx));
        Box::pin(async move {
            sent.map_err(|_| io::Error::other("io_uring thread is gone"))?;
            rx.await.map_err(|_| io::Error::other("io_uring operation dropped"))?
        })
    }
}

impl IoFile for UringFile {
    fn read_at(&self, buf: AlignedBuf, offset: u64) -> IoFuture<AlignedBuf> {
        self.submit(|file, reply| Op::Read { file, buf, offset, reply })
    }

    fn write_at(&self, data: Bytes, offset: u64) -> IoFuture<()> {
        debug_assert!(super::aligned(&data));
        self.submit(|file, reply| Op::Write { file, data: SharedBuf(data), offset, reply })
    }

    fn sync_data(&self) -> IoFuture<()> {
        self.submit(|file, reply| Op::Sync { file, reply })
    }

    fn fallocate(&self, mode: i32, offset: u64, len: u64) -> IoFuture<()> {
        self.submit(|file, reply| Op::Fallocate { file, mode, offset, len, reply })
    }
}

impl Drop for UringFile {
    fn drop(&mut self) {
        let _ = self.ring.send(Op::Close { id: self.file.id });
    }
}

type Files = RefCell<HashMap<u64, Rc<tokio_uring::fs::File>>>;

/// The ring thread's loop: one local task per operation.
async fn serve(mut rx: mpsc::UnboundedReceiver<Op>) {
    let files: Rc<Files> = Rc::default();
    let inflight = Rc::new(Cell::new(0usize));
    let idle = Rc::new(Notify::new());
    while let Some(op) = rx.recv().await {
        if let Op::Close { id } = op {
            files.borrow_mut().remove(&id);
            continue;
        }
        inflight.set(inflight.get() + 1);
        let (files, inflight, idle) = (files.clone(), inflight.clone(), idle.clone());
        tokio_uring::spawn(async move {
            execute(&files, op).await;
            inflight.set(inflight.get() - 1);
            if inflight.get() == 0 {
                idle.notify_one();
            }
        });
    }
    // Let submitted operations complete before the ring goes away.
    while inflight.get() > 0 {
        idle.notified().await;
    }
}

fn ring_file(files: &Files, file: &FileRef) -> io::Result<Rc<tokio_uring::fs::File>> {
    if let Some(f) = files.borrow().get(&file.id) {
        return Ok(f.clone());
    }
    let dup = Rc::new(tokio_uring::fs::File::from_std(file.std.try_clone()?));
    files.borrow_mut().insert(file.id, dup.clone());
    Ok(dup)
}

async fn execute(files: &Files, op: Op) {
    match op {
        Op::Read { file, buf, offset, reply } => {
            let result = match ring_file(files, &file) {
                Ok(f) => {
                    let (res, buf) = f.read_exact_at(buf, offset).await;
                    res.map(|()| buf)
                }
                Err(e) => Err(e),
            };
            let _ = reply.send(result);
        }
        Op::Write { file, data, offset, reply } => {
            let result = match ring_file(files, &file) {
                Ok(f) => f.write_all_at(data, offset).await.0,
                Err(e) => Err(e),
            };
            let _ = reply.send(result);
        }
        Op::Sync { file, reply } => {
            let result = match ring_file(files, &file) {
                Ok(f) => f.sync_data().await,
                Err(e) => Err(e),
            };
            let _ = reply.send(result);
        }
        Op::Fallocate { file, mode, offset, len, reply } => {
            let result = match ring_file(files, &file) {
                Ok(f) => f.fallocate(offset, len, mode).await,
                Err(e) => Err(e),
            };
            let _ = reply.send(result);
        }
        Op::Close { .. } => unreachable!("handled by the loop"),
    }
}
