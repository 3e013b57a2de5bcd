//! A small PCI device for the server fuzzer, served through
//! `vfio_user_server::pci::PciAdapter`.
//!
//! - BAR0 (4 KiB, 32-bit memory): registers, a scratch area, and the MSI-X
//!   table (0x800) and PBA (0x900). Writing the doorbell makes the device
//!   DMA into guest memory through `ctx.memory` (or queue a message DMA on
//!   `ctx.message_dma`) and raise an interrupt, so the fuzzer reaches the
//!   DMA paths with client-chosen addresses.
//! - BAR1 (16 KiB, 32-bit memory): backed by a memfd, offered to the client
//!   as two sparse mmap areas; trapped accesses go to the same memfd.
//! - BAR2 (64 GiB, 64-bit memory): reads a pattern, ignores writes (large
//!   offsets).
//! - BAR4 (256 bytes, I/O).
//! - Config space: PCI or PCIe (with the PCIe capability), PM, MSI (1
//!   vector) and MSI-X (4 vectors) capabilities; interrupts are `IrqIndexInfo::pci_layout(true, 1, 4)`.
//! - Migration: pause, resume, snapshot and restore of config space, MSI-X
//!   table and the BAR0 registers.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use vfio_user_server::device::{DeviceContext, Lifecycle, RegionMmap, ResetReason};
use vfio_user_server::pci::{
    PciBarConfiguration, PciBarPrefetchable, PciBarRegionType, PciConfigurationParams, PciDevice,
    PciExpressCap, PciFunction, PciFunctionState, PmCap,
};
use vfio_user_server::vm_migration::{
    Migratable, MigratableError, Pausable, Snapshot, Snapshottable, Transportable,
};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

/// BAR0 size.
pub const BAR0_SIZE: u64 = 0x1000;
/// BAR1 (memfd-backed) size.
pub const BAR1_SIZE: u64 = 0x4000;
/// Sparse mmap areas of BAR1.
pub const BAR1_AREAS: [(u64, u64); 2] = [(0, 0x1000), (0x2000, 0x2000)];
/// BAR2 size.
pub const BAR2_SIZE: u64 = 1 << 36;
/// BAR4 size.
pub const BAR4_SIZE: u64 = 0x100;

/// BAR0 register: guest address of the DMA (u64).
pub const REG_DMA_ADDR: u64 = 0x00;
/// BAR0 register: DMA length (u32, clamped to [`MAX_DMA_LEN`]).
pub const REG_DMA_LEN: u64 = 0x08;
/// BAR0 register: IRQ index (byte 0) and vector (byte 1) raised after the
/// DMA.
pub const REG_IRQ: u64 = 0x0c;
/// BAR0 doorbell: byte 0 is the operation ([`OP_WRITE`], [`OP_READ`],
/// [`OP_INCREMENT`], [`OP_OBJ`], [`OP_MSG_READ`], [`OP_MSG_WRITE`]).
pub const REG_DOORBELL: u64 = 0x10;
/// BAR0 register: result of the last doorbell (0 ok, 1 DMA failed, 2 IRQ
/// failed), read only.
pub const REG_STATUS: u64 = 0x14;
/// Start of the scratch area DMA reads into and writes from.
pub const SCRATCH: u64 = 0x100;
/// Largest DMA one doorbell does.
pub const MAX_DMA_LEN: u32 = 0x700;
/// MSI-X table offset in BAR0.
pub const MSIX_TABLE: u64 = 0x800;
/// MSI-X PBA offset in BAR0.
pub const MSIX_PBA: u64 = 0x900;
/// MSI-X vectors.
pub const MSIX_VECTORS: u16 = 4;

/// Doorbell: write the scratch area to guest memory.
pub const OP_WRITE: u8 = 0;
/// Doorbell: read guest memory into the scratch area.
pub const OP_READ: u8 = 1;
/// Doorbell: increment every byte of the guest buffer in place.
pub const OP_INCREMENT: u8 = 2;
/// Doorbell: read a u64 at the address and write it back plus one
/// (`read_obj`/`write_obj`, the accessors device models use for rings).
pub const OP_OBJ: u8 = 3;
/// Doorbell: queue a message DMA read (server-to-client DMA_READ), for
/// memory the client mapped without an fd.
pub const OP_MSG_READ: u8 = 4;
/// Doorbell: queue a message DMA write of the scratch area (DMA_WRITE).
pub const OP_MSG_WRITE: u8 = 5;

