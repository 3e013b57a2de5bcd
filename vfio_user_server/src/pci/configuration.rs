//! PCI configuration space emulation, in the spirit of Cloud Hypervisor's
//! `pci::PciConfiguration`.
//!
//! The space is kept as bytes with a per-byte write mask and a per-byte
//! write-1-to-clear mask, so BAR sizing, read-only fields, RW1C status bits
//! and capability bodies all follow from the same write rule. A copy of the
//! power-on contents is kept for [`PciConfiguration::reset`].

use serde::{Deserialize, Serialize};

use super::{PciBarConfiguration, PciBarPrefetchable, PciBarRegionType, PciDeviceError};

const CONFIG_SPACE_SIZE: usize = 256;
const PCIE_CONFIG_SPACE_SIZE: usize = 4096;

const VENDOR_ID: usize = 0x00;
const DEVICE_ID: usize = 0x02;
const COMMAND: usize = 0x04;
const STATUS: usize = 0x06;
const REVISION_ID: usize = 0x08;
const CACHE_LINE_SIZE: usize = 0x0c;
const BAR0: usize = 0x10;
const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
const SUBSYSTEM_ID: usize = 0x2e;
const CAPABILITY_POINTER: usize = 0x34;
const INTERRUPT_LINE: usize = 0x3c;
const INTERRUPT_PIN: usize = 0x3d;

const NUM_BARS: usize = 6;
const CAPABILITY_START: usize = 0x40;
const CAPABILITY_END: usize = 0x100;

/// Command bits a guest may set: I/O space, memory space, bus master,
/// parity error response, SERR# enable, INTx disable.
const COMMAND_WRITABLE: u16 = 0x0547;
const COMMAND_INTX_DISABLE: u16 = 1 << 10;
const COMMAND_BUS_MASTER: u16 = 1 << 2;
const STATUS_CAPABILITY_LIST: u16 = 1 << 4;
/// Status bits cleared by writing 1: master data parity error, signaled
/// target abort, received target/master abort, signaled system error,
/// detected parity error.
const STATUS_RW1C: u16 = 0xf900;

const BAR_IO_SPACE: u32 = 0x1;
const BAR_MEM_64BIT: u32 = 0x4;
const BAR_MEM_PREFETCHABLE: u32 = 0x8;

const MSI_CONTROL_ENABLE: u16 = 1 << 0;
const MSIX_CONTROL_ENABLE: u16 = 1 << 15;
const MSIX_CONTROL_FUNCTION_MASK: u16 = 1 << 14;

/// Identifiers of the standard capabilities this crate builds.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PciCapabilityId {
    /// PCI power management.
    PowerManagement = 0x01,
    /// MSI.
    Msi = 0x05,
    /// Vendor specific.
    VendorSpecific = 0x09,
    /// PCI Express.
    PciExpress = 0x10,
    /// MSI-X.
    MsiX = 0x11,
}

/// A capability to place in the standard capability list.
pub trait PciCapability {
    /// The capability body, i.e. everything after the 2-byte id/next
    /// header.
    fn bytes(&self) -> &[u8];

    /// The capability id.
    fn id(&self) -> PciCapabilityId;

    /// Per-byte write mask for [`PciCapability::bytes`] (same length);
    /// by default the whole body is read-only.
    fn writable_bits(&self) -> Vec<u8> {
        vec![0; self.bytes().len()]
    }
}

/// Header fields of a type 0 function.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PciConfigurationParams {
    /// Vendor id.
    pub vendor_id: u16,
    /// Device id.
    pub device_id: u16,
    /// Revision id.
    pub revision_id: u8,
    /// Base class code.
    pub class_code: u8,
    /// Sub-class code.
    pub subclass: u8,
    /// Programming interface.
    pub prog_if: u8,
    /// Subsystem vendor id.
    pub subsystem_vendor_id: u16,
    /// Subsystem id.
    pub subsystem_id: u16,
    /// PCI Express function: 4096-byte config space instead of 256.
    pub pcie: bool,
    /// Interrupt pin: 1 = INTA#, 0 = none.
    pub interrupt_pin: u8,
}

/// Saved configuration space: registers and the masks needed to continue.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciConfigurationState {
    /// Register contents, one entry per byte.
    pub registers: Vec<u8>,
    /// Per-byte write masks.
    pub writable_bits: Vec<u8>,
    /// Per-byte write-1-to-clear masks.
    pub w1c_bits: Vec<u8>,
}

