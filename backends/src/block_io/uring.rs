//! The io_uring engine of [`super::BlockIo`].
//!
//! A request becomes one submission queue entry (a `READV`/`WRITEV`, or a
//! `READ`/`WRITE` for one buffer, straight between the image and guest
//! memory), a `WRITEV` linked to an `FSYNC` for a write-through write, an
//! `FSYNC` for a flush, or one `FALLOCATE` per range of a discard or
//! write-zeroes. Entries wait in [`Uring::pending`] until the device ends
//! its queue round ([`Uring::submit`]), which hands them all to the kernel
//! in one `io_uring_enter`. The kernel signals an eventfd, which the
//! event loop watches, as it posts completions; the loop then reaps the
//! completion queue ([`Uring::reap`]). No thread runs per request.
//!
//! On an image in the host's page cache, a read (or write) is first tried
//! on the spot with `RWF_NOWAIT`: when the data is cached it is done at
//! once, as cheaply as on the event loop, and only what would wait for the
//! storage goes to the ring. (Where the file system cannot do that,
//! `EOPNOTSUPP`, it is not tried again.)
//!
//! At most as many entries are in the kernel as the completion queue
//! holds, so no completion is ever dropped; the others wait in `pending`
//! until completions make room.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::OnceLock;

use io_uring::{cqueue, opcode, squeue, types, IoUring, Probe};
use log::warn;
use vmm_sys_util::eventfd::EventFd;

use crate::storage::{BlockBackend, FdAccess, IoBuf, IoOp};

/// Submission queue entries of a ring.
const SQ_ENTRIES: u32 = 256;
/// Completion queue entries of a ring: the most entries in the kernel.
const CQ_ENTRIES: u32 = 1024;

/// The part of a request an entry is, in the low bits of its user data
/// (the request's token is above them).
const PART_BITS: u32 = 16;
/// The data transfer, a flush on its own, or the first range.
const PART_MAIN: u16 = 0;
/// The `FSYNC` linked after a write-through write.
const PART_FLUSH: u16 = 1;
/// Range `i` of a discard or write-zeroes is part `PART_RANGE + i`.
const PART_RANGE: u16 = 2;

/// Most ranges of one discard or write-zeroes run on the ring; longer
/// lists run on the event loop.
pub(super) const MAX_RANGES: usize = (u16::MAX - PART_RANGE) as usize;

/// Why io_uring cannot be used here, in a few words, from the error
/// setting it up returned.
pub(super) fn why(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => {
            format!("not permitted ({e}; kernel.io_uring_disabled or a seccomp filter)")
        }
        Some(libc::ENOSYS) => format!("not in this kernel ({e}, or a seccomp filter)"),
        _ => e.to_string(),
    }
}

/// Whether io_uring works in this process, with every operation the
/// engine needs; the reason if not. Probed once per process.
pub fn io_uring_support() -> Result<(), String> {
    static SUPPORT: OnceLock<Result<(), String>> = OnceLock::new();
    SUPPORT
        .get_or_init(|| Ops::probe(8).map(|_| ()).map_err(|e| why(&e)))
        .clone()
}

/// The optional operations the kernel has.
#[derive(Clone, Copy, Debug)]
struct Ops {
    /// `READ` and `WRITE` (5.6): one buffer without an iovec.
    read_write: bool,
    /// `FALLOCATE` (5.6).
    fallocate: bool,
}

impl Ops {
    /// Sets up a ring of `entries` and finds out what it can do; fails if
    /// it cannot do vectored reads and writes and `fsync`.
    fn probe(entries: u32) -> io::Result<(IoUring, Ops)> {
        let ring = IoUring::builder()
            .setup_cqsize(CQ_ENTRIES.max(entries))
            .build(entries)?;
        let mut probe = Probe::new();
        // Kernels before 5.6 have no probe: too old for what we need.
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(|e| io::Error::new(e.kind(), format!("kernel too old ({e})")))?;
        let has = |code| probe.is_supported(code);
        if !(has(opcode::Readv::CODE) && has(opcode::Writev::CODE) && has(opcode::Fsync::CODE)) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the kernel's io_uring cannot do READV, WRITEV and FSYNC",
            ));
        }
        let ops = Ops {
            read_write: has(opcode::Read::CODE) && has(opcode::Write::CODE),
            fallocate: has(opcode::Fallocate::CODE),
        };
        Ok((ring, ops))
    }
}

