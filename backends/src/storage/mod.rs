//! Block storage back ends.
//!
//! A [`BlockBackend`] is a fixed-size, byte-addressed disk image. Device
//! models translate guest requests into calls on it; every call is checked
//! against [`BlockBackend::size`] and fails with
//! [`io::ErrorKind::InvalidInput`] instead of panicking when out of range.

#[cfg(any(test, feature = "test-support"))]
pub mod faulty;
mod memory;
mod raw_file;
mod workers;

use std::io;
use std::marker::PhantomData;
use std::os::fd::RawFd;

use thiserror::Error;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

pub use memory::MemoryDisk;
pub(crate) use raw_file::unsupported as fallocate_unsupported;
pub use raw_file::{RawFile, RawFileOptions, DIRECT_IO_ALIGNMENT};
pub use workers::{IoDone, IoJob, IoOp, IoWorkers, MAX_IO_THREADS};

/// Maximum length of a back-end id, in bytes (`VIRTIO_BLK_ID_BYTES`).
pub const BLOCK_ID_BYTES: usize = 20;

/// One buffer of a vectored transfer ([`BlockBackend::read_vectored_at`],
/// [`BlockBackend::write_vectored_at`]): `len` bytes of memory at `ptr`,
/// laid out like `struct iovec` so a slice of them can be handed to
/// `preadv`/`pwritev` as is.
///
/// The memory is typically guest memory, which the guest may modify at any
/// time: it is only ever accessed as raw bytes (by the kernel, or with
/// volatile copies), never through Rust references.
#[derive(Clone, Copy, Debug)]
#[repr(transparent)]
pub struct IoBuf<'a> {
    iov: libc::iovec,
    _memory: PhantomData<&'a mut [u8]>,
}

impl<'a> IoBuf<'a> {
    /// An empty buffer.
    pub const fn empty() -> Self {
        IoBuf {
            iov: libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            },
            _memory: PhantomData,
        }
    }

    /// A buffer of `len` bytes at `ptr`.
    ///
    /// # Safety
    ///
    /// `[ptr, ptr + len)` must be mapped, readable and writable memory for
    /// `'a`, and every other user of it must access it only as raw bytes
    /// (volatile accesses or the kernel), never through Rust references.
    pub unsafe fn from_raw_parts(ptr: *mut u8, len: usize) -> Self {
        IoBuf {
            iov: libc::iovec {
                iov_base: ptr.cast(),
                iov_len: len,
            },
            _memory: PhantomData,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.iov.iov_len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.iov.iov_len == 0
    }

    /// Start of the buffer.
    pub fn as_ptr(&self) -> *mut u8 {
        self.iov.iov_base.cast()
    }

    /// The buffer as a [`VolatileSlice`] without dirty tracking, for
    /// volatile copies.
    pub fn as_volatile_slice(&self) -> VolatileSlice<'_> {
        // SAFETY: the constructors guarantee that `[ptr, ptr + len)` is
        // valid memory, accessed only as raw bytes, for 'a, which outlives
        // the borrow of `self`.
        unsafe { VolatileSlice::new(self.as_ptr(), self.len()) }
    }

    /// The iovecs of `bufs`, for `preadv`/`pwritev`.
    pub(crate) fn as_iovecs(bufs: &[IoBuf<'_>]) -> *const libc::iovec {
        // `IoBuf` is a `repr(transparent)` wrapper of `libc::iovec`.
        bufs.as_ptr().cast()
    }
}

impl<'a> From<&'a mut [u8]> for IoBuf<'a> {
    /// Memory of our own (a bounce buffer), borrowed for as long as the
    /// buffer is used.
    fn from(buf: &'a mut [u8]) -> Self {
        // SAFETY: the exclusive borrow keeps every other user away from
        // the memory for 'a, and it is valid, writable memory.
        unsafe { IoBuf::from_raw_parts(buf.as_mut_ptr(), buf.len()) }
    }
}

impl<'a, B: BitmapSlice> From<VolatileSlice<'a, B>> for IoBuf<'a> {
    /// The memory of `slice`. Writes through the buffer are not recorded in
    /// the slice's dirty bitmap: the caller marks them with
    /// `slice.bitmap().mark_dirty(0, len)`, after the write, or before it
    /// if the dirty log is only read on the writing thread.
    fn from(slice: VolatileSlice<'a, B>) -> Self {
        // `ptr_guard_mut` only maps memory on Xen, a vm-memory feature we do
        // not enable; the address stays valid after the guard is dropped.
        let ptr = slice.ptr_guard_mut().as_ptr();
        // SAFETY: a `VolatileSlice<'a>` is `len` bytes of valid memory for
        // 'a that all users access with volatile accesses (its constructor's
        // contract), which is this type's requirement too.
        unsafe { IoBuf::from_raw_parts(ptr, slice.len()) }
    }
}

