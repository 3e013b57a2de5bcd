//! PCI devices: a Cloud-Hypervisor-shaped [`PciDevice`] trait, config space
//! emulation ([`PciConfiguration`]) and the [`PciAdapter`] that serves any
//! `PciDevice` over vfio-user.

mod adapter;
mod configuration;
mod msix;

pub use adapter::PciAdapter;
pub use configuration::*;
pub use msix::*;

use std::any::Any;
use std::os::fd::RawFd;
use std::sync::{Arc, Barrier};

use thiserror::Error;

use crate::device::{RegionMmap, ResetReason};
use crate::vm_migration::{MigratableError, Snapshot};

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

/// A PCI device in Cloud Hypervisor's shape, plus the hooks a vfio-user
/// server needs (reset, shared-memory BARs, event fds, migration).
pub trait PciDevice: Send {
    /// Declares the BARs, taking their addresses from `allocator`.
    fn allocate_bars(
        &mut self,
        allocator: &mut BarAllocator,
    ) -> Result<Vec<PciBarConfiguration>, PciDeviceError>;

    /// Writes `data` at byte `offset` of the 32-bit config register
    /// `reg_idx`.
    fn write_config_register(
        &mut self,
        reg_idx: usize,
        offset: u64,
        data: &[u8],
    ) -> Option<Arc<Barrier>>;

    /// Reads the 32-bit config register `reg_idx`.
    fn read_config_register(&mut self, reg_idx: usize) -> u32;

    /// Reads from the BAR allocated at `base`.
    fn read_bar(&mut self, base: u64, offset: u64, data: &mut [u8]);

    /// Writes to the BAR allocated at `base`.
    fn write_bar(&mut self, base: u64, offset: u64, data: &[u8]) -> Option<Arc<Barrier>>;

    /// Relocation notice (kept for Cloud Hypervisor compatibility).
    fn move_bar(&mut self, _old_base: u64, _new_base: u64) -> Result<(), std::io::Error> {
        Ok(())
    }

    /// For downcasting.
    fn as_any_mut(&mut self) -> &mut dyn Any;

    /// Device id for logs and snapshots.
    fn id(&self) -> Option<String> {
        None
    }

    /// Size of the config space: 256 (conventional) or 4096 (PCIe).
    fn config_space_size(&self) -> u64 {
        256
    }

    /// Resets the device to power-on state.
    fn reset(&mut self, _reason: ResetReason) {}

    /// Shared-memory backing of BAR `idx`, offered to the client as sparse
    /// mmap areas.
    fn bar_mmap(&self, _idx: usize) -> Option<RegionMmap> {
        None
    }

    /// Number of MSI-X vectors (0: none).
    fn msix_vectors(&self) -> u32 {
        0
    }

    /// Number of MSI vectors (0: none).
    fn msi_vectors(&self) -> u32 {
        0
    }

    /// Whether the device has an INTx pin.
    fn has_intx(&self) -> bool {
        true
    }

    /// Called before a DMA range disappears.
    fn dma_unmapping(&mut self, _address: u64, _size: u64) {}

    /// SET_IRQS mask/unmask notification.
    fn irq_mask_changed(&mut self, _index: u32, _start: u32, _count: u32, _masked: bool) {}

    /// fds for the event loop to watch.
    fn event_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }

    /// `fd` is readable.
    fn handle_event(&mut self, _fd: RawFd) {}

    /// Work deferred by a BAR access, run after the reply went out (see
    /// [`crate::Device::run_deferred`]); returns whether work is left.
    fn run_deferred(&mut self) -> bool {
        false
    }

    /// Kind of device recorded in snapshots (e.g. `"virtio-blk"`).
    fn snapshot_kind(&self) -> String {
        String::from("pci-device")
    }

    /// Whether the migration hooks below are implemented.
    fn migratable(&self) -> bool {
        false
    }

    /// Stops device activity, draining in-flight requests.
    fn pause(&mut self) -> Result<(), MigratableError> {
        Err(MigratableError::Unsupported)
    }

    /// Resumes device activity.
    fn resume(&mut self) -> Result<(), MigratableError> {
        Err(MigratableError::Unsupported)
    }

    /// Device-model state (config space is saved by the adapter).
    fn snapshot(&mut self) -> Result<Snapshot, MigratableError> {
        Err(MigratableError::Unsupported)
    }

    /// Restores device-model state.
    fn restore(&mut self, _snapshot: &Snapshot) -> Result<(), MigratableError> {
        Err(MigratableError::Unsupported)
    }
}