/// A completion: the request's token, which part of it, and the result.
#[derive(Clone, Copy, Debug)]
pub(super) struct Cqe {
    pub token: usize,
    pub part: u16,
    pub result: i32,
}

impl From<cqueue::Entry> for Cqe {
    fn from(e: cqueue::Entry) -> Self {
        let data = e.user_data();
        Cqe {
            token: (data >> PART_BITS) as usize,
            part: data as u16,
            result: e.result(),
        }
    }
}

/// What became of a request handed to [`Uring::prepare`].
pub(super) enum Prepared {
    /// On the ring (once submitted), as this many entries.
    Queued(u32),
    /// Done on the spot, every byte moved (`RWF_NOWAIT` on the page cache).
    Done,
    /// Not for the ring: run it with [`IoOp::run`].
    Fallback,
}

/// An io_uring, its completion eventfd, and the entries waiting for room.
pub(super) struct Uring {
    ring: IoUring,
    ops: Ops,
    /// Registered with the ring: readable once completions are posted.
    /// Also written by [`Uring::signal`].
    eventfd: EventFd,
    /// Entries prepared and not in the submission queue yet, with whether
    /// each is linked to the next.
    pending: VecDeque<(squeue::Entry, bool)>,
    /// Entries pushed to the submission queue whose completions have not
    /// been reaped: at most the completion queue's size.
    in_kernel: usize,
    /// Entries pushed to the submission queue and not submitted yet.
    unsubmitted: usize,
    /// The last `io_uring_enter` failed (warned about once per streak).
    submit_failing: bool,
    /// Completions reaped while waiting, not handed out yet.
    reaped: Vec<Cqe>,
    /// Whether reads, and writes, of a page-cached image are tried on the
    /// spot first (until the file system says it cannot).
    nowait_read: bool,
    nowait_write: bool,
}

impl Uring {
    /// A ring, with its completion eventfd.
    pub fn new() -> io::Result<Self> {
        let (ring, ops) = Ops::probe(SQ_ENTRIES)?;
        let eventfd = vfio_user_server::event_loop::new_eventfd()?;
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        Ok(Uring {
            ring,
            ops,
            eventfd,
            pending: VecDeque::new(),
            in_kernel: 0,
            unsubmitted: 0,
            submit_failing: false,
            reaped: Vec::new(),
            nowait_read: true,
            nowait_write: true,
        })
    }

    /// Readable when completions can be reaped; for the event loop.
    pub fn completion_fd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    /// Makes the completion fd readable, so that the event loop comes to
    /// collect what was reaped while waiting.
    fn signal(&self) {
        if let Err(e) = self.eventfd.write(1) {
            warn!("io_uring completion eventfd: {e}");
        }
    }

