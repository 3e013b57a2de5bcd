//! `pci_config`: `PciConfiguration` built with arbitrary BARs and
//! capabilities, then fed arbitrary config reads and writes, directly and
//! through `PciAdapter` (the config region as the server exposes it), plus
//! the MSI-X table and PBA a device keeps in its BAR.
//!
//! Input format (little-endian, missing bytes read as 0):
//!
//! ```text
//! head:u8        bit 0 PCIe (4 KiB space), bit 1 INTA# pin
//! nbars:u8 (%8)  bar := idx:u8 (%8) size_log2:u8 (%64) type:u8 (%3) prefetch:u8
//!                  [give:u8 when the config space refused the BAR: bit 0
//!                  hands it to the adapter anyway]
//! ncaps:u8 (%8)  cap := kind:u8 (%5) args
//!                  0 MSI-X   size:u16 table_bir:u8 table_off:u32 pba_bir:u8 pba_off:u32
//!                  1 MSI     vectors:u8 is_64bit:u8
//!                  2 PCIe    3 PM
//!                  4 vendor  body:blob mask:blob
//! msix:u16       MSI-X table size for the table ops (0: the capability's)
//! bare:u8        bit 0: no PciAdapter (else one, if it accepts the BARs)
//! op*            tag:u8 (%8)
//!                  0 write   mode:u8 reg offset len:u8 data
//!                  1 read    mode:u8 reg
//!                  2 reset
//!                  3 save/restore (and a tampered state) which:u8 at:u16 v:u8
//!                  4 adapter read   mode:u8 offset len:u16
//!                  5 adapter write  mode:u8 offset len:u16 data
//!                  6 queries
//!                  7 MSI-X   sub:u8 offset:u64 len:u8 vector:u16
//! mode bits: 0 raw u64 register index (else u8), 1 raw u64 offset (else
//! u8 % 8 / u16), 2 length as is (else len % 9), 3 index and offset near
//! the top of their range: shift:u8 down:u8 / down:u8 (overrides 0 and 1)
//! ```

use vfio_user_server::device::{Device, Lifecycle, ResetReason};
use vfio_user_server::irq::{IrqIndexInfo, Irqs};
use vfio_user_server::pci::{
    BarAllocator, MsiCap, MsixCap, MsixTable, PciAdapter, PciBarConfiguration, PciBarPrefetchable,
    PciBarRegionType, PciCapability, PciCapabilityId, PciConfiguration, PciConfigurationParams,
    PciDevice, PciDeviceError, PciExpressCap, PmCap,
};
use vfio_user_server::vm_migration::{Migratable, Pausable, Snapshottable, Transportable};
use vfio_user_server::wire::{PCI_CONFIG_REGION_INDEX, PCI_MSIX_IRQ_INDEX};

use crate::{Reader, Writer};

/// Op tags.
pub const OP_WRITE: u8 = 0;
/// Read a register.
pub const OP_READ: u8 = 1;
/// Reset.
pub const OP_RESET: u8 = 2;
/// Save and restore.
pub const OP_STATE: u8 = 3;
/// Config region read through the adapter.
pub const OP_ADAPTER_READ: u8 = 4;
/// Config region write through the adapter.
pub const OP_ADAPTER_WRITE: u8 = 5;
/// Read-only queries.
pub const OP_QUERY: u8 = 6;
/// MSI-X table and PBA.
pub const OP_MSIX: u8 = 7;
const NUM_OPS: u8 = 8;
const MAX_OPS: usize = 4096;

/// Mode bit: raw u64 register index.
pub const MODE_RAW_REG: u8 = 1;
/// Mode bit: raw u64 offset.
pub const MODE_RAW_OFFSET: u8 = 2;
/// Mode bit: length as is (up to 255).
pub const MODE_RAW_LEN: u8 = 4;
/// Mode bit: register index and offsets counted down from the top of
/// their range (`usize::MAX >> (b % 4)` - b2, `u64::MAX` - b), where
/// overflows hide.
pub const MODE_NEAR_MAX: u8 = 8;

/// A capability with arbitrary bytes.
struct Vendor {
    body: Vec<u8>,
    mask: Vec<u8>,
}

