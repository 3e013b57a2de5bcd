//! The virtio 1.x modern PCI transport (virtio spec 4.1).
//!
//! Layout of the single 64-bit memory BAR ([`VIRTIO_BAR_INDEX`],
//! [`VIRTIO_BAR_SIZE`] bytes):
//!
//! | offset                 | size   | contents                              |
//! |------------------------|--------|---------------------------------------|
//! | [`COMMON_CFG_OFFSET`]  | 0x1000 | `virtio_pci_common_cfg`               |
//! | [`ISR_CFG_OFFSET`]     | 0x1000 | ISR status (byte 0; reading clears)   |
//! | [`DEVICE_CFG_OFFSET`]  | 0x1000 | device configuration space            |
//! | [`NOTIFY_CFG_OFFSET`]  | 0x1000 | queue notify, [`NOTIFY_OFF_MULTIPLIER`] bytes per queue |
//! | [`MSIX_TABLE_OFFSET`]  | 0x2000 | MSI-X table                           |
//! | [`MSIX_PBA_OFFSET`]    | 0x1000 | MSI-X PBA                             |
//!
//! Config space carries, in this order: the PCI Express endpoint
//! capability (if PCIe), power management, MSI-X (queues + 1 vectors), and
//! the virtio common, ISR, notify, device and PCI-config-access
//! capabilities.

mod caps;

use std::any::Any;
use std::os::fd::RawFd;
use std::sync::{Arc, Barrier};

use log::{debug, error, warn};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use vfio_user_server::device::{DeviceContext, ResetReason};
use vfio_user_server::guest_memory::GuestMemoryHandle;
use vfio_user_server::irq::Irqs;
use vfio_user_server::vm_migration::{
    Migratable, MigratableError, Pausable, Snapshot, Snapshottable, Transportable,
};
use vfio_user_server::pci::{
    BarAllocator, MsixCap, MsixTable, MsixTableState, PciBarConfiguration, PciBarPrefetchable,
    PciBarRegionType, PciCapability, PciConfiguration, PciConfigurationParams,
    PciConfigurationState, PciDevice, PciDeviceError, PciExpressCap, PmCap,
};
use vfio_user_server::wire::{PCI_INTX_IRQ_INDEX, PCI_MSIX_IRQ_INDEX};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryBackend};

use self::caps::*;
use super::{status, GuestMemory, VirtioDevice, VIRTIO_MSI_NO_VECTOR};

/// Vendor id of virtio devices.
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Device id of a modern virtio device is this plus the device type.
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// Subsystem id reported by the transport.
pub const VIRTIO_PCI_SUBSYSTEM_ID: u16 = 0x1100;
/// Index of the BAR holding every virtio structure and the MSI-X table.
pub const VIRTIO_BAR_INDEX: usize = 0;
/// Size of that BAR.
pub const VIRTIO_BAR_SIZE: u64 = 0x8000;
/// Offset of the common configuration structure in the BAR.
pub const COMMON_CFG_OFFSET: u64 = 0x0000;
/// Offset of the ISR status byte in the BAR.
pub const ISR_CFG_OFFSET: u64 = 0x1000;
/// Offset of the device configuration space in the BAR.
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
/// Offset of the notification area in the BAR.
pub const NOTIFY_CFG_OFFSET: u64 = 0x3000;
/// Offset of the MSI-X table in the BAR.
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
/// Offset of the MSI-X PBA in the BAR.
pub const MSIX_PBA_OFFSET: u64 = 0x6000;
/// Bytes between the notification addresses of consecutive queues.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// Most queues a device may have (one MSI-X vector each plus one for
/// configuration changes must fit the table window).
pub const MAX_QUEUES: usize = 256;

const WINDOW: u64 = 0x1000;
const MSIX_TABLE_WINDOW: u64 = 0x2000;

/// Chains a queue gets through between two looks at whether the driver
/// wants an interrupt: small enough that the driver refills the ring while
/// the device works on, large enough to keep interrupts (wake-ups) few.
const SIGNAL_BATCH: usize = 16;
/// ISR bit: a used buffer notification.
const ISR_QUEUE: u8 = 0x1;
/// ISR bit: a configuration change.
const ISR_CONFIG: u8 = 0x2;

/// Offsets in `struct virtio_pci_common_cfg`.
mod common {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const MSIX_CONFIG: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
    /// Size of the structure we implement (up to `queue_device`).
    pub const SIZE: u64 = 0x38;
    /// `(offset, size)` of every field, in address order.
    pub const FIELDS: [(u64, u64); 16] = [
        (DEVICE_FEATURE_SELECT, 4),
        (DEVICE_FEATURE, 4),
        (DRIVER_FEATURE_SELECT, 4),
        (DRIVER_FEATURE, 4),
        (MSIX_CONFIG, 2),
        (NUM_QUEUES, 2),
        (DEVICE_STATUS, 1),
        (CONFIG_GENERATION, 1),
        (QUEUE_SELECT, 2),
        (QUEUE_SIZE, 2),
        (QUEUE_MSIX_VECTOR, 2),
        (QUEUE_ENABLE, 2),
        (QUEUE_NOTIFY_OFF, 2),
        (QUEUE_DESC, 8),
        (QUEUE_DRIVER, 8),
        (QUEUE_DEVICE, 8),
    ];
}