    /// Queues the entries of `op`, the request with token `token`, if the
    /// ring can run it on the back end's file as it is.
    ///
    /// # Safety
    ///
    /// The buffers of `op` and the iovec array holding them must stay
    /// valid, and be accessed by others only as raw bytes, until every
    /// completion of the request has been reaped.
    pub unsafe fn prepare(
        &mut self,
        token: usize,
        op: &IoOp,
        backend: &dyn BlockBackend,
    ) -> Prepared {
        let data = |part: u16| ((token as u64) << PART_BITS) | u64::from(part);
        match op {
            IoOp::Read { offset, bufs } | IoOp::Write { offset, bufs, .. } => {
                let write = matches!(op, IoOp::Write { .. });
                let access = if write {
                    FdAccess::Write {
                        bufs,
                        offset: *offset,
                    }
                } else {
                    FdAccess::Read {
                        bufs,
                        offset: *offset,
                    }
                };
                let Some(fd) = backend.fd_for(access) else {
                    return Prepared::Fallback;
                };
                let Ok(count) = u32::try_from(bufs.len()) else {
                    return Prepared::Fallback;
                };
                // A write-through write needs its flush, which waits: it goes
                // to the ring whole.
                let through = matches!(op, IoOp::Write { flush: true, .. });
                if backend.page_cached() && !through && self.try_nowait(fd, bufs, *offset, write) {
                    return Prepared::Done;
                }
                let fd = types::Fd(fd);
                let entry = match (bufs.as_slice(), write) {
                    ([one], false) if self.ops.read_write && one.len() <= u32::MAX as usize => {
                        opcode::Read::new(fd, one.as_ptr(), one.len() as u32)
                            .offset(*offset)
                            .build()
                    }
                    ([one], true) if self.ops.read_write && one.len() <= u32::MAX as usize => {
                        opcode::Write::new(fd, one.as_ptr(), one.len() as u32)
                            .offset(*offset)
                            .build()
                    }
                    (_, false) => opcode::Readv::new(fd, IoBuf::as_iovecs(bufs), count)
                        .offset(*offset)
                        .build(),
                    (_, true) => opcode::Writev::new(fd, IoBuf::as_iovecs(bufs), count)
                        .offset(*offset)
                        .build(),
                };
                let flush = match op {
                    IoOp::Write { flush: true, .. } => backend.fd_for(FdAccess::Flush),
                    _ => None,
                };
                match flush {
                    Some(flush_fd) => {
                        // The flush runs once the write is done, and is
                        // cancelled if it fails or comes up short.
                        let entry = entry.flags(squeue::Flags::IO_LINK);
                        self.pending
                            .push_back((entry.user_data(data(PART_MAIN)), true));
                        self.pending
                            .push_back((fsync(flush_fd).user_data(data(PART_FLUSH)), false));
                        Prepared::Queued(2)
                    }
                    // A write-through write of a back end without a file
                    // to flush runs on the spot.
                    None if matches!(op, IoOp::Write { flush: true, .. }) => Prepared::Fallback,
                    None => {
                        self.pending
                            .push_back((entry.user_data(data(PART_MAIN)), false));
                        Prepared::Queued(1)
                    }
                }
            }
            IoOp::Flush => match backend.fd_for(FdAccess::Flush) {
                Some(fd) => {
                    self.pending
                        .push_back((fsync(fd).user_data(data(PART_MAIN)), false));
                    Prepared::Queued(1)
                }
                None => Prepared::Fallback,
            },
            IoOp::Discard { ranges } | IoOp::WriteZeroes { ranges, .. } => {
                if !self.ops.fallocate || ranges.is_empty() || ranges.len() > MAX_RANGES {
                    return Prepared::Fallback;
                }
                let zero = matches!(op, IoOp::WriteZeroes { .. });
                let mode = libc::FALLOC_FL_KEEP_SIZE
                    | if zero {
                        libc::FALLOC_FL_ZERO_RANGE
                    } else {
                        libc::FALLOC_FL_PUNCH_HOLE
                    };
                let mut fds = Vec::with_capacity(ranges.len());
                for &(offset, len) in ranges {
                    match backend.fd_for(FdAccess::Fallocate { offset, len }) {
                        Some(fd) => fds.push(fd),
                        None => return Prepared::Fallback,
                    }
                }
                for (i, (&(offset, len), fd)) in ranges.iter().zip(fds).enumerate() {
                    // At most MAX_RANGES ranges.
                    let part = PART_RANGE + i as u16;
                    let e = opcode::Fallocate::new(types::Fd(fd), len)
                        .offset(offset)
                        .mode(mode)
                        .build()
                        .user_data(data(part));
                    self.pending.push_back((e, false));
                }
                Prepared::Queued(ranges.len() as u32)
            }
        }
    }

