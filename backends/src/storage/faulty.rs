//! A back end for tests whose calls fail where the test says
//! ([`FaultyDisk`]), with the `test-support` feature.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use super::{io_bufs_len, BlockBackend, FdAccess, IoBuf};

/// The back-end calls a [`FaultyDisk`] fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    /// Reads.
    Read,
    /// Writes.
    Write,
    /// Flushes.
    Flush,
    /// Write-zeroes (and fallocate on the ring).
    WriteZeroes,
}

/// Calls of `call` touching `[start, end)` of the disk (any flush) fail
/// with `errno`, `times` more times (`None`: until cleared).
#[derive(Clone, Debug)]
struct Fault {
    call: Call,
    start: u64,
    end: u64,
    errno: i32,
    times: Option<usize>,
}

/// A disk whose calls fail where the test says: a wrapper at the
/// `BlockBackend` interface, which is where the errors of `RawFile` (a
/// failed `pwritev`, `fdatasync`, ...) reach the device, on the event loop
/// and on the I/O threads alike.
pub struct FaultyDisk<B> {
    inner: B,
    faults: Mutex<Vec<Fault>>,
    /// Calls failed so far.
    failed: AtomicUsize,
}

impl<B: BlockBackend> FaultyDisk<B> {
    /// `inner`, failing nothing yet.
    pub fn new(inner: B) -> Self {
        FaultyDisk {
            inner,
            faults: Mutex::new(Vec::new()),
            failed: AtomicUsize::new(0),
        }
    }

    /// Fails `call`s on sectors `[sector, sector + sectors)` with `errno`.
    pub fn fail(&self, call: Call, sector: u64, sectors: u64, errno: i32, times: Option<usize>) {
        self.faults.lock().unwrap().push(Fault {
            call,
            start: sector * 512,
            end: (sector + sectors) * 512,
            errno,
            times,
        });
    }

    /// No more faults: the storage is fixed.
    pub fn clear(&self) {
        self.faults.lock().unwrap().clear();
    }

    /// The wrapped disk.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// Calls failed so far.
    pub fn failed(&self) -> usize {
        self.failed.load(Ordering::SeqCst)
    }

    /// Whether `f` fails a `call` on `[offset, offset + len)`.
    fn hits(f: &Fault, call: Call, offset: u64, len: u64) -> bool {
        f.call == call
            && (call == Call::Flush || (offset < f.end && offset + len > f.start))
            && f.times != Some(0)
    }

    /// The error for a `call` on `[offset, offset + len)`, if one is due.
    fn check(&self, call: Call, offset: u64, len: u64) -> std::io::Result<()> {
        let mut faults = self.faults.lock().unwrap();
        let due = faults.iter_mut().find(|f| Self::hits(f, call, offset, len));
        let Some(f) = due else { return Ok(()) };
        if let Some(n) = &mut f.times {
            *n -= 1;
        }
        self.failed.fetch_add(1, Ordering::SeqCst);
        Err(std::io::Error::from_raw_os_error(f.errno))
    }
}

impl<B: BlockBackend> BlockBackend for FaultyDisk<B> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.check(Call::Read, offset, buf.len() as u64)?;
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.check(Call::Write, offset, buf.len() as u64)?;
        self.inner.write_at(buf, offset)
    }
    fn read_vectored_at(&self, bufs: &[IoBuf<'_>], offset: u64) -> std::io::Result<()> {
        self.check(Call::Read, offset, io_bufs_len(bufs)?)?;
        self.inner.read_vectored_at(bufs, offset)
    }
    fn write_vectored_at(&self, bufs: &[IoBuf<'_>], offset: u64) -> std::io::Result<()> {
        self.check(Call::Write, offset, io_bufs_len(bufs)?)?;
        self.inner.write_vectored_at(bufs, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.check(Call::Flush, 0, 0)?;
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.check(Call::WriteZeroes, offset, len)?;
        self.inner.write_zeroes(offset, len)
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn id(&self) -> String {
        "faulty".into()
    }
    // The io_uring runs what would succeed on the image itself; what is to
    // fail comes back here, where it fails.
    fn file_backed(&self) -> bool {
        self.inner.file_backed()
    }
    fn page_cached(&self) -> bool {
        self.inner.page_cached()
    }
    fn fd_for(&self, access: FdAccess<'_>) -> Option<RawFd> {
        let (call, offset, len) = match access {
            FdAccess::Read { bufs, offset } => (Call::Read, offset, io_bufs_len(bufs).ok()?),
            FdAccess::Write { bufs, offset } => (Call::Write, offset, io_bufs_len(bufs).ok()?),
            FdAccess::Flush => (Call::Flush, 0, 0),
            FdAccess::Fallocate { offset, len } => (Call::WriteZeroes, offset, len),
        };
        let faults = self.faults.lock().unwrap();
        if faults.iter().any(|f| Self::hits(f, call, offset, len)) {
            return None;
        }
        self.inner.fd_for(access)
    }
    fn flush_failed(&self, error: &std::io::Error) {
        self.inner.flush_failed(error)
    }
    fn writeback_lost(&self) -> bool {
        self.inner.writeback_lost()
    }
}
