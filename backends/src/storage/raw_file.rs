//! A raw image file or block device, buffered or with `O_DIRECT`.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use super::{
    check_range, check_writable, io_bufs_len, truncate_id, BlockBackend, IoBuf, StorageError,
};

/// Offset, length and memory alignment used for `O_DIRECT` accesses. 4 KiB
/// satisfies every logical block size up to 4 KiB.
pub const DIRECT_IO_ALIGNMENT: u64 = 4096;

/// Largest single `O_DIRECT` transfer (size of the bounce buffer).
const DIRECT_CHUNK: u64 = 1 << 20;

/// Most iovecs passed to one `preadv`/`pwritev` (`IOV_MAX` on Linux).
const MAX_IOVECS: usize = 1024;

/// Chunk size of the zero-writing fallback of `write_zeroes`.
const ZERO_CHUNK: u64 = 1 << 20;

/// How to open a [`RawFile`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawFileOptions {
    /// Open read-only.
    pub read_only: bool,
    /// Bypass the host page cache with `O_DIRECT`.
    pub direct: bool,
}

/// A buffer whose start is aligned to [`DIRECT_IO_ALIGNMENT`].
#[derive(Debug)]
struct AlignedBuffer {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuffer {
    fn new(len: usize) -> Self {
        let align = DIRECT_IO_ALIGNMENT as usize;
        let storage = vec![0u8; len + align];
        // For a byte pointer `align_offset` is exact at run time and below
        // `align`; clamp anyway so indexing below can never go out of range.
        let start = storage.as_ptr().align_offset(align).min(align);
        AlignedBuffer {
            storage,
            start,
            len,
        }
    }

    fn as_mut_slice(&mut self, len: usize) -> &mut [u8] {
        let len = len.min(self.len);
        &mut self.storage[self.start..self.start + len]
    }
}

/// The `O_DIRECT` side of a [`RawFile`].
#[derive(Debug)]
struct DirectIo {
    file: File,
    /// Bounce buffer; the lock also serialises read-modify-write cycles.
    bounce: Mutex<AlignedBuffer>,
}

/// A raw disk image backed by a file or block device.
///
/// With [`RawFileOptions::direct`], accesses go through an aligned bounce
/// buffer on an `O_DIRECT` descriptor; unaligned edges are handled with
/// read-modify-write, and a trailing partial block (an image size that is
/// not a multiple of [`DIRECT_IO_ALIGNMENT`]) through the page cache.
#[derive(Debug)]
pub struct RawFile {
    file: File,
    direct: Option<DirectIo>,
    size: u64,
    read_only: bool,
    id: String,
}

fn round_down(v: u64) -> u64 {
    v & !(DIRECT_IO_ALIGNMENT - 1)
}

fn round_up(v: u64) -> Option<u64> {
    v.checked_add(DIRECT_IO_ALIGNMENT - 1).map(round_down)
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let off = libc::off64_t::try_from(offset)
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let len =
        libc::off64_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: fallocate only operates on the open fd owned by `file`; it
    // takes no pointers.
    let ret = unsafe { libc::fallocate64(file.as_raw_fd(), mode, off, len) };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::ENODEV)
    )
}