/// Errors creating a virtio PCI device.
#[derive(Debug, Error)]
pub enum VirtioPciError {
    /// The device declares no queues or more than [`MAX_QUEUES`].
    #[error("invalid number of queues {0}")]
    InvalidQueueCount(usize),
    /// A queue size is zero, not a power of two or above 32768.
    #[error("invalid queue size {0}")]
    InvalidQueueSize(u16),
    /// The configuration space could not be built.
    #[error("PCI configuration: {0}")]
    Pci(#[from] PciDeviceError),
}

/// Which part of the BAR an access falls in.
enum BarWindow {
    Common(u64),
    Isr,
    Device(u64),
    Notify(u64),
    MsixTable(u64),
    MsixPba(u64),
}

fn bar_window(offset: u64, len: u64) -> Option<BarWindow> {
    let end = offset.checked_add(len)?;
    let within = |start: u64, size: u64| offset >= start && end <= start + size;
    if within(COMMON_CFG_OFFSET, WINDOW) {
        Some(BarWindow::Common(offset - COMMON_CFG_OFFSET))
    } else if within(ISR_CFG_OFFSET, WINDOW) {
        (offset == ISR_CFG_OFFSET).then_some(BarWindow::Isr)
    } else if within(DEVICE_CFG_OFFSET, WINDOW) {
        Some(BarWindow::Device(offset - DEVICE_CFG_OFFSET))
    } else if within(NOTIFY_CFG_OFFSET, WINDOW) {
        Some(BarWindow::Notify(offset - NOTIFY_CFG_OFFSET))
    } else if within(MSIX_TABLE_OFFSET, MSIX_TABLE_WINDOW) {
        Some(BarWindow::MsixTable(offset - MSIX_TABLE_OFFSET))
    } else if within(MSIX_PBA_OFFSET, WINDOW) {
        Some(BarWindow::MsixPba(offset - MSIX_PBA_OFFSET))
    } else {
        None
    }
}

/// Saved state of one virtqueue.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct QueueSnapshot {
    max_size: u16,
    size: u16,
    ready: bool,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
    next_avail: u16,
    next_used: u16,
    vector: u16,
}

/// Saved state of the transport.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct VirtioPciState {
    device_type: u32,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_generation: u8,
    msix_config: u16,
    queue_select: u16,
    isr: u8,
    active: bool,
    queues: Vec<QueueSnapshot>,
    config: PciConfigurationState,
    msix: MsixTableState,
}

/// Name of the child snapshot holding the device model's own state.
const DEVICE_SNAPSHOT_ID: &str = "device";

/// A [`VirtioDevice`] behind the virtio modern PCI transport.
///
/// A queue notification (BAR write) only marks the queue: the queue is
/// processed by [`PciDevice::run_deferred`], which the server calls once
/// the doorbell's reply is on its way, so the driver is not held up while
/// the device works. A device model may leave requests in flight (on I/O
/// threads) and complete them from [`VirtioDevice::handle_event`]; they are
/// completed ([`VirtioDevice::quiesce`]) before the device pauses and
/// before guest memory is unmapped.
pub struct VirtioPciDevice<D: VirtioDevice> {
    device: D,
    memory: GuestMemoryHandle,
    irqs: Irqs,
    config: PciConfiguration,
    msix: MsixTable,
    msix_vectors: u16,
    bar: Option<PciBarConfiguration>,
    pci_cfg_cap: Option<usize>,
    device_features: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_generation: u8,
    msix_config: u16,
    queue_select: u16,
    queues: Vec<Queue>,
    queue_vectors: Vec<u16>,
    isr: u8,
    active: bool,
    paused: bool,
    /// Queues whose doorbell rang (or that must be looked at) since they
    /// were last drained; processed by [`PciDevice::run_deferred`].
    kicked: Vec<bool>,
}

impl<D: VirtioDevice> VirtioPciDevice<D> {
    /// Wraps `device`, using the guest memory and interrupts of `ctx`. With
    /// `pcie` the function has a PCI Express capability and a 4 KiB
    /// configuration space.
    pub fn with_device(ctx: DeviceContext, device: D, pcie: bool) -> Result<Self, VirtioPciError> {
        let sizes = device.queue_max_sizes();
        if sizes.is_empty() || sizes.len() > MAX_QUEUES {
            return Err(VirtioPciError::InvalidQueueCount(sizes.len()));
        }
        let queues = sizes
            .iter()
            .map(|&s| Queue::new(s).map_err(|_| VirtioPciError::InvalidQueueSize(s)))
            .collect::<Result<Vec<_>, _>>()?;
        // At most MAX_QUEUES + 1 vectors: fits u16 and the table window.
        let msix_vectors = (queues.len() + 1) as u16;
        let (class_code, subclass, prog_if) = device.pci_class();
        // Device types are small; an absurd one just gets a wrong id.
        let device_id = VIRTIO_PCI_DEVICE_ID_BASE.wrapping_add(device.device_type() as u16);
        let mut config = PciConfiguration::new(PciConfigurationParams {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id,
            revision_id: 1,
            class_code,
            subclass,
            prog_if,
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            subsystem_id: VIRTIO_PCI_SUBSYSTEM_ID,
            pcie,
            interrupt_pin: 1,
        });
        if pcie {
            config.add_capability(&PciExpressCap::endpoint())?;
        }
        config.add_capability(&PmCap::new())?;
        config.add_capability(&MsixCap::new(
            msix_vectors,
            VIRTIO_BAR_INDEX as u32,
            MSIX_TABLE_OFFSET as u32,
            VIRTIO_BAR_INDEX as u32,
            MSIX_PBA_OFFSET as u32,
        ))?;
        let bar = VIRTIO_BAR_INDEX as u8;
        let notify_len = queues.len() as u32 * NOTIFY_OFF_MULTIPLIER;
        let virtio_caps = [
            VirtioPciCap::new(
                CAP_COMMON_CFG,
                bar,
                COMMON_CFG_OFFSET as u32,
                common::SIZE as u32,
            ),
            VirtioPciCap::new(CAP_ISR_CFG, bar, ISR_CFG_OFFSET as u32, 1),
            VirtioPciCap::notify(
                bar,
                NOTIFY_CFG_OFFSET as u32,
                notify_len,
                NOTIFY_OFF_MULTIPLIER,
            ),
            VirtioPciCap::new(CAP_DEVICE_CFG, bar, DEVICE_CFG_OFFSET as u32, WINDOW as u32),
        ];
        for cap in &virtio_caps {
            config.add_capability(cap as &dyn PciCapability)?;
        }
        let pci_cfg_cap = match config.add_capability(&VirtioPciCap::pci_cfg()) {
            Ok(offset) => Some(offset),
            Err(e) => {
                warn!("virtio-pci: no room for the PCI config access capability: {e}");
                None
            }
        };
        let device_features = device.features() | (1 << VIRTIO_F_VERSION_1);
        let n = queues.len();
        Ok(VirtioPciDevice {
            device,
            memory: ctx.memory,
            irqs: ctx.irqs,
            config,
            msix: MsixTable::new(msix_vectors),
            msix_vectors,
            bar: None,
            pci_cfg_cap,
            device_features,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            msix_config: VIRTIO_MSI_NO_VECTOR,
            queue_select: 0,
            queues,
            queue_vectors: vec![VIRTIO_MSI_NO_VECTOR; n],
            kicked: vec![false; n],
            isr: 0,
            active: false,
            paused: false,
        })
    }