/// An emulated type 0 configuration space.
#[derive(Clone, Debug)]
pub struct PciConfiguration {
    registers: Vec<u8>,
    writable_bits: Vec<u8>,
    w1c_bits: Vec<u8>,
    power_on: Vec<u8>,
    bar_used: [bool; NUM_BARS],
    last_capability: Option<usize>,
    next_capability: usize,
    msi_cap: Option<usize>,
    msix_cap: Option<usize>,
    /// Where the PMCSR of the power management capability is.
    pmcsr: Option<usize>,
}

impl PciConfiguration {
    /// A configuration space with the header fields of `params`, no BARs
    /// and no capabilities.
    pub fn new(params: PciConfigurationParams) -> Self {
        let size = if params.pcie {
            PCIE_CONFIG_SPACE_SIZE
        } else {
            CONFIG_SPACE_SIZE
        };
        let mut c = PciConfiguration {
            registers: vec![0; size],
            writable_bits: vec![0; size],
            w1c_bits: vec![0; size],
            power_on: vec![0; size],
            bar_used: [false; NUM_BARS],
            last_capability: None,
            next_capability: CAPABILITY_START,
            msi_cap: None,
            msix_cap: None,
            pmcsr: None,
        };
        c.init(VENDOR_ID, &params.vendor_id.to_le_bytes());
        c.init(DEVICE_ID, &params.device_id.to_le_bytes());
        c.init(
            REVISION_ID,
            &[
                params.revision_id,
                params.prog_if,
                params.subclass,
                params.class_code,
            ],
        );
        c.init(
            SUBSYSTEM_VENDOR_ID,
            &params.subsystem_vendor_id.to_le_bytes(),
        );
        c.init(SUBSYSTEM_ID, &params.subsystem_id.to_le_bytes());
        c.init(INTERRUPT_PIN, &[params.interrupt_pin]);
        c.mask(COMMAND, &COMMAND_WRITABLE.to_le_bytes());
        c.w1c_bits[STATUS..STATUS + 2].copy_from_slice(&STATUS_RW1C.to_le_bytes());
        c.mask(CACHE_LINE_SIZE, &[0xff]);
        c.mask(INTERRUPT_LINE, &[0xff]);
        c
    }

    /// Sets power-on (and current) contents at `offset`.
    fn init(&mut self, offset: usize, bytes: &[u8]) {
        self.registers[offset..offset + bytes.len()].copy_from_slice(bytes);
        self.power_on[offset..offset + bytes.len()].copy_from_slice(bytes);
    }

    /// Sets write masks at `offset`.
    fn mask(&mut self, offset: usize, bytes: &[u8]) {
        self.writable_bits[offset..offset + bytes.len()].copy_from_slice(bytes);
    }

    fn read_u16(&self, offset: usize) -> u16 {
        match self.registers.get(offset..offset + 2) {
            Some(b) => u16::from_le_bytes([b[0], b[1]]),
            None => 0,
        }
    }

    /// Declares a BAR. Only the type bits and the size mask are recorded:
    /// `bar.addr` is the device's own key (see [`super::BarAllocator`]),
    /// not a guest address, so the register reads 0 until the guest
    /// programs it. A 64-bit BAR takes `idx` and `idx + 1`. Sizes must be
    /// powers of two, at least 4 (I/O) or 16 (memory) bytes, and at most
    /// 2 GiB for I/O and 32-bit memory BARs.
    pub fn add_pci_bar(&mut self, bar: &PciBarConfiguration) -> Result<(), PciDeviceError> {
        let idx = bar.idx;
        let size = bar.size;
        let prefetch = match bar.prefetchable {
            PciBarPrefetchable::Prefetchable => BAR_MEM_PREFETCHABLE,
            PciBarPrefetchable::NotPrefetchable => 0,
        };
        let (regs, min, max, type_bits, flag_mask) = match bar.region_type {
            PciBarRegionType::IoRegion => (1, 4, 1 << 31, BAR_IO_SPACE, 0x3),
            PciBarRegionType::Memory32BitRegion => (1, 16, 1 << 31, prefetch, 0xf),
            PciBarRegionType::Memory64BitRegion => (2, 16, 1 << 63, BAR_MEM_64BIT | prefetch, 0xf),
        };
        if idx + regs > NUM_BARS
            || !size.is_power_of_two()
            || size < min
            || size > max
            || self.bar_used[idx..idx + regs].iter().any(|u| *u)
        {
            return Err(PciDeviceError::InvalidBar(idx));
        }
        let size_mask = !(size - 1);
        let offset = BAR0 + idx * 4;
        self.init(offset, &type_bits.to_le_bytes());
        self.mask(offset, &((size_mask as u32) & !flag_mask).to_le_bytes());
        if regs == 2 {
            self.mask(offset + 4, &((size_mask >> 32) as u32).to_le_bytes());
        }
        self.bar_used[idx..idx + regs].fill(true);
        Ok(())
    }

