//! virtio-blk (virtio spec 5.2) over a [`BlockBackend`].
//!
//! Requests: `IN`, `OUT`, `FLUSH` (`fdatasync`), `GET_ID`, `DISCARD` and
//! `WRITE_ZEROES`; anything else completes with `VIRTIO_BLK_S_UNSUPP`.
//! When the driver does not negotiate `VIRTIO_BLK_F_FLUSH` every write is
//! followed by a flush (write-through).
//!
//! With [`VirtioBlkConfig::aio`] at [`Aio::Sync`] every request runs on
//! the event loop thread while its queue is processed. Otherwise `IN`,
//! `OUT`, `FLUSH`, `DISCARD` and `WRITE_ZEROES` run in flight ([`BlockIo`]),
//! on I/O threads or an io_uring: the event loop parses the next requests
//! while earlier ones are read or written, and completes them (status,
//! used ring, interrupt) when the engine reports back, or at once if the
//! engine did them on the spot (cached data). `GET_ID`, and requests that
//! fail validation, always complete at once.
//!
//! A request the back end fails completes with `VIRTIO_BLK_S_IOERR`, or,
//! under [`ErrorPolicy::Stop`] ([`VirtioBlkConfig::on_error`]) and a
//! storage error, is kept: its queue and head go to an [`ErrorStop`], the
//! device takes no more chains off its rings (those on I/O threads finish,
//! and are kept too if they fail), and resuming the device walks each kept
//! chain again from its head and retries it before the rings. A snapshot
//! of a stopped device holds the kept heads, so the device restored from
//! it retries them when it runs.

mod request;

use std::fmt;
use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use log::{debug, info, warn};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use vfio_user_server::device::{DeviceContext, Interest, WatchedFd};
use vfio_user_server::guest_memory::GuestMemoryHandle;
use vfio_user_server::vm_migration::{MigratableError, Snapshot};
use vfio_user_server::warn_limited;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};

use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

use self::request::*;
use crate::block_io::{Aio, BlockIo, BlockOp, ErrorPolicy, ErrorStop, Started};
use crate::storage::{restore_writeback_lost, BlockBackend, BLOCK_ID_BYTES};
use crate::virtio::{
    ChainWalk, GuestMemory, VirtioDevice, VirtioError, VirtioPciDevice, VirtioPciError, MAX_QUEUES,
};

/// Largest data segment advertised (`size_max`).
pub const BLK_SIZE_MAX: u32 = 1 << 20;
/// Most data segments per request advertised (`seg_max`), also bounded by
/// the queue size.
pub const BLK_SEG_MAX: u32 = 1022;
/// Longest descriptor chain accepted; longer chains complete with nothing
/// written (used length 0).
pub const BLK_MAX_CHAIN_DESCRIPTORS: usize = 2048;
/// `max_discard_sectors` and `max_write_zeroes_sectors` (2 GiB).
pub const BLK_MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// `max_discard_seg` and `max_write_zeroes_seg`.
pub const BLK_MAX_DISCARD_SEG: u32 = 32;
/// `discard_sector_alignment` (4 KiB).
pub const BLK_DISCARD_SECTOR_ALIGNMENT: u32 = 8;

/// Size of the configuration space we expose (up to `unused1`).
const CONFIG_SIZE: usize = 0x3c;

/// Errors creating a virtio-blk device.
#[derive(Debug, Error)]
pub enum VirtioBlkError {
    /// `num_queues` is 0 or above [`MAX_QUEUES`].
    #[error("invalid number of queues {0}")]
    InvalidQueueCount(u16),
    /// `queue_size` is not a power of two in 2..=32768.
    #[error("invalid queue size {0}")]
    InvalidQueueSize(u16),
    /// The PCI transport could not be built.
    #[error("virtio-pci transport: {0}")]
    Transport(#[from] VirtioPciError),
    /// The I/O threads could not be started.
    #[error("I/O threads: {0}")]
    IoThreads(io::Error),
}

/// Options of a virtio-blk device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtioBlkConfig {
    /// Number of request queues (`VIRTIO_BLK_F_MQ` when more than 1).
    pub num_queues: u16,
    /// Maximum size of each queue; a power of two in 2..=32768.
    pub queue_size: u16,
    /// Expose the disk read-only even if the back end is writable.
    pub read_only: bool,
    /// Serial returned by `GET_ID` (at most 20 bytes are used); the back
    /// end's id by default.
    pub serial: Option<String>,
    /// Present a PCI Express endpoint with a 4 KiB configuration space.
    pub pcie: bool,
    /// How back-end reads, writes, flushes, discards and write-zeroes run:
    /// on the event loop thread, or in flight on I/O threads or an
    /// io_uring.
    pub aio: Aio,
    /// What a request the back end fails does: an I/O error for the
    /// guest, or a stop until the device is resumed.
    pub on_error: ErrorPolicy,
}

