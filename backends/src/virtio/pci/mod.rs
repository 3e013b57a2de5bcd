//! The virtio 1.x modern PCI transport (virtio spec 4.1), built on the
//! PCI function core ([`PciFunction`]).
//!
//! Layout of the single 64-bit memory BAR ([`VIRTIO_BAR_INDEX`],
//! [`VIRTIO_BAR_SIZE`] bytes):
//!
//! | offset                 | size   | contents                              |
//! |------------------------|--------|---------------------------------------|
//! | [`COMMON_CFG_OFFSET`]  | 0x1000 | `virtio_pci_common_cfg` ([`common_config`]) |
//! | [`ISR_CFG_OFFSET`]     | 0x1000 | ISR status (byte 0; reading clears)   |
//! | [`DEVICE_CFG_OFFSET`]  | 0x1000 | device configuration space            |
//! | [`NOTIFY_CFG_OFFSET`]  | 0x1000 | queue notify, [`NOTIFY_OFF_MULTIPLIER`] bytes per queue |
//! | [`MSIX_TABLE_OFFSET`]  | 0x2000 | MSI-X table (served by the function core) |
//! | [`MSIX_PBA_OFFSET`]    | 0x1000 | MSI-X PBA (served by the function core) |
//!
//! Config space carries, in this order: the PCI Express endpoint
//! capability (if PCIe), power management, MSI-X (queues + 1 vectors), and
//! the virtio common, ISR, notify, device and PCI-config-access
//! capabilities.

mod caps;
mod common_config;

use std::os::fd::RawFd;

use log::{error, warn};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use vfio_user_server::device::{DeviceContext, Interest, Lifecycle, ResetReason, WatchedFd};
use vfio_user_server::guest_memory::GuestMemoryHandle;
use vfio_user_server::pci::{
    PciBarConfiguration, PciBarPrefetchable, PciBarRegionType, PciCapability,
    PciConfigurationParams, PciDevice, PciDeviceError, PciExpressCap, PciFunction,
    PciFunctionState, PmCap,
};
use vfio_user_server::vm_migration::{
    Migratable, MigratableError, Pausable, Snapshot, Snapshottable, Transportable,
};
use vfio_user_server::warn_limited;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryBackend};

use self::caps::*;
use self::common_config::{CommonConfig, CommonConfigState, COMMON_CFG_SIZE};
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

/// Chains a queue gets through between two looks at whether the driver
/// wants an interrupt: small enough that the driver refills the ring while
/// the device works on, large enough to keep interrupts (wake-ups) few.
const SIGNAL_BATCH: usize = 16;
/// ISR bit: a used buffer notification.
const ISR_QUEUE: u8 = 0x1;
/// ISR bit: a configuration change.
const ISR_CONFIG: u8 = 0x2;

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

/// Which virtio structure an access falls in (the MSI-X windows are the
/// function core's).
enum BarWindow {
    Common(u64),
    Isr,
    Device(u64),
    Notify(u64),
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
    #[serde(flatten)]
    common: CommonConfigState,
    isr: u8,
    active: bool,
    queues: Vec<QueueSnapshot>,
    /// Configuration space and MSI-X table.
    #[serde(flatten)]
    pci: PciFunctionState,
}

/// Name of the child snapshot holding the device model's own state.
const DEVICE_SNAPSHOT_ID: &str = "device";