    /// Appends `cap` to the capability list and returns its offset.
    /// Capabilities are dword aligned in 0x40..0x100; the status
    /// capability-list bit is set on the first one.
    pub fn add_capability(&mut self, cap: &dyn PciCapability) -> Result<usize, PciDeviceError> {
        let body = cap.bytes();
        let wmask = cap.writable_bits();
        if wmask.len() != body.len() {
            return Err(PciDeviceError::InvalidCapability);
        }
        let len = body.len() + 2;
        let offset = self.next_capability;
        if offset + len > CAPABILITY_END {
            return Err(PciDeviceError::CapabilitySpace(len));
        }
        let id = cap.id();
        self.init(offset, &[id as u8, 0]);
        self.init(offset + 2, body);
        self.mask(offset + 2, &wmask);
        // Both pointers fit in a byte: offsets are below 0x100.
        let link = self
            .last_capability
            .map_or(CAPABILITY_POINTER, |last| last + 1);
        self.init(link, &[offset as u8]);
        let status = self.read_u16(STATUS) | STATUS_CAPABILITY_LIST;
        self.init(STATUS, &status.to_le_bytes());
        match id {
            PciCapabilityId::Msi => self.msi_cap = Some(offset),
            PciCapabilityId::MsiX => self.msix_cap = Some(offset),
            PciCapabilityId::PowerManagement => self.pmcsr = Some(offset + 4),
            _ => {}
        }
        self.last_capability = Some(offset);
        self.next_capability = (offset + len).next_multiple_of(4);
        Ok(offset)
    }

    /// Reads the 32-bit register `reg_idx`; 0 when out of range.
    pub fn read_reg(&self, reg_idx: usize) -> u32 {
        let b = reg_idx
            .checked_mul(4)
            .and_then(|o| self.registers.get(o..o.checked_add(4)?));
        match b {
            Some(b) => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            None => 0,
        }
    }

    /// Writes `data` at byte `offset` of register `reg_idx`, through the
    /// per-byte write masks and RW1C bits. Writes that leave the register
    /// or the space are ignored.
    pub fn write_config_register(&mut self, reg_idx: usize, offset: u64, data: &[u8]) {
        let Ok(offset) = usize::try_from(offset) else {
            return;
        };
        if data.is_empty() || offset >= 4 || offset + data.len() > 4 {
            return;
        }
        let Some(start) = reg_idx
            .checked_mul(4)
            .filter(|o| o.checked_add(4).is_some_and(|e| e <= self.registers.len()))
            .map(|o| o + offset)
        else {
            return;
        };
        for (i, &v) in data.iter().enumerate() {
            let a = start + i;
            let mut w = self.writable_bits[a];
            if Some(a) == self.pmcsr && unsupported_power_state(v) {
                w &= !PMCSR_POWER_STATE;
            }
            let c = self.w1c_bits[a];
            self.registers[a] = ((self.registers[a] & !w) | (v & w)) & !(v & c);
        }
    }

    /// Size of the space: 256 or 4096.
    pub fn size(&self) -> u64 {
        self.registers.len() as u64
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.read_u16(COMMAND)
    }

    /// Whether the guest let the function master the bus (command bit 2):
    /// without it the device must not read or write guest memory.
    pub fn bus_master(&self) -> bool {
        self.command() & COMMAND_BUS_MASTER != 0
    }

    /// Whether the guest disabled INTx (command bit 10).
    pub fn intx_disabled(&self) -> bool {
        self.command() & COMMAND_INTX_DISABLE != 0
    }

    /// Whether the MSI-X enable bit is set (false without an MSI-X
    /// capability).
    pub fn msix_enabled(&self) -> bool {
        self.msix_control() & MSIX_CONTROL_ENABLE != 0
    }

    /// Whether the MSI-X function mask bit is set.
    pub fn msix_function_masked(&self) -> bool {
        self.msix_control() & MSIX_CONTROL_FUNCTION_MASK != 0
    }

    /// Whether the MSI enable bit is set (false without an MSI capability).
    pub fn msi_enabled(&self) -> bool {
        self.msi_cap
            .is_some_and(|o| self.read_u16(o + 2) & MSI_CONTROL_ENABLE != 0)
    }

    fn msix_control(&self) -> u16 {
        self.msix_cap.map_or(0, |o| self.read_u16(o + 2))
    }

