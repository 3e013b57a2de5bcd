//! Running frames: fetching them from guest memory, dispatching them by
//! command, and completing them (status in the frame, then the reply
//! queue unless the frame says not to post it).
//!
//! Every guest address is checked by `vm-memory`; a frame that cannot be
//! read is dropped (there is nowhere to report it), one whose buffers are
//! outside guest memory completes with INVALID_SGL.

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use log::{debug, warn};
use vfio_user_server::guest_memory::GuestMemory;
use vfio_user_server::warn_limited;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend};

use super::dcmd::{self, opcode, LogicalDrive};
use super::frame::{cmd, flags, offset, status, Frame, FRAME_SIZE};
use super::regs::FwState;
use super::reply_queue::{QueueError, ReplyQueue};
use super::sgl::{read_sgl, SglFormat};
use super::{CacheFlush, DiskJob, HeldFrame, Megasas, Pending, SenseBuffer, PCI_IDS, PRODUCT};
use crate::guest_sg::SgList;
use crate::scsi::{Outcome, Plan, ReadWrite, Sense, BLOCK_SIZE, STATUS_CHECK_CONDITION};

/// How a frame completes.
#[derive(Clone, Copy, Debug)]
struct Completion {
    cmd_status: u8,
    scsi_status: u8,
    /// Sense data of a failed SCSI command, and where it goes.
    sense: Option<(SenseBuffer, Sense)>,
}

impl Completion {
    fn status(cmd_status: u8) -> Self {
        Completion {
            cmd_status,
            scsi_status: 0,
            sense: None,
        }
    }

    /// The completion of a SCSI command with `outcome`.
    fn scsi(p: &Pending, outcome: Outcome) -> Self {
        match outcome.sense {
            None => Completion::status(status::OK),
            Some(sense) => Completion {
                cmd_status: status::SCSI_DONE_WITH_ERROR,
                scsi_status: STATUS_CHECK_CONDITION,
                sense: Some((p.sense, sense)),
            },
        }
    }
}

/// The SGL of `frame` (at `addr`) starting at `sgl_offset`, cut to `limit`
/// bytes; INVALID_SGL if it is outside guest memory.
fn frame_sgl<'m>(
    mem: &'m GuestMemory,
    addr: u64,
    sgl_offset: u64,
    frame: &Frame,
    limit: u64,
) -> Result<SgList<'m>, u8> {
    let at = addr.checked_add(sgl_offset).ok_or(status::INVALID_SGL)?;
    read_sgl(mem, at, frame.sge_count(), SglFormat::of(frame), limit).map_err(|e| {
        debug!("megasas: frame {addr:#x}: {e}");
        status::INVALID_SGL
    })
}

impl Megasas {
    /// Runs up to `budget` queued frames; returns whether frames are left.
    pub(super) fn run_queued(&mut self, budget: usize) -> bool {
        let memory = self.memory.memory().into_inner();
        // Restored before the client mapped guest memory: the frames wait
        // (the server calls again after every message).
        if memory.num_regions() == 0 {
            return false;
        }
        if !self.pci.config().bus_master() {
            debug!(
                "megasas: {} frame(s) dropped: bus mastering is off",
                self.queued.len()
            );
            self.queued.clear();
            return false;
        }
        let mut waiting = false;
        for _ in 0..budget {
            // A frame that failed may have stopped the controller.
            if self.stop.is_stopped() {
                break;
            }
            let Some(&addr) = self.queued.front() else {
                break;
            };
            if self.restored_hold && !self.frame_ready(&memory, addr) {
                // The next message may be the DMA_MAP it waits for: no
                // point in being called before.
                waiting = true;
                break;
            }
            self.queued.pop_front();
            self.run_frame(&memory, addr);
        }
        if self.queued.is_empty() {
            self.restored_hold = false;
        }
        for d in &mut self.disks {
            d.submit();
        }
        self.interrupt();
        !waiting && !self.stop.is_stopped() && !self.queued.is_empty()
    }

