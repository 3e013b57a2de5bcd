//! Block I/O between guest scatter-gather lists and a [`BlockBackend`].
//!
//! A [`BlockIo`] moves data straight between a back end and the guest pages
//! of an [`SgList`], with no copy in between, and keeps guest memory's dirty
//! log right: pages the back end reads into are marked dirty.
//!
//! - Synchronous transfers ([`BlockIo::read`], [`BlockIo::write`],
//!   [`BlockIo::flush`]) run on the caller's thread ([`Aio::Sync`]).
//! - In flight, on I/O threads ([`IoWorkers`], [`Aio::Threads`]) or on an
//!   io_uring ([`Aio::IoUring`]), a device starts requests
//!   ([`BlockIo::start`]) while it takes them off its queues, hands each
//!   batch over at once ([`BlockIo::submit`]: to the threads, or to the
//!   kernel in one `io_uring_enter`) and goes on; when
//!   [`BlockIo::completion_fd`] becomes readable it collects the results
//!   ([`BlockIo::collect`]) and completes its requests. What a device needs
//!   to complete one (a virtqueue head, a frame context) travels with the
//!   request as its completion value, the engine's type parameter. On the
//!   io_uring, a request can also be done as it starts ([`Started::Done`]):
//!   a read of cached data, or what the ring cannot run as it is.
//!
//! A request in flight keeps an `Arc` of the guest memory mapping its
//! buffers lie in, so unmapping guest memory cannot pull the pages from
//! under an I/O thread or the kernel: pausing, unmapping and resetting
//! wait for what is in flight ([`BlockIo::drain_and_collect`],
//! [`BlockIo::forget_all`]) on either engine. A steady stream of requests
//! does not allocate: the vectors of finished requests and their tokens
//! are reused.
//!
//! What a device does when the back end fails a request is its
//! [`ErrorPolicy`], as QEMU's `werror`/`rerror`: report the error to the
//! guest, or stop, keeping the failed requests in an [`ErrorStop`] until
//! the device is resumed, which retries them. Only failed requests look at
//! the policy; completing one that succeeded costs nothing more.

use std::fmt;
use std::io;
use std::os::fd::RawFd;
use std::str::FromStr;
use std::sync::Arc;

use log::{debug, warn};

use vfio_user_server::guest_memory::GuestMemory;
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend};

use self::uring::{RingOp, Uring};
use crate::guest_sg::SgList;
use crate::storage::{BlockBackend, IoBuf, IoDone, IoJob, IoOp, IoWorkers};

mod uring;

pub use self::uring::io_uring_support;

/// Most guest buffers handed to the back end in one synchronous vectored
/// call. Small, as the arrays holding them are initialised per call, and
/// most requests have one or two data buffers.
const IO_BATCH: usize = 8;

/// Guest ranges `(address, length)` a read fills.
type GuestRanges = Vec<(GuestAddress, usize)>;

/// What a storage device does with a request its back end failed, in the
/// spirit of QEMU's `werror`/`rerror`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ErrorPolicy {
    /// Fail the request: the guest gets an I/O error for it (virtio-blk
    /// `VIRTIO_BLK_S_IOERR`) and the device goes on.
    #[default]
    Report,
    /// Keep the request without completing it and stop taking requests
    /// until the device is resumed, which retries the kept requests first:
    /// a disk that filled up and was given room again loses no write.
    /// Only storage errors ([`is_storage_error`]) stop the device; a
    /// request that is wrong in itself still fails at once.
    Stop,
}

impl ErrorPolicy {
    /// Whether a request that failed with `error` is kept for a retry,
    /// stopping the device, instead of failed.
    pub fn stops_on(self, error: &io::Error) -> bool {
        self == ErrorPolicy::Stop && is_storage_error(error)
    }

    /// The policy's name, as [`FromStr`] parses it.
    pub fn name(self) -> &'static str {
        match self {
            ErrorPolicy::Report => "report",
            ErrorPolicy::Stop => "stop",
        }
    }
}

impl fmt::Display for ErrorPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ErrorPolicy {
    type Err = String;

    /// `report` or `stop`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "report" => Ok(ErrorPolicy::Report),
            "stop" => Ok(ErrorPolicy::Stop),
            _ => Err(format!("'{s}' is not an error policy (report or stop)")),
        }
    }
}

/// Whether `error`, returned by a back end, says the storage failed (EIO,
/// ENOSPC, EDQUOT, EROFS, a read past the end of an image file that
/// shrank, ...), something fixing the storage and retrying can cure. The
/// other errors say the request itself cannot be done (a range outside the
/// image or outside the guest's buffers: `InvalidInput`; an operation the
/// storage does not support: `Unsupported`), which no retry changes.
pub fn is_storage_error(error: &io::Error) -> bool {
    !matches!(
        error.kind(),
        io::ErrorKind::InvalidInput | io::ErrorKind::Unsupported
    )
}

/// The requests a device stopped on a storage error keeps
/// ([`ErrorPolicy::Stop`]), oldest first, and why it stopped.
///
/// `R` is what the device needs to run a request again (a virtqueue and
/// head, a frame context). The device takes no new requests while
/// [`ErrorStop::is_stopped`]; [`ErrorStop::resume`] hands the kept ones
/// back to be retried before anything else.
#[derive(Debug)]
pub struct ErrorStop<R> {
    held: Vec<R>,
    reason: Option<String>,
}

impl<R> Default for ErrorStop<R> {
    fn default() -> Self {
        ErrorStop {
            held: Vec::new(),
            reason: None,
        }
    }
}

impl<R> ErrorStop<R> {
    /// Keeps `request`, whose operation `what` (e.g. "write of 4096 bytes
    /// at 0x1000") failed with `error`. The first request kept stops the
    /// device: it is logged as a warning naming `device`, saying how to go
    /// on; those failing after it, while it is stopped, at debug level.
    pub fn hold(&mut self, device: &str, request: R, what: &dyn fmt::Display, error: &io::Error) {
        if self.reason.is_none() {
            warn!(
                "{device}: stopped on a storage error: {what}: {error}; the request is kept and \
                 no more are taken: fix the storage, then resume the device (the daemon's \
                 `api --api-socket PATH resume`) to retry it"
            );
            self.reason = Some(format!("{what}: {error}"));
        } else {
            debug!("{device}: also kept while stopped: {what}: {error}");
        }
        self.held.push(request);
    }

    /// Whether the device is stopped: it must take no new requests.
    pub fn is_stopped(&self) -> bool {
        self.reason.is_some()
    }

    /// The error the device stopped on, if it is stopped.
    pub fn reason(&self) -> Option<&str> {
        self.reason.as_deref()
    }

    /// The requests kept, oldest first.
    pub fn held(&self) -> &[R] {
        &self.held
    }

