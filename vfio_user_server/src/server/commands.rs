//! The client's commands: each payload is decoded with the size-checked
//! decoders of [`crate::wire`] and checked against everything the spec
//! constrains (argsz, indices, bounds, flag combinations, fds only where a
//! command takes them) before the device is called.

use std::fs::File;

use log::{debug, warn};
use vm_memory::GuestAddressSpace;

use super::connection::{Message, Reply, Session};
use super::message_dma_pump;
use super::migration::DeviceSide;
use super::served_device::ServedDevice;
use crate::device::ResetReason;
use crate::irq::MaskChange;
use crate::wire::*;

impl ServedDevice {
    /// Handles one message from the client; returns the reply to send, if
    /// one is due (none for `NO_REPLY`, nor for a reply to one of our
    /// message-DMA commands).
    pub(super) fn dispatch(
        &mut self,
        session: &mut Session,
        message: Message<'_>,
    ) -> Option<(Header, Reply)> {
        let Message {
            header: hdr,
            payload,
            fds,
            truncated,
        } = message;
        if hdr.msg_type() == flags::TYPE_REPLY
            && fds.is_empty()
            && message_dma_pump::complete(session, self, &hdr, payload)
        {
            return None;
        }
        let reply = if hdr.msg_type() != flags::TYPE_COMMAND {
            // No server-to-client request is outstanding, so any reply is
            // unsolicited; other types are invalid.
            crate::warn_limited!("unexpected message type {:#x}", hdr.flags);
            Reply::Err(libc::EINVAL)
        } else if truncated {
            Reply::Err(libc::EINVAL)
        } else {
            self.handle_command(session, &hdr, payload, fds)
        };
        if hdr.no_reply() && hdr.msg_type() == flags::TYPE_COMMAND {
            if let Reply::Err(e) = reply {
                debug!("command {} (no reply) failed: errno {e}", hdr.cmd);
            }
            return None;
        }
        Some((hdr, reply))
    }

    fn handle_command(
        &mut self,
        session: &mut Session,
        hdr: &Header,
        payload: &[u8],
        fds: Vec<File>,
    ) -> Reply {
        if hdr.cmd == cmd::VERSION {
            return self.handle_version(session, payload, fds);
        }
        if !session.negotiated {
            return Reply::Err(libc::EINVAL);
        }
        let takes_fds = matches!(hdr.cmd, cmd::DMA_MAP | cmd::DEVICE_SET_IRQS);
        if !takes_fds && !fds.is_empty() {
            return Reply::Err(libc::EINVAL);
        }
        if !self.mig.command_allowed(hdr.cmd) {
            return Reply::Err(libc::EBUSY);
        }
        match hdr.cmd {
            cmd::DMA_MAP => self.handle_dma_map(payload, fds),
            cmd::DMA_UNMAP => self.handle_dma_unmap(payload),
            cmd::DEVICE_GET_INFO => self.handle_get_info(payload),
            cmd::DEVICE_GET_REGION_INFO => self.handle_region_info(payload),
            cmd::DEVICE_GET_REGION_IO_FDS => self.handle_region_io_fds(payload),
            cmd::DEVICE_GET_IRQ_INFO => self.handle_irq_info(payload),
            cmd::DEVICE_SET_IRQS => self.handle_set_irqs(payload, fds),
            cmd::REGION_READ => self.handle_region_read(payload),
            cmd::REGION_WRITE => self.handle_region_write(payload),
            cmd::REGION_WRITE_MULTI => self.handle_write_multi(payload),
            cmd::DEVICE_RESET => self.handle_reset(payload),
            cmd::DEVICE_FEATURE => self.handle_device_feature(payload),
            cmd::MIG_DATA_READ => self.mig.data_read(payload, session.client_max_xfer),
            cmd::MIG_DATA_WRITE => self
                .mig
                .data_write(payload, self.config.max_migration_bytes),
            // Server-to-client commands sent to us.
            cmd::DMA_READ | cmd::DMA_WRITE => Reply::Err(libc::EINVAL),
            // The removed DIRTY_PAGES (14) and anything unknown.
            _ => Reply::Err(libc::ENOSYS),
        }
    }