/// The device.
pub struct TestDevice {
    ctx: DeviceContext,
    pci: PciFunction,
    bar0: Vec<u8>,
    bar1: File,
    paused: bool,
}

impl TestDevice {
    /// A device using the guest memory and interrupts of `ctx`; with
    /// `pcie` a PCI Express function (4 KiB config space).
    pub fn new(ctx: DeviceContext, pcie: bool) -> Self {
        let mut pci = PciFunction::new(
            PciConfigurationParams {
                vendor_id: 0x1234,
                device_id: 0x11e8,
                revision_id: 1,
                class_code: 0xff,
                subclass: 0,
                prog_if: 0,
                subsystem_vendor_id: 0x1234,
                subsystem_id: 1,
                pcie,
                interrupt_pin: 1,
            },
            ctx.irqs.clone(),
        );
        use PciBarRegionType::*;
        let np = PciBarPrefetchable::NotPrefetchable;
        for (idx, size, t) in [
            (0, BAR0_SIZE, Memory32BitRegion),
            (1, BAR1_SIZE, Memory32BitRegion),
            (2, BAR2_SIZE, Memory64BitRegion),
            (4, BAR4_SIZE, IoRegion),
        ] {
            pci.add_bar(PciBarConfiguration::new(idx, size, t, np))
                .unwrap();
        }
        if pcie {
            pci.add_capability(&PciExpressCap::endpoint()).unwrap();
        }
        pci.add_capability(&PmCap::new()).unwrap();
        pci.add_msi(1, true).unwrap();
        pci.add_msix(MSIX_VECTORS, 0, MSIX_TABLE, MSIX_PBA).unwrap();
        TestDevice {
            ctx,
            pci,
            bar0: vec![0; BAR0_SIZE as usize],
            bar1: crate::memfd(c"fuzz-bar1", BAR1_SIZE),
            paused: false,
        }
    }

    fn reg_u64(&self, off: u64) -> u64 {
        let o = off as usize;
        u64::from_le_bytes(self.bar0[o..o + 8].try_into().unwrap())
    }

    fn reg_u32(&self, off: u64) -> u32 {
        let o = off as usize;
        u32::from_le_bytes(self.bar0[o..o + 4].try_into().unwrap())
    }

    /// Runs the doorbell operation `op`: a DMA, then an interrupt.
    fn doorbell(&mut self, op: u8) {
        if self.paused {
            return;
        }
        let addr = GuestAddress(self.reg_u64(REG_DMA_ADDR));
        let len = self.reg_u32(REG_DMA_LEN).min(MAX_DMA_LEN) as usize;
        let memory = self.ctx.memory.memory();
        let scratch = SCRATCH as usize..SCRATCH as usize + len;
        let dma_ok = match op % 6 {
            OP_WRITE => memory.write_slice(&self.bar0[scratch], addr).is_ok(),
            OP_READ => memory.read_slice(&mut self.bar0[scratch], addr).is_ok(),
            OP_INCREMENT => {
                let mut buf = vec![0u8; len];
                memory.read_slice(&mut buf, addr).is_ok() && {
                    buf.iter_mut().for_each(|b| *b = b.wrapping_add(1));
                    memory.write_slice(&buf, addr).is_ok()
                }
            }
            OP_OBJ => match memory.read_obj::<u64>(addr) {
                Ok(v) => memory.write_obj(v.wrapping_add(1), addr).is_ok(),
                Err(_) => false,
            },
            OP_MSG_READ => self.ctx.message_dma.read(addr.0, len as u32).is_some(),
            _ => {
                let data = self.bar0[scratch].to_vec();
                self.ctx.message_dma.write(addr.0, data).is_some()
            }
        };
        let irq = self.reg_u32(REG_IRQ);
        let irq_ok = self.ctx.irqs.trigger(irq & 0xff, (irq >> 8) & 0xff).is_ok();
        let status: u32 = if !dma_ok {
            1
        } else if !irq_ok {
            2
        } else {
            0
        };
        let o = REG_STATUS as usize;
        self.bar0[o..o + 4].copy_from_slice(&status.to_le_bytes());
    }