    /// Whether the frame at `addr`, its SGL, its buffers, its sense buffer
    /// and the reply queue all lie in guest memory (as mapped so far).
    fn frame_ready(&self, mem: &GuestMemory, addr: u64) -> bool {
        let mut raw = [0u8; FRAME_SIZE];
        if mem.read_slice(&mut raw, GuestAddress(addr)).is_err() {
            return false;
        }
        let frame = Frame::new(raw);
        let in_memory = |at: u64, len: u64| {
            usize::try_from(len).is_ok_and(|len| mem.check_range(GuestAddress(at), len))
        };
        if let Some(q) = &self.reply_queue {
            if !in_memory(q.producer, 4) || !in_memory(q.ring, q.ring_len()) {
                return false;
            }
        }
        let (sgl, limit) = match frame.cmd() {
            cmd::LD_READ | cmd::LD_WRITE => (
                offset::IO_SGL,
                u64::from(frame.data_len()) * u64::from(BLOCK_SIZE),
            ),
            cmd::LD_SCSI_IO | cmd::PD_SCSI_IO => (offset::PASS_SGL, u64::from(frame.data_len())),
            cmd::DCMD => (offset::IO_SGL, u64::from(frame.data_len())),
            // Its queue information and the queue it sets up.
            cmd::INIT => {
                let queue = ReplyQueue::from_qinfo(mem, frame.u64(offset::QINFO));
                return !matches!(queue, Err(QueueError::Info | QueueError::Outside));
            }
            _ => return true,
        };
        let sense = frame.cmd() == cmd::DCMD
            || frame.sense_len() == 0
            || in_memory(frame.sense_addr(), u64::from(frame.sense_len()));
        sense && frame_sgl(mem, addr, sgl, &frame, limit).is_ok()
    }

    /// Fetches and runs the frame at `addr`.
    fn run_frame(&mut self, mem: &Arc<GuestMemory>, addr: u64) {
        let mut raw = [0u8; FRAME_SIZE];
        if mem.read_slice(&mut raw, GuestAddress(addr)).is_err() {
            debug!("megasas: frame {addr:#x} is outside guest memory");
            return;
        }
        let frame = Frame::new(raw);
        let context64 = self.reply_queue.is_some_and(|q| q.context64);
        let held = HeldFrame {
            addr,
            context: frame.context(context64),
            flags: frame.flags(),
        };
        let done = match frame.cmd() {
            cmd::INIT => Some(Completion::status(self.init(mem, &frame))),
            cmd::LD_READ | cmd::LD_WRITE => self.ld_io(mem, &frame, held),
            cmd::LD_SCSI_IO => self.ld_scsi_io(mem, &frame, held),
            // Every disk is a logical drive: no physical drive is exposed.
            cmd::PD_SCSI_IO => Some(Completion::status(status::DEVICE_NOT_FOUND)),
            cmd::DCMD => self.dcmd(mem, &frame, held),
            cmd::ABORT => Some(Completion::status(self.abort(&frame))),
            other => {
                debug!("megasas: frame {addr:#x}: unknown command {other:#x}");
                Some(Completion::status(status::INVALID_CMD))
            }
        };
        if let Some(c) = done {
            self.finish(mem, held, c);
        }
    }

    /// INIT: sets up the reply queue and goes OPERATIONAL.
    fn init(&mut self, mem: &GuestMemory, frame: &Frame) -> u8 {
        if self.regs.state != FwState::Ready {
            debug!("megasas: INIT in state {:?}", self.regs.state);
            return status::WRONG_STATE;
        }
        match ReplyQueue::from_qinfo(mem, frame.u64(offset::QINFO)) {
            Ok(q) => {
                debug!(
                    "megasas: INIT: {} reply entries at {:#x}, {}-bit contexts",
                    q.entries,
                    q.ring,
                    if q.context64 { 64 } else { 32 }
                );
                self.reply_queue = Some(q);
                self.regs.state = FwState::Operational;
                status::OK
            }
            Err(e) => {
                debug!("megasas: INIT refused: {e}");
                status::INVALID_PARAMETER
            }
        }
    }