    /// Restores the power-on register values; BARs and capabilities stay
    /// where they are.
    pub fn reset(&mut self) {
        self.registers.copy_from_slice(&self.power_on);
    }

    /// The state to save.
    pub fn state(&self) -> PciConfigurationState {
        PciConfigurationState {
            registers: self.registers.clone(),
            writable_bits: self.writable_bits.clone(),
            w1c_bits: self.w1c_bits.clone(),
        }
    }

    /// Restores a state saved from a configuration with the same layout.
    /// Fails with [`PciDeviceError::InvalidCapability`] if the sizes differ
    /// or the MSI/MSI-X capabilities are not where this layout has them.
    /// Only the bits the guest can write are taken from the state: which
    /// bits those are, and everything else (IDs, BAR types and sizes,
    /// capability headers and contents, the MSI-X table size), is this
    /// function's own layout, whatever the state says. (No device sets a
    /// write-1-to-clear bit, so those are the layout's too.)
    pub fn set_state(&mut self, state: &PciConfigurationState) -> Result<(), PciDeviceError> {
        let size = self.registers.len();
        if state.registers.len() != size
            || state.writable_bits.len() != size
            || state.w1c_bits.len() != size
        {
            return Err(PciDeviceError::InvalidCapability);
        }
        for (cap, id) in [
            (self.msi_cap, PciCapabilityId::Msi),
            (self.msix_cap, PciCapabilityId::MsiX),
        ] {
            if cap.is_some_and(|o| state.registers[o] != id as u8) {
                return Err(PciDeviceError::InvalidCapability);
            }
        }
        for ((reg, &saved), &writable) in self
            .registers
            .iter_mut()
            .zip(&state.registers)
            .zip(&self.writable_bits)
        {
            *reg = (*reg & !writable) | (saved & writable);
        }
        Ok(())
    }
}

/// MSI-X capability.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MsixCap {
    body: [u8; 10],
}

impl MsixCap {
    /// A capability for `table_size` vectors (clamped to 1..=2048) with the
    /// table at `table_offset` of BAR `table_bir` and the PBA at
    /// `pba_offset` of BAR `pba_bir`. Offsets must be 8-byte aligned (the
    /// low 3 bits carry the BIR); BIRs are taken modulo 8.
    pub fn new(
        table_size: u16,
        table_bir: u32,
        table_offset: u32,
        pba_bir: u32,
        pba_offset: u32,
    ) -> Self {
        let control = table_size.clamp(1, 2048) - 1;
        let table = (table_offset & !0x7) | (table_bir & 0x7);
        let pba = (pba_offset & !0x7) | (pba_bir & 0x7);
        let mut body = [0; 10];
        body[0..2].copy_from_slice(&control.to_le_bytes());
        body[2..6].copy_from_slice(&table.to_le_bytes());
        body[6..10].copy_from_slice(&pba.to_le_bytes());
        MsixCap { body }
    }
}

impl PciCapability for MsixCap {
    fn bytes(&self) -> &[u8] {
        &self.body
    }

    fn id(&self) -> PciCapabilityId {
        PciCapabilityId::MsiX
    }

    fn writable_bits(&self) -> Vec<u8> {
        let mut w = vec![0; self.body.len()];
        w[0..2].copy_from_slice(&(MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK).to_le_bytes());
        w
    }
}

/// MSI capability (no per-vector masking).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MsiCap {
    body: Vec<u8>,
    is_64bit: bool,
}

impl MsiCap {
    /// A capability offering `vectors` vectors (rounded up to a power of
    /// two in 1..=32), with a 64-bit message address if `is_64bit`.
    pub fn new(vectors: u32, is_64bit: bool) -> Self {
        let multiple_message_capable = vectors.clamp(1, 32).next_power_of_two().trailing_zeros();
        let control = ((multiple_message_capable as u16) << 1) | (u16::from(is_64bit) << 7);
        let len = if is_64bit { 12 } else { 8 };
        let mut body = vec![0; len];
        body[0..2].copy_from_slice(&control.to_le_bytes());
        MsiCap { body, is_64bit }
    }
}

impl PciCapability for MsiCap {
    fn bytes(&self) -> &[u8] {
        &self.body
    }

    fn id(&self) -> PciCapabilityId {
        PciCapabilityId::Msi
    }

    fn writable_bits(&self) -> Vec<u8> {
        // Enable and multiple message enable; address (dword aligned);
        // upper address; data.
        let mut w = vec![0x71, 0x00, 0xfc, 0xff, 0xff, 0xff];
        if self.is_64bit {
            w.extend_from_slice(&[0xff; 4]);
        }
        w.extend_from_slice(&[0xff, 0xff]);
        w
    }
}

