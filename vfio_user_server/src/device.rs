//! The interface between the protocol server and a device model.
//!
//! The server validates every message, keeps the DMA table and the
//! interrupt eventfds itself, and calls a [`Device`] only with requests
//! that are already in range. Everything else the server tells a device
//! (resets, guest memory going away, interrupt masks, readiness of its own
//! fds, work left after a reply, and pause, resume, snapshot and restore)
//! goes through one trait, [`Lifecycle`], whose migration half is Cloud
//! Hypervisor's [`Migratable`] family.
//!
//! PCI devices normally implement [`crate::pci::PciDevice`] (which
//! requires [`Lifecycle`]) and are wrapped by [`crate::pci::PciAdapter`],
//! which implements [`Device`] and hands the server the wrapped device as
//! its [`Lifecycle`] ([`AsLifecycle`]), without forwarding each hook.

use std::os::fd::RawFd;

use thiserror::Error;

use crate::guest_memory::GuestMemoryHandle;
use crate::irq::{IrqIndexInfo, Irqs};
use crate::message_dma::MessageDma;
use crate::vm_migration::{Migratable, MigratableError, Snapshot};

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

/// Readiness an fd is watched for, or found with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Interest {
    /// Readable.
    pub read: bool,
    /// Writable.
    pub write: bool,
}

impl Interest {
    /// Not watched at all: the fd leaves the epoll set, so a level that
    /// stays up (a TAP with packets but no receive buffers) costs nothing.
    pub const NONE: Interest = Interest {
        read: false,
        write: false,
    };
    /// Readable.
    pub const READ: Interest = Interest {
        read: true,
        write: false,
    };
    /// Writable (e.g. after a write returned EAGAIN).
    pub const WRITE: Interest = Interest {
        read: false,
        write: true,
    };
    /// Readable and writable.
    pub const READ_WRITE: Interest = Interest {
        read: true,
        write: true,
    };

    /// Whether nothing is watched.
    pub fn is_none(self) -> bool {
        !self.read && !self.write
    }
}

/// One of a device's own fds (a back-end completion, a TAP queue, a timer)
/// and what the event loop should watch it for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatchedFd {
    /// The fd; the device keeps it open for as long as it lists it.
    pub fd: RawFd,
    /// What to watch it for; [`Interest::NONE`] pauses it.
    pub interest: Interest,
}

impl WatchedFd {
    /// `fd`, watched for readability.
    pub fn readable(fd: RawFd) -> Self {
        WatchedFd {
            fd,
            interest: Interest::READ,
        }
    }
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

/// What the server tells a device besides register accesses. Called from
/// the event loop thread.
///
/// Pause, resume and snapshot come from Cloud Hypervisor's traits
/// ([`crate::vm_migration::Pausable`],
/// [`crate::vm_migration::Snapshottable`]); the server and the daemon
/// drive a device through them, and through [`Lifecycle::restore`], which
/// Cloud Hypervisor does in its constructors instead. A device that keeps
/// state the guest relies on says so with [`Lifecycle::migratable`];
/// [`crate::vm_migration::Snapshottable::id`] names the kind of state, and
/// a snapshot is only restored into a device with the same id.
pub trait Lifecycle: Migratable {
    /// Resets the device to its power-on state (DEVICE_RESET, or the
    /// client left).
    fn reset(&mut self, reason: ResetReason);

    /// Replaces the device state with `snapshot` (taken by
    /// [`crate::vm_migration::Snapshottable::snapshot`] of a device with
    /// the same id); the device is paused. Nothing may be applied when it
    /// fails.
    fn restore(&mut self, _snapshot: &Snapshot) -> Result<(), MigratableError> {
        Err(MigratableError::Unsupported)
    }

    /// Whether pause, snapshot and restore keep everything the guest
    /// relies on (advertises the migration feature to the client).
    fn migratable(&self) -> bool {
        false
    }

    /// Why the device stopped serving its guest by itself, if it did: a
    /// storage device whose back end failed, under a policy that stops on
    /// errors, keeps the failed requests and waits. Resuming it
    /// ([`crate::vm_migration::Pausable::resume`], even when it was not
    /// paused) retries them and lets it go on. `None` by default.
    fn stopped_on_error(&self) -> Option<String> {
        None
    }

    /// Called before the DMA range `[address, address + size)` is
    /// unmapped: finish or stop using it.
    fn dma_unmapping(&mut self, _address: u64, _size: u64) {}

    /// Called after a SET_IRQS mask or unmask of `[start, start+count)`.
    fn irq_mask_changed(&mut self, _index: u32, _start: u32, _count: u32, _masked: bool) {}

    /// A request queued on [`DeviceContext::message_dma`] finished: the
    /// data of a read (empty for a write), or an errno.
    fn message_dma_done(&mut self, _id: u64, _result: Result<Vec<u8>, i32>) {}

    /// The device's own fds and what to watch them for. The event loop
    /// reads this after every burst of events and applies changes, so a
    /// device pauses an fd (a TAP while the guest posted no receive
    /// buffers) or asks for writability (after EAGAIN) by changing its
    /// list. An fd must stay open while it is listed.
    fn watched_fds(&self) -> &[WatchedFd] {
        &[]
    }

    /// `fd` from [`Lifecycle::watched_fds`] is ready as `ready` says.
    fn handle_event(&mut self, _fd: RawFd, _ready: Interest) {}

    /// Does work an access deferred, such as the queue processing a
    /// doorbell write asked for: the server calls it after it has sent its
    /// replies, so the client is not held up by the work, and only while a
    /// client is attached and the device is not paused (nor stopped by the
    /// migration state). Returns whether work is left; the event loop then
    /// calls again soon, without sleeping, after serving its other fds.
    /// Each call should do a bounded amount of work.
    fn run_deferred(&mut self) -> bool {
        false
    }
}

/// Hands out the [`Lifecycle`] of a device: the device itself for every
/// type that implements [`Lifecycle`]; the wrapped device for adapters
/// such as [`crate::pci::PciAdapter`].
pub trait AsLifecycle {
    /// The device's lifecycle.
    fn lifecycle(&mut self) -> &mut dyn Lifecycle;
}

impl<T: Lifecycle> AsLifecycle for T {
    fn lifecycle(&mut self) -> &mut dyn Lifecycle {
        self
    }
}

/// A device served over vfio-user: its regions and interrupts.
///
/// Every method is called from the event loop thread with a request the
/// server already validated against [`Device::region`] (index exists, the
/// access lies within the region and is at most `max_data_xfer_size`).
pub trait Device: AsLifecycle + Send {
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

    /// Whether [`Device::dma_mapped`] and [`Device::irqs_set`] want the
    /// raw requests (devices that keep their own tables, such as
    /// `vfio_user::ServerBackend` implementations).
    fn observes_raw_requests(&self) -> bool {
        false
    }

    /// A DMA map succeeded; `file` is a duplicate of the client's fd. An
    /// error undoes the map and is the client's reply.
    fn dma_mapped(
        &mut self,
        _flags: u32,
        _offset: u64,
        _address: u64,
        _size: u64,
        _file: Option<std::fs::File>,
    ) -> Result<(), DeviceError> {
        Ok(())
    }

    /// A SET_IRQS succeeded; `fds` are duplicates of the client's fds. An
    /// error is the client's reply (the server's own interrupt state has
    /// taken the request already).
    fn irqs_set(
        &mut self,
        _set: &crate::wire::IrqSet,
        _fds: Vec<std::fs::File>,
    ) -> Result<(), DeviceError> {
        Ok(())
    }
}