    /// The device model.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device model, mutably.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The device status byte.
    pub fn status(&self) -> u8 {
        self.status
    }

    /// The features the driver acknowledged.
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// Whether the device is running (`DRIVER_OK` accepted).
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// The virtqueues.
    pub fn queues(&self) -> &[Queue] {
        &self.queues
    }

    /// Tells the driver the device configuration changed: bumps
    /// `config_generation` and raises the configuration interrupt.
    pub fn notify_config_change(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.status & status::DRIVER_OK != 0 {
            self.signal(self.msix_config, ISR_CONFIG);
        }
    }

    /// Back to the state after power-on, as far as the virtio device goes
    /// (status 0 or DEVICE_RESET): queues disabled, features forgotten.
    fn reset_device(&mut self) {
        self.device.reset();
        for q in self.queues.iter_mut() {
            q.reset();
        }
        self.queue_vectors.fill(VIRTIO_MSI_NO_VECTOR);
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.msix_config = VIRTIO_MSI_NO_VECTOR;
        self.queue_select = 0;
        self.isr = 0;
        self.active = false;
        self.kicked.fill(false);
    }

    fn valid_vector(&self, vector: u16) -> u16 {
        if vector < self.msix_vectors {
            vector
        } else {
            VIRTIO_MSI_NO_VECTOR
        }
    }

    /// Raises an interrupt: MSI-X `vector` when MSI-X is enabled, INTx
    /// with `isr_bit` set otherwise.
    fn signal(&mut self, vector: u16, isr_bit: u8) {
        if self.config.msix_enabled() {
            if vector == VIRTIO_MSI_NO_VECTOR {
                return;
            }
            if let Err(e) = self.irqs.trigger(PCI_MSIX_IRQ_INDEX, u32::from(vector)) {
                debug!("virtio-pci: MSI-X vector {vector}: {e}");
            }
        } else {
            self.isr |= isr_bit;
            if !self.config.intx_disabled() {
                if let Err(e) = self.irqs.trigger(PCI_INTX_IRQ_INDEX, 0) {
                    debug!("virtio-pci: INTx: {e}");
                }
            }
        }
    }

    /// Signals queue `index` if the driver wants to hear about it.
    fn signal_used(&mut self, index: usize, mem: &GuestMemory) {
        let Some(q) = self.queues.get_mut(index) else {
            return;
        };
        // If the used event index cannot be read, interrupt anyway.
        if q.needs_notification(mem).unwrap_or(true) {
            let vector = self.queue_vectors[index];
            self.signal(vector, ISR_QUEUE);
        }
    }

    /// Takes up to [`SIGNAL_BATCH`] chains off queue `index`, with the
    /// driver's doorbells off, and interrupts if the driver asked for it.
    /// Returns how many chains it took; `None` if the queue cannot be
    /// processed (not ready, rings unreachable).
    fn process_batch(&mut self, index: usize, mem: &GuestMemory) -> Option<usize> {
        let q = self.queues.get_mut(index).filter(|q| q.ready())?;
        // While doorbells are off the driver does not ring (with EVENT_IDX
        // the available event just stays behind): the device polls the
        // ring until it is idle, then turns them on again (`rearm`).
        if let Err(e) = q.disable_notification(mem) {
            warn!("virtio-pci: queue {index}: {e}");
            return None;
        }
        let used_before = q.next_used();
        let n = match self.device.process_queue(index, q, mem, SIGNAL_BATCH) {
            Ok(n) => n,
            Err(e) => {
                warn!("virtio-pci: queue {index}: {e}");
                return None;
            }
        };
        // Chains handed to I/O threads are used (and signalled) later.
        if q.next_used() != used_before {
            self.signal_used(index, mem);
        }
        Some(n)
    }

    /// Turns the doorbells of the empty queue `index` back on. Returns
    /// false if the driver added buffers before it could see that, and
    /// the device took them: the queue must be polled on.
    fn rearm(&mut self, index: usize, mem: &GuestMemory) -> bool {
        let Some(q) = self.queues.get_mut(index) else {
            return true;
        };
        match q.enable_notification(mem) {
            Ok(true) => {}
            Ok(false) => return true,
            Err(e) => {
                warn!("virtio-pci: queue {index}: {e}");
                return true;
            }
        }
        // If nothing can be taken although the available index says there
        // is more, the ring is broken: wait for the next doorbell.
        !matches!(self.process_batch(index, mem), Some(n) if n > 0)
    }

