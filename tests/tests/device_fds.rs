//! A device registers its own fds (a back-end completion, a timer, a TAP)
//! in the server's event loop: readiness reaches `Lifecycle::handle_event`
//! on the loop thread, the device can raise an interrupt from there, and it
//! can stop and restart watching an fd.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use integration_tests::device::bar0_and_config_region;
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

/// A device whose fd stays readable (a TAP with packets waiting while the
/// guest posted no receive buffers): it takes one event, then stops
/// watching the fd until a BAR write says buffers arrived. With `pause`
/// false it keeps watching without reading, as a device that cannot
/// change its interest would.
struct LevelDevice {
    level: EventFd,
    watched: [WatchedFd; 1],
    pause: bool,
    events: Arc<AtomicU64>,
}

impl Device for LevelDevice {
    fn region(&self, index: u32) -> RegionDescription {
        bar0_and_config_region(index)
    }

    fn irq_layout(&self) -> Vec<IrqIndexInfo> {
        IrqIndexInfo::pci_layout(true, 0, 1)
    }

    fn region_read(&mut self, _i: u32, _o: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        data.fill(0);
        Ok(())
    }

    fn region_write(&mut self, index: u32, _o: u64, _d: &[u8]) -> Result<(), DeviceError> {
        if index == 0 {
            // "Receive buffers posted": watch the fd again.
            self.watched[0].interest = Interest::READ;
        }
        Ok(())
    }
}

impl Pausable for LevelDevice {}
impl Snapshottable for LevelDevice {}
impl Transportable for LevelDevice {}
impl Migratable for LevelDevice {}

impl Lifecycle for LevelDevice {
    fn reset(&mut self, _reason: ResetReason) {}

    fn watched_fds(&self) -> &[WatchedFd] {
        &self.watched
    }

    fn handle_event(&mut self, fd: RawFd, ready: Interest) {
        assert_eq!(fd, self.level.as_raw_fd());
        assert!(ready.read);
        self.events.fetch_add(1, Ordering::SeqCst);
        if self.pause {
            // Nothing to put the data in: stop watching, leave it unread.
            self.watched[0].interest = Interest::NONE;
        }
    }
}

/// Starts a `LevelDevice` whose fd is readable from the start.
fn level_device(pause: bool) -> (TestServer, RawClient, Arc<AtomicU64>) {
    let level = EventFd::new(EFD_NONBLOCK).unwrap();
    level.write(1).unwrap();
    let events = Arc::new(AtomicU64::new(0));
    let dev = LevelDevice {
        watched: [WatchedFd::readable(level.as_raw_fd())],
        level,
        pause,
        events: events.clone(),
    };
    let s = spawn_devices(
        vec![(Box::new(dev) as Box<dyn Device>, DeviceContext::default())],
        Default::default(),
    );
    let c = RawClient::connect_negotiated(s.path());
    (s, c, events)
}

const WINDOW: Duration = Duration::from_millis(400);

#[test]
fn a_device_that_stops_reading_a_readable_fd_lets_the_loop_sleep() {
    let (s, mut c, events) = level_device(true);
    assert!(wait_until(Duration::from_secs(5), || events
        .load(Ordering::SeqCst)
        == 1));
    for round in 1..=2u64 {
        let cpu = s.loop_cpu_time();
        std::thread::sleep(WINDOW);
        let used = s.loop_cpu_time() - cpu;
        // The fd is still readable, but out of the epoll set: no event,
        // and the loop sleeps (a spinning loop would use the whole window).
        assert_eq!(events.load(Ordering::SeqCst), round);
        assert!(used < WINDOW / 8, "loop used {used:?} of {WINDOW:?}");
        // Watching again delivers the level at once, once.
        let reply = c.call(
            integration_tests::proto::cmd::REGION_WRITE,
            &payload::region_access(0, 0, 4, &[1; 4]),
        );
        assert!(!reply.is_error());
        assert!(wait_until(Duration::from_secs(5), || events
            .load(Ordering::SeqCst)
            == round + 1));
    }
    c.ping();
}

/// The measurement above can fail: a device that keeps watching a level
/// it does not consume makes the loop spin.
#[test]
fn a_device_that_keeps_watching_an_unread_fd_makes_the_loop_spin() {
    let (s, _c, events) = level_device(false);
    assert!(wait_until(Duration::from_secs(5), || events
        .load(Ordering::SeqCst)
        > 0));
    // The same level reported over and over (counted, not timed: a loaded
    // machine may give the loop little CPU, but it never sleeps).
    let cpu = s.loop_cpu_time();
    let before = events.load(Ordering::SeqCst);
    assert!(
        wait_until(Duration::from_secs(10), || events.load(Ordering::SeqCst)
            - before
            > 1000),
        "the loop did not spin"
    );
    assert!(s.loop_cpu_time() > cpu);
}