    fn bar0_read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= MSIX_TABLE {
            // Past the MSI-X windows, which the adapter serves.
            data.fill(0);
        } else {
            let o = offset as usize;
            data.copy_from_slice(&self.bar0[o..o + data.len()]);
        }
    }

    fn bar0_write(&mut self, offset: u64, data: &[u8]) {
        if offset >= MSIX_TABLE {
            // Past the MSI-X windows, which the adapter serves.
        } else if offset == REG_DOORBELL {
            self.doorbell(data[0]);
        } else {
            let o = offset as usize;
            let end = o + data.len();
            // The status register is read only.
            let status = REG_STATUS as usize..REG_STATUS as usize + 4;
            for (i, b) in data.iter().enumerate() {
                if !status.contains(&(o + i)) {
                    self.bar0[o + i] = *b;
                }
            }
            debug_assert!(end <= self.bar0.len());
        }
    }

    fn snapshot_json(&self) -> serde_json::Value {
        serde_json::json!({
            "pci": serde_json::to_value(self.pci.state()).unwrap(),
            // The registers; the scratch area is not device state.
            "regs": self.bar0[..SCRATCH as usize],
        })
    }
}

impl PciDevice for TestDevice {
    fn pci_function(&mut self) -> Option<&mut PciFunction> {
        Some(&mut self.pci)
    }

    // The server has checked offset + len against the BAR size.
    fn read_bar(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        match self.pci.bar_index(base) {
            Some(0) => self.bar0_read(offset, data),
            Some(1) => {
                data.fill(0);
                let _ = self.bar1.read_at(data, offset);
            }
            Some(2) => data
                .iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = (offset.wrapping_add(i as u64) >> 3) as u8),
            _ => data.fill(0xff),
        }
    }

    fn write_bar(&mut self, base: u64, offset: u64, data: &[u8]) {
        match self.pci.bar_index(base) {
            Some(0) => self.bar0_write(offset, data),
            Some(1) => {
                let _ = self.bar1.write_at(data, offset);
            }
            _ => {}
        }
    }

    fn bar_mmap(&self, idx: usize) -> Option<RegionMmap> {
        (idx == 1).then(|| RegionMmap {
            fd: self.bar1.as_raw_fd(),
            offset: 0,
            areas: BAR1_AREAS.to_vec(),
        })
    }
}

impl Pausable for TestDevice {
    fn pause(&mut self) -> Result<(), MigratableError> {
        self.paused = true;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), MigratableError> {
        self.paused = false;
        Ok(())
    }
}

impl Snapshottable for TestDevice {
    fn id(&self) -> String {
        "fuzz-test-device".into()
    }

    fn snapshot(&mut self) -> Result<Snapshot, MigratableError> {
        Snapshot::new_from_state(&self.snapshot_json())
    }
}

impl Transportable for TestDevice {}

impl Migratable for TestDevice {}

impl Lifecycle for TestDevice {
    fn reset(&mut self, _reason: ResetReason) {
        self.pci.reset();
        self.bar0.fill(0);
        self.paused = false;
    }

    fn migratable(&self) -> bool {
        true
    }

    fn restore(&mut self, snapshot: &Snapshot) -> Result<(), MigratableError> {
        let bad = |e: String| MigratableError::Restore(e);
        let v: serde_json::Value = snapshot.to_state()?;
        let pci: PciFunctionState =
            serde_json::from_value(v["pci"].clone()).map_err(|e| bad(e.to_string()))?;
        let regs: Vec<u8> =
            serde_json::from_value(v["regs"].clone()).map_err(|e| bad(e.to_string()))?;
        if regs.len() != SCRATCH as usize {
            return Err(bad("register block size".into()));
        }
        self.pci.set_state(&pci).map_err(|e| bad(e.to_string()))?;
        self.bar0.fill(0);
        self.bar0[..SCRATCH as usize].copy_from_slice(&regs);
        Ok(())
    }
}
