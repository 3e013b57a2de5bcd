//! The in-process transport does for a device what the server does:
//! DMA maps through the server's DMA table (guest memory in more than one
//! region, holes unreachable), SET_IRQS through its interrupts, resets and
//! unmaps through the lifecycle, and it refuses the accesses the server
//! refuses.

use std::os::fd::AsRawFd;
use std::time::Duration;

use integration_tests::guest_ram::GuestRam;
use integration_tests::in_process::InProcess;
use integration_tests::transport::{Transport, MSIX_INDEX};
use integration_tests::*;
use vfio_user_server::{Device, DeviceContext, ResetReason};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The test device served in-process, and what it records.
fn serve() -> (InProcess<TestDevice>, SharedState) {
    let ctx = DeviceContext::default();
    let (device, state) = TestDevice::new(ctx.clone());
    (InProcess::new(device, ctx), state)
}

#[test]
fn dma_irqs_reset_and_unmap_reach_the_device() {
    let (mut t, state) = serve();
    // Guest RAM in two regions: the device's DMA target lies in the first;
    // the second is mapped from further into the same memfd.
    let second = GUEST_RAM_BASE + 0x10_0000;
    let ram = GuestRam::with_regions(&[(GUEST_RAM_BASE, GUEST_RAM_SIZE), (second, 0x2000)]);
    ram.map_into(&mut t);
    assert_eq!(t.dma().ranges().count(), 2);
    assert!(t.dma().find(second, 0x2000).is_some());
    assert!(t.dma().find(GUEST_RAM_BASE + GUEST_RAM_SIZE, 1).is_none());

    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    t.set_irq_eventfds(MSIX_INDEX, 0, &[irq.as_raw_fd()]);
    assert!(t.irqs().enabled(MSIX_INDEX));
    // The doorbell makes the device write guest memory and interrupt.
    t.write_region(0, DMA_DOORBELL, &7u32.to_le_bytes());
    assert_eq!(lock(&state).dma, [(DMA_TARGET, dma_pattern(7), true)]);
    let mut b = [0u8; 8];
    ram.read_into(DMA_TARGET, &mut b);
    assert_eq!(u64::from_le_bytes(b), dma_pattern(7));
    assert_eq!(irq.read().unwrap(), 1);
    // A wait on a device that watches nothing returns at once.
    t.wait(&[irq.as_raw_fd()], Duration::from_secs(10));

    t.reset_device();
    assert_eq!(lock(&state).resets, [ResetReason::Command]);
    t.unmap_dma(GUEST_RAM_BASE, GUEST_RAM_SIZE);
    assert_eq!(lock(&state).unmapping, [(GUEST_RAM_BASE, GUEST_RAM_SIZE)]);
    // Guest memory went away for the device as well (a direct call: the
    // transport panics on a device error).
    let doorbell = t
        .device()
        .region_write(0, DMA_DOORBELL, &8u32.to_le_bytes());
    assert!(doorbell.is_err());
    assert_eq!(lock(&state).dma[1], (DMA_TARGET, dma_pattern(8), false));
}

#[test]
#[should_panic(expected = "the server refuses")]
fn accesses_beyond_a_region_are_refused() {
    let (mut t, _state) = serve();
    let mut b = [0u8; 8];
    t.read_region(0, BAR0_SIZE - 4, &mut b);
}
