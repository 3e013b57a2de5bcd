//! Runs a device written for the published rust-vmm `vfio_user` crate's
//! [`vfio_user::ServerBackend`] trait on this server, unchanged.

use std::fs::File;

use vfio_user::{DmaMapFlags, DmaUnmapFlags, IrqInfo, ServerBackend, ServerRegion};

use crate::device::{Device, DeviceError, Lifecycle, RegionDescription, RegionMmap, ResetReason};
use crate::irq::IrqIndexInfo;
use crate::vm_migration::{
    Migratable, MigratableError, Pausable, Snapshot, Snapshottable, Transportable,
};
use crate::wire::{IrqSet, REGION_INFO_FLAG_MMAP, REGION_INFO_FLAG_READ, REGION_INFO_FLAG_WRITE};

/// A `vfio_user::ServerBackend` with the region and IRQ tables that
/// `vfio_user::Server::new` takes.
pub struct RustVmmBackend<B: ServerBackend + Send> {
    backend: B,
    resettable: bool,
    irqs: Vec<IrqInfo>,
    regions: Vec<ServerRegion>,
}

impl<B: ServerBackend + Send> RustVmmBackend<B> {
    /// Wraps `backend` with the same arguments as `vfio_user::Server::new`.
    pub fn new(
        backend: B,
        resettable: bool,
        irqs: Vec<IrqInfo>,
        regions: Vec<ServerRegion>,
    ) -> Self {
        RustVmmBackend {
            backend,
            resettable,
            irqs,
            regions,
        }
    }

    /// The wrapped backend.
    pub fn backend(&mut self) -> &mut B {
        &mut self.backend
    }
}

fn io_err(e: std::io::Error) -> DeviceError {
    DeviceError::Errno(e.raw_os_error().unwrap_or(libc::EIO))
}

impl<B: ServerBackend + Send> Device for RustVmmBackend<B> {
    fn resettable(&self) -> bool {
        self.resettable
    }

    fn num_regions(&self) -> u32 {
        self.regions.len() as u32
    }

    fn region(&self, index: u32) -> RegionDescription {
        let Some(r) = self.regions.get(index as usize) else {
            return RegionDescription::default();
        };
        let info = &r.region_info;
        let mmap = match r.mmap_fd {
            Some(fd) if info.flags & REGION_INFO_FLAG_MMAP != 0 => Some(RegionMmap {
                fd,
                offset: info.offset,
                areas: r
                    .sparse_areas
                    .iter()
                    .map(|a| (a.area.offset, a.area.size))
                    .collect(),
            }),
            _ => None,
        };
        RegionDescription {
            size: info.size,
            read: info.flags & REGION_INFO_FLAG_READ != 0,
            write: info.flags & REGION_INFO_FLAG_WRITE != 0,
            mmap,
        }
    }

    fn irq_layout(&self) -> Vec<IrqIndexInfo> {
        self.irqs
            .iter()
            .map(|i| IrqIndexInfo {
                flags: i.flags,
                count: i.count,
            })
            .collect()
    }

    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        self.backend
            .region_read(index, offset, data)
            .map_err(io_err)
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.backend
            .region_write(index, offset, data)
            .map_err(io_err)
    }

    fn observes_raw_requests(&self) -> bool {
        true
    }

    fn dma_mapped(
        &mut self,
        flags: u32,
        offset: u64,
        address: u64,
        size: u64,
        file: Option<File>,
    ) -> Result<(), DeviceError> {
        let flags = DmaMapFlags::from_bits_truncate(flags);
        self.backend
            .dma_map(flags, offset, address, size, file)
            .map_err(io_err)
    }

    fn irqs_set(&mut self, set: &IrqSet, fds: Vec<File>) -> Result<(), DeviceError> {
        self.backend
            .set_irqs(set.index, set.flags, set.start, set.count, fds)
            .map_err(io_err)
    }
}

/// The trait has no pause or snapshot: the device cannot be paused, and
/// the server never offers migration for it.
impl<B: ServerBackend + Send> Pausable for RustVmmBackend<B> {
    fn pause(&mut self) -> Result<(), MigratableError> {
        Err(MigratableError::Unsupported)
    }

    fn resume(&mut self) -> Result<(), MigratableError> {
        Err(MigratableError::Unsupported)
    }
}

impl<B: ServerBackend + Send> Snapshottable for RustVmmBackend<B> {
    fn snapshot(&mut self) -> Result<Snapshot, MigratableError> {
        Err(MigratableError::Unsupported)
    }
}

impl<B: ServerBackend + Send> Transportable for RustVmmBackend<B> {}

impl<B: ServerBackend + Send> Migratable for RustVmmBackend<B> {}

impl<B: ServerBackend + Send> Lifecycle for RustVmmBackend<B> {
    fn reset(&mut self, reason: ResetReason) {
        if let Err(e) = self.backend.reset() {
            log::warn!("backend reset ({reason:?}) failed: {e}");
        }
    }

    fn dma_unmapping(&mut self, address: u64, size: u64) {
        if let Err(e) = self
            .backend
            .dma_unmap(DmaUnmapFlags::empty(), address, size)
        {
            log::warn!("backend dma_unmap failed: {e}");
        }
    }
}