    /// Tries a transfer of `bufs` at `offset` on `fd` on the spot with
    /// `RWF_NOWAIT`; true if it moved every byte. Otherwise the ring does
    /// it all (again, for a part done here: the same bytes).
    fn try_nowait(&mut self, fd: RawFd, bufs: &[IoBuf<'_>], offset: u64, write: bool) -> bool {
        let allowed = if write {
            &mut self.nowait_write
        } else {
            &mut self.nowait_read
        };
        let total: usize = bufs.iter().map(IoBuf::len).sum();
        let (Ok(off), Ok(count)) = (
            libc::off_t::try_from(offset),
            libc::c_int::try_from(bufs.len()),
        ) else {
            return false;
        };
        if !*allowed || total == 0 {
            return false;
        }
        let iov = IoBuf::as_iovecs(bufs);
        let n = if write {
            // SAFETY: `bufs` are valid iovecs of memory valid for the call
            // (`prepare`'s contract); the kernel only reads them.
            unsafe { libc::pwritev2(fd, iov, count, off, libc::RWF_NOWAIT) }
        } else {
            // SAFETY: as above; the kernel writes into the buffers, memory
            // only ever accessed as raw bytes.
            unsafe { libc::preadv2(fd, iov, count, off, libc::RWF_NOWAIT) }
        };
        if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EOPNOTSUPP) {
            *allowed = false;
        }
        usize::try_from(n).is_ok_and(|n| n == total)
    }

    /// Moves the pending entries that fit into the submission queue (and
    /// the kernel's completion budget).
    fn push_pending(&mut self) {
        let budget = self.ring.params().cq_entries() as usize;
        let mut sq = self.ring.submission();
        while let Some(&(_, linked)) = self.pending.front() {
            let chain = if linked { 2 } else { 1 };
            if sq.capacity() - sq.len() < chain || self.in_kernel + chain > budget {
                break;
            }
            for _ in 0..chain {
                let Some((entry, _)) = self.pending.pop_front() else {
                    break;
                };
                // SAFETY: `prepare`'s contract keeps the buffers and iovecs
                // of the entry valid until its completion is reaped. The
                // queue has room (checked above).
                if unsafe { sq.push(&entry) }.is_err() {
                    self.pending.push_front((entry, false));
                    break;
                }
                self.in_kernel += 1;
                self.unsubmitted += 1;
            }
        }
        sq.sync();
    }