    /// LD_READ and LD_WRITE: the data length counts blocks.
    fn ld_io(
        &mut self,
        mem: &Arc<GuestMemory>,
        frame: &Frame,
        held: HeldFrame,
    ) -> Option<Completion> {
        let drive = usize::from(frame.target());
        let Some(disk) = self.disks.get_mut(drive) else {
            return Some(Completion::status(status::DEVICE_NOT_FOUND));
        };
        let blocks = u64::from(frame.data_len());
        let limit = blocks * u64::from(BLOCK_SIZE);
        let sg = match frame_sgl(mem, held.addr, offset::IO_SGL, frame, limit) {
            Ok(sg) => sg,
            Err(s) => return Some(Completion::status(s)),
        };
        let rw = ReadWrite {
            write: frame.cmd() == cmd::LD_WRITE,
            lba: frame.u64(offset::LBA),
            blocks,
            fua: false,
        };
        let plan = disk.plan_read_write(rw, sg.len());
        self.execute_scsi(mem, drive, plan, &sg, pending(frame, held));
        None
    }

    /// LD_SCSI_IO: the CDB goes to the logical drive's SCSI disk.
    fn ld_scsi_io(
        &mut self,
        mem: &Arc<GuestMemory>,
        frame: &Frame,
        held: HeldFrame,
    ) -> Option<Completion> {
        let drive = usize::from(frame.target());
        let disk = match self.disks.get_mut(drive) {
            Some(d) if frame.lun() == 0 => d,
            _ => return Some(Completion::status(status::DEVICE_NOT_FOUND)),
        };
        let limit = u64::from(frame.data_len());
        // No SGE at all is fine for commands without data (TEST UNIT
        // READY): the buffer is then empty.
        let sg = match frame_sgl(mem, held.addr, offset::PASS_SGL, frame, limit) {
            Ok(sg) => sg,
            Err(s) => return Some(Completion::status(s)),
        };
        let plan = disk.plan(frame.cdb(), &sg);
        self.execute_scsi(mem, drive, plan, &sg, pending(frame, held));
        None
    }

    /// Runs `plan` of a SCSI frame (`job`) on drive `drive`: the frame
    /// completes now if that is done at once, otherwise once it is
    /// collected from the drive's I/O threads.
    fn execute_scsi(
        &mut self,
        mem: &Arc<GuestMemory>,
        drive: usize,
        plan: Plan,
        sg: &SgList<'_>,
        job: DiskJob,
    ) {
        // (The caller found the drive.)
        let Some(disk) = self.disks.get_mut(drive) else {
            return;
        };
        if let Some((job, outcome)) = disk.execute(plan, sg, mem, job) {
            self.job_done(mem, drive, job, outcome);
        }
    }