    /// Completes the requests the device has in flight.
    fn quiesce(&mut self) {
        self.complete_in_flight(|device, queues, mem| device.quiesce(queues, mem));
    }

    /// Lets the device complete requests it has in flight (`complete`
    /// returns the queues that got used entries); then interrupts for them
    /// and looks at their rings again (the device may have left buffers
    /// there while it was full).
    fn complete_in_flight<F>(&mut self, complete: F)
    where
        F: FnOnce(&mut D, &mut [Queue], &GuestMemory) -> Vec<usize>,
    {
        if !self.active || self.paused {
            return;
        }
        let memory = self.memory.clone();
        let guard = memory.memory();
        let mem: &GuestMemory = &guard;
        for index in complete(&mut self.device, &mut self.queues, mem) {
            self.signal_used(index, mem);
            self.kick(index);
        }
    }

    /// Marks queue `index` for processing by [`PciDevice::run_deferred`].
    fn kick(&mut self, index: usize) {
        if let Some(k) = self.kicked.get_mut(index) {
            *k = true;
        }
    }

    /// Marks every queue for processing.
    fn kick_all(&mut self) {
        self.kicked.fill(true);
    }

    fn activate(&mut self) {
        let event_idx = self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for q in self.queues.iter_mut() {
            q.set_event_idx(event_idx);
        }
        match self.device.activate(self.driver_features) {
            Ok(()) => self.active = true,
            Err(e) => {
                error!("virtio-pci: activation failed: {e}");
                self.status |= status::NEEDS_RESET;
                self.signal(self.msix_config, ISR_CONFIG);
            }
        }
    }

    fn write_status(&mut self, value: u8) {
        if value == 0 {
            self.reset_device();
            return;
        }
        let old = self.status;
        // Drivers never clear bits other than by writing 0.
        let mut new = old | value;
        if new & status::FEATURES_OK != 0
            && old & status::FEATURES_OK == 0
            && self.driver_features & (1 << VIRTIO_F_VERSION_1) == 0
        {
            // Legacy-only drivers are refused: FEATURES_OK does not stick.
            new &= !status::FEATURES_OK;
        }
        self.status = new;
        if new & status::DRIVER_OK != 0
            && new & status::FEATURES_OK != 0
            && old & status::DRIVER_OK == 0
            && !self.active
        {
            self.activate();
            // Buffers made available before DRIVER_OK.
            self.kick_all();
        }
    }

    fn selected_queue(&self) -> Option<usize> {
        let i = usize::from(self.queue_select);
        (i < self.queues.len()).then_some(i)
    }

    /// The common configuration structure as bytes.
    fn common_image(&self) -> [u8; common::SIZE as usize] {
        let mut img = [0u8; common::SIZE as usize];
        let mut put = |off: u64, bytes: &[u8]| {
            let off = off as usize;
            img[off..off + bytes.len()].copy_from_slice(bytes);
        };
        let half = |v: u64, select: u32| match select {
            0 => v as u32,
            1 => (v >> 32) as u32,
            _ => 0,
        };
        put(
            common::DEVICE_FEATURE_SELECT,
            &self.device_feature_select.to_le_bytes(),
        );
        put(
            common::DEVICE_FEATURE,
            &half(self.device_features, self.device_feature_select).to_le_bytes(),
        );
        put(
            common::DRIVER_FEATURE_SELECT,
            &self.driver_feature_select.to_le_bytes(),
        );
        put(
            common::DRIVER_FEATURE,
            &half(self.driver_features, self.driver_feature_select).to_le_bytes(),
        );
        put(common::MSIX_CONFIG, &self.msix_config.to_le_bytes());
        put(
            common::NUM_QUEUES,
            &(self.queues.len() as u16).to_le_bytes(),
        );
        put(common::DEVICE_STATUS, &[self.status]);
        put(common::CONFIG_GENERATION, &[self.config_generation]);
        put(common::QUEUE_SELECT, &self.queue_select.to_le_bytes());
        if let Some(i) = self.selected_queue() {
            let q = &self.queues[i];
            put(common::QUEUE_SIZE, &q.size().to_le_bytes());
            put(
                common::QUEUE_MSIX_VECTOR,
                &self.queue_vectors[i].to_le_bytes(),
            );
            put(common::QUEUE_ENABLE, &u16::from(q.ready()).to_le_bytes());
            put(common::QUEUE_NOTIFY_OFF, &(i as u16).to_le_bytes());
            put(common::QUEUE_DESC, &q.desc_table().to_le_bytes());
            put(common::QUEUE_DRIVER, &q.avail_ring().to_le_bytes());
            put(common::QUEUE_DEVICE, &q.used_ring().to_le_bytes());
        }
        img
    }

    fn common_read(&self, offset: u64, data: &mut [u8]) {
        let img = self.common_image();
        let end = offset.saturating_add(data.len() as u64);
        if end <= common::SIZE {
            data.copy_from_slice(&img[offset as usize..end as usize]);
        }
    }

