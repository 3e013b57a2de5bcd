//! A SCSI direct-access block device (a disk) over a [`BlockBackend`].
//!
//! [`ScsiDisk::plan`] decodes a CDB: commands without back-end I/O are
//! answered at once, their data written to the data-in buffer; reads,
//! writes and cache synchronisation become a [`Transfer`], which
//! [`ScsiDisk::execute`] runs on the caller's thread, or on the disk's I/O
//! threads to be collected later ([`ScsiDisk::collect`]). Every error ends
//! as CHECK CONDITION with fixed-format sense data.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use thiserror::Error;
use vfio_user_server::guest_memory::GuestMemory;

use super::cdb::{opcode as op, Cdb, SA_READ_CAPACITY_16, SA_REPORT_SUPPORTED_OPCODES};
use super::inquiry::{ascii_field, inquiry, naa_from, Identity};
use super::mode::{mode_sense, ModeParams};
use super::rsoc::report_supported_opcodes;
use super::sense::{asc, key, Sense};
use crate::block_io::{Aio, BlockIo, BlockOp, Started};
use crate::guest_sg::SgList;
use crate::storage::BlockBackend;

/// The logical block size.
pub const BLOCK_SIZE: u32 = 512;
const BLOCK_SHIFT: u32 = 9;

/// SCSI status GOOD.
pub const STATUS_GOOD: u8 = 0x00;
/// SCSI status CHECK CONDITION.
pub const STATUS_CHECK_CONDITION: u8 = 0x02;

/// Errors creating a disk.
#[derive(Debug, Error)]
pub enum ScsiDiskError {
    /// The back end holds less than one block.
    #[error("the back end holds {0} bytes, less than one {BLOCK_SIZE}-byte block")]
    TooSmall(u64),
    /// The I/O threads could not be started.
    #[error("I/O threads: {0}")]
    IoThreads(io::Error),
}

/// How a disk presents itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScsiDiskConfig {
    /// T10 vendor identification (8 ASCII characters used).
    pub vendor: String,
    /// Product identification (16 ASCII characters used).
    pub product: String,
    /// Product revision (4 ASCII characters used).
    pub revision: String,
    /// Unit serial number; the back end's id by default.
    pub serial: Option<String>,
    /// Refuse writes even if the back end takes them.
    pub read_only: bool,
    /// Largest transfer in blocks, reported in the block limits page and
    /// enforced: a longer read or write fails with INVALID FIELD IN CDB
    /// (0: no limit).
    pub max_transfer_blocks: u32,
    /// Tells disks with the same serial apart in their NAA name.
    pub index: u32,
    /// How back-end reads, writes and flushes run: on the caller's thread,
    /// or in flight on I/O threads or an io_uring.
    pub aio: Aio,
    /// Report a write cache (WCE=1) and complete writes once the back end
    /// took them, durable at SYNCHRONIZE CACHE, FUA or [`ScsiDisk::flush`];
    /// otherwise (WCE=0) every write is flushed before it completes. A
    /// read-only disk has none.
    pub write_cache: bool,
}

impl Default for ScsiDiskConfig {
    fn default() -> Self {
        ScsiDiskConfig {
            vendor: "RUST-VMM".into(),
            product: "VIRTUAL DISK".into(),
            revision: "1.0".into(),
            serial: None,
            read_only: false,
            max_transfer_blocks: 0,
            index: 0,
            aio: Aio::Sync,
            write_cache: false,
        }
    }
}

/// How a command ended: GOOD, or CHECK CONDITION with sense data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Bytes of data-in transferred to the initiator.
    pub data_in: u64,
    /// The error, if the command failed.
    pub sense: Option<Sense>,
    /// The back end's error behind `sense`, if the back end failed: a
    /// controller that stops on storage errors keeps the command instead
    /// of completing it.
    pub failure: Option<TransferFailure>,
}

/// A transfer the back end failed, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransferFailure {
    /// The transfer.
    pub transfer: Transfer,
    /// The error's errno, if it had one.
    pub errno: Option<i32>,
    /// The error's kind.
    pub kind: io::ErrorKind,
}

impl TransferFailure {
    /// The back end's error (again).
    pub fn error(&self) -> io::Error {
        match self.errno {
            Some(errno) => io::Error::from_raw_os_error(errno),
            None => io::Error::from(self.kind),
        }
    }
}

impl std::fmt::Display for TransferFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = &self.transfer;
        match t.kind {
            TransferKind::Read => write!(f, "read of {} bytes at block {}", t.len, t.lba),
            TransferKind::Write { .. } => {
                write!(f, "write of {} bytes at block {}", t.len, t.lba)
            }
            TransferKind::Flush => write!(f, "flush"),
        }
    }
}

impl Outcome {
    /// GOOD, having transferred `data_in` bytes.
    pub fn good(data_in: u64) -> Self {
        Outcome {
            data_in,
            sense: None,
            failure: None,
        }
    }

    /// CHECK CONDITION with `sense`.
    pub fn check(sense: Sense) -> Self {
        Outcome {
            data_in: 0,
            sense: Some(sense),
            failure: None,
        }
    }

    /// The SCSI status byte.
    pub fn status(&self) -> u8 {
        match self.sense {
            None => STATUS_GOOD,
            Some(_) => STATUS_CHECK_CONDITION,
        }
    }
}

/// What a transfer does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransferKind {
    /// Read into the data-in buffer.
    Read,
    /// Write the data-out buffer, then flush if `flush`.
    Write {
        /// Make the data durable before completing.
        flush: bool,
    },
    /// Make every completed write durable.
    Flush,
}

/// A command that needs the back end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transfer {
    /// What it does.
    pub kind: TransferKind,
    /// First block (reported in the sense data of a medium error).
    pub lba: u64,
    /// Byte offset on the back end.
    pub offset: u64,
    /// Bytes, from the start of the data buffer.
    pub len: u64,
}