/// A [`VirtioDevice`] behind the virtio modern PCI transport.
///
/// A queue notification (BAR write) only marks the queue: the queue is
/// processed by [`Lifecycle::run_deferred`], which the server calls once
/// the doorbell's reply is on its way, so the driver is not held up while
/// the device works. A device model may leave requests in flight (on I/O
/// threads) and complete them from [`VirtioDevice::handle_event`]; they are
/// completed ([`VirtioDevice::quiesce`]) before the device pauses and
/// before guest memory is unmapped.
pub struct VirtioPciDevice<D: VirtioDevice> {
    device: D,
    memory: GuestMemoryHandle,
    pci: PciFunction,
    pci_cfg_cap: Option<usize>,
    common: CommonConfig,
    queues: Vec<Queue>,
    isr: u8,
    active: bool,
    paused: bool,
    /// The guest took bus mastering away (a kernel handing over to another
    /// with `kexec` clears it instead of resetting the device): nothing
    /// is taken off the rings and no device fd is watched until the
    /// device is reset or, bus mastering back, the driver rings a
    /// doorbell. The rings may be memory the guest uses for something
    /// else by then, and the new kernel sets the bit before it resets the
    /// device. (Firmware that never sets the bit, e.g. Cloud Hypervisor's,
    /// is served as before.)
    off_bus: bool,
    /// Resumed while the device was stopped on an error: its kept requests
    /// are retried ([`VirtioDevice::retry`]) before the rings are looked at.
    retry: bool,
    /// Queues whose doorbell rang (or that must be looked at) since they
    /// were last drained; processed by [`Lifecycle::run_deferred`].
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
        let mut pci = PciFunction::new(
            PciConfigurationParams {
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
            },
            ctx.irqs,
        );
        pci.add_bar(PciBarConfiguration::new(
            VIRTIO_BAR_INDEX,
            VIRTIO_BAR_SIZE,
            PciBarRegionType::Memory64BitRegion,
            PciBarPrefetchable::NotPrefetchable,
        ))?;
        if pcie {
            pci.add_capability(&PciExpressCap::endpoint())?;
        }
        pci.add_capability(&PmCap::new())?;
        pci.add_msix(
            msix_vectors,
            VIRTIO_BAR_INDEX,
            MSIX_TABLE_OFFSET,
            MSIX_PBA_OFFSET,
        )?;
        let bar = VIRTIO_BAR_INDEX as u8;
        let notify_len = queues.len() as u32 * NOTIFY_OFF_MULTIPLIER;
        let virtio_caps = [
            VirtioPciCap::new(
                CAP_COMMON_CFG,
                bar,
                COMMON_CFG_OFFSET as u32,
                COMMON_CFG_SIZE as u32,
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
            pci.add_capability(cap as &dyn PciCapability)?;
        }
        let pci_cfg_cap = match pci.add_capability(&VirtioPciCap::pci_cfg()) {
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
            pci,
            pci_cfg_cap,
            common: CommonConfig::new(device_features, n, msix_vectors),
            queues,
            kicked: vec![false; n],
            isr: 0,
            active: false,
            paused: false,
            off_bus: false,
            retry: false,
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
        self.common.status
    }

    /// The features the driver acknowledged.
    pub fn driver_features(&self) -> u64 {
        self.common.driver_features
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
        self.common.config_generation = self.common.config_generation.wrapping_add(1);
        if self.common.status & status::DRIVER_OK != 0 {
            self.signal(self.common.msix_config, ISR_CONFIG);
        }
    }

    /// Back to the state after power-on, as far as the virtio device goes
    /// (status 0 or DEVICE_RESET): queues disabled, features forgotten.
    fn reset_device(&mut self) {
        self.device.reset();
        for q in self.queues.iter_mut() {
            q.reset();
        }
        self.common.reset();
        self.isr = 0;
        self.pci.intx_deassert();
        self.active = false;
        self.retry = false;
        self.kicked.fill(false);
        self.off_bus = false;
    }

    /// Raises an interrupt: MSI-X `vector`, or INTx with `isr_bit` set in
    /// the ISR when MSI-X is off.
    fn signal(&mut self, vector: u16, isr_bit: u8) {
        if !self.pci.config().msix_enabled() {
            self.isr |= isr_bit;
        } else if vector == VIRTIO_MSI_NO_VECTOR {
            return;
        }
        self.pci.signal_or_log(u32::from(vector));
    }

    /// Signals queue `index` if the driver wants to hear about it.
    fn signal_used(&mut self, index: usize, mem: &GuestMemory) {
        let Some(q) = self.queues.get_mut(index) else {
            return;
        };
        // If the used event index cannot be read, interrupt anyway.
        if q.needs_notification(mem).unwrap_or(true) {
            let vector = self.common.queue_vectors[index];
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
            warn_limited!("virtio-pci: queue {index}: {e}");
            return None;
        }
        let used_before = q.next_used();
        let n = match self.device.process_queue(index, q, mem, SIGNAL_BATCH) {
            Ok(n) => n,
            Err(e) => {
                warn_limited!("virtio-pci: queue {index}: {e}");
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
                warn_limited!("virtio-pci: queue {index}: {e}");
                return true;
            }
        }
        // If nothing can be taken although the available index says there
        // is more, the ring is broken: wait for the next doorbell.
        !matches!(self.process_batch(index, mem), Some(n) if n > 0)
    }

    /// Whether the rings of every ready queue lie in guest memory.
    fn rings_mapped(&self, mem: &GuestMemory) -> bool {
        self.queues.iter().filter(|q| q.ready()).all(|q| {
            let n = usize::from(q.size());
            let mapped = |addr: u64, len: usize| {
                GuestMemoryBackend::check_range(mem, GuestAddress(addr), len)
            };
            mapped(q.desc_table(), 16 * n)
                && mapped(q.avail_ring(), 6 + 2 * n)
                && mapped(q.used_ring(), 6 + 8 * n)
        })
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
        if self.device.take_config_change() {
            self.notify_config_change();
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
        let event_idx = self.common.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for q in self.queues.iter_mut() {
            q.set_event_idx(event_idx);
        }
        match self.device.activate(self.common.driver_features) {
            Ok(()) => {
                self.active = true;
                // E.g. a restored device asks the guest to announce itself.
                if self.device.take_config_change() {
                    self.notify_config_change();
                }
            }
            Err(e) => {
                error!("virtio-pci: activation failed: {e}");
                self.common.status |= status::NEEDS_RESET;
                self.signal(self.common.msix_config, ISR_CONFIG);
            }
        }
    }

    fn write_status(&mut self, value: u8) {
        if value == 0 {
            self.reset_device();
            return;
        }
        let old = self.common.status;
        // Drivers never clear bits other than by writing 0.
        let mut new = old | value;
        if new & status::FEATURES_OK != 0
            && old & status::FEATURES_OK == 0
            && self.common.driver_features & (1 << VIRTIO_F_VERSION_1) == 0
        {
            // Legacy-only drivers are refused: FEATURES_OK does not stick.
            new &= !status::FEATURES_OK;
        }
        self.common.status = new;
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

    fn common_read(&self, offset: u64, data: &mut [u8]) {
        self.common.read(offset, data, &self.queues);
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        if let Some(status) = self.common.write(offset, data, &mut self.queues) {
            self.write_status(status);
        }
    }

    fn notify(&mut self, offset: u64) {
        if self.off_bus {
            if !self.pci.config().bus_master() {
                // A doorbell the device cannot answer: dropped.
                return;
            }
            // Bus mastering is back and the driver wants the device again.
            self.off_bus = false;
        }
        let index = offset / u64::from(NOTIFY_OFF_MULTIPLIER);
        if let Ok(index) = usize::try_from(index) {
            self.kick(index);
        }
    }

    fn bar_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if self.pci.read_bar(VIRTIO_BAR_INDEX, offset, data) {
            return;
        }
        match bar_window(offset, data.len() as u64) {
            Some(BarWindow::Common(o)) => self.common_read(o, data),
            Some(BarWindow::Isr) => {
                if let Some(b) = data.first_mut() {
                    // Reading the ISR acknowledges it (virtio 1.x 4.1.4.5):
                    // the INTx line goes down.
                    *b = self.isr;
                    self.isr = 0;
                    self.pci.intx_deassert();
                }
            }
            Some(BarWindow::Device(o)) => self.device.read_config(o, data),
            Some(BarWindow::Notify(_)) | None => {}
        }
    }

    fn bar_write(&mut self, offset: u64, data: &[u8]) {
        if self.pci.write_bar(VIRTIO_BAR_INDEX, offset, data) {
            return;
        }
        match bar_window(offset, data.len() as u64) {
            Some(BarWindow::Common(o)) => self.common_write(o, data),
            Some(BarWindow::Device(o)) => self.device.write_config(o, data),
            Some(BarWindow::Notify(o)) => self.notify(o),
            Some(BarWindow::Isr) | None => {}
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
        let reg = |at: usize| self.pci.read_config_register((cap + at) / 4);
        let bar = reg(PCI_CFG_BAR) & 0xff;
        let offset = u64::from(reg(PCI_CFG_OFFSET));
        let length = reg(PCI_CFG_LENGTH) as usize;
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
            .zip(&self.common.queue_vectors)
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
            common: self.common.state(),
            isr: self.isr,
            active: self.active,
            queues,
            pci: self.pci.state(),
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
        let missing = s.common.driver_features & !self.common.device_features;
        if missing != 0 {
            return Err(format!(
                "features {missing:#x} negotiated in the snapshot are not offered by this device"
            ));
        }
        let event_idx = s.common.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = Vec::with_capacity(s.queues.len());
        for (qs, q) in s.queues.iter().zip(&self.queues) {
            if qs.max_size != q.max_size() {
                return Err(format!("queue max size {} in snapshot", qs.max_size));
            }
            queues.push(Self::restore_queue(qs, event_idx).map_err(|e| e.to_string())?);
        }
        let mut pci = self.pci.clone();
        pci.set_state(&s.pci).map_err(|e| e.to_string())?;

        // A device that refuses the state goes back to the one it had: a
        // refused stream leaves the function as it was, not half-applied.
        // The device is activated (if the state is active) before the
        // transport takes the state, so that nothing can fail after.
        let previous = self.device.snapshot().map_err(|e| e.to_string())?;
        self.device.reset();
        let applied = self.device.restore(device).and_then(|()| {
            if s.active {
                (self.device)
                    .activate(s.common.driver_features)
                    .map_err(|e| MigratableError::Restore(e.to_string()))
            } else {
                Ok(())
            }
        });
        if let Err(e) = applied {
            self.device.reset();
            let back = self.device.restore(previous.as_ref()).and_then(|()| {
                if self.active {
                    self.device
                        .activate(self.common.driver_features)
                        .map_err(|e| MigratableError::Restore(e.to_string()))
                } else {
                    Ok(())
                }
            });
            if let Err(back) = back {
                error!("virtio-pci: the device's previous state did not come back: {back}");
            }
            return Err(e.to_string());
        }
        self.pci = pci;
        self.queues = queues;
        let vectors: Vec<u16> = s.queues.iter().map(|q| q.vector).collect();
        self.common.set_state(&s.common, &vectors);
        self.isr = s.isr;
        self.active = s.active;
        self.retry = false;
        self.off_bus = false;
        Ok(())
    }
}

/// Pause completes the requests in flight, then nothing is taken off the
/// rings until resume. Resume also lets a device that stopped on an error
/// go on, retrying the requests it kept first.
impl<D: VirtioDevice + 'static> Pausable for VirtioPciDevice<D> {
    fn pause(&mut self) -> Result<(), MigratableError> {
        self.quiesce();
        self.paused = true;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), MigratableError> {
        self.paused = false;
        // The retry runs as deferred work: guest memory may not be mapped
        // yet (a device restored before its client attached).
        self.retry |= self.device.stopped_on_error().is_some();
        // Pick up whatever was made available while paused (or before the
        // snapshot this device was restored from).
        self.kick_all();
        // A change made while paused (a device restored active) is told
        // now, with the interrupts in place.
        if self.active && self.device.take_config_change() {
            self.notify_config_change();
        }
        Ok(())
    }
}

impl<D: VirtioDevice + 'static> Snapshottable for VirtioPciDevice<D> {
    /// The kind of virtio device (`virtio-blk`, `virtio-net`, ...).
    fn id(&self) -> String {
        match self.device.device_type() {
            virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK => "virtio-blk".into(),
            virtio_bindings::virtio_ids::VIRTIO_ID_NET => "virtio-net".into(),
            t => format!("virtio-{t}"),
        }
    }

    /// The transport (queues, features, status, config space, MSI-X),
    /// with the device model's own state as a child.
    fn snapshot(&mut self) -> Result<Snapshot, MigratableError> {
        let mut snapshot = Snapshot::new_from_state(&self.state())?;
        if let Some(device) = self.device.snapshot()? {
            snapshot.add_snapshot(DEVICE_SNAPSHOT_ID.to_string(), device);
        }
        Ok(snapshot)
    }
}

impl<D: VirtioDevice + 'static> Transportable for VirtioPciDevice<D> {}

impl<D: VirtioDevice + 'static> Migratable for VirtioPciDevice<D> {}

impl<D: VirtioDevice + 'static> Lifecycle for VirtioPciDevice<D> {
    fn reset(&mut self, _reason: ResetReason) {
        self.reset_device();
        self.pci.reset();
        self.paused = false;
    }

