//! A raw image file or block device, buffered or with `O_DIRECT`.
//!
//! With `O_DIRECT` a transfer goes straight between the image and the
//! caller's buffers (guest memory) when it can: a range aligned to the
//! file's `O_DIRECT` offset alignment, in buffers aligned to its memory
//! alignment (`statx` `STATX_DIOALIGN`; 4 KiB when the file system does
//! not say), is one `preadv`/`pwritev`. Buffers that are not aligned are
//! copied through an aligned bounce buffer, all of them together in the
//! same call as the aligned ones. A range that is not aligned is read,
//! or read, modified and written, a block-aligned window at a time.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use super::{
    check_range, check_writable, io_bufs_len, one_call_transfer, truncate_id, BlockBackend,
    FdAccess, IoBuf, StorageError, MAX_IOVECS,
};

/// Offset, length and memory alignment used for `O_DIRECT` accesses when
/// the file system does not tell its own (`STATX_DIOALIGN`). 4 KiB
/// satisfies every logical block size up to 4 KiB.
pub const DIRECT_IO_ALIGNMENT: u64 = 4096;

/// Largest `O_DIRECT` alignment believed; a file system claiming more is
/// treated as if it said nothing.
const MAX_DIRECT_ALIGNMENT: u64 = 64 << 10;

/// Size of a bounce buffer: the most bytes copied per system call on the
/// bounced paths.
const BOUNCE_BYTES: usize = 1 << 20;

/// Bounce buffers kept for reuse per image.
const SPARE_BOUNCE_BUFFERS: usize = 4;

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

/// A buffer whose start is aligned to `align`.
#[derive(Debug)]
struct AlignedBuffer {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuffer {
    fn new(len: usize, align: usize) -> Self {
        let storage = vec![0u8; len + align];
        // For a byte pointer `align_offset` is exact at run time and below
        // `align`; clamp anyway so the buffer can never leave its storage.
        let start = storage.as_ptr().align_offset(align).min(align);
        AlignedBuffer {
            storage,
            start,
            len,
        }
    }

    /// The aligned bytes.
    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// Rounds `v` down to a multiple of `align`, a power of two.
fn round_down(v: u64, align: u64) -> u64 {
    v & !(align - 1)
}

/// Rounds `v` up to a multiple of `align`, a power of two.
fn round_up(v: u64, align: u64) -> io::Result<u64> {
    v.checked_add(align - 1)
        .map(|v| round_down(v, align))
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))
}

fn invalid<E: std::error::Error + Send + Sync + 'static>(e: E) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e)
}

/// A position in a list of buffers, for copies between them and a bounce
/// buffer.
struct SgCursor<'b, 'a> {
    bufs: &'b [IoBuf<'a>],
    index: usize,
    offset: usize,
}

impl<'b, 'a> SgCursor<'b, 'a> {
    fn new(bufs: &'b [IoBuf<'a>]) -> Self {
        SgCursor {
            bufs,
            index: 0,
            offset: 0,
        }
    }

    /// Copies `bounce.len()` bytes between the buffers at the cursor and
    /// `bounce` (into the buffers if `to_bufs`), and moves past them.
    fn copy(&mut self, bounce: &mut [u8], to_bufs: bool) -> io::Result<()> {
        let mut done = 0;
        while done < bounce.len() {
            let b = self
                .bufs
                .get(self.index)
                .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
            let n = (b.len() - self.offset).min(bounce.len() - done);
            if n == 0 {
                self.index += 1;
                self.offset = 0;
                continue;
            }
            let s = b.as_volatile_slice();
            let s = s.subslice(self.offset, n).map_err(invalid)?;
            if to_bufs {
                s.copy_from(&bounce[done..done + n]);
            } else {
                s.copy_to(&mut bounce[done..done + n]);
            }
            done += n;
            self.offset += n;
        }
        Ok(())
    }
}

