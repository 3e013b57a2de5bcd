//! The PCI function core that every device embeds: configuration space
//! with its capabilities, the BAR layout, the MSI-X table and PBA windows,
//! MSI and INTx, one [`PciFunction::signal`] that picks whichever the
//! guest enabled, and the save and restore of all of that.
//!
//! A device builds its function once ([`PciFunction::new`], then
//! [`PciFunction::add_bar`], [`PciFunction::add_msix`], ...), answers the
//! [`super::PciDevice`] config accesses with
//! [`PciFunction::read_config_register`] and
//! [`PciFunction::write_config_register`], lets
//! [`PciFunction::read_bar`]/[`PciFunction::write_bar`] take the accesses
//! that fall in the MSI-X windows, and adds [`PciFunction::snapshot`] to
//! its own snapshot.

use std::cell::Cell;

use log::debug;
use serde::{Deserialize, Serialize};

use super::{
    BarAllocator, MsiCap, MsixCap, MsixTable, MsixTableState, PciBarConfiguration,
    PciBarRegionType, PciCapability, PciConfiguration, PciConfigurationParams,
    PciConfigurationState, PciDeviceError,
};
use crate::irq::{IrqError, Irqs, TriggerOutcome};
use crate::vm_migration::{MigratableError, Snapshot};
use crate::wire::{PCI_INTX_IRQ_INDEX, PCI_MSIX_IRQ_INDEX, PCI_MSI_IRQ_INDEX};

/// The command and status register's index.
const COMMAND_STATUS_REG: usize = 1;
/// Interrupt status (status register bit 3), in the 32-bit register.
const STATUS_INTERRUPT: u32 = 1 << (16 + 3);

/// Where the MSI-X table and PBA live, and the table itself.
#[derive(Clone, Debug)]
struct MsixWindows {
    table: MsixTable,
    bar: usize,
    table_offset: u64,
    pba_offset: u64,
}

impl MsixWindows {
    fn table_end(&self) -> u64 {
        self.table_offset + self.table.table_size_bytes()
    }

    fn pba_end(&self) -> u64 {
        self.pba_offset + self.table.pba_size_bytes()
    }
}

/// Which interrupt [`PciFunction::signal`] raises: what the guest enabled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterruptMode {
    /// MSI-X is enabled.
    MsiX,
    /// MSI is enabled.
    Msi,
    /// Neither: the INTx pin, unless the guest disabled it.
    Intx,
    /// Neither, and INTx is disabled in the command register (or the
    /// function has no pin): nothing is raised.
    None,
}

/// Saved state of a [`PciFunction`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciFunctionState {
    /// Configuration space.
    pub config: PciConfigurationState,
    /// The MSI-X table and the device's own pending bits, if it has MSI-X.
    #[serde(default)]
    pub msix: Option<MsixTableState>,
    /// The INTx line is up (interrupt status).
    #[serde(default)]
    pub intx_asserted: bool,
}

/// One PCI function: configuration space, BARs and interrupts.
#[derive(Clone)]
pub struct PciFunction {
    config: PciConfiguration,
    bars: Vec<PciBarConfiguration>,
    allocated: bool,
    msix: Option<MsixWindows>,
    msi_vectors: u32,
    has_intx: bool,
    /// The INTx line is up, status bit 3: raised by [`PciFunction::signal`]
    /// when neither MSI-X nor MSI is on, also while the guest disabled
    /// INTx (its edge then goes out when it enables it again), until the
    /// device lowers it ([`PciFunction::intx_deassert`]).
    intx_asserted: Cell<bool>,
    irqs: Irqs,
}

impl PciFunction {
    /// A function with the header of `params`, no BARs and no
    /// capabilities, raising its interrupts through `irqs` (the server's
    /// [`crate::DeviceContext::irqs`]).
    pub fn new(params: PciConfigurationParams, irqs: Irqs) -> Self {
        PciFunction {
            has_intx: params.interrupt_pin != 0,
            config: PciConfiguration::new(params),
            bars: Vec::new(),
            allocated: false,
            msix: None,
            msi_vectors: 0,
            intx_asserted: Cell::new(false),
            irqs,
        }
    }