/// PCI Express capability structure, version 2.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciExpressCap {
    body: [u8; PCIE_CAP_BODY_LEN],
}

/// The version 2 structure is 0x3c bytes including the 2-byte header.
const PCIE_CAP_BODY_LEN: usize = 0x3c - 2;
/// Device control: error reporting enables, relaxed ordering, max payload
/// size, aux power, no snoop, max read request size.
const PCIE_DEVCTL_WRITABLE: u16 = 0x7cff;

impl PciExpressCap {
    /// An endpoint: 128-byte max payload, role-based error reporting, no
    /// FLR, a 2.5 GT/s x1 link; device control is writable and defaults
    /// to relaxed ordering and no snoop enabled with 512-byte reads.
    pub fn endpoint() -> Self {
        let mut cap = PciExpressCap {
            body: [0; PCIE_CAP_BODY_LEN],
        };
        // PCIe capabilities: version 2, device/port type 0 (endpoint).
        cap.set(0x02, &0x0002u16.to_le_bytes());
        // Device capabilities: role-based error reporting.
        cap.set(0x04, &0x0000_8000u32.to_le_bytes());
        // Device control.
        cap.set(0x08, &0x2810u16.to_le_bytes());
        // Link capabilities: max speed 2.5 GT/s, max width x1.
        cap.set(0x0c, &0x0000_0011u32.to_le_bytes());
        // Link status: current speed 2.5 GT/s, negotiated width x1.
        cap.set(0x12, &0x0011u16.to_le_bytes());
        // Link capabilities 2: supported speeds 2.5 GT/s.
        cap.set(0x2c, &0x0000_0002u32.to_le_bytes());
        // Link control 2: target link speed 2.5 GT/s.
        cap.set(0x30, &0x0001u16.to_le_bytes());
        cap
    }

    /// Sets bytes at `offset` from the start of the capability.
    fn set(&mut self, offset: usize, bytes: &[u8]) {
        self.body[offset - 2..offset - 2 + bytes.len()].copy_from_slice(bytes);
    }
}

impl PciCapability for PciExpressCap {
    fn bytes(&self) -> &[u8] {
        &self.body
    }

    fn id(&self) -> PciCapabilityId {
        PciCapabilityId::PciExpress
    }

    fn writable_bits(&self) -> Vec<u8> {
        let mut w = vec![0; self.body.len()];
        w[0x08 - 2..0x0a - 2].copy_from_slice(&PCIE_DEVCTL_WRITABLE.to_le_bytes());
        w
    }
}

/// PCI power management capability (D0 and D3hot, no PME).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PmCap {
    body: [u8; 6],
}

impl PmCap {
    /// Version 3 (PCI PM 1.2) capability in D0 with No_Soft_Reset set.
    pub fn new() -> Self {
        // PMC: version 3; PMCSR: D0, No_Soft_Reset; BSE and data 0.
        PmCap {
            body: [0x03, 0x00, 0x08, 0x00, 0x00, 0x00],
        }
    }
}

impl Default for PmCap {
    fn default() -> Self {
        Self::new()
    }
}

impl PciCapability for PmCap {
    fn bytes(&self) -> &[u8] {
        &self.body
    }

    fn id(&self) -> PciCapabilityId {
        PciCapabilityId::PowerManagement
    }

    fn writable_bits(&self) -> Vec<u8> {
        // PMCSR power state.
        vec![0x00, 0x00, 0x03, 0x00, 0x00, 0x00]
    }
}

/// The PMCSR power state bits (PM capability offset 4).
const PMCSR_POWER_STATE: u8 = 0x03;