impl Default for VirtioBlkConfig {
    fn default() -> Self {
        VirtioBlkConfig {
            num_queues: 1,
            queue_size: 256,
            read_only: false,
            serial: None,
            pcie: true,
            aio: Aio::Sync,
            on_error: ErrorPolicy::Report,
        }
    }
}

/// A virtio block device model.
pub struct VirtioBlk {
    num_queues: u16,
    queue_size: u16,
    read_only: bool,
    serial: [u8; BLOCK_ID_BYTES],
    capacity: u64,
    config_space: [u8; CONFIG_SIZE],
    avail_features: u64,
    acked_features: u64,
    /// Guest memory, whose mapping requests in flight keep alive.
    memory: GuestMemoryHandle,
    /// The back end, and the requests in flight on its I/O threads.
    io: BlockIo<Completion>,
    /// Requests in flight per queue, at most the queue's size: a driver
    /// that re-posts heads it has in flight cannot make it grow further.
    per_queue: Vec<usize>,
    /// The I/O threads' completion eventfd, watched by the event loop.
    completion_fd: Option<WatchedFd>,
    /// What a failed request does.
    policy: ErrorPolicy,
    /// The requests kept while stopped on an error, and why.
    stop: ErrorStop<Kept>,
}

/// Name of the device in log messages.
const NAME: &str = "virtio-blk";

/// A request kept while stopped on an error: its chain, to walk again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Kept {
    /// Queue index.
    queue: u16,
    /// Head of its chain.
    head: u16,
}

/// The device's own state in a snapshot, only while it is stopped on an
/// error (the chains it took off the rings and did not complete, which the
/// device restored from it retries when it runs) or a flush of its image
/// failed.
#[derive(Debug, Serialize, Deserialize)]
struct BlkState {
    /// Why it stopped, if it did (always there in earlier daemons' states).
    stopped_on_error: Option<String>,
    /// The kept chains, oldest first.
    #[serde(default)]
    kept: Vec<Kept>,
    /// A flush of the image failed: accepted writes may be lost, and every
    /// later flush fails.
    #[serde(default)]
    writeback_lost: bool,
}

/// A back-end operation, for messages.
#[derive(Clone, Copy, Debug)]
enum Op {
    Read {
        offset: u64,
        len: u64,
    },
    Write {
        offset: u64,
        len: u64,
    },
    Flush,
    /// The first range, and how many more.
    Discard {
        offset: u64,
        len: u64,
        more: usize,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        more: usize,
    },
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Op::Read { offset, len } => write!(f, "read of {len} bytes at {offset:#x}"),
            Op::Write { offset, len } => write!(f, "write of {len} bytes at {offset:#x}"),
            Op::Flush => f.write_str("flush"),
            Op::Discard { offset, len, more } => {
                write!(f, "discard of {len} bytes at {offset:#x}")?;
                more_ranges(f, more)
            }
            Op::WriteZeroes { offset, len, more } => {
                write!(f, "write-zeroes of {len} bytes at {offset:#x}")?;
                more_ranges(f, more)
            }
        }
    }
}

/// The end of the message of a discard or write-zeroes of more than one
/// range.
fn more_ranges(f: &mut fmt::Formatter<'_>, more: usize) -> fmt::Result {
    if more > 0 {
        write!(f, " and {more} more range(s)")?;
    }
    Ok(())
}

/// What completing a request handed to the I/O threads needs.
struct Completion {
    /// Queue index.
    queue: usize,
    /// Head of its chain.
    head: u16,
    /// Guest address of its status byte.
    status: GuestAddress,
    /// What it does, should it fail.
    op: Op,
}