impl Transfer {
    /// The outcome of the transfer, given what the back end returned (the
    /// bytes read, or the error, kept in [`Outcome::failure`] for the
    /// controller to report or act on).
    pub fn outcome(&self, result: io::Result<u64>) -> Outcome {
        let e = match result {
            Ok(n) if self.kind == TransferKind::Read => return Outcome::good(n),
            Ok(_) => return Outcome::good(0),
            Err(e) => e,
        };
        let failure = TransferFailure {
            transfer: *self,
            errno: e.raw_os_error(),
            kind: e.kind(),
        };
        // A read that fails is a read error, whatever the back end says:
        // write protection and a full disk are about writes.
        let full = e.kind() == io::ErrorKind::StorageFull || e.raw_os_error() == Some(libc::ENOSPC);
        let sense = if self.kind == TransferKind::Read {
            Sense::read_error(self.lba)
        } else if e.kind() == io::ErrorKind::PermissionDenied {
            Sense::write_protected()
        } else if full {
            Sense::space_allocation_failed()
        } else {
            Sense::write_error(self.lba)
        };
        Outcome {
            failure: Some(failure),
            ..Outcome::check(sense)
        }
    }
}

/// What a command needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Done, without the back end.
    Done(Outcome),
    /// A back-end transfer, to run with [`ScsiDisk::execute`].
    Transfer(Transfer),
}

impl From<Sense> for Plan {
    fn from(sense: Sense) -> Self {
        Plan::Done(Outcome::check(sense))
    }
}

/// A read or write request, from a CDB or from a controller's own I/O
/// command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadWrite {
    /// A write (else a read).
    pub write: bool,
    /// First block.
    pub lba: u64,
    /// Number of blocks.
    pub blocks: u64,
    /// Force unit access: a write is durable before it completes.
    pub fua: bool,
}

/// A SCSI disk over a back end; `C` is what a command run on the I/O
/// threads carries to its completion (a frame, a descriptor chain).
pub struct ScsiDisk<C> {
    io: BlockIo<(Transfer, C)>,
    identity: Identity,
    blocks: u64,
    read_only: bool,
    write_cache: bool,
    /// A write completed that no flush has covered yet: without one,
    /// [`ScsiDisk::flush`] has nothing to do (a guest that sends cache
    /// flushes over and over costs no `fdatasync` each).
    unflushed: AtomicBool,
    /// Flushes started in flight and not collected yet: a flush asked for
    /// meanwhile cannot count on them (they may not have started, or
    /// fail) and runs too, even with nothing new to flush.
    flushes_in_flight: usize,
}

/// Notes a completed transfer: a write that was not flushed with it, and
/// a flush that failed, leave the disk with something to flush.
fn note_completed<T>(unflushed: &AtomicBool, t: &Transfer, result: &io::Result<T>) {
    let dirty = match t.kind {
        TransferKind::Write { flush: false } => true,
        TransferKind::Flush => result.is_err(),
        _ => false,
    };
    if dirty {
        unflushed.store(true, Ordering::Release);
    }
}

/// [`note_completed`] for a transfer collected from the I/O threads,
/// which also counts a flush as no longer in flight.
fn note_collected<T>(
    unflushed: &AtomicBool,
    flushes_in_flight: &mut usize,
    t: &Transfer,
    result: &io::Result<T>,
) {
    note_completed(unflushed, t, result);
    if t.kind == TransferKind::Flush {
        *flushes_in_flight = flushes_in_flight.saturating_sub(1);
    }
}

/// The transfer of a cache flush.
const FLUSH: Transfer = Transfer {
    kind: TransferKind::Flush,
    lba: 0,
    offset: 0,
    len: 0,
};

impl<C> ScsiDisk<C> {
    /// A disk on `backend`, presented as `config` says.
    pub fn new(
        backend: Arc<dyn BlockBackend>,
        config: &ScsiDiskConfig,
    ) -> Result<Self, ScsiDiskError> {
        let size = backend.size();
        let blocks = size >> BLOCK_SHIFT;
        if blocks == 0 {
            return Err(ScsiDiskError::TooSmall(size));
        }
        let read_only = config.read_only || backend.read_only();
        let serial: String = config
            .serial
            .clone()
            .unwrap_or_else(|| backend.id())
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .collect();
        let identity = Identity {
            vendor: ascii_field(&config.vendor),
            product: ascii_field(&config.product),
            revision: ascii_field(&config.revision),
            naa: naa_from(&serial, config.index),
            serial,
            max_transfer_blocks: config.max_transfer_blocks,
        };
        let io =
            BlockIo::new(backend, config.aio, "scsi-disk").map_err(ScsiDiskError::IoThreads)?;
        Ok(ScsiDisk {
            io,
            identity,
            blocks,
            read_only,
            // Nothing is ever written: no cache to report or flush.
            write_cache: config.write_cache && !read_only,
            // What the back end holds from before (another process, a
            // crash) is flushed by the first flush.
            unflushed: AtomicBool::new(true),
            flushes_in_flight: 0,
        })
    }

    /// Capacity in blocks of [`BLOCK_SIZE`] bytes.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Whether completed writes may wait in the back end's cache for a
    /// flush.
    pub fn write_cache(&self) -> bool {
        self.write_cache
    }

    /// The back end the disk reads and writes.
    pub fn backend(&self) -> &Arc<dyn BlockBackend> {
        self.io.backend()
    }

    /// The unit serial number.
    pub fn serial(&self) -> &str {
        &self.identity.serial
    }

