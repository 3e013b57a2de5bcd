//! Serves any [`PciDevice`] as a vfio-user [`Device`].
//!
//! Regions follow the VFIO PCI layout: BAR0-5 are the BARs the device
//! declared, ROM and VGA are absent, CONFIG is the device's config space.
//! BAR accesses reach the device with the address it got from the
//! [`BarAllocator`], never with what the guest programmed. The interrupt
//! layout and the size of the configuration space are read from the
//! device's configuration space, as the kernel's vfio-pci reads them from
//! the hardware.

use super::{BarAllocator, PciBarConfiguration, PciBarRegionType, PciDevice, PciDeviceError};
use crate::device::{AsLifecycle, Device, DeviceError, Lifecycle, RegionDescription};
use crate::irq::IrqIndexInfo;
use crate::wire::PCI_CONFIG_REGION_INDEX;

const NUM_BARS: usize = 6;
/// Standard header registers the adapter reads (dword indices of 0x04,
/// 0x34 and 0x3c).
const STATUS_COMMAND_REG: usize = 1;
const CAPABILITY_POINTER_REG: usize = 13;
const INTERRUPT_REG: usize = 15;
const STATUS_CAPABILITY_LIST: u32 = 1 << (16 + 4);
/// Capability ids the layout depends on.
const CAP_ID_MSI: u32 = 0x05;
const CAP_ID_PCI_EXPRESS: u32 = 0x10;
const CAP_ID_MSIX: u32 = 0x11;
/// A well-formed list has at most 48 capabilities (0x40..0x100, 4 bytes
/// each at least); a device whose list loops is read no further.
const MAX_CAPABILITIES: usize = 48;

/// Serves a [`PciDevice`] over vfio-user.
pub struct PciAdapter<D: PciDevice> {
    device: D,
    bars: Vec<PciBarConfiguration>,
    by_index: [Option<PciBarConfiguration>; NUM_BARS],
    irq_layout: Vec<IrqIndexInfo>,
    config_space_size: u64,
}

/// What the configuration space says about interrupts and its own size.
struct ConfigLayout {
    intx: bool,
    msi_vectors: u32,
    msix_vectors: u32,
    pcie: bool,
}

/// Walks the capability list of `device` as a driver would.
fn read_layout(device: &mut dyn PciDevice) -> ConfigLayout {
    let mut layout = ConfigLayout {
        intx: (device.read_config_register(INTERRUPT_REG) >> 8) & 0xff != 0,
        msi_vectors: 0,
        msix_vectors: 0,
        pcie: false,
    };
    if device.read_config_register(STATUS_COMMAND_REG) & STATUS_CAPABILITY_LIST == 0 {
        return layout;
    }
    let mut at = (device.read_config_register(CAPABILITY_POINTER_REG) & 0xfc) as usize;
    for _ in 0..MAX_CAPABILITIES {
        if !(0x40..0x100).contains(&at) {
            break;
        }
        let header = device.read_config_register(at / 4);
        let control = header >> 16;
        match header & 0xff {
            CAP_ID_MSI => layout.msi_vectors = 1 << ((control >> 1) & 0x7).min(5),
            CAP_ID_MSIX => layout.msix_vectors = (control & 0x7ff) + 1,
            CAP_ID_PCI_EXPRESS => layout.pcie = true,
            _ => {}
        }
        at = ((header >> 8) & 0xfc) as usize;
    }
    layout
}

