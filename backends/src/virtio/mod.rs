//! virtio 1.x devices and their modern PCI transport.
//!
//! A device model implements [`VirtioDevice`]: it declares its type, queues,
//! features and configuration space, and processes its queues when asked.
//! [`VirtioPciDevice`] wraps it into a
//! [`vfio_user_server::pci::PciDevice`] built on the PCI function core: it
//! owns the virtqueues, negotiates
//! features, keeps the device status, raises interrupts (MSI-X or INTx) and
//! saves and restores the transport state for migration.

mod chain;
mod pci;

use std::os::fd::RawFd;

use thiserror::Error;
use vfio_user_server::device::{Interest, WatchedFd};
use vfio_user_server::vm_migration::{MigratableError, Snapshot};
use virtio_queue::Queue;

pub(crate) use chain::ChainWalk;
pub use pci::{
    VirtioPciDevice, VirtioPciError, COMMON_CFG_OFFSET, DEVICE_CFG_OFFSET, ISR_CFG_OFFSET,
    MAX_QUEUES, MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET, NOTIFY_CFG_OFFSET, NOTIFY_OFF_MULTIPLIER,
    VIRTIO_BAR_INDEX, VIRTIO_BAR_SIZE, VIRTIO_PCI_DEVICE_ID_BASE, VIRTIO_PCI_SUBSYSTEM_ID,
    VIRTIO_PCI_VENDOR_ID,
};

/// Guest memory as device models see it.
pub type GuestMemory = vfio_user_server::guest_memory::GuestMemory;

/// `VIRTIO_MSI_NO_VECTOR`: no MSI-X vector assigned.
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;

/// Device status bits (`VIRTIO_CONFIG_S_*`).
pub mod status {
    use virtio_bindings::virtio_config as c;

    /// The guest found the device.
    pub const ACKNOWLEDGE: u8 = c::VIRTIO_CONFIG_S_ACKNOWLEDGE as u8;
    /// The guest has a driver for it.
    pub const DRIVER: u8 = c::VIRTIO_CONFIG_S_DRIVER as u8;
    /// The driver is ready to drive the device.
    pub const DRIVER_OK: u8 = c::VIRTIO_CONFIG_S_DRIVER_OK as u8;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = c::VIRTIO_CONFIG_S_FEATURES_OK as u8;
    /// The device hit an error it cannot recover from without a reset.
    pub const NEEDS_RESET: u8 = c::VIRTIO_CONFIG_S_NEEDS_RESET as u8;
    /// The driver gave up on the device.
    pub const FAILED: u8 = c::VIRTIO_CONFIG_S_FAILED as u8;
}

/// Errors of device models.
#[derive(Debug, Error)]
pub enum VirtioError {
    /// The device cannot start with the negotiated features.
    #[error("activation failed: {0}")]
    Activate(String),
    /// A virtqueue could not be accessed (rings outside guest memory).
    #[error("virtqueue error: {0}")]
    Queue(#[from] virtio_queue::Error),
}

/// A virtio device model, driven by a transport such as
/// [`VirtioPciDevice`].
///
/// All methods are called from the event loop thread. The transport owns
/// the virtqueues and hands them in; it handles notification suppression
/// and interrupts.
pub trait VirtioDevice: Send {
    /// The virtio device id (`VIRTIO_ID_*`, e.g. 2 for block).
    fn device_type(&self) -> u32;

    /// The maximum size of each virtqueue (each a power of two, at most
    /// 32768); the length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;

    /// The feature bits offered. The transport always adds
    /// `VIRTIO_F_VERSION_1`.
    fn features(&self) -> u64;

    /// Reads `data.len()` bytes at `offset` of the device configuration
    /// space; bytes beyond it read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the device configuration space; ignored by default.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    /// The driver set `DRIVER_OK` with `features` negotiated.
    fn activate(&mut self, features: u64) -> Result<(), VirtioError>;

    /// The device was reset; forget everything negotiated.
    fn reset(&mut self);

    /// Processes up to `budget` available chains of queue `index`, writing
    /// a used entry with `queue.add_used` for each it completes now; chains
    /// it leaves in flight are completed from [`VirtioDevice::handle_event`].
    /// Returns how many chains it took off the ring: fewer than `budget`
    /// means the ring was empty, the device cannot take more until some
    /// complete, or it stopped on an error
    /// ([`VirtioDevice::stopped_on_error`]). The transport decides whether
    /// to interrupt.
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
        budget: usize,
    ) -> Result<usize, VirtioError>;

    /// PCI class code, subclass and programming interface.
    fn pci_class(&self) -> (u8, u8, u8) {
        match self.device_type() {
            virtio_bindings::virtio_ids::VIRTIO_ID_NET => (0x02, 0x00, 0x00),
            virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK => (0x01, 0x00, 0x00),
            _ => (0xff, 0x00, 0x00),
        }
    }

    /// The device's own fds (back-end completions, TAP queues) and what
    /// the event loop should watch them for; see
    /// [`vfio_user_server::Lifecycle::watched_fds`]. A device changes its
    /// interest by changing what it returns.
    fn watched_fds(&self) -> &[WatchedFd] {
        &[]
    }

    /// `fd` from [`VirtioDevice::watched_fds`] is ready as `ready` says.
    /// Returns the indices of the queues that got used entries; the
    /// transport interrupts for them and looks at their rings again. Only
    /// called while the device is active and not paused.
    fn handle_event(
        &mut self,
        _fd: RawFd,
        _ready: Interest,
        _queues: &mut [Queue],
        _mem: &GuestMemory,
    ) -> Vec<usize> {
        Vec::new()
    }

    /// Whether the device configuration space changed since the last call
    /// (a link went down, the guest must announce itself); the transport
    /// then raises the configuration interrupt. Asked after every event,
    /// after activation and at resume.
    fn take_config_change(&mut self) -> bool {
        false
    }

    /// Waits for the requests in flight (those the device completes from
    /// [`VirtioDevice::handle_event`]) and completes them. The transport
    /// calls it before pausing and before guest memory is unmapped.
    /// Returns the indices of the queues that got used entries.
    fn quiesce(&mut self, _queues: &mut [Queue], _mem: &GuestMemory) -> Vec<usize> {
        Vec::new()
    }

    /// Why the device stopped taking requests by itself, if it did: a
    /// storage device whose back end failed under
    /// [`crate::block_io::ErrorPolicy::Stop`] keeps the failed requests
    /// and waits to be resumed. The transport then calls
    /// [`VirtioDevice::retry`].
    fn stopped_on_error(&self) -> Option<&str> {
        None
    }

    /// Retries the requests the device kept when it stopped on an error,
    /// and takes requests again; called by the transport after it was
    /// resumed, once guest memory is mapped, before it looks at the rings.
    /// Returns the indices of the queues that got used entries.
    fn retry(&mut self, _queues: &mut [Queue], _mem: &GuestMemory) -> Vec<usize> {
        Vec::new()
    }

    /// Device-specific state for migration, if any (the transport saves
    /// queues, features and status itself).
    fn snapshot(&mut self) -> Result<Option<Snapshot>, MigratableError> {
        Ok(None)
    }

    /// Restores what [`VirtioDevice::snapshot`] returned; called after
    /// [`VirtioDevice::reset`] and before [`VirtioDevice::activate`].
    fn restore(&mut self, _snapshot: Option<&Snapshot>) -> Result<(), MigratableError> {
        Ok(())
    }
}