/// What a parsed request needs.
enum Plan {
    /// Completed with this status, having written this many data bytes.
    Done(u8, u64),
    /// Read `len` bytes at disk `offset` into the writable buffers.
    Read { offset: u64, len: u64 },
    /// Write `len` bytes of the readable buffers after the header at disk
    /// `offset`.
    Write { offset: u64, len: u64 },
    /// Flush.
    Flush,
    /// Discard (or zero, if `zero`) the ranges `(offset, len)`.
    Fallocate { zero: bool, ranges: Vec<(u64, u64)> },
}

/// What became of a chain taken off a ring.
enum Outcome {
    /// Completed: put it in the used ring with this length.
    Done(u32),
    /// Handed to the I/O threads.
    Started,
    /// Failed and kept for a retry: the device stopped.
    Kept,
}

fn bit(b: u32) -> u64 {
    1 << b
}

impl VirtioBlk {
    /// A device serving `backend` with `config`; its requests use guest
    /// `memory`.
    pub fn new(
        backend: Arc<dyn BlockBackend>,
        config: &VirtioBlkConfig,
        memory: GuestMemoryHandle,
    ) -> Result<Self, VirtioBlkError> {
        if config.num_queues == 0 || usize::from(config.num_queues) > MAX_QUEUES {
            return Err(VirtioBlkError::InvalidQueueCount(config.num_queues));
        }
        let qs = config.queue_size;
        if qs < 2 || !qs.is_power_of_two() || qs > 32768 {
            return Err(VirtioBlkError::InvalidQueueSize(qs));
        }
        let read_only = config.read_only || backend.read_only();
        let capacity = backend.size() >> SECTOR_SHIFT;
        let id = config.serial.clone().unwrap_or_else(|| backend.id());
        let mut serial = [0u8; BLOCK_ID_BYTES];
        let n = id.len().min(BLOCK_ID_BYTES);
        serial[..n].copy_from_slice(&id.as_bytes()[..n]);

        let mut features = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | bit(VIRTIO_BLK_F_SIZE_MAX)
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_FLUSH);
        if config.num_queues > 1 {
            features |= bit(VIRTIO_BLK_F_MQ);
        }
        if read_only {
            features |= bit(VIRTIO_BLK_F_RO);
        } else {
            features |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
        }

        let seg_max = u32::from(qs).saturating_sub(2).clamp(1, BLK_SEG_MAX);
        let mut c = [0u8; CONFIG_SIZE];
        let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
        put(0x00, &capacity.to_le_bytes());
        put(0x08, &BLK_SIZE_MAX.to_le_bytes());
        put(0x0c, &seg_max.to_le_bytes());
        put(0x14, &(SECTOR_SIZE as u32).to_le_bytes());
        put(0x22, &config.num_queues.to_le_bytes());
        put(0x24, &BLK_MAX_DISCARD_SECTORS.to_le_bytes());
        put(0x28, &BLK_MAX_DISCARD_SEG.to_le_bytes());
        put(0x2c, &BLK_DISCARD_SECTOR_ALIGNMENT.to_le_bytes());
        put(0x30, &BLK_MAX_DISCARD_SECTORS.to_le_bytes());
        put(0x34, &BLK_MAX_DISCARD_SEG.to_le_bytes());

