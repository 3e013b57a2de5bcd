//! A [`Transport`] that calls a [`Device`] directly, in the test's thread,
//! with the server's own tables for it: a [`DmaTable`] for DMA_MAP and
//! DMA_UNMAP (so the device sees guest memory exactly as under a server)
//! and the [`Irqs`] of its [`DeviceContext`] for SET_IRQS.
//!
//! After every command it does what the event loop does after a burst of
//! messages: runs the device's deferred work until none is left and
//! handles the device's fds that are ready, all in the caller's thread, so
//! a test knows what the device did by the time a call returns. Work the
//! device hands to its own threads completes when the driver waits
//! ([`Transport::wait`]): the device's fds are polled then. A test that
//! wants to step the deferred work itself calls the device directly
//! ([`InProcess::device`]), which runs nothing else.

use std::fs::File;
use std::os::fd::{BorrowedFd, RawFd};
use std::time::Duration;

use vfio_user_server::device::{Device, DeviceContext, Interest, WatchedFd};
use vfio_user_server::guest_memory::{DmaLimits, DmaTable};
use vfio_user_server::irq::{Irqs, MaskChange};
use vfio_user_server::wire::{
    IrqSet, DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE, IRQ_SET_ACTION_TRIGGER, IRQ_SET_DATA_EVENTFD,
};

use crate::transport::{poll, Transport};

/// A device driven in-process, as its server would drive it.
pub struct InProcess<D: Device> {
    device: D,
    irqs: Irqs,
    dma: DmaTable,
}

impl<D: Device> InProcess<D> {
    /// Serves `device`, built with `context`, as `Server::new` does: the
    /// interrupt layout is read from the device, and DMA maps are published
    /// into `context.memory`.
    pub fn new(device: D, context: DeviceContext) -> Self {
        context.irqs.configure(&device.irq_layout());
        InProcess {
            device,
            irqs: context.irqs,
            dma: DmaTable::new(context.memory, DmaLimits::default()),
        }
    }

    /// The device, for direct calls and assertions. Nothing runs after a
    /// direct call: see [`InProcess::run`].
    pub fn device(&mut self) -> &mut D {
        &mut self.device
    }

    /// The device's interrupts, as SET_IRQS left them.
    pub fn irqs(&self) -> &Irqs {
        &self.irqs
    }

    /// The DMA maps.
    pub fn dma(&self) -> &DmaTable {
        &self.dma
    }

    /// Does what the event loop does between two sleeps: the device's
    /// deferred work until none is left, then its fds that are ready now,
    /// until neither has anything to do.
    pub fn run(&mut self) {
        loop {
            while self.device.lifecycle().run_deferred() {}
            if !self.handle_device_fds(&[], Duration::ZERO) {
                return;
            }
        }
    }

    /// Polls the device's watched fds, and `also` for readability, for up
    /// to `timeout`; hands the device those that are ready. Returns whether
    /// any was.
    fn handle_device_fds(&mut self, also: &[RawFd], timeout: Duration) -> bool {
        let watched: Vec<WatchedFd> = self
            .device
            .lifecycle()
            .watched_fds()
            .iter()
            .filter(|w| !w.interest.is_none())
            .copied()
            .collect();
        if watched.is_empty() {
            return false;
        }
        let mut pfds: Vec<libc::pollfd> = watched
            .iter()
            .map(|w| libc::pollfd {
                fd: w.fd,
                events: poll_events(w.interest),
                revents: 0,
            })
            .chain(also.iter().map(|&fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            }))
            .collect();
        poll(&mut pfds, timeout);
        let mut handled = false;
        for (w, p) in watched.iter().zip(&pfds) {
            if let Some(ready) = ready_interest(p.revents) {
                self.device.lifecycle().handle_event(w.fd, ready);
                handled = true;
            }
        }
        handled
    }

    /// Panics unless the server would let a client access `len` bytes at
    /// `offset` of region `index`.
    #[track_caller]
    fn check_access(&self, index: u32, offset: u64, len: usize, write: bool) {
        let r = self.device.region(index);
        let allowed = if write { r.write } else { r.read };
        let fits = offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= r.size);
        assert!(
            allowed && fits,
            "the server refuses {len} bytes at {offset:#x} of region {index} ({r:?}, write: {write})"
        );
    }
}