    /// Decodes `cdb` and answers it if it needs no back-end I/O, writing
    /// its data-in to `data`; otherwise returns the transfer to run on
    /// `data` with [`ScsiDisk::execute`].
    pub fn plan(&self, cdb: &[u8], data: &SgList<'_>) -> Plan {
        let cdb = match Cdb::new(cdb) {
            Ok(c) => c,
            Err(sense) => return sense.into(),
        };
        let reply = |r: Result<Vec<u8>, Sense>, alloc: u64| match r {
            Ok(bytes) => Plan::Done(Outcome::good(write_response(data, &bytes, alloc))),
            Err(sense) => sense.into(),
        };
        match cdb.opcode() {
            op::TEST_UNIT_READY | op::START_STOP_UNIT => Plan::Done(Outcome::good(0)),
            op::REQUEST_SENSE => reply(request_sense(&cdb), cdb.be(4, 1)),
            op::INQUIRY => reply(inquiry(&cdb, &self.identity), cdb.be(3, 2)),
            op::MODE_SENSE_6 => reply(mode_sense(&cdb, &self.mode_params()), cdb.be(4, 1)),
            op::MODE_SENSE_10 => reply(mode_sense(&cdb, &self.mode_params()), cdb.be(7, 2)),
            op::READ_CAPACITY_10 => reply(self.read_capacity_10(&cdb), 8),
            op::SERVICE_ACTION_IN_16 if cdb.service_action() == SA_READ_CAPACITY_16 => {
                reply(Ok(self.read_capacity_16()), cdb.be(10, 4))
            }
            op::REPORT_LUNS => reply(report_luns(&cdb), cdb.be(6, 4)),
            op::MAINTENANCE_IN if cdb.service_action() == SA_REPORT_SUPPORTED_OPCODES => {
                reply(report_supported_opcodes(&cdb), cdb.be(6, 4))
            }
            op::SERVICE_ACTION_IN_16 | op::MAINTENANCE_IN => {
                Sense::invalid_field(1, Some(4)).into()
            }
            op::READ_6
            | op::WRITE_6
            | op::READ_10
            | op::WRITE_10
            | op::READ_12
            | op::WRITE_12
            | op::READ_16
            | op::WRITE_16 => match read_write(&cdb) {
                Ok(rw) => self.plan_read_write(rw, data.len()),
                Err(sense) => sense.into(),
            },
            op::SYNCHRONIZE_CACHE_10 => self.plan_sync(cdb.be(2, 4), cdb.be(7, 2)),
            op::SYNCHRONIZE_CACHE_16 => self.plan_sync(cdb.be(2, 8), cdb.be(10, 4)),
            _ => Sense::invalid_opcode().into(),
        }
    }

    /// Checks a read or write of the disk with a data buffer of
    /// `data_len` bytes, and returns its transfer. Writes to a read-only
    /// disk fail with DATA PROTECT, ranges beyond the capacity with LBA
    /// OUT OF RANGE, and a transfer longer than the disk's maximum or a
    /// buffer shorter than the transfer with INVALID FIELD IN CDB. Without
    /// a write cache, or with FUA, a write is durable once it completes.
    pub fn plan_read_write(&self, rw: ReadWrite, data_len: u64) -> Plan {
        if rw.write && self.read_only {
            return Sense::write_protected().into();
        }
        // What the block limits page promises, held to: one command's
        // transfer (and the event loop's time on it) stays bounded.
        let max = self.identity.max_transfer_blocks;
        if max != 0 && rw.blocks > u64::from(max) {
            return Sense::new(key::ILLEGAL_REQUEST, asc::INVALID_FIELD_IN_CDB).into();
        }
        match rw.lba.checked_add(rw.blocks) {
            Some(end) if end <= self.blocks => {}
            _ => return Sense::lba_out_of_range().into(),
        }
        // Both below the capacity in blocks, itself a byte count >> 9.
        let len = rw.blocks << BLOCK_SHIFT;
        if len > data_len {
            return Sense::new(key::ILLEGAL_REQUEST, asc::INVALID_FIELD_IN_CDB).into();
        }
        if len == 0 {
            return Plan::Done(Outcome::good(0));
        }
        let kind = if rw.write {
            // With the write cache reported off, a completed write must be
            // durable whether or not FUA asked for it.
            TransferKind::Write {
                flush: rw.fua || !self.write_cache,
            }
        } else {
            TransferKind::Read
        };
        Plan::Transfer(Transfer {
            kind,
            lba: rw.lba,
            offset: rw.lba << BLOCK_SHIFT,
            len,
        })
    }

    fn plan_sync(&self, lba: u64, blocks: u64) -> Plan {
        match lba.checked_add(blocks) {
            Some(end) if end <= self.blocks => Plan::Transfer(Transfer {
                kind: TransferKind::Flush,
                lba,
                offset: 0,
                len: 0,
            }),
            _ => Sense::lba_out_of_range().into(),
        }
    }

    fn mode_params(&self) -> ModeParams {
        ModeParams {
            blocks: self.blocks,
            block_size: BLOCK_SIZE,
            read_only: self.read_only,
            write_cache: self.write_cache,
        }
    }

    fn read_capacity_10(&self, cdb: &Cdb<'_>) -> Result<Vec<u8>, Sense> {
        // PMI clear with an LBA is invalid (SBC-3 5.16).
        if cdb.byte(8) & 1 == 0 && cdb.be(2, 4) != 0 {
            return Err(Sense::invalid_field(2, None));
        }
        // Too large for 32 bits: the initiator must use READ CAPACITY(16).
        let last = u32::try_from(self.blocks - 1).unwrap_or(u32::MAX);
        let mut r = last.to_be_bytes().to_vec();
        r.extend_from_slice(&BLOCK_SIZE.to_be_bytes());
        Ok(r)
    }

    fn read_capacity_16(&self) -> Vec<u8> {
        // No protection, one block per physical block, no provisioning.
        let mut r = vec![0u8; 32];
        r[0..8].copy_from_slice(&(self.blocks - 1).to_be_bytes());
        r[8..12].copy_from_slice(&BLOCK_SIZE.to_be_bytes());
        r
    }

    /// Runs `plan`: a transfer on the disk's I/O threads if it has some
    /// and `memory` is the guest memory `data` lies in (its outcome comes
    /// back with `completion` from [`ScsiDisk::collect`], once submitted
    /// with [`ScsiDisk::submit`]), anything else on this thread. Returns
    /// the outcome of what is done already.
    pub fn execute(
        &mut self,
        plan: Plan,
        data: &SgList<'_>,
        memory: &Arc<GuestMemory>,
        completion: C,
    ) -> Option<(C, Outcome)> {
        let t = match plan {
            Plan::Done(outcome) => return Some((completion, outcome)),
            Plan::Transfer(t) => t,
        };
        if !self.io.runs_in_flight() || !std::ptr::eq(data.memory(), &**memory) {
            return Some((completion, self.run(t, data)));
        }
        self.start(t, data, memory, completion)
    }