/// Total length of `bufs`; fails if it overflows.
pub fn io_bufs_len(bufs: &[IoBuf<'_>]) -> io::Result<u64> {
    bufs.iter()
        .try_fold(0u64, |acc, b| acc.checked_add(b.len() as u64))
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))
}

/// Largest bounce buffer of the default vectored methods.
const VECTORED_BOUNCE: usize = 256 << 10;

/// Errors creating a storage back end.
#[derive(Debug, Error)]
pub enum StorageError {
    /// The image could not be opened.
    #[error("cannot open {path}: {source}")]
    Open {
        /// Path of the image.
        path: String,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// The size of the image could not be determined.
    #[error("cannot determine the size of {path}: {source}")]
    Size {
        /// Path of the image.
        path: String,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// The requested size does not fit in memory.
    #[error("size {0} is too large")]
    TooLarge(u64),
}

/// A fixed-size disk image.
///
/// Implementations are shared between queues (`Arc<dyn BlockBackend>`), so
/// they take `&self` and must be `Sync`.
pub trait BlockBackend: Send + Sync {
    /// Size of the image in bytes.
    fn size(&self) -> u64;

    /// Fills `buf` from `offset`; the whole range must lie within the image.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Writes all of `buf` at `offset`; the whole range must lie within the
    /// image. Returns once the back end accepted the data (not necessarily
    /// durable; see [`BlockBackend::flush`]).
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Fills `bufs`, in order, from `offset`; the whole range must lie
    /// within the image. On error the buffers' contents are unspecified.
    ///
    /// The default implementation bounces through a temporary buffer and
    /// [`BlockBackend::read_at`].
    fn read_vectored_at(&self, bufs: &[IoBuf<'_>], offset: u64) -> io::Result<()> {
        bounce_read_vectored(self, bufs, offset)
    }

    /// Writes `bufs`, in order, at `offset`; the whole range must lie
    /// within the image. Same semantics as [`BlockBackend::write_at`].
    ///
    /// The default implementation bounces through a temporary buffer and
    /// [`BlockBackend::write_at`].
    fn write_vectored_at(&self, bufs: &[IoBuf<'_>], offset: u64) -> io::Result<()> {
        bounce_write_vectored(self, bufs, offset)
    }

    /// Makes every accepted write durable (`fdatasync`).
    fn flush(&self) -> io::Result<()>;

    /// Tells the back end `[offset, offset + len)` is no longer needed; its
    /// contents become unspecified.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Sets `[offset, offset + len)` to zeroes.
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Whether writes are refused.
    fn read_only(&self) -> bool;

    /// A serial number for the image, at most [`BLOCK_ID_BYTES`] bytes.
    fn id(&self) -> String;

    /// Whether the data lives in a file or block device, so that
    /// asynchronous engines (io_uring) can run requests on it with
    /// [`BlockBackend::fd_for`]. In-memory back ends say no: their
    /// requests are copies that are best done on the spot.
    fn file_backed(&self) -> bool {
        false
    }

    /// Whether transfers on the descriptors of [`BlockBackend::fd_for`] go
    /// through the host's page cache (not `O_DIRECT`): an engine may then
    /// try them on the spot with `RWF_NOWAIT`, which only succeeds when
    /// nothing has to wait for the storage.
    fn page_cached(&self) -> bool {
        false
    }

    /// The descriptor on which `access` can run as one plain positioned
    /// system call (`preadv`/`pwritev` of exactly these buffers at this
    /// offset, `fdatasync`, or `fallocate`) with the same effect as the
    /// matching method of this trait, if there is one. `None` when the
    /// back end must do it itself: it has no file, the range is outside
    /// the image, the image is read-only, or (`O_DIRECT`) the buffers or
    /// the range are not aligned for the descriptor. The descriptor stays
    /// valid for as long as the back end lives.
    fn fd_for(&self, _access: FdAccess<'_>) -> Option<RawFd> {
        None
    }

    /// Tells the back end that a flush an engine ran on the descriptor of
    /// [`BlockBackend::fd_for`] failed with `error`, as its own
    /// [`BlockBackend::flush`] would have learnt it. A device restored
    /// from one whose flush failed tells its own back end so too.
    fn flush_failed(&self, _error: &io::Error) {}

    /// Whether a failed flush may have lost accepted writes, so that every
    /// later flush fails ([`BlockBackend::flush_failed`]): device state to
    /// save, for the device that goes on from it.
    fn writeback_lost(&self) -> bool {
        false
    }
}

/// Tells `backend` that the device it serves was saved after a flush had
/// failed ([`BlockBackend::writeback_lost`]): writes may be lost, and no
/// flush of the restored device may say otherwise.
pub fn restore_writeback_lost(backend: &dyn BlockBackend) {
    backend.flush_failed(&io::Error::other(
        "a flush failed before the device was saved",
    ));
}

/// An operation an asynchronous engine wants to run on a back end's file
/// itself ([`BlockBackend::fd_for`]).
#[derive(Clone, Copy, Debug)]
pub enum FdAccess<'a> {
    /// `preadv` of `bufs` at `offset`.
    Read {
        /// Destination buffers.
        bufs: &'a [IoBuf<'a>],
        /// Disk offset.
        offset: u64,
    },
    /// `pwritev` of `bufs` at `offset`.
    Write {
        /// Source buffers.
        bufs: &'a [IoBuf<'a>],
        /// Disk offset.
        offset: u64,
    },
    /// `fdatasync`.
    Flush,
    /// `fallocate` of `[offset, offset + len)` (a discard or write-zeroes).
    Fallocate {
        /// Disk offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
}

/// Vectored read through a bounce buffer and [`BlockBackend::read_at`].
pub(crate) fn bounce_read_vectored<D: BlockBackend + ?Sized>(
    disk: &D,
    bufs: &[IoBuf<'_>],
    offset: u64,
) -> io::Result<()> {
    let total = io_bufs_len(bufs)?;
    check_range(disk.size(), offset, total)?;
    let mut bounce = vec![0u8; total.min(VECTORED_BOUNCE as u64) as usize];
    let mut pos = offset;
    for b in bufs {
        let dst = b.as_volatile_slice();
        let mut done = 0;
        while done < b.len() {
            let n = (b.len() - done).min(bounce.len());
            disk.read_at(&mut bounce[..n], pos)?;
            dst.offset(done)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?
                .copy_from(&bounce[..n]);
            done += n;
            pos += n as u64;
        }
    }
    Ok(())
}

/// Vectored write through a bounce buffer and [`BlockBackend::write_at`].
pub(crate) fn bounce_write_vectored<D: BlockBackend + ?Sized>(
    disk: &D,
    bufs: &[IoBuf<'_>],
    offset: u64,
) -> io::Result<()> {
    check_writable(disk.read_only())?;
    let total = io_bufs_len(bufs)?;
    check_range(disk.size(), offset, total)?;
    let mut bounce = vec![0u8; total.min(VECTORED_BOUNCE as u64) as usize];
    let mut pos = offset;
    for b in bufs {
        let src = b.as_volatile_slice();
        let mut done = 0;
        while done < b.len() {
            let n = (b.len() - done).min(bounce.len());
            src.offset(done)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?
                .copy_to(&mut bounce[..n]);
            disk.write_at(&bounce[..n], pos)?;
            done += n;
            pos += n as u64;
        }
    }
    Ok(())
}

/// Most iovecs passed to one `preadv`/`pwritev` (`IOV_MAX` on Linux).
pub(crate) const MAX_IOVECS: usize = 1024;

/// The length of a transfer of `bufs` at `offset` that one `preadv` or
/// `pwritev` can do on an image of `size` bytes: at most [`MAX_IOVECS`]
/// buffers, within the image. For [`BlockBackend::fd_for`].
pub(crate) fn one_call_transfer(size: u64, bufs: &[IoBuf<'_>], offset: u64) -> Option<u64> {
    if bufs.len() > MAX_IOVECS {
        return None;
    }
    let total = io_bufs_len(bufs).ok()?;
    check_range(size, offset, total).ok()?;
    Some(total)
}

/// Checks that `[offset, offset + len)` lies within an image of `size`
/// bytes.
pub fn check_range(size: u64, offset: u64, len: u64) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("range {offset:#x}+{len:#x} outside image of {size:#x} bytes"),
        )),
    }
}

/// Fails with [`io::ErrorKind::PermissionDenied`] when `read_only`.
pub(crate) fn check_writable(read_only: bool) -> io::Result<()> {
    if read_only {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "image is read-only",
        ))
    } else {
        Ok(())
    }
}

/// Truncates `id` to at most [`BLOCK_ID_BYTES`] bytes on a character
/// boundary.
pub(crate) fn truncate_id(mut id: String) -> String {
    if id.len() > BLOCK_ID_BYTES {
        let mut end = BLOCK_ID_BYTES;
        while !id.is_char_boundary(end) {
            end -= 1;
        }
        id.truncate(end);
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_checks() {
        assert!(check_range(100, 0, 100).is_ok());
        assert!(check_range(100, 100, 0).is_ok());
        assert!(check_range(100, 1, 100).is_err());
        assert!(check_range(100, u64::MAX, 2).is_err());
        assert!(check_range(u64::MAX, u64::MAX, 0).is_ok());
    }

    #[test]
    fn id_truncation() {
        assert_eq!(truncate_id("abc".into()), "abc");
        assert_eq!(truncate_id("a".repeat(30)).len(), 20);
        // A multi-byte character straddling byte 20 is dropped whole.
        let s = format!("{}é", "a".repeat(19));
        assert_eq!(truncate_id(s), "a".repeat(19));
    }
}