    fn restore(&mut self, snapshot: &Snapshot) -> Result<(), MigratableError> {
        let state: VirtioPciState = snapshot.to_state()?;
        self.set_state(&state, snapshot.snapshots.get(DEVICE_SNAPSHOT_ID))
            .map_err(MigratableError::Restore)
    }

    fn migratable(&self) -> bool {
        true
    }

    fn stopped_on_error(&self) -> Option<String> {
        self.device.stopped_on_error().map(str::to_string)
    }

    fn dma_unmapping(&mut self, _address: u64, _size: u64) {
        // Requests in flight may use the range: finish them while it is
        // still mapped.
        self.quiesce();
    }

    fn watched_fds(&self) -> &[WatchedFd] {
        // Events are not handled while paused, or while the guest keeps the
        // device off the bus: an fd that stays ready (a TAP with frames
        // waiting, a timer that fired) would wake the event loop over and
        // over until then.
        if self.paused || self.off_bus {
            return &[];
        }
        self.device.watched_fds()
    }

    fn handle_event(&mut self, fd: RawFd, ready: Interest) {
        if self.off_bus {
            return;
        }
        self.complete_in_flight(|device, queues, mem| device.handle_event(fd, ready, queues, mem));
    }

    /// Takes requests off the rings, unless the guest took the device off
    /// the bus (see `off_bus`).
    fn run_deferred(&mut self) -> bool {
        if !self.active
            || self.paused
            || self.off_bus
            || !(self.retry || self.kicked.contains(&true))
        {
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
        if self.retry {
            // The requests kept on an error go first, then the rings. A
            // client maps guest memory a region at a time: a kept chain
            // walked before its rings are back would be lost.
            if !self.rings_mapped(mem) {
                return false;
            }
            self.retry = false;
            for index in self.device.retry(&mut self.queues, mem) {
                self.signal_used(index, mem);
            }
            self.kick_all();
            return true;
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
}

/// Config space is the function's, with the virtio PCI-config-access
/// capability's data register as a window into the BAR.
impl<D: VirtioDevice + 'static> PciDevice for VirtioPciDevice<D> {
    fn pci_function(&mut self) -> Option<&mut PciFunction> {
        Some(&mut self.pci)
    }

    fn write_config_register(&mut self, reg_idx: usize, offset: u64, data: &[u8]) {
        let bus_master = self.pci.config().bus_master();
        self.pci.write_config_register(reg_idx, offset, data);
        if bus_master && !self.pci.config().bus_master() {
            self.off_bus = true;
        }
        if Some(reg_idx) == self.pci_cfg_data_reg() {
            if let Some((bar_offset, len)) = self.pci_cfg_window() {
                let value = self.pci.read_config_register(reg_idx).to_le_bytes();
                self.bar_write(bar_offset, &value[..len]);
            }
        }
    }

    fn read_config_register(&mut self, reg_idx: usize) -> u32 {
        if Some(reg_idx) == self.pci_cfg_data_reg() {
            if let Some((bar_offset, len)) = self.pci_cfg_window() {
                let mut value = [0u8; 4];
                self.bar_read(bar_offset, &mut value[..len]);
                return u32::from_le_bytes(value);
            }
        }
        self.pci.read_config_register(reg_idx)
    }

    fn read_bar(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        if self.pci.bar_index(base) != Some(VIRTIO_BAR_INDEX) {
            data.fill(0);
            return;
        }
        self.bar_read(offset, data);
    }

    fn write_bar(&mut self, base: u64, offset: u64, data: &[u8]) {
        if self.pci.bar_index(base) == Some(VIRTIO_BAR_INDEX) {
            self.bar_write(offset, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::common_config::offset as common;
    use super::*;
    use crate::virtio::VirtioError;
    use vfio_user_server::irq::IrqIndexInfo;
    use vfio_user_server::pci::PciAdapter;
    use vfio_user_server::Device;

    /// A device that refuses to activate and counts events.
    struct Dummy {
        fds: [WatchedFd; 1],
        fail: bool,
        resets: usize,
        events: usize,
        /// Stopped on an error, as a storage device would.
        stopped: Option<String>,
        retries: usize,
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
        fn watched_fds(&self) -> &[WatchedFd] {
            &self.fds
        }
        fn handle_event(
            &mut self,
            fd: RawFd,
            _ready: Interest,
            queues: &mut [Queue],
            _mem: &GuestMemory,
        ) -> Vec<usize> {
            assert_eq!(fd, 99);
            assert_eq!(queues.len(), 2);
            self.events += 1;
            vec![1, 7]
        }
        fn stopped_on_error(&self) -> Option<&str> {
            self.stopped.as_deref()
        }
        fn retry(&mut self, queues: &mut [Queue], _mem: &GuestMemory) -> Vec<usize> {
            assert_eq!(queues.len(), 2);
            self.retries += 1;
            self.stopped = None;
            vec![0]
        }
    }

    fn dummy(fail: bool) -> VirtioPciDevice<Dummy> {
        let ctx = DeviceContext::default();
        ctx.irqs.configure(&IrqIndexInfo::pci_layout(true, 0, 3));
        let d = Dummy {
            fds: [WatchedFd::readable(99)],
            fail,
            resets: 0,
            events: 0,
            stopped: None,
            retries: 0,
        };
        let mut d = VirtioPciDevice::with_device(ctx, d, false).unwrap();
        // Memory space and bus mastering on, as the guest's PCI core
        // leaves them.
        d.write_config_register(1, 0, &[0x06, 0]);
        d
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
        assert_eq!(d.pci.msix_vectors(), 3);
        assert_eq!(d.watched_fds(), &[WatchedFd::readable(99)]);
        let mut b = [0u8; 2];
        d.bar_read(DEVICE_CFG_OFFSET + 5, &mut b);
        assert_eq!(b, [5, 5]);
        assert_eq!(
            d.common.device_features,
            (1 << 3) | (1 << VIRTIO_F_VERSION_1)
        );
        // The adapter reads the layout from config space: 256 bytes
        // (no PCIe), INTx, 3 MSI-X vectors.
        let a = PciAdapter::new(d).unwrap();
        assert_eq!(a.region(7).size, 256);
        let counts: Vec<u32> = a.irq_layout().iter().map(|i| i.count).collect();
        assert_eq!(counts, [1, 0, 3, 1, 1]);
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
        d.handle_event(99, Interest::READ);
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
        d.handle_event(99, Interest::READ);
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
        d.handle_event(99, Interest::READ);
        assert_eq!(d.device().events, 1);
        Pausable::resume(&mut d).unwrap();
        // Byte-wise write of the high byte of queue_select.
        d.common_write(common::QUEUE_SELECT + 1, &[1]);
        assert_eq!(d.common.state().queue_select, 0x100);
        d.common_write(common::QUEUE_SELECT, &[1]);
        assert_eq!(d.common.state().queue_select, 0x101);
        // Full reset also resets the device model.
        d.reset(ResetReason::LostConnection);
        assert_eq!(d.device().resets, 1);
        assert!(!d.is_active());
    }

    #[test]
    fn bus_mastering_taken_away_holds_the_device_until_a_doorbell_or_reset() {
        // Firmware that never sets bus mastering (Cloud Hypervisor's) is
        // served: only taking it away stops the device.
        let mut d = dummy(false);
        // Power-on config space (bus mastering off), memory space on.
        d.reset(ResetReason::LostConnection);
        d.write_config_register(1, 0, &[0x02, 0]);
        bring_up(&mut d);
        assert_eq!(d.watched_fds(), &[WatchedFd::readable(99)]);
        d.handle_event(99, Interest::READ);
        assert_eq!(d.device().events, 1);
        // On, then off (a kernel handing over with kexec): nothing watched
        // or handled, doorbells dropped.
        d.write_config_register(1, 0, &[0x06, 0]);
        d.write_config_register(1, 0, &[0x02, 0]);
        assert!(d.watched_fds().is_empty());
        d.handle_event(99, Interest::READ);
        assert_eq!(d.device().events, 1);
        d.kicked.fill(false);
        d.notify(0);
        assert!(!d.kicked.contains(&true));
        // The new kernel turns it on before it resets the device: still
        // held, until its driver rings.
        d.write_config_register(1, 0, &[0x06, 0]);
        assert!(d.watched_fds().is_empty());
        d.notify(0);
        assert_eq!(d.watched_fds(), &[WatchedFd::readable(99)]);
        assert!(d.kicked[0]);
        // A reset lets the device go too.
        d.write_config_register(1, 0, &[0x02, 0]);
        assert!(d.watched_fds().is_empty());
        d.common_write(common::DEVICE_STATUS, &[0]);
        assert_eq!(d.watched_fds(), &[WatchedFd::readable(99)]);
    }

    #[test]
    fn a_device_stopped_on_an_error_retries_once_resumed_and_its_rings_mapped() {
        use vm_memory::bitmap::AtomicBitmap;
        let mut d = dummy(false);
        bring_up(&mut d);
        // Queue 0 of 8 with its rings at 0x10000.
        d.common_write(common::QUEUE_SELECT, &0u16.to_le_bytes());
        d.common_write(common::QUEUE_DESC, &0x10000u64.to_le_bytes());
        d.common_write(common::QUEUE_DRIVER, &0x10800u64.to_le_bytes());
        d.common_write(common::QUEUE_DEVICE, &0x11000u64.to_le_bytes());
        d.common_write(common::QUEUE_ENABLE, &1u16.to_le_bytes());
        assert!(d.queues[0].ready());
        d.device_mut().stopped = Some("write: No space left on device".into());
        assert_eq!(
            Lifecycle::stopped_on_error(&d).as_deref(),
            Some("write: No space left on device")
        );
        assert!(!d.run_deferred(), "nothing to do before the resume");
        Pausable::resume(&mut d).unwrap();
        // No guest memory, then only part of it: the retry waits.
        assert!(!d.run_deferred());
        let map = |ranges: &[(u64, usize)]| {
            let ranges: Vec<_> = ranges.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
            vm_memory::GuestMemoryMmap::<AtomicBitmap>::from_ranges(&ranges).unwrap()
        };
        d.memory.lock().unwrap().replace(map(&[(0, 0x10000)]));
        assert!(!d.run_deferred());
        d.memory
            .lock()
            .unwrap()
            .replace(map(&[(0, 0x10000), (0x10000, 0x10000)]));
        assert_eq!(d.device().retries, 0);
        assert!(d.run_deferred());
        assert_eq!(d.device().retries, 1);
        assert_eq!(Lifecycle::stopped_on_error(&d), None);
        // Once.
        while d.run_deferred() {}
        assert_eq!(d.device().retries, 1);
        // A resume of a device that is not stopped retries nothing; a reset
        // forgets a pending retry.
        Pausable::resume(&mut d).unwrap();
        while d.run_deferred() {}
        d.device_mut().stopped = Some("again".into());
        Pausable::resume(&mut d).unwrap();
        d.reset(ResetReason::LostConnection);
        bring_up(&mut d);
        while d.run_deferred() {}
        assert_eq!(d.device().retries, 1);
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
        assert_eq!(d.pci.msix_vectors(), MAX_QUEUES as u16 + 1);
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
        // The MSI-X windows are the function core's.
        assert!(bar_window(0x5ff8, 8).is_none());
        assert!(bar_window(0x6000, 8).is_none());
        assert!(bar_window(0x7000, 4).is_none());
        assert!(bar_window(u64::MAX, 4).is_none());
    }
}
