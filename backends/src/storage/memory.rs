//! An in-memory disk, for tests and scratch devices.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::VolatileSlice;

use super::{
    check_range, check_writable, one_call_transfer, truncate_id, BlockBackend, FdAccess,
    StorageError,
};

/// Where the bytes of a [`MemoryDisk`] are.
#[derive(Debug)]
enum Storage {
    /// A heap allocation of ours.
    Heap(*mut [u8]),
    /// A shared mapping of a memfd, which engines can also reach through
    /// the file.
    Memfd {
        file: File,
        ptr: *mut u8,
        len: usize,
    },
}

/// A disk held in memory: on the heap, or in a memfd
/// ([`MemoryDisk::in_memfd`]), whose file asynchronous engines (io_uring)
/// can read and write like an image's.
///
/// Discard zeroes the range, so reads after a discard are deterministic.
/// The bytes are only ever copied with volatile accesses: in a memfd the
/// kernel writes them too.
#[derive(Debug)]
pub struct MemoryDisk {
    storage: Storage,
    read_only: bool,
    id: String,
    flushes: AtomicU64,
}

// SAFETY: the storage is memory owned by the disk for its whole life and
// only accessed with volatile copies, from any thread.
unsafe impl Send for MemoryDisk {}
// SAFETY: as above; `&self` methods never hand out references into it.
unsafe impl Sync for MemoryDisk {}

impl Drop for Storage {
    fn drop(&mut self) {
        match *self {
            // SAFETY: made by `Box::into_raw` in `from_vec` and dropped once.
            Storage::Heap(p) => drop(unsafe { Box::from_raw(p) }),
            Storage::Memfd { ptr, len, .. } => {
                if len > 0 {
                    // SAFETY: the mapping made in `in_memfd`, unmapped once;
                    // nothing uses it any more.
                    unsafe { libc::munmap(ptr.cast(), len) };
                }
            }
        }
    }
}

impl MemoryDisk {
    /// A zero-filled disk of `size` bytes.
    pub fn new(size: u64) -> Result<Self, StorageError> {
        let len = usize::try_from(size).map_err(|_| StorageError::TooLarge(size))?;
        let mut data = Vec::new();
        data.try_reserve_exact(len)
            .map_err(|_| StorageError::TooLarge(size))?;
        data.resize(len, 0);
        Ok(Self::from_vec(data, false))
    }

    /// A disk holding `data`.
    pub fn from_vec(data: Vec<u8>, read_only: bool) -> Self {
        MemoryDisk {
            storage: Storage::Heap(Box::into_raw(data.into_boxed_slice())),
            read_only,
            id: "memdisk".to_string(),
            flushes: AtomicU64::new(0),
        }
    }

    /// A disk holding `data` in a memfd: the same as [`MemoryDisk::from_vec`],
    /// but its file can be handed to asynchronous engines
    /// ([`BlockBackend::fd_for`]): reads, writes, discards and zeroing run
    /// on it. Flushes do not (there is nothing to make durable), so that
    /// [`MemoryDisk::flush_count`] sees every one.
    pub fn in_memfd(data: &[u8], read_only: bool) -> io::Result<Self> {
        // SAFETY: a NUL-terminated name and flags; no memory is passed.
        let fd = unsafe { libc::memfd_create(c"memdisk".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(data.len() as u64)?;
        let len = data.len();
        let ptr = if len == 0 {
            std::ptr::NonNull::<u8>::dangling().as_ptr()
        } else {
            // SAFETY: a new shared mapping of the whole file; no existing
            // memory is affected.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    file.as_raw_fd(),
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            p.cast()
        };
        let disk = MemoryDisk {
            storage: Storage::Memfd { file, ptr, len },
            read_only,
            id: "memdisk".to_string(),
            flushes: AtomicU64::new(0),
        };
        disk.bytes().copy_from(data);
        Ok(disk)
    }

    /// Replaces the id (truncated to 20 bytes).
    pub fn with_id(mut self, id: &str) -> Self {
        self.id = truncate_id(id.to_string());
        self
    }

    /// A copy of the disk's contents.
    pub fn contents(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len()];
        self.bytes().copy_to(&mut v);
        v
    }

    /// Number of flushes so far.
    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    fn len(&self) -> usize {
        match &self.storage {
            Storage::Heap(p) => p.len(),
            Storage::Memfd { len, .. } => *len,
        }
    }

    /// All the bytes.
    fn bytes(&self) -> VolatileSlice<'_> {
        let ptr = match &self.storage {
            Storage::Heap(p) => p.cast::<u8>(),
            Storage::Memfd { ptr, .. } => *ptr,
        };
        // SAFETY: `len` bytes at `ptr` are owned by the disk while it lives
        // and only accessed with volatile copies (here and by the kernel).
        unsafe { VolatileSlice::new(ptr, self.len()) }
    }

    /// The bytes of `[offset, offset + len)`, which must lie in the disk.
    fn span(&self, offset: u64, len: u64) -> io::Result<VolatileSlice<'_>> {
        check_range(self.len() as u64, offset, len)?;
        // Both within the disk, whose length is a usize.
        self.bytes()
            .subslice(offset as usize, len as usize)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
    }

    fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        check_writable(self.read_only)?;
        let span = self.span(offset, len)?;
        // A chunk at a time: the range may be as long as the disk.
        const CHUNK: usize = 64 << 10;
        let zeros = [0u8; CHUNK];
        let mut done = 0;
        while done < span.len() {
            let n = CHUNK.min(span.len() - done);
            let part = (span.subslice(done, n))
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            part.copy_from(&zeros[..n]);
            done += n;
        }
        Ok(())
    }

    fn memfd(&self) -> Option<RawFd> {
        match &self.storage {
            Storage::Memfd { file, .. } => Some(file.as_raw_fd()),
            Storage::Heap(_) => None,
        }
    }
}