impl<D: PciDevice> PciAdapter<D> {
    /// Wraps `device`, letting it allocate its BARs once, and reads its
    /// interrupt layout from its configuration space. Fails with
    /// [`PciDeviceError::InvalidBar`] for an index out of range, a size that
    /// is not a power of two, or two BARs on the same index.
    pub fn new(mut device: D) -> Result<Self, PciDeviceError> {
        let bars = device.allocate_bars(&mut BarAllocator::default())?;
        let mut used = [false; NUM_BARS];
        let mut by_index = [None; NUM_BARS];
        for bar in &bars {
            let regs = match bar.region_type {
                PciBarRegionType::Memory64BitRegion => 2,
                _ => 1,
            };
            let slots = bar
                .idx
                .checked_add(regs)
                .and_then(|end| used.get_mut(bar.idx..end))
                .filter(|s| !s.contains(&true));
            match slots {
                Some(slots) if bar.size.is_power_of_two() => {
                    slots.fill(true);
                    by_index[bar.idx] = Some(*bar);
                }
                _ => return Err(PciDeviceError::InvalidBar(bar.idx)),
            }
        }
        let layout = read_layout(&mut device);
        Ok(PciAdapter {
            device,
            bars,
            by_index,
            irq_layout: IrqIndexInfo::pci_layout(
                layout.intx,
                layout.msi_vectors,
                layout.msix_vectors,
            ),
            config_space_size: if layout.pcie { 4096 } else { 256 },
        })
    }

    /// The wrapped device.
    pub fn device(&mut self) -> &mut D {
        &mut self.device
    }

    /// The BARs the device declared, in its order.
    pub fn bars(&self) -> &[PciBarConfiguration] {
        &self.bars
    }

    fn bar(&self, index: u32) -> Option<PciBarConfiguration> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.by_index.get(i).copied().flatten())
    }

    fn config_read(&mut self, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        let mut at = 0;
        for (reg, byte, len) in config_chunks(offset, data.len())? {
            let value = self.device.read_config_register(reg).to_le_bytes();
            data[at..at + len].copy_from_slice(&value[byte..byte + len]);
            at += len;
        }
        Ok(())
    }

    fn config_write(&mut self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        let mut at = 0;
        for (reg, byte, len) in config_chunks(offset, data.len())? {
            self.device
                .write_config_register(reg, byte as u64, &data[at..at + len]);
            at += len;
        }
        Ok(())
    }
}

/// Splits a config access at dword boundaries into
/// `(register, byte offset in register, length)`.
fn config_chunks(
    offset: u64,
    len: usize,
) -> Result<impl Iterator<Item = (usize, usize, usize)>, DeviceError> {
    let end = offset
        .checked_add(len as u64)
        .ok_or(DeviceError::InvalidAccess)?;
    let end = usize::try_from(end).map_err(|_| DeviceError::InvalidAccess)?;
    // offset <= end, so it fits too.
    let mut pos = offset as usize;
    Ok(std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let byte = pos % 4;
        let n = (4 - byte).min(end - pos);
        let chunk = (pos / 4, byte, n);
        pos += n;
        Some(chunk)
    }))
}

/// The server drives the wrapped device's lifecycle directly.
impl<D: PciDevice> AsLifecycle for PciAdapter<D> {
    fn lifecycle(&mut self) -> &mut dyn Lifecycle {
        &mut self.device
    }
}

impl<D: PciDevice> Device for PciAdapter<D> {
    fn region(&self, index: u32) -> RegionDescription {
        if index == PCI_CONFIG_REGION_INDEX {
            return RegionDescription {
                size: self.config_space_size,
                read: true,
                write: true,
                mmap: None,
            };
        }
        match self.bar(index) {
            Some(bar) => RegionDescription {
                size: bar.size,
                read: true,
                write: true,
                mmap: self.device.bar_mmap(bar.idx),
            },
            None => RegionDescription::default(),
        }
    }

