//! PCI devices: a Cloud-Hypervisor-shaped [`PciDevice`] trait, the PCI
//! function core devices embed ([`PciFunction`]: config space emulation
//! with [`PciConfiguration`], BARs, MSI-X with [`MsixTable`], MSI, INTx),
//! and the [`PciAdapter`] that serves any `PciDevice` over vfio-user.

mod adapter;
mod configuration;
mod function;
mod msix;

pub use adapter::PciAdapter;
pub use configuration::*;
pub use function::{InterruptMode, PciFunction, PciFunctionState};
pub use msix::*;

use thiserror::Error;

use crate::device::{Lifecycle, RegionMmap};

/// Errors of the PCI layer.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PciDeviceError {
    /// A BAR could not be allocated or registered.
    #[error("invalid BAR {0}")]
    InvalidBar(usize),
    /// No room for a capability.
    #[error("no room for capability of {0} bytes")]
    CapabilitySpace(usize),
    /// Bad capability.
    #[error("invalid capability")]
    InvalidCapability,
    /// The device has no [`PciFunction`] and declares no BARs of its own.
    #[error("the device has no PCI function and does not allocate BARs")]
    NoFunction,
}

/// Kind of address space a BAR lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PciBarRegionType {
    /// 32-bit memory BAR.
    Memory32BitRegion,
    /// 64-bit memory BAR (uses the next index too).
    Memory64BitRegion,
    /// I/O port BAR.
    IoRegion,
}

/// Prefetchable bit of a memory BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PciBarPrefetchable {
    /// Not prefetchable.
    NotPrefetchable,
    /// Prefetchable.
    Prefetchable,
}

/// One BAR as a device declares it (Cloud Hypervisor's shape).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciBarConfiguration {
    /// Address the device was given by [`BarAllocator`].
    pub addr: u64,
    /// Size; a power of two.
    pub size: u64,
    /// BAR index 0..=5.
    pub idx: usize,
    /// Address space.
    pub region_type: PciBarRegionType,
    /// Prefetchable bit.
    pub prefetchable: PciBarPrefetchable,
}

impl PciBarConfiguration {
    /// A BAR of `size` bytes at index `idx`.
    pub fn new(
        idx: usize,
        size: u64,
        region_type: PciBarRegionType,
        prefetchable: PciBarPrefetchable,
    ) -> Self {
        PciBarConfiguration {
            addr: 0,
            size,
            idx,
            region_type,
            prefetchable,
        }
    }

    /// Sets the address.
    pub fn set_address(mut self, addr: u64) -> Self {
        self.addr = addr;
        self
    }
}

/// Hands out the addresses devices use to tell their BARs apart in
/// [`PciDevice::read_bar`]/[`PciDevice::write_bar`]. The VMM owns the real
/// guest addresses; these are stable per-device keys aligned to the size.
#[derive(Debug)]
pub struct BarAllocator {
    next: u64,
}

impl Default for BarAllocator {
    fn default() -> Self {
        BarAllocator { next: 1 << 32 }
    }
}

impl BarAllocator {
    /// Allocates `size` bytes aligned to `size` (a power of two).
    pub fn allocate(&mut self, size: u64) -> Option<u64> {
        if size == 0 || !size.is_power_of_two() {
            return None;
        }
        let addr = self.next.checked_next_multiple_of(size)?;
        self.next = addr.checked_add(size)?;
        Some(addr)
    }
}

/// A PCI device in Cloud Hypervisor's shape, served by [`PciAdapter`].
///
/// The methods are those of Cloud Hypervisor's `pci::PciDevice`, minus
/// what a vfio-user server never uses: accesses are synchronous (the
/// server replies once the call returns), so there are no barriers for a
/// vCPU to wait on, and BARs never move (the VMM owns guest addresses).
///
/// A device normally embeds a [`PciFunction`] and returns it from
/// [`PciDevice::pci_function`]: then the configuration space, the BAR
/// allocation and the MSI-X table and PBA are the function's (the adapter
/// serves the MSI-X windows before the device sees an access), and the
/// device implements only its own BAR registers. A device with its own
/// configuration space (a port from Cloud Hypervisor) implements
/// `allocate_bars` and the configuration accesses instead. Either way the
/// adapter reads the interrupt layout (INTx pin, MSI and MSI-X
/// capabilities) and the configuration space size (PCI Express or not)
/// from the configuration space, as the kernel's vfio-pci does; everything
/// else the server tells the device goes through [`Lifecycle`].
pub trait PciDevice: Lifecycle {
    /// The PCI function core the device embeds, if it does.
    fn pci_function(&mut self) -> Option<&mut PciFunction> {
        None
    }

    /// Declares the BARs, taking their addresses from `allocator`; called
    /// once, by [`PciAdapter::new`]. By default, the function's BARs.
    fn allocate_bars(
        &mut self,
        allocator: &mut BarAllocator,
    ) -> Result<Vec<PciBarConfiguration>, PciDeviceError> {
        self.pci_function()
            .ok_or(PciDeviceError::NoFunction)?
            .allocate_bars(allocator)
    }

    /// Writes `data` at byte `offset` of the 32-bit config register
    /// `reg_idx`. By default, to the function's configuration space.
    fn write_config_register(&mut self, reg_idx: usize, offset: u64, data: &[u8]) {
        if let Some(f) = self.pci_function() {
            f.write_config_register(reg_idx, offset, data);
        }
    }

    /// Reads the 32-bit config register `reg_idx`. By default, from the
    /// function's configuration space.
    fn read_config_register(&mut self, reg_idx: usize) -> u32 {
        self.pci_function()
            .map_or(0, |f| f.read_config_register(reg_idx))
    }

    /// Reads from the BAR allocated at `base` (outside the MSI-X windows
    /// of the function, if it has one).
    fn read_bar(&mut self, base: u64, offset: u64, data: &mut [u8]);

    /// Writes to the BAR allocated at `base` (outside the MSI-X windows of
    /// the function, if it has one).
    fn write_bar(&mut self, base: u64, offset: u64, data: &[u8]);

    /// Shared-memory backing of BAR `idx`, offered to the client as sparse
    /// mmap areas.
    fn bar_mmap(&self, _idx: usize) -> Option<RegionMmap> {
        None
    }
}