impl BlockBackend for MemoryDisk {
    fn size(&self) -> u64 {
        self.len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.span(offset, buf.len() as u64)?.copy_to(buf);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        check_writable(self.read_only)?;
        self.span(offset, buf.len() as u64)?.copy_from(buf);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.zero(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.zero(offset, len)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn id(&self) -> String {
        self.id.clone()
    }

    fn file_backed(&self) -> bool {
        self.memfd().is_some()
    }

    fn page_cached(&self) -> bool {
        true
    }

    fn fd_for(&self, access: FdAccess<'_>) -> Option<RawFd> {
        let fd = self.memfd()?;
        let size = self.size();
        let ok = match access {
            FdAccess::Read { bufs, offset } => one_call_transfer(size, bufs, offset).is_some(),
            FdAccess::Write { bufs, offset } => {
                !self.read_only && one_call_transfer(size, bufs, offset).is_some()
            }
            // Counted by `flush` itself.
            FdAccess::Flush => false,
            FdAccess::Fallocate { offset, len } => {
                !self.read_only && check_range(size, offset, len).is_ok()
            }
        };
        ok.then_some(fd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_write_bounds() {
        let d = MemoryDisk::new(4096).unwrap();
        d.write_at(&[1, 2, 3], 4093).unwrap();
        let mut b = [0u8; 3];
        d.read_at(&mut b, 4093).unwrap();
        assert_eq!(b, [1, 2, 3]);
        assert_eq!(
            d.write_at(&[1, 2, 3], 4094).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert!(d.read_at(&mut b, u64::MAX).is_err());
        assert!(d.write_zeroes(4000, 97).is_err());
        d.write_zeroes(4093, 3).unwrap();
        d.read_at(&mut b, 4093).unwrap();
        assert_eq!(b, [0, 0, 0]);
        d.flush().unwrap();
        assert_eq!(d.flush_count(), 1);
    }

    #[test]
    fn read_only_refuses_writes() {
        let d = MemoryDisk::from_vec(vec![7; 512], true).with_id("0123456789abcdefghijKLM");
        assert_eq!(d.id(), "0123456789abcdefghij");
        assert!(d.read_only());
        assert_eq!(
            d.write_at(&[0], 0).unwrap_err().kind(),
            io::ErrorKind::PermissionDenied
        );
        assert!(d.discard(0, 1).is_err());
        assert!(d.write_zeroes(0, 1).is_err());
        assert_eq!(d.contents(), vec![7; 512]);
    }

    #[test]
    fn vectored_bounces() {
        use crate::storage::IoBuf;
        let d = MemoryDisk::new(8192).unwrap();
        let mut src = [1u8, 2, 3, 4, 5];
        let (a, b) = src.split_at_mut(2);
        // SAFETY: `src` outlives the buffers and is not otherwise used.
        let bufs = unsafe {
            [
                IoBuf::from_raw_parts(a.as_mut_ptr(), a.len()),
                IoBuf::from_raw_parts(b.as_mut_ptr(), b.len()),
            ]
        };
        d.write_vectored_at(&bufs, 4094).unwrap();
        let mut back = [0u8; 5];
        d.read_at(&mut back, 4094).unwrap();
        assert_eq!(back, [1, 2, 3, 4, 5]);
        let mut dst = [0u8; 5];
        let (a, b) = dst.split_at_mut(3);
        // SAFETY: as above, for `dst`.
        let bufs = unsafe {
            [
                IoBuf::from_raw_parts(a.as_mut_ptr(), a.len()),
                IoBuf::from_raw_parts(b.as_mut_ptr(), b.len()),
            ]
        };
        d.read_vectored_at(&bufs, 4094).unwrap();
        assert_eq!(dst, [1, 2, 3, 4, 5]);
        assert!(d.read_vectored_at(&bufs, 8190).is_err());
        let ro = MemoryDisk::from_vec(vec![0; 512], true);
        assert!(ro.write_vectored_at(&bufs, 0).is_err());
    }

    #[test]
    fn in_a_memfd_the_file_holds_the_bytes() {
        use std::os::unix::fs::FileExt;
        let d = MemoryDisk::in_memfd(&[5u8; 8192], false).unwrap();
        assert!(d.file_backed());
        d.write_at(&[1, 2, 3], 100).unwrap();
        let fd = d
            .fd_for(FdAccess::Fallocate {
                offset: 0,
                len: 8192,
            })
            .unwrap();
        // SAFETY: borrowed for the reads below, never closed here.
        let f = std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(fd) });
        let mut b = [0u8; 4];
        f.read_exact_at(&mut b, 99).unwrap();
        assert_eq!(b, [5, 1, 2, 3]);
        f.write_all_at(&[9], 8191).unwrap();
        assert_eq!(d.contents()[8190..], [5, 9]);
        assert!(d.fd_for(FdAccess::Flush).is_none());
        assert!(d
            .fd_for(FdAccess::Fallocate {
                offset: 8192,
                len: 1
            })
            .is_none());
        let ro = MemoryDisk::in_memfd(&[0; 512], true).unwrap();
        assert!(ro
            .fd_for(FdAccess::Fallocate { offset: 0, len: 1 })
            .is_none());
        assert!(!MemoryDisk::new(512).unwrap().file_backed());
    }

    #[test]
    fn too_large() {
        assert!(MemoryDisk::new(u64::MAX).is_err());
    }
}
