//! Block storage back ends.
//!
//! A [`BlockBackend`] is a fixed-size, byte-addressed disk image. Device
//! models translate guest requests into calls on it; every call is checked
//! against [`BlockBackend::size`] and fails with
//! [`io::ErrorKind::InvalidInput`] instead of panicking when out of range.

mod memory;
mod raw_file;

use std::io;

use thiserror::Error;

pub use memory::MemoryDisk;
pub use raw_file::{RawFile, RawFileOptions, DIRECT_IO_ALIGNMENT};

/// Maximum length of a back-end id, in bytes (`VIRTIO_BLK_ID_BYTES`).
pub const BLOCK_ID_BYTES: usize = 20;

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
