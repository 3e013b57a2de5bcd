//! An LSI MegaRAID SAS 1078 host bus adapter (the MFI interface, QEMU's
//! `megasas` identity), whose logical drives are [`ScsiDisk`]s: a stock
//! Linux guest drives it with `megaraid_sas` and sees each disk as
//! `H:2:T:0`; SeaBIOS boots from it.
//!
//! - BAR 0: 16 KiB of 64-bit memory with the MFI registers ([`regs`]), the
//!   MSI-X table (one vector) at 0x2000 and its PBA at 0x3800. Never
//!   mmapped: every access reaches the device.
//! - BAR 2: 256 bytes of I/O space aliasing the registers (SeaBIOS uses
//!   it).
//! - INTx when MSI-X is off.
//!
//! A write of a frame address to the inbound queue port only queues it;
//! [`Lifecycle::run_deferred`] fetches and runs the frames once the write
//! is answered (`commands.rs`). Frames complete in place (status bytes in
//! the frame) and, unless flagged "don't post", in the reply queue set up
//! by INIT ([`reply_queue`]), followed by an interrupt. Reads and writes
//! run on the caller's thread or on each disk's I/O threads; those are
//! drained before pausing, snapshotting and unmapping guest memory, and
//! forgotten on resets.
//!
//! A read, write or flush the back end fails completes with a medium
//! error sense, or, under [`ErrorPolicy::Stop`] ([`MegasasConfig::on_error`]),
//! is kept: the controller runs no more frames until it is resumed, then
//! runs the kept frames again (from guest memory, where the driver left
//! them) before the queued ones. A snapshot holds them.

mod commands;
pub mod dcmd;
pub mod frame;
pub mod regs;
pub mod reply_queue;
pub mod sgl;
mod state;

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::Arc;

use log::debug;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use vfio_user_server::device::{DeviceContext, Interest, Lifecycle, ResetReason, WatchedFd};
use vfio_user_server::guest_memory::GuestMemoryHandle;
use vfio_user_server::pci::{
    InterruptMode, PciBarConfiguration, PciBarPrefetchable, PciBarRegionType,
    PciConfigurationParams, PciDevice, PciDeviceError, PciFunction,
};
use vfio_user_server::vm_migration::{
    Migratable, MigratableError, Pausable, Snapshot, Snapshottable, Transportable,
};
use vfio_user_server::warn_limited;
use vm_memory::GuestAddressSpace;

use self::dcmd::{PciIds, MAX_LDS, MAX_REQUEST_SECTORS};
use self::frame::status;
use self::regs::{reg, Action, FwState, Registers};
use self::reply_queue::ReplyQueue;
use self::state::MegasasState;
use crate::block_io::{Aio, ErrorPolicy, ErrorStop};
use crate::scsi::{Outcome, ScsiDisk, ScsiDiskConfig, ScsiDiskError};
use crate::storage::BlockBackend;

/// PCI identity of QEMU's `megasas` (a MegaRAID SAS 1078).
pub const PCI_IDS: PciIds = PciIds {
    vendor: 0x1000,
    device: 0x0060,
    subvendor: 0x1000,
    subdevice: 0x1013,
};
/// Index of the memory BAR with the registers and MSI-X.
pub const MMIO_BAR: usize = 0;
/// Size of the memory BAR.
pub const MMIO_BAR_SIZE: u64 = 0x4000;
/// Index of the I/O BAR.
pub const IO_BAR: usize = 2;
/// Size of the I/O BAR.
pub const IO_BAR_SIZE: u64 = 0x100;
/// Offset of the MSI-X table in the memory BAR.
pub const MSIX_TABLE_OFFSET: u64 = 0x2000;
/// Offset of the MSI-X PBA in the memory BAR.
pub const MSIX_PBA_OFFSET: u64 = 0x3800;
/// Product name in the controller information.
const PRODUCT: &str = "MegaRAID SAS 1078 (vfio-user)";
/// Frames the controller holds (queued, running, kept on an error), at
/// most: beyond the commands a driver may have outstanding, a port write
/// is dropped.
pub const MAX_QUEUED_FRAMES: usize = 4096;
/// Frames run per call of [`Lifecycle::run_deferred`].
const FRAMES_PER_RUN: usize = 64;
/// The child snapshot holding the PCI function's state.
const PCI_SNAPSHOT_ID: &str = "pci";