impl RawFile {
    /// Opens the image at `path`.
    pub fn open<P: AsRef<Path>>(path: P, options: RawFileOptions) -> Result<Self, StorageError> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let open = |direct: bool| {
            let mut o = OpenOptions::new();
            o.read(true).write(!options.read_only);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(path).map_err(|source| StorageError::Open {
                path: name.clone(),
                source,
            })
        };
        let file = open(false)?;
        let direct = if options.direct {
            Some(open(true)?)
        } else {
            None
        };
        Self::with_files(file, direct, options.read_only, &name)
    }

    /// An image on files opened elsewhere (another process handed them
    /// over): `file` for buffered access and, for `O_DIRECT`, `direct`
    /// (opened with it). The size is read from `file`; both must be
    /// open for writing unless `read_only`.
    pub fn from_files(
        file: File,
        direct: Option<File>,
        read_only: bool,
    ) -> Result<Self, StorageError> {
        let name = format!("fd {}", file.as_raw_fd());
        Self::with_files(file, direct, read_only, &name)
    }

    fn with_files(
        mut file: File,
        direct: Option<File>,
        read_only: bool,
        name: &str,
    ) -> Result<Self, StorageError> {
        let size_err = |source| StorageError::Size {
            path: name.to_string(),
            source,
        };
        // Works for regular files and block devices alike.
        let size = file.seek(SeekFrom::End(0)).map_err(size_err)?;
        let meta = file.metadata().map_err(size_err)?;
        let id = truncate_id(format!("{:x}{:x}{:x}", meta.dev(), meta.rdev(), meta.ino()));
        Ok(RawFile {
            file,
            direct: direct.map(|file| DirectIo {
                file,
                bounce: Mutex::new(AlignedBuffer::new(DIRECT_CHUNK as usize)),
            }),
            size,
            read_only,
            id,
        })
    }

    /// A zero-filled, writable disk of `size` bytes in memory, on a memfd
    /// (so that it can be handed to another process with its contents).
    pub fn in_memory(size: u64) -> Result<Self, StorageError> {
        let name = "in-memory disk";
        let open_err = |source| StorageError::Open {
            path: name.to_string(),
            source,
        };
        let len = i64::try_from(size).map_err(|_| StorageError::TooLarge(size))?;
        // SAFETY: a NUL-terminated name and flags; the result is checked.
        let fd = unsafe { libc::memfd_create(c"vfio-user-disk".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(open_err(io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        // SAFETY: ftruncate on the fd we own; no memory is passed.
        if unsafe { libc::ftruncate(file.as_raw_fd(), len) } < 0 {
            return Err(StorageError::TooLarge(size));
        }
        Self::with_files(file, None, false, name)
    }

    /// The files the image is open on: buffered, and `O_DIRECT` if in use
    /// (what [`RawFile::from_files`] takes).
    pub fn files(&self) -> (&File, Option<&File>) {
        (&self.file, self.direct.as_ref().map(|d| &d.file))
    }

    /// Replaces the id (truncated to 20 bytes).
    pub fn with_id(mut self, id: &str) -> Self {
        self.id = truncate_id(id.to_string());
        self
    }

    /// Whether `O_DIRECT` is in use.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// Splits `[offset, end)` into the part served by `O_DIRECT` and the
    /// part after the last full aligned block.
    fn direct_split(&self, offset: u64, end: u64) -> u64 {
        let direct_end = round_down(self.size);
        direct_end.clamp(offset, end)
    }

    fn lock(d: &DirectIo) -> MutexGuard<'_, AlignedBuffer> {
        d.bounce.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `O_DIRECT` read of `[offset, offset + buf.len())`, which lies below
    /// the last full aligned block.
    fn direct_read(d: &DirectIo, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut bounce = Self::lock(d);
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let a_start = round_down(pos);
            let a_end = round_up(end)
                .ok_or(io::ErrorKind::InvalidInput)?
                .min(a_start + DIRECT_CHUNK);
            let chunk = bounce.as_mut_slice((a_end - a_start) as usize);
            d.file.read_exact_at(chunk, a_start)?;
            let copy_end = end.min(a_end);
            let from = (pos - a_start) as usize;
            let n = (copy_end - pos) as usize;
            let done = (pos - offset) as usize;
            buf[done..done + n].copy_from_slice(&chunk[from..from + n]);
            pos = copy_end;
        }
        Ok(())
    }

    /// Fills `buf` from `offset` (within the image), through the page
    /// cache or `O_DIRECT`.
    fn read_exact(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match &self.direct {
            None => self.file.read_exact_at(buf, offset),
            Some(d) => {
                let end = offset + buf.len() as u64;
                let split = self.direct_split(offset, end);
                let (head, tail) = buf.split_at_mut((split - offset) as usize);
                if !head.is_empty() {
                    Self::direct_read(d, head, offset)?;
                }
                if !tail.is_empty() {
                    self.file.read_exact_at(tail, split)?;
                }
                Ok(())
            }
        }
    }

    /// `O_DIRECT` write, with read-modify-write of unaligned edges.
    fn direct_write(d: &DirectIo, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut bounce = Self::lock(d);
        let end = offset + buf.len() as u64;
        let block = DIRECT_IO_ALIGNMENT as usize;
        let mut pos = offset;
        while pos < end {
            let a_start = round_down(pos);
            let a_end = round_up(end)
                .ok_or(io::ErrorKind::InvalidInput)?
                .min(a_start + DIRECT_CHUNK);
            let copy_end = end.min(a_end);
            let len = (a_end - a_start) as usize;
            let chunk = bounce.as_mut_slice(len);
            if pos != a_start {
                d.file.read_exact_at(&mut chunk[..block], a_start)?;
            }
            if copy_end != a_end {
                d.file
                    .read_exact_at(&mut chunk[len - block..], a_end - block as u64)?;
            }
            let from = (pos - a_start) as usize;
            let n = (copy_end - pos) as usize;
            let done = (pos - offset) as usize;
            chunk[from..from + n].copy_from_slice(&buf[done..done + n]);
            d.file.write_all_at(chunk, a_start)?;
            pos = copy_end;
        }
        Ok(())
    }
}

/// A read found the end of the file before the end of the disk: the image
/// shrank under the device (truncated by someone else). Reads there fail
/// rather than read zeros, so that data lost with the tail of the image
/// never passes for data.
fn shorter_than_disk() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the image file ends before the disk does (truncated?)",
    )
}