    /// Starts `t` on the I/O threads or the io_uring; returns its outcome
    /// if it is done already.
    fn start(
        &mut self,
        t: Transfer,
        data: &SgList<'_>,
        memory: &Arc<GuestMemory>,
        completion: C,
    ) -> Option<(C, Outcome)> {
        let op = match t.kind {
            TransferKind::Read => BlockOp::Read {
                sg: data,
                sg_offset: 0,
                len: t.len,
                disk_offset: t.offset,
            },
            TransferKind::Write { flush } => BlockOp::Write {
                sg: data,
                sg_offset: 0,
                len: t.len,
                disk_offset: t.offset,
                flush,
            },
            TransferKind::Flush => BlockOp::Flush,
        };
        match self.io.start(op, memory, (t, completion)) {
            Ok(Started::InFlight) => {
                if t.kind == TransferKind::Flush {
                    self.flushes_in_flight += 1;
                }
                None
            }
            Ok(Started::Done((t, completion), r)) => {
                note_completed(&self.unflushed, &t, &r);
                Some((completion, t.outcome(r)))
            }
            Err(((t, completion), e)) => {
                let r = Err(e);
                note_completed(&self.unflushed, &t, &r);
                Some((completion, t.outcome(r)))
            }
        }
    }

    /// Runs `t` on this thread.
    fn run(&self, t: Transfer, data: &SgList<'_>) -> Outcome {
        let result = match t.kind {
            TransferKind::Read => self.io.read(data, 0, t.len, t.offset).map(|()| t.len),
            TransferKind::Write { flush } => {
                self.io.write(data, 0, t.len, t.offset, flush).map(|()| 0)
            }
            TransferKind::Flush => self.io.flush().map(|()| 0),
        };
        note_completed(&self.unflushed, &t, &result);
        t.outcome(result)
    }

    /// Makes every completed write durable, on this thread (a pause, a
    /// reset); nothing to do if no write completed since the last one.
    pub fn flush(&self) -> io::Result<()> {
        if !self.unflushed.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let r = self.io.flush();
        note_completed(&self.unflushed, &FLUSH, &r);
        r
    }

    /// [`ScsiDisk::flush`] for a command (a controller's cache flush or
    /// shutdown): in flight on the I/O threads or the io_uring if the disk
    /// has them, its outcome coming back with `completion` from
    /// [`ScsiDisk::collect`] once submitted, so that the `fdatasync` does
    /// not hold up the caller. Returns the outcome of what is done
    /// already: nothing to flush, or flushed on this thread.
    pub fn start_flush(
        &mut self,
        memory: &Arc<GuestMemory>,
        completion: C,
    ) -> Option<(C, Outcome)> {
        if !self.io.runs_in_flight() {
            return Some((completion, FLUSH.outcome(self.flush().map(|()| 0))));
        }
        let dirty = self.unflushed.swap(false, Ordering::AcqRel);
        if !dirty && self.flushes_in_flight == 0 {
            return Some((completion, Outcome::good(0)));
        }
        // A flush moves no data: its list is empty.
        self.start(FLUSH, &SgList::new(memory), memory, completion)
    }

    /// Hands the transfers started since the last call to the I/O threads.
    pub fn submit(&mut self) {
        self.io.submit();
    }

    /// Readable when outcomes can be collected, if the disk has I/O
    /// threads.
    pub fn completion_fd(&self) -> Option<RawFd> {
        self.io.completion_fd()
    }

    /// How back-end I/O runs.
    pub fn aio(&self) -> Aio {
        self.io.aio()
    }

    /// Transfers started and not collected yet.
    pub fn in_flight(&self) -> usize {
        self.io.in_flight()
    }

    /// Hands the outcomes of finished transfers to `f`, with their
    /// completion values.
    pub fn collect<F: FnMut(C, Outcome)>(&mut self, mut f: F) {
        let (unflushed, flushing) = (&self.unflushed, &mut self.flushes_in_flight);
        self.io.collect(|(t, c), r| {
            note_collected(unflushed, flushing, &t, &r);
            f(c, t.outcome(r))
        });
    }

    /// Waits for every transfer started, then collects them all.
    pub fn drain_and_collect<F: FnMut(C, Outcome)>(&mut self, mut f: F) {
        let (unflushed, flushing) = (&self.unflushed, &mut self.flushes_in_flight);
        self.io.drain_and_collect(|(t, c), r| {
            note_collected(unflushed, flushing, &t, &r);
            f(c, t.outcome(r))
        });
    }

    /// Waits for every transfer started and drops them without an outcome
    /// (a reset: nobody waits for them any more).
    pub fn forget_all(&mut self) {
        self.io.forget_all();
        self.flushes_in_flight = 0;
        // Writes among them may have reached the back end.
        self.unflushed.store(true, Ordering::Release);
    }
}

/// Writes `bytes`, cut to the allocation length `alloc` and to the
/// buffer, to `data`; returns how many bytes it wrote.
fn write_response(data: &SgList<'_>, bytes: &[u8], alloc: u64) -> u64 {
    let n = (bytes.len() as u64).min(alloc).min(data.len());
    // `n` is at most `bytes.len()`.
    match data.write_at(0, &bytes[..n as usize]) {
        Ok(()) => n,
        Err(_) => 0,
    }
}

/// REQUEST SENSE: sense is returned with every CHECK CONDITION (autosense),
/// so none is ever pending.
fn request_sense(cdb: &Cdb<'_>) -> Result<Vec<u8>, Sense> {
    if cdb.byte(1) & 1 != 0 {
        // DESC: descriptor-format sense is not supported.
        return Err(Sense::invalid_field(1, Some(0)));
    }
    Ok(Sense::no_sense().encode().to_vec())
}