    fn handle_dma_map(&mut self, payload: &[u8], mut fds: Vec<File>) -> Reply {
        let Ok(m) = DmaMap::decode(payload) else {
            return Reply::Err(libc::EINVAL);
        };
        if (m.argsz as usize) < DmaMap::SIZE || fds.len() > 1 {
            return Reply::Err(libc::EINVAL);
        }
        let file = fds.pop();
        let dup = if self.device.observes_raw_requests() {
            file.as_ref().and_then(|f| f.try_clone().ok())
        } else {
            None
        };
        match self.dma.map(m.flags, m.offset, m.address, m.size, file) {
            Ok(()) => {
                if self.device.observes_raw_requests() {
                    if let Err(e) = self
                        .device
                        .dma_mapped(m.flags, m.offset, m.address, m.size, dup)
                    {
                        debug!("DMA_MAP {:#x}+{:#x}: the device: {e}", m.address, m.size);
                        // Nothing of it was used yet: undone, as refused.
                        let _ = self.dma.unmap(m.address, m.size);
                        return Reply::Err(e.errno());
                    }
                }
                Reply::empty()
            }
            Err(e) => {
                debug!("DMA_MAP {:#x}+{:#x}: {e}", m.address, m.size);
                Reply::Err(e.errno())
            }
        }
    }

    fn handle_dma_unmap(&mut self, payload: &[u8]) -> Reply {
        let Ok(u) = DmaUnmap::decode(payload) else {
            return Reply::Err(libc::EINVAL);
        };
        if (u.argsz as usize) < DmaUnmap::SIZE
            || u.flags & !DMA_UNMAP_FLAG_ALL != 0
            || payload.len() != DmaUnmap::SIZE
        {
            // The legacy dirty-bitmap variant is not supported.
            return Reply::Err(libc::EINVAL);
        }
        if u.flags & DMA_UNMAP_FLAG_ALL != 0 {
            if u.address != 0 || u.size != 0 {
                return Reply::Err(libc::EINVAL);
            }
            self.unmap_all();
        } else {
            // Only an exact match is unmapped: don't tell the device to
            // stop using a range that stays mapped.
            let exact = self
                .dma
                .find(u.address, u.size)
                .is_some_and(|r| r.address == u.address && r.size == u.size);
            if !exact {
                return Reply::Err(libc::ENOENT);
            }
            self.lifecycle().dma_unmapping(u.address, u.size);
            if let Err(e) = self.dma.unmap(u.address, u.size) {
                return Reply::Err(e.errno());
            }
        }
        let echo = DmaUnmap {
            argsz: DmaUnmap::SIZE as u32,
            ..u
        };
        Reply::data(echo.encode())
    }

    fn handle_get_info(&mut self, payload: &[u8]) -> Reply {
        let Ok(req) = DeviceInfo::decode(payload) else {
            return Reply::Err(libc::EINVAL);
        };
        // Cloud Hypervisor's client sends 32 (it counts the header).
        if (req.argsz as usize) < DeviceInfo::SIZE {
            return Reply::Err(libc::EINVAL);
        }
        let mut dflags = DEVICE_FLAGS_PCI;
        if self.device.resettable() {
            dflags |= DEVICE_FLAGS_RESET;
        }
        Reply::data(
            DeviceInfo {
                argsz: DeviceInfo::SIZE as u32,
                flags: dflags,
                num_regions: self.num_regions,
                num_irqs: self.irqs.num_irqs(),
            }
            .encode(),
        )
    }

