//! An in-memory disk, for tests and scratch devices.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::{check_range, check_writable, truncate_id, BlockBackend, StorageError};

/// A disk held in a `Vec<u8>`.
///
/// Discard zeroes the range, so reads after a discard are deterministic.
#[derive(Debug)]
pub struct MemoryDisk {
    data: RwLock<Vec<u8>>,
    read_only: bool,
    id: String,
    flushes: AtomicU64,
}

impl MemoryDisk {
    /// A zero-filled, writable disk of `size` bytes.
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
            data: RwLock::new(data),
            read_only,
            id: "memdisk".to_string(),
            flushes: AtomicU64::new(0),
        }
    }

    /// Replaces the id (truncated to 20 bytes).
    pub fn with_id(mut self, id: &str) -> Self {
        self.id = truncate_id(id.to_string());
        self
    }

    /// A copy of the whole contents.
    pub fn contents(&self) -> Vec<u8> {
        self.read().clone()
    }

    /// How many times [`BlockBackend::flush`] was called.
    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    fn read(&self) -> RwLockReadGuard<'_, Vec<u8>> {
        // A poisoned lock only means a panic elsewhere; the bytes are plain.
        self.data.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Vec<u8>> {
        self.data.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The range `[offset, offset + len)` as indices into the vector.
    fn span(&self, len_total: usize, offset: u64, len: u64) -> io::Result<std::ops::Range<usize>> {
        check_range(len_total as u64, offset, len)?;
        // Both fit in usize: they are bounded by the vector length.
        let start = offset as usize;
        Ok(start..start + len as usize)
    }

    fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        check_writable(self.read_only)?;
        let mut data = self.write();
        let span = self.span(data.len(), offset, len)?;
        data[span].fill(0);
        Ok(())
    }
}

impl BlockBackend for MemoryDisk {
    fn size(&self) -> u64 {
        self.read().len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let data = self.read();
        let span = self.span(data.len(), offset, buf.len() as u64)?;
        buf.copy_from_slice(&data[span]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        check_writable(self.read_only)?;
        let mut data = self.write();
        let span = self.span(data.len(), offset, buf.len() as u64)?;
        data[span].copy_from_slice(buf);
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
    fn too_large() {
        assert!(MemoryDisk::new(u64::MAX).is_err());
    }
}