    /// Hands every pending entry that fits to the kernel, in one
    /// `io_uring_enter`.
    pub fn submit(&mut self) {
        self.push_pending();
        while self.unsubmitted > 0 {
            match self.ring.submit() {
                Ok(n) => {
                    self.unsubmitted = self.unsubmitted.saturating_sub(n);
                    if n == 0 {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EBUSY or EAGAIN: the kernel is short of room; they
                    // stay queued and go with the next submission, which
                    // the completions it owes us (or this signal) bring.
                    if !self.submit_failing {
                        warn!("io_uring submission: {e} (tried again until it succeeds)");
                    }
                    self.submit_failing = true;
                    self.signal();
                    return;
                }
            }
        }
        self.submit_failing = false;
    }

    /// Takes the completions posted so far (and those reaped while
    /// waiting), after resetting the completion fd, then submits what
    /// waited for room.
    pub fn reap(&mut self, out: &mut Vec<Cqe>) {
        // Reset first: a completion posted after the reap below makes the
        // fd readable again.
        let _ = self.eventfd.read();
        out.append(&mut self.reaped);
        self.reap_cq(out);
        // Also what a failed `io_uring_enter` left in the submission queue.
        if !self.pending.is_empty() || self.unsubmitted > 0 {
            self.submit();
        }
    }

    fn reap_cq(&mut self, out: &mut Vec<Cqe>) {
        let before = out.len();
        out.extend(self.ring.completion().map(Cqe::from));
        self.in_kernel = self.in_kernel.saturating_sub(out.len() - before);
    }

    /// Submits everything and waits until the kernel has completed it all;
    /// the completions are handed out by the next [`Uring::reap`].
    pub fn wait_all(&mut self) {
        let mut reaped = std::mem::take(&mut self.reaped);
        loop {
            self.push_pending();
            self.reap_cq(&mut reaped);
            if self.in_kernel == 0 && self.pending.is_empty() {
                break;
            }
            match self.ring.submit_and_wait(1) {
                Ok(n) => self.unsubmitted = self.unsubmitted.saturating_sub(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Nothing else can make the kernel finish: keep trying,
                    // without spinning hard.
                    warn!("io_uring wait: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
        }
        self.reaped = reaped;
        if !self.reaped.is_empty() {
            // The event loop must come and collect them.
            self.signal();
        }
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        // The entries in the kernel use memory their requests keep alive:
        // they must be done before it goes.
        self.pending.clear();
        self.wait_all();
    }
}

/// An `fdatasync` of `fd`.
fn fsync(fd: RawFd) -> squeue::Entry {
    opcode::Fsync::new(types::Fd(fd))
        .flags(types::FsyncFlags::DATASYNC)
        .build()
}

/// A request on the ring: what it does and what its completions said.
pub(super) struct RingOp {
    /// The operation; its buffers are what the entries point to.
    pub op: IoOp,
    /// Completions still to come.
    pub parts: u32,
    /// Result of the main part (bytes transferred, or `-errno`).
    pub main: i32,
    /// Result of the linked flush.
    pub flush: i32,
    /// Ranges (index, `-errno`) of a discard or write-zeroes that failed.
    pub failed_ranges: Vec<(usize, i32)>,
}

// SAFETY: the buffers of the operation point to guest memory that the
// request's slot keeps mapped until its completions are reaped, and only
// the kernel (for the ring) and the owner of the engine touch them, as raw
// bytes; moving the request to another thread with its owner changes none
// of that.
unsafe impl Send for RingOp {}

impl RingOp {
    /// A request queued as `parts` entries.
    pub fn queued(op: IoOp, parts: u32) -> Self {
        RingOp {
            op,
            parts,
            main: 0,
            flush: 0,
            failed_ranges: Vec::new(),
        }
    }

    /// Records a completion; true once the last one came.
    pub fn record(&mut self, cqe: &Cqe) -> bool {
        match cqe.part {
            PART_MAIN if !matches!(self.op, IoOp::Discard { .. } | IoOp::WriteZeroes { .. }) => {
                self.main = cqe.result
            }
            PART_FLUSH => self.flush = cqe.result,
            p => {
                if cqe.result < 0 {
                    self.failed_ranges
                        .push((usize::from(p.saturating_sub(PART_RANGE)), cqe.result));
                }
            }
        }
        self.parts = self.parts.saturating_sub(1);
        self.parts == 0
    }

    /// The request's result, once every completion came. What the ring
    /// left undone is finished here, on `backend`: the rest of a short
    /// transfer (and then the flush the link cancelled), a zeroing the
    /// file system cannot do with `fallocate`.
    pub fn finish(&mut self, backend: &dyn BlockBackend) -> io::Result<()> {
        match &self.op {
            IoOp::Read { offset, bufs } | IoOp::Write { offset, bufs, .. } => {
                let write = matches!(self.op, IoOp::Write { .. });
                let total: usize = bufs.iter().map(IoBuf::len).sum();
                let done = match self.main {
                    n if n >= 0 => n as usize,
                    e if e == -libc::EAGAIN || e == -libc::EINTR => 0,
                    e => return Err(io::Error::from_raw_os_error(-e)),
                };
                if done < total {
                    // Short (the end of a truncated image, or the kernel
                    // gave up early): the back end does the rest, and
                    // says what is wrong if anything is.
                    let rest = rest_of(bufs, done);
                    let at = offset + done as u64;
                    if write {
                        backend.write_vectored_at(&rest, at)?;
                    } else {
                        backend.read_vectored_at(&rest, at)?;
                    }
                }
                match self.op {
                    IoOp::Write { flush: true, .. } if done < total => backend.flush(),
                    IoOp::Write { flush: true, .. } if self.flush < 0 => {
                        Err(flush_error(backend, self.flush))
                    }
                    _ => Ok(()),
                }
            }
            IoOp::Flush if self.main < 0 => Err(flush_error(backend, self.main)),
            IoOp::Flush => Ok(()),
            IoOp::Discard { .. } => match self
                .failed_ranges
                .iter()
                .map(|&(_, e)| io::Error::from_raw_os_error(-e))
                // Discard is a hint: a file system that cannot punch
                // holes keeps the data.
                .find(|e| !crate::storage::fallocate_unsupported(e))
            {
                Some(e) => Err(e),
                None => Ok(()),
            },
            IoOp::WriteZeroes { ranges, flush } => {
                for &(i, e) in &self.failed_ranges {
                    let e = io::Error::from_raw_os_error(-e);
                    let Some(&(offset, len)) = ranges.get(i) else {
                        return Err(e);
                    };
                    if !crate::storage::fallocate_unsupported(&e) {
                        return Err(e);
                    }
                    // Writes zeroes instead.
                    backend.write_zeroes(offset, len)?;
                }
                if *flush {
                    backend.flush()?;
                }
                Ok(())
            }
        }
    }
}

/// The error of a flush the ring ran, which `backend` hears of.
fn flush_error(backend: &dyn BlockBackend, result: i32) -> io::Error {
    let e = io::Error::from_raw_os_error(-result);
    backend.flush_failed(&e);
    e
}

/// The part of `bufs` after their first `done` bytes.
fn rest_of(bufs: &[IoBuf<'static>], mut done: usize) -> Vec<IoBuf<'static>> {
    let mut rest = Vec::with_capacity(bufs.len());
    for b in bufs {
        if done >= b.len() {
            done -= b.len();
            continue;
        }
        // SAFETY: a suffix of the memory of a valid `IoBuf` is valid under
        // the same contract, for the same lifetime.
        rest.push(unsafe { IoBuf::from_raw_parts(b.as_ptr().add(done), b.len() - done) });
        done = 0;
    }
    rest
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{RawFile, RawFileOptions};
    use vmm_sys_util::tempfile::TempFile;

    /// A 1 MiB image in the page cache, and its file (removed on drop).
    fn image() -> (TempFile, RawFile) {
        let t = TempFile::new().unwrap();
        t.as_file().set_len(1 << 20).unwrap();
        let options = RawFileOptions {
            read_only: false,
            direct: false,
        };
        let image = RawFile::open(t.as_path(), options).unwrap();
        (t, image)
    }

    #[test]
    fn a_flush_that_failed_on_the_ring_is_the_back_ends_too() {
        let (_t, image) = image();
        let mut op = RingOp::queued(IoOp::Flush, 1);
        let failed = Cqe {
            token: 0,
            part: PART_MAIN,
            result: -libc::EIO,
        };
        assert!(op.record(&failed));
        assert_eq!(
            op.finish(&image).unwrap_err().raw_os_error(),
            Some(libc::EIO)
        );
        // The page cache may have dropped the writes: no later flush of
        // the image succeeds.
        assert!(image.flush().is_err());
    }

    #[test]
    fn entries_a_failed_submission_left_behind_go_with_the_next_reap() {
        let (_t, image) = image();
        let Ok(mut ring) = Uring::new() else {
            eprintln!("skipped: no io_uring here");
            return;
        };
        // SAFETY: a flush has no buffers.
        let prepared = unsafe { ring.prepare(7, &IoOp::Flush, &image) };
        assert!(matches!(prepared, Prepared::Queued(1)));
        // In the submission queue, as an `io_uring_enter` that failed
        // with EAGAIN leaves it.
        ring.push_pending();
        assert_eq!((ring.pending.len(), ring.unsubmitted), (0, 1));
        let mut out = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while out.is_empty() && std::time::Instant::now() < deadline {
            ring.reap(&mut out);
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(out.len(), 1, "the flush never reached the kernel");
        assert_eq!((out[0].token, out[0].result), (7, 0));
    }
}