/// Whether a write of `value` to the PM capability's PMCSR asks for D1 or
/// D2, which [`PmCap`] does not advertise: such a write completes, but the
/// state stays as it was (PCI PM 1.2, 3.2.4).
fn unsupported_power_state(value: u8) -> bool {
    matches!(value & PMCSR_POWER_STATE, 1 | 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pcie: bool) -> PciConfigurationParams {
        PciConfigurationParams {
            vendor_id: 0x1af4,
            device_id: 0x1042,
            revision_id: 1,
            class_code: 0x01,
            subclass: 0x08,
            prog_if: 0x02,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x0002,
            pcie,
            interrupt_pin: 1,
        }
    }

    fn bar(idx: usize, size: u64, t: PciBarRegionType, p: bool) -> PciBarConfiguration {
        let p = if p {
            PciBarPrefetchable::Prefetchable
        } else {
            PciBarPrefetchable::NotPrefetchable
        };
        PciBarConfiguration::new(idx, size, t, p)
    }

    fn write32(c: &mut PciConfiguration, reg: usize, v: u32) {
        c.write_config_register(reg, 0, &v.to_le_bytes());
    }

    #[test]
    fn header_fields() {
        let c = PciConfiguration::new(params(false));
        assert_eq!(c.size(), 256);
        assert_eq!(c.read_reg(0), 0x1042_1af4);
        assert_eq!(c.read_reg(2), 0x0108_0201);
        assert_eq!(c.read_reg(3), 0);
        assert_eq!(c.read_reg(11), 0x0002_1af4);
        assert_eq!(c.read_reg(15), 0x0000_0100);
        assert_eq!(c.read_reg(64), 0);
        assert_eq!(c.read_reg(usize::MAX), 0);
        assert_eq!(PciConfiguration::new(params(true)).size(), 4096);
    }

    #[test]
    fn masks_and_rw1c() {
        let mut c = PciConfiguration::new(params(false));
        write32(&mut c, 0, 0xffff_ffff);
        assert_eq!(c.read_reg(0), 0x1042_1af4);
        write32(&mut c, 1, 0xffff_ffff);
        assert_eq!(c.command(), COMMAND_WRITABLE);
        assert!(c.intx_disabled());
        c.write_config_register(1, 0, &[0x02]);
        assert_eq!(c.command(), 0x0502);
        // RW1C: set a status bit behind the guest's back, then clear it.
        c.registers[STATUS + 1] = 0x20;
        c.write_config_register(1, 2, &[0x00, 0x00]);
        assert_eq!(c.read_reg(1) >> 16, 0x2000);
        c.write_config_register(1, 2, &[0x00, 0x20]);
        assert_eq!(c.read_reg(1) >> 16, 0);
        // Interrupt line writable, pin read-only.
        write32(&mut c, 15, 0xffff_ffff);
        assert_eq!(c.read_reg(15), 0x0000_01ff);
    }

    #[test]
    fn bad_writes_ignored() {
        let mut c = PciConfiguration::new(params(false));
        let before = c.state();
        c.write_config_register(15, 3, &[1, 2]);
        c.write_config_register(15, 4, &[1]);
        c.write_config_register(15, u64::MAX, &[1]);
        c.write_config_register(15, 0, &[1, 2, 3, 4, 5]);
        c.write_config_register(15, 0, &[]);
        c.write_config_register(64, 0, &[1, 2, 3, 4]);
        c.write_config_register(usize::MAX, 0, &[1]);
        // The last register index whose byte offset still fits a usize:
        // offset + 4 overflows (see fuzz/regressions/pci_config).
        c.write_config_register(usize::MAX / 4, 0, &[1]);
        assert_eq!(c.state(), before);
        // Three bytes within a register are fine.
        c.write_config_register(15, 0, &[0x0b, 0xff, 0xff]);
        assert_eq!(c.read_reg(15), 0x0000_010b);
    }

    #[test]
    fn bar_sizing() {
        let mut c = PciConfiguration::new(params(false));
        c.add_pci_bar(&bar(0, 0x1000, PciBarRegionType::Memory32BitRegion, false))
            .unwrap();
        c.add_pci_bar(&bar(2, 1 << 33, PciBarRegionType::Memory64BitRegion, true))
            .unwrap();
        c.add_pci_bar(&bar(4, 0x100, PciBarRegionType::IoRegion, false))
            .unwrap();
        assert_eq!(c.read_reg(4), 0);
        assert_eq!(c.read_reg(6), 0xc);
        assert_eq!(c.read_reg(8), 0x1);
        for reg in 4..10 {
            write32(&mut c, reg, 0xffff_ffff);
        }
        assert_eq!(c.read_reg(4), 0xffff_f000);
        assert_eq!(c.read_reg(5), 0);
        assert_eq!(c.read_reg(6), 0x0000_000c);
        assert_eq!(c.read_reg(7), 0xffff_fffe);
        assert_eq!(c.read_reg(8), 0xffff_ff01);
        assert_eq!(c.read_reg(9), 0);
        // ROM BAR.
        write32(&mut c, 12, 0xffff_ffff);
        assert_eq!(c.read_reg(12), 0);
        // Programming an address keeps the type bits.
        write32(&mut c, 4, 0xfe00_0000);
        assert_eq!(c.read_reg(4), 0xfe00_0000);
        write32(&mut c, 6, 0x8000_0000);
        assert_eq!(c.read_reg(6), 0x0000_000c);
    }

    #[test]
    fn bar_validation() {
        let mut c = PciConfiguration::new(params(false));
        let m32 = PciBarRegionType::Memory32BitRegion;
        let m64 = PciBarRegionType::Memory64BitRegion;
        let io = PciBarRegionType::IoRegion;
        for b in [
            bar(6, 0x1000, m32, false),
            bar(5, 0x1000, m64, false),
            bar(0, 0x1800, m32, false),
            bar(0, 8, m32, false),
            bar(0, 2, io, false),
            bar(0, 0, io, false),
            bar(0, 1 << 32, m32, false),
        ] {
            assert_eq!(c.add_pci_bar(&b), Err(PciDeviceError::InvalidBar(b.idx)));
        }
        c.add_pci_bar(&bar(0, 0x10, m64, false)).unwrap();
        c.add_pci_bar(&bar(4, 4, io, false)).unwrap();
        assert!(c.add_pci_bar(&bar(1, 0x10, m32, false)).is_err());
        assert!(c.add_pci_bar(&bar(3, 0x10, m64, false)).is_err());
        c.add_pci_bar(&bar(2, 0x10, m32, false)).unwrap();
    }

    #[test]
    fn capabilities() {
        let mut c = PciConfiguration::new(params(true));
        assert_eq!(c.read_reg(1) & (1 << 20), 0);
        let msix = c.add_capability(&MsixCap::new(8, 2, 0, 2, 0x1000)).unwrap();
        let msi = c.add_capability(&MsiCap::new(3, true)).unwrap();
        let pcie = c.add_capability(&PciExpressCap::endpoint()).unwrap();
        let pm = c.add_capability(&PmCap::new()).unwrap();
        assert_eq!((msix, msi, pcie, pm), (0x40, 0x4c, 0x5c, 0x98));
        assert_ne!(c.read_reg(1) & (1 << 20), 0);
        // Walk the list.
        let mut ids = Vec::new();
        let mut p = (c.read_reg(13) & 0xfc) as usize;
        while p != 0 {
            let h = c.read_reg(p / 4);
            ids.push(h & 0xff);
            p = ((h >> 8) & 0xfc) as usize;
        }
        assert_eq!(ids, [0x11, 0x05, 0x10, 0x01]);
        // MSI-X body.
        assert_eq!(c.read_reg(msix / 4), 0x0007_4c11);
        assert_eq!(c.read_reg(msix / 4 + 1), 2);
        assert_eq!(c.read_reg(msix / 4 + 2), 0x1002);
        // MSI-X control: only enable and function mask are writable.
        c.write_config_register(msix / 4, 2, &[0xff, 0xff]);
        assert_eq!(c.read_reg(msix / 4) >> 16, 0xc007);
        assert!(c.msix_enabled() && c.msix_function_masked());
        c.write_config_register(msix / 4, 3, &[0x80]);
        assert!(c.msix_enabled() && !c.msix_function_masked());
        // MSI: 4 vectors capable, 64-bit.
        assert_eq!(c.read_reg(msi / 4) >> 16, 0x0084);
        assert!(!c.msi_enabled());
        c.write_config_register(msi / 4, 2, &[0x21]);
        assert!(c.msi_enabled());
        write32(&mut c, msi / 4 + 1, 0xffff_ffff);
        assert_eq!(c.read_reg(msi / 4 + 1), 0xffff_fffc);
        write32(&mut c, msi / 4 + 3, 0xffff_ffff);
        assert_eq!(c.read_reg(msi / 4 + 3), 0x0000_ffff);
        // PCIe: version 2 endpoint, devctl writable, devcap read-only.
        assert_eq!(c.read_reg(pcie / 4), 0x0002_0010 | ((pm as u32) << 8));
        write32(&mut c, pcie / 4 + 1, 0);
        assert_eq!(c.read_reg(pcie / 4 + 1), 0x8000);
        write32(&mut c, pcie / 4 + 2, 0xffff_ffff);
        assert_eq!(c.read_reg(pcie / 4 + 2), 0x7cff);
        // PM: power state writable, D3hot and back to D0; D1 and D2, not
        // advertised, leave it as it is.
        write32(&mut c, pm / 4 + 1, 0xffff_ffff);
        assert_eq!(c.read_reg(pm / 4 + 1), 0x000b);
        for unsupported in [1, 2] {
            write32(&mut c, pm / 4 + 1, unsupported);
            assert_eq!(c.read_reg(pm / 4 + 1), 0x000b);
        }
        c.write_config_register(pm / 4 + 1, 0, &[0]);
        assert_eq!(c.read_reg(pm / 4 + 1), 0x0008);
        c.write_config_register(pm / 4 + 1, 0, &[2]);
        assert_eq!(c.read_reg(pm / 4 + 1), 0x0008);
        write32(&mut c, pm / 4 + 1, 3);
        // Reset restores power-on values, keeps the layout.
        c.reset();
        assert!(!c.msix_enabled() && !c.msi_enabled());
        assert_eq!(c.read_reg(pm / 4 + 1), 0x0008);
        assert_eq!(c.read_reg(13), 0x40);
    }

    #[test]
    fn capability_space() {
        let mut c = PciConfiguration::new(params(false));
        for _ in 0..3 {
            c.add_capability(&PciExpressCap::endpoint()).unwrap();
        }
        // 0x40 + 3 * 0x3c = 0xf4: 12 bytes left.
        assert_eq!(
            c.add_capability(&MsiCap::new(1, true)),
            Err(PciDeviceError::CapabilitySpace(14))
        );
        assert_eq!(c.add_capability(&MsixCap::new(1, 0, 0, 0, 0)), Ok(0xf4));
        struct Bad;
        impl PciCapability for Bad {
            fn bytes(&self) -> &[u8] {
                &[1, 2]
            }
            fn id(&self) -> PciCapabilityId {
                PciCapabilityId::VendorSpecific
            }
            fn writable_bits(&self) -> Vec<u8> {
                vec![0]
            }
        }
        let mut c = PciConfiguration::new(params(false));
        assert_eq!(
            c.add_capability(&Bad),
            Err(PciDeviceError::InvalidCapability)
        );
    }

    #[test]
    fn state_roundtrip() {
        let mut c = PciConfiguration::new(params(false));
        c.add_pci_bar(&bar(0, 0x1000, PciBarRegionType::Memory32BitRegion, false))
            .unwrap();
        let msix = c.add_capability(&MsixCap::new(8, 0, 0, 0, 0x800)).unwrap();
        c.write_config_register(msix / 4, 3, &[0x80]);
        write32(&mut c, 4, 0xfe00_0000);
        let json = serde_json::to_string(&c.state()).unwrap();
        let state: PciConfigurationState = serde_json::from_str(&json).unwrap();

        let mut d = PciConfiguration::new(params(false));
        d.add_pci_bar(&bar(0, 0x1000, PciBarRegionType::Memory32BitRegion, false))
            .unwrap();
        d.add_capability(&MsixCap::new(8, 0, 0, 0, 0x800)).unwrap();
        d.set_state(&state).unwrap();
        assert!(d.msix_enabled());
        assert_eq!(d.read_reg(4), 0xfe00_0000);
        write32(&mut d, 4, 0xffff_ffff);
        assert_eq!(d.read_reg(4), 0xffff_f000);

        let mut short = state.clone();
        short.registers.pop();
        assert!(d.set_state(&short).is_err());
        let mut big = PciConfiguration::new(params(true));
        assert!(big.set_state(&state).is_err());
        let mut moved = state.clone();
        moved.registers[msix] = 0x05;
        assert!(d.set_state(&moved).is_err());

        // Which bits the guest may write stays this layout's, whatever a
        // state says: the IDs and the BAR's size stay read-only.
        let mut open = state.clone();
        open.writable_bits.fill(0xff);
        open.w1c_bits.fill(0);
        d.set_state(&open).unwrap();
        let id = d.read_reg(0);
        write32(&mut d, 0, 0x1234_5678);
        write32(&mut d, 4, 0xffff_ffff);
        assert_eq!((d.read_reg(0), d.read_reg(4)), (id, 0xffff_f000));

        // Nor can a state set read-only bits: IDs, the BAR's type and size
        // bits, the MSI-X table size, the capability pointer. The guest's
        // own bits (the BAR address, MSI-X enable) are restored.
        let mut forged = state.clone();
        forged.registers[0] = 0x34;
        forged.registers[0x10] = 0x01;
        forged.registers[0x11] = 0x0f;
        forged.registers[msix + 2] = 0xff;
        forged.registers[0x34] = 0;
        d.set_state(&forged).unwrap();
        assert_eq!(d.read_reg(0), id);
        assert_eq!(d.read_reg(4), 0xfe00_0000);
        assert_eq!(d.read_reg(msix / 4) >> 16, 0x8000 | 7, "enabled, 8 vectors");
        assert_eq!(d.read_reg(0x34 / 4) & 0xff, msix as u32);
    }
}