/// Errors creating the controller.
#[derive(Debug, Error)]
pub enum MegasasError {
    /// No disk to serve.
    #[error("no disk")]
    NoDisks,
    /// More disks than logical drives.
    #[error("{0} disks; at most {MAX_LDS}")]
    TooManyDisks(usize),
    /// A disk could not be set up.
    #[error("disk {0}: {1}")]
    Disk(usize, ScsiDiskError),
    /// The PCI function could not be built.
    #[error("PCI function: {0}")]
    Pci(#[from] PciDeviceError),
}

/// Options of the controller.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MegasasConfig {
    /// Expose every disk read-only.
    pub read_only: bool,
    /// How each disk's reads, writes and flushes run: on the event loop
    /// thread, or in flight on I/O threads (per disk) or an io_uring (one
    /// per disk).
    pub aio: Aio,
    /// What a back-end error does: a medium error for the guest, or a
    /// stop until the controller is resumed.
    pub on_error: ErrorPolicy,
    /// Report the drives' write cache off and make every write durable
    /// before it completes. Otherwise (as QEMU's `scsi-hd` with a
    /// write-back cache) writes complete once the back end took them
    /// and are flushed at the driver's CACHE_FLUSH and SHUTDOWN, at device
    /// resets (not the driver's doorbell resets) and when the controller
    /// pauses: Linux's driver never sends SYNCHRONIZE CACHE to a logical
    /// drive.
    pub write_through: bool,
}

/// A frame held by the controller: where it is and what completing it
/// needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct HeldFrame {
    /// Guest address.
    addr: u64,
    /// The context to post.
    context: u64,
    /// Its flags.
    flags: u16,
}

/// What completing a SCSI frame needs besides the frame.
#[derive(Clone, Copy, Debug)]
struct SenseBuffer {
    addr: u64,
    len: u8,
}

/// A SCSI frame whose transfer runs on a disk's I/O threads.
#[derive(Clone, Copy, Debug)]
struct Pending {
    frame: HeldFrame,
    sense: SenseBuffer,
}

/// What runs on a disk's I/O threads or io_uring.
#[derive(Clone, Copy, Debug)]
enum DiskJob {
    /// A SCSI frame's transfer.
    Scsi(Pending),
    /// The drive's part of the cache flush (CACHE_FLUSH or SHUTDOWN) with
    /// this id.
    CacheFlush(u64),
}

/// A CACHE_FLUSH or SHUTDOWN frame waiting for its drives' flushes.
#[derive(Clone, Copy, Debug)]
struct CacheFlush {
    id: u64,
    frame: HeldFrame,
    /// Drives whose flush is still running.
    drives_left: usize,
    /// OK, or FLUSH_FAILED once a drive failed.
    status: u8,
}

/// The MegaRAID SAS controller.
pub struct Megasas {
    pci: PciFunction,
    memory: GuestMemoryHandle,
    regs: Registers,
    reply_queue: Option<ReplyQueue>,
    /// Logical drive `i` is disk `i`.
    disks: Vec<ScsiDisk<DiskJob>>,
    /// Frame addresses written to the queue port and not run yet.
    queued: VecDeque<u64>,
    /// The EVENT_WAIT the driver left with us.
    event_wait: Option<HeldFrame>,
    /// Cache flushes running on the drives' I/O threads.
    cache_flushes: Vec<CacheFlush>,
    /// The id of the next cache flush.
    next_cache_flush: u64,
    /// Sequence number of the newest event (there are none after boot).
    event_seq: u32,
    /// Replies were posted since the last interrupt.
    replies: bool,
    /// An MSI-X message was sent and the driver has read no register
    /// since: its interrupt handler, which reads the status register
    /// before it takes replies from the queue, has yet to run, and will
    /// see every reply posted meanwhile without another message.
    msix_outstanding: bool,
    /// Frames restored from a snapshot wait until every guest address
    /// they use is mapped (a client maps guest memory region by region)
    /// or the driver touches a register (the guest runs again).
    restored_hold: bool,
    paused: bool,
    watched: Vec<WatchedFd>,
    policy: ErrorPolicy,
    /// Frames whose transfer failed under [`ErrorPolicy::Stop`], by
    /// address, to run again on resume.
    stop: ErrorStop<u64>,
}