    fn handle_region_info(&mut self, payload: &[u8]) -> Reply {
        let Ok(req) = RegionInfo::decode(payload) else {
            return Reply::Err(libc::EINVAL);
        };
        if (req.argsz as usize) < RegionInfo::SIZE || req.index >= self.num_regions {
            return Reply::Err(libc::EINVAL);
        }
        let desc = self.device.region(req.index);
        let mut info = RegionInfo {
            argsz: RegionInfo::SIZE as u32,
            flags: 0,
            index: req.index,
            cap_offset: 0,
            size: desc.size,
            offset: 0,
        };
        if desc.read {
            info.flags |= REGION_INFO_FLAG_READ;
        }
        if desc.write {
            info.flags |= REGION_INFO_FLAG_WRITE;
        }
        let Some(mmap) = desc.mmap.filter(|_| desc.size > 0) else {
            return Reply::data(info.encode());
        };
        let areas = if mmap.areas.is_empty() {
            vec![(0, desc.size)]
        } else {
            mmap.areas.clone()
        };
        let cap = encode_sparse_mmap_cap(&areas);
        let need = RegionInfo::SIZE + cap.len();
        info.argsz = need as u32;
        info.offset = mmap.offset;
        if (req.argsz as usize) < need {
            // Too small for the caps: report the size needed, no MMAP and
            // no fd until the client asks again with room.
            return Reply::data(info.encode());
        }
        info.flags |= REGION_INFO_FLAG_MMAP | REGION_INFO_FLAG_CAPS;
        info.cap_offset = RegionInfo::SIZE as u32;
        let mut out = info.encode();
        out.extend_from_slice(&cap);
        Reply::Ok(out, vec![mmap.fd])
    }

    fn handle_region_io_fds(&mut self, payload: &[u8]) -> Reply {
        let Ok(req) = RegionIoFds::decode(payload) else {
            return Reply::Err(libc::EINVAL);
        };
        if (req.argsz as usize) < RegionIoFds::SIZE
            || req.flags != 0
            || req.count != 0
            || req.index >= self.num_regions
        {
            return Reply::Err(libc::EINVAL);
        }
        // No device offers ioeventfds: an empty list.
        Reply::data(
            RegionIoFds {
                argsz: RegionIoFds::SIZE as u32,
                flags: 0,
                index: req.index,
                count: 0,
            }
            .encode(),
        )
    }

    fn handle_irq_info(&mut self, payload: &[u8]) -> Reply {
        let Ok(req) = IrqInfo::decode(payload) else {
            return Reply::Err(libc::EINVAL);
        };
        if (req.argsz as usize) < IrqInfo::SIZE {
            return Reply::Err(libc::EINVAL);
        }
        let Some(info) = self.irqs.info(req.index) else {
            return Reply::Err(libc::EINVAL);
        };
        Reply::data(
            IrqInfo {
                argsz: IrqInfo::SIZE as u32,
                flags: info.flags,
                index: req.index,
                count: info.count,
            }
            .encode(),
        )
    }

    fn handle_set_irqs(&mut self, payload: &[u8], fds: Vec<File>) -> Reply {
        let Ok(set) = IrqSet::decode(payload) else {
            return Reply::Err(libc::EINVAL);
        };
        if (set.argsz as usize) < IrqSet::SIZE {
            return Reply::Err(libc::EINVAL);
        }
        let had_fds = !fds.is_empty();
        let dups: Vec<File> = if self.device.observes_raw_requests() {
            fds.iter().filter_map(|f| f.try_clone().ok()).collect()
        } else {
            Vec::new()
        };
        match self.irqs.set_irqs(&set, &payload[IrqSet::SIZE..], fds) {
            Ok(changed) => {
                if let Some(MaskChange { runs, masked }) = changed {
                    for (start, count) in runs {
                        self.lifecycle()
                            .irq_mask_changed(set.index, start, count, masked);
                    }
                }
                if self.device.observes_raw_requests() {
                    if let Err(e) = self.device.irqs_set(&set, dups) {
                        debug!("SET_IRQS {set:?}: the device: {e}");
                        return Reply::Err(e.errno());
                    }
                }
                let installed = set.flags & IRQ_SET_DATA_EVENTFD != 0 && had_fds;
                if installed && self.resume_on_irqs && !self.paused && !self.mig.device_stopped() {
                    // Guest memory is mapped and interrupts can be
                    // delivered: serve what was pending at the snapshot.
                    self.resume_on_irqs = false;
                    if let Err(e) = self.lifecycle().resume() {
                        warn!("resume after restore failed: {e}");
                    }
                }
                Reply::empty()
            }
            Err(e) => {
                debug!("SET_IRQS {set:?}: {e}");
                Reply::Err(e.errno())
            }
        }
    }