    /// Applies a write of any size: the bytes are laid over the current
    /// image and every field they touch is updated from it.
    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let end = offset.saturating_add(data.len() as u64);
        if end > common::SIZE || data.is_empty() {
            return;
        }
        let mut img = self.common_image();
        img[offset as usize..end as usize].copy_from_slice(data);
        for (field, size) in common::FIELDS {
            if field < end && offset < field + size {
                let mut v = [0u8; 8];
                v[..size as usize].copy_from_slice(&img[field as usize..(field + size) as usize]);
                self.common_write_field(field, u64::from_le_bytes(v));
            }
        }
    }

    fn common_write_field(&mut self, field: u64, value: u64) {
        match field {
            common::DEVICE_FEATURE_SELECT => self.device_feature_select = value as u32,
            common::DRIVER_FEATURE_SELECT => self.driver_feature_select = value as u32,
            common::DRIVER_FEATURE => {
                if self.status & status::FEATURES_OK != 0 {
                    return;
                }
                let shift = match self.driver_feature_select {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                let mask = 0xffff_ffffu64 << shift;
                let v = (value << shift) & self.device_features & mask;
                self.driver_features = (self.driver_features & !mask) | v;
            }
            common::MSIX_CONFIG => self.msix_config = self.valid_vector(value as u16),
            common::DEVICE_STATUS => self.write_status(value as u8),
            common::QUEUE_SELECT => self.queue_select = value as u16,
            common::QUEUE_MSIX_VECTOR => {
                if let Some(i) = self.selected_queue() {
                    self.queue_vectors[i] = self.valid_vector(value as u16);
                }
            }
            common::QUEUE_SIZE
            | common::QUEUE_ENABLE
            | common::QUEUE_DESC
            | common::QUEUE_DRIVER
            | common::QUEUE_DEVICE => self.write_queue_field(field, value),
            // Read-only fields.
            _ => {}
        }
    }

    fn write_queue_field(&mut self, field: u64, value: u64) {
        let Some(i) = self.selected_queue() else {
            return;
        };
        let q = &mut self.queues[i];
        // A live queue is not reconfigured (no VIRTIO_F_RING_RESET).
        if q.ready() {
            return;
        }
        let r = match field {
            common::QUEUE_SIZE => q.try_set_size(value as u16),
            common::QUEUE_DESC => q.try_set_desc_table_address(GuestAddress(value)),
            common::QUEUE_DRIVER => q.try_set_avail_ring_address(GuestAddress(value)),
            common::QUEUE_DEVICE => q.try_set_used_ring_address(GuestAddress(value)),
            common::QUEUE_ENABLE => {
                // Writing 0 is reserved for VIRTIO_F_RING_RESET.
                if value == 1 {
                    q.set_ready(true);
                }
                Ok(())
            }
            _ => Ok(()),
        };
        if let Err(e) = r {
            debug!("virtio-pci: queue {i}: ignoring write {value:#x} to {field:#x}: {e}");
        }
    }

    fn notify(&mut self, offset: u64) {
        let index = offset / u64::from(NOTIFY_OFF_MULTIPLIER);
        if let Ok(index) = usize::try_from(index) {
            self.kick(index);
        }
    }

    fn bar_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match bar_window(offset, data.len() as u64) {
            Some(BarWindow::Common(o)) => self.common_read(o, data),
            Some(BarWindow::Isr) => {
                if let Some(b) = data.first_mut() {
                    *b = self.isr;
                    self.isr = 0;
                }
            }
            Some(BarWindow::Device(o)) => self.device.read_config(o, data),
            Some(BarWindow::MsixTable(o)) => self.msix.read_table(o, data),
            Some(BarWindow::MsixPba(o)) => self.msix.read_pba(o, data, &self.irqs),
            Some(BarWindow::Notify(_)) | None => {}
        }
    }

    fn bar_write(&mut self, offset: u64, data: &[u8]) {
        match bar_window(offset, data.len() as u64) {
            Some(BarWindow::Common(o)) => self.common_write(o, data),
            Some(BarWindow::Device(o)) => self.device.write_config(o, data),
            Some(BarWindow::Notify(o)) => self.notify(o),
            Some(BarWindow::MsixTable(o)) => self.msix.write_table(o, data),
            Some(BarWindow::Isr) | Some(BarWindow::MsixPba(_)) | None => {}
        }
    }

    /// The register holding `pci_cfg_data`, if the capability exists.
    fn pci_cfg_data_reg(&self) -> Option<usize> {
        self.pci_cfg_cap.map(|c| (c + PCI_CFG_DATA) / 4)
    }

    /// The BAR window selected through the PCI config access capability:
    /// `(offset, length)` when it targets our BAR with a valid length.
    fn pci_cfg_window(&self) -> Option<(u64, usize)> {
        let cap = self.pci_cfg_cap?;
        let bar = self.config.read_reg((cap + PCI_CFG_BAR) / 4) & 0xff;
        let offset = u64::from(self.config.read_reg((cap + PCI_CFG_OFFSET) / 4));
        let length = self.config.read_reg((cap + PCI_CFG_LENGTH) / 4) as usize;
        if bar as usize != VIRTIO_BAR_INDEX
            || !matches!(length, 1 | 2 | 4)
            || offset % length as u64 != 0
        {
            return None;
        }
        Some((offset, length))
    }

    fn state(&self) -> VirtioPciState {
        let queues = self
            .queues
            .iter()
            .zip(&self.queue_vectors)
            .map(|(q, &vector)| QueueSnapshot {
                max_size: q.max_size(),
                size: q.size(),
                ready: q.ready(),
                desc_table: q.desc_table(),
                avail_ring: q.avail_ring(),
                used_ring: q.used_ring(),
                next_avail: q.next_avail(),
                next_used: q.next_used(),
                vector,
            })
            .collect();
        VirtioPciState {
            device_type: self.device.device_type(),
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            driver_features: self.driver_features,
            status: self.status,
            config_generation: self.config_generation,
            msix_config: self.msix_config,
            queue_select: self.queue_select,
            isr: self.isr,
            active: self.active,
            queues,
            config: self.config.state(),
            msix: self.msix.state(),
        }
    }

    fn restore_queue(s: &QueueSnapshot, event_idx: bool) -> Result<Queue, virtio_queue::Error> {
        let mut q = Queue::new(s.max_size)?;
        q.try_set_size(s.size)?;
        q.try_set_desc_table_address(GuestAddress(s.desc_table))?;
        q.try_set_avail_ring_address(GuestAddress(s.avail_ring))?;
        q.try_set_used_ring_address(GuestAddress(s.used_ring))?;
        q.set_next_avail(s.next_avail);
        q.set_next_used(s.next_used);
        q.set_event_idx(event_idx);
        q.set_ready(s.ready);
        Ok(q)
    }

    fn set_state(&mut self, s: &VirtioPciState, device: Option<&Snapshot>) -> Result<(), String> {
        if s.device_type != self.device.device_type() {
            return Err(format!("device type {} in snapshot", s.device_type));
        }
        if s.queues.len() != self.queues.len() {
            return Err(format!("{} queues in snapshot", s.queues.len()));
        }
        // The driver keeps using what it negotiated: a device that no
        // longer offers it (e.g. read-only now) cannot take over.
        let missing = s.driver_features & !self.device_features;
        if missing != 0 {
            return Err(format!(
                "features {missing:#x} negotiated in the snapshot are not offered by this device"
            ));
        }
        let event_idx = s.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = Vec::with_capacity(s.queues.len());
        for (qs, q) in s.queues.iter().zip(&self.queues) {
            if qs.max_size != q.max_size() {
                return Err(format!("queue max size {} in snapshot", qs.max_size));
            }
            queues.push(Self::restore_queue(qs, event_idx).map_err(|e| e.to_string())?);
        }
        let mut config = self.config.clone();
        config.set_state(&s.config).map_err(|e| e.to_string())?;
        let mut msix = self.msix.clone();
        msix.set_state(&s.msix).map_err(|e| e.to_string())?;

        self.device.reset();
        self.device.restore(device).map_err(|e| e.to_string())?;
        self.config = config;
        self.msix = msix;
        self.queues = queues;
        self.queue_vectors = s
            .queues
            .iter()
            .map(|q| self.valid_vector(q.vector))
            .collect();
        self.device_feature_select = s.device_feature_select;
        self.driver_feature_select = s.driver_feature_select;
        self.driver_features = s.driver_features & self.device_features;
        self.status = s.status;
        self.config_generation = s.config_generation;
        self.msix_config = self.valid_vector(s.msix_config);
        self.queue_select = s.queue_select;
        self.isr = s.isr;
        self.active = false;
        if s.active {
            self.device
                .activate(self.driver_features)
                .map_err(|e| e.to_string())?;
            self.active = true;
        }
        Ok(())
    }
}