impl PciCapability for Vendor {
    fn bytes(&self) -> &[u8] {
        &self.body
    }
    fn id(&self) -> PciCapabilityId {
        PciCapabilityId::VendorSpecific
    }
    fn writable_bits(&self) -> Vec<u8> {
        self.mask.clone()
    }
}

/// A device that is just its config space and the BARs it declares.
struct CfgDevice {
    config: PciConfiguration,
    bars: Vec<PciBarConfiguration>,
}

impl PciDevice for CfgDevice {
    fn allocate_bars(
        &mut self,
        _allocator: &mut BarAllocator,
    ) -> Result<Vec<PciBarConfiguration>, PciDeviceError> {
        Ok(self.bars.clone())
    }
    fn write_config_register(&mut self, reg_idx: usize, offset: u64, data: &[u8]) {
        self.config.write_config_register(reg_idx, offset, data);
    }
    fn read_config_register(&mut self, reg_idx: usize) -> u32 {
        self.config.read_reg(reg_idx)
    }
    fn read_bar(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write_bar(&mut self, _base: u64, _offset: u64, _data: &[u8]) {}
}

impl Pausable for CfgDevice {}
impl Snapshottable for CfgDevice {}
impl Transportable for CfgDevice {}
impl Migratable for CfgDevice {}
impl Lifecycle for CfgDevice {
    fn reset(&mut self, _reason: ResetReason) {
        self.config.reset();
    }
}

/// Either the bare device or the adapter around it (when its BARs pass
/// the adapter's checks).
enum Holder {
    Bare(CfgDevice),
    Adapted(Box<PciAdapter<CfgDevice>>),
}

impl Holder {
    fn dev(&mut self) -> &mut CfgDevice {
        match self {
            Holder::Bare(d) => d,
            Holder::Adapted(a) => a.device(),
        }
    }
}

/// Builds the device; also returns the config region size the adapter
/// must report: 4 KiB exactly when the config space holds a PCI Express
/// capability (extended config space belongs to PCIe functions), whatever
/// size the device's own config space was made with.
fn build(r: &mut Reader) -> (Holder, MsixTable, Irqs, u64) {
    let head = r.u8();
    let mut config = PciConfiguration::new(PciConfigurationParams {
        vendor_id: 0x1af4,
        device_id: 0x1042,
        revision_id: 1,
        class_code: 1,
        subclass: 0,
        prog_if: 0,
        subsystem_vendor_id: 0x1af4,
        subsystem_id: 2,
        pcie: head & 1 != 0,
        interrupt_pin: (head >> 1) & 1,
    });
    let mut allocator = BarAllocator::default();
    let mut bars = Vec::new();
    for _ in 0..r.u8() % 8 {
        let idx = (r.u8() % 8) as usize;
        let size = 1u64.checked_shl(u32::from(r.u8() % 64)).unwrap_or(0);
        let region_type = match r.u8() % 3 {
            0 => PciBarRegionType::Memory32BitRegion,
            1 => PciBarRegionType::Memory64BitRegion,
            _ => PciBarRegionType::IoRegion,
        };
        let prefetchable = if r.u8() & 1 != 0 {
            PciBarPrefetchable::Prefetchable
        } else {
            PciBarPrefetchable::NotPrefetchable
        };
        let addr = allocator.allocate(size).unwrap_or(0);
        let bar = PciBarConfiguration::new(idx, size, region_type, prefetchable).set_address(addr);
        if config.add_pci_bar(&bar).is_ok() {
            bars.push(bar);
        } else if r.u8() & 1 != 0 {
            // Hand the adapter a BAR the config space refused.
            bars.push(bar);
        }
    }
    let mut msix_size = 0;
    let mut pcie_cap = false;
    for _ in 0..r.u8() % 8 {
        let res = match r.u8() % 5 {
            0 => {
                let size = r.u16();
                msix_size = size;
                let cap = MsixCap::new(size, r.u8().into(), r.u32(), r.u8().into(), r.u32());
                config.add_capability(&cap)
            }
            1 => config.add_capability(&MsiCap::new(r.u8().into(), r.u8() & 1 != 0)),
            2 => {
                let res = config.add_capability(&PciExpressCap::endpoint());
                pcie_cap |= res.is_ok();
                res
            }
            3 => config.add_capability(&PmCap::new()),
            _ => {
                let body = r.blob().to_vec();
                let mask = r.blob().to_vec();
                config.add_capability(&Vendor { body, mask })
            }
        };
        if let Ok(off) = res {
            assert!(
                (0x40..0x100).contains(&off) && off % 4 == 0,
                "cap at {off:#x}"
            );
        }
    }
    let table_size = match r.u16() {
        0 => msix_size,
        n => n,
    };
    let msix = MsixTable::new(table_size);
    let irqs = Irqs::default();
    irqs.configure(&IrqIndexInfo::pci_layout(true, 1, table_size.into()));
    let dev = CfgDevice { config, bars };
    let holder = if r.u8() & 1 != 0 {
        Holder::Bare(dev)
    } else {
        let keep = dev.config.clone();
        let bars = dev.bars.clone();
        match PciAdapter::new(dev) {
            Ok(a) => Holder::Adapted(Box::new(a)),
            Err(_) => Holder::Bare(CfgDevice { config: keep, bars }),
        }
    };
    (holder, msix, irqs, if pcie_cap { 4096 } else { 256 })
}

fn reg(r: &mut Reader, mode: u8) -> usize {
    if mode & MODE_NEAR_MAX != 0 {
        let shift = r.u8() % 4;
        (usize::MAX >> shift) - usize::from(r.u8())
    } else if mode & MODE_RAW_REG != 0 {
        r.u64() as usize
    } else {
        r.u8().into()
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut r = Reader::new(data);
    let (mut holder, mut msix, irqs, region_size) = build(&mut r);
    let size = holder.dev().config.size();
    assert!(size == 256 || size == 4096);
    let mut ops = 0;
    while !r.is_empty() && ops < MAX_OPS {
        ops += 1;
        match r.u8() % NUM_OPS {
            OP_WRITE => {
                let mode = r.u8();
                let reg_idx = reg(&mut r, mode);
                let offset = if mode & MODE_NEAR_MAX != 0 {
                    u64::MAX - u64::from(r.u8())
                } else if mode & MODE_RAW_OFFSET != 0 {
                    r.u64()
                } else {
                    u64::from(r.u8() % 8)
                };
                let len = if mode & MODE_RAW_LEN != 0 {
                    r.u8()
                } else {
                    r.u8() % 9
                } as usize;
                let mut data = r.bytes(len).to_vec();
                data.resize(len, 0);
                let c = &mut holder.dev().config;
                let before = c.read_reg(reg_idx);
                let in_range = reg_idx
                    .checked_mul(4)
                    .is_some_and(|o| o < c.size() as usize);
                c.write_config_register(reg_idx, offset, &data);
                let after = c.read_reg(reg_idx);
                if !in_range {
                    assert_eq!((before, after), (0, 0));
                }
                if data.is_empty() || offset >= 4 || offset as usize + data.len() > 4 {
                    assert_eq!(before, after, "ignored write changed reg {reg_idx}");
                }
            }
            OP_READ => {
                let mode = r.u8();
                let reg_idx = reg(&mut r, mode);
                let c = &holder.dev().config;
                let v = c.read_reg(reg_idx);
                if reg_idx
                    .checked_mul(4)
                    .is_none_or(|o| o >= c.size() as usize)
                {
                    assert_eq!(v, 0);
                }
            }
            OP_RESET => holder.dev().config.reset(),
            OP_STATE => {
                let c = &mut holder.dev().config;
                // (The JSON encoding of the state is left to the unit
                // tests: serde would dominate the run time here.)
                let state = c.state();
                c.set_state(&state).unwrap();
                assert_eq!(c.state(), state);
                // A tampered state must be refused or applied to the bits
                // the guest can write only; the write masks stay the
                // layout's own.
                let mut bad = state.clone();
                let which = r.u8();
                let at = r.u16() as usize;
                let v = r.u8();
                let field = match which % 3 {
                    0 => &mut bad.registers,
                    1 => &mut bad.writable_bits,
                    _ => &mut bad.w1c_bits,
                };
                match which / 3 % 3 {
                    0 if !field.is_empty() => {
                        let i = at % field.len();
                        field[i] = v;
                    }
                    1 => field.truncate(at),
                    _ => field.push(v),
                }
                let mut copy = c.clone();
                match copy.set_state(&bad) {
                    Ok(()) => {
                        let got = copy.state();
                        let want: Vec<u8> = state
                            .registers
                            .iter()
                            .zip(&bad.registers)
                            .zip(&state.writable_bits)
                            .map(|((&cur, &saved), &w)| (cur & !w) | (saved & w))
                            .collect();
                        assert_eq!(got.registers, want);
                        assert_eq!(got.writable_bits, state.writable_bits);
                        assert_eq!(got.w1c_bits, state.w1c_bits);
                    }
                    Err(_) => assert_eq!(copy.state(), state),
                }
            }
            op @ (OP_ADAPTER_READ | OP_ADAPTER_WRITE) => {
                let mode = r.u8();
                let offset = if mode & MODE_NEAR_MAX != 0 {
                    u64::MAX - u64::from(r.u8())
                } else if mode & MODE_RAW_OFFSET != 0 {
                    r.u64()
                } else {
                    r.u16().into()
                };
                let len = (r.u16() % 0x1100) as usize;
                let Holder::Adapted(a) = &mut holder else {
                    continue;
                };
                let region = a.region(PCI_CONFIG_REGION_INDEX);
                assert_eq!(region.size, region_size);
                if op == OP_ADAPTER_READ {
                    let mut buf = vec![0u8; len];
                    let res = a.region_read(PCI_CONFIG_REGION_INDEX, offset, &mut buf);
                    if offset.checked_add(len as u64).is_some() {
                        res.expect("config read");
                    }
                } else {
                    let mut data = r.bytes(len).to_vec();
                    data.resize(len, 0);
                    let _ = a.region_write(PCI_CONFIG_REGION_INDEX, offset, &data);
                }
            }
            OP_QUERY => {
                let c = &holder.dev().config;
                let _ = (
                    c.command(),
                    c.intx_disabled(),
                    c.msix_enabled(),
                    c.msix_function_masked(),
                    c.msi_enabled(),
                );
                if let Holder::Adapted(a) = &holder {
                    for i in 0..10 {
                        let _ = a.region(i);
                    }
                    assert_eq!(a.irq_layout().len(), 5);
                }
            }
            _ => msix_op(&mut r, &mut msix, &irqs),
        }
    }
}

fn msix_op(r: &mut Reader, msix: &mut MsixTable, irqs: &Irqs) {
    let sub = r.u8();
    let offset = r.u64();
    let len = (r.u8() % 12) as usize;
    let vector = r.u16();
    let mut buf = vec![0u8; len];
    match sub % 8 {
        0 => msix.read_table(offset, &mut buf),
        1 => {
            let mut data = r.bytes(len).to_vec();
            data.resize(len, 0);
            msix.write_table(offset, &data);
        }
        2 => msix.read_pba(offset, &mut buf, irqs),
        3 => msix.set_pending(vector, sub & 0x80 != 0),
        4 => {
            let _ = msix.vector_masked(vector);
        }
        5 => {
            let _ = irqs.trigger(PCI_MSIX_IRQ_INDEX, vector.into());
        }
        6 => msix.reset(),
        _ => {
            let mut s = msix.state();
            if let Some(w) = s.table.get_mut(vector as usize) {
                *w = offset as u32;
            }
            if let Some(q) = s.pba.last_mut() {
                *q = offset;
            }
            if sub & 0x80 != 0 {
                s.pba.push(offset);
            }
            let _ = msix.set_state(&s);
        }
    }
    assert!(msix.table_size_bytes() <= 2048 * 16);
}

/// Encodes a write op for the seed generator.
pub fn write_op(w: &mut Writer, reg_idx: u8, offset: u8, data: &[u8]) {
    w.u8(OP_WRITE)
        .u8(MODE_RAW_LEN)
        .u8(reg_idx)
        .u8(offset)
        .u8(data.len() as u8)
        .bytes(data);
}