    /// Lets the device run again: forgets why it stopped and hands back
    /// the kept requests, oldest first, to be retried before any new one.
    pub fn resume(&mut self) -> Vec<R> {
        self.reason = None;
        std::mem::take(&mut self.held)
    }

    /// Forgets the kept requests and the stop (a reset: nobody waits for
    /// them any more).
    pub fn clear(&mut self) {
        self.reason = None;
        self.held.clear();
    }

    /// Stops on `reason`, keeping `held` (a device restored from a
    /// snapshot taken while stopped); nothing held means not stopped.
    pub fn restore(&mut self, reason: String, held: Vec<R>) {
        if held.is_empty() {
            self.clear();
        } else {
            self.reason = Some(reason);
            self.held = held;
        }
    }
}

/// How a storage device runs its back end's reads, writes and flushes
/// (and, in flight, discards and write-zeroes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Aio {
    /// On the event loop thread, one request at a time, while its queue is
    /// processed ([`BlockIo::read`], [`BlockIo::write`], ...).
    #[default]
    Sync,
    /// In flight on a pool of this many I/O threads (1 to
    /// [`crate::storage::MAX_IO_THREADS`]).
    Threads(usize),
    /// In flight on an io_uring: the requests of a queue round are
    /// submitted in one system call and their completions come back on an
    /// eventfd; no thread per request.
    IoUring,
}

impl Aio {
    /// The mode's name, as the daemon's `--aio` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Aio::Sync => "sync",
            Aio::Threads(_) => "threads",
            Aio::IoUring => "io_uring",
        }
    }
}

impl fmt::Display for Aio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Aio::Threads(n) => write!(f, "threads ({n} I/O thread(s))"),
            Aio::Sync => f.write_str("sync (on the event loop)"),
            Aio::IoUring => f.write_str("io_uring"),
        }
    }
}

/// I/O threads used in place of an io_uring that cannot be set up.
pub const FALLBACK_IO_THREADS: usize = 4;

/// A request to run in flight ([`BlockIo::start`]).
#[derive(Clone, Copy, Debug)]
pub enum BlockOp<'a, 'm> {
    /// Read `len` bytes at `disk_offset` into `[sg_offset, sg_offset + len)`
    /// of `sg`.
    Read {
        /// Destination buffers.
        sg: &'a SgList<'m>,
        /// Offset of the destination in `sg`.
        sg_offset: u64,
        /// Bytes to read.
        len: u64,
        /// Disk offset.
        disk_offset: u64,
    },
    /// Write `[sg_offset, sg_offset + len)` of `sg` at `disk_offset`, then
    /// flush if `flush` (write-through).
    Write {
        /// Source buffers.
        sg: &'a SgList<'m>,
        /// Offset of the source in `sg`.
        sg_offset: u64,
        /// Bytes to write.
        len: u64,
        /// Disk offset.
        disk_offset: u64,
        /// Flush after writing.
        flush: bool,
    },
    /// Make every write durable ([`BlockBackend::flush`]).
    Flush,
    /// Discard each range `(offset, len)` ([`BlockBackend::discard`]).
    Discard {
        /// The ranges.
        ranges: &'a [(u64, u64)],
    },
    /// Zero each range `(offset, len)` ([`BlockBackend::write_zeroes`]),
    /// then flush if `flush`.
    WriteZeroes {
        /// The ranges.
        ranges: &'a [(u64, u64)],
        /// Flush after zeroing.
        flush: bool,
    },
}

/// What [`BlockIo::start`] did with a request.
#[derive(Debug)]
pub enum Started<C> {
    /// In flight: its result comes back from [`BlockIo::collect`].
    InFlight,
    /// Done already, with this completion value and result (as
    /// [`BlockIo::collect`] would have handed them out).
    Done(C, io::Result<u64>),
}

/// A request in flight.
struct InFlight<C> {
    /// What its owner needs to complete it.
    completion: C,
    /// The guest buffers a read fills (empty unless a read), for the dirty
    /// log.
    read_into: GuestRanges,
    /// Bytes read on success (0 unless a read).
    read_len: u64,
    /// Keeps the guest memory of its buffers mapped.
    memory: Arc<GuestMemory>,
    /// The operation and its completions, on the io_uring engine (the I/O
    /// threads carry theirs in the job).
    ring: Option<RingOp>,
}

/// Emptied job buffer vectors, kept for their storage.
#[derive(Default)]
struct SpareBufs(Vec<Vec<IoBuf<'static>>>);

// SAFETY: every vector in it is empty (`put` clears them), so no buffer
// pointer crosses threads through it.
unsafe impl Send for SpareBufs {}

impl SpareBufs {
    fn take(&mut self) -> Vec<IoBuf<'static>> {
        self.0.pop().unwrap_or_default()
    }

    fn put(&mut self, mut v: Vec<IoBuf<'static>>) {
        // A flush's vector is empty: it would only make a later read or
        // write allocate.
        if v.capacity() > 0 {
            v.clear();
            self.0.push(v);
        }
    }
}

/// Where requests run.
enum Engine {
    /// On the caller's thread only.
    Sync,
    /// In flight on I/O threads.
    Threads(IoWorkers),
    /// In flight on an io_uring (boxed: the ring is large, and reached
    /// once per round, not per request).
    Uring(Box<Uring>),
}

/// Block I/O on a back end, on the caller's thread or in flight (on I/O
/// threads or an io_uring); `C` is what a request started in flight
/// carries to its completion.
pub struct BlockIo<C> {
    /// Where requests run. Declared first so that it is dropped first:
    /// dropping it waits for the requests in flight, whose buffers the
    /// mappings in `slots` keep valid until then.
    engine: Engine,
    backend: Arc<dyn BlockBackend>,
    /// Requests in flight, by token; `None` where free. Every token is
    /// either in use or in `free`.
    slots: Vec<Option<InFlight<C>>>,
    /// Free tokens.
    free: Vec<usize>,
    /// Jobs started and not yet submitted (I/O threads).
    jobs: Vec<IoJob>,
    /// Results being completed (I/O threads).
    done: Vec<IoDone>,
    /// Completions being recorded (io_uring).
    cqes: Vec<uring::Cqe>,
    /// Requests whose every completion came, or that ran on the spot, not
    /// handed out yet (io_uring).
    ready: Vec<usize>,
    /// Emptied `InFlight::read_into` vectors, kept for their storage.
    spare_ranges: Vec<GuestRanges>,
    /// Job buffer vectors of finished requests.
    spare_bufs: SpareBufs,
}