/// Splits `bufs` at byte `at` of their concatenation.
fn split_bufs<'a>(bufs: &[IoBuf<'a>], mut at: usize) -> (Vec<IoBuf<'a>>, Vec<IoBuf<'a>>) {
    let mut head = Vec::new();
    let mut tail = Vec::new();
    for b in bufs {
        if at >= b.len() {
            head.push(*b);
            at -= b.len();
        } else if at == 0 {
            tail.push(*b);
        } else {
            // SAFETY: both pieces are parts of the memory of a valid
            // `IoBuf`, valid under the same contract for the same lifetime.
            unsafe {
                head.push(IoBuf::from_raw_parts(b.as_ptr(), at));
                tail.push(IoBuf::from_raw_parts(b.as_ptr().add(at), b.len() - at));
            }
            at = 0;
        }
    }
    (head, tail)
}

/// A piece of a caller's buffer that goes through the bounce buffer.
struct Bounced {
    /// Offset in the bounce buffer.
    at: usize,
    /// Index of the buffer.
    buf: usize,
    /// Offset in the buffer.
    offset: usize,
    /// Length.
    len: usize,
}

/// The `O_DIRECT` side of a [`RawFile`].
#[derive(Debug)]
struct DirectIo {
    file: File,
    /// Alignment of file offsets and lengths (a power of two).
    offset_align: u64,
    /// Alignment of memory addresses (a power of two).
    mem_align: usize,
    /// Held exclusively by read-modify-write cycles and shared by the
    /// other writes: a cycle must not write back a block another write
    /// changed while it was modifying its copy. Reads need no lock.
    rmw: RwLock<()>,
    /// Bounce buffers of [`BOUNCE_BYTES`], kept for reuse.
    spare: Mutex<Vec<AlignedBuffer>>,
    /// Bytes copied through bounce buffers.
    bounced: AtomicU64,
}

impl DirectIo {
    fn new(file: File) -> Self {
        let (offset_align, mem_align) = dio_alignment(&file);
        DirectIo {
            file,
            offset_align,
            mem_align,
            rmw: RwLock::new(()),
            spare: Mutex::new(Vec::new()),
            bounced: AtomicU64::new(0),
        }
    }