/// The poll events for `interest`.
fn poll_events(interest: Interest) -> libc::c_short {
    let mut events = 0;
    if interest.read {
        events |= libc::POLLIN;
    }
    if interest.write {
        events |= libc::POLLOUT;
    }
    events
}

/// The readiness poll found, as the event loop reports it (a hang-up or an
/// error is both readable and writable), if any.
fn ready_interest(revents: libc::c_short) -> Option<Interest> {
    let hup = revents & (libc::POLLHUP | libc::POLLERR) != 0;
    let ready = Interest {
        read: revents & libc::POLLIN != 0 || hup,
        write: revents & libc::POLLOUT != 0 || hup,
    };
    (!ready.is_none()).then_some(ready)
}

/// A duplicate of `fd`, as the server gets one from the client's message.
fn dup(fd: RawFd) -> File {
    // SAFETY: `fd` is open for the duration of the call (the caller owns
    // it); it is only borrowed to be duplicated.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    File::from(fd.try_clone_to_owned().expect("dup"))
}

impl<D: Device> Transport for InProcess<D> {
    #[track_caller]
    fn read_region(&mut self, index: u32, offset: u64, data: &mut [u8]) {
        self.check_access(index, offset, data.len(), false);
        if let Err(e) = self.device.region_read(index, offset, data) {
            panic!("REGION_READ of region {index} at {offset:#x}: {e}");
        }
        self.run();
    }

    #[track_caller]
    fn write_region(&mut self, index: u32, offset: u64, data: &[u8]) {
        self.check_access(index, offset, data.len(), true);
        if let Err(e) = self.device.region_write(index, offset, data) {
            panic!("REGION_WRITE of region {index} at {offset:#x}: {e}");
        }
        self.run();
    }

    #[track_caller]
    fn map_dma(&mut self, offset: u64, address: u64, size: u64, fd: RawFd) {
        let flags = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE;
        let raw = self.device.observes_raw_requests();
        let file = dup(fd);
        let seen = raw.then(|| file.try_clone().expect("dup"));
        if let Err(e) = self.dma.map(flags, offset, address, size, Some(file)) {
            panic!("DMA_MAP {address:#x}+{size:#x}: {e}");
        }
        if raw {
            if let Err(e) = self.device.dma_mapped(flags, offset, address, size, seen) {
                panic!("DMA_MAP {address:#x}+{size:#x}: the device: {e}");
            }
        }
        self.run();
    }

    #[track_caller]
    fn unmap_dma(&mut self, address: u64, size: u64) {
        self.device.lifecycle().dma_unmapping(address, size);
        if let Err(e) = self.dma.unmap(address, size) {
            panic!("DMA_UNMAP {address:#x}+{size:#x}: {e}");
        }
        self.run();
    }

    #[track_caller]
    fn set_irq_eventfds(&mut self, index: u32, start: u32, fds: &[RawFd]) {
        let set = IrqSet {
            argsz: IrqSet::SIZE as u32,
            flags: IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
            index,
            start,
            count: fds.len() as u32,
        };
        let files: Vec<File> = fds.iter().map(|&fd| dup(fd)).collect();
        let seen: Vec<File> = if self.device.observes_raw_requests() {
            files.iter().map(|f| f.try_clone().expect("dup")).collect()
        } else {
            Vec::new()
        };
        match self.irqs.set_irqs(&set, &[], files) {
            Ok(Some(MaskChange { runs, masked })) => {
                for (start, count) in runs {
                    self.device
                        .lifecycle()
                        .irq_mask_changed(index, start, count, masked);
                }
            }
            Ok(None) => {}
            Err(e) => panic!("SET_IRQS {set:?}: {e}"),
        }
        if self.device.observes_raw_requests() {
            if let Err(e) = self.device.irqs_set(&set, seen) {
                panic!("SET_IRQS {set:?}: the device: {e}");
            }
        }
        self.run();
    }

    fn reset_device(&mut self) {
        self.device
            .lifecycle()
            .reset(vfio_user_server::ResetReason::Command);
        self.run();
    }

    /// Runs the device (deferred work, ready fds); if it hands work to
    /// other threads (it watches fds), sleeps until one of its fds or of
    /// `fds` is ready, up to `timeout`, and runs it again. A device that
    /// watches nothing cannot make progress without the driver, so this
    /// returns at once.
    fn wait(&mut self, fds: &[RawFd], timeout: Duration) {
        self.run();
        if self.handle_device_fds(fds, timeout) {
            self.run();
        }
    }
}