    /// Declares a BAR (its address is assigned by
    /// [`PciFunction::allocate_bars`]). Fails for an index or size the
    /// configuration space cannot hold, or one already taken.
    pub fn add_bar(&mut self, bar: PciBarConfiguration) -> Result<(), PciDeviceError> {
        if self.allocated {
            return Err(PciDeviceError::InvalidBar(bar.idx));
        }
        self.config.add_pci_bar(&bar)?;
        self.bars.push(bar);
        Ok(())
    }

    /// Adds an MSI-X capability for `vectors` vectors (1 to 2048), with
    /// the table at `table_offset` and the PBA at `pba_offset` of BAR
    /// `bar`, which must be declared already and hold both windows without
    /// overlap. Offsets must be 8-byte aligned. Returns the capability's
    /// offset.
    pub fn add_msix(
        &mut self,
        vectors: u16,
        bar: usize,
        table_offset: u64,
        pba_offset: u64,
    ) -> Result<usize, PciDeviceError> {
        let size = self
            .bars
            .iter()
            .find(|b| b.idx == bar && b.region_type != PciBarRegionType::IoRegion)
            .map(|b| b.size)
            .ok_or(PciDeviceError::InvalidBar(bar))?;
        if self.msix.is_some() || vectors == 0 || vectors > 2048 {
            return Err(PciDeviceError::InvalidCapability);
        }
        let windows = MsixWindows {
            table: MsixTable::new(vectors),
            bar,
            table_offset,
            pba_offset,
        };
        let fits = table_offset.is_multiple_of(8)
            && pba_offset.is_multiple_of(8)
            && windows.table_end() <= size
            && windows.pba_end() <= size
            && (windows.table_end() <= pba_offset || windows.pba_end() <= table_offset);
        let (Ok(table32), Ok(pba32)) = (u32::try_from(table_offset), u32::try_from(pba_offset))
        else {
            return Err(PciDeviceError::InvalidCapability);
        };
        if !fits {
            return Err(PciDeviceError::InvalidCapability);
        }
        let bir = bar as u32;
        let offset = self
            .config
            .add_capability(&MsixCap::new(vectors, bir, table32, bir, pba32))?;
        self.msix = Some(windows);
        Ok(offset)
    }

    /// Adds an MSI capability for `vectors` vectors (rounded up to a power
    /// of two, at most 32); returns its offset.
    pub fn add_msi(&mut self, vectors: u32, is_64bit: bool) -> Result<usize, PciDeviceError> {
        if self.msi_vectors != 0 || vectors == 0 || vectors > 32 {
            return Err(PciDeviceError::InvalidCapability);
        }
        let offset = self
            .config
            .add_capability(&MsiCap::new(vectors, is_64bit))?;
        self.msi_vectors = vectors.next_power_of_two();
        Ok(offset)
    }

    /// Appends any other capability (PCI Express, power management,
    /// vendor-specific); returns its offset.
    pub fn add_capability(&mut self, cap: &dyn PciCapability) -> Result<usize, PciDeviceError> {
        self.config.add_capability(cap)
    }

    /// Gives every declared BAR its address from `allocator` (once; later
    /// calls return the same BARs), for
    /// [`super::PciDevice::allocate_bars`].
    pub fn allocate_bars(
        &mut self,
        allocator: &mut BarAllocator,
    ) -> Result<Vec<PciBarConfiguration>, PciDeviceError> {
        if !self.allocated {
            for bar in self.bars.iter_mut() {
                bar.addr = allocator
                    .allocate(bar.size)
                    .ok_or(PciDeviceError::InvalidBar(bar.idx))?;
            }
            self.allocated = true;
        }
        Ok(self.bars.clone())
    }

    /// The BARs, with their addresses once allocated.
    pub fn bars(&self) -> &[PciBarConfiguration] {
        &self.bars
    }

    /// The index of the BAR allocated at `base` (the key
    /// [`super::PciDevice::read_bar`] and `write_bar` receive).
    pub fn bar_index(&self, base: u64) -> Option<usize> {
        self.bars.iter().find(|b| b.addr == base).map(|b| b.idx)
    }

    /// The configuration space, e.g. for a vendor capability's registers.
    pub fn config(&self) -> &PciConfiguration {
        &self.config
    }