    /// The shared side of `rmw`, held by every write that is no
    /// read-modify-write cycle.
    fn plain_write(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.rmw.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `b` can be handed to the kernel as it is.
    fn aligned(&self, b: &IoBuf<'_>) -> bool {
        b.is_empty()
            || ((b.as_ptr() as usize) & (self.mem_align - 1) == 0
                && (b.len() as u64) & (self.offset_align - 1) == 0)
    }

    /// Whether `bufs` at `offset` can be transferred in one straight
    /// `preadv`/`pwritev`.
    fn straight(&self, bufs: &[IoBuf<'_>], offset: u64) -> bool {
        offset & (self.offset_align - 1) == 0
            && bufs.len() <= MAX_IOVECS
            && bufs.iter().all(|b| self.aligned(b))
    }

    fn take_bounce(&self) -> AlignedBuffer {
        let spare = self.spare.lock().unwrap_or_else(|e| e.into_inner()).pop();
        // At least a page: the memory alignment of the file may be below it.
        let align = (self.mem_align.max(self.offset_align as usize)).max(4096);
        spare.unwrap_or_else(|| AlignedBuffer::new(BOUNCE_BYTES, align))
    }

    fn put_bounce(&self, b: AlignedBuffer) {
        let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
        if spare.len() < SPARE_BOUNCE_BUFFERS {
            spare.push(b);
        }
    }

    /// Moves `total` bytes between `bufs` and `[offset, offset + total)`,
    /// which lies below the last full aligned block of the image.
    fn transfer(&self, bufs: &[IoBuf<'_>], offset: u64, total: u64, write: bool) -> io::Result<()> {
        if (offset | total) & (self.offset_align - 1) != 0 {
            let _cycle = self.rmw.write().unwrap_or_else(|e| e.into_inner());
            return self.unaligned(bufs, offset, total, write);
        }
        let _write = write.then(|| self.plain_write());
        if bufs.iter().all(|b| self.aligned(b)) {
            // The usual case (guest pages): straight into guest memory.
            return transfer_vectored(&self.file, bufs, offset, write);
        }
        let mut bounce = self.take_bounce();
        let r = self.bounce_misaligned(&mut bounce, bufs, offset, write);
        self.put_bounce(bounce);
        r
    }

    /// An aligned range in buffers some of which are not aligned: the
    /// aligned buffers go as they are and each run of the others through
    /// the bounce buffer, all in the same `preadv`/`pwritev` (one per
    /// bounce buffer's worth).
    fn bounce_misaligned(
        &self,
        bounce: &mut AlignedBuffer,
        bufs: &[IoBuf<'_>],
        offset: u64,
        write: bool,
    ) -> io::Result<()> {
        let cap = bounce.len;
        // Raw pointers only from here: the iovecs and the copies both
        // point into the bounce buffer.
        let base = bounce.as_mut_slice().as_mut_ptr();
        let mut batch = BounceBatch {
            file: &self.file,
            bufs,
            base,
            write,
            iov: Vec::with_capacity(bufs.len().min(MAX_IOVECS)),
            copies: Vec::new(),
            used: 0,
            run: None,
            start: offset,
            pos: offset,
            bounced: 0,
        };
        let r = (|| {
            for (k, b) in bufs.iter().enumerate() {
                if b.is_empty() {
                    continue;
                }
                if batch.run.is_none() && self.aligned(b) {
                    if batch.iov.len() + 1 >= MAX_IOVECS {
                        batch.flush()?;
                    }
                    batch.iov.push(*b);
                    batch.pos += b.len() as u64;
                    continue;
                }
                let mut done = 0;
                while done < b.len() {
                    if batch.run.is_none() {
                        if batch.iov.len() + 1 >= MAX_IOVECS || batch.used == cap {
                            batch.flush()?;
                        }
                        batch.run = Some(batch.used);
                    }
                    let n = (b.len() - done).min(cap - batch.used);
                    batch.copies.push(Bounced {
                        at: batch.used,
                        buf: k,
                        offset: done,
                        len: n,
                    });
                    batch.used += n;
                    batch.pos += n as u64;
                    done += n;
                    if batch.used == cap {
                        // Runs start aligned and the buffer's size is a
                        // multiple of the alignment: this ends aligned.
                        batch.close_run();
                        batch.flush()?;
                    }
                }
                // A run ends where the range is aligned again, so that
                // the next aligned buffer can go as it is.
                if batch.run.is_some() && batch.pos & (self.offset_align - 1) == 0 {
                    batch.close_run();
                }
            }
            batch.close_run();
            batch.flush()
        })();
        self.bounced.fetch_add(batch.bounced, Ordering::Relaxed);
        r
    }

    /// A range that is not aligned: a block-aligned window at a time, read
    /// (and for a write, its partial edge blocks read first, then written
    /// whole) through the bounce buffer. The caller holds `rmw` for a
    /// write.
    fn unaligned(
        &self,
        bufs: &[IoBuf<'_>],
        offset: u64,
        total: u64,
        write: bool,
    ) -> io::Result<()> {
        let mut bounce = self.take_bounce();
        let r = self.unaligned_with(&mut bounce, bufs, offset, total, write);
        self.put_bounce(bounce);
        if r.is_ok() {
            self.bounced.fetch_add(total, Ordering::Relaxed);
        }
        r
    }

    fn unaligned_with(
        &self,
        bounce: &mut AlignedBuffer,
        bufs: &[IoBuf<'_>],
        offset: u64,
        total: u64,
        write: bool,
    ) -> io::Result<()> {
        let align = self.offset_align;
        let block = align as usize;
        let cap = bounce.len as u64;
        let end = offset + total;
        let mut cursor = SgCursor::new(bufs);
        let mut pos = offset;
        while pos < end {
            let a_start = round_down(pos, align);
            let a_end = round_up(end, align)?.min(a_start + cap);
            let copy_end = end.min(a_end);
            let len = (a_end - a_start) as usize;
            let chunk = &mut bounce.as_mut_slice()[..len];
            let from = (pos - a_start) as usize;
            let n = (copy_end - pos) as usize;
            if write {
                if pos != a_start {
                    self.file.read_exact_at(&mut chunk[..block], a_start)?;
                }
                if copy_end != a_end {
                    self.file
                        .read_exact_at(&mut chunk[len - block..], a_end - align)?;
                }
                cursor.copy(&mut chunk[from..from + n], false)?;
                self.file.write_all_at(chunk, a_start)?;
            } else {
                self.file.read_exact_at(chunk, a_start)?;
                cursor.copy(&mut chunk[from..from + n], true)?;
            }
            pos = copy_end;
        }
        Ok(())
    }
}

/// One `preadv`/`pwritev` being put together from aligned buffers and
/// runs of bounced ones ([`DirectIo::bounce_misaligned`]).
struct BounceBatch<'f, 'b, 'a> {
    file: &'f File,
    bufs: &'b [IoBuf<'a>],
    /// Start of the bounce buffer.
    base: *mut u8,
    write: bool,
    iov: Vec<IoBuf<'b>>,
    copies: Vec<Bounced>,
    /// Bytes of the bounce buffer in use.
    used: usize,
    /// Where the open run starts in the bounce buffer.
    run: Option<usize>,
    /// File offset of the batch.
    start: u64,
    /// File offset of the end of the batch.
    pos: u64,
    /// Bytes bounced so far.
    bounced: u64,
}

impl BounceBatch<'_, '_, '_> {
    /// Ends the open run: its part of the bounce buffer becomes an iovec.
    fn close_run(&mut self) {
        if let Some(at) = self.run.take() {
            // SAFETY: `[at, used)` lies in the bounce buffer, which outlives
            // the batch and is only accessed through `base` meanwhile.
            let b = unsafe { IoBuf::from_raw_parts(self.base.add(at), self.used - at) };
            self.iov.push(b);
        }
    }

    /// Copies one bounced piece between the bounce buffer and its buffer.
    fn copy(&self, c: &Bounced, to_bufs: bool) -> io::Result<()> {
        // SAFETY: `[at, at + len)` lies in the bounce buffer (below `used`),
        // which no iovec is using outside a system call.
        let bounce = unsafe { std::slice::from_raw_parts_mut(self.base.add(c.at), c.len) };
        let b = self
            .bufs
            .get(c.buf)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let s = b.as_volatile_slice();
        let s = s.subslice(c.offset, c.len).map_err(invalid)?;
        if to_bufs {
            s.copy_from(bounce);
        } else {
            s.copy_to(bounce);
        }
        Ok(())
    }

    /// Runs the batch, which ends aligned and has no open run.
    fn flush(&mut self) -> io::Result<()> {
        if self.iov.is_empty() {
            return Ok(());
        }
        if self.write {
            for c in &self.copies {
                self.copy(c, false)?;
            }
        }
        transfer_vectored(self.file, &self.iov, self.start, self.write)?;
        if !self.write {
            for c in &self.copies {
                self.copy(c, true)?;
            }
        }
        self.bounced += self.copies.iter().map(|c| c.len as u64).sum::<u64>();
        self.iov.clear();
        self.copies.clear();
        self.used = 0;
        self.start = self.pos;
        Ok(())
    }
}

/// The `O_DIRECT` offset and memory alignment of `file`, as `statx` tells
/// them, or [`DIRECT_IO_ALIGNMENT`] for both.
fn dio_alignment(file: &File) -> (u64, usize) {
    // SAFETY: `statx` is plain integers, for which all zeroes is valid.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor, an empty NUL-terminated path with
    // AT_EMPTY_PATH (the descriptor itself) and a writable `statx`.
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    let offset = u64::from(stx.stx_dio_offset_align);
    let mem = u64::from(stx.stx_dio_mem_align);
    let sane = |a: u64| a.is_power_of_two() && a <= MAX_DIRECT_ALIGNMENT;
    if r == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 && sane(offset) && sane(mem) {
        (offset, mem as usize)
    } else {
        (DIRECT_IO_ALIGNMENT, DIRECT_IO_ALIGNMENT as usize)
    }
}

/// A raw disk image backed by a file or block device.
///
/// With [`RawFileOptions::direct`], accesses go through an `O_DIRECT`
/// descriptor, straight from and into the caller's buffers when they and
/// the range are aligned, through a bounce buffer otherwise (see the
/// module documentation); a trailing partial block (an image size that is
/// not a multiple of the alignment) goes through the page cache.
#[derive(Debug)]
pub struct RawFile {
    file: File,
    direct: Option<DirectIo>,
    size: u64,
    read_only: bool,
    id: String,
    /// A flush of the page cache failed: Linux marks the pages it could
    /// not write clean and reports the error once, so a later `fdatasync`
    /// would succeed with those writes lost. Every later flush fails.
    writeback_lost: AtomicBool,
}

/// The error of every flush after one failed ([`RawFile::flush_failed`]).
fn writeback_lost_error() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
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

/// Whether `e`, from `fallocate`, says the file system cannot do it (as
/// opposed to failing): discard then does nothing and write-zeroes writes
/// zeroes.
pub(crate) fn unsupported(e: &io::Error) -> bool {
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
            direct: direct.map(DirectIo::new),
            size,
            read_only,
            id,
            writeback_lost: AtomicBool::new(false),
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

    /// The `O_DIRECT` alignment of file offsets and lengths and of memory
    /// addresses, if `O_DIRECT` is in use.
    pub fn direct_alignment(&self) -> Option<(u64, usize)> {
        self.direct.as_ref().map(|d| (d.offset_align, d.mem_align))
    }

    /// `fallocate(mode)` of the range. With `O_DIRECT` it holds what a
    /// write that is no read-modify-write cycle holds (shared): it changes
    /// blocks that a cycle on another I/O thread may be about to write back.
    fn fallocate_range(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let _write = self.direct.as_ref().map(DirectIo::plain_write);
        fallocate(&self.file, mode, offset, len)
    }

    /// Bytes copied through bounce buffers since the image was opened:
    /// with `O_DIRECT`, those of buffers or ranges that were not aligned;
    /// 0 without.
    pub fn bounced_bytes(&self) -> u64 {
        self.direct
            .as_ref()
            .map_or(0, |d| d.bounced.load(Ordering::Relaxed))
    }

    /// Where the `O_DIRECT` part of `[offset, end)` ends: the rest lies
    /// past the last full aligned block of the image.
    fn direct_split(&self, d: &DirectIo, offset: u64, end: u64) -> u64 {
        round_down(self.size, d.offset_align).clamp(offset, end)
    }

    /// A transfer of `total` bytes at `offset` (within the image) through
    /// `O_DIRECT`, and the page cache past the last full aligned block.
    fn direct_vectored(
        &self,
        d: &DirectIo,
        bufs: &[IoBuf<'_>],
        offset: u64,
        total: u64,
        write: bool,
    ) -> io::Result<()> {
        let end = offset + total;
        let split = self.direct_split(d, offset, end);
        if split == end {
            return d.transfer(bufs, offset, total, write);
        }
        // `split - offset` is at most `total`, the length of buffers in
        // memory.
        let (head, tail) = split_bufs(bufs, (split - offset) as usize);
        if split > offset {
            d.transfer(&head, offset, split - offset, write)?;
        }
        transfer_vectored(&self.file, &tail, split, write)
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
            Some(d) => self
                .direct_vectored(d, bufs, offset, total, false)
                .map_err(eof_is_truncation),
        }
    }

    fn write_vectored_at(&self, bufs: &[IoBuf<'_>], offset: u64) -> io::Result<()> {
        check_writable(self.read_only)?;
        let total = io_bufs_len(bufs)?;
        check_range(self.size, offset, total)?;
        match &self.direct {
            None => transfer_vectored(&self.file, bufs, offset, true),
            Some(d) => self.direct_vectored(d, bufs, offset, total, true),
        }
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_vectored_at(&[IoBuf::from(buf)], offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        // SAFETY: `buf` is valid for the call and only read: a write only
        // reads its source buffers (the kernel, or copies out of them).
        let b = unsafe { IoBuf::from_raw_parts(buf.as_ptr().cast_mut(), buf.len()) };
        self.write_vectored_at(&[b], offset)
    }

    fn flush(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        if self.writeback_lost() {
            return Err(writeback_lost_error());
        }
        let r = self.file.sync_data();
        if let Err(e) = &r {
            self.flush_failed(e);
        }
        r
    }

    fn writeback_lost(&self) -> bool {
        self.writeback_lost.load(Ordering::Acquire)
    }

    fn flush_failed(&self, error: &io::Error) {
        // O_DIRECT writes do not wait in the page cache: a failed flush
        // lost none of them, and the next one may succeed for real.
        if self.direct.is_none() && !self.writeback_lost.swap(true, Ordering::AcqRel) {
            log::error!(
                "flushing image {} failed ({error}): writes since the last flush may not be \
                 on the disk, and every later flush of it fails",
                self.id
            );
        }
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        check_writable(self.read_only)?;
        check_range(self.size, offset, len)?;
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        match self.fallocate_range(mode, offset, len) {
            // Discard is a hint: a file system without hole punching just
            // keeps the data.
            Err(e) if unsupported(&e) => Ok(()),
            r => r,
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        check_writable(self.read_only)?;
        check_range(self.size, offset, len)?;
        let zero_range = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        match self.fallocate_range(zero_range, offset, len) {
            Err(e) if unsupported(&e) => {
                // tmpfs and memfd images: a punched hole reads as zeroes, and
                // allocating it again keeps the space a write-zeroes without
                // unmap promises; two calls instead of writing it all.
                let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                let punched = self
                    .fallocate_range(punch, offset, len)
                    .and_then(|()| self.fallocate_range(libc::FALLOC_FL_KEEP_SIZE, offset, len));
                match punched {
                    Err(e) if unsupported(&e) => {}
                    r => return r,
                }
                // Else the zeroes are written, a chunk at a time.
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

    fn file_backed(&self) -> bool {
        true
    }

    fn page_cached(&self) -> bool {
        self.direct.is_none()
    }

    fn fd_for(&self, access: FdAccess<'_>) -> Option<RawFd> {
        let (bufs, offset, write) = match access {
            FdAccess::Read { bufs, offset } => (bufs, offset, false),
            FdAccess::Write { bufs, offset } => (bufs, offset, true),
            FdAccess::Flush => {
                let ok = !self.read_only && !self.writeback_lost();
                return ok.then(|| self.file.as_raw_fd());
            }
            FdAccess::Fallocate { offset, len } => {
                let ok = !self.read_only && check_range(self.size, offset, len).is_ok();
                return ok.then(|| self.file.as_raw_fd());
            }
        };
        if write && self.read_only {
            return None;
        }
        let total = one_call_transfer(self.size, bufs, offset)?;
        match &self.direct {
            None => Some(self.file.as_raw_fd()),
            Some(d) => {
                let end = offset + total;
                let whole = self.direct_split(d, offset, end) == end;
                (whole && total & (d.offset_align - 1) == 0 && d.straight(bufs, offset))
                    .then(|| d.file.as_raw_fd())
            }
        }
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
    fn zeroing_an_in_memory_image_keeps_it_allocated() {
        let size = 4u64 << 20;
        let f = RawFile::in_memory(size).unwrap();
        let data = pattern(size as usize, 9);
        f.write_at(&data, 0).unwrap();
        let blocks = || f.file.metadata().unwrap().blocks();
        let full = blocks();
        assert!(full >= size / 512);
        f.write_zeroes(4096, 1 << 20).unwrap();
        let mut back = vec![0xffu8; size as usize];
        f.read_at(&mut back, 0).unwrap();
        assert!(back[4096..4096 + (1 << 20)].iter().all(|b| *b == 0));
        assert_eq!(back[..4096], data[..4096]);
        assert_eq!(back[4096 + (1 << 20)..], data[4096 + (1 << 20)..]);
        assert_eq!(blocks(), full, "the zeroed range is still allocated");
        // Discard may give it back.
        f.discard(4096, 1 << 20).unwrap();
        assert!(blocks() < full);
    }

    #[test]
    fn direct_zeroing_waits_for_a_read_modify_write_cycle() {
        let t = image(1 << 20);
        let Some(f) = open(&t, true) else { return };
        let d = f.direct.as_ref().unwrap();
        // A cycle on another I/O thread has read its block and is about to
        // write it back: zeroing or discarding must not slip in between.
        let cycle = d.rmw.write().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| {
                f.write_zeroes(0, 4096).unwrap();
                f.discard(4096, 4096).unwrap();
                tx.send(()).unwrap();
            });
            let waited = rx.recv_timeout(std::time::Duration::from_millis(200));
            assert!(waited.is_err(), "zeroed during the cycle");
            drop(cycle);
            rx.recv_timeout(std::time::Duration::from_secs(10))
                .expect("zeroed after the cycle");
        });
        let mut back = [0xffu8; 4096];
        f.read_at(&mut back, 0).unwrap();
        assert_eq!(back, [0; 4096]);
    }

    /// A page-aligned buffer of `len` bytes, with room for `slack` more.
    fn page_buffer(len: usize, slack: usize) -> AlignedBuffer {
        AlignedBuffer::new(len + slack, 4096)
    }

    /// `len` bytes at `offset` of `buf`, as an `IoBuf`.
    fn piece(buf: &mut AlignedBuffer, offset: usize, len: usize) -> IoBuf<'static> {
        let s = &mut buf.as_mut_slice()[offset..offset + len];
        // SAFETY: the tests keep the buffers alive and untouched while the
        // pieces are in use.
        unsafe { IoBuf::from_raw_parts(s.as_mut_ptr(), s.len()) }
    }

    #[test]
    fn direct_transfers_of_aligned_buffers_are_not_bounced() {
        let size = 4 << 20;
        let t = image(size);
        let Some(f) = open(&t, true) else { return };
        let (align, _) = f.direct_alignment().unwrap();
        let data = pattern(3 << 20, 4);
        // Three pages and a 2 MiB + 1 MiB - 3 pages buffer, all page aligned.
        let mut src = page_buffer(data.len(), 0);
        src.as_mut_slice().copy_from_slice(&data);
        let bufs = [
            piece(&mut src, 0, 3 * 4096),
            piece(&mut src, 3 * 4096, data.len() - 3 * 4096),
        ];
        f.write_vectored_at(&bufs, 4096).unwrap();
        let mut dst = page_buffer(data.len(), 0);
        let back = [
            piece(&mut dst, 0, 8192),
            piece(&mut dst, 8192, data.len() - 8192),
        ];
        f.read_vectored_at(&back, 4096).unwrap();
        assert_eq!(dst.as_mut_slice(), &data[..]);
        assert_eq!(f.bounced_bytes(), 0);
        // An engine may run these itself, on the O_DIRECT descriptor.
        let fd = f.fd_for(FdAccess::Read {
            bufs: &back,
            offset: 4096,
        });
        assert!(fd.is_some_and(|fd| fd != f.file.as_raw_fd()));
        // Not what is not aligned, nor what is outside the image.
        let odd = [piece(&mut dst, 1, 4096)];
        assert!(f
            .fd_for(FdAccess::Read {
                bufs: &odd,
                offset: 0
            })
            .is_none());
        let unaligned = FdAccess::Write {
            bufs: &back[..1],
            offset: align / 2,
        };
        assert!(align == 1 || f.fd_for(unaligned).is_none());
        let past = FdAccess::Read {
            bufs: &back[..1],
            offset: size - 4096,
        };
        assert!(f.fd_for(past).is_none());
        assert!(f.fd_for(FdAccess::Flush).is_some());
        assert!(f
            .fd_for(FdAccess::Fallocate {
                offset: size,
                len: 1
            })
            .is_none());
    }

    #[test]
    fn direct_transfers_bounce_only_misaligned_buffers() {
        let size = 4 << 20;
        let t = image(size);
        let Some(f) = open(&t, true) else { return };
        let (align, mem_align) = f.direct_alignment().unwrap();
        if mem_align == 1 {
            return;
        }
        let a = align as usize;
        // An aligned buffer, a run of two misaligned ones (one byte off,
        // together a whole number of blocks), then an aligned one again.
        let lens = [4 * a, a + 100, 3 * a - 100, 2 * a];
        let total: usize = lens.iter().sum();
        let data = pattern(total, 8);
        // Each buffer a page past the end of the one before, the second
        // and third ones a few bytes off a page.
        let mut starts = [0usize; 4];
        for i in 1..4 {
            starts[i] = (starts[i - 1] + lens[i - 1]).next_multiple_of(4096) + 4096;
        }
        starts[1] += 1;
        starts[2] += 3;
        let mut mem = page_buffer(starts[3] + lens[3], 0);
        let bufs = |mem: &mut AlignedBuffer| [0, 1, 2, 3].map(|i| piece(mem, starts[i], lens[i]));
        let mut at = 0;
        for (i, b) in bufs(&mut mem).iter().enumerate() {
            b.as_volatile_slice().copy_from(&data[at..at + lens[i]]);
            at += lens[i];
        }
        f.write_vectored_at(&bufs(&mut mem), 8 * 4096).unwrap();
        // Only the misaligned run went through the bounce buffer.
        assert_eq!(f.bounced_bytes(), (lens[1] + lens[2]) as u64);
        let mut back = vec![0u8; total];
        t.as_file().read_exact_at(&mut back, 8 * 4096).unwrap();
        assert_eq!(back, data);
        // And back, into clean buffers.
        mem.as_mut_slice().fill(0);
        f.read_vectored_at(&bufs(&mut mem), 8 * 4096).unwrap();
        assert_eq!(f.bounced_bytes(), 2 * (lens[1] + lens[2]) as u64);
        let mut at = 0;
        for (i, b) in bufs(&mut mem).iter().enumerate() {
            let mut got = vec![0u8; lens[i]];
            b.as_volatile_slice().copy_to(&mut got);
            assert_eq!(got, data[at..at + lens[i]], "buffer {i}");
            at += lens[i];
        }
        // A range that is not aligned is bounced whole, leaving the bytes
        // around it as they were.
        if align > 1 {
            let before = f.bounced_bytes();
            let mut one = page_buffer(4096, 0);
            one.as_mut_slice().copy_from_slice(&pattern(4096, 77));
            let start = 8 * 4096 + a as u64 / 2;
            f.write_vectored_at(&[piece(&mut one, 0, 4096)], start)
                .unwrap();
            assert_eq!(f.bounced_bytes(), before + 4096);
            let mut back = vec![0u8; total];
            t.as_file().read_exact_at(&mut back, 8 * 4096).unwrap();
            let h = a / 2;
            assert_eq!(back[..h], data[..h]);
            assert_eq!(back[h..h + 4096], pattern(4096, 77)[..]);
            assert_eq!(back[h + 4096..], data[h + 4096..]);
        }
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

    #[test]
    fn a_failed_flush_of_the_page_cache_fails_every_later_one() {
        let t = image(1 << 20);
        let d = open(&t, false).unwrap();
        d.write_at(&pattern(4096, 1), 0).unwrap();
        d.flush().unwrap();
        assert!(d.fd_for(FdAccess::Flush).is_some());
        // As an engine reports an `fdatasync` of the ring that failed: the
        // file itself would flush fine now, with the failed writes lost.
        d.flush_failed(&io::Error::from_raw_os_error(libc::ENOSPC));
        for _ in 0..2 {
            assert_eq!(d.flush().unwrap_err().raw_os_error(), Some(libc::EIO));
        }
        // Engines may not run one on the file behind its back either.
        assert!(d.fd_for(FdAccess::Flush).is_none());
        // Reads and writes go on.
        d.write_at(&pattern(4096, 2), 4096).unwrap();

        // O_DIRECT writes never wait in the page cache: nothing was lost.
        let Some(direct) = open(&t, true) else {
            return;
        };
        direct.flush_failed(&io::Error::from_raw_os_error(libc::EIO));
        direct.flush().unwrap();
        assert!(direct.fd_for(FdAccess::Flush).is_some());
    }
}
