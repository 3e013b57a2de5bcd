//! The interface between the protocol server and a device model.
//!
//! The server validates every message, keeps the DMA table and the
//! interrupt eventfds itself, and calls a [`Device`] only with requests
//! that are already in range. PCI devices normally implement
//! [`crate::pci::PciDevice`] and are wrapped by [`crate::pci::PciAdapter`],
//! which implements this trait.

use std::os::fd::RawFd;

use thiserror::Error;

use crate::guest_memory::GuestMemoryHandle;
use crate::irq::{IrqIndexInfo, Irqs};
use crate::vm_migration::{MigratableError, Snapshot};
use crate::message_dma::MessageDma;

/// Errors a device returns for one access.
#[derive(Debug, Error)]
pub enum DeviceError {
    /// The access is not valid for this region or offset.
    #[error("invalid access")]
    InvalidAccess,
    /// The device failed; the errno is sent to the client.
    #[error("device error: errno {0}")]
    Errno(i32),
    /// Migration state error.
    #[error(transparent)]
    Migration(#[from] MigratableError),
}

impl DeviceError {
    /// The errno to reply with.
    pub fn errno(&self) -> i32 {
        match self {
            DeviceError::InvalidAccess | DeviceError::Migration(_) => libc::EINVAL,
            DeviceError::Errno(e) => *e,
        }
    }
}

/// How a region may be mapped by the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionMmap {
    /// fd to send with the region info (borrowed; the device keeps it open).
    pub fd: RawFd,
    /// Offset of the region in `fd`.
    pub offset: u64,
    /// Mappable windows `(offset, size)` within the region; the rest traps.
    pub areas: Vec<(u64, u64)>,
}

/// One region as the device describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegionDescription {
    /// Size in bytes; 0 means absent.
    pub size: u64,
    /// Readable.
    pub read: bool,
    /// Writable.
    pub write: bool,
    /// Shared-memory backing, if any.
    pub mmap: Option<RegionMmap>,
}

/// Why the device is being reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetReason {
    /// DEVICE_RESET from the client.
    Command,
    /// The client disconnected.
    LostConnection,
}

/// Handles the server gives a device when it is created.
#[derive(Clone)]
pub struct DeviceContext {
    /// Guest memory, updated on DMA_MAP/UNMAP.
    pub memory: GuestMemoryHandle,
    /// Interrupts, configured from [`Device::irq_layout`].
    pub irqs: Irqs,
    /// DMA by message for guest memory mapped without an fd.
    pub message_dma: MessageDma,
}

impl Default for DeviceContext {
    fn default() -> Self {
        DeviceContext {
            memory: GuestMemoryHandle::new(crate::guest_memory::GuestMemory::new()),
            irqs: Irqs::default(),
            message_dma: MessageDma::default(),
        }
    }
}

/// A device served over vfio-user.
///
/// Every method is called from the event loop thread with a request the
/// server already validated against [`Device::region`] (index exists, the
/// access lies within the region and is at most `max_data_xfer_size`).
pub trait Device: Send {
    /// Whether DEVICE_RESET is advertised (`VFIO_DEVICE_FLAGS_RESET`).
    fn resettable(&self) -> bool {
        true
    }

    /// Number of regions reported by DEVICE_GET_INFO.
    fn num_regions(&self) -> u32 {
        crate::wire::PCI_NUM_REGIONS
    }

    /// Describes region `index` (`index < num_regions`).
    fn region(&self, index: u32) -> RegionDescription;

    /// The IRQ indices and their vector counts.
    fn irq_layout(&self) -> Vec<IrqIndexInfo>;

    /// Reads `data.len()` bytes at `offset` of region `index`.
    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), DeviceError>;

    /// Writes `data` at `offset` of region `index`.
    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError>;

    /// Resets the device to its power-on state.
    fn reset(&mut self, reason: ResetReason);

    /// Called before a DMA range is unmapped: stop using it.
    fn dma_unmapping(&mut self, _address: u64, _size: u64) {}

    /// Whether [`Device::dma_mapped`] and [`Device::irqs_set`] want the
    /// raw requests (devices that keep their own tables, such as
    /// `vfio_user::ServerBackend` implementations).
    fn observes_raw_requests(&self) -> bool {
        false
    }

    /// A DMA map succeeded; `file` is a duplicate of the client's fd.
    fn dma_mapped(
        &mut self,
        _flags: u32,
        _offset: u64,
        _address: u64,
        _size: u64,
        _file: Option<std::fs::File>,
    ) {
    }

    /// A SET_IRQS succeeded; `fds` are duplicates of the client's fds.
    fn irqs_set(&mut self, _set: &crate::wire::IrqSet, _fds: Vec<std::fs::File>) {}

    /// Called after a SET_IRQS mask or unmask of `[start, start+count)`.
    fn irq_mask_changed(&mut self, _index: u32, _start: u32, _count: u32, _masked: bool) {}

    /// A request queued on [`DeviceContext::message_dma`] finished: the
    /// data of a read (empty for a write), or an errno.
    fn message_dma_done(&mut self, _id: u64, _result: Result<Vec<u8>, i32>) {}

    /// fds the device wants the event loop to watch (queue kicks, timers,
    /// back-end completions); readiness calls [`Device::handle_event`].
    fn event_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }

    /// `fd` from [`Device::event_fds`] is readable.
    fn handle_event(&mut self, _fd: RawFd) {}

    /// Does work an access deferred, such as the queue processing a
    /// doorbell write asked for: the server calls it after it has sent its
    /// replies, so the client is not held up by the work. Returns whether
    /// work is left; the event loop then calls again soon, without
    /// sleeping, after serving its other fds. Each call should do a
    /// bounded amount of work.
    fn run_deferred(&mut self) -> bool {
        false
    }

    /// Stops all device activity (no DMA, no interrupts) until
    /// [`Device::resume`]; in-flight requests are completed first.
    fn pause(&mut self) -> Result<(), MigratableError> {
        Err(MigratableError::Unsupported)
    }

    /// Resumes after [`Device::pause`].
    fn resume(&mut self) -> Result<(), MigratableError> {
        Err(MigratableError::Unsupported)
    }

    /// Captures the device state (the device is paused).
    fn snapshot(&mut self) -> Result<Snapshot, MigratableError> {
        Err(MigratableError::Unsupported)
    }

    /// Replaces the device state with `snapshot` (the device is paused).
    fn restore(&mut self, _snapshot: &Snapshot) -> Result<(), MigratableError> {
        Err(MigratableError::Unsupported)
    }

    /// Whether pause/snapshot/restore are implemented (advertises the
    /// migration feature).
    fn migratable(&self) -> bool {
        false
    }

    /// The kind of device recorded in snapshots; a snapshot is only
    /// restored into a device of the same kind.
    fn snapshot_kind(&self) -> String {
        String::from("device")
    }
}