/// Turns the end-of-file error of `read_exact_at` into
/// [`shorter_than_disk`].
fn eof_is_truncation(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        shorter_than_disk()
    } else {
        e
    }
}

/// One `preadv` (`write == false`) or `pwritev` of `bufs` (at most
/// `IOV_MAX`) at `offset`, retried after `EINTR`. Returns the number of
/// bytes transferred; a transfer of nothing while `bufs` is not empty fails
/// with `UnexpectedEof` (a read at the end of the file) or `WriteZero`.
fn transfer_once(file: &File, bufs: &[IoBuf<'_>], offset: u64, write: bool) -> io::Result<usize> {
    let off = libc::off64_t::try_from(offset)
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // `bufs` is at most MAX_IOVECS long.
    let n = bufs.len() as libc::c_int;
    loop {
        let ret = if let [one] = bufs {
            // One buffer (a 4 KiB request, typically): plain pread/pwrite
            // skip the kernel's iovec import, about 8% of a 4 KiB read.
            if write {
                // SAFETY: `one` describes memory valid for the call
                // (`IoBuf`'s contract); the kernel only reads it.
                unsafe { libc::pwrite64(file.as_raw_fd(), one.as_ptr().cast(), one.len(), off) }
            } else {
                // SAFETY: as for `preadv64` below, for one buffer.
                unsafe { libc::pread64(file.as_raw_fd(), one.as_ptr().cast(), one.len(), off) }
            }
        } else if write {
            // SAFETY: `bufs` is `n` valid iovecs (`IoBuf` is a transparent
            // `iovec`), each describing memory that stays valid for the
            // call (`IoBuf`'s contract); the kernel only reads it.
            unsafe { libc::pwritev64(file.as_raw_fd(), IoBuf::as_iovecs(bufs), n, off) }
        } else {
            // SAFETY: as above; the kernel writes into the buffers, which
            // `IoBuf` guarantees are writable memory that nobody accesses
            // through Rust references, so the guest modifying it at the same
            // time only makes the bytes unspecified.
            unsafe { libc::preadv64(file.as_raw_fd(), IoBuf::as_iovecs(bufs), n, off) }
        };
        if ret > 0 {
            return Ok(ret as usize);
        }
        if ret == 0 {
            if bufs.iter().all(IoBuf::is_empty) {
                return Ok(0);
            }
            return Err(if write {
                io::Error::from(io::ErrorKind::WriteZero)
            } else {
                shorter_than_disk()
            });
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `preadv` (`write == false`) or `pwritev` of all of `bufs` at `offset`,
/// straight from or into their memory, continuing after short transfers.
fn transfer_vectored(file: &File, bufs: &[IoBuf<'_>], offset: u64, write: bool) -> io::Result<()> {
    let mut pos = offset;
    let mut rest = bufs;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(MAX_IOVECS)];
        let mut done = transfer_once(file, batch, pos, write)?;
        pos += done as u64;
        // Skip the buffers done (and empty ones).
        let mut i = 0;
        while i < batch.len() && done >= batch[i].len() {
            done -= batch[i].len();
            i += 1;
        }
        rest = &rest[i..];
        if done > 0 {
            // A short transfer ended inside `rest[0]`: finish it alone.
            let b = rest[0];
            while done < b.len() {
                // SAFETY: a suffix of the memory of a valid `IoBuf` is
                // valid under the same contract, for the same lifetime.
                let tail = unsafe { IoBuf::from_raw_parts(b.as_ptr().add(done), b.len() - done) };
                let n = transfer_once(file, &[tail], pos, write)?;
                done += n;
                pos += n as u64;
            }
            rest = &rest[1..];
        }
    }
    Ok(())
}

impl BlockBackend for RawFile {
    fn read_vectored_at(&self, bufs: &[IoBuf<'_>], offset: u64) -> io::Result<()> {
        let total = io_bufs_len(bufs)?;
        check_range(self.size, offset, total)?;
        match &self.direct {
            None => transfer_vectored(&self.file, bufs, offset, false),
            // O_DIRECT needs aligned memory: bounce.
            Some(_) => super::bounce_read_vectored(self, bufs, offset),
        }
    }

    fn write_vectored_at(&self, bufs: &[IoBuf<'_>], offset: u64) -> io::Result<()> {
        check_writable(self.read_only)?;
        let total = io_bufs_len(bufs)?;
        check_range(self.size, offset, total)?;
        match &self.direct {
            None => transfer_vectored(&self.file, bufs, offset, true),
            Some(_) => super::bounce_write_vectored(self, bufs, offset),
        }
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let len = buf.len() as u64;
        check_range(self.size, offset, len)?;
        self.read_exact(buf, offset).map_err(eof_is_truncation)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        check_writable(self.read_only)?;
        let len = buf.len() as u64;
        check_range(self.size, offset, len)?;
        match &self.direct {
            None => self.file.write_all_at(buf, offset),
            Some(d) => {
                let split = self.direct_split(offset, offset + len);
                let (head, tail) = buf.split_at((split - offset) as usize);
                if !head.is_empty() {
                    Self::direct_write(d, head, offset)?;
                }
                if !tail.is_empty() {
                    self.file.write_all_at(tail, split)?;
                }
                Ok(())
            }
        }
    }

    fn flush(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        check_writable(self.read_only)?;
        check_range(self.size, offset, len)?;
        match fallocate(
            &self.file,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            // Discard is a hint: a file system without hole punching just
            // keeps the data.
            Err(e) if unsupported(&e) => Ok(()),
            r => r,
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        check_writable(self.read_only)?;
        check_range(self.size, offset, len)?;
        match fallocate(
            &self.file,
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Err(e) if unsupported(&e) => {
                let zeroes = vec![0u8; len.min(ZERO_CHUNK) as usize];
                let mut pos = offset;
                let end = offset + len;
                while pos < end {
                    let n = (end - pos).min(ZERO_CHUNK);
                    self.write_at(&zeroes[..n as usize], pos)?;
                    pos += n;
                }
                Ok(())
            }
            r => r,
        }
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
    use vmm_sys_util::tempfile::TempFile;

    fn image(size: u64) -> TempFile {
        let t = TempFile::new().unwrap();
        t.as_file().set_len(size).unwrap();
        t
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn open(t: &TempFile, direct: bool) -> Option<RawFile> {
        match RawFile::open(
            t.as_path(),
            RawFileOptions {
                read_only: false,
                direct,
            },
        ) {
            Ok(f) => Some(f),
            // tmpfs on old kernels refuses O_DIRECT.
            Err(StorageError::Open { source, .. })
                if direct && source.raw_os_error() == Some(libc::EINVAL) =>
            {
                None
            }
            Err(e) => panic!("{e}"),
        }
    }

    fn exercise(f: &RawFile, size: u64) {
        assert_eq!(f.size(), size);
        // Unaligned head, crossing blocks, unaligned tail.
        let data = pattern(10000, 3);
        f.write_at(&data, 1000).unwrap();
        let mut back = vec![0u8; 10000];
        f.read_at(&mut back, 1000).unwrap();
        assert_eq!(back, data);
        // Surrounding bytes untouched by read-modify-write.
        let mut edge = [0xffu8; 8];
        f.read_at(&mut edge, 992).unwrap();
        assert_eq!(edge, [0; 8]);
        f.read_at(&mut edge, 11000).unwrap();
        assert_eq!(edge, [0; 8]);
        // Larger than a bounce buffer.
        let big = pattern(3 << 20, 9);
        f.write_at(&big, 512).unwrap();
        let mut back = vec![0u8; 3 << 20];
        f.read_at(&mut back, 512).unwrap();
        assert_eq!(back, big);
        // The very end, including a partial trailing block.
        let tail = pattern(700, 1);
        f.write_at(&tail, size - 700).unwrap();
        let mut back = vec![0u8; 700];
        f.read_at(&mut back, size - 700).unwrap();
        assert_eq!(back, tail);
        // Out of range.
        assert!(f.write_at(&[1], size).is_err());
        assert!(f.read_at(&mut [0u8; 2], size - 1).is_err());
        assert!(f.read_at(&mut [0u8; 2], u64::MAX).is_err());
        assert!(f.discard(size, 1).is_err());
        assert!(f.write_zeroes(u64::MAX, 2).is_err());
        // Zeroing and discarding.
        f.write_zeroes(1000, 5000).unwrap();
        let mut back = vec![0xffu8; 5000];
        f.read_at(&mut back, 1000).unwrap();
        assert!(back.iter().all(|b| *b == 0));
        let mut after = [0u8; 4];
        f.read_at(&mut after, 6000).unwrap();
        assert_eq!(&after, &big[6000 - 512..6004 - 512]);
        f.discard(0, 4096).unwrap();
        f.flush().unwrap();
    }

    /// Vectored transfers through `f`, checked against `read_at`.
    fn exercise_vectored(f: &RawFile, size: u64) {
        let data = pattern(3 * 4096 + 100, 5);
        let mut src = data.clone();
        let (a, rest) = src.split_at_mut(100);
        let (b, c) = rest.split_at_mut(4096);
        let bufs = |a: &mut [u8], b: &mut [u8], c: &mut [u8]| {
            // SAFETY: the slices are valid and exclusively borrowed for the
            // returned buffers' use below.
            unsafe {
                [
                    IoBuf::from_raw_parts(a.as_mut_ptr(), a.len()),
                    IoBuf::empty(),
                    IoBuf::from_raw_parts(b.as_mut_ptr(), b.len()),
                    IoBuf::from_raw_parts(c.as_mut_ptr(), c.len()),
                ]
            }
        };
        f.write_vectored_at(&bufs(a, b, c), 4096 + 512).unwrap();
        let mut back = vec![0u8; data.len()];
        f.read_at(&mut back, 4096 + 512).unwrap();
        assert_eq!(back, data);
        let mut dst = vec![0u8; data.len()];
        let (a, rest) = dst.split_at_mut(7);
        let (b, c) = rest.split_at_mut(5000);
        f.read_vectored_at(&bufs(a, b, c), 4096 + 512).unwrap();
        assert_eq!(dst, data);
        // Out of range, in whole or in part.
        let mut one = [0u8; 2];
        // SAFETY: `one` outlives the buffer.
        let buf = [unsafe { IoBuf::from_raw_parts(one.as_mut_ptr(), one.len()) }];
        assert!(f.read_vectored_at(&buf, size - 1).is_err());
        assert!(f.write_vectored_at(&buf, u64::MAX).is_err());
        f.read_vectored_at(&buf, size - 2).unwrap();
        f.read_vectored_at(&[], size).unwrap();
    }

    #[test]
    fn buffered() {
        let size = (8 << 20) + 1536;
        let t = image(size);
        let f = open(&t, false).unwrap();
        assert!(!f.is_direct());
        assert!(f.id().len() <= 20);
        exercise(&f, size);
        exercise_vectored(&f, size);
    }

    #[test]
    fn direct() {
        let size = (8 << 20) + 1536;
        let t = image(size);
        let Some(f) = open(&t, true) else { return };
        assert!(f.is_direct());
        exercise(&f, size);
        exercise_vectored(&f, size);
        // What went through O_DIRECT is visible through the page cache.
        let mut b = vec![0u8; 700];
        t.as_file().read_exact_at(&mut b, size - 700).unwrap();
        assert_eq!(b, pattern(700, 1));
    }

    #[test]
    fn reads_past_the_end_of_a_truncated_image_fail() {
        for direct in [false, true] {
            let size = 64 << 10;
            let t = image(size);
            let Some(f) = open(&t, direct) else { continue };
            f.write_at(&pattern(size as usize, 2), 0).unwrap();
            // Someone cuts the image under the device, not on a block
            // boundary; the device still has the old size.
            t.as_file().set_len(20000).unwrap();
            assert_eq!(f.size(), size);
            let mut b = vec![0u8; 4096];
            f.read_at(&mut b, 8192).unwrap();
            assert_eq!(b, pattern(size as usize, 2)[8192..12288]);
            // Ending past the cut, or starting there: an error, never zeros.
            for offset in [16384, 32768] {
                let e = f.read_at(&mut b, offset).unwrap_err();
                assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
                assert!(e.to_string().contains("truncated"), "{e}");
                // SAFETY: `b` outlives the buffer.
                let buf = [unsafe { IoBuf::from_raw_parts(b.as_mut_ptr(), b.len()) }];
                let e = f.read_vectored_at(&buf, offset).unwrap_err();
                assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
            }
            // A write there grows the file again, and reads back.
            f.write_at(&[7u8; 4096], 32768).unwrap();
            f.read_at(&mut b, 32768).unwrap();
            assert_eq!(b, [7u8; 4096]);
        }
    }

    #[test]
    fn read_only_and_missing() {
        let t = image(4096);
        let f = RawFile::open(
            t.as_path(),
            RawFileOptions {
                read_only: true,
                direct: false,
            },
        )
        .unwrap()
        .with_id("serial");
        assert!(f.read_only());
        assert_eq!(f.id(), "serial");
        assert!(f.write_at(&[1], 0).is_err());
        let mut b = [0u8; 1];
        // SAFETY: `b` outlives the buffer.
        let buf = [unsafe { IoBuf::from_raw_parts(b.as_mut_ptr(), 1) }];
        assert_eq!(
            f.write_vectored_at(&buf, 0).unwrap_err().kind(),
            io::ErrorKind::PermissionDenied
        );
        assert!(f.write_zeroes(0, 1).is_err());
        f.flush().unwrap();
        assert!(RawFile::open("/nonexistent/image", RawFileOptions::default()).is_err());
    }

    #[test]
    fn in_memory_disks_are_shared_through_their_files() {
        let d = RawFile::in_memory(1 << 20).unwrap();
        assert_eq!(d.size(), 1 << 20);
        assert!(!d.read_only());
        let w = pattern(8192, 3);
        d.write_at(&w, 4096).unwrap();
        d.flush().unwrap();
        // Another process would get these fds: the same contents, the
        // same id.
        let (file, direct) = d.files();
        assert!(direct.is_none());
        let again = RawFile::from_files(file.try_clone().unwrap(), None, false).unwrap();
        assert_eq!(again.size(), 1 << 20);
        assert_eq!(again.id(), d.id());
        let mut r = vec![0u8; 8192];
        again.read_at(&mut r, 4096).unwrap();
        assert_eq!(r, w);
        // Discard and write-zeroes read back as zeros.
        again.discard(4096, 4096).unwrap();
        again.write_zeroes(8192, 4096).unwrap();
        d.read_at(&mut r, 4096).unwrap();
        assert!(r.iter().all(|b| *b == 0));
        assert!(d.read_at(&mut r, (1 << 20) - 4096).is_err());
        let ro = RawFile::from_files(file.try_clone().unwrap(), None, true).unwrap();
        assert!(ro.write_at(&w, 0).is_err());
    }

    #[test]
    fn an_image_and_its_direct_fd_taken_over() {
        let t = image(1 << 20);
        let Some(d) = open(&t, true) else {
            return;
        };
        let (file, direct) = d.files();
        let taken = RawFile::from_files(
            file.try_clone().unwrap(),
            direct.map(|f| f.try_clone().unwrap()),
            false,
        )
        .unwrap();
        assert!(taken.is_direct());
        let w = pattern(4096 + 512, 9);
        taken.write_at(&w, 512).unwrap();
        let mut r = vec![0u8; w.len()];
        d.read_at(&mut r, 512).unwrap();
        assert_eq!(r, w);
    }
}