    /// Reads the 32-bit configuration register `reg_idx`.
    pub fn read_config_register(&self, reg_idx: usize) -> u32 {
        let v = self.config.read_reg(reg_idx);
        if reg_idx == COMMAND_STATUS_REG && self.intx_asserted.get() {
            v | STATUS_INTERRUPT
        } else {
            v
        }
    }

    /// Writes `data` at byte `offset` of configuration register `reg_idx`.
    /// The guest enabling INTx again with the line up gets its edge.
    pub fn write_config_register(&mut self, reg_idx: usize, offset: u64, data: &[u8]) {
        let was_disabled = self.config.intx_disabled();
        self.config.write_config_register(reg_idx, offset, data);
        if was_disabled && self.intx_asserted.get() && self.interrupt_mode() == InterruptMode::Intx
        {
            if let Err(e) = self.irqs.trigger(PCI_INTX_IRQ_INDEX, 0) {
                debug!("INTx: {e}");
            }
        }
    }

    /// Lowers the INTx line: the device's reason to interrupt is gone
    /// (the driver acknowledged it).
    pub fn intx_deassert(&self) {
        self.intx_asserted.set(false);
    }

    /// Serves a read of BAR `bar` if it falls in the MSI-X table or PBA;
    /// returns whether it did.
    pub fn read_bar(&self, bar: usize, offset: u64, data: &mut [u8]) -> bool {
        let Some(m) = self.msix.as_ref().filter(|m| m.bar == bar) else {
            return false;
        };
        let end = offset.saturating_add(data.len() as u64);
        if offset >= m.table_offset && end <= m.table_end() {
            m.table.read_table(offset - m.table_offset, data);
        } else if offset >= m.pba_offset && end <= m.pba_end() {
            m.table.read_pba(offset - m.pba_offset, data, &self.irqs);
        } else {
            return false;
        }
        true
    }