        let io =
            BlockIo::new(backend, config.aio, "virtio-blk").map_err(VirtioBlkError::IoThreads)?;
        let completion_fd = io.completion_fd().map(WatchedFd::readable);
        Ok(VirtioBlk {
            completion_fd,
            num_queues: config.num_queues,
            queue_size: qs,
            read_only,
            serial,
            capacity,
            config_space: c,
            avail_features: features,
            acked_features: 0,
            memory,
            io,
            per_queue: vec![0; usize::from(config.num_queues)],
            policy: config.on_error,
            stop: ErrorStop::default(),
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether the disk is exposed read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// How back-end I/O runs (what [`VirtioBlkConfig::aio`] asked for, or
    /// what replaced it).
    pub fn aio(&self) -> Aio {
        self.io.aio()
    }

    /// Requests handed to the I/O threads and not completed yet.
    pub fn in_flight(&self) -> usize {
        self.io.in_flight()
    }

    /// Requests kept while the device is stopped on an error.
    pub fn kept(&self) -> usize {
        self.stop.held().len()
    }

    fn acked(&self, feature: u32) -> bool {
        self.acked_features & bit(feature) != 0
    }

    /// Executes the chain of queue `queue` with head `head` on this
    /// thread. Completed, its used length is the number of bytes written
    /// to its device-writable buffers, status included (0 if the status
    /// byte could not be written).
    fn execute<I>(&mut self, queue: usize, head: u16, chain: I, mem: &GuestMemory) -> Outcome
    where
        I: Iterator<Item = Descriptor>,
    {
        let mut req = Request::new(mem);
        if !parse_request(head, chain, &mut req) {
            return Outcome::Done(0);
        }
        let (op, result) = match self.plan(&req) {
            Plan::Done(status, written) => return Outcome::Done(req.finish(status, written)),
            Plan::Read { offset, len } => (
                Op::Read { offset, len },
                self.io.read(&req.writable, 0, len, offset).map(|()| len),
            ),
            Plan::Write { offset, len } => (
                Op::Write { offset, len },
                self.write(&req, offset, len).map(|()| 0),
            ),
            Plan::Flush => (Op::Flush, self.io.flush().map(|()| 0)),
            Plan::Fallocate { zero, ranges } => (
                fallocate_op(zero, &ranges),
                self.fallocate(zero, &ranges).map(|()| 0),
            ),
        };
        match result {
            Ok(written) => Outcome::Done(req.finish(S_OK, written)),
            Err(e) => {
                if keep(self.policy, &mut self.stop, queue, head, op, &e) {
                    Outcome::Kept
                } else {
                    // Some of a read's data may have reached the guest,
                    // but the driver must not rely on any of it.
                    Outcome::Done(req.finish(S_IOERR, 0))
                }
            }
        }
    }

    /// Checks a request and decides what it needs; requests that need no
    /// back-end I/O (and invalid ones) are done here.
    fn plan(&self, req: &Request<'_>) -> Plan {
        let mut hdr = [0u8; OUTHDR_SIZE as usize];
        if req.malformed || req.readable.read_at(0, &mut hdr).is_err() {
            return Plan::Done(S_IOERR, 0);
        }
        let hdr = OutHeader::parse(&hdr);
        match hdr.request_type {
            VIRTIO_BLK_T_IN => {
                let len = req.writable.len();
                match sector_range(hdr.sector, len, self.capacity) {
                    Some((offset, _)) if len & (SECTOR_SIZE - 1) == 0 => Plan::Read { offset, len },
                    _ => Plan::Done(S_IOERR, 0),
                }
            }
            VIRTIO_BLK_T_OUT => {
                let len = req.readable.len() - OUTHDR_SIZE;
                match sector_range(hdr.sector, len, self.capacity) {
                    Some((offset, _)) if !self.read_only && len & (SECTOR_SIZE - 1) == 0 => {
                        Plan::Write { offset, len }
                    }
                    _ => Plan::Done(S_IOERR, 0),
                }
            }
            VIRTIO_BLK_T_FLUSH => Plan::Flush,
            VIRTIO_BLK_T_GET_ID => {
                let n = req.writable.len().min(BLOCK_ID_BYTES as u64);
                match req.writable.write_at(0, &self.serial[..n as usize]) {
                    Ok(()) => Plan::Done(S_OK, n),
                    Err(_) => Plan::Done(S_IOERR, 0),
                }
            }
            VIRTIO_BLK_T_DISCARD if self.acked(VIRTIO_BLK_F_DISCARD) => {
                self.discard_or_zero(req, false)
            }
            VIRTIO_BLK_T_WRITE_ZEROES if self.acked(VIRTIO_BLK_F_WRITE_ZEROES) => {
                self.discard_or_zero(req, true)
            }
            t => {
                debug!("virtio-blk: unsupported request type {t}");
                Plan::Done(S_UNSUPP, 0)
            }
        }
    }

    /// Writes `len` bytes of the readable buffers of `req` (after the
    /// header) at `offset`, and flushes them if the driver cannot.
    fn write(&self, req: &Request<'_>, offset: u64, len: u64) -> io::Result<()> {
        let write_through = !self.acked(VIRTIO_BLK_F_FLUSH);
        self.io
            .write(&req.readable, OUTHDR_SIZE, len, offset, write_through)
    }

    /// Starts the chain of queue `queue` with head `head` on the I/O
    /// threads (its job is submitted with the batch), or completes it at
    /// once.
    fn start<I>(
        &mut self,
        queue: usize,
        head: u16,
        chain: I,
        mem: &GuestMemory,
        keep_mapped: &Arc<GuestMemory>,
    ) -> Outcome
    where
        I: Iterator<Item = Descriptor>,
    {
        let mut req = Request::new(mem);
        if !parse_request(head, chain, &mut req) {
            return Outcome::Done(0);
        }
        let Some(status) = req.status.as_ref().map(|s| s.addr) else {
            // `parse_request` checked there is one.
            return Outcome::Done(0);
        };
        let plan = self.plan(&req);
        let (op, block_op) = match &plan {
            Plan::Done(status, written) => return Outcome::Done(req.finish(*status, *written)),
            &Plan::Fallocate { zero, ref ranges } => (
                fallocate_op(zero, ranges),
                if zero {
                    BlockOp::WriteZeroes {
                        ranges,
                        flush: !self.acked(VIRTIO_BLK_F_FLUSH),
                    }
                } else {
                    BlockOp::Discard { ranges }
                },
            ),
            &Plan::Read { offset, len } => (
                Op::Read { offset, len },
                BlockOp::Read {
                    sg: &req.writable,
                    sg_offset: 0,
                    len,
                    disk_offset: offset,
                },
            ),
            &Plan::Write { offset, len } => (
                Op::Write { offset, len },
                BlockOp::Write {
                    sg: &req.readable,
                    sg_offset: OUTHDR_SIZE,
                    len,
                    disk_offset: offset,
                    flush: !self.acked(VIRTIO_BLK_F_FLUSH),
                },
            ),
            Plan::Flush => (Op::Flush, BlockOp::Flush),
        };
        let completion = Completion {
            queue,
            head,
            status,
            op,
        };
        match self.io.start(block_op, keep_mapped, completion) {
            Ok(Started::InFlight) => {
                if let Some(n) = self.per_queue.get_mut(queue) {
                    *n += 1;
                }
                Outcome::Started
            }
            // Done on the spot (data in the host's page cache): as on the
            // event loop.
            Ok(Started::Done(_, Ok(written))) => Outcome::Done(req.finish(S_OK, written)),
            Ok(Started::Done(c, Err(e))) => {
                if keep(self.policy, &mut self.stop, queue, head, c.op, &e) {
                    Outcome::Kept
                } else {
                    Outcome::Done(req.finish(S_IOERR, 0))
                }
            }
            Err((_, e)) => Outcome::Done(fail_start(&req, head, e)),
        }
    }

    /// The guest memory requests handed to the I/O threads keep mapped:
    /// `mem` itself, if the device has I/O threads and `mem` is the mapping
    /// it keeps alive for them; otherwise requests run on this thread.
    fn keep_mapped(&self, mem: &GuestMemory) -> Option<Arc<GuestMemory>> {
        self.io
            .runs_in_flight()
            .then(|| self.memory.memory().into_inner())
            .filter(|keep| std::ptr::eq(&**keep, mem))
    }

    /// Completes the requests whose results the I/O threads filed (all of
    /// them, once they have run, if `drain`); returns the queues that got
    /// used entries.
    fn complete(&mut self, queues: &mut [Queue], mem: &GuestMemory, drain: bool) -> Vec<usize> {
        let mut used = Vec::new();
        let per_queue = &mut self.per_queue;
        let (policy, stop) = (self.policy, &mut self.stop);
        let finish = |c: Completion, result: io::Result<u64>| {
            if let Some(n) = per_queue.get_mut(c.queue) {
                *n = n.saturating_sub(1);
            }
            let (status, written) = match result {
                Ok(read) => (S_OK, read),
                Err(e) => {
                    if keep(policy, stop, c.queue, c.head, c.op, &e) {
                        // Not completed: the driver keeps waiting for it.
                        return;
                    }
                    (S_IOERR, 0)
                }
            };
            // `write_obj` marks the byte dirty; `written` is bounded as in
            // `Request::finish`.
            let len = match mem.write_obj(status, c.status) {
                Ok(()) => u32::try_from(written + 1).unwrap_or(u32::MAX),
                Err(e) => {
                    warn_limited!("virtio-blk: chain {}: cannot write status: {e}", c.head);
                    0
                }
            };
            if let Some(q) = queues.get_mut(c.queue) {
                if let Err(e) = q.add_used(mem, c.head, len) {
                    warn_limited!("virtio-blk: cannot complete chain {}: {e}", c.head);
                }
                if !used.contains(&c.queue) {
                    used.push(c.queue);
                }
            }
        };
        if drain {
            self.io.drain_and_collect(finish);
        } else {
            self.io.collect(finish);
        }
        used
    }

    /// Checks a discard or write-zeroes: a request that is wrong is done
    /// with an error status; a good one is [`Plan::Fallocate`].
    fn discard_or_zero(&self, req: &Request<'_>, zero: bool) -> Plan {
        if self.read_only {
            return Plan::Done(S_IOERR, 0);
        }
        let segments = match read_dwz_segments(&req.readable, BLK_MAX_DISCARD_SEG) {
            Ok(s) => s,
            Err(status) => return Plan::Done(status, 0),
        };
        let allowed_flags = if zero {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        } else {
            0
        };
        let mut ranges = Vec::with_capacity(segments.len());
        for s in &segments {
            if s.flags & !allowed_flags != 0 {
                return Plan::Done(S_UNSUPP, 0);
            }
            if s.num_sectors > BLK_MAX_DISCARD_SECTORS {
                return Plan::Done(S_IOERR, 0);
            }
            let len = u64::from(s.num_sectors) << SECTOR_SHIFT;
            match sector_range(s.sector, len, self.capacity) {
                Some(r) => ranges.push(r),
                None => return Plan::Done(S_IOERR, 0),
            }
        }
        Plan::Fallocate { zero, ranges }
    }

    /// Discards or zeroes `ranges`, on this thread, and flushes zeroes the
    /// driver cannot flush itself.
    fn fallocate(&self, zero: bool, ranges: &[(u64, u64)]) -> io::Result<()> {
        let backend = self.io.backend();
        for &(offset, len) in ranges {
            if zero {
                backend.write_zeroes(offset, len)?;
            } else {
                backend.discard(offset, len)?;
            }
        }
        if zero && !self.acked(VIRTIO_BLK_F_FLUSH) {
            self.io.flush()?;
        }
        Ok(())
    }
}

/// A discard or write-zeroes of `ranges`, for messages.
fn fallocate_op(zero: bool, ranges: &[(u64, u64)]) -> Op {
    let (offset, len) = ranges.first().copied().unwrap_or_default();
    let more = ranges.len().saturating_sub(1);
    if zero {
        Op::WriteZeroes { offset, len, more }
    } else {
        Op::Discard { offset, len, more }
    }
}

/// Whether the request on queue `queue` with head `head`, whose `op`
/// failed with `e`, is kept for a retry in `stop` (stopping the device)
/// under `policy`; if not, it fails, and that is logged here.
fn keep(
    policy: ErrorPolicy,
    stop: &mut ErrorStop<Kept>,
    queue: usize,
    head: u16,
    op: Op,
    e: &io::Error,
) -> bool {
    // Queue indices are below MAX_QUEUES, which fits a u16.
    match u16::try_from(queue) {
        Ok(queue) if policy.stops_on(e) => {
            stop.hold(NAME, Kept { queue, head }, &op, e);
            true
        }
        _ => {
            warn_limited!("{NAME}: chain {head}: {op}: {e}");
            false
        }
    }
}

/// Parses the chain with head `head` into the empty `req`; `false`
/// (logged) if it is too long or has no status byte: it completes with
/// nothing written.
fn parse_request<'m, I>(head: u16, chain: I, req: &mut Request<'m>) -> bool
where
    I: Iterator<Item = Descriptor>,
{
    match req.parse(chain, BLK_MAX_CHAIN_DESCRIPTORS) {
        Ok(()) => true,
        Err(e) => {
            warn_limited!("virtio-blk: chain {head}: {e}");
            false
        }
    }
}

/// Completes a chain whose buffers could not be handed to the I/O threads
/// with IOERR; returns the used length.
fn fail_start(req: &Request<'_>, head: u16, e: io::Error) -> u32 {
    warn_limited!("virtio-blk: chain {head}: {e}");
    req.finish(S_IOERR, 0)
}

impl VirtioDevice for VirtioBlk {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.queue_size; usize::from(self.num_queues)]
    }

    fn features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if start >= CONFIG_SIZE {
            return;
        }
        let n = data.len().min(CONFIG_SIZE - start);
        data[..n].copy_from_slice(&self.config_space[start..start + n]);
    }

    fn activate(&mut self, features: u64) -> Result<(), VirtioError> {
        self.acked_features = features & self.avail_features;
        Ok(())
    }

    fn reset(&mut self) {
        self.acked_features = 0;
        // Wait for what is in flight, and forget it and what was kept on an
        // error: the driver gave the rings up. Its reads still go to the
        // dirty log.
        self.io.forget_all();
        self.per_queue.fill(0);
        self.stop.clear();
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
        budget: usize,
    ) -> Result<usize, VirtioError> {
        // Stopped on an error: the rings wait for the resume.
        if self.stop.is_stopped() {
            return Ok(0);
        }
        let keep_mapped = self.keep_mapped(mem);
        let in_flight_max = usize::from(queue.size());
        let mut taken = 0;
        while taken < budget {
            if keep_mapped.is_some()
                && self.per_queue.get(index).copied().unwrap_or(0) >= in_flight_max
            {
                // Full: the transport looks again when some complete.
                break;
            }
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            taken += 1;
            let head = chain.head_index();
            let outcome = match &keep_mapped {
                Some(k) => self.start(index, head, chain, mem, k),
                None => self.execute(index, head, chain, mem),
            };
            match outcome {
                Outcome::Done(len) => {
                    if let Err(e) = queue.add_used(mem, head, len) {
                        warn_limited!("virtio-blk: cannot complete chain {head}: {e}");
                    }
                }
                Outcome::Started => {}
                Outcome::Kept => break,
            }
        }
        self.io.submit();
        Ok(taken)
    }

    fn watched_fds(&self) -> &[WatchedFd] {
        self.completion_fd.as_slice()
    }

    fn handle_event(
        &mut self,
        fd: RawFd,
        _ready: Interest,
        queues: &mut [Queue],
        mem: &GuestMemory,
    ) -> Vec<usize> {
        if self.io.completion_fd() != Some(fd) {
            return Vec::new();
        }
        self.complete(queues, mem, false)
    }

    fn quiesce(&mut self, queues: &mut [Queue], mem: &GuestMemory) -> Vec<usize> {
        self.complete(queues, mem, true)
    }

    fn stopped_on_error(&self) -> Option<&str> {
        self.stop.reason()
    }

    fn retry(&mut self, queues: &mut [Queue], mem: &GuestMemory) -> Vec<usize> {
        let kept = self.stop.resume();
        if kept.is_empty() {
            return Vec::new();
        }
        info!("{NAME}: resumed: retrying {} kept request(s)", kept.len());
        let keep_mapped = self.keep_mapped(mem);
        let mut used = Vec::new();
        for Kept { queue, head } in kept {
            let index = usize::from(queue);
            let Some(q) = queues.get_mut(index) else {
                continue;
            };
            // The driver has not had the chain back: it is as it was.
            let chain = ChainWalk::new(q, mem, head);
            let outcome = match &keep_mapped {
                Some(k) => self.start(index, head, chain, mem, k),
                None => self.execute(index, head, chain, mem),
            };
            // Failed again: kept again, and the device stopped again.
            if let Outcome::Done(len) = outcome {
                if let Err(e) = q.add_used(mem, head, len) {
                    warn_limited!("{NAME}: cannot complete chain {head}: {e}");
                }
                if !used.contains(&index) {
                    used.push(index);
                }
            }
        }
        self.io.submit();
        used
    }

    fn snapshot(&mut self) -> Result<Option<Snapshot>, MigratableError> {
        // Only a stopped device (its kept requests), or one whose image
        // failed a flush, has state of its own.
        let reason = self.stop.reason();
        let writeback_lost = self.io.backend().writeback_lost();
        if reason.is_none() && !writeback_lost {
            return Ok(None);
        }
        let state = BlkState {
            stopped_on_error: reason.map(str::to_string),
            kept: self.stop.held().to_vec(),
            writeback_lost,
        };
        Snapshot::new_from_state(&state).map(Some)
    }

    fn restore(&mut self, snapshot: Option<&Snapshot>) -> Result<(), MigratableError> {
        let Some(snapshot) = snapshot else {
            self.stop.clear();
            return Ok(());
        };
        let state: BlkState = snapshot.to_state()?;
        // At most a ring's worth per queue can have been taken.
        let most = usize::from(self.num_queues) * usize::from(self.queue_size);
        if state.kept.len() > most {
            return Err(MigratableError::Restore(format!(
                "{} kept requests in the snapshot, at most {most} here",
                state.kept.len()
            )));
        }
        if let Some(k) = state.kept.iter().find(|k| k.queue >= self.num_queues) {
            return Err(MigratableError::Restore(format!(
                "a kept request on queue {}, {} queue(s) here",
                k.queue, self.num_queues
            )));
        }
        if state.stopped_on_error.is_none() && !state.kept.is_empty() {
            return Err(MigratableError::Restore(
                "kept requests in the snapshot of a device that did not stop".into(),
            ));
        }
        if state.writeback_lost {
            warn!("{NAME}: the saved device's image failed a flush: every flush fails");
            restore_writeback_lost(&**self.io.backend());
        }
        match state.stopped_on_error {
            Some(reason) => {
                info!(
                    "{NAME}: restored stopped on an error ({reason}), {} request(s) to retry",
                    state.kept.len()
                );
                self.stop.restore(reason, state.kept);
            }
            None => self.stop.clear(),
        }
        Ok(())
    }
}