    fn handle_region_read(&mut self, payload: &[u8]) -> Reply {
        let Ok(req) = RegionAccess::decode(payload) else {
            return Reply::Err(libc::EINVAL);
        };
        if payload.len() != RegionAccess::SIZE {
            return Reply::Err(libc::EINVAL);
        }
        if let Err(e) = self.check_access(req.region, req.offset, req.count, false) {
            return Reply::Err(e);
        }
        let mut out = vec![0u8; RegionAccess::SIZE + req.count as usize];
        req.encode_into(&mut out);
        if req.count > 0 {
            if let Err(e) =
                self.device
                    .region_read(req.region, req.offset, &mut out[RegionAccess::SIZE..])
            {
                return Reply::Err(e.errno());
            }
        }
        Reply::data(out)
    }

    fn handle_region_write(&mut self, payload: &[u8]) -> Reply {
        let Ok(req) = RegionAccess::decode(payload) else {
            return Reply::Err(libc::EINVAL);
        };
        let data = &payload[RegionAccess::SIZE..];
        if data.len() != req.count as usize {
            return Reply::Err(libc::EINVAL);
        }
        if let Err(e) = self.check_access(req.region, req.offset, req.count, true) {
            return Reply::Err(e);
        }
        if req.count > 0 {
            if let Err(e) = self.device.region_write(req.region, req.offset, data) {
                return Reply::Err(e.errno());
            }
        }
        Reply::data(req.encode())
    }

    fn handle_write_multi(&mut self, payload: &[u8]) -> Reply {
        if !self.config.write_multiple {
            return Reply::Err(libc::ENOSYS);
        }
        let Ok(n) = read_u64(payload, 0) else {
            return Reply::Err(libc::EINVAL);
        };
        let records = &payload[8..];
        if n == 0 || (n as usize).checked_mul(WriteMultiRecord::SIZE) != Some(records.len()) {
            return Reply::Err(libc::EINVAL);
        }
        // Validate every record first so a bad one applies none.
        let mut writes = Vec::with_capacity(n as usize);
        for chunk in records.chunks_exact(WriteMultiRecord::SIZE) {
            let Ok(rec) = WriteMultiRecord::decode(chunk) else {
                return Reply::Err(libc::EINVAL);
            };
            if rec.count == 0 || rec.count > WriteMultiRecord::MAX_DATA {
                return Reply::Err(libc::EINVAL);
            }
            if let Err(e) = self.check_access(rec.region, rec.offset, rec.count, true) {
                return Reply::Err(e);
            }
            writes.push(rec);
        }
        for rec in &writes {
            let data = &rec.data[..rec.count as usize];
            if let Err(e) = self.device.region_write(rec.region, rec.offset, data) {
                return Reply::Err(e.errno());
            }
        }
        Reply::data(n.to_le_bytes().to_vec())
    }

    fn handle_reset(&mut self, payload: &[u8]) -> Reply {
        if !payload.is_empty() {
            return Reply::Err(libc::EINVAL);
        }
        debug!("DEVICE_RESET from the client");
        self.lifecycle().reset(ResetReason::Command);
        self.mig.device_reset();
        // Nothing restored is left to wait for.
        self.resume_on_irqs = false;
        // A reset device runs again; one that the migration state or the
        // control socket holds stopped must stay stopped.
        if self.paused || self.mig.device_stopped() {
            if let Err(e) = self.lifecycle().pause() {
                warn!("cannot keep the reset device paused: {e}");
            }
        }
        Reply::empty()
    }

    fn handle_device_feature(&mut self, payload: &[u8]) -> Reply {
        let memory = self.dma.memory();
        let mem = memory.memory();
        let side = DeviceSide {
            device: self.device.lifecycle(),
            irqs: &self.irqs,
            held: self.paused,
        };
        self.mig.device_feature(
            payload,
            side,
            &mem,
            self.dma.ranges(),
            self.config.max_data_xfer_size,
        )
    }
}
