//! A FUSE file system with one regular file, `volume`, whose bytes are a
//! [`BlockExport`]. The loop device of the FUSE fallback sits on that file.
//!
//! The FUSE thread never waits for I/O: each read, write and fsync becomes a
//! task on the tokio runtime that replies when the export answers. So a
//! request the loop device sends can never be stuck behind another one on
//! the FUSE thread, and the file is opened with `FOPEN_DIRECT_IO` so the
//! page cache does not hold a second copy of what the loop device caches.

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig,
    LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use tokio::runtime::Handle;
use tracing::{debug, warn};

use crate::attach::io_flusher;
use volume_engine::export::{BlockExport, ExportError};

/// Name of the one file in the file system.
pub const VOLUME_FILE: &str = "volume";

const ROOT: INodeNo = INodeNo::ROOT;
const FILE: INodeNo = INodeNo(2);
/// How long the kernel may cache the file's attributes (its size among them).
pub(crate) const ATTR_TTL: Duration = Duration::from_secs(1);
/// Largest FUSE request; with `FUSE_MAX_PAGES` the kernel splits loop I/O
/// into pieces of this size.
const MAX_WRITE: u32 = 1024 * 1024;
/// Trims and zeroing are issued to the export in pieces of this size.
const RANGE_CHUNK: u64 = 1 << 30;

pub(crate) struct VolumeFs<E> {
    export: Arc<E>,
    runtime: Handle,
    read_only: bool,
    created: SystemTime,
}

impl<E: BlockExport> VolumeFs<E> {
    pub fn new(export: Arc<E>, runtime: Handle, read_only: bool) -> Self {
        Self { export, runtime, read_only, created: SystemTime::now() }
    }