impl<C> BlockIo<C> {
    /// Block I/O on `backend`, running requests as `aio` says, with I/O
    /// threads named after `name`.
    ///
    /// [`Aio::IoUring`] on a back end that is not a file runs on the
    /// caller's thread (an in-memory disk's requests are copies best done
    /// on the spot); if the ring cannot be set up, this says why in one
    /// line of log and uses [`FALLBACK_IO_THREADS`] I/O threads. Fails if
    /// the I/O threads cannot be started, or their number is out of range.
    pub fn new(backend: Arc<dyn BlockBackend>, aio: Aio, name: &str) -> io::Result<Self> {
        let engine = match aio {
            Aio::Sync => Engine::Sync,
            Aio::Threads(n) => Engine::Threads(IoWorkers::new(backend.clone(), n, name)?),
            Aio::IoUring if !backend.file_backed() => {
                debug!("{name}: not a file: I/O runs on the event loop");
                Engine::Sync
            }
            Aio::IoUring => match Uring::new() {
                Ok(ring) => Engine::Uring(Box::new(ring)),
                Err(e) => {
                    warn!(
                        "{name}: io_uring unavailable: {}; using {FALLBACK_IO_THREADS} I/O \
                         threads instead",
                        uring::why(&e)
                    );
                    Engine::Threads(IoWorkers::new(backend.clone(), FALLBACK_IO_THREADS, name)?)
                }
            },
        };
        Ok(BlockIo {
            engine,
            backend,
            slots: Vec::new(),
            free: Vec::new(),
            jobs: Vec::new(),
            done: Vec::new(),
            cqes: Vec::new(),
            ready: Vec::new(),
            spare_ranges: Vec::new(),
            spare_bufs: SpareBufs::default(),
        })
    }

    /// The back end.
    pub fn backend(&self) -> &Arc<dyn BlockBackend> {
        &self.backend
    }

    /// How requests run: the mode asked for, or what replaced it.
    pub fn aio(&self) -> Aio {
        match &self.engine {
            Engine::Sync => Aio::Sync,
            Engine::Threads(w) => Aio::Threads(w.threads()),
            Engine::Uring(_) => Aio::IoUring,
        }
    }

    /// Whether requests can be started in flight ([`BlockIo::start`]).
    pub fn runs_in_flight(&self) -> bool {
        !matches!(self.engine, Engine::Sync)
    }

    /// Reads `len` bytes at `disk_offset` into `[sg_offset, sg_offset +
    /// len)` of `sg`, on this thread. The guest memory read into is marked
    /// dirty, even if the read fails; it is marked before the read, which
    /// is right as long as the dirty log is read on this thread (the event
    /// loop's).
    pub fn read(
        &self,
        sg: &SgList<'_>,
        sg_offset: u64,
        len: u64,
        disk_offset: u64,
    ) -> io::Result<()> {
        transfer(&*self.backend, sg, sg_offset, len, disk_offset, true)
    }

    /// Writes `[sg_offset, sg_offset + len)` of `sg` at `disk_offset`, on
    /// this thread, then flushes if `flush` (write-through).
    pub fn write(
        &self,
        sg: &SgList<'_>,
        sg_offset: u64,
        len: u64,
        disk_offset: u64,
        flush: bool,
    ) -> io::Result<()> {
        transfer(&*self.backend, sg, sg_offset, len, disk_offset, false)?;
        if flush {
            self.backend.flush()?;
        }
        Ok(())
    }

    /// Makes every write durable, on this thread.
    pub fn flush(&self) -> io::Result<()> {
        self.backend.flush()
    }

    /// Starts `op` in flight; it runs once submitted ([`BlockIo::submit`])
    /// and its result comes back with `completion` from
    /// [`BlockIo::collect`]. `memory` must be the guest memory the buffers
    /// of `op` were translated in ([`SgList::memory`]); the request keeps
    /// it mapped until its result is collected.
    ///
    /// On the io_uring, a request may be done at once instead
    /// ([`Started::Done`], to complete as a synchronous one): a read or
    /// write of a page-cached image that `RWF_NOWAIT` could do without
    /// waiting, or a request the ring cannot run as it is (buffers not
    /// aligned for `O_DIRECT`), run here and now; before such a write, the
    /// requests on the ring are waited for, so that a read-modify-write
    /// cycle cannot undo one of them.
    ///
    /// Fails, handing `completion` back, if requests cannot run in flight
    /// ([`Aio::Sync`]), if the range exceeds the list or if the list is of
    /// other memory.
    pub fn start(
        &mut self,
        op: BlockOp<'_, '_>,
        memory: &Arc<GuestMemory>,
        completion: C,
    ) -> Result<Started<C>, (C, io::Error)> {
        if !self.runs_in_flight() {
            return Err((completion, io::Error::other("no I/O threads")));
        }
        let (data, read) = match op {
            BlockOp::Read {
                sg, sg_offset, len, ..
            } => (Some((sg, sg_offset, len)), true),
            BlockOp::Write {
                sg, sg_offset, len, ..
            } => (Some((sg, sg_offset, len)), false),
            _ => (None, false),
        };
        // A flush moves no data: its vectors stay empty, unallocated.
        let mut bufs = Vec::new();
        let mut read_into = Vec::new();
        if let Some((sg, sg_offset, len)) = data {
            if !std::ptr::eq(sg.memory(), &**memory) {
                let e = io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "buffers outside the guest memory kept mapped",
                );
                return Err((completion, e));
            }
            bufs = self.spare_bufs.take();
            if read {
                read_into = self.spare_ranges.pop().unwrap_or_default();
            }
            let gathered = sg.for_each(sg_offset, len, |piece| {
                let b = IoBuf::from(piece.slice);
                // SAFETY: the piece lies in the guest memory `memory` maps
                // (the list's memory, checked above); the request holds
                // `memory` until its result is collected, and guest memory
                // is only accessed as raw bytes.
                bufs.push(unsafe { IoBuf::from_raw_parts(b.as_ptr(), b.len()) });
                if read {
                    read_into.push((piece.addr, piece.slice.len()));
                }
                Ok(())
            });
            if let Err(e) = gathered {
                // Not started: the vectors go back to the pools.
                self.spare_bufs.put(bufs);
                self.put_ranges(read_into);
                return Err((completion, e));
            }
        }
        let (op, read_len) = match op {
            BlockOp::Read {
                len, disk_offset, ..
            } => (
                IoOp::Read {
                    offset: disk_offset,
                    bufs,
                },
                len,
            ),
            BlockOp::Write {
                disk_offset, flush, ..
            } => (
                IoOp::Write {
                    offset: disk_offset,
                    bufs,
                    flush,
                },
                0,
            ),
            BlockOp::Flush => (IoOp::Flush, 0),
            BlockOp::Discard { ranges } => (
                IoOp::Discard {
                    ranges: ranges.to_vec(),
                },
                0,
            ),
            BlockOp::WriteZeroes { ranges, flush } => (
                IoOp::WriteZeroes {
                    ranges: ranges.to_vec(),
                    flush,
                },
                0,
            ),
        };
        let token = match self.free.pop() {
            Some(t) => t,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        let ring = match &mut self.engine {
            Engine::Uring(ring) => {
                // SAFETY: the buffers lie in the guest memory the slot keeps
                // mapped, and the iovec array is the operation's, which the
                // slot holds, until the request's completions are reaped
                // (in `collect`, `drain_and_collect`, `forget_all` or when
                // the ring is dropped, before the slots).
                let result = match unsafe { ring.prepare(token, &op, &*self.backend) } {
                    uring::Prepared::Queued(parts) => Err(RingOp::queued(op, parts)),
                    uring::Prepared::Done => Ok((op, Ok(()))),
                    uring::Prepared::Fallback => {
                        // A read-modify-write must not undo a write on the
                        // ring: wait for those first (rare: misaligned).
                        if matches!(op, IoOp::Write { .. } | IoOp::WriteZeroes { .. }) {
                            ring.wait_all();
                        }
                        let result = op.run(&*self.backend);
                        Ok((op, result))
                    }
                };
                match result {
                    Err(queued) => Some(queued),
                    Ok((mut op, result)) => {
                        // Done here: completed like a synchronous request.
                        self.free.push(token);
                        self.spare_bufs.put(op.take_bufs());
                        mark_dirty(memory, &read_into);
                        self.put_ranges(read_into);
                        return Ok(Started::Done(completion, result.map(|()| read_len)));
                    }
                }
            }
            _ => {
                self.jobs.push(IoJob {
                    token: token as u64,
                    op,
                });
                None
            }
        };
        self.slots[token] = Some(InFlight {
            completion,
            read_into,
            read_len,
            memory: memory.clone(),
            ring,
        });
        Ok(Started::InFlight)
    }