/// Cloud Hypervisor's migration traits, over the `PciDevice` hooks.
impl<D: VirtioDevice + 'static> Pausable for VirtioPciDevice<D> {
    fn pause(&mut self) -> Result<(), MigratableError> {
        PciDevice::pause(self)
    }

    fn resume(&mut self) -> Result<(), MigratableError> {
        PciDevice::resume(self)
    }
}

impl<D: VirtioDevice + 'static> Snapshottable for VirtioPciDevice<D> {
    fn id(&self) -> String {
        PciDevice::id(self).unwrap_or_else(|| self.snapshot_kind())
    }

    fn snapshot(&mut self) -> Result<Snapshot, MigratableError> {
        PciDevice::snapshot(self)
    }
}

impl<D: VirtioDevice + 'static> Transportable for VirtioPciDevice<D> {}

impl<D: VirtioDevice + 'static> Migratable for VirtioPciDevice<D> {}

impl<D: VirtioDevice + 'static> PciDevice for VirtioPciDevice<D> {
    fn allocate_bars(
        &mut self,
        allocator: &mut BarAllocator,
    ) -> Result<Vec<PciBarConfiguration>, PciDeviceError> {
        if let Some(bar) = self.bar {
            return Ok(vec![bar]);
        }
        let addr = allocator
            .allocate(VIRTIO_BAR_SIZE)
            .ok_or(PciDeviceError::InvalidBar(VIRTIO_BAR_INDEX))?;
        let bar = PciBarConfiguration::new(
            VIRTIO_BAR_INDEX,
            VIRTIO_BAR_SIZE,
            PciBarRegionType::Memory64BitRegion,
            PciBarPrefetchable::NotPrefetchable,
        )
        .set_address(addr);
        self.config.add_pci_bar(&bar)?;
        self.bar = Some(bar);
        Ok(vec![bar])
    }

    fn write_config_register(
        &mut self,
        reg_idx: usize,
        offset: u64,
        data: &[u8],
    ) -> Option<Arc<Barrier>> {
        self.config.write_config_register(reg_idx, offset, data);
        if Some(reg_idx) == self.pci_cfg_data_reg() {
            if let Some((bar_offset, len)) = self.pci_cfg_window() {
                let value = self.config.read_reg(reg_idx).to_le_bytes();
                self.bar_write(bar_offset, &value[..len]);
            }
        }
        None
    }

    fn read_config_register(&mut self, reg_idx: usize) -> u32 {
        if Some(reg_idx) == self.pci_cfg_data_reg() {
            if let Some((bar_offset, len)) = self.pci_cfg_window() {
                let mut value = [0u8; 4];
                self.bar_read(bar_offset, &mut value[..len]);
                return u32::from_le_bytes(value);
            }
        }
        self.config.read_reg(reg_idx)
    }

    fn read_bar(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        if self.bar.map(|b| b.addr) != Some(base) {
            data.fill(0);
            return;
        }
        self.bar_read(offset, data);
    }

    fn write_bar(&mut self, base: u64, offset: u64, data: &[u8]) -> Option<Arc<Barrier>> {
        if self.bar.map(|b| b.addr) == Some(base) {
            self.bar_write(offset, data);
        }
        None
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }

    fn id(&self) -> Option<String> {
        self.device.id()
    }

    fn snapshot_kind(&self) -> String {
        match self.device.device_type() {
            virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK => "virtio-blk".into(),
            virtio_bindings::virtio_ids::VIRTIO_ID_NET => "virtio-net".into(),
            t => format!("virtio-{t}"),
        }
    }

    fn config_space_size(&self) -> u64 {
        self.config.size()
    }

    fn reset(&mut self, _reason: ResetReason) {
        self.reset_device();
        self.config.reset();
        self.msix.reset();
        self.paused = false;
    }

    fn msix_vectors(&self) -> u32 {
        u32::from(self.msix_vectors)
    }

    fn has_intx(&self) -> bool {
        true
    }

    fn event_fds(&self) -> Vec<RawFd> {
        self.device.event_fds()
    }

    fn run_deferred(&mut self) -> bool {
        if !self.active || self.paused || !self.kicked.contains(&true) {
            return false;
        }
        let memory = self.memory.clone();
        let guard = memory.memory();
        let mem: &GuestMemory = &guard;
        // No guest memory: restored before a client attached, or resumed
        // after it left. The rings are unreachable (no warning). The queues
        // stay marked: the loop calls again after the DMA_MAP that makes
        // them reachable (their doorbells may be off in guest memory).
        if mem.num_regions() == 0 {
            return false;
        }
        // One batch per kicked queue, then back to the event loop, which
        // calls again right after serving its fds: a doorbell or config
        // access waits for at most one round. Every kicked queue is polled
        // while any of them has work, so that a busy queue neither starves
        // the others nor lets them go idle (and need a doorbell). A driver
        // that keeps its rings full (or a used ring laid over the available
        // ring) keeps the device busy, never the event loop.
        let mut progress = false;
        for index in 0..self.kicked.len() {
            if !self.kicked[index] {
                continue;
            }
            match self.process_batch(index, mem) {
                Some(n) => progress |= n > 0,
                None => self.kicked[index] = false,
            }
        }
        if progress {
            return true;
        }
        // Every polled queue is empty: doorbells back on.
        let mut raced = false;
        for index in 0..self.kicked.len() {
            if self.kicked[index] {
                let idle = self.rearm(index, mem);
                self.kicked[index] = !idle;
                raced |= !idle;
            }
        }
        raced
    }

    fn handle_event(&mut self, fd: RawFd) {
        self.complete_in_flight(|device, queues, mem| device.handle_event(fd, queues, mem));
    }

    fn dma_unmapping(&mut self, _address: u64, _size: u64) {
        // Requests in flight may use the range: finish them while it is
        // still mapped.
        self.quiesce();
    }

    fn migratable(&self) -> bool {
        true
    }

    fn pause(&mut self) -> Result<(), MigratableError> {
        // In-flight requests complete before the device stops.
        self.quiesce();
        self.paused = true;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), MigratableError> {
        self.paused = false;
        // Pick up whatever was made available while paused (or before the
        // snapshot this device was restored from).
        self.kick_all();
        Ok(())
    }

    fn snapshot(&mut self) -> Result<Snapshot, MigratableError> {
        let mut snapshot = Snapshot::new_from_state(&self.state())?;
        if let Some(device) = self.device.snapshot()? {
            snapshot.add_snapshot(DEVICE_SNAPSHOT_ID.to_string(), device);
        }
        Ok(snapshot)
    }

    fn restore(&mut self, snapshot: &Snapshot) -> Result<(), MigratableError> {
        let state: VirtioPciState = snapshot.to_state()?;
        self.set_state(&state, snapshot.snapshots.get(DEVICE_SNAPSHOT_ID))
            .map_err(MigratableError::Restore)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::VirtioError;
    use vfio_user_server::irq::IrqIndexInfo;

    /// A device that refuses to activate and counts events.
    struct Dummy {
        fail: bool,
        resets: usize,
        events: usize,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![8, 4]
        }
        fn features(&self) -> u64 {
            1 << 3
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn activate(&mut self, _features: u64) -> Result<(), VirtioError> {
            if self.fail {
                Err(VirtioError::Activate("no".into()))
            } else {
                Ok(())
            }
        }
        fn reset(&mut self) {
            self.resets += 1;
        }
        fn process_queue(
            &mut self,
            _index: usize,
            _queue: &mut Queue,
            _mem: &GuestMemory,
            _budget: usize,
        ) -> Result<usize, VirtioError> {
            Ok(0)
        }
        fn event_fds(&self) -> Vec<RawFd> {
            vec![99]
        }
        fn handle_event(
            &mut self,
            fd: RawFd,
            queues: &mut [Queue],
            _mem: &GuestMemory,
        ) -> Vec<usize> {
            assert_eq!(fd, 99);
            assert_eq!(queues.len(), 2);
            self.events += 1;
            vec![1, 7]
        }
    }

    fn dummy(fail: bool) -> VirtioPciDevice<Dummy> {
        let ctx = DeviceContext::default();
        ctx.irqs.configure(&IrqIndexInfo::pci_layout(true, 0, 3));
        let d = Dummy {
            fail,
            resets: 0,
            events: 0,
        };
        VirtioPciDevice::with_device(ctx, d, false).unwrap()
    }

    fn bring_up(d: &mut VirtioPciDevice<Dummy>) {
        d.common_write(common::DRIVER_FEATURE_SELECT, &1u32.to_le_bytes());
        d.common_write(common::DRIVER_FEATURE, &1u32.to_le_bytes());
        d.common_write(common::DEVICE_STATUS, &[status::FEATURES_OK]);
        d.common_write(
            common::DEVICE_STATUS,
            &[status::FEATURES_OK | status::DRIVER_OK],
        );
    }

    #[test]
    fn identity() {
        let mut d = dummy(false);
        assert_eq!(d.read_config_register(0), 0x106a_1af4);
        assert_eq!(d.read_config_register(2) >> 24, 0xff);
        assert_eq!(d.config_space_size(), 256);
        assert_eq!(d.msix_vectors(), 3);
        assert_eq!(d.event_fds(), vec![99]);
        let mut b = [0u8; 2];
        d.bar_read(DEVICE_CFG_OFFSET + 5, &mut b);
        assert_eq!(b, [5, 5]);
        assert_eq!(d.device_features, (1 << 3) | (1 << VIRTIO_F_VERSION_1));
    }

    #[test]
    fn activation_failure_needs_reset() {
        let mut d = dummy(true);
        bring_up(&mut d);
        assert!(!d.is_active());
        assert_ne!(d.status() & status::NEEDS_RESET, 0);
        // INTx (MSI-X is off): config change in ISR.
        let mut isr = [0u8];
        d.bar_read(ISR_CFG_OFFSET, &mut isr);
        assert_eq!(isr[0], ISR_CONFIG);
        // Events are not delivered to an inactive device.
        d.handle_event(99);
        assert_eq!(d.device().events, 0);
        d.common_write(common::DEVICE_STATUS, &[0]);
        assert_eq!(d.status(), 0);
        assert_eq!(d.device().resets, 1);
    }

    #[test]
    fn events_and_config_changes() {
        let mut d = dummy(false);
        bring_up(&mut d);
        assert!(d.is_active());
        assert_eq!(d.driver_features(), 1 << VIRTIO_F_VERSION_1);
        d.handle_event(99);
        assert_eq!(d.device().events, 1);
        // Queue 1 got used entries: INTx queue interrupt (queue 7 ignored).
        let mut isr = [0u8];
        d.bar_read(ISR_CFG_OFFSET, &mut isr);
        assert_eq!(isr[0], ISR_QUEUE);
        let mut gen = [0u8];
        d.common_read(common::CONFIG_GENERATION, &mut gen);
        assert_eq!(gen[0], 0);
        d.notify_config_change();
        d.common_read(common::CONFIG_GENERATION, &mut gen);
        assert_eq!(gen[0], 1);
        d.bar_read(ISR_CFG_OFFSET, &mut isr);
        assert_eq!(isr[0], ISR_CONFIG);
        // Paused: no events.
        Pausable::pause(&mut d).unwrap();
        d.handle_event(99);
        assert_eq!(d.device().events, 1);
        Pausable::resume(&mut d).unwrap();
        // Byte-wise write of the high byte of queue_select.
        d.common_write(common::QUEUE_SELECT + 1, &[1]);
        assert_eq!(d.queue_select, 0x100);
        d.common_write(common::QUEUE_SELECT, &[1]);
        assert_eq!(d.queue_select, 0x101);
        // Full reset also resets the device model.
        d.reset(ResetReason::LostConnection);
        assert_eq!(d.device().resets, 1);
        assert!(!d.is_active());
    }

    #[test]
    fn bad_queue_sizes() {
        struct Bad(Vec<u16>);
        impl VirtioDevice for Bad {
            fn device_type(&self) -> u32 {
                1
            }
            fn queue_max_sizes(&self) -> Vec<u16> {
                self.0.clone()
            }
            fn features(&self) -> u64 {
                0
            }
            fn read_config(&self, _offset: u64, _data: &mut [u8]) {}
            fn activate(&mut self, _features: u64) -> Result<(), VirtioError> {
                Ok(())
            }
            fn reset(&mut self) {}
            fn process_queue(
                &mut self,
                _index: usize,
                _queue: &mut Queue,
                _mem: &GuestMemory,
                _budget: usize,
            ) -> Result<usize, VirtioError> {
                Ok(0)
            }
        }
        for sizes in [vec![], vec![3], vec![0], vec![8; MAX_QUEUES + 1]] {
            let r = VirtioPciDevice::with_device(DeviceContext::default(), Bad(sizes), true);
            assert!(r.is_err());
        }
        let d =
            VirtioPciDevice::with_device(DeviceContext::default(), Bad(vec![8; MAX_QUEUES]), true)
                .unwrap();
        assert_eq!(d.msix_vectors(), MAX_QUEUES as u32 + 1);
    }

    #[test]
    fn windows() {
        assert!(matches!(bar_window(0, 4), Some(BarWindow::Common(0))));
        assert!(matches!(
            bar_window(0xffc, 4),
            Some(BarWindow::Common(0xffc))
        ));
        assert!(bar_window(0xffe, 4).is_none());
        assert!(matches!(bar_window(0x1000, 1), Some(BarWindow::Isr)));
        assert!(bar_window(0x1001, 1).is_none());
        assert!(matches!(bar_window(0x2004, 4), Some(BarWindow::Device(4))));
        assert!(matches!(bar_window(0x3008, 2), Some(BarWindow::Notify(8))));
        assert!(matches!(
            bar_window(0x5ff8, 8),
            Some(BarWindow::MsixTable(0x1ff8))
        ));
        assert!(matches!(bar_window(0x6000, 8), Some(BarWindow::MsixPba(0))));
        assert!(bar_window(0x7000, 4).is_none());
        assert!(bar_window(u64::MAX, 4).is_none());
    }
}