    fn irq_layout(&self) -> Vec<IrqIndexInfo> {
        self.irq_layout.clone()
    }

    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        if index == PCI_CONFIG_REGION_INDEX {
            return self.config_read(offset, data);
        }
        let bar = self.bar(index).ok_or(DeviceError::InvalidAccess)?;
        // The MSI-X table and PBA are the function's.
        let msix = self.device.pci_function();
        if !msix.is_some_and(|f| f.read_bar(bar.idx, offset, data)) {
            self.device.read_bar(bar.addr, offset, data);
        }
        Ok(())
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        if index == PCI_CONFIG_REGION_INDEX {
            return self.config_write(offset, data);
        }
        let bar = self.bar(index).ok_or(DeviceError::InvalidAccess)?;
        let msix = self.device.pci_function();
        if !msix.is_some_and(|f| f.write_bar(bar.idx, offset, data)) {
            self.device.write_bar(bar.addr, offset, data);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::ResetReason;
    use crate::irq::Irqs;
    use crate::pci::{
        PciBarPrefetchable, PciConfigurationParams, PciExpressCap, PciFunction, PmCap,
    };
    use crate::vm_migration::{Migratable, Pausable, Snapshottable, Transportable};
    use crate::wire::{PCI_MSIX_IRQ_INDEX, PCI_ROM_REGION_INDEX, PCI_VGA_REGION_INDEX};

    const MSIX_VECTORS: u16 = 8;
    const PBA_OFFSET: u64 = 0x1000;

    struct TestDevice {
        pci: PciFunction,
        irqs: Irqs,
        bar0: Vec<u8>,
        bar4: Vec<u8>,
        accesses: Vec<(u64, u64, usize)>,
    }

    impl TestDevice {
        fn new() -> Self {
            let irqs = Irqs::default();
            let mut pci = PciFunction::new(
                PciConfigurationParams {
                    vendor_id: 0x1234,
                    device_id: 0x5678,
                    revision_id: 2,
                    class_code: 0xff,
                    subclass: 0,
                    prog_if: 0,
                    subsystem_vendor_id: 0x1234,
                    subsystem_id: 1,
                    pcie: true,
                    interrupt_pin: 1,
                },
                irqs.clone(),
            );
            let np = PciBarPrefetchable::NotPrefetchable;
            for (idx, size, t, p) in [
                (0, 0x1000, PciBarRegionType::Memory32BitRegion, np),
                (
                    2,
                    0x10_0000,
                    PciBarRegionType::Memory64BitRegion,
                    PciBarPrefetchable::Prefetchable,
                ),
                (4, 0x100, PciBarRegionType::IoRegion, np),
            ] {
                pci.add_bar(PciBarConfiguration::new(idx, size, t, p))
                    .unwrap();
            }
            pci.add_msix(MSIX_VECTORS, 2, 0, PBA_OFFSET).unwrap();
            pci.add_capability(&PciExpressCap::endpoint()).unwrap();
            pci.add_capability(&PmCap::new()).unwrap();
            irqs.configure(&IrqIndexInfo::pci_layout(true, 0, MSIX_VECTORS.into()));
            TestDevice {
                pci,
                irqs,
                bar0: vec![0; 0x1000],
                bar4: vec![0; 0x100],
                accesses: Vec::new(),
            }
        }
    }

    impl Pausable for TestDevice {}
    impl Snapshottable for TestDevice {}
    impl Transportable for TestDevice {}
    impl Migratable for TestDevice {}

    impl Lifecycle for TestDevice {
        fn reset(&mut self, _reason: ResetReason) {
            self.pci.reset();
        }
    }

    impl PciDevice for TestDevice {
        fn pci_function(&mut self) -> Option<&mut PciFunction> {
            Some(&mut self.pci)
        }

        fn read_bar(&mut self, base: u64, offset: u64, data: &mut [u8]) {
            self.accesses.push((base, offset, data.len()));
            let o = offset as usize;
            match self.pci.bar_index(base) {
                Some(0) => data.copy_from_slice(&self.bar0[o..o + data.len()]),
                Some(4) => data.copy_from_slice(&self.bar4[o..o + data.len()]),
                _ => data.fill(0xff),
            }
        }

        fn write_bar(&mut self, base: u64, offset: u64, data: &[u8]) {
            self.accesses.push((base, offset, data.len()));
            let o = offset as usize;
            match self.pci.bar_index(base) {
                Some(0) => self.bar0[o..o + data.len()].copy_from_slice(data),
                Some(4) => self.bar4[o..o + data.len()].copy_from_slice(data),
                _ => {}
            }
        }
    }

    fn adapter() -> PciAdapter<TestDevice> {
        PciAdapter::new(TestDevice::new()).unwrap()
    }

    fn cfg_read(a: &mut PciAdapter<TestDevice>, offset: u64) -> u32 {
        let mut d = [0u8; 4];
        a.region_read(PCI_CONFIG_REGION_INDEX, offset, &mut d)
            .unwrap();
        u32::from_le_bytes(d)
    }

    fn cfg_write(a: &mut PciAdapter<TestDevice>, offset: u64, v: u32) {
        a.region_write(PCI_CONFIG_REGION_INDEX, offset, &v.to_le_bytes())
            .unwrap();
    }

    #[test]
    fn regions() {
        let a = adapter();
        let sizes: Vec<u64> = (0..9).map(|i| a.region(i).size).collect();
        assert_eq!(sizes, [0x1000, 0, 0x10_0000, 0, 0x100, 0, 0, 4096, 0]);
        let bar0 = a.region(0);
        assert!(bar0.read && bar0.write && bar0.mmap.is_none());
        let cfg = a.region(PCI_CONFIG_REGION_INDEX);
        assert!(cfg.read && cfg.write && cfg.mmap.is_none());
        assert_eq!(a.region(PCI_ROM_REGION_INDEX), RegionDescription::default());
        assert_eq!(a.region(PCI_VGA_REGION_INDEX), RegionDescription::default());
        assert_eq!(a.region(9), RegionDescription::default());
        assert_eq!(a.region(u32::MAX), RegionDescription::default());
        assert_eq!(a.bars().len(), 3);
        let layout = a.irq_layout();
        assert_eq!(layout.len(), 5);
        assert_eq!(
            layout.iter().map(|i| i.count).collect::<Vec<_>>(),
            [1, 0, 8, 1, 1]
        );
    }

    /// Sizes BARs the way Cloud Hypervisor's `VfioCommon` does.
    #[test]
    fn bar_sizing_like_cloud_hypervisor() {
        let mut a = adapter();
        let mut found = Vec::new();
        let mut bar = 0;
        while bar < 6 {
            let offset = 0x10 + bar * 4;
            let original = cfg_read(&mut a, offset);
            cfg_write(&mut a, offset, 0xffff_ffff);
            let lower = cfg_read(&mut a, offset);
            let (size, regs) = if original & 1 == 1 {
                let lower = lower & !0b11;
                (u64::from(!lower).wrapping_add(1) * u64::from(lower != 0), 1)
            } else if original & 0b110 == 0b100 {
                let upper_original = cfg_read(&mut a, offset + 4);
                cfg_write(&mut a, offset + 4, 0xffff_ffff);
                let upper = cfg_read(&mut a, offset + 4);
                cfg_write(&mut a, offset + 4, upper_original);
                let combined = ((u64::from(upper) << 32) | u64::from(lower)) & !0xf;
                assert_ne!(original & 0x8, 0, "BAR2 is prefetchable");
                ((!combined).wrapping_add(1), 2)
            } else {
                let lower = u64::from(lower & !0xf);
                (
                    ((!lower) & 0xffff_ffff).wrapping_add(1) * u64::from(lower != 0),
                    1,
                )
            };
            cfg_write(&mut a, offset, original);
            assert_eq!(cfg_read(&mut a, offset), original);
            if size != 0 {
                found.push((bar, size));
            }
            bar += regs;
        }
        assert_eq!(found, [(0, 0x1000), (2, 0x10_0000), (4, 0x100)]);
        // ROM: reads 0 and sizes to 0.
        assert_eq!(cfg_read(&mut a, 0x30), 0);
        cfg_write(&mut a, 0x30, 0xffff_f800);
        assert_eq!(cfg_read(&mut a, 0x30), 0);
        // The guest's BAR address does not change what BAR accesses reach.
        cfg_write(&mut a, 0x10, 0xc000_0000);
        assert_eq!(cfg_read(&mut a, 0x10), 0xc000_0000);
        a.region_write(0, 0x10, &[1]).unwrap();
        let base = a.bars()[0].addr;
        assert_eq!(a.device().accesses, [(base, 0x10, 1)]);
    }

    #[test]
    fn capability_walk_and_msix_enable() {
        let mut a = adapter();
        assert_ne!(cfg_read(&mut a, 0x04) & (1 << 20), 0);
        let mut caps = Vec::new();
        let mut p = u64::from(cfg_read(&mut a, 0x34) & 0xfc);
        while p != 0 {
            let h = cfg_read(&mut a, p);
            caps.push((h & 0xff, p));
            p = u64::from((h >> 8) & 0xfc);
        }
        let ids: Vec<u32> = caps.iter().map(|c| c.0).collect();
        assert_eq!(ids, [0x11, 0x10, 0x01]);
        let msix = caps[0].1;
        // Table in BAR2 at 0, PBA in BAR2 at 0x1000, 8 vectors.
        assert_eq!(cfg_read(&mut a, msix) >> 16, 7);
        assert_eq!(cfg_read(&mut a, msix + 4), 2);
        assert_eq!(cfg_read(&mut a, msix + 8), 0x1002);
        assert!(!a.device().pci.config().msix_enabled());
        // Enable through a 2-byte write of the message control.
        let control = (cfg_read(&mut a, msix) >> 16) as u16 | 0x8000;
        a.region_write(PCI_CONFIG_REGION_INDEX, msix + 2, &control.to_le_bytes())
            .unwrap();
        assert!(a.device().pci.config().msix_enabled());
        assert!(!a.device().pci.config().msix_function_masked());
        // Table size is read-only.
        assert_eq!(cfg_read(&mut a, msix) >> 16, 0x8007);
        a.lifecycle().reset(ResetReason::Command);
        assert!(!a.device().pci.config().msix_enabled());
    }

    #[test]
    fn whole_space_and_unaligned_config_access() {
        let mut a = adapter();
        let mut all = vec![0u8; 4096];
        a.region_read(PCI_CONFIG_REGION_INDEX, 0, &mut all).unwrap();
        for reg in 0..1024u64 {
            let v = cfg_read(&mut a, reg * 4).to_le_bytes();
            assert_eq!(&all[reg as usize * 4..reg as usize * 4 + 4], &v);
        }
        assert_eq!(&all[0..4], &[0x34, 0x12, 0x78, 0x56]);
        // Unaligned, odd-length reads.
        for (offset, len) in [(1u64, 3usize), (3, 5), (0x3b, 7), (0xfff, 1), (2, 1)] {
            let mut d = vec![0u8; len];
            a.region_read(PCI_CONFIG_REGION_INDEX, offset, &mut d)
                .unwrap();
            assert_eq!(d, &all[offset as usize..offset as usize + len]);
        }
        // An odd-length write spanning registers: only the interrupt line
        // (0x3c) is writable among 0x3a..0x40.
        a.region_write(PCI_CONFIG_REGION_INDEX, 0x3a, &[0xaa; 6])
            .unwrap();
        assert_eq!(cfg_read(&mut a, 0x38), all_u32(&all, 0x38));
        assert_eq!(cfg_read(&mut a, 0x3c), 0x0000_01aa);
        // Read-only fields keep their values.
        a.region_write(PCI_CONFIG_REGION_INDEX, 0, &[0xff; 8])
            .unwrap();
        a.region_write(PCI_CONFIG_REGION_INDEX, 1, &[0; 2]).unwrap();
        assert_eq!(cfg_read(&mut a, 0), 0x5678_1234);
        assert_eq!(cfg_read(&mut a, 8), all_u32(&all, 8));
        // The writable command bits took the 0xff write.
        assert_eq!(cfg_read(&mut a, 4) & 0xffff, 0x0547);
        // Writes into the extended space are ignored.
        a.region_write(PCI_CONFIG_REGION_INDEX, 0x100, &[0xff; 0x10])
            .unwrap();
        assert_eq!(cfg_read(&mut a, 0x100), 0);
    }

    fn all_u32(all: &[u8], offset: usize) -> u32 {
        u32::from_le_bytes([
            all[offset],
            all[offset + 1],
            all[offset + 2],
            all[offset + 3],
        ])
    }

    #[test]
    fn bar_accesses_reach_the_right_bar() {
        let mut a = adapter();
        let bases: Vec<u64> = a.bars().iter().map(|b| b.addr).collect();
        a.region_write(0, 0x100, &[1, 2, 3, 4]).unwrap();
        a.region_write(4, 0x10, &[9, 8]).unwrap();
        let mut d = [0u8; 4];
        a.region_read(0, 0x100, &mut d).unwrap();
        assert_eq!(d, [1, 2, 3, 4]);
        let mut d = [0u8; 2];
        a.region_read(4, 0x10, &mut d).unwrap();
        assert_eq!(d, [9, 8]);
        assert_eq!(a.device().bar0[0x100..0x104], [1, 2, 3, 4]);
        assert_eq!(a.device().bar4[0x10..0x12], [9, 8]);
        // MSI-X table write/read and a PBA read through BAR2: served by the
        // function, the device never sees them; the rest of BAR2 does.
        a.region_write(2, 0x1c, &0u32.to_le_bytes()).unwrap();
        let mut e = [0xffu8; 4];
        a.region_read(2, 0x1c, &mut e).unwrap();
        assert_eq!(e, [0; 4]);
        a.device().irqs.trigger(PCI_MSIX_IRQ_INDEX, 3).unwrap();
        let mut q = [0u8; 8];
        a.region_read(2, PBA_OFFSET, &mut q).unwrap();
        assert_eq!(u64::from_le_bytes(q), 1 << 3);
        a.region_read(2, 0x8000, &mut q).unwrap();
        assert_eq!(
            a.device().accesses,
            [
                (bases[0], 0x100, 4),
                (bases[2], 0x10, 2),
                (bases[0], 0x100, 4),
                (bases[2], 0x10, 2),
                (bases[1], 0x8000, 8),
            ]
        );
        // Absent BARs are refused.
        assert!(a.region_read(1, 0, &mut d).is_err());
        assert!(a.region_write(5, 0, &d).is_err());
        assert!(a.region_read(PCI_ROM_REGION_INDEX, 0, &mut d).is_err());
    }

    struct BadBars(Vec<PciBarConfiguration>);

    impl PciDevice for BadBars {
        fn allocate_bars(
            &mut self,
            _allocator: &mut BarAllocator,
        ) -> Result<Vec<PciBarConfiguration>, PciDeviceError> {
            Ok(self.0.clone())
        }
        fn write_config_register(&mut self, _: usize, _: u64, _: &[u8]) {}
        fn read_config_register(&mut self, _: usize) -> u32 {
            0
        }
        fn read_bar(&mut self, _: u64, _: u64, _: &mut [u8]) {}
        fn write_bar(&mut self, _: u64, _: u64, _: &[u8]) {}
    }

    impl Pausable for BadBars {}
    impl Snapshottable for BadBars {}
    impl Transportable for BadBars {}
    impl Migratable for BadBars {}
    impl Lifecycle for BadBars {
        fn reset(&mut self, _reason: ResetReason) {}
    }

    #[test]
    fn bad_bars_rejected() {
        let np = PciBarPrefetchable::NotPrefetchable;
        let m32 = PciBarRegionType::Memory32BitRegion;
        let m64 = PciBarRegionType::Memory64BitRegion;
        for (bars, idx) in [
            (vec![PciBarConfiguration::new(6, 0x1000, m32, np)], 6),
            (vec![PciBarConfiguration::new(5, 0x1000, m64, np)], 5),
            (vec![PciBarConfiguration::new(0, 0x1800, m32, np)], 0),
            (vec![PciBarConfiguration::new(0, 0, m32, np)], 0),
            (
                vec![
                    PciBarConfiguration::new(0, 0x1000, m64, np),
                    PciBarConfiguration::new(1, 0x1000, m32, np),
                ],
                1,
            ),
            (
                vec![PciBarConfiguration::new(usize::MAX, 16, m64, np)],
                usize::MAX,
            ),
        ] {
            assert_eq!(
                PciAdapter::new(BadBars(bars)).err(),
                Some(PciDeviceError::InvalidBar(idx))
            );
        }
    }
}
