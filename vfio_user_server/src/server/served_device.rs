//! The device and everything the server keeps for it across clients: the
//! DMA table, the interrupt eventfds, the migration state, and whether the
//! control socket holds it paused. The command handlers
//! ([`super::commands`]) act on it.

use log::{info, warn};

use super::config::ServerConfig;
use super::migration::MigrationState;
use super::saved_state;
use crate::device::{Device, DeviceContext, Lifecycle, ResetReason};
use crate::guest_memory::DmaTable;
use crate::irq::Irqs;
use crate::message_dma::MessageDma;
use crate::vm_migration::{MigratableError, Snapshot};

/// What every access to a region is checked against.
pub(super) struct RegionLimits {
    pub(super) size: u64,
    pub(super) read: bool,
    pub(super) write: bool,
}

/// A device as the server serves it.
pub(super) struct ServedDevice {
    pub(super) device: Box<dyn Device>,
    /// The device's id, which names the kind of its saved state.
    kind: String,
    pub(super) irqs: Irqs,
    pub(super) dma: DmaTable,
    pub(super) config: ServerConfig,
    pub(super) mig: MigrationState,
    pub(super) num_regions: u32,
    /// Size and access of every region, read once (region layouts are
    /// fixed for a device's lifetime); checked on every access.
    pub(super) regions: Vec<RegionLimits>,
    /// Paused through [`ServedDevice::pause`] (the control socket).
    pub(super) paused: bool,
    /// Set by [`ServedDevice::restore`]: the restored queues may hold
    /// requests made available before the snapshot, whose buffers may lie
    /// in any of the client's memory; the device does nothing (no deferred
    /// work, no fds watched) until the client, done mapping it, installs
    /// its interrupts.
    pub(super) resume_on_irqs: bool,
    pub(super) message_dma: MessageDma,
    /// `sigbus::faults()` when guest memory was last checked.
    pub(super) faults_seen: u64,
    /// The process that handed the device over held it paused.
    pub(super) held_at_handover: bool,
}

impl ServedDevice {
    /// Serves `device`, built with `ctx`; reads its region and interrupt
    /// layout once.
    pub(super) fn new(
        mut device: Box<dyn Device>,
        ctx: DeviceContext,
        config: ServerConfig,
    ) -> Self {
        ctx.irqs.configure(&device.irq_layout());
        let num_regions = device.num_regions();
        let regions = (0..num_regions)
            .map(|i| {
                let d = device.region(i);
                RegionLimits {
                    size: d.size,
                    read: d.read,
                    write: d.write,
                }
            })
            .collect();
        let kind = device.lifecycle().id();
        ServedDevice {
            device,
            kind,
            irqs: ctx.irqs,
            dma: DmaTable::new(ctx.memory, config.dma_limits),
            config,
            mig: MigrationState::default(),
            num_regions,
            regions,
            paused: false,
            resume_on_irqs: false,
            message_dma: ctx.message_dma,
            faults_seen: crate::sigbus::faults(),
            held_at_handover: false,
        }
    }

    /// The device's id ([`crate::vm_migration::Snapshottable::id`]).
    pub(super) fn device_id(&self) -> String {
        self.kind.clone()
    }

    /// The device's lifecycle.
    pub(super) fn lifecycle(&mut self) -> &mut dyn Lifecycle {
        self.device.lifecycle()
    }

    /// Pauses the device (no DMA, no interrupts) for a snapshot.
    pub(super) fn pause(&mut self) -> Result<(), MigratableError> {
        if !self.paused {
            self.lifecycle().pause()?;
            self.paused = true;
        }
        Ok(())
    }

    /// Resumes after [`ServedDevice::pause`], or after the device stopped
    /// by itself on an error ([`Lifecycle::stopped_on_error`]), which
    /// retries what failed; a device the migration state holds stopped
    /// stays stopped until that state lets it run.
    pub(super) fn resume(&mut self) -> Result<(), MigratableError> {
        if self.paused {
            if !self.mig.device_stopped() {
                self.lifecycle().resume()?;
            }
            self.paused = false;
        } else if !self.mig.device_stopped() && self.lifecycle().stopped_on_error().is_some() {
            self.lifecycle().resume()?;
        }
        Ok(())
    }