    /// Keeps the storage of an `InFlight::read_into` vector for later reads.
    fn put_ranges(&mut self, mut v: GuestRanges) {
        // Writes and flushes have none: an empty vector would only make a
        // later read allocate.
        if v.capacity() > 0 {
            v.clear();
            self.spare_ranges.push(v);
        }
    }

    /// Hands the requests started since the last call to the I/O threads,
    /// as one batch, or to the kernel, in one `io_uring_enter`.
    pub fn submit(&mut self) {
        match &mut self.engine {
            Engine::Sync => {}
            // SAFETY: every job was made by `start`, from buffers that lie
            // in the guest memory its slot keeps mapped until the result is
            // collected (or, in `forget_all` and on drop, until the threads
            // are idle), and guest memory is only accessed as raw bytes.
            Engine::Threads(workers) => unsafe { workers.submit(&mut self.jobs) },
            Engine::Uring(ring) => ring.submit(),
        }
    }

    /// Readable when results can be collected, if requests run in flight;
    /// for the event loop.
    pub fn completion_fd(&self) -> Option<RawFd> {
        match &self.engine {
            Engine::Sync => None,
            Engine::Threads(w) => Some(w.completion_fd()),
            Engine::Uring(ring) => Some(ring.completion_fd()),
        }
    }

    /// Requests started and not collected yet.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Hands the results of the requests that finished to `f`, with their
    /// completion values: the bytes read into guest memory, or the error.
    /// The guest memory a read wrote is marked dirty first, whatever the
    /// outcome.
    pub fn collect<F>(&mut self, mut f: F)
    where
        F: FnMut(C, io::Result<u64>),
    {
        match &mut self.engine {
            Engine::Sync => {}
            Engine::Threads(workers) => {
                let mut done = std::mem::take(&mut self.done);
                workers.collect(&mut done);
                for d in done.drain(..) {
                    let token = d.token as usize;
                    self.spare_bufs.put(d.bufs);
                    let Some(r) = self.slots.get_mut(token).and_then(Option::take) else {
                        continue;
                    };
                    self.free.push(token);
                    mark_read_dirty(&r);
                    self.put_ranges(r.read_into);
                    f(r.completion, d.result.map(|()| r.read_len));
                }
                self.done = done;
            }
            Engine::Uring(ring) => {
                ring.reap(&mut self.cqes);
                self.record_cqes();
                let mut ready = std::mem::take(&mut self.ready);
                for token in ready.drain(..) {
                    let Some(mut r) = self.slots.get_mut(token).and_then(Option::take) else {
                        continue;
                    };
                    self.free.push(token);
                    let result = match &mut r.ring {
                        Some(op) => {
                            let result = op.finish(&*self.backend);
                            self.spare_bufs.put(op.op.take_bufs());
                            result
                        }
                        None => Ok(()),
                    };
                    mark_read_dirty(&r);
                    self.put_ranges(r.read_into);
                    f(r.completion, result.map(|()| r.read_len));
                }
                self.ready = ready;
            }
        }
    }

    /// Records the reaped io_uring completions with their requests; those
    /// that got their last one become ready.
    fn record_cqes(&mut self) {
        for cqe in self.cqes.drain(..) {
            let Some(Some(InFlight { ring: Some(op), .. })) = self.slots.get_mut(cqe.token) else {
                continue;
            };
            if op.record(&cqe) {
                self.ready.push(cqe.token);
            }
        }
    }

    /// Waits until every request started has run (submitting what is
    /// pending); their results are then ready to collect.
    fn wait_all(&mut self) {
        match &mut self.engine {
            Engine::Sync => {}
            Engine::Threads(workers) => {
                // SAFETY: as in `submit`.
                unsafe { workers.submit(&mut self.jobs) };
                workers.drain();
            }
            Engine::Uring(ring) => ring.wait_all(),
        }
    }

    /// Submits what is pending, waits until every request started has run,
    /// then collects them all ([`BlockIo::collect`]); for pausing the device
    /// or unmapping guest memory.
    pub fn drain_and_collect<F>(&mut self, f: F)
    where
        F: FnMut(C, io::Result<u64>),
    {
        self.wait_all();
        self.collect(f);
    }

    /// Submits what is pending, waits until every request started has run,
    /// and drops their completion values without handing out their results
    /// (a reset: nobody is waiting any more). Their reads did land in guest
    /// memory, so those pages are still marked dirty.
    pub fn forget_all(&mut self) {
        if !self.runs_in_flight() {
            return;
        }
        self.wait_all();
        match &mut self.engine {
            Engine::Sync => {}
            Engine::Threads(workers) => {
                workers.collect(&mut self.done);
                for d in self.done.drain(..) {
                    self.spare_bufs.put(d.bufs);
                }
            }
            Engine::Uring(ring) => {
                ring.reap(&mut self.cqes);
                self.cqes.clear();
                self.ready.clear();
            }
        }
        for token in 0..self.slots.len() {
            if let Some(mut r) = self.slots[token].take() {
                mark_read_dirty(&r);
                if let Some(op) = &mut r.ring {
                    self.spare_bufs.put(op.op.take_bufs());
                }
                self.put_ranges(r.read_into);
                self.free.push(token);
            }
        }
    }
}

