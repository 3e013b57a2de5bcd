//! A device registers its own fds (a back-end completion, a timer) in the
//! server's event loop: readiness reaches `Device::handle_event` on the
//! loop thread, and the device can raise an interrupt from there.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use integration_tests::*;
use vfio_user_server::irq::IrqIndexInfo;
use vfio_user_server::vm_migration::{Migratable, Pausable, Snapshottable, Transportable};
use vfio_user_server::{
    Device, DeviceContext, DeviceError, Interest, Lifecycle, RegionDescription, ResetReason,
    WatchedFd,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Raises MSI-X vector 0 each time its completion eventfd fires.
struct CompletionDevice {
    completion: EventFd,
    watched: [WatchedFd; 1],
    ctx: DeviceContext,
    seen: Arc<Mutex<u64>>,
}

impl Device for CompletionDevice {
    fn region(&self, index: u32) -> RegionDescription {
        let size = if index == 7 { 256 } else { 0 };
        RegionDescription {
            size,
            read: size > 0,
            write: size > 0,
            mmap: None,
        }
    }

    fn irq_layout(&self) -> Vec<IrqIndexInfo> {
        IrqIndexInfo::pci_layout(true, 0, 1)
    }

    fn region_read(&mut self, _i: u32, _o: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        data.fill(0);
        Ok(())
    }

    fn region_write(&mut self, _i: u32, _o: u64, _d: &[u8]) -> Result<(), DeviceError> {
        Ok(())
    }
}

impl Pausable for CompletionDevice {}
impl Snapshottable for CompletionDevice {}
impl Transportable for CompletionDevice {}
impl Migratable for CompletionDevice {}

impl Lifecycle for CompletionDevice {
    fn reset(&mut self, _reason: ResetReason) {}

    fn watched_fds(&self) -> &[WatchedFd] {
        &self.watched
    }

    fn handle_event(&mut self, fd: RawFd, ready: Interest) {
        assert!(ready.read);
        assert_eq!(fd, self.completion.as_raw_fd());
        if let Ok(n) = self.completion.read() {
            *self.seen.lock().unwrap() += n;
            let _ = self.ctx.irqs.trigger(2, 0);
        }
    }
}

#[test]
fn device_fds_are_served_by_the_loop() {
    let ctx = DeviceContext::default();
    let completion = EventFd::new(EFD_NONBLOCK).unwrap();
    let kick = completion.try_clone().unwrap();
    let seen = Arc::new(Mutex::new(0));
    let dev = CompletionDevice {
        watched: [WatchedFd::readable(completion.as_raw_fd())],
        completion,
        ctx: ctx.clone(),
        seen: seen.clone(),
    };
    let s = spawn_devices(
        vec![(Box::new(dev) as Box<dyn Device>, ctx)],
        Default::default(),
    );
    let mut c = RawClient::connect_negotiated(s.path());
    let irq = eventfd();
    c.set_irqs(
        integration_tests::proto::IRQ_DATA_EVENTFD | integration_tests::proto::IRQ_ACTION_TRIGGER,
        2,
        0,
        1,
        &[],
        &[irq.as_raw_fd()],
    )
    .ok();
    // The "back end" completes: the loop wakes the device, which raises
    // its interrupt without any message from the client.
    kick.write(1).unwrap();
    assert_eq!(eventfd_wait(&irq, 5000), Some(1));
    kick.write(2).unwrap();
    assert_eq!(eventfd_wait(&irq, 5000), Some(1));
    assert!(wait_until(std::time::Duration::from_secs(5), || *seen
        .lock()
        .unwrap()
        == 3));
    // The client's connection is unaffected.
    c.ping();
}
