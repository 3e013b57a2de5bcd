//! What a test-side driver needs from the way it reaches a device
//! ([`Transport`]), for the two vfio-user clients: the published
//! `vfio_user::Client` (what Cloud Hypervisor uses) and the raw-socket
//! [`RawClient`]. [`crate::in_process::InProcess`] implements it for a
//! device called directly.

use std::os::fd::RawFd;
use std::time::Duration;

use vfio_user::Client;

use crate::RawClient;

/// vfio-user region index of PCI config space.
pub const CONFIG_REGION: u32 = 7;
/// vfio-user IRQ index of INTx.
pub const INTX_INDEX: u32 = 0;
/// vfio-user IRQ index of MSI-X.
pub const MSIX_INDEX: u32 = 2;
/// SET_IRQS flag: the data are eventfds.
pub const IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
/// SET_IRQS flag: no data.
pub const IRQ_SET_DATA_NONE: u32 = 1 << 0;
/// SET_IRQS flag: the trigger action.
pub const IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;

/// What a driver needs from its connection to a device: the vfio-user
/// commands a VMM sends, and a way to wait while the device works.
/// Failures panic: these are tests.
pub trait Transport {
    /// REGION_READ.
    fn read_region(&mut self, index: u32, offset: u64, data: &mut [u8]);
    /// REGION_WRITE.
    fn write_region(&mut self, index: u32, offset: u64, data: &[u8]);
    /// DMA_MAP of `size` bytes of `fd` at `offset` to guest address `address`.
    fn map_dma(&mut self, offset: u64, address: u64, size: u64, fd: RawFd);
    /// DMA_UNMAP of the map at `address` of `size` bytes.
    fn unmap_dma(&mut self, address: u64, size: u64);
    /// SET_IRQS TRIGGER|EVENTFD of `fds` on vectors `start..` of `index`.
    fn set_irq_eventfds(&mut self, index: u32, start: u32, fds: &[RawFd]);
    /// DEVICE_RESET.
    fn reset_device(&mut self);
    /// Waits until one of `fds` (interrupt eventfds) is readable or
    /// `timeout` has passed, while the device works. A server runs the
    /// device on its own thread, so this only sleeps; a transport that runs
    /// the device itself does so here.
    fn wait(&mut self, fds: &[RawFd], timeout: Duration) {
        poll_readable(fds, timeout);
    }
    /// The raw client, for the commands the published client cannot send
    /// (migration).
    fn raw(&mut self) -> Option<&mut RawClient> {
        None
    }
}

/// Polls `fds` for readability for up to `timeout` (sleeps if there are
/// none); returns the `pollfd`s with their `revents`.
pub(crate) fn poll_readable(fds: &[RawFd], timeout: Duration) -> Vec<libc::pollfd> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    poll(&mut pfds, timeout);
    pfds
}

/// poll(2) on `pfds` for up to `timeout`.
pub(crate) fn poll(pfds: &mut [libc::pollfd], timeout: Duration) {
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: `pfds` is a valid array of `pfds.len()` pollfds; with none,
    // poll only sleeps.
    unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
}

impl Transport for Client {
    fn read_region(&mut self, index: u32, offset: u64, data: &mut [u8]) {
        self.region_read(index, offset, data).unwrap();
    }
    fn write_region(&mut self, index: u32, offset: u64, data: &[u8]) {
        self.region_write(index, offset, data).unwrap();
    }
    fn map_dma(&mut self, offset: u64, address: u64, size: u64, fd: RawFd) {
        self.dma_map(offset, address, size, fd).unwrap();
    }
    fn unmap_dma(&mut self, address: u64, size: u64) {
        self.dma_unmap(address, size).unwrap();
    }
    fn set_irq_eventfds(&mut self, index: u32, start: u32, fds: &[RawFd]) {
        self.set_irqs(
            index,
            IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
            start,
            fds.len() as u32,
            fds,
        )
        .unwrap();
    }
    fn reset_device(&mut self) {
        self.reset().unwrap();
    }
}

impl Transport for RawClient {
    #[track_caller]
    fn read_region(&mut self, index: u32, offset: u64, data: &mut [u8]) {
        let got = self.read_ok(index, offset, data.len() as u32);
        data.copy_from_slice(&got);
    }
    #[track_caller]
    fn write_region(&mut self, index: u32, offset: u64, data: &[u8]) {
        self.write_ok(index, offset, data);
    }
    #[track_caller]
    fn map_dma(&mut self, offset: u64, address: u64, size: u64, fd: RawFd) {
        self.dma_map(offset, address, size, Some(fd)).ok();
    }
    #[track_caller]
    fn unmap_dma(&mut self, address: u64, size: u64) {
        self.dma_unmap(0, address, size).ok();
    }
    #[track_caller]
    fn set_irq_eventfds(&mut self, index: u32, start: u32, fds: &[RawFd]) {
        self.set_irqs(
            IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
            index,
            start,
            fds.len() as u32,
            &[],
            fds,
        )
        .ok();
    }
    #[track_caller]
    fn reset_device(&mut self) {
        self.reset().ok();
    }
    fn raw(&mut self) -> Option<&mut RawClient> {
        Some(self)
    }
}