    fn file_attr(&self) -> FileAttr {
        let size = self.export.size();
        FileAttr {
            ino: FILE,
            size,
            blocks: size.div_ceil(512),
            atime: self.created,
            mtime: self.created,
            ctime: self.created,
            crtime: self.created,
            kind: FileType::RegularFile,
            perm: if self.read_only { 0o400 } else { 0o600 },
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn root_attr(&self) -> FileAttr {
        FileAttr {
            ino: ROOT,
            size: 0,
            blocks: 0,
            atime: self.created,
            mtime: self.created,
            ctime: self.created,
            crtime: self.created,
            kind: FileType::Directory,
            perm: 0o700,
            nlink: 2,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

fn errno(e: &ExportError) -> Errno {
    match e {
        ExportError::OutOfRange { .. } => Errno::EINVAL,
        ExportError::ReadOnly(_) => Errno::EROFS,
        ExportError::NoSpace(_) => Errno::ENOSPC,
        ExportError::Io(_) => Errno::EIO,
    }
}

impl<E: BlockExport> Filesystem for VolumeFs<E> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_WRITE);
        // The loop device keeps many requests in flight.
        let _ = config.set_max_background(128);
        let _ = config.set_congestion_threshold(96);
        // Let the kernel send the loop device's asynchronous direct I/O as
        // concurrent requests instead of one at a time.
        if config.capabilities().contains(InitFlags::FUSE_ASYNC_DIO) {
            let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == ROOT && name == VOLUME_FILE {
            reply.entry(&ATTR_TTL, &self.file_attr(), Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match ino {
            ROOT => reply.attr(&ATTR_TTL, &self.root_attr()),
            FILE => reply.attr(&ATTR_TTL, &self.file_attr()),
            _ => reply.error(Errno::ENOENT),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if ino != FILE {
            return reply.error(Errno::EPERM);
        }
        // The volume's size is fixed; an O_TRUNC-free open may still set it to itself.
        match size {
            Some(size) if size != self.export.size() => reply.error(Errno::EPERM),
            _ => reply.attr(&ATTR_TTL, &self.file_attr()),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino != FILE {
            return reply.error(Errno::EISDIR);
        }
        if self.read_only && flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        // Parallel direct writes: without it FUSE serialises writes to the file.
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        io_flusher::mark_current_thread();
        if ino != FILE {
            return reply.error(Errno::EISDIR);
        }
        let end = self.export.size();
        if offset >= end || size == 0 {
            return reply.data(&[]);
        }
        let len = (end - offset).min(u64::from(size)) as u32;
        let export = self.export.clone();
        self.runtime.spawn(async move {
            match export.read(offset, len).await {
                Ok(data) => reply.data(&data),
                Err(e) => {
                    warn!(offset, len, error = %e, "volume read failed");
                    reply.error(errno(&e));
                }
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        io_flusher::mark_current_thread();
        if ino != FILE {
            return reply.error(Errno::EISDIR);
        }
        if self.read_only {
            return reply.error(Errno::EROFS);
        }
        let len = data.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > self.export.size()) {
            return reply.error(Errno::EFBIG);
        }
        // The kernel's buffer is only borrowed for this call.
        let data = Bytes::copy_from_slice(data);
        let export = self.export.clone();
        self.runtime.spawn(async move {
            match export.write(offset, data, false).await {
                Ok(()) => reply.written(len as u32),
                Err(e) => {
                    warn!(offset, len, error = %e, "volume write failed");
                    reply.error(errno(&e));
                }
            }
        });
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        // close(): durability is fsync's job.
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        io_flusher::mark_current_thread();
        let export = self.export.clone();
        self.runtime.spawn(async move {
            match export.flush().await {
                Ok(()) => reply.ok(),
                Err(e) => {
                    warn!(error = %e, "volume flush failed");
                    reply.error(errno(&e));
                }
            }
        });
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        io_flusher::mark_current_thread();
        if ino != FILE {
            return reply.error(Errno::EISDIR);
        }
        let in_range = offset.checked_add(length).is_some_and(|end| end <= self.export.size());
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let zero = libc::FALLOC_FL_ZERO_RANGE;
        let op = if mode == punch {
            RangeOp::Trim
        } else if mode & !libc::FALLOC_FL_KEEP_SIZE == zero {
            RangeOp::Zero
        } else if mode & !libc::FALLOC_FL_KEEP_SIZE == 0 {
            // Plain allocation: every byte of the volume already exists.
            return if in_range { reply.ok() } else { reply.error(Errno::EFBIG) };
        } else {
            return reply.error(Errno::EOPNOTSUPP);
        };
        if self.read_only {
            return reply.error(Errno::EROFS);
        }
        if !in_range {
            return reply.error(Errno::EINVAL);
        }
        let export = self.export.clone();
        self.runtime.spawn(async move {
            match op.apply(&*export, offset, length).await {
                Ok(()) => reply.ok(),
                Err(e) => {
                    warn!(offset, length, error = %e, "volume discard/zeroing failed");
                    reply.error(errno(&e));
                }
            }
        });
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        if ino != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (ROOT, FileType::Directory, "."),
            (ROOT, FileType::Directory, ".."),
            (FILE, FileType::RegularFile, VOLUME_FILE),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.export.size().div_ceil(4096);
        reply.statfs(blocks, 0, 0, 2, 0, 4096, 255, 4096);
    }

    fn destroy(&mut self) {
        debug!("volume FUSE file system unmounted");
    }
}

#[derive(Clone, Copy)]
enum RangeOp {
    Trim,
    Zero,
}

impl RangeOp {
    /// Applies the operation in pieces the export's `u32` lengths can carry.
    async fn apply<E: BlockExport>(self, export: &E, offset: u64, length: u64) -> Result<(), ExportError> {
        let mut done = 0;
        while done < length {
            let len = (length - done).min(RANGE_CHUNK) as u32;
            match self {
                RangeOp::Trim => export.trim(offset + done, len, false).await?,
                RangeOp::Zero => export.write_zeroes(offset + done, len, false).await?,
            }
            done += u64::from(len);
        }
        Ok(())
    }
}