/// virtio-blk behind the virtio PCI transport, ready for
/// [`vfio_user_server::pci::PciAdapter::new`].
pub type VirtioBlkPci = VirtioPciDevice<VirtioBlk>;

impl VirtioPciDevice<VirtioBlk> {
    /// A virtio-blk PCI function serving `backend`, with the guest memory
    /// and interrupts of `ctx`.
    pub fn new(
        ctx: DeviceContext,
        backend: Arc<dyn BlockBackend>,
        config: VirtioBlkConfig,
    ) -> Result<Self, VirtioBlkError> {
        let pcie = config.pcie;
        let blk = VirtioBlk::new(backend, &config, ctx.memory.clone())?;
        Ok(VirtioPciDevice::with_device(ctx, blk, pcie)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryDisk;

    fn blk(config: VirtioBlkConfig, ro: bool) -> VirtioBlk {
        let disk = MemoryDisk::from_vec(vec![0; 1 << 20], ro).with_id("disk-serial");
        VirtioBlk::new(Arc::new(disk), &config, DeviceContext::default().memory).unwrap()
    }

    fn cfg_u32(b: &VirtioBlk, off: u64) -> u32 {
        let mut d = [0u8; 4];
        b.read_config(off, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn features_and_config() {
        let b = blk(VirtioBlkConfig::default(), false);
        let f = b.features();
        assert_ne!(f & bit(VIRTIO_BLK_F_FLUSH), 0);
        assert_ne!(f & bit(VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(f & bit(VIRTIO_BLK_F_MQ), 0);
        assert_eq!(f & bit(VIRTIO_BLK_F_RO), 0);
        let mut cap = [0u8; 8];
        b.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 2048);
        assert_eq!(cfg_u32(&b, 0x0c), 254);
        assert_eq!(cfg_u32(&b, 0x14), 512);
        assert_eq!(cfg_u32(&b, 0x22) & 0xffff, 1);
        assert_eq!(cfg_u32(&b, 0x3c), 0);
        assert_eq!(cfg_u32(&b, u64::MAX), 0);
        let mut tail = [0xffu8; 8];
        b.read_config(0x38, &mut tail);
        assert_eq!(tail, [0; 8]);

        let b = blk(
            VirtioBlkConfig {
                num_queues: 4,
                ..Default::default()
            },
            true,
        );
        assert!(b.read_only());
        let f = b.features();
        assert_ne!(f & bit(VIRTIO_BLK_F_MQ), 0);
        assert_ne!(f & bit(VIRTIO_BLK_F_RO), 0);
        assert_eq!(f & bit(VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(b.queue_max_sizes(), vec![256; 4]);
    }

    #[test]
    fn bad_configs() {
        let disk: Arc<dyn BlockBackend> = Arc::new(MemoryDisk::new(4096).unwrap());
        for (q, s) in [
            (0, 256),
            (MAX_QUEUES as u16 + 1, 256),
            (1, 0),
            (1, 1),
            (1, 100),
        ] {
            let c = VirtioBlkConfig {
                num_queues: q,
                queue_size: s,
                ..Default::default()
            };
            assert!(VirtioBlk::new(disk.clone(), &c, DeviceContext::default().memory).is_err());
        }
    }
}