    /// A DCMD; EVENT_WAIT is held (`None`).
    fn dcmd(
        &mut self,
        mem: &Arc<GuestMemory>,
        frame: &Frame,
        held: HeldFrame,
    ) -> Option<Completion> {
        let op = frame.u32(offset::OPCODE);
        debug!("megasas: DCMD {} ({op:#010x})", dcmd::name(op));
        let sg = match frame_sgl(
            mem,
            held.addr,
            offset::IO_SGL,
            frame,
            u64::from(frame.data_len()),
        ) {
            Ok(sg) => sg,
            Err(s) => return Some(Completion::status(s)),
        };
        let lds = || -> Vec<LogicalDrive> {
            (self.disks.iter().enumerate())
                .map(|(i, d)| LogicalDrive {
                    // At most MAX_LDS disks.
                    target: i as u8,
                    blocks: d.blocks(),
                })
                .collect()
        };
        let (cmd_status, data) = match op {
            opcode::CTRL_GET_INFO => (
                status::OK,
                Some(dcmd::ctrl_info(PCI_IDS, self.disks.len(), PRODUCT)),
            ),
            opcode::CTRL_GET_PROPERTIES => (status::OK, Some(vec![0; dcmd::PROPERTIES_LEN])),
            opcode::CTRL_SET_PROPERTIES | opcode::CTRL_SET_TIME => (status::OK, None),
            opcode::PD_GET_LIST | opcode::PD_LIST_QUERY => (status::OK, Some(dcmd::pd_list())),
            opcode::LD_GET_LIST => (status::OK, Some(dcmd::ld_list(&lds()))),
            opcode::LD_LIST_QUERY => (status::OK, Some(dcmd::ld_targetid_list(&lds()))),
            opcode::EVENT_GET_INFO => (status::OK, Some(dcmd::event_log_info(self.event_seq))),
            opcode::EVENT_WAIT => {
                if self.event_wait.is_some() {
                    debug!("megasas: a second EVENT_WAIT while one is held");
                    (status::WRONG_STATE, None)
                } else {
                    // No event ever happens: held until aborted or reset.
                    self.event_wait = Some(held);
                    return None;
                }
            }
            opcode::CACHE_FLUSH | opcode::CTRL_SHUTDOWN | opcode::HIBERNATE_SHUTDOWN => {
                return self.start_cache_flush(mem, held);
            }
            _ => (status::INVALID_DCMD, None),
        };
        if let Some(data) = data {
            // Cut to the driver's buffer; its length is a u64 of it.
            let n = (data.len() as u64).min(sg.len()) as usize;
            if sg.write_at(0, &data[..n]).is_err() {
                return Some(Completion::status(status::INVALID_SGL));
            }
        }
        Some(Completion::status(cmd_status))
    }

    /// CACHE_FLUSH or SHUTDOWN: makes every completed write durable, on
    /// the drives' I/O threads if they have them (the frame completes
    /// once the last drive's flush has, [`Megasas::cache_flush_done`]).
    /// Returns the completion if every drive is done already.
    fn start_cache_flush(
        &mut self,
        mem: &Arc<GuestMemory>,
        frame: HeldFrame,
    ) -> Option<Completion> {
        let id = self.next_cache_flush;
        self.next_cache_flush = id.wrapping_add(1);
        let mut flush = CacheFlush {
            id,
            frame,
            drives_left: 0,
            status: status::OK,
        };
        for (i, d) in self.disks.iter_mut().enumerate() {
            match d.start_flush(mem, DiskJob::CacheFlush(id)) {
                None => flush.drives_left += 1,
                Some((_, outcome)) => flush.note(i, &outcome),
            }
        }
        if flush.drives_left == 0 {
            return Some(Completion::status(flush.status));
        }
        self.cache_flushes.push(flush);
        None
    }

    /// Drive `drive`'s part of the cache flush `id` ended with `outcome`;
    /// the frame completes with the last part. (A flush a reset dropped
    /// is gone: nothing to complete.)
    fn cache_flush_done(&mut self, mem: &GuestMemory, drive: usize, id: u64, outcome: Outcome) {
        let Some(i) = self.cache_flushes.iter().position(|f| f.id == id) else {
            return;
        };
        let flush = &mut self.cache_flushes[i];
        flush.note(drive, &outcome);
        flush.drives_left -= 1;
        if flush.drives_left == 0 {
            let flush = self.cache_flushes.swap_remove(i);
            self.finish(mem, flush.frame, Completion::status(flush.status));
        }
    }

    /// Flushes the drives, on this thread, if they have a write cache
    /// (nothing waits in it otherwise); returns the frame status.
    pub(super) fn flush_write_cache(&self) -> u8 {
        let mut s = status::OK;
        for (i, d) in self.disks.iter().enumerate() {
            if !d.write_cache() {
                continue;
            }
            if let Err(e) = d.flush() {
                warn!("megasas: flush of disk {i}: {e}");
                s = status::FLUSH_FAILED;
            }
        }
        s
    }