/// Marks the pages a read in flight wrote as dirty: the back end
/// wrote them behind vm-memory's back (whatever the outcome). The mapping
/// the request kept is the one written to.
fn mark_read_dirty<C>(r: &InFlight<C>) {
    mark_dirty(&r.memory, &r.read_into);
}

/// Marks `ranges` of `memory` dirty.
fn mark_dirty(memory: &GuestMemory, ranges: &[(GuestAddress, usize)]) {
    for &(addr, len) in ranges {
        for slice in memory.get_slices(addr, len).flatten() {
            slice.bitmap().mark_dirty(0, slice.len());
        }
    }
}

/// Moves `len` bytes between `[sg_offset, sg_offset + len)` of `sg` and the
/// back end at `disk_offset`: into guest memory (`to_guest`, a read) or
/// from it (a write), straight between the back end and the guest's pages.
/// Guest memory read into is marked dirty, even if the transfer fails.
fn transfer(
    backend: &dyn BlockBackend,
    sg: &SgList<'_>,
    sg_offset: u64,
    len: u64,
    disk_offset: u64,
    to_guest: bool,
) -> io::Result<()> {
    let mut iov = [IoBuf::empty(); IO_BATCH];
    let mut count = 0;
    let mut pos = disk_offset;
    let run = |iov: &[IoBuf<'_>], pos: &mut u64| -> io::Result<()> {
        let bytes: u64 = iov.iter().map(|b| b.len() as u64).sum();
        let r = if to_guest {
            backend.read_vectored_at(iov, *pos)
        } else {
            backend.write_vectored_at(iov, *pos)
        };
        *pos += bytes;
        r
    };
    sg.for_each(sg_offset, len, |piece| {
        if count == IO_BATCH {
            run(&iov, &mut pos)?;
            count = 0;
        }
        if to_guest {
            // The back end writes the pages behind vm-memory's back. The
            // dirty log is only read on this thread, so marking them
            // before the read is as good as after it.
            piece.slice.bitmap().mark_dirty(0, piece.slice.len());
        }
        iov[count] = IoBuf::from(piece.slice);
        count += 1;
        Ok(())
    })?;
    if count > 0 {
        run(&iov[..count], &mut pos)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use vm_memory::bitmap::AtomicBitmap;
    use vm_memory::{Bytes, GuestMemoryRegion};

    use super::*;
    use crate::storage::MemoryDisk;

    const PAGE: u64 = 4096;

    /// Two regions of 16 pages with a hole between them.
    fn guest() -> Arc<GuestMemory> {
        Arc::new(
            vm_memory::GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[
                (GuestAddress(0x10000), 0x10000),
                (GuestAddress(0x30000), 0x10000),
            ])
            .unwrap(),
        )
    }

    fn dirty(mem: &GuestMemory, addr: u64) -> bool {
        let (region, off) = mem.to_region_addr(GuestAddress(addr)).unwrap();
        region.bitmap().dirty_at(off.0 as usize)
    }

    fn disk(len: usize) -> Arc<MemoryDisk> {
        let data = (0..len).map(|i| (i / 512) as u8).collect();
        Arc::new(MemoryDisk::from_vec(data, false))
    }

    /// The same disk, where `aio` runs on its file if it is io_uring.
    fn disk_for(aio: Aio, len: usize) -> Arc<MemoryDisk> {
        if aio != Aio::IoUring {
            return disk(len);
        }
        let data: Vec<u8> = (0..len).map(|i| (i / 512) as u8).collect();
        Arc::new(MemoryDisk::in_memfd(&data, false).unwrap())
    }

    /// Starts `op` with completion `c`; a request done at once goes to
    /// `done`, as `collect` would have handed it out.
    fn start_or_done<C>(
        io: &mut BlockIo<C>,
        op: BlockOp<'_, '_>,
        mem: &Arc<GuestMemory>,
        c: C,
        mut done: impl FnMut(C, io::Result<u64>),
    ) {
        match io.start(op, mem, c) {
            Ok(Started::InFlight) => {}
            Ok(Started::Done(c, r)) => done(c, r),
            Err((_, e)) => panic!("not started: {e}"),
        }
    }

    /// The engines that run requests in flight here: I/O threads, and
    /// io_uring where the kernel lets us.
    fn engines() -> Vec<Aio> {
        let mut v = vec![Aio::Threads(2)];
        match io_uring_support() {
            Ok(()) => v.push(Aio::IoUring),
            Err(why) => eprintln!("SKIP io_uring: {why}"),
        }
        v
    }

    /// A list of `n` one-page buffers, every other page of the first region
    /// and then of the second.
    fn scattered(mem: &GuestMemory, n: u64) -> SgList<'_> {
        let mut sg = SgList::new(mem);
        for i in 0..n {
            let base = if i < 8 {
                0x10000
            } else {
                0x30000 - 8 * 2 * PAGE
            };
            assert!(sg.push_buffer(GuestAddress(base + i * 2 * PAGE), PAGE as u32));
        }
        sg
    }

    #[test]
    fn synchronous_transfers_move_data_and_mark_reads_dirty() {
        let mem = guest();
        let d = disk(1 << 20);
        let io: BlockIo<()> = BlockIo::new(d.clone(), Aio::Sync, "test").unwrap();
        assert!(!io.runs_in_flight() && io.completion_fd().is_none());
        assert_eq!(io.aio(), Aio::Sync);
        // More pieces than one vectored call takes.
        let sg = scattered(&mem, 12);
        io.read(&sg, 100, 11 * PAGE, 3 * 512).unwrap();
        let mut b = [0u8; 2];
        mem.read_slice(&mut b, GuestAddress(0x10000 + 99)).unwrap();
        assert_eq!(b, [0, 3]);
        // Byte 100 + 11 pages of the list is in its last page.
        mem.read_slice(&mut b, GuestAddress(0x30000 + 6 * PAGE + 99))
            .unwrap();
        assert_eq!(b, [(3 + 88 - 1) as u8, 0]);
        for i in 0..12 {
            let base = if i < 8 { 0x10000 } else { 0x30000 - 16 * PAGE };
            assert!(dirty(&mem, base + i * 2 * PAGE), "page {i}");
            assert!(!dirty(&mem, base + i * 2 * PAGE + PAGE), "gap {i}");
        }

        // Written back one sector further, with a flush.
        io.write(&sg, 100, 11 * PAGE, 4 * 512, true).unwrap();
        let mut want = vec![0u8; 11 * PAGE as usize];
        sg.read_at(100, &mut want).unwrap();
        assert_eq!(d.contents()[4 * 512..][..want.len()], want[..]);
        assert_eq!(d.flush_count(), 1);
        io.write(&sg, 0, 512, 0, false).unwrap();
        io.flush().unwrap();
        assert_eq!(d.flush_count(), 2);

        // Past the list or the disk.
        assert!(io.read(&sg, 1, 12 * PAGE, 0).is_err());
        assert!(io.write(&sg, 0, 512, 1 << 20, true).is_err());
        assert_eq!(d.flush_count(), 2);
        assert!(io.read(&sg, 0, 512, (1 << 20) - 511).is_err());
    }

    #[test]
    fn results_come_back_with_their_completion_values() {
        for aio in engines() {
            let mem = guest();
            let d = disk_for(aio, 1 << 20);
            let mut io: BlockIo<u32> = BlockIo::new(d.clone(), aio, "test").unwrap();
            assert!(io.runs_in_flight() && io.completion_fd().is_some());
            assert_eq!(io.aio(), aio);
            let sg = scattered(&mem, 12);
            let read = |sg_offset, len, disk_offset| BlockOp::Read {
                sg: &sg,
                sg_offset,
                len,
                disk_offset,
            };
            let mut got = Vec::new();
            let mut put = |c, r: io::Result<u64>| got.push((c, r.map_err(|e| e.kind())));
            // Sectors 1-8 into pages 0-1, sectors 40-47 into page 11.
            start_or_done(&mut io, read(0, 2 * PAGE, 512), &mem, 1, &mut put);
            start_or_done(&mut io, read(11 * PAGE, PAGE, 40 * 512), &mem, 2, &mut put);
            // Page 2 to sector 1000, with a flush; then a flush alone.
            let w = BlockOp::Write {
                sg: &sg,
                sg_offset: 2 * PAGE,
                len: PAGE,
                disk_offset: 1000 * 512,
                flush: true,
            };
            start_or_done(&mut io, w, &mem, 3, &mut put);
            start_or_done(&mut io, BlockOp::Flush, &mem, 4, &mut put);
            // A read past the end of the disk fails (on the I/O thread, or at
            // once: the ring cannot run it).
            start_or_done(&mut io, read(3 * PAGE, PAGE, 1 << 20), &mem, 5, &mut put);
            io.drain_and_collect(&mut put);
            got.sort_by_key(|g| g.0);
            assert_eq!(got.len(), 5);
            assert_eq!(got[0], (1, Ok(2 * PAGE)));
            assert_eq!(got[1], (2, Ok(PAGE)));
            assert_eq!(got[2], (3, Ok(0)));
            assert_eq!(got[3], (4, Ok(0)));
            assert_eq!(got[4].0, 5);
            assert!(got[4].1.is_err());
            assert_eq!(io.in_flight(), 0);
            assert_eq!(d.flush_count(), 2);
            assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10000)).unwrap(), 1);
            assert_eq!(
                mem.read_obj::<u8>(GuestAddress(0x10000 + 2 * PAGE))
                    .unwrap(),
                9
            );
            assert_eq!(
                mem.read_obj::<u8>(GuestAddress(0x30000 + 6 * PAGE))
                    .unwrap(),
                40
            );
            assert_eq!(d.contents()[1000 * 512..][..PAGE as usize], [0u8; 4096]);
            // The reads are in the dirty log (the failed one too: the back end
            // may have written some of it); nothing else is.
            for (addr, want) in [
                (0x10000, true),
                (0x10000 + 2 * PAGE, true),
                (0x30000 + 6 * PAGE, true),
                (0x10000 + 6 * PAGE, true),
                (0x10000 + 4 * PAGE, false),
                (0x10000 + PAGE, false),
            ] {
                assert_eq!(dirty(&mem, addr), want, "{addr:#x}");
            }
            // Nothing more to collect.
            io.collect(|_, _| panic!("collected twice"));
        }
    }

    #[test]
    fn more_buffers_than_one_vectored_call_takes_in_every_engine() {
        for aio in engines().into_iter().chain([Aio::Sync]) {
            let mem = guest();
            let d = disk_for(aio, 1 << 20);
            let mut io: BlockIo<u32> = BlockIo::new(d.clone(), aio, "test").unwrap();
            // 1100 buffers of 16 bytes, one every 32 bytes of the first region.
            let mut sg = SgList::new(&mem);
            for i in 0..1100u64 {
                assert!(sg.push_buffer(GuestAddress(0x10000 + i * 32), 16));
            }
            let len = 1100 * 16;
            let mut got = Vec::new();
            let mut put = |c, r: io::Result<u64>| got.push((c, r.map_err(|e| e.kind())));
            let read = BlockOp::Read {
                sg: &sg,
                sg_offset: 0,
                len,
                disk_offset: 2 * 512,
            };
            if aio == Aio::Sync {
                put(1, io.read(&sg, 0, len, 2 * 512).map(|()| len));
            } else {
                start_or_done(&mut io, read, &mem, 1, &mut put);
                io.drain_and_collect(&mut put);
            }
            assert_eq!(got, vec![(1, Ok(len))], "{aio}");
            // Byte k of the transfer is disk byte 1024 + k, of sector
            // (1024 + k) / 512.
            for k in [0u64, 16 * 1024 + 15, len - 1] {
                let at = 0x10000 + k / 16 * 32 + k % 16;
                let want = ((1024 + k) / 512) as u8;
                assert_eq!(mem.read_obj::<u8>(GuestAddress(at)).unwrap(), want, "{aio}");
            }
        }
    }

    #[test]
    fn requests_that_cannot_start_hand_their_completion_back() {
        for aio in engines() {
            let mem = guest();
            let other = guest();
            let d = disk_for(aio, 1 << 16);
            let sg = scattered(&mem, 2);
            let read = BlockOp::Read {
                sg: &sg,
                sg_offset: 0,
                len: 2 * PAGE,
                disk_offset: 0,
            };
            let mut sync: BlockIo<u8> = BlockIo::new(d.clone(), Aio::Sync, "test").unwrap();
            assert_eq!(sync.start(read, &mem, 7).unwrap_err().0, 7);
            assert_eq!(sync.in_flight(), 0);
            let mut io: BlockIo<u8> = BlockIo::new(d, aio, "test").unwrap();
            // Buffers of other memory than the one kept mapped.
            let (c, e) = io.start(read, &other, 8).unwrap_err();
            assert_eq!((c, e.kind()), (8, io::ErrorKind::InvalidInput));
            // Past the end of the list.
            let long = BlockOp::Write {
                sg: &sg,
                sg_offset: 1,
                len: 2 * PAGE,
                disk_offset: 0,
                flush: false,
            };
            assert_eq!(io.start(long, &mem, 9).unwrap_err().0, 9);
            assert_eq!(io.in_flight(), 0);
            io.drain_and_collect(|_, _| panic!("nothing was started"));
        }
    }

    /// Counts the completion values dropped.
    struct Counted(Arc<AtomicUsize>);

    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn forget_all_tells_nobody_and_still_marks_reads_dirty() {
        for aio in engines() {
            let mem = guest();
            let d = disk_for(aio, 1 << 16);
            let dropped = Arc::new(AtomicUsize::new(0));
            let mut io = BlockIo::new(d, aio, "test").unwrap();
            let sg = scattered(&mem, 4);
            for i in 0..4 {
                let op = BlockOp::Read {
                    sg: &sg,
                    sg_offset: i * PAGE,
                    len: PAGE,
                    disk_offset: i * PAGE,
                };
                // Done at once, a request is not forgotten: it is dropped here.
                start_or_done(&mut io, op, &mem, Counted(dropped.clone()), |_, _| {});
                // Half of them submitted, half still pending.
                if i == 1 {
                    io.submit();
                }
            }
            let c = Counted(dropped.clone());
            start_or_done(&mut io, BlockOp::Flush, &mem, c, |_, _| {});
            let done_at_once = dropped.load(Ordering::SeqCst);
            assert_eq!(io.in_flight() + done_at_once, 5);
            io.forget_all();
            assert_eq!(dropped.load(Ordering::SeqCst), 5);
            assert_eq!(io.in_flight(), 0);
            for i in 0..4 {
                assert!(dirty(&mem, 0x10000 + i * 2 * PAGE), "page {i}");
            }
            io.collect(|_, _| panic!("forgotten requests completed"));
            // The memory kept mapped is let go.
            assert_eq!(Arc::strong_count(&mem), 1);
            // Nothing in flight: nothing to forget.
            io.forget_all();
            assert_eq!(dropped.load(Ordering::SeqCst), 5);
        }
    }

    #[test]
    fn policies_stop_only_on_storage_errors() {
        assert_eq!("report".parse(), Ok(ErrorPolicy::Report));
        assert_eq!("stop".parse(), Ok(ErrorPolicy::Stop));
        assert!("ignore"
            .parse::<ErrorPolicy>()
            .unwrap_err()
            .contains("report or stop"));
        assert_eq!(ErrorPolicy::default(), ErrorPolicy::Report);
        assert_eq!(ErrorPolicy::Stop.to_string(), "stop");
        let storage = [
            io::Error::from_raw_os_error(libc::EIO),
            io::Error::from_raw_os_error(libc::ENOSPC),
            io::Error::from_raw_os_error(libc::EDQUOT),
            io::Error::from_raw_os_error(libc::EROFS),
            io::Error::from_raw_os_error(libc::EACCES),
            io::Error::from(io::ErrorKind::UnexpectedEof),
        ];
        for e in &storage {
            assert!(is_storage_error(e), "{e}");
            assert!(ErrorPolicy::Stop.stops_on(e), "{e}");
            assert!(!ErrorPolicy::Report.stops_on(e), "{e}");
        }
        // What the request got wrong, as the back ends and guest_sg say it.
        let request = [
            crate::storage::check_range(4096, 4096, 1).unwrap_err(),
            io::Error::from_raw_os_error(libc::EINVAL),
            io::Error::from_raw_os_error(libc::EOPNOTSUPP),
        ];
        for e in &request {
            assert!(!is_storage_error(e), "{e}");
            assert!(!ErrorPolicy::Stop.stops_on(e), "{e}");
        }
    }

    #[test]
    fn an_error_stop_keeps_requests_until_resumed() {
        let mut stop: ErrorStop<u32> = ErrorStop::default();
        assert!(!stop.is_stopped() && stop.reason().is_none());
        let enospc = io::Error::from_raw_os_error(libc::ENOSPC);
        stop.hold("dev", 7, &"write of 512 bytes at 0x200", &enospc);
        assert!(stop.is_stopped());
        let reason = stop.reason().unwrap().to_string();
        assert!(
            reason.starts_with("write of 512 bytes at 0x200: "),
            "{reason}"
        );
        assert!(reason.contains("No space left"), "{reason}");
        // Later failures are kept too; the first one says why.
        stop.hold("dev", 3, &"flush", &io::Error::from_raw_os_error(libc::EIO));
        assert_eq!(stop.held(), [7, 3]);
        assert_eq!(stop.reason(), Some(reason.as_str()));
        assert_eq!(stop.resume(), [7, 3]);
        assert!(!stop.is_stopped() && stop.held().is_empty());
        assert!(stop.resume().is_empty());
        // A snapshot's requests come back stopped; none is no stop.
        stop.restore("why".into(), vec![1, 2]);
        assert_eq!((stop.reason(), stop.held()), (Some("why"), &[1, 2][..]));
        stop.clear();
        assert!(!stop.is_stopped() && stop.held().is_empty());
        stop.restore("why".into(), Vec::new());
        assert!(!stop.is_stopped());
    }

    #[test]
    fn tokens_and_vectors_are_reused() {
        for aio in engines() {
            let mem = guest();
            let d = disk_for(aio, 1 << 16);
            let mut io: BlockIo<u64> = BlockIo::new(d, aio, "test").unwrap();
            let sg = scattered(&mem, 8);
            let mut completed = 0u64;
            for round in 0..200u64 {
                let mut seen = 0u8;
                for i in 0..8 {
                    let op = match (round + i) % 3 {
                        0 => BlockOp::Read {
                            sg: &sg,
                            sg_offset: i * PAGE,
                            len: PAGE,
                            disk_offset: i * PAGE,
                        },
                        1 => BlockOp::Write {
                            sg: &sg,
                            sg_offset: i * PAGE,
                            len: PAGE,
                            disk_offset: i * PAGE,
                            flush: false,
                        },
                        _ => BlockOp::Flush,
                    };
                    let mut seen_now = 0u8;
                    start_or_done(&mut io, op, &mem, round * 8 + i, |c, r| {
                        assert!(r.is_ok() && c / 8 == round);
                        seen_now |= 1 << (c % 8);
                    });
                    seen |= seen_now;
                    completed += u64::from(seen_now.count_ones());
                }
                io.submit();
                io.drain_and_collect(|c, r| {
                    assert!(r.is_ok());
                    assert_eq!(c / 8, round);
                    seen |= 1 << (c % 8);
                    completed += 1;
                });
                assert_eq!(seen, 0xff);
                assert_eq!(io.in_flight(), 0);
            }
            assert_eq!(completed, 1600);
            // Never more tokens, buffer vectors or range vectors than requests
            // in flight at once.
            assert!(io.slots.len() <= 8);
            assert_eq!(io.free.len(), io.slots.len());
            assert!(io.spare_bufs.0.len() <= 8);
            assert!(io.spare_bufs.0.iter().all(|v| v.capacity() > 0));
            assert!(io.spare_ranges.len() <= 8);
            assert_eq!(Arc::strong_count(&mem), 1);
        }
    }

    /// A raw image of `len` bytes holding the same pattern as [`disk`],
    /// opened with `O_DIRECT` if `direct` (`None` if the file system
    /// cannot).
    fn image(
        len: usize,
        direct: bool,
    ) -> Option<(
        vmm_sys_util::tempfile::TempFile,
        Arc<crate::storage::RawFile>,
    )> {
        use std::os::unix::fs::FileExt;
        let t = vmm_sys_util::tempfile::TempFile::new().unwrap();
        let data: Vec<u8> = (0..len).map(|i| (i / 512) as u8).collect();
        t.as_file().write_all_at(&data, 0).unwrap();
        let options = crate::storage::RawFileOptions {
            direct,
            ..Default::default()
        };
        let f = crate::storage::RawFile::open(t.as_path(), options).ok()?;
        Some((t, Arc::new(f)))
    }

    #[test]
    fn the_ring_runs_every_operation_on_the_image() {
        use std::os::unix::fs::FileExt;
        if let Err(why) = io_uring_support() {
            eprintln!("SKIP io_uring: {why}");
            return;
        }
        // Through the page cache (reads there done at once, with
        // RWF_NOWAIT, where the file system can) and with O_DIRECT (every
        // transfer on the ring).
        for direct in [false, true] {
            let mem = guest();
            let Some((t, f)) = image(1 << 20, direct) else {
                eprintln!("SKIP O_DIRECT here");
                continue;
            };
            let mut io: BlockIo<u32> = BlockIo::new(f.clone(), Aio::IoUring, "test").unwrap();
            assert_eq!(io.aio(), Aio::IoUring);
            let sg = scattered(&mem, 4);
            mem.write_slice(&[0x77; 4096], GuestAddress(0x10000))
                .unwrap();
            let mut got = Vec::new();
            let mut put = |c, r: io::Result<u64>| got.push((c, r.map_err(|e| e.to_string())));
            // A write-through write (a WRITEV linked to an FSYNC), a flush, a
            // read, a discard and a write-zeroes of two ranges, in one round.
            let w = BlockOp::Write {
                sg: &sg,
                sg_offset: 0,
                len: PAGE,
                disk_offset: 8 * PAGE,
                flush: true,
            };
            start_or_done(&mut io, w, &mem, 1, &mut put);
            start_or_done(&mut io, BlockOp::Flush, &mem, 2, &mut put);
            let r = BlockOp::Read {
                sg: &sg,
                sg_offset: PAGE,
                len: 2 * PAGE,
                disk_offset: 2 * PAGE,
            };
            start_or_done(&mut io, r, &mem, 3, &mut put);
            let discard = [(16 * PAGE, PAGE)];
            let d = BlockOp::Discard { ranges: &discard };
            start_or_done(&mut io, d, &mem, 4, &mut put);
            let zero = [(20 * PAGE, PAGE), (22 * PAGE, 512)];
            let z = BlockOp::WriteZeroes {
                ranges: &zero,
                flush: true,
            };
            start_or_done(&mut io, z, &mem, 5, &mut put);
            io.submit();
            io.drain_and_collect(&mut put);
            got.sort_by_key(|g| g.0);
            assert_eq!(
                got,
                [
                    (1, Ok(0)),
                    (2, Ok(0)),
                    (3, Ok(2 * PAGE)),
                    (4, Ok(0)),
                    (5, Ok(0))
                ],
                "direct: {direct}"
            );
            let at = |off: u64, len: usize| {
                let mut b = vec![0u8; len];
                t.as_file().read_exact_at(&mut b, off).unwrap();
                b
            };
            assert_eq!(at(8 * PAGE, 4096), [0x77; 4096]);
            assert_eq!(at(16 * PAGE, 4096), [0; 4096]);
            assert_eq!(at(20 * PAGE, 4096), [0; 4096]);
            assert_eq!(
                at(22 * PAGE, 513),
                [&[0u8; 512][..], &[(22 * 8 + 1) as u8]].concat()
            );
            // The read landed in pages 1 and 2 of the list, and is dirty.
            let page1 = 0x10000 + 2 * PAGE;
            assert_eq!(mem.read_obj::<u8>(GuestAddress(page1)).unwrap(), 16);
            assert!(dirty(&mem, page1) && !dirty(&mem, 0x10000 + 6 * PAGE));
            assert_eq!(f.bounced_bytes(), 0);

            // Cut under the device: the read comes up short at the end of
            // the file, and the rest fails as a truncated image, never zeros.
            t.as_file().set_len(10 * PAGE + 100).unwrap();
            let r = BlockOp::Read {
                sg: &sg,
                sg_offset: 0,
                len: 2 * PAGE,
                disk_offset: 9 * PAGE,
            };
            let mut got = Vec::new();
            let mut put = |c, r: io::Result<u64>| got.push((c, r.map_err(|e| e.kind())));
            start_or_done(&mut io, r, &mem, 6, &mut put);
            io.submit();
            io.drain_and_collect(&mut put);
            assert_eq!(got, [(6, Err(io::ErrorKind::UnexpectedEof))]);
        }
    }

    #[test]
    fn without_io_uring_i_o_threads_take_over() {
        let (_t, f) = image(1 << 16, false).unwrap();
        // A seccomp filter on this thread only, as a locked-down host's.
        let r = std::thread::spawn(move || {
            integration_tests::seccomp::deny_io_uring().unwrap();
            let e = uring::Uring::new().err().map(|e| uring::why(&e));
            assert!(
                e.as_deref().is_some_and(|e| e.contains("not permitted")),
                "{e:?}"
            );
            let mut io: BlockIo<u8> = BlockIo::new(f, Aio::IoUring, "test").unwrap();
            assert_eq!(io.aio(), Aio::Threads(FALLBACK_IO_THREADS));
            let mem = guest();
            let sg = scattered(&mem, 1);
            let r = BlockOp::Read {
                sg: &sg,
                sg_offset: 0,
                len: PAGE,
                disk_offset: 4 * PAGE,
            };
            let mut got = Vec::new();
            let mut put = |c, r: io::Result<u64>| got.push((c, r.map_err(|e| e.kind())));
            start_or_done(&mut io, r, &mem, 1, &mut put);
            io.drain_and_collect(&mut put);
            assert_eq!(got, [(1, Ok(PAGE))]);
            assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10000)).unwrap(), 32);
        })
        .join();
        assert!(r.is_ok());
    }
}