impl Megasas {
    /// A controller with `disks` as its logical drives 0, 1, ..., reaching
    /// guest memory and raising interrupts through `ctx`.
    pub fn new(
        ctx: &DeviceContext,
        disks: Vec<Arc<dyn BlockBackend>>,
        config: &MegasasConfig,
    ) -> Result<Self, MegasasError> {
        if disks.is_empty() {
            return Err(MegasasError::NoDisks);
        }
        if disks.len() > MAX_LDS {
            return Err(MegasasError::TooManyDisks(disks.len()));
        }
        let disks = disks
            .into_iter()
            .enumerate()
            .map(|(i, backend)| {
                let config = ScsiDiskConfig {
                    product: "MegaRAID LD".into(),
                    read_only: config.read_only,
                    max_transfer_blocks: MAX_REQUEST_SECTORS,
                    // At most MAX_LDS.
                    index: i as u32,
                    aio: config.aio,
                    write_cache: !config.write_through,
                    ..Default::default()
                };
                ScsiDisk::new(backend, &config).map_err(|e| MegasasError::Disk(i, e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut pci = PciFunction::new(
            PciConfigurationParams {
                vendor_id: PCI_IDS.vendor,
                device_id: PCI_IDS.device,
                revision_id: 0,
                class_code: 0x01,
                subclass: 0x04,
                prog_if: 0x00,
                subsystem_vendor_id: PCI_IDS.subvendor,
                subsystem_id: PCI_IDS.subdevice,
                pcie: false,
                interrupt_pin: 1,
            },
            ctx.irqs.clone(),
        );
        let np = PciBarPrefetchable::NotPrefetchable;
        pci.add_bar(PciBarConfiguration::new(
            MMIO_BAR,
            MMIO_BAR_SIZE,
            PciBarRegionType::Memory64BitRegion,
            np,
        ))?;
        pci.add_bar(PciBarConfiguration::new(
            IO_BAR,
            IO_BAR_SIZE,
            PciBarRegionType::IoRegion,
            np,
        ))?;
        pci.add_msix(1, MMIO_BAR, MSIX_TABLE_OFFSET, MSIX_PBA_OFFSET)?;
        let watched = disks
            .iter()
            .filter_map(|d| d.completion_fd().map(WatchedFd::readable))
            .collect();
        Ok(Megasas {
            pci,
            memory: ctx.memory.clone(),
            regs: Registers::default(),
            reply_queue: None,
            disks,
            queued: VecDeque::new(),
            event_wait: None,
            cache_flushes: Vec::new(),
            next_cache_flush: 0,
            event_seq: 0,
            replies: false,
            msix_outstanding: false,
            restored_hold: false,
            paused: false,
            watched,
            policy: config.on_error,
            stop: ErrorStop::default(),
        })
    }

    /// The firmware state.
    pub fn fw_state(&self) -> FwState {
        self.regs.state
    }

    /// Number of logical drives.
    pub fn num_disks(&self) -> usize {
        self.disks.len()
    }

    /// Capacity of logical drive `i` in 512-byte blocks.
    pub fn disk_blocks(&self, i: usize) -> Option<u64> {
        self.disks.get(i).map(ScsiDisk::blocks)
    }

    /// Whether the logical drives are read-only.
    pub fn read_only(&self) -> bool {
        self.disks.iter().any(ScsiDisk::read_only)
    }

    /// Frames queued and not run yet.
    pub fn queued_frames(&self) -> usize {
        self.queued.len()
    }

    /// How the disks' I/O runs (what [`MegasasConfig::aio`] asked for, or
    /// what replaced it).
    pub fn aio(&self) -> Aio {
        self.disks.first().map_or(Aio::Sync, ScsiDisk::aio)
    }

    /// Transfers running on I/O threads.
    pub fn in_flight(&self) -> usize {
        self.disks.iter().map(ScsiDisk::in_flight).sum()
    }

    /// Frames kept on a back-end error, to run again on resume.
    pub fn kept_frames(&self) -> usize {
        self.stop.held().len()
    }

    /// Whether an EVENT_WAIT is held.
    pub fn event_wait_held(&self) -> bool {
        self.event_wait.is_some()
    }

    /// Drops every frame the controller holds: queued, running (waiting
    /// for those on I/O threads, whose reads still reach guest memory) and
    /// the EVENT_WAIT. None of them completes.
    fn abort_all(&mut self) {
        for d in &mut self.disks {
            d.forget_all();
        }
        self.queued.clear();
        self.event_wait = None;
        self.cache_flushes.clear();
        self.stop.clear();
    }

    /// Back to READY: frames dropped, reply queue forgotten, interrupts
    /// masked (a doorbell reset, an adapter reset, a device reset).
    fn soft_reset(&mut self) {
        self.abort_all();
        self.restored_hold = false;
        self.reply_queue = None;
        self.regs.reset();
        self.replies = false;
        self.msix_outstanding = false;
    }

    /// The inbound doorbell.
    fn doorbell(&mut self, bits: u32) {
        use self::regs::doorbell as db;
        if bits & (db::READY | db::ADP_RESET) != 0 {
            debug!("megasas: doorbell {bits:#x}: back to READY");
            self.soft_reset();
        } else if bits & db::ABORT != 0 {
            debug!("megasas: doorbell {bits:#x}: abort all");
            self.abort_all();
        }
        if bits & db::STOP_ADP != 0 {
            // Once: a driver that gave up says so once, a guest that keeps
            // writing it must not flood the log.
            if self.regs.state != FwState::Fault {
                warn_limited!("megasas: the driver stopped the adapter (doorbell {bits:#x})");
            }
            self.abort_all();
            self.regs.state = FwState::Fault;
        }
    }

    /// Frames the controller holds: queued, running on I/O threads or an
    /// io_uring, and kept on an error.
    fn frames_held(&self) -> usize {
        self.queued.len() + self.in_flight() + self.kept_frames()
    }

    /// A frame address was written to a queue port.
    fn queue_frame(&mut self, addr: u64) {
        if self.regs.state == FwState::Fault {
            debug!("megasas: frame {addr:#x} posted to a stopped adapter");
        } else if self.frames_held() >= MAX_QUEUED_FRAMES {
            // A driver keeps at most the firmware's MAX_CMDS outstanding:
            // only a broken or hostile one gets here, e.g. posting one
            // slow frame over and over.
            debug!("megasas: frame {addr:#x} dropped: {MAX_QUEUED_FRAMES} frames held");
        } else {
            self.queued.push_back(addr);
        }
    }

    fn apply(&mut self, action: Action) {
        match action {
            Action::None => {}
            Action::Frame(addr) => self.queue_frame(addr),
            Action::Doorbell(bits) => self.doorbell(bits),
            Action::Unmasked => self.signal_reply(),
        }
    }

    /// Register access at `offset` of either BAR.
    fn register_read(&mut self, offset: u64, data: &mut [u8]) {
        self.restored_hold = false;
        // The driver's handler ran (or the driver polls): the next reply
        // needs a message of its own.
        self.msix_outstanding = false;
        data.fill(0);
        let shift = (offset & 3) as usize;
        if shift + data.len() > 4 {
            return;
        }
        let value = self.regs.read(offset & !3).to_le_bytes();
        data.copy_from_slice(&value[shift..shift + data.len()]);
    }

    fn register_write(&mut self, offset: u64, data: &[u8]) {
        self.restored_hold = false;
        // Registers are written whole (a narrower write is zero-extended).
        if offset & 3 != 0 || data.is_empty() || data.len() > 4 {
            return;
        }
        let mut value = [0u8; 4];
        value[..data.len()].copy_from_slice(data);
        // Posting frames says nothing of the interrupt handler; any other
        // register (the mask, a doorbell) may mean it will not run, so
        // the next reply sends a message.
        if !matches!(offset, reg::IQP | reg::IQPL | reg::IQPH) {
            self.msix_outstanding = false;
        }
        let action = self.regs.write(offset, u32::from_le_bytes(value));
        self.apply(action);
        // The driver acknowledged the replies (or a reset dropped them):
        // the INTx line goes down.
        if !self.regs.reply_pending {
            self.pci.intx_deassert();
        }
    }

    /// Completes what the I/O threads of the disk watched on `fd` finished
    /// (every disk's transfers, once they have all run, if `fd` is
    /// `None`), then interrupts.
    fn complete_in_flight(&mut self, fd: Option<RawFd>) {
        let mut done: Vec<(usize, DiskJob, Outcome)> = Vec::new();
        for (i, d) in self.disks.iter_mut().enumerate() {
            match fd {
                None => d.drain_and_collect(|job, o| done.push((i, job, o))),
                Some(fd) if d.completion_fd() == Some(fd) => {
                    d.collect(|job, o| done.push((i, job, o)))
                }
                Some(_) => {}
            }
        }
        if done.is_empty() {
            return;
        }
        let memory = self.memory.memory().into_inner();
        for (drive, job, outcome) in done {
            self.job_done(&memory, drive, job, outcome);
        }
        self.interrupt();
    }

    /// Raises an interrupt if replies were posted since the last one, and
    /// the driver unmasked them. Under INTx the line is already up while
    /// the driver has not acknowledged earlier replies (its handler takes
    /// these too): another edge would only reach it after that handler,
    /// with nothing left to take.
    fn interrupt(&mut self) {
        if std::mem::take(&mut self.replies) {
            let line_up = std::mem::replace(&mut self.regs.reply_pending, true);
            let level = self.pci.interrupt_mode() != InterruptMode::MsiX;
            if self.regs.interrupts_enabled() && !(level && line_up) {
                self.signal_reply();
            }
        }
    }

    /// Raises the reply interrupt. INTx is level-triggered and stays
    /// pending until the driver acknowledges it. Under MSI-X:
    /// - the message is the whole notice: the reply counts as
    ///   acknowledged once it is sent and the status register does not
    ///   show it (as QEMU's model; Linux's driver takes the reply queue
    ///   under MSI-X whatever the status says);
    /// - replies posted while a message is outstanding (its handler has
    ///   not read a register yet) need none of their own: the handler of
    ///   Linux's driver reads the status register, then takes every reply
    ///   up to the producer index. Each message costs the guest a handler
    ///   and three register accesses, each a round trip across the
    ///   socket; at queue depth 32 this saves most of them. A driver that
    ///   took replies without reading a register first would need a
    ///   message per batch; no driver of this controller does.
    fn signal_reply(&mut self) {
        if self.pci.interrupt_mode() != InterruptMode::MsiX {
            self.pci.signal_or_log(0);
            return;
        }
        self.regs.reply_pending = false;
        if !std::mem::replace(&mut self.msix_outstanding, true) {
            self.pci.signal_or_log(0);
        }
    }
}

/// Config space, BAR allocation and the MSI-X windows are the function's;
/// the rest of both BARs is the register file.
impl PciDevice for Megasas {
    fn pci_function(&mut self) -> Option<&mut PciFunction> {
        Some(&mut self.pci)
    }

    fn read_bar(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        let Some(bar) = self.pci.bar_index(base) else {
            data.fill(0);
            return;
        };
        if !self.pci.read_bar(bar, offset, data) {
            self.register_read(offset, data);
        }
    }

    fn write_bar(&mut self, base: u64, offset: u64, data: &[u8]) {
        let Some(bar) = self.pci.bar_index(base) else {
            return;
        };
        if !self.pci.write_bar(bar, offset, data) {
            self.register_write(offset, data);
        }
    }
}

impl Lifecycle for Megasas {
    fn reset(&mut self, reason: ResetReason) {
        debug!("megasas: reset ({reason:?})");
        self.soft_reset();
        // The guest rebooted or the client left: what it wrote is made
        // durable (the driver's own resets, on the doorbell, are not
        // delayed by this).
        self.flush_write_cache();
        self.pci.reset();
        self.paused = false;
    }

    fn restore(&mut self, snapshot: &Snapshot) -> Result<(), MigratableError> {
        let state: MegasasState = snapshot.to_state()?;
        let blocks: Vec<u64> = self.disks.iter().map(ScsiDisk::blocks).collect();
        state.check(&blocks).map_err(MigratableError::Restore)?;
        let pci = snapshot
            .snapshots
            .get(PCI_SNAPSHOT_ID)
            .ok_or(MigratableError::Restore("no PCI state".into()))?;
        let mut function = self.pci.clone();
        function.restore(pci)?;
        self.abort_all();
        self.pci = function;
        self.regs = state.regs;
        self.reply_queue = state.reply_queue;
        self.event_wait = state.event_wait;
        self.event_seq = state.event_seq;
        self.queued = state.queued.into();
        self.replies = false;
        self.msix_outstanding = false;
        self.restored_hold = !self.queued.is_empty() || !state.kept.is_empty();
        for &d in &state.writeback_lost {
            log::warn!(
                "megasas: disk {d} of the saved controller failed a flush: every flush fails"
            );
            crate::storage::restore_writeback_lost(&**self.disks[d].backend());
        }
        match state.stopped_on_error {
            Some(reason) => {
                log::info!(
                    "megasas: restored stopped on an error ({reason}), {} frame(s) to run again",
                    state.kept.len()
                );
                self.stop.restore(reason, state.kept);
            }
            None => self.stop.clear(),
        }
        Ok(())
    }

    fn migratable(&self) -> bool {
        true
    }

    fn stopped_on_error(&self) -> Option<String> {
        self.stop.reason().map(str::to_string)
    }

    fn dma_unmapping(&mut self, _address: u64, _size: u64) {
        // Transfers in flight may use the range: finish them while it is
        // still mapped.
        self.complete_in_flight(None);
    }

    fn watched_fds(&self) -> &[WatchedFd] {
        &self.watched
    }

    fn handle_event(&mut self, fd: RawFd, _ready: Interest) {
        if !self.paused {
            self.complete_in_flight(Some(fd));
        }
    }

    fn run_deferred(&mut self) -> bool {
        if self.paused || self.stop.is_stopped() || self.queued.is_empty() {
            return false;
        }
        self.run_queued(FRAMES_PER_RUN)
    }
}

/// Pausing completes the transfers in flight; queued frames stay queued
/// (and in the snapshot) until the device resumes. Resuming also lets a
/// controller that stopped on an error go on, running the kept frames
/// first.
impl Pausable for Megasas {
    fn pause(&mut self) -> Result<(), MigratableError> {
        self.complete_in_flight(None);
        // What a snapshot, a migration or an upgrade hands on is durable;
        // if it cannot be, the move must not go ahead.
        if self.flush_write_cache() != status::OK {
            return Err(MigratableError::Pause(
                "megasas: a drive's cache flush failed".into(),
            ));
        }
        self.paused = true;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), MigratableError> {
        self.paused = false;
        let kept = self.stop.resume();
        if !kept.is_empty() {
            log::info!(
                "megasas: resumed: running {} kept frame(s) again",
                kept.len()
            );
            for addr in kept.into_iter().rev() {
                self.queued.push_front(addr);
            }
        }
        Ok(())
    }
}

impl Snapshottable for Megasas {
    fn id(&self) -> String {
        "megasas".into()
    }

    /// The firmware state, reply queue, held EVENT_WAIT and queued frames,
    /// with the PCI function's state as a child; transfers in flight are
    /// completed first.
    fn snapshot(&mut self) -> Result<Snapshot, MigratableError> {
        self.complete_in_flight(None);
        let state = MegasasState {
            regs: self.regs,
            reply_queue: self.reply_queue,
            event_wait: self.event_wait,
            event_seq: self.event_seq,
            queued: self.queued.iter().copied().collect(),
            disk_blocks: self.disks.iter().map(ScsiDisk::blocks).collect(),
            stopped_on_error: self.stop.reason().map(str::to_string),
            kept: self.stop.held().to_vec(),
            writeback_lost: (0..self.disks.len())
                .filter(|&d| self.disks[d].backend().writeback_lost())
                .collect(),
        };
        let mut snapshot = Snapshot::new_from_state(&state)?;
        snapshot.add_snapshot(PCI_SNAPSHOT_ID.into(), self.pci.snapshot()?);
        Ok(snapshot)
    }
}

impl Transportable for Megasas {}
impl Migratable for Megasas {}

#[cfg(test)]
mod tests;