    /// The device's state with its interrupt state; it must be paused.
    pub(super) fn snapshot(&mut self) -> Result<Snapshot, MigratableError> {
        if !self.paused {
            return Err(MigratableError::Snapshot("pause the device first".into()));
        }
        let irqs = self.irqs.clone();
        saved_state::snapshot(self.lifecycle(), &irqs)
    }

    /// Replaces the device state with `snapshot` (with no client
    /// attached), then lets the device run.
    pub(super) fn restore(&mut self, snapshot: &Snapshot) -> Result<(), MigratableError> {
        let irqs = self.irqs.clone();
        let device = self.lifecycle();
        device.pause()?;
        if let Err(e) = saved_state::restore(device, &irqs, snapshot) {
            // Refused, nothing applied: the device goes on as it was.
            if !self.paused {
                if let Err(r) = self.lifecycle().resume() {
                    warn!("the device does not resume after a refused restore: {r}");
                }
            }
            return Err(e);
        }
        self.paused = false;
        self.resume_on_irqs = true;
        self.lifecycle().resume()
    }

    /// Applies the state of a device handed over by another process, whose
    /// guest memory and interrupt eventfds are already in place. The
    /// device stays paused: it goes on where the other one paused at
    /// [`ServedDevice::start_handed_over`], once the other process let go
    /// (a restored device may signal at once, a configuration change say),
    /// or stays paused if the control socket held it (`held`).
    pub(super) fn restore_handed_over(
        &mut self,
        snapshot: &Snapshot,
        held: bool,
    ) -> Result<(), MigratableError> {
        let irqs = self.irqs.clone();
        let device = self.lifecycle();
        device.pause()?;
        saved_state::restore(device, &irqs, snapshot)?;
        self.paused = true;
        self.held_at_handover = held;
        Ok(())
    }

    /// Lets a device restored by [`ServedDevice::restore_handed_over`] go
    /// on, unless the control socket held it.
    pub(super) fn start_handed_over(&mut self) -> Result<(), MigratableError> {
        if self.held_at_handover || !self.paused {
            return Ok(());
        }
        self.paused = false;
        self.lifecycle().resume()
    }

    /// Tells the device every DMA range is going away, then drops them all.
    pub(super) fn unmap_all(&mut self) {
        let ranges: Vec<(u64, u64)> = self.dma.ranges().map(|r| (r.address, r.size)).collect();
        for (a, s) in ranges {
            self.lifecycle().dma_unmapping(a, s);
        }
        self.dma.unmap_all();
    }

    /// The client is gone: DMA maps and interrupt fds go, migration
    /// returns to RUNNING and the device is reset, unless the control
    /// socket holds it paused (a snapshot may still be taken of it).
    pub(super) fn client_gone(&mut self) {
        self.unmap_all();
        self.irqs.clear();
        let held = self.paused;
        let device = self.device.lifecycle();
        self.mig.reset(device, held);
        if held {
            info!("client left while paused: device state kept");
            return;
        }
        device.reset(ResetReason::LostConnection);
        self.resume_on_irqs = false;
    }

    /// Whether the device touched guest memory that the client took away
    /// by truncating its file (see [`crate::sigbus`]). Cheap when nothing
    /// happened.
    pub(super) fn guest_memory_lost(&mut self) -> bool {
        let faults = crate::sigbus::faults();
        if faults == self.faults_seen {
            return false;
        }
        self.faults_seen = faults;
        let Some(address) = self.dma.take_fault() else {
            return false;
        };
        warn!("the client truncated the guest memory mapped at {address:#x}: dropping it");
        true
    }

    /// The client signalled its interrupt unmask eventfd (the guest's EOI
    /// of INTx under KVM): unmask, and deliver what is pending.
    pub(super) fn irq_unmask_signalled(&mut self) {
        if let Some(index) = self.irqs.unmask_signalled() {
            self.lifecycle().irq_mask_changed(index, 0, 1, false);
        }
    }

    /// Checks a region access.
    pub(super) fn check_access(
        &self,
        index: u32,
        offset: u64,
        count: u32,
        write: bool,
    ) -> Result<(), i32> {
        if count > self.config.max_data_xfer_size {
            return Err(libc::EINVAL);
        }
        let Some(r) = self.regions.get(index as usize) else {
            return Err(libc::EINVAL);
        };
        let allowed = if write { r.write } else { r.read };
        match offset.checked_add(count as u64) {
            Some(end) if end <= r.size && allowed => Ok(()),
            _ => Err(libc::EINVAL),
        }
    }
}
