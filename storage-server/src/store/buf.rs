//! 4 KiB-aligned I/O buffers, as O_DIRECT requires, recycled through a pool
//! so the steady-state data path does not allocate.

use std::alloc::{self, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// Alignment of every buffer, offset and length handed to the disk.
pub const ALIGN: usize = 4096;
/// Size classes: 4 KiB << 0 ..= 4 KiB << 11 (8 MiB).
const CLASSES: usize = 12;
/// Buffers kept per size class: many small ones for random I/O, fewer large.
fn class_limit(class: usize) -> usize {
    if class < 6 {
        256
    } else {
        16
    }
}

struct Raw(NonNull<u8>);
// SAFETY: a `Raw` is an exclusively owned heap allocation.
unsafe impl Send for Raw {}

/// A heap buffer whose start and capacity are multiples of [`ALIGN`]. Its
/// memory is always initialised; `len` is the part in use.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
    pool: Option<Arc<PoolInner>>,
}

// SAFETY: the buffer exclusively owns its allocation, like a `Vec<u8>`.
unsafe impl Send for AlignedBuf {}
unsafe impl Sync for AlignedBuf {}

fn layout(cap: usize) -> Layout {
    Layout::from_size_align(cap, ALIGN).expect("valid buffer layout")
}

fn alloc_zeroed(cap: usize) -> NonNull<u8> {
    let layout = layout(cap);
    // SAFETY: the layout has a non-zero size.
    let ptr = unsafe { alloc::alloc_zeroed(layout) };
    NonNull::new(ptr).unwrap_or_else(|| alloc::handle_alloc_error(layout))
}

impl AlignedBuf {
    /// A zeroed, unpooled buffer of `len` bytes.
    pub fn zeroed(len: usize) -> AlignedBuf {
        let cap = len.next_multiple_of(ALIGN).max(ALIGN);
        AlignedBuf { ptr: alloc_zeroed(cap), len, cap, pool: None }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Shares the buffer as `Bytes` without copying; it returns to its pool
    /// when the last `Bytes` referring to it is dropped.
    pub fn into_bytes(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` points to `cap >= len` initialised bytes we own.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` guarantees exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let raw = Raw(self.ptr);
        if let Some(pool) = self.pool.take() {
            if let Some(raw) = pool.put(raw, self.cap) {
                // SAFETY: allocated with this layout in `alloc_zeroed`.
                unsafe { alloc::dealloc(raw.0.as_ptr(), layout(self.cap)) };
            }
            return;
        }
        // SAFETY: as above.
        unsafe { alloc::dealloc(raw.0.as_ptr(), layout(self.cap)) };
    }
}

// SAFETY: the pointer is stable for the buffer's lifetime (moving an
// `AlignedBuf` does not move its heap memory), and `len` bytes are initialised.
unsafe impl tokio_uring::buf::IoBuf for AlignedBuf {
    fn stable_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    fn bytes_init(&self) -> usize {
        self.len
    }

    fn bytes_total(&self) -> usize {
        self.len
    }
}

// SAFETY: as above; all memory is initialised from allocation on, so
// `set_init` has nothing to record.
unsafe impl tokio_uring::buf::IoBufMut for AlignedBuf {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    unsafe fn set_init(&mut self, _pos: usize) {}
}

struct PoolInner {
    classes: Vec<Mutex<Vec<Raw>>>,
}

impl PoolInner {
    /// Keeps the allocation, or hands it back when the class is full.
    fn put(&self, raw: Raw, cap: usize) -> Option<Raw> {
        let class = (cap / ALIGN).trailing_zeros() as usize;
        if cap != ALIGN << class || class >= CLASSES {
            return Some(raw);
        }
        let mut free = self.classes[class].lock().expect("buffer pool poisoned");
        if free.len() >= class_limit(class) {
            return Some(raw);
        }
        free.push(raw);
        None
    }
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        for (class, free) in self.classes.iter_mut().enumerate() {
            for raw in free.get_mut().expect("buffer pool poisoned").drain(..) {
                // SAFETY: every pooled buffer of this class has this layout.
                unsafe { alloc::dealloc(raw.0.as_ptr(), layout(ALIGN << class)) };
            }
        }
    }
}

/// A pool of aligned buffers by power-of-two size class.
#[derive(Clone)]
pub struct BufPool {
    inner: Arc<PoolInner>,
}

impl Default for BufPool {
    fn default() -> Self {
        BufPool { inner: Arc::new(PoolInner { classes: (0..CLASSES).map(|_| Mutex::new(Vec::new())).collect() }) }
    }
}

impl BufPool {
    /// A buffer of `len` bytes with unspecified (but initialised) contents.
    pub fn get(&self, len: usize) -> AlignedBuf {
        let blocks = len.div_ceil(ALIGN).max(1);
        let class = blocks.next_power_of_two().trailing_zeros() as usize;
        if class >= CLASSES {
            return AlignedBuf::zeroed(len);
        }
        let cap = ALIGN << class;
        let reused = self.inner.classes[class].lock().expect("buffer pool poisoned").pop();
        let ptr = reused.map_or_else(|| alloc_zeroed(cap), |raw| raw.0);
        AlignedBuf { ptr, len, cap, pool: Some(self.inner.clone()) }
    }

    /// A buffer of `len` zero bytes.
    pub fn zeroed(&self, len: usize) -> AlignedBuf {
        let mut buf = self.get(len);
        buf.fill(0);
        buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_recycled() {
        let pool = BufPool::default();
        let mut a = pool.get(5000);
        assert_eq!(a.len(), 5000);
        assert_eq!(a.capacity(), 8192);
        assert_eq!(a.as_ptr() as usize % ALIGN, 0);
        a[4999] = 7;
        let ptr = a.as_ptr();
        let bytes = a.into_bytes();
        assert_eq!(bytes[4999], 7);
        drop(bytes);
        let b = pool.get(8192);
        assert_eq!(b.as_ptr(), ptr, "the freed buffer is reused");
        assert!(pool.zeroed(8192).iter().all(|&x| x == 0));
        let big = pool.get(64 << 20);
        assert_eq!(big.len(), 64 << 20);
    }
}
