//! Buffers aligned for O_DIRECT, recycled through a small bounded pool so
//! the hot path does not allocate (and fault in) a fresh buffer per request.

use std::alloc::{self, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::Mutex;

/// Alignment that satisfies O_DIRECT on every logical block size in use.
pub const ALIGN_BYTES: usize = 4096;

/// Capacities are powers of two from 4 KiB up to this; larger buffers are
/// not pooled.
const POOL_CAPACITY_MAX_BYTES: usize = 32 << 20;
const POOL_CLASSES: usize = (POOL_CAPACITY_MAX_BYTES / ALIGN_BYTES).trailing_zeros() as usize + 1;
/// Bytes each size class may keep idle.
const POOL_CLASS_BYTES_MAX: usize = 32 << 20;

/// Idle allocations by size class (class i holds capacity 4 KiB << i).
static POOL: Mutex<[Vec<PooledAlloc>; POOL_CLASSES]> =
    Mutex::new([const { Vec::new() }; POOL_CLASSES]);

/// An idle allocation in the pool.
struct PooledAlloc(NonNull<u8>);
// SAFETY: an idle allocation is owned by the pool alone.
unsafe impl Send for PooledAlloc {}

fn pool_class(capacity: usize) -> Option<usize> {
    (capacity.is_power_of_two() && (ALIGN_BYTES..=POOL_CAPACITY_MAX_BYTES).contains(&capacity))
        .then(|| (capacity / ALIGN_BYTES).trailing_zeros() as usize)
}

/// A heap buffer whose start is aligned to [`ALIGN_BYTES`].
/// Its heap block never moves, so an in-flight io_uring operation may hold
/// its address while the `AlignedBuf` value itself is moved around.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    capacity: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only give out &[u8], like Vec<u8>.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` zeroed bytes.
    pub fn zeroed(len: usize) -> AlignedBuf {
        let mut buf = AlignedBuf::for_overwrite(len);
        buf.fill(0);
        buf
    }

    /// A buffer of `len` bytes the caller is about to overwrite entirely (a
    /// read target, a payload to receive): its bytes are initialised but
    /// unspecified, possibly left over from an earlier use in this process.
    pub fn for_overwrite(len: usize) -> AlignedBuf {
        let pooled = len.max(1).next_power_of_two().max(ALIGN_BYTES);
        let capacity = match pool_class(pooled) {
            Some(class) => {
                if let Some(PooledAlloc(ptr)) = POOL.lock().unwrap()[class].pop() {
                    return AlignedBuf {
                        ptr,
                        len,
                        capacity: pooled,
                    };
                }
                pooled
            }
            None => len.max(1).next_multiple_of(ALIGN_BYTES),
        };
        let layout = Layout::from_size_align(capacity, ALIGN_BYTES).expect("buffer size overflow");
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len, capacity }
    }

    pub fn from_slice(data: &[u8]) -> AlignedBuf {
        let mut buf = AlignedBuf::for_overwrite(data.len());
        buf.copy_from_slice(data);
        buf
    }

    /// Shortens the visible length; the allocation stays.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for `capacity >= len` initialised bytes we own.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl AsMut<[u8]> for AlignedBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        self
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Some(class) = pool_class(self.capacity) {
            let mut pool = POOL.lock().unwrap();
            if pool[class].len() < (POOL_CLASS_BYTES_MAX / self.capacity).max(1) {
                pool[class].push(PooledAlloc(self.ptr));
                return;
            }
        }
        let layout =
            Layout::from_size_align(self.capacity, ALIGN_BYTES).expect("checked at allocation");
        // SAFETY: allocated in `zeroed` with exactly this layout; freed once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        for len in [0, 1, 511, 4096, 4097, 1 << 20] {
            let buf = AlignedBuf::zeroed(len);
            assert_eq!(buf.as_ptr() as usize % ALIGN_BYTES, 0);
            assert_eq!(buf.len(), len);
            assert!(buf.iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn recycled_buffers_are_zeroed_when_asked() {
        let mut dirty = AlignedBuf::for_overwrite(8192);
        dirty.fill(0xAB);
        drop(dirty);
        let clean = AlignedBuf::zeroed(8192);
        assert!(clean.iter().all(|&b| b == 0));
        let big = AlignedBuf::for_overwrite(100 << 20);
        assert_eq!(big.len(), 100 << 20, "beyond the pooled sizes still works");
    }

    #[test]
    fn copies_and_truncates() {
        let mut buf = AlignedBuf::from_slice(b"hello world");
        buf.truncate(5);
        assert_eq!(&*buf, b"hello");
    }
}