    /// ABORT: only a held EVENT_WAIT can be aborted; it is dropped without
    /// completing (as the driver expects). Anything else has completed or
    /// is a transfer on its way, which completes by itself.
    fn abort(&mut self, frame: &Frame) -> u8 {
        let target = frame.u64(offset::ABORT_ADDR);
        match self.event_wait {
            Some(h) if h.addr == target => {
                debug!("megasas: EVENT_WAIT at {target:#x} aborted");
                self.event_wait = None;
            }
            _ => debug!("megasas: ABORT of {target:#x}: nothing held there"),
        }
        status::OK
    }

    /// Drive `drive` did `job`, with `outcome` (on the spot or in
    /// flight): its frame completes, unless it is kept or waits for other
    /// drives.
    pub(super) fn job_done(
        &mut self,
        mem: &GuestMemory,
        drive: usize,
        job: DiskJob,
        outcome: Outcome,
    ) {
        match job {
            DiskJob::Scsi(p) => {
                if let Some(c) = self.settle(&p, outcome) {
                    self.finish(mem, p.frame, c);
                }
            }
            DiskJob::CacheFlush(id) => self.cache_flush_done(mem, drive, id, outcome),
        }
    }

    /// How the SCSI frame `p` that ended with `outcome` completes: as
    /// the outcome says, or not now (`None`) when the back end failed and
    /// the policy stops on that: the frame is kept to run again on resume,
    /// and the controller stops.
    fn settle(&mut self, p: &Pending, outcome: Outcome) -> Option<Completion> {
        if let Some(f) = &outcome.failure {
            let e = f.error();
            if self.policy.stops_on(&e) {
                self.stop.hold("megasas", p.frame.addr, f, &e);
                return None;
            }
            warn_limited!("megasas: frame {:#x}: {f}: {e}", p.frame.addr);
        }
        Some(Completion::scsi(p, outcome))
    }

    /// Writes the completion of `held` into it (the command status last)
    /// and posts it to the reply queue, unless the frame says not to.
    fn finish(&mut self, mem: &GuestMemory, held: HeldFrame, c: Completion) {
        let at = |off: u64| held.addr.checked_add(off).map(GuestAddress);
        let write = |off: u64, b: u8| at(off).is_some_and(|a| mem.write_obj(b, a).is_ok());
        if let Some((buf, sense)) = c.sense {
            let bytes = sense.encode();
            let n = bytes.len().min(usize::from(buf.len));
            let written = n > 0 && mem.write_slice(&bytes[..n], GuestAddress(buf.addr)).is_ok();
            // At most 18.
            write(offset::SENSE_LEN, if written { n as u8 } else { 0 });
        }
        write(offset::SCSI_STATUS, c.scsi_status);
        // Data, sense and SCSI status are visible before the command status
        // a polling driver waits for.
        fence(Ordering::Release);
        if !write(offset::CMD_STATUS, c.cmd_status) {
            debug!("megasas: frame {:#x} vanished before completing", held.addr);
        }
        if held.flags & flags::DONT_POST != 0 {
            return;
        }
        match self.reply_queue.as_mut() {
            Some(q) => match q.post(mem, held.context) {
                Ok(()) => self.replies = true,
                Err(e) => debug!("megasas: frame {:#x} not posted: {e}", held.addr),
            },
            None => debug!(
                "megasas: frame {:#x} completed in place: no reply queue yet",
                held.addr
            ),
        }
    }
}

/// What completing the SCSI frame `frame` later needs.
fn pending(frame: &Frame, held: HeldFrame) -> DiskJob {
    DiskJob::Scsi(Pending {
        frame: held,
        sense: SenseBuffer {
            addr: frame.sense_addr(),
            len: frame.sense_len(),
        },
    })
}

impl CacheFlush {
    /// Notes drive `drive`'s outcome: a failure fails the frame.
    fn note(&mut self, drive: usize, outcome: &Outcome) {
        if let Some(f) = &outcome.failure {
            warn!("megasas: flush of disk {drive}: {}", f.error());
            self.status = status::FLUSH_FAILED;
        }
    }
}