/// REPORT LUNS of a target with one logical unit, LUN 0.
fn report_luns(cdb: &Cdb<'_>) -> Result<Vec<u8>, Sense> {
    if cdb.be(6, 4) < 16 {
        return Err(Sense::invalid_field(6, None));
    }
    let luns: &[u64] = match cdb.byte(2) {
        // All logical units, or all but the well-known ones.
        0x00 | 0x02 => &[0],
        // Only the well-known logical units: there are none.
        0x01 => &[],
        _ => return Err(Sense::invalid_field(2, None)),
    };
    let mut r = ((luns.len() * 8) as u32).to_be_bytes().to_vec();
    r.extend_from_slice(&[0; 4]);
    for lun in luns {
        r.extend_from_slice(&lun.to_be_bytes());
    }
    Ok(r)
}

/// The request of a READ or WRITE CDB (6, 10, 12 or 16 bytes).
fn read_write(cdb: &Cdb<'_>) -> Result<ReadWrite, Sense> {
    let write = matches!(
        cdb.opcode(),
        op::WRITE_6 | op::WRITE_10 | op::WRITE_12 | op::WRITE_16
    );
    let (lba, blocks) = match cdb.opcode() {
        op::READ_6 | op::WRITE_6 => {
            let lba = cdb.be(1, 3) & 0x1f_ffff;
            // A length of 0 means 256 blocks.
            let blocks = match cdb.byte(4) {
                0 => 256,
                n => u64::from(n),
            };
            return Ok(ReadWrite {
                write,
                lba,
                blocks,
                fua: false,
            });
        }
        op::READ_10 | op::WRITE_10 => (cdb.be(2, 4), cdb.be(7, 2)),
        op::READ_12 | op::WRITE_12 => (cdb.be(2, 4), cdb.be(6, 4)),
        _ => (cdb.be(2, 8), cdb.be(10, 4)),
    };
    // RDPROTECT/WRPROTECT: no protection information here.
    if cdb.byte(1) >> 5 != 0 {
        return Err(Sense::invalid_field(1, Some(7)));
    }
    Ok(ReadWrite {
        write,
        lba,
        blocks,
        fua: cdb.byte(1) & 0x08 != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scsi::sense::FIXED_SENSE_LEN;
    use crate::storage::MemoryDisk;
    use vm_memory::bitmap::AtomicBitmap;
    use vm_memory::{Bytes, GuestAddress};

    const BUF: u64 = 0x10000;

    fn mem() -> Arc<GuestMemory> {
        Arc::new(
            vm_memory::GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 0x40000)])
                .unwrap(),
        )
    }

    fn sg(m: &GuestMemory, len: u32) -> SgList<'_> {
        let mut s = SgList::new(m);
        assert!(s.push_buffer(GuestAddress(BUF), len));
        s
    }

    /// A 1 MiB disk whose block `n` holds the byte `n`.
    fn disk(config: ScsiDiskConfig) -> (Arc<MemoryDisk>, ScsiDisk<u32>) {
        let data = (0..1 << 20).map(|i| (i >> 9) as u8).collect();
        let d = Arc::new(MemoryDisk::from_vec(data, false).with_id("serial-1"));
        let s = ScsiDisk::new(d.clone(), &config).unwrap();
        (d, s)
    }

    /// Runs `cdb` on this thread with a buffer of `len` bytes (filled with
    /// `fill` first); returns the outcome and the buffer.
    fn run(s: &mut ScsiDisk<u32>, cdb: &[u8], len: u32, fill: u8) -> (Outcome, Vec<u8>) {
        let m = mem();
        m.write_slice(&vec![fill; len as usize], GuestAddress(BUF))
            .unwrap();
        let data = sg(&m, len);
        let plan = s.plan(cdb, &data);
        let (c, o) = s.execute(plan, &data, &m, 7).expect("done at once");
        assert_eq!(c, 7);
        let mut b = vec![0u8; len as usize];
        m.read_slice(&mut b, GuestAddress(BUF)).unwrap();
        (o, b)
    }

    fn check(s: &mut ScsiDisk<u32>, cdb: &[u8], want: Sense) {
        let (o, _) = run(s, cdb, 4096, 0);
        assert_eq!(o.status(), STATUS_CHECK_CONDITION, "{cdb:x?}");
        assert_eq!(o.sense, Some(want), "{cdb:x?}");
        assert_eq!(o.data_in, 0);
    }

    #[test]
    fn commands_without_data() {
        let (_, mut s) = disk(ScsiDiskConfig::default());
        for cdb in [&[0x00u8, 0, 0, 0, 0, 0][..], &[0x1b, 0, 0, 0, 1, 0]] {
            let (o, _) = run(&mut s, cdb, 0, 0);
            assert_eq!((o.status(), o.data_in), (STATUS_GOOD, 0));
        }
        // TEST UNIT READY with no buffer at all.
        let m = mem();
        let empty = SgList::new(&m);
        assert_eq!(
            s.plan(&[0, 0, 0, 0, 0, 0], &empty),
            Plan::Done(Outcome::good(0))
        );
    }

    #[test]
    fn request_sense_and_inquiry() {
        let (_, mut s) = disk(ScsiDiskConfig::default());
        let (o, b) = run(&mut s, &[0x03, 0, 0, 0, 252, 0], 64, 0xaa);
        assert_eq!(o, Outcome::good(FIXED_SENSE_LEN as u64));
        assert_eq!((b[0], b[2], b[12]), (0x70, 0, 0));
        assert_eq!(b[18], 0xaa, "nothing past the sense data");
        check(
            &mut s,
            &[0x03, 1, 0, 0, 252, 0],
            Sense::invalid_field(1, Some(0)),
        );

        // Truncated to the allocation length, then to the buffer.
        let (o, b) = run(&mut s, &[0x12, 0, 0, 0, 5, 0], 64, 0xaa);
        assert_eq!(o.data_in, 5);
        assert_eq!(b[4..6], [31, 0xaa]);
        let (o, b) = run(&mut s, &[0x12, 0, 0, 0, 96, 0], 20, 0);
        assert_eq!(o.data_in, 20);
        assert_eq!(&b[8..16], b"RUST-VMM");
        let (o, b) = run(&mut s, &[0x12, 1, 0x80, 0, 96, 0], 96, 0);
        assert_eq!(o.data_in, 12);
        assert_eq!(&b[4..12], b"serial-1");
        check(
            &mut s,
            &[0x12, 1, 0xc0, 0, 96, 0],
            Sense::invalid_field(2, None),
        );
        assert_eq!(s.serial(), "serial-1");
    }

    #[test]
    fn capacity_mode_luns_and_opcodes() {
        let (_, mut s) = disk(ScsiDiskConfig {
            read_only: true,
            ..Default::default()
        });
        assert!(s.read_only());
        assert_eq!(s.blocks(), 2048);
        let (o, b) = run(&mut s, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8, 0);
        assert_eq!(o.data_in, 8);
        assert_eq!(b, [0, 0, 0x07, 0xff, 0, 0, 2, 0]);
        check(
            &mut s,
            &[0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0],
            Sense::invalid_field(2, None),
        );
        // PMI set: any LBA goes.
        let (o, _) = run(&mut s, &[0x25, 0, 0, 0, 0, 1, 0, 0, 1, 0], 8, 0);
        assert_eq!(o.status(), STATUS_GOOD);

        let mut rc16 = [0u8; 16];
        rc16[0] = 0x9e;
        rc16[1] = 0x10;
        rc16[13] = 32;
        let (o, b) = run(&mut s, &rc16, 64, 0);
        assert_eq!(o.data_in, 32);
        assert_eq!(b[..12], [0, 0, 0, 0, 0, 0, 0x07, 0xff, 0, 0, 2, 0]);
        assert_eq!(b[14], 0, "LBPME=0");
        rc16[1] = 0x11;
        check(&mut s, &rc16, Sense::invalid_field(1, Some(4)));

        // MODE SENSE: write-protected, WCE=0.
        let (o, b) = run(&mut s, &[0x1a, 0, 0x3f, 0, 0xff, 0], 255, 0);
        assert_eq!(o.data_in, 4 + 8 + 32);
        assert_eq!((b[2], b[3]), (0x80, 8));
        assert_eq!(b[12 + 2] & 0x04, 0);
        let (o, _) = run(&mut s, &[0x5a, 0, 0x08, 0, 0, 0, 0, 0, 10, 0], 255, 0);
        assert_eq!(o.data_in, 10);
        check(
            &mut s,
            &[0x5a, 0, 0x1c, 0, 0, 0, 0, 2, 0, 0],
            Sense::invalid_field(2, None),
        );

        let luns = |select: u8, alloc: u8| [0xa0, 0, select, 0, 0, 0, 0, 0, 0, alloc, 0, 0];
        let (o, b) = run(&mut s, &luns(0, 64), 64, 0xaa);
        assert_eq!(o.data_in, 16);
        assert_eq!(b[..16], [0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let (o, _) = run(&mut s, &luns(1, 64), 64, 0);
        assert_eq!(o.data_in, 8);
        check(&mut s, &luns(0, 15), Sense::invalid_field(6, None));
        check(&mut s, &luns(3, 64), Sense::invalid_field(2, None));

        let (o, b) = run(
            &mut s,
            &[0xa3, 0x0c, 1, 0x28, 0, 0, 0, 0, 1, 0, 0, 0],
            256,
            0,
        );
        assert_eq!(o.data_in, 14);
        assert_eq!(b[1], 3);
        check(
            &mut s,
            &[0xa3, 0x0a, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
            Sense::invalid_field(1, Some(4)),
        );

        // Unknown and reserved operation codes.
        check(&mut s, &[0x04, 0, 0, 0, 0, 0], Sense::invalid_opcode());
        check(&mut s, &[0x7f; 16], Sense::invalid_opcode());
        check(&mut s, &[0xc1; 16], Sense::invalid_opcode());
    }

    #[test]
    fn reads_and_writes() {
        let (d, mut s) = disk(ScsiDiskConfig::default());
        // READ(10) of blocks 3-4.
        let (o, b) = run(&mut s, &[0x28, 0, 0, 0, 0, 3, 0, 0, 2, 0], 1024, 0xaa);
        assert_eq!(o, Outcome::good(1024));
        assert_eq!((b[0], b[511], b[512], b[1023]), (3, 3, 4, 4));
        // READ(6) with length 0: 256 blocks.
        let (o, b) = run(&mut s, &[0x08, 0, 0, 1, 0, 0], 256 * 512, 0);
        assert_eq!(o.data_in, 256 * 512);
        assert_eq!((b[0], b[255 * 512]), (1, 0));
        // READ(12), READ(16).
        let (o, b) = run(&mut s, &[0xa8, 0, 0, 0, 0, 9, 0, 0, 0, 1, 0, 0], 512, 0);
        assert_eq!((o.data_in, b[0]), (512, 9));
        let mut r16 = [0u8; 16];
        r16[0] = 0x88;
        r16[9] = 10;
        r16[13] = 1;
        let (o, b) = run(&mut s, &r16, 512, 0);
        assert_eq!((o.data_in, b[0]), (512, 10));

        // WRITE(10), (6), (12), (16) land in the image, written through.
        let flushes = d.flush_count();
        let (o, _) = run(&mut s, &[0x2a, 0, 0, 0, 0, 5, 0, 0, 1, 0], 512, 0x55);
        assert_eq!(o, Outcome::good(0));
        assert_eq!(d.contents()[5 * 512..6 * 512], [0x55; 512]);
        assert_eq!(d.flush_count(), flushes + 1);
        run(&mut s, &[0x0a, 0, 0, 6, 1, 0], 512, 0x66);
        assert_eq!(d.contents()[6 * 512], 0x66);
        run(
            &mut s,
            &[0xaa, 0x08, 0, 0, 0, 7, 0, 0, 0, 1, 0, 0],
            512,
            0x77,
        );
        assert_eq!(d.contents()[7 * 512], 0x77);
        let mut w16 = r16;
        w16[0] = 0x8a;
        w16[9] = 8;
        run(&mut s, &w16, 512, 0x88);
        assert_eq!(d.contents()[8 * 512], 0x88);

        // A transfer of 0 blocks does nothing; a range past the end fails,
        // even with 0 blocks.
        let (o, _) = run(&mut s, &[0x28, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0, 0);
        assert_eq!(o, Outcome::good(0));
        check(
            &mut s,
            &[0x28, 0, 0, 0, 0x07, 0xff, 0, 0, 2, 0],
            Sense::lba_out_of_range(),
        );
        check(
            &mut s,
            &[0x28, 0, 0, 0, 0x08, 0x01, 0, 0, 0, 0],
            Sense::lba_out_of_range(),
        );
        let mut far = r16;
        far[2..10].copy_from_slice(&u64::MAX.to_be_bytes());
        check(&mut s, &far, Sense::lba_out_of_range());
        // Protection information, a buffer shorter than the transfer.
        check(
            &mut s,
            &[0x28, 0x20, 0, 0, 0, 0, 0, 0, 1, 0],
            Sense::invalid_field(1, Some(7)),
        );
        let (o, _) = run(&mut s, &[0x28, 0, 0, 0, 0, 0, 0, 0, 9, 0], 4096, 0);
        assert_eq!(o.sense.map(|s| (s.key, s.asc)), Some((5, 0x24)));
    }

    #[test]
    fn transfers_above_the_maximum_are_refused() {
        let (d, mut s) = disk(ScsiDiskConfig {
            max_transfer_blocks: 8,
            ..Default::default()
        });
        // 8 blocks go, 9 do not: neither read nor write touches the disk.
        let (o, b) = run(&mut s, &[0x28, 0, 0, 0, 0, 2, 0, 0, 8, 0], 4096, 0);
        assert_eq!((o.data_in, b[0], b[4095]), (4096, 2, 9));
        let before = d.contents();
        let mut w16 = [0u8; 16];
        w16[0] = 0x8a;
        w16[13] = 9;
        let (o, _) = run(&mut s, &w16, 9 * 512, 0x55);
        assert_eq!(o.sense.map(|s| (s.key, s.asc)), Some((5, 0x24)));
        assert_eq!(d.contents(), before);
        let (o, _) = run(&mut s, &[0x28, 0, 0, 0, 0, 0, 0, 0, 9, 0], 9 * 512, 0);
        assert_eq!(o.sense.map(|s| (s.key, s.asc)), Some((5, 0x24)));
        assert_eq!(o.data_in, 0);
    }

    #[test]
    fn read_only_disks_refuse_writes() {
        let (d, mut s) = disk(ScsiDiskConfig {
            read_only: true,
            ..Default::default()
        });
        let before = d.contents();
        check(
            &mut s,
            &[0x2a, 0, 0, 0, 0, 5, 0, 0, 1, 0],
            Sense::write_protected(),
        );
        check(&mut s, &[0x0a, 0, 0, 0, 1, 0], Sense::write_protected());
        assert_eq!(d.contents(), before);
        // A back end that is read-only makes the disk read-only.
        let ro = Arc::new(MemoryDisk::from_vec(vec![0; 4096], true));
        let s: ScsiDisk<u32> = ScsiDisk::new(ro, &ScsiDiskConfig::default()).unwrap();
        assert!(s.read_only());
        // A back end smaller than a block.
        let tiny = Arc::new(MemoryDisk::from_vec(vec![0; 511], false));
        assert!(matches!(
            ScsiDisk::<u32>::new(tiny, &ScsiDiskConfig::default()),
            Err(ScsiDiskError::TooSmall(511))
        ));
    }

    #[test]
    fn synchronize_cache() {
        let (d, mut s) = disk(ScsiDiskConfig::default());
        let before = d.flush_count();
        let (o, _) = run(&mut s, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0, 0);
        assert_eq!(o, Outcome::good(0));
        let mut c16 = [0u8; 16];
        c16[0] = 0x91;
        c16[9] = 8;
        c16[13] = 8;
        run(&mut s, &c16, 0, 0);
        assert_eq!(d.flush_count(), before + 2);
        check(
            &mut s,
            &[0x35, 0, 0, 0, 0x08, 0, 0, 0, 1, 0],
            Sense::lba_out_of_range(),
        );
        assert_eq!(d.flush_count(), before + 2);
        s.flush().unwrap();
        assert_eq!(d.flush_count(), before + 3);
    }

    #[test]
    fn a_write_cache_flushes_only_when_asked() {
        let (_, read_only) = disk(ScsiDiskConfig {
            write_cache: true,
            read_only: true,
            ..Default::default()
        });
        assert!(!read_only.write_cache(), "nothing to cache");
        let (d, mut s) = disk(ScsiDiskConfig {
            write_cache: true,
            ..Default::default()
        });
        assert!(s.write_cache());
        // MODE SENSE(6), caching page: WCE=1.
        let (o, b) = run(&mut s, &[0x1a, 0x08, 0x08, 0, 0xff, 0], 255, 0);
        assert_eq!(o.data_in, 4 + 20);
        assert_eq!((b[4], b[6] & 0x04), (0x08, 0x04));
        // A write lands in the back end without a flush.
        let before = d.flush_count();
        let (o, _) = run(&mut s, &[0x2a, 0, 0, 0, 0, 5, 0, 0, 1, 0], 512, 0x5a);
        assert_eq!(o, Outcome::good(0));
        assert_eq!(d.contents()[5 * 512..6 * 512], [0x5a; 512]);
        assert_eq!(d.flush_count(), before);
        // FUA, SYNCHRONIZE CACHE and the controller's flush do flush.
        run(&mut s, &[0x2a, 0x08, 0, 0, 0, 6, 0, 0, 1, 0], 512, 0x6a);
        assert_eq!(d.contents()[6 * 512], 0x6a);
        assert_eq!(d.flush_count(), before + 1);
        run(&mut s, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0, 0);
        assert_eq!(d.flush_count(), before + 2);
        s.flush().unwrap();
        assert_eq!(d.flush_count(), before + 3);
        // The controller's flush has nothing to do until a write completes
        // (FUA writes are flushed already).
        s.flush().unwrap();
        run(&mut s, &[0x2a, 0x08, 0, 0, 0, 6, 0, 0, 1, 0], 512, 0x6b);
        assert_eq!(d.flush_count(), before + 4);
        s.flush().unwrap();
        assert_eq!(d.flush_count(), before + 4);
        run(&mut s, &[0x2a, 0, 0, 0, 0, 7, 0, 0, 1, 0], 512, 0x7a);
        s.flush().unwrap();
        s.flush().unwrap();
        assert_eq!(d.flush_count(), before + 5);
    }

    #[test]
    fn a_failed_flush_is_tried_again_by_the_next() {
        let d = Arc::new(crate::storage::faulty::FaultyDisk::new(
            MemoryDisk::from_vec(vec![0; 1 << 20], false),
        ));
        let mut s: ScsiDisk<u32> = ScsiDisk::new(
            d.clone(),
            &ScsiDiskConfig {
                write_cache: true,
                ..Default::default()
            },
        )
        .unwrap();
        s.flush().unwrap();
        run(&mut s, &[0x2a, 0, 0, 0, 0, 5, 0, 0, 1, 0], 512, 0x5a);
        d.fail(
            crate::storage::faulty::Call::Flush,
            0,
            2048,
            libc::EIO,
            Some(1),
        );
        assert!(s.flush().is_err());
        let before = d.inner().flush_count();
        s.flush().unwrap();
        assert_eq!(d.inner().flush_count(), before + 1, "flushed again");
    }

    /// A back end whose every call fails with `kind`.
    struct Failing {
        kind: io::ErrorKind,
        size: u64,
    }

    impl BlockBackend for Failing {
        fn size(&self) -> u64 {
            self.size
        }
        fn read_at(&self, _: &mut [u8], _: u64) -> io::Result<()> {
            Err(self.kind.into())
        }
        fn write_at(&self, _: &[u8], _: u64) -> io::Result<()> {
            Err(self.kind.into())
        }
        fn flush(&self) -> io::Result<()> {
            Err(self.kind.into())
        }
        fn discard(&self, _: u64, _: u64) -> io::Result<()> {
            Err(self.kind.into())
        }
        fn write_zeroes(&self, _: u64, _: u64) -> io::Result<()> {
            Err(self.kind.into())
        }
        fn read_only(&self) -> bool {
            false
        }
        fn id(&self) -> String {
            "failing".into()
        }
    }

    fn failing(kind: io::ErrorKind, size: u64) -> ScsiDisk<u32> {
        ScsiDisk::new(Arc::new(Failing { kind, size }), &ScsiDiskConfig::default()).unwrap()
    }

    #[test]
    fn back_end_errors_become_sense() {
        let mut s = failing(io::ErrorKind::Other, 1 << 20);
        check(
            &mut s,
            &[0x28, 0, 0, 0, 0, 4, 0, 0, 1, 0],
            Sense::read_error(4),
        );
        check(
            &mut s,
            &[0x2a, 0, 0, 0, 0, 6, 0, 0, 1, 0],
            Sense::write_error(6),
        );
        check(
            &mut s,
            &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            Sense::write_error(0),
        );
        // A full disk or a refused access fails writes as such; reads
        // that fail are read errors whatever the reason.
        for (kind, write_sense) in [
            (io::ErrorKind::StorageFull, Sense::space_allocation_failed()),
            (io::ErrorKind::PermissionDenied, Sense::write_protected()),
        ] {
            let mut s = failing(kind, 1 << 20);
            check(&mut s, &[0x2a, 0, 0, 0, 0, 6, 0, 0, 1, 0], write_sense);
            check(
                &mut s,
                &[0x28, 0, 0, 0, 0, 4, 0, 0, 1, 0],
                Sense::read_error(4),
            );
        }
    }

    #[test]
    fn capacity_beyond_32_bits() {
        // 3 TiB: READ CAPACITY(10) says "use (16)", the short block
        // descriptor is capped.
        let mut s = failing(io::ErrorKind::Other, 3 << 40);
        let (_, b) = run(&mut s, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8, 0);
        assert_eq!(b[..4], [0xff; 4]);
        let mut rc16 = [0u8; 16];
        rc16[0] = 0x9e;
        rc16[1] = 0x10;
        rc16[13] = 32;
        let (_, b) = run(&mut s, &rc16, 32, 0);
        assert_eq!(
            u64::from_be_bytes(b[..8].try_into().unwrap()),
            (3 << 31) - 1
        );
    }

    #[test]
    fn transfers_on_io_threads_come_back_with_their_completion() {
        let (d, mut s) = disk(ScsiDiskConfig {
            aio: Aio::Threads(2),
            ..Default::default()
        });
        assert!(s.completion_fd().is_some());
        let m = mem();
        let data = sg(&m, 1024);
        // A read and a write start; an INQUIRY is done at once.
        let read = s.plan(&[0x28, 0, 0, 0, 0, 2, 0, 0, 2, 0], &data);
        assert!(s.execute(read, &data, &m, 1).is_none());
        let inquiry = s.plan(&[0x12, 0, 0, 0, 36, 0], &data);
        assert_eq!(
            s.execute(inquiry, &data, &m, 2),
            Some((2, Outcome::good(36)))
        );
        let other = mem();
        let write = s.plan(&[0x2a, 0, 0, 0, 0, 9, 0, 0, 1, 0], &data);
        // Buffers of another mapping than the one kept: run at once.
        assert!(s.execute(write, &data, &other, 3).is_some());
        let write = s.plan(&[0x2a, 0, 0, 0, 0, 9, 0, 0, 1, 0], &data);
        assert!(s.execute(write, &data, &m, 4).is_none());
        assert_eq!(s.in_flight(), 2);
        s.submit();
        let mut got = Vec::new();
        s.drain_and_collect(|c, o| got.push((c, o)));
        got.sort_by_key(|g| g.0);
        assert_eq!(got, [(1, Outcome::good(1024)), (4, Outcome::good(0))]);
        assert_eq!(s.in_flight(), 0);
        s.collect(|_, _| panic!("collected twice"));
        // Forgotten transfers never complete.
        let read = s.plan(&[0x28, 0, 0, 0, 0, 2, 0, 0, 2, 0], &data);
        assert!(s.execute(read, &data, &m, 5).is_none());
        s.forget_all();
        s.drain_and_collect(|_, _| panic!("forgotten"));
        assert!(d.flush_count() >= 2);
    }
}