    /// Serves a write of BAR `bar` if it falls in the MSI-X table or PBA
    /// (the PBA is read-only); returns whether it did.
    pub fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) -> bool {
        let Some(m) = self.msix.as_mut().filter(|m| m.bar == bar) else {
            return false;
        };
        let end = offset.saturating_add(data.len() as u64);
        if offset >= m.table_offset && end <= m.table_end() {
            m.table.write_table(offset - m.table_offset, data);
        } else if !(offset >= m.pba_offset && end <= m.pba_end()) {
            return false;
        }
        true
    }

    /// Number of MSI-X vectors (0 without MSI-X).
    pub fn msix_vectors(&self) -> u16 {
        self.msix
            .as_ref()
            .map_or(0, |m| (m.table.table_size_bytes() / 16) as u16)
    }

    /// Number of MSI vectors (0 without MSI).
    pub fn msi_vectors(&self) -> u32 {
        self.msi_vectors
    }

    /// Whether the function has an INTx pin.
    pub fn has_intx(&self) -> bool {
        self.has_intx
    }

    /// What [`PciFunction::signal`] raises now.
    pub fn interrupt_mode(&self) -> InterruptMode {
        if self.config.msix_enabled() {
            InterruptMode::MsiX
        } else if self.config.msi_enabled() {
            InterruptMode::Msi
        } else if self.has_intx && !self.config.intx_disabled() {
            InterruptMode::Intx
        } else {
            InterruptMode::None
        }
    }

    /// Raises an interrupt the way the guest set the function up: MSI-X
    /// vector `vector` when MSI-X is enabled, MSI vector `vector` when MSI
    /// is, and otherwise the INTx pin (`vector` is then ignored) unless
    /// the guest disabled it. A masked vector, or one whose eventfd the
    /// client has not installed yet, becomes pending.
    pub fn signal(&self, vector: u32) -> Result<Option<TriggerOutcome>, IrqError> {
        let index = match self.interrupt_mode() {
            InterruptMode::MsiX => PCI_MSIX_IRQ_INDEX,
            InterruptMode::Msi => PCI_MSI_IRQ_INDEX,
            InterruptMode::Intx => {
                self.intx_asserted.set(true);
                return self.irqs.trigger(PCI_INTX_IRQ_INDEX, 0).map(Some);
            }
            InterruptMode::None => {
                // Neither MSI-X nor MSI is on, and INTx is disabled by the
                // guest (or there is no pin): the line is up, and goes out
                // once the guest enables INTx again.
                if self.has_intx {
                    self.intx_asserted.set(true);
                }
                return Ok(None);
            }
        };
        self.irqs.trigger(index, vector).map(Some)
    }

    /// [`PciFunction::signal`], with a failure (a vector the driver never
    /// set up) only logged: for devices that raise and go on.
    pub fn signal_or_log(&self, vector: u32) {
        if let Err(e) = self.signal(vector) {
            debug!("interrupt vector {vector}: {e}");
        }
    }

    /// Power-on state: configuration registers as built, MSI-X entries
    /// masked, nothing pending. BARs and capabilities stay where they are.
    pub fn reset(&mut self) {
        self.config.reset();
        if let Some(m) = self.msix.as_mut() {
            m.table.reset();
        }
        // What was raised before the reset is the old driver's.
        self.irqs.clear_pending();
        self.intx_asserted.set(false);
    }

    /// The state to save.
    pub fn state(&self) -> PciFunctionState {
        PciFunctionState {
            config: self.config.state(),
            msix: self.msix.as_ref().map(|m| m.table.state()),
            intx_asserted: self.intx_asserted.get(),
        }
    }

    /// Restores a state saved from a function with the same layout;
    /// nothing is applied if it does not fit.
    pub fn set_state(&mut self, state: &PciFunctionState) -> Result<(), PciDeviceError> {
        let mut config = self.config.clone();
        config.set_state(&state.config)?;
        let mut msix = self.msix.clone();
        match (msix.as_mut(), &state.msix) {
            (Some(m), Some(s)) => m.table.set_state(s)?,
            (None, None) => {}
            _ => return Err(PciDeviceError::InvalidCapability),
        }
        self.config = config;
        self.msix = msix;
        self.intx_asserted.set(state.intx_asserted && self.has_intx);
        Ok(())
    }

    /// [`PciFunction::state`] as a snapshot, to add as a child of the
    /// device's own.
    pub fn snapshot(&self) -> Result<Snapshot, MigratableError> {
        Snapshot::new_from_state(&self.state())
    }

    /// Restores what [`PciFunction::snapshot`] saved.
    pub fn restore(&mut self, snapshot: &Snapshot) -> Result<(), MigratableError> {
        let state: PciFunctionState = snapshot.to_state()?;
        self.set_state(&state)
            .map_err(|e| MigratableError::Restore(format!("PCI function: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::IrqIndexInfo;
    use crate::pci::{PciBarPrefetchable, PciExpressCap};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    const MSIX_CAP: usize = 0x40;

    fn function(msi: bool) -> (PciFunction, Irqs) {
        let irqs = Irqs::default();
        let mut f = PciFunction::new(
            PciConfigurationParams {
                vendor_id: 0x1234,
                device_id: 0x11,
                class_code: 0xff,
                pcie: true,
                interrupt_pin: 1,
                ..Default::default()
            },
            irqs.clone(),
        );
        f.add_bar(PciBarConfiguration::new(
            0,
            0x4000,
            PciBarRegionType::Memory64BitRegion,
            PciBarPrefetchable::NotPrefetchable,
        ))
        .unwrap();
        assert_eq!(f.add_msix(4, 0, 0x2000, 0x3000).unwrap(), MSIX_CAP);
        if msi {
            f.add_msi(2, true).unwrap();
        }
        f.add_capability(&PciExpressCap::endpoint()).unwrap();
        irqs.configure(&IrqIndexInfo::pci_layout(
            true,
            f.msi_vectors(),
            f.msix_vectors().into(),
        ));
        (f, irqs)
    }

    fn install(irqs: &Irqs, index: u32, vectors: u32) -> Vec<EventFd> {
        let efds: Vec<EventFd> = (0..vectors)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let files = efds
            .iter()
            .map(|e| {
                use std::os::fd::{FromRawFd, IntoRawFd};
                // SAFETY: a fresh duplicate, owned by the File.
                unsafe { std::fs::File::from_raw_fd(e.try_clone().unwrap().into_raw_fd()) }
            })
            .collect();
        let set = crate::wire::IrqSet {
            argsz: 20 + 4 * vectors,
            flags: crate::wire::IRQ_SET_DATA_EVENTFD | crate::wire::IRQ_SET_ACTION_TRIGGER,
            index,
            start: 0,
            count: vectors,
        };
        irqs.set_irqs(&set, &[], files).unwrap();
        efds
    }

    /// SET_IRQS MASK (or UNMASK) of vector `vector` of `index`, as the
    /// client sends it.
    fn set_mask(irqs: &Irqs, index: u32, vector: u32, masked: bool) {
        let action = if masked {
            crate::wire::IRQ_SET_ACTION_MASK
        } else {
            crate::wire::IRQ_SET_ACTION_UNMASK
        };
        let set = crate::wire::IrqSet {
            argsz: 20,
            flags: crate::wire::IRQ_SET_DATA_NONE | action,
            index,
            start: vector,
            count: 1,
        };
        irqs.set_irqs(&set, &[], Vec::new()).unwrap();
    }

    #[test]
    fn building_checks_the_layout() {
        let (mut f, _) = function(false);
        // A second MSI-X, a window outside the BAR, overlapping windows, a
        // missing BAR, an I/O BAR.
        assert!(f.add_msix(1, 0, 0, 0x100).is_err());
        let mut g = PciFunction::new(PciConfigurationParams::default(), Irqs::default());
        g.add_bar(PciBarConfiguration::new(
            2,
            0x1000,
            PciBarRegionType::Memory32BitRegion,
            PciBarPrefetchable::NotPrefetchable,
        ))
        .unwrap();
        g.add_bar(PciBarConfiguration::new(
            4,
            0x100,
            PciBarRegionType::IoRegion,
            PciBarPrefetchable::NotPrefetchable,
        ))
        .unwrap();
        assert!(g.add_msix(8, 2, 0xf80, 0xff8).is_err());
        assert!(g.add_msix(8, 2, 0, 0x40).is_err());
        assert!(g.add_msix(8, 2, 0, 0x84).is_err());
        assert!(g.add_msix(8, 0, 0, 0x800).is_err());
        assert!(g.add_msix(8, 4, 0, 0x80).is_err());
        assert!(g.add_msix(8, 2, 0, 0x80).is_ok());
        assert!(g.add_msi(33, false).is_err());
        assert!(!g.has_intx());
        // Addresses are given once; the index is found by address.
        let bars = g.allocate_bars(&mut BarAllocator::default()).unwrap();
        assert_eq!(bars, g.allocate_bars(&mut BarAllocator::default()).unwrap());
        assert_eq!(g.bar_index(bars[1].addr), Some(4));
        assert_eq!(g.bar_index(1), None);
        assert!(g
            .add_bar(PciBarConfiguration::new(
                0,
                0x1000,
                PciBarRegionType::Memory32BitRegion,
                PciBarPrefetchable::NotPrefetchable,
            ))
            .is_err());
    }

    #[test]
    fn msix_windows_are_served_and_signal_follows_the_guest() {
        let (mut f, irqs) = function(true);
        let msix = install(&irqs, PCI_MSIX_IRQ_INDEX, 4);
        let msi = install(&irqs, PCI_MSI_IRQ_INDEX, 2);
        let intx = install(&irqs, PCI_INTX_IRQ_INDEX, 1);
        // Table entry 1's vector control, through the BAR.
        assert!(f.write_bar(0, 0x2000 + 16 + 12, &0u32.to_le_bytes()));
        let mut d = [0u8; 4];
        assert!(f.read_bar(0, 0x2000 + 16 + 12, &mut d));
        assert_eq!(d, [0; 4]);
        assert!(!f.read_bar(0, 0x1000, &mut d));
        assert!(!f.read_bar(1, 0x2000, &mut d));
        assert!(f.write_bar(0, 0x3000, &[0xff; 8]), "the PBA takes writes");

        // Nothing enabled: INTx.
        assert_eq!(f.interrupt_mode(), InterruptMode::Intx);
        f.signal(3).unwrap();
        assert_eq!(intx[0].read().unwrap(), 1);
        // INTx disabled in the command register: nothing.
        f.write_config_register(1, 1, &[0x04]);
        assert_eq!(f.interrupt_mode(), InterruptMode::None);
        assert_eq!(f.signal(0).unwrap(), None);
        // MSI enabled.
        let msi_cap = (0x40 + 12 + 3) & !3;
        f.write_config_register(msi_cap / 4, 2, &[0x01]);
        assert_eq!(f.interrupt_mode(), InterruptMode::Msi);
        f.signal(1).unwrap();
        assert_eq!(msi[1].read().unwrap(), 1);
        // MSI-X wins over MSI.
        f.write_config_register(MSIX_CAP / 4, 3, &[0x80]);
        assert_eq!(f.interrupt_mode(), InterruptMode::MsiX);
        f.signal(2).unwrap();
        assert_eq!(msix[2].read().unwrap(), 1);
        assert!(f.signal(9).is_err());

        // Masked vector 3 becomes pending and shows in the PBA.
        set_mask(&irqs, PCI_MSIX_IRQ_INDEX, 3, true);
        assert_eq!(f.signal(3).unwrap(), Some(TriggerOutcome::Pending));
        let mut pba = [0u8; 8];
        assert!(f.read_bar(0, 0x3000, &mut pba));
        assert_eq!(u64::from_le_bytes(pba), 1 << 3);

        // A function reset forgets it: the next driver gets no interrupt
        // of the old one's when the vector is unmasked.
        f.reset();
        assert!(f.read_bar(0, 0x3000, &mut pba));
        assert_eq!(u64::from_le_bytes(pba), 0);
        assert!(!irqs.pending(PCI_MSIX_IRQ_INDEX, 3));
        set_mask(&irqs, PCI_MSIX_IRQ_INDEX, 3, false);
        assert!(
            msix[3].read().is_err(),
            "an interrupt from before the reset"
        );
    }

    /// INTx is a line: up from the signal until the device lowers it,
    /// shown in the status register whether the guest disabled INTx or
    /// not, and delivered when the guest enables INTx with the line up.
    #[test]
    fn intx_is_a_line_the_status_register_shows() {
        let (mut f, irqs) = function(false);
        let intx = install(&irqs, PCI_INTX_IRQ_INDEX, 1);
        let status = |f: &PciFunction| f.read_config_register(1) >> 16 & 0x08 != 0;
        assert!(!status(&f));
        f.signal(0).unwrap();
        assert_eq!(intx[0].read().unwrap(), 1);
        assert!(status(&f));
        f.intx_deassert();
        assert!(!status(&f));
        // Disabled by the guest: no edge, but the line is up...
        f.write_config_register(1, 1, &[0x04]);
        assert_eq!(f.signal(0).unwrap(), None);
        assert!(intx[0].read().is_err());
        assert!(status(&f));
        // ...and the edge goes out when it enables INTx again (after the
        // client's unmask of the edge before).
        set_mask(&irqs, PCI_INTX_IRQ_INDEX, 0, false);
        f.write_config_register(1, 1, &[0x00]);
        assert_eq!(intx[0].read().unwrap(), 1);
        // The line travels with the state, and a reset lowers it.
        let (mut g, _) = function(false);
        g.set_state(&f.state()).unwrap();
        assert!(status(&g));
        g.reset();
        assert!(!status(&g));
    }

    #[test]
    fn state_round_trip_and_reset() {
        let (mut f, _) = function(false);
        f.write_config_register(1, 0, &[0x06]);
        f.write_bar(0, 0x2000, &0xfee0_0000u32.to_le_bytes());
        let snap = f.snapshot().unwrap();
        let (mut g, _) = function(false);
        g.restore(&snap).unwrap();
        assert_eq!(g.state(), f.state());
        assert_eq!(g.read_config_register(1) & 0xffff, 0x06);
        let mut d = [0u8; 4];
        g.read_bar(0, 0x2000, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0xfee0_0000);
        // A function with another layout refuses it, unchanged.
        let (mut h, _) = function(true);
        let before = h.state();
        assert!(h.restore(&snap).is_err());
        assert_eq!(h.state(), before);
        // Reset: power-on registers, entries masked.
        g.reset();
        assert_eq!(g.read_config_register(1) & 0xffff, 0);
        g.read_bar(0, 0x2000 + 12, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1);
    }
}
